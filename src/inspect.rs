//! `spirekeep inspect`: what is in a SPIRE datastore.
//!
//! Everything here is built from the [`Datastore`] trait, so it works the same
//! on every engine. The live catalogue is the source of truth: tables a newer
//! SPIRE adds show up as "not in SPIRE's known schema" but are still listed
//! and counted.

use serde::Serialize;

use crate::datastore::{Catalogue, Datastore, Engine, MigrationsRow, Value};
use crate::error::{Error, Result};

/// The tables SPIRE's schema 25 has (spire-reference §2.3).
pub const KNOWN_SPIRE_TABLES: [&str; 13] = [
    "attested_node_entries",
    "attested_node_entries_events",
    "bundles",
    "ca_journals",
    "dns_names",
    "federated_registration_entries",
    "federated_trust_domains",
    "join_tokens",
    "migrations",
    "node_resolver_map_entries",
    "registered_entries",
    "registered_entries_events",
    "selectors",
];

/// What `inspect` reports.
#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    /// Where the datastore is, without any password.
    pub datastore: String,
    pub engine: Engine,
    pub server_version: String,
    /// `migrations.version`; `None` when the table has no row yet.
    pub schema_version: Option<i64>,
    /// `migrations.code_version` exactly as stored.
    pub code_version: Option<String>,
    pub tables: Vec<TableSummary>,
    pub agents: AgentSummary,
    pub entries: u64,
    pub bundles: u64,
    pub join_tokens: u64,
    /// Anything an operator should know (extra migrations rows, unknown tables).
    pub notes: Vec<String>,
}

/// One table's row count.
#[derive(Debug, Clone, Serialize)]
pub struct TableSummary {
    pub name: String,
    pub rows: u64,
    /// Whether SPIRE's known schema has this table.
    pub known: bool,
}

/// Attested agents, grouped by the version they report.
#[derive(Debug, Clone, Serialize)]
pub struct AgentSummary {
    pub total: u64,
    /// `None` when the datastore predates `agent_version` (schema < 24).
    pub by_version: Option<Vec<VersionCount>>,
}

/// A number of agents reporting one version (empty: the agent did not report one).
#[derive(Debug, Clone, Serialize)]
pub struct VersionCount {
    pub version: String,
    pub count: u64,
}

/// Reads the `migrations` row the way SPIRE does: the first row by id.
///
/// # Errors
/// A database that has no `migrations` table is not a SPIRE datastore.
pub async fn read_migrations(
    ds: &dyn Datastore,
    catalogue: &Catalogue,
) -> Result<(Option<MigrationsRow>, usize)> {
    let not_spire = |why: &str| Error::NotSpire {
        location: ds.location().to_string(),
        why: why.to_string(),
    };
    if catalogue.tables.is_empty() {
        return Err(not_spire(
            "the database has no tables (a SPIRE server creates them on its first start)",
        ));
    }
    let table = catalogue
        .table("migrations")
        .ok_or_else(|| not_spire("it has no `migrations` table; point --datastore at the database SPIRE's DataStore \"sql\" uses"))?;
    let version_idx = table
        .columns
        .iter()
        .position(|c| c.name == "version")
        .ok_or_else(|| not_spire("`migrations` has no `version` column"))?;
    let code_idx = table.columns.iter().position(|c| c.name == "code_version");
    let rows = ds.read_table(table).await?;
    let count = rows.len();
    let Some(first) = rows.into_iter().next() else {
        return Ok((None, 0));
    };
    let schema_version = match &first[version_idx] {
        Value::Int(v) => *v,
        other => {
            return Err(not_spire(&format!(
                "migrations.version holds a {} value",
                other.type_name()
            )));
        }
    };
    // Schema 12 added code_version; before it, and for a NULL, SPIRE sees "".
    let code_version = match code_idx.map(|i| &first[i]) {
        Some(Value::Text(s)) => s.clone(),
        _ => String::new(),
    };
    Ok((
        Some(MigrationsRow {
            schema_version,
            code_version,
        }),
        count,
    ))
}

