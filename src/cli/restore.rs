//! `spirekeep restore`

use clap::Args;

use super::output::{print_failure, print_json};
use super::progress::Progress;
use super::repo::RepoArgs;
use super::{DatastoreArgs, exit};
use crate::datastore::{self, OpenMode};
use crate::error::{Error, ErrorKind};
use crate::snapshot::Manifest;
use crate::snapshot::adapt::ChangeKind;
use crate::snapshot::listing::{human_bytes, resolve, rfc3339};
use crate::snapshot::live_rules::{RuleOptions, RulesReport};
use crate::snapshot::manifest::RowAccess;
use crate::snapshot::restore::{RestoreOptions, RestorePlan, RestoreReport, execute_fenced, plan};
use crate::snapshot::server_files;

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Snapshot id, or `latest`.
    #[arg(value_name = "ID|latest")]
    pub snapshot: String,

    /// The datastore to restore into (see --datastore / --spire-config). A SQLite path that does not exist is created.
    #[command(flatten)]
    pub datastore: DatastoreArgs,

    #[command(flatten)]
    pub repo: RepoArgs,

    /// Needed to restore an encrypted snapshot.
    #[command(flatten)]
    pub identity: super::keys::IdentityArgs,

    /// Replace a datastore that already holds tables (every table in it is dropped). Stop every SPIRE server first:
    /// a target that other clients still use is refused (see --force).
    #[arg(long)]
    pub replace: bool,

    /// Replace the target even while other clients (SPIRE servers) use it. Without it, `--replace` refuses and names
    /// them: stop every SPIRE server using the datastore, restore, then start them (a running server keeps writing
    /// into what is being replaced, and with the events-based cache it never sees the restored rows).
    #[arg(long)]
    pub force: bool,

    /// Apply the values the preflight lists as changed for the target engine (e.g. sub-second times and four-byte
    /// UTF-8 into MySQL), and record them in the repository. Without it the restore refuses.
    #[arg(long)]
    pub accept_changes: bool,

    /// Check the snapshot, run the preflight and show the impact on the live datastore, then stop: nothing is written.
    #[arg(long)]
    pub dry_run: bool,

    /// Also write the snapshot's SPIRE server files (the disk KeyManager's keys file, the data dir) under DIR, each
    /// checked against its SHA-256 first; without DIR (put the flag last, or write --server-files=DIR), into the
    /// data_dir of --spire-config. Existing files are refused unless --replace. An encrypted snapshot needs --identity.
    #[arg(long, value_name = "DIR", num_args = 0..=1)]
    pub server_files: Option<Option<std::path::PathBuf>>,

    /// Keep the live datastore's agents: its `attested_node_entries` and `node_resolver_map_entries` replace the
    /// snapshot's, with the alias entries of live join-token agents the snapshot lacks. Agents that attested or
    /// renewed their SVID after the snapshot keep working; agents banned or evicted since stay so.
    #[arg(long)]
    pub keep_live_agents: bool,

    /// Restore the snapshot's join tokens as they are. Without it, only tokens still in the live datastore come
    /// back (a token used since could be replayed to take over an agent's ID), and with no live datastore the
    /// unexpired ones are dropped.
    #[arg(long)]
    pub keep_join_tokens: bool,

    /// Restore the snapshot's own trust bundle as it is. Without it the live one is kept: an older bundle lacks the
    /// CA roots and JWT keys added since and undoes revocations and taints.
    #[arg(long)]
    pub keep_snapshot_bundle: bool,

    /// Restore entries' revision numbers as they are. Without it, a restored entry whose live revision differs gets
    /// one above both, so every agent fetches it again.
    #[arg(long)]
    pub keep_snapshot_revisions: bool,

    /// After the commit, read every restored table back and compare it with what was loaded (a second pass over
    /// the data). Without it the restore checks every hash as the rows go in and refuses the commit on a mismatch.
    #[arg(long)]
    pub read_back: bool,

    /// The repository lock, held while the restore runs (no prune can delete the snapshot meanwhile).
    #[command(flatten)]
    pub lock: super::lock::LockArgs,
}

