//! `CREATE TABLE` / `CREATE INDEX` text for restoring a catalogue into an engine.
//!
//! Same-engine restores reuse the engine's own DDL where the catalogue kept it
//! (SQLite's `sqlite_master.sql`, MySQL's `SHOW CREATE TABLE`), so types and
//! indexes come back exactly. Across engines, each column is given the type
//! GORM v1.9.16 gives SPIRE's Go field on the target engine (spire-reference
//! §2.2), so a datastore moved from SQLite to PostgreSQL looks as if SPIRE had
//! created it there.

use super::catalogue::{Column, Table};
use super::dsn::Engine;
use super::{ColumnKind, quote_ident};

/// Columns that are Go `uint` in SPIRE's models (MySQL `int unsigned`); on
/// other engines the catalogue cannot tell them from `int32`.
const SPIRE_UNSIGNED_COLUMNS: [(&str, &str); 4] = [
    ("selectors", "registered_entry_id"),
    ("dns_names", "registered_entry_id"),
    ("federated_registration_entries", "bundle_id"),
    ("federated_registration_entries", "registered_entry_id"),
];

/// The statements that create `table` under `name` on `target`, given the
/// engine the catalogue was read from.
#[must_use]
pub fn create_statements(source: Engine, target: Engine, table: &Table, name: &str) -> Vec<String> {
    if source == target
        && let Some(sql) = table.create_sql.as_deref()
    {
        return same_engine_statements(target, table, name, sql);
    }
    let mut out = vec![create_table(source, target, table, name)];
    if target != Engine::Mysql {
        out.extend(create_indexes(target, table, name));
    }
    out
}

fn same_engine_statements(engine: Engine, table: &Table, name: &str, sql: &str) -> Vec<String> {
    let sql = if name == table.name {
        sql.to_string()
    } else {
        // `CREATE TABLE `t` (` on MySQL: rename only the first quoted name.
        sql.replacen(
            &quote_ident(engine, &table.name),
            &quote_ident(engine, name),
            1,
        )
    };
    let mut out = vec![sql];
    // MySQL's SHOW CREATE TABLE already includes the indexes; SQLite keeps them apart.
    if engine != Engine::Mysql {
        out.extend(create_indexes(engine, table, name));
    }
    out
}

fn create_table(source: Engine, target: Engine, table: &Table, name: &str) -> String {
    let inline_pk = target == Engine::Sqlite
        && table.primary_key.len() == 1
        && table.columns.iter().any(|c| c.auto_increment);
    let mut parts: Vec<String> = table
        .columns
        .iter()
        .map(|c| column_def(source, target, table, c))
        .collect();
    if !table.primary_key.is_empty() && !inline_pk {
        let cols: Vec<String> = table
            .primary_key
            .iter()
            .map(|c| quote_ident(target, c))
            .collect();
        parts.push(format!("PRIMARY KEY ({})", cols.join(",")));
    }
    if target == Engine::Mysql {
        for i in &table.indexes {
            let cols: Vec<String> = i.columns.iter().map(|c| quote_ident(target, c)).collect();
            parts.push(format!(
                "{}KEY {} ({})",
                if i.unique { "UNIQUE " } else { "" },
                quote_ident(target, &i.name),
                cols.join(",")
            ));
        }
    }
    let suffix = if target == Engine::Mysql {
        " ENGINE=InnoDB ROW_FORMAT=DYNAMIC DEFAULT CHARSET=utf8"
    } else {
        ""
    };
    format!(
        "CREATE TABLE {} ({}){suffix}",
        quote_ident(target, name),
        parts.join(", ")
    )
}

fn create_indexes(target: Engine, table: &Table, name: &str) -> Vec<String> {
    table
        .indexes
        .iter()
        .map(|i| {
            let cols: Vec<String> = i.columns.iter().map(|c| quote_ident(target, c)).collect();
            format!(
                "CREATE {}INDEX {} ON {} ({})",
                if i.unique { "UNIQUE " } else { "" },
                quote_ident(target, &i.name),
                quote_ident(target, name),
                cols.join(",")
            )
        })
        .collect()
}

fn column_def(source: Engine, target: Engine, table: &Table, c: &Column) -> String {
    let q = quote_ident(target, &c.name);
    let big = is_64_bit(source, c);
    if c.auto_increment {
        return match target {
            Engine::Sqlite => format!("{q} integer primary key autoincrement"),
            Engine::Postgres => format!("{q} {}", if big { "bigserial" } else { "serial" }),
            Engine::Mysql => format!(
                "{q} {} unsigned AUTO_INCREMENT",
                if big { "bigint" } else { "int" }
            ),
        };
    }
    let ty = if source == target {
        c.declared_type.clone()
    } else {
        portable_type(source, target, table, c, big)
    };
    let not_null = if c.nullable || table.primary_key.contains(&c.name) {
        ""
    } else {
        " NOT NULL"
    };
    // GORM declares MySQL datetimes as `DATETIME NULL` explicitly.
    let null = if target == Engine::Mysql && c.kind == ColumnKind::Timestamp && c.nullable {
        " NULL"
    } else {
        ""
    };
    format!("{q} {ty}{not_null}{null}")
}

