//! The apply journal: an append-only record of every step, written before
//! and after the step runs, so a killed `apply` can resume (or finish its
//! rollback) without running a completed step again.
//!
//! The journal is a local file of JSON lines (`<plan>.journal.jsonl` next to
//! the saved plan), each line flushed and synced before the step it announces
//! starts. After every record the whole journal is mirrored into the
//! repository (`journal/<plan-id>.json`), so `status` works from another
//! machine and the record survives the loss of the operator's laptop. A
//! failed mirror is reported but does not stop the plan: the local file is
//! the source of truth.
//!
//! The file is locked (`flock`) while `apply` runs, so two `apply`s of one
//! plan cannot interleave.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::error::PlanError;
use crate::store::keys;
use crate::store::{Repository, StoreError};

/// The journal format this build writes.
pub const JOURNAL_FORMAT: u32 = 1;

/// How an apply ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every member at the target, every check passed.
    Completed,
    /// Refused before anything changed (stale plan, unhealthy fleet).
    Refused,
    /// An agent batch failed: that batch was returned, the plan stopped.
    Stopped,
    /// A server step or datastore gate failed: the datastore was restored
    /// and every member returned to its previous version.
    RolledBack,
    /// The rollback itself did not complete: manual intervention needed.
    RollbackFailed,
    /// Every member already ran the target and the facts still matched:
    /// nothing was changed.
    NothingToDo,
}

impl Outcome {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Refused => "refused",
            Self::Stopped => "stopped",
            Self::RolledBack => "rolled_back",
            Self::RollbackFailed => "rollback_failed",
            Self::NothingToDo => "nothing_to_do",
        }
    }
}

/// One journal record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// `apply` began (or resumed) this plan.
    ApplyStarted {
        plan_id: String,
        fingerprint: String,
        resume: bool,
        pid: u32,
    },
    /// A step is about to run.
    StepStarted { step: String, attempt: u32 },
    /// A step completed; `data` holds what later steps need (a snapshot id).
    StepDone {
        step: String,
        detail: String,
        #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
        data: serde_json::Value,
    },
    /// A step failed. With `rollback`, the same record starts the rollback:
    /// one write, so no kill can leave a failed server step without its
    /// rollback (a resume would otherwise retry the step).
    StepFailed {
        step: String,
        error: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        rollback: bool,
    },
    /// A failure turned the plan into a rollback (journals written before
    /// `StepFailed` carried `rollback`; still read).
    RollbackStarted { failed_step: String, reason: String },
    /// Something worth keeping that is not a step.
    Note { message: String },
    /// The plan ended.
    Finished { outcome: Outcome, summary: String },
}

/// A record with its sequence number and time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    #[serde(flatten)]
    pub event: Event,
}

/// The mirrored document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Mirror {
    pub format_version: u32,
    pub plan_id: String,
    pub records: Vec<Record>,
}

/// The journal's path for a saved plan: `plan.json` → `plan.journal.jsonl`.
#[must_use]
pub fn path_for(plan_path: &Path) -> PathBuf {
    let stem = plan_path
        .file_stem()
        .map_or_else(|| "plan".into(), |s| s.to_string_lossy().into_owned());
    plan_path.with_file_name(format!("{stem}.journal.jsonl"))
}

/// Reads a journal file (`Ok(vec![])` when it does not exist). A last line
/// cut short by a crash is ignored.
///
/// # Errors
/// I/O errors and malformed lines other than the last.
pub fn read(path: &Path) -> Result<Vec<Record>, PlanError> {
    let unreadable = |e: std::io::Error| {
        PlanError::Journal(format!("cannot read journal {}: {e}", path.display()))
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(unreadable(e)),
    };
    let lines: Vec<String> = BufReader::new(file)
        .lines()
        .collect::<Result<_, _>>()
        .map_err(unreadable)?;
    let mut out = Vec::new();
    let last = lines.len().saturating_sub(1);
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Record>(line) {
            Ok(r) => out.push(r),
            Err(_) if i == last => {
                tracing::warn!(journal = %path.display(), "ignoring a last line cut short");
            }
            Err(e) => {
                return Err(PlanError::Journal(format!(
                    "journal {} line {} is not a journal record: {e}; it was not written by spirekeep apply (restore it from the repository's journal/ copy)",
                    path.display(),
                    i + 1
                )));
            }
        }
    }
    Ok(out)
}

/// The largest mirrored journal spirekeep reads (a journal record is a few
/// hundred bytes: this is tens of thousands of steps).
pub const MAX_MIRROR_BYTES: u64 = 16 << 20;

