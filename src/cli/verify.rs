//! `spirekeep verify`

use clap::Args;

use super::exit;
use super::output::{print_failure, print_json};
use super::progress::Progress;
use super::repo::RepoArgs;
use crate::datastore::{self, OpenMode, dsn};
use crate::error::Error;
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

    /// Scratch datastore for --deep, which must be empty (the restored tables are dropped afterwards):
    /// a connection string or SQLite path. Default: a temporary SQLite file in $TMPDIR (about the size of the datastore).
    #[arg(long, value_name = "DATASTORE", requires = "deep")]
    pub scratch: Option<String>,

    #[command(flatten)]
    pub repo: RepoArgs,
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
    let id = resolve(&repo, &args.snapshot).await?;
    let progress = Progress::new("verify", json);
    let report = match &scratch_spec {
        Some(spec) => {
            let ds = datastore::open(spec, OpenMode::Create).await?;
            let r =
                verify_snapshot_observed(&repo, &id, VerifyMode::DeepInto(ds.as_ref()), &progress)
                    .await;
            ds.close().await;
            r
        }
        None if args.deep => {
            verify_snapshot_observed(&repo, &id, VerifyMode::Deep, &progress).await
        }
        None => verify_snapshot_observed(&repo, &id, VerifyMode::Shallow, &progress).await,
    };
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
