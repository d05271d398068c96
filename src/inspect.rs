//! `spirekeep inspect`: what is in a SPIRE datastore.
//!
//! Everything here is built from the [`Datastore`] trait, so it works the same
//! on every engine. The live catalogue is the source of truth: tables a newer
//! SPIRE adds show up as "not in SPIRE's known schema" but are still listed
//! and counted.

use serde::Serialize;

use crate::compat::{AgentCount, MigrationRow};
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
    /// With server.conf: the CA journal naming keys the disk KeyManager's
    /// keys file does not hold, or the reverse (see [`key_store_warnings`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
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

/// What SPIRE's start-up rules and skew policy depend on, read one way for
/// `check`, `plan` and `inspect` ([`read_spire_facts`]), so they cannot
/// disagree about the same datastore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpireFacts {
    /// The `migrations` table as found.
    pub migrations: MigrationsState,
    /// Attested agents by `agent_version`, sorted by version. NULL and the
    /// empty string are one group, `""`: an agent that did not report a
    /// version (before SPIRE 1.14.3). `None` when the column does not exist
    /// (schema < 24).
    pub agents: Option<Vec<AgentCount>>,
    /// Every attested agent (0 when `attested_node_entries` is absent).
    pub agents_total: u64,
    /// SPIRE's known tables present, `migrations` included.
    pub spire_tables: Vec<String>,
    /// The newest schema whose shape the tables have (25: `additional_attributes`,
    /// 24: `agent_version`, 23: `ca_journals`); `None` when older than 23.
    pub schema_by_shape: Option<i64>,
}

/// The `migrations` table of a datastore that has SPIRE's tables.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum MigrationsState {
    /// The first row by id (what SPIRE reads), and how many rows there are.
    Row { row: MigrationRow, rows: usize },
    /// The table exists with no row: SPIRE's `FirstOrCreate` would make a
    /// `(0, "")` row, which no release since 1.2.0 migrates from.
    Empty,
    /// SPIRE's tables without a `migrations` table: SPIRE never finished
    /// creating the datastore (initDB writes the row last).
    Missing,
}

impl SpireFacts {
    /// The row, when there is one.
    #[must_use]
    pub fn row(&self) -> Option<&MigrationRow> {
        match &self.migrations {
            MigrationsState::Row { row, .. } => Some(row),
            MigrationsState::Empty | MigrationsState::Missing => None,
        }
    }

    /// Agents for the skew rules: by version where recorded, else every
    /// attested agent as not reported.
    #[must_use]
    pub fn agent_counts(&self) -> Vec<AgentCount> {
        match &self.agents {
            Some(list) => list.clone(),
            None if self.agents_total > 0 => vec![AgentCount {
                version: String::new(),
                count: self.agents_total,
            }],
            None => Vec::new(),
        }
    }

    /// One line on a datastore without a `migrations` row: what it holds and
    /// why SPIRE cannot run on it. `None` when the row is there.
    #[must_use]
    pub fn incomplete(&self, location: &str) -> Option<String> {
        let what = match self.migrations {
            MigrationsState::Row { .. } => return None,
            MigrationsState::Empty => {
                "its `migrations` table is empty (SPIRE would read schema 0 and refuse to start)"
            }
            MigrationsState::Missing => {
                "it has no `migrations` table (SPIRE would try to create its schema over the existing tables)"
            }
        };
        let shape = match self.schema_by_shape {
            Some(25) => "the shape of schema 25 (SPIRE 1.15.x)".to_owned(),
            Some(24) => "the shape of schema 24 (SPIRE 1.14.3-1.14.7)".to_owned(),
            Some(23) => "the shape of schema 23 (SPIRE 1.8.0-1.14.2)".to_owned(),
            Some(n) => format!("the shape of schema {n}"),
            None => "a shape older than schema 23".to_owned(),
        };
        Some(format!(
            "the datastore at {location} is a SPIRE datastore SPIRE never finished creating: {what}; it holds {} of SPIRE's {} tables, with {shape}, and {} attested agents",
            self.spire_tables.len(),
            KNOWN_SPIRE_TABLES.len(),
            self.agents_total
        ))
    }
}

