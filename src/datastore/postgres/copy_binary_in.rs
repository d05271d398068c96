//! Rows into `COPY … FROM STDIN (FORMAT binary)`, the restore's load path.
//!
//! The text format makes the server parse every integer and every timestamp
//! (`timestamptz_in` alone was a large share of a restore's server CPU), and
//! the client print them. The binary format carries them as fixed-width
//! big-endian numbers. It is strict about widths, so each column's encoding
//! comes from the type the target column really has ([`BinaryField::for_type`]);
//! a table with any other type loads through the text format instead.
//!
//! Each value stores exactly what the text path (and a bound parameter)
//! stores: the type receive functions apply the same checks and typmods
//! (`varchar(n)` length, `timestamp(p)` precision) as the input functions.

use time::OffsetDateTime;

use crate::datastore::timefmt::parse_sqlite_datetime;
use crate::datastore::{ColumnKind, Value};

/// The 11-byte signature, then the flags and header-extension length (both 0).
pub(super) const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// A field count of -1 ends the data.
pub(super) const TRAILER: &[u8] = &[0xff, 0xff];

/// How one column's values are written, by the target column's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum BinaryField {
    Int2,
    Int4,
    Int8,
    Bool,
    /// `text`, `varchar`, `char`: the UTF-8 bytes.
    Text,
    Bytea,
    /// `timestamp` and `timestamptz`: microseconds since 2000-01-01 (UTC).
    Timestamp,
    Float8,
}

impl BinaryField {
    /// The encoding for a column of type `type_oid` holding `kind` values,
    /// or `None` when this column needs the text format (`numeric`, `date`,
    /// `real`, `json`, a domain, or a kind that does not match the type).
    pub(super) fn for_type(type_oid: i64, kind: ColumnKind) -> Option<Self> {
        let field = match type_oid {
            21 => Self::Int2,
            23 => Self::Int4,
            20 => Self::Int8,
            16 => Self::Bool,
            25 | 1042 | 1043 => Self::Text,
            17 => Self::Bytea,
            1114 | 1184 => Self::Timestamp,
            701 => Self::Float8,
            _ => return None,
        };
        let matches = match field {
            Self::Int2 | Self::Int4 | Self::Int8 => kind == ColumnKind::Integer,
            Self::Bool => kind == ColumnKind::Boolean,
            Self::Text => kind == ColumnKind::Text,
            Self::Bytea => kind == ColumnKind::Bytes,
            Self::Timestamp => kind == ColumnKind::Timestamp,
            Self::Float8 => kind == ColumnKind::Float,
        };
        matches.then_some(field)
    }
}

/// Appends `rows` to `out` as binary COPY tuples (no header, no trailer).
/// An error names the column and the value it could not take; `out` may
/// then hold part of a row, and the caller abandons the load.
pub(super) fn push_rows(
    out: &mut Vec<u8>,
    table: &str,
    columns: &[(String, ColumnKind)],
    fields: &[BinaryField],
    rows: &[Vec<Value>],
) -> Result<(), String> {
    let count = i16::try_from(fields.len())
        .map_err(|_| format!("{table}: {} columns do not fit a COPY row", fields.len()))?;
    for row in rows {
        if row.len() != fields.len() {
            return Err(format!(
                "{table}: a row of {} values for {} columns",
                row.len(),
                fields.len()
            ));
        }
        out.extend_from_slice(&count.to_be_bytes());
        for ((v, field), (cname, kind)) in row.iter().zip(fields).zip(columns) {
            push_field(out, *field, *kind, v).map_err(|msg| format!("{table}.{cname}: {msg}"))?;
        }
    }
    Ok(())
}

