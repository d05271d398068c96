//! MySQL and MariaDB, as SPIRE uses them through go-sql-driver (GORM:
//! `int unsigned AUTO_INCREMENT`, `varchar(255)`, whole-second `DATETIME`,
//! `longblob`, utf8 tables).

use async_trait::async_trait;
use sqlx::mysql::{MySqlPool, MySqlPoolOptions, MySqlRow, MySqlValueRef};
use sqlx::{AssertSqlSafe, Decode, MySql, Row, TypeInfo, ValueRef};

use super::NextId;
use super::batches::{ConsumerStopped, RowBatcher, RowSlots, bind_as_given, insert_values};
use super::catalogue::{Catalogue, Column, Index, Table};
use super::driver_error::classify;
use super::dsn::{Engine, MysqlSpec};
use super::sql::select_all_sql;
use super::timefmt::{format_mysql_datetime, parse_mysql_datetime};
use super::{
    ColumnKind, CommitOutcome, Datastore, LiveSession, RESTORE_LOCK_WAIT, RestoreWrite,
    STAGING_PREFIXES, SnapshotRead, Value, ddl, is_staging_table, quote_ident, restore_busy,
};
use crate::error::{Error, Result};

pub(crate) struct MysqlDatastore {
    pool: MySqlPool,
    location: String,
}

