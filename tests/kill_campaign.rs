//! The kill -9 campaign (issue 15, item 1): `backup`, `restore --replace`
//! (same engine and across engines) and `apply` on each engine, each killed
//! with SIGKILL at random instants and at the pause points of
//! `spirekeep::testpoint`, then checked:
//!
//! - backup: `list` never shows a partial or damaged snapshot (every listed
//!   one verifies); the next `backup` gets the lock once the killed run's
//!   lease expires, and `prune` removes every leftover object;
//! - restore: the target is, table for table, either what it was or the
//!   snapshot's data, and a final restore succeeds;
//! - apply: `apply --resume` reaches the same end state, no step completes
//!   twice and no member is started twice at one version.
//!
//! `SPIREKEEP_KILL_POINTS` (default 3) sets the points per operation and
//! engine, `SPIREKEEP_KILL_SEED` replays a run, `SPIREKEEP_KILL_ENTRIES`
//! (default 2000) sizes the datastore. The full campaign is
//! `scripts/kill-campaign.sh` (figures in `docs/reliability.md`); CI runs
//! this file with the defaults.

mod common;
mod upgrade;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{SpireFixture, stderr, stdout};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use spirekeep::datastore::testkit::Population;
use spirekeep::datastore::{Datastore, Engine, Value};
use spirekeep::snapshot::codec::content_hash;
use spirekeep::testpoint::{PAUSE_AT_ENV, announcement};
use upgrade::{Fleet, PlanOpts, Store, assert_no_step_done_twice};

const BACKUP_POINTS: [&str; 2] = ["backup.before_manifest", "backup.after_manifest"];
const RESTORE_POINTS: [&str; 3] = [
    "restore.before_commit",
    "restore.mid_swap",
    "restore.after_commit",
];
/// A killed run's lease blocks the next one for this long at most.
const LOCK_ARGS: [&str; 4] = ["--lock-ttl", "2s", "--lock-wait", "60s"];

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
        })
        .unwrap_or(default)
}

fn points() -> usize {
    usize::try_from(env_number("SPIREKEEP_KILL_POINTS", 3)).unwrap()
}

fn entries() -> usize {
    usize::try_from(env_number("SPIREKEEP_KILL_ENTRIES", 2000)).unwrap()
}

/// A seeded generator; the seed is printed so a failure can be replayed.
fn rng(what: &str) -> StdRng {
    let seed = env_number("SPIREKEEP_KILL_SEED", rand::random::<u32>().into());
    eprintln!("{what}: SPIREKEEP_KILL_SEED={seed}");
    StdRng::seed_from_u64(seed)
}

/// How one run is stopped.
#[derive(Debug, Clone)]
enum Kill {
    /// SIGKILL this long after the start.
    After(Duration),
    /// SIGKILL once the run says it reached this pause point.
    At(&'static str),
}

/// What happened to one run.
enum Fate {
    Killed,
    /// It finished before the kill came (or never met the pause point).
    Finished(Output),
}

/// The tally of one operation on one engine, printed as one line that
/// `scripts/kill-campaign.sh` collects.
#[derive(Default)]
struct Tally {
    by_time: usize,
    at_pause: BTreeMap<&'static str, usize>,
    finished_first: usize,
}

impl Tally {
    fn count(&mut self, kill: &Kill, fate: &Fate) {
        match (fate, kill) {
            (Fate::Finished(_), _) => self.finished_first += 1,
            (Fate::Killed, Kill::After(_)) => self.by_time += 1,
            (Fate::Killed, Kill::At(p)) => *self.at_pause.entry(p).or_default() += 1,
        }
    }

    fn report(&self, operation: &str) {
        let paused: usize = self.at_pause.values().sum();
        eprintln!(
            "kill-campaign: {operation}: {} points, {} killed at a random instant, {paused} at pause points {:?}, {} finished before the kill; every check passed",
            self.by_time + paused + self.finished_first,
            self.by_time,
            self.at_pause,
            self.finished_first
        );
    }
}

fn spirekeep_command<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_spirekeep"));
    for (key, _) in std::env::vars() {
        if key.starts_with("SPIREKEEP_") && !key.starts_with("SPIREKEEP_TEST_") {
            cmd.env_remove(key);
        }
    }
    cmd.args(args)
        .env_remove(PAUSE_AT_ENV)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    cmd
}