fn push_field(
    out: &mut Vec<u8>,
    field: BinaryField,
    kind: ColumnKind,
    v: &Value,
) -> Result<(), String> {
    let out_of_range = |x: i64, ty: &str| format!("{x} is out of range for type {ty}");
    match (field, v) {
        (_, Value::Null) => out.extend_from_slice(&(-1i32).to_be_bytes()),
        (BinaryField::Int2, Value::Int(x)) => {
            let x = i16::try_from(*x).map_err(|_| out_of_range(*x, "smallint"))?;
            push_fixed(out, &x.to_be_bytes());
        }
        (BinaryField::Int4, Value::Int(x)) => {
            let x = i32::try_from(*x).map_err(|_| out_of_range(*x, "integer"))?;
            push_fixed(out, &x.to_be_bytes());
        }
        (BinaryField::Int8, Value::Int(x)) => push_fixed(out, &x.to_be_bytes()),
        (BinaryField::Int2, Value::Bool(b)) => push_fixed(out, &i16::from(*b).to_be_bytes()),
        (BinaryField::Int4, Value::Bool(b)) => push_fixed(out, &i32::from(*b).to_be_bytes()),
        (BinaryField::Int8, Value::Bool(b)) => push_fixed(out, &i64::from(*b).to_be_bytes()),
        (BinaryField::Bool, Value::Bool(b)) => push_fixed(out, &[u8::from(*b)]),
        (BinaryField::Bool, Value::Int(x)) => push_fixed(out, &[u8::from(*x != 0)]),
        (BinaryField::Float8, Value::Float(x)) => push_fixed(out, &x.to_bits().to_be_bytes()),
        (BinaryField::Text, Value::Text(s)) => {
            if s.contains('\0') {
                return Err("PostgreSQL text cannot hold a NUL character".into());
            }
            push_var(out, s.as_bytes())?;
        }
        (BinaryField::Bytea, Value::Bytes(b)) => push_var(out, b)?,
        (BinaryField::Bytea, Value::Text(s)) => push_var(out, s.as_bytes())?,
        (BinaryField::Timestamp, Value::Timestamp(t)) => {
            push_fixed(out, &pg_micros(*t).to_be_bytes());
        }
        (BinaryField::Timestamp, Value::Text(s)) => match parse_sqlite_datetime(s) {
            Some(t) => push_fixed(out, &pg_micros(t).to_be_bytes()),
            None => return Err(format!("\"{s}\" is not a timestamp")),
        },
        (_, v) => {
            return Err(format!(
                "a {} value cannot go into a {kind:?} column",
                v.type_name()
            ));
        }
    }
    Ok(())
}

/// A fixed-width value (1 to 8 bytes) after its length.
fn push_fixed<const N: usize>(out: &mut Vec<u8>, bytes: &[u8; N]) {
    const { assert!(N >= 1 && N <= 8) };
    #[allow(clippy::cast_possible_truncation)] // N <= 8, checked above
    out.extend_from_slice(&[0, 0, 0, N as u8]);
    out.extend_from_slice(bytes);
}

