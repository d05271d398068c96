//! `spirekeep agent`: scheduled backups, retention and verification, with
//! Prometheus metrics.
//!
//! One loop runs the jobs one at a time, each under the repository lock:
//!
//! - at every `--schedule` time: a backup, then (if it succeeded and a
//!   retention policy is set) a prune, under one lease;
//! - at every `--verify-schedule` time: a verification (deep by default: a
//!   restore drill into a scratch datastore) of the newest snapshot.
//!
//! A run that starts late (the previous job overran) runs once, not once per
//! missed slot. Beside the loop, a tiny HTTP server ([`http`]) answers
//! `/metrics` and `/healthz`.
//!
//! Metrics come from the repository ([`crate::metrics::repo_facts`]): read at
//! start-up, after every job, and every `refresh_every` in between (to see
//! other writers), so a restarted agent reports the same freshness as before.
//! The failure counters count since start-up.
//!
//! Shutdown: the first SIGTERM/SIGINT lets the running job finish (a backup
//! completes and its lease is released), then the agent exits 0; a second
//! one drops the running job at once, which leaves no manifest, so nothing
//! that looks like a snapshot (its data objects are removed by a later prune
//! after the grace period).

mod http;
pub mod schedule;
pub mod shutdown;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::ResolvedDatastore;
use crate::datastore::{self, OpenMode};
use crate::error::{Error, Result};
use crate::metrics::{
    AgentFailures, FailureCounters, FailureKind, MetricsReport, RepoFacts, repo_facts,
};
use crate::snapshot::CodecOptions;
use crate::snapshot::backup::{BackupOptions, Quiet, backup_fenced};
use crate::snapshot::prune::{self, PruneOptions};
use crate::snapshot::retention::RetentionPolicy;
use crate::store::Repository;
use crate::store::lease_run::LeaseRun;
use crate::store::lock::host_name;
use crate::store::lock::{LockError, LockOptions, RepositoryLock};
pub use schedule::Schedule;

/// Retention applied after each backup.
#[derive(Debug, Clone)]
pub struct RetentionSettings {
    pub policy: RetentionPolicy,
    pub pin_labels: Vec<String>,
    pub orphan_grace: time::Duration,
}

/// Everything the agent needs, validated.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub datastore: ResolvedDatastore,
    pub repo: Repository,
    pub schedule: Schedule,
    pub verify_schedule: Option<Schedule>,
    /// Deep (restore drill) rather than shallow (hashes) verification.
    pub deep_verify: bool,
    /// `None`: never prune.
    pub retention: Option<RetentionSettings>,
    pub listen: SocketAddr,
    pub lock_ttl: Duration,
    pub lock_wait: Duration,
    /// Labels of every scheduled snapshot.
    pub labels: Vec<String>,
    pub codec: CodecOptions,
    /// How often the metrics are re-read from the repository between jobs.
    pub refresh_every: Duration,
}

/// What a verification job found, as the agent reports it.
#[derive(Debug, Clone)]
pub struct VerifyOutcome {
    /// `None`: the repository holds no snapshot yet, nothing was verified.
    pub snapshot: Option<String>,
    pub problems: Vec<String>,
}

#[derive(Debug, Default)]
struct Inner {
    facts: Option<RepoFacts>,
    backup_failures: FailureCounters,
    verify_failures: FailureCounters,
    prune_failures: FailureCounters,
    job: Option<(&'static str, OffsetDateTime)>,
    next_backup: Option<OffsetDateTime>,
    next_verify: Option<OffsetDateTime>,
    last_error: Option<String>,
    stopping: bool,
}

/// What the HTTP endpoints read.
pub(crate) struct AgentState {
    repository: String,
    expected_interval: Option<Duration>,
    inner: Mutex<Inner>,
}

impl AgentState {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn render_metrics(&self) -> String {
        let inner = self.inner();
        MetricsReport {
            repository: self.repository.clone(),
            facts: inner.facts.clone(),
            expected_interval: self.expected_interval,
            backup_failures: inner.backup_failures,
            verify_failures: Some(inner.verify_failures),
            prune_failures: Some(inner.prune_failures),
        }
        .render()
    }

