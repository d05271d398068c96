//! PostgreSQL, as SPIRE uses it through lib/pq (GORM: `serial`, `text`,
//! `timestamp with time zone`, `bytea`).

mod copy_binary;
mod copy_binary_in;

use copy_binary_in::BinaryField;

use async_trait::async_trait;
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Postgres, Row, TypeInfo, ValueRef};
use time::{OffsetDateTime, PrimitiveDateTime};

use super::NextId;
use super::batches::{ConsumerStopped, RowBatcher, insert_values};
use super::catalogue::{Catalogue, Column, Index, Table};
use super::driver_error::classify;
use super::dsn::{Engine, PostgresSpec};
use super::sql::select_all_sql;
use super::timefmt::parse_sqlite_datetime;
use super::{
    ColumnKind, CommitOutcome, Datastore, LiveSession, RESTORE_LOCK_WAIT, RestoreWrite,
    SnapshotRead, Value, ddl, is_staging_table, quote_ident, restore_busy,
};
use crate::error::{Error, Result};

pub(crate) struct PostgresDatastore {
    pool: PgPool,
    location: String,
}

impl PostgresDatastore {
    /// [`Datastore::begin_restore`], with the concrete type (tests look inside it).
    async fn open_restore(&self, existing: &[String]) -> Result<Restore> {
        let mut conn = self.detached_connection().await?;
        // One restore per database at a time (advisory locks are per
        // database). A session lock: a staged restore commits several
        // transactions before its swap. It ends with the connection.
        let deadline = std::time::Instant::now() + RESTORE_LOCK_WAIT;
        loop {
            let got: bool = sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT pg_try_advisory_lock({RESTORE_LOCK_KEY})"
            )))
            .fetch_one(&mut conn)
            .await
            .map_err(|e| self.err(&e))?;
            if got {
                break;
            }
            if std::time::Instant::now() >= deadline {
                return Err(restore_busy(&self.location));
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        // Timestamps go in as UTC (binary COPY's microseconds, or text in
        // this zone); a `timestamp` column without a zone then holds UTC wall
        // time, as it is read back.
        exec_on(&mut conn, "SET TimeZone = 'UTC'", &self.location).await?;
        // Tables named like a restore's staging tables are never the user's
        // (a snapshot taken before spirekeep left them out may have carried them).
        let staging: Vec<String> = sqlx::query_scalar(
            "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND n.nspname = current_schema()",
        )
        .fetch_all(&mut conn)
        .await
        .map_err(|e| self.err(&e))?;
        let replaced: Vec<String> = existing
            .iter()
            .cloned()
            .chain(staging.into_iter().filter(|t| is_staging_table(t)))
            .collect();
        let (target_schema, search_path): (Option<String>, String) =
            sqlx::query_as("SELECT current_schema()::text, current_setting('search_path')")
                .fetch_one(&mut conn)
                .await
                .map_err(|e| self.err(&e))?;
        let mut staged = None;
        if let Some(target_schema) = target_schema
            && let Some(indexes) = self.open_staging_schema(&mut conn).await?
        {
            staged = Some(StagedSwap {
                target_schema,
                search_path,
                indexes,
            });
        }
        if staged.is_none() {
            exec_on(&mut conn, "BEGIN", &self.location).await?;
            drop_tables(&mut conn, &replaced, &self.location).await?;
        }
        Ok(Restore {
            conn: Some(conn),
            in_flight: None,
            location: self.location.clone(),
            deferred_indexes: Vec::new(),
            column_types: std::collections::HashMap::new(),
            pending: None,
            staged,
            replaced,
        })
    }

    /// A connection of its own, out of the pool (a restore's session settings
    /// and locks must not reach any later user of a pooled connection).
    async fn detached_connection(&self) -> Result<sqlx::postgres::PgConnection> {
        Ok(self
            .pool
            .acquire()
            .await
            .map_err(|e| self.err(&e))?
            .detach())
    }

    /// Creates [`STAGING_SCHEMA`] afresh, points `conn` at it, and starts the
    /// index builder on a second connection pointed there too. `None` when
    /// the database refuses the schema (no `CREATE` on it): nothing has
    /// changed, and the restore replaces the tables in place instead.
    async fn open_staging_schema(
        &self,
        conn: &mut sqlx::postgres::PgConnection,
    ) -> Result<Option<IndexBuilder>> {
        // The builder's connection before the schema: any failure after the
        // schema exists fails the restore, never turns it into an in-place
        // one with the session already pointed at the staging schema.
        let mut builder_conn = self.detached_connection().await?;
        let staging = quote_ident(Engine::Postgres, STAGING_SCHEMA);
        // A schema left by a restore killed before its swap: only a restore,
        // holding the lock taken above, ever writes there.
        let created = exec_on(
            conn,
            &format!("DROP SCHEMA IF EXISTS {staging} CASCADE; CREATE SCHEMA {staging}"),
            &self.location,
        )
        .await;
        if let Err(e) = created {
            tracing::info!(
                error = %e,
                "no staging schema (no CREATE privilege on the database?): the restore \
                 replaces the tables in place, in one transaction that holds their locks \
                 for the whole load"
            );
            return Ok(None);
        }
        // Everything the load names (tables, their sequences and indexes,
        // `COPY`, `ANALYZE`) resolves into the staging schema, under the
        // names it keeps after the swap. Nothing before the swap needs to be
        // durable: the swap's own commit flushes the log up to it.
        let settings = format!("SET search_path = {staging}; SET synchronous_commit = off");
        exec_on(conn, &settings, &self.location).await?;
        exec_on(&mut builder_conn, &settings, &self.location).await?;
        let backend_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut builder_conn)
            .await
            .map_err(|e| self.err(&e))?;
        Ok(Some(IndexBuilder::start(
            builder_conn,
            backend_pid,
            self.location.clone(),
        )))
    }

    pub(crate) async fn open(spec: &PostgresSpec) -> Result<Self> {
        let location = spec.display.clone();
        // Every connection of this process says so (see `other_sessions`).
        let options = super::quiet_slow_statements(
            spec.options
                .clone()
                .application_name(own_application_name()),
        );
        super::probe_connection(&options, &location).await?;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(std::time::Duration::from_secs(15))
            .connect_with(options)
            .await
            .map_err(|e| classify(&e, &location))?;
        Ok(Self { pool, location })
    }

    fn err(&self, e: &sqlx::Error) -> Error {
        classify(e, &self.location)
    }
}

/// The `application_name` of every connection this process opens:
/// `spirekeep/<pid>-<random>`, the same for every pool and every connection
/// (a restore's detached session included), so [`Datastore::other_sessions`]
/// leaves out exactly this process's sessions, however many connections its
/// pools opened, closed or reopened meanwhile. Backend pids would not do: a
/// pool's connections come and go, and a pid is reused by the next backend.
/// The random part keeps two hosts' spirekeep with the same pid apart; another
/// spirekeep process is reported like any other client, under its own name.
/// It replaces an `application_name` from the connection string: that one is
/// SPIRE's, and spirekeep must not pass for SPIRE.
fn own_application_name() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        format!(
            "spirekeep/{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        )
    })
}

/// Other client sessions on the current database, grouped by client address
/// (`local socket` for a Unix socket), application name and user. A role
/// without `pg_read_all_stats` sees other roles' sessions with the address
/// and application name hidden (NULL); they are still counted.
const OTHER_SESSIONS_SQL: &str = "SELECT CASE WHEN client_addr IS NOT NULL THEN host(client_addr) \
            WHEN client_port = -1 THEN 'local socket' END, \
       application_name::text, usename::text, count(*) \
  FROM pg_stat_activity \
 WHERE datname = current_database() AND pid <> pg_backend_pid() \
   AND backend_type = 'client backend' AND application_name IS DISTINCT FROM $1 \
 GROUP BY 1, 2, 3 \
 ORDER BY 4 DESC, 1, 2, 3";

