//! The streaming pipeline: rows → SPKD encoding → zstd → SHA-256 → object
//! storage, and back; plus the engine-neutral content hash of a table.
//!
//! Writing a table ([`TableWriter`]) runs three stages joined by bounded
//! channels, so memory stays flat however large the table is:
//!
//! ```text
//! caller's task                 blocking thread                       async task
//! write_row(&[Value])  ──4──►   content hash (SHA-256 per row),  ──16──► ObjectUpload
//!   SPKD encoding and checks    raw SHA-256, zstd,                       (5 MiB parts,
//!   (256 KiB chunks)            compressed SHA-256 (512 KiB chunks)       4 in flight)
//! ```
//!
//! Rows are encoded where they are produced, so they are also freed there
//! (freeing another thread's allocations costs about 40% more CPU) and a bad
//! row is refused at once. At most about 1 MiB of encoded rows, 8 MiB of
//! compressed chunks and 25 MiB of upload parts are in flight per table.
//!
//! Reading ([`TableReader`]) runs the same stages in reverse and checks every
//! size and hash against the manifest's [`DataObject`] at the end of the
//! object (decompression, decoding and hashing run on a blocking thread). The
//! synchronous cores ([`ObjectEncoder`], [`ObjectDecoder`]) work on any
//! `Write`/`Read` with the same code as the pipeline.
//!
//! # Encryption
//!
//! When the repository handle carries age recipients
//! ([`Repository::with_recipients`]), the compressed bytes are encrypted
//! before they leave the blocking thread (compress, then encrypt: ciphertext
//! does not compress), as one age file per object; reading decrypts with the
//! handle's identities before decompressing. Both run inside the same
//! blocking stage, so the pipeline and its bounds are unchanged.
//!
//! # Hashes
//!
//! - `sha256`: SHA-256 of the stored bytes (compressed, and encrypted when
//!   the object is): what `verify` checks without decompressing, and without
//!   the identity.
//! - `raw_sha256`: SHA-256 of the decompressed SPKD stream.
//! - content hash: `Σ SHA-256(canonical encoding of row) mod 2^256` over the
//!   table's rows, with the row count beside it. The canonical encoding is
//!   [`format::encode_values`]: the row's values in column order, each as its
//!   type tag and payload, timestamps as UTC Unix seconds and nanoseconds.
//!   Addition makes it independent of row order, so it can be recomputed from
//!   any engine's rows after a restore ([`ContentHasher::add_row`]) and
//!   compared with the manifest. It detects accidental change; protection
//!   against deliberate forgery comes from the object SHA-256s in the manifest.

use std::fmt;
use std::io::{self, BufReader, Read, Write};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::{Buf, Bytes};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::SnapshotError;
use super::format::{self, Header, RowEncoder};
use super::manifest::DataObject;
use super::manifest::ObjectEncryption;
use crate::datastore::{ROW_BATCH, Table, Value};
use crate::store::crypt::{Identities, OpenError, Recipients, Sealer};
use crate::store::keys::{self, SnapshotId};
use crate::store::{ObjectUpload, Repository, StoreError};

/// zstd level used unless told otherwise. On SPIRE data level 1 compresses
/// 1.7 times as fast as level 3 for output 1.2 % larger (`zstd -b1 -e3` on a
/// million-entry snapshot's two largest tables: 505 vs 292 MB/s, 3.38:1 vs
/// 3.42:1), and a backup is CPU-bound on the machine that runs the database.
pub const DEFAULT_LEVEL: i32 = 1;
/// Rows are encoded (on the caller's side) into chunks of about this size.
const ENCODED_CHUNK: usize = 256 * 1024;
/// Encoded chunks queued between the caller and the compressor (1 MiB).
const ENCODED_CHUNKS_IN_FLIGHT: usize = 4;
/// Decoded row batches queued between the decoder and the reader.
const ROW_BATCHES_IN_FLIGHT: usize = 4;
/// Compressed bytes are passed to the uploader in chunks of this size.
const CHUNK_SIZE: usize = 512 * 1024;
/// Chunks queued between the encoder and the uploader (8 MiB).
const CHUNKS_IN_FLIGHT: usize = 16;

/// How data objects are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodecOptions {
    /// zstd level (1 to 22). Level 1 compresses SPIRE data about 3.4:1 at
    /// about 500 MB/s per core; level 3 costs 1.7 times the CPU for 1 %.
    pub level: i32,
    /// zstd worker threads; 0 compresses on the encoding thread itself. Each
    /// worker costs about 45 MB of memory at level 3. On a small machine that
    /// also runs the database, 0 or 1 is best.
    pub workers: u32,
}

impl Default for CodecOptions {
    fn default() -> Self {
        Self {
            level: DEFAULT_LEVEL,
            workers: 0,
        }
    }
}

/// Lower-case hex of `bytes`.
#[must_use]
pub fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    s
}

/// SHA-256 of `bytes` as lower-case hex.
#[must_use]
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest: [u8; 32] = Sha256::digest(bytes).into();
    to_hex(&digest)
}

// ------------------------------------------------------------ content hash

/// The content hash of a multiset of rows: the sum of the rows' SHA-256
/// digests, as 256-bit big-endian integers, modulo 2^256; plus the row count.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ContentHash {
    /// Big-endian limbs: `sum[0]` is the most significant.
    sum: [u64; 4],
    rows: u64,
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentHash({} rows, {})", self.rows, self.hex())
    }
}

impl ContentHash {
    /// The hash of no rows (all zeros).
    pub const EMPTY: Self = Self {
        sum: [0; 4],
        rows: 0,
    };

    /// How many rows went in.
    #[must_use]
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The sum as 64 lower-case hex digits.
    #[must_use]
    pub fn hex(&self) -> String {
        self.sum.iter().map(|l| format!("{l:016x}")).collect()
    }

    /// Rebuilds a hash from its hex form and row count (as the manifest keeps them).
    #[must_use]
    pub fn from_hex(hex: &str, rows: u64) -> Option<Self> {
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        {
            return None;
        }
        let mut sum = [0u64; 4];
        for (i, limb) in sum.iter_mut().enumerate() {
            *limb = u64::from_str_radix(&hex[i * 16..i * 16 + 16], 16).ok()?;
        }
        Some(Self { sum, rows })
    }

    /// The hash of both multisets together (e.g. a table split over objects).
    #[must_use]
    pub fn combine(self, other: Self) -> Self {
        let mut out = self;
        out.add_limbs(&other.sum);
        out.rows = self.rows.wrapping_add(other.rows);
        out
    }

    fn add_limbs(&mut self, x: &[u64; 4]) {
        let mut carry = false;
        for i in (0..4).rev() {
            let (s1, c1) = self.sum[i].overflowing_add(x[i]);
            let (s2, c2) = s1.overflowing_add(u64::from(carry));
            self.sum[i] = s2;
            carry = c1 || c2;
        }
    }

