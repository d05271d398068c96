//! The live catalogue of a datastore: tables, columns, keys and indexes.

use serde::{Deserialize, Serialize};

use super::ColumnKind;

/// Every user table of a datastore, sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalogue {
    pub tables: Vec<Table>,
}

impl Catalogue {
    /// The table called `name`, if the datastore has it.
    #[must_use]
    pub fn table(&self, name: &str) -> Option<&Table> {
        self.tables.iter().find(|t| t.name == name)
    }

    /// Whether `table` exists and has `column`.
    #[must_use]
    pub fn has_column(&self, table: &str, column: &str) -> bool {
        self.table(table)
            .is_some_and(|t| t.column(column).is_some())
    }
}

/// One table as the engine describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    pub name: String,
    /// Columns in their declared order.
    pub columns: Vec<Column>,
    /// Primary-key column names in key order (empty if the table has none).
    pub primary_key: Vec<String>,
    /// Named secondary indexes, sorted by name (the primary key is not listed).
    pub indexes: Vec<Index>,
    /// The engine's own `CREATE TABLE` text where it keeps one (SQLite, MySQL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_sql: Option<String>,
}

impl Table {
    /// A table of nullable columns with no keys or indexes: how a query's
    /// result (or a test's rows) is described to the row readers.
    #[must_use]
    pub fn of_columns(name: &str, columns: &[(&str, ColumnKind)]) -> Self {
        Self {
            name: name.to_string(),
            columns: columns
                .iter()
                .map(|(n, k)| Column {
                    name: (*n).to_string(),
                    declared_type: String::new(),
                    kind: *k,
                    nullable: true,
                    auto_increment: false,
                })
                .collect(),
            primary_key: Vec::new(),
            indexes: Vec::new(),
            create_sql: None,
        }
    }

    /// The column called `name`.
    #[must_use]
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// One column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    /// The declared type as the engine prints it (`varchar(255)`, `timestamp with time zone`, `int(10) unsigned`).
    pub declared_type: String,
    pub kind: ColumnKind,
    pub nullable: bool,
    /// Filled in by the engine (`AUTOINCREMENT`, `serial`, `AUTO_INCREMENT`).
    pub auto_increment: bool,
}

/// One secondary index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    pub name: String,
    pub columns: Vec<String>,
    pub unique: bool,
}
