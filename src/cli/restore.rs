//! `spirekeep restore`

use clap::Args;

use super::output::{print_failure, print_json};
use super::progress::Progress;
use super::repo::RepoArgs;
use super::{DatastoreArgs, exit};
use crate::datastore::dsn::ConnectionSpec;
use crate::datastore::{self, OpenMode};
use crate::error::{Error, ErrorKind};
use crate::snapshot::Manifest;
use crate::snapshot::adapt::ChangeKind;
use crate::snapshot::listing::{human_bytes, resolve, rfc3339};
use crate::snapshot::manifest::RowAccess;
use crate::snapshot::restore::{RestoreOptions, RestorePlan, RestoreReport, execute_fenced, plan};
use crate::snapshot::server_files;

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Snapshot id, or `latest`.
    #[arg(value_name = "ID|latest")]
    pub snapshot: String,

    /// The datastore to restore into (see --datastore / --spire-config). A SQLite path that does not exist is created.
    #[command(flatten)]
    pub datastore: DatastoreArgs,

    #[command(flatten)]
    pub repo: RepoArgs,

    /// Needed to restore an encrypted snapshot.
    #[command(flatten)]
    pub identity: super::keys::IdentityArgs,

    /// Replace a datastore that already holds tables (every table in it is dropped). Stop every SPIRE server first:
    /// a target that other clients still use is refused (see --force).
    #[arg(long)]
    pub replace: bool,

    /// Replace the target even while other clients (SPIRE servers) use it. Without it, `--replace` refuses and names
    /// them: stop every SPIRE server using the datastore, restore, then start them (a running server keeps writing
    /// into what is being replaced, and with the events-based cache it never sees the restored rows).
    #[arg(long)]
    pub force: bool,

    /// Apply the values the preflight lists as changed for the target engine (e.g. sub-second times and four-byte
    /// UTF-8 into MySQL), and record them in the repository. Without it the restore refuses.
    #[arg(long)]
    pub accept_changes: bool,

    /// Check the snapshot, run the preflight and show the impact on the live datastore, then stop: nothing is written.
    #[arg(long)]
    pub dry_run: bool,

    /// Also write the snapshot's SPIRE server files (the disk KeyManager's keys file, the data dir) under DIR, each
    /// checked against its SHA-256 first; without DIR (put the flag last, or write --server-files=DIR), into the
    /// data_dir of --spire-config. Existing files are refused unless --replace. An encrypted snapshot needs --identity.
    #[arg(long, value_name = "DIR", num_args = 0..=1)]
    pub server_files: Option<Option<std::path::PathBuf>>,

    /// The repository lock, held while the restore runs (no prune can delete the snapshot meanwhile).
    #[command(flatten)]
    pub lock: super::lock::LockArgs,
}

