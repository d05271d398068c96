//! Staged upgrades end to end: the real `spirekeep` binary drives a stand-in
//! SPIRE fleet (`spire-standin` processes through `tests/standin/fleet.sh`)
//! on a real datastore, with the pre-upgrade snapshot in a real repository.
//!
//! SQLite always; PostgreSQL, MariaDB and S3 with `scripts/test-services.sh`
//! (skipped without them unless `SPIREKEEP_TEST_REQUIRE_SERVICES=1`).

mod upgrade;

use std::time::Duration;

use spirekeep::datastore::Engine;
use spirekeep::snapshot::codec::content_hash;
use spirekeep::snapshot::{Manifest, pins};
use spirekeep::store::keys::SnapshotId;
use spirekeep::store::{RepoOptions, Repository};
use upgrade::{
    Fleet, PlanOpts, Store, assert_no_step_done_twice, done_steps, events_of, s3_settings,
};

fn file_repo(fleet: &Fleet) -> String {
    format!("file://{}", fleet.path("repo").display())
}

fn open_repo(o: &PlanOpts) -> Repository {
    let options = RepoOptions {
        s3_endpoint: o.s3.as_ref().map(|(e, _)| e.clone()),
        s3_allow_http: o.s3.is_some(),
        s3_path_style: o.s3.is_some(),
        s3_region: None,
    };
    Repository::open(&o.repo, &options).unwrap()
}

fn all_at(fleet: &Fleet, version: &str) {
    for (name, v) in fleet.versions() {
        assert_eq!(v, version, "{name}");
    }
}

