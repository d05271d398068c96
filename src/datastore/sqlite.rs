//! SQLite, as SPIRE uses it through go-sqlite3 (WAL mode, text datetimes).
//!
//! The file is always read through SQLite itself, never copied: committed data
//! may still sit in the `-wal` file (spire-reference §8).

mod bulk_read;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions, SqliteRow};
use sqlx::{AssertSqlSafe, Row, Sqlite, TypeInfo, ValueRef};

use super::NextId;
use super::batches::{bind_as_given, insert_values};
use super::catalogue::{Catalogue, Column, Index, Table};
use super::driver_error::classify;
use super::dsn::{Engine, OpenMode, SqliteSpec};
use super::sql::select_all_sql;
use super::timefmt::{format_sqlite_datetime, parse_sqlite_datetime};
use super::{
    ColumnKind, CommitOutcome, Datastore, LiveSession, RestoreWrite, SnapshotRead, Value, ddl,
    is_staging_table, quote_ident,
};
use crate::error::{Error, Result};

pub(crate) struct SqliteDatastore {
    pool: SqlitePool,
    location: String,
    path: std::path::PathBuf,
    read_only: bool,
}

impl SqliteDatastore {
    pub(crate) async fn open(spec: &SqliteSpec, mode: OpenMode) -> Result<Self> {
        let location = format!("sqlite:{}", spec.path.display());
        if mode != OpenMode::Create && !spec.path.exists() {
            return Err(Error::MissingSqliteFile {
                path: spec.path.clone(),
            });
        }
        if spec.path.is_dir() {
            return Err(Error::NotSpire {
                location,
                why: "it is a directory, not a SQLite file".into(),
            });
        }
        let options = super::quiet_slow_statements(
            SqliteConnectOptions::new()
                .filename(&spec.path)
                .read_only(mode == OpenMode::ReadOnly)
                .create_if_missing(mode == OpenMode::Create),
        );
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|e| classify(&e, &location))?;
        let store = Self {
            pool,
            location,
            path: spec.path.clone(),
            read_only: mode == OpenMode::ReadOnly,
        };
        // A file that is not a database fails only on first read: check now.
        store.server_version().await?;
        sqlx::query("SELECT count(*) FROM sqlite_master")
            .fetch_one(&store.pool)
            .await
            .map_err(|e| classify(&e, &store.location))?;
        Ok(store)
    }

    fn err(&self, e: &sqlx::Error) -> Error {
        classify(e, &self.location)
    }
}

#[async_trait]
impl Datastore for SqliteDatastore {
    fn engine(&self) -> Engine {
        Engine::Sqlite
    }

    fn location(&self) -> &str {
        &self.location
    }

