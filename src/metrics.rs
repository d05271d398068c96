//! Prometheus metrics: what the repository says about backup freshness, in
//! the text exposition format (version 0.0.4).
//!
//! The freshness gauges are computed **from the repository** ([`repo_facts`]):
//! the newest snapshot's manifest and the verification records. So they are
//! the same whoever computes them (`spirekeep agent` on `/metrics`, a
//! one-shot `spirekeep backup --metrics-textfile/--pushgateway`), and a
//! restart resets nothing. The agent's failure counters are kept in the
//! repository too ([`AgentFailures`], one object per agent host under
//! `agent/failures/`): read when the agent starts and written after every
//! failure, so a restart does not reset them. A one-shot run reports its own
//! run (1 for the kind that failed, 0 for the others).
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `spirekeep_backup_last_success_timestamp_seconds` | gauge | when the newest snapshot finished (0: none) |
//! | `spirekeep_backup_last_verified_success_timestamp_seconds` | gauge | when the newest snapshot whose newest verification passed finished (0: none) |
//! | `spirekeep_backup_expected_interval_seconds` | gauge | the longest gap of the agent's `--schedule` (or a one-shot's `--expected-interval`) |
//! | `spirekeep_backup_last_duration_seconds` | gauge | the newest snapshot's duration |
//! | `spirekeep_backup_last_size_bytes` | gauge | its stored (compressed) bytes |
//! | `spirekeep_backup_last_rows` | gauge | its rows |
//! | `spirekeep_snapshots` | gauge | snapshots in the repository |
//! | `spirekeep_verify_last_result` | gauge | 1 if the newest verification of any snapshot passed, 0 if it failed |
//! | `spirekeep_verify_last_timestamp_seconds` | gauge | when that verification ran |
//! | `spirekeep_backup_failures_total{kind}` | counter | failed backups by kind |
//! | `spirekeep_verify_failures_total{kind}` | counter | failed verifications by kind (agent) |
//! | `spirekeep_prune_failures_total{kind}` | counter | failed prunes by kind (agent) |
//! | `spirekeep_build_info{version}` | gauge | always 1 |
//! | `spirekeep_lock_held{host,purpose}` | gauge | 1 while a process holds the repository lock (who and what for), 0 when free |
//! | `spirekeep_lock_expires_timestamp_seconds` | gauge | when the held lease expires unless renewed |
//! | `spirekeep_upgrade_steps_done{plan_id}` | gauge | steps the newest staged upgrade (its journal in the repository) completed |
//! | `spirekeep_upgrade_step_failures{plan_id}` | gauge | step failures recorded in that journal |
//! | `spirekeep_upgrade_running{plan_id}` | gauge | 1 until the journal records the end |
//! | `spirekeep_upgrade_current_step{plan_id,step}` | gauge | 1 for the step in progress |
//! | `spirekeep_upgrade_rolling_back{plan_id}` | gauge | 1 once a rollback began |
//! | `spirekeep_upgrade_outcome{plan_id,outcome}` | gauge | 1 for how it ended (completed, refused, stopped, rolled_back, rollback_failed) |
//! | `spirekeep_upgrade_last_event_timestamp_seconds{plan_id}` | gauge | when the journal was last written |
//!
//! Every series carries `repository`: the repository URL without credentials.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use time::OffsetDateTime;

use crate::error::{Error, Result};
use crate::snapshot::SnapshotError;
use crate::snapshot::listing::{ManifestRead, read_manifest};
use crate::snapshot::manifest::{Manifest, VerificationRecord};
use crate::store::keys::{self, SnapshotId};
use crate::store::lock::LockError;
use crate::store::{ObjectMeta, Repository, StoreError};

/// The `Content-Type` of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Where a backup, verification or prune failed, for the `kind` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Connecting to or reading the SPIRE datastore (or the scratch datastore).
    Datastore,
    /// The object store refused or failed a request.
    Storage,
    /// Another process holds the repository lock, or it was lost.
    Lock,
    /// A hash, size or count did not match.
    Integrity,
    /// Anything else.
    Other,
}