impl MysqlDatastore {
    pub(crate) async fn open(spec: &MysqlSpec) -> Result<Self> {
        let location = spec.display.clone();
        let options = super::quiet_slow_statements(spec.options.clone());
        super::probe_connection(&options, &location).await?;
        let registry = location.clone();
        let pool = MySqlPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(std::time::Duration::from_secs(15))
            // Every connection of the pool is noted as this process's own
            // (see `other_sessions`).
            .after_connect(move |conn, _meta| {
                let registry = registry.clone();
                Box::pin(async move {
                    let id: i64 = sqlx::query_scalar("SELECT CAST(CONNECTION_ID() AS SIGNED)")
                        .fetch_one(&mut *conn)
                        .await?;
                    own_connections()
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert((registry, id));
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(|e| classify(&e, &location))?;
        Ok(Self { pool, location })
    }

    fn err(&self, e: &sqlx::Error) -> Error {
        classify(e, &self.location)
    }
}

/// The connection ids of every connection this process opened, per
/// datastore location. MySQL has no application name to tell spirekeep's
/// sessions from SPIRE's, so each connection of every pool records its
/// `CONNECTION_ID()` when it is opened (`after_connect`), and
/// [`Datastore::other_sessions`] leaves those out. Ids are never reused while
/// the server runs, so a connection closed since cannot hide another client.
/// It is per process, not per pool: a second [`Datastore`] of this process
/// (the plan's facts, a test's own view) is not another client either.
fn own_connections() -> &'static std::sync::Mutex<std::collections::HashSet<(String, i64)>> {
    static IDS: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<(String, i64)>>> =
        std::sync::OnceLock::new();
    IDS.get_or_init(Default::default)
}

/// Other sessions on the current database. Without the `PROCESS` privilege
/// a user sees only its own sessions. Server threads (replication, the event
/// scheduler) are not clients.
const OTHER_SESSIONS_SQL: &str = "SELECT CAST(ID AS SIGNED), CAST(HOST AS CHAR), CAST(USER AS CHAR) \
  FROM information_schema.PROCESSLIST \
 WHERE DB = DATABASE() AND ID <> CONNECTION_ID() AND COMMAND <> 'Daemon' \
   AND USER NOT IN ('system user', 'event_scheduler')";

/// `host:port` as MySQL's process list shows it, without the port
/// (`10.0.0.7:51234` → `10.0.0.7`; `localhost` for a socket stays).
fn host_without_port(host: &str) -> String {
    match host.rsplit_once(':') {
        Some((h, port))
            if !h.is_empty() && !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) =>
        {
            h.to_string()
        }
        _ => host.to_string(),
    }
}

const COLUMNS_SQL: &str = "SELECT CAST(TABLE_NAME AS CHAR), CAST(COLUMN_NAME AS CHAR), CAST(COLUMN_TYPE AS CHAR), \
       CAST(IS_NULLABLE AS CHAR), CAST(EXTRA AS CHAR) \
  FROM information_schema.COLUMNS c \
 WHERE TABLE_SCHEMA = DATABASE() \
   AND TABLE_NAME IN (SELECT TABLE_NAME FROM information_schema.TABLES t WHERE t.TABLE_SCHEMA = DATABASE() AND t.TABLE_TYPE = 'BASE TABLE') \
 ORDER BY TABLE_NAME, ORDINAL_POSITION";

/// The name of the per-database restore lock (`GET_LOCK` names are at most 64 characters).
const RESTORE_LOCK_SQL: &str = "CONCAT('spirekeep.restore.', SHA1(DATABASE()))";

/// The name of the per-database swap lock. A restore holds it across its
/// `RENAME TABLE` and the drops after it; a reader holds it while it lists
/// the tables. `information_schema` takes no metadata lock, so without it a
/// reader could list the tables halfway through a multi-table rename (the
/// ones already moved aside missing, their replacements not yet in place)
/// and back up, or compare, a datastore with tables missing. The server
/// finishes a statement whose client was killed, so the rename of a killed
/// restore still completes; its session, and the lock, end right after.
const SWAP_LOCK_SQL: &str = "CONCAT('spirekeep.swap.', SHA1(DATABASE()))";

/// How long a reader waits for a swap in progress, and a swap for readers
/// listing tables (both hold the lock for well under a second).
const SWAP_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

const INDEXES_SQL: &str = "SELECT CAST(TABLE_NAME AS CHAR), CAST(INDEX_NAME AS CHAR), CAST(NON_UNIQUE AS SIGNED), CAST(COLUMN_NAME AS CHAR) \
  FROM information_schema.STATISTICS \
 WHERE TABLE_SCHEMA = DATABASE() \
 ORDER BY TABLE_NAME, INDEX_NAME, SEQ_IN_INDEX";

#[async_trait]
impl Datastore for MysqlDatastore {
    fn engine(&self) -> Engine {
        Engine::Mysql
    }

    fn location(&self) -> &str {
        &self.location
    }

    async fn server_version(&self) -> Result<String> {
        sqlx::query_scalar::<_, String>("SELECT VERSION()")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.err(&e))
    }

    async fn catalogue(&self) -> Result<Catalogue> {
        let mut conn = self.pool.acquire().await.map_err(|e| self.err(&e))?;
        catalogue_on(&mut conn, &self.location).await
    }

    async fn count_rows(&self, table: &str) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {}",
            quote_ident(Engine::Mysql, table)
        )))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| self.err(&e))?;
        Ok(n.unsigned_abs())
    }

    async fn count_by(&self, table: &str, column: &str) -> Result<Vec<(Option<String>, u64)>> {
        let rows: Vec<(Option<String>, i64)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT CAST({c} AS CHAR), count(*) FROM {t} GROUP BY {c} ORDER BY 1",
            c = quote_ident(Engine::Mysql, column),
            t = quote_ident(Engine::Mysql, table)
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(&e))?;
        Ok(rows
            .into_iter()
            .map(|(v, n)| (v, n.unsigned_abs()))
            .collect())
    }

    async fn read_table(&self, table: &Table) -> Result<Vec<Vec<Value>>> {
        let sql = select_all_sql(Engine::Mysql, table, select_expr);
        let rows = sqlx::query(AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(&e))?;
        let kinds: Vec<ColumnKind> = table.columns.iter().map(|c| c.kind).collect();
        rows.iter()
            .map(|r| decode_row(r, table, &kinds).map_err(|e| self.err(&e)))
            .collect()
    }

    async fn execute_script(&self, sql: &str) -> Result<()> {
        sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(&e))?;
        Ok(())
    }

    async fn insert_rows(
        &self,
        table: &str,
        columns: &[(String, ColumnKind)],
        rows: &[Vec<Value>],
    ) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(|e| self.err(&e))?;
        let budget = statement_budget(&mut tx, &self.location).await?;
        insert_on(&mut tx, table, columns, rows, budget, &self.location).await?;
        tx.commit().await.map_err(|e| self.err(&e))
    }

    async fn begin_snapshot(&self) -> Result<Box<dyn SnapshotRead>> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| self.err(&e))?
            .detach();
        // Applies to the next transaction only; works on MariaDB and MySQL 8 alike.
        exec_on(
            &mut conn,
            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
            &self.location,
        )
        .await?;
        exec_on(
            &mut conn,
            "START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY",
            &self.location,
        )
        .await?;
        Ok(Box::new(Snapshot {
            conn,
            location: self.location.clone(),
        }))
    }

    async fn begin_restore(&self, existing: &[String]) -> Result<Box<dyn RestoreWrite>> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| self.err(&e))?
            .detach();
        // One restore per database at a time: the lock belongs to this
        // session, so it also ends when a killed restore's connection does.
        let got: Option<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT GET_LOCK({RESTORE_LOCK_SQL}, {})",
            RESTORE_LOCK_WAIT.as_secs()
        )))
        .fetch_one(&mut conn)
        .await
        .map_err(|e| self.err(&e))?;
        if got != Some(1) {
            return Err(restore_busy(&self.location));
        }
        // Holding the lock, any staging table is a leftover of a restore that
        // was killed (before its swap, or between the swap and the drop).
        let stale: Vec<String> = sqlx::query_scalar(
            "SELECT CAST(TABLE_NAME AS CHAR) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE()",
        )
        .fetch_all(&mut conn)
        .await
        .map_err(|e| self.err(&e))?;
        for t in stale.iter().filter(|t| is_staging_table(t)) {
            exec_on(
                &mut conn,
                &format!("DROP TABLE IF EXISTS {}", quote_ident(Engine::Mysql, t)),
                &self.location,
            )
            .await?;
        }
        // As a mysqldump replay does: the staging tables are new and hold
        // only a verified snapshot's rows, and InnoDB loads an empty table
        // inside a transaction in bulk (sorted, without per-row undo) when
        // both checks are off. Their only unique key during the load is the
        // primary key, which is always checked; the checks are back on for
        // the secondary keys' `ALTER TABLE` and for the swap.
        exec_on(&mut conn, LOAD_CHECKS_OFF, &self.location).await?;
        let statement_budget = statement_budget(&mut conn, &self.location).await?;
        Ok(Box::new(Restore {
            conn,
            location: self.location.clone(),
            existing: existing.to_vec(),
            loading: false,
            pending_keys: Vec::new(),
            statement_budget,
        }))
    }

    async fn next_id(&self, _table: &str, _column: &str) -> Result<NextId> {
        Ok(NextId::Unknown(
            "InnoDB keeps AUTO_INCREMENT past the largest id inserted".into(),
        ))
    }

    async fn other_sessions(&self) -> Result<Vec<LiveSession>> {
        let rows: Vec<(i64, Option<String>, Option<String>)> = sqlx::query_as(OTHER_SESSIONS_SQL)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(&e))?;
        let mut groups: std::collections::BTreeMap<(Option<String>, Option<String>), u64> =
            std::collections::BTreeMap::new();
        {
            let own = own_connections()
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (id, host, user) in rows {
                if own.contains(&(self.location.clone(), id)) {
                    continue;
                }
                *groups
                    .entry((host.as_deref().map(host_without_port), user))
                    .or_default() += 1;
            }
        }
        let mut sessions: Vec<LiveSession> = groups
            .into_iter()
            .map(|((host, user), n)| LiveSession {
                host,
                application: None,
                user,
                pid: None,
                connections: n,
                note: Some("MySQL names no application".into()),
            })
            .collect();
        sessions.sort_by_key(|s| std::cmp::Reverse(s.connections));
        Ok(sessions)
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