    async fn server_version(&self) -> Result<String> {
        sqlx::query_scalar::<_, String>("SELECT sqlite_version()")
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
            quote_ident(Engine::Sqlite, table)
        )))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| self.err(&e))?;
        Ok(n.unsigned_abs())
    }

    async fn count_by(&self, table: &str, column: &str) -> Result<Vec<(Option<String>, u64)>> {
        let c = quote_ident(Engine::Sqlite, column);
        let rows: Vec<(Option<String>, i64)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT CAST({c} AS TEXT), count(*) FROM {} GROUP BY 1 ORDER BY 1",
            quote_ident(Engine::Sqlite, table)
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
        let sql = select_all_sql(Engine::Sqlite, table, |c| {
            quote_ident(Engine::Sqlite, &c.name)
        });
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
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut conn)
            .await
            .map_err(|e| self.err(&e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(journal_mode = %mode, "the SQLite datastore is not in WAL mode: SPIRE's writes wait until the snapshot ends");
        }
        // A deferred transaction takes its snapshot at the first read: read now.
        exec_on(&mut conn, "BEGIN DEFERRED", &self.location).await?;
        let schema_version: i64 = sqlx::query_scalar("PRAGMA schema_version")
            .fetch_one(&mut conn)
            .await
            .map_err(|e| self.err(&e))?;
        // The rows are read on a second connection (the bulk path). Its
        // snapshot is taken after this one's: the same schema version means
        // the catalogue read here describes the tables read there; the rows
        // all come from that one snapshot.
        let (path, read_only) = (self.path.clone(), self.read_only);
        let (rows, rows_schema_version) =
            tokio::task::spawn_blocking(move || bulk_read::begin(&path, read_only))
                .await
                .map_err(|e| Error::Aborted(format!("opening the SQLite bulk reader: {e}")))?
                .map_err(|detail| Error::Database {
                    location: self.location.clone(),
                    detail,
                })?;
        if rows_schema_version != schema_version {
            return Err(Error::Aborted(format!(
                "the schema of {} changed while the snapshot started (schema version {schema_version} \
                 then {rows_schema_version}): is a SPIRE server migrating it? Try again once it is done",
                self.location
            )));
        }
        Ok(Box::new(Snapshot {
            conn,
            rows: Some(rows),
            location: self.location.clone(),
        }))
    }

    async fn begin_restore(&self, _existing: &[String]) -> Result<Box<dyn RestoreWrite>> {
        let mut target = self
            .pool
            .acquire()
            .await
            .map_err(|e| self.err(&e))?
            .detach();
        // The write lock, held until the copy: one restore (or writer) at a
        // time, and so one user of the staging file.
        exec_on(&mut target, "BEGIN IMMEDIATE", &self.location).await?;
        // The copy into a WAL-mode target needs the staging file's page size.
        let page_size: i64 = sqlx::query_scalar("PRAGMA page_size")
            .fetch_one(&mut target)
            .await
            .map_err(|e| self.err(&e))?;
        let staging_file = StagingFile::beside(&self.path);
        // Holding the lock, a staging file is a killed restore's leftover.
        staging_file.remove();
        let options = super::quiet_slow_statements(
            SqliteConnectOptions::new()
                .filename(&staging_file.path)
                .create_if_missing(true)
                .page_size(u32::try_from(page_size).unwrap_or(4096))
                // A scratch file: a crash leaves it to be removed, never to be
                // recovered, so no journal and no syncs while it fills.
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Off)
                .synchronous(sqlx::sqlite::SqliteSynchronous::Off),
        );
        let mut staging =
            <sqlx::sqlite::SqliteConnection as sqlx::Connection>::connect_with(&options)
                .await
                .map_err(|e| self.err(&e))?;
        exec_on(&mut staging, "BEGIN", &self.location).await?;
        Ok(Box::new(Restore {
            target,
            target_path: self.path.clone(),
            staging,
            staging_file,
            location: self.location.clone(),
            deferred_indexes: Vec::new(),
        }))
    }

    async fn next_id(&self, table: &str, _column: &str) -> Result<NextId> {
        let t = Table::of_columns(
            "sqlite_sequence",
            &[("name", ColumnKind::Text), ("seq", ColumnKind::Integer)],
        );
        let Ok(rows) = self.read_table(&t).await else {
            return Ok(NextId::Unknown("sqlite_sequence could not be read".into()));
        };
        // No row for a table that never had one: the next id is 1.
        let seq = rows.iter().find_map(|r| match (r.first(), r.get(1)) {
            (Some(Value::Text(n)), Some(Value::Int(s))) if n == table => Some(*s),
            _ => None,
        });
        Ok(NextId::Known(seq.map_or(1, |s| s + 1)))
    }

    async fn other_sessions(&self) -> Result<Vec<LiveSession>> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || holders(&path))
            .await
            .map_err(|e| Error::Aborted(format!("looking for other users of the SQLite file: {e}")))
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

