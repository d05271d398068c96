//! The saved plan (`plan.json`): the plan file as written, the facts it was
//! made from with their fingerprint, the path through SPIRE's releases and
//! every step `apply` will take, in order. Plain data: `plan` prints it,
//! `apply` executes it, `status` reads it next to the journal.

use std::path::Path;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::error::PlanError;
use super::facts::Facts;
use super::file::{Plan, PlanFile};
use crate::compat::MigrationRow;

/// The saved-plan format this build writes (and reads).
pub const SAVED_PLAN_FORMAT: u32 = 1;

/// The label of the pre-upgrade snapshot.
pub const PRE_UPGRADE_LABEL: &str = "pre-upgrade";

/// Up or down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Upgrade,
    Downgrade,
    /// Everything already runs the target.
    AtTarget,
}

/// One server hop of the path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HopSummary {
    /// 1-based.
    pub index: usize,
    pub from: String,
    pub to: String,
    /// The `migrations` row the first server of `to` leaves.
    pub row_after: Option<MigrationRow>,
    /// What SPIRE does at start-up, in words.
    pub startup: String,
}

/// A member in an agent batch and the version it runs before the batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchMember {
    pub name: String,
    pub from: String,
}

/// What a step does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StepKind {
    /// Facts unchanged, every member healthy, repository reachable.
    Preflight,
    /// Pre-upgrade snapshot: backup, verify, pin.
    Snapshot { labels: Vec<String> },
    /// One server to a new version.
    Server {
        member: String,
        from: String,
        to: String,
    },
    /// The `migrations` row must be what the hop's release writes.
    DatastoreGate { expect: MigrationRow },
    /// A batch of agents to a new version.
    AgentBatch {
        group: String,
        /// 1-based.
        batch: usize,
        batches: usize,
        members: Vec<BatchMember>,
        to: String,
        max_failure_ratio: f64,
    },
    /// Every member at the target and healthy, the datastore as expected,
    /// the plan's post-checks.
    PostCheck {
        target: String,
        expect: Option<MigrationRow>,
    },
    /// Release the snapshot pin.
    Finish,
}

/// One step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// Stable id, e.g. `hop1.server.server-1`; journal records name it.
    pub id: String,
    /// The hop it belongs to (1-based), if any.
    pub hop: Option<usize>,
    /// One line for people.
    pub title: String,
    #[serde(flatten)]
    pub kind: StepKind,
}

/// Where the plan leaves SPIRE's supported skew (only with an override).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkewNote {
    /// After which step.
    pub after_step: String,
    pub message: String,
}

/// Overrides given to `plan`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overrides {
    /// Agents before servers on an upgrade.
    #[serde(default)]
    pub agents_first: bool,
    /// Servers before agents on a downgrade.
    #[serde(default)]
    pub servers_first: bool,
}

/// `plan.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedPlan {
    pub format_version: u32,
    /// `<name>-<UTC time>`: names the journal.
    pub plan_id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    pub spirekeep_version: String,
    /// The plan file it was made from.
    pub source: String,
    /// The plan file's content (relative paths made absolute).
    pub file: PlanFile,
    pub facts: Facts,
    /// Of `facts`; `apply` refuses the plan when the live facts differ.
    pub fingerprint: String,
    pub target: String,
    pub direction: Direction,
    pub hops: Vec<HopSummary>,
    pub steps: Vec<Step>,
    #[serde(default)]
    pub overrides: Overrides,
    /// Accepted departures from SPIRE's skew policy.
    #[serde(default)]
    pub skew: Vec<SkewNote>,
    /// Things a reviewer should know.
    #[serde(default)]
    pub warnings: Vec<String>,
}

impl SavedPlan {
    /// Reads a saved plan.
    ///
    /// # Errors
    /// Unreadable files, JSON errors, or another format version.
    pub fn load(path: &Path) -> Result<Self, PlanError> {
        let bytes = std::fs::read(path).map_err(|e| {
            PlanError::SavedPlan(format!("cannot read saved plan {}: {e}", path.display()))
        })?;
        let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            PlanError::SavedPlan(format!(
                "{} is not a saved plan (JSON written by `spirekeep plan --out`): {e}",
                path.display()
            ))
        })?;
        let format = value
            .get("format_version")
            .and_then(serde_json::Value::as_u64);
        if format != Some(u64::from(SAVED_PLAN_FORMAT)) {
            return Err(PlanError::SavedPlan(format!(
                "{} has format_version {}; this spirekeep reads saved plans of format {SAVED_PLAN_FORMAT}: make the plan again with `spirekeep plan`",
                path.display(),
                format.map_or_else(|| "none".into(), |f| f.to_string())
            )));
        }
        serde_json::from_value(value)
            .map_err(|e| PlanError::SavedPlan(format!("saved plan {}: {e}", path.display())))
    }

    /// Writes the plan (readable by the owner only: it may hold a connection string).
    ///
    /// # Errors
    /// I/O errors.
    pub fn store(&self, path: &Path) -> Result<(), PlanError> {
        let failed = |detail: String| PlanError::Write {
            path: path.to_path_buf(),
            detail,
        };
        let json = serde_json::to_string_pretty(self).map_err(|e| failed(e.to_string()))? + "\n";
        let tmp = path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            use std::io::Write as _;
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts.open(&tmp)?;
            f.write_all(json.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| failed(e.to_string()))
    }

    /// The plan file, validated again.
    ///
    /// # Errors
    /// A file that no longer validates (e.g. an unset environment variable).
    pub fn plan(&self) -> Result<Plan, PlanError> {
        self.file.validate()
    }

    /// A step by id.
    #[must_use]
    pub fn step(&self, id: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.id == id)
    }

    /// The version every member started at.
    #[must_use]
    pub fn original_version(&self, member: &str) -> Option<&str> {
        self.facts
            .members
            .iter()
            .find(|m| m.name == member)
            .map(|m| m.version.as_str())
    }
}
