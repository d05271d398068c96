//! Upgrade and downgrade paths through SPIRE's release table.
//!
//! A path is a sequence of server hops, each one a SPIRE release from the
//! table, that ends exactly at the target. Every hop is simulated with
//! [`server_startup`] against the `migrations` row the previous hop left, so
//! a path only contains hops SPIRE itself accepts (spire-reference §4). On top
//! of that the documented policy (§5) applies unless the caller relaxes it:
//!
//! - one minor version per hop (stepping stones are the newest patch of each
//!   intermediate minor line that can migrate the datastore);
//! - agents never newer than the oldest server and at most one minor older,
//!   so agents that would fall out of that window move before the hop;
//! - servers first, then agents, on the way up; agents first on the way down.

use std::cmp::Ordering;
use std::collections::BTreeSet;

use semver::Version;
use serde::{Serialize, Serializer};

use super::releases::{Release, ReleaseTable};
use super::rules::{MigrationRow, StartupOutcome, server_startup, upgrade_step_supported};
use super::version::{
    CodeVersionError, agent_floor, parse_code_version, policy_minor_gap, precedence,
};

/// Which parts of the documented policy (§5) the planner enforces. SPIRE's
/// own start-up rules (§4) are always enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathOptions {
    /// At most one minor version per server hop (1.1.1 → 1.3.0 is not
    /// supported). When false, hops go as far as SPIRE's start-up rules let
    /// them.
    pub one_minor_per_hop: bool,
    /// Move agents before a hop when they would otherwise be outside the
    /// agent skew window. When false, such agents are only reported in
    /// [`Path::agent_skew`].
    pub keep_agents_in_skew: bool,
}

impl Default for PathOptions {
    /// The documented policy: both rules on.
    fn default() -> Self {
        Self {
            one_minor_per_hop: true,
            keep_agents_in_skew: true,
        }
    }
}

/// Where a path starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathStart {
    /// The servers' version: the oldest server for an upgrade, the newest for
    /// a downgrade. `None` when unknown (then the one-minor rule cannot be
    /// applied and hops are chosen by schema alone).
    pub server: Option<Version>,
    /// The datastore's `migrations` row; `None` for a fresh datastore.
    pub row: Option<MigrationRow>,
    /// Agents with a known version and how many run it.
    pub agents: Vec<(Version, u64)>,
}

/// What a hop does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HopKind {
    /// Start the release on a fresh datastore.
    Install,
    /// Upgrade the servers.
    Upgrade,
    /// Downgrade the servers.
    Downgrade,
    /// Restart the servers' own release with migration enabled, to bring a
    /// datastore left behind by `disable_migration` up to its schema.
    MigrateInPlace,
}

/// Agents that must change version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentMove {
    /// How many agents.
    pub count: u64,
    /// Their minor lines, e.g. `["1.12.x"]`.
    pub from_lines: Vec<String>,
    /// The version to move them to.
    #[serde(serialize_with = "version_as_string")]
    pub to: Version,
    /// Whether the skew policy requires it (false: recommended, the usual
    /// "then upgrade the agents" after the servers).
    pub required: bool,
}

/// One server hop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hop {
    /// What the hop does.
    pub kind: HopKind,
    /// The servers' version before the hop (`None`: unknown or none).
    #[serde(serialize_with = "opt_version_as_string")]
    pub from: Option<Version>,
    /// The release the servers run after the hop.
    #[serde(serialize_with = "version_as_string")]
    pub to: Version,
    /// Minor versions between `from` and `to` under the policy's counting.
    pub minor_gap: Option<u64>,
    /// Agents to move before this hop.
    pub agents_before: Option<AgentMove>,
    /// The datastore schema before the hop (`None`: fresh).
    pub schema_before: Option<i64>,
    /// What the first server of the new release does at start-up; its
    /// `row_after` is the `migrations` row after the hop.
    pub startup: StartupOutcome,
    /// Whether servers still on `from` could restart on the datastore after
    /// the first `to` server changed it (a rolling hop needs this). `None`
    /// when `from` is not a release in the table.
    pub old_servers_can_restart: Option<bool>,
}

/// Agents the path leaves outside the skew window (only when the caller
/// relaxed the policy, or when a relaxed hop makes the window empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentSkew {
    /// Index of the hop they are out of skew for (`hops.len()`: after the
    /// last hop).
    pub before_hop: usize,
    /// How many agents.
    pub count: u64,
    /// Their minor lines.
    pub from_lines: Vec<String>,
    /// The servers' version after that hop.
    #[serde(serialize_with = "version_as_string")]
    pub servers_at: Version,
    /// Whether no agent version would do: the hop moves more than one minor,
    /// so "not newer than the old servers" and "at most one minor older than
    /// the new ones" cannot both hold.
    pub unavoidable: bool,
}

