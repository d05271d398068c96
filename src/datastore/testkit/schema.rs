//! SPIRE's schema as data: the 13 tables with their columns per schema version,
//! and the 17 named indexes (spire-reference §2.3). The DDL files under
//! `ddl/` are the engine-exact form of the same thing; a unit test checks that
//! the two agree.

use super::super::ColumnKind;

/// Schema versions the testkit can create (the ones current SPIRE releases
/// can still migrate from: `lastMinorReleaseSchemaVersion` 23 up to 25).
pub const SUPPORTED_SCHEMAS: std::ops::RangeInclusive<u32> = 23..=25;

/// The 13 tables of a SPIRE datastore, in the order `initDB` creates them
/// (the join table first: GORM creates it while walking `Bundle`'s fields).
pub const SPIRE_TABLES: [&str; 13] = [
    "federated_registration_entries",
    "bundles",
    "attested_node_entries",
    "attested_node_entries_events",
    "node_resolver_map_entries",
    "registered_entries",
    "registered_entries_events",
    "join_tokens",
    "selectors",
    "migrations",
    "dns_names",
    "federated_trust_domains",
    "ca_journals",
];

/// One of SPIRE's named indexes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpireIndex {
    pub table: &'static str,
    pub name: &'static str,
    pub columns: &'static [&'static str],
    pub unique: bool,
}

const fn ix(
    table: &'static str,
    name: &'static str,
    columns: &'static [&'static str],
    unique: bool,
) -> SpireIndex {
    SpireIndex {
        table,
        name,
        columns,
        unique,
    }
}

/// The 17 named indexes, the same in schemas 23, 24 and 25. Primary keys are
/// not listed: `id` on every model table, and `(bundle_id, registered_entry_id)`
/// on `federated_registration_entries`.
pub const SPIRE_INDEXES: [SpireIndex; 17] = [
    ix(
        "bundles",
        "uix_bundles_trust_domain",
        &["trust_domain"],
        true,
    ),
    ix(
        "attested_node_entries",
        "idx_attested_node_entries_expires_at",
        &["expires_at"],
        false,
    ),
    ix(
        "attested_node_entries",
        "uix_attested_node_entries_spiffe_id",
        &["spiffe_id"],
        true,
    ),
    ix(
        "node_resolver_map_entries",
        "idx_node_resolver_map",
        &["spiffe_id", "type", "value"],
        true,
    ),
    ix(
        "registered_entries",
        "idx_registered_entries_spiffe_id",
        &["spiffe_id"],
        false,
    ),
    ix(
        "registered_entries",
        "idx_registered_entries_parent_id",
        &["parent_id"],
        false,
    ),
    ix(
        "registered_entries",
        "idx_registered_entries_expiry",
        &["expiry"],
        false,
    ),
    ix(
        "registered_entries",
        "idx_registered_entries_hint",
        &["hint"],
        false,
    ),
    ix(
        "registered_entries",
        "uix_registered_entries_entry_id",
        &["entry_id"],
        true,
    ),
    ix("join_tokens", "uix_join_tokens_token", &["token"], true),
    ix(
        "selectors",
        "idx_selectors_type_value",
        &["type", "value"],
        false,
    ),
    ix(
        "selectors",
        "idx_selector_entry",
        &["registered_entry_id", "type", "value"],
        true,
    ),
    ix(
        "dns_names",
        "idx_dns_entry",
        &["registered_entry_id", "value"],
        true,
    ),
    ix(
        "federated_trust_domains",
        "uix_federated_trust_domains_trust_domain",
        &["trust_domain"],
        true,
    ),
    ix(
        "ca_journals",
        "idx_ca_journals_active_x509_authority_id",
        &["active_x509_authority_id"],
        false,
    ),
    ix(
        "ca_journals",
        "idx_ca_journals_active_jwt_authority_id",
        &["active_jwt_authority_id"],
        false,
    ),
    ix(
        "federated_registration_entries",
        "idx_federated_registration_entries_registered_entry_id",
        &["registered_entry_id"],
        false,
    ),
];

/// One table's columns in `initDB`'s order, with their kinds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSpec {
    pub name: &'static str,
    pub columns: Vec<(&'static str, ColumnKind)>,
}

