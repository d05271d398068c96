//! SQL text for the stand-in's few writes, per engine.
//!
//! The library's `Datastore` trait runs scripts but binds no parameters, so
//! values go in as literals. Every value that reaches here is either produced
//! by the stand-in or validated first (SPIFFE IDs, versions, attestor names);
//! the quoting below is the second line of defence, not the first.

use spirekeep::datastore::{Engine, quote_ident, timefmt};
use time::OffsetDateTime;

/// `'text'` with the engine's escaping (MySQL also treats `\` as an escape).
pub fn string(engine: Engine, s: &str) -> String {
    let escaped = s.replace('\'', "''");
    let escaped = match engine {
        Engine::Mysql => escaped.replace('\\', "\\\\"),
        Engine::Sqlite | Engine::Postgres => escaped,
    };
    format!("'{escaped}'")
}

/// A timestamp literal as SPIRE's driver writes it on `engine`: go-sqlite3
/// text, a `timestamptz` literal, or a UTC `DATETIME` literal.
pub fn timestamp(engine: Engine, t: OffsetDateTime) -> String {
    match engine {
        Engine::Sqlite => format!("'{}'", timefmt::format_sqlite_datetime(t)),
        Engine::Postgres => format!("'{}+00'", timefmt::format_mysql_datetime(t)),
        Engine::Mysql => format!("'{}'", timefmt::format_mysql_datetime(t)),
    }
}

/// A boolean literal (go-sqlite3 and go-sql-driver store 0/1).
pub fn boolean(engine: Engine, b: bool) -> &'static str {
    match (engine, b) {
        (Engine::Postgres, true) => "true",
        (Engine::Postgres, false) => "false",
        (_, true) => "1",
        (_, false) => "0",
    }
}

/// A quoted identifier.
pub fn ident(engine: Engine, name: &str) -> String {
    quote_ident(engine, name)
}

/// `INSERT INTO table (cols) VALUES (vals)`.
pub fn insert(engine: Engine, table: &str, values: &[(&str, String)]) -> String {
    let cols: Vec<String> = values.iter().map(|(c, _)| ident(engine, c)).collect();
    let vals: Vec<&str> = values.iter().map(|(_, v)| v.as_str()).collect();
    format!(
        "INSERT INTO {} ({}) VALUES ({})",
        ident(engine, table),
        cols.join(", "),
        vals.join(", ")
    )
}

/// `INSERT ...` that updates `update` columns when `key` (a unique index)
/// already holds the row: `ON CONFLICT` on SQLite and PostgreSQL, `ON
/// DUPLICATE KEY UPDATE` on MySQL. One statement, so atomic on every engine.
pub fn upsert(
    engine: Engine,
    table: &str,
    key: &str,
    values: &[(&str, String)],
    update: &[&str],
) -> String {
    let sets: Vec<String> = values
        .iter()
        .filter(|(c, _)| update.contains(c))
        .map(|(c, v)| format!("{} = {v}", ident(engine, c)))
        .collect();
    let head = insert(engine, table, values);
    match engine {
        Engine::Mysql => format!("{head} ON DUPLICATE KEY UPDATE {}", sets.join(", ")),
        Engine::Sqlite | Engine::Postgres => format!(
            "{head} ON CONFLICT ({}) DO UPDATE SET {}",
            ident(engine, key),
            sets.join(", ")
        ),
    }
}