/// Casts that make every column decode the same way whatever its exact
/// MySQL type (`tinyint(1)`, zero dates). Integers are not cast: `CAST(… AS
/// SIGNED)` wraps a `BIGINT UNSIGNED` past `i64` to a negative number (with
/// only a warning), so they keep their own type and [`decode_integer`] reads
/// the sign from the column.
fn select_expr(c: &Column) -> String {
    let q = quote_ident(Engine::Mysql, &c.name);
    match c.kind {
        ColumnKind::Boolean => format!("CAST({q} AS SIGNED)"),
        ColumnKind::Float => format!("CAST({q} AS DOUBLE)"),
        ColumnKind::Timestamp => format!("CAST({q} AS CHAR)"),
        ColumnKind::Integer | ColumnKind::Text | ColumnKind::Bytes => q,
    }
}

fn decode_row(
    row: &MySqlRow,
    table: &Table,
    kinds: &[ColumnKind],
) -> std::result::Result<Vec<Value>, sqlx::Error> {
    let mut out = vec![Value::Null; kinds.len()];
    decode_row_into(row, table, kinds, &mut out)?;
    Ok(out)
}

/// An integer of any MySQL width and sign, in either protocol, as `i64`. An
/// unsigned column is read as `u64` (the binary protocol's `i64` read would
/// sign-extend an `INT UNSIGNED` of 4294967295 to -1), and a value past
/// `i64::MAX` is an error, never wrapped.
fn decode_integer(raw: MySqlValueRef<'_>) -> std::result::Result<i64, sqlx::error::BoxDynError> {
    if !raw.type_info().name().ends_with("UNSIGNED") {
        return <i64 as Decode<MySql>>::decode(raw);
    }
    let wide = <u64 as Decode<MySql>>::decode(raw)?;
    i64::try_from(wide)
        .map_err(|_| format!("{wide} is too large for a signed 64-bit integer").into())
}

