//! `COPY … TO STDOUT (FORMAT binary)` decoded into rows: the backup's bulk
//! read path. One message per row instead of the extended query protocol's
//! row descriptions and per-value decoding through sqlx, and the values are
//! exactly what sqlx's binary decoding gives (the same wire encodings).
//!
//! The format (PostgreSQL docs, "COPY: Binary Format"): an 11-byte signature,
//! a 32-bit flags field and a header extension; then per tuple a 16-bit field
//! count (-1 ends the data) and per field a 32-bit length (-1 for NULL)
//! followed by the value in its type's binary send format. The columns are
//! selected with casts (`select_expr`) so each kind arrives as one wire type:
//! `int8`, `float8`, `bool`, `text`, `bytea`, `timestamptz`.

use time::OffsetDateTime;

use crate::datastore::batches::RowSlots;
use crate::datastore::{ColumnKind, Value};

const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// PostgreSQL's timestamp epoch, 2000-01-01 UTC, in Unix microseconds.
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// Decodes a binary `COPY` stream fed in chunks of any size.
pub(super) struct BinaryCopyDecoder {
    kinds: Vec<ColumnKind>,
    buf: Vec<u8>,
    header_done: bool,
    ended: bool,
}

impl BinaryCopyDecoder {
    pub(super) fn new(kinds: Vec<ColumnKind>) -> Self {
        Self {
            kinds,
            buf: Vec::new(),
            header_done: false,
            ended: false,
        }
    }

