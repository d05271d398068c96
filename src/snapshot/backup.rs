//! `backup`: one consistent read of the whole datastore, streamed table by
//! table into data objects, and the manifest written last.
//!
//! The database read and the encoding run side by side: the snapshot
//! transaction sends row batches into a small bounded channel and the
//! [`TableWriter`] compresses, hashes and uploads them as they come, so memory
//! stays bounded by a few batches whatever the table size. A table larger than
//! [`BackupOptions::part_raw_bytes`] is split into several objects.
//!
//! A repository handle with age recipients gets every data object encrypted
//! (see [`crate::store::crypt`]); the manifest then names the recipients.
//!
//! Nothing is a snapshot until its manifest exists. On any failure the data
//! objects written so far are deleted (best effort; `prune` removes what a
//! killed process leaves behind once it is older than the grace period) —
//! except when the manifest write itself failed: then the manifest is read
//! back first, and nothing is deleted unless it is surely absent.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use time::OffsetDateTime;
use tokio::sync::mpsc;

use super::codec::{CodecOptions, TableWriter};
use super::manifest::{
    DataFormat, DataObject, Encryption, Manifest, ObjectEncryption, SPIREKEEP_VERSION, TableData,
};
use super::server_files::{self, ServerFilesPolicy};
use crate::datastore::{Catalogue, Datastore, MigrationsRow, SnapshotRead, Table, Value, ddl};
use crate::error::{Error, Result};
use crate::store::keys::{self, SnapshotId};
use crate::store::lock::{CommitFence, Unfenced};
use crate::store::{Repository, StoreError};

/// Row batches queued between the database read and the encoder.
const BATCHES_IN_FLIGHT: usize = 4;

/// How a backup is taken.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// Labels recorded in the manifest (`pre-upgrade`, `scheduled`).
    pub labels: Vec<String>,
    /// Compression settings.
    pub codec: CodecOptions,
    /// A table's data is split into a new object after this many
    /// uncompressed bytes, so no single upload or restore read grows without bound.
    pub part_raw_bytes: u64,
    /// Also store the SPIRE server's keys file and data dir (see
    /// [`super::server_files`]); `None` stores only the datastore.
    pub server_files: Option<ServerFilesPolicy>,
}

impl Default for BackupOptions {
    fn default() -> Self {
        Self {
            labels: Vec::new(),
            codec: CodecOptions::default(),
            part_raw_bytes: 512 * 1024 * 1024,
            server_files: None,
        }
    }
}

/// Progress callbacks, for a terminal progress display or logs. Every method
/// has a do-nothing default.
pub trait BackupObserver: Send + Sync {
    /// The snapshot transaction is open and will copy these tables.
    fn started(&self, _id: &SnapshotId, _tables: &[Table]) {}
    /// The copy of `table` begins (two can run at once).
    fn table_started(&self, _table: &str) {}
    /// Rows of `table` copied so far (called once per batch).
    fn rows(&self, _table: &str, _copied: u64) {}
    /// `table` is complete.
    fn table_done(&self, _table: &TableData) {}
    /// Something the operator should know that does not stop the backup (a
    /// missing keys file). Logged as a warning unless overridden.
    fn warning(&self, message: &str) {
        tracing::warn!(event = "backup_warning", "{message}");
    }
}

/// An observer that does nothing.
#[derive(Debug, Default)]
pub struct Quiet;
impl BackupObserver for Quiet {}