/// The overall direction of a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Already at the target; nothing to do for the servers.
    AtTarget,
    /// A fresh datastore: the target initialises it.
    Install,
    /// Towards a newer release.
    Upgrade,
    /// Towards an older release.
    Downgrade,
}

/// A path to a target release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Path {
    /// Up, down, fresh or nothing.
    pub direction: Direction,
    /// The server hops, in order; the last one ends at the target.
    pub hops: Vec<Hop>,
    /// Agents to move once the servers are at the target.
    pub agents_last: Option<AgentMove>,
    /// Agents left outside the skew window.
    pub agent_skew: Vec<AgentSkew>,
}

impl Path {
    /// The `migrations` row after the last hop (the start row if no hop).
    #[must_use]
    pub fn row_after<'a>(&'a self, start: Option<&'a MigrationRow>) -> Option<&'a MigrationRow> {
        self.hops
            .last()
            .map_or(start, |hop| hop.startup.row_after())
    }

    /// Whether following the path takes more than "upgrade the servers to
    /// the target, then the agents": several hops, or agents that must move
    /// first.
    #[must_use]
    pub fn needs_steps(&self) -> bool {
        self.hops.len() > 1
            || self.hops.iter().any(|h| h.agents_before.is_some())
            || self.agents_last.as_ref().is_some_and(|m| m.required)
    }
}

/// Why no path exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The target is not in the release table.
    #[error(
        "SPIRE {version} is not in spirekeep's release table (known: {oldest} to {newest}); spirekeep does not guess what an unknown release does"
    )]
    UnknownRelease {
        /// The requested target.
        version: Version,
        /// The oldest release in the table.
        oldest: Version,
        /// The newest release in the table.
        newest: Version,
    },
    /// The datastore's `code_version` does not parse: every SPIRE release
    /// refuses to start on it.
    #[error(transparent)]
    BadCodeVersion(CodeVersionError),
    /// No release sequence gets the datastore and servers to the target.
    #[error("no upgrade path from {} to {target}: {reason}", describe_start(.from.as_ref(), *.schema))]
    NoUpgradePath {
        /// Where the path got stuck: the servers' version.
        from: Option<Version>,
        /// The datastore schema there.
        schema: Option<i64>,
        /// The target.
        target: Version,
        /// SPIRE's refusal or the policy rule that blocks.
        reason: String,
    },
    /// SPIRE cannot run the older release on this datastore.
    #[error("SPIRE does not allow the downgrade from {from} to {target}: {reason}")]
    DowngradeRefused {
        /// The servers' version the downgrade starts from.
        from: Version,
        /// The target.
        target: Version,
        /// SPIRE's refusal or the policy rule that blocks.
        reason: String,
    },
}

fn describe_start(from: Option<&Version>, schema: Option<i64>) -> String {
    let from = from.map_or_else(|| "an unknown version".to_owned(), ToString::to_string);
    match schema {
        Some(s) => format!("{from} (schema {s})"),
        None => from,
    }
}

/// Computes the path from `start` to `target` (which must be a release in
/// `table`).
///
/// Upgrades pick, at each step, the target if SPIRE would accept it, else the
/// newest release allowed by the options that SPIRE would accept (with the
/// one-minor rule that is the newest usable patch of the next minor line),
/// else a restart of the current release with migration on. Downgrades pick
/// the target if SPIRE would accept it, else the newest usable patch of the
/// lowest reachable minor line. Every hop is checked with [`server_startup`]
/// with migration enabled: `disable_migration` is a setting the plan tells
/// the operator to change, not part of the path.
///
/// # Errors
///
/// [`PathError`] when the target is unknown, the stored `code_version` does
/// not parse, or no sequence of releases gets there.
pub fn plan_path(
    table: &ReleaseTable,
    start: &PathStart,
    target: &Version,
    options: PathOptions,
) -> Result<Path, PathError> {
    let Some(target_release) = table.get(target) else {
        return Err(PathError::UnknownRelease {
            version: target.clone(),
            oldest: table.oldest().version.clone(),
            newest: table.newest().version.clone(),
        });
    };
    if let Some(row) = &start.row {
        parse_code_version(&row.code_version).map_err(PathError::BadCodeVersion)?;
    }
    let mut planner = Planner {
        table,
        options,
        target: target_release,
        start: start.server.clone(),
        cur: start.server.clone(),
        row: start.row.clone(),
        agents: merge_agents(start.agents.iter().cloned()),
        hops: Vec::new(),
        agent_skew: Vec::new(),
    };
    let downgrade = start
        .server
        .as_ref()
        .is_some_and(|s| precedence(s, target) == Ordering::Greater);
    if downgrade {
        planner.downgrade()?;
    } else {
        planner.upgrade()?;
    }
    let direction = match planner.hops.first().map(|h| h.kind) {
        None => Direction::AtTarget,
        Some(HopKind::Install) => Direction::Install,
        Some(_) if downgrade => Direction::Downgrade,
        Some(_) => Direction::Upgrade,
    };
    let agents_last = if downgrade {
        None
    } else {
        planner.agents_last()
    };
    Ok(Path {
        direction,
        hops: planner.hops,
        agents_last,
        agent_skew: planner.agent_skew,
    })
}