impl FailureKind {
    pub const ALL: [Self; 5] = [
        Self::Datastore,
        Self::Storage,
        Self::Lock,
        Self::Integrity,
        Self::Other,
    ];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Datastore => "datastore",
            Self::Storage => "storage",
            Self::Lock => "lock",
            Self::Integrity => "integrity",
            Self::Other => "other",
        }
    }

    /// The kind of a library error.
    #[must_use]
    pub fn of(err: &Error) -> Self {
        match err {
            Error::ConnectionString(_)
            | Error::SpireConfig { .. }
            | Error::MissingSqliteFile { .. }
            | Error::Unreachable { .. }
            | Error::AuthFailed { .. }
            | Error::NotSpire { .. }
            | Error::Database { .. } => Self::Datastore,
            Error::Store(_)
            | Error::Lock(LockError::Store(_))
            | Error::Snapshot(SnapshotError::Store(_) | SnapshotError::Pipeline { .. }) => {
                Self::Storage
            }
            Error::Lock(_) => Self::Lock,
            Error::Integrity(_) | Error::Snapshot(_) => Self::Integrity,
            _ => Self::Other,
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Datastore => 0,
            Self::Storage => 1,
            Self::Lock => 2,
            Self::Integrity => 3,
            Self::Other => 4,
        }
    }
}

/// Failure counters by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FailureCounters([u64; 5]);

impl FailureCounters {
    pub fn inc(&mut self, kind: FailureKind) {
        self.0[kind.index()] += 1;
    }

    #[must_use]
    pub fn get(&self, kind: FailureKind) -> u64 {
        self.0[kind.index()]
    }
}

impl FailureCounters {
    fn to_map(self) -> std::collections::BTreeMap<String, u64> {
        FailureKind::ALL
            .iter()
            .map(|k| (k.as_str().to_owned(), self.get(*k)))
            .collect()
    }

    fn from_map(map: &std::collections::BTreeMap<String, u64>) -> Self {
        let mut c = Self::default();
        for k in FailureKind::ALL {
            c.0[k.index()] = map.get(k.as_str()).copied().unwrap_or(0);
        }
        c
    }
}

/// The agent's failure counters as kept in the repository, so they survive
/// a restart (`agent/failures/<host>.json`; one object per host, so two
/// agents on one repository never overwrite each other's counts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentFailures {
    pub backup: FailureCounters,
    pub verify: FailureCounters,
    pub prune: FailureCounters,
}

#[derive(Debug, Serialize, serde::Deserialize)]
struct StoredFailures {
    format_version: u32,
    host: String,
    #[serde(default)]
    backup: std::collections::BTreeMap<String, u64>,
    #[serde(default)]
    verify: std::collections::BTreeMap<String, u64>,
    #[serde(default)]
    prune: std::collections::BTreeMap<String, u64>,
}

/// The most a counters object may be (it is a few hundred bytes).
const MAX_FAILURES_OBJECT: u64 = 64 * 1024;

/// The key of an agent host's counters.
#[must_use]
pub fn agent_failures_key(host: &str) -> String {
    let safe: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .take(128)
        .collect();
    format!("agent/failures/{safe}.json")
}

impl AgentFailures {
    /// Reads the counters `host` left in the repository (zero when none).
    ///
    /// # Errors
    /// A storage failure, or an object that is not a counters object.
    pub async fn load(repo: &Repository, host: &str) -> Result<Self> {
        let key = agent_failures_key(host);
        let Some(meta) = repo.head(&key).await? else {
            return Ok(Self::default());
        };
        if meta.size > MAX_FAILURES_OBJECT {
            return Err(Error::Integrity(format!(
                "{key} in {repo} is {} bytes, too large for failure counters: delete it (the counters restart at 0)",
                meta.size
            )));
        }
        let bytes = repo.get(&key).await?;
        let stored: StoredFailures = serde_json::from_slice(&bytes).map_err(|e| {
            Error::Integrity(format!(
                "{key} in {repo} is not a failure-counters object ({e}): delete it (the counters restart at 0)"
            ))
        })?;
        Ok(Self {
            backup: FailureCounters::from_map(&stored.backup),
            verify: FailureCounters::from_map(&stored.verify),
            prune: FailureCounters::from_map(&stored.prune),
        })
    }

