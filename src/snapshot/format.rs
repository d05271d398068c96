//! SPKD: the engine-neutral row encoding of data objects (before compression).
//!
//! One data object holds rows of one table:
//!
//! ```text
//! header  = "SPKD" version:u16le table:str ncols:uvarint { name:str kind:u8 }*ncols
//! rows    = { 0x01 value*ncols }*
//! trailer = 0x00 nrows:uvarint            (then end of stream)
//! str     = len:uvarint utf8-bytes
//! value   = 0x00                          null
//!         | 0x01 | 0x02                   false | true
//!         | 0x03 zigzag-uvarint           int64
//!         | 0x04 u64le                    float64 bits (NaN written as 0x7ff8000000000000)
//!         | 0x05 len:uvarint utf8-bytes   text
//!         | 0x06 len:uvarint bytes        bytes
//!         | 0x07 zigzag-uvarint uvarint   timestamp: Unix seconds (UTC), nanoseconds 0..=999999999
//! ```
//!
//! Varints are LEB128 (7 bits per byte, least significant group first) in
//! their shortest form; the decoder refuses longer forms, so every value has
//! exactly one encoding. That encoding of a row's values (without the `0x01`
//! marker) is the row's *canonical encoding*, which the content hash is built
//! on (see `codec.rs` and docs/format.md).
//!
//! The explicit trailer with the row count means a stream cut at a row
//! boundary is still detected. The decoder never trusts a length field for an
//! allocation beyond what it has read: values are capped at [`MAX_VALUE_LEN`],
//! names at [`MAX_NAME_LEN`], and columns at [`MAX_COLUMNS`]; every error names
//! the object, the byte offset in the decompressed stream, and (for values)
//! the row and column.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::ops::Range;

use time::OffsetDateTime;

use super::SnapshotError;
use crate::datastore::{ColumnKind, Table, Value};

/// The four bytes every data object starts with (after decompression).
pub const MAGIC: [u8; 4] = *b"SPKD";
/// The row-encoding version this spirekeep writes.
pub const DATA_FORMAT_VERSION: u16 = 1;
/// The oldest row-encoding version this spirekeep reads.
pub const OLDEST_DATA_FORMAT_VERSION: u16 = 1;
/// Longest text or bytes value (64 MiB). SPIRE's largest values (bundles,
/// CA journals) are far smaller; a longer length field means corruption.
pub const MAX_VALUE_LEN: usize = 64 << 20;
/// Largest row (64 MiB over all its values' encodings): a row is held in
/// memory whole, so a small, highly compressed object must not be able to
/// claim more.
pub const MAX_ROW_LEN: usize = 64 << 20;
/// Longest table or column name (64 KiB).
pub const MAX_NAME_LEN: usize = 64 << 10;
/// Most columns a table may have.
pub const MAX_COLUMNS: usize = 4096;

const ROW: u8 = 0x01;
const END: u8 = 0x00;

const T_NULL: u8 = 0x00;
const T_FALSE: u8 = 0x01;
const T_TRUE: u8 = 0x02;
const T_INT: u8 = 0x03;
const T_FLOAT: u8 = 0x04;
const T_TEXT: u8 = 0x05;
const T_BYTES: u8 = 0x06;
const T_TIMESTAMP: u8 = 0x07;

/// The one NaN bit pattern written for every NaN.
pub const CANONICAL_NAN_BITS: u64 = 0x7ff8_0000_0000_0000;

/// Encoded rows are handed to the writer in pieces of about this size.
const FLUSH_AT: usize = 128 * 1024;

/// One column as the data object records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnSpec {
    pub name: String,
    pub kind: ColumnKind,
}

/// What a data object holds: the table and its columns, in row order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub table: String,
    pub columns: Vec<ColumnSpec>,
}

impl Header {
    /// The header for rows of `table`, in its declared column order.
    #[must_use]
    pub fn for_table(table: &Table) -> Self {
        Self {
            table: table.name.clone(),
            columns: table
                .columns
                .iter()
                .map(|c| ColumnSpec {
                    name: c.name.clone(),
                    kind: c.kind,
                })
                .collect(),
        }
    }

