//! The row loops every driver shares: batching decoded rows for a
//! [`SnapshotRead::stream_rows`](super::SnapshotRead::stream_rows) consumer,
//! and loading rows with multi-row `INSERT … VALUES` statements. A driver
//! supplies only what is its own: how a row is decoded, how a value is bound.

use sqlx::query_builder::Separated;
use sqlx::{Database, Executor, IntoArguments, QueryBuilder};
use tokio::sync::mpsc::Sender;

use super::driver_error::{classify, rows_per_statement};
use super::dsn::Engine;
use super::sql::insert_head;
use super::{ColumnKind, ROW_BATCH, RowBatch, Value};
use crate::error::{Error, Result};

/// The consumer of the rows went away (a failed or cancelled backup).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConsumerStopped;

/// Gathers one table's rows into batches of [`ROW_BATCH`] and sends each full
/// batch on, so memory stays at about two batches whatever the table's size.
pub(crate) struct RowBatcher<'a> {
    out: &'a Sender<RowBatch>,
    batch: RowBatch,
    sent: u64,
}

impl<'a> RowBatcher<'a> {
    pub(crate) fn new(out: &'a Sender<RowBatch>) -> Self {
        Self {
            out,
            batch: Vec::with_capacity(ROW_BATCH),
            sent: 0,
        }
    }

    /// The batch being filled, for a decoder that appends rows itself; call
    /// [`Self::send_if_full`] after it.
    pub(crate) fn batch_mut(&mut self) -> &mut RowBatch {
        &mut self.batch
    }

    /// Adds one row, sending the batch on when it is full.
    pub(crate) async fn push(&mut self, row: Vec<Value>) -> Result<(), ConsumerStopped> {
        self.batch.push(row);
        self.send_if_full().await
    }

    pub(crate) async fn send_if_full(&mut self) -> Result<(), ConsumerStopped> {
        if self.batch.len() >= ROW_BATCH {
            let full = self.take_full();
            self.out.send(full).await.map_err(|_| ConsumerStopped)?;
        }
        Ok(())
    }

    /// [`Self::push`] for a reader on a blocking thread (never inside the runtime).
    pub(crate) fn push_blocking(&mut self, row: Vec<Value>) -> Result<(), ConsumerStopped> {
        self.batch.push(row);
        if self.batch.len() >= ROW_BATCH {
            let full = self.take_full();
            self.out.blocking_send(full).map_err(|_| ConsumerStopped)?;
        }
        Ok(())
    }

    /// Sends what is left; returns the number of rows sent in all.
    pub(crate) async fn finish(mut self) -> Result<u64, ConsumerStopped> {
        if !self.batch.is_empty() {
            let last = self.take_full();
            self.out.send(last).await.map_err(|_| ConsumerStopped)?;
        }
        Ok(self.sent)
    }

    /// [`Self::finish`] for a reader on a blocking thread.
    pub(crate) fn finish_blocking(mut self) -> Result<u64, ConsumerStopped> {
        if !self.batch.is_empty() {
            let last = self.take_full();
            self.out.blocking_send(last).map_err(|_| ConsumerStopped)?;
        }
        Ok(self.sent)
    }

    fn take_full(&mut self) -> RowBatch {
        self.sent += self.batch.len() as u64;
        std::mem::replace(&mut self.batch, Vec::with_capacity(ROW_BATCH))
    }
}

impl ConsumerStopped {
    /// The error a driver's `stream_rows` returns for it.
    pub(crate) fn reading(self, table: &str) -> Error {
        Error::Aborted(format!("reading {table}: the consumer of the rows stopped"))
    }
}

/// Inserts `rows` into `table` with multi-row `INSERT … VALUES` statements
/// of [`rows_per_statement`] rows each, on one connection (the caller owns
/// the transaction). `bind` pushes one value as the engine's driver takes it;
/// an `Err` from it (a value the engine cannot hold) stops the load with the
/// table and column named.
pub(crate) async fn insert_values<DB, B>(
    conn: &mut DB::Connection,
    engine: Engine,
    table: &str,
    columns: &[(String, ColumnKind)],
    rows: &[Vec<Value>],
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
    for chunk in rows.chunks(rows_per_statement(columns.len())) {
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

    #[tokio::test]
    async fn rows_go_on_in_full_batches_and_the_rest_at_the_end() {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<RowBatch>(4);
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
            batcher.push(vec![Value::Int(id)]).await.unwrap();
        }
        assert_eq!(batcher.finish().await.unwrap(), ROW_BATCH as u64 * 2 + 3);
        drop(tx);
        assert_eq!(reader.await.unwrap(), vec![ROW_BATCH, ROW_BATCH, 3]);
    }

    #[tokio::test]
    async fn a_gone_consumer_stops_the_reader() {
        let (tx, rx) = tokio::sync::mpsc::channel::<RowBatch>(1);
        drop(rx);
        let mut batcher = RowBatcher::new(&tx);
        let mut result = Ok(());
        for _ in 0..ROW_BATCH {
            result = batcher.push(vec![Value::Null]).await;
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
