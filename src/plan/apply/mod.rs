//! `apply`: run a saved plan's steps, journaled, with restore-on-failure.
//!
//! - **Refusal.** On every run (a journal saying it passed once is not
//!   enough), the live facts must match the plan's fingerprint, every member
//!   must pass its gates and have its clock within the skew before anything
//!   changes. A plan with nothing to move ends there: nothing to do.
//! - **Forward.** Pre-upgrade snapshot (backup, deep verify, pin), then per
//!   hop the servers one at a time (each: act, read the version back,
//!   gates), the datastore gate, the agent batches, then post-checks.
//! - **An agent batch fails** (more failures than its `max_failure_ratio`):
//!   every member of that batch goes back to the version it ran before the
//!   batch; the plan stops (`apply --resume` retries the batch later).
//!   Failures within the ratio go back alone and are remembered: a later
//!   server step that would leave them outside SPIRE's skew stops the plan
//!   before it acts.
//! - **A server step or datastore gate fails** (or a post-check, when the
//!   plan asks for it): stop every server, restore the pre-upgrade snapshot
//!   (replacing the datastore), return the agents (first) and then the
//!   servers to the versions they ran when the plan was made, start
//!   everything, check health and the `migrations` row. The failure and the
//!   start of the rollback are one journal record.
//! - **Journal.** Every step is recorded before and after it runs. A resumed
//!   apply skips completed steps; a step that was interrupted is reconciled:
//!   a member already at the step's version that passes its gates is
//!   recorded as done without acting on it again. A stop signal ends the run
//!   between two steps.
//!
//! The code is split by phase: this file holds the report types, the entry
//! point and the step loop; `forward.rs` the forward steps and member moves;
//! `rollback.rs` the restore-and-return path; `dry_run.rs` what `--dry-run`
//! prints; `tests.rs` drives them as a state machine on a fake fleet.

mod dry_run;
mod forward;
mod rollback;
#[cfg(test)]
mod tests;

pub use dry_run::{DryRun, DryRunStep, describe_gate, dry_run};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Instant;

use semver::Version;
use serde::Serialize;

use super::error::PlanError;
use super::executor::{Executor, build};
use super::facts::{self, show_row};
use super::file::{Member, Plan, PostCheckFailure, Role};
use super::health::{GateEnv, GateResult, run_gate_attempts};
use super::journal::{Event, Journal, Outcome, State};
use super::model::{SavedPlan, Step, StepKind};
use super::snapshots;
use crate::compat::MigrationRow;
use crate::error::{Error, Result};
use crate::store::Repository;

/// How to apply.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Continue from the journal.
    pub resume: bool,
    /// The local journal file.
    pub journal: PathBuf,
    /// Counts stop signals (SIGTERM, SIGINT). With one, `apply` stops
    /// before its next step, and the snapshot or restore running under the
    /// repository lease is stopped before it commits; the journal says where
    /// `--resume` continues.
    pub signals: Option<tokio::sync::watch::Receiver<u32>>,
    /// age keys: the pre-upgrade snapshot is encrypted to the recipients,
    /// and a rollback decrypts it with the identities.
    pub keyring: crate::store::crypt::Keyring,
}

/// Progress callbacks (a terminal display, logs).
pub trait Progress: Send + Sync {
    /// A step begins (`n` of `total`; rollback steps have `total` 0).
    fn begin(&self, _id: &str, _title: &str, _n: usize, _total: usize) {}
    /// A step ended.
    fn end(&self, _id: &str, _status: StepStatus, _detail: &str, _millis: u64) {}
    /// Anything else worth showing.
    fn note(&self, _message: &str) {}
}

/// A progress sink that shows nothing.
#[derive(Debug, Default)]
pub struct NoProgress;
impl Progress for NoProgress {}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Ran and passed.
    Done,
    /// Completed by an earlier run (journal); not run again.
    DoneEarlier,
    /// Interrupted earlier; found complete and recorded without acting again.
    Reconciled,
    /// Ran and failed.
    Failed,
    /// Not reached.
    NotRun,
}

/// One member's part in a step.
#[derive(Debug, Clone, Serialize)]
pub struct MemberReport {
    pub name: String,
    pub ok: bool,
    /// The version it was moved to (or should run).
    pub to: String,
    /// The version read back afterwards.
    pub version: Option<String>,
    pub detail: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<super::executor::CommandRun>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gates: Vec<GateResult>,
}

