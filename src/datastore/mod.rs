//! Access to a SPIRE server's SQL datastore.
//!
//! The [`Datastore`] trait stays close to what each engine can do (read the
//! catalogue, count rows, run a script, insert rows); everything SPIRE-specific
//! (what a `migrations` row means, which tables count as agents or entries) lives
//! above it in generic code. Only the files in this module import a database
//! driver.

mod batches;
pub use batches::{RowReceiver, RowSender, row_channel};
mod catalogue;
pub mod ddl;
mod driver_error;
pub mod dsn;
mod limits;
mod mysql;
mod postgres;
pub mod spire_conf;
mod sql;
mod sqlite;
// Test data only: built for the library's own tests and with the `testkit`
// feature (the integration tests, benchmarks and examples turn it on).
#[cfg(any(test, feature = "testkit"))]
#[doc(hidden)]
pub mod testkit;
pub mod timefmt;
mod value;

use async_trait::async_trait;

pub use catalogue::{Catalogue, Column, Index, Table};
pub use dsn::{ConnectionSpec, Engine, OpenMode};
pub use limits::{TimestampPrecision, ValueLimits};
pub use value::{ColumnKind, Value};

use crate::error::Result;

/// The one row of SPIRE's `migrations` table (spire-reference §3).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MigrationsRow {
    /// The schema version (`migrations.version`).
    pub schema_version: i64,
    /// The SPIRE version that last wrote the row, exactly as stored (`1.15.3`, `1.16.0-dev-abc123`, or empty).
    pub code_version: String,
}

/// A connection to one SPIRE datastore.
#[async_trait]
pub trait Datastore: Send + Sync {
    /// Which engine this is.
    fn engine(&self) -> Engine;

    /// Where it is, with any password removed: safe to print and log.
    fn location(&self) -> &str;

    /// The database server's own version string (`15.18`, `10.11.19-MariaDB`, `3.51.3`).
    async fn server_version(&self) -> Result<String>;

    /// The live catalogue: every user table with its columns, primary key and indexes.
    async fn catalogue(&self) -> Result<Catalogue>;

    /// `SELECT count(*)` of one table.
    async fn count_rows(&self, table: &str) -> Result<u64>;

    /// `SELECT column, count(*) ... GROUP BY column` with the column read as text
    /// (`None` for NULL), sorted by value.
    async fn count_by(&self, table: &str, column: &str) -> Result<Vec<(Option<String>, u64)>>;

    /// Reads every row of `table`, ordered by its primary key, converting each
    /// column according to its kind. For small tables and tests; snapshots stream.
    async fn read_table(&self, table: &Table) -> Result<Vec<Vec<Value>>>;

    /// Runs a multi-statement SQL script (DDL of a fixture schema, for example).
    async fn execute_script(&self, sql: &str) -> Result<()>;

    /// Inserts rows into `table` inside one transaction. `columns` names the
    /// columns and their kinds, in the order of each row's values.
    async fn insert_rows(
        &self,
        table: &str,
        columns: &[(String, ColumnKind)],
        rows: &[Vec<Value>],
    ) -> Result<()>;

    /// Opens one consistent, read-only view of the whole datastore: a single
    /// transaction with snapshot isolation (REPEATABLE READ on PostgreSQL,
    /// `WITH CONSISTENT SNAPSHOT` on InnoDB, a read transaction on SQLite).
    async fn begin_snapshot(&self) -> Result<Box<dyn SnapshotRead>>;

    /// Starts an all-or-nothing restore that will replace `existing` (the
    /// target's current tables; empty for an empty target). Nothing is visible
    /// to other sessions until [`RestoreWrite::commit`].
    async fn begin_restore(&self, existing: &[String]) -> Result<Box<dyn RestoreWrite>>;

    /// Who else is using this datastore right now: other clients' sessions on
    /// the same database (PostgreSQL's `pg_stat_activity`, MySQL's process
    /// list), or other processes holding the SQLite file or its `-wal`/`-shm`
    /// open. This process's own connections (every [`Datastore`] it opened)
    /// never count. Grouped by host, name and user, largest first.
    ///
    /// What an engine cannot show is not reported: without MySQL's `PROCESS`
    /// privilege only the same user's sessions are listed, and on SQLite only
    /// processes of this machine (`/proc`; another container's process is
    /// seen through its lock on the `-shm` file).
    async fn other_sessions(&self) -> Result<Vec<LiveSession>>;

    /// The id the auto-increment `column` of `table` hands out next, as far
    /// as the engine lets it be read (a restore checks it lies past the
    /// largest restored id).
    async fn next_id(&self, table: &str, column: &str) -> Result<NextId>;

    /// Closes the connection pool cleanly.
    async fn close(&self);
}

