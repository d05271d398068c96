//! Engine-neutral column kinds and values.
//!
//! Every engine's rows are read into [`Value`]s and written back from them, so a
//! snapshot taken on one engine can be restored on another. The kinds are the
//! ones GORM v1 produces for SPIRE's models (spire-reference §2.2), plus `Float`
//! for tables a future SPIRE might add.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// The logical type of a column, derived from its engine-specific declared type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnKind {
    /// Any integer (`integer`, `bigint`, `int unsigned`, `serial`).
    Integer,
    /// `bool` (SQLite 0/1), `boolean`, MySQL `tinyint(1)`.
    Boolean,
    /// `varchar(n)`, `text`.
    Text,
    /// `blob`, `bytea`, `longblob`, `varbinary(n)`.
    Bytes,
    /// `datetime`, `timestamp with time zone`.
    Timestamp,
    /// `real`, `double precision`, `float`, `decimal`.
    Float,
}

impl ColumnKind {
    /// Classifies a SQLite declared type, following SQLite's affinity rules but
    /// recognising the `bool` and `datetime` spellings go-sqlite3 relies on.
    #[must_use]
    pub fn from_sqlite_type(declared: &str) -> Self {
        let t = declared.to_ascii_lowercase();
        if t.starts_with("bool") {
            Self::Boolean
        } else if t.contains("date") || t.contains("time") {
            Self::Timestamp
        } else if t.contains("int") {
            Self::Integer
        } else if t.contains("char") || t.contains("clob") || t.contains("text") {
            Self::Text
        } else if t.contains("real")
            || t.contains("floa")
            || t.contains("doub")
            || t.contains("num")
            || t.contains("dec")
        {
            Self::Float
        } else {
            // SQLite gives BLOB affinity to `blob` and to an empty type.
            Self::Bytes
        }
    }

    /// Classifies a PostgreSQL type as printed by `format_type()`.
    #[must_use]
    pub fn from_postgres_type(formatted: &str) -> Self {
        let t = formatted.to_ascii_lowercase();
        if t == "boolean" {
            Self::Boolean
        } else if t.starts_with("timestamp") || t == "date" {
            Self::Timestamp
        } else if t == "integer" || t == "bigint" || t == "smallint" {
            Self::Integer
        } else if t == "bytea" {
            Self::Bytes
        } else if t == "real" || t.starts_with("double") || t.starts_with("numeric") {
            Self::Float
        } else {
            Self::Text
        }
    }

    /// Classifies a MySQL `COLUMN_TYPE` (e.g. `int(10) unsigned`, `tinyint(1)`).
    #[must_use]
    pub fn from_mysql_type(column_type: &str) -> Self {
        let t = column_type.to_ascii_lowercase();
        if t.starts_with("tinyint(1)") || t.starts_with("bool") {
            Self::Boolean
        } else if t.starts_with("datetime") || t.starts_with("timestamp") || t == "date" {
            Self::Timestamp
        } else if t.contains("int") {
            Self::Integer
        } else if t.contains("blob") || t.contains("binary") {
            Self::Bytes
        } else if t.starts_with("float") || t.starts_with("double") || t.starts_with("decimal") {
            Self::Float
        } else {
            Self::Text
        }
    }
}

/// One column value, independent of the engine it came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
    Bytes(Vec<u8>),
    /// Always held in UTC, with the engine's full precision (nanoseconds from SQLite).
    Timestamp(OffsetDateTime),
}

impl Value {
    /// A short name of the variant, for error messages.
    #[must_use]
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Null => "null",
            Self::Bool(_) => "bool",
            Self::Int(_) => "integer",
            Self::Float(_) => "float",
            Self::Text(_) => "text",
            Self::Bytes(_) => "bytes",
            Self::Timestamp(_) => "timestamp",
        }
    }

    /// Makes this value the text `text`, reusing its buffer when it holds
    /// text already (a reader refilling a handed-back batch).
    pub fn set_text(&mut self, text: &str) {
        match self {
            Self::Text(s) if reusable(s.capacity(), text.len()) => {
                s.clear();
                s.push_str(text);
            }
            _ => *self = Self::Text(text.to_owned()),
        }
    }

    /// [`Self::set_text`] for bytes.
    pub fn set_bytes(&mut self, bytes: &[u8]) {
        match self {
            Self::Bytes(b) if reusable(b.capacity(), bytes.len()) => {
                b.clear();
                b.extend_from_slice(bytes);
            }
            _ => *self = Self::Bytes(bytes.to_vec()),
        }
    }
}

/// Whether a buffer of `capacity` bytes is reused for `len` bytes: not when it
/// is far larger, so one large value does not pin its size in every batch
/// that reuses the row.
fn reusable(capacity: usize, len: usize) -> bool {
    capacity <= 2 * len + 64
}
