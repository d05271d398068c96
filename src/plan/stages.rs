//! From facts to stages: the path through SPIRE's releases comes from
//! [`crate::compat`] (every intermediate release, SPIRE's start-up rules at
//! every hop, the agents the skew policy makes move); this module turns it
//! into steps for the plan's members and checks SPIRE's skew after every one
//! of them.
//!
//! Order (spire-reference §5): on an upgrade, servers one at a time, then a
//! datastore gate, then the agents that must catch up before the next server
//! hop (and, after the last hop, every agent) in batches; on a downgrade,
//! agents first, then servers. A plan file that asks for the other order is
//! refused with the rule it breaks, unless the override is given.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use semver::Version;
use time::OffsetDateTime;

use super::facts::{Facts, show_row};
use super::file::{Order, Plan, PlanFile, Role};
use super::model::{
    BatchMember, Direction, HopSummary, Overrides, PRE_UPGRADE_LABEL, SAVED_PLAN_FORMAT, SavedPlan,
    SkewNote, Step, StepKind,
};
use crate::compat::version::precedence;
use crate::compat::{
    self, AgentCount, CheckInput, HopKind, MigrationRow, Path, StartupOutcome, Verdict,
    agent_supported, servers_within_skew,
};

/// Why no plan could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StagesError {
    /// SPIRE's rules (or the documented policy) do not allow it; the lines
    /// say why and what to do.
    #[error("{}", .0.join("; "))]
    Refused(Vec<String>),
    /// The facts or the plan file are not usable.
    #[error("{0}")]
    Invalid(String),
}

/// What `plan` was told besides the file.
#[derive(Debug, Clone, Copy, Default)]
pub struct StageOptions {
    pub overrides: Overrides,
}

/// The rule behind "servers first" (spire-reference §5).
pub const SERVERS_FIRST_RULE: &str = "SPIRE's upgrade guide (doc/upgrading.md, \"Managing Upgrades/Downgrades\"): \"SPIRE Servers must be upgraded before SPIRE Agents\"; an agent may be at most one minor version older than the oldest server and never newer";

/// The rule behind "agents first" on the way down.
pub const AGENTS_FIRST_RULE: &str = "SPIRE's upgrade guide (doc/upgrading.md): when downgrading it is \"necessary to first downgrade agents before downgrading servers\"; an agent is never supported newer than the oldest server";

fn v(s: &str) -> Result<Version, StagesError> {
    Version::parse(s).map_err(|e| StagesError::Invalid(format!("{s:?} is not a version: {e}")))
}

