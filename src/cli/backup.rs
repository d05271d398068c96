//! `spirekeep backup`

use std::collections::HashMap;
use std::time::Instant;

use clap::Args;

use super::lock::{Held, LockArgs};
use super::output::{print_json, print_warning};
use super::progress::{Mode, Progress, Unit, rows_and_bytes};
use super::repo::RepoArgs;
use super::{DatastoreArgs, exit};
use crate::datastore::{self, Datastore, OpenMode, Table};
use crate::metrics::{FailureCounters, FailureKind, MetricsReport};
use crate::snapshot::backup::{BackupObserver, BackupOptions, backup_fenced};
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

    /// zstd level (1-19). 1 is fastest and compresses SPIRE data about 3.4:1 (3 saves 1 % for 1.7 times the CPU).
    #[arg(long, default_value_t = crate::snapshot::codec::DEFAULT_LEVEL, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub compression_level: i32,

    /// zstd worker threads (0 compresses on the encoding thread).
    #[arg(long, default_value_t = 0)]
    pub compression_workers: u32,

    #[command(flatten)]
    pub recipients: super::keys::RecipientArgs,

    /// With --spire-config: store the server's keys file and data dir unencrypted when no --recipient is given
    /// (without it they are left out, with a warning: they hold the CA private keys).
    #[arg(long, conflicts_with = "no_server_files")]
    pub server_files_in_clear: bool,

    /// With --spire-config: back up only the datastore, not the server's keys file (disk KeyManager) and the
    /// other files of its data dir.
    #[arg(long)]
    pub no_server_files: bool,

    #[command(flatten)]
    pub lock: LockArgs,

    #[command(flatten)]
    pub metrics: OneShotMetricsArgs,
}

/// Metrics of a one-shot run, for node-exporter's textfile collector or a Pushgateway.
#[derive(Debug, clap::Args)]
pub struct OneShotMetricsArgs {
    /// After the run (successful or not), write its Prometheus metrics to this file, atomically
    /// (node-exporter textfile collector: a *.prom file in its --collector.textfile.directory).
    #[arg(long, value_name = "PATH", env = "SPIREKEEP_METRICS_TEXTFILE")]
    pub metrics_textfile: Option<std::path::PathBuf>,

    /// After the run, push its metrics to this Pushgateway (http://host:9091), grouped by
    /// job="spirekeep" and the repository.
    #[arg(long, value_name = "URL", env = "SPIREKEEP_PUSHGATEWAY")]
    pub pushgateway: Option<String>,

    /// How often this backup is scheduled (e.g. 4h), exported as
    /// spirekeep_backup_expected_interval_seconds for the backup-age alert.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub expected_interval: Option<std::time::Duration>,
}

impl OneShotMetricsArgs {
    fn wanted(&self) -> bool {
        self.metrics_textfile.is_some() || self.pushgateway.is_some()
    }

    /// Checks the destinations before anything runs.
    fn validate(&self) -> anyhow::Result<()> {
        if let Some(path) = &self.metrics_textfile {
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            if !dir.is_dir() || path.file_name().is_none() {
                return Err(crate::Error::Unsupported(format!(
                    "--metrics-textfile {}: the directory {} does not exist",
                    path.display(),
                    dir.display()
                ))
                .into());
            }
        }
        if let Some(url) = &self.pushgateway {
            let ok = url::Url::parse(url)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some());
            if !ok {
                return Err(crate::Error::Unsupported(format!(
                    "--pushgateway {:?} is not an http:// or https:// URL",
                    crate::redact::url(url)
                ))
                .into());
            }
        }
        Ok(())
    }

    /// Writes / pushes the run's metrics. Problems are warnings: the backup's
    /// own outcome decides the exit code.
    async fn report(&self, repo: &crate::store::Repository, failed: Option<FailureKind>) {
        if !self.wanted() {
            return;
        }
        let facts = match crate::metrics::repo_facts(repo).await {
            Ok(f) => Some(f),
            Err(e) => {
                print_warning(&format!("cannot read {repo} for the metrics: {e}"));
                None
            }
        };
        let mut failures = FailureCounters::default();
        if let Some(kind) = failed {
            failures.inc(kind);
        }
        let repository = crate::metrics::repository_label(repo);
        let known = facts.is_some();
        let text = MetricsReport {
            repository: repository.clone(),
            facts,
            expected_interval: self.expected_interval,
            backup_failures: failures,
            verify_failures: None,
            prune_failures: None,
        }
        .render();
        if let Some(path) = &self.metrics_textfile
            && let Err(e) = crate::metrics::write_textfile(path, &text, !known)
        {
            print_warning(&format!(
                "cannot write the metrics to {}: {e}",
                path.display()
            ));
        }
        if let Some(url) = &self.pushgateway
            && let Err(e) = crate::metrics::push(url, &repository, &text, known).await
        {
            print_warning(&e.to_string());
        }
    }
}