pub(crate) async fn run(args: &RestoreArgs, json: bool) -> anyhow::Result<u8> {
    let resolved = args.datastore.resolve()?;
    let repo = args.identity.attach(args.repo.open()?)?;
    let id = resolve(&repo, &args.snapshot).await?;
    let manifest = Manifest::load(&repo, &id).await.map_err(Error::from)?;
    // Before the target is even opened: no identity, no rows.
    if manifest.row_access(repo.identities())? == RowAccess::NoIdentity {
        return Err(manifest.needs_identity("restoring it").into());
    }
    let server_dir = server_files_dir(args, &resolved)?;
    if let Some(dir) = &server_dir {
        server_files::check_restore(&manifest, &repo, dir, args.replace)?;
    }
    let options = RestoreOptions {
        replace: args.replace,
        accept_changes: args.accept_changes,
        dry_run: args.dry_run,
        force: args.force,
    };
    // A dry run must not leave a new SQLite file behind.
    let created_sqlite = match &resolved.spec {
        ConnectionSpec::Sqlite(s) if !s.path.exists() => Some(s.path.clone()),
        _ => None,
    };
    let target = datastore::open(&resolved.spec, OpenMode::Create).await?;
    // Stages, and per table the rows of the snapshot's count loaded (bars
    // with rate and ETA on a terminal, one line each otherwise).
    let progress = Progress::new("restore", json);
    let planned = plan(&repo, &manifest, target.as_ref(), &options, &progress).await;
    // Nothing is written before execute: a SQLite file opened (and so
    // created) only to be planned against is removed again.
    let remove_created = || {
        if let Some(path) = &created_sqlite {
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let mut p = path.clone().into_os_string();
                p.push(suffix);
                let _ = std::fs::remove_file(p);
            }
        }
    };
    let planned = match planned {
        Ok(p) => p,
        Err(e) => {
            target.close().await;
            progress.clear();
            remove_created();
            return Err(e.into());
        }
    };
    if !planned.can_proceed() || options.dry_run {
        target.close().await;
        progress.clear();
        remove_created();
        if json {
            print_json(&planned)?;
        } else {
            print_plan(&planned, &manifest);
            if let Some(dir) = &server_dir {
                println!(
                    "  server files: {} would be written under {}",
                    manifest.server_files.len(),
                    dir.display()
                );
            }
        }
        return Ok(match planned.refusal_error() {
            None => {
                if !json {
                    println!("dry run: nothing was changed");
                }
                exit::OK
            }
            Some(e) => {
                let code = match e.kind() {
                    ErrorKind::Usage | ErrorKind::NotSpire => exit::USAGE,
                    _ => exit::CHECK_FAILED,
                };
                print_failure(&e.to_string(), code);
                code
            }
        });
    }
    if !json {
        print_plan(&planned, &manifest);
    }
    // Under the repository lock, so no prune deletes the snapshot while it is read.
    let result = match super::lock::Held::acquire(&repo, &args.lock, "restore").await {
        Ok(held) => {
            let work = async {
                let fence = held.lock();
                Ok(execute_fenced(
                    &repo,
                    &manifest,
                    target.as_ref(),
                    &planned,
                    &progress,
                    fence,
                )
                .await?)
            };
            let result = held.guard(work).await;
            held.release().await;
            result
        }
        Err(e) => Err(e),
    };
    target.close().await;
    progress.clear();
    let report = result.map_err(|e| {
        e.context(format!(
            "restore of snapshot {} into {}",
            planned.snapshot_id, planned.target
        ))
    })?;
    let restored_files = match &server_dir {
        Some(dir) => Some(
            server_files::restore_files(&repo, &manifest, dir, args.replace)
                .await
                .map_err(|e| {
                    anyhow::Error::from(e).context(format!(
                        "snapshot {}'s datastore was restored into {}, but its server files were not",
                        planned.snapshot_id, planned.target
                    ))
                })?,
        ),
        None => None,
    };
    if json {
        let mut value = serde_json::to_value(&report)?;
        if let (Some(files), Some(obj)) = (&restored_files, value.as_object_mut()) {
            obj.insert("server_files".into(), serde_json::to_value(files)?);
        }
        print_json(&value)?;
    } else {
        print_report(&report);
        if let Some(f) = &restored_files {
            println!(
                "  server files: {} written under {} ({}); start the SPIRE server with this data dir and keys_path",
                f.files.len(),
                f.dir.display(),
                human_bytes(f.bytes)
            );
        }
    }
    Ok(exit::OK)
}

/// Where `--server-files` writes: its DIR, or the data dir of --spire-config.
fn server_files_dir(
    args: &RestoreArgs,
    resolved: &crate::config::ResolvedDatastore,
) -> Result<Option<std::path::PathBuf>, Error> {
    match &args.server_files {
        None => Ok(None),
        Some(Some(dir)) => Ok(Some(dir.clone())),
        Some(None) => resolved
            .server
            .as_ref()
            .and_then(|l| l.data_dir.clone())
            .map(Some)
            .ok_or_else(|| {
                Error::Unsupported(
                    "--server-files without a directory writes into the data_dir of --spire-config: give \
                     --spire-config with a server.conf that sets data_dir, or --server-files DIR"
                        .into(),
                )
            }),
    }
}

