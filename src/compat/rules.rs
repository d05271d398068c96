//! What a SPIRE server does with the datastore when it starts (`migrateDB` in
//! `pkg/server/datastore/sqlstore/migration.go`, spire-reference §4), and the
//! documented version-skew policy (§5), as pure functions.

use std::cmp::Ordering;

use semver::Version;
use serde::{Deserialize, Serialize};

use super::releases::Release;
use super::version::{
    agent_floor, newest, oldest, parse_code_version, policy_minor_gap, precedence,
    startup_compatible,
};

/// The warning SPIRE logs when it runs on a schema newer than its own (§4
/// step 6).
pub const SCHEMA_AHEAD_WARNING: &str =
    "DB schema is ahead of code version, upgrading SPIRE Server is recommended";

/// The single row of SPIRE's `migrations` table (§3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationRow {
    /// `migrations.version`: the schema version.
    pub schema: i64,
    /// `migrations.code_version`, exactly as stored (may be empty).
    pub code_version: String,
}

impl MigrationRow {
    /// A row as SPIRE writes it.
    #[must_use]
    pub fn new(schema: i64, code_version: impl Into<String>) -> Self {
        Self {
            schema,
            code_version: code_version.into(),
        }
    }
}

/// Why a SPIRE server refuses to start on a datastore. The messages are
/// SPIRE's own (§4).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[serde(tag = "refusal", rename_all = "snake_case")]
pub enum Refusal {
    /// §4 step 1: the running code is 2.x or later.
    #[error("current migration code not compatible with current release version")]
    UnsupportedMajor,
    /// §3: the stored `code_version` is not semver.
    #[error("error getting DB code version: {value:?} is not a semantic version")]
    BadCodeVersion {
        /// The stored string.
        value: String,
    },
    /// §4 step 5: `disable_migration = true` and the stored code version is
    /// more than one minor away from the running one.
    #[error("auto-migration must be enabled for current DB")]
    AutoMigrationRequired,
    /// §4 step 6: the schema is newer than the code and the stored code
    /// version is more than one minor away.
    #[error("incompatible DB schema and code version")]
    IncompatibleSchema,
    /// §4 step 7: the schema is older than `lastMinorReleaseSchemaVersion`.
    #[error(
        "migrating from schema version {schema} requires a previous SPIRE release; please follow the upgrade strategy at doc/upgrading.md"
    )]
    RequiresPreviousRelease {
        /// The datastore's schema version.
        schema: i64,
    },
    /// §4 step 7: a schema version no migration step knows (e.g. negative).
    #[error("no migration support for unknown schema version {schema}")]
    UnknownSchemaVersion {
        /// The datastore's schema version.
        schema: i64,
    },
}

/// What a SPIRE server does to the datastore when it starts (§4), and the
/// `migrations` row afterwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum StartupOutcome {
    /// Step 2: fresh datastore; `initDB` creates the schema.
    Initialized {
        /// The row written: (latest, running version).
        row: MigrationRow,
    },
    /// Step 4: the schema is already the latest. `code_version` is rewritten
    /// only when the running version is higher than the stored one.
    UpToDate {
        /// The row afterwards.
        row: MigrationRow,
        /// Whether `code_version` was raised to the running version.
        code_version_bumped: bool,
    },
    /// Step 5: `disable_migration = true` and the versions are compatible;
    /// the server runs on the old (or newer) schema, nothing is written.
    StartedWithoutMigrating {
        /// The unchanged row.
        row: MigrationRow,
    },
    /// Step 6: the schema is newer than the code, the versions are
    /// compatible; SPIRE logs [`SCHEMA_AHEAD_WARNING`] and runs.
    SchemaAhead {
        /// The unchanged row.
        row: MigrationRow,
    },
    /// Step 7: migrated one schema step at a time up to the latest.
    Migrated {
        /// The schema before.
        from_schema: i64,
        /// The row afterwards: (latest, running version).
        row: MigrationRow,
    },
    /// The server fails to start. The datastore is left as it was (a failing
    /// migration step rolls back its transaction).
    Refused {
        /// SPIRE's reason.
        refusal: Refusal,
        /// The unchanged row (`None` for a fresh datastore).
        row: Option<MigrationRow>,
    },
}

impl StartupOutcome {
    /// Whether the server starts.
    #[must_use]
    pub fn starts(&self) -> bool {
        !matches!(self, Self::Refused { .. })
    }