struct Planner<'t> {
    table: &'t ReleaseTable,
    options: PathOptions,
    target: &'t Release,
    start: Option<Version>,
    cur: Option<Version>,
    row: Option<MigrationRow>,
    agents: Vec<(Version, u64)>,
    hops: Vec<Hop>,
    agent_skew: Vec<AgentSkew>,
}

impl<'t> Planner<'t> {
    fn simulate(&self, release: &Release) -> StartupOutcome {
        server_startup(release, self.row.as_ref(), false)
    }

    fn max_hops(&self) -> usize {
        self.table.releases().len() + 2
    }

    fn upgrade(&mut self) -> Result<(), PathError> {
        let target = self.target;
        for _ in 0..self.max_hops() {
            let at_target = self
                .cur
                .as_ref()
                .is_some_and(|c| precedence(c, &target.version) == Ordering::Equal);
            if at_target {
                let out = self.simulate(target);
                return match &out {
                    StartupOutcome::Migrated { .. } => {
                        self.push(HopKind::MigrateInPlace, target, out);
                        Ok(())
                    }
                    StartupOutcome::Initialized { .. } => {
                        self.push(HopKind::Install, target, out);
                        Ok(())
                    }
                    StartupOutcome::Refused { refusal, .. } => {
                        let reason =
                            format!("SPIRE {} refuses to start: {refusal}", target.version);
                        Err(self.no_upgrade_path(reason))
                    }
                    _ => Ok(()),
                };
            }
            let forward: Vec<&'t Release> = self
                .table
                .releases()
                .iter()
                .filter(|r| self.is_upgrade_candidate(r))
                .collect();
            let mut refusal = None;
            let mut choice = None;
            // the target itself, else the newest candidate SPIRE accepts
            let ordered = forward
                .iter()
                .filter(|r| r.version == target.version)
                .chain(forward.iter().rev().filter(|r| r.version != target.version));
            for release in ordered {
                let out = self.simulate(release);
                if let Some(r) = out.refusal() {
                    refusal.get_or_insert_with(|| {
                        format!("SPIRE {} would refuse to start: {r}", release.version)
                    });
                } else {
                    choice = Some((*release, out));
                    break;
                }
            }
            let mut kind = if self.cur.is_none() && self.row.is_none() {
                HopKind::Install
            } else {
                HopKind::Upgrade
            };
            if choice.is_none() {
                // nothing ahead works: migrate in place with the current release
                choice = self
                    .cur
                    .as_ref()
                    .and_then(|c| self.table.get(c))
                    .and_then(|r| {
                        let out = self.simulate(r);
                        matches!(out, StartupOutcome::Migrated { .. }).then_some((r, out))
                    });
                kind = HopKind::MigrateInPlace;
            }
            let Some((release, out)) = choice else {
                let reason = refusal.unwrap_or_else(|| self.nothing_within_reach());
                return Err(self.no_upgrade_path(reason));
            };
            self.push(kind, release, out);
        }
        Err(self.no_upgrade_path("the path did not converge".into()))
    }

