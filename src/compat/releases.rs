//! SPIRE's release table, kept as data in `migrations-check/releases.csv`.
//!
//! Each line is one SPIRE release with the schema it writes and the oldest
//! schema it can migrate from (spire-reference §3 and §9). Schema bumps happen
//! in patch releases too (1.3.2, 1.7.2, 1.14.3), which is why the table is per
//! release and not per minor line (§4, "Consequences").

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::sync::OnceLock;

use semver::Version;
use time::Date;
use time::macros::format_description;

use super::version::precedence;

/// The table as shipped: `migrations-check/releases.csv`.
const BUILTIN_CSV: &str = include_str!("../../migrations-check/releases.csv");

/// The header `releases.csv` must start with.
pub const CSV_HEADER: &str = "version,date,schema,min_schema";

/// One SPIRE release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// The release, e.g. 1.14.3 (or, for a simulated dev build, 1.16.0-dev-abc).
    pub version: Version,
    /// The date of the git tag, when known.
    pub date: Option<Date>,
    /// `latestSchemaVersion`: the schema this release creates and migrates to.
    pub schema: i64,
    /// `lastMinorReleaseSchemaVersion`: the oldest schema it migrates from;
    /// `None` for releases that still carried every migration (1.0.x, 1.1.x).
    pub min_schema: Option<i64>,
}

impl Release {
    /// Whether this release can migrate a datastore at `schema` (or already
    /// runs on it): `min_schema <= schema`.
    #[must_use]
    pub fn migrates_from(&self, schema: i64) -> bool {
        self.min_schema.is_none_or(|min| schema >= min)
    }
}

/// A `releases.csv` that does not describe a consistent release history.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("releases.csv line {line}: {message}")]
pub struct TableError {
    /// 1-based line number (0 when the problem is the file as a whole).
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// The SPIRE releases spirekeep knows, sorted by version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseTable {
    releases: Vec<Release>,
}