const TABLES_SQL: &str = "SELECT c.relname::text, a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull, \
       coalesce(pg_get_expr(d.adbin, d.adrelid), ''), a.attidentity::text \
  FROM pg_class c \
  JOIN pg_namespace n ON n.oid = c.relnamespace \
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
 WHERE c.relkind IN ('r', 'p') AND n.nspname = current_schema() \
 ORDER BY c.relname, a.attnum";

/// The key of the per-database restore lock (a session `pg_advisory_lock`):
/// "spirekeep restore" in ASCII, cut to 64 bits.
const RESTORE_LOCK_KEY: i64 = 0x7370_6b72_6573_746f;

const INDEXES_SQL: &str = "SELECT c.relname::text, i.relname::text, ix.indisunique, ix.indisprimary, \
       array(SELECT a.attname::text FROM unnest(ix.indkey) WITH ORDINALITY k(attnum, ord) \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum ORDER BY k.ord) \
  FROM pg_index ix \
  JOIN pg_class c ON c.oid = ix.indrelid \
  JOIN pg_class i ON i.oid = ix.indexrelid \
  JOIN pg_namespace n ON n.oid = c.relnamespace \
 WHERE c.relkind IN ('r', 'p') AND n.nspname = current_schema() \
 ORDER BY c.relname, i.relname";

#[async_trait]
impl Datastore for PostgresDatastore {
    fn engine(&self) -> Engine {
        Engine::Postgres
    }

    fn location(&self) -> &str {
        &self.location
    }

    async fn server_version(&self) -> Result<String> {
        sqlx::query_scalar::<_, String>("SHOW server_version")
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
            quote_ident(Engine::Postgres, table)
        )))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| self.err(&e))?;
        Ok(n.unsigned_abs())
    }

    async fn count_by(&self, table: &str, column: &str) -> Result<Vec<(Option<String>, u64)>> {
        let rows: Vec<(Option<String>, i64)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {}::text, count(*) FROM {} GROUP BY 1 ORDER BY 1",
            quote_ident(Engine::Postgres, column),
            quote_ident(Engine::Postgres, table)
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
        let sql = select_all_sql(Engine::Postgres, table, select_expr);
        let rows = sqlx::query(AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(&e))?;
        let kinds: Vec<ColumnKind> = table.columns.iter().map(|c| c.kind).collect();
        rows.iter()
            .map(|r| decode_row(r, &kinds).map_err(|e| self.err(&e)))
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
        insert_on(&mut tx, table, columns, rows, &self.location).await?;
        tx.commit().await.map_err(|e| self.err(&e))
    }

    async fn begin_snapshot(&self) -> Result<Box<dyn SnapshotRead>> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| self.err(&e))?
            .detach();
        exec_on(
            &mut conn,
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
            &self.location,
        )
        .await?;
        // The snapshot is taken at the first statement of the transaction.
        sqlx::query("SELECT 1")
            .execute(&mut conn)
            .await
            .map_err(|e| self.err(&e))?;
        Ok(Box::new(Snapshot {
            conn,
            pool: self.pool.clone(),
            location: self.location.clone(),
        }))
    }

    async fn begin_restore(&self, existing: &[String]) -> Result<Box<dyn RestoreWrite>> {
        Ok(Box::new(self.open_restore(existing).await?))
    }

    async fn next_id(&self, table: &str, column: &str) -> Result<NextId> {
        let name = format!("{table}_{column}_seq");
        let t = Table::of_columns(
            &name,
            &[
                ("last_value", ColumnKind::Integer),
                ("is_called", ColumnKind::Boolean),
            ],
        );
        let row = self
            .read_table(&t)
            .await
            .ok()
            .and_then(|r| r.into_iter().next());
        Ok(match row.as_deref() {
            Some([Value::Int(v), Value::Bool(true)]) => NextId::Known(v + 1),
            Some([Value::Int(v), _]) => NextId::Known(*v),
            _ => NextId::Unknown(format!(
                "sequence {name} not found (a renamed sequence); the restore moved the column's own \
                 sequence with setval"
            )),
        })
    }

    async fn other_sessions(&self) -> Result<Vec<LiveSession>> {
        let rows: Vec<(Option<String>, Option<String>, Option<String>, i64)> =
            sqlx::query_as(OTHER_SESSIONS_SQL)
                .bind(own_application_name())
                .fetch_all(&self.pool)
                .await
                .map_err(|e| self.err(&e))?;
        Ok(rows
            .into_iter()
            .map(|(host, application, user, n)| {
                let hidden = host.is_none() && application.is_none();
                LiveSession {
                    host,
                    application: application.filter(|a| !a.is_empty()),
                    user,
                    pid: None,
                    connections: n.unsigned_abs(),
                    note: hidden.then(|| {
                        "address and application name hidden: reading them needs pg_read_all_stats"
                            .to_string()
                    }),
                }
            })
            .collect())
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

/// Column expressions whose result the driver decodes into the column's kind.
fn select_expr(c: &Column) -> String {
    let q = quote_ident(Engine::Postgres, &c.name);
    let t = c.declared_type.as_str();
    match c.kind {
        ColumnKind::Integer => format!("{q}::int8"),
        ColumnKind::Float => format!("{q}::float8"),
        ColumnKind::Timestamp if t == "timestamp with time zone" => q,
        ColumnKind::Timestamp => format!("({q})::timestamp AT TIME ZONE 'UTC'"),
        ColumnKind::Text if t == "text" || t.starts_with("character") => q,
        ColumnKind::Text => format!("{q}::text"),
        ColumnKind::Boolean | ColumnKind::Bytes => q,
    }
}

fn decode_row(row: &PgRow, kinds: &[ColumnKind]) -> std::result::Result<Vec<Value>, sqlx::Error> {
    let mut out = Vec::with_capacity(kinds.len());
    for (i, kind) in kinds.iter().enumerate() {
        let raw = row.try_get_raw(i)?;
        if raw.is_null() {
            out.push(Value::Null);
            continue;
        }
        let v = match kind {
            ColumnKind::Integer => Value::Int(row.try_get::<i64, _>(i)?),
            ColumnKind::Boolean => Value::Bool(row.try_get::<bool, _>(i)?),
            ColumnKind::Float => Value::Float(row.try_get::<f64, _>(i)?),
            ColumnKind::Text => Value::Text(row.try_get::<String, _>(i)?),
            ColumnKind::Bytes => Value::Bytes(row.try_get::<Vec<u8>, _>(i)?),
            ColumnKind::Timestamp => {
                if raw.type_info().name() == "TIMESTAMP" {
                    Value::Timestamp(row.try_get::<PrimitiveDateTime, _>(i)?.assume_utc())
                } else {
                    Value::Timestamp(row.try_get::<OffsetDateTime, _>(i)?)
                }
            }
        };
        out.push(v);
    }
    Ok(out)
}

/// Binds `v` with a PostgreSQL type that matches the column, so NULLs are
/// typed and multi-row VALUES lists agree on each column's type.
fn push_pg(
    b: &mut sqlx::query_builder::Separated<'_, Postgres, &'static str>,
    v: &Value,
    kind: ColumnKind,
) -> std::result::Result<(), String> {
    match (kind, v) {
        (ColumnKind::Integer, Value::Null) => b.push_bind(Option::<i64>::None),
        (ColumnKind::Integer, Value::Int(x)) => b.push_bind(*x),
        (ColumnKind::Integer, Value::Bool(x)) => b.push_bind(i64::from(*x)),
        (ColumnKind::Boolean, Value::Null) => b.push_bind(Option::<bool>::None),
        (ColumnKind::Boolean, Value::Bool(x)) => b.push_bind(*x),
        (ColumnKind::Boolean, Value::Int(x)) => b.push_bind(*x != 0),
        (ColumnKind::Float, Value::Null) => b.push_bind(Option::<f64>::None),
        (ColumnKind::Float, Value::Float(x)) => b.push_bind(*x),
        (ColumnKind::Text, Value::Null) => b.push_bind(Option::<String>::None),
        (ColumnKind::Text, Value::Text(x)) => {
            if x.contains('\0') {
                return Err("PostgreSQL text cannot hold a NUL character".into());
            }
            b.push_bind(x.as_str())
        }
        (ColumnKind::Bytes, Value::Null) => b.push_bind(Option::<Vec<u8>>::None),
        (ColumnKind::Bytes, Value::Bytes(x)) => b.push_bind(x.as_slice()),
        (ColumnKind::Bytes, Value::Text(x)) => b.push_bind(x.as_bytes()),
        (ColumnKind::Timestamp, Value::Null) => b.push_bind(Option::<OffsetDateTime>::None),
        (ColumnKind::Timestamp, Value::Timestamp(t)) => b.push_bind(*t),
        (ColumnKind::Timestamp, Value::Text(s)) => match parse_sqlite_datetime(s) {
            Some(t) => b.push_bind(t),
            None => return Err(format!("\"{s}\" is not a timestamp")),
        },
        (kind, v) => {
            return Err(format!(
                "a {} value cannot go into a {kind:?} column",
                v.type_name()
            ));
        }
    };
    Ok(())
}

/// Reads the catalogue on one connection (inside a snapshot transaction, if one is open).
async fn catalogue_on(
    conn: &mut sqlx::postgres::PgConnection,
    location: &str,
) -> Result<Catalogue> {
    let cols: Vec<(String, String, String, bool, String, String)> = sqlx::query_as(TABLES_SQL)
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| classify(&e, location))?;
    let mut tables: Vec<Table> = Vec::new();
    for (table, name, ty, notnull, default, identity) in cols {
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
            kind: ColumnKind::from_postgres_type(&ty),
            declared_type: ty,
            nullable: !notnull,
            auto_increment: default.starts_with("nextval(") || !identity.is_empty(),
        });
    }
    // A restore's staging tables are never the user's.
    tables.retain(|t| !is_staging_table(&t.name));
    let idx: Vec<(String, String, bool, bool, Vec<String>)> = sqlx::query_as(INDEXES_SQL)
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| classify(&e, location))?;
    for (table, name, unique, primary, columns) in idx {
        let Some(t) = tables.iter_mut().find(|t| t.name == table) else {
            continue;
        };
        if primary {
            t.primary_key = columns;
        } else {
            t.indexes.push(Index {
                name,
                columns,
                unique,
            });
        }
    }
    Ok(Catalogue { tables })
}