/// Reads the mirrored journal of a plan from the repository (`None` when
/// there is none).
///
/// # Errors
/// Storage errors and a malformed document.
pub async fn read_mirror(repo: &Repository, plan_id: &str) -> Result<Option<Mirror>, PlanError> {
    let failed = |e: String| PlanError::Journal(e);
    let key = keys::journal(plan_id).map_err(|e| failed(e.to_string()))?;
    // Capped: a journal is read from a bucket others can write to, and a huge
    // object there must not be held in memory whole.
    let bytes = match repo.get_capped(&key, MAX_MIRROR_BYTES).await {
        Ok(bytes) => bytes,
        Err(StoreError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(failed(e.to_string())),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| failed(format!("{key} in {repo} is not a journal: {e}")))
}

/// An open, locked journal being appended to.
pub struct Journal {
    path: PathBuf,
    file: File,
    plan_id: String,
    records: Vec<Record>,
    repo: Option<Repository>,
    /// Why the last mirror failed, if it did.
    pub mirror_error: Option<String>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .field("records", &self.records.len())
            .finish_non_exhaustive()
    }
}

impl Journal {
    /// Opens (creating) and locks the journal; reads what is already there.
    ///
    /// # Errors
    /// I/O errors, a malformed journal, or another `apply` holding the lock.
    pub fn open(path: &Path, plan_id: &str, repo: Option<Repository>) -> Result<Self, PlanError> {
        let failed = |what: &str, e: std::io::Error| {
            PlanError::Journal(format!("cannot {what} journal {}: {e}", path.display()))
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)
            .map_err(|e| failed("open", e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(PlanError::JournalLocked {
                    path: path.to_path_buf(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(failed("lock", e)),
        }
        let records = read(path)?;
        // A line cut short by a crash would glue itself to the next record:
        // cut the file back to its last complete line.
        let bytes = std::fs::read(path).map_err(|e| failed("read", e))?;
        let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        if complete < bytes.len() {
            file.set_len(u64::try_from(complete).unwrap_or(0))
                .map_err(|e| failed("repair", e))?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            plan_id: plan_id.to_owned(),
            records,
            repo,
            mirror_error: None,
        })
    }

    /// The journal's file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every record so far.
    #[must_use]
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// Appends a record, syncs it to disk, then mirrors the journal.
    ///
    /// # Errors
    /// The local write failing (the plan must not go on without its journal).
    pub async fn append(&mut self, event: Event) -> Result<(), PlanError> {
        let record = Record {
            seq: self.records.last().map_or(1, |r| r.seq + 1),
            at: OffsetDateTime::now_utc(),
            event,
        };
        let mut line = serde_json::to_string(&record)
            .map_err(|e| PlanError::Journal(format!("cannot encode a journal record: {e}")))?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.sync_data())
            .map_err(|e| {
                PlanError::Journal(format!(
                    "cannot write journal {}: {e}; the plan stopped (free the disk, then `spirekeep apply --resume`)",
                    self.path.display()
                ))
            })?;
        self.records.push(record);
        self.mirror().await;
        Ok(())
    }

    async fn mirror(&mut self) {
        let Some(repo) = &self.repo else { return };
        let doc = Mirror {
            format_version: JOURNAL_FORMAT,
            plan_id: self.plan_id.clone(),
            records: self.records.clone(),
        };
        let result = async {
            let key = keys::journal(&self.plan_id).map_err(|e| e.to_string())?;
            let json = serde_json::to_vec_pretty(&doc).map_err(|e| e.to_string())?;
            repo.put_overwrite(&key, Bytes::from(json))
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(())
        }
        .await;
        match result {
            Ok(()) => self.mirror_error = None,
            Err(e) => {
                tracing::warn!(error = %e, "could not mirror the journal into the repository");
                self.mirror_error = Some(e);
            }
        }
    }

    /// The state the records describe.
    #[must_use]
    pub fn state(&self) -> State {
        State::of(&self.records)
    }
}

/// What a journal says about a plan.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    /// Steps that completed, with their data.
    pub done: BTreeMap<String, serde_json::Value>,
    /// The detail line of each completed step.
    pub done_detail: BTreeMap<String, String>,
    /// How many times each step started.
    pub attempts: BTreeMap<String, u32>,
    /// A step that started and neither completed nor failed (the process died).
    pub interrupted: Option<String>,
    /// The last failure per step.
    pub failed: BTreeMap<String, String>,
    /// Set once a rollback began: (failed step, reason).
    pub rollback: Option<(String, String)>,
    /// Set once the plan ended.
    pub finished: Option<(Outcome, String)>,
    /// The plan's fingerprint as the first `apply` saw it.
    pub fingerprint: Option<String>,
    /// How many times `apply` started on this plan.
    pub applies: u32,
}

impl State {
    /// Replays records.
    #[must_use]
    pub fn of(records: &[Record]) -> Self {
        let mut s = Self::default();
        for r in records {
            match &r.event {
                Event::ApplyStarted { fingerprint, .. } => {
                    s.applies += 1;
                    s.fingerprint.get_or_insert_with(|| fingerprint.clone());
                    // a new run: an earlier stop or refusal is history
                    s.finished = None;
                }
                Event::StepStarted { step, .. } => {
                    *s.attempts.entry(step.clone()).or_default() += 1;
                    s.interrupted = Some(step.clone());
                }
                Event::StepDone { step, detail, data } => {
                    s.done.insert(step.clone(), data.clone());
                    s.done_detail.insert(step.clone(), detail.clone());
                    s.failed.remove(step);
                    if s.interrupted.as_deref() == Some(step) {
                        s.interrupted = None;
                    }
                }
                Event::StepFailed {
                    step,
                    error,
                    rollback,
                } => {
                    s.failed.insert(step.clone(), error.clone());
                    if s.interrupted.as_deref() == Some(step) {
                        s.interrupted = None;
                    }
                    if *rollback && s.rollback.is_none() {
                        s.rollback = Some((step.clone(), error.clone()));
                    }
                }
                Event::RollbackStarted {
                    failed_step,
                    reason,
                } => {
                    s.rollback = Some((failed_step.clone(), reason.clone()));
                }
                Event::Note { .. } => {}
                Event::Finished { outcome, summary } => {
                    s.finished = Some((*outcome, summary.clone()));
                }
            }
        }
        s
    }