/// The processes other than this one that have the SQLite file `path` open
/// (Linux `/proc`), by pid:
///
/// 1. every `/proc/<pid>/fd` link to the file, its `-wal`, `-shm` or
///    `-journal` (readable for this user's processes, all of them as root),
///    named by `/proc/<pid>/comm`;
/// 2. a lock on the `-shm` file ([`shm_lock_holder`]): in WAL mode, which
///    SPIRE always uses, each process with the database open holds a read lock
///    on it for as long as it keeps a connection, which the kernel reports for
///    any user and any container sharing the file. A holder the first pass
///    could not see is named when its pid is visible, and otherwise reported
///    as a process outside this PID namespace.
///
/// This process's own connections never count (same pid). A `-wal` that no
/// process holds (left by a server that was killed) is not a live session:
/// the next connection recovers it, the restore's included.
fn holders(path: &std::path::Path) -> Vec<LiveSession> {
    let Ok(main) = std::fs::canonicalize(path) else {
        return Vec::new();
    };
    let [_, side_files @ ..] = super::dsn::sqlite_files(&main);
    let own = std::process::id();
    let comm = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty())
    };
    let mut found: Vec<LiveSession> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for entry in procs.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if pid == own {
                continue;
            }
            // Other users' fds are unreadable unless root; they vanish mid-scan.
            let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
                continue;
            };
            let (mut main_fds, mut files) = (0u64, 0u64);
            for fd in fds.flatten() {
                let Ok(target) = std::fs::read_link(fd.path()) else {
                    continue;
                };
                if target == main {
                    main_fds += 1;
                    files += 1;
                } else if side_files.contains(&target) {
                    files += 1;
                }
            }
            if files > 0 {
                seen.insert(pid);
                found.push(LiveSession {
                    host: None,
                    application: comm(pid),
                    user: None,
                    pid: Some(pid),
                    connections: main_fds.max(1),
                    note: Some(format!("{files} open file(s) of the datastore")),
                });
            }
        }
    } else {
        tracing::debug!("no /proc: other processes using the SQLite file cannot be seen");
    }
    let shm = &side_files[1];
    let shm_name = shm
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    match shm_lock_holder(shm) {
        Some(0) => found.push(LiveSession {
            host: None,
            application: None,
            user: None,
            pid: None,
            connections: 1,
            note: Some(format!(
                "a process outside this PID namespace (another container?) holds a lock on {shm_name}"
            )),
        }),
        Some(pid) if seen.insert(pid) => found.push(LiveSession {
            host: None,
            application: comm(pid),
            user: None,
            pid: Some(pid),
            connections: 1,
            note: Some(format!(
                "holds a lock on {shm_name}; its open files are not readable by this user"
            )),
        }),
        // No lock, or one held by a process already listed.
        Some(_) | None => {}
    }
    found.sort_by(|a, b| b.connections.cmp(&a.connections).then(a.pid.cmp(&b.pid)));
    found
}

/// The offset of SQLite's "dead man switch" byte in the `-shm` file
/// (`UNIX_SHM_DMS` in `os_unix.c`): every connection in WAL mode holds a
/// read lock on it for as long as it is open.
const SHM_DMS_BYTE: i64 = 128;

/// Whether another process holds a POSIX lock on the `-shm` file's DMS byte:
/// its pid as this PID namespace sees it (0 for a process outside it, such as
/// another container sharing the volume). `F_GETLK` never reports this
/// process's own locks, and, unlike `/proc/locks` (which hides other
/// namespaces' locks), the kernel checks every lock on the file.
///
/// The descriptor is opened once per file and never closed: closing any
/// descriptor of a file drops every POSIX lock this process holds on it,
/// which would pull the locks from under this process's own SQLite
/// connections.
fn shm_lock_holder(shm: &std::path::Path) -> Option<u32> {
    use nix::fcntl::{FcntlArg, fcntl};
    use std::os::unix::fs::MetadataExt;
    static OPEN: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<(u64, u64), std::fs::File>>,
    > = std::sync::OnceLock::new();

    let meta = std::fs::metadata(shm).ok()?;
    let mut open = OPEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let file = match open.entry((meta.dev(), meta.ino())) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(v) => v.insert(std::fs::File::open(shm).ok()?),
    };
    let mut probe = nix::libc::flock {
        l_type: i16::try_from(nix::libc::F_WRLCK).ok()?,
        l_whence: i16::try_from(nix::libc::SEEK_SET).ok()?,
        l_start: SHM_DMS_BYTE,
        l_len: 1,
        l_pid: 0,
    };
    fcntl(&*file, FcntlArg::F_GETLK(&mut probe)).ok()?;
    if i32::from(probe.l_type) == nix::libc::F_UNLCK {
        return None;
    }
    u32::try_from(probe.l_pid).ok()
}

