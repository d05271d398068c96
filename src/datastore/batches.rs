//! The row loops every driver shares: batching decoded rows for a
//! [`SnapshotRead::stream_rows`](super::SnapshotRead::stream_rows) consumer,
//! and loading rows with multi-row `INSERT … VALUES` statements. A driver
//! supplies only what is its own: how a row is decoded, how a value is bound.

use sqlx::query_builder::Separated;
use sqlx::{Database, Executor, IntoArguments, QueryBuilder};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc::{Receiver, Sender};

use super::driver_error::{classify, rows_per_statement};
use super::dsn::Engine;
use super::sql::insert_head;
use super::{ColumnKind, ROW_BATCH, RowBatch, Value};
use crate::error::{Error, Result};

/// The consumer of the rows went away (a failed or cancelled backup).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConsumerStopped;

/// Batches kept for reuse beyond a channel's `in_flight`: the one the reader
/// fills and the one the consumer encodes. With fewer, a batch came back when
/// the pool was full and was freed, value by value, while the reader
/// allocated a new one when it found the pool empty a moment later (a tenth
/// of a PostgreSQL backup's CPU was `malloc` and `free`). Kept this way, no
/// more batches exist than a full channel holds anyway, so the peak memory
/// does not move.
const SPARES_BEYOND_IN_FLIGHT: usize = 2;

/// Batches a reader has sent and its consumer has handed back, kept for the
/// reader to refill, and how many may be kept.
#[derive(Debug, Clone)]
struct Spares {
    batches: Arc<Mutex<Vec<RowBatch>>>,
    keep: usize,
}

/// A channel of row batches that also carries them back: the consumer hands
/// each batch back once it is done with it ([`RowReceiver::give_back`]) and
/// the reader overwrites its rows in place, reusing every value's buffer.
/// Without it, a backup allocated every text value of every row on the
/// reading thread and freed it on the encoding one: a seventh of a SQLite
/// backup's CPU was `malloc` and `free`. At most `in_flight` batches wait in
/// the channel, and as many as can exist at once are kept for reuse
/// (see [`SPARES_BEYOND_IN_FLIGHT`]).
#[must_use]
pub fn row_channel(in_flight: usize) -> (RowSender, RowReceiver) {
    let (tx, rx) = tokio::sync::mpsc::channel(in_flight);
    let spares = Spares {
        batches: Arc::default(),
        keep: in_flight + SPARES_BEYOND_IN_FLIGHT,
    };
    (
        RowSender {
            tx,
            spares: spares.clone(),
        },
        RowReceiver { rx, spares },
    )
}

/// The reader's end of a [`row_channel`].
#[derive(Debug, Clone)]
pub struct RowSender {
    tx: Sender<RowBatch>,
    spares: Spares,
}

impl RowSender {
    /// A handed-back batch (its rows still hold old values), or a new one.
    fn spare(&self) -> RowBatch {
        self.spares
            .batches
            .lock()
            .ok()
            .and_then(|mut spares| spares.pop())
            .unwrap_or_else(|| Vec::with_capacity(ROW_BATCH))
    }
}

/// The consumer's end of a [`row_channel`].
#[derive(Debug)]
pub struct RowReceiver {
    rx: Receiver<RowBatch>,
    spares: Spares,
}

impl RowReceiver {
    /// The next batch; `None` once the reader is done and every batch is received.
    pub async fn recv(&mut self) -> Option<RowBatch> {
        self.rx.recv().await
    }

    /// Hands a batch back to the reader for reuse (dropped if enough are kept).
    pub fn give_back(&self, batch: RowBatch) {
        if let Ok(mut spares) = self.spares.batches.lock()
            && spares.len() < self.spares.keep
        {
            spares.push(batch);
        }
    }
}

