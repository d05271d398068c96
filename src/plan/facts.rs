//! Live facts a plan is made from, and their fingerprint.
//!
//! The facts are what SPIRE's rules depend on: the datastore's `migrations`
//! row, the agents the datastore knows by reported version, and the version
//! each member runs (read through the executor). Health is read too, but it
//! is not part of the fingerprint: a plan is stale when the versions or the
//! datastore changed, not when a gate flapped.

use serde::{Deserialize, Serialize};

use super::executor::Executor;
use super::file::{Plan, Role};
use super::health::{GateResult, run_gate_attempts};
use crate::compat::{AgentCount, MigrationRow};
use crate::config::resolve_datastore;
use crate::datastore::{self, Datastore, Engine, OpenMode};
use crate::error::{Error, Result};
use crate::inspect::read_spire_facts;
use crate::snapshot::codec::sha256_hex;

/// What the datastore says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatastoreFacts {
    /// Where it is, without any password.
    pub location: String,
    pub engine: Engine,
    /// The `migrations` row; `None` for a datastore SPIRE has not initialised.
    pub row: Option<MigrationRow>,
    /// Attested agents by `agent_version` (empty string: not reported);
    /// `None` before schema 24, which has no such column.
    pub agents: Option<Vec<AgentCount>>,
    /// Every attested agent.
    pub agents_total: u64,
    /// `disable_migration` from server.conf.
    pub disable_migration: bool,
}

/// What one member says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberFacts {
    pub name: String,
    pub role: Role,
    pub group: String,
    /// The version it reports.
    pub version: String,
    /// Its gates, one attempt each (not fingerprinted).
    #[serde(default)]
    pub health: Vec<GateResult>,
    /// Its host's clock minus spirekeep's, in milliseconds, read through
    /// the executor (not fingerprinted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_offset_ms: Option<i64>,
    /// Why the clock could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_error: Option<String>,
}

impl MemberFacts {
    /// Whether every gate passed.
    #[must_use]
    pub fn healthy(&self) -> bool {
        self.health.iter().all(|g| g.ok)
    }
}

/// Everything a plan is made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Facts {
    pub datastore: DatastoreFacts,
    pub members: Vec<MemberFacts>,
}

impl Facts {
    /// `sha256:<hex>` over the datastore facts and every member's version.
    #[must_use]
    pub fn fingerprint(&self) -> String {
        #[derive(Serialize)]
        struct Stable<'a> {
            datastore: &'a DatastoreFacts,
            members: Vec<(&'a str, &'a str)>,
        }
        let stable = Stable {
            datastore: &self.datastore,
            members: self
                .members
                .iter()
                .map(|m| (m.name.as_str(), m.version.as_str()))
                .collect(),
        };
        let json = serde_json::to_vec(&stable).unwrap_or_default();
        format!("sha256:{}", sha256_hex(&json))
    }

    /// The clock-skew findings: one line per member whose clock is further
    /// than `max_skew` from spirekeep's (blocking), and one per member whose
    /// clock could not be read (a warning: some images have no `date`).
    #[must_use]
    pub fn clock_findings(&self, max_skew: std::time::Duration) -> (Vec<String>, Vec<String>) {
        let limit = i64::try_from(max_skew.as_millis()).unwrap_or(i64::MAX);
        let mut blocking = Vec::new();
        let mut warnings = Vec::new();
        for m in &self.members {
            match (m.clock_offset_ms, &m.clock_error) {
                (Some(off), _) if off.abs() > limit => blocking.push(format!(
                    "{} {}: its clock is {} spirekeep's, more than the {} allowed (clock.max_skew; SVIDs are time-bound): fix the host's time sync (NTP) before upgrading",
                    m.role.as_str(),
                    m.name,
                    show_offset(off),
                    crate::plan::health::human_duration(max_skew)
                )),
                (None, Some(e)) => warnings.push(format!(
                    "{} {}: its clock could not be read, so its skew is unknown: {e}",
                    m.role.as_str(),
                    m.name
                )),
                _ => {}
            }
        }
        (blocking, warnings)
    }

    /// What changed between `self` (the plan's) and `now`, one line each.
    #[must_use]
    pub fn differences(&self, now: &Self) -> Vec<String> {
        let mut out = Vec::new();
        let (a, b) = (&self.datastore, &now.datastore);
        if a.location != b.location || a.engine != b.engine {
            out.push(format!(
                "datastore: planned for {}, now {}",
                a.location, b.location
            ));
        }
        if a.row != b.row {
            out.push(format!(
                "migrations row: planned at {}, now {}",
                show_row(a.row.as_ref()),
                show_row(b.row.as_ref())
            ));
        }
        if a.agents != b.agents || a.agents_total != b.agents_total {
            out.push(format!(
                "agents in the datastore: planned with {} ({}), now {} ({})",
                a.agents_total,
                show_agents(a.agents.as_deref()),
                b.agents_total,
                show_agents(b.agents.as_deref())
            ));
        }
        if a.disable_migration != b.disable_migration {
            out.push(format!(
                "disable_migration: planned {}, now {}",
                a.disable_migration, b.disable_migration
            ));
        }
        for m in &self.members {
            match now.members.iter().find(|n| n.name == m.name) {
                Some(n) if n.version != m.version => out.push(format!(
                    "{} {}: planned at {}, now runs {}",
                    m.role.as_str(),
                    m.name,
                    m.version,
                    n.version
                )),
                Some(_) => {}
                None => out.push(format!("{} {}: no longer read", m.role.as_str(), m.name)),
            }
        }
        out
    }
}