/// Inserts rows with multi-row INSERTs on one connection (the caller owns the transaction).
async fn insert_on(
    conn: &mut sqlx::postgres::PgConnection,
    table: &str,
    columns: &[(String, ColumnKind)],
    rows: &[Vec<Value>],
    location: &str,
) -> Result<()> {
    insert_values::<Postgres, _>(
        conn,
        Engine::Postgres,
        table,
        columns,
        rows,
        // No packet limit short of a gigabyte; batches weigh a few MiB.
        usize::MAX,
        location,
        push_pg,
    )
    .await
}

/// Loads `data` (rows in COPY's binary format with its header and trailer,
/// or in its text format, see [`copy_text`]) into `table` with one
/// `COPY … FROM STDIN`: no statement per few hundred rows, no bind
/// parameters to plan.
async fn copy_in(
    conn: &mut sqlx::postgres::PgConnection,
    table: &str,
    columns: &[(String, ColumnKind)],
    binary: bool,
    data: Vec<u8>,
    location: &str,
) -> Result<()> {
    let cols: Vec<String> = columns
        .iter()
        .map(|(c, _)| quote_ident(Engine::Postgres, c))
        .collect();
    let sql = format!(
        "COPY {} ({}) FROM STDIN{}",
        quote_ident(Engine::Postgres, table),
        cols.join(", "),
        if binary { " (FORMAT binary)" } else { "" }
    );
    let mut copy = conn
        .copy_in_raw(&sql)
        .await
        .map_err(|e| classify(&e, location))?;
    if let Err(e) = copy.send(data).await {
        let _ = copy.abort("spirekeep: sending the rows failed").await;
        return Err(classify(&e, location));
    }
    copy.finish().await.map_err(|e| classify(&e, location))?;
    Ok(())
}

/// `rows` in COPY's text format: tab-separated, `\N` for NULL, backslash
/// escapes, `bytea` as `\\x` hex. Each value is what binding it would store
/// (timestamps cut to microseconds the way the binary encoding cuts them).
fn copy_text(
    table: &str,
    columns: &[(String, ColumnKind)],
    rows: &[Vec<Value>],
) -> std::result::Result<Vec<u8>, String> {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(rows.len() * 64 * columns.len().max(1));
    for row in rows {
        for (i, (v, (cname, kind))) in row.iter().zip(columns).enumerate() {
            if i > 0 {
                out.push('\t');
            }
            let bad = |msg: String| format!("{table}.{cname}: {msg}");
            match (kind, v) {
                (_, Value::Null) => out.push_str("\\N"),
                (ColumnKind::Integer, Value::Int(x)) => {
                    let _ = write!(out, "{x}");
                }
                (ColumnKind::Integer, Value::Bool(x)) => out.push(if *x { '1' } else { '0' }),
                (ColumnKind::Boolean, Value::Bool(x)) => out.push(if *x { 't' } else { 'f' }),
                (ColumnKind::Boolean, Value::Int(x)) => out.push(if *x != 0 { 't' } else { 'f' }),
                (ColumnKind::Float, Value::Float(x)) => {
                    if x.is_nan() {
                        out.push_str("NaN");
                    } else if x.is_infinite() {
                        out.push_str(if *x > 0.0 { "Infinity" } else { "-Infinity" });
                    } else {
                        let _ = write!(out, "{x:?}");
                    }
                }
                (ColumnKind::Text, Value::Text(x)) => {
                    if x.contains('\0') {
                        return Err(bad("PostgreSQL text cannot hold a NUL character".into()));
                    }
                    push_copy_escaped(&mut out, x);
                }
                (ColumnKind::Bytes, Value::Bytes(x)) => push_bytea(&mut out, x),
                (ColumnKind::Bytes, Value::Text(x)) => push_bytea(&mut out, x.as_bytes()),
                (ColumnKind::Timestamp, Value::Timestamp(t)) => push_timestamp(&mut out, *t),
                (ColumnKind::Timestamp, Value::Text(s)) => match parse_sqlite_datetime(s) {
                    Some(t) => push_timestamp(&mut out, t),
                    None => return Err(bad(format!("\"{s}\" is not a timestamp"))),
                },
                (kind, v) => {
                    return Err(bad(format!(
                        "a {} value cannot go into a {kind:?} column",
                        v.type_name()
                    )));
                }
            }
        }
        out.push('\n');
    }
    Ok(out.into_bytes())
}

