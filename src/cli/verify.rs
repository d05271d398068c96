//! `spirekeep verify`

use clap::Args;

use super::exit;
use super::output::{print_failure, print_json};
use super::progress::Progress;
use super::repo::RepoArgs;
use crate::datastore::{self, OpenMode, dsn};
use crate::error::Error;
use crate::rehearse::{RehearsalOptions, RehearsalReport, Scratch};
use crate::snapshot::listing::{human_bytes, resolve};
use crate::snapshot::verify::{VerifyMode, VerifyReport, verify_snapshot_observed};

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Snapshot id, or `latest`.
    #[arg(value_name = "ID|latest", default_value = "latest")]
    pub snapshot: String,

    /// Also restore the snapshot into a scratch datastore and compare row counts and content hashes
    /// read back from it with the manifest (a restore drill).
    #[arg(long)]
    pub deep: bool,

    /// Scratch datastore for --deep or --rehearse, which must be empty (everything restored into it is
    /// dropped afterwards): a connection string as SPIRE writes it, or a SQLite path. Default: a temporary
    /// SQLite file in $TMPDIR (about the size of the datastore).
    #[arg(long, value_name = "DATASTORE")]
    pub scratch: Option<String>,

    /// Upgrade rehearsal: restore the snapshot into a scratch datastore, start the --spire-server binary
    /// on it (own port, socket and data directory; in-memory keys), and report whether that release
    /// accepts the data and which schema it leaves. Exit 0 when it does, 1 when it refuses.
    #[arg(long, requires = "spire_server", conflicts_with = "deep")]
    pub rehearse: bool,

    /// The spire-server binary of the release to rehearse (e.g. the one you are about to deploy).
    #[arg(long, value_name = "PATH")]
    pub spire_server: Option<std::path::PathBuf>,

    /// Trust domain of the rehearsal server. Default: that of the snapshot's first registration entry,
    /// which SPIRE compares with its own at start-up.
    #[arg(long, value_name = "NAME")]
    pub trust_domain: Option<String>,

    /// How long the rehearsal server may take to become healthy.
    #[arg(long, value_name = "DURATION", default_value = "90s", value_parser = humantime::parse_duration)]
    pub rehearse_timeout: std::time::Duration,

    #[command(flatten)]
    pub repo: RepoArgs,

    /// Needed to decrypt an encrypted snapshot's rows; without it only the stored (encrypted) bytes
    /// are checked, and the report says what was not.
    #[command(flatten)]
    pub identity: super::keys::IdentityArgs,

    /// The repository lock, held while the snapshot is read (no prune can
    /// delete its objects meanwhile).
    #[command(flatten)]
    pub lock: super::lock::LockArgs,
}

pub(crate) async fn run(args: &VerifyArgs, json: bool) -> anyhow::Result<u8> {
    if args.scratch.is_some() && !args.deep && !args.rehearse {
        return Err(Error::Unsupported(
            "--scratch is the datastore of a restore drill: use it with --deep or --rehearse"
                .into(),
        )
        .into());
    }
    if args.rehearse {
        return rehearse(args, json).await;
    }
    let scratch_spec = match &args.scratch {
        Some(s) => {
            let cwd = std::env::current_dir().map_err(|e| {
                Error::Unsupported(format!("cannot read the current directory: {e}"))
            })?;
            Some(dsn::parse(s, None, &cwd)?)
        }
        None => None,
    };
    let repo = args.identity.attach(args.repo.open()?)?;
    // Under a shared lease of the repository lock, so no prune deletes the
    // snapshot's objects while they are read (a verify racing a prune would
    // report a damaged snapshot that was only being deleted); other verifies
    // may run beside it.
    let held = super::lock::Held::acquire_shared(&repo, &args.lock, "verify").await?;
    let progress = Progress::new("verify", json);
    let work = async {
        let id = resolve(&repo, &args.snapshot).await?;
        Ok(match &scratch_spec {
            Some(spec) => {
                let ds = datastore::open(spec, OpenMode::Create).await?;
                let r = verify_snapshot_observed(
                    &repo,
                    &id,
                    VerifyMode::DeepInto(ds.as_ref()),
                    &progress,
                )
                .await;
                ds.close().await;
                r?
            }
            None if args.deep => {
                verify_snapshot_observed(&repo, &id, VerifyMode::Deep, &progress).await?
            }
            None => verify_snapshot_observed(&repo, &id, VerifyMode::Shallow, &progress).await?,
        })
    };
    let report = held.guard(work).await;
    held.release().await;
    progress.clear();
    let report = report?;
    tracing::info!(
        event = "verify_finished",
        snapshot_id = %report.snapshot_id,
        kind = report.kind.as_str(),
        ok = report.ok,
        rows = report.rows,
        bytes = report.stored_bytes,
        duration_seconds = report.seconds,
        "verification {}",
        if report.ok { "passed" } else { "FAILED" }
    );
    if json {
        print_json(&report)?;
    } else {
        print_text(&report);
    }
    if report.ok {
        Ok(exit::OK)
    } else {
        print_failure(
            &format!(
                "snapshot {} failed verification ({} problem(s)); do not restore it: {}",
                report.snapshot_id,
                report.problems.len(),
                report.problems.first().map_or("", String::as_str)
            ),
            exit::CHECK_FAILED,
        );
        Ok(exit::CHECK_FAILED)
    }
}