    /// Why this header does not describe `table` (name, column names, kinds
    /// and order), or `None` when it does.
    #[must_use]
    pub fn mismatch(&self, table: &Table) -> Option<String> {
        let expected = Self::for_table(table);
        if self.table != expected.table {
            return Some(format!(
                "holds table {:?}, expected {:?}",
                self.table, expected.table
            ));
        }
        if self.columns != expected.columns {
            let show = |h: &Self| {
                h.columns
                    .iter()
                    .map(|c| format!("{}:{}", c.name, kind_name(c.kind)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Some(format!(
                "columns are ({}), the manifest says ({})",
                show(self),
                show(&expected)
            ));
        }
        None
    }
}

fn kind_tag(kind: ColumnKind) -> u8 {
    match kind {
        ColumnKind::Integer => 1,
        ColumnKind::Boolean => 2,
        ColumnKind::Text => 3,
        ColumnKind::Bytes => 4,
        ColumnKind::Timestamp => 5,
        ColumnKind::Float => 6,
    }
}

fn kind_from_tag(tag: u8) -> Option<ColumnKind> {
    Some(match tag {
        1 => ColumnKind::Integer,
        2 => ColumnKind::Boolean,
        3 => ColumnKind::Text,
        4 => ColumnKind::Bytes,
        5 => ColumnKind::Timestamp,
        6 => ColumnKind::Float,
        _ => return None,
    })
}

fn kind_name(kind: ColumnKind) -> &'static str {
    match kind {
        ColumnKind::Integer => "integer",
        ColumnKind::Boolean => "boolean",
        ColumnKind::Text => "text",
        ColumnKind::Bytes => "bytes",
        ColumnKind::Timestamp => "timestamp",
        ColumnKind::Float => "float",
    }
}

// ---------------------------------------------------------------- encoding

fn put_uvarint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v.to_le_bytes()[0] | 0x80);
        v >>= 7;
    }
    out.push(v.to_le_bytes()[0]);
}

fn zigzag(v: i64) -> u64 {
    // The shifts reinterpret bits; no value is lost.
    ((v << 1) ^ (v >> 63)).cast_unsigned()
}

fn unzigzag(v: u64) -> i64 {
    (v >> 1).cast_signed() ^ -((v & 1).cast_signed())
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    put_uvarint(out, s.len() as u64);
    out.extend_from_slice(s);
}

/// Appends the canonical encoding of one value (tag and payload).
pub fn encode_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.push(T_NULL),
        Value::Bool(false) => out.push(T_FALSE),
        Value::Bool(true) => out.push(T_TRUE),
        Value::Int(i) => {
            out.push(T_INT);
            put_uvarint(out, zigzag(*i));
        }
        Value::Float(f) => {
            out.push(T_FLOAT);
            let bits = if f.is_nan() {
                CANONICAL_NAN_BITS
            } else {
                f.to_bits()
            };
            out.extend_from_slice(&bits.to_le_bytes());
        }
        Value::Text(s) => {
            out.push(T_TEXT);
            put_str(out, s.as_bytes());
        }
        Value::Bytes(b) => {
            out.push(T_BYTES);
            put_str(out, b);
        }
        Value::Timestamp(t) => {
            out.push(T_TIMESTAMP);
            // Unix time is independent of the value's offset: this is UTC.
            put_uvarint(out, zigzag(t.unix_timestamp()));
            put_uvarint(out, u64::from(t.nanosecond()));
        }
    }
}

/// Appends the canonical encoding of a row: its values' encodings in column
/// order, nothing else. The content hash is built on exactly these bytes.
pub fn encode_values(out: &mut Vec<u8>, row: &[Value]) {
    for v in row {
        encode_value(out, v);
    }
}

/// Encodes rows into byte buffers, without a writer: the piece of the format
/// that the streaming pipeline runs on the caller's side (so rows are encoded,
/// checked and dropped where they were made) while compression and hashing run
/// elsewhere.
#[derive(Debug, Clone)]
pub struct RowEncoder {
    table: String,
    columns: Vec<String>,
    rows: u64,
}