impl ReleaseTable {
    /// The table compiled into spirekeep from `migrations-check/releases.csv`.
    ///
    /// # Panics
    ///
    /// Only if the shipped CSV is invalid, which the crate's tests rule out.
    #[must_use]
    pub fn builtin() -> &'static Self {
        static TABLE: OnceLock<ReleaseTable> = OnceLock::new();
        TABLE.get_or_init(|| {
            Self::parse(BUILTIN_CSV)
                .unwrap_or_else(|e| panic!("migrations-check/releases.csv is invalid: {e}"))
        })
    }

    /// Parses and validates a release table in `releases.csv` form.
    ///
    /// # Errors
    ///
    /// [`TableError`] naming the line, when the header is wrong, a field does
    /// not parse, a version is repeated, `min_schema > schema`, or the schema
    /// or minimum schema goes down within a minor line as the patch rises.
    pub fn parse(csv: &str) -> Result<Self, TableError> {
        let mut lines = csv
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim_end_matches('\r')))
            .filter(|(_, l)| !l.trim().is_empty());
        match lines.next() {
            Some((_, header)) if header.trim() == CSV_HEADER => {}
            Some((line, header)) => {
                return Err(TableError {
                    line,
                    message: format!("expected the header {CSV_HEADER:?}, found {header:?}"),
                });
            }
            None => {
                return Err(TableError {
                    line: 0,
                    message: "the table is empty".into(),
                });
            }
        }
        let mut releases = Vec::new();
        let mut seen = BTreeSet::new();
        for (line, text) in lines {
            let release = parse_line(text).map_err(|message| TableError { line, message })?;
            if !seen.insert(release.version.to_string()) {
                return Err(TableError {
                    line,
                    message: format!("release {} is listed twice", release.version),
                });
            }
            releases.push((line, release));
        }
        if releases.is_empty() {
            return Err(TableError {
                line: 0,
                message: "the table lists no release".into(),
            });
        }
        releases.sort_by(|(_, a), (_, b)| precedence(&a.version, &b.version));
        for pair in releases.windows(2) {
            let ((_, prev), (line, next)) = (&pair[0], &pair[1]);
            if (prev.version.major, prev.version.minor) != (next.version.major, next.version.minor)
            {
                continue;
            }
            if next.schema < prev.schema {
                return Err(TableError {
                    line: *line,
                    message: format!(
                        "schema {} of {} is below schema {} of the earlier patch {}",
                        next.schema, next.version, prev.schema, prev.version
                    ),
                });
            }
            let min_lowered = match (prev.min_schema, next.min_schema) {
                (Some(_), None) => true,
                (Some(p), Some(n)) => n < p,
                _ => false,
            };
            if min_lowered {
                return Err(TableError {
                    line: *line,
                    message: format!(
                        "min_schema of {} is below that of the earlier patch {}",
                        next.version, prev.version
                    ),
                });
            }
        }
        Ok(Self {
            releases: releases.into_iter().map(|(_, r)| r).collect(),
        })
    }

    /// Every release, oldest first.
    #[must_use]
    pub fn releases(&self) -> &[Release] {
        &self.releases
    }

    /// The release with exactly this version (build metadata ignored).
    #[must_use]
    pub fn get(&self, version: &Version) -> Option<&Release> {
        self.releases
            .binary_search_by(|r| precedence(&r.version, version))
            .ok()
            .map(|i| &self.releases[i])
    }

    /// The newest release in the table.
    ///
    /// # Panics
    ///
    /// Never: a parsed table has at least one release.
    #[must_use]
    pub fn newest(&self) -> &Release {
        self.releases
            .last()
            .expect("a parsed table has at least one release")
    }

    /// The oldest release in the table.
    ///
    /// # Panics
    ///
    /// Never: a parsed table has at least one release.
    #[must_use]
    pub fn oldest(&self) -> &Release {
        self.releases
            .first()
            .expect("a parsed table has at least one release")
    }

    /// The newest patch release of the minor line `major.minor`.
    #[must_use]
    pub fn newest_in_line(&self, major: u64, minor: u64) -> Option<&Release> {
        self.releases
            .iter()
            .rev()
            .find(|r| r.version.major == major && r.version.minor == minor)
    }

    /// The releases whose schema is `schema`, oldest first.
    pub fn with_schema(&self, schema: i64) -> impl Iterator<Item = &Release> {
        self.releases.iter().filter(move |r| r.schema == schema)
    }

    /// "1.14.3–1.14.7": the releases that write `schema`, for messages.
    #[must_use]
    pub fn describe_schema(&self, schema: i64) -> Option<String> {
        let mut with = self.with_schema(schema);
        let first = with.next()?;
        Some(match with.last() {
            Some(last) => format!("{}–{}", first.version, last.version),
            None => first.version.to_string(),
        })
    }
}

fn parse_line(text: &str) -> Result<Release, String> {
    if text.contains('"') {
        return Err("quoting is not supported".into());
    }
    let fields: Vec<&str> = text.split(',').map(str::trim).collect();
    let [version, date, schema, min_schema] = fields.as_slice() else {
        return Err(format!(
            "expected 4 fields ({CSV_HEADER}), found {}",
            fields.len()
        ));
    };
    let version = Version::parse(version).map_err(|e| format!("version {version:?}: {e}"))?;
    if !version.pre.is_empty() || !version.build.is_empty() {
        return Err(format!(
            "version {version}: releases are plain MAJOR.MINOR.PATCH"
        ));
    }
    let date = if date.is_empty() {
        None
    } else {
        Some(
            Date::parse(date, format_description!("[year]-[month]-[day]"))
                .map_err(|e| format!("date {date:?} is not YYYY-MM-DD: {e}"))?,
        )
    };
    let schema = parse_schema(schema).map_err(|e| format!("schema: {e}"))?;
    let min_schema = if min_schema.is_empty() {
        None
    } else {
        Some(parse_schema(min_schema).map_err(|e| format!("min_schema: {e}"))?)
    };
    if let Some(min) = min_schema
        && min.cmp(&schema) == Ordering::Greater
    {
        return Err(format!(
            "min_schema {min} is above schema {schema} for {version}"
        ));
    }
    Ok(Release {
        version,
        date,
        schema,
        min_schema,
    })
}