/// Another client using a datastore (see [`Datastore::other_sessions`]).
/// Never carries a password: only what the engine shows about a session.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LiveSession {
    /// Where the client connects from, without a port (`10.0.0.7`,
    /// `localhost`, `local socket`); `None` where the engine does not say.
    pub host: Option<String>,
    /// What the client calls itself: PostgreSQL's `application_name`, or the
    /// process name on SQLite. `None` where there is none (MySQL has no
    /// application name; an empty PostgreSQL one is `None` too).
    pub application: Option<String>,
    /// The database user.
    pub user: Option<String>,
    /// The process id (SQLite: a process on this machine).
    pub pid: Option<u32>,
    /// How many connections (SQLite: open files of the datastore) it has.
    pub connections: u64,
    /// Anything else worth knowing (how it was seen, what is hidden).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl std::fmt::Display for LiveSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.application, self.pid) {
            (Some(app), Some(pid)) => write!(f, "{app:?} (pid {pid})")?,
            (Some(app), None) => write!(f, "{app:?}")?,
            (None, Some(pid)) => write!(f, "pid {pid}")?,
            (None, None) => f.write_str("a client")?,
        }
        let mut about = Vec::new();
        if let Some(user) = &self.user {
            about.push(format!("user {user}"));
        }
        if let Some(host) = &self.host {
            about.push(format!("from {host}"));
        }
        if !about.is_empty() {
            write!(f, " {}", about.join(" "))?;
        }
        write!(f, ", {} connection(s)", self.connections)?;
        if let Some(note) = &self.note {
            write!(f, " ({note})")?;
        }
        Ok(())
    }
}

/// Rows travel between stages in batches of this many, so per-row channel
/// overhead stays small and memory stays bounded.
pub const ROW_BATCH: usize = 1024;

/// A batch of rows.
pub type RowBatch = Vec<Vec<Value>>;

/// One open snapshot transaction.
#[async_trait]
pub trait SnapshotRead: Send {
    /// The catalogue as this transaction sees it.
    async fn catalogue(&mut self) -> Result<Catalogue>;

    /// Streams every row of `table` into `out` in batches of at most
    /// [`ROW_BATCH`]. Returns the number of rows. The order is the one the
    /// engine reads cheapest (primary-key order on SQLite and MySQL, whose
    /// tables are stored that way; storage order on PostgreSQL): a consumer
    /// that needs the row with the lowest key looks for it.
    async fn stream_rows(
        &mut self,
        table: &Table,
        out: &crate::datastore::RowSender,
    ) -> Result<u64>;

    /// Ends the transaction.
    async fn finish(self: Box<Self>) -> Result<()>;

    /// A second reader of this very snapshot, on a connection of its own, so
    /// two tables can stream at once; `None` where the engine cannot share a
    /// snapshot between connections. It must be opened before any table is
    /// read, and this transaction kept open until it is finished.
    async fn second_reader(&mut self) -> Result<Option<Box<dyn SnapshotRead>>> {
        Ok(None)
    }

    /// The tables' sizes as the engine estimates them (any unit, the same for
    /// every table), so the largest can start first; empty when unknown.
    async fn size_estimates(&mut self) -> Result<std::collections::HashMap<String, u64>> {
        Ok(std::collections::HashMap::new())
    }
}

/// One open restore. Dropping it without [`RestoreWrite::commit`] leaves the
/// target as it was.
#[async_trait]
pub trait RestoreWrite: Send {
    /// The name under which `table` is created and loaded until commit (the
    /// table itself inside a transaction; a shadow table on MySQL, whose DDL
    /// commits on its own).
    fn staging_name(&self, table: &str) -> String;

    /// Creates the staging table for `table` (a catalogue read from a
    /// `source` datastore) with DDL rendered by [`ddl::create_statements`]
    /// from the validated catalogue: no SQL text from a snapshot is ever run.
    ///
    /// # Errors
    /// A catalogue that fails validation ([`ddl::check_table`]), or a database error.
    async fn create_table(&mut self, source: Engine, table: &Table) -> Result<()>;

    /// Loads rows into a staging table.
    async fn insert_rows(
        &mut self,
        table: &str,
        columns: &[(String, ColumnKind)],
        rows: &[Vec<Value>],
    ) -> Result<()>;

    /// Makes the restore visible at once and moves auto-increment sequences
    /// past the restored ids. `tables` are the restored tables under their final names.
    ///
    /// # Errors
    /// A failure that left the target as it was. Anything that went wrong
    /// *after* the restore became visible is in [`CommitOutcome::warnings`].
    async fn commit(self: Box<Self>, tables: &[Table]) -> Result<CommitOutcome>;