/// Decodes `row` into `out` (one slot per column), reusing the slots' text
/// and bytes buffers (see [`crate::datastore::row_channel`]). The row comes
/// from either protocol: the binary one with [`select_expr`]'s casts, or the
/// text one with the columns as they are, where integers of any width or sign
/// and timestamps arrive as text. So integers and timestamps are decoded
/// without sqlx's type check (it would refuse an unsigned column as `i64`,
/// and a `DATETIME` as text); an integer outside `i64` is an error, never
/// wrapped.
fn decode_row_into(
    row: &MySqlRow,
    table: &Table,
    kinds: &[ColumnKind],
    out: &mut [Value],
) -> std::result::Result<(), sqlx::Error> {
    for (i, (kind, slot)) in kinds.iter().zip(out).enumerate() {
        // One look-up per value: its raw form, decoded as the kind says
        // (sqlx's `try_get` looked the value up again to check its type).
        let raw = row.try_get_raw(i)?;
        if raw.is_null() {
            *slot = Value::Null;
            continue;
        }
        // The error names the table and column, not the column's index.
        let decoded = |source| sqlx::Error::ColumnDecode {
            index: format!("{}.{}", table.name, table.columns[i].name),
            source,
        };
        match kind {
            ColumnKind::Integer => *slot = Value::Int(decode_integer(raw).map_err(decoded)?),
            ColumnKind::Boolean => {
                *slot = Value::Bool(<i64 as Decode<MySql>>::decode(raw).map_err(decoded)? != 0)
            }
            // The binary protocol, where the type decides the width (a
            // `FLOAT` comes as 4 bytes, a `DOUBLE` as 8).
            ColumnKind::Float => {
                *slot = Value::Float(<f64 as Decode<MySql>>::decode(raw).map_err(decoded)?)
            }
            ColumnKind::Text => {
                slot.set_text(<&str as Decode<MySql>>::decode(raw).map_err(decoded)?)
            }
            ColumnKind::Bytes => {
                slot.set_bytes(<&[u8] as Decode<MySql>>::decode(raw).map_err(decoded)?)
            }
            ColumnKind::Timestamp => {
                let text = <&str as Decode<MySql>>::decode(raw).map_err(decoded)?;
                match parse_mysql_datetime(text) {
                    Some(t) => *slot = Value::Timestamp(t),
                    None => slot.set_text(text),
                }
            }
        }
    }
    Ok(())
}

