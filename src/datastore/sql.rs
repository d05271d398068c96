//! SQL text shared by the engine drivers.

use super::catalogue::{Column, Table};
use super::dsn::Engine;
use super::{ColumnKind, quote_ident};

/// `SELECT <expr per column> FROM table ORDER BY <primary key>`; `expr` lets
/// an engine cast a column into something its driver decodes reliably.
pub(crate) fn select_all_sql(
    engine: Engine,
    table: &Table,
    expr: impl Fn(&Column) -> String,
) -> String {
    let cols: Vec<String> = table.columns.iter().map(expr).collect();
    let order: Vec<String> = if table.primary_key.is_empty() {
        table
            .columns
            .iter()
            .map(|c| quote_ident(engine, &c.name))
            .collect()
    } else {
        table
            .primary_key
            .iter()
            .map(|c| quote_ident(engine, c))
            .collect()
    };
    format!(
        "SELECT {} FROM {} ORDER BY {}",
        cols.join(", "),
        quote_ident(engine, &table.name),
        order.join(", ")
    )
}

/// `INSERT INTO table (cols) ` for a multi-row VALUES list.
pub(crate) fn insert_head(engine: Engine, table: &str, columns: &[(String, ColumnKind)]) -> String {
    let cols: Vec<String> = columns
        .iter()
        .map(|(c, _)| quote_ident(engine, c))
        .collect();
    format!(
        "INSERT INTO {} ({}) ",
        quote_ident(engine, table),
        cols.join(", ")
    )
}
