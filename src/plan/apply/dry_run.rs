//! `apply --dry-run`: every command and check a plan would run, rendered
//! without running any.

use std::cmp::Ordering;

use semver::Version;
use serde::Serialize;

use crate::compat::version::precedence;
use crate::error::Result;
use crate::plan::executor::{Action, build};
use crate::plan::facts::{self, show_row};
use crate::plan::file::{Member, Role};
use crate::plan::health::human_duration;
use crate::plan::model::{SavedPlan, StepKind};
use crate::plan::snapshots;

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
    let plan = saved.plan()?;
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
                    commands.extend(executor.render(Action::Clock, m, None, true));
                }
                checks.push(format!("facts match {}", saved.fingerprint));
                checks.push(format!(
                    "every member's clock within {} of this host's",
                    human_duration(plan.max_clock_skew)
                ));
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
                if let (Some(r), Some(first)) = (&plan.rehearsal, saved.hops.first()) {
                    commands.push(format!(
                        "rehearse: restore the snapshot into {}, start {} on it, refuse the plan if it does not accept the data",
                        r.scratch_env
                            .as_deref()
                            .map_or_else(|| "a temporary SQLite file".to_string(), |v| format!("the scratch database in ${v}")),
                        r.binary_for(&first.to).display()
                    ));
                }
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
                let vars = crate::plan::template::Vars::new().with("version", target.clone());
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
pub fn describe_gate(g: &crate::plan::health::Gate, vars: &crate::plan::template::Vars) -> String {
    use crate::plan::health::Check;
    use crate::plan::template::Quoting;
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
                crate::plan::health::Condition::Increases => {
                    format!("increases within {}", human_duration(*window))
                }
                crate::plan::health::Condition::DoesNotIncrease => {
                    format!("does not increase within {}", human_duration(*window))
                }
                crate::plan::health::Condition::DoesNotDecrease => {
                    format!("does not decrease within {}", human_duration(*window))
                }
                crate::plan::health::Condition::Compare(op, n) => format!(
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
