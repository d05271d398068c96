//! `CREATE TABLE` / `CREATE INDEX` text for restoring a catalogue into an engine.
//!
//! The DDL is always generated here, never taken from a snapshot: a manifest
//! is data from a bucket, and running SQL text from it would let whoever can
//! write to the bucket run SQL on the restore target. The catalogue is
//! checked first ([`table_problems`]): every table, column and index name is
//! a plain identifier and every declared type belongs to a closed set, so
//! nothing but names and types from that set reaches the generated text.
//!
//! On the same engine each column keeps its declared type, so the restored
//! catalogue equals the original. Across engines, each column is given the
//! type GORM v1.9.16 gives SPIRE's Go field on the target engine
//! (spire-reference §2.2), so a datastore moved from SQLite to PostgreSQL
//! looks as if SPIRE had created it there.

use super::catalogue::{Column, Table};
use super::dsn::Engine;
use super::{Catalogue, ColumnKind, quote_ident};
use crate::error::{Error, Result};

/// Columns that are Go `uint` in SPIRE's models (MySQL `int unsigned`); on
/// other engines the catalogue cannot tell them from `int32`.
const SPIRE_UNSIGNED_COLUMNS: [(&str, &str); 4] = [
    ("selectors", "registered_entry_id"),
    ("dns_names", "registered_entry_id"),
    ("federated_registration_entries", "bundle_id"),
    ("federated_registration_entries", "registered_entry_id"),
];

/// The longest identifier accepted (MySQL's limit; SPIRE's names are far shorter).
pub const MAX_IDENTIFIER_LEN: usize = 64;

/// Whether `name` may appear in generated DDL: 1 to [`MAX_IDENTIFIER_LEN`]
/// ASCII letters, digits and underscores, not starting with a digit.
#[must_use]
pub fn is_plain_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IDENTIFIER_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit()
}

/// Base types (lower case) accepted on SQLite and MySQL, each optionally with
/// `(n)` or `(n,m)` and ` unsigned`.
const SQLITE_MYSQL_TYPES: [&str; 34] = [
    "integer",
    "int",
    "tinyint",
    "smallint",
    "mediumint",
    "bigint",
    "bool",
    "boolean",
    "bit",
    "real",
    "float",
    "double",
    "decimal",
    "numeric",
    "char",
    "varchar",
    "character",
    "binary",
    "varbinary",
    "tinytext",
    "text",
    "mediumtext",
    "longtext",
    "tinyblob",
    "blob",
    "mediumblob",
    "longblob",
    "date",
    "datetime",
    "timestamp",
    "time",
    "year",
    "json",
    "clob",
];

/// PostgreSQL types as `format_type` prints them; `(n)` stands for one or
/// two numbers in parentheses.
const POSTGRES_TYPES: [&str; 25] = [
    "integer",
    "bigint",
    "smallint",
    "boolean",
    "real",
    "double precision",
    "numeric",
    "numeric(n)",
    "text",
    "character varying",
    "character varying(n)",
    "character",
    "character(n)",
    "bytea",
    "date",
    "timestamp with time zone",
    "timestamp without time zone",
    "timestamp(n) with time zone",
    "timestamp(n) without time zone",
    "time without time zone",
    "time with time zone",
    "json",
    "jsonb",
    "uuid",
    "serial",
];

/// Whether `declared` (a column type as `engine`'s catalogue prints it) is one
/// spirekeep puts into DDL.
#[must_use]
pub fn is_known_type(engine: Engine, declared: &str) -> bool {
    let Some(shape) = type_shape(declared) else {
        return false;
    };
    match engine {
        Engine::Postgres => POSTGRES_TYPES.contains(&shape.as_str()),
        Engine::Sqlite | Engine::Mysql => {
            let signless = shape.strip_suffix(" unsigned").unwrap_or(&shape);
            let base = signless.strip_suffix("(n)").unwrap_or(signless);
            SQLITE_MYSQL_TYPES.contains(&base)
        }
    }
}

