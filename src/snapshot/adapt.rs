//! What a target engine cannot hold unchanged, found before a restore.
//!
//! Every row on its way into the target passes through an [`Adapter`] built
//! for that target table. The preflight runs it over the whole snapshot and
//! lists each change; the restore runs it again and writes the adapted rows, so
//! the values reaching the database are already representable and read back
//! exactly (spire-reference §10):
//!
//! - MySQL `DATETIME` has no fractional seconds (MariaDB truncates, MySQL 8
//!   rounds): sub-second timestamps are rounded to the nearest second, half
//!   away from zero. That is what SPIRE's API serves for them
//!   (`roundedInSecondsUnix` = Go's `t.Round(time.Second)`), and agents re-fetch
//!   an entry whose `created_at` changed, so rounding keeps every entry the same
//!   to SPIRE and its agents where truncating would change about half of them.
//! - SPIRE's MySQL tables are `utf8` (utf8mb3): four-byte characters are
//!   rejected; they become U+FFFD.
//! - `varchar(n)` holds n characters: longer text is cut to n.
//! - PostgreSQL `text` cannot hold NUL: NULs are removed. PostgreSQL keeps
//!   microseconds: nanoseconds are truncated (a note, no consent needed).
//! - Integers outside the target column's range, and values that collide in a
//!   MySQL unique index under `utf8_general_ci` (case-, accent- and
//!   trailing-space-insensitive), cannot be adapted: the restore refuses.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use serde::Serialize;
use time::OffsetDateTime;
use unicode_normalization::UnicodeNormalization;

use super::hash_runs::HashRuns;
use crate::datastore::{ColumnKind, Engine, Table, TimestampPrecision, Value, ValueLimits};

/// Why a value changes (or why a row cannot go in).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// Sub-second timestamp into MySQL `DATETIME`: rounded to the nearest second, as SPIRE's API rounds it.
    SubSecondTimestamp,
    /// Nanoseconds into PostgreSQL: truncated to the microsecond.
    SubMicrosecondTimestamp,
    /// A four-byte UTF-8 character into a MySQL `utf8` (utf8mb3) table: replaced by U+FFFD.
    FourByteUtf8,
    /// NUL in text into PostgreSQL: removed.
    NulInText,
    /// Text longer than the target `varchar(n)`: cut to n characters.
    TooLong,
    /// An integer outside the target column's range: cannot be restored.
    IntegerOutOfRange,
    /// Two rows equal under MySQL's `utf8_general_ci` in a unique index: cannot be restored.
    UniqueCollision,
}

impl ChangeKind {
    /// Whether the change needs the operator's explicit consent (`--accept-changes`).
    #[must_use]
    pub fn needs_consent(self) -> bool {
        !matches!(self, Self::SubMicrosecondTimestamp)
    }

    /// Whether no flag can make the row go in.
    #[must_use]
    pub fn is_blocking(self) -> bool {
        matches!(self, Self::IntegerOutOfRange | Self::UniqueCollision)
    }
}

/// One changed value (or one row that cannot go in).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    pub table: String,
    /// The row's primary key, rendered `col=value,...` (all columns without one).
    pub row: String,
    pub column: String,
    pub kind: ChangeKind,
    pub detail: String,
}

#[derive(Debug, Clone)]
struct ColumnRule {
    name: String,
    kind: ColumnKind,
    /// `varchar(n)`'s n.
    max_chars: Option<usize>,
    /// Allowed integer range.
    range: Option<(i128, i128)>,
}

/// Adapts rows of one table for one target engine.
#[derive(Debug)]
pub struct Adapter {
    /// What the target engine can hold (the only thing asked about it).
    limits: ValueLimits,
    table: String,
    key_positions: Vec<usize>,
    columns: Vec<ColumnRule>,
    /// Unique indexes that fold text (MySQL's), checked in two reads.
    unique: Vec<FoldedUnique>,
}