fn print_plan(p: &RestorePlan, manifest: &Manifest) {
    println!(
        "restore snapshot {} ({} {}, schema {}, taken {}) into {} ({})",
        p.snapshot_id,
        p.source_engine,
        manifest.server_version,
        manifest.spire.schema_version,
        rfc3339(p.snapshot_time),
        p.target,
        p.target_engine
    );
    println!(
        "  snapshot: {} rows in {} tables; hash check ({}): {} objects, {}: {}",
        p.rows,
        p.tables.len(),
        p.hash_check.mode,
        p.hash_check.objects,
        human_bytes(p.hash_check.stored_bytes),
        if p.problems.is_empty() {
            "ok"
        } else {
            "FAILED"
        }
    );
    for problem in &p.problems {
        println!("    problem: {problem}");
    }
    if p.existing_tables.is_empty() {
        println!("  target: empty");
    } else {
        println!(
            "  target: holds {} table(s), all of which the restore drops and replaces",
            p.existing_tables.len()
        );
    }
    if p.other_sessions.is_empty() {
        println!("  other clients on the target: none");
    } else {
        let connections: u64 = p.other_sessions.iter().map(|s| s.connections).sum();
        println!(
            "  other clients on the target: {connections} connection(s){}",
            if p.existing_tables.is_empty() {
                ""
            } else if p.force {
                " (--force: replaced anyway; restart every SPIRE server after the restore)"
            } else {
                " (stop every SPIRE server using this datastore before the restore, start them after it)"
            }
        );
        for s in &p.other_sessions {
            println!("    {s}");
        }
    }
    let pf = &p.preflight;
    if pf.ran {
        println!(
            "  preflight ({} -> {}): {} change(s), {} needing --accept-changes, {} row(s) that cannot go in",
            p.source_engine,
            p.target_engine,
            pf.total,
            pf.needs_consent.saturating_sub(pf.blocking),
            pf.blocking
        );
        // Every change that needs consent (or cannot go in) one by one; the
        // rest (PostgreSQL's nanoseconds) as counts. --json lists them all.
        for c in pf.changes.iter().filter(|c| c.kind.needs_consent()) {
            println!(
                "    {}  {}  {}  {}: {}",
                c.table,
                c.row,
                c.column,
                kind_name(c.kind),
                c.detail
            );
        }
        if pf.truncated {
            println!(
                "    ... {} more (all of them are counted below, and covered by the digest)",
                pf.total - pf.changes.len() as u64
            );
        }
        if pf.truncated || pf.changes.iter().any(|c| !c.kind.needs_consent()) {
            println!("    per table, column and kind:");
            for c in &pf.counts {
                println!(
                    "      {}  {}  {}: {}",
                    c.table,
                    c.column,
                    kind_name(c.kind),
                    c.count
                );
            }
        }
    }
    if let Some(i) = &p.impact {
        println!("  impact on the live datastore (what replacing it changes):");
        println!(
            "    agents attested since the snapshot: {} (unknown after the restore: they must attest again)",
            i.agents.attested_since
        );
        println!(
            "    agents whose SVID rotated since: {} (rejected until they attest again)",
            i.agents.rotated_since
        );
        if i.agents.join_token_agents > 0 {
            println!(
                "    of these, join-token agents: {} (they cannot attest again on their own: each needs a new join token)",
                i.agents.join_token_agents
            );
        }
        if !i.agents.examples.is_empty() {
            println!("      e.g. {}", i.agents.examples.join(", "));
        }
        println!(
            "    agents in the snapshot but gone now: {} (they come back)",
            i.agents.come_back
        );
        println!(
            "    registration entries: {} created since (gone after the restore), {} deleted since (back after)",
            i.entries.created_since, i.entries.deleted_since
        );
        println!(
            "    bundles: {} created since (gone after the restore), {} deleted since (back after)",
            i.bundles.created_since, i.bundles.deleted_since
        );
    }
}

/// The kind as it appears in --json (`sub_second_timestamp`, ...).
fn kind_name(kind: ChangeKind) -> String {
    serde_json::to_value(kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{kind:?}"))
}

fn print_report(r: &RestoreReport) {
    let adapted = r.tables.iter().filter(|t| !t.matches_manifest).count();
    println!(
        "restored {} rows into {} tables of {} in {:.1} s; row counts and content hashes read back match {}",
        r.rows,
        r.tables.len(),
        r.plan.target,
        r.seconds,
        if adapted == 0 {
            "the snapshot".to_string()
        } else {
            format!(
                "the snapshot ({adapted} table(s) with the {} listed change(s) applied)",
                r.changes_applied
            )
        }
    );
    let checked = r.sequences.iter().filter(|s| s.ok == Some(true)).count();
    println!(
        "  auto-increment: {checked} of {} sequences checked to continue past the restored ids{}",
        r.sequences.len(),
        if r.plan.target_engine == crate::datastore::Engine::Mysql {
            " (InnoDB keeps AUTO_INCREMENT past the largest id on its own)"
        } else {
            ""
        }
    );
    for w in &r.warnings {
        println!("  warning: {w}");
    }
    match (&r.record_key, &r.record_error) {
        (Some(k), _) => println!("  recorded in {k}"),
        (None, Some(e)) => println!("  warning: the restore record could not be written: {e}"),
        _ => {}
    }
}
