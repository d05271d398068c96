//! `spirekeep verify`

use clap::Args;

use super::exit;
use super::output::print_json;
use super::repo::RepoArgs;
use crate::datastore::{self, OpenMode, dsn};
use crate::error::Error;
use crate::snapshot::listing::{human_bytes, resolve};
use crate::snapshot::verify::{VerifyMode, VerifyReport, verify_snapshot};

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Snapshot id, or `latest`.
    #[arg(value_name = "ID|latest", default_value = "latest")]
    pub snapshot: String,

    /// Also restore the snapshot into a scratch datastore and compare row counts and content hashes
    /// read back from it with the manifest (a restore drill).
    #[arg(long)]
    pub deep: bool,

    /// Scratch datastore for --deep, which must be empty (the restored tables are dropped afterwards):
    /// a connection string or SQLite path. Default: a temporary SQLite file in $TMPDIR (about the size of the datastore).
    #[arg(long, value_name = "DATASTORE", requires = "deep")]
    pub scratch: Option<String>,

    #[command(flatten)]
    pub repo: RepoArgs,

    /// The repository lock, held while the snapshot is read (no prune can
    /// delete its objects meanwhile).
    #[command(flatten)]
    pub lock: super::lock::LockArgs,
}

pub(crate) async fn run(args: &VerifyArgs, json: bool) -> anyhow::Result<u8> {
    let scratch_spec = match &args.scratch {
        Some(s) => {
            let cwd = std::env::current_dir().map_err(|e| {
                Error::Unsupported(format!("cannot read the current directory: {e}"))
            })?;
            Some(dsn::parse(s, None, &cwd)?)
        }
        None => None,
    };
    let repo = args.repo.open()?;
    // Under the repository lock, so no prune deletes the snapshot's objects
    // while they are read (a verify racing a prune would report a damaged
    // snapshot that was only being deleted).
    let held = super::lock::Held::acquire(&repo, &args.lock, "verify").await?;
    let work = async {
        let id = resolve(&repo, &args.snapshot).await?;
        Ok(match &scratch_spec {
            Some(spec) => {
                let ds = datastore::open(spec, OpenMode::Create).await?;
                let r = verify_snapshot(&repo, &id, VerifyMode::DeepInto(ds.as_ref())).await;
                ds.close().await;
                r?
            }
            None if args.deep => verify_snapshot(&repo, &id, VerifyMode::Deep).await?,
            None => verify_snapshot(&repo, &id, VerifyMode::Shallow).await?,
        })
    };
    let report = held.guard(work).await;
    held.release().await;
    let report = report?;
    if json {
        print_json(&report)?;
    } else {
        print_text(&report);
    }
    if report.ok {
        Ok(exit::OK)
    } else {
        eprintln!(
            "error: snapshot {} failed verification ({} problem(s)); do not restore it: {}",
            report.snapshot_id,
            report.problems.len(),
            report.problems.first().map_or("", String::as_str)
        );
        Ok(exit::CHECK_FAILED)
    }
}

fn print_text(r: &VerifyReport) {
    println!(
        "snapshot {}: {} ({} verification): {} objects, {} read, {} rows in {} tables, {:.1} s",
        r.snapshot_id,
        if r.ok { "ok" } else { "FAILED" },
        r.kind.as_str(),
        r.objects,
        human_bytes(r.stored_bytes),
        r.rows,
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
    for n in &r.notes {
        println!("  note: {n}");
    }
    if let Some(key) = &r.record_key {
        println!("  recorded in {key}");
    }
}