pub(crate) async fn run(args: &RestoreArgs, json: bool) -> anyhow::Result<u8> {
    let resolved = args.datastore.resolve()?;
    let repo = args.identity.attach(args.repo.open()?)?;
    let id = resolve(&repo, &args.snapshot).await?;
    let manifest = Manifest::load(&repo, &id).await.map_err(Error::from)?;
    // Before the target is even opened: no identity, no rows.
    if manifest.row_access(repo.identities())? == RowAccess::NoIdentity {
        return Err(manifest.needs_identity("restoring it").into());
    }
    let server_dir = server_files_dir(args, &resolved)?;
    if let Some(dir) = &server_dir {
        server_files::check_restore(&manifest, &repo, dir, args.replace)?;
    }
    let options = RestoreOptions {
        replace: args.replace,
        accept_changes: args.accept_changes,
        dry_run: args.dry_run,
        force: args.force,
        rules: RuleOptions {
            keep_live_agents: args.keep_live_agents,
            keep_snapshot_join_tokens: args.keep_join_tokens,
            keep_snapshot_bundle: args.keep_snapshot_bundle,
            keep_snapshot_revisions: args.keep_snapshot_revisions,
        },
        read_back: args.read_back,
    };
    // A dry run must not leave a new SQLite file behind.
    let created = datastore::CreatedByOpen::predict(&resolved.spec);
    let target = datastore::open(&resolved.spec, OpenMode::Create).await?;
    // Stages, and per table the rows of the snapshot's count loaded (bars
    // with rate and ETA on a terminal, one line each otherwise).
    let progress = Progress::new("restore", json);
    let planned = plan(&repo, &manifest, target.as_ref(), &options, &progress).await;
    // Nothing is written before execute: a SQLite file opened (and so
    // created) only to be planned against is removed again.
    let remove_created = || {
        if let Some(c) = &created {
            c.remove();
        }
    };
    let planned = match planned {
        Ok(p) => p,
        Err(e) => {
            target.close().await;
            progress.clear();
            remove_created();
            return Err(e.into());
        }
    };
    if !planned.can_proceed() || options.dry_run {
        target.close().await;
        progress.clear();
        remove_created();
        if json {
            print_json(&planned)?;
        } else {
            print_plan(&planned, &manifest);
            if let Some(dir) = &server_dir {
                println!(
                    "  server files: {} would be written under {}",
                    manifest.server_files.len(),
                    dir.display()
                );
            }
        }
        return Ok(match planned.refusal_error() {
            None => {
                if !json {
                    println!("dry run: nothing was changed");
                }
                exit::OK
            }
            Some(e) => {
                let code = match e.kind() {
                    ErrorKind::Usage | ErrorKind::NotSpire => exit::USAGE,
                    _ => exit::CHECK_FAILED,
                };
                print_failure(&e.to_string(), code);
                code
            }
        });
    }
    if !json {
        print_plan(&planned, &manifest);
    }
    // Under the repository lock, so no prune deletes the snapshot while it is read.
    let result = match super::lock::Held::acquire(&repo, &args.lock, "restore").await {
        Ok(held) => {
            let work = async {
                let fence = held.lock();
                Ok(execute_fenced(
                    &repo,
                    &manifest,
                    target.as_ref(),
                    &planned,
                    &progress,
                    fence,
                )
                .await?)
            };
            let result = held.guard(work).await;
            held.release().await;
            result
        }
        Err(e) => Err(e),
    };
    target.close().await;
    progress.clear();
    // A load that failed (a damaged object found while streaming) committed
    // nothing: a SQLite file this run created is removed again.
    if result.is_err() {
        remove_created();
    }
    let report = result.map_err(|e| {
        e.context(format!(
            "restore of snapshot {} into {}",
            planned.snapshot_id, planned.target
        ))
    })?;
    let restored_files = match &server_dir {
        Some(dir) => Some(
            server_files::restore_files(&repo, &manifest, dir, args.replace)
                .await
                .map_err(|e| {
                    anyhow::Error::from(e).context(format!(
                        "snapshot {}'s datastore was restored into {}, but its server files were not",
                        planned.snapshot_id, planned.target
                    ))
                })?,
        ),
        None => None,
    };
    if json {
        let mut value = serde_json::to_value(&report)?;
        if let (Some(files), Some(obj)) = (&restored_files, value.as_object_mut()) {
            obj.insert("server_files".into(), serde_json::to_value(files)?);
        }
        print_json(&value)?;
    } else {
        print_report(&report);
        if let Some(f) = &restored_files {
            println!(
                "  server files: {} written under {} ({}); start the SPIRE server with this data dir and keys_path",
                f.files.len(),
                f.dir.display(),
                human_bytes(f.bytes)
            );
        }
    }
    Ok(exit::OK)
}