/// Computes the saved plan.
///
/// # Errors
/// [`StagesError::Refused`] when SPIRE's rules forbid the move (with the
/// findings of `check` and their ways out) or the plan file asks for an
/// order that breaks them without the override; [`StagesError::Invalid`]
/// for unusable facts.
pub fn compute(
    plan: &Plan,
    file: &PlanFile,
    source: &str,
    facts: &Facts,
    options: StageOptions,
    now: OffsetDateTime,
) -> Result<SavedPlan, StagesError> {
    let mut versions: BTreeMap<String, Version> = BTreeMap::new();
    for m in &facts.members {
        versions.insert(m.name.clone(), v(&m.version)?);
    }
    let version_of = |name: &str| versions.get(name).cloned();
    let server_versions: Vec<String> = plan
        .servers
        .iter()
        .filter_map(|m| version_of(&m.name).map(|v| v.to_string()))
        .collect();
    let mut agent_counts: Vec<AgentCount> = Vec::new();
    for m in plan.agents.iter().flat_map(|g| &g.members) {
        let Some(ver) = version_of(&m.name) else {
            continue;
        };
        let ver = ver.to_string();
        match agent_counts.iter_mut().find(|a| a.version == ver) {
            Some(a) => a.count += 1,
            None => agent_counts.push(AgentCount {
                version: ver,
                count: 1,
            }),
        }
    }

    let row = facts.datastore.row.clone();
    if row.is_none() {
        return Err(StagesError::Invalid(format!(
            "the datastore at {} has no migrations row: SPIRE has not initialised it, so there is nothing to upgrade",
            facts.datastore.location
        )));
    }
    let report = compat::check(&CheckInput {
        target: plan.target.to_string(),
        datastore: row.clone(),
        disable_migration: facts.datastore.disable_migration,
        servers: server_versions,
        agents: agent_counts,
        allow: plan.allow.clone(),
    })
    .map_err(|e| StagesError::Invalid(e.to_string()))?;
    if report.verdict == Verdict::Refused {
        let lines = report
            .findings
            .iter()
            .filter(|f| !f.allowed)
            .map(|f| {
                format!(
                    "{} [{}]: {} (way out: {})",
                    f.code,
                    severity(f.severity),
                    f.message,
                    f.way_out
                )
            })
            .collect();
        return Err(StagesError::Refused(lines));
    }
    let path = report.path.clone().ok_or_else(|| {
        StagesError::Invalid("compat found no path although it did not refuse".into())
    })?;
    let mut warnings: Vec<String> = report
        .findings
        .iter()
        .filter(|f| f.allowed)
        .map(|f| format!("allowed {}: {}", f.code, f.message))
        .collect();
    warnings.extend(report.notes.iter().cloned());
    if let Some(hop) = path
        .hops
        .iter()
        .find(|h| matches!(h.kind, HopKind::MigrateInPlace | HopKind::Install))
    {
        return Err(StagesError::Refused(vec![format!(
            "the datastore ({}) is behind the servers' own release {}: SPIRE migrates it when a server starts with disable_migration = false; set that, restart one server, then plan again",
            show_row(row.as_ref()),
            hop.to
        )]));
    }

    let direction = match path.direction {
        compat::Direction::Upgrade => Direction::Upgrade,
        compat::Direction::Downgrade => Direction::Downgrade,
        compat::Direction::AtTarget => Direction::AtTarget,
        compat::Direction::Install => {
            return Err(StagesError::Invalid(
                "a fresh datastore needs no upgrade".into(),
            ));
        }
    };

    // Which order, and is it allowed?
    let agents_first = match (direction, plan.order) {
        (Direction::Upgrade, Order::AgentsFirst) => {
            if !options.overrides.agents_first {
                return Err(StagesError::Refused(vec![format!(
                    "the plan file asks for order = \"agents-first\" on an upgrade to {}, which breaks {SERVERS_FIRST_RULE}: moving agents before the servers makes them newer than every server. Set order = \"auto\" (servers first), or accept the risk with --allow-agents-first",
                    plan.target
                )]));
            }
            true
        }
        (Direction::Downgrade, Order::ServersFirst) => {
            if !options.overrides.servers_first {
                return Err(StagesError::Refused(vec![format!(
                    "the plan file asks for order = \"servers-first\" on a downgrade to {}, which breaks {AGENTS_FIRST_RULE}: the agents would be newer than the servers. Set order = \"auto\" (agents first), or accept the risk with --allow-servers-first",
                    plan.target
                )]));
            }
            false
        }
        (Direction::Downgrade, _) => true,
        _ => false,
    };

    let mut b = Builder {
        plan,
        versions,
        steps: Vec::new(),
        skew: Vec::new(),
        overridden: options.overrides.agents_first || options.overrides.servers_first,
    };
    b.push(
        "preflight".into(),
        None,
        "preflight: the facts are unchanged since the plan, every member passes its gates, the repository answers".into(),
        StepKind::Preflight,
    );
    b.push(
        "snapshot".into(),
        None,
        format!(
            "pre-upgrade snapshot of {} into {}: backup (label {PRE_UPGRADE_LABEL}), verify every object, pin it until the plan finishes",
            facts.datastore.location, plan.repository
        ),
        StepKind::Snapshot {
            labels: vec![PRE_UPGRADE_LABEL.into()],
        },
    );

    let mut hops = Vec::new();
    let n = path.hops.len();
    for (i, hop) in path.hops.iter().enumerate() {
        let index = i + 1;
        let from = hop
            .from
            .as_ref()
            .map_or_else(|| "?".into(), ToString::to_string);
        hops.push(HopSummary {
            index,
            from: from.clone(),
            to: hop.to.to_string(),
            row_after: hop.startup.row_after().cloned(),
            startup: describe_startup(&hop.startup),
        });
        if agents_first {
            // Downgrade (SPIRE's order) or an overridden upgrade: agents first.
            let to = hop.to.clone();
            let movers = if direction == Direction::Downgrade {
                hop.agents_before.as_ref().map(|m| m.to.clone())
            } else {
                Some(to.clone())
            };
            if let Some(target) = movers {
                b.agents(index, &target, |ver| {
                    precedence(ver, &target) != Ordering::Equal
                        && (direction == Direction::Upgrade
                            || precedence(ver, &target) == Ordering::Greater)
                });
            }
            b.servers(index, &hop.to, hop.startup.row_after().cloned());
        } else {
            if index == 1
                && let Some(m) = &hop.agents_before
            {
                // agents already out of skew catch up first
                let to = m.to.clone();
                let next = hop.to.clone();
                b.agents(index, &to, |ver| {
                    !agent_supported(ver, std::slice::from_ref(&next))
                        && precedence(ver, &to) == Ordering::Less
                });
            }
            b.servers(index, &hop.to, hop.startup.row_after().cloned());
            if direction == Direction::Downgrade {
                // servers first on a downgrade (overridden): then the agents
                if let Some(m) = &hop.agents_before {
                    let to = m.to.clone();
                    b.agents(index, &to, |ver| precedence(ver, &to) == Ordering::Greater);
                }
            } else if index < n {
                if let Some(m) = &path.hops[index].agents_before {
                    let to = m.to.clone();
                    let next = path.hops[index].to.clone();
                    b.agents(index, &to, |ver| {
                        !agent_supported(ver, std::slice::from_ref(&next))
                            && precedence(ver, &to) == Ordering::Less
                    });
                }
            } else if let Some(m) = &path.agents_last {
                let to = m.to.clone();
                b.agents(index, &to, |ver| precedence(ver, &to) == Ordering::Less);
            }
        }
    }
    if n == 0 {
        // servers at the target: agents may still need to follow
        if let Some(m) = &path.agents_last {
            let to = m.to.clone();
            b.agents(0, &to, |ver| precedence(ver, &to) == Ordering::Less);
        }
    }
    let expect = path_row_after(&path, row.as_ref());
    b.push(
        "postcheck".into(),
        None,
        format!(
            "post-checks: every member reports {} and passes its gates, the datastore shows {}{}",
            plan.target,
            show_row(expect.as_ref()),
            if plan.post_checks.is_empty() {
                String::new()
            } else {
                format!(", {} post-check gate(s)", plan.post_checks.len())
            }
        ),
        StepKind::PostCheck {
            target: plan.target.to_string(),
            expect,
        },
    );
    b.push(
        "finish".into(),
        None,
        "finish: release the pre-upgrade snapshot's pin (the snapshot stays, under retention)"
            .into(),
        StepKind::Finish,
    );

    // Members the plan does not manage.
    let managed_agents: u64 = plan
        .agents
        .iter()
        .map(|g| u64::try_from(g.members.len()).unwrap_or(u64::MAX))
        .sum();
    if facts.datastore.agents_total > managed_agents {
        warnings.push(format!(
            "the datastore knows {} attested agents and the plan manages {managed_agents}: the others are not moved and may end outside SPIRE's skew (an agent may be at most one minor older than the oldest server)",
            facts.datastore.agents_total
        ));
    }
    for m in &facts.members {
        if !m.healthy() {
            let failed: Vec<&str> = m
                .health
                .iter()
                .filter(|g| !g.ok)
                .map(|g| g.detail.as_str())
                .collect();
            warnings.push(format!(
                "{} {} fails its gates now ({}); apply's preflight will refuse until it passes",
                m.role.as_str(),
                m.name,
                failed.join("; ")
            ));
        }
    }
    let unmet = b.skew.iter().any(|s| !s.message.is_empty()) && !b.overridden;
    if unmet {
        return Err(StagesError::Refused(
            b.skew
                .iter()
                .map(|s| format!("after {}: {}", s.after_step, s.message))
                .collect(),
        ));
    }

    let fingerprint = facts.fingerprint();
    Ok(SavedPlan {
        format_version: SAVED_PLAN_FORMAT,
        plan_id: format!("{}-{}", plan.name, compact(now)),
        created_at: now,
        spirekeep_version: env!("CARGO_PKG_VERSION").into(),
        source: source.into(),
        file: file.clone(),
        facts: facts.clone(),
        fingerprint,
        target: plan.target.to_string(),
        direction,
        hops,
        steps: b.steps,
        overrides: options.overrides,
        skew: b.skew,
        warnings,
    })
}