    /// Writes the counters of `host`.
    ///
    /// # Errors
    /// A storage failure.
    pub async fn store(&self, repo: &Repository, host: &str) -> Result<()> {
        let stored = StoredFailures {
            format_version: 1,
            host: host.to_owned(),
            backup: self.backup.to_map(),
            verify: self.verify.to_map(),
            prune: self.prune.to_map(),
        };
        let json = serde_json::to_vec_pretty(&stored)
            .map_err(|e| Error::Unsupported(format!("cannot encode failure counters: {e}")))?;
        repo.put_overwrite(&agent_failures_key(host), bytes::Bytes::from(json))
            .await?;
        Ok(())
    }
}

/// One snapshot as the metrics see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SnapshotPoint {
    pub id: SnapshotId,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub finished_at: OffsetDateTime,
    pub size: u64,
    pub rows: u64,
}

impl SnapshotPoint {
    fn of(m: &Manifest) -> Self {
        Self {
            id: m.snapshot_id.clone(),
            started_at: m.started_at,
            finished_at: m.finished_at,
            size: m.total_size(),
            rows: m.total_rows(),
        }
    }
}

/// What the repository says, as far as the metrics are concerned.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RepoFacts {
    /// Snapshots (with a manifest).
    pub snapshots: u64,
    /// The newest snapshot.
    pub last: Option<SnapshotPoint>,
    /// The newest snapshot whose newest verification passed.
    pub last_verified: Option<SnapshotPoint>,
    /// The newest verification of any existing snapshot: (passed, when).
    pub last_verification: Option<(bool, OffsetDateTime)>,
    /// The repository lock; `None` when it could not be read.
    pub lock: Option<LockFact>,
    /// The newest staged upgrade's journal mirror, if any.
    pub upgrade: Option<UpgradeFact>,
}

/// Who holds the repository lock.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LockFact {
    /// Held and not expired.
    pub held: bool,
    /// `host:pid` of the holder (empty when free).
    pub holder: String,
    /// What the holder does (`backup`, `agent verify`, ...).
    pub purpose: String,
    /// When the lease expires unless renewed (Unix seconds; 0 when free).
    pub expires_at: i64,
}

/// Where the newest staged upgrade stands, from its journal mirror.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UpgradeFact {
    pub plan_id: String,
    pub steps_done: u64,
    pub step_failures: u64,
    /// The step that started and has not ended.
    pub current_step: Option<String>,
    pub rolling_back: bool,
    /// How it ended, once it did.
    pub outcome: Option<String>,
    /// When the last record was written (Unix seconds).
    pub last_event_at: i64,
}

/// The lock, as the metrics report it.
async fn lock_fact(repo: &Repository) -> Option<LockFact> {
    use crate::store::lock::{LeaseState, inspect};
    let status = inspect(repo).await.ok()?;
    Some(match status {
        Some(s) if s.state == LeaseState::Held => match s.record {
            Some(r) => LockFact {
                held: true,
                holder: format!("{}:{}", r.host, r.pid),
                purpose: r.purpose,
                expires_at: r.expires_at.unix_timestamp(),
            },
            // Held, but its record does not parse.
            None => LockFact {
                held: true,
                holder: "unknown".into(),
                purpose: "unknown".into(),
                expires_at: 0,
            },
        },
        _ => LockFact::default(),
    })
}