    /// Healthy unless the agent is stopping. The body says what it is doing.
    pub(crate) fn health(&self) -> (bool, String) {
        let inner = self.inner();
        let t = |o: Option<OffsetDateTime>| {
            o.map_or_else(|| "-".into(), crate::snapshot::listing::rfc3339)
        };
        let job = inner.job.map_or_else(
            || "idle".to_owned(),
            |(name, since)| format!("{name} since {}", t(Some(since))),
        );
        let body = format!(
            "{}\nrepository: {}\njob: {job}\nnext backup: {}\nnext verify: {}\nlast error: {}\n",
            if inner.stopping { "stopping" } else { "ok" },
            self.repository,
            t(inner.next_backup),
            t(inner.next_verify),
            inner.last_error.as_deref().unwrap_or("-"),
        );
        (!inner.stopping, body)
    }
}

/// The running agent.
pub struct Agent {
    config: AgentConfig,
    state: Arc<AgentState>,
}

impl Agent {
    /// Prepares the agent (nothing is contacted yet).
    #[must_use]
    pub fn new(config: AgentConfig) -> Self {
        let state = Arc::new(AgentState {
            repository: crate::metrics::repository_label(&config.repo),
            expected_interval: config.schedule.expected_interval(OffsetDateTime::now_utc()),
            inner: Mutex::new(Inner::default()),
        });
        Self { config, state }
    }

