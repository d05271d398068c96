//! `spirekeep status [PLAN]`: where a plan stands, from its journal (the
//! local file next to the saved plan, else the copy mirrored into the
//! repository). Without a plan, lists the plans whose journals the
//! repository holds (`--repo`).

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

use super::exit;
use super::output::print_json;
use super::repo::RepoArgs;
use crate::error::Error;
use crate::plan::journal::{self, Event, Record, State};
use crate::plan::model::SavedPlan;
use crate::store::keys;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// A saved plan (its journal is read next to it).
    #[arg(value_name = "PLAN")]
    pub plan: Option<PathBuf>,

    /// The journal file (default: next to the plan, NAME.journal.jsonl).
    #[arg(long, value_name = "PATH")]
    pub journal: Option<PathBuf>,

    /// Without PLAN: the repository whose mirrored journals to list.
    #[command(flatten)]
    pub repo: RepoArgs,
}

/// One step in `status`.
#[derive(Debug, Serialize)]
struct StepLine {
    id: String,
    title: String,
    /// `done`, `failed`, `running_or_interrupted`, `pending`.
    status: &'static str,
    attempts: u32,
    detail: String,
}

/// `status --json`.
#[derive(Debug, Serialize)]
struct StatusView {
    plan_id: String,
    target: Option<String>,
    /// `not_started`, `in_progress`, `rolling_back`, or the outcome.
    state: String,
    summary: Option<String>,
    snapshot_id: Option<String>,
    done: usize,
    total: usize,
    interrupted: Option<String>,
    applies: u32,
    journal: String,
    steps: Vec<StepLine>,
    rollback: Vec<StepLine>,
    last: Option<Record>,
}

pub(crate) async fn run(args: &StatusArgs, json: bool) -> anyhow::Result<u8> {
    let Some(plan_path) = &args.plan else {
        return list(args, json).await;
    };
    let saved = SavedPlan::load(plan_path).map_err(Error::from)?;
    let jpath = args
        .journal
        .clone()
        .unwrap_or_else(|| journal::path_for(plan_path));
    let mut source = jpath.display().to_string();
    let mut records = journal::read(&jpath).map_err(Error::from)?;
    if records.is_empty() {
        // maybe it ran elsewhere: the mirror
        if let Ok(plan) = saved.plan()
            && let Ok(repo) = crate::store::Repository::open(&plan.repository, &plan.repo_options)
            && let Ok(Some(m)) = journal::read_mirror(&repo, &saved.plan_id).await
        {
            source = format!(
                "{repo} ({})",
                keys::journal(&saved.plan_id).unwrap_or_default()
            );
            records = m.records;
        }
    }
    let view = view(&saved, &records, source);
    if json {
        print_json(&view)?;
    } else {
        print!("{}", render(&view));
    }
    Ok(exit::OK)
}

fn view(saved: &SavedPlan, records: &[Record], source: String) -> StatusView {
    let state = State::of(records);
    let line = |id: &str, title: &str| StepLine {
        id: id.to_owned(),
        title: title.to_owned(),
        status: if state.is_done(id) {
            "done"
        } else if state.interrupted.as_deref() == Some(id) {
            "running_or_interrupted"
        } else if state.failed.contains_key(id) {
            "failed"
        } else {
            "pending"
        },
        attempts: state.attempts.get(id).copied().unwrap_or(0),
        detail: state
            .done_detail
            .get(id)
            .or_else(|| state.failed.get(id))
            .cloned()
            .unwrap_or_default(),
    };
    let steps: Vec<StepLine> = saved.steps.iter().map(|s| line(&s.id, &s.title)).collect();
    // rollback steps appear only in the journal
    let mut rb_ids: Vec<String> = Vec::new();
    for r in records {
        if let Event::StepStarted { step, .. } = &r.event
            && step.starts_with("rollback.")
            && !rb_ids.contains(step)
        {
            rb_ids.push(step.clone());
        }
    }
    let rollback = rb_ids.iter().map(|id| line(id, id)).collect();
    let st = match (&state.finished, &state.rollback) {
        (Some((o, _)), _) => o.as_str().to_owned(),
        (_, Some(_)) => "rolling_back".into(),
        _ if records.is_empty() => "not_started".into(),
        _ => "in_progress".into(),
    };
    StatusView {
        plan_id: saved.plan_id.clone(),
        target: Some(saved.target.clone()),
        state: st,
        summary: state.finished.as_ref().map(|(_, s)| s.clone()),
        snapshot_id: state.snapshot_id(),
        done: saved.steps.iter().filter(|s| state.is_done(&s.id)).count(),
        total: saved.steps.len(),
        interrupted: state.interrupted.clone(),
        applies: state.applies,
        journal: source,
        steps,
        rollback,
        last: records.last().cloned(),
    }
}