/// One unique index whose keys the target compares folded. The first read
/// keeps only each row's folded-key hash ([`HashRuns`]: at most 16 MiB in
/// memory, sorted runs on disk beyond that, not a hash map of keys); the
/// hashes seen twice, if any, are located by a second read of the table
/// ([`Adapter::locate`]), which remembers rows for those hashes only.
#[derive(Debug)]
struct FoldedUnique {
    name: String,
    positions: Vec<usize>,
    /// First read: every row's folded-key hash (taken by [`Adapter::end_first_read`]).
    hashes: Option<HashRuns>,
    /// Second read: the repeated hashes, and the first row found with each.
    repeated: HashMap<u64, Option<RowKey>>,
}

/// A row's key, without formatting it: most SPIRE tables are keyed by one
/// integer `id`, which needs no allocation per row.
#[derive(Debug, Clone)]
enum RowKey {
    Id(i64),
    Text(String),
}

impl Adapter {
    /// An adapter for rows of `source_table` going into `target_table`
    /// (the same columns, with the target engine's declared types).
    #[must_use]
    pub fn new(target: Engine, source_table: &Table, target_table: &Table) -> Self {
        Self::with_rows(target, source_table, target_table, 0)
    }

    /// [`Self::new`] for a table of about `rows` rows, so the unique-key check
    /// reserves its memory once instead of doubling it as rows come.
    #[must_use]
    pub fn with_rows(
        target: Engine,
        source_table: &Table,
        target_table: &Table,
        rows: u64,
    ) -> Self {
        let limits = target.value_limits();
        let columns = source_table
            .columns
            .iter()
            .map(|c| {
                let declared = target_table
                    .column(&c.name)
                    .map_or("", |t| t.declared_type.as_str())
                    .to_ascii_lowercase();
                ColumnRule {
                    name: c.name.clone(),
                    kind: c.kind,
                    max_chars: varchar_len(&declared),
                    range: integer_range(&limits, &declared),
                }
            })
            .collect();
        let pos = |name: &String| source_table.columns.iter().position(|c| &c.name == name);
        let key_positions = if source_table.primary_key.is_empty() {
            (0..source_table.columns.len()).collect()
        } else {
            source_table.primary_key.iter().filter_map(pos).collect()
        };
        let unique = if limits.unique_keys_fold_text {
            target_table
                .indexes
                .iter()
                .filter(|i| i.unique)
                .map(|i| FoldedUnique {
                    name: i.name.clone(),
                    positions: i.columns.iter().filter_map(pos).collect(),
                    hashes: Some(HashRuns::new(rows)),
                    repeated: HashMap::new(),
                })
                .collect()
        } else {
            Vec::new()
        };
        Self {
            limits,
            table: source_table.name.clone(),
            key_positions,
            columns,
            unique,
        }
    }

    /// Adapts one row in place and returns what changed. With `check_unique`,
    /// also notes the row's folded unique keys: after the table's last row,
    /// [`Self::end_first_read`] says whether any repeat, and a second read
    /// through [`Self::locate`] names the rows (the preflight does this; the
    /// restore itself need not).
    pub fn adapt(&mut self, row: &mut [Value], check_unique: bool) -> Vec<Change> {
        let mut changes = Vec::new();
        // Taken before any value changes; formatted only when needed.
        let key = self.row_key_of(row);
        for (value, rule) in row.iter_mut().zip(&self.columns) {
            if let Some((kind, detail)) = adapt_value(&self.limits, rule, value) {
                changes.push(Change {
                    table: self.table.clone(),
                    row: self.render(&key),
                    column: rule.name.clone(),
                    kind,
                    detail,
                });
            }
        }
        if check_unique {
            for u in &mut self.unique {
                if let Some(hashes) = &mut u.hashes {
                    hashes.push(folded_hash(row, &u.positions));
                }
            }
        }
        changes
    }

    /// Bytes the unique-key check holds now (the restore's memory bound
    /// depends on it: 8 bytes a row of the table being read, whatever its keys).
    #[cfg(test)]
    fn unique_check_bytes(&self) -> usize {
        self.unique
            .iter()
            .map(|u| {
                u.hashes.as_ref().map_or(0, HashRuns::memory_bytes)
                    + u.repeated.capacity() * std::mem::size_of::<(u64, Option<RowKey>)>()
            })
            .sum()
    }