fn push_copy_escaped(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

fn push_bytea(out: &mut String, bytes: &[u8]) {
    use std::fmt::Write as _;
    // `\x…` is bytea's hex input; COPY's own escaping doubles the backslash.
    out.push_str("\\\\x");
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
}

/// A timestamp as UTC text with microseconds, cut the way sqlx's binary
/// encoding cuts it (whole microseconds since 2000-01-01, toward zero), so a
/// COPY stores exactly what a bound parameter would.
fn push_timestamp(out: &mut String, t: OffsetDateTime) {
    use std::fmt::Write as _;
    let pg_epoch = time::macros::datetime!(2000-01-01 0:00 UTC);
    let micros = (t - pg_epoch).whole_microseconds();
    let t = pg_epoch
        + time::Duration::new(
            i64::try_from(micros.div_euclid(1_000_000)).unwrap_or(i64::MAX),
            i32::try_from(micros.rem_euclid(1_000_000) * 1_000).unwrap_or(0),
        );
    let year = t.year();
    let (era_year, bc) = if year <= 0 {
        (1 - year, " BC")
    } else {
        (year, "")
    };
    let _ = write!(
        out,
        "{era_year:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}+00{bc}",
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    );
}

/// The bulk path: one binary `COPY` message per row, decoded here. In storage
/// order, as `pg_dump` reads: an `ORDER BY` the primary key made the server
/// walk each index and fetch the rows through it, a third more server CPU for
/// `selectors` and a tenth of the whole backup's.
fn bulk_read_sql(table: &Table) -> String {
    let columns: Vec<String> = table.columns.iter().map(select_expr).collect();
    format!(
        "COPY (SELECT {} FROM {}) TO STDOUT (FORMAT binary)",
        columns.join(", "),
        quote_ident(Engine::Postgres, &table.name)
    )
}

/// Streams `table` from `conn` into `out` in batches (see [`SnapshotRead::stream_rows`]).
async fn stream_on(
    conn: &mut sqlx::postgres::PgConnection,
    table: &Table,
    out: &crate::datastore::RowSender,
    location: &str,
) -> Result<u64> {
    use futures::TryStreamExt;
    let kinds: Vec<ColumnKind> = table.columns.iter().map(|c| c.kind).collect();
    let sql = bulk_read_sql(table);
    let mut stream = conn
        .copy_out_raw(&sql)
        .await
        .map_err(|e| classify(&e, location))?;
    let mut decoder = copy_binary::BinaryCopyDecoder::new(kinds);
    let malformed = |e: String| Error::Database {
        location: location.to_string(),
        detail: format!("reading table {} through COPY: {e}", table.name),
    };
    let stopped = |e: ConsumerStopped| e.reading(&table.name);
    let mut batcher = RowBatcher::new(out);
    while let Some(chunk) = stream
        .try_next()
        .await
        .map_err(|e| classify(&e, location))?
    {
        decoder.feed(&chunk, &mut batcher).map_err(malformed)?;
        batcher.send_if_full().await.map_err(stopped)?;
    }
    decoder.finish().map_err(malformed)?;
    batcher.finish().await.map_err(stopped)
}

/// Runs one statement on a dedicated connection.
async fn exec_on(conn: &mut sqlx::postgres::PgConnection, sql: &str, location: &str) -> Result<()> {
    sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
        .execute(&mut *conn)
        .await
        .map_err(|e| classify(&e, location))?;
    Ok(())
}

/// An open snapshot transaction on a dedicated connection (closed, and so
/// rolled back, if dropped).
struct Snapshot {
    conn: sqlx::postgres::PgConnection,
    /// Where a [second reader](SnapshotRead::second_reader) gets its connection.
    pool: PgPool,
    location: String,
}

/// Each table's size on disk, in this schema (`pg_relation_size`: the main
/// fork, what a sequential read goes through).
const TABLE_SIZES_SQL: &str = "SELECT c.relname::text, pg_relation_size(c.oid) \
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
 WHERE c.relkind IN ('r', 'p') AND n.nspname = current_schema()";

/// An exported snapshot's name as PostgreSQL makes them (`00000003-0000001B-1`),
/// checked before it is spliced into `SET TRANSACTION SNAPSHOT`.
fn is_snapshot_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
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

    /// A second connection that imports this transaction's snapshot
    /// (`pg_export_snapshot`, `SET TRANSACTION SNAPSHOT`): both see exactly
    /// the same data. `None` on a standby, or when no second connection can
    /// be had (the backup then reads one table at a time, as before).
    async fn second_reader(&mut self) -> Result<Option<Box<dyn SnapshotRead>>> {
        let location = self.location.clone();
        let err = |e: sqlx::Error| classify(&e, &location);
        let standby: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()")
            .fetch_one(&mut self.conn)
            .await
            .map_err(err)?;
        if standby {
            return Ok(None);
        }
        let name: String = sqlx::query_scalar("SELECT pg_export_snapshot()")
            .fetch_one(&mut self.conn)
            .await
            .map_err(err)?;
        if !is_snapshot_name(&name) {
            return Err(Error::Database {
                location,
                detail: format!("pg_export_snapshot() returned {name:?}, not a snapshot name"),
            });
        }
        let mut conn = match self.pool.acquire().await {
            Ok(conn) => conn.detach(),
            Err(e) => {
                tracing::debug!(error = %err(e), "no second connection: tables are read one at a time");
                return Ok(None);
            }
        };
        exec_on(
            &mut conn,
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
            &location,
        )
        .await?;
        exec_on(
            &mut conn,
            &format!("SET TRANSACTION SNAPSHOT '{name}'"),
            &location,
        )
        .await?;
        Ok(Some(Box::new(Snapshot {
            conn,
            pool: self.pool.clone(),
            location,
        })))
    }

    async fn size_estimates(&mut self) -> Result<std::collections::HashMap<String, u64>> {
        let sizes: Vec<(String, i64)> = sqlx::query_as(TABLE_SIZES_SQL)
            .fetch_all(&mut self.conn)
            .await
            .map_err(|e| classify(&e, &self.location))?;
        Ok(sizes
            .into_iter()
            .map(|(table, bytes)| (table, u64::try_from(bytes).unwrap_or(0)))
            .collect())
    }
}

/// A restore into [`STAGING_SCHEMA`], swapped into the target's schema in
/// one short transaction at the end. Rows go in through `COPY … FROM STDIN`;
/// each table's primary key, indexes and `ANALYZE` run once it is full (one
/// sort per index instead of one insertion per row), on a second connection
/// ([`IndexBuilder`]) while the next table loads, so the server's index
/// builds overlap the client's decoding instead of following it.
///
/// One `COPY` at a time runs on a task of its own while the caller decodes
/// and encodes the next chunk, so the client's work and the server's overlap
/// (on two cores, a restore otherwise waits for each in turn).
///
/// Without the right to create a schema, the restore runs in one transaction
/// instead: the replaced tables dropped first, indexes built at the end.
struct Restore {
    /// Set when the tables load into [`STAGING_SCHEMA`]; unset when the
    /// restore user may not create a schema, and the replaced tables were
    /// dropped at the start instead.
    staged: Option<StagedSwap>,
    /// The target's tables the swap drops (when staged; dropped already
    /// otherwise).
    replaced: Vec<String>,
    /// Away while a `COPY` is in flight (see [`Restore::conn`]).
    conn: Option<sqlx::postgres::PgConnection>,
    /// The `COPY` in flight; it hands the connection back when done.
    in_flight: Option<tokio::task::JoinHandle<(sqlx::postgres::PgConnection, Result<()>)>>,
    location: String,
    /// `CREATE INDEX` statements to run at commit, after the load.
    deferred_indexes: Vec<String>,
    /// Each created table's columns and their type OIDs, which choose
    /// between the binary and the text `COPY` format.
    column_types: std::collections::HashMap<String, Vec<(String, i64)>>,
    /// Rows encoded for the next `COPY`, not sent yet.
    pending: Option<PendingCopy>,
}

/// Rows of one table waiting to be sent in one `COPY`. Batches are gathered
/// up to [`COPY_CHUNK_BYTES`] because every `COPY` ends with a short
/// `CopyDone` message written right after the data: without `TCP_NODELAY`
/// (sqlx sets none) Nagle's algorithm holds it until the server's delayed
/// ACK, up to 40 ms per statement. A `COPY` per 1,024-row batch spent most of
/// a restore waiting; one per few MiB makes that wait negligible.
struct PendingCopy {
    table: String,
    columns: Vec<(String, ColumnKind)>,
    /// Set when every column takes the binary format; `data` then starts
    /// with its header.
    binary: Option<Vec<BinaryField>>,
    data: Vec<u8>,
}