/// `'name'` as a SQL string literal (for table-valued pragma arguments).
fn sql_str(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Reads one SQLite row. SQLite is dynamically typed, so the storage class of
/// each value decides how it is read; the column kind decides what it means.
pub(crate) fn decode_row(
    row: &SqliteRow,
    kinds: &[ColumnKind],
) -> std::result::Result<Vec<Value>, sqlx::Error> {
    let mut out = Vec::with_capacity(kinds.len());
    for (i, kind) in kinds.iter().enumerate() {
        let raw = row.try_get_raw(i)?;
        if raw.is_null() {
            out.push(Value::Null);
            continue;
        }
        let storage = raw.type_info().name().to_string();
        let v = match (storage.as_str(), kind) {
            ("INTEGER", ColumnKind::Boolean) => Value::Bool(row.try_get::<i64, _>(i)? != 0),
            ("INTEGER", _) => Value::Int(row.try_get::<i64, _>(i)?),
            ("REAL", _) => Value::Float(row.try_get::<f64, _>(i)?),
            ("BLOB", _) => Value::Bytes(row.try_get::<Vec<u8>, _>(i)?),
            (_, ColumnKind::Timestamp) => {
                let text: String = row.try_get(i)?;
                match parse_sqlite_datetime(&text) {
                    Some(t) => Value::Timestamp(t),
                    None => Value::Text(text),
                }
            }
            (_, ColumnKind::Bytes) => Value::Bytes(row.try_get::<String, _>(i)?.into_bytes()),
            _ => Value::Text(row.try_get::<String, _>(i)?),
        };
        out.push(v);
    }
    Ok(out)
}

/// Reads the catalogue on one connection (inside a snapshot transaction, if one is open).
async fn catalogue_on(
    conn: &mut sqlx::sqlite::SqliteConnection,
    location: &str,
) -> Result<Catalogue> {
    let tables: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| classify(&e, location))?;
    let mut out = Vec::with_capacity(tables.len());
    // A restore's staging tables are never the user's.
    for (name, sql) in tables.into_iter().filter(|(n, _)| !is_staging_table(n)) {
        let cols: Vec<(i64, String, String, i64, Option<String>, i64)> =
            sqlx::query_as(AssertSqlSafe(format!(
                "SELECT cid, name, type, \"notnull\", dflt_value, pk FROM pragma_table_info({})",
                sql_str(&name)
            )))
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| classify(&e, location))?;
        let autoinc = sql
            .as_deref()
            .is_some_and(|s| s.to_ascii_uppercase().contains("AUTOINCREMENT"));
        let mut pk: Vec<(i64, String)> = cols
            .iter()
            .filter(|c| c.5 > 0)
            .map(|c| (c.5, c.1.clone()))
            .collect();
        pk.sort();
        let single_int_pk = pk.len() == 1;
        let columns = cols
            .iter()
            .map(|(_, cname, ctype, notnull, _, pkpos)| Column {
                name: cname.clone(),
                declared_type: ctype.clone(),
                kind: ColumnKind::from_sqlite_type(ctype),
                // An INTEGER PRIMARY KEY is the rowid and can never be NULL.
                nullable: *notnull == 0 && *pkpos == 0,
                auto_increment: autoinc
                    && single_int_pk
                    && *pkpos == 1
                    && ctype.eq_ignore_ascii_case("integer"),
            })
            .collect();
        let idx_list: Vec<(i64, String, i64, String, i64)> =
            sqlx::query_as(AssertSqlSafe(format!(
                "SELECT seq, name, \"unique\", origin, partial FROM pragma_index_list({})",
                sql_str(&name)
            )))
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| classify(&e, location))?;
        let mut indexes = Vec::new();
        for (_, iname, unique, origin, _) in idx_list {
            if origin == "pk" {
                continue;
            }
            let mut icols: Vec<(i64, String)> = sqlx::query_as(AssertSqlSafe(format!(
                "SELECT seqno, name FROM pragma_index_info({})",
                sql_str(&iname)
            )))
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| classify(&e, location))?;
            icols.sort();
            indexes.push(Index {
                name: iname,
                columns: icols.into_iter().map(|c| c.1).collect(),
                unique: unique != 0,
            });
        }
        indexes.sort_by(|a, b| a.name.cmp(&b.name));
        out.push(Table {
            name,
            columns,
            primary_key: pk.into_iter().map(|p| p.1).collect(),
            indexes,
            create_sql: sql,
        });
    }
    Ok(Catalogue { tables: out })
}