/// Where `--server-files` writes: its DIR, or the data dir of --spire-config.
fn server_files_dir(
    args: &RestoreArgs,
    resolved: &crate::config::ResolvedDatastore,
) -> Result<Option<std::path::PathBuf>, Error> {
    match &args.server_files {
        None => Ok(None),
        Some(Some(dir)) => Ok(Some(dir.clone())),
        Some(None) => resolved
            .server
            .as_ref()
            .and_then(|l| l.data_dir.clone())
            .map(Some)
            .ok_or_else(|| {
                Error::Unsupported(
                    "--server-files without a directory writes into the data_dir of --spire-config: give \
                     --spire-config with a server.conf that sets data_dir, or --server-files DIR"
                        .into(),
                )
            }),
    }
}

fn print_plan(p: &RestorePlan, manifest: &Manifest) {
    println!(
        "restore snapshot {} ({} {}, schema {}, taken {}) into {} ({})",
        p.snapshot_id,
        p.source_engine,
        manifest.server_version,
        manifest.spire.schema_version,
        rfc3339(p.snapshot_time),
        p.target,
        p.target_engine
    );
    println!(
        "  snapshot: {} rows in {} tables; hash check ({}): {} objects, {}: {}",
        p.rows,
        p.tables.len(),
        p.hash_check.mode,
        p.hash_check.objects,
        human_bytes(p.hash_check.stored_bytes),
        if p.problems.is_empty() {
            "ok"
        } else {
            "FAILED"
        }
    );
    for problem in &p.problems {
        println!("    problem: {problem}");
    }
    if p.existing_tables.is_empty() {
        println!("  target: empty");
    } else {
        println!(
            "  target: holds {} table(s), all of which the restore drops and replaces",
            p.existing_tables.len()
        );
    }
    if p.other_sessions.is_empty() {
        println!("  other clients on the target: none");
    } else {
        let connections: u64 = p.other_sessions.iter().map(|s| s.connections).sum();
        println!(
            "  other clients on the target: {connections} connection(s){}",
            if p.existing_tables.is_empty() {
                ""
            } else if p.force {
                " (--force: replaced anyway; restart every SPIRE server after the restore)"
            } else {
                " (stop every SPIRE server using this datastore before the restore, start them after it)"
            }
        );
        for s in &p.other_sessions {
            println!("    {s}");
        }
    }
    let pf = &p.preflight;
    if pf.ran {
        println!(
            "  preflight ({} -> {}): {} change(s), {} needing --accept-changes, {} row(s) that cannot go in",
            p.source_engine,
            p.target_engine,
            pf.total,
            pf.needs_consent.saturating_sub(pf.blocking),
            pf.blocking
        );
        // Every change that needs consent (or cannot go in) one by one; the
        // rest (PostgreSQL's nanoseconds) as counts. --json lists them all.
        for c in pf.changes.iter().filter(|c| c.kind.needs_consent()) {
            println!(
                "    {}  {}  {}  {}: {}",
                c.table,
                c.row,
                c.column,
                kind_name(c.kind),
                c.detail
            );
        }
        if pf.truncated {
            println!(
                "    ... {} more (all of them are counted below, and covered by the digest)",
                pf.total - pf.changes.len() as u64
            );
        }
        if pf.truncated || pf.changes.iter().any(|c| !c.kind.needs_consent()) {
            println!("    per table, column and kind:");
            for c in &pf.counts {
                println!(
                    "      {}  {}  {}: {}",
                    c.table,
                    c.column,
                    kind_name(c.kind),
                    c.count
                );
            }
        }
    }
    print_rules(&p.rules, "will be");
    if let Some(i) = &p.impact {
        println!("  impact on the live datastore (what replacing it changes):");
        if p.rules.agents.is_some() {
            println!(
                "    agents: the live ones are kept (--keep-live-agents); without it, what follows would apply"
            );
        }
        println!(
            "    agents attested since the snapshot: {} (unknown after the restore: they must attest again)",
            i.agents.attested_since
        );
        println!(
            "    agents whose SVID rotated since: {} (rejected until they attest again)",
            i.agents.rotated_since
        );
        if i.agents.join_token_agents > 0 {
            println!(
                "    of these, join-token agents: {} (they cannot attest again on their own: each needs a new join token)",
                i.agents.join_token_agents
            );
        }
        if !i.agents.examples.is_empty() {
            println!("      e.g. {}", i.agents.examples.join(", "));
        }
        println!(
            "    agents in the snapshot but gone now: {} (they come back)",
            i.agents.come_back
        );
        print_key_diff("registration entries", &i.entries);
        for (aspect, c) in &i.entry_changes.by_aspect {
            println!(
                "      {} entr(y/ies) with other {aspect} live, e.g. {}",
                c.count,
                c.examples.join(", ")
            );
        }
        print_key_diff("trust bundles", &i.bundles);
        print_key_diff("federation relationships", &i.federation);
        print_key_diff("CA journal entries", &i.ca_journal);
        let t = &i.join_tokens;
        println!(
            "    join tokens: {} in the snapshot, {} live; {} used since the snapshot, {} issued since (gone after \
             the restore: agents not yet attested with them need new ones)",
            t.in_snapshot, t.live, t.used_since, t.issued_since
        );
    }
}