    fn add_digest(&mut self, d: &[u8; 32]) {
        let mut x = [0u64; 4];
        for (i, limb) in x.iter_mut().enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(&d[i * 8..i * 8 + 8]);
            *limb = u64::from_be_bytes(b);
        }
        self.add_limbs(&x);
        self.rows += 1;
    }
}

/// Accumulates a [`ContentHash`] row by row.
#[derive(Debug, Clone, Default)]
pub struct ContentHasher {
    acc: ContentHash,
    scratch: Vec<u8>,
}

impl ContentHasher {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one row (its values in the manifest's column order).
    pub fn add_row(&mut self, row: &[Value]) {
        self.scratch.clear();
        format::encode_values(&mut self.scratch, row);
        let d: [u8; 32] = Sha256::digest(&self.scratch).into();
        self.acc.add_digest(&d);
    }

    /// Adds a row given its canonical encoding ([`format::encode_values`]).
    pub fn add_canonical(&mut self, encoding: &[u8]) {
        let d: [u8; 32] = Sha256::digest(encoding).into();
        self.acc.add_digest(&d);
    }

    /// The hash of the rows added so far.
    #[must_use]
    pub fn current(&self) -> ContentHash {
        self.acc
    }
}

/// The content hash of `rows`, in any order.
pub fn content_hash<I, R>(rows: I) -> ContentHash
where
    I: IntoIterator<Item = R>,
    R: AsRef<[Value]>,
{
    let mut h = ContentHasher::new();
    for r in rows {
        h.add_row(r.as_ref());
    }
    h.current()
}

// ------------------------------------------------------------ sync core

/// Sizes and hashes of one data object, as computed while writing or reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectDigest {
    /// Stored (compressed) size in bytes.
    pub size: u64,
    /// SHA-256 of the stored bytes, hex.
    pub sha256: String,
    /// Size of the decompressed SPKD stream.
    pub raw_size: u64,
    /// SHA-256 of the decompressed SPKD stream, hex.
    pub raw_sha256: String,
    /// Content hash of the object's rows (with the row count).
    pub content: ContentHash,
    /// How the stored bytes are encrypted, if they are.
    pub encryption: Option<ObjectEncryption>,
}

impl ObjectDigest {
    /// The manifest entry for this object at `key`.
    #[must_use]
    pub fn into_data_object(self, key: String) -> DataObject {
        DataObject {
            key,
            size: self.size,
            sha256: self.sha256,
            raw_size: self.raw_size,
            raw_sha256: self.raw_sha256,
            rows: self.content.rows(),
            content_hash: self.content.hex(),
            encryption: self.encryption,
        }
    }
}

/// A writer that hashes and counts what passes through it.
struct HashWriter<W> {
    inner: W,
    sha: Sha256,
    count: u64,
}

impl<W> HashWriter<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            sha: Sha256::new(),
            count: 0,
        }
    }

    fn into_parts(self) -> (W, String, u64) {
        let d: [u8; 32] = self.sha.finalize().into();
        (self.inner, to_hex(&d), self.count)
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes and counts what passes through it.
struct HashReader<R> {
    inner: R,
    sha: Sha256,
    count: u64,
}

impl<R> HashReader<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            sha: Sha256::new(),
            count: 0,
        }
    }

    fn into_parts(self) -> (R, String, u64) {
        let d: [u8; 32] = self.sha.finalize().into();
        (self.inner, to_hex(&d), self.count)
    }
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Where compressed bytes go: straight to the (hashing) sink, or through an
/// age encryptor first.
enum Seal<W: Write> {
    Plain(W),
    Age(Sealer<W>),
}

impl<W: Write> Seal<W> {
    fn new(sink: W, recipients: Option<&Recipients>) -> io::Result<Self> {
        Ok(match recipients {
            None => Self::Plain(sink),
            Some(r) => Self::Age(r.seal(sink)?),
        })
    }

    fn encryption(&self) -> Option<ObjectEncryption> {
        match self {
            Self::Plain(_) => None,
            Self::Age(_) => Some(ObjectEncryption::Age),
        }
    }

    fn finish(self) -> io::Result<W> {
        match self {
            Self::Plain(w) => Ok(w),
            Self::Age(w) => w.finish(),
        }
    }
}

impl<W: Write> Write for Seal<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Plain(w) => w.write(buf),
            Self::Age(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Plain(w) => w.flush(),
            Self::Age(w) => w.flush(),
        }
    }
}

type ZstdWriter<S> = zstd::stream::write::Encoder<'static, Seal<HashWriter<S>>>;

/// SPKD bytes on their way to the compressor, with the place of each row's
/// canonical encoding (for the content hash).
#[derive(Debug, Default)]
struct EncodedChunk {
    bytes: Vec<u8>,
    rows: Vec<Range<usize>>,
}

/// Hashes (raw and per row) and compresses an SPKD byte stream, encrypts it
/// when given recipients, then hashes the stored bytes on their way to `sink`.
struct Compressor<S: Write> {
    raw: HashWriter<ZstdWriter<S>>,
    content: ContentHasher,
    table: String,
    encryption: Option<ObjectEncryption>,
}

impl<S: Write> Compressor<S> {
    fn new(
        sink: S,
        table: &str,
        options: &CodecOptions,
        recipients: Option<&Recipients>,
    ) -> Result<Self, SnapshotError> {
        let werr = |e| SnapshotError::from_write_error(table, e);
        let sealed = Seal::new(HashWriter::new(sink), recipients).map_err(werr)?;
        let encryption = sealed.encryption();
        let mut z = zstd::stream::write::Encoder::new(sealed, options.level).map_err(werr)?;
        z.include_checksum(true).map_err(werr)?;
        if options.workers > 0 {
            z.multithread(options.workers).map_err(werr)?;
        }
        Ok(Self {
            raw: HashWriter::new(z),
            content: ContentHasher::new(),
            table: table.to_owned(),
            encryption,
        })
    }

    fn write(&mut self, chunk: &EncodedChunk) -> Result<(), SnapshotError> {
        for r in &chunk.rows {
            self.content.add_canonical(&chunk.bytes[r.clone()]);
        }
        self.raw
            .write_all(&chunk.bytes)
            .map_err(|e| SnapshotError::from_write_error(&self.table, e))
    }

    fn finish(self) -> Result<(S, ObjectDigest), SnapshotError> {
        let werr = |e| SnapshotError::from_write_error(&self.table, e);
        let (z, raw_sha256, raw_size) = self.raw.into_parts();
        let sealed = z.finish().map_err(werr)?;
        let stored = sealed.finish().map_err(werr)?;
        let (mut sink, sha256, size) = stored.into_parts();
        sink.flush().map_err(werr)?;
        Ok((
            sink,
            ObjectDigest {
                size,
                sha256,
                raw_size,
                raw_sha256,
                content: self.content.current(),
                encryption: self.encryption,
            },
        ))
    }
}

/// Encodes, hashes and compresses rows into any [`Write`] (synchronous).
pub struct ObjectEncoder<S: Write> {
    rows: RowEncoder,
    chunk: EncodedChunk,
    compressor: Compressor<S>,
}