fn run<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    spirekeep_command(args).output().unwrap()
}

fn run_ok<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> Output {
    let out = run(args);
    assert!(
        out.status.success(),
        "spirekeep {:?}: {}\n{}{}",
        args,
        out.status,
        stdout(&out),
        stderr(&out)
    );
    out
}

/// Starts `cmd` and kills it as `kill` says.
fn run_and_kill(mut cmd: Command, kill: &Kill) -> Fate {
    if let Kill::At(point) = kill {
        cmd.env(PAUSE_AT_ENV, point);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    match kill {
        Kill::After(delay) => {
            let deadline = Instant::now() + *delay;
            while Instant::now() < deadline {
                if child.try_wait().unwrap().is_some() {
                    return Fate::Finished(child.wait_with_output().unwrap());
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            sigkill(&mut child)
        }
        Kill::At(point) => {
            let wanted = announcement(point);
            let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
            let mut seen = String::new();
            let reached = loop {
                match lines.next() {
                    Some(Ok(line)) if line == wanted => break true,
                    Some(Ok(line)) => {
                        seen.push_str(&line);
                        seen.push('\n');
                    }
                    _ => break false,
                }
            };
            if reached {
                return sigkill(&mut child);
            }
            let mut out = child.wait_with_output().unwrap();
            out.stderr = seen.into_bytes();
            Fate::Finished(out)
        }
    }
}

fn sigkill(child: &mut Child) -> Fate {
    match child.try_wait().unwrap() {
        Some(_) => Fate::Finished(Output {
            status: child.wait().unwrap(),
            stdout: Vec::new(),
            stderr: Vec::new(),
        }),
        None => {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            Fate::Killed
        }
    }
}

/// Runs one point: `args` killed as `kill` says; a run that finished before
/// the kill must have succeeded. Counted in `tally`.
fn kill_point(name: &str, i: usize, args: &[String], kill: &Kill, tally: &mut Tally) -> Fate {
    let fate = run_and_kill(spirekeep_command(args), kill);
    if let Fate::Finished(out) = &fate {
        assert!(
            out.status.success(),
            "{name} point {i} ({kill:?}) finished with an error: {}",
            stderr(out)
        );
    }
    tally.count(kill, &fate);
    fate
}

/// A kill for point `i`: every third at a pause point (in turn), the others
/// at a random instant up to 110 % of a whole run.
fn choose_kill(i: usize, rng: &mut StdRng, whole_run: Duration, pauses: &[&'static str]) -> Kill {
    if i % 3 == 2 && !pauses.is_empty() {
        Kill::At(pauses[(i / 3) % pauses.len()])
    } else {
        let max = u64::try_from(whole_run.as_millis() * 11 / 10)
            .unwrap()
            .max(1);
        Kill::After(Duration::from_millis(rng.random_range(0..=max)))
    }
}

fn population(seed: u64, target: Engine) -> Population {
    Population {
        seed,
        four_byte_utf8: (target == Engine::Mysql).then_some(false),
        subsecond: target != Engine::Mysql,
        ..Population::new(entries())
    }
}

/// Each table's (rows, content hash): what "the same data" means here.
async fn contents(ds: &dyn Datastore) -> BTreeMap<String, (u64, String)> {
    let mut out = BTreeMap::new();
    for table in ds.catalogue().await.unwrap().tables {
        let rows: Vec<Vec<Value>> = ds.read_table(&table).await.unwrap();
        let h = content_hash(&rows);
        out.insert(table.name.clone(), (h.rows(), h.hex()));
    }
    out
}

async fn contents_of(fx: &SpireFixture) -> BTreeMap<String, (u64, String)> {
    let ds = fx.open().await;
    let c = contents(ds.as_ref()).await;
    ds.close().await;
    c
}

// ------------------------------------------------------------------ backup

/// Every snapshot `list` shows, and none damaged.
fn listed(repo: &[String]) -> Vec<String> {
    let mut args = vec!["--json", "list"];
    args.extend(repo.iter().map(String::as_str));
    let out = run_ok(&args);
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    all.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            assert!(
                s.get("damaged").is_none_or(serde_json::Value::is_null),
                "list shows a damaged snapshot after a kill: {s}"
            );
            s["id"].as_str().unwrap().to_string()
        })
        .collect()
}

/// Every file of a file:// repository, relative to its root.
fn repo_files(root: &Path) -> BTreeSet<String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeSet<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, root, out);
            } else {
                out.insert(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

async fn backup_campaign(engine: Engine) {
    let name = format!("kill-backup-{engine}");
    let Some(fx) = SpireFixture::create(engine, &name, &population(3, engine)).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let repo = vec!["--repo".to_string(), format!("file://{}", root.display())];
    let url = fx.url();
    let backup_args = |label: &str| -> Vec<String> {
        ["backup", "--datastore", &url, "--label", label]
            .iter()
            .chain(LOCK_ARGS.iter())
            .map(|s| (*s).to_string())
            .chain(repo.iter().cloned())
            .collect()
    };
    let started = Instant::now();
    run_ok(&backup_args("whole"));
    let whole = started.elapsed();
    let mut verified: BTreeSet<String> = listed(&repo).into_iter().collect();
    let mut rng = rng(&name);
    let mut tally = Tally::default();
    for i in 0..points() {
        let kill = choose_kill(i, &mut rng, whole, &BACKUP_POINTS);
        let fate = kill_point(
            &name,
            i,
            &backup_args(&format!("kill-{i}")),
            &kill,
            &mut tally,
        );
        let now = listed(&repo);
        if matches!(kill, Kill::At("backup.after_manifest")) && matches!(fate, Fate::Killed) {
            assert_eq!(
                now.len(),
                verified.len() + 1,
                "{name} point {i}: killed after its manifest, the snapshot must be listed"
            );
        }
        for id in now {
            if verified.insert(id.clone()) {
                let mut args = vec!["verify", &id];
                args.extend(repo.iter().map(String::as_str));
                let out = run(&args);
                assert!(
                    out.status.success(),
                    "{name} point {i} ({kill:?}): list shows {id}, which does not verify: {}{}",
                    stdout(&out),
                    stderr(&out)
                );
            }
        }
    }
    // The next backup gets the lock (a killed lease expires), and prune
    // leaves nothing no manifest names.
    let started = Instant::now();
    run_ok(&backup_args("after"));
    let got_lock_after = started.elapsed();
    // Verified, the newest is also the newest verified one prune always keeps.
    let newest = listed(&repo).into_iter().max().unwrap();
    let mut args = vec!["verify", newest.as_str()];
    args.extend(repo.iter().map(String::as_str));
    run_ok(&args);
    let mut args = vec!["prune", "--keep-last", "1", "--orphan-grace", "0s"];
    args.extend(LOCK_ARGS);
    args.extend(repo.iter().map(String::as_str));
    run_ok(&args);
    let kept = listed(&repo);
    assert_eq!(kept.len(), 1, "{kept:?}");
    let leftovers: Vec<String> = repo_files(&root)
        .into_iter()
        .filter(|f| {
            f.starts_with("snapshots/") && !f.starts_with(&format!("snapshots/{}/", kept[0]))
        })
        .collect();
    assert!(leftovers.is_empty(), "{name}: prune left {leftovers:?}");
    // object_store's local backend stages an upload in `<key>#<n>`, which no
    // listing shows: prune finds and removes those a kill left (finding 2).
    let staging: Vec<String> = repo_files(&root)
        .into_iter()
        .filter(|f| f.contains('#'))
        .collect();
    assert!(
        staging.is_empty(),
        "{name}: upload staging files left: {staging:?}"
    );
    tally.report(&format!("backup {engine}"));
    eprintln!(
        "kill-campaign: backup {engine}: the backup after the campaign took {got_lock_after:?} (lock TTL 2 s)"
    );
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn backup_killed_anywhere_sqlite() {
    backup_campaign(Engine::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn backup_killed_anywhere_postgres() {
    backup_campaign(Engine::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn backup_killed_anywhere_mysql() {
    backup_campaign(Engine::Mysql).await;
}

// ----------------------------------------------------------------- restore

/// Two snapshots of different data from `source`, restored in turn into a
/// `target` datastore while being killed: after each kill the target holds
/// one of the two states, whole.
async fn restore_campaign(source: Engine, target: Engine) {
    let name = format!("kill-restore-{source}-{target}");
    let Some(a) = SpireFixture::create(source, &format!("{name}-a"), &population(5, target)).await
    else {
        return;
    };
    let Some(b) = SpireFixture::create(source, &format!("{name}-b"), &population(6, target)).await
    else {
        return;
    };
    let Some(dst) = SpireFixture::create_empty(target, &name).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let repo = [
        "--repo".to_string(),
        format!("file://{}", dir.path().join("repo").display()),
    ];
    let backup = |url: &str| -> String {
        let mut args = vec!["--json", "backup", "--datastore", url];
        args.extend(repo.iter().map(String::as_str));
        let out = run_ok(&args);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["id"].as_str().unwrap().to_string()
    };
    let ids = [backup(&a.url()), backup(&b.url())];
    let url = dst.url();
    let restore_args = |id: &str| -> Vec<String> {
        [
            "restore",
            id,
            "--datastore",
            &url,
            "--replace",
            "--accept-changes",
            // Each kill must leave one of two fixed states: the rules that
            // make a restore depend on the live data are off here
            // (tests/restore_rules.rs covers them).
            "--keep-join-tokens",
            "--keep-snapshot-bundle",
            "--keep-snapshot-revisions",
        ]
        .iter()
        .chain(LOCK_ARGS.iter())
        .map(|s| (*s).to_string())
        .chain(repo.iter().cloned())
        .collect()
    };
    // The two states, as this target holds them.
    let mut states = Vec::new();
    let mut whole = Duration::ZERO;
    for id in &ids {
        let args = restore_args(id);
        let started = Instant::now();
        run_ok(&args);
        whole = started.elapsed();
        states.push(contents_of(&dst).await);
    }
    assert_ne!(
        states[0], states[1],
        "{name}: the two snapshots must differ"
    );
    let mut current = 1;
    let mut rng = rng(&name);
    let mut tally = Tally::default();
    for i in 0..points() {
        let other = 1 - current;
        let kill = choose_kill(i, &mut rng, whole, &RESTORE_POINTS);
        kill_point(&name, i, &restore_args(&ids[other]), &kill, &mut tally);
        let now = contents_of(&dst).await;
        if now == states[other] {
            current = other;
        } else {
            assert_eq!(
                now, states[current],
                "{name} point {i} ({kill:?}): the target is neither what it was nor the snapshot"
            );
            if matches!(kill, Kill::At("restore.after_commit")) {
                panic!(
                    "{name} point {i}: killed after the commit, the target must hold the snapshot"
                );
            }
        }
    }
    // A restore after the campaign succeeds and brings the other state.
    let other = 1 - current;
    run_ok(&restore_args(&ids[other]));
    assert_eq!(
        contents_of(&dst).await,
        states[other],
        "{name}: the final restore"
    );
    tally.report(&format!("restore --replace {source} -> {target}"));
    dst.cleanup().await;
    a.cleanup().await;
    b.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restore_killed_anywhere_sqlite() {
    restore_campaign(Engine::Sqlite, Engine::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restore_killed_anywhere_postgres() {
    restore_campaign(Engine::Postgres, Engine::Postgres).await;
}

/// The full campaign once found (point 1 of 50, 696 ms,
/// SPIREKEEP_KILL_SEED=3619572253) a target with tables missing: the server
/// finished the killed restore's `RENAME TABLE` while the check listed the
/// tables halfway through it. Readers now list tables under the swap lock
/// (regression test in `snapshot_backup.rs`).
#[tokio::test(flavor = "multi_thread")]
async fn restore_killed_anywhere_mysql() {
    restore_campaign(Engine::Mysql, Engine::Mysql).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restore_across_engines_killed_anywhere_sqlite_to_postgres() {
    restore_campaign(Engine::Sqlite, Engine::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restore_across_engines_killed_anywhere_postgres_to_mysql() {
    restore_campaign(Engine::Postgres, Engine::Mysql).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restore_across_engines_killed_anywhere_mysql_to_sqlite() {
    restore_campaign(Engine::Mysql, Engine::Sqlite).await;
}

// ------------------------------------------------------------------- apply

/// Most kills one upgrade takes before it is left to finish.
const KILLS_PER_UPGRADE: usize = 5;

/// Upgrades of fresh stand-in fleets, each killed at random instants again
/// and again (every resume is killed too, up to [`KILLS_PER_UPGRADE`]
/// times), then left to finish.
async fn apply_campaign(engine: Engine) {
    let name = format!("kill-apply-{engine}");
    let mut rng = rng(&name);
    let mut tally = Tally::default();
    let mut whole: Option<Duration> = None;
    let mut kills = 0;
    let mut upgrade = 0;
    while kills < points() {
        upgrade += 1;
        let dir = tempfile::tempdir().unwrap();
        let Some(store) = Store::create(engine, dir.path(), 24, "1.14.7").await else {
            return;
        };
        let fleet = Fleet::new(&store.conn, 1, 2, "1.14.7");
        fleet.start_all();
        let o = PlanOpts::new(
            "1.15.3",
            &format!("file://{}", fleet.path("repo").display()),
        );
        let plan = fleet.plan(&o);
        let plan = plan.to_str().unwrap().to_string();
        // The first upgrade runs whole: it measures how long one takes.
        let Some(whole_run) = whole else {
            let started = Instant::now();
            let (code, report) = fleet.apply(&[]);
            assert_eq!(code, 0, "{name}: the whole run: {report:#}");
            whole = Some(started.elapsed());
            store.cleanup().await;
            continue;
        };
        let mut runs = 0;
        loop {
            let finished = fleet.journal().iter().any(|r| r["event"] == "finished");
            if finished {
                break;
            }
            let args: Vec<&str> = if runs == 0 {
                vec!["apply", &plan]
            } else {
                vec!["apply", &plan, "--resume"]
            };
            runs += 1;
            if kills >= points() || runs > KILLS_PER_UPGRADE {
                let (code, report) = fleet.apply(&args[2..]);
                assert_eq!(
                    code, 0,
                    "{name} upgrade {upgrade}: the last resume: {report:#}"
                );
                break;
            }
            // A resume is shorter than a whole run: aim inside what is left.
            let kill = choose_kill(1, &mut rng, whole_run / 2, &[]);
            let fate = run_and_kill(fleet.command(&args), &kill);
            tally.count(&kill, &fate);
            match fate {
                Fate::Killed => kills += 1,
                Fate::Finished(out) => {
                    assert!(
                        out.status.success(),
                        "{name} upgrade {upgrade} run {runs} ({kill:?}): {}{}",
                        stdout(&out),
                        stderr(&out)
                    );
                    break;
                }
            }
        }
        for member in fleet.names() {
            assert_eq!(
                fleet.version(&member),
                "1.15.3",
                "{name} upgrade {upgrade}: {member}"
            );
            assert_eq!(
                fleet.starts(&member, "1.15.3"),
                1,
                "{name} upgrade {upgrade}: {member} started twice at 1.15.3:\n{}",
                fleet.log(&member)
            );
        }
        assert_eq!(
            store.row().await,
            (25, "1.15.3".to_string()),
            "{name} upgrade {upgrade}"
        );
        assert_no_step_done_twice(&fleet.journal());
        drop(fleet);
        store.cleanup().await;
    }
    tally.report(&format!("apply {engine} ({} upgrades)", upgrade - 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn apply_killed_anywhere_resumes_sqlite() {
    apply_campaign(Engine::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn apply_killed_anywhere_resumes_postgres() {
    apply_campaign(Engine::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn apply_killed_anywhere_resumes_mysql() {
    apply_campaign(Engine::Mysql).await;
}
