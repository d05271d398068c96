//! `spirekeep prune`

use std::fmt::Write as _;
use std::time::Duration;

use clap::Args;
use serde::Serialize;
use time::OffsetDateTime;

use super::exit;
use super::lock::{Held, LockArgs};
use super::output::print_json;
use super::progress::{Mode, Progress, Unit};
use super::repo::RepoArgs;
use crate::snapshot::backup::validate_label;
use crate::snapshot::listing::{human_bytes, rfc3339};
use crate::snapshot::prune::{
    self, LeftoverKind, PruneOptions, PruneOutcome, PrunePlan, short_duration,
};
use crate::snapshot::retention::RetentionPolicy;

/// The retention rules, shared by `prune` and `agent`.
#[derive(Debug, Args, Clone)]
pub struct RetentionArgs {
    /// Keep the newest N snapshots.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_last: u32,
    /// Keep the newest snapshot of each of the last N hours (UTC) that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_hourly: u32,
    /// Keep the newest snapshot of each of the last N days (UTC) that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_daily: u32,
    /// Keep the newest snapshot of each of the last N ISO weeks that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_weekly: u32,
    /// Keep the newest snapshot of each of the last N months that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_monthly: u32,
    /// Keep every snapshot carrying this label (repeatable), e.g. --pin-label pre-upgrade. Snapshots
    /// pinned with `spirekeep pin` (as staged upgrades pin their pre-upgrade snapshot) are always kept.
    #[arg(long = "pin-label", value_name = "LABEL")]
    pub pin_labels: Vec<String>,
    /// Objects of a snapshot that never got its manifest (a killed backup) are removed once they are
    /// this old; younger ones may belong to a backup in progress.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = humantime::parse_duration)]
    pub orphan_grace: Duration,
}

impl RetentionArgs {
    pub(crate) fn policy(&self) -> RetentionPolicy {
        RetentionPolicy {
            keep_last: self.keep_last,
            keep_hourly: self.keep_hourly,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_monthly: self.keep_monthly,
        }
    }

    pub(crate) fn options(&self) -> anyhow::Result<PruneOptions> {
        for label in &self.pin_labels {
            validate_label(label)?;
        }
        Ok(PruneOptions {
            policy: self.policy(),
            pin_labels: self.pin_labels.clone(),
            orphan_grace: time::Duration::try_from(self.orphan_grace)
                .map_err(|e| anyhow::anyhow!("--orphan-grace is too long: {e}"))?,
            now: OffsetDateTime::now_utc(),
        })
    }
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    #[command(flatten)]
    pub repo: RepoArgs,

    #[command(flatten)]
    pub retention: RetentionArgs,

    /// Print what would be deleted and why each snapshot is kept; delete nothing (and take no lock).
    #[arg(long)]
    pub dry_run: bool,

    #[command(flatten)]
    pub lock: LockArgs,
}

#[derive(Serialize)]
struct PruneJson<'a> {
    dry_run: bool,
    plan: &'a PrunePlan,
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<&'a PruneOutcome>,
}

