//! `spirekeep apply PLAN.json [--resume] [--dry-run]`: run a saved plan.
//!
//! Exit codes (the README's table): 0 completed (or a dry run of a fresh
//! plan); 9 nothing to do (every member already runs the target); 8 refused
//! before anything changed (stale plan, unhealthy fleet, clock skew, a
//! snapshot that could not be taken); 3 failed and rolled back (the datastore
//! was restored and every member returned); 7 failed and NOT back where it
//! started: the rollback did not complete, or the plan stopped half-way (an
//! agent batch failed and was returned, a post-check failed, agents left
//! behind would break the skew): an operator must act, the journal says
//! where; 2 bad input (no such plan, a journal that needs --resume);
//! 5 anything else (e.g. the journal cannot be written).

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::exit;
use super::output::print_json;
use crate::agent::shutdown;
use crate::error::Error;
use crate::plan::apply::{ApplyOptions, ApplyReport, DryRun, Progress, StepStatus, apply, dry_run};
use crate::plan::facts::show_row;
use crate::plan::health::human_duration;
use crate::plan::journal::{self, Outcome};
use crate::plan::model::SavedPlan;

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The saved plan (`spirekeep plan FILE --out plan.json`).
    #[arg(value_name = "PLAN")]
    pub plan: PathBuf,

    /// Continue a plan from its journal (after a kill, or a stopped batch).
    #[arg(long)]
    pub resume: bool,

    /// Show every command and check, run nothing (the members' version
    /// commands run, to tell whether the plan is stale).
    #[arg(long)]
    pub dry_run: bool,

    /// The journal file (default: next to the plan, NAME.journal.jsonl).
    #[arg(long, value_name = "PATH")]
    pub journal: Option<PathBuf>,

    /// Encrypt the pre-upgrade snapshot (needs --identity too, for the rollback).
    #[command(flatten)]
    pub recipients: super::keys::RecipientArgs,

    /// Decrypts the pre-upgrade snapshot if a rollback restores it.
    #[command(flatten)]
    pub identity: super::keys::IdentityArgs,
}

/// The exit code for an outcome.
#[must_use]
pub fn exit_code(outcome: Outcome) -> u8 {
    match outcome {
        Outcome::Completed => exit::OK,
        Outcome::NothingToDo => exit::NOTHING_TO_DO,
        Outcome::Refused => exit::REFUSED,
        Outcome::RolledBack => exit::ROLLED_BACK,
        Outcome::Stopped | Outcome::RollbackFailed => exit::ROLLBACK_FAILED,
    }
}

pub(crate) async fn run(args: &ApplyArgs, json: bool) -> anyhow::Result<u8> {
    let saved = SavedPlan::load(&args.plan).map_err(Error::from)?;
    if args.dry_run {
        let d = dry_run(&saved, true).await?;
        if json {
            print_json(&d)?;
        } else {
            print!("{}", render_dry_run(&d));
        }
        return Ok(if d.fresh == Some(false) {
            exit::REFUSED
        } else {
            exit::OK
        });
    }
    let keyring = super::keys::keyring(&args.recipients, &args.identity, true)?;
    // A first SIGTERM/SIGINT stops `apply` before its next step (and a
    // snapshot or restore under the lease before it commits); a second one
    // stops it at once. Either way the journal says where `--resume` goes on.
    let signals = shutdown::listen()
        .map_err(|e| Error::Aborted(format!("cannot install the signal handlers: {e}")))?;
    let mut second = signals.clone();
    tokio::spawn(async move {
        shutdown::at_least(&mut second, 2).await;
        eprintln!(
            "error: stopped by a second signal; `spirekeep apply --resume` continues from the journal"
        );
        std::process::exit(i32::from(exit::FAILED));
    });
    let options = ApplyOptions {
        resume: args.resume,
        journal: args
            .journal
            .clone()
            .unwrap_or_else(|| journal::path_for(&args.plan)),
        signals: Some(signals),
        keyring,
    };
    let progress = TermProgress::new(!json && std::io::stderr().is_terminal());
    if !progress.is_terminal() {
        // not a terminal: one plain line per step on stderr instead
        eprintln!(
            "apply {}: {} steps, journal {}",
            saved.plan_id,
            saved.steps.len(),
            options.journal.display()
        );
    }
    let report = apply(&saved, &options, &progress).await?;
    progress.clear();
    if json {
        print_json(&report)?;
    } else {
        print!("{}", render_report(&report));
    }
    if !matches!(report.outcome, Outcome::Completed | Outcome::NothingToDo) {
        eprintln!(
            "error: plan {} {}: {}",
            report.plan_id,
            report.outcome.as_str(),
            report.summary
        );
    }
    Ok(exit_code(report.outcome))
}

fn mark(status: StepStatus) -> &'static str {
    match status {
        StepStatus::Done => "done",
        StepStatus::DoneEarlier => "done earlier",
        StepStatus::Reconciled => "reconciled",
        StepStatus::Failed => "FAILED",
        StepStatus::NotRun => "not run",
    }
}