/// `label: N created since (gone after), N deleted since (back after), N changed since (back to the snapshot's)`.
fn print_key_diff(label: &str, d: &crate::snapshot::impact::KeyDiff) {
    println!(
        "    {label}: {} created since (gone after the restore), {} deleted since (back after), {} changed since \
         (back to the snapshot's version)",
        d.created_since, d.deleted_since, d.changed_since
    );
    for (what, examples) in [
        ("created", &d.created_examples),
        ("deleted", &d.deleted_examples),
        ("changed", &d.changed_examples),
    ] {
        if !examples.is_empty() {
            println!("      {what}: {}", examples.join(", "));
        }
    }
}

/// What the restore keeps out of the snapshot and carries over from the live datastore.
fn print_rules(r: &RulesReport, tense: &str) {
    println!("  what {tense} kept out of the snapshot and carried over:");
    let t = &r.join_tokens;
    match t.mode {
        "snapshot" => println!("    join tokens: the snapshot's, as they are (--keep-join-tokens)"),
        "live" => println!(
            "    join tokens: {} kept (still live), {} left out (used or deleted since the snapshot: replayable)",
            t.kept, t.dropped_gone_live
        ),
        _ => println!(
            "    join tokens: {} kept, {} unexpired left out (no live datastore shows whether they were used since; \
             --keep-join-tokens restores them): agents not yet attested need new tokens",
            t.kept, t.dropped_unexpired
        ),
    }
    let td = r.trust_domain.as_deref().unwrap_or("unknown");
    match r.own_bundle.kept {
        "live" => println!(
            "    own trust bundle ({td}): the live one{}",
            if r.own_bundle.differed {
                " (the snapshot's differs: older CA roots, JWT keys, revocations)"
            } else {
                ""
            }
        ),
        "none" => println!("    own trust bundle ({td}): no live one to keep; the snapshot's"),
        _ => println!("    own trust bundle: the snapshot's"),
    }
    if r.revisions.moved > 0 {
        println!(
            "    registration entries: {} revision number(s) moved above the live ones (agents fetch them again), e.g. {}",
            r.revisions.moved,
            r.revisions.examples.join(", ")
        );
    }
    if let Some(a) = &r.agents {
        println!(
            "    agents: {} from the live datastore ({} attested since the snapshot), {} of the snapshot's not live \
             (evicted since: not restored); {} node selector(s) and {} join-token alias entr(y/ies) carried over",
            a.from_live,
            a.only_live,
            a.only_in_snapshot,
            a.node_selectors_from_live,
            a.alias_entries_carried
        );
        if !a.examples_only_live.is_empty() {
            println!("      e.g. {}", a.examples_only_live.join(", "));
        }
    }
    for note in &r.notes {
        println!("    {note}");
    }
}

/// The kind as it appears in --json (`sub_second_timestamp`, ...).
fn kind_name(kind: ChangeKind) -> String {
    serde_json::to_value(kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{kind:?}"))
}

fn print_report(r: &RestoreReport) {
    let differing = r.tables.iter().filter(|t| !t.matches_manifest).count();
    let checked = if r.plan.read_back {
        "row counts and content hashes read back match"
    } else {
        "every hash checked as the rows went in; what was loaded is"
    };
    println!(
        "restored {} rows into {} tables of {} in {:.1} s; {checked} {}",
        r.rows,
        r.tables.len(),
        r.plan.target,
        r.seconds,
        if differing == 0 {
            "the snapshot".to_string()
        } else {
            format!(
                "what was loaded: the snapshot with {} listed value change(s) and the rules below \
                 ({differing} table(s) differ from the snapshot)",
                r.changes_applied
            )
        }
    );
    print_rules(&r.rules, "was");
    let checked = r.sequences.iter().filter(|s| s.ok == Some(true)).count();
    println!(
        "  auto-increment: {checked} of {} sequences checked to continue past the restored ids{}",
        r.sequences.len(),
        r.plan
            .target_engine
            .auto_increment_note()
            .map_or(String::new(), |note| format!(" ({note})"))
    );
    for w in &r.warnings {
        println!("  warning: {w}");
    }
    match (&r.record_key, &r.record_error) {
        (Some(k), _) => println!("  recorded in {k}"),
        (None, Some(e)) => println!("  warning: the restore record could not be written: {e}"),
        _ => {}
    }
}