fn severity(s: compat::Severity) -> &'static str {
    match s {
        compat::Severity::Mandatory => "mandatory",
        compat::Severity::Skippable => "skippable, not allowed",
    }
}

fn path_row_after(path: &Path, start: Option<&MigrationRow>) -> Option<MigrationRow> {
    path.row_after(start).cloned()
}

/// SPIRE's start-up outcome in words.
#[must_use]
pub fn describe_startup(o: &StartupOutcome) -> String {
    match o {
        StartupOutcome::Migrated { from_schema, row } => format!(
            "migrates the schema {from_schema} → {} and writes code_version {}",
            row.schema, row.code_version
        ),
        StartupOutcome::UpToDate {
            row,
            code_version_bumped: true,
        } => format!(
            "schema {} unchanged, code_version raised to {}",
            row.schema, row.code_version
        ),
        StartupOutcome::UpToDate { row, .. } => format!(
            "schema {} and code_version {} unchanged",
            row.schema, row.code_version
        ),
        StartupOutcome::SchemaAhead { row } => format!(
            "runs on the newer schema {} (\"{}\"); the row stays ({}, {})",
            row.schema,
            compat::SCHEMA_AHEAD_WARNING,
            row.schema,
            row.code_version
        ),
        StartupOutcome::StartedWithoutMigrating { row } => {
            format!(
                "starts without migrating (disable_migration); the row stays ({}, {})",
                row.schema, row.code_version
            )
        }
        StartupOutcome::Initialized { row } => format!("initialises schema {}", row.schema),
        StartupOutcome::Refused { refusal, .. } => format!("refuses to start: {refusal}"),
    }
}