fn render(v: &StatusView) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Plan {} (to {}): {}, {} of {} steps done{}",
        v.plan_id,
        v.target.as_deref().unwrap_or("?"),
        v.state.replace('_', " "),
        v.done,
        v.total,
        if v.applies > 1 {
            format!(", applied {} times", v.applies)
        } else {
            String::new()
        }
    );
    if let Some(sum) = &v.summary {
        let _ = writeln!(s, "{sum}");
    }
    if let Some(i) = &v.interrupted {
        let _ = writeln!(
            s,
            "Step {i} started and did not finish (the process was stopped): `spirekeep apply --resume` reconciles it"
        );
    }
    if let Some(id) = &v.snapshot_id {
        let _ = writeln!(s, "Pre-upgrade snapshot: {id}");
    }
    for st in &v.steps {
        let _ = writeln!(
            s,
            "  [{:<22}] {}{}",
            st.status,
            st.title,
            if st.attempts > 1 {
                format!(" ({} attempts)", st.attempts)
            } else {
                String::new()
            }
        );
    }
    if !v.rollback.is_empty() {
        let _ = writeln!(s, "Rollback:");
        for st in &v.rollback {
            let _ = writeln!(s, "  [{:<22}] {} {}", st.status, st.id, st.detail);
        }
    }
    let _ = writeln!(s, "Journal: {}", v.journal);
    s
}

/// Lists the mirrored journals of a repository.
async fn list(args: &StatusArgs, json: bool) -> anyhow::Result<u8> {
    let repo = args.repo.open().map_err(|_| {
        Error::Unsupported(
            "give a saved plan (spirekeep status plan.json), or --repo URL to list the plans whose journals it holds".into(),
        )
    })?;
    let mut out = Vec::new();
    for meta in repo.list(keys::JOURNAL).await? {
        let Some(id) = meta
            .key
            .strip_prefix(keys::JOURNAL)
            .and_then(|k| k.strip_suffix(".json"))
        else {
            continue;
        };
        match journal::read_mirror(&repo, id).await {
            Ok(Some(m)) => {
                let st = State::of(&m.records);
                let state = match (&st.finished, &st.rollback) {
                    (Some((o, _)), _) => o.as_str().to_owned(),
                    (None, Some(_)) => "rolling_back".into(),
                    _ => "in_progress".into(),
                };
                out.push(serde_json::json!({
                    "plan_id": m.plan_id,
                    "state": state,
                    "steps_done": st.done.len(),
                    "snapshot_id": st.snapshot_id(),
                    "last_event_at": m.records.last().map(|r| r.at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()),
                }));
            }
            Ok(None) => {}
            Err(e) => out.push(serde_json::json!({ "plan_id": id, "error": e.to_string() })),
        }
    }
    if json {
        print_json(&out)?;
    } else if out.is_empty() {
        println!("{repo} holds no plan journals");
    } else {
        for p in &out {
            println!(
                "{}  {}  {} steps done  snapshot {}",
                p["plan_id"].as_str().unwrap_or("?"),
                p["state"].as_str().unwrap_or("?"),
                p["steps_done"],
                p["snapshot_id"].as_str().unwrap_or("-")
            );
        }
    }
    Ok(exit::OK)
}
