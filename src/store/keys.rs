//! The repository's key layout, in one place.
//!
//! Every key is relative to the repository root (the `s3://bucket/prefix`
//! part is applied by [`super::Repository`]):
//!
//! ```text
//! snapshots/<snapshot-id>/manifest.json          written last, create-only: the snapshot exists iff this does
//! snapshots/<snapshot-id>/data/<table>.<n>.spkd.zst   data objects (zstd-compressed SPKD row streams)
//! snapshots/<snapshot-id>/server/<nnnnn>[.age]   SPIRE server files (snapshot::server_files)
//! verifications/<snapshot-id>/<time>-<kind>.json one record per verify run, create-only
//! locks/repository.lock                          the repository lease (conditional puts)
//! pins/<snapshot-id>/<holder>.json               a pin: prune keeps the snapshot while any pin exists
//! restores/<snapshot-id>/<time>.json             one record per restore (target, preflight changes), create-only
//! journal/<plan-id>.json                         the staged-upgrade journal, mirrored from local disk
//! ```
//!
//! # Why data objects live under their snapshot, not under their hash
//!
//! A content-addressed layout (`data/<sha256>`, as restic does for chunks)
//! pays off when objects repeat between snapshots. spirekeep's data objects are
//! whole compressed tables of a live SPIRE datastore: the large tables
//! (`registered_entries`, `attested_node_entries`, `bundles`, the event tables)
//! change between any two backups, so identical objects would be rare and
//! small. Content addressing would cost:
//! - an upload under a temporary key followed by a copy, because the hash is
//!   only known once the stream has ended (S3 `CopyObject` is also limited to
//!   5 GB per request);
//! - reference counting across manifests before anything can be deleted, and a
//!   prune that must hold the lock against concurrent backups that may be about
//!   to reuse an object.
//!
//! Per-snapshot keys keep deletion trivial and safe (delete the manifest, then
//! the snapshot's prefix) and keep a snapshot self-contained for copying.
//! Integrity does not depend on the key: every object's SHA-256 is in the
//! manifest, which is written last with a create-only put.
//!
//! # Table names in keys
//!
//! A table name becomes one key segment through [`table_segment`]: `[a-z0-9_]`
//! are kept and every other byte is written as `-xx` (lower-case hex). The
//! mapping is injective (so two tables never share a key) and keeps SPIRE's
//! names readable (`registered_entries`). The exact table name is in the
//! object's header and the manifest; the key is only a place.

use std::fmt;
use std::str::FromStr;

use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

/// Top-level folder of snapshots.
pub const SNAPSHOTS: &str = "snapshots/";
/// Top-level folder of verification records.
pub const VERIFICATIONS: &str = "verifications/";
/// Top-level folder of plan journals.
pub const JOURNAL: &str = "journal/";
/// Top-level folder of restore records.
pub const RESTORES: &str = "restores/";
/// Top-level folder of pins.
pub const PINS: &str = "pins/";
/// The repository lease object.
pub const REPOSITORY_LOCK: &str = "locks/repository.lock";
/// Prefix of the shared (reader) leases: one object per reader, named after
/// its holder id (see `store::lock`).
pub const READER_LEASES: &str = "locks/readers/";
/// File name of a snapshot's manifest inside its folder.
pub const MANIFEST_FILE: &str = "manifest.json";

/// An invalid identifier or key part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} is not valid: {why}")]
pub struct KeyError {
    pub what: &'static str,
    pub value: String,
    pub why: &'static str,
}

/// A snapshot identifier: `YYYYMMDDTHHMMSSZ-xxxxxx` (UTC start time, then six
/// lower-case hex digits). Identifiers sort by time as plain strings, which is
/// also how object stores list them, so `latest` is the last one listed. The
/// first three suffix digits are the start time's fraction of a second in
/// 1/4096ths and the last three are random, so two snapshots started within
/// one second still sort in start order. (Identifiers written before that
/// rule have six random digits; they stay valid.) Serialized as that string,
/// and validated when deserialized.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct SnapshotId(String);

impl TryFrom<String> for SnapshotId {
    type Error = KeyError;
    fn try_from(s: String) -> Result<Self, KeyError> {
        Self::parse(&s)
    }
}

impl From<SnapshotId> for String {
    fn from(id: SnapshotId) -> Self {
        id.0
    }
}

impl SnapshotId {
    /// A new identifier for a snapshot started at `at`.
    #[must_use]
    pub fn new(at: OffsetDateTime) -> Self {
        // 12 bits of the fraction of a second (~244 µs steps), then 12 random bits.
        let fraction = u16::try_from((u64::from(at.nanosecond()) << 12) / 1_000_000_000)
            .expect("a fraction of a second in 1/4096ths is below 4096");
        let random = rand::random::<u16>() & 0x0fff;
        let [hi, lo] = ((fraction << 4) | (random >> 8)).to_be_bytes();
        #[allow(clippy::cast_possible_truncation)] // the low 8 random bits
        let last = random as u8;
        Self::with_suffix(at, [hi, lo, last])
    }