fn parse_schema(text: &str) -> Result<i64, String> {
    match text.parse::<i64>() {
        Ok(n) if n >= 0 => Ok(n),
        _ => Err(format!(
            "{text:?} is not a schema version (a whole number >= 0)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    fn table() -> &'static ReleaseTable {
        ReleaseTable::builtin()
    }

    #[test]
    fn builtin_table_loads() {
        let t = table();
        assert_eq!(t.oldest().version, v("1.0.0"));
        assert_eq!(t.newest().version, v("1.15.3"));
        // 1.0.0, 1.1.0, 1.1.5, 1.2.0, 1.3.0, 1.3.1, 1.3.2 plus the 82 releases of §9
        assert_eq!(t.releases().len(), 89);
    }

    #[test]
    fn versions_are_unique_and_sorted() {
        let t = table();
        for pair in t.releases().windows(2) {
            assert_eq!(
                precedence(&pair[0].version, &pair[1].version),
                Ordering::Less,
                "{} then {}",
                pair[0].version,
                pair[1].version
            );
        }
    }

    #[test]
    fn min_schema_never_exceeds_schema() {
        for r in table().releases() {
            if let Some(min) = r.min_schema {
                assert!(min <= r.schema, "{}", r.version);
            }
        }
    }

    #[test]
    fn schema_never_decreases_within_a_minor_line() {
        for pair in table().releases().windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            if (a.version.major, a.version.minor) == (b.version.major, b.version.minor) {
                assert!(b.schema >= a.schema, "{} -> {}", a.version, b.version);
                assert!(
                    b.min_schema >= a.min_schema,
                    "{} -> {}",
                    a.version,
                    b.version
                );
            }
        }
    }

    /// Every schema from 17 to 25 is written by some release, except 20:
    /// 1.6.0 migrates 19 -> 20 -> 21 in one start-up (§3), so no release ever
    /// stops at 20. That schema must still be covered by a migration range.
    #[test]
    fn every_schema_17_to_25_appears() {
        let t = table();
        for schema in 17..=25 {
            let written = t.with_schema(schema).next().is_some();
            if schema == 20 {
                assert!(!written, "no SPIRE release ends at schema 20");
                let crossed = t
                    .releases()
                    .iter()
                    .any(|r| r.min_schema.is_some_and(|min| min < schema) && r.schema > schema);
                assert!(crossed, "schema 20 is crossed by 1.6.0's migration");
            } else {
                assert!(written, "no release writes schema {schema}");
            }
        }
    }

    #[test]
    fn patch_release_schema_bumps_are_present() {
        let t = table();
        for (before, bump, schema) in [
            ("1.3.1", "1.3.2", 19),
            ("1.7.1", "1.7.2", 22),
            ("1.14.2", "1.14.3", 24),
        ] {
            assert_eq!(t.get(&v(bump)).unwrap().schema, schema, "{bump}");
            assert_eq!(t.get(&v(before)).unwrap().schema, schema - 1, "{before}");
        }
        // the minimum schema also rose in a patch release
        assert_eq!(t.get(&v("1.7.0")).unwrap().min_schema, Some(19));
        assert_eq!(t.get(&v("1.7.1")).unwrap().min_schema, Some(21));
    }

    #[test]
    fn minimum_schemas_follow_the_reference() {
        // spire-reference §3, `lastMinorReleaseSchemaVersion`
        let t = table();
        for r in t.releases() {
            let (minor, patch) = (r.version.minor, r.version.patch);
            let expected = match (minor, patch) {
                (0 | 1, _) => None,
                (2, _) | (3, 0 | 1) => Some(17),
                (3..=5, _) => Some(18),
                (6, _) | (7, 0) => Some(19),
                (7..=10, _) => Some(21),
                _ => Some(23),
            };
            assert_eq!(r.min_schema, expected, "{}", r.version);
        }
    }

    #[test]
    fn dates_follow_the_reference() {
        let t = table();
        let date = |s: &str| t.get(&v(s)).unwrap().date.map(|d| d.to_string());
        assert_eq!(date("1.0.0").as_deref(), Some("2021-07-08"));
        assert_eq!(date("1.3.2").as_deref(), Some("2022-07-08"));
        assert_eq!(date("1.4.6").as_deref(), Some("2022-12-07")); // tag date, not CHANGELOG
        assert_eq!(date("1.8.10").as_deref(), Some("2024-04-05"));
        assert_eq!(date("1.15.3").as_deref(), Some("2026-08-21"));
        assert_eq!(date("1.1.5"), None);
        assert_eq!(date("1.3.1"), None);
    }

    #[test]
    fn lookups() {
        let t = table();
        assert_eq!(t.newest_in_line(1, 14).unwrap().version, v("1.14.7"));
        assert_eq!(t.newest_in_line(1, 3).unwrap().version, v("1.3.2"));
        assert!(t.newest_in_line(1, 16).is_none());
        assert!(t.get(&v("1.16.0")).is_none());
        assert!(t.get(&v("1.15.3-rc.1")).is_none());
        assert_eq!(t.describe_schema(24).as_deref(), Some("1.14.3–1.14.7"));
        assert_eq!(t.describe_schema(20), None);
        assert!(t.get(&v("1.7.6")).unwrap().migrates_from(21));
        assert!(!t.get(&v("1.7.6")).unwrap().migrates_from(19));
        assert!(t.get(&v("1.0.0")).unwrap().migrates_from(0));
    }

    #[test]
    fn bad_tables_are_refused_with_the_line() {
        let cases = [
            ("", 0, "empty"),
            ("version,schema\n1.0.0,17\n", 1, "header"),
            (
                "version,date,schema,min_schema\n1.0.0,2021-07-08,17,\n1.0.0,,17,\n",
                3,
                "twice",
            ),
            (
                "version,date,schema,min_schema\n1.2.0,2022-13-01,18,17\n",
                2,
                "YYYY-MM-DD",
            ),
            (
                "version,date,schema,min_schema\n1.2.0,,17,18\n",
                2,
                "above schema",
            ),
            ("version,date,schema,min_schema\n1.2.0,,x,17\n", 2, "schema"),
            ("version,date,schema,min_schema\n1.2.0,,-1,\n", 2, "schema"),
            ("version,date,schema,min_schema\n1.2,,18,17\n", 2, "version"),
            (
                "version,date,schema,min_schema\n1.2.0-rc.1,,18,17\n",
                2,
                "plain",
            ),
            ("version,date,schema,min_schema\n1.2.0,,18\n", 2, "4 fields"),
            (
                "version,date,schema,min_schema\n1.2.1,,17,17\n1.2.0,,18,17\n",
                2,
                "below schema",
            ),
            (
                "version,date,schema,min_schema\n1.7.0,,21,21\n1.7.1,,21,19\n",
                3,
                "min_schema",
            ),
            ("version,date,schema,min_schema\n", 0, "no release"),
        ];
        for (csv, line, needle) in cases {
            let err = ReleaseTable::parse(csv).unwrap_err();
            assert_eq!(err.line, line, "{csv:?}: {err}");
            assert!(err.to_string().contains(needle), "{csv:?}: {err}");
        }
    }

    #[test]
    fn adding_a_release_is_one_line() {
        let csv = format!("{BUILTIN_CSV}1.16.0,2026-10-01,26,23\n");
        let t = ReleaseTable::parse(&csv).unwrap();
        assert_eq!(t.newest().version, v("1.16.0"));
        assert_eq!(t.newest().schema, 26);
        // CRLF line endings and blank lines are tolerated
        let crlf = "version,date,schema,min_schema\r\n\r\n1.0.0,,17,\r\n";
        assert_eq!(ReleaseTable::parse(crlf).unwrap().releases().len(), 1);
    }
}
