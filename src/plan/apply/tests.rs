//! The forward and rollback decisions of `apply` as a state machine, on a
//! fake fleet (an in-memory executor) over a real SQLite datastore and a
//! `file://` repository: which step runs, what the journal records, where a
//! resumed run picks up, and which outcome ends it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use semver::Version;

use super::{ApplyOptions, ApplyReport, NoProgress, StepStatus, apply_with_executor};
use crate::datastore::testkit::{Population, create_spire_datastore};
use crate::datastore::{self, Engine, OpenMode, dsn};
use crate::plan::executor::{Action, ActionResult, Executor};
use crate::plan::facts;
use crate::plan::file::{self, Member, Role};
use crate::plan::health::GateEnv;
use crate::plan::journal::{self, Outcome, State};
use crate::plan::model::SavedPlan;
use crate::plan::stages::{self, StageOptions};

/// One fake member.
#[derive(Debug, Clone)]
struct FakeMember {
    installed: Version,
    running: bool,
    /// What `version` reports instead of the installed version.
    reports: Option<Version>,
    /// Actions that fail.
    failing: BTreeSet<&'static str>,
    /// Seconds its clock is ahead.
    clock_ahead: i64,
}

/// The fake fleet: members by name, every action logged. A server upgraded
/// to 1.15.3 writes the `migrations` row that release writes.
#[derive(Debug)]
struct FakeFleet {
    members: Mutex<BTreeMap<String, FakeMember>>,
    log: Mutex<Vec<String>>,
    datastore: String,
    /// Sends a stop signal when a server is upgraded.
    signal_on_upgrade: Mutex<Option<tokio::sync::watch::Sender<u32>>>,
}

impl FakeFleet {
    fn set(&self, name: &str, f: impl FnOnce(&mut FakeMember)) {
        f(self.members.lock().unwrap().get_mut(name).unwrap());
    }

    fn get(&self, name: &str) -> FakeMember {
        self.members.lock().unwrap()[name].clone()
    }

    fn actions(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn clear_log(&self) {
        self.log.lock().unwrap().clear();
    }
}

#[derive(Debug, Clone)]
struct FakeExecutor(Arc<FakeFleet>);

#[async_trait]
impl Executor for FakeExecutor {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn render(&self, action: Action, m: &Member, v: Option<&Version>, _wait: bool) -> Vec<String> {
        vec![format!(
            "{} {}{}",
            action.as_str(),
            m.name,
            v.map(|v| format!(" {v}")).unwrap_or_default()
        )]
    }

    async fn run(&self, action: Action, m: &Member, v: Option<&Version>, w: bool) -> ActionResult {
        if action != Action::Version && action != Action::Clock {
            self.0
                .log
                .lock()
                .unwrap()
                .push(self.render(action, m, v, w).remove(0));
        }
        let fail = |why: &str| ActionResult {
            ok: false,
            error: Some(format!("{} {}: {why}", action.as_str(), m.name)),
            ..ActionResult::default()
        };
        let mut migrate = false;
        let stdout = {
            let mut members = self.0.members.lock().unwrap();
            let f = members.get_mut(&m.name).unwrap();
            if f.failing.contains(action.as_str()) {
                return fail("simulated failure");
            }
            match action {
                Action::Version => f.reports.as_ref().unwrap_or(&f.installed).to_string(),
                Action::Clock => {
                    (time::OffsetDateTime::now_utc().unix_timestamp() + f.clock_ahead).to_string()
                }
                Action::Upgrade | Action::Rollback => {
                    f.installed = v.unwrap().clone();
                    f.running = true;
                    migrate = m.role == Role::Server && f.installed == Version::new(1, 15, 3);
                    String::new()
                }
                Action::Stop => {
                    f.running = false;
                    String::new()
                }
                Action::Start => {
                    f.running = true;
                    String::new()
                }
            }
        };
        if migrate && let Some(tx) = self.0.signal_on_upgrade.lock().unwrap().take() {
            let _ = tx.send(1);
        }
        if migrate {
            // what SPIRE 1.15.3 leaves in the datastore when it starts
            let spec = dsn::parse(&self.0.datastore, Some(Engine::Sqlite), Path::new("/")).unwrap();
            let ds = datastore::open(&spec, OpenMode::ReadWrite).await.unwrap();
            ds.execute_script("UPDATE migrations SET version = 25, code_version = '1.15.3';")
                .await
                .unwrap();
            ds.close().await;
        }
        ActionResult {
            ok: true,
            stdout,
            ..ActionResult::default()
        }
    }