    /// Serves metrics and runs the schedule until `signals` counts a signal.
    ///
    /// # Errors
    /// The listen address cannot be bound. Job failures are counted and
    /// logged, never returned.
    pub async fn run(&self, mut signals: watch::Receiver<u32>) -> Result<()> {
        let listener = TcpListener::bind(self.config.listen).await.map_err(|e| {
            Error::Unsupported(format!(
                "cannot listen on {}: {e}; choose another --listen address",
                self.config.listen
            ))
        })?;
        let bound = listener.local_addr().unwrap_or(self.config.listen);
        let (stop_tx, stop_rx) = watch::channel(false);
        let server = tokio::spawn(http::serve(
            listener,
            Arc::clone(&self.state),
            stop_rx.clone(),
        ));
        tracing::info!(
            event = "agent_started",
            listen = %bound,
            repository = %self.config.repo,
            schedule = %self.config.schedule,
            verify_schedule = %self.config.verify_schedule.as_ref().map_or("-".into(), ToString::to_string),
            "spirekeep agent started"
        );
        self.load_failures().await;
        self.refresh().await;
        let refresher = {
            let state = Arc::clone(&self.state);
            let repo = self.config.repo.clone();
            let every = self.config.refresh_every;
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(every) => refresh_into(&repo, &state).await,
                        _ = stop.changed() => return,
                    }
                }
            })
        };

        let now = OffsetDateTime::now_utc();
        let mut next_backup = self.config.schedule.next_after(now);
        let mut next_verify = self
            .config
            .verify_schedule
            .as_ref()
            .and_then(|s| s.next_after(now));
        loop {
            {
                let mut inner = self.state.inner();
                inner.next_backup = next_backup;
                inner.next_verify = next_verify;
            }
            if *signals.borrow() > 0 {
                break;
            }
            let (at, is_backup) = match (next_backup, next_verify) {
                (Some(b), Some(v)) if v < b => (v, false),
                (Some(b), _) => (b, true),
                (None, Some(v)) => (v, false),
                (None, None) => break,
            };
            let wait = Duration::try_from(at - OffsetDateTime::now_utc()).unwrap_or_default();
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = shutdown::at_least(&mut signals, 1) => break,
            }
            if OffsetDateTime::now_utc() < at {
                continue; // woke early (the wall clock moved)
            }
            if is_backup {
                self.backup_job(&signals).await;
            } else {
                self.verify_job(&signals).await;
            }
            let now = OffsetDateTime::now_utc();
            if is_backup {
                next_backup = self.config.schedule.next_after(now);
            } else {
                next_verify = self
                    .config
                    .verify_schedule
                    .as_ref()
                    .and_then(|s| s.next_after(now));
            }
        }
        self.state.inner().stopping = true;
        let _ = stop_tx.send(true);
        let _ = server.await;
        let _ = refresher.await;
        tracing::info!("spirekeep agent stopped");
        Ok(())
    }

    async fn refresh(&self) {
        refresh_into(&self.config.repo, &self.state).await;
    }

    fn set_job(&self, job: Option<&'static str>) {
        self.state.inner().job = job.map(|j| (j, OffsetDateTime::now_utc()));
    }

    async fn failed(
        &self,
        what: &str,
        counters: fn(&mut Inner) -> &mut FailureCounters,
        err: &Error,
    ) {
        let kind = FailureKind::of(err);
        tracing::error!(event = "job_failed", job = what, kind = kind.as_str(), error = %err, "{what} failed");
        let all = {
            let mut inner = self.state.inner();
            counters(&mut inner).inc(kind);
            inner.last_error = Some(format!("{what}: {err}"));
            AgentFailures {
                backup: inner.backup_failures,
                verify: inner.verify_failures,
                prune: inner.prune_failures,
            }
        };
        // the counters live in the repository, so a restart keeps them
        if let Err(e) = all.store(&self.config.repo, &host_name()).await {
            tracing::warn!(error = %e, "could not record the failure counters in the repository");
        }
    }

    /// Reads the failure counters an earlier run of this agent (on this
    /// host) left in the repository.
    pub async fn load_failures(&self) {
        match AgentFailures::load(&self.config.repo, &host_name()).await {
            Ok(f) => {
                let mut inner = self.state.inner();
                inner.backup_failures = f.backup;
                inner.verify_failures = f.verify;
                inner.prune_failures = f.prune;
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read the failure counters from the repository; counting from 0");
            }
        }
    }

    /// The failure counters now.
    #[must_use]
    pub fn failures(&self) -> AgentFailures {
        let inner = self.state.inner();
        AgentFailures {
            backup: inner.backup_failures,
            verify: inner.verify_failures,
            prune: inner.prune_failures,
        }
    }

    /// Takes the repository lock; a stop signal ends the wait. A signal that
    /// arrives while the lease is being written does not: the job then runs
    /// (a first signal lets it finish), so no lease is left behind unreleased.
    async fn lock(&self, purpose: &str, signals: &watch::Receiver<u32>) -> Result<RepositoryLock> {
        let options = LockOptions {
            purpose: purpose.to_owned(),
            ttl: self.config.lock_ttl,
            wait: self.config.lock_wait,
        };
        match RepositoryLock::acquire_unless_stopped(&self.config.repo, &options, signals.clone())
            .await
        {
            Ok(lock) => Ok(lock),
            Err(LockError::Stopped) => Err(Error::Aborted(
                "not started: stopping while waiting for the repository lock".into(),
            )),
            Err(e) => Err(e.into()),
        }
    }

    async fn backup_job(&self, signals: &watch::Receiver<u32>) {
        self.set_job(Some("backup"));
        match self.lock("agent backup", signals).await {
            Err(Error::Aborted(why)) => tracing::warn!("scheduled backup {why}"),
            Err(e) => {
                self.failed("scheduled backup", |i| &mut i.backup_failures, &e)
                    .await
            }
            Ok(lock) => {
                // a first signal lets the running job finish; a second stops it;
                // the lease is also confirmed right before the manifest is written
                let result = LeaseRun::new(&lock)
                    .with_signals(
                        signals.clone(),
                        2,
                        "stopped by a second signal: no manifest was written, so no snapshot",
                    )
                    .run(self.take_backup(&lock))
                    .await;
                match result {
                    Ok(m) => {
                        tracing::info!(
                            event = "backup_finished",
                            snapshot_id = %m.snapshot_id,
                            rows = m.total_rows(),
                            bytes = m.total_size(),
                            duration_seconds = (m.finished_at - m.started_at).as_seconds_f64(),
                            "scheduled backup written"
                        );
                        self.state.inner().last_error = None;
                        if let Some(retention) = &self.config.retention {
                            self.set_job(Some("prune"));
                            if let Err(e) = self.prune(retention, &lock).await {
                                self.failed("prune", |i| &mut i.prune_failures, &e).await;
                            }
                        }
                    }
                    Err(Error::Aborted(why)) => tracing::warn!("scheduled backup {why}"),
                    Err(e) => {
                        self.failed("scheduled backup", |i| &mut i.backup_failures, &e)
                            .await
                    }
                }
                if let Err(e) = lock.release().await {
                    tracing::warn!(error = %e, "could not release the repository lock; it expires on its own");
                }
            }
        }
        self.set_job(None);
        self.refresh().await;
    }

    async fn take_backup(&self, lock: &RepositoryLock) -> Result<crate::snapshot::Manifest> {
        let ds = datastore::open(&self.config.datastore.spec, OpenMode::ReadOnly).await?;
        let options = BackupOptions {
            labels: self.config.labels.clone(),
            codec: self.config.codec,
            ..BackupOptions::default()
        };
        // The lease is confirmed right before the manifest is written.
        let result = backup_fenced(ds.as_ref(), &self.config.repo, &options, &Quiet, lock).await;
        ds.close().await;
        result
    }

    async fn prune(&self, retention: &RetentionSettings, lock: &RepositoryLock) -> Result<()> {
        let options = PruneOptions {
            policy: retention.policy,
            pin_labels: retention.pin_labels.clone(),
            orphan_grace: retention.orphan_grace,
            now: OffsetDateTime::now_utc(),
        };
        let work = async {
            let plan = prune::plan(&self.config.repo, &options).await?;
            prune::execute(&self.config.repo, &plan, lock).await
        };
        let outcome = LeaseRun::new(lock).run(work).await?;
        tracing::info!(
            event = "prune_finished",
            snapshots = outcome.snapshots_deleted.len(),
            leftovers = outcome.leftovers_deleted.len(),
            objects = outcome.objects_deleted,
            bytes = outcome.bytes_deleted,
            "pruned"
        );
        Ok(())
    }

    async fn verify_job(&self, signals: &watch::Receiver<u32>) {
        self.set_job(Some("verify"));
        match self.lock("agent verify", signals).await {
            Err(Error::Aborted(why)) => tracing::warn!("scheduled verification {why}"),
            Err(e) => {
                self.failed("scheduled verification", |i| &mut i.verify_failures, &e)
                    .await
            }
            Ok(lock) => {
                let result = LeaseRun::new(&lock)
                    .with_signals(signals.clone(), 2, "stopped by a second signal")
                    .run(self.verify_latest())
                    .await;
                match result {
                    Ok(VerifyOutcome { snapshot: None, .. }) => {
                        tracing::info!("no snapshot to verify yet");
                    }
                    Ok(outcome) if outcome.problems.is_empty() => {
                        tracing::info!(
                            event = "verify_finished",
                            snapshot_id = outcome.snapshot.as_deref().unwrap_or_default(),
                            deep = self.config.deep_verify,
                            "verification passed"
                        );
                    }
                    Ok(outcome) => {
                        let err = Error::Integrity(format!(
                            "snapshot {} failed verification: {}",
                            outcome.snapshot.as_deref().unwrap_or_default(),
                            outcome.problems.join("; ")
                        ));
                        self.failed("scheduled verification", |i| &mut i.verify_failures, &err)
                            .await;
                    }
                    Err(Error::Aborted(why)) => tracing::warn!("scheduled verification {why}"),
                    Err(e) => {
                        self.failed("scheduled verification", |i| &mut i.verify_failures, &e)
                            .await
                    }
                }
                if let Err(e) = lock.release().await {
                    tracing::warn!(error = %e, "could not release the repository lock; it expires on its own");
                }
            }
        }
        self.set_job(None);
        self.refresh().await;
    }

    async fn verify_latest(&self) -> Result<VerifyOutcome> {
        verify_newest(&self.config.repo, self.config.deep_verify).await
    }
}