impl<S: Write> ObjectEncoder<S> {
    /// Starts an object for `header`'s table, writing compressed bytes to `sink`.
    ///
    /// # Errors
    /// Bad zstd options or a header outside the format's limits.
    pub fn new(sink: S, header: &Header, options: &CodecOptions) -> Result<Self, SnapshotError> {
        Self::sealed(sink, header, options, None)
    }

    /// [`Self::new`], encrypting the compressed bytes to `recipients` (when
    /// given) before they reach `sink`.
    ///
    /// # Errors
    /// As [`Self::new`], and the sink's failure to take the age header.
    pub fn sealed(
        sink: S,
        header: &Header,
        options: &CodecOptions,
        recipients: Option<&Recipients>,
    ) -> Result<Self, SnapshotError> {
        let compressor = Compressor::new(sink, &header.table, options, recipients)?;
        let mut chunk = EncodedChunk {
            bytes: Vec::with_capacity(ENCODED_CHUNK + 4096),
            rows: Vec::new(),
        };
        let rows = RowEncoder::new(header, &mut chunk.bytes)?;
        Ok(Self {
            rows,
            chunk,
            compressor,
        })
    }

    /// Appends one row.
    ///
    /// # Errors
    /// A row that does not fit the header or the format (nothing is written
    /// then), or the sink's failure.
    pub fn write_row(&mut self, row: &[Value]) -> Result<(), SnapshotError> {
        let range = self.rows.encode_row(&mut self.chunk.bytes, row)?;
        self.chunk.rows.push(range);
        if self.chunk.bytes.len() >= ENCODED_CHUNK {
            self.compressor.write(&self.chunk)?;
            self.chunk.bytes.clear();
            self.chunk.rows.clear();
        }
        Ok(())
    }

    /// Rows written so far.
    #[must_use]
    pub fn rows(&self) -> u64 {
        self.rows.rows()
    }

    /// Ends the object; returns the sink (flushed) and the object's digest.
    ///
    /// # Errors
    /// The sink's failure.
    pub fn finish(mut self) -> Result<(S, ObjectDigest), SnapshotError> {
        format::encode_trailer(&mut self.chunk.bytes, self.rows.rows());
        self.compressor.write(&self.chunk)?;
        self.compressor.finish()
    }
}

/// The stored bytes as read, with their hash and count. Shared, because
/// the age reader above it cannot give its input back: the decoder keeps a
/// handle to hash whatever follows the end of the age file too.
struct Tapped<R> {
    inner: R,
    sha: Sha256,
    count: u64,
}

struct Tap<R>(Arc<Mutex<Tapped<R>>>);

impl<R> Tap<R> {
    fn lock(&self) -> MutexGuard<'_, Tapped<R>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<R: Read> Read for Tap<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut t = self.lock();
        let n = t.inner.read(buf)?;
        t.sha.update(&buf[..n]);
        t.count += n as u64;
        Ok(n)
    }
}

/// The compressed bytes: the stored bytes themselves, or an age reader that
/// decrypts them (checking every chunk's tag and the end of the file).
enum Unseal<R: Read> {
    Plain(R),
    Age(age::stream::StreamReader<R>),
}

impl<R: Read> Read for Unseal<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(r) => r.read(buf),
            Self::Age(r) => r.read(buf),
        }
    }
}

type ZstdReader<R> = zstd::stream::read::Decoder<'static, BufReader<Unseal<Tap<R>>>>;

/// Decompresses, decodes and hashes a data object from any [`Read`] (synchronous).
pub struct ObjectDecoder<R: Read> {
    dec: format::Decoder<HashReader<ZstdReader<R>>>,
    stored: Tap<R>,
    encryption: Option<ObjectEncryption>,
    content: ContentHasher,
    object: String,
}

impl<R: Read> ObjectDecoder<R> {
    /// Reads the header of a plaintext object. `object` names it in errors.
    ///
    /// # Errors
    /// Anything that stops the header from being read.
    pub fn new(compressed: R, object: &str) -> Result<Self, SnapshotError> {
        Self::open(compressed, object, None)
    }

    /// Reads the object's header; with `identities`, the stored bytes are an
    /// age file that is decrypted first.
    ///
    /// # Errors
    /// Anything that stops the header from being read; for an encrypted
    /// object, a damaged age header or no matching identity.
    pub fn open(
        stored: R,
        object: &str,
        identities: Option<&Identities>,
    ) -> Result<Self, SnapshotError> {
        let shared = Arc::new(Mutex::new(Tapped {
            inner: stored,
            sha: Sha256::new(),
            count: 0,
        }));
        let tap = Tap(Arc::clone(&shared));
        let (unsealed, encryption) = match identities {
            None => (Unseal::Plain(tap), None),
            Some(ids) => {
                let reader = ids.open(tap).map_err(|e| open_error(object, ids, e))?;
                (Unseal::Age(reader), Some(ObjectEncryption::Age))
            }
        };
        let z = zstd::stream::read::Decoder::new(unsealed)
            .map_err(|e| SnapshotError::from_read_error(object, 0, e))?;
        let dec = format::Decoder::new(HashReader::new(z), object)?;
        Ok(Self {
            dec,
            stored: Tap(shared),
            encryption,
            content: ContentHasher::new(),
            object: object.to_owned(),
        })
    }

    /// The object's table and columns.
    #[must_use]
    pub fn header(&self) -> &Header {
        self.dec.header()
    }

    /// Decompressed bytes read so far.
    #[must_use]
    pub fn offset(&self) -> u64 {
        self.dec.offset()
    }

    /// The next row, or `None` at the (checked) end of the object.
    ///
    /// # Errors
    /// Damaged, truncated or malformed data, or the reader's failure.
    pub fn next_row(&mut self) -> Result<Option<Vec<Value>>, SnapshotError> {
        let row = self.dec.next_row()?;
        if let Some(r) = &row {
            self.content.add_row(r);
        }
        Ok(row)
    }

    /// Reads whatever rows are left and returns the object's digest.
    ///
    /// # Errors
    /// As [`Self::next_row`].
    pub fn finish(mut self) -> Result<ObjectDigest, SnapshotError> {
        while self.next_row()?.is_some() {}
        let offset = self.dec.offset();
        let (z, raw_sha256, raw_size) = self.dec.into_inner().into_parts();
        let mut rest = z.finish();
        // zstd reads to the end of its input (and age to the end of its
        // file, checking the last chunk); anything left is hashed too.
        io::copy(&mut rest, &mut io::sink())
            .map_err(|e| SnapshotError::from_read_error(&self.object, offset, e))?;
        drop(rest);
        io::copy(&mut self.stored, &mut io::sink())
            .map_err(|e| SnapshotError::from_read_error(&self.object, offset, e))?;
        let (sha256, size) = {
            let mut t = self.stored.lock();
            let sha = std::mem::take(&mut t.sha);
            let d: [u8; 32] = sha.finalize().into();
            (to_hex(&d), t.count)
        };
        Ok(ObjectDigest {
            size,
            sha256,
            raw_size,
            raw_sha256,
            content: self.content.current(),
            encryption: self.encryption,
        })
    }
}