    fn downgrade(&mut self) -> Result<(), PathError> {
        let target = self.target;
        for _ in 0..self.max_hops() {
            let Some(cur) = self.cur.clone() else {
                break;
            };
            if precedence(&cur, &target.version) == Ordering::Equal {
                return Ok(());
            }
            // The target, and releases of the minor lines strictly between
            // the target's and the current one (another patch of either line
            // would not bring the servers closer).
            let line = |v: &Version| (v.major, v.minor);
            let within_reach = |r: &Release| {
                !self.options.one_minor_per_hop || upgrade_step_supported(&r.version, &cur)
            };
            let mut candidates: Vec<&'t Release> = self
                .table
                .releases()
                .iter()
                .filter(|r| {
                    let between =
                        line(&r.version) > line(&target.version) && line(&r.version) < line(&cur);
                    (r.version == target.version || between) && within_reach(r)
                })
                .collect();
            // the target first, then the lowest minor line, newest patch first
            candidates.sort_by(|a, b| {
                let key = |r: &Release| {
                    (
                        r.version != target.version,
                        r.version.major,
                        r.version.minor,
                    )
                };
                key(a)
                    .cmp(&key(b))
                    .then_with(|| precedence(&b.version, &a.version))
            });
            let target_out = self.simulate(target);
            let mut refusal = target_out
                .refusal()
                .map(|r| format!("SPIRE {} would refuse to start: {r}", target.version));
            let mut choice = None;
            for release in candidates {
                let out = self.simulate(release);
                if let Some(r) = out.refusal() {
                    refusal.get_or_insert_with(|| {
                        format!("SPIRE {} would refuse to start: {r}", release.version)
                    });
                } else {
                    choice = Some((release, out));
                    break;
                }
            }
            let Some((release, out)) = choice else {
                return Err(PathError::DowngradeRefused {
                    from: self.start.clone().unwrap_or(cur),
                    target: target.version.clone(),
                    reason: refusal.unwrap_or_else(|| self.nothing_within_reach()),
                });
            };
            self.push(HopKind::Downgrade, release, out);
        }
        Err(PathError::DowngradeRefused {
            from: self.start.clone().unwrap_or_else(|| target.version.clone()),
            target: target.version.clone(),
            reason: "the path did not converge".into(),
        })
    }

    fn is_upgrade_candidate(&self, release: &Release) -> bool {
        if precedence(&release.version, &self.target.version) == Ordering::Greater {
            return false;
        }
        let Some(cur) = &self.cur else {
            return true;
        };
        precedence(&release.version, cur) == Ordering::Greater
            && (!self.options.one_minor_per_hop || upgrade_step_supported(cur, &release.version))
    }

    fn nothing_within_reach(&self) -> String {
        let cur = self
            .cur
            .as_ref()
            .map_or_else(|| "the current version".to_owned(), ToString::to_string);
        format!(
            "no release in the table is within one minor of {cur} (the table covers {} to {})",
            self.table.oldest().version,
            self.table.newest().version
        )
    }

    fn no_upgrade_path(&self, reason: String) -> PathError {
        PathError::NoUpgradePath {
            from: self.cur.clone(),
            schema: self.row.as_ref().map(|r| r.schema),
            target: self.target.version.clone(),
            reason,
        }
    }

    fn push(&mut self, kind: HopKind, release: &Release, startup: StartupOutcome) {
        let from = self.cur.clone();
        let agents_before = self.move_agents(from.as_ref(), &release.version);
        let old_servers_can_restart = match (kind, &from) {
            (HopKind::Upgrade | HopKind::Downgrade, Some(f)) => self
                .table
                .get(f)
                .map(|old| server_startup(old, startup.row_after(), false).starts()),
            _ => None,
        };
        let hop = Hop {
            kind,
            minor_gap: from
                .as_ref()
                .and_then(|f| policy_minor_gap(f, &release.version)),
            from,
            to: release.version.clone(),
            agents_before,
            schema_before: self.row.as_ref().map(|r| r.schema),
            startup,
            old_servers_can_restart,
        };
        self.row = hop.startup.row_after().cloned();
        self.cur = Some(release.version.clone());
        self.hops.push(hop);
    }

    /// Agents that would be outside the skew window during or after a hop
    /// from `from` to `to`: older than one minor below `to` (the oldest server
    /// after the hop), or, going down, newer than `to`. They move to the
    /// oldest server version of the hop, the newest version they may run.
    fn move_agents(&mut self, from: Option<&Version>, to: &Version) -> Option<AgentMove> {
        let from = from?;
        let downgrade = precedence(to, from) == Ordering::Less;
        let oldest_server = if downgrade { to } else { from };
        let floor = agent_floor(to);
        let out_of_window = |agent: &Version| {
            let too_old = floor
                .as_ref()
                .is_none_or(|f| precedence(agent, f) == Ordering::Less)
                && precedence(agent, to) == Ordering::Less;
            let too_new = downgrade && precedence(agent, to) == Ordering::Greater;
            too_old || too_new
        };
        let (count, from_lines) = summarise(self.agents.iter().filter(|(v, _)| out_of_window(v)));
        if count == 0 {
            return None;
        }
        // with a relaxed hop of more than one minor no version satisfies both
        // "not newer than the oldest server" and "one minor below the new one"
        let window_empty = floor
            .as_ref()
            .is_none_or(|f| precedence(oldest_server, f) == Ordering::Less);
        let keep = self.options.keep_agents_in_skew;
        if !keep || window_empty {
            self.agent_skew.push(AgentSkew {
                before_hop: self.hops.len(),
                count,
                from_lines,
                servers_at: to.clone(),
                unavoidable: window_empty,
            });
            return None;
        }
        let moved = self
            .agents
            .iter()
            .map(|(v, n)| {
                if out_of_window(v) {
                    (oldest_server.clone(), *n)
                } else {
                    (v.clone(), *n)
                }
            })
            .collect::<Vec<_>>();
        self.agents = merge_agents(moved);
        Some(AgentMove {
            count,
            from_lines,
            to: oldest_server.clone(),
            required: true,
        })
    }