/// Checks a label: 1 to 64 characters of `[A-Za-z0-9._-]`, starting with a
/// letter or digit, so it is safe in keys, metric labels and shell scripts.
///
/// # Errors
/// A label outside that alphabet or length.
pub fn validate_label(label: &str) -> Result<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    let valid = !label.is_empty()
        && label.len() <= 64
        && label.chars().all(ok_char)
        && label.starts_with(|c: char| c.is_ascii_alphanumeric());
    if valid {
        Ok(())
    } else {
        Err(Error::Unsupported(format!(
            "invalid label {label:?}: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )))
    }
}

/// Takes a snapshot of `ds` into `repo` and returns its manifest (already
/// stored). The snapshot is consistent: every table is read inside one
/// transaction.
///
/// # Errors
/// Database or storage failures, an invalid label, or a database that is not
/// a SPIRE datastore. Nothing that looks like a snapshot is left behind.
pub async fn backup(
    ds: &dyn Datastore,
    repo: &Repository,
    options: &BackupOptions,
    observer: &dyn BackupObserver,
) -> Result<Manifest> {
    backup_fenced(ds, repo, options, observer, &Unfenced).await
}

/// [`backup`] for a caller that holds the repository lease: `fence` is asked
/// right before the manifest is written, and a lease that was lost stops the
/// backup there (no snapshot comes into existence).
///
/// # Errors
/// As [`backup`], and [`Error::Lock`] when the lease was lost.
pub async fn backup_fenced(
    ds: &dyn Datastore,
    repo: &Repository,
    options: &BackupOptions,
    observer: &dyn BackupObserver,
    fence: &dyn CommitFence,
) -> Result<Manifest> {
    for label in &options.labels {
        validate_label(label)?;
    }
    // Listed (not read) before the datastore; never stored in clear unless told.
    let collected = match &options.server_files {
        Some(policy) => {
            let c = server_files::collect(&policy.layout)?;
            match server_files::left_out_in_clear(&c, repo, policy.allow_clear) {
                Some(warning) => {
                    observer.warning(&warning);
                    None
                }
                None => Some(c),
            }
        }
        None => None,
    };
    let server_version = ds.server_version().await?;
    let started_at = OffsetDateTime::now_utc();
    let id = SnapshotId::new(started_at);
    let mut read = ds.begin_snapshot().await?;
    let catalogue = match read.catalogue().await {
        Ok(c) => c,
        Err(e) => {
            let _ = read.finish().await;
            return Err(e);
        }
    };
    if let Err(e) = check_is_spire(ds, &catalogue).and_then(|()| check_restorable(ds, &catalogue)) {
        let _ = read.finish().await;
        return Err(e);
    }
    observer.started(&id, &catalogue.tables);
    let mut written: Vec<String> = Vec::new();
    let copied = copy_tables(
        read.as_mut(),
        repo,
        &id,
        &catalogue,
        options,
        observer,
        &mut written,
    )
    .await;
    let finished = read.finish().await;
    let copied = match (copied, finished) {
        (Ok(copied), Ok(())) => copied,
        (Err(e), _) | (Ok(_), Err(e)) => {
            delete_objects(repo, &written).await;
            return Err(e);
        }
    };
    // Read right after the datastore, so the keys are at least as new as
    // the CA journal in the snapshot.
    let mut stored_server_files = Vec::new();
    if let Some(c) = &collected {
        let mut warnings = c.warnings.clone();
        match server_files::upload(repo, &id, c, &mut written, &mut warnings).await {
            Ok(files) => stored_server_files = files,
            Err(e) => {
                delete_objects(repo, &written).await;
                return Err(e);
            }
        }
        for w in &warnings {
            observer.warning(w);
        }
    }
    // The writers encrypted every object to the handle's recipients (if
    // any); validate() refuses a manifest where that is not so.
    let encryption = repo.recipients().map(|r| Encryption {
        scheme: ObjectEncryption::Age,
        recipients: r.public_keys(),
    });
    let mut manifest = Manifest {
        format_version: 0,
        snapshot_id: id,
        spirekeep_version: SPIREKEEP_VERSION.into(),
        engine: ds.engine(),
        server_version,
        source: ds.location().to_string(),
        spire: copied.migrations,
        started_at,
        finished_at: OffsetDateTime::now_utc(),
        labels: options.labels.clone(),
        data_format: DataFormat::current(&options.codec),
        catalogue,
        tables: copied.tables,
        encryption,
        server_files: stored_server_files,
    };
    manifest.format_version = manifest.required_format_version();
    let ready = match manifest.validate() {
        Ok(()) => fence.confirm().await.map_err(Error::from),
        Err(source) => Err(Error::Integrity(format!(
            "the manifest of the new snapshot is inconsistent: {source}"
        ))),
    };
    if let Err(e) = ready {
        delete_objects(repo, &written).await;
        return Err(e);
    }
    crate::testpoint::pause("backup.before_manifest").await;
    let Err(put_error) = manifest.store(repo).await else {
        crate::testpoint::pause("backup.after_manifest").await;
        return Ok(manifest);
    };
    // The put's outcome may be unknown (a timeout, or a 5xx whose retry got
    // 412 because the first attempt had in fact succeeded): the manifest is
    // read back before anything is deleted.
    match repo
        .get_capped(&manifest.key(), crate::store::MAX_MANIFEST_BYTES)
        .await
    {
        Ok(stored) if stored.as_ref() == manifest.to_json_pretty().as_bytes() => {
            tracing::warn!(snapshot = %manifest.snapshot_id, error = %put_error, "the manifest write reported an error, but the manifest is stored as written: the snapshot is complete");
            Ok(manifest)
        }
        Err(StoreError::NotFound { .. }) => {
            delete_objects(repo, &written).await;
            Err(put_error.into())
        }
        Ok(_) => Err(Error::Integrity(format!(
            "writing the manifest {} failed ({put_error}) and a different manifest is stored under that \
             key; nothing was deleted: inspect it with `spirekeep show {}`",
            manifest.key(),
            manifest.snapshot_id
        ))),
        Err(read_error) => Err(Error::Aborted(format!(
            "writing the manifest {} failed ({put_error}) and it cannot be read back ({read_error}), so \
             whether snapshot {} exists is unknown; nothing was deleted: run `spirekeep list` once the \
             repository answers (a snapshot without a manifest is removed by `spirekeep prune`)",
            manifest.key(),
            manifest.snapshot_id
        ))),
    }
}

/// Removes the data objects of a backup that did not produce a snapshot (best
/// effort: `prune` removes what is left once the grace period has passed).
async fn delete_objects(repo: &Repository, written: &[String]) {
    for key in written {
        let _ = repo.delete(key).await;
    }
}

/// Refuses, before anything is copied, a catalogue that a restore would
/// refuse (see [`ddl::table_problems`]).
fn check_restorable(ds: &dyn Datastore, catalogue: &Catalogue) -> Result<()> {
    let problems = ddl::catalogue_problems(ds.engine(), catalogue);
    if problems.is_empty() {
        return Ok(());
    }
    Err(Error::NotSpire {
        location: ds.location().to_string(),
        why: format!(
            "its catalogue holds what spirekeep cannot restore: {}",
            problems.join("; ")
        ),
    })
}

fn check_is_spire(ds: &dyn Datastore, catalogue: &Catalogue) -> Result<()> {
    let why = if catalogue.tables.is_empty() {
        "the database has no tables (a SPIRE server creates them on its first start)"
    } else if catalogue.table("migrations").is_none() {
        "it has no `migrations` table; point --datastore at the database SPIRE's DataStore \"sql\" uses"
    } else {
        return Ok(());
    };
    Err(Error::NotSpire {
        location: ds.location().to_string(),
        why: why.to_string(),
    })
}

struct Copied {
    tables: Vec<TableData>,
    migrations: MigrationsRow,
}

/// Copies every table. When the datastore offers a [second reader of the same
/// snapshot](SnapshotRead::second_reader), two tables stream at once, on two
/// tasks, the largest first so that neither lane ends with a long table alone;
/// each lane still holds a few batches at most. The manifest lists the tables
/// in catalogue order whatever order they finished in.
async fn copy_tables(
    read: &mut dyn SnapshotRead,
    repo: &Repository,
    id: &SnapshotId,
    catalogue: &Catalogue,
    options: &BackupOptions,
    observer: &dyn BackupObserver,
    written: &mut Vec<String>,
) -> Result<Copied> {
    let second = read.second_reader().await?;
    let mut order: Vec<usize> = (0..catalogue.tables.len()).collect();
    if second.is_some() {
        let sizes = read.size_estimates().await?;
        let size = |i: &usize| sizes.get(&catalogue.tables[*i].name).copied().unwrap_or(0);
        order.sort_by_key(|i| std::cmp::Reverse(size(i)));
    }
    let queue = Arc::new(Mutex::new(order.into_iter().collect::<VecDeque<_>>()));
    let tables = Arc::new(catalogue.tables.clone());
    let keys = Arc::new(Mutex::new(Vec::new()));
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let here = Lane {
        queue,
        tables: Arc::clone(&tables),
        repo: repo.clone(),
        id: id.clone(),
        options: options.clone(),
        written: Arc::clone(&keys),
        encode_apart: second.is_none(),
    };
    let mut lane = second
        .map(|reader| AbortOnDrop(tokio::spawn(here.clone().run(reader, Forward(events_tx)))));
    let mine = here.copy(read, observer);
    tokio::pin!(mine);
    let mut done: Vec<CopiedTable> = Vec::new();
    let mut mine_done = false;
    let outcome = loop {
        tokio::select! {
            r = &mut mine, if !mine_done => match r {
                Ok(copies) => {
                    done.extend(copies);
                    mine_done = true;
                    if lane.is_none() {
                        break Ok(());
                    }
                }
                Err(e) => break Err(e),
            },
            r = async { (&mut lane.as_mut().expect("guarded by the condition").0).await }, if lane.is_some() => {
                lane = None;
                match r {
                    Ok(Ok(copies)) => {
                        done.extend(copies);
                        if mine_done {
                            break Ok(());
                        }
                    }
                    Ok(Err(e)) => break Err(e),
                    Err(join) => break Err(Error::Aborted(format!("a table copy stopped: {join}"))),
                }
            }
            Some(event) = events.recv() => event.replay(observer),
        }
    };
    // The other lane, if still running, stops here (its upload is
    // abandoned), and is waited for, so no write of it lands after the
    // caller deletes what the backup wrote.
    if let Some(mut running) = lane {
        running.0.abort();
        let _ = (&mut running.0).await;
    }
    while let Ok(event) = events.try_recv() {
        event.replay(observer);
    }
    written.extend(keys.lock().map(|k| k.clone()).unwrap_or_default());
    outcome?;
    done.sort_by_key(|c| c.index);
    let mut migrations = MigrationsRow {
        schema_version: 0,
        code_version: String::new(),
    };
    let mut copied = Vec::with_capacity(done.len());
    for c in done {
        let table = &tables[c.index];
        if table.name == "migrations"
            && let Some(row) = &c.first_row
        {
            migrations = migrations_row(table, row);
        }
        copied.push(c.data);
    }
    Ok(Copied {
        tables: copied,
        migrations,
    })
}

/// One table copied: where it stands in the catalogue, its manifest entry,
/// and (for `migrations`) its row with the lowest id.
struct CopiedTable {
    index: usize,
    data: TableData,
    first_row: Option<Vec<Value>>,
}

/// What one lane of [`copy_tables`] shares with the other: the queue of
/// tables still to copy and the keys of the objects written so far.
#[derive(Clone)]
struct Lane {
    queue: Arc<Mutex<VecDeque<usize>>>,
    tables: Arc<Vec<Table>>,
    repo: Repository,
    id: SnapshotId,
    options: BackupOptions,
    written: Arc<Mutex<Vec<String>>>,
    /// Whether each table's encoder runs on a task of its own (see
    /// [`copy_table`]): with one lane only; two lanes already keep two cores busy.
    encode_apart: bool,
}

impl Lane {
    /// Takes tables from the queue until it is empty.
    async fn copy(
        &self,
        read: &mut dyn SnapshotRead,
        observer: &dyn BackupObserver,
    ) -> Result<Vec<CopiedTable>> {
        let mut copies = Vec::new();
        loop {
            let next = self.queue.lock().ok().and_then(|mut q| q.pop_front());
            let Some(index) = next else {
                return Ok(copies);
            };
            let table = &self.tables[index];
            observer.table_started(&table.name);
            let (objects, first_row) = copy_table(
                read,
                &self.repo,
                &self.id,
                table,
                &self.options,
                observer,
                &self.written,
                self.encode_apart,
            )
            .await?;
            let data = TableData::from_objects(table.name.clone(), objects)
                .map_err(|e| Error::Integrity(format!("table {}: {e}", table.name)))?;
            observer.table_done(&data);
            copies.push(CopiedTable {
                index,
                data,
                first_row,
            });
        }
    }

    /// [`Self::copy`] on a reader of its own, which it finishes.
    async fn run(
        self,
        mut reader: Box<dyn SnapshotRead>,
        observer: Forward,
    ) -> Result<Vec<CopiedTable>> {
        let copied = self.copy(reader.as_mut(), &observer).await;
        let finished = reader.finish().await;
        let copies = copied?;
        finished?;
        Ok(copies)
    }
}

/// A spawned task that is stopped when its handle is dropped (a failed or
/// cancelled backup leaves nothing running).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An observer call made on the second lane's task, replayed on the caller's.
enum ObserverEvent {
    TableStarted(String),
    Rows(String, u64),
    TableDone(TableData),
    Warning(String),
}

impl ObserverEvent {
    fn replay(self, observer: &dyn BackupObserver) {
        match self {
            Self::TableStarted(table) => observer.table_started(&table),
            Self::Rows(table, copied) => observer.rows(&table, copied),
            Self::TableDone(data) => observer.table_done(&data),
            Self::Warning(message) => observer.warning(&message),
        }
    }
}

/// Forwards the second lane's observer calls to the caller's task.
struct Forward(mpsc::UnboundedSender<ObserverEvent>);

impl BackupObserver for Forward {
    fn table_started(&self, table: &str) {
        let _ = self.0.send(ObserverEvent::TableStarted(table.to_string()));
    }
    fn rows(&self, table: &str, copied: u64) {
        let _ = self.0.send(ObserverEvent::Rows(table.to_string(), copied));
    }
    fn table_done(&self, table: &TableData) {
        let _ = self.0.send(ObserverEvent::TableDone(table.clone()));
    }
    fn warning(&self, message: &str) {
        let _ = self.0.send(ObserverEvent::Warning(message.to_string()));
    }
}

/// Keeps in `kept` the row of `rows` (or `kept` itself) with the lowest
/// integer `id`, the row SPIRE reads first; rows without one never win over
/// a row with one. Rows may stream in any order (see
/// [`SnapshotRead::stream_rows`]).
pub(crate) fn keep_lowest_id(table: &Table, kept: &mut Option<Vec<Value>>, rows: &[Vec<Value>]) {
    let id_at = table.columns.iter().position(|c| c.name == "id");
    let id = |row: &[Value]| match id_at.and_then(|i| row.get(i)) {
        Some(Value::Int(id)) => *id,
        _ => i64::MAX,
    };
    for row in rows {
        if kept.as_deref().is_none_or(|k| id(row) < id(k)) {
            *kept = Some(row.clone());
        }
    }
}

/// SPIRE reads the first row by id (see [`keep_lowest_id`]).
fn migrations_row(table: &Table, row: &[Value]) -> MigrationsRow {
    let at = |name: &str| {
        table
            .columns
            .iter()
            .position(|c| c.name == name)
            .and_then(|i| row.get(i))
    };
    MigrationsRow {
        schema_version: match at("version") {
            Some(Value::Int(v)) => *v,
            _ => 0,
        },
        code_version: match at("code_version") {
            Some(Value::Text(s)) => s.clone(),
            _ => String::new(),
        },
    }
}

/// Streams one table into one or more data objects. Returns them and, for the
/// `migrations` table, its row with the lowest id.
///
/// With `encode_apart`, the encoder runs on a task of its own, so the reader
/// and the encoder can each have a core: joined on one task they take turns
/// on one thread, and a MySQL backup (the driver's row decoding is the
/// reader's work) waited on it. With two lanes at once that only adds
/// hand-offs between threads.
#[allow(clippy::too_many_arguments)]
async fn copy_table(
    read: &mut dyn SnapshotRead,
    repo: &Repository,
    id: &SnapshotId,
    table: &Table,
    options: &BackupOptions,
    observer: &dyn BackupObserver,
    written: &Arc<Mutex<Vec<String>>>,
    encode_apart: bool,
) -> Result<(Vec<DataObject>, Option<Vec<Value>>)> {
    let (tx, rx) = crate::datastore::row_channel(BATCHES_IN_FLIGHT);
    let (progress_tx, mut progress) = mpsc::unbounded_channel();
    let encoding = encode_table(
        rx,
        repo.clone(),
        id.clone(),
        table.clone(),
        options.clone(),
        Arc::clone(written),
        progress_tx,
    );
    let mut encoder: std::pin::Pin<Box<dyn Future<Output = Result<Encoded>> + Send>> =
        if encode_apart {
            let mut task = AbortOnDrop(tokio::spawn(encoding));
            Box::pin(async move {
                (&mut task.0)
                    .await
                    .map_err(|e| Error::Aborted(format!("encoding a table: {e}")))?
            })
        } else {
            Box::pin(encoding)
        };
    let producer = async move {
        let result = read.stream_rows(table, &tx).await;
        drop(tx); // ends the encoder's loop
        result
    };
    let consumer = async {
        loop {
            tokio::select! {
                biased;
                Some(copied) = progress.recv() => observer.rows(&table.name, copied),
                encoded = &mut encoder => {
                    while let Ok(copied) = progress.try_recv() {
                        observer.rows(&table.name, copied);
                    }
                    break encoded;
                }
            }
        }
    };
    let (produced, consumed) = tokio::join!(producer, consumer);
    match (produced, consumed) {
        (Ok(rows), Ok((objects, first))) => {
            let stored: u64 = objects.iter().map(|o| o.rows).sum();
            if stored != rows {
                return Err(Error::Integrity(format!(
                    "table {}: read {rows} rows but {stored} reached the snapshot",
                    table.name
                )));
            }
            Ok((objects, first))
        }
        // The consumer's error is the cause when the producer only saw the channel close.
        (_, Err(e)) | (Err(e), Ok(_)) => Err(e),
    }
}

/// A table's data objects and, for `migrations`, its row with the lowest id.
type Encoded = (Vec<DataObject>, Option<Vec<Value>>);

/// The encoding half of [`copy_table`]: rows from `rx` into the table's
/// data objects, a part at a time. Sends the running row count after each
/// batch.
async fn encode_table(
    mut rx: crate::datastore::RowReceiver,
    repo: Repository,
    id: SnapshotId,
    table: Table,
    options: BackupOptions,
    written: Arc<Mutex<Vec<String>>>,
    progress: mpsc::UnboundedSender<u64>,
) -> Result<Encoded> {
    let mut objects = Vec::new();
    let mut first_row = None;
    let mut part = 0u32;
    let mut writer = TableWriter::for_table(&repo, &id, &table, part, options.codec)?;
    remember(&written, writer.key());
    let mut copied = 0u64;
    while let Some(batch) = rx.recv().await {
        if table.name == "migrations" {
            keep_lowest_id(&table, &mut first_row, &batch);
        }
        for row in &batch {
            // Start the next part only when a row is waiting for it, so
            // no table ends with an empty part.
            if writer.raw_size() >= options.part_raw_bytes {
                objects.push(writer.finish().await?);
                part += 1;
                writer = TableWriter::for_table(&repo, &id, &table, part, options.codec)?;
                remember(&written, writer.key());
            }
            if let Err(e) = writer.write_row(row).await {
                let _ = writer.abort().await;
                return Err(Error::from(e));
            }
        }
        copied += u64::try_from(batch.len()).unwrap_or(u64::MAX);
        let _ = progress.send(copied);
        // Encoded: the reader refills its rows in place.
        rx.give_back(batch);
    }
    objects.push(writer.finish().await?);
    Ok((objects, first_row))
}

/// Notes a key about to be written, for deletion if the backup fails.
fn remember(written: &Mutex<Vec<String>>, key: &str) {
    if let Ok(mut keys) = written.lock() {
        keys.push(key.to_string());
    }
}

/// Deletes every object of snapshot `id`: the manifest first, so the snapshot
/// stops existing before its data goes.
///
/// # Errors
/// Storage failures.
pub async fn delete_snapshot(repo: &Repository, id: &SnapshotId) -> Result<u64> {
    let manifest = keys::manifest(id);
    let mut deleted = 0u64;
    if repo.head(&manifest).await?.is_some() {
        repo.delete(&manifest).await?;
        deleted += 1;
    }
    for meta in repo.list(&keys::snapshot_prefix(id)).await? {
        repo.delete(&meta.key).await?;
        deleted += 1;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::ColumnKind;

    #[test]
    fn the_row_with_the_lowest_id_is_kept_across_batches_in_any_order() {
        let table = Table::of_columns(
            "registered_entries",
            &[("spiffe_id", ColumnKind::Text), ("id", ColumnKind::Integer)],
        );
        let row = |id: Option<i64>, name: &str| {
            vec![Value::Text(name.into()), id.map_or(Value::Null, Value::Int)]
        };
        let mut kept = None;
        keep_lowest_id(
            &table,
            &mut kept,
            &[row(None, "no id"), row(Some(7), "seven")],
        );
        assert_eq!(
            kept,
            Some(row(Some(7), "seven")),
            "a row with an id wins over one without"
        );
        keep_lowest_id(
            &table,
            &mut kept,
            &[row(Some(9), "nine"), row(Some(2), "two")],
        );
        keep_lowest_id(
            &table,
            &mut kept,
            &[row(Some(5), "five"), row(None, "none")],
        );
        assert_eq!(kept, Some(row(Some(2), "two")));
        let mut nothing = None;
        keep_lowest_id(&table, &mut nothing, &[]);
        assert_eq!(nothing, None);
    }
}
