//! How one logical value is written on each engine, the way SPIRE's Go drivers
//! would have written it (spire-reference §10).
//!
//! The generator draws every value once, independently of the engine, and only
//! the rendering here differs: SQLite gets go-sqlite3's datetime text with the
//! server's local offset, MySQL gets `0000-00-00 00:00:00` for Go's zero time
//! and (by default) no 4-byte UTF-8, PostgreSQL gets native timestamps. So the
//! same seed gives the same rows on every engine, up to those documented
//! engine differences.

use std::fmt::Write as _;

use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

use super::super::{Engine, Value};

/// A `time.Time` as SPIRE would have stored it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stamp {
    /// A real instant. `offset_minutes` is the SPIRE server's local UTC offset
    /// when it wrote the row; only SQLite's text keeps it.
    At {
        utc: OffsetDateTime,
        offset_minutes: i16,
    },
    /// Go's zero `time.Time` (0001-01-01 00:00:00 UTC).
    GoZero,
}

/// Go's zero time.
pub(crate) fn go_zero() -> OffsetDateTime {
    PrimitiveDateTime::new(
        Date::from_calendar_date(1, Month::January, 1).expect("0001-01-01 is a valid date"),
        Time::MIDNIGHT,
    )
    .assume_utc()
}

impl Stamp {
    /// The instant in UTC (Go's zero time for [`Stamp::GoZero`]).
    pub(crate) fn utc(self) -> OffsetDateTime {
        match self {
            Self::At { utc, .. } => utc,
            Self::GoZero => go_zero(),
        }
    }

    /// The value to insert on `engine`.
    pub(crate) fn render(self, engine: Engine) -> Value {
        match (engine, self) {
            (
                Engine::Sqlite,
                Self::At {
                    utc,
                    offset_minutes,
                },
            ) => Value::Text(go_sqlite3_text(utc, offset_minutes)),
            // go-sqlite3 formats the zero time like any other, in UTC.
            (Engine::Sqlite, Self::GoZero) => Value::Text(go_sqlite3_text(go_zero(), 0)),
            // go-sql-driver writes a zero time.Time as the zero DATETIME.
            (Engine::Mysql, Self::GoZero) => Value::Text(MYSQL_ZERO_DATETIME.to_string()),
            (Engine::Postgres | Engine::Mysql, s) => Value::Timestamp(s.utc()),
        }
    }
}

/// What go-sql-driver writes for Go's zero `time.Time`.
pub const MYSQL_ZERO_DATETIME: &str = "0000-00-00 00:00:00";

/// go-sqlite3's layout `2006-01-02 15:04:05.999999999-07:00`: the time in the
/// given offset, trailing fraction zeros trimmed (no dot at all for whole
/// seconds), and the offset as `±hh:mm` (`+00:00` for UTC, never `Z`).
///
/// # Panics
/// When `offset_minutes` is outside ±25:59 (the generator never asks for that).
#[must_use]
pub fn go_sqlite3_text(utc: OffsetDateTime, offset_minutes: i16) -> String {
    let offset = UtcOffset::from_whole_seconds(i32::from(offset_minutes) * 60)
        .expect("offset within ±26 hours");
    let t = utc.to_offset(offset);
    let d = t.date();
    let mut s = String::with_capacity(36);
    let _ = write!(
        s,
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        d.year(),
        u8::from(d.month()),
        d.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    let nanos = t.nanosecond();
    if nanos != 0 {
        let digits = format!("{nanos:09}");
        s.push('.');
        s.push_str(digits.trim_end_matches('0'));
    }
    let sign = if offset_minutes < 0 { '-' } else { '+' };
    let abs = offset_minutes.unsigned_abs();
    let _ = write!(s, "{sign}{:02}:{:02}", abs / 60, abs % 60);
    s
}

/// A text value. Without `four_byte`, every character outside the Basic
/// Multilingual Plane (4 bytes in UTF-8, which SPIRE's utf8mb3 MySQL tables
/// reject) becomes U+FFFD, which is 3 bytes and keeps the string's length in
/// characters.
pub(crate) fn text(s: &str, four_byte: bool) -> Value {
    if four_byte || s.chars().all(|c| u32::from(c) <= 0xFFFF) {
        Value::Text(s.to_string())
    } else {
        Value::Text(
            s.chars()
                .map(|c| {
                    if u32::from(c) <= 0xFFFF {
                        c
                    } else {
                        '\u{FFFD}'
                    }
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn go_sqlite3_layout_trims_zeros_and_keeps_the_offset() {
        let t = datetime!(2023-08-29 16:15:25.103258 UTC);
        assert_eq!(go_sqlite3_text(t, -180), "2023-08-29 13:15:25.103258-03:00");
        assert_eq!(go_sqlite3_text(t, 0), "2023-08-29 16:15:25.103258+00:00");
        assert_eq!(go_sqlite3_text(t, 330), "2023-08-29 21:45:25.103258+05:30");
        let whole = datetime!(2026-01-02 03:04:05 UTC);
        assert_eq!(go_sqlite3_text(whole, 0), "2026-01-02 03:04:05+00:00");
        let tenth = datetime!(2026-01-02 03:04:05.1 UTC);
        assert_eq!(go_sqlite3_text(tenth, -420), "2026-01-01 20:04:05.1-07:00");
        let nanos = datetime!(2026-01-02 03:04:05.123456789 UTC);
        assert_eq!(
            go_sqlite3_text(nanos, 0),
            "2026-01-02 03:04:05.123456789+00:00"
        );
        assert_eq!(go_sqlite3_text(go_zero(), 0), "0001-01-01 00:00:00+00:00");
    }

    #[test]
    fn go_sqlite3_text_parses_back_to_the_same_instant() {
        let t = datetime!(2026-02-18 13:42:12.139101 UTC);
        for off in [-180, 0, 330, 545, -420, 840] {
            let parsed = crate::datastore::timefmt::parse_sqlite_datetime(&go_sqlite3_text(t, off));
            assert_eq!(parsed, Some(t), "offset {off}");
        }
    }

    #[test]
    fn stamps_render_per_engine() {
        let t = datetime!(2026-02-18 13:42:12.5 UTC);
        let s = Stamp::At {
            utc: t,
            offset_minutes: -180,
        };
        assert_eq!(
            s.render(Engine::Sqlite),
            Value::Text("2026-02-18 10:42:12.5-03:00".into())
        );
        assert_eq!(s.render(Engine::Postgres), Value::Timestamp(t));
        assert_eq!(s.render(Engine::Mysql), Value::Timestamp(t));
        assert_eq!(
            Stamp::GoZero.render(Engine::Mysql),
            Value::Text("0000-00-00 00:00:00".into())
        );
        assert_eq!(
            Stamp::GoZero.render(Engine::Postgres),
            Value::Timestamp(go_zero())
        );
        assert_eq!(
            Stamp::GoZero.render(Engine::Sqlite),
            Value::Text("0001-01-01 00:00:00+00:00".into())
        );
    }

    #[test]
    fn four_byte_characters_are_replaced_only_when_asked() {
        assert_eq!(text("a😀é中", true), Value::Text("a😀é中".into()));
        assert_eq!(text("a😀é中", false), Value::Text("a\u{FFFD}é中".into()));
        let Value::Text(s) = text("𝄞🦀", false) else {
            panic!("not text")
        };
        assert!(s.chars().all(|c| c.len_utf8() <= 3));
        assert_eq!(s.chars().count(), 2);
    }
}