fn open_error(object: &str, ids: &Identities, e: OpenError) -> SnapshotError {
    match e {
        OpenError::Io(e) => SnapshotError::from_read_error(object, 0, e),
        OpenError::NoMatchingKey => SnapshotError::Undecryptable {
            object: object.to_owned(),
            detail: format!(
                "none of the keys in {} ({}) is among its recipients",
                ids.source().display(),
                ids.public_keys().join(", ")
            ),
        },
        OpenError::Damaged(_) => SnapshotError::Undecryptable {
            object: object.to_owned(),
            detail: e.to_string(),
        },
    }
}

/// Compares what was read with what the manifest records; the first
/// difference is the error.
///
/// # Errors
/// [`SnapshotError::Mismatch`] naming the object and the field.
pub fn check_digest(expected: &DataObject, actual: &ObjectDigest) -> Result<(), SnapshotError> {
    let mismatch = |what, e: String, a: String| {
        Err(SnapshotError::Mismatch {
            object: expected.key.clone(),
            what,
            expected: e,
            actual: a,
        })
    };
    if expected.encryption != actual.encryption {
        let shown = |e: Option<ObjectEncryption>| {
            e.map_or_else(
                || "plaintext".to_owned(),
                |e| format!("{e:?}").to_lowercase(),
            )
        };
        return mismatch(
            "encryption",
            shown(expected.encryption),
            shown(actual.encryption),
        );
    }
    if expected.size != actual.size {
        return mismatch(
            "size",
            format!("{} bytes", expected.size),
            format!("{} bytes", actual.size),
        );
    }
    if expected.sha256 != actual.sha256 {
        return mismatch("sha256", expected.sha256.clone(), actual.sha256.clone());
    }
    if expected.raw_size != actual.raw_size {
        return mismatch(
            "decompressed size",
            format!("{} bytes", expected.raw_size),
            format!("{} bytes", actual.raw_size),
        );
    }
    if expected.raw_sha256 != actual.raw_sha256 {
        return mismatch(
            "decompressed sha256",
            expected.raw_sha256.clone(),
            actual.raw_sha256.clone(),
        );
    }
    if expected.rows != actual.content.rows() {
        return mismatch(
            "row count",
            expected.rows.to_string(),
            actual.content.rows().to_string(),
        );
    }
    if expected.content_hash != actual.content.hex() {
        return mismatch(
            "content hash",
            expected.content_hash.clone(),
            actual.content.hex(),
        );
    }
    Ok(())
}

// ------------------------------------------------------------ async writer

/// Hands compressed bytes to the uploader in [`CHUNK_SIZE`] pieces.
struct ChannelSink {
    tx: mpsc::Sender<Bytes>,
    buf: Vec<u8>,
}

impl ChannelSink {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(CHUNK_SIZE),
        ));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped"))
    }
}

impl Write for ChannelSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK_SIZE {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

enum Msg {
    Chunk(EncodedChunk),
    Finish,
}

/// Streams one table's rows into one data object; see the module docs.
///
/// ```no_run
/// # async fn demo(repo: &spirekeep::store::Repository, id: &spirekeep::store::keys::SnapshotId,
/// #               table: &spirekeep::datastore::Table, rows: Vec<Vec<spirekeep::datastore::Value>>)
/// #               -> Result<(), spirekeep::snapshot::SnapshotError> {
/// use spirekeep::snapshot::codec::{CodecOptions, TableWriter};
/// let mut w = TableWriter::for_table(repo, id, table, 0, CodecOptions::default())?;
/// w.write_batch(&rows).await?;
/// let object = w.finish().await?; // goes into the manifest
/// # Ok(()) }
/// ```
///
/// Rows are encoded and checked on the caller's task as they come (a few
/// hundred nanoseconds each); compression and hashing run on a blocking
/// thread; the upload on its own task. Nothing appears in the repository
/// until [`Self::finish`] succeeds. On a failed upload, or when the writer is
/// dropped or [aborted](Self::abort), the upload is abandoned.
pub struct TableWriter {
    key: String,
    encoder: RowEncoder,
    chunk: EncodedChunk,
    /// Encoded bytes already handed to the compressor.
    sent: u64,
    tx: Option<mpsc::Sender<Msg>>,
    compress: Option<JoinHandle<Result<ObjectDigest, SnapshotError>>>,
    upload: Option<JoinHandle<Result<ObjectUpload, SnapshotError>>>,
}

impl fmt::Debug for TableWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TableWriter")
            .field("key", &self.key)
            .field("table", &self.encoder.table())
            .field("rows", &self.encoder.rows())
            .finish_non_exhaustive()
    }
}