    /// The identifier for `at` with a chosen suffix (tests, fixtures).
    #[must_use]
    pub fn with_suffix(at: OffsetDateTime, suffix: [u8; 3]) -> Self {
        let t = at.to_offset(UtcOffset::UTC);
        Self(format!(
            "{}-{:02x}{:02x}{:02x}",
            compact_time(t),
            suffix[0],
            suffix[1],
            suffix[2]
        ))
    }

    /// Parses and validates an identifier.
    ///
    /// # Errors
    /// Anything but `YYYYMMDDTHHMMSSZ-xxxxxx` with a real date and time.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let err = |why| KeyError {
            what: "snapshot id",
            value: s.to_owned(),
            why,
        };
        let b = s.as_bytes();
        if b.len() != 23 || b[16] != b'-' {
            return Err(err("expected YYYYMMDDTHHMMSSZ-xxxxxx"));
        }
        if !b[17..]
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
        {
            return Err(err("the suffix must be six lower-case hex digits"));
        }
        parse_compact_time(&s[..16]).ok_or_else(|| err("the time part is not a valid UTC time"))?;
        Ok(Self(s.to_owned()))
    }

    /// When the snapshot started (to the second).
    #[must_use]
    pub fn time(&self) -> OffsetDateTime {
        parse_compact_time(&self.0[..16]).expect("validated on construction")
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for SnapshotId {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        Self::parse(s)
    }
}

/// `snapshots/<id>/`: everything a snapshot owns is under this prefix.
#[must_use]
pub fn snapshot_prefix(id: &SnapshotId) -> String {
    format!("{SNAPSHOTS}{id}/")
}

/// `snapshots/<id>/manifest.json`.
#[must_use]
pub fn manifest(id: &SnapshotId) -> String {
    format!("{SNAPSHOTS}{id}/{MANIFEST_FILE}")
}

/// `snapshots/<id>/data/`: the prefix every data object of the snapshot must have.
#[must_use]
pub fn data_prefix(id: &SnapshotId) -> String {
    format!("{SNAPSHOTS}{id}/data/")
}

/// `snapshots/<id>/data/<table>.<part>.spkd.zst`: the `part`-th data object of
/// `table` (a table may be split over several objects; most have part 0).
#[must_use]
pub fn data_object(id: &SnapshotId, table: &str, part: u32) -> String {
    format!(
        "{}{}.{part}.spkd.zst",
        data_prefix(id),
        table_segment(table)
    )
}

/// The key of an encrypted data object: [`data_object`] with `.age` after
/// it, so the key says how to read the bytes (`age -d`, then `zstd -d`).
#[must_use]
pub fn encrypted_data_object(id: &SnapshotId, table: &str, part: u32) -> String {
    format!("{}.age", data_object(id, table, part))
}

/// The snapshot a manifest key belongs to: `Some(id)` for
/// `snapshots/<id>/manifest.json`, `None` for any other key. Used to list
/// snapshots: a snapshot exists exactly when its manifest does.
#[must_use]
pub fn snapshot_of_manifest(key: &str) -> Option<SnapshotId> {
    let rest = key.strip_prefix(SNAPSHOTS)?;
    let (id, file) = rest.split_once('/')?;
    if file != MANIFEST_FILE {
        return None;
    }
    SnapshotId::parse(id).ok()
}

/// What a verification checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifyKind {
    /// Every object re-read and every hash checked.
    Shallow,
    /// Restored into a scratch datastore and compared with the manifest.
    Deep,
}

impl VerifyKind {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Shallow => "shallow",
            Self::Deep => "deep",
        }
    }
}

/// `verifications/<id>/`: all verification records of one snapshot.
#[must_use]
pub fn verifications_prefix(id: &SnapshotId) -> String {
    format!("{VERIFICATIONS}{id}/")
}

/// `verifications/<id>/<YYYYMMDDTHHMMSS.mmmZ>-<kind>.json`. Keys of one
/// snapshot sort by time.
#[must_use]
pub fn verification(id: &SnapshotId, at: OffsetDateTime, kind: VerifyKind) -> String {
    let t = at.to_offset(UtcOffset::UTC);
    let stamp = compact_time(t);
    // Insert milliseconds before the trailing Z.
    let (secs, _) = stamp.split_at(15);
    format!(
        "{}{secs}.{:03}Z-{}.json",
        verifications_prefix(id),
        t.millisecond(),
        kind.as_str()
    )
}