/// Gathers one table's rows into batches of [`ROW_BATCH`] and sends each full
/// batch on, so memory stays at about two batches whatever the table's size.
/// A decoder fills [`Self::slot`] in place and [`Self::commit`]s it; the
/// slot is a row of a handed-back batch while there is one.
pub(crate) struct RowBatcher<'a> {
    out: &'a RowSender,
    batch: RowBatch,
    /// Rows of `batch` that are this batch's; those after are old, for reuse.
    filled: usize,
    sent: u64,
}

/// Where a decoder puts the rows it decodes.
pub(crate) trait RowSlots {
    /// A row to overwrite: it may hold another row's values, whose buffers
    /// [`Value::set_text`] and [`Value::set_bytes`] reuse. Call it again
    /// (without [`Self::commit`]) to start the same row over.
    fn slot(&mut self, width: usize) -> &mut Vec<Value>;
    /// The slot is a whole row now.
    fn commit(&mut self);
}

impl RowSlots for RowBatcher<'_> {
    fn slot(&mut self, width: usize) -> &mut Vec<Value> {
        if self.filled == self.batch.len() {
            self.batch.push(Vec::with_capacity(width));
        }
        let row = &mut self.batch[self.filled];
        row.resize(width, Value::Null);
        row
    }

    fn commit(&mut self) {
        self.filled += 1;
    }
}

impl<'a> RowBatcher<'a> {
    pub(crate) fn new(out: &'a RowSender) -> Self {
        Self {
            out,
            batch: out.spare(),
            filled: 0,
            sent: 0,
        }
    }

    pub(crate) async fn send_if_full(&mut self) -> Result<(), ConsumerStopped> {
        if self.filled >= ROW_BATCH {
            let full = self.take_full();
            self.out.tx.send(full).await.map_err(|_| ConsumerStopped)?;
        }
        Ok(())
    }

    /// [`Self::send_if_full`] for a reader on a blocking thread (never inside the runtime).
    pub(crate) fn send_if_full_blocking(&mut self) -> Result<(), ConsumerStopped> {
        if self.filled >= ROW_BATCH {
            let full = self.take_full();
            self.out
                .tx
                .blocking_send(full)
                .map_err(|_| ConsumerStopped)?;
        }
        Ok(())
    }

    /// Sends what is left; returns the number of rows sent in all.
    pub(crate) async fn finish(mut self) -> Result<u64, ConsumerStopped> {
        if self.filled > 0 {
            let last = self.take_full();
            self.out.tx.send(last).await.map_err(|_| ConsumerStopped)?;
        }
        Ok(self.sent)
    }

    /// [`Self::finish`] for a reader on a blocking thread.
    pub(crate) fn finish_blocking(mut self) -> Result<u64, ConsumerStopped> {
        if self.filled > 0 {
            let last = self.take_full();
            self.out
                .tx
                .blocking_send(last)
                .map_err(|_| ConsumerStopped)?;
        }
        Ok(self.sent)
    }

    fn take_full(&mut self) -> RowBatch {
        self.sent += self.filled as u64;
        let mut full = std::mem::replace(&mut self.batch, self.out.spare());
        full.truncate(self.filled);
        self.filled = 0;
        full
    }
}

impl ConsumerStopped {
    /// The error a driver's `stream_rows` returns for it.
    pub(crate) fn reading(self, table: &str) -> Error {
        Error::Aborted(format!("reading {table}: the consumer of the rows stopped"))
    }
}

/// Bytes one bound value takes in a statement, about: its data plus a type
/// and a length prefix (MySQL's binary protocol spends up to 11 bytes there).
fn bound_size(v: &Value) -> usize {
    const PER_VALUE: usize = 11;
    PER_VALUE
        + match v {
            Value::Null => 0,
            Value::Bool(_) => 1,
            Value::Int(_) | Value::Float(_) => 8,
            Value::Text(t) => t.len(),
            Value::Bytes(b) => b.len(),
            // Bound as text (`2026-12-07 12:00:00.123456789+00:00` at most).
            Value::Timestamp(_) => 35,
        }
}