impl TableWriter {
    /// Starts writing `header`'s rows to `key`, encrypted to the
    /// repository handle's recipients if it has any. Must be called inside a
    /// Tokio runtime (it spawns the compressor and the uploader).
    ///
    /// # Errors
    /// An invalid key, a header outside the format's limits, or bad zstd options.
    pub fn new(
        repo: &Repository,
        key: &str,
        header: &Header,
        options: CodecOptions,
    ) -> Result<Self, SnapshotError> {
        let upload = repo.upload(key)?;
        let mut chunk = EncodedChunk {
            bytes: Vec::with_capacity(ENCODED_CHUNK + 4096),
            rows: Vec::new(),
        };
        let encoder = RowEncoder::new(header, &mut chunk.bytes)?;
        let (tx, rx) = mpsc::channel(ENCODED_CHUNKS_IN_FLIGHT);
        let (chunk_tx, chunk_rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
        let sink = ChannelSink {
            tx: chunk_tx,
            buf: Vec::with_capacity(CHUNK_SIZE),
        };
        // Fail now, not on the first row, if zstd refuses the options.
        let compressor = Compressor::new(sink, &header.table, &options, repo.recipients())?;
        let upload = tokio::spawn(upload_chunks(upload, chunk_rx));
        let compress = tokio::task::spawn_blocking(move || compress_chunks(rx, compressor));
        Ok(Self {
            key: key.to_owned(),
            encoder,
            chunk,
            sent: 0,
            tx: Some(tx),
            compress: Some(compress),
            upload: Some(upload),
        })
    }

    /// Starts writing `table`'s rows (in its declared column order) to its
    /// `part`-th data object in snapshot `id` ([`keys::data_object`]).
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn for_table(
        repo: &Repository,
        id: &SnapshotId,
        table: &Table,
        part: u32,
        options: CodecOptions,
    ) -> Result<Self, SnapshotError> {
        let key = if repo.recipients().is_some() {
            keys::encrypted_data_object(id, &table.name, part)
        } else {
            keys::data_object(id, &table.name, part)
        };
        Self::new(repo, &key, &Header::for_table(table), options)
    }

    /// The key being written.
    #[must_use]
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Rows accepted so far.
    #[must_use]
    pub fn rows(&self) -> u64 {
        self.encoder.rows()
    }

    /// Encoded (uncompressed) bytes so far, for progress reports and for
    /// splitting a huge table over several objects (S3 allows 10,000 parts
    /// of 5 MiB, 48.8 GiB compressed, per object).
    #[must_use]
    pub fn raw_size(&self) -> u64 {
        self.sent + self.chunk.bytes.len() as u64
    }

    /// Adds one row (values in the header's column order). Waits while the
    /// pipeline is full.
    ///
    /// # Errors
    /// A row that does not fit the header or the format: it is not written,
    /// and the writer stays usable (abort it unless skipping the row is
    /// right). Or a failed upload: the writer is then unusable.
    pub async fn write_row(&mut self, row: &[Value]) -> Result<(), SnapshotError> {
        let range = self.encoder.encode_row(&mut self.chunk.bytes, row)?;
        self.chunk.rows.push(range);
        if self.chunk.bytes.len() >= ENCODED_CHUNK {
            self.send_chunk().await?;
        }
        Ok(())
    }

    /// Adds rows in order (e.g. a [`crate::datastore::RowBatch`] as the
    /// datastore streams them).
    ///
    /// # Errors
    /// As [`Self::write_row`]; rows before the refused one are written.
    pub async fn write_batch(&mut self, rows: &[Vec<Value>]) -> Result<(), SnapshotError> {
        for row in rows {
            self.write_row(row).await?;
        }
        Ok(())
    }

    /// Ends the object, completes the upload, and returns its manifest entry.
    ///
    /// # Errors
    /// Any compression or store failure.
    pub async fn finish(mut self) -> Result<DataObject, SnapshotError> {
        format::encode_trailer(&mut self.chunk.bytes, self.encoder.rows());
        self.send_chunk().await?;
        self.send(Msg::Finish).await?;
        self.tx = None;
        let table = self.encoder.table().to_owned();
        let compressed = join(self.compress.take(), &table).await;
        let uploaded = join(self.upload.take(), &table).await;
        match (compressed, uploaded) {
            (Ok(digest), Ok(upload)) => {
                upload.finish().await?;
                Ok(digest.into_data_object(self.key.clone()))
            }
            (_, Err(e)) => Err(e),
            (Err(e), Ok(upload)) => {
                let _ = upload.abort().await;
                Err(e)
            }
        }
    }

    /// Abandons the object: nothing appears at its key.
    ///
    /// # Errors
    /// The store's failure to abort a multipart upload.
    pub async fn abort(mut self) -> Result<(), SnapshotError> {
        self.tx = None; // no Finish: the compressor stops without completing
        let table = self.encoder.table().to_owned();
        let _ = join(self.compress.take(), &table).await;
        if let Ok(upload) = join(self.upload.take(), &table).await {
            upload.abort().await?;
        }
        Ok(())
    }

    async fn send_chunk(&mut self) -> Result<(), SnapshotError> {
        let rows = self.chunk.rows.len();
        self.sent += self.chunk.bytes.len() as u64;
        let full = std::mem::replace(
            &mut self.chunk,
            EncodedChunk {
                bytes: Vec::with_capacity(ENCODED_CHUNK + 4096),
                rows: Vec::with_capacity(rows),
            },
        );
        self.send(Msg::Chunk(full)).await
    }

    async fn send(&mut self, msg: Msg) -> Result<(), SnapshotError> {
        let table = self.encoder.table().to_owned();
        let Some(tx) = self.tx.as_ref() else {
            return Err(SnapshotError::Pipeline {
                table,
                detail: "the writer already failed".into(),
            });
        };
        if tx.send(msg).await.is_ok() {
            return Ok(());
        }
        // The compressor has stopped: find out why, and abandon the upload.
        self.tx = None;
        let compressed = join(self.compress.take(), &table).await;
        let uploaded = join(self.upload.take(), &table).await;
        Err(match (compressed, uploaded) {
            (_, Err(e)) => e,
            (compressed, Ok(upload)) => {
                let _ = upload.abort().await;
                compressed.err().unwrap_or_else(|| SnapshotError::Pipeline {
                    table,
                    detail: "the compressor stopped unexpectedly".into(),
                })
            }
        })
    }
}

async fn join<T>(
    handle: Option<JoinHandle<Result<T, SnapshotError>>>,
    table: &str,
) -> Result<T, SnapshotError> {
    let Some(handle) = handle else {
        return Err(SnapshotError::Pipeline {
            table: table.to_owned(),
            detail: "the writer already failed".into(),
        });
    };
    match handle.await {
        Ok(result) => result,
        Err(e) => Err(SnapshotError::Pipeline {
            table: table.to_owned(),
            detail: format!("a pipeline task failed: {e}"),
        }),
    }
}

fn compress_chunks(
    mut rx: mpsc::Receiver<Msg>,
    mut compressor: Compressor<ChannelSink>,
) -> Result<ObjectDigest, SnapshotError> {
    loop {
        match rx.blocking_recv() {
            Some(Msg::Chunk(chunk)) => compressor.write(&chunk)?,
            Some(Msg::Finish) => break,
            None => {
                return Err(SnapshotError::Pipeline {
                    table: compressor.table.clone(),
                    detail: "abandoned before it was finished".into(),
                });
            }
        }
    }
    let (sink, digest) = compressor.finish()?;
    drop(sink); // closes the chunk channel: the uploader stops reading
    Ok(digest)
}

async fn upload_chunks(
    mut upload: ObjectUpload,
    mut rx: mpsc::Receiver<Bytes>,
) -> Result<ObjectUpload, SnapshotError> {
    while let Some(chunk) = rx.recv().await {
        // On error the upload is dropped, which aborts it.
        upload.write(chunk).await?;
    }
    Ok(upload)
}

// ------------------------------------------------------------ async reader

/// Reads the byte stream of an object, fed by an async task.
struct ChannelReader {
    rx: mpsc::Receiver<Result<Bytes, StoreError>>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Ok(b)) => self.current = b,
                Some(Err(e)) => return Err(io::Error::other(e)),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

enum ReadState {
    Reading,
    Done,
    Failed,
}

/// Streams the rows of one data object back, checking everything.
///
/// ```no_run
/// # async fn demo(repo: &spirekeep::store::Repository, table: &spirekeep::datastore::Table,
/// #               object: &spirekeep::snapshot::manifest::DataObject)
/// #               -> Result<(), spirekeep::snapshot::SnapshotError> {
/// use spirekeep::snapshot::codec::TableReader;
/// let mut r = TableReader::open(repo, table, object).await?;
/// while let Some(batch) = r.next_batch().await? {
///     // insert the batch; it is proven good only once next_batch returns None
/// }
/// # Ok(()) }
/// ```
///
/// Rows arrive before the object's hashes can be checked: the end of the
/// object (`None`) is the proof that every size, SHA-256, the row count and
/// the content hash matched the manifest. Until then, treat rows as
/// provisional (a restore commits only after every object ended cleanly).
pub struct TableReader {
    object: DataObject,
    header: Header,
    rows_rx: mpsc::Receiver<Vec<Vec<Value>>>,
    current: std::vec::IntoIter<Vec<Value>>,
    decode: Option<JoinHandle<Result<ObjectDigest, SnapshotError>>>,
    forward: JoinHandle<()>,
    state: ReadState,
}

impl fmt::Debug for TableReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TableReader")
            .field("object", &self.object.key)
            .finish_non_exhaustive()
    }
}