    /// Ends the first read of the table: finds the folded keys that occur
    /// more than once and frees the rest. Returns whether there are any, and
    /// so whether the table must be read again through [`Self::locate`].
    ///
    /// # Errors
    /// The temporary files of a large table's hashes could not be written or read.
    pub fn end_first_read(&mut self) -> std::io::Result<bool> {
        let mut any = false;
        for u in &mut self.unique {
            if let Some(hashes) = u.hashes.take() {
                u.repeated = hashes.repeated()?.into_iter().map(|h| (h, None)).collect();
            }
            any |= !u.repeated.is_empty();
        }
        Ok(any)
    }

    /// The second read (after [`Self::end_first_read`] returned true), in
    /// the same row order: each row after the first with a repeated folded
    /// key is a collision with that first row. The row is adapted as
    /// [`Self::adapt`] would (without reporting it again) before its keys are
    /// folded.
    pub fn locate(&mut self, row: &mut [Value]) -> Vec<Change> {
        for (value, rule) in row.iter_mut().zip(&self.columns) {
            let _ = adapt_value(&self.limits, rule, value);
        }
        let mut changes = Vec::new();
        for i in 0..self.unique.len() {
            if self.unique[i].repeated.is_empty() {
                continue;
            }
            let folded = folded_hash(row, &self.unique[i].positions);
            let Some(first) = self.unique[i].repeated.get(&folded).cloned() else {
                continue;
            };
            let key = self.row_key_of(row);
            match first {
                Some(first) => changes.push(Change {
                    table: self.table.clone(),
                    row: self.render(&key),
                    column: self.unique[i].name.clone(),
                    kind: ChangeKind::UniqueCollision,
                    detail: format!(
                        "equal to row {} under MySQL's utf8_general_ci (case, accents and trailing spaces are ignored)",
                        self.render(&first)
                    ),
                }),
                None => {
                    self.unique[i].repeated.insert(folded, Some(key));
                }
            }
        }
        changes
    }

    fn row_key_of(&self, row: &[Value]) -> RowKey {
        if let [p] = self.key_positions.as_slice()
            && let Some(Value::Int(id)) = row.get(*p)
        {
            return RowKey::Id(*id);
        }
        RowKey::Text(self.row_key(row))
    }

    /// The key as [`Self::row_key`] writes it.
    fn render(&self, key: &RowKey) -> String {
        match key {
            RowKey::Id(id) => format!("{}={id}", self.columns[self.key_positions[0]].name),
            RowKey::Text(text) => text.clone(),
        }
    }