/// Inserts rows with multi-row INSERTs on one connection (the caller owns the transaction).
async fn insert_on(
    conn: &mut sqlx::sqlite::SqliteConnection,
    table: &str,
    columns: &[(String, ColumnKind)],
    rows: &[Vec<Value>],
    location: &str,
) -> Result<()> {
    insert_values::<Sqlite, _>(
        conn,
        Engine::Sqlite,
        table,
        columns,
        rows,
        // No packet limit short of a gigabyte; batches weigh a few MiB.
        usize::MAX,
        location,
        |b, v, _| {
            bind_as_given(b, v, format_sqlite_datetime);
            Ok(())
        },
    )
    .await
}

/// Runs one statement on a dedicated connection.
async fn exec_on(
    conn: &mut sqlx::sqlite::SqliteConnection,
    sql: &str,
    location: &str,
) -> Result<()> {
    sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
        .execute(&mut *conn)
        .await
        .map_err(|e| classify(&e, location))?;
    Ok(())
}

/// An open snapshot transaction on a dedicated connection (closed, and so
/// rolled back, if dropped).
struct Snapshot {
    /// The catalogue's connection.
    conn: sqlx::sqlite::SqliteConnection,
    /// The rows' connection ([`bulk_read`]), away while a read runs on it.
    rows: Option<rusqlite::Connection>,
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
        let conn = self.rows.take().ok_or_else(|| {
            Error::Aborted(format!(
                "reading {}: an earlier read of this snapshot failed",
                table.name
            ))
        })?;
        let sql = select_all_sql(Engine::Sqlite, table, |c| {
            quote_ident(Engine::Sqlite, &c.name)
        });
        let kinds: Vec<ColumnKind> = table.columns.iter().map(|c| c.kind).collect();
        let out = out.clone();
        let (conn, result) = tokio::task::spawn_blocking(move || {
            let result = bulk_read::stream(&conn, &sql, &kinds, &out);
            (conn, result)
        })
        .await
        .map_err(|e| Error::Aborted(format!("reading {}: {e}", table.name)))?;
        self.rows = Some(conn);
        result.map_err(|e| match e {
            bulk_read::ReadError::Sqlite(detail) => Error::Database {
                location: self.location.clone(),
                detail: format!("reading table {}: {detail}", table.name),
            },
            bulk_read::ReadError::Stopped => Error::Aborted(format!(
                "reading {}: the consumer of the rows stopped",
                table.name
            )),
        })
    }

    async fn finish(mut self: Box<Self>) -> Result<()> {
        // Dropping the bulk reader ends its read transaction.
        drop(self.rows.take());
        exec_on(&mut self.conn, "ROLLBACK", &self.location).await
    }
}

/// The scratch file a restore loads into, next to the target (so on the
/// same file system, with the same permissions of its directory): the
/// target's name with [`STAGING_SUFFIX`]. Removed when dropped, so a failed
/// restore leaves nothing; a killed one leaves it to the next restore.
struct StagingFile {
    path: std::path::PathBuf,
}

/// What a staging file's name adds to its target's.
const STAGING_SUFFIX: &str = ".spirekeep-restore";

impl StagingFile {
    fn beside(target: &std::path::Path) -> Self {
        Self {
            path: super::dsn::with_suffix(target, STAGING_SUFFIX),
        }
    }

    /// Removes the file and the side files SQLite may have made for it.
    fn remove(&self) {
        for file in super::dsn::sqlite_files(&self.path) {
            if let Err(e) = std::fs::remove_file(&file)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(file = %file.display(), error = %e, "could not remove a restore's staging file");
            }
        }
    }
}

impl Drop for StagingFile {
    fn drop(&mut self) {
        self.remove();
    }
}

/// A restore through a staging file. The tables load into a new SQLite file
/// beside the target, with no journal and no syncs, and the secondary
/// indexes are built once the tables are full (one sort per index instead
/// of an index insertion per row). The commit copies the whole file into the
/// target with SQLite's online backup, in one write transaction of the
/// target's: all or nothing through the target's own journal or WAL, seen
/// at once by every connection (a server still running on it with `--force`
/// included), and the target ends up page for page the staging file, with
/// none of the free pages that dropping its old tables in place would leave.
/// (Renaming the file over the target would write the data once less, but
/// a process holding the target open would go on with the old file.)
struct Restore {
    /// Holds the target's write lock from the start to the copy.
    target: sqlx::sqlite::SqliteConnection,
    target_path: std::path::PathBuf,
    /// The staging file's connection, inside one transaction.
    staging: sqlx::sqlite::SqliteConnection,
    staging_file: StagingFile,
    location: String,
    /// `CREATE INDEX` statements to run at commit, after the load.
    deferred_indexes: Vec<String>,
}

