//! SQLite's bulk read path for backups: rusqlite on a blocking thread.
//!
//! sqlx's SQLite driver runs each statement on a worker thread and hands
//! every row to the caller through a channel: profiling a backup showed most
//! of its time in the two threads waking each other (futex calls), not in
//! SQLite. Here one thread steps the statement, decodes the values and sends
//! whole batches. The values are exactly those of the driver path
//! ([`super::decode_row`]): the storage class decides, the column's kind only
//! refines (integers of a boolean column, datetime text of a timestamp
//! column, text of a bytes column).

use std::path::Path;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};

use crate::datastore::batches::{RowBatcher, RowSlots};
use crate::datastore::timefmt::parse_sqlite_datetime;
use crate::datastore::{ColumnKind, Value};

/// Why a bulk read stopped.
#[derive(Debug)]
pub(super) enum ReadError {
    /// SQLite reported an error (or a value could not be decoded).
    Sqlite(String),
    /// The consumer of the rows went away.
    Stopped,
}

/// Opens `path` (read-only when `read_only`) and starts a read transaction
/// whose snapshot is taken at once. Returns the connection and the schema
/// version that snapshot sees.
pub(super) fn begin(path: &Path, read_only: bool) -> Result<(Connection, i64), String> {
    let access = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
    };
    let conn = Connection::open_with_flags(path, access | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|e| e.to_string())?;
    // sqlx's default, so both paths wait alike for a writer's lock.
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    conn.execute_batch("BEGIN DEFERRED")
        .map_err(|e| e.to_string())?;
    // A deferred transaction takes its snapshot at the first read.
    let schema_version: i64 = conn
        .query_row("PRAGMA schema_version", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    Ok((conn, schema_version))
}

/// Runs `sql` and sends its rows to `out` in batches of at most
/// [`ROW_BATCH`](crate::datastore::ROW_BATCH). Returns the number of rows sent.
pub(super) fn stream(
    conn: &Connection,
    sql: &str,
    kinds: &[ColumnKind],
    out: &crate::datastore::RowSender,
) -> Result<u64, ReadError> {
    let sqlite = |e: rusqlite::Error| ReadError::Sqlite(e.to_string());
    let mut statement = conn.prepare(sql).map_err(sqlite)?;
    let mut rows = statement.query([]).map_err(sqlite)?;
    let mut batcher = RowBatcher::new(out);
    while let Some(row) = rows.next().map_err(sqlite)? {
        // Refills a handed-back row in place (see `row_channel`).
        let values = batcher.slot(kinds.len());
        for (i, (value, kind)) in values.iter_mut().zip(kinds).enumerate() {
            decode_into(value, row.get_ref(i).map_err(sqlite)?, *kind)?;
        }
        batcher.commit();
        batcher
            .send_if_full_blocking()
            .map_err(|_| ReadError::Stopped)?;
    }
    batcher.finish_blocking().map_err(|_| ReadError::Stopped)
}

/// Decodes `value` into `slot`, reusing the slot's buffer for text and bytes.
fn decode_into(slot: &mut Value, value: ValueRef<'_>, kind: ColumnKind) -> Result<(), ReadError> {
    *slot = match value {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(x) if kind == ColumnKind::Boolean => Value::Bool(x != 0),
        ValueRef::Integer(x) => Value::Int(x),
        ValueRef::Real(x) => Value::Float(x),
        ValueRef::Blob(b) => {
            slot.set_bytes(b);
            return Ok(());
        }
        ValueRef::Text(t) => {
            let text = std::str::from_utf8(t)
                .map_err(|e| ReadError::Sqlite(format!("a text value that is not UTF-8 ({e})")))?;
            match kind {
                ColumnKind::Timestamp => match parse_sqlite_datetime(text) {
                    Some(t) => Value::Timestamp(t),
                    None => {
                        slot.set_text(text);
                        return Ok(());
                    }
                },
                ColumnKind::Bytes => {
                    slot.set_bytes(t);
                    return Ok(());
                }
                _ => {
                    slot.set_text(text);
                    return Ok(());
                }
            }
        }
    };
    Ok(())
}