/// Reads the SPIRE facts: the `migrations` row as SPIRE reads it and the
/// agents by reported version.
///
/// # Errors
/// A database with no tables, or none of SPIRE's, is not a SPIRE datastore;
/// database errors.
pub async fn read_spire_facts(ds: &dyn Datastore, catalogue: &Catalogue) -> Result<SpireFacts> {
    let spire_tables: Vec<String> = catalogue
        .tables
        .iter()
        .map(|t| t.name.clone())
        .filter(|n| KNOWN_SPIRE_TABLES.contains(&n.as_str()))
        .collect();
    let migrations = if catalogue.table("migrations").is_none()
        && spire_tables.iter().any(|t| t != "migrations")
    {
        MigrationsState::Missing
    } else {
        match read_migrations(ds, catalogue).await? {
            (Some(r), rows) => MigrationsState::Row {
                row: MigrationRow::new(r.schema_version, r.code_version),
                rows,
            },
            (None, _) => MigrationsState::Empty,
        }
    };
    let (agents, agents_total) = if catalogue.table(NODES).is_none() {
        (None, 0)
    } else if catalogue.has_column(NODES, "agent_version") {
        let mut list: Vec<AgentCount> = Vec::new();
        for (version, count) in ds.count_by(NODES, "agent_version").await? {
            // NULL (never reported) and "" are the same fact to SPIRE's rules.
            let version = version.unwrap_or_default();
            match list.iter_mut().find(|a| a.version == version) {
                Some(a) => a.count += count,
                None => list.push(AgentCount { version, count }),
            }
        }
        list.sort_by(|a, b| a.version.cmp(&b.version));
        let total = list.iter().map(|a| a.count).sum();
        (Some(list), total)
    } else {
        (None, ds.count_rows(NODES).await?)
    };
    let schema_by_shape = if catalogue.has_column("registered_entries", "additional_attributes") {
        Some(25)
    } else if catalogue.has_column(NODES, "agent_version") {
        Some(24)
    } else if catalogue.table("ca_journals").is_some() {
        Some(23)
    } else {
        None
    };
    Ok(SpireFacts {
        migrations,
        agents,
        agents_total,
        spire_tables,
        schema_by_shape,
    })
}

const NODES: &str = "attested_node_entries";

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
    let facts = read_spire_facts(ds, &catalogue).await?;
    let mut notes = Vec::new();
    match &facts.migrations {
        MigrationsState::Row { rows, .. } if *rows > 1 => notes.push(format!(
            "`migrations` has {rows} rows; SPIRE reads the first and updates all of them"
        )),
        MigrationsState::Row { .. } => {}
        MigrationsState::Empty | MigrationsState::Missing => {
            if let Some(line) = facts.incomplete(ds.location()) {
                notes.push(line);
            }
        }
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
    let agents = AgentSummary {
        total: facts.agents_total,
        by_version: facts.agents.as_ref().map(|list| {
            list.iter()
                .map(|a| VersionCount {
                    version: a.version.clone(),
                    count: a.count,
                })
                .collect()
        }),
    };
    let migrations = facts.row();
    Ok(InspectReport {
        datastore: ds.location().to_string(),
        engine: ds.engine(),
        server_version,
        schema_version: migrations.map(|m| m.schema),
        code_version: migrations.map(|m| m.code_version.clone()),
        entries: rows_of("registered_entries"),
        bundles: rows_of("bundles"),
        join_tokens: rows_of("join_tokens"),
        tables,
        agents,
        notes,
        warnings: Vec::new(),
    })
}

/// Compares the live CA journal (`ca_journals`) with the KeyManager the
/// server.conf names: for the disk KeyManager, the key IDs in its keys file
/// (a missing file holds none); for any other, a line saying what cannot be
/// compared. Returns warnings; only the key IDs are read from the file.
///
/// # Errors
/// Database errors reading `ca_journals`.
pub async fn key_store_warnings(
    ds: &dyn Datastore,
    layout: &crate::datastore::spire_conf::ServerLayout,
) -> Result<Vec<String>> {
    use crate::ca_keys::{KeyStore, compare, journals_from_rows, key_ids_from_keys_json};
    use crate::datastore::spire_conf::KeyManagerConfig;
    let (store, name) = match (&layout.key_manager, &layout.keys_path) {
        (KeyManagerConfig::Disk { .. }, Some(path)) => {
            let name = format!("the keys file {}", path.display());
            match std::fs::read(path) {
                Ok(bytes) => match key_ids_from_keys_json(&bytes) {
                    Ok(ids) => (KeyStore::Keys(ids), name),
                    Err(e) => return Ok(vec![format!("{name} cannot be read as keys: {e}")]),
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => (KeyStore::Missing, name),
                Err(e) => {
                    return Ok(vec![format!(
                        "{name} cannot be read ({e}); the CA journal was not compared with it"
                    )]);
                }
            }
        }
        (KeyManagerConfig::Memory, _) => {
            return Ok(vec![
                "KeyManager \"memory\": the CA keys live only in the running server (nothing on disk to back up); a \
                 restarted or restored server mints a new CA"
                    .into(),
            ]);
        }
        (KeyManagerConfig::Other(n), _) => {
            return Ok(vec![format!(
                "KeyManager \"{n}\" keeps the CA keys outside the server; the CA journal was not compared with them"
            )]);
        }
        (KeyManagerConfig::Unusable(why), _) => return Ok(vec![format!("server.conf: {why}")]),
        (KeyManagerConfig::Disk { .. }, None) => return Ok(Vec::new()),
    };
    let catalogue = ds.catalogue().await?;
    let Some(table) = catalogue.table("ca_journals") else {
        return Ok(Vec::new());
    };
    let rows = ds.read_table(table).await?;
    let (journals, mut warnings) = journals_from_rows(table, &rows);
    warnings.extend(compare(&journals, &store, &name));
    Ok(warnings)
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
        for w in &self.warnings {
            let _ = writeln!(s, "warning: {w}");
        }
        s
    }
}