fn compact(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

struct Builder<'a> {
    plan: &'a Plan,
    versions: BTreeMap<String, Version>,
    steps: Vec<Step>,
    skew: Vec<SkewNote>,
    overridden: bool,
}

impl Builder<'_> {
    fn push(&mut self, id: String, hop: Option<usize>, title: String, kind: StepKind) {
        self.steps.push(Step {
            id,
            hop,
            title,
            kind,
        });
    }

    fn hop_prefix(index: usize) -> String {
        if index == 0 {
            "catchup".into()
        } else {
            format!("hop{index}")
        }
    }

    /// Servers one at a time, then the datastore gate.
    fn servers(&mut self, index: usize, to: &Version, row_after: Option<MigrationRow>) {
        let servers: Vec<_> = self.plan.servers.clone();
        for m in &servers {
            let from = self.versions[&m.name].clone();
            if precedence(&from, to) == Ordering::Equal {
                continue;
            }
            self.versions.insert(m.name.clone(), to.clone());
            let id = format!("{}.server.{}", Self::hop_prefix(index), m.name);
            self.push(
                id.clone(),
                Some(index),
                format!("hop {index}: server {} {from} → {to}", m.name),
                StepKind::Server {
                    member: m.name.clone(),
                    from: from.to_string(),
                    to: to.to_string(),
                },
            );
            self.check_skew(&id);
        }
        if let Some(expect) = row_after {
            self.push(
                format!("{}.datastore", Self::hop_prefix(index)),
                Some(index),
                format!(
                    "hop {index}: datastore gate: the migrations row is (schema {}, code_version {})",
                    expect.schema, expect.code_version
                ),
                StepKind::DatastoreGate { expect },
            );
        }
    }

    /// The agents `moves` selects, group by group, in batches, to `to`.
    fn agents(&mut self, index: usize, to: &Version, moves: impl Fn(&Version) -> bool) {
        for group in &self.plan.agents {
            let movers: Vec<BatchMember> = group
                .members
                .iter()
                .filter(|m| moves(&self.versions[&m.name]))
                .map(|m| BatchMember {
                    name: m.name.clone(),
                    from: self.versions[&m.name].to_string(),
                })
                .collect();
            let batches = group.batch.split(movers.len());
            let count = batches.len();
            for (bi, range) in batches.into_iter().enumerate() {
                let members = movers[range].to_vec();
                for m in &members {
                    self.versions.insert(m.name.clone(), to.clone());
                }
                let id = format!(
                    "{}.agents.{}.batch{}",
                    Self::hop_prefix(index),
                    group.name,
                    bi + 1
                );
                let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
                let title = if index == 0 {
                    format!(
                        "agents {} batch {}/{count} ({}) → {to}",
                        group.name,
                        bi + 1,
                        names.join(", ")
                    )
                } else {
                    format!(
                        "hop {index}: agents {} batch {}/{count} ({}) → {to}",
                        group.name,
                        bi + 1,
                        names.join(", ")
                    )
                };
                self.push(
                    id.clone(),
                    (index > 0).then_some(index),
                    title,
                    StepKind::AgentBatch {
                        group: group.name.clone(),
                        batch: bi + 1,
                        batches: count,
                        members,
                        to: to.to_string(),
                        max_failure_ratio: group.max_failure_ratio,
                    },
                );
                self.check_skew(&id);
            }
        }
    }

    /// SPIRE's skew rules (§5) over the simulated fleet after a step.
    fn check_skew(&mut self, after: &str) {
        let servers: Vec<Version> = self
            .plan
            .servers
            .iter()
            .map(|m| self.versions[&m.name].clone())
            .collect();
        let mut problems = Vec::new();
        if !servers_within_skew(&servers) {
            problems.push(format!(
                "servers run {} (more than one minor apart; SPIRE supports ±1 minor between servers)",
                join(&servers)
            ));
        }
        let mut bad: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        for m in self.plan.members().filter(|m| m.role == Role::Agent) {
            let ver = &self.versions[&m.name];
            if !agent_supported(ver, &servers) {
                bad.entry(ver.to_string()).or_default().push(&m.name);
            }
        }
        for (ver, names) in bad {
            problems.push(format!(
                "agents {} run {ver} while the servers run {}: outside SPIRE's skew (an agent may be at most one minor older than the oldest server and never newer)",
                names.join(", "),
                join(&servers)
            ));
        }
        for p in problems {
            self.skew.push(SkewNote {
                after_step: after.into(),
                message: p,
            });
        }
    }
}

