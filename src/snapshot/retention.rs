//! Which snapshots a retention policy keeps, and why.
//!
//! Pure logic: [`plan_prune`] takes the repository's snapshots and returns a
//! [`PrunePlan`] naming every snapshot it keeps (with each reason) and every
//! one it deletes. `prune --dry-run` prints the plan; `prune` executes exactly
//! the same plan. The rules follow restic's `forget`: within each rule,
//! snapshots are walked newest first and the newest one of each distinct
//! period (hour, day, ISO week, month, in UTC) is kept until the rule's count
//! runs out. The rules count only snapshots whose manifest can be read. On top
//! of the rules, these are never deleted: a pinned snapshot (e.g. the
//! `pre-upgrade` snapshot of an unfinished plan), the newest verified
//! snapshot, the newest restorable one (whose manifest reads), and a snapshot
//! whose manifest cannot be read (kept for inspection, never counted).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// How many snapshots each rule keeps. Zero turns a rule off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionPolicy {
    pub keep_last: u32,
    pub keep_hourly: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
}

impl RetentionPolicy {
    /// Whether any rule is set; a policy with none would delete everything.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.keep_last == 0
            && self.keep_hourly == 0
            && self.keep_daily == 0
            && self.keep_weekly == 0
            && self.keep_monthly == 0
    }
}

/// What retention needs to know about one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotFacts {
    pub id: String,
    /// When the snapshot was taken (its consistent read started).
    #[serde(with = "time::serde::rfc3339")]
    pub taken_at: OffsetDateTime,
    /// Why it must stay whatever the rules say (e.g. `pre-upgrade, held by plan 2026-11-28-upgrade`).
    pub pinned_by: Option<String>,
    /// Whether a verification of it succeeded.
    pub verified: bool,
    /// Why its manifest cannot be read, if it cannot: such a snapshot cannot
    /// be restored, no rule counts it, and it is never deleted (it is kept for
    /// inspection).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub damaged: Option<String>,
}

/// One snapshot's fate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub taken_at: OffsetDateTime,
    /// Why it is kept (empty for a deleted snapshot).
    pub reasons: Vec<String>,
}

/// The outcome of a retention run, computed before anything is deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PrunePlan {
    /// Kept snapshots, newest first.
    pub keep: Vec<Decision>,
    /// Snapshots to delete, newest first.
    pub delete: Vec<Decision>,
}

/// Names the calendar bucket (hour, day, ISO week, month) a time falls in.
type BucketOf = fn(OffsetDateTime) -> String;