#[async_trait]
impl RestoreWrite for Restore {
    fn staging_name(&self, table: &str) -> String {
        table.to_string()
    }

    async fn create_table(&mut self, source: Engine, table: &Table) -> Result<()> {
        let mut statements =
            ddl::create_statements(source, Engine::Sqlite, table, &table.name)?.into_iter();
        // The first statement creates the table (with its primary key); the
        // others are its indexes.
        if let Some(create) = statements.next() {
            exec_on(&mut self.staging, &create, &self.location).await?;
        }
        self.deferred_indexes.extend(statements);
        Ok(())
    }

    async fn insert_rows(
        &mut self,
        table: &str,
        columns: &[(String, ColumnKind)],
        rows: &[Vec<Value>],
    ) -> Result<()> {
        insert_on(&mut self.staging, table, columns, rows, &self.location).await
    }

    async fn commit(mut self: Box<Self>, _tables: &[Table]) -> Result<CommitOutcome> {
        // AUTOINCREMENT keeps sqlite_sequence at the largest id inserted, so
        // ids continue past the restored ones without help.
        for sql in std::mem::take(&mut self.deferred_indexes) {
            exec_on(&mut self.staging, &sql, &self.location).await?;
        }
        exec_on(&mut self.staging, "COMMIT", &self.location).await?;
        let Self {
            mut target,
            target_path,
            staging,
            staging_file,
            location,
            ..
        } = *self;
        <sqlx::sqlite::SqliteConnection as sqlx::Connection>::close(staging)
            .await
            .map_err(|e| classify(&e, &location))?;
        crate::testpoint::pause("restore.mid_swap").await;
        // The copy takes the target's write lock itself: this connection
        // lets go of it first.
        exec_on(&mut target, "ROLLBACK", &location).await?;
        let from = staging_file.path.clone();
        tokio::task::spawn_blocking(move || copy_into(&from, &target_path))
            .await
            .map_err(|e| {
                Error::Aborted(format!("copying the restored tables into {location}: {e}"))
            })?
            .map_err(|detail| Error::Database {
                location: location.clone(),
                detail: format!("copying the restored tables into the target: {detail}"),
            })?;
        drop(staging_file);
        // SPIRE opens its SQLite datastore in WAL mode (spire-reference §8): a
        // restored file starts out in it too. The restore stands either way.
        if let Err(e) = exec_on(&mut target, "PRAGMA journal_mode=WAL", &location).await {
            tracing::debug!(error = %e, "could not switch the restored SQLite file to WAL mode");
        }
        Ok(CommitOutcome::default())
    }
}