/// `2.0 s ahead of` / `1.5 s behind`.
#[must_use]
pub fn show_offset(ms: i64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let secs = ms.unsigned_abs() as f64 / 1000.0;
    if ms >= 0 {
        format!("{secs:.1} s ahead of")
    } else {
        format!("{secs:.1} s behind")
    }
}

/// `(23, 1.13.6)`.
#[must_use]
pub fn show_row(row: Option<&MigrationRow>) -> String {
    row.map_or_else(
        || "no migrations row".into(),
        |r| format!("(schema {}, code_version {:?})", r.schema, r.code_version),
    )
}

fn show_agents(agents: Option<&[AgentCount]>) -> String {
    match agents {
        None => "versions not recorded before schema 24".into(),
        Some([]) => "none".into(),
        Some(list) => list
            .iter()
            .map(|a| {
                let v = if a.version.is_empty() {
                    "unreported"
                } else {
                    &a.version
                };
                format!("{v}: {}", a.count)
            })
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// Opens the plan's datastore (read-only, or read-write for a restore).
///
/// # Errors
/// As [`datastore::open`], and invalid connection settings.
pub async fn open_datastore(plan: &Plan, mode: OpenMode) -> Result<(Box<dyn Datastore>, bool)> {
    let resolved = resolve_datastore(&plan.datastore, Some(&plan.spire_workdir))?;
    let ds = datastore::open(&resolved.spec, mode).await?;
    Ok((ds, resolved.disable_migration))
}

/// Reads the datastore facts.
///
/// # Errors
/// An unreachable datastore or one that is not SPIRE's.
pub async fn read_datastore(plan: &Plan) -> Result<DatastoreFacts> {
    let (ds, disable_migration) = open_datastore(plan, OpenMode::ReadOnly).await?;
    let result = read_datastore_from(ds.as_ref(), disable_migration).await;
    ds.close().await;
    result
}

/// Reads the datastore facts from an open datastore.
///
/// # Errors
/// Database errors, or a database that is not a SPIRE datastore.
pub async fn read_datastore_from(
    ds: &dyn Datastore,
    disable_migration: bool,
) -> Result<DatastoreFacts> {
    // The one reading `check` and `inspect` share: an empty or missing
    // `migrations` table is no row; NULL and empty agent versions are one group.
    let catalogue = ds.catalogue().await?;
    let facts = read_spire_facts(ds, &catalogue).await?;
    let row = facts.row().cloned();
    let (agents, agents_total) = (facts.agents, facts.agents_total);
    Ok(DatastoreFacts {
        location: ds.location().to_owned(),
        engine: ds.engine(),
        row,
        agents,
        agents_total,
        disable_migration,
    })
}

/// Reads every member's version (and, with `health_attempts > 0`, runs its
/// gates that many attempts each).
///
/// # Errors
/// A member whose version cannot be read: a plan cannot be made without it.
pub async fn read_members(
    plan: &Plan,
    executor: &dyn Executor,
    health_attempts: u32,
) -> Result<Vec<MemberFacts>> {
    let env = executor.gate_env();
    let reads = plan.members().map(|m| {
        let env = env.clone();
        async move {
            let version = executor.version(m).await.map_err(|e| {
                Error::Aborted(format!(
                    "cannot read the version {} {} runs: {e}",
                    m.role.as_str(),
                    m.name
                ))
            })?;
            let (clock_offset_ms, clock_error) = match executor.clock_offset(m).await {
                Ok(off) => (Some(off), None),
                Err(e) => (None, Some(e)),
            };
            let mut health = Vec::new();
            if health_attempts > 0 {
                let vars = m.vars(Some(&version));
                for gate in plan.gates_of(m) {
                    health.push(run_gate_attempts(gate, &vars, &env, health_attempts).await);
                }
            }
            Ok::<_, Error>(MemberFacts {
                name: m.name.clone(),
                role: m.role,
                group: m.group.clone(),
                version: version.to_string(),
                health,
                clock_offset_ms,
                clock_error,
            })
        }
    });
    futures::future::try_join_all(reads).await
}

/// Reads all facts.
///
/// # Errors
/// As [`read_datastore`] and [`read_members`].
pub async fn read(plan: &Plan, executor: &dyn Executor, health_attempts: u32) -> Result<Facts> {
    let datastore = read_datastore(plan).await?;
    let members = read_members(plan, executor, health_attempts).await?;
    Ok(Facts { datastore, members })
}
