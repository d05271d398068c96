//! `spirekeep check`: can this SPIRE deployment get to a target release, and
//! how? A pure function from facts (the `migrations` row, server and agent
//! versions, `disable_migration`) to a report with a verdict, a path and
//! findings that each name their way out.
//!
//! Findings are **mandatory** when SPIRE would refuse to start (or data would
//! be lost) and **skippable** when SPIRE would run but the documented policy
//! (spire-reference §5) is not met. A skippable finding stops the check unless
//! the caller allows its code explicitly ([`CheckInput::allow`]). Two
//! skippable codes also relax the path itself: `minor_skip` lets hops move
//! more than one minor where SPIRE's start-up rules permit it, `agent_skew`
//! stops the path from moving agents between hops.

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::str::FromStr;

use semver::Version;
use serde::{Deserialize, Serialize};

use super::path::{
    AgentMove, AgentSkew, Direction, Hop, HopKind, Path, PathError, PathOptions, PathStart,
    plan_path,
};
use super::releases::ReleaseTable;
use super::rules::{MigrationRow, StartupOutcome, server_startup, servers_within_skew};
use super::version::{agent_floor, minor_line, newest, oldest, parse_code_version, precedence};

/// Everything `check` needs to know. All versions are strings as found (the
/// CLI's flags, the datastore's columns) so the struct can be built from
/// JSON; `check` validates them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckInput {
    /// The SPIRE release to get to, e.g. `1.15.3` (a leading `v` is accepted).
    pub target: String,
    /// The datastore's `migrations` row; `None` for a fresh datastore (or one
    /// spirekeep could not read; then give `servers`).
    #[serde(default)]
    pub datastore: Option<MigrationRow>,
    /// The `disable_migration` setting of the SQL `DataStore` plugin.
    #[serde(default)]
    pub disable_migration: bool,
    /// The versions the SPIRE servers run, one entry per server. Empty: the
    /// servers are assumed to run the datastore's `code_version`.
    #[serde(default)]
    pub servers: Vec<String>,
    /// Agents by reported version (`attested_node_entries.agent_version`,
    /// grouped). An empty version is an agent that did not report one
    /// (agents before 1.14.3 do not).
    #[serde(default)]
    pub agents: Vec<AgentCount>,
    /// Skippable finding codes the caller accepts (`--allow <code>`).
    #[serde(default)]
    pub allow: Vec<String>,
}

/// A number of agents reporting one version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentCount {
    /// The reported version; empty when the agent did not report one.
    pub version: String,
    /// How many agents.
    pub count: u64,
}

/// Whether a finding can be skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// SPIRE would refuse to start, or data would be lost. Never skippable.
    Mandatory,
    /// Outside SPIRE's documented policy, but SPIRE would run. Skipped only
    /// when the caller allows the code.
    Skippable,
}

macro_rules! finding_codes {
    ($($variant:ident => $code:literal, $severity:ident, $about:literal;)*) => {
        /// The stable code of a finding (`snake_case` in text and JSON).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum FindingCode {
            $(#[doc = $about] $variant,)*
        }

        impl FindingCode {
            /// Every code, mandatory ones first.
            pub const ALL: &'static [FindingCode] = &[$(FindingCode::$variant),*];

            /// The code as written in reports and `--allow`.
            #[must_use]
            pub fn as_str(self) -> &'static str {
                match self { $(FindingCode::$variant => $code,)* }
            }

            /// Whether findings with this code can be skipped.
            #[must_use]
            pub fn severity(self) -> Severity {
                match self { $(FindingCode::$variant => Severity::$severity,)* }
            }

            /// One line on what the code means, for help texts.
            #[must_use]
            pub fn about(self) -> &'static str {
                match self { $(FindingCode::$variant => $about,)* }
            }
        }

        impl FromStr for FindingCode {
            type Err = ();
            fn from_str(s: &str) -> Result<Self, ()> {
                match s { $($code => Ok(FindingCode::$variant),)* _ => Err(()) }
            }
        }
    };
}

finding_codes! {
    UnknownRelease => "unknown_release", Mandatory,
        "The target is not in spirekeep's release table.";
    IncompleteDatastore => "incomplete_datastore", Mandatory,
        "SPIRE's tables without a `migrations` row: SPIRE never finished creating the datastore.";
    BadCodeVersion => "bad_code_version", Mandatory,
        "`migrations.code_version` does not parse; every SPIRE server refuses to start.";
    NoUpgradePath => "no_upgrade_path", Mandatory,
        "No sequence of known releases gets the datastore to the target.";
    DowngradeRefused => "downgrade_refused", Mandatory,
        "SPIRE cannot run the target on this datastore (no down migrations).";
    AutoMigrationRequired => "auto_migration_required", Mandatory,
        "With `disable_migration = true` a server on the path refuses to start.";
    MinorSkip => "minor_skip", Skippable,
        "A hop moves more than one minor (allowing it lets the path do so where SPIRE accepts it).";
    NotRollingSafe => "not_rolling_safe", Skippable,
        "Servers still on the old release cannot restart once the new one changed the datastore.";
    AgentSkew => "agent_skew", Skippable,
        "Agents outside the skew window (allowing it stops the path from moving agents between hops).";
    AgentVersionUnknown => "agent_version_unknown", Skippable,
        "Agents that did not report a version cannot be checked against the skew policy.";
    ServerSkew => "server_skew", Skippable,
        "Servers more than one minor apart.";
    ServersNewerThanTarget => "servers_newer_than_target", Skippable,
        "Some servers run a release newer than the target.";
    MigrationDisabled => "migration_disabled", Skippable,
        "With `disable_migration = true`, servers would run on an unmigrated schema.";
    CurrentVersionUnknown => "current_version_unknown", Skippable,
        "The servers' version is unknown, so the one-minor rule cannot be checked.";
    DatastoreUnknown => "datastore_unknown", Skippable,
        "No migrations row was given while servers run; the path assumes one.";
}

impl std::fmt::Display for FindingCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One problem, with its way out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Stable code.
    pub code: FindingCode,
    /// Mandatory or skippable.
    pub severity: Severity,
    /// One line: what is wrong.
    pub message: String,
    /// One line: what to do about it, concretely.
    pub way_out: String,
    /// Whether the caller allowed (skipped) it.
    pub allowed: bool,
}

/// The answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Upgrade the servers to the target (then the agents), or nothing to do.
    Ok,
    /// Possible, through the steps of the path.
    NeedsSteps,
    /// Not possible as things stand: a mandatory finding, or a skippable one
    /// that was not allowed.
    Refused,
}

