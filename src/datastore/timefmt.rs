//! Timestamp text as SPIRE's drivers write it.
//!
//! go-sqlite3 stores `time.Time` as text in the layout
//! `2006-01-02 15:04:05.999999999-07:00` (trailing fraction zeros trimmed, the
//! server's local offset), and reads back several looser layouts. MySQL's
//! `DATETIME` has no zone; go-sql-driver reads it as UTC, and writes Go's zero
//! time as `0000-00-00 00:00:00` (spire-reference §10).

use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

/// Go's zero `time.Time`: 0001-01-01 00:00:00 UTC.
#[must_use]
pub fn go_zero_time() -> OffsetDateTime {
    PrimitiveDateTime::new(
        Date::from_calendar_date(1, Month::January, 1).expect("valid date"),
        Time::MIDNIGHT,
    )
    .assume_utc()
}

/// Parses the timestamp layouts go-sqlite3 accepts, returning UTC. Text
/// without an offset is UTC. `None` when the text is not a timestamp.
#[must_use]
pub fn parse_sqlite_datetime(text: &str) -> Option<OffsetDateTime> {
    let s = text.trim();
    let s = s.strip_suffix('Z').unwrap_or(s);
    if s.len() < 10 {
        return None;
    }
    let date = parse_date(&s[..10])?;
    let rest = &s[10..];
    if rest.is_empty() {
        return Some(PrimitiveDateTime::new(date, Time::MIDNIGHT).assume_utc());
    }
    let rest = rest.strip_prefix([' ', 'T'])?;
    // hh:mm[:ss[.fffffffff]][±hh:mm]
    let (clock, offset) = split_offset(rest)?;
    let time = parse_clock(clock)?;
    Some(
        PrimitiveDateTime::new(date, time)
            .assume_offset(offset)
            .to_offset(UtcOffset::UTC),
    )
}

/// Parses MySQL `DATETIME` text (`YYYY-MM-DD HH:MM:SS[.ffffff]`) as UTC; the
/// zero date is Go's zero time, as SPIRE reads it back.
#[must_use]
pub fn parse_mysql_datetime(text: &str) -> Option<OffsetDateTime> {
    let s = text.trim();
    if s.starts_with("0000-00-00") {
        return Some(go_zero_time());
    }
    parse_sqlite_datetime(s)
}

/// Formats a UTC timestamp the way go-sqlite3 writes it (UTC offset).
#[must_use]
pub fn format_sqlite_datetime(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    format!(
        "{}{}+00:00",
        format_date_time(t),
        format_fraction(t.nanosecond(), true)
    )
}

/// Formats a timestamp as a MySQL `DATETIME` literal with microseconds (MySQL
/// keeps what its column precision allows).
#[must_use]
pub fn format_mysql_datetime(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    format!("{}.{:06}", format_date_time(t), t.nanosecond() / 1000)
}

/// The canonical text of a timestamp: RFC 3339 in UTC with nanoseconds, used
/// by content hashes and canonical dumps.
#[must_use]
pub fn canonical(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    let d = t.date();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z",
        d.year(),
        u8::from(d.month()),
        d.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.nanosecond()
    )
}

fn format_date_time(t: OffsetDateTime) -> String {
    let d = t.date();
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        d.year(),
        u8::from(d.month()),
        d.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn format_fraction(nanos: u32, trim: bool) -> String {
    if nanos == 0 {
        return String::new();
    }
    let digits = format!("{nanos:09}");
    let digits = if trim {
        digits.trim_end_matches('0')
    } else {
        &digits
    };
    format!(".{digits}")
}

fn parse_date(s: &str) -> Option<Date> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let year: i32 = s[..4].parse().ok()?;
    let month: u8 = s[5..7].parse().ok()?;
    let day: u8 = s[8..10].parse().ok()?;
    Date::from_calendar_date(year, Month::try_from(month).ok()?, day).ok()
}