fn is_64_bit(source: Engine, c: &Column) -> bool {
    let t = c.declared_type.to_ascii_lowercase();
    match source {
        Engine::Sqlite | Engine::Mysql => t.starts_with("bigint"),
        Engine::Postgres => t == "bigint",
    }
}

/// GORM's type for the column's Go field on `target` (spire-reference §2.2).
fn portable_type(source: Engine, target: Engine, table: &Table, c: &Column, big: bool) -> String {
    let unsigned = match source {
        Engine::Mysql => c.declared_type.to_ascii_lowercase().contains("unsigned"),
        _ => SPIRE_UNSIGNED_COLUMNS.contains(&(table.name.as_str(), c.name.as_str())),
    };
    let s = match (target, c.kind) {
        (Engine::Sqlite, ColumnKind::Integer) => {
            if big {
                "bigint"
            } else {
                "integer"
            }
        }
        (Engine::Sqlite, ColumnKind::Boolean) => "bool",
        (Engine::Sqlite, ColumnKind::Text) => "varchar(255)",
        (Engine::Sqlite, ColumnKind::Bytes) => "blob",
        (Engine::Sqlite, ColumnKind::Timestamp) => "datetime",
        (Engine::Sqlite, ColumnKind::Float) => "real",
        (Engine::Postgres, ColumnKind::Integer) => {
            if big {
                "bigint"
            } else {
                "integer"
            }
        }
        (Engine::Postgres, ColumnKind::Boolean) => "boolean",
        (Engine::Postgres, ColumnKind::Text) => "text",
        (Engine::Postgres, ColumnKind::Bytes) => "bytea",
        (Engine::Postgres, ColumnKind::Timestamp) => "timestamp with time zone",
        (Engine::Postgres, ColumnKind::Float) => "double precision",
        (Engine::Mysql, ColumnKind::Integer) => match (big, unsigned) {
            (true, true) => "bigint unsigned",
            (true, false) => "bigint",
            (false, true) => "int unsigned",
            (false, false) => "int",
        },
        (Engine::Mysql, ColumnKind::Boolean) => "boolean",
        (Engine::Mysql, ColumnKind::Text) => "varchar(255)",
        (Engine::Mysql, ColumnKind::Bytes) => "longblob",
        (Engine::Mysql, ColumnKind::Timestamp) => "datetime",
        (Engine::Mysql, ColumnKind::Float) => "double",
    };
    s.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::Index;

    fn entries_table() -> Table {
        let col = |name: &str, ty: &str, kind, nullable, ai| Column {
            name: name.into(),
            declared_type: ty.into(),
            kind,
            nullable,
            auto_increment: ai,
        };
        Table {
            name: "selectors".into(),
            columns: vec![
                col("id", "integer", ColumnKind::Integer, false, true),
                col("created_at", "datetime", ColumnKind::Timestamp, true, false),
                col(
                    "registered_entry_id",
                    "integer",
                    ColumnKind::Integer,
                    true,
                    false,
                ),
                col("type", "varchar(255)", ColumnKind::Text, true, false),
            ],
            primary_key: vec!["id".into()],
            indexes: vec![Index {
                name: "idx_selector_entry".into(),
                columns: vec!["registered_entry_id".into(), "type".into()],
                unique: true,
            }],
            create_sql: None,
        }
    }

    #[test]
    fn sqlite_to_mysql_uses_gorm_types() {
        let stmts = create_statements(
            Engine::Sqlite,
            Engine::Mysql,
            &entries_table(),
            "_spirekeep_new_selectors",
        );
        assert_eq!(stmts.len(), 1);
        assert_eq!(
            stmts[0],
            "CREATE TABLE `_spirekeep_new_selectors` (`id` int unsigned AUTO_INCREMENT, `created_at` datetime NULL, \
             `registered_entry_id` int unsigned, `type` varchar(255), PRIMARY KEY (`id`), \
             UNIQUE KEY `idx_selector_entry` (`registered_entry_id`,`type`)) ENGINE=InnoDB ROW_FORMAT=DYNAMIC DEFAULT CHARSET=utf8"
        );
    }

    #[test]
    fn sqlite_to_postgres_uses_serial_and_text() {
        let stmts = create_statements(
            Engine::Sqlite,
            Engine::Postgres,
            &entries_table(),
            "selectors",
        );
        assert_eq!(
            stmts[0],
            "CREATE TABLE \"selectors\" (\"id\" serial, \"created_at\" timestamp with time zone, \"registered_entry_id\" integer, \"type\" text, PRIMARY KEY (\"id\"))"
        );
        assert_eq!(
            stmts[1],
            "CREATE UNIQUE INDEX \"idx_selector_entry\" ON \"selectors\" (\"registered_entry_id\",\"type\")"
        );
    }

    #[test]
    fn same_engine_keeps_the_original_ddl() {
        let mut t = entries_table();
        t.create_sql = Some("CREATE TABLE `selectors` (`id` int(10) unsigned NOT NULL AUTO_INCREMENT) ENGINE=InnoDB".into());
        let stmts = create_statements(Engine::Mysql, Engine::Mysql, &t, "_spirekeep_new_selectors");
        assert_eq!(stmts, vec!["CREATE TABLE `_spirekeep_new_selectors` (`id` int(10) unsigned NOT NULL AUTO_INCREMENT) ENGINE=InnoDB".to_string()]);
    }
}