    /// Whether a step completed.
    #[must_use]
    pub fn is_done(&self, step: &str) -> bool {
        self.done.contains_key(step)
    }

    /// The pre-upgrade snapshot's id, once taken.
    #[must_use]
    pub fn snapshot_id(&self) -> Option<String> {
        self.done
            .get("snapshot")
            .and_then(|d| d.get("snapshot_id"))
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (issue 14): the mirrored journal was read whole, however
    /// large the object a bucket writer left under its key.
    #[tokio::test]
    async fn an_oversized_mirror_is_refused_before_it_is_read() {
        let repo = Repository::in_memory();
        assert!(read_mirror(&repo, "p-1").await.unwrap().is_none());
        let key = keys::journal("p-1").unwrap();
        let huge = vec![b' '; usize::try_from(MAX_MIRROR_BYTES).unwrap() + 1];
        repo.put_overwrite(&key, Bytes::from(huge)).await.unwrap();
        let err = read_mirror(&repo, "p-1").await.unwrap_err();
        assert!(matches!(err, PlanError::Journal(_)), "{err}");
        assert!(err.to_string().contains("larger than"), "{err}");
    }

    #[tokio::test]
    async fn append_read_replay_and_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_for(&dir.path().join("plan.json"));
        assert!(path.ends_with("plan.journal.jsonl"));
        let repo = Repository::in_memory();
        let mut j = Journal::open(&path, "p-1", Some(repo.clone())).unwrap();
        j.append(Event::ApplyStarted {
            plan_id: "p-1".into(),
            fingerprint: "sha256:x".into(),
            resume: false,
            pid: 1,
        })
        .await
        .unwrap();
        j.append(Event::StepStarted {
            step: "snapshot".into(),
            attempt: 1,
        })
        .await
        .unwrap();
        j.append(Event::StepDone {
            step: "snapshot".into(),
            detail: "ok".into(),
            data: serde_json::json!({"snapshot_id": "20261128T093000Z-0a1b2c"}),
        })
        .await
        .unwrap();
        j.append(Event::StepStarted {
            step: "hop1.server.s1".into(),
            attempt: 1,
        })
        .await
        .unwrap();
        // a second apply cannot take the lock
        let err = Journal::open(&path, "p-1", None).unwrap_err();
        assert!(matches!(err, PlanError::JournalLocked { .. }), "{err}");
        assert!(err.to_string().contains("locked"), "{err}");
        let state = j.state();
        assert_eq!(
            state.snapshot_id().as_deref(),
            Some("20261128T093000Z-0a1b2c")
        );
        assert_eq!(state.interrupted.as_deref(), Some("hop1.server.s1"));
        assert!(state.is_done("snapshot") && !state.is_done("hop1.server.s1"));
        drop(j);
        // a torn last line is ignored
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"seq\":5,\"at\":")
            .unwrap();
        let records = read(&path).unwrap();
        assert_eq!(records.len(), 4);
        assert_eq!(records[3].seq, 4);
        let mirror = read_mirror(&repo, "p-1").await.unwrap().unwrap();
        assert_eq!(mirror.records, records);
        // reopening repairs the torn line; the next record starts on its own line
        let mut j = Journal::open(&path, "p-1", None).unwrap();
        j.append(Event::Note {
            message: "resumed".into(),
        })
        .await
        .unwrap();
        let records = read(&path).unwrap();
        assert_eq!(records.len(), 5);
        assert_eq!(records[4].seq, 5);
        assert!(read_mirror(&repo, "p-2").await.unwrap().is_none());
    }
}