/// Takes the database's swap lock on `conn` (see [`SWAP_LOCK_SQL`]).
async fn take_swap_lock(conn: &mut sqlx::mysql::MySqlConnection, location: &str) -> Result<()> {
    let got: Option<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT GET_LOCK({SWAP_LOCK_SQL}, {})",
        SWAP_LOCK_WAIT.as_secs()
    )))
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| classify(&e, location))?;
    if got == Some(1) {
        return Ok(());
    }
    Err(Error::Aborted(format!(
        "a restore into {location} kept swapping its tables in for over {} s (the database's swap lock \
         was not released); check the database's process list, then run this again",
        SWAP_LOCK_WAIT.as_secs()
    )))
}

/// Releases the swap lock taken by [`take_swap_lock`] (ending the session would too).
async fn release_swap_lock(conn: &mut sqlx::mysql::MySqlConnection, location: &str) {
    let _ = exec_on(conn, &format!("DO RELEASE_LOCK({SWAP_LOCK_SQL})"), location).await;
}

/// Reads the catalogue on one connection (inside a snapshot transaction, if
/// one is open): between restores' swaps, never halfway through one.
async fn catalogue_on(
    conn: &mut sqlx::mysql::MySqlConnection,
    location: &str,
) -> Result<Catalogue> {
    take_swap_lock(conn, location).await?;
    let listed = catalogue_unlocked(conn, location).await;
    release_swap_lock(conn, location).await;
    listed
}

async fn catalogue_unlocked(
    conn: &mut sqlx::mysql::MySqlConnection,
    location: &str,
) -> Result<Catalogue> {
    let cols: Vec<(String, String, String, String, String)> = sqlx::query_as(COLUMNS_SQL)
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| classify(&e, location))?;
    let mut tables: Vec<Table> = Vec::new();
    for (table, name, ty, nullable, extra) in cols {
        if tables.last().is_none_or(|t| t.name != table) {
            tables.push(Table {
                name: table.clone(),
                columns: Vec::new(),
                primary_key: Vec::new(),
                indexes: Vec::new(),
                create_sql: None,
            });
        }
        let t = tables.last_mut().expect("just pushed");
        t.columns.push(Column {
            name,
            kind: ColumnKind::from_mysql_type(&ty),
            declared_type: ty,
            nullable: nullable == "YES",
            auto_increment: extra.to_ascii_lowercase().contains("auto_increment"),
        });
    }
    // A restore's staging tables are never the user's.
    tables.retain(|t| !is_staging_table(&t.name));
    let idx: Vec<(String, String, i64, String)> = sqlx::query_as(INDEXES_SQL)
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| classify(&e, location))?;
    for (table, name, non_unique, column) in idx {
        let Some(t) = tables.iter_mut().find(|t| t.name == table) else {
            continue;
        };
        if name == "PRIMARY" {
            t.primary_key.push(column);
        } else if let Some(i) = t.indexes.iter_mut().find(|i| i.name == name) {
            i.columns.push(column);
        } else {
            t.indexes.push(Index {
                name,
                columns: vec![column],
                unique: non_unique == 0,
            });
        }
    }
    for t in &mut tables {
        let row: (String, String) = sqlx::query_as(AssertSqlSafe(format!(
            "SHOW CREATE TABLE {}",
            quote_ident(Engine::Mysql, &t.name)
        )))
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| classify(&e, location))?;
        t.create_sql = Some(row.1);
    }
    Ok(Catalogue { tables })
}

/// The bytes of values one statement may carry on `conn`: half the server's
/// `max_allowed_packet`, which bounds a whole statement (4 MiB by default on
/// MySQL 5.7, 16 MiB on MariaDB), leaving room for the rest of it.
async fn statement_budget(
    conn: &mut sqlx::mysql::MySqlConnection,
    location: &str,
) -> Result<usize> {
    let packet: u64 = sqlx::query_scalar("SELECT CAST(@@max_allowed_packet AS UNSIGNED)")
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| classify(&e, location))?;
    Ok(usize::try_from(packet / 2).unwrap_or(usize::MAX))
}

