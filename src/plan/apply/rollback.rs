//! The rollback of `apply`: stop the servers, restore the pre-upgrade
//! snapshot, return the agents then the servers to the versions they ran
//! when the plan was made, and check. Every step is journaled, so a killed
//! rollback resumes where it stopped.

use std::cmp::Ordering;
use std::time::Instant;

use semver::Version;

use super::{ApplyReport, MemberReport, Runner, StepReport, StepStatus, millis, ver};
use crate::compat::version::precedence;
use crate::error::Result;
use crate::plan::executor::Action;
use crate::plan::facts::{self, show_row};
use crate::plan::file::{Member, Role};
use crate::plan::journal::{Event, Outcome};
use crate::plan::model::StepKind;
use crate::plan::snapshots;

impl Runner<'_> {
    /// Runs (or continues) one rollback step.
    pub(super) async fn rollback_step<F>(&mut self, id: String, title: String, f: F) -> Result<bool>
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
        self.stop_if_signalled(&id).await?;
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
                    rollback: false,
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

    pub(super) async fn roll_back(
        &mut self,
        failed_step: &str,
        reason: &str,
    ) -> Result<ApplyReport> {
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
                snapshots::restore_pre_upgrade(&r.plan, &r.repo, &r.saved.plan_id, &id, r.signals.clone())
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
    pub(super) fn touched(&self, member: &str) -> Option<Version> {
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

    pub(super) fn original(&self, member: &str) -> Result<Version> {
        ver(self.saved.original_version(member).unwrap_or(""))
    }
}