/// The schema a restore loads into. Its tables are committed as they load
/// (so a second connection can build their indexes), but nothing reads them:
/// every catalogue spirekeep reads is `current_schema()`'s, SPIRE's too. A
/// restore killed before its swap leaves the schema behind with the target
/// as it was; the next restore drops it (under the restore lock) first.
const STAGING_SCHEMA: &str = "_spirekeep_restore";

/// Where a staged restore's tables go at the swap, and who builds their indexes.
struct StagedSwap {
    /// The target's schema (`current_schema()` when the restore began).
    target_schema: String,
    /// The session's `search_path` before the load narrowed it.
    search_path: String,
    indexes: IndexBuilder,
}

/// Runs a staged restore's index builds and `ANALYZE`s, in the order the
/// tables finish loading, on a connection of its own; the restore's own
/// connection joins in once the last table has loaded.
struct IndexBuilder {
    /// Closed when the last table's statements are queued.
    queue: Option<tokio::sync::mpsc::UnboundedSender<String>>,
    statements: std::sync::Arc<tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<String>>>,
    worker: tokio::task::JoinHandle<Result<()>>,
    /// The builder's server process, to cancel its build when the restore
    /// is abandoned (a backend notices a closed connection only between
    /// statements, and its locks would hold up the staging schema's drop).
    backend_pid: i32,
}

impl IndexBuilder {
    fn start(mut conn: sqlx::postgres::PgConnection, backend_pid: i32, location: String) -> Self {
        let (queue, statements) = tokio::sync::mpsc::unbounded_channel();
        let statements = std::sync::Arc::new(tokio::sync::Mutex::new(statements));
        let shared = std::sync::Arc::clone(&statements);
        let worker =
            tokio::spawn(async move { run_statements(&mut conn, &shared, &location).await });
        Self {
            queue: Some(queue),
            statements,
            worker,
            backend_pid,
        }
    }

    /// Queues `statements` (of tables whose rows are all committed).
    fn queue(&mut self, statements: Vec<String>, location: &str) -> Result<()> {
        let lost = || {
            Error::Aborted(format!(
                "the restore into {location} lost its index-building connection"
            ))
        };
        let queue = self.queue.as_ref().ok_or_else(lost)?;
        for sql in statements {
            queue.send(sql).map_err(|_| lost())?;
        }
        Ok(())
    }

    /// The builder's error, if it has stopped on one (it only stops early so).
    async fn failure(&mut self) -> Result<()> {
        if self.worker.is_finished() {
            return self.finish().await;
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<()> {
        (&mut self.worker)
            .await
            .map_err(|e| Error::Aborted(format!("building the restored tables' indexes: {e}")))?
    }
}

impl Drop for IndexBuilder {
    /// A restore that stops (on an error, or dropped before its commit) stops
    /// its index builds too; the connection closes with the task.
    fn drop(&mut self) {
        self.worker.abort();
    }
}

/// Takes statements off the shared queue and runs them until it is closed
/// and empty, or one fails.
async fn run_statements(
    conn: &mut sqlx::postgres::PgConnection,
    statements: &tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<String>>,
    location: &str,
) -> Result<()> {
    loop {
        let next = statements.lock().await.recv().await;
        let Some(sql) = next else {
            return Ok(());
        };
        exec_on(conn, &sql, location).await?;
    }
}

/// Drops `tables` (in the schema the session's `search_path` names first).
async fn drop_tables(
    conn: &mut sqlx::postgres::PgConnection,
    tables: &[String],
    location: &str,
) -> Result<()> {
    for t in tables {
        exec_on(
            conn,
            &format!("DROP TABLE IF EXISTS {}", quote_ident(Engine::Postgres, t)),
            location,
        )
        .await?;
    }
    Ok(())
}

/// How much encoded row data one `COPY` carries at most (bounds memory too:
/// one chunk in flight, one being filled).
const COPY_CHUNK_BYTES: usize = 4 << 20;

impl Restore {
    /// A staged restore that will not commit removes its staging schema now
    /// (in place, the dropped connection rolls everything back).
    async fn discard(&mut self) {
        let Some(swap) = self.staged.take() else {
            return;
        };
        let builder_pid = swap.indexes.backend_pid;
        drop(swap);
        // The `COPY` in flight ends first (its outcome no longer matters).
        let _ = self.conn().await;
        let location = self.location.clone();
        if let Some(conn) = self.conn.as_mut() {
            discard_staging(conn, builder_pid, &location).await;
        }
    }

    /// A staged restore hands the statements of the table that has just
    /// loaded (all its rows committed) to the index builder, and fails here
    /// if an earlier table's build failed.
    async fn queue_indexes(&mut self) -> Result<()> {
        if let Some(swap) = self.staged.as_mut() {
            swap.indexes.failure().await?;
            let statements = std::mem::take(&mut self.deferred_indexes);
            swap.indexes.queue(statements, &self.location)?;
        }
        Ok(())
    }

    /// The connection, once the `COPY` in flight (if any) has ended.
    async fn conn(&mut self) -> Result<&mut sqlx::postgres::PgConnection> {
        if let Some(task) = self.in_flight.take() {
            let (conn, result) = task
                .await
                .map_err(|e| Error::Aborted(format!("loading rows into {}: {e}", self.location)))?;
            self.conn = Some(conn);
            result?;
        }
        self.conn.as_mut().ok_or_else(|| {
            Error::Aborted(format!(
                "the restore into {} lost its connection to an earlier failure",
                self.location
            ))
        })
    }

    /// The binary encoding of each of `columns` (in their order), when the
    /// restore created `table` and every one of them has a type it covers.
    fn binary_fields(
        &self,
        table: &str,
        columns: &[(String, ColumnKind)],
    ) -> Option<Vec<BinaryField>> {
        let types = self.column_types.get(table)?;
        columns
            .iter()
            .map(|(name, kind)| {
                let (_, oid) = types.iter().find(|(n, _)| n == name)?;
                BinaryField::for_type(*oid, *kind)
            })
            .collect()
    }

    /// Sends the rows gathered so far in a `COPY` of their own, and returns
    /// without waiting for it (after the previous one has ended).
    async fn flush_copy(&mut self) -> Result<()> {
        if let Some(mut p) = self.pending.take() {
            self.conn().await?;
            let Some(mut conn) = self.conn.take() else {
                unreachable!("Restore::conn returned it")
            };
            let location = self.location.clone();
            let binary = p.binary.is_some();
            if binary {
                p.data.extend_from_slice(copy_binary_in::TRAILER);
            }
            self.in_flight = Some(tokio::spawn(async move {
                let result =
                    copy_in(&mut conn, &p.table, &p.columns, binary, p.data, &location).await;
                (conn, result)
            }));
        }
        Ok(())
    }
}

impl Drop for Restore {
    /// A restore dropped before its commit: the `COPY` in flight stops, its
    /// connection closes, and the server rolls the transaction back.
    fn drop(&mut self) {
        if let Some(task) = &self.in_flight {
            task.abort();
        }
    }
}

#[async_trait]
impl RestoreWrite for Restore {
    fn staging_name(&self, table: &str) -> String {
        table.to_string()
    }

    async fn create_table(&mut self, source: Engine, table: &Table) -> Result<()> {
        self.flush_copy().await?;
        self.conn().await?;
        self.queue_indexes().await?;
        let mut statements =
            ddl::create_statements(source, Engine::Postgres, table, &table.name)?.into_iter();
        // The first statement creates the table; the others add its primary
        // key and its indexes, after the load.
        if let Some(create) = statements.next() {
            let location = self.location.clone();
            let staged = self.staged.is_some();
            let conn = self.conn().await?;
            exec_on(conn, &create, &location).await?;
            if staged {
                // The staging tables are committed as they load, and a large
                // fresh table draws autovacuum at once: its lock would hold
                // up the swap's `SET SCHEMA` (until deadlock_timeout cancels
                // it). The swap turns autovacuum back on.
                let sql = format!(
                    "ALTER TABLE {} SET (autovacuum_enabled = false)",
                    quote_ident(Engine::Postgres, &table.name)
                );
                exec_on(conn, &sql, &location).await?;
            }
            let types: Vec<(String, i64)> = sqlx::query_as(
                "SELECT attname::text, atttypid::int8 FROM pg_attribute \
                 WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped",
            )
            .bind(quote_ident(Engine::Postgres, &table.name))
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| classify(&e, &location))?;
            self.column_types.insert(table.name.clone(), types);
        }
        self.deferred_indexes.extend(statements);
        // The planner's statistics now, not at autovacuum's next pass: the
        // SPIRE server's first queries on the restored tables plan with them
        // (they move with the tables).
        self.deferred_indexes.push(format!(
            "ANALYZE {}",
            quote_ident(Engine::Postgres, &table.name)
        ));
        Ok(())
    }

    async fn insert_rows(
        &mut self,
        table: &str,
        columns: &[(String, ColumnKind)],
        rows: &[Vec<Value>],
    ) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let same = self
            .pending
            .as_ref()
            .is_some_and(|p| p.table == table && p.columns == columns);
        if !same {
            self.flush_copy().await?;
            let binary = self.binary_fields(table, columns);
            let mut data = Vec::with_capacity(COPY_CHUNK_BYTES + COPY_CHUNK_BYTES / 4);
            if binary.is_some() {
                data.extend_from_slice(copy_binary_in::HEADER);
            }
            self.pending = Some(PendingCopy {
                table: table.to_owned(),
                columns: columns.to_vec(),
                binary,
                data,
            });
        }
        let Some(pending) = self.pending.as_mut() else {
            unreachable!("set above when not the same table")
        };
        let encoded = match &pending.binary {
            Some(fields) => {
                copy_binary_in::push_rows(&mut pending.data, table, columns, fields, rows)
            }
            None => {
                copy_text(table, columns, rows).map(|text| pending.data.extend_from_slice(&text))
            }
        };
        encoded.map_err(|detail| Error::Database {
            location: self.location.clone(),
            detail,
        })?;
        if pending.data.len() >= COPY_CHUNK_BYTES {
            self.flush_copy().await?;
        }
        Ok(())
    }