/// Inserts rows with multi-row INSERTs on one connection (the caller owns
/// the transaction), each statement within `budget` bytes of values (see
/// [`statement_budget`]).
async fn insert_on(
    conn: &mut sqlx::mysql::MySqlConnection,
    table: &str,
    columns: &[(String, ColumnKind)],
    rows: &[Vec<Value>],
    budget: usize,
    location: &str,
) -> Result<()> {
    insert_values::<MySql, _>(
        conn,
        Engine::Mysql,
        table,
        columns,
        rows,
        budget,
        location,
        |b, v, _| {
            bind_as_given(b, v, format_mysql_datetime);
            Ok(())
        },
    )
    .await
}

/// Streams `table` from `conn` into `out` in batches (see [`SnapshotRead::stream_rows`]).
async fn stream_on(
    conn: &mut sqlx::mysql::MySqlConnection,
    table: &Table,
    out: &crate::datastore::RowSender,
    location: &str,
) -> Result<u64> {
    use futures::TryStreamExt;
    let kinds: Vec<ColumnKind> = table.columns.iter().map(|c| c.kind).collect();
    // The text protocol with the columns as they are: the server formats
    // every value as text, as for mysqldump, and no `CAST` runs per value (the
    // casts cost the server a third more CPU than the read itself). Floats
    // keep the binary protocol, whose doubles are exact whatever the
    // server's text formatting of them.
    let text = !kinds.contains(&ColumnKind::Float);
    let mut rows = if text {
        let sql = select_all_sql(Engine::Mysql, table, |c| {
            quote_ident(Engine::Mysql, &c.name)
        });
        sqlx::raw_sql(AssertSqlSafe(sql)).fetch(&mut *conn)
    } else {
        let sql = select_all_sql(Engine::Mysql, table, select_expr);
        sqlx::query(AssertSqlSafe(sql)).fetch(&mut *conn)
    };
    let stopped = |e: ConsumerStopped| e.reading(&table.name);
    let mut batcher = RowBatcher::new(out);
    while let Some(row) = rows.try_next().await.map_err(|e| classify(&e, location))? {
        decode_row_into(&row, table, &kinds, batcher.slot(kinds.len()))
            .map_err(|e| classify(&e, location))?;
        batcher.commit();
        batcher.send_if_full().await.map_err(stopped)?;
    }
    batcher.finish().await.map_err(stopped)
}

/// Runs one statement on a dedicated connection.
async fn exec_on(conn: &mut sqlx::mysql::MySqlConnection, sql: &str, location: &str) -> Result<()> {
    sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
        .execute(&mut *conn)
        .await
        .map_err(|e| classify(&e, location))?;
    Ok(())
}

/// An open snapshot transaction on a dedicated connection (closed, and so
/// rolled back, if dropped).
struct Snapshot {
    conn: sqlx::mysql::MySqlConnection,
    location: String,
}

#[async_trait]
impl SnapshotRead for Snapshot {
    async fn catalogue(&mut self) -> Result<Catalogue> {
        catalogue_on(&mut self.conn, &self.location).await
    }

    async fn stream_rows(
        &mut self,
        table: &Table,
        out: &crate::datastore::RowSender,
    ) -> Result<u64> {
        stream_on(&mut self.conn, table, out, &self.location).await
    }

    async fn finish(mut self: Box<Self>) -> Result<()> {
        exec_on(&mut self.conn, "ROLLBACK", &self.location).await
    }
}

/// MySQL DDL commits on its own, so a restore loads shadow tables and swaps
/// them in with one atomic `RENAME TABLE`; until then the target is untouched.
/// The session holds the database's restore lock until it ends.
struct Restore {
    conn: sqlx::mysql::MySqlConnection,
    location: String,
    existing: Vec<String>,
    /// Whether a table's load transaction is open. Each staging table loads
    /// in one transaction (committed before the next table's DDL, which
    /// would commit it anyway): one log flush per table, not per batch.
    loading: bool,
    /// The current table's secondary keys (one `ALTER TABLE`), added once
    /// its rows are in: one sort per key instead of a key insertion per row.
    pending_keys: Vec<String>,
    /// Bytes of values per `INSERT` (see [`statement_budget`]).
    statement_budget: usize,
}