    /// The `migrations` row after start-up (`None` only for a fresh datastore
    /// that SPIRE refused to initialise).
    #[must_use]
    pub fn row_after(&self) -> Option<&MigrationRow> {
        match self {
            Self::Initialized { row }
            | Self::UpToDate { row, .. }
            | Self::StartedWithoutMigrating { row }
            | Self::SchemaAhead { row }
            | Self::Migrated { row, .. } => Some(row),
            Self::Refused { row, .. } => row.as_ref(),
        }
    }

    /// SPIRE's refusal, if it refuses.
    #[must_use]
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            Self::Refused { refusal, .. } => Some(refusal),
            _ => None,
        }
    }

    /// The warning SPIRE logs, if any.
    #[must_use]
    pub fn warning(&self) -> Option<&'static str> {
        matches!(self, Self::SchemaAhead { .. }).then_some(SCHEMA_AHEAD_WARNING)
    }

    /// Whether start-up changed the schema (fresh initialisation or migration).
    #[must_use]
    pub fn changes_schema(&self) -> bool {
        matches!(self, Self::Initialized { .. } | Self::Migrated { .. })
    }
}

/// SPIRE's `migrateDB` (§4) as a pure function: what `code` does when it
/// starts on a datastore whose `migrations` row is `row` (`None`: a fresh
/// datastore with no `migrations` table).
///
/// `code.schema` is the release's `latestSchemaVersion` and `code.min_schema`
/// its `lastMinorReleaseSchemaVersion`. The steps run in SPIRE's order:
///
/// 1. a running major above 1 is refused;
/// 2. a fresh datastore is initialised to (latest, running);
/// 3. the stored `code_version` is parsed (empty = 0.0.0, garbage refused);
/// 4. schema == latest: nothing to do; `code_version` is raised to the
///    running version only if that is higher, never lowered;
/// 5. `disable_migration` and schema != latest: start unmigrated if
///    `compatible(running, stored)`, else refuse;
/// 6. schema > latest: warn and run if compatible, else refuse;
/// 7. schema < latest: refuse below the minimum, else migrate step by step,
///    each step writing (next, running). Code versions are not checked here.
///
/// `compatible` is [`is_compatible_code_version`](super::is_compatible_code_version),
/// plus the 0.12.x/1.0.x exception when the running code is 1.0.x.
#[must_use]
pub fn server_startup(
    code: &Release,
    row: Option<&MigrationRow>,
    disable_migration: bool,
) -> StartupOutcome {
    let running = &code.version;
    let refused = |refusal| StartupOutcome::Refused {
        refusal,
        row: row.cloned(),
    };
    if running.major > 1 {
        return refused(Refusal::UnsupportedMajor);
    }
    let Some(row) = row else {
        return StartupOutcome::Initialized {
            row: MigrationRow::new(code.schema, running.to_string()),
        };
    };
    let Ok(stored) = parse_code_version(&row.code_version) else {
        return refused(Refusal::BadCodeVersion {
            value: row.code_version.clone(),
        });
    };
    let latest = code.schema;
    if row.schema == latest {
        let bump = precedence(running, &stored) == Ordering::Greater;
        return StartupOutcome::UpToDate {
            row: if bump {
                MigrationRow::new(latest, running.to_string())
            } else {
                row.clone()
            },
            code_version_bumped: bump,
        };
    }
    if disable_migration {
        return if startup_compatible(running, &stored) {
            StartupOutcome::StartedWithoutMigrating { row: row.clone() }
        } else {
            refused(Refusal::AutoMigrationRequired)
        };
    }
    if row.schema > latest {
        return if startup_compatible(running, &stored) {
            StartupOutcome::SchemaAhead { row: row.clone() }
        } else {
            refused(Refusal::IncompatibleSchema)
        };
    }
    // Every step from here on starts at a schema >= row.schema, so only the
    // first step can fail: it rolls back and the row stays as it was.
    if code.min_schema.is_some_and(|min| row.schema < min) {
        return refused(Refusal::RequiresPreviousRelease { schema: row.schema });
    }
    if row.schema < 0 {
        return refused(Refusal::UnknownSchemaVersion { schema: row.schema });
    }
    StartupOutcome::Migrated {
        from_schema: row.schema,
        row: MigrationRow::new(latest, running.to_string()),
    }
}

/// §5: an upgrade may move at most one minor version, whatever the patch
/// (1.1.1 → 1.3.0 is unsupported); 0.12.x → 1.0.x counts as one minor.
#[must_use]
pub fn upgrade_step_supported(from: &Version, to: &Version) -> bool {
    policy_minor_gap(from, to).is_some_and(|gap| gap <= 1)
}