/// Splits `rows` into the statements of one load: at most `max_rows` rows
/// each, and at most `max_bytes` of bound values unless a single row is
/// larger (it then goes alone, and the server says whether it fits).
fn statement_chunks(
    rows: &[Vec<Value>],
    max_rows: usize,
    max_bytes: usize,
) -> impl Iterator<Item = &[Vec<Value>]> {
    let mut rest = rows;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0usize;
        let mut n = 0;
        for row in rest.iter().take(max_rows.max(1)) {
            let size: usize = row.iter().map(bound_size).sum();
            if n > 0 && bytes + size > max_bytes {
                break;
            }
            bytes += size;
            n += 1;
        }
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        Some(chunk)
    })
}

/// Inserts `rows` into `table` with multi-row `INSERT … VALUES` statements
/// of [`rows_per_statement`] rows each and at most `max_statement_bytes` of
/// values (the server's packet limit, where it has one), on one connection
/// (the caller owns the transaction). `bind` pushes one value as the
/// engine's driver takes it; an `Err` from it (a value the engine cannot
/// hold) stops the load with the table and column named.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn insert_values<DB, B>(
    conn: &mut DB::Connection,
    engine: Engine,
    table: &str,
    columns: &[(String, ColumnKind)],
    rows: &[Vec<Value>],
    max_statement_bytes: usize,
    location: &str,
    mut bind: B,
) -> Result<()>
where
    DB: Database,
    DB::Arguments: Default + IntoArguments<DB>,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    B: FnMut(&mut Separated<'_, DB, &'static str>, &Value, ColumnKind) -> Result<(), String>,
{
    let head = insert_head(engine, table, columns);
    for chunk in statement_chunks(rows, rows_per_statement(columns.len()), max_statement_bytes) {
        let mut qb: QueryBuilder<DB> = QueryBuilder::new(head.clone());
        let mut bad: Option<String> = None;
        qb.push_values(chunk, |mut b, row| {
            for (v, (cname, kind)) in row.iter().zip(columns) {
                if let Err(msg) = bind(&mut b, v, *kind) {
                    bad.get_or_insert_with(|| format!("{table}.{cname}: {msg}"));
                }
            }
        });
        if let Some(detail) = bad {
            return Err(Error::Database {
                location: location.to_string(),
                detail,
            });
        }
        qb.build()
            .execute(&mut *conn)
            .await
            .map_err(|e| classify(&e, location))?;
    }
    Ok(())
}