/// The newest journal mirror (`journal/<plan-id>.json`) replayed.
async fn upgrade_fact(repo: &Repository) -> Option<UpgradeFact> {
    use crate::plan::journal::{Event, State, read_mirror};
    let newest = repo
        .list(keys::JOURNAL)
        .await
        .ok()?
        .into_iter()
        .filter(|m| m.key.ends_with(".json"))
        .max_by_key(|m| m.last_modified)?;
    let plan_id = file_name(&newest.key).strip_suffix(".json")?.to_owned();
    let mirror = read_mirror(repo, &plan_id).await.ok()??;
    let state = State::of(&mirror.records);
    let step_failures = mirror
        .records
        .iter()
        .filter(|r| matches!(r.event, Event::StepFailed { .. }))
        .count();
    Some(UpgradeFact {
        plan_id,
        steps_done: u64::try_from(state.done.len()).unwrap_or(u64::MAX),
        step_failures: u64::try_from(step_failures).unwrap_or(u64::MAX),
        current_step: state.interrupted.clone(),
        rolling_back: state.rollback.is_some(),
        outcome: state.finished.as_ref().map(|(o, _)| o.as_str().to_owned()),
        last_event_at: mirror.records.last().map_or(0, |r| r.at.unix_timestamp()),
    })
}

/// Reads what the metrics need from the repository: one listing of
/// `snapshots/` and `verifications/`, the newest manifest, and a few records.
///
/// # Errors
/// A storage failure.
pub async fn repo_facts(repo: &Repository) -> Result<RepoFacts> {
    let ids = crate::snapshot::manifest::list_snapshots(repo).await?;
    let mut facts = RepoFacts {
        snapshots: u64::try_from(ids.len()).unwrap_or(u64::MAX),
        lock: lock_fact(repo).await,
        upgrade: upgrade_fact(repo).await,
        ..RepoFacts::default()
    };
    // The newest snapshot that can be restored: a damaged manifest on a newer
    // one must not make the metrics fail, nor count as a fresh backup.
    for id in ids.iter().rev() {
        if let ManifestRead::Readable(m) = read_manifest(repo, id).await? {
            facts.last = Some(SnapshotPoint::of(&m));
            break;
        }
    }

    // Newest verification key per snapshot; the file names sort by time.
    let mut newest_record: std::collections::BTreeMap<SnapshotId, ObjectMeta> =
        std::collections::BTreeMap::new();
    for meta in repo.list(keys::VERIFICATIONS).await? {
        let rest = &meta.key[keys::VERIFICATIONS.len()..];
        let Some((segment, _)) = rest.split_once('/') else {
            continue;
        };
        let Ok(id) = SnapshotId::parse(segment) else {
            continue;
        };
        if ids.binary_search(&id).is_err() {
            continue;
        }
        let newer = newest_record
            .get(&id)
            .is_none_or(|m| file_name(&m.key) < file_name(&meta.key));
        if newer {
            newest_record.insert(id, meta);
        }
    }
    // The newest verification overall.
    if let Some(meta) = newest_record
        .values()
        .max_by(|a, b| file_name(&a.key).cmp(file_name(&b.key)))
        && let Some(record) = read_record(repo, &meta.key).await?
    {
        facts.last_verification = Some((record.ok, record.verified_at));
    }
    // The newest snapshot whose newest verification passed.
    for (id, meta) in newest_record.iter().rev() {
        if read_record(repo, &meta.key).await?.is_some_and(|r| r.ok) {
            // Pruned (gone) or damaged since it was verified: look further back.
            if let ManifestRead::Readable(m) = read_manifest(repo, id).await? {
                facts.last_verified = Some(SnapshotPoint::of(&m));
                break;
            }
        }
    }
    Ok(facts)
}