impl RowEncoder {
    /// An encoder for `header`'s rows; appends the header's bytes to `out`.
    ///
    /// # Errors
    /// A header outside the format's limits.
    pub fn new(header: &Header, out: &mut Vec<u8>) -> Result<Self, SnapshotError> {
        let encode_err = |problem: String| SnapshotError::Encode {
            table: header.table.clone(),
            problem,
        };
        if header.table.len() > MAX_NAME_LEN {
            return Err(encode_err("the table name is longer than 64 KiB".into()));
        }
        if header.columns.len() > MAX_COLUMNS {
            return Err(encode_err(format!("more than {MAX_COLUMNS} columns")));
        }
        if let Some(c) = header.columns.iter().find(|c| c.name.len() > MAX_NAME_LEN) {
            let start: String = c.name.chars().take(32).collect();
            return Err(encode_err(format!(
                "column name {start:?}… is longer than 64 KiB"
            )));
        }
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&DATA_FORMAT_VERSION.to_le_bytes());
        put_str(out, header.table.as_bytes());
        put_uvarint(out, header.columns.len() as u64);
        for c in &header.columns {
            put_str(out, c.name.as_bytes());
            out.push(kind_tag(c.kind));
        }
        Ok(Self {
            table: header.table.clone(),
            columns: header.columns.iter().map(|c| c.name.clone()).collect(),
            rows: 0,
        })
    }

    /// Appends one row (its marker and values) to `out` and returns where its
    /// canonical encoding lies in `out` (for the content hash). A row that is
    /// refused leaves `out` unchanged.
    ///
    /// # Errors
    /// A row with the wrong number of values, or a text or bytes value longer
    /// than [`MAX_VALUE_LEN`].
    pub fn encode_row(
        &mut self,
        out: &mut Vec<u8>,
        row: &[Value],
    ) -> Result<Range<usize>, SnapshotError> {
        if row.len() != self.columns.len() {
            return Err(SnapshotError::Encode {
                table: self.table.clone(),
                problem: format!(
                    "row {} has {} values for {} columns",
                    self.rows + 1,
                    row.len(),
                    self.columns.len()
                ),
            });
        }
        for (v, name) in row.iter().zip(&self.columns) {
            let len = match v {
                Value::Text(s) => s.len(),
                Value::Bytes(b) => b.len(),
                _ => 0,
            };
            if len > MAX_VALUE_LEN {
                return Err(SnapshotError::Encode {
                    table: self.table.clone(),
                    problem: format!(
                        "row {}, column {name}: a value of {len} bytes is over the format's limit of 64 MiB",
                        self.rows + 1
                    ),
                });
            }
        }
        let total: usize = row
            .iter()
            .map(|v| match v {
                Value::Text(s) => s.len() + 10,
                Value::Bytes(b) => b.len() + 10,
                _ => 20,
            })
            .sum();
        if total > MAX_ROW_LEN {
            return Err(SnapshotError::Encode {
                table: self.table.clone(),
                problem: format!(
                    "row {} holds about {total} bytes, over the format's limit of 64 MiB per row",
                    self.rows + 1
                ),
            });
        }
        out.push(ROW);
        let start = out.len();
        encode_values(out, row);
        self.rows += 1;
        Ok(start..out.len())
    }

    /// Rows encoded so far.
    #[must_use]
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The table being encoded.
    #[must_use]
    pub fn table(&self) -> &str {
        &self.table
    }
}

/// Appends the trailer of an object holding `rows` rows.
pub fn encode_trailer(out: &mut Vec<u8>, rows: u64) {
    out.push(END);
    put_uvarint(out, rows);
}

/// Writes a data object's rows into any [`Write`]: the header at once, each
/// row as it comes, the trailer on [`Encoder::finish`]. Output is handed to the
/// writer in pieces of about 128 KiB.
pub struct Encoder<W: Write> {
    out: W,
    buf: Vec<u8>,
    rows: RowEncoder,
}

impl<W: Write> Encoder<W> {
    /// Starts an object for `header`'s table.
    ///
    /// # Errors
    /// A header outside the format's limits.
    pub fn new(out: W, header: &Header) -> Result<Self, SnapshotError> {
        let mut buf = Vec::with_capacity(FLUSH_AT + 4096);
        let rows = RowEncoder::new(header, &mut buf)?;
        Ok(Self { out, buf, rows })
    }

    /// Appends a row and returns its canonical encoding (for the content hash).
    ///
    /// # Errors
    /// As [`RowEncoder::encode_row`], or the writer's failure.
    pub fn write_row(&mut self, row: &[Value]) -> Result<&[u8], SnapshotError> {
        if self.buf.len() >= FLUSH_AT {
            self.flush_buf()?;
        }
        let range = self.rows.encode_row(&mut self.buf, row)?;
        Ok(&self.buf[range])
    }

    /// Rows written so far.
    #[must_use]
    pub fn rows(&self) -> u64 {
        self.rows.rows()
    }