    fn gate_env(&self) -> GateEnv {
        GateEnv {
            shell: "sh".into(),
            env: crate::plan::executor::child_env(&[], &BTreeMap::new()),
        }
    }
}

struct Setup {
    dir: tempfile::TempDir,
    fleet: Arc<FakeFleet>,
    saved: SavedPlan,
    signals: Option<tokio::sync::watch::Receiver<u32>>,
}

impl Setup {
    /// One server and two agents at `version` on a SQLite datastore at
    /// `schema`, planned to 1.15.3; `extra` is added to the plan file.
    async fn new(schema: u32, version: &str, agents_at: &str, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("datastore.sqlite3");
        let conn = db.display().to_string();
        let spec = dsn::parse(&conn, Some(Engine::Sqlite), Path::new("/")).unwrap();
        let ds = datastore::open(&spec, OpenMode::Create).await.unwrap();
        let pop = Population {
            entries: 5,
            seed: 3,
            schema,
            code_version: version.into(),
            ..Population::default()
        };
        create_spire_datastore(ds.as_ref(), &pop).await.unwrap();
        ds.close().await;
        let member = |v: &str| FakeMember {
            installed: Version::parse(v).unwrap(),
            running: true,
            reports: None,
            failing: BTreeSet::new(),
            clock_ahead: 0,
        };
        let fleet = Arc::new(FakeFleet {
            members: Mutex::new(BTreeMap::from([
                ("s1".to_owned(), member(version)),
                ("a1".to_owned(), member(agents_at)),
                ("a2".to_owned(), member(agents_at)),
            ])),
            log: Mutex::new(Vec::new()),
            datastore: conn.clone(),
            signal_on_upgrade: Mutex::new(None),
        });
        let toml = format!(
            r#"
format = 1
name = "t"
target = "1.15.3"
{extra}
[datastore]
connection_string = "{conn}"

[repository]
url = "file://{repo}"

[executor]
kind = "command"
[executor.commands]
version = "true"
upgrade = "true"
rollback = "true"
stop = "true"
start = "true"

[servers]
members = [{{ name = "s1" }}]

[[agents]]
name = "nodes"
batch = 2
max_failure_ratio = 0.5
members = [{{ name = "a1" }}, {{ name = "a2" }}]
"#,
            repo = dir.path().join("repo").display()
        );
        let mut pf = file::parse(&toml).unwrap();
        pf.absolutize(dir.path());
        let plan = pf.validate().unwrap();
        let exec = FakeExecutor(fleet.clone());
        let facts = facts::read(&plan, &exec, 0).await.unwrap();
        let saved = stages::compute(
            &plan,
            &pf,
            "test",
            &facts,
            StageOptions::default(),
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
        Self {
            dir,
            fleet,
            saved,
            signals: None,
        }
    }

    fn journal(&self) -> PathBuf {
        self.dir.path().join("plan.journal.jsonl")
    }

    async fn apply(&self, resume: bool) -> ApplyReport {
        self.apply_with_journal(&self.journal(), resume).await
    }

    async fn apply_with_journal(&self, journal: &Path, resume: bool) -> ApplyReport {
        let options = ApplyOptions {
            resume,
            journal: journal.to_path_buf(),
            signals: self.signals.clone(),
            keyring: crate::store::crypt::Keyring::default(),
        };
        apply_with_executor(
            &self.saved,
            Box::new(FakeExecutor(self.fleet.clone())),
            &options,
            &NoProgress,
        )
        .await
        .unwrap()
    }

    fn records(&self) -> Vec<journal::Record> {
        journal::read(&self.journal()).unwrap()
    }

    async fn row(&self) -> (i64, String) {
        let plan = self.saved.plan().unwrap();
        let row = facts::read_datastore(&plan).await.unwrap().row.unwrap();
        (row.schema, row.code_version)
    }
}

fn step_status(r: &ApplyReport, id: &str) -> Option<StepStatus> {
    r.steps
        .iter()
        .chain(&r.rollback)
        .find(|s| s.id == id)
        .map(|s| s.status)
}

#[tokio::test]
async fn a_completed_plan_moves_everything_once() {
    let s = Setup::new(24, "1.14.7", "1.14.7", "").await;
    let r = s.apply(false).await;
    assert_eq!(r.outcome, Outcome::Completed, "{}", r.summary);
    for m in ["s1", "a1", "a2"] {
        assert_eq!(s.fleet.get(m).installed, Version::new(1, 15, 3), "{m}");
    }
    assert_eq!(s.row().await, (25, "1.15.3".into()));
    assert!(r.rollback.is_empty());
}

/// A failed server step and the start of its rollback are one journal
/// record: a journal cut right after it (a kill between two writes) still
/// resumes into the rollback, never into the failed step again.
#[tokio::test]
async fn a_failed_server_step_and_its_rollback_are_one_record() {
    let s = Setup::new(24, "1.14.7", "1.14.7", "").await;
    s.fleet
        .set("s1", |m| m.reports = Some(Version::new(1, 14, 7)));
    let r = s.apply(false).await;
    assert_eq!(r.outcome, Outcome::RolledBack, "{}", r.summary);
    assert_eq!(step_status(&r, "hop1.server.s1"), Some(StepStatus::Failed));
    assert_eq!(step_status(&r, "rollback.restore"), Some(StepStatus::Done));
    assert_eq!(s.fleet.get("s1").installed, Version::new(1, 14, 7));
    assert_eq!(s.row().await, (24, "1.14.7".into()));

    let records = s.records();
    let failed = records
        .iter()
        .position(|r| {
            matches!(&r.event, journal::Event::StepFailed { step, .. } if step == "hop1.server.s1")
        })
        .unwrap();
    // the journal as a kill right after that record leaves it
    let cut = &records[..=failed];
    let state = State::of(cut);
    assert_eq!(
        state.rollback.as_ref().map(|(step, _)| step.as_str()),
        Some("hop1.server.s1"),
        "the failure record starts the rollback"
    );
    assert!(
        !records
            .iter()
            .any(|r| matches!(r.event, journal::Event::RollbackStarted { .. })),
        "no second record"
    );

    // resume from the cut journal: the rollback runs, the step does not
    let cut_path = s.dir.path().join("cut.journal.jsonl");
    let text: String = cut
        .iter()
        .map(|r| serde_json::to_string(r).unwrap() + "\n")
        .collect();
    std::fs::write(&cut_path, text).unwrap();
    s.fleet.clear_log();
    let r = s.apply_with_journal(&cut_path, true).await;
    assert_eq!(r.outcome, Outcome::RolledBack, "{}", r.summary);
    let actions = s.fleet.actions();
    assert!(
        !actions.iter().any(|a| a.starts_with("upgrade s1")),
        "the failed step ran again: {actions:?}"
    );
    assert!(actions.iter().any(|a| a == "stop s1"), "{actions:?}");
}

/// A server that cannot be stopped: the snapshot is NOT restored under it.
/// Once it stops, the resumed rollback restores once and finishes.
#[tokio::test]
async fn no_restore_while_a_server_cannot_be_stopped() {
    let s = Setup::new(24, "1.14.7", "1.14.7", "").await;
    s.fleet.set("s1", |m| {
        m.reports = Some(Version::new(1, 14, 7));
        m.failing.insert("stop");
    });
    let r = s.apply(false).await;
    assert_eq!(r.outcome, Outcome::RollbackFailed, "{}", r.summary);
    assert_eq!(
        step_status(&r, "rollback.stop.s1"),
        Some(StepStatus::Failed)
    );
    assert_eq!(step_status(&r, "rollback.restore"), None, "not attempted");
    assert!(r.summary.contains("NOT restored"), "{}", r.summary);

    s.fleet.set("s1", |m| {
        m.failing.clear();
    });
    let r = s.apply(true).await;
    assert_eq!(r.outcome, Outcome::RolledBack, "{}", r.summary);
    assert_eq!(step_status(&r, "rollback.restore"), Some(StepStatus::Done));
    assert_eq!(s.row().await, (24, "1.14.7".into()));
}

/// A server that does not start after the restore: the rollback fails with
/// the restore done; the resumed rollback does not restore again.
#[tokio::test]
async fn a_resumed_rollback_does_not_restore_twice() {
    let s = Setup::new(24, "1.14.7", "1.14.7", "").await;
    s.fleet.set("s1", |m| {
        m.reports = Some(Version::new(1, 14, 7));
        m.failing.insert("start");
    });
    let r = s.apply(false).await;
    assert_eq!(r.outcome, Outcome::RollbackFailed, "{}", r.summary);
    assert_eq!(step_status(&r, "rollback.restore"), Some(StepStatus::Done));
    assert_eq!(
        step_status(&r, "rollback.server.s1"),
        Some(StepStatus::Failed)
    );

    s.fleet.set("s1", |m| {
        m.failing.clear();
    });
    let r = s.apply(true).await;
    assert_eq!(r.outcome, Outcome::RolledBack, "{}", r.summary);
    assert_eq!(
        step_status(&r, "rollback.restore"),
        Some(StepStatus::DoneEarlier)
    );
    let restores = s
        .records()
        .iter()
        .filter(|r| {
            matches!(&r.event, journal::Event::StepStarted { step, .. } if step == "rollback.restore")
        })
        .count();
    assert_eq!(restores, 1);
}

/// A post-check that fails after every member moved: by default the plan
/// stops and leaves the datastore as it is; with on_post_check_failure =
/// "roll_back" the snapshot is restored and every member returned.
#[tokio::test]
async fn a_failed_post_check_rolls_back_only_when_asked() {
    let post = "[[post_checks]]\nkind = \"command\"\ncommand = \"exit 1\"\nretries = 0\n";
    let s = Setup::new(
        25,
        "1.15.3",
        "1.14.7",
        &format!("on_post_check_failure = \"roll_back\"\n{post}"),
    )
    .await;
    let r = s.apply(false).await;
    assert_eq!(r.outcome, Outcome::RolledBack, "{}", r.summary);
    assert_eq!(step_status(&r, "postcheck"), Some(StepStatus::Failed));
    assert_eq!(step_status(&r, "rollback.restore"), Some(StepStatus::Done));
    assert_eq!(s.fleet.get("a1").installed, Version::new(1, 14, 7));

    let s = Setup::new(25, "1.15.3", "1.14.7", post).await;
    let r = s.apply(false).await;
    assert_eq!(r.outcome, Outcome::Stopped, "{}", r.summary);
    assert!(r.rollback.is_empty());
    assert_eq!(s.fleet.get("a1").installed, Version::new(1, 15, 3));
}

/// The preflight runs again on every run: a run refused at the snapshot
/// does not let the next one skip the facts.
#[tokio::test]
async fn the_preflight_runs_on_every_run() {
    let s = Setup::new(24, "1.14.7", "1.14.7", "").await;
    // the snapshot fails: the repository's lock folder is a file
    let repo = s.dir.path().join("repo");
    std::fs::create_dir_all(repo.join("snapshots")).unwrap();
    std::fs::write(repo.join("locks"), "not a folder").unwrap();
    let r = s.apply(false).await;
    assert_eq!(r.outcome, Outcome::Refused, "{}", r.summary);
    assert_eq!(step_status(&r, "preflight"), Some(StepStatus::Done));
    assert_eq!(step_status(&r, "snapshot"), Some(StepStatus::Failed));

    std::fs::remove_file(repo.join("locks")).unwrap();
    s.fleet.set("a1", |m| m.installed = Version::new(1, 14, 6));
    let r = s.apply(false).await;
    assert_eq!(r.outcome, Outcome::Refused, "{}", r.summary);
    assert!(r.summary.contains("stale"), "{}", r.summary);
    assert_eq!(s.fleet.get("s1").installed, Version::new(1, 14, 7));
}

/// A member whose clock is off blocks the apply, named.
#[tokio::test]
async fn a_skewed_clock_is_refused() {
    let s = Setup::new(24, "1.14.7", "1.14.7", "[clock]\nmax_skew = \"20s\"\n").await;
    s.fleet.set("a2", |m| m.clock_ahead = 120);
    let r = s.apply(false).await;
    assert_eq!(r.outcome, Outcome::Refused, "{}", r.summary);
    assert!(
        r.summary.contains("agent a2") && r.summary.contains("ahead"),
        "{}",
        r.summary
    );
    assert!(!r.summary.contains("s1:"), "{}", r.summary);
    assert!(s.fleet.actions().is_empty(), "nothing moved");
}

/// Everything already at the target: nothing to do, nothing taken.
#[tokio::test]
async fn nothing_to_do() {
    let s = Setup::new(25, "1.15.3", "1.15.3", "").await;
    let r = s.apply(false).await;
    assert_eq!(r.outcome, Outcome::NothingToDo, "{}", r.summary);
    assert_eq!(step_status(&r, "snapshot"), Some(StepStatus::NotRun));
    let repo = crate::store::Repository::open(
        &format!("file://{}", s.dir.path().join("repo").display()),
        &crate::store::RepoOptions::default(),
    )
    .unwrap();
    assert!(
        crate::snapshot::manifest::list_snapshots(&repo)
            .await
            .unwrap()
            .is_empty()
    );
}

/// A stop signal during a step: the step finishes, the run stops before the
/// next one (nothing half done), and `--resume` continues from there.
#[tokio::test]
async fn a_signal_stops_between_steps_and_resume_continues() {
    let mut s = Setup::new(24, "1.14.7", "1.14.7", "").await;
    let (tx, rx) = tokio::sync::watch::channel(0u32);
    *s.fleet.signal_on_upgrade.lock().unwrap() = Some(tx);
    s.signals = Some(rx);
    let options = ApplyOptions {
        resume: false,
        journal: s.journal(),
        signals: s.signals.clone(),
        keyring: crate::store::crypt::Keyring::default(),
    };
    let err = apply_with_executor(
        &s.saved,
        Box::new(FakeExecutor(s.fleet.clone())),
        &options,
        &NoProgress,
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("interrupted by a signal before hop1.datastore"),
        "{err}"
    );
    assert_eq!(s.fleet.get("s1").installed, Version::new(1, 15, 3));
    assert_eq!(s.fleet.get("a1").installed, Version::new(1, 14, 7));
    let state = State::of(&s.records());
    assert!(state.is_done("hop1.server.s1") && state.interrupted.is_none());
    assert!(state.finished.is_none());

    s.signals = None;
    let r = s.apply(true).await;
    assert_eq!(r.outcome, Outcome::Completed, "{}", r.summary);
    assert_eq!(
        step_status(&r, "hop1.server.s1"),
        Some(StepStatus::DoneEarlier)
    );
    assert_eq!(s.fleet.get("a1").installed, Version::new(1, 15, 3));
}