/// Builds the inspect report.
///
/// # Errors
/// Database errors, or a database that is not a SPIRE datastore.
pub async fn inspect(ds: &dyn Datastore) -> Result<InspectReport> {
    let server_version = ds.server_version().await?;
    let catalogue = ds.catalogue().await?;
    let (migrations, migration_rows) = read_migrations(ds, &catalogue).await?;
    let mut notes = Vec::new();
    if migration_rows > 1 {
        notes.push(format!(
            "`migrations` has {migration_rows} rows; SPIRE reads the first and updates all of them"
        ));
    }
    if migrations.is_none() {
        notes.push("`migrations` is empty: SPIRE will treat the schema as unknown".into());
    }
    let mut tables = Vec::with_capacity(catalogue.tables.len());
    for t in &catalogue.tables {
        let known = KNOWN_SPIRE_TABLES.contains(&t.name.as_str());
        if !known {
            notes.push(format!(
                "table `{}` is not in SPIRE's known schema (a newer SPIRE?); it is still captured",
                t.name
            ));
        }
        tables.push(TableSummary {
            name: t.name.clone(),
            rows: ds.count_rows(&t.name).await?,
            known,
        });
    }
    let rows_of = |name: &str| tables.iter().find(|t| t.name == name).map_or(0, |t| t.rows);
    let by_version = if catalogue.has_column("attested_node_entries", "agent_version") {
        let counts = ds
            .count_by("attested_node_entries", "agent_version")
            .await?;
        Some(
            counts
                .into_iter()
                .map(|(v, count)| VersionCount {
                    version: v.unwrap_or_default(),
                    count,
                })
                .collect(),
        )
    } else {
        None
    };
    let agents = AgentSummary {
        total: rows_of("attested_node_entries"),
        by_version,
    };
    Ok(InspectReport {
        datastore: ds.location().to_string(),
        engine: ds.engine(),
        server_version,
        schema_version: migrations.as_ref().map(|m| m.schema_version),
        code_version: migrations.map(|m| m.code_version),
        entries: rows_of("registered_entries"),
        bundles: rows_of("bundles"),
        join_tokens: rows_of("join_tokens"),
        tables,
        agents,
        notes,
    })
}

impl InspectReport {
    /// The human form: a header and an aligned table.
    #[must_use]
    pub fn render_human(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let or_dash = |o: Option<String>| o.unwrap_or_else(|| "-".into());
        let _ = writeln!(s, "datastore       {}", self.datastore);
        let _ = writeln!(s, "engine          {} {}", self.engine, self.server_version);
        let _ = writeln!(
            s,
            "schema version  {}",
            or_dash(self.schema_version.map(|v| v.to_string()))
        );
        let code = match self.code_version.as_deref() {
            Some("") => "(empty: SPIRE reads it as 0.0.0)".to_string(),
            other => or_dash(other.map(str::to_string)),
        };
        let _ = writeln!(s, "code version    {code}");
        let _ = writeln!(s, "entries         {}", self.entries);
        let _ = writeln!(s, "agents          {}", self.agents.total);
        match &self.agents.by_version {
            Some(list) => {
                for vc in list {
                    let v = if vc.version.is_empty() {
                        "(not reported)"
                    } else {
                        vc.version.as_str()
                    };
                    let _ = writeln!(s, "  {v:<16}{}", vc.count);
                }
            }
            None => {
                let _ = writeln!(
                    s,
                    "  (agent versions are recorded from SPIRE 1.14.3, schema 24)"
                );
            }
        }
        let _ = writeln!(s, "bundles         {}", self.bundles);
        let _ = writeln!(s, "join tokens     {}", self.join_tokens);
        let width = self
            .tables
            .iter()
            .map(|t| t.name.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let _ = writeln!(s, "\n{:<width$}  {:>10}", "TABLE", "ROWS");
        for t in &self.tables {
            let mark = if t.known {
                ""
            } else {
                "  (not in SPIRE's known schema)"
            };
            let _ = writeln!(s, "{:<width$}  {:>10}{mark}", t.name, t.rows);
        }
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        s
    }
}