    /// Ends a restore that will not commit (the caller found an error):
    /// removes what it staged where the engine can do so at once. Dropping
    /// the session instead leaves the target as it was too; a staging area
    /// that outlives it is removed by the next restore.
    async fn abandon(self: Box<Self>) {}
}

/// What a restore's commit did besides making the restore visible.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitOutcome {
    /// Problems after the restore became visible (the restore stands), e.g.
    /// replaced MySQL tables that could not be dropped.
    pub warnings: Vec<String>,
}

/// Prefixes of a restore's staging tables: MySQL loads `_spirekeep_new_<t>`
/// and swaps the replaced tables out as `_spirekeep_old_<t>`.
pub const STAGING_PREFIXES: [&str; 2] = ["_spirekeep_new_", "_spirekeep_old_"];

/// Whether `name` is a restore's staging table. Such a table is never the
/// user's: catalogues leave it out (so backups, restores and impact reports
/// never see it), and a restore removes those an earlier, killed restore left.
#[must_use]
pub fn is_staging_table(name: &str) -> bool {
    STAGING_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// How long a restore waits for another restore into the same database (the
/// per-database restore lock) before it gives up.
pub const RESTORE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The error of a restore that found another one running in the same database.
fn restore_busy(location: &str) -> crate::error::Error {
    crate::error::Error::Aborted(format!(
        "another restore into {location} is running (it did not release the database's restore lock \
         within {} s); wait for it to finish, then run this restore again",
        RESTORE_LOCK_WAIT.as_secs()
    ))
}

/// Slow statements are what spirekeep runs (a whole table read for a
/// backup, an index build at a restore's commit): sqlx's warning for each
/// one that takes over a second would only clutter the user's output, so it
/// is logged at debug level (`SPIREKEEP_LOG=sqlx=debug` shows it).
fn quiet_slow_statements<O: sqlx::ConnectOptions>(options: O) -> O {
    options.log_slow_statements(log::LevelFilter::Debug, std::time::Duration::from_secs(1))
}

/// Opens a datastore from a parsed connection spec.
///
/// # Errors
/// A missing SQLite file, an unreachable host, refused credentials or any other
/// connection failure, each as its own [`crate::Error`] variant.
pub async fn open(spec: &ConnectionSpec, mode: OpenMode) -> Result<Box<dyn Datastore>> {
    match spec {
        ConnectionSpec::Sqlite(s) => Ok(Box::new(sqlite::SqliteDatastore::open(s, mode).await?)),
        ConnectionSpec::Postgres(p) => Ok(Box::new(postgres::PostgresDatastore::open(p).await?)),
        ConnectionSpec::Mysql(m) => Ok(Box::new(mysql::MysqlDatastore::open(m).await?)),
    }
}

/// Quotes an identifier for `engine` (double quotes, or backticks on MySQL).
#[must_use]
pub fn quote_ident(engine: Engine, name: &str) -> String {
    match engine {
        Engine::Mysql => format!("`{}`", name.replace('`', "``")),
        Engine::Sqlite | Engine::Postgres => format!("\"{}\"", name.replace('"', "\"\"")),
    }
}

/// A datastore that [`open`] with [`OpenMode::Create`] will bring into
/// being (a SQLite file that does not exist yet), so that a caller that ends
/// up writing nothing (a dry run, a refused restore) can take it away again
/// with every side file the engine made.
#[derive(Debug)]
pub struct CreatedByOpen(Vec<std::path::PathBuf>);

impl CreatedByOpen {
    /// What opening `spec` would create, if anything.
    #[must_use]
    pub fn predict(spec: &ConnectionSpec) -> Option<Self> {
        let files = spec.local_files();
        match files.first() {
            Some(main) if !main.exists() => Some(Self(files)),
            _ => None,
        }
    }

    /// Removes it again (close the datastore first); what is already gone is fine.
    pub fn remove(&self) {
        for file in &self.0 {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// Connects once directly, before a pool is built: a pool reports a refused
/// connection or a bad password only as "pool timed out", which tells the
/// user nothing.
async fn probe_connection<O>(options: &O, location: &str) -> Result<()>
where
    O: sqlx::ConnectOptions,
    O::Connection: Sized,
{
    use sqlx::Connection as _;
    let probe = tokio::time::timeout(std::time::Duration::from_secs(15), options.connect())
        .await
        .map_err(|_| crate::error::Error::Unreachable {
            location: location.to_string(),
            detail: "no answer within 15 s".into(),
        })?
        .map_err(|e| driver_error::classify(&e, location))?;
    probe
        .close()
        .await
        .map_err(|e| driver_error::classify(&e, location))
}

/// What [`Datastore::next_id`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextId {
    Known(i64),
    /// Not readable here, and why.
    Unknown(String),
}