/// `restores/<id>/`: the records of every restore of one snapshot.
#[must_use]
pub fn restores_prefix(id: &SnapshotId) -> String {
    format!("{RESTORES}{id}/")
}

/// `restores/<id>/<YYYYMMDDTHHMMSS.mmmZ>.json`: the record of one restore of
/// snapshot `id` (where it went, and every value the preflight changed).
/// Create-only, like verification records; prune leaves them as an audit trail.
#[must_use]
pub fn restore_record(id: &SnapshotId, at: OffsetDateTime) -> String {
    let t = at.to_offset(UtcOffset::UTC);
    let stamp = compact_time(t);
    let (secs, _) = stamp.split_at(15);
    format!("{}{secs}.{:03}Z.json", restores_prefix(id), t.millisecond())
}

/// `pins/<id>/`: every pin of one snapshot.
#[must_use]
pub fn pins_prefix(id: &SnapshotId) -> String {
    format!("{PINS}{id}/")
}

/// `pins/<id>/<holder>.json`: the pin `holder` (a plan id, `operator`, ...)
/// holds on snapshot `id`.
///
/// # Errors
/// A holder that is not a valid name (same rules as a plan id: see [`journal`]).
pub fn pin(id: &SnapshotId, holder: &str) -> Result<String, KeyError> {
    check_name("pin holder", holder)?;
    Ok(format!("{}{holder}.json", pins_prefix(id)))
}

/// The snapshot and holder of a pin key, or `None` for any other key.
#[must_use]
pub fn pin_of_key(key: &str) -> Option<(SnapshotId, String)> {
    let rest = key.strip_prefix(PINS)?;
    let (id, file) = rest.split_once('/')?;
    let holder = file.strip_suffix(".json")?;
    check_name("pin holder", holder).ok()?;
    Some((SnapshotId::parse(id).ok()?, holder.to_owned()))
}

fn check_name(what: &'static str, name: &str) -> Result<(), KeyError> {
    let err = |why| KeyError {
        what,
        value: name.to_owned(),
        why,
    };
    if name.is_empty() || name.len() > 128 {
        return Err(err("must be 1 to 128 characters"));
    }
    if name.starts_with('.') {
        return Err(err("must not start with a dot"));
    }
    if !name
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
    {
        return Err(err("may hold only letters, digits, '.', '_' and '-'"));
    }
    Ok(())
}

/// `journal/<plan-id>.json`.
///
/// # Errors
/// A plan id that is empty, longer than 128 bytes, or holds anything but
/// `[A-Za-z0-9._-]` (or starts with a dot), so it can never escape its folder.
pub fn journal(plan_id: &str) -> Result<String, KeyError> {
    let err = |why| KeyError {
        what: "plan id",
        value: plan_id.to_owned(),
        why,
    };
    if plan_id.is_empty() || plan_id.len() > 128 {
        return Err(err("must be 1 to 128 characters"));
    }
    if plan_id.starts_with('.') {
        return Err(err("must not start with a dot"));
    }
    if !plan_id
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
    {
        return Err(err("may hold only letters, digits, '.', '_' and '-'"));
    }
    Ok(format!("{JOURNAL}{plan_id}.json"))
}