async fn refresh_into(repo: &Repository, state: &AgentState) {
    match repo_facts(repo).await {
        Ok(facts) => state.inner().facts = Some(facts),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the repository for the metrics; keeping the last values")
        }
    }
}

/// Verifies the newest snapshot with the `verify` command's library function
/// (a deep verify restores it into a temporary SQLite datastore), which
/// records the outcome in the repository.
async fn verify_newest(repo: &Repository, deep: bool) -> Result<VerifyOutcome> {
    use crate::snapshot::verify::{VerifyMode, verify_snapshot};
    let Some(id) = crate::snapshot::manifest::list_snapshots(repo).await?.pop() else {
        return Ok(VerifyOutcome {
            snapshot: None,
            problems: Vec::new(),
        });
    };
    let mode = if deep {
        VerifyMode::Deep
    } else {
        VerifyMode::Shallow
    };
    let report = verify_snapshot(repo, &id, mode).await?;
    Ok(VerifyOutcome {
        snapshot: Some(id.to_string()),
        problems: report.problems,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DatastoreSource, resolve_datastore};

    fn agent(repo: &Repository) -> Agent {
        let datastore = resolve_datastore(
            &DatastoreSource::Connection {
                value: "/nonexistent/datastore.sqlite3".into(),
                database_type: None,
            },
            None,
        )
        .unwrap();
        Agent::new(AgentConfig {
            datastore,
            repo: repo.clone(),
            schedule: Schedule::parse("0 3 * * *").unwrap(),
            verify_schedule: None,
            deep_verify: false,
            retention: None,
            listen: "127.0.0.1:0".parse().unwrap(),
            lock_ttl: Duration::from_secs(10),
            lock_wait: Duration::ZERO,
            labels: Vec::new(),
            codec: CodecOptions::default(),
            refresh_every: Duration::from_secs(60),
        })
    }

    /// A restarted agent reports the failures counted before the restart:
    /// the counters live in the repository, not in the process.
    #[tokio::test]
    async fn failure_counters_survive_a_restart() {
        let repo = Repository::in_memory();
        let first = agent(&repo);
        let err = Error::Unsupported("simulated".into());
        first
            .failed("scheduled backup", |i| &mut i.backup_failures, &err)
            .await;
        first
            .failed("scheduled backup", |i| &mut i.backup_failures, &err)
            .await;
        first.failed("prune", |i| &mut i.prune_failures, &err).await;
        drop(first);

        let second = agent(&repo);
        assert_eq!(second.failures(), AgentFailures::default());
        second.load_failures().await;
        let f = second.failures();
        assert_eq!(f.backup.get(FailureKind::Other), 2);
        assert_eq!(f.prune.get(FailureKind::Other), 1);
        assert_eq!(f.verify, FailureCounters::default());
        let text = second.state.render_metrics();
        assert!(
            text.contains("spirekeep_backup_failures_total{") && text.contains("kind=\"other\"} 2"),
            "{text}"
        );
        // counting goes on from there
        second
            .failed("scheduled verification", |i| &mut i.verify_failures, &err)
            .await;
        let third = agent(&repo);
        third.load_failures().await;
        assert_eq!(third.failures().backup.get(FailureKind::Other), 2);
        assert_eq!(third.failures().verify.get(FailureKind::Other), 1);
    }
}