/// Applies `policy` to `snapshots` (any order).
#[must_use]
pub fn plan_prune(policy: &RetentionPolicy, snapshots: &[SnapshotFacts]) -> PrunePlan {
    let mut sorted: Vec<&SnapshotFacts> = snapshots.iter().collect();
    sorted.sort_by(|a, b| b.taken_at.cmp(&a.taken_at).then_with(|| b.id.cmp(&a.id)));
    let mut reasons: Vec<Vec<String>> = vec![Vec::new(); sorted.len()];
    let restorable = |s: &&SnapshotFacts| s.damaged.is_none();

    for (i, _) in sorted
        .iter()
        .enumerate()
        .filter(|(_, s)| restorable(s))
        .take(policy.keep_last as usize)
    {
        reasons[i].push(format!("last {}", policy.keep_last));
    }
    let rules: [(u32, &str, BucketOf); 4] = [
        (policy.keep_hourly, "hourly", |t| {
            format!(
                "{:04}-{:02}-{:02}T{:02}",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour()
            )
        }),
        (policy.keep_daily, "daily", |t| {
            format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day())
        }),
        (policy.keep_weekly, "weekly", |t| {
            let (y, w, _) = t.to_iso_week_date();
            format!("{y:04}-W{w:02}")
        }),
        (policy.keep_monthly, "monthly", |t| {
            format!("{:04}-{:02}", t.year(), u8::from(t.month()))
        }),
    ];
    for (count, name, bucket) in rules {
        let mut left = count;
        let mut last: Option<String> = None;
        for (i, s) in sorted.iter().enumerate().filter(|(_, s)| restorable(s)) {
            if left == 0 {
                break;
            }
            let b = bucket(s.taken_at.to_offset(time::UtcOffset::UTC));
            if last.as_deref() != Some(b.as_str()) {
                reasons[i].push(format!("{name} {b}"));
                left -= 1;
                last = Some(b);
            }
        }
    }
    for (i, s) in sorted.iter().enumerate() {
        if let Some(pin) = &s.pinned_by {
            reasons[i].push(format!("pinned: {pin}"));
        }
    }
    if let Some(i) = sorted.iter().position(|s| s.verified && restorable(s)) {
        reasons[i].push("newest verified snapshot".into());
    }
    // Every rule keeps it already; this holds even for a policy without rules.
    if let Some(i) = sorted.iter().position(restorable)
        && reasons[i].is_empty()
    {
        reasons[i].push("newest restorable snapshot".into());
    }
    for (i, s) in sorted.iter().enumerate() {
        if let Some(why) = &s.damaged {
            reasons[i].push(format!(
                "damaged: {why}; not counted by any rule and never deleted by prune (inspect it, then \
                 remove snapshots/{}/ by hand)",
                s.id
            ));
        }
    }

    let mut plan = PrunePlan::default();
    for (s, r) in sorted.into_iter().zip(reasons) {
        let d = Decision {
            id: s.id.clone(),
            taken_at: s.taken_at,
            reasons: r,
        };
        if d.reasons.is_empty() {
            plan.delete.push(d);
        } else {
            plan.keep.push(d);
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::Duration;

    fn at(hours_ago: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_790_000_000).unwrap() - Duration::hours(hours_ago)
    }

    fn snap(id: &str, hours_ago: i64) -> SnapshotFacts {
        SnapshotFacts {
            id: id.into(),
            taken_at: at(hours_ago),
            pinned_by: None,
            verified: false,
            damaged: None,
        }
    }

    fn ids(d: &[Decision]) -> Vec<&str> {
        d.iter().map(|d| d.id.as_str()).collect()
    }

    #[test]
    fn keep_last_keeps_the_newest() {
        let snaps = vec![snap("a", 3), snap("b", 2), snap("c", 1)];
        let plan = plan_prune(
            &RetentionPolicy {
                keep_last: 2,
                ..Default::default()
            },
            &snaps,
        );
        assert_eq!(ids(&plan.keep), ["c", "b"]);
        assert_eq!(ids(&plan.delete), ["a"]);
        assert_eq!(plan.keep[0].reasons, ["last 2"]);
    }

    #[test]
    fn daily_keeps_the_newest_of_each_day() {
        // Every 6 hours for 4 days: 16 snapshots.
        let snaps: Vec<SnapshotFacts> = (0..16).map(|i| snap(&format!("s{i:02}"), i * 6)).collect();
        let plan = plan_prune(
            &RetentionPolicy {
                keep_daily: 3,
                ..Default::default()
            },
            &snaps,
        );
        assert_eq!(plan.keep.len(), 3);
        let days: Vec<String> = plan.keep.iter().map(|d| d.reasons[0].clone()).collect();
        let mut unique = days.clone();
        unique.dedup();
        assert_eq!(days, unique, "one per day");
        assert_eq!(plan.keep.len() + plan.delete.len(), 16);
        // The newest snapshot is always the first daily one.
        assert_eq!(plan.keep[0].id, "s00");
    }

    #[test]
    fn pinned_and_newest_verified_survive_any_policy() {
        let mut snaps = vec![
            snap("old-verified", 100),
            snap("pinned", 50),
            snap("new", 1),
            snap("newer", 0),
        ];
        snaps[0].verified = true;
        snaps[1].pinned_by = Some("pre-upgrade, held by plan p1".into());
        let plan = plan_prune(
            &RetentionPolicy {
                keep_last: 1,
                ..Default::default()
            },
            &snaps,
        );
        assert_eq!(ids(&plan.keep), ["newer", "pinned", "old-verified"]);
        assert_eq!(ids(&plan.delete), ["new"]);
        assert_eq!(plan.keep[2].reasons, ["newest verified snapshot"]);
        // A newer verified snapshot releases the older one.
        snaps[2].verified = true;
        let plan = plan_prune(
            &RetentionPolicy {
                keep_last: 1,
                ..Default::default()
            },
            &snaps,
        );
        assert_eq!(ids(&plan.delete), ["old-verified"]);
    }

    /// Regression (issue 14): with a damaged manifest on the newest of two
    /// snapshots, `--keep-last 1` kept the damaged one and deleted the only
    /// restorable one.
    #[test]
    fn damaged_snapshots_are_not_counted_and_the_newest_restorable_is_kept() {
        let mut snaps = vec![snap("good", 2), snap("damaged", 1)];
        snaps[1].damaged = Some("manifest unreadable".into());
        let plan = plan_prune(
            &RetentionPolicy {
                keep_last: 1,
                ..Default::default()
            },
            &snaps,
        );
        assert_eq!(ids(&plan.keep), ["damaged", "good"]);
        assert!(plan.delete.is_empty());
        assert_eq!(plan.keep[1].reasons, ["last 1"]);
        let plan = plan_prune(&RetentionPolicy::default(), &snaps);
        assert_eq!(ids(&plan.keep), ["damaged", "good"]);
        assert_eq!(plan.keep[1].reasons, ["newest restorable snapshot"]);
        assert!(plan.keep[0].reasons[0].starts_with("damaged: "));
        // A rule reaching past the newest restorable one still keeps it.
        let mut snaps = vec![snap("good", 30), snap("newer", 2), snap("damaged", 1)];
        snaps[2].damaged = Some("x".into());
        let plan = plan_prune(
            &RetentionPolicy {
                keep_last: 1,
                ..Default::default()
            },
            &snaps,
        );
        assert_eq!(ids(&plan.keep), ["damaged", "newer"]);
        assert_eq!(ids(&plan.delete), ["good"]);
    }

    #[test]
    fn empty_policy_is_detectable() {
        assert!(RetentionPolicy::default().is_empty());
        assert!(
            !RetentionPolicy {
                keep_monthly: 1,
                ..Default::default()
            }
            .is_empty()
        );
    }
}