fn file_name(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

async fn read_record(repo: &Repository, key: &str) -> Result<Option<VerificationRecord>> {
    match repo.get_capped(key, crate::store::MAX_RECORD_BYTES).await {
        Ok(bytes) => Ok(VerificationRecord::from_json(&bytes).ok()),
        Err(StoreError::NotFound { .. } | StoreError::TooLarge { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Everything one exposition holds.
#[derive(Debug, Clone, Default)]
pub struct MetricsReport {
    /// The `repository` label: the repository URL without credentials.
    pub repository: String,
    /// `None` when the repository could not be read: the repository gauges
    /// are left out rather than reported wrong.
    pub facts: Option<RepoFacts>,
    pub expected_interval: Option<Duration>,
    pub backup_failures: FailureCounters,
    /// `None` leaves the family out (a one-shot backup does not verify).
    pub verify_failures: Option<FailureCounters>,
    pub prune_failures: Option<FailureCounters>,
}

/// The `repository` label for a repository: its location without the S3
/// endpoint note (which [`Repository::location`] appends).
#[must_use]
pub fn repository_label(repo: &Repository) -> String {
    let location = repo.location();
    location
        .split_once(" (endpoint ")
        .map_or(location, |(url, _)| url)
        .to_owned()
}

impl MetricsReport {
    /// The text exposition.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        let repo = format!("repository=\"{}\"", escape_label(&self.repository));
        let mut gauge = |name: &str, help: &str, value: Option<String>| {
            if let Some(value) = value {
                let _ = writeln!(out, "# HELP {name} {help}");
                let _ = writeln!(out, "# TYPE {name} gauge");
                let _ = writeln!(out, "{name}{{{repo}}} {value}");
            }
        };
        gauge(
            "spirekeep_backup_last_success_timestamp_seconds",
            "When the newest snapshot in the repository finished (Unix seconds; 0: none yet).",
            self.facts.as_ref().map(|f| {
                f.last
                    .as_ref()
                    .map_or("0".into(), |s| seconds(s.finished_at))
            }),
        );
        gauge(
            "spirekeep_backup_last_verified_success_timestamp_seconds",
            "When the newest snapshot whose newest verification passed finished (Unix seconds; 0: none).",
            self.facts.as_ref().map(|f| {
                f.last_verified
                    .as_ref()
                    .map_or("0".into(), |s| seconds(s.finished_at))
            }),
        );
        gauge(
            "spirekeep_backup_expected_interval_seconds",
            "The longest gap between two scheduled backups.",
            self.expected_interval.map(|d| d.as_secs().to_string()),
        );
        let last = self.facts.as_ref().and_then(|f| f.last.as_ref());
        gauge(
            "spirekeep_backup_last_duration_seconds",
            "How long the newest snapshot took (its consistent read and upload).",
            last.map(|s| format_f64((s.finished_at - s.started_at).as_seconds_f64())),
        );
        gauge(
            "spirekeep_backup_last_size_bytes",
            "Stored (compressed) bytes of the newest snapshot.",
            last.map(|s| s.size.to_string()),
        );
        gauge(
            "spirekeep_backup_last_rows",
            "Rows in the newest snapshot.",
            last.map(|s| s.rows.to_string()),
        );
        gauge(
            "spirekeep_snapshots",
            "Snapshots in the repository.",
            self.facts.as_ref().map(|f| f.snapshots.to_string()),
        );
        let verification = self.facts.as_ref().and_then(|f| f.last_verification);
        gauge(
            "spirekeep_verify_last_result",
            "1 if the newest verification of a snapshot in the repository passed, 0 if it failed.",
            verification.map(|(ok, _)| if ok { "1" } else { "0" }.to_string()),
        );
        gauge(
            "spirekeep_verify_last_timestamp_seconds",
            "When the newest verification ran (Unix seconds).",
            verification.map(|(_, at)| seconds(at)),
        );
        let mut counter = |name: &str, help: &str, counters: Option<&FailureCounters>| {
            if let Some(c) = counters {
                let _ = writeln!(out, "# HELP {name} {help}");
                let _ = writeln!(out, "# TYPE {name} counter");
                for kind in FailureKind::ALL {
                    let _ = writeln!(
                        out,
                        "{name}{{{repo},kind=\"{}\"}} {}",
                        kind.as_str(),
                        c.get(kind)
                    );
                }
            }
        };
        counter(
            "spirekeep_backup_failures_total",
            "Failed backups by kind (since this process started).",
            Some(&self.backup_failures),
        );
        counter(
            "spirekeep_verify_failures_total",
            "Failed verifications by kind (since this process started).",
            self.verify_failures.as_ref(),
        );
        counter(
            "spirekeep_prune_failures_total",
            "Failed prunes by kind (since this process started).",
            self.prune_failures.as_ref(),
        );
        if let Some(lock) = self.facts.as_ref().and_then(|f| f.lock.as_ref()) {
            let _ = writeln!(
                out,
                "# HELP spirekeep_lock_held 1 while a process holds the repository lock (host:pid and purpose), 0 when free.\n\
                 # TYPE spirekeep_lock_held gauge\n\
                 spirekeep_lock_held{{{repo},host=\"{}\",purpose=\"{}\"}} {}",
                escape_label(&lock.holder),
                escape_label(&lock.purpose),
                u8::from(lock.held)
            );
            if lock.held {
                let _ = writeln!(
                    out,
                    "# HELP spirekeep_lock_expires_timestamp_seconds When the held lease expires unless renewed (Unix seconds).\n\
                     # TYPE spirekeep_lock_expires_timestamp_seconds gauge\n\
                     spirekeep_lock_expires_timestamp_seconds{{{repo}}} {}",
                    lock.expires_at
                );
            }
        }
        if let Some(u) = self.facts.as_ref().and_then(|f| f.upgrade.as_ref()) {
            let plan = format!("{repo},plan_id=\"{}\"", escape_label(&u.plan_id));
            let mut upgrade_gauge = |name: &str, help: &str, labels: &str, value: String| {
                let _ = writeln!(out, "# HELP {name} {help}");
                let _ = writeln!(out, "# TYPE {name} gauge");
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            };
            upgrade_gauge(
                "spirekeep_upgrade_steps_done",
                "Steps the newest staged upgrade completed (from its journal in the repository).",
                &plan,
                u.steps_done.to_string(),
            );
            upgrade_gauge(
                "spirekeep_upgrade_step_failures",
                "Step failures recorded in the newest staged upgrade's journal.",
                &plan,
                u.step_failures.to_string(),
            );
            upgrade_gauge(
                "spirekeep_upgrade_running",
                "1 until the newest staged upgrade's journal records its end.",
                &plan,
                u8::from(u.outcome.is_none()).to_string(),
            );
            upgrade_gauge(
                "spirekeep_upgrade_rolling_back",
                "1 once the newest staged upgrade began a rollback.",
                &plan,
                u8::from(u.rolling_back).to_string(),
            );
            upgrade_gauge(
                "spirekeep_upgrade_last_event_timestamp_seconds",
                "When the newest staged upgrade's journal was last written (Unix seconds).",
                &plan,
                u.last_event_at.to_string(),
            );
            if let Some(step) = &u.current_step {
                upgrade_gauge(
                    "spirekeep_upgrade_current_step",
                    "1 for the step of the newest staged upgrade that is in progress.",
                    &format!("{plan},step=\"{}\"", escape_label(step)),
                    "1".into(),
                );
            }
            if let Some(outcome) = &u.outcome {
                upgrade_gauge(
                    "spirekeep_upgrade_outcome",
                    "1 for how the newest staged upgrade ended.",
                    &format!("{plan},outcome=\"{}\"", escape_label(outcome)),
                    "1".into(),
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP spirekeep_build_info The running spirekeep version.\n# TYPE spirekeep_build_info gauge\n\
             spirekeep_build_info{{{repo},version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        out
    }
}

fn seconds(t: OffsetDateTime) -> String {
    t.unix_timestamp().to_string()
}

fn format_f64(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3}")
    } else {
        "NaN".into()
    }
}

/// Escapes a label value (backslash, double quote, newline).
#[must_use]
pub fn escape_label(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

/// The metric family a line belongs to (`None` for blank lines).
fn family_of(line: &str) -> Option<&str> {
    if let Some(rest) = line
        .strip_prefix("# HELP ")
        .or_else(|| line.strip_prefix("# TYPE "))
    {
        return rest.split_whitespace().next();
    }
    if line.starts_with('#') || line.trim().is_empty() {
        return None;
    }
    line.split(['{', ' ']).next()
}

/// `new` plus every family of `previous` that `new` lacks: a run that could
/// not read the repository keeps the last known freshness gauges in the
/// textfile instead of dropping them.
#[must_use]
pub fn merge_exposition(previous: &str, new: &str) -> String {
    let present: std::collections::BTreeSet<&str> = new.lines().filter_map(family_of).collect();
    let mut out = new.to_owned();
    for line in previous.lines() {
        if family_of(line).is_some_and(|f| !present.contains(f)) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Writes `text` to `path` atomically (a temporary file in the same
/// directory, then a rename), as node-exporter's textfile collector needs.
/// When `keep_previous` is set, families of the existing file that `text`
/// lacks are kept ([`merge_exposition`]).
///
/// # Errors
/// The directory is missing or not writable.
pub fn write_textfile(path: &Path, text: &str, keep_previous: bool) -> std::io::Result<()> {
    let text = if keep_previous {
        match std::fs::read_to_string(path) {
            Ok(previous) => merge_exposition(&previous, text),
            Err(_) => text.to_owned(),
        }
    } else {
        text.to_owned()
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("the textfile path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The Pushgateway URL for a repository's group:
/// `<gateway>/metrics/job/spirekeep/repository@base64/<base64url(label)>`
/// (the label holds slashes, so it is base64-encoded as the Pushgateway allows).
#[must_use]
pub fn pushgateway_url(gateway: &str, repository: &str) -> String {
    format!(
        "{}/metrics/job/spirekeep/repository@base64/{}",
        gateway.trim_end_matches('/'),
        base64url(repository.as_bytes())
    )
}

/// Pushes `text` to a Pushgateway: `PUT` replaces the repository's group;
/// `replace = false` uses `POST`, which replaces only the families pushed.
///
/// # Errors
/// The request failed or the Pushgateway refused it (the message has its answer).
pub async fn push(gateway: &str, repository: &str, text: &str, replace: bool) -> Result<()> {
    let url = pushgateway_url(gateway, repository);
    // The URL may carry basic-auth credentials (reqwest sends them): never show them.
    let gateway = crate::redact::url(gateway);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| Error::Aborted(format!("cannot build an HTTP client: {e}")))?;
    let request = if replace {
        client.put(&url)
    } else {
        client.post(&url)
    };
    let response = request
        .header("Content-Type", CONTENT_TYPE)
        .body(text.to_owned())
        .send()
        .await
        .map_err(|e| {
            Error::Aborted(format!(
                "cannot push metrics to the Pushgateway at {gateway}: {}",
                e.without_url()
            ))
        })?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        let body = response.text().await.unwrap_or_default();
        Err(Error::Aborted(format!(
            "the Pushgateway at {gateway} refused the metrics: HTTP {status}: {}",
            body.trim()
        )))
    }
}

/// RFC 4648 §5 base64 (URL and file name safe alphabet) with padding.
#[must_use]
pub fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                let index = usize::try_from((n >> (18 - 6 * i)) & 0x3f).unwrap_or(0);
                out.push(char::from(ALPHABET[index]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (found by tests/secret_scan.rs): a failed push printed the
    /// gateway URL with its basic-auth password.
    #[tokio::test]
    async fn a_failed_push_never_shows_the_gateways_password() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let gateway = format!("http://pgw:pw-Xq81@127.0.0.1:{port}");
        let e = push(&gateway, "s3://b/p", "x 1\n", true).await.unwrap_err();
        let text = e.to_string();
        assert!(!text.contains("pw-Xq81"), "{text}");
        assert!(
            text.contains(&format!("http://127.0.0.1:{port}/")),
            "{text}"
        );
    }

    #[test]
    fn base64url_matches_the_rfc_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64url(plain.as_bytes()), encoded);
        }
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8=");
        assert_eq!(
            pushgateway_url("http://pg:9091/", "s3://b/p"),
            "http://pg:9091/metrics/job/spirekeep/repository@base64/czM6Ly9iL3A="
        );
    }

    #[tokio::test]
    async fn lock_holder_and_upgrade_progress_come_from_the_repository() {
        use crate::plan::journal::{Event, Journal};
        use crate::store::lock::{LockOptions, RepositoryLock};
        let repo = Repository::in_memory();
        let render = |facts: RepoFacts| {
            MetricsReport {
                repository: "mem".into(),
                facts: Some(facts),
                ..MetricsReport::default()
            }
            .render()
        };
        // Nothing yet: the lock is free, no upgrade family.
        let text = render(repo_facts(&repo).await.unwrap());
        assert!(
            text.contains("spirekeep_lock_held{repository=\"mem\",host=\"\",purpose=\"\"} 0\n"),
            "{text}"
        );
        assert!(!text.contains("spirekeep_upgrade_"), "{text}");

        let lock = RepositoryLock::acquire(&repo, &LockOptions::new("backup"))
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(
            &dir.path().join("p.journal.jsonl"),
            "p-42",
            Some(repo.clone()),
        )
        .unwrap();
        journal
            .append(Event::ApplyStarted {
                plan_id: "p-42".into(),
                fingerprint: "sha256:x".into(),
                resume: false,
                pid: 1,
            })
            .await
            .unwrap();
        journal
            .append(Event::StepStarted {
                step: "snapshot".into(),
                attempt: 1,
            })
            .await
            .unwrap();
        journal
            .append(Event::StepDone {
                step: "snapshot".into(),
                detail: "ok".into(),
                data: serde_json::Value::Null,
            })
            .await
            .unwrap();
        journal
            .append(Event::StepStarted {
                step: "server-1".into(),
                attempt: 1,
            })
            .await
            .unwrap();
        journal
            .append(Event::StepFailed {
                step: "server-1".into(),
                error: "gate".into(),
                rollback: false,
            })
            .await
            .unwrap();
        journal
            .append(Event::StepStarted {
                step: "server-1".into(),
                attempt: 2,
            })
            .await
            .unwrap();

        let text = render(repo_facts(&repo).await.unwrap());
        let host = crate::store::lock::host_name();
        assert!(
            text.contains(&format!("spirekeep_lock_held{{repository=\"mem\",host=\"{host}:{}\",purpose=\"backup\"}} 1\n", std::process::id())),
            "{text}"
        );
        assert!(
            text.contains("spirekeep_lock_expires_timestamp_seconds{"),
            "{text}"
        );
        for line in [
            "spirekeep_upgrade_steps_done{repository=\"mem\",plan_id=\"p-42\"} 1\n",
            "spirekeep_upgrade_step_failures{repository=\"mem\",plan_id=\"p-42\"} 1\n",
            "spirekeep_upgrade_running{repository=\"mem\",plan_id=\"p-42\"} 1\n",
            "spirekeep_upgrade_current_step{repository=\"mem\",plan_id=\"p-42\",step=\"server-1\"} 1\n",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        lock.release().await.unwrap();
    }

    #[test]
    fn rendering_and_merging() {
        let mut failures = FailureCounters::default();
        failures.inc(FailureKind::Lock);
        let report = MetricsReport {
            repository: "s3://b/\"p\"".into(),
            facts: Some(RepoFacts::default()),
            expected_interval: Some(Duration::from_secs(14_400)),
            backup_failures: failures,
            verify_failures: None,
            prune_failures: None,
        };
        let text = report.render();
        assert!(text.contains(
            "spirekeep_backup_last_success_timestamp_seconds{repository=\"s3://b/\\\"p\\\"\"} 0\n"
        ));
        assert!(text.contains("kind=\"lock\"} 1\n"), "{text}");
        assert!(text.contains("spirekeep_snapshots{"), "{text}");
        assert!(!text.contains("spirekeep_verify_last_result"), "{text}");
        assert!(!text.contains("spirekeep_verify_failures_total"), "{text}");

        let blind = MetricsReport {
            facts: None,
            ..report.clone()
        };
        let merged = merge_exposition(&text, &blind.render());
        assert_eq!(
            merged
                .lines()
                .filter(|l| l.starts_with("spirekeep_backup_last_success_timestamp_seconds"))
                .count(),
            1
        );
        assert_eq!(
            merged
                .matches("# TYPE spirekeep_backup_failures_total")
                .count(),
            1
        );
    }
}
