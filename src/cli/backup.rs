//! `spirekeep backup`

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;

use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::output::print_json;
use super::repo::RepoArgs;
use super::{DatastoreArgs, exit};
use crate::datastore::{self, OpenMode, Table};
use crate::snapshot::backup::{BackupObserver, BackupOptions, backup};
use crate::snapshot::listing::{SnapshotSummary, human_bytes, rfc3339};
use crate::snapshot::{CodecOptions, TableData};
use crate::store::keys::SnapshotId;

#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(flatten)]
    pub datastore: DatastoreArgs,

    #[command(flatten)]
    pub repo: RepoArgs,

    /// Label recorded in the manifest (repeatable), e.g. --label pre-upgrade.
    #[arg(long = "label", value_name = "LABEL")]
    pub labels: Vec<String>,

    /// zstd level (1-19). 3 is fast and compresses SPIRE data about 3:1.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub compression_level: i32,

    /// zstd worker threads (0 compresses on the encoding thread).
    #[arg(long, default_value_t = 0)]
    pub compression_workers: u32,
}

pub(crate) async fn run(args: &BackupArgs, json: bool) -> anyhow::Result<u8> {
    let resolved = args.datastore.resolve()?;
    let repo = args.repo.open()?;
    let ds = datastore::open(&resolved.spec, OpenMode::ReadOnly).await?;
    let options = BackupOptions {
        labels: args.labels.clone(),
        codec: CodecOptions {
            level: args.compression_level,
            workers: args.compression_workers,
        },
        ..BackupOptions::default()
    };
    let progress = TerminalProgress::new(!json && std::io::stderr().is_terminal());
    let result = backup(ds.as_ref(), &repo, &options, &progress).await;
    ds.close().await;
    progress.clear();
    let manifest = result?;
    let summary = SnapshotSummary::new(&manifest, &[]);
    if json {
        print_json(&summary)?;
    } else {
        let seconds = (manifest.finished_at - manifest.started_at).as_seconds_f64();
        println!(
            "snapshot {} written to {repo}\n  {} rows in {} tables, {} stored, {:.1} s, SPIRE schema {} ({}), started {}",
            manifest.snapshot_id,
            manifest.total_rows(),
            manifest.tables.len(),
            human_bytes(manifest.total_size()),
            seconds,
            manifest.spire.schema_version,
            if manifest.spire.code_version.is_empty() {
                "no code_version"
            } else {
                &manifest.spire.code_version
            },
            rfc3339(manifest.started_at),
        );
    }
    Ok(exit::OK)
}

/// One progress line per table on a terminal; nothing otherwise.
struct TerminalProgress {
    multi: Option<MultiProgress>,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl TerminalProgress {
    fn new(enabled: bool) -> Self {
        Self {
            multi: enabled.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
            bars: Mutex::new(HashMap::new()),
        }
    }

    fn bar(&self, table: &str) -> Option<ProgressBar> {
        let multi = self.multi.as_ref()?;
        let mut bars = self.bars.lock().ok()?;
        Some(
            bars.entry(table.to_string())
                .or_insert_with(|| {
                    let bar = multi.add(ProgressBar::new_spinner());
                    let style = ProgressStyle::with_template(
                        "{spinner} {prefix:<32} {pos:>10} rows {per_sec:>12}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_spinner());
                    bar.set_style(style);
                    bar.set_prefix(table.to_string());
                    bar
                })
                .clone(),
        )
    }

    fn clear(&self) {
        if let Some(multi) = &self.multi {
            let _ = multi.clear();
        }
    }
}

impl BackupObserver for TerminalProgress {
    fn started(&self, id: &SnapshotId, _tables: &[Table]) {
        if let Some(multi) = &self.multi {
            let _ = multi.println(format!("snapshot {id}: one consistent read of every table"));
        }
    }

    fn rows(&self, table: &str, copied: u64) {
        if let Some(bar) = self.bar(table) {
            bar.set_position(copied);
        }
    }

    fn table_done(&self, table: &TableData) {
        if let Some(bar) = self.bar(&table.name) {
            bar.set_position(table.rows);
            bar.finish();
        }
    }
}