fn render_report(r: &ApplyReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Plan {}: {}{}",
        r.plan_id,
        r.outcome.as_str().replace('_', " "),
        if r.resumed { " (resumed)" } else { "" }
    );
    let _ = writeln!(s, "{}", r.summary);
    let _ = writeln!(s, "Steps:");
    for st in &r.steps {
        let _ = writeln!(
            s,
            "  [{:<12}] {}{}",
            mark(st.status),
            st.title,
            if st.detail.is_empty() || st.status == StepStatus::NotRun {
                String::new()
            } else {
                format!(" — {}", st.detail)
            }
        );
    }
    if !r.rollback.is_empty() {
        let _ = writeln!(s, "Rollback:");
        for st in &r.rollback {
            let _ = writeln!(
                s,
                "  [{:<12}] {} — {}",
                mark(st.status),
                st.title,
                st.detail
            );
        }
    }
    let _ = writeln!(s, "Where everything is now:");
    for m in &r.members {
        let health = match m.healthy {
            Some(true) => "healthy".to_owned(),
            Some(false) => format!("UNHEALTHY: {}", m.problem.as_deref().unwrap_or("")),
            None => format!("unknown: {}", m.problem.as_deref().unwrap_or("")),
        };
        let _ = writeln!(
            s,
            "  {:<6} {} runs {} (was {} when planned), {health}",
            m.role.as_str(),
            m.name,
            m.version.as_deref().unwrap_or("?"),
            m.planned_from
        );
    }
    let _ = writeln!(s, "  datastore: {}", show_row(r.datastore.as_ref()));
    if let Some(id) = &r.snapshot_id {
        let _ = writeln!(s, "  pre-upgrade snapshot: {id}");
    }
    let _ = writeln!(s, "Journal: {}", r.journal);
    if let Some(e) = &r.journal_mirror_error {
        let _ = writeln!(s, "  (not mirrored into the repository: {e})");
    }
    for w in &r.warnings {
        let _ = writeln!(s, "warning: {w}");
    }
    s
}

fn render_dry_run(d: &DryRun) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Dry run of plan {} (executor {}): nothing is changed.",
        d.plan_id, d.executor
    );
    match d.fresh {
        Some(true) => {
            let _ = writeln!(s, "The live facts match the plan.");
        }
        Some(false) => {
            let _ = writeln!(s, "The plan is STALE; apply would refuse it:");
            for l in &d.stale {
                let _ = writeln!(s, "  - {l}");
            }
        }
        None => {
            for l in &d.stale {
                let _ = writeln!(s, "note: {l}");
            }
        }
    }
    let section = |s: &mut String, steps: &[crate::plan::apply::DryRunStep]| {
        for (i, st) in steps.iter().enumerate() {
            let _ = writeln!(s, "{:>3}. {}", i + 1, st.title);
            for c in &st.commands {
                let _ = writeln!(s, "       $ {c}");
            }
            for c in &st.checks {
                let _ = writeln!(s, "       check: {c}");
            }
        }
    };
    section(&mut s, &d.steps);
    let _ = writeln!(s, "If a server step or the datastore gate fails:");
    section(&mut s, &d.on_server_failure);
    s
}

/// A spinner with the current step on a terminal; log events otherwise.
struct TermProgress {
    bar: Option<Mutex<Option<ProgressBar>>>,
}

impl TermProgress {
    fn new(enabled: bool) -> Self {
        Self {
            bar: enabled.then(|| Mutex::new(None)),
        }
    }

    fn is_terminal(&self) -> bool {
        self.bar.is_some()
    }

    fn clear(&self) {
        if let Some(m) = &self.bar
            && let Ok(mut b) = m.lock()
            && let Some(b) = b.take()
        {
            b.finish_and_clear();
        }
    }
}

impl Progress for TermProgress {
    fn begin(&self, id: &str, title: &str, n: usize, total: usize) {
        tracing::info!(step = id, "{title}");
        let Some(m) = &self.bar else { return };
        let Ok(mut slot) = m.lock() else { return };
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_message(if total > 0 {
            format!("[{n}/{total}] {title}")
        } else {
            title.to_owned()
        });
        bar.enable_steady_tick(Duration::from_millis(120));
        *slot = Some(bar);
    }

    fn end(&self, id: &str, status: StepStatus, detail: &str, millis: u64) {
        tracing::info!(step = id, status = mark(status), "{detail}");
        let rest = format!(
            "{id}{}{}",
            if detail.is_empty() {
                String::new()
            } else {
                format!(": {detail}")
            },
            if millis > 0 {
                format!(" ({})", human_duration(Duration::from_millis(millis)))
            } else {
                String::new()
            }
        );
        let Some(m) = &self.bar else {
            // not a terminal (a log, CI): one plain line per step, when it ends
            eprintln!("[{}] {rest}", mark(status));
            return;
        };
        let line = format!(
            "{} {rest}",
            match status {
                StepStatus::Failed => "✗",
                StepStatus::NotRun => "-",
                _ => "✓",
            }
        );
        let Ok(mut slot) = m.lock() else { return };
        match slot.take() {
            Some(bar) => {
                bar.finish_and_clear();
                eprintln!("{line}");
            }
            None => eprintln!("{line}"),
        }
    }

    fn note(&self, message: &str) {
        tracing::warn!("{message}");
        eprintln!("! {message}");
    }
}