impl TableSpec {
    /// The columns as [`crate::datastore::Datastore::insert_rows`] takes them.
    #[must_use]
    pub fn insert_columns(&self) -> Vec<(String, ColumnKind)> {
        self.columns
            .iter()
            .map(|(n, k)| ((*n).to_string(), *k))
            .collect()
    }

    /// Position of `column`.
    ///
    /// # Panics
    /// When the table has no such column (a bug in the caller).
    #[must_use]
    pub fn position(&self, column: &str) -> usize {
        self.columns
            .iter()
            .position(|(n, _)| *n == column)
            .unwrap_or_else(|| panic!("{} has no column {column}", self.name))
    }

    /// Whether the table has `column`.
    #[must_use]
    pub fn has(&self, column: &str) -> bool {
        self.columns.iter().any(|(n, _)| *n == column)
    }
}

/// The columns of every SPIRE table at `schema` (23, 24 or 25), in
/// [`SPIRE_TABLES`] order. `None` for other schema versions.
#[must_use]
pub fn spire_tables(schema: u32) -> Option<Vec<TableSpec>> {
    use ColumnKind::{Boolean as B, Bytes as X, Integer as I, Text as T, Timestamp as S};
    if !SUPPORTED_SCHEMAS.contains(&schema) {
        return None;
    }
    let model = |rest: &[(&'static str, ColumnKind)]| {
        let mut cols = vec![("id", I), ("created_at", S), ("updated_at", S)];
        cols.extend_from_slice(rest);
        cols
    };
    let mut nodes = vec![
        ("spiffe_id", T),
        ("data_type", T),
        ("serial_number", T),
        ("expires_at", S),
        ("new_serial_number", T),
        ("new_expires_at", S),
        ("can_reattest", B),
    ];
    if schema >= 24 {
        nodes.push(("agent_version", T));
    }
    let mut entries = vec![
        ("entry_id", T),
        ("spiffe_id", T),
        ("parent_id", T),
        ("ttl", I),
        ("admin", B),
        ("downstream", B),
        ("expiry", I),
        ("revision_number", I),
        ("store_svid", B),
        ("hint", T),
        ("jwt_svid_ttl", I),
    ];
    if schema >= 25 {
        entries.push(("additional_attributes", X));
    }
    let spec =
        |name: &'static str, columns: Vec<(&'static str, ColumnKind)>| TableSpec { name, columns };
    Some(vec![
        spec(
            "federated_registration_entries",
            vec![("bundle_id", I), ("registered_entry_id", I)],
        ),
        spec("bundles", model(&[("trust_domain", T), ("data", X)])),
        spec("attested_node_entries", model(&nodes)),
        spec("attested_node_entries_events", model(&[("spiffe_id", T)])),
        spec(
            "node_resolver_map_entries",
            model(&[("spiffe_id", T), ("type", T), ("value", T)]),
        ),
        spec("registered_entries", model(&entries)),
        spec("registered_entries_events", model(&[("entry_id", T)])),
        spec("join_tokens", model(&[("token", T), ("expiry", I)])),
        spec(
            "selectors",
            model(&[("registered_entry_id", I), ("type", T), ("value", T)]),
        ),
        spec("migrations", model(&[("version", I), ("code_version", T)])),
        spec(
            "dns_names",
            model(&[("registered_entry_id", I), ("value", T)]),
        ),
        spec(
            "federated_trust_domains",
            model(&[
                ("trust_domain", T),
                ("bundle_endpoint_url", T),
                ("bundle_endpoint_profile", T),
                ("endpoint_spiffe_id", T),
                ("implicit", B),
            ]),
        ),
        spec(
            "ca_journals",
            model(&[
                ("data", X),
                ("active_x509_authority_id", T),
                ("active_jwt_authority_id", T),
            ]),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::super::spire_ddl;
    use super::*;
    use crate::datastore::Engine;

    /// Splits a DDL file into statements (they end with `;` at the end of a line).
    fn statements(ddl: &str) -> Vec<String> {
        ddl.lines()
            .filter(|l| !l.starts_with("--") && !l.trim().is_empty())
            .map(|l| l.trim_end().trim_end_matches(';').trim_end().to_string())
            .collect()
    }

    /// The column names of `CREATE TABLE x (...)` text, in order.
    fn created_columns(stmt: &str) -> Vec<String> {
        let open = stmt.find('(').expect("(") + 1;
        let end = stmt
            .find(", PRIMARY KEY")
            .or_else(|| stmt.rfind(')'))
            .expect(")");
        stmt[open..end]
            .split(',')
            .map(|c| {
                c.trim()[1..]
                    .split(['"', '`'])
                    .next()
                    .expect("quoted name")
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn ddl_files_match_the_table_specs() {
        for engine in [Engine::Sqlite, Engine::Postgres, Engine::Mysql] {
            for schema in SUPPORTED_SCHEMAS {
                let ddl = spire_ddl(engine, schema).expect("ddl exists");
                let stmts = statements(ddl);
                let creates: Vec<&String> = stmts
                    .iter()
                    .filter(|s| s.starts_with("CREATE TABLE"))
                    .collect();
                let specs = spire_tables(schema).expect("specs");
                assert_eq!(creates.len(), 13, "{engine} {schema}");
                for (stmt, spec) in creates.iter().zip(&specs) {
                    let quoted = match engine {
                        Engine::Mysql => format!("CREATE TABLE `{}` (", spec.name),
                        _ => format!("CREATE TABLE \"{}\" (", spec.name),
                    };
                    assert!(stmt.starts_with(&quoted), "{engine} {schema}: {stmt}");
                    let want: Vec<&str> = spec.columns.iter().map(|c| c.0).collect();
                    assert_eq!(
                        created_columns(stmt),
                        want,
                        "{engine} {schema} {}",
                        spec.name
                    );
                }
                let indexes: Vec<&String> =
                    stmts.iter().filter(|s| s.contains(" INDEX ")).collect();
                assert_eq!(indexes.len(), SPIRE_INDEXES.len(), "{engine} {schema}");
                for want in &SPIRE_INDEXES {
                    let head = if want.unique {
                        "CREATE UNIQUE INDEX"
                    } else {
                        "CREATE INDEX"
                    };
                    let found = indexes
                        .iter()
                        .find(|s| {
                            s.split_whitespace().nth(if want.unique { 3 } else { 2 })
                                == Some(want.name)
                        })
                        .unwrap_or_else(|| panic!("{engine} {schema}: no {}", want.name));
                    assert!(found.starts_with(head), "{found}");
                    assert!(
                        found.contains(&format!(" ON {}", quote(engine, want.table))),
                        "{found}"
                    );
                    let cols: Vec<String> = found
                        [found.rfind('(').expect("(") + 1..found.rfind(')').expect(")")]
                        .split(", ")
                        .map(|c| c.trim_matches(['"', '`']).to_string())
                        .collect();
                    assert_eq!(cols, want.columns, "{engine} {schema} {}", want.name);
                }
                assert!(!ddl.contains("INSERT"), "the DDL must not write rows");
                assert!(!ddl.contains('\\'), "no client meta-commands");
            }
        }
    }

    fn quote(engine: Engine, name: &str) -> String {
        match engine {
            Engine::Mysql => format!("`{name}`"),
            _ => format!("\"{name}\""),
        }
    }

    #[test]
    fn schema_columns_differ_only_where_spire_changed_them() {
        let s23 = spire_tables(23).unwrap();
        let s24 = spire_tables(24).unwrap();
        let s25 = spire_tables(25).unwrap();
        let nodes = |s: &[TableSpec]| {
            s.iter()
                .find(|t| t.name == "attested_node_entries")
                .unwrap()
                .clone()
        };
        let entries = |s: &[TableSpec]| {
            s.iter()
                .find(|t| t.name == "registered_entries")
                .unwrap()
                .clone()
        };
        assert!(!nodes(&s23).has("agent_version"));
        assert!(nodes(&s24).has("agent_version"));
        assert_eq!(nodes(&s24).columns.last().unwrap().0, "agent_version");
        assert!(!entries(&s24).has("additional_attributes"));
        assert_eq!(
            entries(&s25).columns.last().unwrap().0,
            "additional_attributes"
        );
        assert!(spire_tables(22).is_none());
        assert!(spire_tables(26).is_none());
        assert_eq!(s25.iter().map(|t| t.name).collect::<Vec<_>>(), SPIRE_TABLES);
    }
}
