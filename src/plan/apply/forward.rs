//! The forward steps of `apply`: preflight, the pre-upgrade snapshot, server
//! and agent moves, the datastore gate and the post-checks.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use semver::Version;

use super::{Failure, MemberReport, Runner, StepResult, ver};
use crate::compat::MigrationRow;
use crate::compat::agent_supported;
use crate::compat::version::precedence;
use crate::plan::executor::{Action, ActionResult};
use crate::plan::facts::{self, show_row};
use crate::plan::file::Member;
use crate::plan::health::{GateResult, run_gate};
use crate::plan::model::{BatchMember, StepKind};
use crate::plan::snapshots;

impl Runner<'_> {
    /// The preflight, run on every `apply` run. Before any member moved:
    /// the live facts must match the plan's fingerprint, every member must
    /// pass its gates, every member's clock must be within the skew, and
    /// the repository must answer. Once members moved (a resumed run), the
    /// facts are no longer the plan's: see [`Self::preflight_resumed`].
    pub(super) async fn preflight(&mut self) -> StepResult {
        let moved = self
            .saved
            .steps
            .iter()
            .any(|s| super::moves_members(&s.kind) && self.started.contains(&s.id));
        if moved {
            return self.preflight_resumed().await;
        }
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
        let clocks = self.clock_check(&now).map_err(Failure::Refused)?;
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
                "facts match the plan ({}); {} members healthy; {clocks}; {} answers",
                self.saved.fingerprint,
                members.len(),
                self.repo
            ),
            serde_json::Value::Null,
            members,
        ))
    }

    /// The clock-skew preflight over facts just read: `Err` names every
    /// member beyond `clock.max_skew`; `Ok` sums up the offsets.
    fn clock_check(&mut self, now: &facts::Facts) -> Result<String, String> {
        let (blocking, warnings) = now.clock_findings(self.plan.max_clock_skew);
        for w in warnings {
            self.progress.note(&w);
            self.warnings.push(w);
        }
        if !blocking.is_empty() {
            return Err(format!("clock skew: {}", blocking.join("; ")));
        }
        let worst = now
            .members
            .iter()
            .filter_map(|m| m.clock_offset_ms.map(|o| (o, m.name.as_str())))
            .max_by_key(|(o, _)| o.abs());
        Ok(match worst {
            Some((o, name)) => format!(
                "clocks within {} (largest offset: {name}, {})",
                crate::plan::health::human_duration(self.plan.max_clock_skew),
                facts::show_offset(o)
            ),
            None => "no clock could be read".into(),
        })
    }

    /// The preflight of a resumed run whose steps already moved members:
    /// every member no started step touched must still run the version it
    /// was planned at, the datastore and the repository must answer, and
    /// every clock must be within the skew. A failure stops the run before
    /// it changes anything more.
    pub(super) async fn preflight_resumed(&mut self) -> StepResult {
        let members = facts::read_members(&self.plan, self.executor.as_ref(), 0)
            .await
            .map_err(|e| Failure::Blocked(format!("cannot read the fleet: {e}")))?;
        let mut changed = Vec::new();
        for m in &members {
            if self.touched(&m.name).is_some() {
                continue;
            }
            let planned = self.saved.original_version(&m.name).unwrap_or("");
            if m.version != planned {
                changed.push(format!(
                    "{} {}: planned at {planned}, now runs {} (and no step of this plan moved it)",
                    m.role.as_str(),
                    m.name,
                    m.version
                ));
            }
        }
        if !changed.is_empty() {
            return Err(Failure::Blocked(format!(
                "the fleet changed outside this plan: {}",
                changed.join("; ")
            )));
        }
        let now = facts::Facts {
            datastore: self.saved.facts.datastore.clone(),
            members,
        };
        let clocks = self.clock_check(&now).map_err(Failure::Blocked)?;
        let ds = facts::read_datastore(&self.plan)
            .await
            .map_err(|e| Failure::Blocked(format!("the datastore does not answer: {e}")))?;
        self.repo
            .list(crate::store::keys::SNAPSHOTS)
            .await
            .map_err(|e| Failure::Blocked(format!("the repository does not answer: {e}")))?;
        Ok((
            format!(
                "resumed: members this plan did not move still run their planned versions; datastore shows {}; {clocks}; {} answers",
                show_row(ds.row.as_ref()),
                self.repo
            ),
            serde_json::Value::Null,
            Vec::new(),
        ))
    }

    /// Before a server moves to `to`: the agents a tolerated batch failure
    /// left behind must still be inside SPIRE's skew with the servers as
    /// they will be, read live (an operator may have moved them since).
    pub(super) async fn check_left_behind(
        &self,
        server: &Member,
        to: &Version,
    ) -> Result<(), String> {
        if self.left_behind.is_empty() {
            return Ok(());
        }
        let mut servers = Vec::new();
        for s in &self.plan.servers {
            let v = if s.name == server.name {
                to.clone()
            } else {
                match self.touched(&s.name) {
                    Some(v) => v,
                    None => ver(self.saved.original_version(&s.name).unwrap_or(""))
                        .map_err(|e| e.to_string())?,
                }
            };
            servers.push(v);
        }
        let mut outside = Vec::new();
        for name in &self.left_behind {
            let Some(m) = self.plan.member(name) else {
                continue;
            };
            match self.executor.version(m).await {
                Ok(v) if agent_supported(&v, &servers) => {}
                Ok(v) => outside.push(format!("{name} runs {v}")),
                Err(e) => outside.push(format!("{name}: version unknown ({e})")),
            }
        }
        if outside.is_empty() {
            return Ok(());
        }
        Err(format!(
            "agents left behind by a tolerated batch failure would be outside SPIRE's skew once {} runs {to} (an agent may be at most one minor older than the oldest server): {}",
            server.name,
            outside.join(", ")
        ))
    }

    pub(super) async fn snapshot(&mut self, reconcile: bool) -> StepResult {
        let (manifest, detail) = snapshots::take_pre_upgrade(
            &self.plan,
            &self.repo,
            &self.saved.plan_id,
            reconcile.then_some(self.saved.created_at),
            self.signals.clone(),
        )
        .await
        .map_err(|e| {
            Failure::Refused(format!(
                "pre-upgrade snapshot failed, nothing was changed: {e}"
            ))
        })?;
        let id = manifest.snapshot_id.to_string();
        self.snapshot_id = Some(id.clone());
        // The rehearsal, when the plan asks for it: the first hop's release
        // must accept this very snapshot before anything changes.
        let mut detail = detail;
        if let Some(first) = self.saved.hops.first() {
            match snapshots::rehearse_first_hop(
                &self.plan,
                &self.repo,
                &manifest.snapshot_id,
                &first.to,
            )
            .await
            {
                Ok(Some(rehearsed)) => detail = format!("{detail}; {rehearsed}"),
                Ok(None) => {}
                Err(why) => {
                    return Err(Failure::Refused(format!("{why}; nothing was changed")));
                }
            }
        }
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

    pub(super) async fn datastore_gate(
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

    pub(super) async fn agent_batch(
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
            for r in &results {
                self.left_behind.remove(&r.name);
            }
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
            for (i, r) in results.iter().enumerate() {
                if failed.contains(&i) {
                    self.left_behind.insert(r.name.clone());
                } else {
                    self.left_behind.remove(&r.name);
                }
            }
            let left: Vec<&str> = failed.iter().map(|i| results[*i].name.as_str()).collect();
            self.warnings.push(format!(
                "{failures} of {size} agents in a batch failed, within max_failure_ratio {max_failure_ratio}; they were returned to their previous version and left behind: {}",
                describe(&failed)
            ));
            return Ok((
                format!(
                    "{} of {size} run {to}; {failures} failed and went back (within max_failure_ratio {max_failure_ratio})",
                    size - failed.len()
                ),
                serde_json::json!({ "left_behind": left }),
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

    pub(super) async fn post_check(
        &mut self,
        target: &str,
        expect: Option<&MigrationRow>,
    ) -> StepResult {
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
        let vars = crate::plan::template::Vars::new().with("version", target);
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
    pub(super) fn expected_versions(&self) -> BTreeMap<String, String> {
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

    pub(super) async fn gates(&self, m: &Member, version: Option<&Version>) -> Vec<GateResult> {
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
    pub(super) async fn move_member(
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
    pub(super) async fn check_member(&self, m: &Member, to: &Version, report: &mut MemberReport) {
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
}