    /// After the servers reach the target, the agents follow (§5: servers
    /// first, then agents). Required when some agents are outside the window
    /// of the target.
    fn agents_last(&mut self) -> Option<AgentMove> {
        let target = &self.target.version;
        let floor = agent_floor(target);
        let (count, from_lines) = summarise(
            self.agents
                .iter()
                .filter(|(v, _)| precedence(v, target) != Ordering::Equal),
        );
        if count == 0 {
            return None;
        }
        let outside = |v: &Version| {
            precedence(v, target) == Ordering::Greater
                || floor
                    .as_ref()
                    .is_none_or(|f| precedence(v, f) == Ordering::Less)
        };
        let (outside_count, outside_lines) =
            summarise(self.agents.iter().filter(|(v, _)| outside(v)));
        let required = outside_count > 0 && self.options.keep_agents_in_skew;
        if outside_count > 0 && !self.options.keep_agents_in_skew {
            self.agent_skew.push(AgentSkew {
                before_hop: self.hops.len(),
                count: outside_count,
                from_lines: outside_lines.clone(),
                servers_at: target.clone(),
                unavoidable: false,
            });
        }
        // A required move names only the agents that break the skew; the
        // ones already within it may follow at leisure (issue 13).
        let (count, from_lines) = if required {
            (outside_count, outside_lines)
        } else {
            (count, from_lines)
        };
        Some(AgentMove {
            count,
            from_lines,
            to: target.clone(),
            required,
        })
    }
}

/// Adds up agent groups and lists their minor lines in version order.
fn summarise<'a>(groups: impl Iterator<Item = &'a (Version, u64)>) -> (u64, Vec<String>) {
    let mut count = 0u64;
    let mut lines = BTreeSet::new();
    for (v, n) in groups {
        count = count.saturating_add(*n);
        lines.insert((v.major, v.minor));
    }
    let lines = lines
        .into_iter()
        .map(|(major, minor)| format!("{major}.{minor}.x"))
        .collect();
    (count, lines)
}

/// Merges agent groups with the same version; drops empty groups.
fn merge_agents(groups: impl IntoIterator<Item = (Version, u64)>) -> Vec<(Version, u64)> {
    let mut merged: Vec<(Version, u64)> = Vec::new();
    for (v, n) in groups {
        if n == 0 {
            continue;
        }
        match merged
            .iter_mut()
            .find(|(m, _)| precedence(m, &v) == Ordering::Equal)
        {
            Some((_, count)) => *count = count.saturating_add(n),
            None => merged.push((v, n)),
        }
    }
    merged.sort_by(|a, b| precedence(&a.0, &b.0));
    merged
}

#[expect(
    clippy::ref_option,
    reason = "serde's serialize_with passes &Option<T>"
)]
fn opt_version_as_string<S: Serializer>(v: &Option<Version>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_str(&v.to_string()),
        None => s.serialize_none(),
    }
}