impl Drop for TableReader {
    fn drop(&mut self) {
        self.forward.abort();
    }
}

impl TableReader {
    /// Opens `object` and checks that its header describes `table` (name,
    /// columns, kinds, order).
    ///
    /// # Errors
    /// A missing object, an unreadable header, or a header for another table.
    pub async fn open(
        repo: &Repository,
        table: &Table,
        object: &DataObject,
    ) -> Result<Self, SnapshotError> {
        let identities = match object.encryption {
            None => None,
            Some(_) => Some(
                repo.shared_identities()
                    .ok_or_else(|| SnapshotError::NoIdentity {
                        object: object.key.clone(),
                    })?,
            ),
        };
        let mut stream = repo.get_stream(&object.key).await?;
        let (bytes_tx, bytes_rx) = mpsc::channel::<Result<Bytes, StoreError>>(CHUNKS_IN_FLIGHT);
        let forward = tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                let failed = item.is_err();
                if bytes_tx.send(item).await.is_err() || failed {
                    break;
                }
            }
        });
        let (header_tx, header_rx) = oneshot::channel();
        let (rows_tx, rows_rx) = mpsc::channel(ROW_BATCHES_IN_FLIGHT);
        let key = object.key.clone();
        let raw_size = object.raw_size;
        let reader = ChannelReader {
            rx: bytes_rx,
            current: Bytes::new(),
        };
        let decode = tokio::task::spawn_blocking(move || {
            let ids = identities.as_deref();
            decode_rows(reader, &key, ids, raw_size, header_tx, &rows_tx)
        });
        let header = if let Ok(h) = header_rx.await {
            h
        } else {
            forward.abort();
            return Err(match join(Some(decode), &table.name).await {
                Err(e) => e,
                Ok(_) => SnapshotError::Pipeline {
                    table: table.name.clone(),
                    detail: "the decoder stopped before the header".into(),
                },
            });
        };
        if let Some(problem) = header.mismatch(table) {
            forward.abort();
            return Err(SnapshotError::Mismatch {
                object: object.key.clone(),
                what: "table header",
                expected: format!("table {}", table.name),
                actual: problem,
            });
        }
        Ok(Self {
            object: object.clone(),
            header,
            rows_rx,
            current: Vec::new().into_iter(),
            decode: Some(decode),
            forward,
            state: ReadState::Reading,
        })
    }

    /// The object's header.
    #[must_use]
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The manifest entry being read.
    #[must_use]
    pub fn object(&self) -> &DataObject {
        &self.object
    }

    /// The next row; `None` once the whole object has been read and checked.
    ///
    /// # Errors
    /// Damaged, truncated or mismatching data, or a store failure.
    pub async fn next_row(&mut self) -> Result<Option<Vec<Value>>, SnapshotError> {
        loop {
            if let Some(row) = self.current.next() {
                return Ok(Some(row));
            }
            match self.next_batch().await? {
                Some(batch) => self.current = batch.into_iter(),
                None => return Ok(None),
            }
        }
    }

    /// The next batch of rows (at most [`ROW_BATCH`]); `None` once the whole
    /// object has been read and checked.
    ///
    /// # Errors
    /// As [`Self::next_row`].
    pub async fn next_batch(&mut self) -> Result<Option<Vec<Vec<Value>>>, SnapshotError> {
        let rest: Vec<Vec<Value>> = self.current.by_ref().collect();
        if !rest.is_empty() {
            return Ok(Some(rest));
        }
        match self.state {
            ReadState::Done => return Ok(None),
            ReadState::Failed => {
                return Err(SnapshotError::Pipeline {
                    table: self.header.table.clone(),
                    detail: format!("reading {} already failed", self.object.key),
                });
            }
            ReadState::Reading => {}
        }
        if let Some(batch) = self.rows_rx.recv().await {
            return Ok(Some(batch));
        }
        self.state = ReadState::Failed;
        let digest = join(self.decode.take(), &self.header.table).await?;
        check_digest(&self.object, &digest)?;
        self.state = ReadState::Done;
        Ok(None)
    }
}

/// A batch is handed on once its rows weigh this much (decoded bytes plus
/// the in-memory size of each value), so the rows in flight stay bounded
/// however large each row is: a few batches of this weight plus one row
/// ([`format::MAX_ROW_LEN`]).
pub const MAX_BATCH_WEIGHT: u64 = 8 << 20;

/// What one decoded value costs in memory besides its bytes.
const VALUE_OVERHEAD: u64 = std::mem::size_of::<Value>() as u64;

/// Decodes `reader` (an object whose manifest records `raw_size`
/// decompressed bytes) into row batches. The manifest's size is the object's
/// limit: a stream that decompresses to more stops there, with an error.
fn decode_rows(
    reader: ChannelReader,
    key: &str,
    identities: Option<&Identities>,
    raw_size: u64,
    header_tx: oneshot::Sender<Header>,
    rows_tx: &mpsc::Sender<Vec<Vec<Value>>>,
) -> Result<ObjectDigest, SnapshotError> {
    let mut dec = ObjectDecoder::open(reader, key, identities)?;
    let stopped = || SnapshotError::Pipeline {
        table: String::new(),
        detail: format!("the reader of {key} was dropped"),
    };
    header_tx
        .send(dec.header().clone())
        .map_err(|_| stopped())?;
    let per_row = VALUE_OVERHEAD * dec.header().columns.len() as u64;
    let mut batch = Vec::with_capacity(ROW_BATCH);
    let mut weight = 0u64;
    let mut last = dec.offset();
    while let Some(row) = dec.next_row()? {
        let now = dec.offset();
        if now > raw_size {
            return Err(SnapshotError::Malformed {
                object: key.to_owned(),
                offset: now,
                problem: format!(
                    "the object decompresses to more than the {raw_size} bytes its manifest records"
                ),
            });
        }
        weight += now - last + per_row;
        last = now;
        batch.push(row);
        if batch.len() >= ROW_BATCH || weight >= MAX_BATCH_WEIGHT {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(ROW_BATCH));
            rows_tx.blocking_send(full).map_err(|_| stopped())?;
            weight = 0;
        }
    }
    if !batch.is_empty() {
        rows_tx.blocking_send(batch).map_err(|_| stopped())?;
    }
    dec.finish()
}