    async fn abandon(mut self: Box<Self>) {
        self.discard().await;
    }

    async fn commit(mut self: Box<Self>, tables: &[Table]) -> Result<CommitOutcome> {
        let loaded = async {
            self.flush_copy().await?;
            self.conn().await?;
            self.queue_indexes().await
        }
        .await;
        if let Err(e) = loaded {
            self.discard().await;
            return Err(e);
        }
        let location = self.location.clone();
        let indexes = std::mem::take(&mut self.deferred_indexes);
        let staged = self.staged.take();
        let replaced = std::mem::take(&mut self.replaced);
        let conn = self.conn().await?;
        match staged {
            None => {
                for sql in indexes {
                    exec_on(conn, &sql, &location).await?;
                }
                set_sequences(conn, tables, &location).await?;
                crate::testpoint::pause("restore.mid_swap").await;
                exec_on(conn, "COMMIT", &location).await?;
            }
            Some(mut swap) => {
                let swapped = swap_in(conn, &mut swap, tables, &replaced, &location).await;
                if let Err(e) = swapped {
                    discard_staging(conn, swap.indexes.backend_pid, &location).await;
                    return Err(e);
                }
            }
        }
        Ok(CommitOutcome::default())
    }
}

/// Removes a staged restore that will not commit (the target is as it
/// was): rolls back the swap if it began, stops the builder's statement,
/// drops the staging schema. Best effort: what stays, the next restore drops.
async fn discard_staging(
    conn: &mut sqlx::postgres::PgConnection,
    builder_pid: i32,
    location: &str,
) {
    let staging = quote_ident(Engine::Postgres, STAGING_SCHEMA);
    let steps = [
        "ROLLBACK".to_owned(),
        format!("SELECT pg_cancel_backend({builder_pid})"),
        format!("DROP SCHEMA IF EXISTS {staging} CASCADE"),
    ];
    for sql in steps {
        if let Err(e) = exec_on(conn, &sql, location).await {
            tracing::warn!(error = %e, "the abandoned restore's staging schema stays until the next restore");
            return;
        }
    }
}

/// A staged restore's end: the last index builds (on both connections), then
/// the swap in one short transaction.
async fn swap_in(
    conn: &mut sqlx::postgres::PgConnection,
    swap: &mut StagedSwap,
    tables: &[Table],
    replaced: &[String],
    location: &str,
) -> Result<()> {
    // This connection builds indexes too from here, beside the builder's.
    swap.indexes.queue = None;
    let shared = std::sync::Arc::clone(&swap.indexes.statements);
    let (mine, builder) = tokio::join!(
        run_statements(conn, &shared, location),
        swap.indexes.finish()
    );
    mine?;
    builder?;
    // Only from here to the commit are the replaced tables locked. Each
    // staged table moves with its indexes, constraints and sequences, under
    // the names it was created with.
    exec_on(conn, "BEGIN", location).await?;
    exec_on(
        conn,
        &format!(
            "SET LOCAL synchronous_commit = on; SELECT set_config('search_path', '{}', true)",
            swap.search_path.replace('\'', "''")
        ),
        location,
    )
    .await?;
    drop_tables(conn, replaced, location).await?;
    let (staging, target) = (
        quote_ident(Engine::Postgres, STAGING_SCHEMA),
        quote_ident(Engine::Postgres, &swap.target_schema),
    );
    for t in tables {
        let name = quote_ident(Engine::Postgres, &t.name);
        let sql = format!(
            "ALTER TABLE {staging}.{name} SET SCHEMA {target}; \
             ALTER TABLE {target}.{name} RESET (autovacuum_enabled)"
        );
        exec_on(conn, &sql, location).await?;
    }
    // RESTRICT: a table the swap missed fails the restore, never vanishes.
    exec_on(conn, &format!("DROP SCHEMA {staging} RESTRICT"), location).await?;
    set_sequences(conn, tables, location).await?;
    crate::testpoint::pause("restore.mid_swap").await;
    exec_on(conn, "COMMIT", location).await
}