/// `declared` in lower case with single spaces and its one parenthesised
/// list of at most two numbers replaced by `(n)`; `None` for anything else
/// (any other character, a second list, numbers that are not small).
fn type_shape(declared: &str) -> Option<String> {
    let lower = declared.trim().to_ascii_lowercase();
    if lower.is_empty() || lower.len() > 64 {
        return None;
    }
    let mut out = String::with_capacity(lower.len());
    let mut rest = lower.as_str();
    let mut lists = 0;
    while let Some(open) = rest.find('(') {
        let close = rest[open..].find(')')? + open;
        let args = &rest[open + 1..close];
        let numbers: Vec<&str> = args.split(',').map(str::trim).collect();
        let small =
            |n: &&str| !n.is_empty() && n.len() <= 5 && n.bytes().all(|b| b.is_ascii_digit());
        if numbers.len() > 2 || !numbers.iter().all(small) {
            return None;
        }
        lists += 1;
        out.push_str(rest[..open].trim_end());
        out.push_str("(n)");
        rest = &rest[close + 1..];
    }
    if lists > 1 || rest.contains(')') {
        return None;
    }
    out.push_str(rest);
    let words: Vec<&str> = out.split_whitespace().collect();
    let out = words.join(" ");
    out.bytes()
        .all(|b| b.is_ascii_lowercase() || b == b' ' || b == b'(' || b == b')')
        .then_some(out)
}

/// Everything in `table` (read from a `source` datastore) that spirekeep
/// would not put into DDL: names that are not plain identifiers, declared
/// types outside the closed set, keys and indexes naming unknown columns.
#[must_use]
pub fn table_problems(source: Engine, table: &Table) -> Vec<String> {
    let mut p = Vec::new();
    let shown = |s: &str| {
        s.chars()
            .take(80)
            .collect::<String>()
            .escape_debug()
            .to_string()
    };
    if !is_plain_identifier(&table.name) {
        p.push(format!(
            "table name \"{}\" is not a plain identifier (letters, digits, '_')",
            shown(&table.name)
        ));
        return p;
    }
    let t = &table.name;
    if table.columns.is_empty() {
        p.push(format!("table {t} has no columns"));
    }
    let mut seen = std::collections::HashSet::new();
    for c in &table.columns {
        if !is_plain_identifier(&c.name) {
            p.push(format!(
                "table {t}: column name \"{}\" is not a plain identifier",
                shown(&c.name)
            ));
            continue;
        }
        if !seen.insert(c.name.as_str()) {
            p.push(format!("table {t}: column {} appears twice", c.name));
        }
        if !is_known_type(source, &c.declared_type) {
            p.push(format!(
                "table {t}: column {} has type \"{}\", which is not a {source} column type spirekeep restores",
                c.name,
                shown(&c.declared_type)
            ));
        }
        if c.auto_increment && c.kind != ColumnKind::Integer {
            p.push(format!(
                "table {t}: auto-increment column {} is not an integer",
                c.name
            ));
        }
    }
    let known = |c: &String| table.columns.iter().any(|col| &col.name == c);
    if table.primary_key.iter().any(|c| !known(c)) {
        p.push(format!(
            "table {t}: the primary key names an unknown column"
        ));
    }
    for i in &table.indexes {
        if !is_plain_identifier(&i.name) {
            p.push(format!(
                "table {t}: index name \"{}\" is not a plain identifier",
                shown(&i.name)
            ));
        } else if i.columns.is_empty() || i.columns.iter().any(|c| !known(c)) {
            p.push(format!(
                "table {t}: index {} names no column or an unknown one",
                i.name
            ));
        }
    }
    p
}

/// [`table_problems`] over a whole catalogue.
#[must_use]
pub fn catalogue_problems(source: Engine, catalogue: &Catalogue) -> Vec<String> {
    catalogue
        .tables
        .iter()
        .flat_map(|t| table_problems(source, t))
        .collect()
}