    /// Writes the trailer and returns the writer (flushed).
    ///
    /// # Errors
    /// The writer's failure.
    pub fn finish(mut self) -> Result<W, SnapshotError> {
        encode_trailer(&mut self.buf, self.rows.rows());
        self.flush_buf()?;
        self.out.flush().map_err(|e| self.io_err(e))?;
        Ok(self.out)
    }

    fn flush_buf(&mut self) -> Result<(), SnapshotError> {
        if !self.buf.is_empty() {
            self.out.write_all(&self.buf).map_err(|e| self.io_err(e))?;
            self.buf.clear();
        }
        Ok(())
    }

    fn io_err(&self, e: io::Error) -> SnapshotError {
        SnapshotError::from_write_error(self.rows.table(), e)
    }
}

// ---------------------------------------------------------------- decoding

/// Reads a data object's rows from any [`Read`], one at a time.
pub struct Decoder<R: Read> {
    r: BufReader<R>,
    object: String,
    offset: u64,
    header: Header,
    rows: u64,
    done: bool,
}

impl<R: Read> Decoder<R> {
    /// Reads and checks the header. `object` names the object in errors.
    ///
    /// # Errors
    /// Not a data object, a newer format version, a malformed or truncated
    /// header, or the reader's failure.
    pub fn new(r: R, object: impl Into<String>) -> Result<Self, SnapshotError> {
        let mut d = Self {
            r: BufReader::with_capacity(64 * 1024, r),
            object: object.into(),
            offset: 0,
            header: Header {
                table: String::new(),
                columns: Vec::new(),
            },
            rows: 0,
            done: false,
        };
        let mut magic = [0u8; 4];
        d.read_exact(&mut magic, "the magic bytes")?;
        if magic != MAGIC {
            return Err(d.malformed_at(0, "not a spirekeep data object (no SPKD magic)".into()));
        }
        let mut version = [0u8; 2];
        d.read_exact(&mut version, "the format version")?;
        let version = u16::from_le_bytes(version);
        if version > DATA_FORMAT_VERSION {
            return Err(d.malformed_at(
                4,
                format!(
                    "data format version {version} is newer than this spirekeep reads ({DATA_FORMAT_VERSION}); \
                     upgrade spirekeep"
                ),
            ));
        }
        if version < OLDEST_DATA_FORMAT_VERSION {
            return Err(d.malformed_at(4, format!("unknown data format version {version}")));
        }
        let table = d.read_name("the table name")?;
        let ncols = d.read_uvarint("the column count")?;
        if ncols > MAX_COLUMNS as u64 {
            return Err(d.malformed(format!(
                "{ncols} columns is over the limit of {MAX_COLUMNS}"
            )));
        }
        let mut columns = Vec::new();
        for _ in 0..ncols {
            let name = d.read_name("a column name")?;
            let at = d.offset;
            let tag = d.read_u8("a column kind")?;
            let kind = kind_from_tag(tag)
                .ok_or_else(|| d.malformed_at(at, format!("unknown column kind {tag:#04x}")))?;
            columns.push(ColumnSpec { name, kind });
        }
        d.header = Header { table, columns };
        Ok(d)
    }