fn split_offset(s: &str) -> Option<(&str, UtcOffset)> {
    // An offset starts at the last '+' or '-' (the clock part has neither).
    match s.bytes().rposition(|b| b == b'+' || b == b'-') {
        Some(i) => {
            let sign: i8 = if s.as_bytes()[i] == b'-' { -1 } else { 1 };
            let off = &s[i + 1..];
            let (h, m) = off.split_once(':').unwrap_or((off, "00"));
            let (h, m): (i8, i8) = (h.parse().ok()?, m.parse().ok()?);
            Some((&s[..i], UtcOffset::from_hms(sign * h, sign * m, 0).ok()?))
        }
        None => Some((s, UtcOffset::UTC)),
    }
}

fn parse_clock(s: &str) -> Option<Time> {
    let (hms, frac) = s.split_once('.').unwrap_or((s, ""));
    let mut parts = hms.split(':');
    let h: u8 = parts.next()?.parse().ok()?;
    let m: u8 = parts.next()?.parse().ok()?;
    let sec: u8 = match parts.next() {
        Some(x) => x.parse().ok()?,
        None => 0,
    };
    if parts.next().is_some() || frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // The digits as nanoseconds, without allocating: a backup parses two
    // timestamps a row (this was 5 % of a SQLite backup's CPU as `format!`).
    let digits = frac.bytes().fold(0u32, |n, b| n * 10 + u32::from(b - b'0'));
    let nanos = digits * 10u32.pow(9 - u32::try_from(frac.len()).ok()?);
    Time::from_hms_nano(h, m, sec, nanos).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_sqlite3_layouts_parse_to_utc() {
        let t = parse_sqlite_datetime("2026-02-18 10:42:12.139101-03:00").unwrap();
        assert_eq!(canonical(t), "2026-02-18T13:42:12.139101000Z");
        let t = parse_sqlite_datetime("2026-02-18T10:42:12Z").unwrap();
        assert_eq!(canonical(t), "2026-02-18T10:42:12.000000000Z");
        let t = parse_sqlite_datetime("2026-02-18 10:42:12.123456789+05:30").unwrap();
        assert_eq!(canonical(t), "2026-02-18T05:12:12.123456789Z");
        assert_eq!(
            canonical(parse_sqlite_datetime("2026-02-18").unwrap()),
            "2026-02-18T00:00:00.000000000Z"
        );
        assert_eq!(
            canonical(parse_sqlite_datetime("2026-02-18 10:42").unwrap()),
            "2026-02-18T10:42:00.000000000Z"
        );
        for (fraction, nanos) in [
            ("1", 100_000_000),
            ("05", 50_000_000),
            ("000001", 1_000),
            ("123456789", 123_456_789),
            ("000000000", 0),
        ] {
            let t = parse_sqlite_datetime(&format!("2026-02-18 10:42:12.{fraction}")).unwrap();
            assert_eq!(t.nanosecond(), nanos, ".{fraction}");
        }
        assert!(parse_sqlite_datetime("2026-02-18 10:42:12.1234567890").is_none());
        assert!(parse_sqlite_datetime("2026-02-18 10:42:12.12a").is_none());
        assert!(parse_sqlite_datetime("not a time").is_none());
        assert!(parse_sqlite_datetime("2026-13-01 00:00:00").is_none());
    }

    #[test]
    fn formats_round_trip() {
        let t = parse_sqlite_datetime("2026-02-18 10:42:12.1391-03:00").unwrap();
        assert_eq!(format_sqlite_datetime(t), "2026-02-18 13:42:12.1391+00:00");
        assert_eq!(parse_sqlite_datetime(&format_sqlite_datetime(t)), Some(t));
        assert_eq!(format_mysql_datetime(t), "2026-02-18 13:42:12.139100");
        assert_eq!(
            format_sqlite_datetime(go_zero_time()),
            "0001-01-01 00:00:00+00:00"
        );
    }

    #[test]
    fn mysql_zero_date_is_go_zero_time() {
        assert_eq!(
            parse_mysql_datetime("0000-00-00 00:00:00"),
            Some(go_zero_time())
        );
        assert_eq!(
            canonical(parse_mysql_datetime("2026-01-02 03:04:05").unwrap()),
            "2026-01-02T03:04:05.000000000Z"
        );
    }
}
