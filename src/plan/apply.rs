//! `apply`: run a saved plan's steps, journaled, with restore-on-failure.
//!
//! - **Refusal.** The live facts must match the plan's fingerprint and every
//!   member must pass its gates before anything changes.
//! - **Forward.** Pre-upgrade snapshot (backup, verify, pin), then per hop the
//!   servers one at a time (each: act, read the version back, gates), the
//!   datastore gate, the agent batches, then post-checks.
//! - **An agent batch fails** (more failures than its `max_failure_ratio`):
//!   every member of that batch goes back to the version it ran before the
//!   batch; the plan stops (`apply --resume` retries the batch later).
//! - **A server step or datastore gate fails:** stop every server, restore
//!   the pre-upgrade snapshot (replacing the datastore), return the agents
//!   (first) and then the servers to the versions they ran when the plan was
//!   made, start everything, check health and the `migrations` row.
//! - **Journal.** Every step is recorded before and after it runs. A resumed
//!   apply skips completed steps; a step that was interrupted is reconciled:
//!   a member already at the step's version that passes its gates is
//!   recorded as done without acting on it again.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Instant;

use semver::Version;
use serde::Serialize;

use super::executor::{Action, ActionResult, Executor, build};
use super::facts::{self, show_row};
use super::file::{Member, Plan, Role};
use super::health::{GateEnv, GateResult, human_duration, run_gate, run_gate_attempts};
use super::journal::{Event, Journal, Outcome, State};
use super::model::{BatchMember, SavedPlan, Step, StepKind};
use super::snapshots;
use crate::compat::MigrationRow;
use crate::compat::version::precedence;
use crate::error::{Error, Result};
use crate::store::Repository;

/// How to apply.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Continue from the journal.
    pub resume: bool,
    /// The local journal file.
    pub journal: PathBuf,
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
    /// Post-checks: stop and report.
    Post(String),
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
    let plan = saved.plan().map_err(Error::Unsupported)?;
    let repo = Repository::open(&plan.repository, &plan.repo_options)?;
    let mut journal = Journal::open(&options.journal, &saved.plan_id, Some(repo.clone()))
        .map_err(Error::Unsupported)?;
    let state = journal.state();
    if let Some(fp) = &state.fingerprint
        && fp != &saved.fingerprint
    {
        return Err(Error::Unsupported(format!(
            "journal {} belongs to another plan (fingerprint {fp}); give the saved plan it was written for",
            options.journal.display()
        )));
    }
    if let Some((outcome @ (Outcome::Completed | Outcome::RolledBack), summary)) = &state.finished {
        return Err(Error::Unsupported(format!(
            "plan {} already finished ({}: {summary}); make a new plan with `spirekeep plan`",
            saved.plan_id,
            outcome.as_str()
        )));
    }
    let progressed = state.done.keys().any(|k| k != "preflight") || state.rollback.is_some();
    if progressed && !options.resume {
        return Err(Error::Unsupported(format!(
            "plan {} was applied before ({} steps done; journal {}): continue it with `spirekeep apply --resume`, or see `spirekeep status`",
            saved.plan_id,
            state.done.len(),
            options.journal.display()
        )));
    }
    let executor = build(&plan);
    let gate_env = executor.gate_env();
    journal
        .append(Event::ApplyStarted {
            plan_id: saved.plan_id.clone(),
            fingerprint: saved.fingerprint.clone(),
            resume: options.resume,
            pid: std::process::id(),
        })
        .await
        .map_err(Error::Aborted)?;
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
    };
    runner.started = runner.state.attempts.keys().cloned().collect();
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
}