impl Restore {
    /// Commits the current table's load, if one is open, then adds its keys.
    async fn end_load(&mut self) -> Result<()> {
        if std::mem::take(&mut self.loading) {
            exec_on(&mut self.conn, "COMMIT", &self.location).await?;
        }
        let keys = std::mem::take(&mut self.pending_keys);
        if !keys.is_empty() {
            // A unique key is built with its duplicate check, whatever the
            // server would skip with `unique_checks` off.
            exec_on(&mut self.conn, LOAD_CHECKS_ON, &self.location).await?;
            for sql in keys {
                exec_on(&mut self.conn, &sql, &self.location).await?;
            }
            exec_on(&mut self.conn, LOAD_CHECKS_OFF, &self.location).await?;
        }
        Ok(())
    }
}

/// The session's checks while rows load into a staging table, and after.
const LOAD_CHECKS_OFF: &str = "SET SESSION unique_checks = 0, foreign_key_checks = 0";
const LOAD_CHECKS_ON: &str = "SET SESSION unique_checks = 1, foreign_key_checks = 1";

const SHADOW_NEW: &str = STAGING_PREFIXES[0];
const SHADOW_OLD: &str = STAGING_PREFIXES[1];

#[async_trait]
impl RestoreWrite for Restore {
    fn staging_name(&self, table: &str) -> String {
        format!("{SHADOW_NEW}{table}")
    }

    async fn create_table(&mut self, source: Engine, table: &Table) -> Result<()> {
        self.end_load().await?;
        let staging = self.staging_name(&table.name);
        let mut statements =
            ddl::create_statements(source, Engine::Mysql, table, &staging)?.into_iter();
        // The first statement creates the table with its primary key; the
        // rest adds its secondary keys, after the load.
        if let Some(create) = statements.next() {
            exec_on(&mut self.conn, &create, &self.location).await?;
        }
        self.pending_keys.extend(statements);
        Ok(())
    }

    async fn insert_rows(
        &mut self,
        table: &str,
        columns: &[(String, ColumnKind)],
        rows: &[Vec<Value>],
    ) -> Result<()> {
        if !self.loading {
            exec_on(&mut self.conn, "START TRANSACTION", &self.location).await?;
            self.loading = true;
        }
        insert_on(
            &mut self.conn,
            table,
            columns,
            rows,
            self.statement_budget,
            &self.location,
        )
        .await
    }

    async fn commit(mut self: Box<Self>, tables: &[Table]) -> Result<CommitOutcome> {
        self.end_load().await?;
        exec_on(&mut self.conn, LOAD_CHECKS_ON, &self.location).await?;
        let names: Vec<String> = tables.iter().map(|t| t.name.clone()).collect();
        let existing = std::mem::take(&mut self.existing);
        let mut runner = OnConnection {
            conn: &mut self.conn,
            location: &self.location,
        };
        take_swap_lock(runner.conn, runner.location).await?;
        let swapped = swap_in(&existing, &names, &self.location, &mut runner).await;
        release_swap_lock(runner.conn, runner.location).await;
        let outcome = swapped?;
        // Ending the session would release it too; say so explicitly.
        let _ = exec_on(
            &mut self.conn,
            &format!("DO RELEASE_LOCK({RESTORE_LOCK_SQL})"),
            &self.location,
        )
        .await;
        // InnoDB's AUTO_INCREMENT already sits past the largest id inserted.
        Ok(outcome)
    }
}

/// Runs one statement (a connection, or a fake in tests).
#[async_trait]
trait RunStatement {
    async fn run(&mut self, sql: String) -> Result<()>;
}

struct OnConnection<'a> {
    conn: &'a mut sqlx::mysql::MySqlConnection,
    location: &'a str,
}

