//! `spirekeep plan FILE [--out plan.json]`: read the live facts, compute the
//! stages, print them for review and save them for `apply`.
//!
//! Exit codes (the README's table): 0 a plan was made; 9 nothing to do
//! (every member already runs the target); 8 refused (SPIRE's rules refuse
//! it, or a member's clock is beyond `clock.max_skew`; each reason with its
//! way out); 2 a bad plan file; 4 a datastore that cannot be reached; 5
//! anything else (e.g. a member whose version cannot be read).

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

use super::exit;
use super::output::print_json;
use crate::error::Error;
use crate::plan::facts::{self, Facts, show_row};
use crate::plan::model::{Direction, HopSummary, Overrides, SavedPlan, SkewNote, Step, StepKind};
use crate::plan::stages::{self, StageOptions, StagesError};
use crate::plan::{executor, file};

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The plan file (TOML, see plans/README.md).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    /// Save the plan here (JSON), for `spirekeep apply`.
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,

    /// Accept order = "agents-first" on an upgrade, which breaks SPIRE's rule
    /// that servers are upgraded before agents.
    #[arg(long)]
    pub allow_agents_first: bool,

    /// Accept order = "servers-first" on a downgrade, which breaks SPIRE's
    /// rule that agents are downgraded before servers.
    #[arg(long)]
    pub allow_servers_first: bool,
}

/// `plan --json`: the saved plan without the plan file's content (which may
/// hold a connection string).
#[derive(Debug, Serialize)]
struct PlanView<'a> {
    plan_id: &'a str,
    #[serde(with = "time::serde::rfc3339")]
    created_at: time::OffsetDateTime,
    source: &'a str,
    fingerprint: &'a str,
    target: &'a str,
    direction: Direction,
    facts: &'a Facts,
    hops: &'a [HopSummary],
    steps: &'a [Step],
    overrides: Overrides,
    skew: &'a [SkewNote],
    warnings: &'a [String],
    saved_to: Option<String>,
}

pub(crate) async fn run(args: &PlanArgs, json: bool) -> anyhow::Result<u8> {
    let (pf, plan) = file::load(&args.file).map_err(Error::from)?;
    let exec = executor::build(&plan);
    let facts = facts::read(&plan, exec.as_ref(), 1).await?;
    let options = StageOptions {
        overrides: Overrides {
            agents_first: args.allow_agents_first,
            servers_first: args.allow_servers_first,
        },
    };
    let source = std::path::absolute(&args.file)
        .unwrap_or_else(|_| args.file.clone())
        .display()
        .to_string();
    // SVIDs are time-bound: a member whose clock is off blocks the plan
    let (clock_blocking, clock_warnings) = facts.clock_findings(plan.max_clock_skew);
    let computed = stages::compute(
        &plan,
        &pf,
        &source,
        &facts,
        options,
        time::OffsetDateTime::now_utc(),
    );
    let computed = match computed {
        Ok(_) if !clock_blocking.is_empty() => Err(StagesError::Refused(clock_blocking)),
        Err(StagesError::Refused(mut lines)) => {
            lines.extend(clock_blocking);
            Err(StagesError::Refused(lines))
        }
        other => other,
    };
    let mut saved = match computed {
        Ok(s) => s,
        Err(StagesError::Refused(lines)) => {
            if json {
                print_json(&serde_json::json!({
                    "refused": lines,
                    "facts": facts,
                    "fingerprint": facts.fingerprint(),
                }))?;
            } else {
                println!("{}", render_facts(&facts));
                println!("No plan: it is refused.");
                for l in &lines {
                    println!("  - {l}");
                }
            }
            eprintln!("error: the plan is refused: {}", lines.join("; "));
            return Ok(exit::REFUSED);
        }
        Err(StagesError::Invalid(m)) => return Err(Error::Unsupported(m).into()),
    };
    saved.warnings.extend(clock_warnings);
    if let Some(out) = &args.out {
        saved.store(out).map_err(Error::from)?;
    }
    let saved_to = args.out.as_ref().map(|p| p.display().to_string());
    if json {
        print_json(&PlanView {
            plan_id: &saved.plan_id,
            created_at: saved.created_at,
            source: &saved.source,
            fingerprint: &saved.fingerprint,
            target: &saved.target,
            direction: saved.direction,
            facts: &saved.facts,
            hops: &saved.hops,
            steps: &saved.steps,
            overrides: saved.overrides,
            skew: &saved.skew,
            warnings: &saved.warnings,
            saved_to,
        })?;
    } else {
        print!("{}", render(&saved));
        match &args.out {
            Some(p) => println!(
                "\nSaved to {}. Review it, then: spirekeep apply {} (add --dry-run to see every command first)",
                p.display(),
                p.display()
            ),
            None => println!("\nNot saved: add --out plan.json to save it for `spirekeep apply`."),
        }
    }
    let moves = saved.steps.iter().any(|s| {
        matches!(
            s.kind,
            StepKind::Server { .. } | StepKind::AgentBatch { .. }
        )
    });
    if !moves {
        eprintln!("nothing to do: every member already runs {}", saved.target);
        return Ok(exit::NOTHING_TO_DO);
    }
    Ok(exit::OK)
}