fn millis(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn ver(s: &str) -> Result<Version> {
    Version::parse(s)
        .map_err(|e| Error::Unsupported(format!("saved plan: {s:?} is not a version: {e}")))
}

impl Runner<'_> {
    async fn record(&mut self, event: Event) -> Result<()> {
        self.journal.append(event).await.map_err(Error::Aborted)
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
        for (i, step) in self.saved.steps.iter().enumerate() {
            if self.state.is_done(&step.id) {
                let r = self.earlier(step);
                self.progress.end(&step.id, r.status, &r.detail, 0);
                self.steps.push(r);
                continue;
            }
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
                }
                Err(failure) => {
                    let (msg, members) = match &failure {
                        Failure::Refused(m) | Failure::Server(m) | Failure::Post(m) => {
                            (m.clone(), Vec::new())
                        }
                        Failure::Batch(m, members) => (m.clone(), members.clone()),
                    };
                    self.record(Event::StepFailed {
                        step: step.id.clone(),
                        error: msg.clone(),
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
                        Failure::Post(m) => {
                            self.finish(
                                Outcome::Stopped,
                                format!(
                                    "post-checks failed: {m}; every step ran, the pre-upgrade snapshot {} stays pinned (`spirekeep apply --resume` runs the post-checks again)",
                                    self.snapshot_id.as_deref().unwrap_or("-")
                                ),
                            )
                            .await
                        }
                        Failure::Server(m) => {
                            self.record(Event::RollbackStarted {
                                failed_step: step.id.clone(),
                                reason: m.clone(),
                            })
                            .await?;
                            self.roll_back(&step.id, &m).await
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
            Error::Unsupported(format!(
                "saved plan names {member}, which its plan file does not"
            ))
        })?;
        Ok((m, ver(from)?, ver(to)?))
    }

    // ------------------------------------------------------------ steps

    async fn preflight(&mut self) -> StepResult {
        let now = facts::read(&self.plan, self.executor.as_ref(), 0)
            .await
            .map_err(|e| Failure::Refused(format!("cannot read the live facts: {e}")))?;
        let diff = self.saved.facts.differences(&now);
        if !diff.is_empty() {
            return Err(Failure::Refused(format!(
                "the plan is stale, the facts changed since it was made ({}): make a new plan with `spirekeep plan`",
                diff.join("; ")
            )));
        }
        let mut unhealthy = Vec::new();
        let mut members = Vec::new();
        for m in self.plan.members().cloned().collect::<Vec<_>>() {
            let version = self
                .saved
                .original_version(&m.name)
                .unwrap_or("")
                .to_owned();
            let gates = self.gates(&m, ver(&version).ok().as_ref()).await;
            let failed: Vec<String> = gates
                .iter()
                .filter(|g| !g.ok)
                .map(|g| format!("{}: {}", g.gate, g.detail))
                .collect();
            if !failed.is_empty() {
                unhealthy.push(format!(
                    "{} {} ({})",
                    m.role.as_str(),
                    m.name,
                    failed.join("; ")
                ));
            }
            members.push(MemberReport {
                name: m.name.clone(),
                ok: failed.is_empty(),
                to: version.clone(),
                version: Some(version),
                detail: if failed.is_empty() {
                    "healthy".into()
                } else {
                    failed.join("; ")
                },
                commands: Vec::new(),
                gates,
            });
        }
        if !unhealthy.is_empty() {
            return Err(Failure::Refused(format!(
                "not every member is healthy before the upgrade: {}",
                unhealthy.join(", ")
            )));
        }
        self.repo
            .list(crate::store::keys::SNAPSHOTS)
            .await
            .map_err(|e| Failure::Refused(format!("the repository does not answer: {e}")))?;
        Ok((
            format!(
                "facts match the plan ({}); {} members healthy; {} answers",
                self.saved.fingerprint,
                members.len(),
                self.repo
            ),
            serde_json::Value::Null,
            members,
        ))
    }

    async fn snapshot(&mut self, reconcile: bool) -> StepResult {
        let (manifest, detail) = snapshots::take_pre_upgrade(
            &self.plan,
            &self.repo,
            &self.saved.plan_id,
            reconcile.then_some(self.saved.created_at),
        )
        .await
        .map_err(|e| {
            Failure::Refused(format!(
                "pre-upgrade snapshot failed, nothing was changed: {e}"
            ))
        })?;
        let id = manifest.snapshot_id.to_string();
        self.snapshot_id = Some(id.clone());
        Ok((
            detail,
            serde_json::json!({
                "snapshot_id": id,
                "schema_version": manifest.spire.schema_version,
                "code_version": manifest.spire.code_version,
            }),
            Vec::new(),
        ))
    }

    async fn datastore_gate(
        &self,
        expect: &MigrationRow,
    ) -> std::result::Result<(String, serde_json::Value, Vec<MemberReport>), String> {
        let mut last = String::new();
        for attempt in 0..10 {
            if attempt > 0 {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            match facts::read_datastore(&self.plan).await {
                Ok(f) if f.row.as_ref() == Some(expect) => {
                    return Ok((
                        format!("the migrations row is {}", show_row(Some(expect))),
                        serde_json::Value::Null,
                        Vec::new(),
                    ));
                }
                Ok(f) => {
                    last = format!(
                        "the migrations row is {}, but the release writes {}",
                        show_row(f.row.as_ref()),
                        show_row(Some(expect))
                    );
                }
                Err(e) => last = format!("cannot read the datastore: {e}"),
            }
        }
        Err(format!("datastore gate: {last}"))
    }

    async fn agent_batch(
        &mut self,
        members: &[BatchMember],
        to: &str,
        max_failure_ratio: f64,
        reconcile: bool,
    ) -> StepResult {
        let to_v = ver(to).map_err(|e| Failure::Batch(e.to_string(), Vec::new()))?;
        let mut list = Vec::new();
        for b in members {
            let (m, from, _) = self
                .resolve(&b.name, &b.from, to)
                .map_err(|e| Failure::Batch(e.to_string(), Vec::new()))?;
            list.push((m, from));
        }
        let this = &*self;
        let results = futures::future::join_all(
            list.iter()
                .map(|(m, from)| this.move_member(m, from, &to_v, reconcile)),
        )
        .await;
        let failed: Vec<usize> = results
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.ok)
            .map(|(i, _)| i)
            .collect();
        let size = results.len();
        if failed.is_empty() {
            let detail = format!(
                "{} run {to}",
                results
                    .iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let reconciled = results.iter().all(|r| r.detail.starts_with("already at"));
            let detail = if reconciled {
                format!("{detail} (found done after an interruption)")
            } else {
                detail
            };
            return Ok((detail, serde_json::Value::Null, results));
        }
        let describe = |idx: &[usize]| {
            idx.iter()
                .map(|i| format!("{}: {}", results[*i].name, results[*i].detail))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let failures = u32::try_from(failed.len()).unwrap_or(u32::MAX);
        let total = u32::try_from(size).unwrap_or(u32::MAX).max(1);
        let tolerated = f64::from(failures) / f64::from(total) <= max_failure_ratio;
        // Which members go back: the failed ones when tolerated, else the batch.
        let back: Vec<usize> = if tolerated {
            failed.clone()
        } else {
            (0..size).collect()
        };
        let returned = futures::future::join_all(back.iter().map(|i| {
            let (m, from) = &list[*i];
            this.move_member(m, &to_v, from, false)
        }))
        .await;
        let mut reports = results.clone();
        for (i, r) in back.iter().zip(returned.iter()) {
            reports[*i].detail = format!(
                "{}; returned to {}: {}",
                reports[*i].detail,
                list[*i].1,
                if r.ok {
                    "ok".to_owned()
                } else {
                    format!("FAILED: {}", r.detail)
                }
            );
            reports[*i].version.clone_from(&r.version);
            reports[*i].commands.extend(r.commands.iter().cloned());
        }
        let return_failed: Vec<&MemberReport> = returned.iter().filter(|r| !r.ok).collect();
        if !return_failed.is_empty() {
            self.warnings.push(format!(
                "could not return {} to their previous version: {}",
                return_failed
                    .iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                return_failed
                    .iter()
                    .map(|r| r.detail.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
        if tolerated {
            self.warnings.push(format!(
                "{failures} of {size} agents in a batch failed, within max_failure_ratio {max_failure_ratio}; they were returned to their previous version and left behind: {}",
                describe(&failed)
            ));
            return Ok((
                format!(
                    "{} of {size} run {to}; {failures} failed and went back (within max_failure_ratio {max_failure_ratio})",
                    size - failed.len()
                ),
                serde_json::Value::Null,
                reports,
            ));
        }
        Err(Failure::Batch(
            format!(
                "{failures} of {size} agents failed (max_failure_ratio {max_failure_ratio}): {}",
                describe(&failed)
            ),
            reports,
        ))
    }

    async fn post_check(&mut self, target: &str, expect: Option<&MigrationRow>) -> StepResult {
        let mut problems = Vec::new();
        let mut reports = Vec::new();
        let expected = self.expected_versions();
        for m in self.plan.members().cloned().collect::<Vec<_>>() {
            let want = expected.get(&m.name).cloned().unwrap_or_default();
            let got = self.executor.version(&m).await;
            let (version, mut ok, mut detail) = match &got {
                Ok(v) if v.to_string() == want => (Some(v.to_string()), true, format!("runs {v}")),
                Ok(v) => (
                    Some(v.to_string()),
                    false,
                    format!("runs {v}, expected {want}"),
                ),
                Err(e) => (None, false, format!("version unknown: {e}")),
            };
            let gates = self.gates(&m, got.as_ref().ok()).await;
            if let Some(g) = gates.iter().find(|g| !g.ok) {
                ok = false;
                detail = format!("{detail}; gate {} failed: {}", g.gate, g.detail);
            }
            if !ok {
                problems.push(format!("{} {}", m.name, detail));
            }
            reports.push(MemberReport {
                name: m.name.clone(),
                ok,
                to: want,
                version,
                detail,
                commands: Vec::new(),
                gates,
            });
        }
        if let Some(expect) = expect {
            match facts::read_datastore(&self.plan).await {
                Ok(f) if f.row.as_ref() == Some(expect) => {}
                Ok(f) => problems.push(format!(
                    "the datastore shows {}, expected {}",
                    show_row(f.row.as_ref()),
                    show_row(Some(expect))
                )),
                Err(e) => problems.push(format!("cannot read the datastore: {e}")),
            }
        }
        let vars = super::template::Vars::new().with("version", target);
        for gate in self.plan.post_checks.clone() {
            let r = run_gate(&gate, &vars, &self.gate_env).await;
            if !r.ok {
                problems.push(format!("post-check {}: {}", r.gate, r.detail));
            }
        }
        if problems.is_empty() {
            Ok((
                format!(
                    "{} members at their target and healthy; datastore {}",
                    reports.len(),
                    show_row(expect)
                ),
                serde_json::Value::Null,
                reports,
            ))
        } else {
            Err(Failure::Post(problems.join("; ")))
        }
    }

    /// The version each member should run once every step ran.
    fn expected_versions(&self) -> BTreeMap<String, String> {
        let mut out: BTreeMap<String, String> = self
            .saved
            .facts
            .members
            .iter()
            .map(|m| (m.name.clone(), m.version.clone()))
            .collect();
        for s in &self.saved.steps {
            match &s.kind {
                StepKind::Server { member, to, .. } => {
                    out.insert(member.clone(), to.clone());
                }
                StepKind::AgentBatch { members, to, .. } => {
                    for m in members {
                        out.insert(m.name.clone(), to.clone());
                    }
                }
                _ => {}
            }
        }
        out
    }

    // ------------------------------------------------------------ members

    async fn gates(&self, m: &Member, version: Option<&Version>) -> Vec<GateResult> {
        let vars = m.vars(version);
        let mut out = Vec::new();
        for g in self.plan.gates_of(m) {
            out.push(run_gate(g, &vars, &self.gate_env).await);
        }
        out
    }

    /// Moves one member from `from` to `to`: the action, the version read
    /// back, the gates. With `reconcile`, a member already at `to` that
    /// passes its gates is left alone.
    async fn move_member(
        &self,
        m: &Member,
        from: &Version,
        to: &Version,
        reconcile: bool,
    ) -> MemberReport {
        let mut report = MemberReport {
            name: m.name.clone(),
            ok: false,
            to: to.to_string(),
            version: None,
            detail: String::new(),
            commands: Vec::new(),
            gates: Vec::new(),
        };
        if reconcile
            && let Ok(now) = self.executor.version(m).await
            && precedence(&now, to) == Ordering::Equal
        {
            let gates = self.gates(m, Some(to)).await;
            if gates.iter().all(|g| g.ok) {
                report.ok = true;
                report.version = Some(now.to_string());
                report.detail =
                    format!("already at {to} and healthy (an interrupted run moved it)");
                report.gates = gates;
                return report;
            }
        }
        let action = if precedence(to, from) == Ordering::Less {
            Action::Rollback
        } else {
            Action::Upgrade
        };
        let r: ActionResult = self.executor.run(action, m, Some(to), true).await;
        report.commands = r.runs;
        if !r.ok {
            report.detail = format!(
                "{} to {to} failed: {}",
                action.as_str(),
                r.error.unwrap_or_default()
            );
            report.version = self.executor.version(m).await.ok().map(|v| v.to_string());
            return report;
        }
        self.check_member(m, to, &mut report).await;
        report
    }

    /// Reads the version back and runs the gates.
    async fn check_member(&self, m: &Member, to: &Version, report: &mut MemberReport) {
        match self.executor.version(m).await {
            Ok(v) if precedence(&v, to) == Ordering::Equal => report.version = Some(v.to_string()),
            Ok(v) => {
                report.version = Some(v.to_string());
                report.detail = format!("reports version {v} after moving to {to}");
                return;
            }
            Err(e) => {
                report.detail = format!("cannot read its version after moving to {to}: {e}");
                return;
            }
        }
        report.gates = self.gates(m, Some(to)).await;
        if let Some(g) = report.gates.iter().find(|g| !g.ok) {
            report.detail = format!(
                "gate {} failed after {} attempt(s): {}",
                g.gate, g.attempts, g.detail
            );
            return;
        }
        report.ok = true;
        report.detail = format!("{} gate(s) passed", report.gates.len());
    }

    // ------------------------------------------------------------ rollback

    /// Runs (or continues) one rollback step.
    async fn rollback_step<F>(&mut self, id: String, title: String, f: F) -> Result<bool>
    where
        F: AsyncFnOnce(&mut Self) -> std::result::Result<(String, Vec<MemberReport>), String>,
    {
        if self.state.is_done(&id) {
            let detail = self.state.done_detail.get(&id).cloned().unwrap_or_default();
            self.progress.end(&id, StepStatus::DoneEarlier, &detail, 0);
            self.rollback.push(StepReport {
                id,
                title,
                status: StepStatus::DoneEarlier,
                detail,
                millis: 0,
                members: Vec::new(),
            });
            return Ok(true);
        }
        let attempt = self.state.attempts.get(&id).copied().unwrap_or(0) + 1;
        self.progress.begin(&id, &title, 0, 0);
        self.record(Event::StepStarted {
            step: id.clone(),
            attempt,
        })
        .await?;
        let t0 = Instant::now();
        let result = f(self).await;
        let ms = millis(t0);
        let (status, detail, members) = match result {
            Ok((detail, members)) => {
                self.record(Event::StepDone {
                    step: id.clone(),
                    detail: detail.clone(),
                    data: serde_json::Value::Null,
                })
                .await?;
                (StepStatus::Done, detail, members)
            }
            Err(e) => {
                self.record(Event::StepFailed {
                    step: id.clone(),
                    error: e.clone(),
                })
                .await?;
                (StepStatus::Failed, e, Vec::new())
            }
        };
        self.progress.end(&id, status, &detail, ms);
        self.rollback.push(StepReport {
            id,
            title,
            status,
            detail,
            millis: ms,
            members,
        });
        Ok(status == StepStatus::Done)
    }

    async fn roll_back(&mut self, failed_step: &str, reason: &str) -> Result<ApplyReport> {
        self.progress.note(&format!(
            "{failed_step} failed: {reason}; restoring the pre-upgrade snapshot and returning every member to its previous version"
        ));
        let Some(snapshot_id) = self.snapshot_id.clone() else {
            return self
                .finish(
                    Outcome::RollbackFailed,
                    format!("{failed_step} failed ({reason}) and there is no pre-upgrade snapshot to restore"),
                )
                .await;
        };
        let servers = self.plan.servers.clone();
        let agents: Vec<Member> = self
            .plan
            .members()
            .filter(|m| m.role == Role::Agent)
            .cloned()
            .collect();
        let mut ok = true;

        // 1. stop every server
        for m in &servers {
            let m2 = m.clone();
            ok &= self
                .rollback_step(
                    format!("rollback.stop.{}", m.name),
                    format!("rollback: stop server {}", m.name),
                    async move |r: &mut Self| {
                        let a = r.executor.run(Action::Stop, &m2, None, true).await;
                        if a.ok {
                            Ok(("stopped".into(), Vec::new()))
                        } else {
                            Err(a.error.unwrap_or_default())
                        }
                    },
                )
                .await?;
        }
        if !ok {
            return self
                .finish(
                    Outcome::RollbackFailed,
                    format!("{failed_step} failed ({reason}); a server could not be stopped, so the snapshot was NOT restored: stop it by hand, then `spirekeep apply --resume` continues the rollback"),
                )
                .await;
        }
        // 2. restore the snapshot
        let id = snapshot_id.clone();
        let restored = self
            .rollback_step("rollback.restore".into(), format!("rollback: restore snapshot {snapshot_id} into the datastore (replace)"), async move |r: &mut Self| {
                snapshots::restore_pre_upgrade(&r.plan, &r.repo, &r.saved.plan_id, &id)
                    .await
                    .map(|m| {
                        (
                            format!(
                                "datastore replaced by snapshot {} ({} rows, schema {}, code_version {})",
                                m.snapshot_id,
                                m.total_rows(),
                                m.spire.schema_version,
                                m.spire.code_version
                            ),
                            Vec::new(),
                        )
                    })
                    .map_err(|e| e.to_string())
            })
            .await?;
        if !restored {
            return self
                .finish(
                    Outcome::RollbackFailed,
                    format!("{failed_step} failed ({reason}); restoring snapshot {snapshot_id} failed, the servers are stopped: restore it with `spirekeep restore`, or `spirekeep apply --resume` tries again"),
                )
                .await;
        }
        // 3. agents first: back to their planned-from version (they may not
        //    come up while the servers are stopped; they are started below)
        for m in &agents {
            let original = self.original(&m.name)?;
            let m2 = m.clone();
            self.rollback_step(format!("rollback.agent.{}", m.name), format!("rollback: agent {} back to {original}", m.name), async move |r: &mut Self| {
                let now = r.executor.version(&m2).await.map_err(|e| format!("version unknown: {e}"))?;
                let moved = r.touched(&m2.name);
                if moved.is_none() && precedence(&now, &original) == Ordering::Equal {
                    return Ok((format!("already at {original}"), Vec::new()));
                }
                let from = moved.unwrap_or_else(|| now.clone());
                let action = if precedence(&original, &from) == Ordering::Greater { Action::Upgrade } else { Action::Rollback };
                let a = r.executor.run(action, &m2, Some(&original), false).await;
                let check = r.executor.version(&m2).await;
                match check {
                    Ok(v) if precedence(&v, &original) == Ordering::Equal => Ok((
                        if a.ok {
                            format!("{now} → {original}")
                        } else {
                            format!("{now} → {original} installed; it did not come up with the servers stopped ({}); started again after the servers", a.error.unwrap_or_default())
                        },
                        Vec::new(),
                    )),
                    Ok(v) => Err(format!("still reports {v} after {}: {}", action.as_str(), a.error.unwrap_or_default())),
                    Err(e) => Err(format!("version unknown after {}: {e}", action.as_str())),
                }
            })
            .await?;
        }
        // 4. servers back, started, healthy
        let mut all_ok = true;
        for m in &servers {
            let original = self.original(&m.name)?;
            let m2 = m.clone();
            all_ok &= self
                .rollback_step(format!("rollback.server.{}", m.name), format!("rollback: server {} back to {original}, started", m.name), async move |r: &mut Self| {
                    let now = r.executor.version(&m2).await.map_err(|e| format!("version unknown: {e}"))?;
                    let mut cmds = Vec::new();
                    let moved = r.touched(&m2.name);
                    if moved.is_some() || precedence(&now, &original) != Ordering::Equal {
                        let from = moved.unwrap_or_else(|| now.clone());
                        let action = if precedence(&original, &from) == Ordering::Greater { Action::Upgrade } else { Action::Rollback };
                        let a = r.executor.run(action, &m2, Some(&original), false).await;
                        cmds.extend(a.runs);
                        if !a.ok {
                            tracing::warn!(member = %m2.name, error = ?a.error, "rollback command failed; starting anyway");
                        }
                    }
                    let s = r.executor.run(Action::Start, &m2, None, true).await;
                    cmds.extend(s.runs);
                    if !s.ok {
                        return Err(format!("start failed: {}", s.error.unwrap_or_default()));
                    }
                    let mut rep = MemberReport {
                        name: m2.name.clone(),
                        ok: false,
                        to: original.to_string(),
                        version: None,
                        detail: String::new(),
                        commands: cmds,
                        gates: Vec::new(),
                    };
                    r.check_member(&m2, &original, &mut rep).await;
                    if rep.ok {
                        Ok((format!("{now} → {original}, running, {}", rep.detail), vec![rep]))
                    } else {
                        Err(rep.detail)
                    }
                })
                .await?;
        }
        // 5. agents started and healthy
        for m in &agents {
            let original = self.original(&m.name)?;
            let m2 = m.clone();
            all_ok &= self
                .rollback_step(
                    format!("rollback.agentcheck.{}", m.name),
                    format!("rollback: agent {} running {original} and healthy", m.name),
                    async move |r: &mut Self| {
                        let s = r.executor.run(Action::Start, &m2, None, true).await;
                        if !s.ok {
                            return Err(format!("start failed: {}", s.error.unwrap_or_default()));
                        }
                        let mut rep = MemberReport {
                            name: m2.name.clone(),
                            ok: false,
                            to: original.to_string(),
                            version: None,
                            detail: String::new(),
                            commands: s.runs,
                            gates: Vec::new(),
                        };
                        r.check_member(&m2, &original, &mut rep).await;
                        if rep.ok {
                            Ok((format!("runs {original}, {}", rep.detail), vec![rep]))
                        } else {
                            Err(rep.detail)
                        }
                    },
                )
                .await?;
        }
        // 6. the datastore is the snapshot's
        let expect = self.saved.facts.datastore.row.clone();
        all_ok &= self
            .rollback_step(
                "rollback.check".into(),
                "rollback: the datastore shows the pre-upgrade migrations row".into(),
                async move |r: &mut Self| {
                    let f = facts::read_datastore(&r.plan)
                        .await
                        .map_err(|e| e.to_string())?;
                    if f.row == expect {
                        Ok((
                            format!("the migrations row is {}", show_row(f.row.as_ref())),
                            Vec::new(),
                        ))
                    } else {
                        Err(format!(
                            "the migrations row is {}, expected {}",
                            show_row(f.row.as_ref()),
                            show_row(expect.as_ref())
                        ))
                    }
                },
            )
            .await?;
        if all_ok {
            if let Err(e) = snapshots::unpin(&self.repo, &snapshot_id, &self.saved.plan_id).await {
                self.warnings
                    .push(format!("could not unpin snapshot {snapshot_id}: {e}"));
            }
            self.finish(
                Outcome::RolledBack,
                format!(
                    "{failed_step} failed: {reason}. Rolled back: the datastore was restored from snapshot {snapshot_id}, every member runs the version it ran before the plan and passes its gates"
                ),
            )
            .await
        } else {
            self.finish(
                Outcome::RollbackFailed,
                format!(
                    "{failed_step} failed: {reason}. The datastore was restored from snapshot {snapshot_id}, but not every member is back and healthy (see the rollback steps); fix them, then `spirekeep apply --resume` checks again"
                ),
            )
            .await
        }
    }

    /// The version the furthest started step moved `member` to: `None` when
    /// no step touched it. Its reported version is not trusted for this (a
    /// member may report a wrong version, which is how its step failed).
    fn touched(&self, member: &str) -> Option<Version> {
        let mut to = None;
        for s in &self.saved.steps {
            if !self.started.contains(&s.id) {
                continue;
            }
            match &s.kind {
                StepKind::Server {
                    member: m, to: v, ..
                } if m == member => to = Version::parse(v).ok(),
                StepKind::AgentBatch { members, to: v, .. }
                    if members.iter().any(|b| b.name == member) =>
                {
                    to = Version::parse(v).ok();
                }
                _ => {}
            }
        }
        to
    }

    fn original(&self, member: &str) -> Result<Version> {
        ver(self.saved.original_version(member).unwrap_or(""))
    }

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

/// What `apply --dry-run` shows for one step.
#[derive(Debug, Clone, Serialize)]
pub struct DryRunStep {
    pub id: String,
    pub title: String,
    /// The exact commands, in order.
    pub commands: Vec<String>,
    /// The checks after the commands.
    pub checks: Vec<String>,
}

/// What `apply --dry-run` prints.
#[derive(Debug, Clone, Serialize)]
pub struct DryRun {
    pub plan_id: String,
    pub executor: String,
    /// Whether the live facts still match the plan (`None`: not checked).
    pub fresh: Option<bool>,
    pub stale: Vec<String>,
    pub steps: Vec<DryRunStep>,
    /// What a failed server step or datastore gate would run.
    pub on_server_failure: Vec<DryRunStep>,
}

/// Renders every step's commands without running any (with `check_facts`,
/// the facts are read, which runs the members' version commands).
///
/// # Errors
/// A plan file that no longer validates.
pub async fn dry_run(saved: &SavedPlan, check_facts: bool) -> Result<DryRun> {
    let plan = saved.plan().map_err(Error::Unsupported)?;
    let executor = build(&plan);
    let (fresh, stale) = if check_facts {
        match facts::read(&plan, executor.as_ref(), 0).await {
            Ok(now) => {
                let d = saved.facts.differences(&now);
                (Some(d.is_empty()), d)
            }
            Err(e) => (None, vec![format!("could not read the live facts: {e}")]),
        }
    } else {
        (None, Vec::new())
    };
    let gate_lines = |m: &Member, v: Option<&Version>| -> Vec<String> {
        let vars = m.vars(v);
        let mut out = vec![format!(
            "{} reports {}",
            m.name,
            v.map_or_else(|| "its version".to_owned(), ToString::to_string)
        )];
        out.extend(plan.gates_of(m).iter().map(|g| describe_gate(g, &vars)));
        out
    };
    let mut steps = Vec::new();
    for s in &saved.steps {
        let mut commands = Vec::new();
        let mut checks = Vec::new();
        match &s.kind {
            StepKind::Preflight => {
                for m in plan.members() {
                    commands.extend(executor.render(Action::Version, m, None, true));
                }
                checks.push(format!("facts match {}", saved.fingerprint));
                for m in plan.members() {
                    let v = saved
                        .original_version(&m.name)
                        .and_then(|v| Version::parse(v).ok());
                    checks.extend(
                        plan.gates_of(m)
                            .iter()
                            .map(|g| describe_gate(g, &m.vars(v.as_ref()))),
                    );
                }
            }
            StepKind::Snapshot { labels } => {
                commands.push(format!(
                    "backup {} into {} (labels {}, {}), verify, pin for {}",
                    saved.facts.datastore.location,
                    plan.repository,
                    labels.join(", "),
                    snapshots::plan_label(&saved.plan_id),
                    saved.plan_id
                ));
            }
            StepKind::Server { member, to, .. } => {
                if let (Some(m), Ok(to)) = (plan.member(member), Version::parse(to)) {
                    let from = saved
                        .original_version(member)
                        .and_then(|v| Version::parse(v).ok());
                    let action = if from.is_some_and(|f| precedence(&to, &f) == Ordering::Less) {
                        Action::Rollback
                    } else {
                        Action::Upgrade
                    };
                    commands.extend(executor.render(action, m, Some(&to), true));
                    commands.extend(executor.render(Action::Version, m, None, true));
                    checks.extend(gate_lines(m, Some(&to)));
                }
            }
            StepKind::DatastoreGate { expect } => {
                checks.push(format!(
                    "the migrations row of {} is {}",
                    saved.facts.datastore.location,
                    show_row(Some(expect))
                ));
            }
            StepKind::AgentBatch { members, to, .. } => {
                if let Ok(to) = Version::parse(to) {
                    for b in members {
                        if let Some(m) = plan.member(&b.name) {
                            let from = Version::parse(&b.from).ok();
                            let action =
                                if from.is_some_and(|f| precedence(&to, &f) == Ordering::Less) {
                                    Action::Rollback
                                } else {
                                    Action::Upgrade
                                };
                            commands.extend(executor.render(action, m, Some(&to), true));
                            commands.extend(executor.render(Action::Version, m, None, true));
                            checks.extend(gate_lines(m, Some(&to)));
                        }
                    }
                }
            }
            StepKind::PostCheck { target, expect } => {
                for m in plan.members() {
                    commands.extend(executor.render(Action::Version, m, None, true));
                }
                checks.push(format!(
                    "every member reports its final version ({target} for the servers)"
                ));
                checks.push(format!(
                    "the migrations row is {}",
                    show_row(expect.as_ref())
                ));
                let vars = super::template::Vars::new().with("version", target.clone());
                checks.extend(plan.post_checks.iter().map(|g| describe_gate(g, &vars)));
            }
            StepKind::Finish => commands.push(format!(
                "unpin the pre-upgrade snapshot (holder {})",
                saved.plan_id
            )),
        }
        steps.push(DryRunStep {
            id: s.id.clone(),
            title: s.title.clone(),
            commands,
            checks,
        });
    }
    let mut on_failure = Vec::new();
    let stop: Vec<String> = plan
        .servers
        .iter()
        .flat_map(|m| executor.render(Action::Stop, m, None, true))
        .collect();
    on_failure.push(DryRunStep {
        id: "rollback.stop".into(),
        title: "stop every server".into(),
        commands: stop,
        checks: Vec::new(),
    });
    on_failure.push(DryRunStep {
        id: "rollback.restore".into(),
        title: "restore the pre-upgrade snapshot into the datastore (replace)".into(),
        commands: vec![format!(
            "restore the snapshot into {}",
            saved.facts.datastore.location
        )],
        checks: Vec::new(),
    });
    for role in [Role::Agent, Role::Server] {
        for m in plan.members().filter(|m| m.role == role) {
            let Some(original) = saved
                .original_version(&m.name)
                .and_then(|v| Version::parse(v).ok())
            else {
                continue;
            };
            let mut commands = executor.render(Action::Rollback, m, Some(&original), false);
            commands.extend(executor.render(Action::Start, m, None, true));
            on_failure.push(DryRunStep {
                id: format!("rollback.{}.{}", role.as_str(), m.name),
                title: format!(
                    "{} {} back to {original} (if it moved), started",
                    role.as_str(),
                    m.name
                ),
                commands,
                checks: gate_lines(m, Some(&original)),
            });
        }
    }
    Ok(DryRun {
        plan_id: saved.plan_id.clone(),
        executor: executor.kind().into(),
        fresh,
        stale,
        steps,
        on_server_failure: on_failure,
    })
}

/// A gate in words, rendered for a member.
#[must_use]
pub fn describe_gate(g: &super::health::Gate, vars: &super::template::Vars) -> String {
    use super::health::Check;
    use super::template::Quoting;
    let what = match &g.check {
        Check::Command(t) => format!("`{}` exits 0", t.render(vars, Quoting::Shell)),
        Check::Http(t) => format!("GET {} answers 2xx", t.render(vars, Quoting::Raw)),
        Check::Metric {
            url,
            selector,
            condition,
            window,
        } => {
            let cond = match condition {
                super::health::Condition::Increases => {
                    format!("increases within {}", human_duration(*window))
                }
                super::health::Condition::DoesNotIncrease => {
                    format!("does not increase within {}", human_duration(*window))
                }
                super::health::Condition::DoesNotDecrease => {
                    format!("does not decrease within {}", human_duration(*window))
                }
                super::health::Condition::Compare(op, n) => format!(
                    "{} {n}",
                    serde_json::to_value(op)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default()
                ),
            };
            format!(
                "{} {cond} at {}",
                selector.render(vars),
                url.render(vars, Quoting::Raw)
            )
        }
    };
    format!(
        "{what} (up to {} attempts, {} apart, {} each)",
        g.retries.saturating_add(1),
        human_duration(g.interval),
        human_duration(g.timeout)
    )
}