    /// Takes the next chunk and appends every row it completes to `out`.
    ///
    /// # Errors
    /// A stream that is not binary `COPY` data for these columns.
    pub(super) fn feed(&mut self, chunk: &[u8], out: &mut impl RowSlots) -> Result<(), String> {
        if self.ended {
            if chunk.is_empty() {
                return Ok(());
            }
            return Err("data after the end-of-data marker".into());
        }
        if self.buf.is_empty() && self.header_done {
            // The usual case (one `CopyData` message per row): decode the
            // chunk where it lies and keep only a partial row's bytes.
            let at = self.rows(chunk, 0, out)?;
            self.buf.extend_from_slice(&chunk[at..]);
            return Ok(());
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.extend_from_slice(chunk);
        let mut at = 0usize;
        if !self.header_done {
            match header_len(&buf)? {
                Some(n) => {
                    at = n;
                    self.header_done = true;
                }
                None => {
                    self.buf = buf;
                    return Ok(());
                }
            }
        }
        let at = self.rows(&buf, at, out)?;
        buf.drain(..at);
        self.buf = buf;
        Ok(())
    }

    /// Decodes the complete rows of `b` from `at` on; returns where the
    /// first incomplete one starts (or the end).
    fn rows(&mut self, b: &[u8], mut at: usize, out: &mut impl RowSlots) -> Result<usize, String> {
        loop {
            match self.tuple(b, at, out.slot(self.kinds.len()))? {
                Tuple::Row(next) => {
                    out.commit();
                    at = next;
                }
                Tuple::End(next) => {
                    self.ended = true;
                    if next != b.len() {
                        return Err("data after the end-of-data marker".into());
                    }
                    return Ok(next);
                }
                Tuple::Incomplete => return Ok(at),
            }
        }
    }

    /// Checks that the stream ended with its end-of-data marker.
    ///
    /// # Errors
    /// A stream cut short.
    pub(super) fn finish(&self) -> Result<(), String> {
        if self.ended {
            Ok(())
        } else {
            Err(format!(
                "the COPY data stopped before its end-of-data marker ({} byte(s) of a partial row)",
                self.buf.len()
            ))
        }
    }

    /// Decodes the tuple at `at` into `row` (a slot whose old values' buffers
    /// are reused; it is whole only when `Tuple::Row` is returned).
    fn tuple(&self, b: &[u8], at: usize, row: &mut [Value]) -> Result<Tuple, String> {
        let Some(count) = read_i16(b, at) else {
            return Ok(Tuple::Incomplete);
        };
        let mut p = at + 2;
        if count == -1 {
            return Ok(Tuple::End(p));
        }
        if usize::try_from(count).ok() != Some(self.kinds.len()) {
            return Err(format!(
                "a row of {count} field(s), but {} column(s) were selected",
                self.kinds.len()
            ));
        }
        for (kind, value) in self.kinds.iter().zip(row) {
            let Some(len) = read_i32(b, p) else {
                return Ok(Tuple::Incomplete);
            };
            p += 4;
            if len == -1 {
                *value = Value::Null;
                continue;
            }
            let len = usize::try_from(len).map_err(|_| format!("a field length of {len}"))?;
            let Some(bytes) = b.get(p..p + len) else {
                return Ok(Tuple::Incomplete);
            };
            p += len;
            decode_value(*kind, bytes, value)?;
        }
        Ok(Tuple::Row(p))
    }
}

enum Tuple {
    /// A whole row, and where the next tuple starts.
    Row(usize),
    End(usize),
    Incomplete,
}

/// The header's length once all of it has arrived.
fn header_len(b: &[u8]) -> Result<Option<usize>, String> {
    if b.len() < SIGNATURE.len() {
        return if SIGNATURE.starts_with(b) {
            Ok(None)
        } else {
            Err("not binary COPY data (bad signature)".into())
        };
    }
    if &b[..SIGNATURE.len()] != SIGNATURE {
        return Err("not binary COPY data (bad signature)".into());
    }
    let (Some(flags), Some(ext)) = (read_i32(b, 11), read_i32(b, 15)) else {
        return Ok(None);
    };
    // Bit 16 is "OIDs included"; the high half is reserved for critical flags.
    if flags.cast_unsigned() & 0xffff_0000 != 0 {
        return Err(format!("unsupported binary COPY flags {flags:#x}"));
    }
    let ext = usize::try_from(ext).map_err(|_| format!("a header extension of {ext} bytes"))?;
    let total = 19 + ext;
    Ok((b.len() >= total).then_some(total))
}

fn read_i16(b: &[u8], at: usize) -> Option<i16> {
    Some(i16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn read_i32(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Decodes one field into `slot`, reusing its buffer for text and bytes.
fn decode_value(kind: ColumnKind, bytes: &[u8], slot: &mut Value) -> Result<(), String> {
    let eight = || -> Result<[u8; 8], String> {
        bytes
            .try_into()
            .map_err(|_| format!("a {kind:?} value of {} bytes, not 8", bytes.len()))
    };
    *slot = match kind {
        ColumnKind::Integer => Value::Int(i64::from_be_bytes(eight()?)),
        ColumnKind::Float => Value::Float(f64::from_bits(u64::from_be_bytes(eight()?))),
        ColumnKind::Boolean => match bytes {
            [b] => Value::Bool(*b != 0),
            _ => return Err(format!("a boolean of {} bytes", bytes.len())),
        },
        ColumnKind::Text => {
            let text =
                std::str::from_utf8(bytes).map_err(|_| "text that is not UTF-8".to_string())?;
            slot.set_text(text);
            return Ok(());
        }
        ColumnKind::Bytes => {
            slot.set_bytes(bytes);
            return Ok(());
        }
        ColumnKind::Timestamp => {
            let micros = i64::from_be_bytes(eight()?);
            if micros == i64::MAX || micros == i64::MIN {
                return Err("an infinite timestamp (spirekeep stores only finite ones)".into());
            }
            // PostgreSQL's range (to year 294276) is wider than spirekeep's.
            pg_timestamp(micros)
                .map(Value::Timestamp)
                .ok_or_else(|| format!("a timestamp {micros} µs from 2000-01-01, past year 9999"))?
        }
    };
    Ok(())
}

/// A PostgreSQL timestamp (microseconds from 2000-01-01 UTC), or `None`
/// outside spirekeep's range (years -9999 to 9999). Built from Unix seconds and
/// a nanosecond field: half the cost of adding a `Duration` to a date (with
/// that, timestamps took 2 % of a PostgreSQL backup's CPU).
fn pg_timestamp(micros: i64) -> Option<OffsetDateTime> {
    let unix = micros.checked_add(PG_EPOCH_UNIX_MICROS)?;
    let nanos = u32::try_from(unix.rem_euclid(1_000_000) * 1000).ok()?;
    OffsetDateTime::from_unix_timestamp(unix.div_euclid(1_000_000))
        .ok()?
        .replace_nanosecond(nanos)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PG_EPOCH: OffsetDateTime = time::macros::datetime!(2000-01-01 0:00 UTC);

    /// Rows as a [`RowBatcher`](crate::datastore::batches::RowBatcher) keeps
    /// them: slots past `filled` hold old rows, which are overwritten.
    #[derive(Default)]
    struct Rows {
        rows: Vec<Vec<Value>>,
        filled: usize,
    }

    impl RowSlots for Rows {
        fn slot(&mut self, width: usize) -> &mut Vec<Value> {
            if self.filled == self.rows.len() {
                self.rows.push(Vec::new());
            }
            let row = &mut self.rows[self.filled];
            row.resize(width, Value::Null);
            row
        }
        fn commit(&mut self) {
            self.filled += 1;
        }
    }

    impl Rows {
        fn whole(&self) -> &[Vec<Value>] {
            &self.rows[..self.filled]
        }
    }

    fn field(out: &mut Vec<u8>, v: Option<&[u8]>) {
        match v {
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(b) => {
                out.extend_from_slice(&i32::try_from(b.len()).unwrap().to_be_bytes());
                out.extend_from_slice(b);
            }
        }
    }

    fn stream() -> Vec<u8> {
        let mut s = SIGNATURE.to_vec();
        s.extend_from_slice(&0i32.to_be_bytes());
        s.extend_from_slice(&3i32.to_be_bytes());
        s.extend_from_slice(b"ext");
        for (id, name, when) in [(1i64, Some("a\tb"), 0i64), (-7, None, -86_400_000_001)] {
            s.extend_from_slice(&6i16.to_be_bytes());
            field(&mut s, Some(&id.to_be_bytes()));
            field(&mut s, name.map(str::as_bytes));
            field(&mut s, Some(&[1]));
            field(&mut s, Some(&1.5f64.to_bits().to_be_bytes()));
            field(&mut s, Some(&[0, 255]));
            field(&mut s, Some(&when.to_be_bytes()));
        }
        s.extend_from_slice(&(-1i16).to_be_bytes());
        s
    }

    fn kinds() -> Vec<ColumnKind> {
        vec![
            ColumnKind::Integer,
            ColumnKind::Text,
            ColumnKind::Boolean,
            ColumnKind::Float,
            ColumnKind::Bytes,
            ColumnKind::Timestamp,
        ]
    }

    #[test]
    fn rows_decode_whatever_the_chunk_boundaries() {
        let s = stream();
        for size in [1, 2, 3, 7, 19, 64, s.len()] {
            let mut d = BinaryCopyDecoder::new(kinds());
            let mut slots = Rows::default();
            for chunk in s.chunks(size) {
                d.feed(chunk, &mut slots).unwrap();
            }
            d.finish().unwrap();
            let rows = slots.whole();
            assert_eq!(rows.len(), 2, "chunks of {size}");
            assert_eq!(rows[0][0], Value::Int(1));
            assert_eq!(rows[0][1], Value::Text("a\tb".into()));
            assert_eq!(rows[0][2], Value::Bool(true));
            assert_eq!(rows[0][3], Value::Float(1.5));
            assert_eq!(rows[0][4], Value::Bytes(vec![0, 255]));
            assert_eq!(rows[0][5], Value::Timestamp(PG_EPOCH));
            assert_eq!(rows[1][1], Value::Null);
            assert_eq!(
                rows[1][5],
                Value::Timestamp(time::macros::datetime!(1999-12-30 23:59:59.999999 UTC))
            );
        }
    }

    /// The same instants as the epoch plus a `Duration`, and the same range.
    #[test]
    fn timestamps_are_the_epoch_plus_their_microseconds() {
        let by_duration = |m: i64| PG_EPOCH.checked_add(time::Duration::microseconds(m));
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let mut samples = vec![
            0,
            -1,
            1,
            999_999,
            -1_000_000,
            i64::MAX - 1,
            i64::MIN + 1,
            -PG_EPOCH_UNIX_MICROS,
            -PG_EPOCH_UNIX_MICROS - 1,
        ];
        // Around the ends of the range, mostly within ±11,000 years, and
        // some anywhere in PostgreSQL's range.
        let last = (time::macros::datetime!(9999-12-31 23:59:59.999999 UTC) - PG_EPOCH)
            .whole_microseconds();
        let first = (time::macros::datetime!(-9999-01-01 0:00 UTC) - PG_EPOCH).whole_microseconds();
        for end in [last, first] {
            let end = i64::try_from(end).unwrap();
            samples.extend((-3..=3).map(|d| end + d));
        }
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let within = i64::try_from(x % 700_000_000_000_000_000).unwrap();
            samples.push(within - 350_000_000_000_000_000);
            samples.push(i64::from_ne_bytes(x.to_ne_bytes()));
        }
        for m in samples {
            assert_eq!(pg_timestamp(m), by_duration(m), "{m} µs");
        }
    }

    /// Rows decoded over old ones (a handed-back batch) are exactly the rows
    /// decoded afresh: no old value survives, whatever its type was.
    #[test]
    fn rows_decoded_over_old_rows_keep_nothing_of_them() {
        let s = stream();
        let mut fresh = Rows::default();
        BinaryCopyDecoder::new(kinds())
            .feed(&s, &mut fresh)
            .unwrap();
        // The same six columns, every one of another type or null.
        let mut other = SIGNATURE.to_vec();
        other.extend_from_slice(&0i32.to_be_bytes());
        other.extend_from_slice(&0i32.to_be_bytes());
        for _ in 0..3 {
            other.extend_from_slice(&6i16.to_be_bytes());
            for _ in 0..6 {
                field(&mut other, None);
            }
        }
        other.extend_from_slice(&(-1i16).to_be_bytes());
        let mut reused = Rows::default();
        BinaryCopyDecoder::new(kinds())
            .feed(&other, &mut reused)
            .unwrap();
        reused.filled = 0;
        for size in [1, 5, s.len()] {
            let mut d = BinaryCopyDecoder::new(kinds());
            for chunk in s.chunks(size) {
                d.feed(chunk, &mut reused).unwrap();
            }
            assert_eq!(reused.whole(), fresh.whole(), "chunks of {size}");
            reused.filled = 0;
        }
    }

    /// Regression: PostgreSQL's timestamps reach year 294276; adding such a
    /// value to the epoch panicked instead of failing the read.
    #[test]
    fn a_timestamp_past_year_9999_is_an_error_not_a_panic() {
        let mut s = SIGNATURE.to_vec();
        s.extend_from_slice(&0i32.to_be_bytes());
        s.extend_from_slice(&0i32.to_be_bytes());
        s.extend_from_slice(&1i16.to_be_bytes());
        field(&mut s, Some(&(9_000_000_000_000_000_000i64).to_be_bytes()));
        let err = BinaryCopyDecoder::new(vec![ColumnKind::Timestamp])
            .feed(&s, &mut Rows::default())
            .unwrap_err();
        assert!(err.contains("past year 9999"), "{err}");
    }

    #[test]
    fn a_cut_stream_or_a_wrong_shape_is_an_error() {
        let s = stream();
        let mut d = BinaryCopyDecoder::new(kinds());
        d.feed(&s[..s.len() - 5], &mut Rows::default()).unwrap();
        assert!(d.finish().unwrap_err().contains("end-of-data"));

        let mut d = BinaryCopyDecoder::new(kinds()[..5].to_vec());
        assert!(
            d.feed(&s, &mut Rows::default())
                .unwrap_err()
                .contains("6 field(s)")
        );

        let mut d = BinaryCopyDecoder::new(kinds());
        assert!(
            d.feed(b"PGCOPY\n\xfe", &mut Rows::default())
                .unwrap_err()
                .contains("signature")
        );

        let mut with_tail = s.clone();
        with_tail.push(0);
        let mut d = BinaryCopyDecoder::new(kinds());
        assert!(
            d.feed(&with_tail, &mut Rows::default())
                .unwrap_err()
                .contains("after the end")
        );
    }
}