    /// The object's table and columns.
    #[must_use]
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Rows decoded so far.
    #[must_use]
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Bytes consumed so far (the decompressed stream's offset).
    #[must_use]
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The underlying reader.
    #[must_use]
    pub fn get_ref(&self) -> &R {
        self.r.get_ref()
    }

    /// The underlying reader. Bytes read ahead into the decoder's buffer are
    /// lost, so call this only after [`Self::next_row`] returned `None` (the
    /// end of the stream has then been reached and nothing is buffered).
    pub fn into_inner(self) -> R {
        self.r.into_inner()
    }

    /// The next row, or `None` after the trailer (whose row count has been
    /// checked, and after which the stream must end).
    ///
    /// # Errors
    /// Malformed or truncated data, or the reader's failure.
    pub fn next_row(&mut self) -> Result<Option<Vec<Value>>, SnapshotError> {
        if self.done {
            return Ok(None);
        }
        let at = self.offset;
        match self.read_u8("a row marker")? {
            ROW => {}
            END => {
                let count = self.read_uvarint("the trailer's row count")?;
                if count != self.rows {
                    return Err(self.malformed_at(
                        at,
                        format!(
                            "the trailer says {count} rows but the object holds {}",
                            self.rows
                        ),
                    ));
                }
                let mut probe = [0u8; 1];
                let n = loop {
                    match self.r.read(&mut probe) {
                        Ok(n) => break n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(self.read_err(e, "the end of the object")),
                    }
                };
                if n != 0 {
                    return Err(self.malformed("bytes after the trailer".into()));
                }
                self.done = true;
                return Ok(None);
            }
            other => {
                return Err(
                    self.malformed_at(at, format!("expected a row marker, found {other:#04x}"))
                );
            }
        }
        let ncols = self.header.columns.len();
        let mut row = Vec::with_capacity(ncols);
        let row_start = self.offset;
        for i in 0..ncols {
            let used = usize::try_from(self.offset - row_start).unwrap_or(usize::MAX);
            let left = MAX_ROW_LEN.saturating_sub(used);
            let v = self.read_value(i, left)?;
            row.push(v);
        }
        if self.offset - row_start > MAX_ROW_LEN as u64 {
            return Err(self.row_too_large(at));
        }
        self.rows += 1;
        Ok(Some(row))
    }

    fn row_too_large(&self, at: u64) -> SnapshotError {
        self.malformed_at(
            at,
            format!(
                "row {} is larger than the format's limit of {MAX_ROW_LEN} bytes per row",
                self.rows + 1
            ),
        )
    }

    /// Reads one value; a text or bytes value may take at most `row_left`
    /// bytes (what is left of the row's limit).
    fn read_value(&mut self, col: usize, row_left: usize) -> Result<Value, SnapshotError> {
        let at = self.offset;
        let tag = self.read_u8("a value")?;
        let value = match tag {
            T_NULL => Value::Null,
            T_FALSE => Value::Bool(false),
            T_TRUE => Value::Bool(true),
            T_INT => Value::Int(unzigzag(self.read_uvarint("an integer")?)),
            T_FLOAT => {
                let mut b = [0u8; 8];
                self.read_exact(&mut b, "a float")?;
                Value::Float(f64::from_bits(u64::from_le_bytes(b)))
            }
            T_TEXT => {
                let bytes = self.read_value_bytes("a text value", row_left)?;
                let s = String::from_utf8(bytes)
                    .map_err(|_| self.value_err(at, col, "text that is not valid UTF-8".into()))?;
                Value::Text(s)
            }
            T_BYTES => Value::Bytes(self.read_value_bytes("a bytes value", row_left)?),
            T_TIMESTAMP => {
                let secs = unzigzag(self.read_uvarint("a timestamp")?);
                let nanos = self.read_uvarint("a timestamp's nanoseconds")?;
                let nanos = u32::try_from(nanos)
                    .ok()
                    .filter(|n| *n < 1_000_000_000)
                    .ok_or_else(|| {
                        self.value_err(
                            at,
                            col,
                            format!("timestamp nanoseconds {nanos} out of range"),
                        )
                    })?;
                let t = OffsetDateTime::from_unix_timestamp(secs)
                    .ok()
                    .and_then(|t| t.replace_nanosecond(nanos).ok())
                    .ok_or_else(|| {
                        self.value_err(at, col, format!("timestamp {secs} s is out of range"))
                    })?;
                Value::Timestamp(t)
            }
            other => {
                return Err(self.value_err(at, col, format!("unknown value tag {other:#04x}")));
            }
        };
        Ok(value)
    }

    fn read_exact(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), SnapshotError> {
        // By hand rather than `Read::read_exact`, so a short read still
        // advances the offset and the error points at the exact byte.
        let mut filled = 0;
        while filled < buf.len() {
            match self.r.read(&mut buf[filled..]) {
                Ok(0) => {
                    self.offset += filled as u64;
                    return Err(SnapshotError::Truncated {
                        object: self.object.clone(),
                        offset: self.offset,
                        what,
                    });
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.offset += filled as u64;
                    return Err(self.read_err(e, what));
                }
            }
        }
        self.offset += filled as u64;
        Ok(())
    }

    fn read_u8(&mut self, what: &'static str) -> Result<u8, SnapshotError> {
        // Fast path straight from the buffer.
        if let Some(&b) = self.r.buffer().first() {
            self.r.consume(1);
            self.offset += 1;
            return Ok(b);
        }
        let mut b = [0u8; 1];
        self.read_exact(&mut b, what)?;
        Ok(b[0])
    }

    fn read_uvarint(&mut self, what: &'static str) -> Result<u64, SnapshotError> {
        let at = self.offset;
        let mut v: u64 = 0;
        for i in 0..10u32 {
            let b = self.read_u8(what)?;
            let low = u64::from(b & 0x7f);
            if i == 9 && b > 1 {
                return Err(self.malformed_at(at, format!("{what}: varint overflows 64 bits")));
            }
            v |= low << (7 * i);
            if b & 0x80 == 0 {
                if b == 0 && i > 0 {
                    return Err(
                        self.malformed_at(at, format!("{what}: varint not in its shortest form"))
                    );
                }
                return Ok(v);
            }
        }
        Err(self.malformed_at(at, format!("{what}: varint longer than 10 bytes")))
    }

    /// A text or bytes value: at most [`MAX_VALUE_LEN`], and at most
    /// `row_left` (what is left of the row's limit) before it is read.
    fn read_value_bytes(
        &mut self,
        what: &'static str,
        row_left: usize,
    ) -> Result<Vec<u8>, SnapshotError> {
        let at = self.offset;
        let len = self.read_uvarint(what)?;
        if len > MAX_VALUE_LEN as u64 {
            return Err(self.malformed_at(
                at,
                format!("{what} claims {len} bytes, over the limit of {MAX_VALUE_LEN}"),
            ));
        }
        if len > row_left as u64 {
            return Err(self.row_too_large(at));
        }
        self.read_body(usize::try_from(len).expect("bounded"), what)
    }

    fn read_len_prefixed(
        &mut self,
        what: &'static str,
        max: usize,
    ) -> Result<Vec<u8>, SnapshotError> {
        let at = self.offset;
        let len = self.read_uvarint(what)?;
        if len > max as u64 {
            return Err(self.malformed_at(
                at,
                format!("{what} claims {len} bytes, over the limit of {max}"),
            ));
        }
        self.read_body(usize::try_from(len).expect("bounded by max"), what)
    }

    fn read_body(&mut self, len: usize, what: &'static str) -> Result<Vec<u8>, SnapshotError> {
        // Grow with the data actually read, never by the length field alone.
        let mut out = Vec::with_capacity(len.min(64 * 1024));
        let got = (&mut self.r)
            .take(len as u64)
            .read_to_end(&mut out)
            .map_err(|e| self.read_err(e, what))?;
        self.offset += got as u64;
        if got < len {
            return Err(SnapshotError::Truncated {
                object: self.object.clone(),
                offset: self.offset,
                what,
            });
        }
        Ok(out)
    }

    fn read_name(&mut self, what: &'static str) -> Result<String, SnapshotError> {
        let at = self.offset;
        let bytes = self.read_len_prefixed(what, MAX_NAME_LEN)?;
        String::from_utf8(bytes)
            .map_err(|_| self.malformed_at(at, format!("{what} is not valid UTF-8")))
    }

    fn read_err(&self, e: io::Error, what: &'static str) -> SnapshotError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            SnapshotError::Truncated {
                object: self.object.clone(),
                offset: self.offset,
                what,
            }
        } else {
            SnapshotError::from_read_error(&self.object, self.offset, e)
        }
    }

    fn malformed(&self, problem: String) -> SnapshotError {
        self.malformed_at(self.offset, problem)
    }

    fn malformed_at(&self, offset: u64, problem: String) -> SnapshotError {
        SnapshotError::Malformed {
            object: self.object.clone(),
            offset,
            problem,
        }
    }

    fn value_err(&self, offset: u64, col: usize, problem: String) -> SnapshotError {
        let name = self
            .header
            .columns
            .get(col)
            .map_or("?", |c| c.name.as_str());
        self.malformed_at(
            offset,
            format!("row {}, column {name}: {problem}", self.rows + 1),
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use time::macros::datetime;

    fn header(cols: &[(&str, ColumnKind)]) -> Header {
        Header {
            table: "t".into(),
            columns: cols
                .iter()
                .map(|(n, k)| ColumnSpec {
                    name: (*n).into(),
                    kind: *k,
                })
                .collect(),
        }
    }

    fn encode(h: &Header, rows: &[Vec<Value>]) -> Vec<u8> {
        let mut e = Encoder::new(Vec::new(), h).unwrap();
        for r in rows {
            e.write_row(r).unwrap();
        }
        e.finish().unwrap()
    }

    fn decode(bytes: &[u8]) -> Result<(Header, Vec<Vec<Value>>), SnapshotError> {
        let mut d = Decoder::new(bytes, "obj")?;
        let mut rows = Vec::new();
        while let Some(r) = d.next_row()? {
            rows.push(r);
        }
        Ok((d.header().clone(), rows))
    }

    #[test]
    fn exact_bytes_of_a_small_object() {
        let h = header(&[("id", ColumnKind::Integer), ("name", ColumnKind::Text)]);
        let bytes = encode(
            &h,
            &[
                vec![Value::Int(-1), Value::Text("é".into())],
                vec![Value::Int(300), Value::Null],
            ],
        );
        let expected: Vec<u8> = [
            &b"SPKD"[..],
            &[1, 0],                         // version 1, little-endian
            &[1, b't'],                      // table "t"
            &[2],                            // two columns
            &[2, b'i', b'd', 1],             // id: integer
            &[4, b'n', b'a', b'm', b'e', 3], // name: text
            &[1, 3, 1, 5, 2, 0xc3, 0xa9],    // row: int zigzag(-1)=1, text "é"
            &[1, 3, 0xd8, 0x04, 0],          // row: int zigzag(300)=600, null
            &[0, 2],                         // trailer: 2 rows
        ]
        .concat();
        assert_eq!(bytes, expected);
        let (h2, rows) = decode(&bytes).unwrap();
        assert_eq!(h2, h);
        assert_eq!(rows.len(), 2);
    }

    #[test]
    fn timestamps_and_floats() {
        let h = header(&[("t", ColumnKind::Timestamp), ("f", ColumnKind::Float)]);
        let rows = vec![
            vec![
                Value::Timestamp(datetime!(1970-01-01 00:00:00 UTC)),
                Value::Float(-0.0),
            ],
            vec![
                Value::Timestamp(datetime!(0001-01-01 00:00:00 UTC)),
                Value::Float(f64::INFINITY),
            ],
            vec![
                Value::Timestamp(datetime!(2026-11-28 09:30:00.123456789 UTC)),
                Value::Float(1.5),
            ],
            vec![
                Value::Timestamp(datetime!(1969-12-31 23:59:59.999999999 UTC)),
                Value::Float(f64::MIN_POSITIVE),
            ],
        ];
        let (_, back) = decode(&encode(&h, &rows)).unwrap();
        assert_eq!(back, rows);
        assert!(matches!(back[0][1], Value::Float(f) if f.to_bits() == (-0.0f64).to_bits()));
        // A non-UTC timestamp is the same instant, read back in UTC.
        let local = vec![vec![
            Value::Timestamp(datetime!(2026-11-28 10:30:00 +01:00)),
            Value::Null,
        ]];
        let (_, back) = decode(&encode(&h, &local)).unwrap();
        assert_eq!(
            back[0][0],
            Value::Timestamp(datetime!(2026-11-28 09:30:00 UTC))
        );
        let Value::Timestamp(t) = back[0][0] else {
            unreachable!()
        };
        assert!(t.offset().is_utc());
        // Every NaN is written as the one canonical NaN.
        let weird_nan = f64::from_bits(0x7ff0_0000_0000_0001);
        let mut a = Vec::new();
        encode_value(&mut a, &Value::Float(weird_nan));
        let mut b = Vec::new();
        encode_value(&mut b, &Value::Float(f64::NAN));
        assert_eq!(a, b);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let h = header(&[("id", ColumnKind::Integer), ("b", ColumnKind::Bytes)]);
        let rows: Vec<Vec<Value>> = (0..5)
            .map(|i| {
                vec![
                    Value::Int(i * 1000),
                    Value::Bytes(vec![7; usize::try_from(i).unwrap()]),
                ]
            })
            .collect();
        let bytes = encode(&h, &rows);
        for cut in 0..bytes.len() {
            let err = decode(&bytes[..cut]).unwrap_err();
            match err {
                SnapshotError::Truncated {
                    ref object, offset, ..
                } => {
                    assert_eq!(object, "obj");
                    assert_eq!(offset, cut as u64, "offset of a cut at {cut}");
                }
                other => panic!("cut at {cut}: {other}"),
            }
        }
        assert!(decode(&bytes).is_ok());
        let mut longer = bytes.clone();
        longer.push(0);
        let err = decode(&longer).unwrap_err();
        assert!(err.to_string().contains("bytes after the trailer"), "{err}");
    }

    #[test]
    fn malformed_input_is_named_precisely() {
        let h = header(&[("id", ColumnKind::Integer), ("s", ColumnKind::Text)]);
        let good = encode(&h, &[vec![Value::Int(1), Value::Text("ab".into())]]);
        let value_at = good.len() - 2 - 4; // the text value's tag

        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(
            decode(&bad)
                .unwrap_err()
                .to_string()
                .contains("no SPKD magic")
        );

        let mut bad = good.clone();
        bad[4] = 2;
        let msg = decode(&bad).unwrap_err().to_string();
        assert!(
            msg.contains("newer than this spirekeep reads") && msg.contains("upgrade spirekeep"),
            "{msg}"
        );

        let mut bad = good.clone();
        bad[value_at] = 0x09;
        let err = decode(&bad).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("row 1, column s: unknown value tag 0x09"),
            "{msg}"
        );
        assert!(
            matches!(err, SnapshotError::Malformed { offset, .. } if offset == value_at as u64)
        );

        let mut bad = good.clone();
        bad[value_at + 2] = 0xff; // invalid UTF-8
        assert!(
            decode(&bad)
                .unwrap_err()
                .to_string()
                .contains("not valid UTF-8")
        );

        // A trailer with the wrong count.
        let mut bad = good.clone();
        *bad.last_mut().unwrap() = 5;
        assert!(
            decode(&bad)
                .unwrap_err()
                .to_string()
                .contains("trailer says 5 rows")
        );

        // Non-canonical varint: 1 written as 0x81 0x00.
        let mut bad = good[..value_at - 2].to_vec();
        bad.extend_from_slice(&[0x03, 0x82, 0x00]);
        bad.extend_from_slice(&good[value_at..]);
        assert!(
            decode(&bad)
                .unwrap_err()
                .to_string()
                .contains("shortest form")
        );

        // A huge length field is refused before any allocation.
        let mut bad = good[..value_at + 1].to_vec();
        bad.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        let msg = decode(&bad).unwrap_err().to_string();
        assert!(msg.contains("over the limit"), "{msg}");

        // A row with too few values cannot be written.
        let mut e = Encoder::new(Vec::new(), &h).unwrap();
        assert!(
            e.write_row(&[Value::Int(1)])
                .unwrap_err()
                .to_string()
                .contains("1 values for 2 columns")
        );
    }

    #[test]
    fn header_mismatch_is_described() {
        use crate::datastore::{Column, Table};
        let table = Table {
            name: "t".into(),
            columns: vec![Column {
                name: "id".into(),
                declared_type: "integer".into(),
                kind: ColumnKind::Integer,
                nullable: false,
                auto_increment: true,
            }],
            primary_key: vec!["id".into()],
            indexes: vec![],
            create_sql: None,
        };
        assert_eq!(Header::for_table(&table).mismatch(&table), None);
        let other = header(&[("id", ColumnKind::Text)]);
        assert!(other.mismatch(&table).unwrap().contains("id:text"));
    }

    pub(crate) fn arb_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Int),
            any::<f64>()
                .prop_filter("NaN is normalised", |f| !f.is_nan())
                .prop_map(Value::Float),
            ".{0,40}".prop_map(Value::Text),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::Bytes),
            (-62_135_596_800i64..253_402_300_799, 0u32..1_000_000_000).prop_map(|(s, n)| {
                Value::Timestamp(
                    OffsetDateTime::from_unix_timestamp(s)
                        .unwrap()
                        .replace_nanosecond(n)
                        .unwrap(),
                )
            }),
        ]
    }

    proptest! {
        #[test]
        fn encode_then_decode_round_trips(rows in proptest::collection::vec(proptest::collection::vec(arb_value(), 3), 0..40)) {
            let h = header(&[("a", ColumnKind::Text), ("b", ColumnKind::Bytes), ("c", ColumnKind::Integer)]);
            let bytes = encode(&h, &rows);
            let (h2, back) = decode(&bytes).unwrap();
            prop_assert_eq!(h2, h);
            prop_assert_eq!(back, rows);
        }

        #[test]
        fn random_bytes_never_panic(prefix in 0usize..40, junk in proptest::collection::vec(any::<u8>(), 0..200)) {
            let h = header(&[("a", ColumnKind::Text), ("b", ColumnKind::Integer)]);
            let good = encode(&h, &[vec![Value::Text("x".into()), Value::Int(5)]]);
            let mut input = good[..prefix.min(good.len())].to_vec();
            input.extend_from_slice(&junk);
            let _ = decode(&input);
            let _ = decode(&junk);
        }
    }
}