fn render_facts(f: &Facts) -> String {
    let mut s = String::new();
    let d = &f.datastore;
    let agents = match &d.agents {
        None => format!(
            "{} agents (versions not recorded before schema 24)",
            d.agents_total
        ),
        Some(list) => format!(
            "{} agents ({})",
            d.agents_total,
            list.iter()
                .map(|a| format!(
                    "{}: {}",
                    if a.version.is_empty() {
                        "unreported"
                    } else {
                        &a.version
                    },
                    a.count
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let _ = writeln!(s, "Facts:");
    let _ = writeln!(
        s,
        "  datastore  {} {}: {}; {agents}{}",
        d.engine.spire_name(),
        d.location,
        show_row(d.row.as_ref()),
        if d.disable_migration {
            "; disable_migration = true"
        } else {
            ""
        }
    );
    for m in &f.members {
        let health = if m.health.is_empty() {
            String::new()
        } else if m.healthy() {
            ", healthy".into()
        } else {
            format!(
                ", UNHEALTHY ({})",
                m.health
                    .iter()
                    .filter(|g| !g.ok)
                    .map(|g| g.detail.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        };
        let clock = match (m.clock_offset_ms, &m.clock_error) {
            (Some(off), _) => {
                format!(", clock {}", facts::show_offset(off)).replace(" of", " of spirekeep's")
            }
            (None, Some(_)) => ", clock unknown".into(),
            (None, None) => String::new(),
        };
        let _ = writeln!(
            s,
            "  {:<9}  {} ({}) runs {}{health}{clock}",
            m.role.as_str(),
            m.name,
            m.group,
            m.version
        );
    }
    s
}

/// The plan for people.
#[must_use]
pub fn render(p: &SavedPlan) -> String {
    let mut s = String::new();
    let path: Vec<&str> = p.hops.iter().map(|h| h.to.as_str()).collect();
    let direction = match p.direction {
        Direction::Upgrade => "upgrade",
        Direction::Downgrade => "downgrade",
        Direction::AtTarget => "servers already at the target",
    };
    let _ = writeln!(
        s,
        "Plan {}: SPIRE to {} ({direction}{})",
        p.plan_id,
        p.target,
        if path.is_empty() {
            String::new()
        } else {
            format!(", {} hop(s): {}", path.len(), path.join(" → "))
        }
    );
    let _ = writeln!(s, "Fingerprint of the facts: {}", p.fingerprint);
    s.push_str(&render_facts(&p.facts));
    if !p.hops.is_empty() {
        let _ = writeln!(s, "Path (SPIRE's start-up rules at every hop):");
        for h in &p.hops {
            let _ = writeln!(s, "  hop {}: {} → {}: {}", h.index, h.from, h.to, h.startup);
        }
    }
    let _ = writeln!(s, "Steps:");
    for (i, step) in p.steps.iter().enumerate() {
        let _ = writeln!(s, "  {:>2}. {}", i + 1, step.title);
    }
    if p.skew.is_empty() {
        let _ = writeln!(
            s,
            "Skew: every step stays inside SPIRE's supported version skew."
        );
    } else {
        let _ = writeln!(
            s,
            "Skew: OUTSIDE SPIRE's supported skew (accepted by override):"
        );
        for n in &p.skew {
            let _ = writeln!(s, "  after {}: {}", n.after_step, n.message);
        }
    }
    if !p.warnings.is_empty() {
        let _ = writeln!(s, "Warnings:");
        for w in &p.warnings {
            let _ = writeln!(s, "  - {w}");
        }
    }
    s
}