    fn row_key(&self, row: &[Value]) -> String {
        self.key_positions
            .iter()
            .map(|&p| format!("{}={}", self.columns[p].name, short(&row[p])))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Go's `t.Round(time.Second)`: to the nearest second, halves away from zero
/// (up, for every time after 1970). At the end of the representable range it
/// truncates instead of overflowing.
fn round_to_second(t: OffsetDateTime) -> OffsetDateTime {
    let whole = t.replace_nanosecond(0).unwrap_or(t);
    if t.nanosecond() >= 500_000_000 {
        whole.checked_add(time::Duration::SECOND).unwrap_or(whole)
    } else {
        whole
    }
}

fn adapt_value(
    limits: &ValueLimits,
    rule: &ColumnRule,
    v: &mut Value,
) -> Option<(ChangeKind, String)> {
    match v {
        Value::Timestamp(t) => match limits.timestamps {
            TimestampPrecision::Seconds if t.nanosecond() != 0 => {
                let before = *t;
                *t = round_to_second(*t);
                Some((
                    ChangeKind::SubSecondTimestamp,
                    format!("{} becomes {}", canonical(before), canonical(*t)),
                ))
            }
            TimestampPrecision::Microseconds if t.nanosecond() % 1000 != 0 => {
                let before = *t;
                *t = t
                    .replace_nanosecond(t.nanosecond() / 1000 * 1000)
                    .unwrap_or(*t);
                Some((
                    ChangeKind::SubMicrosecondTimestamp,
                    format!("{} becomes {}", canonical(before), canonical(*t)),
                ))
            }
            _ => None,
        },
        Value::Text(s) => {
            if !limits.text_holds_nul && s.contains('\0') {
                *s = s.replace('\0', "");
                return Some((ChangeKind::NulInText, "NUL characters removed".into()));
            }
            if !limits.text_holds_four_byte_utf8 && s.chars().any(|c| c.len_utf8() == 4) {
                let n = s.chars().filter(|c| c.len_utf8() == 4).count();
                *s = s
                    .chars()
                    .map(|c| if c.len_utf8() == 4 { '\u{FFFD}' } else { c })
                    .collect();
                return Some((
                    ChangeKind::FourByteUtf8,
                    format!("{n} four-byte character(s) replaced by U+FFFD"),
                ));
            }
            if let Some(max) = rule.max_chars {
                let len = s.chars().count();
                if len > max {
                    *s = s.chars().take(max).collect();
                    return Some((
                        ChangeKind::TooLong,
                        format!("{len} characters cut to {max}"),
                    ));
                }
            }
            None
        }
        Value::Int(i) => match rule.range {
            Some((lo, hi)) if !(lo..=hi).contains(&i128::from(*i)) => Some((
                ChangeKind::IntegerOutOfRange,
                format!("{i} is outside {lo}..={hi}"),
            )),
            _ => None,
        },
        _ => {
            let _ = rule.kind;
            None
        }
    }
}

fn canonical(t: OffsetDateTime) -> String {
    crate::datastore::timefmt::canonical(t)
}

fn varchar_len(declared: &str) -> Option<usize> {
    let rest = declared
        .strip_prefix("varchar(")
        .or_else(|| declared.strip_prefix("character varying("))?;
    rest.split(')').next()?.parse().ok()
}

fn integer_range(limits: &ValueLimits, declared: &str) -> Option<(i128, i128)> {
    if !limits.enforces_integer_widths {
        return None;
    }
    let unsigned = declared.contains("unsigned");
    let base = declared.split(['(', ' ']).next().unwrap_or("");
    let bits: u32 = match base {
        "tinyint" => 8,
        "smallint" => 16,
        "mediumint" => 24,
        "int" | "integer" | "serial" => 32,
        "bigint" | "bigserial" => 64,
        _ => return None,
    };
    if unsigned {
        Some((0, (1i128 << bits) - 1))
    } else {
        Some((-(1i128 << (bits - 1)), (1i128 << (bits - 1)) - 1))
    }
}

/// The value as `utf8_general_ci` compares it: case-folded, accents removed,
/// trailing spaces ignored (PAD SPACE). Non-text values compare as themselves.
/// The hash of a row's unique key as `utf8_general_ci` compares it.
fn folded_hash(row: &[Value], positions: &[usize]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for &p in positions {
        fold_general_ci(&row[p]).hash(&mut h);
    }
    h.finish()
}

fn fold_general_ci(v: &Value) -> String {
    match v {
        Value::Text(s) => s
            .trim_end_matches(' ')
            .nfd()
            .filter(|c| !('\u{0300}'..='\u{036F}').contains(c))
            .flat_map(char::to_lowercase)
            .map(|c| if c == 'ß' { 's' } else { c })
            .collect(),
        other => format!("{other:?}"),
    }
}

fn short(v: &Value) -> String {
    match v {
        Value::Text(s) if s.chars().count() > 40 => {
            format!("{:?}…", s.chars().take(40).collect::<String>())
        }
        Value::Text(s) => format!("{s:?}"),
        Value::Int(i) => i.to_string(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::{Column, Index};

    fn table(types: &[(&str, &str, ColumnKind)], unique: &[&str]) -> Table {
        Table {
            name: "t".into(),
            columns: types
                .iter()
                .map(|(n, ty, k)| Column {
                    name: (*n).into(),
                    declared_type: (*ty).into(),
                    kind: *k,
                    nullable: true,
                    auto_increment: false,
                })
                .collect(),
            primary_key: vec!["id".into()],
            indexes: if unique.is_empty() {
                vec![]
            } else {
                vec![Index {
                    name: "uix".into(),
                    columns: unique.iter().map(|s| (*s).to_string()).collect(),
                    unique: true,
                }]
            },
            create_sql: None,
        }
    }

    fn ts(nanos: u32) -> Value {
        Value::Timestamp(
            OffsetDateTime::from_unix_timestamp(1_700_000_000)
                .unwrap()
                .replace_nanosecond(nanos)
                .unwrap(),
        )
    }

    /// Regression (found against a real SPIRE 1.13.3): truncating into MySQL
    /// changed the `created_at` SPIRE serves (it rounds) for about half the
    /// entries of a SQLite datastore moved to MariaDB.
    #[test]
    fn mysql_rounds_sub_second_times_as_spire_serves_them() {
        let at = |secs: i64, nanos: u32| {
            OffsetDateTime::from_unix_timestamp(secs)
                .unwrap()
                .replace_nanosecond(nanos)
                .unwrap()
        };
        assert_eq!(round_to_second(at(100, 499_999_999)), at(100, 0));
        assert_eq!(round_to_second(at(100, 500_000_000)), at(101, 0));
        assert_eq!(round_to_second(at(100, 987_277_464)), at(101, 0));
        assert_eq!(round_to_second(at(100, 0)), at(100, 0));
        let last = time::PrimitiveDateTime::MAX.assume_utc();
        assert_eq!(round_to_second(last), last.replace_nanosecond(0).unwrap());
    }

    #[test]
    fn mysql_changes_are_listed_and_applied() {
        let src = table(
            &[
                ("id", "integer", ColumnKind::Integer),
                ("v", "varchar(255)", ColumnKind::Text),
                ("at", "datetime", ColumnKind::Timestamp),
            ],
            &["v"],
        );
        let dst = table(
            &[
                ("id", "int unsigned", ColumnKind::Integer),
                ("v", "varchar(5)", ColumnKind::Text),
                ("at", "datetime", ColumnKind::Timestamp),
            ],
            &["v"],
        );
        let mut a = Adapter::new(Engine::Mysql, &src, &dst);
        let mut row = vec![Value::Int(1), Value::Text("a😀".into()), ts(500_000_000)];
        let changes = a.adapt(&mut row, true);
        let kinds: Vec<ChangeKind> = changes.iter().map(|c| c.kind).collect();
        assert_eq!(
            kinds,
            vec![ChangeKind::FourByteUtf8, ChangeKind::SubSecondTimestamp]
        );
        assert_eq!(row[1], Value::Text("a\u{FFFD}".into()));
        // Rounded as SPIRE's API rounds created_at: .5 goes up.
        assert_eq!(
            row[2],
            Value::Timestamp(OffsetDateTime::from_unix_timestamp(1_700_000_001).unwrap())
        );
        assert_eq!(changes[0].row, "id=1");

        let mut long = vec![Value::Int(2), Value::Text("abcdefg".into()), ts(0)];
        assert_eq!(a.adapt(&mut long, true)[0].kind, ChangeKind::TooLong);
        assert_eq!(long[1], Value::Text("abcde".into()));

        let mut neg = vec![Value::Int(-1), Value::Text("zz".into()), Value::Null];
        assert!(
            a.adapt(&mut neg, true)
                .iter()
                .any(|c| c.kind == ChangeKind::IntegerOutOfRange && c.kind.is_blocking())
        );
    }

    #[test]
    fn general_ci_collisions_are_found() {
        let src = table(
            &[
                ("id", "integer", ColumnKind::Integer),
                ("v", "varchar(255)", ColumnKind::Text),
            ],
            &["v"],
        );
        let rows = || {
            vec![
                vec![Value::Int(1), Value::Text("Café".into())],
                vec![Value::Int(3), Value::Text("other".into())],
                vec![Value::Int(2), Value::Text("cafe  ".into())],
            ]
        };
        let mut a = Adapter::with_rows(Engine::Mysql, &src, &src, 3);
        for mut row in rows() {
            assert!(a.adapt(&mut row, true).is_empty());
        }
        assert!(
            a.end_first_read().unwrap(),
            "a repeated folded key needs the second read"
        );
        let c: Vec<Change> = rows().iter_mut().flat_map(|r| a.locate(r)).collect();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].kind, ChangeKind::UniqueCollision);
        assert!(c[0].detail.contains("row id=1 "), "{}", c[0].detail);
        assert_eq!(c[0].row, "id=2");
        // PostgreSQL and SQLite compare exactly.
        let mut p = Adapter::new(Engine::Postgres, &src, &src);
        for mut row in rows() {
            assert!(p.adapt(&mut row, true).is_empty());
        }
        assert!(!p.end_first_read().unwrap());
        // Distinct keys need no second read on MySQL either.
        let mut distinct = Adapter::new(Engine::Mysql, &src, &src);
        for mut row in rows().into_iter().take(2) {
            assert!(distinct.adapt(&mut row, true).is_empty());
        }
        assert!(!distinct.end_first_read().unwrap());
    }

    /// Regression: the check kept a hash map entry (key and first row) per
    /// row, 167 MiB of peak RSS for a 1M-entry MySQL restore (3.2M selectors).
    /// Now 8 bytes a row up to a run, and never more than a run.
    #[test]
    fn the_unique_check_holds_eight_bytes_a_row_up_to_a_run() {
        let src = table(
            &[
                ("id", "integer", ColumnKind::Integer),
                ("v", "varchar(255)", ColumnKind::Text),
            ],
            &["v"],
        );
        let rows = 100_000u32;
        let mut a = Adapter::with_rows(Engine::Mysql, &src, &src, u64::from(rows));
        for i in 0..rows {
            let mut row = [
                Value::Int(i64::from(i)),
                Value::Text(format!("selector value {i} with some length to it")),
            ];
            a.adapt(&mut row, true);
        }
        assert_eq!(a.unique_check_bytes(), 8 * rows as usize);
        assert!(!a.end_first_read().unwrap());
        assert_eq!(a.unique_check_bytes(), 0, "freed once the table is read");
        // A table larger than a run never holds more than one in memory.
        let huge = 10 * crate::snapshot::hash_runs::RUN_HASHES as u64;
        let b = Adapter::with_rows(Engine::Mysql, &src, &src, huge);
        assert_eq!(
            b.unique_check_bytes(),
            8 * crate::snapshot::hash_runs::RUN_HASHES
        );
    }

    #[test]
    fn postgres_drops_nul_and_nanoseconds() {
        let src = table(
            &[
                ("id", "integer", ColumnKind::Integer),
                ("v", "varchar(255)", ColumnKind::Text),
                ("at", "datetime", ColumnKind::Timestamp),
            ],
            &[],
        );
        let dst = table(
            &[
                ("id", "integer", ColumnKind::Integer),
                ("v", "text", ColumnKind::Text),
                ("at", "timestamp with time zone", ColumnKind::Timestamp),
            ],
            &[],
        );
        let mut a = Adapter::new(Engine::Postgres, &src, &dst);
        let mut row = vec![
            Value::Int(i64::from(i32::MAX)),
            Value::Text("a\0b".into()),
            ts(123_456_789),
        ];
        let changes = a.adapt(&mut row, true);
        assert_eq!(
            changes.iter().map(|c| c.kind).collect::<Vec<_>>(),
            vec![ChangeKind::NulInText, ChangeKind::SubMicrosecondTimestamp]
        );
        assert!(!ChangeKind::SubMicrosecondTimestamp.needs_consent());
        assert_eq!(row[2], ts(123_456_000));
        let mut big = vec![
            Value::Int(i64::from(i32::MAX) + 1),
            Value::Null,
            Value::Null,
        ];
        assert_eq!(
            a.adapt(&mut big, false)[0].kind,
            ChangeKind::IntegerOutOfRange
        );
    }
}
