//! `spirekeep list` and `spirekeep show`

use clap::Args;

use super::exit;
use super::output::print_json;
use super::repo::RepoArgs;
use crate::snapshot::listing::{
    ListedSnapshot, SnapshotSummary, human_bytes, resolve, rfc3339, summaries,
};
use crate::snapshot::{Manifest, VerificationRecord};

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Snapshot id, or `latest`.
    #[arg(value_name = "ID|latest")]
    pub snapshot: String,

    #[command(flatten)]
    pub repo: RepoArgs,
}

pub(crate) async fn list(args: &ListArgs, json: bool) -> anyhow::Result<u8> {
    let repo = args.repo.open()?;
    let all = summaries(&repo).await?;
    if json {
        print_json(&all)?;
        return Ok(exit::OK);
    }
    if all.is_empty() {
        println!("{repo} holds no snapshots yet; take one with `spirekeep backup`");
        return Ok(exit::OK);
    }
    println!(
        "{:<24} {:<21} {:<9} {:>6} {:<18} {:>10} {:>9}  {:<24} LABELS",
        "ID", "STARTED", "ENGINE", "SCHEMA", "CODE VERSION", "SIZE", "ROWS", "VERIFIED"
    );
    let mut damaged = 0;
    for entry in &all {
        let s = match entry {
            ListedSnapshot::Readable(s) => s,
            ListedSnapshot::Damaged(d) => {
                damaged += 1;
                println!(
                    "{:<24} {:<21} DAMAGED: cannot be restored: {}",
                    d.id.as_str(),
                    rfc3339(d.started_at),
                    d.damaged
                );
                continue;
            }
        };
        println!(
            "{:<24} {:<21} {:<9} {:>6} {:<18} {:>10} {:>9}  {:<24} {}",
            s.id.as_str(),
            rfc3339(s.started_at),
            s.engine.to_string(),
            s.schema_version,
            s.code_version,
            human_bytes(s.size),
            s.rows,
            s.verification_text(),
            s.labels.join(",")
        );
    }
    if damaged > 0 {
        eprintln!(
            "warning: {damaged} snapshot(s) have a damaged manifest (marked DAMAGED) and cannot be restored"
        );
    }
    Ok(exit::OK)
}

pub(crate) async fn show(args: &ShowArgs, json: bool) -> anyhow::Result<u8> {
    let repo = args.repo.open()?;
    let id = resolve(&repo, &args.snapshot).await?;
    let manifest = Manifest::load(&repo, &id)
        .await
        .map_err(crate::Error::from)?;
    let records = VerificationRecord::load_all(&repo, &id)
        .await
        .map_err(crate::Error::from)?;
    if json {
        let body = serde_json::json!({
            "summary": SnapshotSummary::new(&manifest, &records),
            "manifest": manifest,
            "verifications": records,
        });
        print_json(&body)?;
        return Ok(exit::OK);
    }
    let summary = SnapshotSummary::new(&manifest, &records);
    println!("snapshot     {}", manifest.snapshot_id);
    println!("repository   {repo}");
    println!(
        "taken        {} .. {}",
        rfc3339(manifest.started_at),
        rfc3339(manifest.finished_at)
    );
    println!(
        "source       {} ({} {})",
        manifest.source, manifest.engine, manifest.server_version
    );
    println!(
        "SPIRE        schema {}, code_version {}",
        manifest.spire.schema_version,
        if manifest.spire.code_version.is_empty() {
            "(empty)"
        } else {
            &manifest.spire.code_version
        }
    );
    println!(
        "labels       {}",
        if manifest.labels.is_empty() {
            "-".into()
        } else {
            manifest.labels.join(", ")
        }
    );
    println!("written by   spirekeep {}", manifest.spirekeep_version);
    if manifest.is_encrypted() {
        println!(
            "encrypted    age, to {} (restore and full verify need a matching --identity)",
            manifest.recipients().join(", ")
        );
    }
    println!(
        "size         {} stored, {} rows",
        human_bytes(manifest.total_size()),
        manifest.total_rows()
    );
    println!("verification {}", summary.verification_text());
    for r in records.iter().filter(|r| !r.ok) {
        for p in &r.problems {
            println!("  problem ({}): {p}", rfc3339(r.verified_at));
        }
    }
    println!();
    println!(
        "{:<36} {:>10} {:>8} {:>10}  CONTENT HASH",
        "TABLE", "ROWS", "OBJECTS", "SIZE"
    );
    for t in &manifest.tables {
        let size: u64 = t.objects.iter().map(|o| o.size).sum();
        println!(
            "{:<36} {:>10} {:>8} {:>10}  {}",
            t.name,
            t.rows,
            t.objects.len(),
            human_bytes(size),
            &t.content_hash[..16.min(t.content_hash.len())]
        );
    }
    Ok(exit::OK)
}
