//! Log lines in the shape SPIRE writes them (logrus text format), on stderr:
//! `time="2026-08-22T10:00:00.123Z" level=info msg="Opening SQL database" db_type=sqlite3`.
//!
//! A fleet member's `log` file is then read the way an operator reads a real
//! SPIRE log, and a test can look for SPIRE's own messages in it.

use std::fmt::Write as _;
use std::io::Write as _;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Writes one line at `level` with `msg` and `fields`.
pub fn log(level: &str, msg: &str, fields: &[(&str, &str)]) {
    let now = OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| "-".into());
    let mut line = format!("time={} level={level} msg={}", quote(&now), quote(msg));
    for (k, v) in fields {
        let _ = write!(line, " {k}={}", value(v));
    }
    line.push('\n');
    // A closed stderr must not crash the stand-in; there is nowhere else to report it.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

pub fn info(msg: &str, fields: &[(&str, &str)]) {
    log("info", msg, fields);
}

pub fn warn(msg: &str, fields: &[(&str, &str)]) {
    log("warning", msg, fields);
}

pub fn error(msg: &str, fields: &[(&str, &str)]) {
    log("error", msg, fields);
}

/// logrus quotes a value only when it needs it.
fn value(v: &str) -> String {
    let plain = !v.is_empty()
        && v.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '/' | '@' | '^' | '+' | ':')
        });
    if plain { v.to_string() } else { quote(v) }
}

fn quote(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