pub(crate) async fn run(args: &BackupArgs, json: bool) -> anyhow::Result<u8> {
    args.metrics.validate()?;
    // A bad recipient stops the backup here, before anything is read or written.
    let recipients = args.recipients.parse()?;
    let repo = args.repo.open()?;
    let repo = match recipients {
        Some(r) => repo.with_recipients(r),
        None => repo,
    };
    let result = take(args, &repo, json).await;
    let failed = result.as_ref().err().map(|e| {
        e.downcast_ref::<crate::Error>()
            .map_or(FailureKind::Other, FailureKind::of)
    });
    args.metrics.report(&repo, failed).await;
    result
}

async fn take(
    args: &BackupArgs,
    repo: &crate::store::Repository,
    json: bool,
) -> anyhow::Result<u8> {
    let resolved = args.datastore.resolve()?;
    let options = BackupOptions {
        labels: args.labels.clone(),
        codec: CodecOptions {
            level: args.compression_level,
            workers: args.compression_workers,
        },
        server_files: server_files_policy(args, resolved.server.as_ref()),
        ..BackupOptions::default()
    };
    let ds = datastore::open(&resolved.spec, OpenMode::ReadOnly).await?;
    let progress = BackupProgress::new(json, ds.as_ref()).await;
    let held = match Held::acquire(repo, &args.lock, "backup").await {
        Ok(held) => held,
        Err(e) => {
            ds.close().await;
            return Err(e);
        }
    };
    let result = held
        .guard(async {
            Ok(backup_fenced(ds.as_ref(), repo, &options, &progress, held.lock()).await?)
        })
        .await;
    held.release().await;
    ds.close().await;
    progress.clear();
    let manifest = result?;
    progress.finished(&manifest);
    let summary = SnapshotSummary::new(&manifest, &[]);
    let server_files = &manifest.server_files;
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
        if !server_files.is_empty() {
            println!(
                "  server files: {} ({}){}",
                server_files.len(),
                human_bytes(server_files.iter().map(|f| f.raw_size).sum()),
                if manifest.is_encrypted() {
                    ", encrypted"
                } else {
                    ", IN CLEAR (--server-files-in-clear)"
                }
            );
        }
    }
    Ok(exit::OK)
}

/// Server files are backed up when the datastore came from server.conf,
/// unless --no-server-files.
fn server_files_policy(
    args: &BackupArgs,
    layout: Option<&crate::datastore::spire_conf::ServerLayout>,
) -> Option<crate::snapshot::server_files::ServerFilesPolicy> {
    if args.no_server_files {
        return None;
    }
    layout.map(|l| crate::snapshot::server_files::ServerFilesPolicy {
        layout: l.clone(),
        allow_clear: args.server_files_in_clear,
    })
}

/// Backup progress: a bar per table on a terminal (rows, rate, and an ETA
/// from a row count taken before the snapshot), one line per table otherwise.
struct BackupProgress {
    progress: Progress,
    /// Rows per table counted before the backup (terminal only), for the ETA.
    expected: HashMap<String, u64>,
    started: Instant,
}

impl BackupProgress {
    async fn new(json: bool, ds: &dyn Datastore) -> Self {
        let progress = Progress::new("backup", json);
        let mut expected = HashMap::new();
        // Counting costs a scan per table: only worth it for a person watching.
        if progress.mode() == Mode::Bars
            && let Ok(catalogue) = ds.catalogue().await
        {
            for t in &catalogue.tables {
                if let Ok(n) = ds.count_rows(&t.name).await {
                    expected.insert(t.name.clone(), n);
                }
            }
        }
        Self {
            progress,
            expected,
            started: Instant::now(),
        }
    }
}

impl BackupObserver for BackupProgress {
    fn started(&self, id: &SnapshotId, tables: &[Table]) {
        self.progress.stage(&format!(
            "snapshot {id}: one consistent read of {} tables",
            tables.len()
        ));
        for t in tables {
            self.progress
                .start(&t.name, self.expected.get(&t.name).copied(), Unit::Rows);
        }
    }

    fn table_started(&self, table: &str) {
        self.progress.begin(table);
    }

    fn rows(&self, table: &str, copied: u64) {
        self.progress.set(table, copied);
    }

    fn warning(&self, message: &str) {
        self.progress.clear();
        print_warning(message);
    }

    fn table_done(&self, table: &TableData) {
        let stored = table.objects.iter().map(|o| o.size).sum();
        self.progress.finish(
            &table.name,
            table.rows,
            &format!("{} stored", rows_and_bytes(table.rows, stored)),
        );
    }
}

impl BackupProgress {
    fn clear(&self) {
        self.progress.clear();
    }

    fn finished(&self, manifest: &crate::snapshot::Manifest) {
        tracing::info!(
            event = "backup_finished",
            snapshot_id = %manifest.snapshot_id,
            rows = manifest.total_rows(),
            bytes = manifest.total_size(),
            tables = manifest.tables.len(),
            duration_seconds = self.started.elapsed().as_secs_f64(),
            "snapshot written"
        );
    }
}