fn join(vs: &[Version]) -> String {
    let mut s: Vec<String> = vs.iter().map(ToString::to_string).collect();
    s.dedup();
    s.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::Engine;
    use crate::plan::facts::{DatastoreFacts, MemberFacts};
    use crate::plan::file::parse;

    fn plan_text(target: &str, order: &str) -> String {
        format!(
            r#"
format = 1
name = "t"
target = "{target}"
order = "{order}"
[datastore]
connection_string = "/tmp/x.sqlite3"
[repository]
url = "file:///tmp/repo"
[executor]
kind = "command"
[executor.commands]
version = "v {{name}}"
upgrade = "u {{name}} {{version}}"
rollback = "r {{name}} {{version}}"
stop = "s {{name}}"
start = "g {{name}}"
[servers]
members = [{{ name = "s1" }}, {{ name = "s2" }}]
[[agents]]
name = "nodes"
batch = 2
members = [{{ name = "a1" }}, {{ name = "a2" }}, {{ name = "a3" }}]
"#
        )
    }

    fn facts(row: (i64, &str), servers: &str, agents: &str) -> Facts {
        let mut members = Vec::new();
        for (n, v) in [("s1", servers), ("s2", servers)] {
            members.push(MemberFacts {
                name: n.into(),
                role: Role::Server,
                group: "servers".into(),
                version: v.into(),
                health: vec![],
                clock_offset_ms: None,
                clock_error: None,
            });
        }
        for n in ["a1", "a2", "a3"] {
            members.push(MemberFacts {
                name: n.into(),
                role: Role::Agent,
                group: "nodes".into(),
                version: agents.into(),
                health: vec![],
                clock_offset_ms: None,
                clock_error: None,
            });
        }
        Facts {
            datastore: DatastoreFacts {
                location: "/tmp/x.sqlite3".into(),
                engine: Engine::Sqlite,
                row: Some(MigrationRow::new(row.0, row.1)),
                agents: None,
                agents_total: 3,
                disable_migration: false,
            },
            members,
        }
    }

    fn run(
        target: &str,
        order: &str,
        f: &Facts,
        overrides: Overrides,
    ) -> Result<SavedPlan, StagesError> {
        let pf = parse(&plan_text(target, order)).unwrap();
        let plan = pf.validate().unwrap();
        compute(
            &plan,
            &pf,
            "t.toml",
            f,
            StageOptions { overrides },
            OffsetDateTime::UNIX_EPOCH,
        )
    }

    fn ids(p: &SavedPlan) -> Vec<&str> {
        p.steps.iter().map(|s| s.id.as_str()).collect()
    }

    #[test]
    fn multi_hop_upgrade_servers_then_datastore_then_agents() {
        let p = run(
            "1.14.7",
            "auto",
            &facts((23, "1.12.6"), "1.12.6", "1.12.6"),
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(p.direction, Direction::Upgrade);
        assert_eq!(
            p.hops.iter().map(|h| h.to.as_str()).collect::<Vec<_>>(),
            ["1.13.6", "1.14.7"]
        );
        assert_eq!(
            ids(&p),
            [
                "preflight",
                "snapshot",
                "hop1.server.s1",
                "hop1.server.s2",
                "hop1.datastore",
                "hop1.agents.nodes.batch1",
                "hop1.agents.nodes.batch2",
                "hop2.server.s1",
                "hop2.server.s2",
                "hop2.datastore",
                "hop2.agents.nodes.batch1",
                "hop2.agents.nodes.batch2",
                "postcheck",
                "finish"
            ]
        );
        assert_eq!(
            p.step("hop2.datastore").unwrap().kind,
            StepKind::DatastoreGate {
                expect: MigrationRow::new(24, "1.14.7")
            }
        );
        match &p.step("hop1.agents.nodes.batch2").unwrap().kind {
            StepKind::AgentBatch {
                members,
                to,
                batch,
                batches,
                ..
            } => {
                assert_eq!((to.as_str(), *batch, *batches), ("1.13.6", 2, 2));
                assert_eq!(
                    members,
                    &[BatchMember {
                        name: "a3".into(),
                        from: "1.12.6".into()
                    }]
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(p.skew.is_empty(), "{:?}", p.skew);
        assert_eq!(p.plan_id, "t-19700101T000000Z");
        assert!(p.fingerprint.starts_with("sha256:"));
    }

    #[test]
    fn agents_first_upgrade_is_refused_without_the_override() {
        let f = facts((23, "1.13.6"), "1.13.6", "1.13.6");
        let Err(StagesError::Refused(lines)) =
            run("1.14.7", "agents-first", &f, Overrides::default())
        else {
            panic!("accepted")
        };
        assert!(
            lines[0].contains("SPIRE Servers must be upgraded before SPIRE Agents"),
            "{lines:?}"
        );
        assert!(lines[0].contains("--allow-agents-first"), "{lines:?}");
        let p = run(
            "1.14.7",
            "agents-first",
            &f,
            Overrides {
                agents_first: true,
                servers_first: false,
            },
        )
        .unwrap();
        assert_eq!(
            ids(&p)[2..5],
            [
                "hop1.agents.nodes.batch1",
                "hop1.agents.nodes.batch2",
                "hop1.server.s1"
            ]
        );
        assert!(
            !p.skew.is_empty() && p.skew[0].message.contains("never newer"),
            "{:?}",
            p.skew
        );
    }

    #[test]
    fn downgrade_moves_agents_first() {
        let f = facts((25, "1.15.3"), "1.15.3", "1.15.3");
        let p = run("1.14.7", "auto", &f, Overrides::default()).unwrap();
        assert_eq!(p.direction, Direction::Downgrade);
        assert_eq!(
            ids(&p),
            [
                "preflight",
                "snapshot",
                "hop1.agents.nodes.batch1",
                "hop1.agents.nodes.batch2",
                "hop1.server.s1",
                "hop1.server.s2",
                "hop1.datastore",
                "postcheck",
                "finish"
            ]
        );
        // SPIRE never lowers code_version: the row stays
        assert_eq!(
            p.step("hop1.datastore").unwrap().kind,
            StepKind::DatastoreGate {
                expect: MigrationRow::new(25, "1.15.3")
            }
        );
        assert!(p.skew.is_empty(), "{:?}", p.skew);
        let Err(StagesError::Refused(lines)) =
            run("1.14.7", "servers-first", &f, Overrides::default())
        else {
            panic!("accepted")
        };
        assert!(
            lines[0].contains("first downgrade agents before downgrading servers"),
            "{lines:?}"
        );
        // two minors down is refused by SPIRE itself
        let Err(StagesError::Refused(lines)) = run("1.13.6", "auto", &f, Overrides::default())
        else {
            panic!("accepted")
        };
        assert!(lines.iter().any(|l| l.contains("downgrade")), "{lines:?}");
    }

    #[test]
    fn at_target_servers_with_agents_behind() {
        let f = facts((25, "1.15.3"), "1.15.3", "1.14.7");
        let p = run("1.15.3", "auto", &f, Overrides::default()).unwrap();
        assert_eq!(p.direction, Direction::AtTarget);
        assert_eq!(
            ids(&p),
            [
                "preflight",
                "snapshot",
                "catchup.agents.nodes.batch1",
                "catchup.agents.nodes.batch2",
                "postcheck",
                "finish"
            ]
        );
    }
}