/// The statements that create `table` under `name` on `target`, given the
/// engine the catalogue was read from. Generated from the checked catalogue
/// only (never from the DDL text a catalogue may carry).
///
/// # Errors
/// [`Error::Integrity`] naming every problem [`table_problems`] finds, or a
/// `name` that is not made of plain identifier characters.
pub fn create_statements(
    source: Engine,
    target: Engine,
    table: &Table,
    name: &str,
) -> Result<Vec<String>> {
    let problems = table_problems(source, table);
    let plain_name =
        !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !problems.is_empty() || !plain_name {
        return Err(Error::Integrity(format!(
            "the snapshot's catalogue cannot be restored: {}; nothing was run on the target (the \
             manifest may have been altered: restore from another snapshot)",
            if problems.is_empty() {
                format!("table name {name:?} is not a plain identifier")
            } else {
                problems.join("; ")
            }
        )));
    }
    let mut out = vec![create_table(source, target, table, name)];
    if target == Engine::Mysql {
        out.extend(add_mysql_keys(table, name));
    } else {
        if target == Engine::Postgres && !table.primary_key.is_empty() {
            // Built by one sort after the load, as pg_dump's scripts do,
            // instead of one index insertion per row.
            let cols: Vec<String> = table
                .primary_key
                .iter()
                .map(|c| quote_ident(target, c))
                .collect();
            out.push(format!(
                "ALTER TABLE {} ADD PRIMARY KEY ({})",
                quote_ident(target, name),
                cols.join(",")
            ));
        }
        out.extend(create_indexes(target, table, name));
    }
    Ok(out)
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
    // PostgreSQL's primary key comes after the load (`create_statements`).
    if !table.primary_key.is_empty() && !inline_pk && target != Engine::Postgres {
        let cols: Vec<String> = table
            .primary_key
            .iter()
            .map(|c| quote_ident(target, c))
            .collect();
        parts.push(format!("PRIMARY KEY ({})", cols.join(",")));
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

/// MySQL's secondary keys in one `ALTER TABLE` (one table rebuild, each key
/// built by sorting), in the catalogue's order so `SHOW CREATE TABLE` lists
/// them as the source did.
fn add_mysql_keys(table: &Table, name: &str) -> Option<String> {
    if table.indexes.is_empty() {
        return None;
    }
    let q = |s: &str| quote_ident(Engine::Mysql, s);
    let keys: Vec<String> = table
        .indexes
        .iter()
        .map(|i| {
            let cols: Vec<String> = i.columns.iter().map(|c| q(c)).collect();
            format!(
                "ADD {}KEY {} ({})",
                if i.unique { "UNIQUE " } else { "" },
                q(&i.name),
                cols.join(",")
            )
        })
        .collect();
    Some(format!("ALTER TABLE {} {}", q(name), keys.join(", ")))
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
            // The same engine keeps the declared type (`int(10) unsigned`).
            Engine::Mysql if source == Engine::Mysql => {
                format!("{q} {} AUTO_INCREMENT", c.declared_type.trim())
            }
            Engine::Mysql => format!(
                "{q} {} unsigned AUTO_INCREMENT",
                if big { "bigint" } else { "int" }
            ),
        };
    }
    let ty = if source == target {
        c.declared_type.trim().to_string()
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

/// `table` as the target will declare it: the column types come from the
/// very `CREATE TABLE` the restore runs ([`create_statements`]), so the
/// preflight checks against exactly what the target will hold.
#[must_use]
pub fn target_shape(source: Engine, target: Engine, table: &Table) -> Table {
    let mut shape = table.clone();
    if source == target {
        return shape;
    }
    // A catalogue the DDL refuses is refused by the manifest check first.
    let statements = create_statements(source, target, table, &table.name).unwrap_or_default();
    if let Some(create) = statements.first() {
        for c in &mut shape.columns {
            if let Some(t) = declared_type_in(create, target, &c.name) {
                c.declared_type = t;
            }
        }
    }
    shape.create_sql = None;
    shape
}

/// The type `create` (a statement rendered here: column definitions
/// joined by `", "`) declares for `column`, without NULL, NOT NULL or
/// AUTO_INCREMENT.
fn declared_type_in(create: &str, engine: Engine, column: &str) -> Option<String> {
    let q = quote_ident(engine, column);
    let start = [format!("({q} "), format!(", {q} ")]
        .iter()
        .find_map(|p| create.find(p.as_str()).map(|i| i + p.len()))?;
    let rest = &create[start..];
    let end = rest.find(", ").or_else(|| rest.rfind(')'))?;
    let mut ty = rest[..end].trim();
    loop {
        let before = ty;
        for suffix in [" NOT NULL", " NULL", " AUTO_INCREMENT"] {
            ty = ty.strip_suffix(suffix).unwrap_or(ty);
        }
        if ty == before {
            break;
        }
    }
    (!ty.is_empty()).then(|| ty.to_string())
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

    /// [`entries_table`] with the types `engine`'s catalogue gives it.
    fn table_for(engine: Engine) -> Table {
        let mut t = entries_table();
        if engine == Engine::Postgres {
            t.columns[1].declared_type = "timestamp with time zone".into();
            t.columns[3].declared_type = "text".into();
        }
        t
    }

    #[test]
    fn sqlite_to_mysql_uses_gorm_types() {
        let stmts = create_statements(
            Engine::Sqlite,
            Engine::Mysql,
            &entries_table(),
            "_spirekeep_new_selectors",
        )
        .unwrap();
        assert_eq!(stmts.len(), 2);
        assert_eq!(
            stmts[0],
            "CREATE TABLE `_spirekeep_new_selectors` (`id` int unsigned AUTO_INCREMENT, `created_at` datetime NULL, \
             `registered_entry_id` int unsigned, `type` varchar(255), PRIMARY KEY (`id`)) ENGINE=InnoDB ROW_FORMAT=DYNAMIC DEFAULT CHARSET=utf8"
        );
    }

    #[test]
    fn sqlite_to_postgres_uses_serial_and_text() {
        let stmts = create_statements(
            Engine::Sqlite,
            Engine::Postgres,
            &entries_table(),
            "selectors",
        )
        .unwrap();
        assert_eq!(
            stmts[0],
            "CREATE TABLE \"selectors\" (\"id\" serial, \"created_at\" timestamp with time zone, \"registered_entry_id\" integer, \"type\" text)"
        );
        assert_eq!(
            stmts[1],
            "ALTER TABLE \"selectors\" ADD PRIMARY KEY (\"id\")"
        );
        assert_eq!(
            stmts[2],
            "CREATE UNIQUE INDEX \"idx_selector_entry\" ON \"selectors\" (\"registered_entry_id\",\"type\")"
        );
    }

    #[test]
    fn same_engine_keeps_the_declared_types() {
        let mut t = entries_table();
        t.columns[0].declared_type = "int(10) unsigned".into();
        t.columns[2].declared_type = "int(10) unsigned".into();
        t.columns[1].declared_type = "datetime".into();
        let stmts = create_statements(Engine::Mysql, Engine::Mysql, &t, "_spirekeep_new_selectors")
            .unwrap();
        assert_eq!(
            stmts,
            vec![
                "CREATE TABLE `_spirekeep_new_selectors` (`id` int(10) unsigned AUTO_INCREMENT, `created_at` datetime NULL, \
                 `registered_entry_id` int(10) unsigned, `type` varchar(255), PRIMARY KEY (`id`)) \
                 ENGINE=InnoDB ROW_FORMAT=DYNAMIC DEFAULT CHARSET=utf8"
                    .to_string(),
                "ALTER TABLE `_spirekeep_new_selectors` ADD UNIQUE KEY `idx_selector_entry` (`registered_entry_id`,`type`)"
                    .to_string()
            ]
        );
    }

    /// Regression (issue 14): restore ran the DDL text stored in the manifest.
    #[test]
    fn stored_ddl_text_is_never_used() {
        for engine in [Engine::Sqlite, Engine::Postgres, Engine::Mysql] {
            let mut t = table_for(engine);
            t.create_sql = Some(format!(
                "CREATE TABLE {} (x int); DROP TABLE bundles; ATTACH DATABASE '/etc/x' AS y",
                quote_ident(engine, "selectors")
            ));
            let stmts = create_statements(engine, engine, &t, "selectors").unwrap();
            let all = stmts.join("\n");
            assert!(!all.contains("DROP"), "{engine}: {all}");
            assert!(!all.contains("ATTACH"), "{engine}: {all}");
            assert!(stmts[0].starts_with("CREATE TABLE"), "{engine}");
        }
    }

    /// Regression (issue 14): names and types from a manifest reached the DDL.
    #[test]
    fn tampered_names_and_types_are_refused() {
        let tamper: [fn(&mut Table); 6] = [
            |t| t.name = "selectors\"; DROP TABLE bundles; --".into(),
            |t| t.columns[3].name = "type` text); DROP TABLE bundles; -- ".into(),
            |t| t.columns[3].declared_type = "text); DROP TABLE bundles; --".into(),
            |t| t.columns[3].declared_type = "text, ATTACH DATABASE 'x' AS y".into(),
            |t| t.indexes[0].name = "i ON x; DROP TABLE y; --".into(),
            |t| t.indexes[0].columns[0] = "nope".into(),
        ];
        for (n, f) in tamper.iter().enumerate() {
            for engine in [Engine::Sqlite, Engine::Postgres, Engine::Mysql] {
                let mut t = table_for(engine);
                assert!(create_statements(engine, engine, &t, &t.name.clone()).is_ok());
                f(&mut t);
                let err = create_statements(engine, Engine::Sqlite, &t, "selectors").unwrap_err();
                assert!(
                    err.to_string().contains("nothing was run"),
                    "{n} {engine}: {err}"
                );
            }
        }
    }

    #[test]
    fn the_types_spire_uses_are_known_and_others_are_not() {
        for ty in [
            "integer",
            "bigint",
            "varchar(255)",
            "datetime",
            "bool",
            "blob",
            "int(10) unsigned",
            "INT UNSIGNED",
            "tinyint(1)",
            "longblob",
            "decimal(10,2)",
        ] {
            assert!(is_known_type(Engine::Sqlite, ty), "{ty}");
            assert!(is_known_type(Engine::Mysql, ty), "{ty}");
        }
        for ty in [
            "integer",
            "text",
            "timestamp with time zone",
            "timestamp(6) without time zone",
            "character varying(255)",
            "bytea",
            "boolean",
            "double precision",
        ] {
            assert!(is_known_type(Engine::Postgres, ty), "{ty}");
        }
        for ty in [
            "",
            "int; drop",
            "int(1)(2)",
            "int(1,2,3)",
            "varchar(99999999)",
            "text collate \"x\"",
            "int unsigned unsigned",
            "integer)",
        ] {
            assert!(!is_known_type(Engine::Mysql, ty), "{ty:?}");
            assert!(!is_known_type(Engine::Postgres, ty), "{ty:?}");
        }
        assert!(is_plain_identifier("registered_entries"));
        assert!(!is_plain_identifier("1abc"));
        assert!(!is_plain_identifier(&"a".repeat(65)));
        assert!(!is_plain_identifier("a b"));
    }

    /// [`entries_table`] with a NOT NULL text column and a `bigint` beside it,
    /// as a catalogue read from SQLite gives them.
    fn shape_table() -> Table {
        let mut t = entries_table();
        t.columns[3].nullable = false;
        t.columns.push(Column {
            name: "expiry".into(),
            declared_type: "bigint".into(),
            kind: ColumnKind::Integer,
            nullable: true,
            auto_increment: false,
        });
        t.create_sql = Some("CREATE TABLE \"selectors\" (...)".into());
        t
    }

    fn types(t: &Table) -> Vec<&str> {
        t.columns.iter().map(|c| c.declared_type.as_str()).collect()
    }

    #[test]
    fn target_shape_reads_the_ddl_that_will_run() {
        let t = shape_table();
        assert_eq!(
            types(&target_shape(Engine::Sqlite, Engine::Mysql, &t)),
            vec![
                "int unsigned",
                "datetime",
                "int unsigned",
                "varchar(255)",
                "bigint"
            ]
        );
        assert_eq!(
            types(&target_shape(Engine::Sqlite, Engine::Postgres, &t)),
            vec![
                "serial",
                "timestamp with time zone",
                "integer",
                "text",
                "bigint"
            ]
        );
        // The same engine keeps the catalogue's own types.
        assert_eq!(
            types(&target_shape(Engine::Sqlite, Engine::Sqlite, &t)),
            types(&t)
        );
    }
}