/// One step in the report.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub id: String,
    pub title: String,
    pub status: StepStatus,
    pub detail: String,
    pub millis: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberReport>,
}

/// A member at the end.
#[derive(Debug, Clone, Serialize)]
pub struct MemberState {
    pub name: String,
    pub role: Role,
    /// What it ran when the plan was made.
    pub planned_from: String,
    /// What it reports now (`None`: could not be read).
    pub version: Option<String>,
    /// Whether it passes its gates now (one attempt each).
    pub healthy: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// What `apply` reports.
#[derive(Debug, Clone, Serialize)]
pub struct ApplyReport {
    pub plan_id: String,
    pub outcome: Outcome,
    pub summary: String,
    pub resumed: bool,
    pub snapshot_id: Option<String>,
    pub steps: Vec<StepReport>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rollback: Vec<StepReport>,
    pub members: Vec<MemberState>,
    /// The `migrations` row at the end.
    pub datastore: Option<MigrationRow>,
    pub journal: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub journal_mirror_error: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// How a forward step failed.
enum Failure {
    /// Nothing changed yet (preflight, snapshot): the plan is refused.
    Refused(String),
    /// A server step or the datastore gate: roll everything back.
    Server(String),
    /// An agent batch: that batch was returned; stop.
    Batch(String, Vec<MemberReport>),
    /// Post-checks: stop and report (or roll back, when the plan asks).
    Post(String),
    /// Going on would break SPIRE's skew (agents left behind by a tolerated
    /// batch failure): stop before the step changes anything.
    Blocked(String),
}

type StepResult = std::result::Result<(String, serde_json::Value, Vec<MemberReport>), Failure>;

/// Applies a saved plan.
///
/// # Errors
/// Only what prevents starting: a plan file that no longer validates, a
/// locked journal, a journal of a finished plan, or one that exists while
/// `resume` is off. Everything after that is in the report's outcome.
pub async fn apply(
    saved: &SavedPlan,
    options: &ApplyOptions,
    progress: &dyn Progress,
) -> Result<ApplyReport> {
    let plan = saved.plan()?;
    let executor = build(&plan);
    apply_with_executor(saved, executor, options, progress).await
}

/// [`apply`] with a given executor (tests drive a fake fleet through it).
///
/// # Errors
/// As [`apply`].
pub async fn apply_with_executor(
    saved: &SavedPlan,
    executor: Box<dyn Executor>,
    options: &ApplyOptions,
    progress: &dyn Progress,
) -> Result<ApplyReport> {
    let plan = saved.plan()?;
    let repo = Repository::open(&plan.repository, &plan.repo_options)?
        .with_keyring(options.keyring.clone());
    let mut journal = Journal::open(&options.journal, &saved.plan_id, Some(repo.clone()))?;
    let state = journal.state();
    if let Some(fp) = &state.fingerprint
        && fp != &saved.fingerprint
    {
        return Err(PlanError::State(format!(
            "journal {} belongs to another plan (fingerprint {fp}); give the saved plan it was written for",
            options.journal.display()
        )).into());
    }
    if let Some((outcome @ (Outcome::Completed | Outcome::RolledBack), summary)) = &state.finished {
        return Err(PlanError::State(format!(
            "plan {} already finished ({}: {summary}); make a new plan with `spirekeep plan`",
            saved.plan_id,
            outcome.as_str()
        ))
        .into());
    }
    let progressed = state.done.keys().any(|k| k != "preflight") || state.rollback.is_some();
    if progressed && !options.resume {
        return Err(PlanError::State(format!(
            "plan {} was applied before ({} steps done; journal {}): continue it with `spirekeep apply --resume`, or see `spirekeep status`",
            saved.plan_id,
            state.done.len(),
            options.journal.display()
        )).into());
    }
    let gate_env = executor.gate_env();
    journal
        .append(Event::ApplyStarted {
            plan_id: saved.plan_id.clone(),
            fingerprint: saved.fingerprint.clone(),
            resume: options.resume,
            pid: std::process::id(),
        })
        .await?;
    let mut runner = Runner {
        saved,
        plan,
        executor,
        gate_env,
        repo,
        journal,
        progress,
        state,
        resumed: options.resume,
        steps: Vec::new(),
        rollback: Vec::new(),
        warnings: Vec::new(),
        snapshot_id: None,
        started: BTreeSet::new(),
        left_behind: BTreeSet::new(),
        signals: options.signals.clone(),
    };
    runner.started = runner.state.attempts.keys().cloned().collect();
    runner.left_behind = left_behind(saved, &runner.state);
    runner.run().await
}

struct Runner<'a> {
    saved: &'a SavedPlan,
    plan: Plan,
    executor: Box<dyn Executor>,
    gate_env: GateEnv,
    repo: Repository,
    journal: Journal,
    progress: &'a dyn Progress,
    /// The journal as it was when this run started.
    state: State,
    resumed: bool,
    steps: Vec<StepReport>,
    rollback: Vec<StepReport>,
    warnings: Vec<String>,
    snapshot_id: Option<String>,
    /// Steps that started at least once (this run or an earlier one).
    started: BTreeSet<String>,
    /// Agents a tolerated batch failure left on their previous version and
    /// no later batch moved yet.
    left_behind: BTreeSet<String>,
    signals: Option<tokio::sync::watch::Receiver<u32>>,
}

fn millis(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn ver(s: &str) -> Result<Version> {
    Version::parse(s).map_err(|e| {
        PlanError::SavedPlan(format!("saved plan: {s:?} is not a version: {e}")).into()
    })
}

impl Runner<'_> {
    /// Stops between steps once a signal arrived: nothing is half done, and
    /// `--resume` continues from the journal.
    async fn stop_if_signalled(&mut self, next: &str) -> Result<()> {
        if self.signals.as_ref().is_none_or(|s| *s.borrow() == 0) {
            return Ok(());
        }
        let message = format!(
            "interrupted by a signal before {next}; no step was left half done: `spirekeep apply --resume` continues from the journal"
        );
        self.record(Event::Note {
            message: message.clone(),
        })
        .await?;
        Err(Error::Aborted(message))
    }

    async fn record(&mut self, event: Event) -> Result<()> {
        Ok(self.journal.append(event).await?)
    }

    async fn run(&mut self) -> Result<ApplyReport> {
        self.snapshot_id = self.state.snapshot_id();
        if let Some((failed_step, reason)) = self.state.rollback.clone() {
            self.progress.note(&format!(
                "resuming the rollback that {failed_step} started: {reason}"
            ));
            for s in &self.saved.steps {
                self.steps.push(self.earlier(s));
            }
            return self.roll_back(&failed_step, &reason).await;
        }
        let total = self.saved.steps.len();
        let nothing_to_do = !self.saved.steps.iter().any(|s| moves_members(&s.kind));
        for (i, step) in self.saved.steps.iter().enumerate() {
            // The preflight runs on every run: a journal that says it passed
            // once says nothing about the fleet now.
            if self.state.is_done(&step.id) && step.kind != StepKind::Preflight {
                let r = self.earlier(step);
                self.progress.end(&step.id, r.status, &r.detail, 0);
                self.steps.push(r);
                continue;
            }
            self.stop_if_signalled(&step.id).await?;
            let reconcile = self.state.interrupted.as_deref() == Some(step.id.as_str())
                || self.state.failed.contains_key(&step.id);
            let attempt = self.state.attempts.get(&step.id).copied().unwrap_or(0) + 1;
            self.progress.begin(&step.id, &step.title, i + 1, total);
            self.started.insert(step.id.clone());
            self.record(Event::StepStarted {
                step: step.id.clone(),
                attempt,
            })
            .await?;
            let t0 = Instant::now();
            let result = self.run_step(step, reconcile).await;
            let ms = millis(t0);
            match result {
                Ok((detail, data, members)) => {
                    self.record(Event::StepDone {
                        step: step.id.clone(),
                        detail: detail.clone(),
                        data,
                    })
                    .await?;
                    let status = if members.iter().all(|m| m.detail.starts_with("already at"))
                        && !members.is_empty()
                    {
                        StepStatus::Reconciled
                    } else {
                        StepStatus::Done
                    };
                    self.progress.end(&step.id, status, &detail, ms);
                    self.steps.push(StepReport {
                        id: step.id.clone(),
                        title: step.title.clone(),
                        status,
                        detail,
                        millis: ms,
                        members,
                    });
                    if nothing_to_do && step.kind == StepKind::Preflight {
                        for s in &self.saved.steps[i + 1..] {
                            self.steps.push(not_run(s));
                        }
                        let summary = format!(
                            "nothing to do: every member already runs {} and the facts still match the plan",
                            self.saved.target
                        );
                        return self.finish(Outcome::NothingToDo, summary).await;
                    }
                }
                Err(failure) => {
                    let (msg, members) = match &failure {
                        Failure::Refused(m)
                        | Failure::Server(m)
                        | Failure::Post(m)
                        | Failure::Blocked(m) => (m.clone(), Vec::new()),
                        Failure::Batch(m, members) => (m.clone(), members.clone()),
                    };
                    let rolls_back = match &failure {
                        Failure::Server(_) => true,
                        Failure::Post(_) => {
                            self.plan.on_post_check_failure == PostCheckFailure::RollBack
                        }
                        _ => false,
                    };
                    // a server failure and its rollback are one record
                    self.record(Event::StepFailed {
                        step: step.id.clone(),
                        error: msg.clone(),
                        rollback: rolls_back,
                    })
                    .await?;
                    self.progress.end(&step.id, StepStatus::Failed, &msg, ms);
                    self.steps.push(StepReport {
                        id: step.id.clone(),
                        title: step.title.clone(),
                        status: StepStatus::Failed,
                        detail: msg.clone(),
                        millis: ms,
                        members,
                    });
                    for s in &self.saved.steps[i + 1..] {
                        self.steps.push(not_run(s));
                    }
                    return match failure {
                        Failure::Refused(m) => {
                            self.finish(
                                Outcome::Refused,
                                format!("refused before changing anything: {m}"),
                            )
                            .await
                        }
                        Failure::Batch(m, _) => {
                            self.finish(
                                Outcome::Stopped,
                                format!(
                                    "{} failed: {m}; that batch is back on its previous version, the plan stopped (fix the agents, then `spirekeep apply --resume` retries the batch)",
                                    step.title
                                ),
                            )
                            .await
                        }
                        Failure::Post(m) if rolls_back => self.roll_back(&step.id, &m).await,
                        Failure::Post(m) => {
                            self.finish(
                                Outcome::Stopped,
                                format!(
                                    "post-checks failed: {m}; every step ran, the pre-upgrade snapshot {} stays pinned (`spirekeep apply --resume` runs the post-checks again; on_post_check_failure = \"stop\", the default, left the datastore as it is)",
                                    self.snapshot_id.as_deref().unwrap_or("-")
                                ),
                            )
                            .await
                        }
                        Failure::Server(m) => self.roll_back(&step.id, &m).await,
                        Failure::Blocked(m) => {
                            self.finish(
                                Outcome::Stopped,
                                format!(
                                    "stopped before {}: {m}; nothing was changed by this step (move those agents, then `spirekeep apply --resume` checks again)",
                                    step.id
                                ),
                            )
                            .await
                        }
                    };
                }
            }
        }
        let summary = format!(
            "every member runs {} and passes its gates; the datastore shows {}",
            self.saved.target,
            show_row(self.final_row().as_ref())
        );
        self.finish(Outcome::Completed, summary).await
    }

    fn earlier(&self, step: &Step) -> StepReport {
        StepReport {
            id: step.id.clone(),
            title: step.title.clone(),
            status: if self.state.is_done(&step.id) {
                StepStatus::DoneEarlier
            } else {
                StepStatus::NotRun
            },
            detail: self
                .state
                .done_detail
                .get(&step.id)
                .cloned()
                .unwrap_or_default(),
            millis: 0,
            members: Vec::new(),
        }
    }

    fn final_row(&self) -> Option<MigrationRow> {
        self.saved.steps.iter().rev().find_map(|s| match &s.kind {
            StepKind::PostCheck { expect, .. } => expect.clone(),
            _ => None,
        })
    }

    async fn run_step(&mut self, step: &Step, reconcile: bool) -> StepResult {
        match &step.kind {
            StepKind::Preflight => self.preflight().await,
            StepKind::Snapshot { .. } => self.snapshot(reconcile).await,
            StepKind::Server { member, from, to } => {
                let (m, from, to) = self
                    .resolve(member, from, to)
                    .map_err(|e| Failure::Server(e.to_string()))?;
                self.check_left_behind(&m, &to)
                    .await
                    .map_err(Failure::Blocked)?;
                let r = self.move_member(&m, &from, &to, reconcile).await;
                if r.ok {
                    Ok((
                        format!("{} runs {to}: {}", m.name, r.detail),
                        serde_json::Value::Null,
                        vec![r],
                    ))
                } else {
                    Err(Failure::Server(format!("server {}: {}", m.name, r.detail)))
                }
            }
            StepKind::DatastoreGate { expect } => {
                self.datastore_gate(expect).await.map_err(Failure::Server)
            }
            StepKind::AgentBatch {
                members,
                to,
                max_failure_ratio,
                ..
            } => {
                self.agent_batch(members, to, *max_failure_ratio, reconcile)
                    .await
            }
            StepKind::PostCheck { target, expect } => {
                self.post_check(target, expect.as_ref()).await
            }
            StepKind::Finish => {
                let detail = match &self.snapshot_id {
                    Some(id) => match snapshots::unpin(&self.repo, id, &self.saved.plan_id).await {
                        Ok(true) => format!("snapshot {id} unpinned"),
                        Ok(false) => format!("snapshot {id} was not pinned"),
                        Err(e) => {
                            self.warnings
                                .push(format!("could not unpin snapshot {id}: {e}"));
                            format!("snapshot {id} could not be unpinned: {e}")
                        }
                    },
                    None => "no snapshot to unpin".into(),
                };
                Ok((detail, serde_json::Value::Null, Vec::new()))
            }
        }
    }

    fn resolve(&self, member: &str, from: &str, to: &str) -> Result<(Member, Version, Version)> {
        let m = self.plan.member(member).cloned().ok_or_else(|| {
            Error::from(PlanError::SavedPlan(format!(
                "saved plan names {member}, which its plan file does not"
            )))
        })?;
        Ok((m, ver(from)?, ver(to)?))
    }

    // ------------------------------------------------------------ steps

    // ------------------------------------------------------------ the end

    async fn finish(&mut self, outcome: Outcome, summary: String) -> Result<ApplyReport> {
        self.record(Event::Finished {
            outcome,
            summary: summary.clone(),
        })
        .await?;
        let members = self.member_states().await;
        let datastore = facts::read_datastore(&self.plan)
            .await
            .ok()
            .and_then(|f| f.row);
        Ok(ApplyReport {
            plan_id: self.saved.plan_id.clone(),
            outcome,
            summary,
            resumed: self.resumed,
            snapshot_id: self.snapshot_id.clone(),
            steps: std::mem::take(&mut self.steps),
            rollback: std::mem::take(&mut self.rollback),
            members,
            datastore,
            journal: self.journal.path().display().to_string(),
            journal_mirror_error: self.journal.mirror_error.clone(),
            warnings: std::mem::take(&mut self.warnings),
        })
    }

    /// Every member's version and health now (one attempt per gate).
    async fn member_states(&self) -> Vec<MemberState> {
        let members: Vec<Member> = self.plan.members().cloned().collect();
        let reads = members.iter().map(|m| async move {
            let version = self.executor.version(m).await;
            let (healthy, problem) = match &version {
                Ok(v) => {
                    let vars = m.vars(Some(v));
                    let mut failed = Vec::new();
                    for g in self.plan.gates_of(m) {
                        let r = run_gate_attempts(g, &vars, &self.gate_env, 1).await;
                        if !r.ok {
                            failed.push(format!("{}: {}", r.gate, r.detail));
                        }
                    }
                    (
                        Some(failed.is_empty()),
                        (!failed.is_empty()).then(|| failed.join("; ")),
                    )
                }
                Err(e) => (None, Some(e.clone())),
            };
            MemberState {
                name: m.name.clone(),
                role: m.role,
                planned_from: self
                    .saved
                    .original_version(&m.name)
                    .unwrap_or("")
                    .to_owned(),
                version: version.ok().map(|v| v.to_string()),
                healthy,
                problem,
            }
        });
        futures::future::join_all(reads).await
    }
}

/// The agents that completed batches left behind, replayed in step order:
/// a later batch that moved an agent takes it off the list.
fn left_behind(saved: &SavedPlan, state: &State) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for s in &saved.steps {
        let (StepKind::AgentBatch { members, .. }, Some(data)) = (&s.kind, state.done.get(&s.id))
        else {
            continue;
        };
        for m in members {
            out.remove(&m.name);
        }
        let left = data
            .get("left_behind")
            .and_then(serde_json::Value::as_array);
        for name in left
            .into_iter()
            .flatten()
            .filter_map(serde_json::Value::as_str)
        {
            out.insert(name.to_owned());
        }
    }
    out
}

/// Whether a step moves fleet members (a plan without such steps has nothing
/// to do).
fn moves_members(kind: &StepKind) -> bool {
    matches!(kind, StepKind::Server { .. } | StepKind::AgentBatch { .. })
}

fn not_run(s: &Step) -> StepReport {
    StepReport {
        id: s.id.clone(),
        title: s.title.clone(),
        status: StepStatus::NotRun,
        detail: String::new(),
        millis: 0,
        members: Vec::new(),
    }
}