pub(crate) async fn run(args: &PruneArgs, json: bool) -> anyhow::Result<u8> {
    let repo = args.repo.open()?;
    let mut options = args.retention.options()?;
    prune::check_policy(&options.policy)?;
    if args.dry_run {
        let plan = prune::plan(&repo, &options).await?;
        if json {
            print_json(&PruneJson {
                dry_run: true,
                plan: &plan,
                outcome: None,
            })?;
        } else {
            print!("{}", render_plan(&plan, true));
        }
        return Ok(exit::OK);
    }
    let held = Held::acquire(&repo, &args.lock, "prune").await?;
    let progress = Progress::new("prune", json);
    let started = std::time::Instant::now();
    let result = held
        .guard(async {
            // Planned under the lock: no backup is writing now.
            options.now = OffsetDateTime::now_utc();
            progress.stage("planning under the repository lock");
            let plan = prune::plan(&repo, &options).await?;
            let (objects, bytes) = plan.deleted_totals();
            progress.stage(&format!(
                "deleting {} snapshots and {} leftover groups: {objects} objects, {}",
                plan.delete.len(),
                plan.leftovers.iter().filter(|l| l.delete).count(),
                human_bytes(bytes)
            ));
            progress.start("deleting", Some(bytes), Unit::Bytes);
            let done = std::sync::atomic::AtomicU64::new(0);
            let deleted = |what: &str, size: u64| {
                let total = done.fetch_add(size, std::sync::atomic::Ordering::Relaxed) + size;
                progress.set("deleting", total);
                if progress.mode() != Mode::Bars {
                    progress.stage(&format!("deleted {what} ({})", human_bytes(size)));
                }
            };
            let outcome = prune::execute_observed(&repo, &plan, held.lock(), &deleted).await?;
            progress.finish(
                "deleting",
                outcome.bytes_deleted,
                &format!(
                    "{} objects, {} deleted",
                    outcome.objects_deleted,
                    human_bytes(outcome.bytes_deleted)
                ),
            );
            Ok((plan, outcome))
        })
        .await;
    held.release().await;
    progress.clear();
    let (plan, outcome) = result?;
    tracing::info!(
        event = "prune_finished",
        snapshots = outcome.snapshots_deleted.len(),
        leftovers = outcome.leftovers_deleted.len(),
        objects = outcome.objects_deleted,
        bytes = outcome.bytes_deleted,
        duration_seconds = started.elapsed().as_secs_f64(),
        "pruned"
    );
    if json {
        print_json(&PruneJson {
            dry_run: false,
            plan: &plan,
            outcome: Some(&outcome),
        })?;
    } else {
        print!("{}", render_plan(&plan, false));
        for s in &outcome.skipped {
            println!("skipped {s}");
        }
        println!(
            "deleted {} snapshots and {} leftover groups: {} objects, {}",
            outcome.snapshots_deleted.len(),
            outcome.leftovers_deleted.len(),
            outcome.objects_deleted,
            human_bytes(outcome.bytes_deleted)
        );
    }
    Ok(exit::OK)
}

/// The plan as text: one line per snapshot and leftover group.
fn render_plan(plan: &PrunePlan, dry_run: bool) -> String {
    let mut out = String::new();
    let p = &plan.policy;
    let _ = writeln!(
        out,
        "prune plan for {}: keep last {}, hourly {}, daily {}, weekly {}, monthly {}{}; orphan grace {}",
        plan.repository,
        p.keep_last,
        p.keep_hourly,
        p.keep_daily,
        p.keep_weekly,
        p.keep_monthly,
        if plan.pin_labels.is_empty() {
            String::new()
        } else {
            format!("; pin labels {}", plan.pin_labels.join(", "))
        },
        short_duration(time::Duration::seconds(plan.orphan_grace_seconds)),
    );
    let mut all: Vec<(&str, &crate::snapshot::prune::SnapshotDecision)> = plan
        .keep
        .iter()
        .map(|d| ("keep", d))
        .chain(plan.delete.iter().map(|d| ("delete", d)))
        .collect();
    all.sort_by(|a, b| b.1.id.cmp(&a.1.id));
    for (verb, d) in all {
        let why = if d.reasons.is_empty() {
            format!(
                "no rule keeps it ({} objects, {})",
                d.objects,
                human_bytes(d.bytes)
            )
        } else {
            d.reasons.join(", ")
        };
        let _ = writeln!(out, "{verb:<8}{}  {}  {why}", d.id, rfc3339(d.taken_at));
    }
    for l in &plan.leftovers {
        let what = match l.kind {
            LeftoverKind::SnapshotWithoutManifest => "leftover",
            LeftoverKind::VerificationsWithoutSnapshot => "records",
            LeftoverKind::UploadStaging => "staging",
        };
        let _ = writeln!(
            out,
            "{:<8}{what} {} ({} objects, {}): {}",
            if l.delete { "delete" } else { "keep" },
            l.prefix,
            l.objects,
            human_bytes(l.bytes),
            l.reason
        );
    }
    for f in &plan.foreign {
        let _ = writeln!(out, "ignore  {f}: not named like a snapshot, never touched");
    }
    for pin in &plan.dangling_pins {
        let _ = writeln!(
            out,
            "note    pin of {} by {} refers to a snapshot that does not exist; `spirekeep pin remove` clears it",
            pin.snapshot_id, pin.holder
        );
    }
    let (objects, bytes) = plan.deleted_totals();
    let leftovers = plan.leftovers.iter().filter(|l| l.delete).count();
    let _ = writeln!(
        out,
        "{} {} snapshots and {leftovers} leftover groups ({objects} objects, {}); keep {} snapshots{}",
        if dry_run { "would delete" } else { "deleting" },
        plan.delete.len(),
        human_bytes(bytes),
        plan.keep.len(),
        if dry_run {
            " (dry run: nothing deleted)"
        } else {
            ""
        },
    );
    out
}