/// 1.13.6 → 1.15.3 through 1.14.7: two servers, three agents in three batches.
async fn two_hop_upgrade(engine: Engine, s3: bool) {
    let dir = tempfile::tempdir().unwrap();
    let Some(store) = Store::create(engine, dir.path(), 23, "1.13.6").await else {
        return;
    };
    let fleet = Fleet::new(&store.conn, 2, 3, "1.13.6");
    fleet.start_all();
    let mut o = PlanOpts::new("1.15.3", &file_repo(&fleet));
    if s3 {
        let Some((endpoint, bucket)) = s3_settings() else {
            return;
        };
        let n: u32 = rand::random();
        o.repo = format!("s3://{bucket}/spirekeep-tests/upgrade-{n:08x}");
        o.s3 = Some((endpoint, bucket));
    }
    let plan = fleet.plan(&o);
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&plan).unwrap()).unwrap();
    let hops: Vec<&str> = saved["hops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["to"].as_str().unwrap())
        .collect();
    assert_eq!(hops, ["1.14.7", "1.15.3"]);

    let (code, report, stderr) = fleet.apply_full(&[]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["outcome"], "completed");
    all_at(&fleet, "1.15.3");
    // not a terminal: one plain line per step on stderr
    for step in [
        "preflight",
        "snapshot",
        "hop1.server.server-1",
        "hop2.agents.nodes.batch3",
        "finish",
    ] {
        let line = format!("[done] {step}: ");
        assert_eq!(
            stderr.lines().filter(|l| l.starts_with(&line)).count(),
            1,
            "{line:?} in:\n{stderr}"
        );
    }
    // the pre-upgrade snapshot got a restore drill before the first step
    let snapshot_step = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "snapshot")
        .unwrap();
    assert!(
        snapshot_step["detail"]
            .as_str()
            .unwrap()
            .contains("restore drill into scratch"),
        "{snapshot_step}"
    );
    assert_eq!(store.row().await, (25, "1.15.3".to_string()), "{engine}");
    // every agent re-attested and reported its version
    let ds = store.open().await;
    let by = ds
        .count_by("attested_node_entries", "agent_version")
        .await
        .unwrap();
    ds.close().await;
    assert!(by.contains(&(Some("1.15.3".into()), 3)), "{by:?}");

    // the journal: each step once, in SPIRE's order
    let j = fleet.journal();
    assert_no_step_done_twice(&j);
    let done = done_steps(&j);
    let pos = |s: &str| {
        done.iter()
            .position(|d| d == s)
            .unwrap_or_else(|| panic!("{s} not done: {done:?}"))
    };
    assert!(pos("snapshot") < pos("hop1.server.server-1"));
    assert!(pos("hop1.server.server-1") < pos("hop1.server.server-2"));
    assert!(pos("hop1.server.server-2") < pos("hop1.datastore"));
    assert!(pos("hop1.datastore") < pos("hop1.agents.nodes.batch1"));
    assert!(pos("hop1.agents.nodes.batch3") < pos("hop2.server.server-1"));
    assert!(pos("hop2.agents.nodes.batch3") < pos("postcheck"));
    // every member started once per version
    for name in fleet.names() {
        for v in ["1.14.7", "1.15.3"] {
            assert_eq!(fleet.starts(&name, v), 1, "{name} at {v}");
        }
    }

    // the snapshot: labelled, verified, and no longer pinned
    let repo = open_repo(&o);
    let id = SnapshotId::parse(report["snapshot_id"].as_str().unwrap()).unwrap();
    let manifest = Manifest::load(&repo, &id).await.unwrap();
    assert!(
        manifest.labels.contains(&"pre-upgrade".to_string()),
        "{:?}",
        manifest.labels
    );
    assert_eq!(
        (
            manifest.spire.schema_version,
            manifest.spire.code_version.as_str()
        ),
        (23, "1.13.6")
    );
    assert!(pins::pins_of(&repo, &id).await.unwrap().is_empty());
    // the journal is mirrored into the repository
    let plan_id = saved["plan_id"].as_str().unwrap();
    let mirror: serde_json::Value =
        serde_json::from_slice(&repo.get(&format!("journal/{plan_id}.json")).await.unwrap())
            .unwrap();
    assert_eq!(mirror["records"].as_array().unwrap().len(), j.len());

    // status says so; a finished plan is not applied again
    let out = fleet.spirekeep(&["status", plan.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("completed"), "{text}");
    let out = fleet.spirekeep(&["apply", plan.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already finished"));
    if !s3 {
        // the repository lists the plans it holds journals of
        let out = fleet.spirekeep(&["--json", "status", "--repo", &o.repo]);
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(list[0]["plan_id"], plan_id);
        assert_eq!(list[0]["state"], "completed");
    }
    // nothing printed the datastore password
    let pw = std::env::var("SPIREKEEP_TEST_PASSWORD").unwrap_or_else(|_| "sk-test-pw-7Hq2".into());
    if engine != Engine::Sqlite {
        assert!(!report.to_string().contains(&pw));
        assert!(!text.contains(&pw));
    }
    if s3 {
        for m in repo.list("").await.unwrap() {
            repo.delete(&m.key).await.unwrap();
        }
    }
    drop(fleet);
    store.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hop_upgrade_on_sqlite() {
    two_hop_upgrade(Engine::Sqlite, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hop_upgrade_on_postgres_with_s3() {
    two_hop_upgrade(Engine::Postgres, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hop_upgrade_on_mariadb() {
    two_hop_upgrade(Engine::Mysql, false).await;
}

/// Every table but the two an agent writes when it attests (the stand-in's
/// agents attest again when they restart after the rollback) equals the
/// snapshot, row for row.
async fn assert_datastore_is_snapshot(store: &Store, repo: &Repository, snapshot: &str) {
    let id = SnapshotId::parse(snapshot).unwrap();
    let manifest = Manifest::load(repo, &id).await.unwrap();
    let ds = store.open().await;
    let cat = ds.catalogue().await.unwrap();
    let names = |c: &spirekeep::datastore::Catalogue| {
        c.tables
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    t.columns.iter().map(|c| c.name.clone()).collect::<Vec<_>>(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(&cat),
        names(&manifest.catalogue),
        "the schema is the snapshot's"
    );
    for t in &cat.tables {
        let expected = manifest.table(&t.name).unwrap();
        if t.name.starts_with("attested_node_entries") {
            continue;
        }
        let rows = ds.read_table(t).await.unwrap();
        assert_eq!(
            Some(content_hash(rows.iter())),
            expected.content(),
            "table {}",
            t.name
        );
    }
    ds.close().await;
}

/// A server that crashes half-way through a migration: the datastore is
/// restored, every member is back on 1.13.6 and healthy, exit 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_half_migration_rolls_everything_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(Engine::Sqlite, dir.path(), 23, "1.13.6")
        .await
        .unwrap();
    let fleet = Fleet::new(&store.conn, 2, 2, "1.13.6");
    fleet.start_all();
    // hop 1 (→ 1.14.7) passes; hop 2: server-1 crashes in the 24 → 25 step after its DDL
    fleet.set_fault("server-1", "half-migrate", "25\n");
    let o = PlanOpts::new("1.15.3", &file_repo(&fleet));
    fleet.plan(&o);
    let (code, report) = fleet.apply(&[]);
    assert_eq!(code, 3, "{report:#}");
    assert_eq!(report["outcome"], "rolled_back");
    assert!(
        report["summary"]
            .as_str()
            .unwrap()
            .contains("hop2.server.server-1"),
        "{report:#}"
    );
    all_at(&fleet, "1.13.6");
    for m in report["members"].as_array().unwrap() {
        assert_eq!(m["healthy"], true, "{m}");
        assert_eq!(m["version"], "1.13.6", "{m}");
    }
    assert_eq!(store.row().await, (23, "1.13.6".to_string()));
    let repo = open_repo(&o);
    assert_datastore_is_snapshot(&store, &repo, report["snapshot_id"].as_str().unwrap()).await;
    for s in &fleet.servers {
        assert!(fleet.ready(s.port), "{} ready", s.name);
    }
    for a in &fleet.agents {
        assert!(fleet.ready(a.port), "{} ready", a.name);
    }
    // the journal: servers stopped, then the restore, then agents before servers
    let j = fleet.journal();
    assert_no_step_done_twice(&j);
    let done = done_steps(&j);
    let pos = |s: &str| {
        done.iter()
            .position(|d| d == s)
            .unwrap_or_else(|| panic!("{s} not done: {done:?}"))
    };
    assert!(pos("rollback.stop.server-2") < pos("rollback.restore"));
    assert!(pos("rollback.restore") < pos("rollback.agent.agent-1"));
    assert!(pos("rollback.agent.agent-2") < pos("rollback.server.server-1"));
    assert!(pos("rollback.server.server-2") < pos("rollback.check"));
    assert_eq!(
        events_of(&j, "hop2.server.server-1"),
        ["step_started", "step_failed"]
    );
    assert!(!done.contains(&"hop2.datastore".to_string()));
    let last = j.last().unwrap();
    assert_eq!(
        (last["event"].as_str(), last["outcome"].as_str()),
        (Some("finished"), Some("rolled_back"))
    );
    // the snapshot is released
    let id = SnapshotId::parse(report["snapshot_id"].as_str().unwrap()).unwrap();
    assert!(pins::pins_of(&repo, &id).await.unwrap().is_empty());
}

/// A server that reports the wrong version after its upgrade, on a server
/// datastore: restored to schema 24 (the column 1.15 added is gone), exit 3.
async fn wrong_version(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let Some(store) = Store::create(engine, dir.path(), 24, "1.14.7").await else {
        return;
    };
    let fleet = Fleet::new(&store.conn, 2, 1, "1.14.7");
    fleet.start_all();
    fleet.set_fault("server-2", "wrong-version", "1.14.7\n");
    let o = PlanOpts::new("1.15.3", &file_repo(&fleet));
    fleet.plan(&o);
    let (code, report) = fleet.apply(&[]);
    assert_eq!(code, 3, "{report:#}");
    assert_eq!(report["outcome"], "rolled_back");
    let failed = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["status"] == "failed")
        .unwrap();
    assert_eq!(failed["id"], "hop1.server.server-2");
    assert!(
        failed["detail"]
            .as_str()
            .unwrap()
            .contains("reports version 1.14.7"),
        "{failed}"
    );
    assert_eq!(store.row().await, (24, "1.14.7".to_string()));
    let ds = store.open().await;
    let cat = ds.catalogue().await.unwrap();
    ds.close().await;
    assert!(!cat.has_column("registered_entries", "additional_attributes"));
    assert!(cat.has_column("attested_node_entries", "agent_version"));
    for (name, v) in fleet.versions() {
        assert_eq!(v, "1.14.7", "{name}");
        let installed = std::fs::read_to_string(fleet.member_dir(&name).join("version")).unwrap();
        assert_eq!(installed.trim(), "1.14.7", "{name} installed");
    }
    drop(fleet);
    store.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_wrong_version_rolls_back_on_mariadb() {
    wrong_version(Engine::Mysql).await;
}

/// An agent batch that fails: that batch goes back, the servers stay, the
/// plan stops (exit 7: not back where it started, an operator must act);
/// once the agent is fixed, `--resume` finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_batch_failure_returns_the_batch_and_resume_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(Engine::Sqlite, dir.path(), 24, "1.14.7")
        .await
        .unwrap();
    let fleet = Fleet::new(&store.conn, 1, 3, "1.14.7");
    fleet.start_all();
    fleet.set_fault("agent-2", "wrong-version", "1.14.7\n");
    let o = PlanOpts::new("1.15.3", &file_repo(&fleet));
    fleet.plan(&o);
    let (code, report) = fleet.apply(&[]);
    assert_eq!(code, 7, "stopped half-way: an operator must act {report:#}");
    assert_eq!(report["outcome"], "stopped");
    assert!(
        report["rollback"].as_array().is_none_or(Vec::is_empty),
        "no datastore rollback"
    );
    let versions: Vec<(String, String)> = fleet.versions();
    assert_eq!(
        versions,
        [
            ("server-1".to_string(), "1.15.3".to_string()),
            ("agent-1".into(), "1.15.3".into()),
            ("agent-2".into(), "1.14.7".into()),
            ("agent-3".into(), "1.14.7".into()),
        ]
    );
    let installed = std::fs::read_to_string(fleet.member_dir("agent-2").join("version")).unwrap();
    assert_eq!(installed.trim(), "1.14.7", "the batch went back");
    assert_eq!(
        fleet.starts("agent-3", "1.15.3"),
        0,
        "later batches did not run"
    );
    assert_eq!(
        store.row().await,
        (25, "1.15.3".to_string()),
        "the servers stay upgraded"
    );
    let j = fleet.journal();
    assert_eq!(
        events_of(&j, "hop1.agents.nodes.batch2"),
        ["step_started", "step_failed"]
    );
    let out = fleet.spirekeep(&[
        "--json",
        "status",
        fleet.path("plan.json").to_str().unwrap(),
    ]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["state"], "stopped");

    // without --resume the plan is not started over
    let out = fleet.spirekeep(&["apply", fleet.path("plan.json").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resume"));

    fleet.clear_fault("agent-2", "wrong-version");
    let (code, report) = fleet.apply(&["--resume"]);
    assert_eq!(code, 0, "{report:#}");
    all_at(&fleet, "1.15.3");
    let j = fleet.journal();
    assert_no_step_done_twice(&j);
    assert_eq!(
        events_of(&j, "hop1.agents.nodes.batch2"),
        ["step_started", "step_failed", "step_started", "step_done"]
    );
    assert_eq!(
        events_of(&j, "hop1.server.server-1"),
        ["step_started", "step_done"]
    );
    assert_eq!(fleet.starts("server-1", "1.15.3"), 1);
    assert_eq!(fleet.starts("agent-1", "1.15.3"), 1);
}

/// SIGKILL in the middle of the snapshot, a server step and an agent batch;
/// `--resume` each time. The end state is an uninterrupted run's, and no
/// step (and no member start) happened twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_apply_resumes_without_repeating_steps() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(Engine::Sqlite, dir.path(), 23, "1.13.6")
        .await
        .unwrap();
    let mut fleet = Fleet::new(&store.conn, 2, 2, "1.13.6");
    fleet.start_all();
    let o = PlanOpts::new("1.15.3", &file_repo(&fleet));
    let plan = fleet.plan(&o);
    let plan = plan.to_str().unwrap().to_string();
    let timeout = Duration::from_secs(120);

    let run = fleet.spawn(&["apply", &plan]);
    fleet.wait_journal("step_started", "snapshot", timeout);
    fleet.kill(run);
    let run = fleet.spawn(&["apply", &plan, "--resume"]);
    fleet.wait_journal("step_started", "hop1.server.server-2", timeout);
    fleet.kill(run);
    let run = fleet.spawn(&["apply", &plan, "--resume"]);
    fleet.wait_journal("step_started", "hop2.agents.nodes.batch1", timeout);
    fleet.kill(run);
    // status tells where it stands
    let out = fleet.spirekeep(&["--json", "status", &plan]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["state"], "in_progress");
    assert_eq!(status["interrupted"], "hop2.agents.nodes.batch1");
    let (code, report) = fleet.apply(&["--resume"]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["resumed"], true);
    all_at(&fleet, "1.15.3");
    assert_eq!(store.row().await, (25, "1.15.3".to_string()));

    let j = fleet.journal();
    assert_no_step_done_twice(&j);
    let applies = j.iter().filter(|r| r["event"] == "apply_started").count();
    assert_eq!(applies, 4);
    // the interrupted steps started twice and completed once
    for step in ["hop1.server.server-2", "hop2.agents.nodes.batch1"] {
        assert_eq!(
            events_of(&j, step),
            ["step_started", "step_started", "step_done"],
            "{step}"
        );
    }
    for name in fleet.names() {
        for v in ["1.14.7", "1.15.3"] {
            assert_eq!(
                fleet.starts(&name, v),
                1,
                "{name} started at {v} more than once:\n{}",
                fleet.log(&name)
            );
        }
    }
    // one pre-upgrade snapshot
    let repo = open_repo(&o);
    let ids = spirekeep::snapshot::manifest::list_snapshots(&repo)
        .await
        .unwrap();
    assert_eq!(ids.len(), 1, "{ids:?}");
}

/// SPIRE's downgrade order: agents first, then servers; the datastore keeps
/// its newer schema and code_version (SPIRE never lowers it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downgrade_moves_agents_before_servers() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(Engine::Sqlite, dir.path(), 25, "1.15.3")
        .await
        .unwrap();
    let fleet = Fleet::new(&store.conn, 1, 2, "1.15.3");
    fleet.start_all();
    let o = PlanOpts::new("1.14.7", &file_repo(&fleet));
    fleet.plan(&o);
    let (code, report) = fleet.apply(&[]);
    assert_eq!(code, 0, "{report:#}");
    all_at(&fleet, "1.14.7");
    assert_eq!(store.row().await, (25, "1.15.3".to_string()));
    assert!(
        fleet
            .log("server-1")
            .contains("DB schema is ahead of code version")
    );
    let done = done_steps(&fleet.journal());
    let pos = |s: &str| {
        done.iter()
            .position(|d| d == s)
            .unwrap_or_else(|| panic!("{s} not done: {done:?}"))
    };
    assert!(pos("hop1.agents.nodes.batch2") < pos("hop1.server.server-1"));
}

/// A plan whose facts changed is refused before anything changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_plan_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(Engine::Sqlite, dir.path(), 24, "1.14.7")
        .await
        .unwrap();
    let fleet = Fleet::new(&store.conn, 1, 1, "1.14.7");
    fleet.start_all();
    let o = PlanOpts::new("1.15.3", &file_repo(&fleet));
    fleet.plan(&o);
    fleet.sh(&["rollback", "agent-1", "1.14.6"]);
    let (code, report) = fleet.apply(&[]);
    assert_eq!(code, 8, "refused before touching anything {report:#}");
    assert_eq!(report["outcome"], "refused");
    let summary = report["summary"].as_str().unwrap();
    assert!(
        summary.contains("stale")
            && summary.contains("agent agent-1: planned at 1.14.7, now runs 1.14.6"),
        "{summary}"
    );
    assert_eq!(fleet.version("server-1"), "1.14.7");
    assert_eq!(store.row().await, (24, "1.14.7".to_string()));
    let repo = open_repo(&o);
    assert!(
        spirekeep::snapshot::manifest::list_snapshots(&repo)
            .await
            .unwrap()
            .is_empty(),
        "no snapshot taken"
    );
}

/// order = "agents-first" on an upgrade is refused with SPIRE's rule, and
/// accepted with the override (the plan then lists where it leaves the skew).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_first_upgrade_needs_the_override() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(Engine::Sqlite, dir.path(), 24, "1.14.7")
        .await
        .unwrap();
    let fleet = Fleet::new(&store.conn, 1, 2, "1.14.7");
    fleet.start_all();
    let mut o = PlanOpts::new("1.15.3", &file_repo(&fleet));
    o.order = "agents-first".into();
    let toml = fleet.write_plan(&o);
    let out = fleet.spirekeep(&["plan", toml.to_str().unwrap(), "--out", "plan.json"]);
    assert_eq!(out.status.code(), Some(8), "refused");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("SPIRE Servers must be upgraded before SPIRE Agents"),
        "{stdout}"
    );
    assert!(stdout.contains("--allow-agents-first"), "{stdout}");
    assert!(!fleet.path("plan.json").exists());

    let out = fleet.spirekeep(&[
        "plan",
        toml.to_str().unwrap(),
        "--out",
        "plan.json",
        "--allow-agents-first",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("OUTSIDE SPIRE's supported skew"),
        "{stdout}"
    );
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fleet.path("plan.json")).unwrap()).unwrap();
    assert_eq!(saved["overrides"]["agents_first"], true);
    let ids: Vec<&str> = saved["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids[2], "hop1.agents.nodes.batch1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_wrong_version_rolls_back_on_postgres() {
    wrong_version(Engine::Postgres).await;
}

/// A server that will not start at all, not even on its old version: the
/// rollback cannot finish (exit 7, the report says where everything is);
/// once the server is fixed, `--resume` finishes the rollback from the journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_rollback_is_resumed_from_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(Engine::Sqlite, dir.path(), 24, "1.14.7")
        .await
        .unwrap();
    let fleet = Fleet::new(&store.conn, 2, 1, "1.14.7");
    fleet.start_all();
    fleet.set_fault("server-2", "fail-start", "simulated broken host\n");
    let o = PlanOpts::new("1.15.3", &file_repo(&fleet));
    fleet.plan(&o);
    let (code, report) = fleet.apply(&[]);
    assert_eq!(code, 7, "could not roll back {report:#}");
    assert_eq!(report["outcome"], "rollback_failed");
    let rb = report["rollback"].as_array().unwrap();
    let failed: Vec<&str> = rb
        .iter()
        .filter(|s| s["status"] == "failed")
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["rollback.server.server-2"]);
    assert!(
        rb.iter()
            .any(|s| s["id"] == "rollback.restore" && s["status"] == "done")
    );
    let s2 = report["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "server-2")
        .unwrap();
    assert_eq!(s2["healthy"], false, "{s2}");
    assert_eq!(store.row().await, (24, "1.14.7".to_string()), "restored");

    fleet.clear_fault("server-2", "fail-start");
    let (code, report) = fleet.apply(&["--resume"]);
    assert_eq!(code, 3, "{report:#}");
    assert_eq!(report["outcome"], "rolled_back");
    all_at(&fleet, "1.14.7");
    assert_eq!(store.row().await, (24, "1.14.7".to_string()));
    let j = fleet.journal();
    assert_no_step_done_twice(&j);
    assert_eq!(
        events_of(&j, "rollback.restore"),
        ["step_started", "step_done"],
        "restored once"
    );
    assert_eq!(
        events_of(&j, "rollback.server.server-2"),
        ["step_started", "step_failed", "step_started", "step_done"]
    );
    // a rolled-back plan is finished
    let out = fleet.spirekeep(&[
        "apply",
        fleet.path("plan.json").to_str().unwrap(),
        "--resume",
    ]);
    assert_eq!(out.status.code(), Some(2));
}

/// `max_failure_ratio > 0` end to end over two hops. Hop 1: one agent of
/// three fails, within the ratio: it goes back and the plan goes on; but
/// before hop 2's server step the plan stops, because that agent would be
/// two minors behind the servers (outside SPIRE's skew). Once an operator
/// moved it, `--resume` goes on; in hop 2 two agents of three fail, beyond
/// the ratio: the whole batch goes back and the plan stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_ratio_tolerates_within_and_stops_beyond_without_breaking_the_skew() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(Engine::Sqlite, dir.path(), 23, "1.13.6")
        .await
        .unwrap();
    let fleet = Fleet::new(&store.conn, 1, 3, "1.13.6");
    fleet.start_all();
    fleet.set_fault("agent-3", "wrong-version", "1.13.6\n");
    let mut o = PlanOpts::new("1.15.3", &file_repo(&fleet));
    o.batch = "3".into();
    o.max_failure_ratio = "0.4".into();
    fleet.plan(&o);

    let (code, report) = fleet.apply(&[]);
    assert_eq!(code, 7, "{report:#}");
    assert_eq!(report["outcome"], "stopped");
    let summary = report["summary"].as_str().unwrap();
    assert!(
        summary.contains("hop2.server.server-1")
            && summary.contains("agent-3 runs 1.13.6")
            && summary.contains("outside SPIRE's skew"),
        "{summary}"
    );
    assert_eq!(
        fleet.versions(),
        [
            ("server-1".to_string(), "1.14.7".to_string()),
            ("agent-1".into(), "1.14.7".into()),
            ("agent-2".into(), "1.14.7".into()),
            ("agent-3".into(), "1.13.6".into()),
        ]
    );
    assert_eq!(fleet.starts("server-1", "1.15.3"), 0, "hop 2 did not start");
    let j = fleet.journal();
    assert_eq!(
        events_of(&j, "hop1.agents.nodes.batch1"),
        ["step_started", "step_done"],
        "tolerated"
    );
    assert_eq!(
        events_of(&j, "hop2.server.server-1"),
        ["step_started", "step_failed"]
    );

    // the operator moves agent-3 by hand; the plan goes on
    fleet.clear_fault("agent-3", "wrong-version");
    fleet.sh(&["upgrade", "agent-3", "1.14.7"]);
    fleet.set_fault("agent-1", "wrong-version", "1.14.7\n");
    fleet.set_fault("agent-2", "wrong-version", "1.14.7\n");
    let (code, report) = fleet.apply(&["--resume"]);
    assert_eq!(code, 7, "{report:#}");
    assert_eq!(report["outcome"], "stopped");
    let summary = report["summary"].as_str().unwrap();
    assert!(
        summary.contains("2 of 3 agents failed (max_failure_ratio 0.4)"),
        "{summary}"
    );
    for a in ["agent-1", "agent-2", "agent-3"] {
        let installed = std::fs::read_to_string(fleet.member_dir(a).join("version")).unwrap();
        assert_eq!(installed.trim(), "1.14.7", "{a}: the whole batch went back");
    }
    assert_eq!(fleet.version("server-1"), "1.15.3");

    fleet.clear_fault("agent-1", "wrong-version");
    fleet.clear_fault("agent-2", "wrong-version");
    let (code, report) = fleet.apply(&["--resume"]);
    assert_eq!(code, 0, "{report:#}");
    all_at(&fleet, "1.15.3");
    assert_no_step_done_twice(&fleet.journal());
}

/// Command templates and gates get a minimal environment: PATH, HOME,
/// LANG/LC_*, TZ, what `executor.pass_env` names and `executor.env`; never
/// spirekeep's secrets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_and_gates_never_see_spirekeeps_environment() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(Engine::Sqlite, dir.path(), 24, "1.14.7")
        .await
        .unwrap();
    let fleet = Fleet::new(&store.conn, 1, 1, "1.14.7");
    fleet.start_all();
    let mut o = PlanOpts::new("1.15.3", &file_repo(&fleet));
    o.executor_extra = "pass_env = [\"KUBECONFIG\"]".into();
    let out_dir = fleet.path("env");
    std::fs::create_dir_all(&out_dir).unwrap();
    let toml = fleet
        .plan_toml(&o)
        .replacen(
            "clock = \"",
            &format!("clock = \"env > {}/{{name}}.template.env; ", out_dir.display()),
            1,
        )
        .replacen(
            "[[servers.health]]\n",
            &format!(
                "[[servers.health]]\nkind = \"command\"\ncommand = \"env > {}/{{name}}.gate.env\"\n\n[[servers.health]]\n",
                out_dir.display()
            ),
            1,
        );
    let plan = fleet.path("plan.toml");
    std::fs::write(&plan, toml).unwrap();
    let secrets = [
        ("PGPASSWORD", "pg-secret-4Yt"),
        ("AWS_SECRET_ACCESS_KEY", "aws-secret-8Kq"),
        ("SPIREKEEP_DATASTORE", "postgres://u:ds-secret-2Wz@db/spire"),
        ("SPIREKEEP_S3_SECRET", "sk-secret-5Rb"),
    ];
    let mut cmd = fleet.command(&["plan", plan.to_str().unwrap()]);
    for (k, v) in secrets {
        cmd.env(k, v);
    }
    cmd.env("KUBECONFIG", "/home/op/.kube/config")
        .env("UNRELATED_VAR", "not-passed");
    let out = cmd.output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let files: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in [
        "server-1.template.env",
        "agent-1.template.env",
        "server-1.gate.env",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }
    for f in &files {
        let env = std::fs::read_to_string(f).unwrap();
        for (k, v) in secrets {
            assert!(
                !env.contains(v) && !env.contains(&format!("{k}=")),
                "{k} reached {}:\n{env}",
                f.display()
            );
        }
        assert!(!env.contains("UNRELATED_VAR"), "{}:\n{env}", f.display());
        assert!(
            env.contains("KUBECONFIG=/home/op/.kube/config"),
            "{}:\n{env}",
            f.display()
        );
        assert!(
            env.lines().any(|l| l.starts_with("PATH=")),
            "{}:\n{env}",
            f.display()
        );
        // executor.env still applies
        assert!(
            env.contains("STANDIN_START_TIMEOUT=30"),
            "{}:\n{env}",
            f.display()
        );
    }
    // a plan cannot pass spirekeep's own secrets on
    o.executor_extra = "pass_env = [\"PGPASSWORD\"]".into();
    let toml = fleet.write_plan(&o);
    let out = fleet.spirekeep(&["plan", toml.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("executor.pass_env: PGPASSWORD"));
}

/// A member whose clock is off is a blocking finding of `plan` and of
/// `apply`'s preflight, with the member named; within the skew, `plan`
/// shows each member's offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skewed_clock_blocks_plan_and_apply() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(Engine::Sqlite, dir.path(), 24, "1.14.7")
        .await
        .unwrap();
    let fleet = Fleet::new(&store.conn, 1, 2, "1.14.7");
    fleet.start_all();
    let o = PlanOpts::new("1.15.3", &file_repo(&fleet));
    let toml = fleet.write_plan(&o);
    fleet.set_fault("agent-2", "clock-offset", "600\n");
    let out = fleet.spirekeep(&["plan", toml.to_str().unwrap(), "--out", "plan.json"]);
    assert_eq!(out.status.code(), Some(8), "refused");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("agent agent-2: its clock is ")
            && stdout.contains("s ahead of spirekeep's"),
        "{stdout}"
    );
    assert!(!stdout.contains("agent agent-1: its clock"), "{stdout}");
    assert!(!fleet.path("plan.json").exists());

    fleet.clear_fault("agent-2", "clock-offset");
    let out = fleet.spirekeep(&["plan", toml.to_str().unwrap(), "--out", "plan.json"]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("agent-2 (nodes) runs 1.14.7, healthy, clock "),
        "{stdout}"
    );

    // the clock goes wrong after the plan was made: apply refuses
    fleet.set_fault("server-1", "clock-offset", "-120\n");
    let (code, report) = fleet.apply(&[]);
    assert_eq!(code, 8, "{report:#}");
    assert_eq!(report["outcome"], "refused");
    let summary = report["summary"].as_str().unwrap();
    assert!(
        summary.contains("server server-1: its clock is ")
            && summary.contains("s behind spirekeep's"),
        "{summary}"
    );
    assert_eq!(fleet.starts("server-1", "1.15.3"), 0);
}

/// Everything already runs the target: `plan` and `apply` exit 9 and
/// change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_to_do_exits_9() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(Engine::Sqlite, dir.path(), 25, "1.15.3")
        .await
        .unwrap();
    let fleet = Fleet::new(&store.conn, 1, 1, "1.15.3");
    fleet.start_all();
    let o = PlanOpts::new("1.15.3", &file_repo(&fleet));
    let toml = fleet.write_plan(&o);
    let out = fleet.spirekeep(&["plan", toml.to_str().unwrap(), "--out", "plan.json"]);
    assert_eq!(out.status.code(), Some(9));
    let (code, report) = fleet.apply(&[]);
    assert_eq!(code, 9, "{report:#}");
    assert_eq!(report["outcome"], "nothing_to_do");
    let repo = open_repo(&o);
    assert!(
        spirekeep::snapshot::manifest::list_snapshots(&repo)
            .await
            .unwrap()
            .is_empty(),
        "no snapshot taken"
    );
}