#[async_trait]
impl RunStatement for OnConnection<'_> {
    async fn run(&mut self, sql: String) -> Result<()> {
        exec_on(self.conn, &sql, self.location).await
    }
}

/// Swaps the loaded shadow tables in with one `RENAME TABLE` (MySQL applies
/// every rename of it atomically), then drops the replaced tables. A failure
/// of the rename leaves the target as it was (an error); a failure after it
/// does not undo the restore, so it is a warning that says what is left.
async fn swap_in(
    existing: &[String],
    tables: &[String],
    location: &str,
    exec: &mut (dyn RunStatement + Send),
) -> Result<CommitOutcome> {
    let q = |t: &str| quote_ident(Engine::Mysql, t);
    let mut renames: Vec<String> = existing
        .iter()
        .map(|t| format!("{} TO {}", q(t), q(&format!("{SHADOW_OLD}{t}"))))
        .collect();
    renames.extend(
        tables
            .iter()
            .map(|t| format!("{} TO {}", q(&format!("{SHADOW_NEW}{t}")), q(t))),
    );
    exec.run(format!("RENAME TABLE {}", renames.join(", ")))
        .await?;
    crate::testpoint::pause("restore.mid_swap").await;
    let mut outcome = CommitOutcome::default();
    for t in existing {
        let old = format!("{SHADOW_OLD}{t}");
        if let Err(e) = exec.run(format!("DROP TABLE {}", q(&old))).await {
            outcome.warnings.push(format!(
                "the restore into {location} is complete (the restored tables were swapped in), but the \
                 replaced table {t} (now {old}) could not be dropped: {e}; spirekeep ignores it, and the \
                 next restore into this database removes it"
            ));
        }
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_list_host_loses_its_port() {
        assert_eq!(host_without_port("10.0.0.7:51234"), "10.0.0.7");
        assert_eq!(host_without_port("localhost"), "localhost");
        assert_eq!(host_without_port("::1:40000"), "::1");
        assert_eq!(host_without_port("db.example.org:3306"), "db.example.org");
        assert_eq!(host_without_port("db:"), "db:");
    }

    /// Records statements and fails those starting with `fail`.
    struct Fake {
        ran: Vec<String>,
        fail: &'static str,
    }

    #[async_trait]
    impl RunStatement for Fake {
        async fn run(&mut self, sql: String) -> Result<()> {
            self.ran.push(sql.clone());
            if sql.starts_with(self.fail) {
                Err(Error::Database {
                    location: "db".into(),
                    detail: "lock wait timeout".into(),
                })
            } else {
                Ok(())
            }
        }
    }

    /// Regression (issue 14): an error in the DROP after the RENAME was
    /// reported as "the target is as it was" although the swap had happened.
    #[tokio::test]
    async fn a_failed_drop_after_the_swap_is_reported_as_a_complete_restore() {
        let mut fake = Fake {
            ran: Vec::new(),
            fail: "DROP",
        };
        let outcome = swap_in(
            &["agents".to_string()],
            &["agents".to_string()],
            "mysql u@tcp(db:3306)/spire",
            &mut fake,
        )
        .await
        .expect("the swap happened, so the restore stands");
        assert_eq!(
            fake.ran,
            vec![
                "RENAME TABLE `agents` TO `_spirekeep_old_agents`, `_spirekeep_new_agents` TO `agents`",
                "DROP TABLE `_spirekeep_old_agents`",
            ]
        );
        assert_eq!(outcome.warnings.len(), 1);
        let w = &outcome.warnings[0];
        assert!(w.contains("is complete"), "{w}");
        assert!(w.contains("_spirekeep_old_agents"), "{w}");
        assert!(w.contains("next restore"), "{w}");
        assert!(!w.contains("as it was"), "{w}");
    }

    #[tokio::test]
    async fn a_failed_rename_is_an_error() {
        let mut fake = Fake {
            ran: Vec::new(),
            fail: "RENAME",
        };
        let result = swap_in(&[], &["agents".to_string()], "db", &mut fake).await;
        assert!(result.is_err());
    }
}