/// §5: servers sharing a datastore are supported within ±1 minor, measured
/// between the newest and the oldest. An empty or single-server set is fine.
#[must_use]
pub fn servers_within_skew(servers: &[Version]) -> bool {
    match (oldest(servers), newest(servers)) {
        (Some(old), Some(new)) => upgrade_step_supported(old, new),
        _ => true,
    }
}

/// §5: an agent is supported when it is not newer than the oldest server and
/// at most one minor older than it (servers 1.2.3 and 1.2.2 support agents
/// 1.1.0 through 1.2.2). With no servers, nothing is supported.
#[must_use]
pub fn agent_supported(agent: &Version, servers: &[Version]) -> bool {
    let Some(oldest) = oldest(servers) else {
        return false;
    };
    precedence(agent, oldest) != Ordering::Greater
        && agent_floor(oldest).is_some_and(|floor| precedence(agent, &floor) != Ordering::Less)
}

#[cfg(test)]
mod tests {
    use super::super::releases::ReleaseTable;
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    fn release(s: &str) -> &'static Release {
        ReleaseTable::builtin()
            .get(&v(s))
            .unwrap_or_else(|| panic!("{s} not in table"))
    }

    fn row(schema: i64, code: &str) -> MigrationRow {
        MigrationRow::new(schema, code)
    }

    // ---- the example table of spire-reference §4, row by row ----

    #[test]
    fn example_1_migrates_24_to_25() {
        let out = server_startup(release("1.15.3"), Some(&row(24, "1.14.7")), false);
        assert_eq!(
            out,
            StartupOutcome::Migrated {
                from_schema: 24,
                row: row(25, "1.15.3")
            }
        );
    }

    #[test]
    fn example_2_migrates_23_to_25_skipping_a_minor() {
        let out = server_startup(release("1.15.3"), Some(&row(23, "1.13.2")), false);
        assert_eq!(
            out,
            StartupOutcome::Migrated {
                from_schema: 23,
                row: row(25, "1.15.3")
            }
        );
    }

    #[test]
    fn example_3_schema_22_requires_a_previous_release() {
        let out = server_startup(release("1.15.3"), Some(&row(22, "1.7.6")), false);
        assert_eq!(
            out.refusal(),
            Some(&Refusal::RequiresPreviousRelease { schema: 22 })
        );
        assert_eq!(
            out.refusal().unwrap().to_string(),
            "migrating from schema version 22 requires a previous SPIRE release; please follow the upgrade strategy at doc/upgrading.md"
        );
        assert_eq!(out.row_after(), Some(&row(22, "1.7.6")));
        assert!(!out.starts());
    }

    #[test]
    fn example_4_one_minor_older_runs_on_newer_schema() {
        let out = server_startup(release("1.14.7"), Some(&row(25, "1.15.3")), false);
        assert_eq!(
            out,
            StartupOutcome::SchemaAhead {
                row: row(25, "1.15.3")
            }
        );
        assert_eq!(out.warning(), Some(SCHEMA_AHEAD_WARNING));
    }

    #[test]
    fn example_5_two_minors_older_is_refused() {
        let out = server_startup(release("1.13.6"), Some(&row(25, "1.15.3")), false);
        assert_eq!(out.refusal(), Some(&Refusal::IncompatibleSchema));
        assert_eq!(
            out.refusal().unwrap().to_string(),
            "incompatible DB schema and code version"
        );
        assert_eq!(out.row_after(), Some(&row(25, "1.15.3")));
    }

    #[test]
    fn example_6_patch_downgrade_across_a_schema_bump() {
        let out = server_startup(release("1.14.2"), Some(&row(24, "1.14.3")), false);
        assert_eq!(
            out,
            StartupOutcome::SchemaAhead {
                row: row(24, "1.14.3")
            }
        );
    }

    #[test]
    fn example_7_disable_migration_starts_unmigrated() {
        let out = server_startup(release("1.15.3"), Some(&row(24, "1.14.7")), true);
        assert_eq!(
            out,
            StartupOutcome::StartedWithoutMigrating {
                row: row(24, "1.14.7")
            }
        );
    }

    #[test]
    fn example_8_disable_migration_two_minors_is_refused() {
        let out = server_startup(release("1.15.3"), Some(&row(23, "1.13.0")), true);
        assert_eq!(out.refusal(), Some(&Refusal::AutoMigrationRequired));
        assert_eq!(
            out.refusal().unwrap().to_string(),
            "auto-migration must be enabled for current DB"
        );
    }

    #[test]
    fn example_9_same_schema_never_lowers_code_version() {
        let out = server_startup(release("1.15.0"), Some(&row(25, "1.15.3")), false);
        assert_eq!(
            out,
            StartupOutcome::UpToDate {
                row: row(25, "1.15.3"),
                code_version_bumped: false
            }
        );
    }

    // ---- the other branches of migrateDB ----

    #[test]
    fn same_schema_raises_code_version() {
        let out = server_startup(release("1.15.3"), Some(&row(25, "1.15.0")), false);
        assert_eq!(
            out,
            StartupOutcome::UpToDate {
                row: row(25, "1.15.3"),
                code_version_bumped: true
            }
        );
        // also with disable_migration: step 4 comes before step 5
        let out = server_startup(release("1.15.3"), Some(&row(25, "1.13.0")), true);
        assert_eq!(out.row_after(), Some(&row(25, "1.15.3")));
        // dev build stored, release running: the release is higher
        let out = server_startup(
            release("1.14.2"),
            Some(&row(23, "1.14.2-dev-27d2083")),
            false,
        );
        assert_eq!(out.row_after(), Some(&row(23, "1.14.2")));
    }

    #[test]
    fn fresh_datastore_is_initialised() {
        let out = server_startup(release("1.14.3"), None, false);
        assert_eq!(
            out,
            StartupOutcome::Initialized {
                row: row(24, "1.14.3")
            }
        );
        assert!(out.changes_schema());
        // disable_migration does not stop initDB
        assert!(server_startup(release("1.14.3"), None, true).starts());
    }

    #[test]
    fn major_two_is_refused_even_on_a_fresh_datastore() {
        let two = Release {
            version: v("2.0.0"),
            date: None,
            schema: 26,
            min_schema: Some(25),
        };
        for r in [None, Some(row(25, "1.15.3"))] {
            let out = server_startup(&two, r.as_ref(), false);
            assert_eq!(out.refusal(), Some(&Refusal::UnsupportedMajor));
            assert_eq!(
                out.refusal().unwrap().to_string(),
                "current migration code not compatible with current release version"
            );
            assert_eq!(out.row_after(), r.as_ref());
        }
    }

    #[test]
    fn unparsable_code_version_is_refused_even_when_schema_matches() {
        let out = server_startup(release("1.15.3"), Some(&row(25, "banana")), false);
        assert_eq!(
            out.refusal(),
            Some(&Refusal::BadCodeVersion {
                value: "banana".into()
            })
        );
        assert!(
            out.refusal()
                .unwrap()
                .to_string()
                .starts_with("error getting DB code version")
        );
    }

    #[test]
    fn empty_code_version_is_zero_and_incompatible() {
        // migration on: schema is all that matters
        let out = server_startup(release("1.15.3"), Some(&row(23, "")), false);
        assert_eq!(out.row_after(), Some(&row(25, "1.15.3")));
        // migration off: 0.0.0 is not compatible with 1.15.3
        let out = server_startup(release("1.15.3"), Some(&row(24, "")), true);
        assert_eq!(out.refusal(), Some(&Refusal::AutoMigrationRequired));
        // schema ahead with 0.0.0
        let out = server_startup(release("1.14.7"), Some(&row(25, "")), false);
        assert_eq!(out.refusal(), Some(&Refusal::IncompatibleSchema));
    }

    #[test]
    fn disable_migration_comes_before_schema_ahead() {
        // compatible: starts without the warning
        let out = server_startup(release("1.14.7"), Some(&row(25, "1.15.3")), true);
        assert_eq!(
            out,
            StartupOutcome::StartedWithoutMigrating {
                row: row(25, "1.15.3")
            }
        );
        // incompatible: the disable_migration message, not the schema one
        let out = server_startup(release("1.13.6"), Some(&row(25, "1.15.3")), true);
        assert_eq!(out.refusal(), Some(&Refusal::AutoMigrationRequired));
    }

    #[test]
    fn migration_path_does_not_check_code_versions() {
        // stored code version far away, schema within reach: migrates
        let out = server_startup(release("1.15.3"), Some(&row(23, "1.11.0")), false);
        assert_eq!(out.row_after(), Some(&row(25, "1.15.3")));
    }

    #[test]
    fn minimum_schema_is_per_release() {
        // 1.7.0 still migrates from 19, 1.7.1 no longer does (raised in a patch)
        assert!(server_startup(release("1.7.0"), Some(&row(19, "1.6.5")), false).starts());
        let out = server_startup(release("1.7.1"), Some(&row(19, "1.6.5")), false);
        assert_eq!(
            out.refusal(),
            Some(&Refusal::RequiresPreviousRelease { schema: 19 })
        );
        // 1.0.x has no minimum
        let out = server_startup(release("1.0.0"), Some(&row(9, "0.8.1")), false);
        assert_eq!(out.row_after(), Some(&row(17, "1.0.0")));
        // a negative schema is unknown to every migration step
        let out = server_startup(release("1.0.0"), Some(&row(-1, "0.8.1")), false);
        assert_eq!(
            out.refusal(),
            Some(&Refusal::UnknownSchemaVersion { schema: -1 })
        );
        let out = server_startup(release("1.15.3"), Some(&row(-1, "1.15.3")), false);
        assert_eq!(
            out.refusal(),
            Some(&Refusal::RequiresPreviousRelease { schema: -1 })
        );
    }

    #[test]
    fn v1_0_accepts_a_0_12_code_version() {
        // 1.0.0 with disable_migration on a 0.12 datastore (schema 15)
        let out = server_startup(release("1.0.0"), Some(&row(15, "0.12.3")), true);
        assert!(out.starts());
        let out = server_startup(release("1.1.0"), Some(&row(15, "0.12.3")), true);
        assert_eq!(out.refusal(), Some(&Refusal::AutoMigrationRequired));
    }

    #[test]
    fn dev_build_runs_like_its_release() {
        let dev = Release {
            version: v("1.16.0-dev-abc123"),
            date: None,
            schema: 25,
            min_schema: Some(23),
        };
        let out = server_startup(&dev, Some(&row(25, "1.15.3")), false);
        assert_eq!(
            out,
            StartupOutcome::UpToDate {
                row: row(25, "1.16.0-dev-abc123"),
                code_version_bumped: true
            }
        );
    }

    #[test]
    fn outcome_serialises_with_tags() {
        let out = server_startup(release("1.13.6"), Some(&row(25, "1.15.3")), false);
        let json = serde_json::to_value(&out).unwrap();
        assert_eq!(json["outcome"], "refused");
        assert_eq!(json["refusal"]["refusal"], "incompatible_schema");
        assert_eq!(json["row"]["schema"], 25);
    }

    // ---- §5 policy ----

    #[test]
    fn one_minor_per_upgrade() {
        assert!(!upgrade_step_supported(&v("1.1.1"), &v("1.3.0")));
        assert!(upgrade_step_supported(&v("1.1.1"), &v("1.2.9")));
        assert!(upgrade_step_supported(&v("1.2.0"), &v("1.2.5")));
        assert!(upgrade_step_supported(&v("0.12.3"), &v("1.0.0")));
        assert!(!upgrade_step_supported(&v("0.11.0"), &v("1.0.0")));
        assert!(!upgrade_step_supported(&v("1.15.3"), &v("2.0.0")));
    }

    #[test]
    fn server_skew_is_newest_vs_oldest() {
        assert!(servers_within_skew(&[v("1.14.7"), v("1.15.3")]));
        assert!(servers_within_skew(&[
            v("1.15.0"),
            v("1.14.2"),
            v("1.15.3")
        ]));
        assert!(!servers_within_skew(&[
            v("1.13.6"),
            v("1.14.7"),
            v("1.15.3")
        ]));
        assert!(servers_within_skew(&[v("1.15.3")]));
        assert!(servers_within_skew(&[]));
        assert!(servers_within_skew(&[v("0.12.3"), v("1.0.0")]));
    }

    #[test]
    fn documented_agent_example() {
        // "servers at 1.2.3 and 1.2.2 support agents from 1.1.0 through 1.2.2"
        let servers = [v("1.2.3"), v("1.2.2")];
        for ok in ["1.1.0", "1.1.9", "1.2.0", "1.2.2", "1.2.2-dev-abc"] {
            assert!(agent_supported(&v(ok), &servers), "{ok}");
        }
        for bad in ["1.0.9", "1.2.3", "1.3.0", "0.12.0", "2.0.0"] {
            assert!(!agent_supported(&v(bad), &servers), "{bad}");
        }
        // the 0.12.x exception
        assert!(agent_supported(&v("0.12.3"), &[v("1.0.0")]));
        assert!(!agent_supported(&v("0.11.0"), &[v("1.0.0")]));
        assert!(!agent_supported(&v("1.0.0"), &[]));
    }
}