/// What `check` found before deciding anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CurrentState {
    /// The `migrations` row (given, or assumed when `datastore_assumed`).
    pub datastore: Option<MigrationRow>,
    /// Whether the row was assumed from the newest server's release.
    pub datastore_assumed: bool,
    /// Which releases write the datastore's schema, e.g. `1.14.3–1.14.7`.
    pub schema_written_by: Option<String>,
    /// Server versions, sorted.
    pub servers: Vec<String>,
    /// Whether the servers were assumed to run the datastore's `code_version`.
    pub servers_assumed: bool,
    /// Agents with a known version, merged and sorted.
    pub agents: Vec<AgentCount>,
    /// Agents that did not report a (parsable) version.
    pub agents_unknown: u64,
    /// The `disable_migration` setting.
    pub disable_migration: bool,
}

/// The result of [`check`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    /// The target as parsed.
    pub target: String,
    /// The facts.
    pub current: CurrentState,
    /// The answer.
    pub verdict: Verdict,
    /// How to get there; `None` when no path could be computed.
    pub path: Option<Path>,
    /// Problems, mandatory first.
    pub findings: Vec<Finding>,
    /// Information that does not change the verdict.
    pub notes: Vec<String>,
}

/// Input `check` cannot work with (a usage error, not a finding).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// The target is not a version.
    #[error("target {value:?} is not a SPIRE version such as 1.15.3: {reason}")]
    InvalidTarget {
        /// As given.
        value: String,
        /// Parser message.
        reason: String,
    },
    /// A server version is not a version.
    #[error("server version {value:?} is not a SPIRE version such as 1.15.3: {reason}")]
    InvalidServerVersion {
        /// As given.
        value: String,
        /// Parser message.
        reason: String,
    },
    /// `--allow` names no finding code.
    #[error("--allow {code}: no such finding code; skippable codes are: {skippable}")]
    UnknownCode {
        /// As given.
        code: String,
        /// The codes that can be allowed.
        skippable: String,
    },
    /// `--allow` names a mandatory code.
    #[error(
        "--allow {code}: {code} is mandatory (SPIRE would refuse to start or data would be lost) and cannot be skipped"
    )]
    NotSkippable {
        /// The code.
        code: FindingCode,
    },
}

/// Checks `input` against spirekeep's built-in release table.
///
/// # Errors
///
/// [`CheckError`] when the target or a server version is not a version, or
/// `allow` names an unknown or mandatory code.
pub fn check(input: &CheckInput) -> Result<CheckReport, CheckError> {
    check_with(ReleaseTable::builtin(), input)
}