/// Binds `v` as it is, timestamps as the text `timestamp` renders: the
/// binding of the engines whose drivers take every value as given (SQLite,
/// MySQL), for [`insert_values`].
pub(crate) fn bind_as_given<DB>(
    b: &mut Separated<'_, DB, &'static str>,
    v: &Value,
    timestamp: fn(time::OffsetDateTime) -> String,
) where
    DB: Database,
    Option<i64>: for<'x> sqlx::Encode<'x, DB> + sqlx::Type<DB>,
    bool: for<'x> sqlx::Encode<'x, DB> + sqlx::Type<DB>,
    i64: for<'x> sqlx::Encode<'x, DB> + sqlx::Type<DB>,
    f64: for<'x> sqlx::Encode<'x, DB> + sqlx::Type<DB>,
    String: for<'x> sqlx::Encode<'x, DB> + sqlx::Type<DB>,
    for<'x> &'x str: sqlx::Encode<'x, DB> + sqlx::Type<DB>,
    for<'x> &'x [u8]: sqlx::Encode<'x, DB> + sqlx::Type<DB>,
{
    match v {
        Value::Null => b.push_bind(Option::<i64>::None),
        Value::Bool(x) => b.push_bind(*x),
        Value::Int(x) => b.push_bind(*x),
        Value::Float(x) => b.push_bind(*x),
        Value::Text(x) => b.push_bind(x.as_str()),
        Value::Bytes(x) => b.push_bind(x.as_slice()),
        Value::Timestamp(t) => b.push_bind(timestamp(*t)),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_row(bytes: usize) -> Vec<Value> {
        vec![Value::Int(1), Value::Text("x".repeat(bytes))]
    }

    #[test]
    fn statements_stop_at_the_row_limit_or_the_byte_limit() {
        let rows: Vec<Vec<Value>> = (0..10).map(|_| text_row(1_000)).collect();
        let row_size: usize = rows[0].iter().map(bound_size).sum();
        let sizes = |max_rows, max_bytes| -> Vec<usize> {
            statement_chunks(&rows, max_rows, max_bytes)
                .map(<[_]>::len)
                .collect()
        };
        assert_eq!(sizes(4, usize::MAX), [4, 4, 2]);
        assert_eq!(sizes(100, 3 * row_size), [3, 3, 3, 1]);
        assert_eq!(sizes(100, 3 * row_size - 1), [2, 2, 2, 2, 2]);
        // A row over the limit goes alone rather than not at all.
        assert_eq!(sizes(100, 10), [1; 10]);
        assert_eq!(sizes(0, usize::MAX), [1; 10]);
        assert_eq!(statement_chunks(&[], 4, 100).count(), 0);
        // Every row goes, once, in order.
        let mut mixed: Vec<Vec<Value>> = (0..50).map(|i| text_row(i * 37 % 500)).collect();
        mixed.push(vec![Value::Null, Value::Bytes(vec![0; 5_000])]);
        let joined: Vec<Vec<Value>> = statement_chunks(&mixed, 7, 2_000)
            .inspect(|c| {
                let bytes: usize = c.iter().flatten().map(bound_size).sum();
                assert!(
                    c.len() <= 7 && (c.len() == 1 || bytes <= 2_000),
                    "{}",
                    c.len()
                );
            })
            .flatten()
            .cloned()
            .collect();
        assert_eq!(joined, mixed);
    }

    /// Adds one row as a driver does, sending the batch on when it is full.
    async fn push(batcher: &mut RowBatcher<'_>, row: Vec<Value>) -> Result<(), ConsumerStopped> {
        let width = row.len();
        *batcher.slot(width) = row;
        batcher.commit();
        batcher.send_if_full().await
    }

    #[tokio::test]
    async fn rows_go_on_in_full_batches_and_the_rest_at_the_end() {
        let (tx, mut rx) = row_channel(4);
        let reader = tokio::spawn(async move {
            let mut sizes = Vec::new();
            while let Some(b) = rx.recv().await {
                sizes.push(b.len());
            }
            sizes
        });
        let mut batcher = RowBatcher::new(&tx);
        for i in 0..(ROW_BATCH * 2 + 3) {
            let id = i64::try_from(i).unwrap();
            push(&mut batcher, vec![Value::Int(id)]).await.unwrap();
        }
        assert_eq!(batcher.finish().await.unwrap(), ROW_BATCH as u64 * 2 + 3);
        drop(tx);
        assert_eq!(reader.await.unwrap(), vec![ROW_BATCH, ROW_BATCH, 3]);
    }

    /// Handed-back batches are refilled in place: what arrives is exactly
    /// what was pushed, never a value of an older row, and their text buffers
    /// are reused (the reader allocates no new one).
    #[tokio::test]
    async fn handed_back_rows_are_refilled_in_place_and_carry_nothing_old() {
        let (tx, mut rx) = row_channel(2);
        let width = 3;
        let value = |i: usize| -> Vec<Value> {
            match i % 3 {
                // The middle column is always text; the others change type.
                0 => vec![
                    Value::Text(format!("text {i}")),
                    Value::Text(format!("{i}")),
                    Value::Bytes(vec![1; i % 7]),
                ],
                1 => vec![
                    Value::Null,
                    Value::Text("x".repeat(i % 50)),
                    Value::Int(i64::try_from(i).unwrap()),
                ],
                _ => vec![
                    Value::Bytes(vec![2; 3]),
                    Value::Text(String::new()),
                    Value::Bool(true),
                ],
            }
        };
        let total = ROW_BATCH * 5 + 17;
        // One task plays both ends, so which batch comes back when is fixed:
        // every batch is handed back as soon as it is sent.
        let mut batcher = RowBatcher::new(&tx);
        let mut received = Vec::new();
        let mut reused_buffers = 0usize;
        for i in 0..total {
            let row = batcher.slot(width);
            for (slot, v) in row.iter_mut().zip(value(i)) {
                let before = match &*slot {
                    Value::Text(s) => Some(s.as_ptr()),
                    _ => None,
                };
                match v {
                    Value::Text(t) => slot.set_text(&t),
                    Value::Bytes(b) => slot.set_bytes(&b),
                    other => *slot = other,
                }
                if let (Some(before), Value::Text(s)) = (before, &*slot)
                    && s.as_ptr() == before
                    && s.capacity() > 0
                {
                    reused_buffers += 1;
                }
            }
            batcher.commit();
            batcher.send_if_full().await.unwrap();
            while let Ok(batch) = rx.rx.try_recv() {
                received.extend(batch.iter().cloned());
                rx.give_back(batch);
            }
        }
        let sent = batcher.finish().await.unwrap();
        drop(tx);
        while let Some(batch) = rx.recv().await {
            received.extend(batch.iter().cloned());
        }
        assert_eq!(sent, total as u64);
        assert_eq!(received.len(), total);
        for (i, row) in received.iter().enumerate() {
            assert_eq!(row, &value(i), "row {i}");
        }
        assert!(
            reused_buffers > ROW_BATCH,
            "{reused_buffers} text buffers reused"
        );
    }

    /// A consumer that fell behind and then caught up hands back every
    /// batch of the full channel: all are kept, so the reader allocates none
    /// afterwards (two were kept before, and the others freed).
    #[tokio::test]
    async fn every_batch_of_a_full_channel_is_kept_for_reuse() {
        let in_flight = 4;
        let (tx, mut rx) = row_channel(in_flight);
        let mut batcher = RowBatcher::new(&tx);
        for i in 0..ROW_BATCH * in_flight {
            let id = i64::try_from(i).unwrap();
            push(&mut batcher, vec![Value::Int(id)]).await.unwrap();
        }
        let mut sent = Vec::new();
        while let Ok(batch) = rx.rx.try_recv() {
            sent.push(batch.as_ptr());
            rx.give_back(batch);
        }
        assert_eq!(sent.len(), in_flight);
        let kept: Vec<_> = rx
            .spares
            .batches
            .lock()
            .unwrap()
            .iter()
            .map(|b| b.as_ptr())
            .collect();
        assert_eq!(kept, sent);
        // The next batches the reader fills are those, not new ones.
        for _ in 0..in_flight {
            assert!(sent.contains(&tx.spare().as_ptr()));
        }
    }

    #[test]
    fn a_large_buffer_is_not_kept_for_a_small_value() {
        let mut v = Value::Text("x".repeat(1 << 20));
        v.set_text("small");
        let Value::Text(s) = &v else { panic!() };
        assert_eq!(s, "small");
        assert!(s.capacity() < 1024, "{}", s.capacity());
        let mut b = Value::Bytes(vec![0; 1 << 20]);
        b.set_bytes(b"ab");
        assert_eq!(b, Value::Bytes(b"ab".to_vec()));
        let Value::Bytes(b) = &b else { panic!() };
        assert!(b.capacity() < 1024);
    }

    #[tokio::test]
    async fn a_gone_consumer_stops_the_reader() {
        let (tx, rx) = row_channel(1);
        drop(rx);
        let mut batcher = RowBatcher::new(&tx);
        let mut result = Ok(());
        for _ in 0..ROW_BATCH {
            result = push(&mut batcher, vec![Value::Null]).await;
        }
        assert_eq!(result, Err(ConsumerStopped));
        assert!(
            ConsumerStopped
                .reading("selectors")
                .to_string()
                .contains("reading selectors: the consumer of the rows stopped")
        );
    }
}