async fn rehearse(args: &VerifyArgs, json: bool) -> anyhow::Result<u8> {
    let scratch = match &args.scratch {
        Some(s) => {
            let cwd = std::env::current_dir().map_err(|e| {
                Error::Unsupported(format!("cannot read the current directory: {e}"))
            })?;
            let spec = dsn::parse(s, None, &cwd)?;
            Scratch::Given {
                connection_string: dsn::spire_connection_string(s, &spec)?,
                spec: Box::new(spec),
            }
        }
        None => Scratch::TemporaryFile,
    };
    let options = RehearsalOptions {
        spire_server: args.spire_server.clone().unwrap_or_default(),
        scratch,
        trust_domain: args.trust_domain.clone(),
        timeout: args.rehearse_timeout,
    };
    let repo = args.identity.attach(args.repo.open()?)?;
    // Under a shared lease, like any verify: no prune deletes the snapshot meanwhile.
    let held = super::lock::Held::acquire_shared(&repo, &args.lock, "verify --rehearse").await?;
    let work = async {
        let id = resolve(&repo, &args.snapshot).await?;
        Ok(crate::rehearse::rehearse(&repo, &id, &options).await?)
    };
    let report = held.guard(work).await;
    held.release().await;
    let report = report?;
    if json {
        print_json(&report)?;
    } else {
        print_rehearsal(&report);
    }
    if report.accepted {
        Ok(exit::OK)
    } else {
        eprintln!(
            "error: {} refuses snapshot {}: {}",
            report.spire_version,
            report.snapshot_id,
            report
                .spire_error
                .as_deref()
                .unwrap_or("it did not become healthy")
        );
        Ok(exit::CHECK_FAILED)
    }
}

fn print_rehearsal(r: &RehearsalReport) {
    let row = |s: &Option<crate::rehearse::SchemaRow>| match s {
        Some(s) => format!(
            "schema {}, code_version \"{}\"",
            s.schema_version, s.code_version
        ),
        None => "no migrations row".to_string(),
    };
    println!(
        "rehearsal of snapshot {} with {} ({}): {} in {:.1} s",
        r.snapshot_id,
        r.spire_server,
        r.spire_version,
        if r.accepted { "ACCEPTED" } else { "REFUSED" },
        r.seconds
    );
    println!("  scratch    {}", r.scratch);
    println!("  trust      {}", r.trust_domain);
    println!("  before     {}", row(&r.schema_before));
    println!("  after      {}", row(&r.schema_after));
    if let Some(e) = &r.spire_error {
        println!("  spire      {e}");
    }
}

fn print_text(r: &VerifyReport) {
    let rows = if r.unchecked.is_empty() {
        format!("{} rows", r.rows)
    } else {
        "rows not decrypted".to_owned()
    };
    println!(
        "snapshot {}: {} ({} verification): {} objects, {} read, {rows} in {} tables, {:.1} s",
        r.snapshot_id,
        if r.ok { "ok" } else { "FAILED" },
        r.kind.as_str(),
        r.objects,
        human_bytes(r.stored_bytes),
        r.tables.len(),
        r.seconds
    );
    if let Some(scratch) = &r.scratch {
        let restored = r
            .tables
            .iter()
            .filter(|t| t.restored_hash_ok == Some(true))
            .count();
        println!(
            "  restore drill into {scratch}: {restored} of {} tables read back with matching rows and content hashes",
            r.tables.len()
        );
    }
    for p in &r.problems {
        println!("  problem: {p}");
    }
    if !r.unchecked.is_empty() {
        println!("  NOT checked (the snapshot is encrypted and no --identity was given):");
        for u in &r.unchecked {
            println!("    - {u}");
        }
    }
    for n in &r.notes {
        println!("  note: {n}");
    }
    for w in &r.warnings {
        println!("  warning: {w}");
    }
    if let Some(key) = &r.record_key {
        println!("  recorded in {key}");
    }
}