/// A table name as one key segment: `[a-z0-9_]` kept, every other byte as
/// `-xx` (lower-case hex of the UTF-8 byte). Injective, and never empty.
#[must_use]
pub fn table_segment(table: &str) -> String {
    if table.is_empty() {
        return "-".to_owned();
    }
    let mut out = String::with_capacity(table.len());
    for b in table.bytes() {
        if b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' {
            out.push(char::from(b));
        } else {
            out.push('-');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn compact_time(t: OffsetDateTime) -> String {
    let d = t.date();
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        d.year(),
        u8::from(d.month()),
        d.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn parse_compact_time(s: &str) -> Option<OffsetDateTime> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = s.get(r)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let year = i32::try_from(digits(0..4)?).ok()?;
    let month = Month::try_from(u8::try_from(digits(4..6)?).ok()?).ok()?;
    let day = u8::try_from(digits(6..8)?).ok()?;
    let hour = u8::try_from(digits(9..11)?).ok()?;
    let minute = u8::try_from(digits(11..13)?).ok()?;
    let second = u8::try_from(digits(13..15)?).ok()?;
    let date = Date::from_calendar_date(year, month, day).ok()?;
    let time = Time::from_hms(hour, minute, second).ok()?;
    Some(PrimitiveDateTime::new(date, time).assume_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn snapshot_ids_are_time_sortable_and_round_trip() {
        let a = SnapshotId::with_suffix(datetime!(2026-11-28 09:30:00 UTC), [0xab, 0xcd, 0xef]);
        assert_eq!(a.as_str(), "20261128T093000Z-abcdef");
        assert_eq!(SnapshotId::parse(a.as_str()).unwrap(), a);
        assert_eq!(a.time(), datetime!(2026-11-28 09:30:00 UTC));
        // A non-UTC start time is written in UTC.
        let b = SnapshotId::with_suffix(datetime!(2026-11-28 10:30:01 +01:00), [0, 0, 1]);
        assert_eq!(b.as_str(), "20261128T093001Z-000001");
        assert!(a < b);
        let later = SnapshotId::new(datetime!(2027-01-01 00:00:00 UTC));
        assert!(b < later);
        assert_eq!(later.as_str().len(), 23);
    }

    /// Regression: the suffix was six random digits, so two snapshots started
    /// in one second sorted at random, and `latest` (and the metrics' newest
    /// snapshot) could name the older one.
    #[test]
    fn snapshots_started_within_one_second_sort_in_start_order() {
        let second = datetime!(2026-12-06 23:30:29 UTC);
        let ids: Vec<SnapshotId> = (0..200)
            .map(|i| SnapshotId::new(second + time::Duration::microseconds(i * 4_900)))
            .collect();
        for pair in ids.windows(2) {
            assert!(pair[0] < pair[1], "{} sorts after {}", pair[0], pair[1]);
            assert_eq!(pair[1].time(), second);
        }
        assert!(ids[0].as_str().starts_with("20261206T233029Z-000"));
        assert!(ids[199].as_str().starts_with("20261206T233029Z-f9a"));
        let next_second = SnapshotId::new(second + time::Duration::seconds(1));
        assert!(ids[199] < next_second);
        assert_eq!(
            SnapshotId::parse(next_second.as_str()).unwrap(),
            next_second
        );
    }

    #[test]
    fn bad_snapshot_ids_are_refused() {
        for bad in [
            "",
            "20261128T093000Z",
            "20261128T093000Z-ABCDEF",
            "20261128T093000Z-abcdeg",
            "20261328T093000Z-abcdef",
            "20261128T253000Z-abcdef",
            "20261128X093000Z-abcdef",
            "../../../etc/passw-abcdef",
            "2026112+T093000Z-abcdef",
        ] {
            assert!(SnapshotId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn layout() {
        let id = SnapshotId::parse("20261128T093000Z-0a1b2c").unwrap();
        assert_eq!(
            manifest(&id),
            "snapshots/20261128T093000Z-0a1b2c/manifest.json"
        );
        assert_eq!(
            data_object(&id, "registered_entries", 0),
            "snapshots/20261128T093000Z-0a1b2c/data/registered_entries.0.spkd.zst"
        );
        assert!(data_object(&id, "bundles", 3).starts_with(&data_prefix(&id)));
        assert!(manifest(&id).starts_with(&snapshot_prefix(&id)));
        assert_eq!(snapshot_of_manifest(&manifest(&id)), Some(id.clone()));
        assert_eq!(snapshot_of_manifest(&data_object(&id, "x", 0)), None);
        assert_eq!(snapshot_of_manifest("snapshots/junk/manifest.json"), None);
        assert_eq!(
            verification(
                &id,
                datetime!(2026-11-28 10:00:05.123456 UTC),
                VerifyKind::Deep
            ),
            "verifications/20261128T093000Z-0a1b2c/20261128T100005.123Z-deep.json"
        );
        assert_eq!(
            journal("upgrade-1.13").unwrap(),
            "journal/upgrade-1.13.json"
        );
        assert!(journal("../x").is_err());
        assert!(journal("a/b").is_err());
        assert!(journal("").is_err());
        assert_eq!(REPOSITORY_LOCK, "locks/repository.lock");
        let key = pin(&id, "upgrade-1.13").unwrap();
        assert_eq!(key, "pins/20261128T093000Z-0a1b2c/upgrade-1.13.json");
        assert_eq!(pin_of_key(&key), Some((id.clone(), "upgrade-1.13".into())));
        assert!(pin(&id, "../x").is_err());
        assert_eq!(pin_of_key("pins/junk/a.json"), None);
    }

    #[test]
    fn table_segments_are_readable_and_injective() {
        assert_eq!(
            table_segment("attested_node_entries"),
            "attested_node_entries"
        );
        assert_eq!(table_segment("Foo"), "-46oo");
        assert_eq!(table_segment("a-b"), "a-2db");
        assert_eq!(table_segment("a/b"), "a-2fb");
        assert_eq!(table_segment("é"), "-c3-a9");
        assert_eq!(table_segment(""), "-");
        let names = ["a_b", "a b", "a-b", "A_b", "a-2db", "", "-", "a.b"];
        let segs: std::collections::HashSet<_> = names.iter().map(|n| table_segment(n)).collect();
        assert_eq!(segs.len(), names.len());
        for n in names {
            assert!(!table_segment(n).contains('/'));
            assert!(!table_segment(n).starts_with('.'));
        }
    }
}