/// How long the copy waits for another connection's lock on the target.
const COPY_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Copies the SQLite file `from` over the database `to` with the online
/// backup API, all pages in one step: one write transaction of `to`.
fn copy_into(from: &std::path::Path, to: &std::path::Path) -> std::result::Result<(), String> {
    use rusqlite::{Connection, OpenFlags, backup};
    let text = |e: rusqlite::Error| e.to_string();
    let source = Connection::open_with_flags(
        from,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(text)?;
    let mut target = Connection::open_with_flags(
        to,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(text)?;
    target.busy_timeout(COPY_LOCK_WAIT).map_err(text)?;
    let copy = backup::Backup::new(&source, &mut target).map_err(text)?;
    match copy.step(-1).map_err(text)? {
        backup::StepResult::Done => Ok(()),
        other => Err(format!(
            "the target stayed locked by another connection ({other:?}) for {} s; nothing was changed",
            COPY_LOCK_WAIT.as_secs()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a test's tracing events printed.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Regression: every statement over a second (an index build at a
    /// restore's commit) printed sqlx's "slow statement" warning into the
    /// user's output. It is a debug event now.
    #[tokio::test]
    async fn a_slow_statement_is_no_warning() {
        let captured = Captured::default();
        let sink = captured.clone();
        // Global: SQLite statements run (and are logged) on sqlx's worker
        // thread. No other test of this binary installs a subscriber.
        tracing::subscriber::set_global_default(
            tracing_subscriber::fmt()
                .with_max_level(tracing::Level::WARN)
                .with_writer(move || sink.clone())
                .finish(),
        )
        .expect("the only global subscriber of the unit tests");
        let dir = tempfile::tempdir().unwrap();
        let spec = SqliteSpec {
            path: dir.path().join("slow.sqlite3"),
        };
        let ds = SqliteDatastore::open(&spec, OpenMode::Create)
            .await
            .unwrap();
        // Longer and longer until one statement takes over the 1 s threshold.
        let mut n = 1_000_000u64;
        loop {
            let started = std::time::Instant::now();
            ds.execute_script(&format!(
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {n}) \
                 SELECT count(*) FROM c"
            ))
            .await
            .unwrap();
            if started.elapsed() > std::time::Duration::from_millis(1_500) {
                break;
            }
            n *= 2;
            assert!(n < 1 << 34, "no statement took over a second");
        }
        ds.close().await;
        let printed = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(!printed.contains("slow statement"), "{printed}");
    }

    /// The bulk read path decodes every storage class exactly as the
    /// driver path does, for every column kind.
    #[tokio::test(flavor = "multi_thread")]
    async fn the_bulk_reader_decodes_like_the_driver() {
        let dir = tempfile::tempdir().unwrap();
        let spec = SqliteSpec {
            path: dir.path().join("kinds.sqlite3"),
        };
        let ds = SqliteDatastore::open(&spec, OpenMode::Create)
            .await
            .unwrap();
        ds.execute_script(
            "CREATE TABLE t (id integer PRIMARY KEY, b boolean, at datetime, blob_col blob, \
             txt varchar(255), f real);
             INSERT INTO t VALUES (1, 1, '2024-01-02 03:04:05.123456789+00:00', x'00ff', 'é', 1.5);
             INSERT INTO t VALUES (2, 0, 'not a time', 'text in a blob column', 42, 2);
             INSERT INTO t VALUES (3, NULL, 7, NULL, x'01', NULL);
             INSERT INTO t VALUES (4, 'yes', 2.5, 9, NULL, 'x');",
        )
        .await
        .unwrap();
        let table = ds.catalogue().await.unwrap().table("t").unwrap().clone();
        let expected = ds.read_table(&table).await.unwrap();
        let mut snapshot = ds.begin_snapshot().await.unwrap();
        let (tx, mut rx) = crate::datastore::row_channel(4);
        let sent = snapshot.stream_rows(&table, &tx).await.unwrap();
        drop(tx);
        let mut got = Vec::new();
        while let Some(batch) = rx.recv().await {
            got.extend(batch);
        }
        snapshot.finish().await.unwrap();
        assert_eq!(sent, 4);
        assert_eq!(got, expected);
        assert!(matches!(got[0][2], Value::Timestamp(_)), "{:?}", got[0][2]);
        ds.close().await;
    }

    /// This process's own pool (WAL mode, several connections, a read
    /// transaction open) is never another user of the file: neither its open
    /// files nor its lock on the `-shm` file count.
    #[tokio::test(flavor = "multi_thread")]
    async fn own_connections_are_not_other_users() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("own.sqlite3");
        let spec = SqliteSpec { path: path.clone() };
        let ds = SqliteDatastore::open(&spec, OpenMode::Create)
            .await
            .unwrap();
        ds.execute_script(
            "PRAGMA journal_mode=WAL; CREATE TABLE t (x integer); INSERT INTO t VALUES (1);",
        )
        .await
        .unwrap();
        let second = SqliteDatastore::open(&spec, OpenMode::ReadWrite)
            .await
            .unwrap();
        let snapshot = ds.begin_snapshot().await.unwrap();
        assert_eq!(second.count_rows("t").await.unwrap(), 1);
        let mut shm = path.clone().into_os_string();
        shm.push("-shm");
        assert!(std::path::Path::new(&shm).exists(), "WAL mode");
        assert_eq!(shm_lock_holder(std::path::Path::new(&shm)), None);
        assert_eq!(ds.other_sessions().await.unwrap(), vec![]);
        // Asking again (the probe's descriptor stays open) changes nothing,
        // and this process's connections keep working.
        assert_eq!(second.other_sessions().await.unwrap(), vec![]);
        snapshot.finish().await.unwrap();
        ds.execute_script("INSERT INTO t VALUES (2)").await.unwrap();
        assert_eq!(second.count_rows("t").await.unwrap(), 2);
        ds.close().await;
        second.close().await;
    }
}