fn push_var(out: &mut Vec<u8>, bytes: &[u8]) -> Result<(), String> {
    let len = i32::try_from(bytes.len()).map_err(|_| {
        format!(
            "a value of {} bytes is past PostgreSQL's 1 GiB limit",
            bytes.len()
        )
    })?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

/// Seconds from 1970-01-01 to PostgreSQL's epoch, 2000-01-01 (UTC).
const PG_EPOCH_UNIX_SECONDS: i64 = 946_684_800;

/// Whole microseconds since 2000-01-01 UTC, cut toward zero: what sqlx's
/// binary encoding of a bound parameter stores, and what the text path writes.
pub(super) fn pg_micros(t: OffsetDateTime) -> i64 {
    // Years -9999..=9999 keep every step inside i64.
    let seconds = t.unix_timestamp() - PG_EPOCH_UNIX_SECONDS;
    let nanos = i64::from(t.nanosecond());
    let floor = seconds * 1_000_000 + nanos / 1_000;
    if seconds < 0 && nanos % 1_000 != 0 {
        floor + 1
    } else {
        floor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn microseconds_are_cut_toward_zero_from_2000_like_the_text_path() {
        let pg_epoch = time::macros::datetime!(2000-01-01 0:00 UTC);
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut checked = 0;
        for _ in 0..20_000 {
            // Seconds across years 1..=9999 and every kind of nanosecond.
            let secs = (next() % 315_000_000_000).cast_signed() - 62_000_000_000;
            let nanos = match next() % 4 {
                0 => 0,
                1 => (next() % 1_000) as u32 * 1_000,
                2 => (next() % 1_000) as u32,
                _ => (next() % 1_000_000_000) as u32,
            };
            let Ok(t) = OffsetDateTime::from_unix_timestamp(secs) else {
                continue;
            };
            let t = t.replace_nanosecond(nanos).unwrap();
            let expected = i64::try_from((t - pg_epoch).whole_microseconds()).unwrap();
            assert_eq!(pg_micros(t), expected, "{t}");
            checked += 1;
        }
        assert!(checked > 10_000);
        let just_before = pg_epoch - time::Duration::nanoseconds(1);
        assert_eq!(pg_micros(just_before), 0);
        assert_eq!(pg_micros(pg_epoch - time::Duration::microseconds(1)), -1);
    }

    #[test]
    fn a_row_is_a_field_count_then_length_prefixed_fields() {
        let columns = vec![
            ("id".to_owned(), ColumnKind::Integer),
            ("name".to_owned(), ColumnKind::Text),
            ("on".to_owned(), ColumnKind::Boolean),
        ];
        let fields = [BinaryField::Int4, BinaryField::Text, BinaryField::Bool];
        let mut out = Vec::new();
        push_rows(
            &mut out,
            "t",
            &columns,
            &fields,
            &[vec![Value::Int(7), Value::Text("ab".into()), Value::Null]],
        )
        .unwrap();
        assert_eq!(
            out,
            [
                &[0, 3][..],
                &[0, 0, 0, 4, 0, 0, 0, 7],
                &[0, 0, 0, 2, b'a', b'b'],
                &[0xff, 0xff, 0xff, 0xff],
            ]
            .concat()
        );
    }

    #[test]
    fn values_the_column_cannot_take_are_errors_that_name_it() {
        let columns = vec![("n".to_owned(), ColumnKind::Integer)];
        let err =
            |field, v| push_rows(&mut Vec::new(), "t", &columns, &[field], &[vec![v]]).unwrap_err();
        assert_eq!(
            err(BinaryField::Int4, Value::Int(1 << 31)),
            "t.n: 2147483648 is out of range for type integer"
        );
        assert!(err(BinaryField::Int2, Value::Int(-40_000)).contains("smallint"));
        assert!(err(BinaryField::Int8, Value::Text("1".into())).contains("a text value"));
        let text = vec![("s".to_owned(), ColumnKind::Text)];
        let nul = push_rows(
            &mut Vec::new(),
            "t",
            &text,
            &[BinaryField::Text],
            &[vec![Value::Text("a\0b".into())]],
        )
        .unwrap_err();
        assert!(nul.contains("t.s") && nul.contains("NUL"), "{nul}");
    }

    #[test]
    fn only_known_types_with_their_kind_take_the_binary_format() {
        assert_eq!(
            BinaryField::for_type(1043, ColumnKind::Text),
            Some(BinaryField::Text)
        );
        assert_eq!(BinaryField::for_type(23, ColumnKind::Text), None);
        // numeric, date, real, jsonb: text format.
        for oid in [1700, 1082, 700, 3802] {
            for kind in [
                ColumnKind::Integer,
                ColumnKind::Float,
                ColumnKind::Timestamp,
                ColumnKind::Text,
            ] {
                assert_eq!(BinaryField::for_type(oid, kind), None, "{oid} {kind:?}");
            }
        }
    }
}