pub(crate) fn version_as_string<S: Serializer>(v: &Version, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&v.to_string())
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

    fn start(server: &str, schema: i64, code: &str) -> PathStart {
        PathStart {
            server: Some(v(server)),
            row: Some(MigrationRow::new(schema, code)),
            agents: Vec::new(),
        }
    }

    fn plan(start: &PathStart, target: &str) -> Result<Path, PathError> {
        plan_path(table(), start, &v(target), PathOptions::default())
    }

    fn hops(path: &Path) -> Vec<String> {
        path.hops.iter().map(|h| h.to.to_string()).collect()
    }

    #[test]
    fn one_minor_at_a_time_through_newest_patches() {
        let path = plan(&start("1.12.2", 23, "1.12.2"), "1.15.3").unwrap();
        assert_eq!(hops(&path), ["1.13.6", "1.14.7", "1.15.3"]);
        assert_eq!(path.direction, Direction::Upgrade);
        let schemas: Vec<_> = path
            .hops
            .iter()
            .map(|h| h.startup.row_after().unwrap().schema)
            .collect();
        assert_eq!(schemas, [23, 24, 25]);
        assert_eq!(path.row_after(None), Some(&MigrationRow::new(25, "1.15.3")));
        assert!(path.needs_steps());
        assert!(
            path.hops
                .iter()
                .all(|h| h.old_servers_can_restart == Some(true))
        );
    }

    #[test]
    fn direct_when_one_minor_away() {
        let path = plan(&start("1.14.2", 23, "1.14.2"), "1.15.3").unwrap();
        assert_eq!(hops(&path), ["1.15.3"]);
        assert!(!path.needs_steps());
        assert_eq!(
            path.hops[0].startup,
            StartupOutcome::Migrated {
                from_schema: 23,
                row: MigrationRow::new(25, "1.15.3")
            }
        );
    }

    #[test]
    fn ends_exactly_at_an_older_patch_target() {
        let path = plan(&start("1.12.6", 23, "1.12.6"), "1.14.3").unwrap();
        assert_eq!(hops(&path), ["1.13.6", "1.14.3"]);
    }

    #[test]
    fn from_1_0_the_long_way() {
        let path = plan(&start("1.0.0", 17, "1.0.0"), "1.15.3").unwrap();
        assert_eq!(
            hops(&path),
            [
                "1.1.5", "1.2.0", "1.3.2", "1.4.7", "1.5.6", "1.6.5", "1.7.6", "1.8.11", "1.9.6",
                "1.10.4", "1.11.3", "1.12.6", "1.13.6", "1.14.7", "1.15.3"
            ]
        );
    }

    #[test]
    fn relaxed_minor_rule_goes_as_far_as_spire_allows() {
        let options = PathOptions {
            one_minor_per_hop: false,
            keep_agents_in_skew: true,
        };
        // §4 example 2: 1.13 -> 1.15 directly is allowed by SPIRE's code
        let path = plan_path(
            table(),
            &start("1.13.2", 23, "1.13.2"),
            &v("1.15.3"),
            options,
        )
        .unwrap();
        assert_eq!(hops(&path), ["1.15.3"]);
        assert_eq!(path.hops[0].minor_gap, Some(2));
        // ... but the 1.13 servers cannot restart on the migrated datastore
        assert_eq!(path.hops[0].old_servers_can_restart, Some(false));
        // schema 22 needs a stepping stone even then (§4 example 3)
        let path = plan_path(table(), &start("1.7.6", 22, "1.7.6"), &v("1.15.3"), options).unwrap();
        assert_eq!(hops(&path), ["1.10.4", "1.15.3"]);
    }

    #[test]
    fn datastore_left_behind_by_disable_migration_migrates_in_place() {
        // servers on 1.7.0, datastore still at 19: 1.7.1+ and 1.8 cannot migrate from 19
        let path = plan(&start("1.7.0", 19, "1.6.5"), "1.8.11").unwrap();
        assert_eq!(hops(&path), ["1.7.0", "1.8.11"]);
        assert_eq!(path.hops[0].kind, HopKind::MigrateInPlace);
        assert_eq!(
            path.hops[0].startup.row_after(),
            Some(&MigrationRow::new(21, "1.7.0"))
        );
        // already at the target, schema behind
        let path = plan(&start("1.15.3", 24, "1.14.7"), "1.15.3").unwrap();
        assert_eq!(hops(&path), ["1.15.3"]);
        assert_eq!(path.hops[0].kind, HopKind::MigrateInPlace);
        // the newest 1.7 patch that can still migrate from 19 is 1.7.0
        let path = plan(&start("1.6.5", 19, "1.6.5"), "1.7.6").unwrap();
        assert_eq!(hops(&path), ["1.7.0", "1.7.6"]);
    }

    #[test]
    fn at_target_nothing_to_do() {
        let path = plan(&start("1.15.3", 25, "1.15.3"), "1.15.3").unwrap();
        assert!(path.hops.is_empty());
        assert_eq!(path.direction, Direction::AtTarget);
        assert!(!path.needs_steps());
    }

    #[test]
    fn fresh_datastore_installs_the_target() {
        let path = plan(&PathStart::default(), "1.14.3").unwrap();
        assert_eq!(path.direction, Direction::Install);
        assert_eq!(hops(&path), ["1.14.3"]);
        assert_eq!(path.row_after(None), Some(&MigrationRow::new(24, "1.14.3")));
    }

    #[test]
    fn unknown_version_plans_by_schema() {
        let s = PathStart {
            server: None,
            row: Some(MigrationRow::new(19, "")),
            agents: Vec::new(),
        };
        let path = plan(&s, "1.15.3").unwrap();
        // the first hop is chosen by schema; from then on the servers' version
        // is known and the one-minor rule applies again
        assert_eq!(
            hops(&path),
            [
                "1.7.0", "1.8.11", "1.9.6", "1.10.4", "1.11.3", "1.12.6", "1.13.6", "1.14.7",
                "1.15.3"
            ]
        );
        assert_eq!(path.hops[0].from, None);
        let relaxed = PathOptions {
            one_minor_per_hop: false,
            keep_agents_in_skew: true,
        };
        let path = plan_path(table(), &s, &v("1.15.3"), relaxed).unwrap();
        assert_eq!(hops(&path), ["1.7.0", "1.10.4", "1.15.3"]);
    }

    #[test]
    fn unknown_target_is_never_guessed() {
        for target in ["1.16.0", "1.2.1", "1.15.3-rc.1", "2.0.0"] {
            let err = plan(&start("1.15.3", 25, "1.15.3"), target).unwrap_err();
            assert!(matches!(err, PathError::UnknownRelease { .. }), "{target}");
            assert!(err.to_string().contains("not in spirekeep's release table"));
        }
    }

    #[test]
    fn bad_code_version_blocks_every_path() {
        let err = plan(&start("1.15.3", 25, "nope"), "1.15.3").unwrap_err();
        assert!(matches!(err, PathError::BadCodeVersion(_)));
    }

    #[test]
    fn from_0_12_through_1_0() {
        let path = plan(&start("0.12.3", 15, "0.12.3"), "1.1.5").unwrap();
        assert_eq!(hops(&path), ["1.0.0", "1.1.5"]);
        let err = plan(&start("0.11.2", 14, "0.11.2"), "1.1.5").unwrap_err();
        assert!(matches!(err, PathError::NoUpgradePath { .. }));
        assert!(
            err.to_string().contains("within one minor of 0.11.2"),
            "{err}"
        );
    }

    #[test]
    fn one_minor_downgrade_runs_on_the_newer_schema() {
        let path = plan(&start("1.15.3", 25, "1.15.3"), "1.14.7").unwrap();
        assert_eq!(path.direction, Direction::Downgrade);
        assert_eq!(hops(&path), ["1.14.7"]);
        assert_eq!(
            path.hops[0].startup,
            StartupOutcome::SchemaAhead {
                row: MigrationRow::new(25, "1.15.3")
            }
        );
    }

    #[test]
    fn two_minor_downgrade_is_refused_by_the_stored_code_version() {
        let err = plan(&start("1.15.3", 25, "1.15.3"), "1.13.6").unwrap_err();
        let PathError::DowngradeRefused { from, reason, .. } = &err else {
            panic!("{err}");
        };
        // 1.14.7 is accepted, then 1.13.6 is two minors from the stored 1.15.3
        assert_eq!(from, &v("1.15.3"));
        assert!(
            reason.contains("incompatible DB schema and code version"),
            "{reason}"
        );
    }

    #[test]
    fn downgrade_on_an_unchanged_schema_goes_one_minor_at_a_time() {
        // schema 23 everywhere: SPIRE checks nothing when schema == latest
        let path = plan(&start("1.13.6", 23, "1.13.6"), "1.11.3").unwrap();
        assert_eq!(hops(&path), ["1.12.6", "1.11.3"]);
        assert!(
            path.hops
                .iter()
                .all(|h| h.kind == HopKind::Downgrade && h.minor_gap == Some(1))
        );
        // the stored code_version is never lowered
        assert_eq!(path.row_after(None), Some(&MigrationRow::new(23, "1.13.6")));
    }

    #[test]
    fn agents_move_before_the_hop_that_would_leave_them_behind() {
        let mut s = start("1.13.6", 23, "1.13.6");
        s.agents = vec![(v("1.12.4"), 12), (v("1.13.6"), 40)];
        let path = plan(&s, "1.15.3").unwrap();
        assert_eq!(hops(&path), ["1.14.7", "1.15.3"]);
        assert_eq!(
            path.hops[0].agents_before,
            Some(AgentMove {
                count: 12,
                from_lines: vec!["1.12.x".into()],
                to: v("1.13.6"),
                required: true
            })
        );
        assert_eq!(
            path.hops[1].agents_before,
            Some(AgentMove {
                count: 52,
                from_lines: vec!["1.13.x".into()],
                to: v("1.14.7"),
                required: true
            })
        );
        let last = path.agents_last.unwrap();
        assert_eq!(
            (last.count, last.to, last.required),
            (52, v("1.15.3"), false)
        );
        assert!(path.agent_skew.is_empty());
    }

    #[test]
    fn required_last_move_counts_only_the_agents_outside_the_skew() {
        // Servers at the target 1.14.7: the 1.12 agents break the skew (two
        // minors behind), the 1.13 ones are within it and must not be counted.
        let mut s = start("1.14.7", 24, "1.14.7");
        s.agents = vec![(v("1.12.4"), 3), (v("1.13.6"), 2), (v("1.14.7"), 7)];
        let path = plan(&s, "1.14.7").unwrap();
        assert_eq!(
            path.agents_last,
            Some(AgentMove {
                count: 3,
                from_lines: vec!["1.12.x".into()],
                to: v("1.14.7"),
                required: true
            })
        );
        // Nobody outside: the usual recommended move of everyone behind.
        s.agents = vec![(v("1.13.6"), 2), (v("1.14.7"), 7)];
        let path = plan(&s, "1.14.7").unwrap();
        assert_eq!(
            path.agents_last,
            Some(AgentMove {
                count: 2,
                from_lines: vec!["1.13.x".into()],
                to: v("1.14.7"),
                required: false
            })
        );
    }

    #[test]
    fn agents_already_in_window_do_not_move() {
        let mut s = start("1.14.7", 24, "1.14.7");
        s.agents = vec![(v("1.14.0"), 3), (v("1.14.7"), 5)];
        let path = plan(&s, "1.15.3").unwrap();
        assert_eq!(path.hops[0].agents_before, None);
        assert!(!path.needs_steps());
        // 1.13 agents are fine with 1.14 servers but not with 1.15 ones
        s.agents = vec![(v("1.13.0"), 3)];
        let path = plan(&s, "1.15.3").unwrap();
        let moved = path.hops[0].agents_before.as_ref().unwrap();
        assert_eq!((moved.count, &moved.to), (3, &v("1.14.7")));
    }

    #[test]
    fn downgrade_moves_agents_first() {
        let mut s = start("1.15.3", 25, "1.15.3");
        s.agents = vec![(v("1.15.3"), 7), (v("1.14.2"), 2)];
        let path = plan(&s, "1.14.7").unwrap();
        assert_eq!(
            path.hops[0].agents_before,
            Some(AgentMove {
                count: 7,
                from_lines: vec!["1.15.x".into()],
                to: v("1.14.7"),
                required: true
            })
        );
        assert_eq!(path.agents_last, None);
    }

    #[test]
    fn relaxed_agent_rule_reports_instead_of_moving() {
        let mut s = start("1.13.6", 23, "1.13.6");
        s.agents = vec![(v("1.12.4"), 12)];
        let options = PathOptions {
            one_minor_per_hop: true,
            keep_agents_in_skew: false,
        };
        let path = plan_path(table(), &s, &v("1.15.3"), options).unwrap();
        assert!(path.hops.iter().all(|h| h.agents_before.is_none()));
        assert_eq!(path.agent_skew.len(), 3); // before each hop and after the last
        assert!(
            path.agent_skew
                .iter()
                .all(|a| a.count == 12 && !a.unavoidable)
        );
    }

    #[test]
    fn agents_out_of_window_at_target_must_move() {
        let mut s = start("1.15.3", 25, "1.15.3");
        s.agents = vec![(v("1.12.4"), 4)];
        let path = plan(&s, "1.15.3").unwrap();
        assert!(path.hops.is_empty());
        let last = path.agents_last.as_ref().unwrap();
        assert!(last.required);
        assert!(path.needs_steps());
    }

    #[test]
    fn relaxed_hop_leaves_agents_out_of_skew_whatever_they_do() {
        let mut s = start("1.13.6", 23, "1.13.6");
        s.agents = vec![(v("1.13.6"), 9)];
        let options = PathOptions {
            one_minor_per_hop: false,
            keep_agents_in_skew: true,
        };
        let path = plan_path(table(), &s, &v("1.15.3"), options).unwrap();
        assert_eq!(hops(&path), ["1.15.3"]);
        assert_eq!(path.agent_skew.len(), 1);
        assert!(path.agent_skew[0].unavoidable);
        assert_eq!(path.hops[0].agents_before, None);
    }

    #[test]
    fn path_serialises() {
        let path = plan(&start("1.14.7", 24, "1.14.7"), "1.15.3").unwrap();
        let json = serde_json::to_value(&path).unwrap();
        assert_eq!(json["direction"], "upgrade");
        assert_eq!(json["hops"][0]["to"], "1.15.3");
        assert_eq!(json["hops"][0]["from"], "1.14.7");
        assert_eq!(json["hops"][0]["startup"]["outcome"], "migrated");
        assert_eq!(json["hops"][0]["startup"]["row"]["schema"], 25);
    }
}