/// [`check`] against a given release table.
///
/// # Errors
///
/// As [`check`].
pub fn check_with(table: &ReleaseTable, input: &CheckInput) -> Result<CheckReport, CheckError> {
    let target = parse_user_version(&input.target).map_err(|reason| CheckError::InvalidTarget {
        value: input.target.clone(),
        reason,
    })?;
    let allow = parse_allow(&input.allow)?;
    let mut given_servers = input
        .servers
        .iter()
        .map(|s| {
            parse_user_version(s).map_err(|reason| CheckError::InvalidServerVersion {
                value: s.clone(),
                reason,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    given_servers.sort_by(precedence);
    Ok(Checker {
        table,
        input,
        target,
        allow,
        findings: Vec::new(),
        notes: Vec::new(),
    }
    .run(given_servers))
}

/// The report for a datastore that has SPIRE's tables but no `migrations`
/// row (an empty or missing table): no path is computed, because any path
/// from an invented row would be fiction; the verdict is `refused` with one
/// mandatory finding. `description` says what the datastore is.
///
/// # Errors
///
/// As [`check`], for the target, server versions and `allow` codes.
pub fn check_incomplete_datastore(
    input: &CheckInput,
    description: &str,
) -> Result<CheckReport, CheckError> {
    let mut report = check(&CheckInput {
        datastore: None,
        ..input.clone()
    })?;
    report.current.datastore = None;
    report.current.datastore_assumed = false;
    report.current.schema_written_by = None;
    report.verdict = Verdict::Refused;
    report.path = None;
    report.notes.clear();
    report.findings = vec![Finding {
        code: FindingCode::IncompleteDatastore,
        severity: Severity::Mandatory,
        message: description.to_owned(),
        way_out: "restore the newest snapshot taken before this happened (spirekeep restore ID --replace, servers stopped), or if you know the release that last ran on it, write its row (INSERT INTO migrations (id, version, code_version) VALUES (1, SCHEMA, 'VERSION')) and run check again".to_owned(),
        allowed: false,
    }];
    Ok(report)
}

/// Versions typed by a person: strict semver, with a tolerated leading `v`
/// (git tags are `v1.15.3`).
fn parse_user_version(value: &str) -> Result<Version, String> {
    let trimmed = value.trim();
    let bare = trimmed.strip_prefix('v').unwrap_or(trimmed);
    Version::parse(bare).map_err(|e| e.to_string())
}

fn parse_allow(codes: &[String]) -> Result<BTreeSet<FindingCode>, CheckError> {
    codes
        .iter()
        .map(|c| {
            let code = FindingCode::from_str(c.trim()).map_err(|()| CheckError::UnknownCode {
                code: c.clone(),
                skippable: FindingCode::ALL
                    .iter()
                    .filter(|c| c.severity() == Severity::Skippable)
                    .map(|c| c.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
            if code.severity() == Severity::Mandatory {
                return Err(CheckError::NotSkippable { code });
            }
            Ok(code)
        })
        .collect()
}

struct Checker<'a> {
    table: &'a ReleaseTable,
    input: &'a CheckInput,
    target: Version,
    allow: BTreeSet<FindingCode>,
    findings: Vec<Finding>,
    notes: Vec<String>,
}

impl Checker<'_> {
    fn add(&mut self, code: FindingCode, message: String, way_out: String) {
        let severity = code.severity();
        self.findings.push(Finding {
            code,
            severity,
            message,
            way_out,
            allowed: severity == Severity::Skippable && self.allow.contains(&code),
        });
    }

    /// The stored code version; SPIRE refuses to start if it does not parse.
    /// `Err(())` when it does not (the finding is recorded).
    fn stored_code_version(&mut self) -> Result<Option<Version>, ()> {
        let Some(row) = &self.input.datastore else {
            return Ok(None);
        };
        match parse_code_version(&row.code_version) {
            Ok(v) => Ok(Some(v)),
            Err(e) => {
                self.add(
                    FindingCode::BadCodeVersion,
                    format!(
                        "migrations.code_version is {:?}, which SPIRE cannot parse: every server fails with \"{e}\"",
                        row.code_version
                    ),
                    "set migrations.code_version to the SPIRE version that last ran on this datastore (plain semver such as 1.15.3), after taking a backup".into(),
                );
                Err(())
            }
        }
    }

    /// The datastore row as given, else assumed from the newest server; and
    /// whether it was assumed.
    fn datastore_row(&mut self, servers: &[Version]) -> (Option<MigrationRow>, bool) {
        match (&self.input.datastore, newest(servers)) {
            (Some(row), _) => (Some(row.clone()), false),
            (None, Some(newest)) => {
                let assumed = self
                    .table
                    .get(newest)
                    .map(|r| MigrationRow::new(r.schema, newest.to_string()));
                let message = match &assumed {
                    Some(row) => format!(
                        "servers run but no migrations row was given: the path assumes ({}, {}), what SPIRE {newest} writes",
                        row.schema, row.code_version
                    ),
                    None => format!(
                        "servers run but no migrations row was given, and {newest} is not in the release table: the path treats the datastore as fresh"
                    ),
                };
                self.add(
                    FindingCode::DatastoreUnknown,
                    message,
                    "point spirekeep at the datastore so it reads the real migrations row".into(),
                );
                let is_assumed = assumed.is_some();
                (assumed, is_assumed)
            }
            (None, None) => (None, false),
        }
    }

    fn run(mut self, given_servers: Vec<Version>) -> CheckReport {
        let input = self.input;
        let (agents, agents_unknown) = split_agents(&input.agents);
        let stored = self.stored_code_version();
        let bad_code_version = stored.is_err();

        // Servers: as given, else assumed at the stored code version.
        let zero = Version::new(0, 0, 0);
        let (servers, servers_assumed) = match (stored, given_servers.is_empty()) {
            (_, false) => (given_servers, false),
            (Ok(Some(v)), true) if v != zero => (vec![v], true),
            _ => (Vec::new(), false),
        };
        let (row, datastore_assumed) = self.datastore_row(&servers);

        let current = CurrentState {
            schema_written_by: row
                .as_ref()
                .and_then(|r| self.table.describe_schema(r.schema)),
            datastore: row.clone(),
            datastore_assumed,
            servers: servers.iter().map(ToString::to_string).collect(),
            servers_assumed,
            agents: agents
                .iter()
                .map(|(v, n)| AgentCount {
                    version: v.to_string(),
                    count: *n,
                })
                .collect(),
            agents_unknown,
            disable_migration: input.disable_migration,
        };

        let target_known = self.table.get(&self.target).is_some();
        if !target_known {
            self.unknown_target();
        }
        self.server_findings(&servers);
        let start_server = self.start_server(&servers, row.as_ref().filter(|_| !bad_code_version));

        let mut path = None;
        if target_known && !bad_code_version {
            let options = PathOptions {
                one_minor_per_hop: !self.allow.contains(&FindingCode::MinorSkip),
                keep_agents_in_skew: !self.allow.contains(&FindingCode::AgentSkew),
            };
            let start = PathStart {
                server: start_server.clone(),
                row: row.clone(),
                agents: agents.clone(),
            };
            match plan_path(self.table, &start, &self.target, options) {
                Ok(p) => {
                    self.path_findings(&p, row.as_ref(), agents_unknown);
                    self.path_notes(&p, &start, &servers, &agents, options);
                    path = Some(p);
                }
                Err(e) => self.path_error(&e, row.as_ref()),
            }
        }

        // mandatory first, then in the order found
        self.findings.sort_by_key(|f| f.severity);
        let blocked = self
            .findings
            .iter()
            .any(|f| f.severity == Severity::Mandatory || !f.allowed);
        let verdict = match &path {
            _ if blocked => Verdict::Refused,
            None => Verdict::Refused,
            Some(p) if p.needs_steps() => Verdict::NeedsSteps,
            Some(_) => Verdict::Ok,
        };
        CheckReport {
            target: self.target.to_string(),
            current,
            verdict,
            path,
            findings: self.findings,
            notes: self.notes,
        }
    }

    fn unknown_target(&mut self) {
        let newest = &self.table.newest().version;
        let target = &self.target;
        let way_out = if precedence(target, newest) == Ordering::Greater {
            format!(
                "choose a known release (newest: {newest}), or add {target} to migrations-check/releases.csv (one line: version, date, schema, min_schema from its migration.go) and rebuild spirekeep"
            )
        } else if let Some(same_line) = self.table.newest_in_line(target.major, target.minor) {
            format!(
                "choose a release listed in migrations-check/releases.csv, e.g. {} (newest known {})",
                same_line.version,
                minor_line(target)
            )
        } else {
            format!(
                "choose a release listed in migrations-check/releases.csv ({} to {newest})",
                self.table.oldest().version
            )
        };
        self.add(
            FindingCode::UnknownRelease,
            format!(
                "SPIRE {target} is not in spirekeep's release table ({} to {newest}); spirekeep does not guess its schema",
                self.table.oldest().version
            ),
            way_out,
        );
    }

    fn server_findings(&mut self, servers: &[Version]) {
        if servers_within_skew(servers) {
            return;
        }
        let (Some(old), Some(new)) = (oldest(servers), newest(servers)) else {
            return;
        };
        let next = self
            .table
            .newest_in_line(old.major, old.minor + 1)
            .map_or_else(
                || format!("{}.{}.x", old.major, old.minor + 1),
                |r| r.version.to_string(),
            );
        self.add(
            FindingCode::ServerSkew,
            format!(
                "servers run {old} and {new}, more than one minor apart (SPIRE supports +/-1 minor between the newest and the oldest server)"
            ),
            format!("bring the {} servers up to {next} first; the path starts with them", minor_line(old)),
        );
    }

    /// The oldest server for an upgrade, the newest for a downgrade.
    fn start_server(&mut self, servers: &[Version], row: Option<&MigrationRow>) -> Option<Version> {
        let (Some(old), Some(new)) = (oldest(servers), newest(servers)) else {
            if row.is_some() {
                self.add(
                    FindingCode::CurrentVersionUnknown,
                    "the servers' version is unknown (none given and the datastore's code_version is empty), so the one-minor-per-upgrade rule cannot be checked; the first hop is chosen by schema alone".into(),
                    "give the running servers' versions (spire-server --version)".into(),
                );
            }
            return None;
        };
        let target = &self.target;
        if precedence(target, new) != Ordering::Less {
            return Some(old.clone());
        }
        if precedence(target, old) != Ordering::Greater {
            return Some(new.clone());
        }
        let newer: Vec<String> = servers
            .iter()
            .filter(|s| precedence(s, target) == Ordering::Greater)
            .map(ToString::to_string)
            .collect();
        self.add(
            FindingCode::ServersNewerThanTarget,
            format!(
                "{} server(s) run {}, newer than the target {target}, while others run {old}: the path only upgrades the older ones",
                newer.len(),
                group_strings(&newer)
            ),
            format!(
                "choose {new} as the target, or downgrade those servers to {target} afterwards (agents first)"
            ),
        );
        Some(old.clone())
    }

    fn path_error(&mut self, error: &PathError, row: Option<&MigrationRow>) {
        match error {
            PathError::UnknownRelease { .. } => self.unknown_target(),
            PathError::BadCodeVersion(e) => self.add(
                FindingCode::BadCodeVersion,
                e.to_string(),
                "set migrations.code_version to the SPIRE version that last ran on this datastore"
                    .into(),
            ),
            PathError::NoUpgradePath { from, schema, .. } => {
                let way_out = if from
                    .as_ref()
                    .is_some_and(|f| precedence(f, &Version::new(0, 12, 0)) == Ordering::Less)
                {
                    "upgrade to 0.12.x first, following SPIRE's doc/upgrading.md (spirekeep's release table starts at 1.0.0)".to_owned()
                } else if let Some(r) = schema.and_then(|s| {
                    self.table
                        .releases()
                        .iter()
                        .rev()
                        .find(|r| r.migrates_from(s) && r.schema >= s)
                }) {
                    format!(
                        "the newest release that can migrate schema {} is {}: get the servers there one minor at a time (SPIRE's doc/upgrading.md)",
                        schema.unwrap_or_default(),
                        r.version
                    )
                } else {
                    "follow SPIRE's doc/upgrading.md; if a release is missing from migrations-check/releases.csv, add it".into()
                };
                self.add(FindingCode::NoUpgradePath, error.to_string(), way_out);
            }
            PathError::DowngradeRefused { from, .. } => {
                let accepted = self.table.releases().iter().find(|r| {
                    precedence(&r.version, from) == Ordering::Less
                        && server_startup(r, row, false).starts()
                });
                let target = &self.target;
                let schema = self.table.get(target).map(|r| r.schema);
                let mut way_out = format!(
                    "SPIRE has no down migrations: restore a datastore backup taken while the servers ran {}{}",
                    minor_line(target),
                    schema.map_or_else(String::new, |s| format!(" (schema {s})"))
                );
                if let Some(r) = accepted {
                    let _ = write!(
                        way_out,
                        ", or downgrade no further than {} (the oldest release SPIRE runs on this datastore)",
                        r.version
                    );
                }
                self.add(FindingCode::DowngradeRefused, error.to_string(), way_out);
            }
        }
    }

    fn path_findings(
        &mut self,
        path: &Path,
        start_row: Option<&MigrationRow>,
        agents_unknown: u64,
    ) {
        for hop in &path.hops {
            self.minor_skip(hop);
            self.rolling(hop);
        }
        for skew in &path.agent_skew {
            self.agent_skew(path, skew);
        }
        if agents_unknown > 0 {
            self.unknown_agents(path, agents_unknown);
        }
        if self.input.disable_migration {
            self.disabled_migration(path, start_row);
        }
    }

    fn minor_skip(&mut self, hop: &Hop) {
        let (Some(gap), Some(from)) = (hop.minor_gap, &hop.from) else {
            return;
        };
        if gap <= 1 {
            return;
        }
        let stones: Vec<String> = (from.minor + 1..hop.to.minor)
            .filter_map(|m| self.table.newest_in_line(hop.to.major, m))
            .map(|r| r.version.to_string())
            .collect();
        self.add(
            FindingCode::MinorSkip,
            format!(
                "the hop {from} -> {} moves {gap} minors; SPIRE's policy is one minor per upgrade (its start-up code accepts this hop)",
                hop.to
            ),
            format!(
                "upgrade through {} instead (do not allow minor_skip)",
                stones.join(", ")
            ),
        );
    }

    fn rolling(&mut self, hop: &Hop) {
        if hop.old_servers_can_restart != Some(false) {
            return;
        }
        let Some(from) = &hop.from else {
            return;
        };
        let refusal = self
            .table
            .get(from)
            .map(|old| server_startup(old, hop.startup.row_after(), false))
            .and_then(|out| out.refusal().map(ToString::to_string))
            .unwrap_or_default();
        self.add(
            FindingCode::NotRollingSafe,
            format!(
                "once the first {} server changes the datastore, servers still on {from} fail to restart: \"{refusal}\"",
                hop.to
            ),
            format!(
                "stop every {from} server before starting {} (no rolling upgrade for this hop), or go one minor at a time",
                hop.to
            ),
        );
    }

    fn agent_skew(&mut self, path: &Path, skew: &AgentSkew) {
        let lines = skew.from_lines.join(", ");
        let when = if skew.before_hop < path.hops.len() {
            format!("during the hop to {}", path.hops[skew.before_hop].to)
        } else {
            format!("with the servers at {}", skew.servers_at)
        };
        let message = format!(
            "{} agents ({lines}) would be outside the skew window {when} (agents may be at most one minor older than the oldest server, never newer)",
            skew.count
        );
        let way_out = if skew.unavoidable {
            "upgrade one minor at a time so the agents can follow (do not allow minor_skip)"
                .to_owned()
        } else {
            let to = path
                .hops
                .get(skew.before_hop)
                .and_then(|h| h.from.clone())
                .unwrap_or_else(|| skew.servers_at.clone());
            format!(
                "move these {} agents ({lines}) to {to} first (do not allow agent_skew)",
                skew.count
            )
        };
        self.add(FindingCode::AgentSkew, message, way_out);
    }

    fn unknown_agents(&mut self, path: &Path, count: u64) {
        // the window of the first hop with known servers, else of the target
        let (floor, top, when) = path
            .hops
            .iter()
            .find_map(|h| {
                let from = h.from.as_ref()?;
                let top = if precedence(&h.to, from) == Ordering::Less {
                    h.to.clone()
                } else {
                    from.clone()
                };
                Some((
                    agent_floor(&h.to),
                    top,
                    format!("before the hop to {}", h.to),
                ))
            })
            .unwrap_or_else(|| {
                (
                    agent_floor(&self.target),
                    self.target.clone(),
                    format!("with the servers at {}", self.target),
                )
            });
        let range = match floor {
            Some(floor) => format!("{floor} to {top}"),
            None => top.to_string(),
        };
        self.add(
            FindingCode::AgentVersionUnknown,
            format!(
                "{count} agents did not report a version (agents older than 1.14.3 do not, and a datastore below schema 24 has no agent_version), so they cannot be checked against the skew policy"
            ),
            format!(
                "check them (spire-agent --version, or the version label of spire_agent_started) and make sure they run {range} {when}; then allow agent_version_unknown"
            ),
        );
    }

    /// Replays the path with `disable_migration = true`.
    fn disabled_migration(&mut self, path: &Path, start_row: Option<&MigrationRow>) {
        let migrating: Vec<String> = path
            .hops
            .iter()
            .filter(|h| h.startup.changes_schema())
            .map(|h| h.to.to_string())
            .collect();
        if migrating.is_empty() {
            return;
        }
        let list = migrating.join(", ");
        let mut row = start_row.cloned();
        let mut unmigrated = Vec::new();
        for hop in &path.hops {
            let Some(release) = self.table.get(&hop.to) else {
                return;
            };
            let out = server_startup(release, row.as_ref(), true);
            if let StartupOutcome::Refused { refusal, .. } = &out {
                let at = row.as_ref().map_or_else(
                    || "a fresh datastore".to_owned(),
                    |r| format!("({}, {})", r.schema, r.code_version),
                );
                self.add(
                    FindingCode::AutoMigrationRequired,
                    format!(
                        "with disable_migration = true, SPIRE {} refuses to start on {at}: \"{refusal}\"",
                        hop.to
                    ),
                    format!(
                        "set disable_migration = false on one server for the hop(s) to {list}, which migrate the schema; the other servers can keep it"
                    ),
                );
                return;
            }
            if matches!(out, StartupOutcome::StartedWithoutMigrating { .. })
                && hop.startup.changes_schema()
            {
                unmigrated.push(hop.to.to_string());
            }
            row = out.row_after().cloned();
        }
        if !unmigrated.is_empty() {
            let schema = row.as_ref().map_or(0, |r| r.schema);
            self.add(
                FindingCode::MigrationDisabled,
                format!(
                    "with disable_migration = true, {} would start without migrating: the datastore stays at schema {schema}",
                    unmigrated.join(", ")
                ),
                format!(
                    "set disable_migration = false on one server for the hop(s) to {list}; the other servers can keep it"
                ),
            );
        }
    }

    fn path_notes(
        &mut self,
        path: &Path,
        start: &PathStart,
        servers: &[Version],
        agents: &[(Version, u64)],
        options: PathOptions,
    ) {
        if path.direction == Direction::Install
            && let Some(row) = path.row_after(None)
        {
            self.notes.push(format!(
                "fresh datastore: SPIRE {} creates schema {} on first start",
                self.target, row.schema
            ));
        }
        for hop in &path.hops {
            if let Some(warning) = hop.startup.warning() {
                let schema = hop.startup.row_after().map_or(0, |r| r.schema);
                self.notes.push(format!(
                    "at {} SPIRE runs on the newer schema {schema} and logs \"{warning}\"",
                    hop.to
                ));
            }
        }
        if let Some(old) = oldest(servers)
            && path.direction != Direction::Downgrade
        {
            let newer: u64 = agents
                .iter()
                .filter(|(v, _)| precedence(v, old) == Ordering::Greater)
                .map(|(_, n)| *n)
                .sum();
            if newer > 0 {
                self.notes.push(format!(
                    "{newer} agents run a version newer than the oldest server {old} (servers go first); the server hops bring the servers level"
                ));
            }
        }
        if options.one_minor_per_hop && path.hops.len() > 1 {
            let relaxed = PathOptions {
                one_minor_per_hop: false,
                ..options
            };
            if let Ok(short) = plan_path(self.table, start, &self.target, relaxed)
                && short.hops.len() < path.hops.len()
            {
                let hops: Vec<String> = short.hops.iter().map(|h| h.to.to_string()).collect();
                self.notes.push(format!(
                    "SPIRE's start-up rules alone would accept the shorter path {}; the documented policy is one minor per upgrade (allow minor_skip to use it)",
                    hops.join(" -> ")
                ));
            }
        }
    }
}

/// Splits agent counts into known versions (merged, sorted) and a count of
/// agents without a usable version.
fn split_agents(agents: &[AgentCount]) -> (Vec<(Version, u64)>, u64) {
    let mut known: Vec<(Version, u64)> = Vec::new();
    let mut unknown = 0u64;
    for a in agents {
        match Version::parse(a.version.trim()) {
            Ok(v) if !a.version.trim().is_empty() => {
                match known
                    .iter_mut()
                    .find(|(k, _)| precedence(k, &v) == Ordering::Equal)
                {
                    Some((_, n)) => *n = n.saturating_add(a.count),
                    None => known.push((v, a.count)),
                }
            }
            _ => unknown = unknown.saturating_add(a.count),
        }
    }
    known.retain(|(_, n)| *n > 0);
    known.sort_by(|a, b| precedence(&a.0, &b.0));
    (known, unknown)
}

/// Renders a report for people: current state, verdict, path, findings and
/// notes, as aligned plain text.
#[must_use]
pub fn render_human(report: &CheckReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "SPIRE compatibility check, target {}", report.target);
    out.push('\n');
    let incomplete = report
        .findings
        .iter()
        .any(|f| f.code == FindingCode::IncompleteDatastore);
    render_current(&mut out, &report.current, incomplete);
    out.push('\n');

    let verdict = match report.verdict {
        Verdict::Ok => "OK",
        Verdict::NeedsSteps => "NEEDS STEPS: follow the path below",
        Verdict::Refused => "REFUSED: see the findings below",
    };
    let _ = writeln!(out, "Verdict: {verdict}");

    if let Some(path) = &report.path {
        out.push('\n');
        out.push_str("Path\n");
        let steps = path_steps(path);
        if steps.is_empty() {
            out.push_str("  nothing to do: the servers already run the target\n");
        }
        let who_width = steps.iter().map(|(w, _)| w.len()).max().unwrap_or(0);
        for (i, (who, what)) in steps.iter().enumerate() {
            let _ = writeln!(out, "  {:>2}. {who:<who_width$}  {what}", i + 1);
        }
    }

    if !report.findings.is_empty() {
        out.push('\n');
        out.push_str("Findings\n");
        let code_width = report
            .findings
            .iter()
            .map(|f| f.code.as_str().len())
            .max()
            .unwrap_or(0);
        for f in &report.findings {
            let severity = match (f.severity, f.allowed) {
                (Severity::Mandatory, _) => "mandatory",
                (Severity::Skippable, false) => "skippable",
                (Severity::Skippable, true) => "allowed",
            };
            let _ = writeln!(
                out,
                "  {severity:<9}  {:<code_width$}  {}",
                f.code.as_str(),
                f.message
            );
            let _ = writeln!(
                out,
                "  {:<9}  {:<code_width$}  way out: {}",
                "", "", f.way_out
            );
        }
    }

    if !report.notes.is_empty() {
        out.push('\n');
        out.push_str("Notes\n");
        for n in &report.notes {
            let _ = writeln!(out, "  - {n}");
        }
    }
    out
}

fn render_current(out: &mut String, c: &CurrentState, incomplete: bool) {
    out.push_str("Current state\n");
    let datastore = match &c.datastore {
        None if incomplete => {
            "SPIRE's tables without a migrations row (never finished creating)".to_owned()
        }
        None => "fresh (no migrations row)".to_owned(),
        Some(row) => {
            let mut s = format!("schema {}, code_version {:?}", row.schema, row.code_version);
            if let Some(by) = &c.schema_written_by {
                let _ = write!(s, " (the schema of SPIRE {by})");
            }
            if c.datastore_assumed {
                s.push_str(" [assumed]");
            }
            s
        }
    };
    field(out, "datastore", &datastore);
    let servers = if c.servers.is_empty() {
        "unknown".to_owned()
    } else {
        let mut s = group_strings(&c.servers);
        if c.servers_assumed {
            s.push_str(" (assumed from the datastore's code_version)");
        }
        s
    };
    field(out, "servers", &servers);
    let mut agents: Vec<String> = c
        .agents
        .iter()
        .map(|a| format!("{} x {}", a.count, a.version))
        .collect();
    if c.agents_unknown > 0 {
        agents.push(format!("{} without a reported version", c.agents_unknown));
    }
    let agents = if agents.is_empty() {
        "none known".to_owned()
    } else {
        agents.join(", ")
    };
    field(out, "agents", &agents);
    field(out, "disable_migration", &c.disable_migration.to_string());
}

fn field(out: &mut String, name: &str, value: &str) {
    let _ = writeln!(out, "  {name:<17}  {value}");
}

/// "2 x 1.14.7, 1 x 1.15.3" for repeated entries, else a plain list.
fn group_strings(items: &[String]) -> String {
    let mut groups: Vec<(&str, usize)> = Vec::new();
    for item in items {
        match groups.iter_mut().find(|(s, _)| *s == item) {
            Some((_, n)) => *n += 1,
            None => groups.push((item, 1)),
        }
    }
    groups
        .iter()
        .map(|(s, n)| {
            if *n == 1 {
                (*s).to_owned()
            } else {
                format!("{n} x {s}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn path_steps(path: &Path) -> Vec<(&'static str, String)> {
    let mut steps = Vec::new();
    let servers: Vec<(String, String)> = path.hops.iter().map(server_step).collect();
    let width = servers
        .iter()
        .map(|(what, _)| what.len())
        .max()
        .unwrap_or(0);
    for (hop, (what, effect)) in path.hops.iter().zip(servers) {
        if let Some(m) = &hop.agents_before {
            steps.push(("agents", agent_step(m)));
        }
        steps.push(("servers", format!("{what:<width$}  {effect}")));
    }
    if let Some(m) = &path.agents_last {
        steps.push(("agents", agent_step(m)));
    }
    steps
}

fn server_step(hop: &Hop) -> (String, String) {
    let what = match (hop.kind, &hop.from) {
        (HopKind::Install, _) => format!("install {}", hop.to),
        (HopKind::MigrateInPlace, _) => {
            format!("restart {} with disable_migration = false", hop.to)
        }
        (HopKind::Upgrade | HopKind::Downgrade, Some(from)) => format!("{from} -> {}", hop.to),
        (HopKind::Upgrade | HopKind::Downgrade, None) => format!("? -> {}", hop.to),
    };
    let mut effect = startup_effect(&hop.startup);
    if hop.old_servers_can_restart == Some(false) {
        effect.push_str("; stop the old servers first");
    }
    (what, effect)
}

fn agent_step(m: &AgentMove) -> String {
    let verb = "move";
    let tail = if m.required { "" } else { " (recommended)" };
    format!(
        "{verb} {} agents ({}) to {}{tail}",
        m.count,
        m.from_lines.join(", "),
        m.to
    )
}

fn startup_effect(out: &StartupOutcome) -> String {
    match out {
        StartupOutcome::Initialized { row } => format!(
            "creates schema {}; row ({}, {})",
            row.schema, row.schema, row.code_version
        ),
        StartupOutcome::Migrated { from_schema, row } => format!(
            "migrates schema {from_schema} -> {}; row becomes ({}, {})",
            row.schema, row.schema, row.code_version
        ),
        StartupOutcome::UpToDate {
            row,
            code_version_bumped,
        } => {
            if *code_version_bumped {
                format!(
                    "schema {} unchanged; code_version becomes {}",
                    row.schema, row.code_version
                )
            } else {
                format!(
                    "schema {} unchanged; row stays ({}, {})",
                    row.schema, row.schema, row.code_version
                )
            }
        }
        StartupOutcome::StartedWithoutMigrating { row } => {
            format!("starts without migrating (schema {})", row.schema)
        }
        StartupOutcome::SchemaAhead { row } => format!(
            "runs on the newer schema {} (SPIRE warns); row stays ({}, {})",
            row.schema, row.schema, row.code_version
        ),
        StartupOutcome::Refused { refusal, .. } => format!("refuses to start: {refusal}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(target: &str) -> CheckInput {
        CheckInput {
            target: target.into(),
            ..CheckInput::default()
        }
    }

    fn with_row(target: &str, schema: i64, code: &str) -> CheckInput {
        CheckInput {
            datastore: Some(MigrationRow::new(schema, code)),
            ..input(target)
        }
    }

    fn agents(list: &[(&str, u64)]) -> Vec<AgentCount> {
        list.iter()
            .map(|(v, n)| AgentCount {
                version: (*v).into(),
                count: *n,
            })
            .collect()
    }

    fn codes(report: &CheckReport) -> Vec<&'static str> {
        report.findings.iter().map(|f| f.code.as_str()).collect()
    }

    fn hops(report: &CheckReport) -> Vec<String> {
        report
            .path
            .as_ref()
            .map(|p| p.hops.iter().map(|h| h.to.to_string()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn direct_one_minor_upgrade_is_ok() {
        let report = check(&with_row("1.15.3", 24, "1.14.7")).unwrap();
        assert_eq!(report.verdict, Verdict::Ok);
        assert_eq!(hops(&report), ["1.15.3"]);
        assert!(report.findings.is_empty());
        assert_eq!(report.current.servers, ["1.14.7"]);
        assert!(report.current.servers_assumed);
        assert_eq!(
            report.current.schema_written_by.as_deref(),
            Some("1.14.3–1.14.7")
        );
    }

    #[test]
    fn two_minors_need_a_stepping_stone() {
        let report = check(&with_row("1.15.3", 23, "1.13.2")).unwrap();
        assert_eq!(report.verdict, Verdict::NeedsSteps);
        assert_eq!(hops(&report), ["1.14.7", "1.15.3"]);
        assert!(report.findings.is_empty());
        assert!(
            report
                .notes
                .iter()
                .any(|n| n.contains("shorter path 1.15.3")),
            "{:?}",
            report.notes
        );
    }

    #[test]
    fn allowing_minor_skip_takes_the_spire_path_and_says_so() {
        let mut i = with_row("1.15.3", 23, "1.13.2");
        i.allow = vec!["minor_skip".into(), "not_rolling_safe".into()];
        let report = check(&i).unwrap();
        assert_eq!(hops(&report), ["1.15.3"]);
        assert_eq!(codes(&report), ["minor_skip", "not_rolling_safe"]);
        assert!(report.findings.iter().all(|f| f.allowed));
        assert_eq!(report.verdict, Verdict::Ok);
        assert!(
            report.findings[0].way_out.contains("1.14.7"),
            "{}",
            report.findings[0].way_out
        );
        // without not_rolling_safe allowed, the verdict is refused
        i.allow = vec!["minor_skip".into()];
        assert_eq!(check(&i).unwrap().verdict, Verdict::Refused);
    }

    #[test]
    fn schema_too_old_goes_through_a_previous_release() {
        // §4 example 3: 1.15.3 refuses (22, 1.7.6); the path goes through 1.8-1.14
        let report = check(&with_row("1.15.3", 22, "1.7.6")).unwrap();
        assert_eq!(report.verdict, Verdict::NeedsSteps);
        assert_eq!(hops(&report).first().map(String::as_str), Some("1.8.11"));
        assert_eq!(hops(&report).len(), 8);
    }

    #[test]
    fn unknown_target_is_mandatory() {
        let report = check(&with_row("1.16.0", 25, "1.15.3")).unwrap();
        assert_eq!(report.verdict, Verdict::Refused);
        assert_eq!(codes(&report), ["unknown_release"]);
        assert!(report.path.is_none());
        assert!(
            report.findings[0]
                .way_out
                .contains("migrations-check/releases.csv")
        );
        let report = check(&with_row("1.2.1", 18, "1.2.0")).unwrap();
        assert!(report.findings[0].way_out.contains("e.g. 1.2.0"));
    }

    #[test]
    fn bad_code_version_is_mandatory() {
        let report = check(&with_row("1.15.3", 25, "one.two")).unwrap();
        assert_eq!(report.verdict, Verdict::Refused);
        assert_eq!(codes(&report), ["bad_code_version"]);
        assert_eq!(report.findings[0].severity, Severity::Mandatory);
        assert!(
            report.findings[0]
                .message
                .contains("error getting DB code version")
        );
    }

    #[test]
    fn downgrade_two_minors_is_refused_with_a_way_out() {
        let report = check(&with_row("1.13.6", 25, "1.15.3")).unwrap();
        assert_eq!(report.verdict, Verdict::Refused);
        assert_eq!(codes(&report), ["downgrade_refused"]);
        let f = &report.findings[0];
        assert!(
            f.message
                .contains("incompatible DB schema and code version"),
            "{}",
            f.message
        );
        assert!(f.way_out.contains("1.13.x (schema 23)"), "{}", f.way_out);
        assert!(
            f.way_out.contains("no further than 1.14.0"),
            "{}",
            f.way_out
        );
    }

    #[test]
    fn downgrade_one_minor_moves_agents_first() {
        let mut i = with_row("1.14.7", 25, "1.15.3");
        i.agents = agents(&[("1.15.3", 10), ("1.14.7", 5)]);
        let report = check(&i).unwrap();
        assert_eq!(report.verdict, Verdict::NeedsSteps);
        let hop = &report.path.as_ref().unwrap().hops[0];
        assert_eq!(hop.agents_before.as_ref().unwrap().count, 10);
        assert!(
            report
                .notes
                .iter()
                .any(|n| n.contains("logs \"DB schema is ahead"))
        );
    }

    #[test]
    fn agents_too_old_become_steps() {
        let mut i = with_row("1.15.3", 23, "1.13.6");
        i.agents = agents(&[("1.12.4", 12), ("1.13.6", 40)]);
        let report = check(&i).unwrap();
        assert_eq!(report.verdict, Verdict::NeedsSteps);
        let text = render_human(&report);
        assert!(text.contains("move 12 agents (1.12.x) to 1.13.6"), "{text}");
        // allowing agent_skew drops the moves but reports them
        i.allow = vec!["agent_skew".into()];
        let report = check(&i).unwrap();
        assert!(codes(&report).iter().all(|c| *c == "agent_skew"));
        assert!(report.findings.iter().all(|f| f.allowed));
        assert!(
            report.findings[0]
                .way_out
                .contains("move these 12 agents (1.12.x) to 1.13.6 first"),
            "{}",
            report.findings[0].way_out
        );
    }

    #[test]
    fn unreported_agents_are_skippable() {
        let mut i = with_row("1.15.3", 24, "1.14.7");
        i.agents = agents(&[("", 3), ("1.14.7", 5)]);
        let report = check(&i).unwrap();
        assert_eq!(report.verdict, Verdict::Refused);
        assert_eq!(codes(&report), ["agent_version_unknown"]);
        assert_eq!(report.current.agents_unknown, 3);
        assert!(
            report.findings[0]
                .way_out
                .contains("1.14.0 to 1.14.7 before the hop to 1.15.3"),
            "{}",
            report.findings[0].way_out
        );
        i.allow = vec!["agent_version_unknown".into()];
        assert_eq!(check(&i).unwrap().verdict, Verdict::Ok);
    }

    #[test]
    fn disable_migration_replays_the_path() {
        // one hop, compatible: starts unmigrated
        let mut i = with_row("1.15.3", 24, "1.14.7");
        i.disable_migration = true;
        let report = check(&i).unwrap();
        assert_eq!(codes(&report), ["migration_disabled"]);
        assert!(report.findings[0].way_out.contains("hop(s) to 1.15.3"));
        // two hops: the second is refused because the row was never updated
        let mut i = with_row("1.15.3", 23, "1.13.6");
        i.disable_migration = true;
        let report = check(&i).unwrap();
        assert_eq!(codes(&report), ["auto_migration_required"]);
        assert_eq!(report.verdict, Verdict::Refused);
        assert!(
            report.findings[0]
                .message
                .contains("auto-migration must be enabled for current DB")
        );
        assert!(
            report.findings[0]
                .way_out
                .contains("hop(s) to 1.14.7, 1.15.3")
        );
    }

    #[test]
    fn mixed_servers() {
        let mut i = with_row("1.15.3", 25, "1.15.3");
        i.servers = vec!["1.13.6".into(), "1.15.3".into()];
        let report = check(&i).unwrap();
        assert!(codes(&report).contains(&"server_skew"));
        assert_eq!(hops(&report), ["1.14.7", "1.15.3"]);
        let mut i = with_row("1.14.7", 25, "1.15.3");
        i.servers = vec!["1.14.2".into(), "1.15.3".into()];
        let report = check(&i).unwrap();
        assert_eq!(codes(&report), ["servers_newer_than_target"]);
    }

    #[test]
    fn unknown_servers_and_datastore() {
        // empty code_version, no servers: version unknown
        let report = check(&with_row("1.15.3", 23, "")).unwrap();
        assert_eq!(codes(&report), ["current_version_unknown"]);
        // servers but no datastore: a row is assumed from the newest server
        let mut i = input("1.15.3");
        i.servers = vec!["v1.14.7".into()];
        let report = check(&i).unwrap();
        assert_eq!(codes(&report), ["datastore_unknown"]);
        assert!(report.current.datastore_assumed);
        assert_eq!(
            report.current.datastore,
            Some(MigrationRow::new(24, "1.14.7"))
        );
        // nothing at all: a fresh install
        let report = check(&input("1.15.3")).unwrap();
        assert_eq!(report.verdict, Verdict::Ok);
        assert_eq!(report.path.unwrap().direction, Direction::Install);
    }

    #[test]
    fn usage_errors() {
        assert!(matches!(
            check(&input("latest")),
            Err(CheckError::InvalidTarget { .. })
        ));
        let mut i = input("1.15.3");
        i.servers = vec!["1.15".into()];
        assert!(matches!(
            check(&i),
            Err(CheckError::InvalidServerVersion { .. })
        ));
        let mut i = input("1.15.3");
        i.allow = vec!["no_such".into()];
        let err = check(&i).unwrap_err();
        assert!(err.to_string().contains("minor_skip"), "{err}");
        i.allow = vec!["unknown_release".into()];
        assert_eq!(
            check(&i).unwrap_err(),
            CheckError::NotSkippable {
                code: FindingCode::UnknownRelease
            }
        );
    }

    #[test]
    fn codes_round_trip_and_are_snake_case() {
        for code in FindingCode::ALL {
            assert_eq!(FindingCode::from_str(code.as_str()), Ok(*code));
            assert_eq!(
                serde_json::to_value(code).unwrap(),
                serde_json::Value::String(code.as_str().into())
            );
            assert!(
                code.as_str()
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_')
            );
            assert!(!code.about().is_empty());
        }
    }

    #[test]
    fn input_and_report_are_json() {
        let json = r#"{"target":"1.15.3","datastore":{"schema":24,"code_version":"1.14.7"},
                       "agents":[{"version":"1.14.7","count":3}]}"#;
        let i: CheckInput = serde_json::from_str(json).unwrap();
        let report = check(&i).unwrap();
        let out = serde_json::to_value(&report).unwrap();
        assert_eq!(out["verdict"], "ok");
        assert_eq!(out["path"]["hops"][0]["to"], "1.15.3");
        assert_eq!(out["current"]["agents"][0]["count"], 3);
        let i = with_row("1.16.0", 25, "1.15.3");
        let out = serde_json::to_value(check(&i).unwrap()).unwrap();
        assert_eq!(out["verdict"], "refused");
        assert_eq!(out["findings"][0]["code"], "unknown_release");
        assert_eq!(out["findings"][0]["severity"], "mandatory");
    }

    #[test]
    fn human_rendering() {
        let mut i = with_row("1.15.3", 23, "1.13.6");
        i.agents = agents(&[("1.12.4", 12), ("1.13.6", 40), ("", 3)]);
        i.allow = vec!["agent_version_unknown".into()];
        let text = render_human(&check(&i).unwrap());
        let expected = r#"SPIRE compatibility check, target 1.15.3

Current state
  datastore          schema 23, code_version "1.13.6" (the schema of SPIRE 1.8.0–1.14.2)
  servers            1.13.6 (assumed from the datastore's code_version)
  agents             12 x 1.12.4, 40 x 1.13.6, 3 without a reported version
  disable_migration  false

Verdict: NEEDS STEPS: follow the path below

Path
   1. agents   move 12 agents (1.12.x) to 1.13.6
   2. servers  1.13.6 -> 1.14.7  migrates schema 23 -> 24; row becomes (24, 1.14.7)
   3. agents   move 52 agents (1.13.x) to 1.14.7
   4. servers  1.14.7 -> 1.15.3  migrates schema 24 -> 25; row becomes (25, 1.15.3)
   5. agents   move 52 agents (1.14.x) to 1.15.3 (recommended)

Findings
  allowed    agent_version_unknown  3 agents did not report a version (agents older than 1.14.3 do not, and a datastore below schema 24 has no agent_version), so they cannot be checked against the skew policy
                                    way out: check them (spire-agent --version, or the version label of spire_agent_started) and make sure they run 1.13.0 to 1.13.6 before the hop to 1.14.7; then allow agent_version_unknown

Notes
  - SPIRE's start-up rules alone would accept the shorter path 1.15.3; the documented policy is one minor per upgrade (allow minor_skip to use it)
"#;
        assert_eq!(text, expected);
    }
}