/// Rows were loaded with explicit ids: moves each serial's sequence past them.
async fn set_sequences(
    conn: &mut sqlx::postgres::PgConnection,
    tables: &[Table],
    location: &str,
) -> Result<()> {
    for t in tables {
        for c in t.columns.iter().filter(|c| c.auto_increment) {
            let (tq, cq) = (
                quote_ident(Engine::Postgres, &t.name),
                quote_ident(Engine::Postgres, &c.name),
            );
            let sql = format!(
                "SELECT setval(pg_get_serial_sequence('{}', '{}'), GREATEST(COALESCE(MAX({cq}), 0), 1), COALESCE(MAX({cq}), 0) > 0) FROM {tq}",
                tq.replace('\'', "''"),
                c.name.replace('\'', "''"),
            );
            exec_on(conn, &sql, location).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::testkit::TestDatabase;
    use sqlx::Connection;

    /// The backup's read is a plain scan of each table, as `pg_dump`'s: no
    /// sort of the whole table on the server (once, an `ORDER BY` that named
    /// the cast output column sorted every table) and no walk of the primary
    /// key's index (the order it gave cost a tenth of a backup's server CPU).
    #[tokio::test]
    async fn the_bulk_read_scans_each_table_without_sorting_or_walking_an_index() {
        let Some(db) = TestDatabase::create_or_skip(Engine::Postgres, "bulk_read_order")
            .await
            .unwrap()
        else {
            return;
        };
        let mut conn = sqlx::postgres::PgConnection::connect(db.url())
            .await
            .unwrap();
        for sql in [
            "CREATE TABLE selectors (id serial PRIMARY KEY, registered_entry_id integer, type text, value text)",
            "CREATE TABLE pairs (a integer, b integer, PRIMARY KEY (a, b))",
            "INSERT INTO selectors (registered_entry_id, type, value) \
               SELECT g, 'unix', 'uid:' || g FROM generate_series(1, 50000) g",
            "INSERT INTO pairs SELECT g % 100, g FROM generate_series(1, 50000) g",
            "ANALYZE",
        ] {
            exec_on(&mut conn, sql, "test").await.unwrap();
        }
        let catalogue = catalogue_on(&mut conn, "test").await.unwrap();
        for table in &catalogue.tables {
            let select = bulk_read_sql(table);
            let select = select
                .strip_prefix("COPY (")
                .and_then(|s| s.strip_suffix(") TO STDOUT (FORMAT binary)"))
                .unwrap();
            let plan: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!("EXPLAIN {select}")))
                .fetch_all(&mut conn)
                .await
                .unwrap();
            let plan = plan.join("\n");
            assert!(
                plan.starts_with("Seq Scan") && !plan.contains("Index") && !plan.contains("Sort"),
                "{}: {plan}",
                table.name
            );
        }
        conn.close().await.unwrap();
        db.cleanup().await.unwrap();
    }

    /// Every value the restore loads through binary `COPY` is stored as the
    /// text `COPY` stores it, and what one refuses the other refuses: the
    /// same rows go into two identical tables, one per format, and every row
    /// reads back as the same text.
    #[tokio::test]
    async fn binary_copy_stores_what_text_copy_stores() {
        let Some(db) = TestDatabase::create_or_skip(Engine::Postgres, "binary_copy_in")
            .await
            .unwrap()
        else {
            return;
        };
        let mut conn = sqlx::postgres::PgConnection::connect(db.url())
            .await
            .unwrap();
        exec_on(&mut conn, "SET TimeZone = 'UTC'", "test")
            .await
            .unwrap();
        let shape = "(ord integer, i2 smallint, i8 bigint, b boolean, t text, vc varchar(5), \
                     ch char(4), by bytea, tz timestamptz, ts timestamp, ts3 timestamp(3), f float8)";
        for name in ["as_text", "as_binary"] {
            exec_on(&mut conn, &format!("CREATE TABLE {name} {shape}"), "test")
                .await
                .unwrap();
        }
        use ColumnKind as K;
        let columns: Vec<(String, ColumnKind)> = [
            ("ord", K::Integer),
            ("i2", K::Integer),
            ("i8", K::Integer),
            ("b", K::Boolean),
            ("t", K::Text),
            ("vc", K::Text),
            ("ch", K::Text),
            ("by", K::Bytes),
            ("tz", K::Timestamp),
            ("ts", K::Timestamp),
            ("ts3", K::Timestamp),
            ("f", K::Float),
        ]
        .into_iter()
        .map(|(n, k)| (n.to_owned(), k))
        .collect();
        let at = |s: &str| {
            Value::Timestamp(
                OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap(),
            )
        };
        let text = |s: &str| Value::Text(s.to_owned());
        let samples: Vec<[Value; 11]> = vec![
            [
                Value::Int(-32768),
                Value::Int(i64::MIN),
                Value::Bool(true),
                text("tab\there\nnew \\N back\\slash é 😀"),
                text("abcde   "),
                text("ab"),
                Value::Bytes(vec![0, 0x5c, 0x09, 0xff]),
                at("2026-12-05T05:15:20.123456789Z"),
                at("1999-12-31T23:59:59.999999999Z"),
                at("2026-01-02T03:04:05.9996+02:00"),
                Value::Float(0.1),
            ],
            [
                Value::Int(32767),
                Value::Int(i64::MAX),
                Value::Int(2),
                text(""),
                text("a"),
                text("abcd"),
                Value::Bytes(Vec::new()),
                at("0001-01-01T00:00:00Z"),
                at("9999-12-31T23:59:59.999999Z"),
                text("2026-01-02 03:04:05.5"),
                Value::Float(-0.0),
            ],
            [
                Value::Bool(true),
                Value::Int(0),
                Value::Int(0),
                text("x"),
                Value::Null,
                Value::Null,
                text("text into bytea"),
                text("2026-01-02T03:04:05Z"),
                at("1969-07-20T20:17:40.0000005Z"),
                Value::Null,
                Value::Float(f64::NAN),
            ],
            [
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Float(5e-324),
            ],
            [
                Value::Int(1),
                Value::Bool(false),
                Value::Bool(false),
                text("y"),
                text("b"),
                text("c"),
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Float(f64::NEG_INFINITY),
            ],
        ];
        let rows: Vec<Vec<Value>> = samples
            .into_iter()
            .enumerate()
            .map(|(i, rest)| {
                std::iter::once(Value::Int(i64::try_from(i).unwrap()))
                    .chain(rest)
                    .collect()
            })
            .collect();
        let types: Vec<(String, i64)> = sqlx::query_as(
            "SELECT attname::text, atttypid::int8 FROM pg_attribute \
             WHERE attrelid = 'as_binary'::regclass AND attnum > 0 ORDER BY attnum",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap();
        let fields: Vec<BinaryField> = types
            .iter()
            .zip(&columns)
            .map(|((_, oid), (_, kind))| BinaryField::for_type(*oid, *kind).unwrap())
            .collect();
        let binary = |rows: &[Vec<Value>]| {
            let mut data = copy_binary_in::HEADER.to_vec();
            copy_binary_in::push_rows(&mut data, "as_binary", &columns, &fields, rows)?;
            data.extend_from_slice(copy_binary_in::TRAILER);
            Ok::<_, String>(data)
        };
        copy_in(
            &mut conn,
            "as_text",
            &columns,
            false,
            copy_text("as_text", &columns, &rows).unwrap(),
            "test",
        )
        .await
        .unwrap();
        copy_in(
            &mut conn,
            "as_binary",
            &columns,
            true,
            binary(&rows).unwrap(),
            "test",
        )
        .await
        .unwrap();
        let read = |table: &str| format!("SELECT x::text FROM {table} x ORDER BY ord");
        let as_text: Vec<String> = sqlx::query_scalar(AssertSqlSafe(read("as_text")))
            .fetch_all(&mut conn)
            .await
            .unwrap();
        let as_binary: Vec<String> = sqlx::query_scalar(AssertSqlSafe(read("as_binary")))
            .fetch_all(&mut conn)
            .await
            .unwrap();
        assert_eq!(as_text.len(), rows.len());
        assert_eq!(as_binary, as_text);
        assert!(
            as_text[0].contains(",abcde,"),
            "varchar(5) cut the spaces: {}",
            as_text[0]
        );

        // What the server refuses in one format it refuses in the other.
        let one_row = |vc: Value, i2: Value| {
            let mut row = rows[4].clone();
            row[5] = vc;
            row[1] = i2;
            vec![row]
        };
        for bad in [
            one_row(text("abcdef"), Value::Int(1)),
            one_row(text("abc"), Value::Int(40_000)),
        ] {
            let by_text = match copy_text("as_text", &columns, &bad) {
                Ok(data) => copy_in(&mut conn, "as_text", &columns, false, data, "test")
                    .await
                    .is_err(),
                Err(_) => true,
            };
            let by_binary = match binary(&bad) {
                Ok(data) => copy_in(&mut conn, "as_binary", &columns, true, data, "test")
                    .await
                    .is_err(),
                Err(_) => true,
            };
            assert!(
                by_text && by_binary,
                "text refused: {by_text}, binary refused: {by_binary}"
            );
        }
        conn.close().await.unwrap();
        db.cleanup().await.unwrap();
    }

    /// A restored table whose columns all have types the binary format
    /// covers loads through it; one with another type (`numeric`, `date`)
    /// loads through the text format. Both read back as they were.
    #[tokio::test]
    async fn a_restore_loads_tables_of_any_column_type() {
        let Some(db) = TestDatabase::create_or_skip(Engine::Postgres, "binary_or_text_load")
            .await
            .unwrap()
        else {
            return;
        };
        let spec = match crate::datastore::dsn::parse(db.url(), None, std::path::Path::new("."))
            .unwrap()
        {
            crate::datastore::dsn::ConnectionSpec::Postgres(p) => p,
            _ => unreachable!("a PostgreSQL URL"),
        };
        let ds = PostgresDatastore::open(&spec).await.unwrap();
        ds.execute_script(
            "CREATE TABLE plain (id serial PRIMARY KEY, name varchar(255) NOT NULL, at timestamptz, data bytea, on_ boolean);
             CREATE TABLE mixed (id serial PRIMARY KEY, amount numeric(10,2), day date, note text);
             CREATE INDEX plain_name ON plain (name);
             INSERT INTO plain (name, at, data, on_) VALUES
               ('a', '2026-12-07 03:00:00.123456+00', '\\x00ff', true), ('b\tc', NULL, NULL, false);
             INSERT INTO mixed (amount, day, note) VALUES (12.50, '2026-12-07', 'x'), (NULL, NULL, NULL);",
        )
        .await
        .unwrap();
        let catalogue = ds.catalogue().await.unwrap();
        let mut before = Vec::new();
        for t in &catalogue.tables {
            before.push(ds.read_table(t).await.unwrap());
        }
        let names: Vec<String> = catalogue.tables.iter().map(|t| t.name.clone()).collect();
        let mut restore = ds.open_restore(&names).await.unwrap();
        for (t, rows) in catalogue.tables.iter().zip(&before) {
            restore.create_table(Engine::Postgres, t).await.unwrap();
            let columns: Vec<(String, ColumnKind)> =
                t.columns.iter().map(|c| (c.name.clone(), c.kind)).collect();
            let binary = restore.binary_fields(&t.name, &columns).is_some();
            assert_eq!(binary, t.name == "plain", "{}", t.name);
            restore.insert_rows(&t.name, &columns, rows).await.unwrap();
        }
        Box::new(restore).commit(&catalogue.tables).await.unwrap();
        for (t, rows) in catalogue.tables.iter().zip(&before) {
            assert_eq!(&ds.read_table(t).await.unwrap(), rows, "{}", t.name);
        }
        // Analyzed in the restore's transaction: the planner has statistics.
        let mut conn = sqlx::postgres::PgConnection::connect(db.url())
            .await
            .unwrap();
        let analyzed: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT tablename::text FROM pg_stats WHERE schemaname = current_schema() ORDER BY 1",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap();
        assert_eq!(analyzed, ["mixed", "plain"]);
        conn.close().await.unwrap();
        ds.close().await;
        db.cleanup().await.unwrap();
    }

    /// Regression (found in review): a failure after the staging schema was
    /// made (here the index builder's connection, refused) fell back to an
    /// in-place restore with the session already pointed at the staging
    /// schema, so the load would have gone there and the target never been
    /// replaced. Now the restore fails, and the target's tables stay.
    #[tokio::test]
    async fn a_restore_that_cannot_open_its_builder_connection_fails() {
        let Some(db) = TestDatabase::create_or_skip(Engine::Postgres, "no_builder")
            .await
            .unwrap()
        else {
            return;
        };
        let spec = match crate::datastore::dsn::parse(db.url(), None, std::path::Path::new("."))
            .unwrap()
        {
            crate::datastore::dsn::ConnectionSpec::Postgres(p) => p,
            _ => unreachable!("a PostgreSQL URL"),
        };
        let ds = PostgresDatastore::open(&spec).await.unwrap();
        ds.execute_script(
            "CREATE TABLE kept (id serial PRIMARY KEY); INSERT INTO kept DEFAULT VALUES;",
        )
        .await
        .unwrap();
        // A pool that opens one connection and refuses every later one.
        let opened = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = std::sync::Arc::clone(&opened);
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(std::time::Duration::from_secs(2))
            .after_connect(move |_, _| {
                let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Box::pin(async move {
                    if n == 0 {
                        Ok(())
                    } else {
                        Err(sqlx::Error::Protocol("refused by the test".into()))
                    }
                })
            })
            .connect_with(spec.options.clone())
            .await
            .unwrap();
        let one_connection = PostgresDatastore {
            pool,
            location: ds.location.clone(),
        };
        let opened_restore = one_connection.open_restore(&["kept".to_string()]).await;
        assert!(
            opened_restore.is_err(),
            "the restore went on without its index builder"
        );
        drop(opened_restore);
        one_connection.close().await;
        let kept = ds.catalogue().await.unwrap();
        let table = kept.table("kept").expect("the target's table stays");
        assert_eq!(ds.read_table(table).await.unwrap().len(), 1);
        ds.close().await;
        db.cleanup().await.unwrap();
    }

    fn one(kind: ColumnKind, v: Value) -> String {
        let columns = vec![("c".to_owned(), kind)];
        String::from_utf8(copy_text("t", &columns, &[vec![v]]).unwrap()).unwrap()
    }

    /// COPY's text format: every character that means something to it is
    /// escaped, so a hostile value loads as itself.
    #[test]
    fn copy_text_escapes_what_copy_reads_specially() {
        assert_eq!(
            one(ColumnKind::Text, Value::Text("a\tb\nc\rd\\N e".into())),
            "a\\tb\\nc\\rd\\\\N e\n"
        );
        assert_eq!(one(ColumnKind::Text, Value::Null), "\\N\n");
        assert_eq!(one(ColumnKind::Text, Value::Text("\\N".into())), "\\\\N\n");
        assert_eq!(
            one(ColumnKind::Bytes, Value::Bytes(vec![0, 0x5c, 0xff])),
            "\\\\x005cff\n"
        );
        assert_eq!(one(ColumnKind::Boolean, Value::Int(2)), "t\n");
        assert_eq!(
            one(ColumnKind::Integer, Value::Int(i64::MIN)),
            "-9223372036854775808\n"
        );
        assert_eq!(
            one(ColumnKind::Float, Value::Float(f64::NEG_INFINITY)),
            "-Infinity\n"
        );
        let columns = vec![
            ("a".to_owned(), ColumnKind::Integer),
            ("b".to_owned(), ColumnKind::Text),
        ];
        let rows = vec![
            vec![Value::Int(1), Value::Text("x".into())],
            vec![Value::Int(2), Value::Null],
        ];
        assert_eq!(
            String::from_utf8(copy_text("t", &columns, &rows).unwrap()).unwrap(),
            "1\tx\n2\t\\N\n"
        );
        let err = copy_text("t", &columns[1..], &[vec![Value::Text("a\0b".into())]]).unwrap_err();
        assert!(err.contains("t.b") && err.contains("NUL"), "{err}");
    }

    /// Timestamps keep what a bound parameter keeps: microseconds, cut toward
    /// zero from 2000-01-01 (so before 2000 a sub-microsecond value moves up).
    #[test]
    fn copy_text_timestamps_match_the_binary_encoding() {
        let at = |s: &str| {
            OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap()
        };
        assert_eq!(
            one(
                ColumnKind::Timestamp,
                Value::Timestamp(at("2026-12-05T05:15:20.123456789Z"))
            ),
            "2026-12-05 05:15:20.123456+00\n"
        );
        assert_eq!(
            one(
                ColumnKind::Timestamp,
                Value::Timestamp(at("1999-12-31T23:59:59.999999999Z"))
            ),
            "2000-01-01 00:00:00.000000+00\n",
            "toward zero from 2000: 1 ns before 2000 is within the last microsecond"
        );
        assert_eq!(
            one(
                ColumnKind::Timestamp,
                Value::Timestamp(at("1999-12-31T23:59:58.5000005Z"))
            ),
            "1999-12-31 23:59:58.500001+00\n"
        );
        assert_eq!(
            one(
                ColumnKind::Timestamp,
                Value::Timestamp(at("2026-01-02T03:04:05+02:00"))
            ),
            "2026-01-02 01:04:05.000000+00\n"
        );
    }
}