/// Re-reads an object's stored bytes and checks their size and SHA-256
/// (no decompression): the fast check of `verify`.
///
/// # Errors
/// A missing object, a store failure, or a [`SnapshotError::Mismatch`].
pub async fn check_stored_bytes(
    repo: &Repository,
    object: &DataObject,
) -> Result<(), SnapshotError> {
    let mut stream = repo.get_stream(&object.key).await?;
    let mut sha = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        size += chunk.len() as u64;
        sha.update(&chunk);
    }
    let d: [u8; 32] = sha.finalize().into();
    let mismatch = |what, expected: String, actual: String| SnapshotError::Mismatch {
        object: object.key.clone(),
        what,
        expected,
        actual,
    };
    if size != object.size {
        return Err(mismatch(
            "size",
            format!("{} bytes", object.size),
            format!("{size} bytes"),
        ));
    }
    let actual = to_hex(&d);
    if actual != object.sha256 {
        return Err(mismatch("sha256", object.sha256.clone(), actual));
    }
    Ok(())
}

/// Reads a whole data object through a [`TableReader`], discarding the rows,
/// and returns how many there were: every hash is checked.
///
/// # Errors
/// As [`TableReader::next_batch`].
pub async fn check_object(
    repo: &Repository,
    table: &Table,
    object: &DataObject,
) -> Result<u64, SnapshotError> {
    let mut reader = TableReader::open(repo, table, object).await?;
    let mut rows = 0u64;
    while let Some(batch) = reader.next_batch().await? {
        rows += batch.len() as u64;
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::ColumnKind;
    use crate::snapshot::format::ColumnSpec;
    use proptest::prelude::*;

    fn header() -> Header {
        Header {
            table: "t".into(),
            columns: vec![
                ColumnSpec {
                    name: "a".into(),
                    kind: ColumnKind::Text,
                },
                ColumnSpec {
                    name: "b".into(),
                    kind: ColumnKind::Integer,
                },
                ColumnSpec {
                    name: "c".into(),
                    kind: ColumnKind::Timestamp,
                },
            ],
        }
    }

    fn arb_rows() -> impl Strategy<Value = Vec<Vec<Value>>> {
        proptest::collection::vec(
            proptest::collection::vec(format::tests::arb_value(), 3),
            0..60,
        )
    }

    /// A writer that accepts at most `step` bytes per call.
    struct Dribble {
        out: Vec<u8>,
        step: usize,
    }
    impl Write for Dribble {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(self.step);
            self.out.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A reader that returns at most `step` bytes per call.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.step).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    fn compress(
        rows: &[Vec<Value>],
        options: &CodecOptions,
        step: usize,
    ) -> (Vec<u8>, ObjectDigest) {
        let mut enc = ObjectEncoder::new(
            Dribble {
                out: Vec::new(),
                step,
            },
            &header(),
            options,
        )
        .unwrap();
        for r in rows {
            enc.write_row(r).unwrap();
        }
        let (sink, digest) = enc.finish().unwrap();
        (sink.out, digest)
    }

    #[test]
    fn content_hash_arithmetic() {
        assert_eq!(ContentHash::EMPTY.hex(), "0".repeat(64));
        let row = [Value::Int(1)];
        let one = content_hash([&row[..]]);
        let mut expected = Vec::new();
        format::encode_values(&mut expected, &row);
        assert_eq!(
            one.hex(),
            sha256_hex(&expected),
            "one row: the sum is the row's digest"
        );
        assert_eq!(one.rows(), 1);
        let two = content_hash([&row[..], &row[..]]);
        assert_ne!(two, one, "a duplicate row counts");
        assert_eq!(two, one.combine(one));
        assert_eq!(ContentHash::from_hex(&two.hex(), 2), Some(two));
        assert_eq!(ContentHash::from_hex("xyz", 2), None);
        assert_eq!(
            ContentHash::from_hex(&"F".repeat(64), 2),
            None,
            "upper-case hex is not canonical"
        );
        // Carry across limbs and wrap-around modulo 2^256.
        let max = ContentHash::from_hex(&"f".repeat(64), 1).unwrap();
        let low1 = ContentHash::from_hex(&format!("{}1", "0".repeat(63)), 1).unwrap();
        assert_eq!(max.combine(low1).hex(), "0".repeat(64));
        let c =
            ContentHash::from_hex(&format!("{}{}", "0".repeat(48), "ffffffffffffffff"), 1).unwrap();
        assert_eq!(
            c.combine(low1).hex(),
            format!("{}1{}", "0".repeat(47), "0".repeat(16))
        );
    }

    #[test]
    fn digests_match_one_shot_hashes() {
        let rows: Vec<Vec<Value>> = (0..2000)
            .map(|i| {
                vec![
                    Value::Text(format!("spiffe://example.org/w/{i}")),
                    Value::Int(i),
                    Value::Null,
                ]
            })
            .collect();
        let (stored, digest) = compress(&rows, &CodecOptions::default(), 7);
        assert_eq!(digest.size, stored.len() as u64);
        assert_eq!(digest.sha256, sha256_hex(&stored));
        let raw = zstd::decode_all(&stored[..]).unwrap();
        assert_eq!(digest.raw_size, raw.len() as u64);
        assert_eq!(digest.raw_sha256, sha256_hex(&raw));
        assert_eq!(digest.content, content_hash(&rows));
        // The raw stream is exactly the format's encoding.
        let mut plain = format::Encoder::new(Vec::new(), &header()).unwrap();
        for r in &rows {
            plain.write_row(r).unwrap();
        }
        assert_eq!(raw, plain.finish().unwrap());
    }

    #[test]
    fn damaged_objects_are_refused() {
        let rows: Vec<Vec<Value>> = (0..500)
            .map(|i| vec![Value::Text("x".repeat(20)), Value::Int(i), Value::Null])
            .collect();
        let (stored, _) = compress(&rows, &CodecOptions::default(), usize::MAX);
        let read = |bytes: &[u8]| -> Result<ObjectDigest, SnapshotError> {
            let dec = ObjectDecoder::new(bytes, "snapshots/x/data/t.0.spkd.zst")?;
            dec.finish()
        };
        // Cut anywhere: an error naming the object.
        for cut in [0, 1, 4, stored.len() / 2, stored.len() - 1] {
            let err = read(&stored[..cut]).unwrap_err();
            assert!(
                err.to_string().contains("snapshots/x/data/t.0.spkd.zst"),
                "cut {cut}: {err}"
            );
        }
        // Flip one bit in the middle: zstd's checksum or the format catches it.
        let mut flipped = stored.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x10;
        let err = read(&flipped).unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Integrity, "{err}");
        // Not zstd at all.
        assert!(matches!(
            read(b"SPKD not compressed"),
            Err(SnapshotError::Unreadable { .. })
        ));
    }

    #[test]
    fn encrypted_objects_round_trip_and_hide_their_rows() {
        let (ids, recipients) = crate::store::crypt::test_keys();
        let marker = "spirekeep-marker-b3f1c0de";
        let rows: Vec<Vec<Value>> = (0..3000)
            .map(|i| {
                vec![
                    Value::Text(format!("{marker}-{i}")),
                    Value::Int(i),
                    Value::Null,
                ]
            })
            .collect();
        let mut enc = ObjectEncoder::sealed(
            Dribble {
                out: Vec::new(),
                step: 1000,
            },
            &header(),
            &CodecOptions::default(),
            Some(&recipients),
        )
        .unwrap();
        for r in &rows {
            enc.write_row(r).unwrap();
        }
        let (sink, digest) = enc.finish().unwrap();
        let stored = sink.out;
        assert_eq!(digest.encryption, Some(ObjectEncryption::Age));
        assert!(stored.starts_with(b"age-encryption.org/v1"));
        // The stored hash is of the ciphertext, so it is checkable without a key.
        assert_eq!(digest.size, stored.len() as u64);
        assert_eq!(digest.sha256, sha256_hex(&stored));
        assert!(
            !stored.windows(marker.len()).any(|w| w == marker.as_bytes()),
            "a row value is readable in the stored bytes"
        );
        // With the identity: the same digest (ciphertext and plaintext hashes).
        let mut dec = ObjectDecoder::open(
            Trickle {
                data: &stored,
                step: 777,
            },
            "obj",
            Some(&ids),
        )
        .unwrap();
        let mut back = Vec::new();
        while let Some(r) = dec.next_row().unwrap() {
            back.push(r);
        }
        assert_eq!(back, rows);
        let read = dec.finish().unwrap();
        assert_eq!(read, digest);
        check_digest(&digest.clone().into_data_object("obj".into()), &read).unwrap();
        // Another identity: refused as undecryptable, naming no secret.
        let (other, _) = crate::store::crypt::test_keys();
        let err = ObjectDecoder::open(&stored[..], "obj", Some(&other))
            .err()
            .unwrap();
        assert!(matches!(err, SnapshotError::Undecryptable { .. }), "{err}");
        assert!(!err.to_string().contains("AGE-SECRET-KEY"), "{err}");
        // Read as plaintext (no identity): not zstd, an integrity error.
        let err = ObjectDecoder::new(&stored[..], "obj").and_then(ObjectDecoder::finish);
        assert_eq!(err.unwrap_err().kind(), crate::error::ErrorKind::Integrity);
        // Cut, flipped or extended: an error or a different stored hash.
        let read = |bytes: &[u8]| ObjectDecoder::open(bytes, "obj", Some(&ids))?.finish();
        assert!(read(&stored[..stored.len() - 1]).is_err());
        let mut flipped = stored.clone();
        let at = flipped.len() / 2;
        flipped[at] ^= 0x04;
        assert_eq!(
            read(&flipped).unwrap_err().kind(),
            crate::error::ErrorKind::Integrity
        );
        let mut longer = stored.clone();
        longer.extend_from_slice(b"junk");
        match read(&longer) {
            Err(e) => assert_eq!(e.kind(), crate::error::ErrorKind::Integrity),
            Ok(d) => assert_ne!(d.sha256, digest.sha256, "appended bytes went unnoticed"),
        }
    }

    proptest! {
        #[test]
        fn compress_then_decompress_round_trips(rows in arb_rows(), step in 1usize..5000, level in 1i32..6) {
            let options = CodecOptions { level, workers: 0 };
            let (stored, digest) = compress(&rows, &options, step);
            let mut dec = ObjectDecoder::new(Trickle { data: &stored, step }, "obj").unwrap();
            prop_assert_eq!(dec.header(), &header());
            let mut back = Vec::new();
            while let Some(r) = dec.next_row().unwrap() {
                back.push(r);
            }
            let read_digest = dec.finish().unwrap();
            prop_assert_eq!(&back, &rows);
            prop_assert_eq!(read_digest, digest);
        }

        #[test]
        fn any_cut_or_flip_of_a_stored_object_is_an_error(rows in arb_rows(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let (stored, digest) = compress(&rows, &CodecOptions::default(), usize::MAX);
            let read = |bytes: &[u8]| -> Result<ObjectDigest, SnapshotError> { ObjectDecoder::new(bytes, "obj")?.finish() };
            let i = at.index(stored.len());
            prop_assert!(read(&stored[..i]).is_err(), "cut at {} of {} read cleanly", i, stored.len());
            // A flipped bit either fails to decode or changes the stored bytes' hash.
            let mut flipped = stored.clone();
            flipped[i] ^= 1 << bit;
            match read(&flipped) {
                Err(e) => prop_assert_eq!(e.kind(), crate::error::ErrorKind::Integrity),
                Ok(d) => prop_assert_ne!(d.sha256, digest.sha256),
            }
        }

        #[test]
        fn streaming_hash_equals_one_shot_hash(data in proptest::collection::vec(any::<u8>(), 0..20_000), step in 1usize..3000) {
            let mut w = HashWriter::new(Dribble { out: Vec::new(), step });
            let mut rest = &data[..];
            while !rest.is_empty() {
                let n = w.write(rest).unwrap();
                rest = &rest[n..];
            }
            let (_, hex, n) = w.into_parts();
            prop_assert_eq!(n, data.len() as u64);
            prop_assert_eq!(&hex, &sha256_hex(&data));
            let mut r = HashReader::new(Trickle { data: &data, step });
            io::copy(&mut r, &mut io::sink()).unwrap();
            let (_, hex2, n2) = r.into_parts();
            prop_assert_eq!(n2, data.len() as u64);
            prop_assert_eq!(hex2, hex);
        }

        #[test]
        fn content_hash_ignores_order(rows in arb_rows(), seed in any::<u64>()) {
            let mut shuffled = rows.clone();
            // A deterministic Fisher-Yates shuffle driven by `seed`.
            let mut s = seed | 1;
            for i in (1..shuffled.len()).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                let j = usize::try_from(s % (i as u64 + 1)).unwrap();
                shuffled.swap(i, j);
            }
            prop_assert_eq!(content_hash(&rows), content_hash(&shuffled));
            // Split anyhow: the parts combine to the whole.
            let cut = usize::try_from(seed % (rows.len() as u64 + 1)).unwrap();
            prop_assert_eq!(content_hash(&rows[..cut]).combine(content_hash(&rows[cut..])), content_hash(&rows));
        }

        #[test]
        fn content_hash_sees_any_change(rows in arb_rows().prop_filter("non-empty", |r| !r.is_empty()),
                                        at in any::<prop::sample::Index>(), col in 0usize..3,
                                        replacement in format::tests::arb_value()) {
            let i = at.index(rows.len());
            let mut before = Vec::new();
            format::encode_value(&mut before, &rows[i][col]);
            let mut after = Vec::new();
            format::encode_value(&mut after, &replacement);
            prop_assume!(before != after);
            let mut changed = rows.clone();
            changed[i][col] = replacement;
            prop_assert_ne!(content_hash(&rows), content_hash(&changed));
            // Removing a row changes it too.
            let mut fewer = rows.clone();
            fewer.remove(i);
            prop_assert_ne!(content_hash(&rows), content_hash(&fewer));
        }
    }
}
