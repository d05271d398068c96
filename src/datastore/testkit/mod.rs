//! Realistic SPIRE datastores for tests, benchmarks and examples.
//!
//! Not part of spirekeep's interface (`#[doc(hidden)]`): the test suite, the
//! benchmarks and `examples/generate.rs` use it.
//!
//! - [`spire_ddl`]: the exact DDL that SPIRE's `initDB` (GORM v1.9.16) runs
//!   for schema 23, 24 or 25 on SQLite, PostgreSQL or MySQL
//!   (spire-reference §2). The migrations row is not part of it.
//! - [`create_spire_datastore`]: runs that DDL on an empty datastore and fills
//!   it with a deterministic, SPIRE-shaped population ([`Population`]):
//!   registration entries with selectors, DNS names and federation; agents
//!   with node selectors and agent versions; bundles, federation
//!   relationships, join tokens, events, a CA journal and the migrations
//!   row. With `hostile: true` some rows hold awkward but valid values.
//! - [`TestDatabase`]: a fresh, uniquely named PostgreSQL or MySQL database
//!   per test, created through an admin connection and dropped by
//!   [`TestDatabase::cleanup`].
//!
//! ```no_run
//! # async fn demo() -> spirekeep::Result<()> {
//! use spirekeep::datastore::{self, dsn, OpenMode};
//! use spirekeep::datastore::testkit::{create_spire_datastore, Population};
//! let spec = dsn::parse("/tmp/datastore.sqlite3", None, std::path::Path::new("."))?;
//! let ds = datastore::open(&spec, OpenMode::Create).await?;
//! let pop = Population { entries: 1_000, hostile: true, ..Population::default() };
//! let counts = create_spire_datastore(ds.as_ref(), &pop).await?;
//! assert_eq!(counts.rows("registered_entries"), 1_000);
//! # Ok(()) }
//! ```

mod generate;
mod render;
mod schema;
mod testdb;

pub use generate::{GeneratedCounts, Population, create_spire_datastore};
pub use render::{MYSQL_ZERO_DATETIME, go_sqlite3_text};
pub use schema::{
    SPIRE_INDEXES, SPIRE_TABLES, SUPPORTED_SCHEMAS, SpireIndex, TableSpec, spire_tables,
};
pub use testdb::{TestDatabase, services_required};

use super::Engine;

/// The DDL SPIRE's `initDB` runs for `schema` (23, 24 or 25) on `engine`:
/// the 13 tables and 17 named indexes, statement text as GORM v1.9.16 writes
/// it, without the migrations row. Each statement ends with `;` at the end of
/// its line; the file starts with `--` comment lines. `None` for other schema
/// versions.
#[must_use]
pub fn spire_ddl(engine: Engine, schema: u32) -> Option<&'static str> {
    Some(match (engine, schema) {
        (Engine::Sqlite, 23) => include_str!("ddl/sqlite/schema-23.sql"),
        (Engine::Sqlite, 24) => include_str!("ddl/sqlite/schema-24.sql"),
        (Engine::Sqlite, 25) => include_str!("ddl/sqlite/schema-25.sql"),
        (Engine::Postgres, 23) => include_str!("ddl/postgres/schema-23.sql"),
        (Engine::Postgres, 24) => include_str!("ddl/postgres/schema-24.sql"),
        (Engine::Postgres, 25) => include_str!("ddl/postgres/schema-25.sql"),
        (Engine::Mysql, 23) => include_str!("ddl/mysql/schema-23.sql"),
        (Engine::Mysql, 24) => include_str!("ddl/mysql/schema-24.sql"),
        (Engine::Mysql, 25) => include_str!("ddl/mysql/schema-25.sql"),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddl_exists_exactly_for_supported_schemas() {
        for engine in [Engine::Sqlite, Engine::Postgres, Engine::Mysql] {
            assert!(spire_ddl(engine, 22).is_none());
            assert!(spire_ddl(engine, 26).is_none());
            for schema in SUPPORTED_SCHEMAS {
                let ddl = spire_ddl(engine, schema).unwrap();
                assert!(
                    ddl.lines()
                        .filter(|l| !l.starts_with("--"))
                        .all(|l| l.ends_with(';'))
                );
                assert_eq!(
                    ddl.contains("agent_version"),
                    schema >= 24,
                    "{engine} {schema}"
                );
                assert_eq!(
                    ddl.contains("additional_attributes"),
                    schema >= 25,
                    "{engine} {schema}"
                );
            }
        }
        assert!(
            spire_ddl(Engine::Mysql, 25)
                .unwrap()
                .contains("ENGINE=InnoDB ROW_FORMAT=DYNAMIC DEFAULT CHARSET=utf8;")
        );
        assert!(
            spire_ddl(Engine::Postgres, 25)
                .unwrap()
                .contains("\"id\" serial,")
        );
        assert!(
            spire_ddl(Engine::Sqlite, 25)
                .unwrap()
                .contains("\"id\" integer primary key autoincrement,")
        );
    }
}
