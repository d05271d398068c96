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
    parse_usual_layout(text.as_bytes()).or_else(|| parse_any_layout(text))
}

/// Every layout go-sqlite3 accepts, through the standard library's parsers.
fn parse_any_layout(text: &str) -> Option<OffsetDateTime> {
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
    // Checked: a date at the edge of the range can leave it in UTC.
    PrimitiveDateTime::new(date, time)
        .assume_offset(offset)
        .checked_to_offset(UtcOffset::UTC)
}

/// The layout SPIRE's drivers write, `YYYY-MM-DD HH:MM:SS[.f…][±HH:MM|Z]`
/// (a space or `T` between date and time), parsed byte by byte: a backup
/// parses two timestamps a row, and the general parser above was a tenth of a
/// SQLite backup's CPU. `None` for anything else, which the general parser
/// then reads, so both accept exactly the same texts.
fn parse_usual_layout(b: &[u8]) -> Option<OffsetDateTime> {
    fn two(b: &[u8], at: usize) -> Option<u8> {
        let (hi, lo) = (
            b.get(at)?.wrapping_sub(b'0'),
            b.get(at + 1)?.wrapping_sub(b'0'),
        );
        (hi < 10 && lo < 10).then(|| hi * 10 + lo)
    }
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b' ' | b'T')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let year = i32::from(two(b, 0)?) * 100 + i32::from(two(b, 2)?);
    let date =
        Date::from_calendar_date(year, Month::try_from(two(b, 5)?).ok()?, two(b, 8)?).ok()?;
    let (hour, minute, second) = (two(b, 11)?, two(b, 14)?, two(b, 17)?);
    let mut at = 19;
    let mut nanos = 0u32;
    if b.get(at) == Some(&b'.') {
        let digits = b[at + 1..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        if digits == 0 || digits > 9 {
            return None;
        }
        for &c in &b[at + 1..=at + digits] {
            nanos = nanos * 10 + u32::from(c - b'0');
        }
        nanos *= 10u32.pow(9 - u32::try_from(digits).ok()?);
        at += 1 + digits;
    }
    let offset = match &b[at..] {
        [] | [b'Z'] => UtcOffset::UTC,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let sign: i8 = if *sign == b'-' { -1 } else { 1 };
            let (h, m) = (two(b, at + 1)?, two(b, at + 4)?);
            UtcOffset::from_hms(
                sign * i8::try_from(h).ok()?,
                sign * i8::try_from(m).ok()?,
                0,
            )
            .ok()?
        }
        _ => return None,
    };
    let time = Time::from_hms_nano(hour, minute, second, nanos).ok()?;
    let local = PrimitiveDateTime::new(date, time);
    if offset == UtcOffset::UTC {
        // Already UTC (MySQL's texts, most SQLite ones): no conversion, whose
        // date arithmetic was 1.4 % of a MySQL backup's CPU.
        return Some(local.assume_utc());
    }
    local
        .assume_offset(offset)
        .checked_to_offset(UtcOffset::UTC)
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

    /// The byte-level parser accepts a subset of what the general one does and
    /// agrees with it on every text it accepts.
    #[test]
    fn the_usual_layout_parser_agrees_with_the_general_one() {
        let mut accepted = 0;
        for date in [
            "2026-02-18",
            "0001-01-01",
            "9999-12-31",
            "2024-02-29",
            "2023-02-29",
            "2026-13-01",
            "2026-1a-01",
        ] {
            for sep in [" ", "T", "t", "  "] {
                for clock in [
                    "10:42:12", "23:59:59", "00:00:00", "24:00:00", "10:60:00", "1:42:12", "10:42",
                ] {
                    for fraction in [
                        "",
                        ".",
                        ".1",
                        ".139101",
                        ".123456789",
                        ".1234567890",
                        ".12a",
                    ] {
                        for zone in [
                            "", "Z", "+00:00", "-03:00", "+05:30", "+25:59", "+26:00", "-01:60",
                            "+0530", "+05", "Z ", "+05:3",
                        ] {
                            let text = format!("{date}{sep}{clock}{fraction}{zone}");
                            let general = parse_any_layout(&text);
                            if let Some(fast) = parse_usual_layout(text.as_bytes()) {
                                accepted += 1;
                                assert_eq!(Some(fast), general, "{text}");
                            }
                            assert_eq!(parse_sqlite_datetime(&text), general, "{text}");
                        }
                    }
                }
            }
        }
        assert!(accepted > 500, "{accepted}");
    }

    /// Regression: a timestamp at the end of the range with a negative offset
    /// is past it in UTC, and converting it panicked; it is now not a
    /// timestamp (the value is kept as text).
    #[test]
    fn a_timestamp_that_leaves_the_range_in_utc_is_not_parsed() {
        assert_eq!(parse_sqlite_datetime("9999-12-31 23:59:59-01:00"), None);
        assert_eq!(parse_sqlite_datetime("9999-12-31 23:59:59.5 -01:00"), None);
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
