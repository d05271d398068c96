//! spirekeep against a real SPIRE: `spire-server` and `spire-agent` v1.13.3
//! built from source (`scripts/spire.sh`), on SQLite, PostgreSQL and MariaDB.
//!
//! - SPIRE's own DDL equals the project's schema-23 DDL, column for column
//!   and index for index;
//! - disaster recovery: back up a serving deployment, destroy its datastore,
//!   restore, and the server serves the same entries, agents and bundles, and
//!   the agent gets its SVID again; across engines too;
//! - the restore's impact report names exactly the agents the real server
//!   then rejects;
//! - `check --target 1.13.3` agrees with what spire-server 1.13.3 does at
//!   start-up on datastores at schemas 21-25;
//! - the metric names the alert rules and plan gates use are in a real scrape.
//!
//! These tests start real processes with timeouts, so `scripts/test.sh` runs
//! them one at a time. Without the SPIRE binaries they print one line and pass,
//! unless `SPIREKEEP_TEST_REQUIRE_SPIRE=1` (CI).

mod spire;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use spire::{ServerOptions, SpireAgent, SpireServer, spirekeep, spirekeep_ok};
use spirekeep::datastore::testkit::{Population, TestDatabase, create_spire_datastore, spire_ddl};
use spirekeep::datastore::{self, Datastore, Engine, OpenMode, dsn};

// ------------------------------------------------------------- datastores

/// A datastore for a SPIRE server: a SQLite path under the server's data
/// directory, or a fresh database on the test server.
struct SpireDatastore {
    engine: Engine,
    /// SPIRE's `connection_string`.
    connection_string: String,
    /// What spirekeep's `--datastore` takes (the sqlx URL for a database).
    spirekeep_url: String,
    db: Option<TestDatabase>,
}

impl SpireDatastore {
    async fn create(engine: Engine, dir: &Path, hint: &str) -> Option<Self> {
        match engine {
            Engine::Sqlite => {
                let path = dir.join("data").join("datastore.sqlite3");
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                let path = path.display().to_string();
                Some(Self {
                    engine,
                    connection_string: path.clone(),
                    spirekeep_url: path,
                    db: None,
                })
            }
            _ => {
                let db = TestDatabase::create_or_skip(engine, hint).await.unwrap()?;
                Some(Self {
                    engine,
                    connection_string: spire::spire_connection_string(&db),
                    spirekeep_url: db.url().to_string(),
                    db: Some(db),
                })
            }
        }
    }

    fn server_options(&self) -> ServerOptions {
        ServerOptions {
            engine: self.engine,
            connection_string: self.connection_string.clone(),
            agent_ttl: None,
            disable_migration: false,
        }
    }

    async fn open(&self) -> Box<dyn Datastore> {
        let spec = dsn::parse(&self.spirekeep_url, Some(self.engine), Path::new("/")).unwrap();
        datastore::open(&spec, OpenMode::Create).await.unwrap()
    }

    /// Destroys the datastore as a disaster would: the SQLite file and its
    /// `-wal`/`-shm` are deleted; the database is dropped and created again
    /// empty (as an operator does before restoring).
    async fn destroy(&self) {
        match &self.db {
            None => {
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", self.connection_string));
                }
            }
            Some(db) => spire::recreate_database(db).await,
        }
    }

    async fn cleanup(self) {
        if let Some(db) = self.db {
            db.cleanup().await.unwrap();
        }
    }
}

fn file_repo(dir: &Path) -> String {
    format!("file://{}", dir.join("repo").display())
}

// ------------------------------------------------------- item 5: the DDL

/// Column defaults, per table, as the engine reports them.
async fn column_defaults(url: &str, engine: Engine) -> BTreeMap<String, Option<String>> {
    spire::column_defaults(url, engine).await
}

async fn spire_ddl_matches_the_project(engine: Engine) {
    let Some(bin) = spire::spire_bin_dir() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let Some(store) = SpireDatastore::create(engine, dir.path(), "spire_ddl").await else {
        return;
    };
    // 1. A real spire-server creates its datastore.
    let mut server = SpireServer::new(&bin, dir.path(), store.server_options());
    server.start();
    server.stop();

    // 2. spirekeep inspect reads it: schema 23, code_version "1.13.3".
    let out = spirekeep_ok(&[
        "--json",
        "inspect",
        "--spire-config",
        server.config.to_str().unwrap(),
    ]);
    let inspect: serde_json::Value = serde_json::from_str(&out).unwrap();
    let text = inspect.to_string();
    assert!(
        text.contains("\"code_version\":\"1.13.3\""),
        "inspect does not show SPIRE 1.13.3's code_version: {out}"
    );
    assert!(
        text.contains("\"schema_version\":23"),
        "inspect does not show schema 23: {out}"
    );

    // 3. The project's schema-23 DDL on an empty datastore of the same engine.
    let project_dir = tempfile::tempdir().unwrap();
    let project = SpireDatastore::create(engine, project_dir.path(), "project_ddl")
        .await
        .unwrap();
    let ds = project.open().await;
    ds.execute_script(spire_ddl(engine, 23).unwrap())
        .await
        .unwrap();
    let project_catalogue = ds.catalogue().await.unwrap();
    ds.close().await;
    let ds = store.open().await;
    let spire_catalogue = ds.catalogue().await.unwrap();
    ds.close().await;

    // 4. Table for table, column for column, index for index.
    let mut differences = Vec::new();
    let names = |c: &spirekeep::datastore::Catalogue| -> Vec<String> {
        c.tables.iter().map(|t| t.name.clone()).collect()
    };
    if names(&spire_catalogue) != names(&project_catalogue) {
        differences.push(format!(
            "tables: SPIRE {:?}, project {:?}",
            names(&spire_catalogue),
            names(&project_catalogue)
        ));
    }
    for spire_table in &spire_catalogue.tables {
        let Some(ours) = project_catalogue.table(&spire_table.name) else {
            continue;
        };
        let mut a = spire_table.clone();
        let mut b = ours.clone();
        // The engine's own CREATE text differs in spacing only; every fact in it is compared below.
        a.create_sql = None;
        b.create_sql = None;
        if a.columns != b.columns {
            differences.push(format!(
                "{}: columns\n  SPIRE   {:?}\n  project {:?}",
                a.name, a.columns, b.columns
            ));
        }
        if a.primary_key != b.primary_key {
            differences.push(format!(
                "{}: primary key SPIRE {:?}, project {:?}",
                a.name, a.primary_key, b.primary_key
            ));
        }
        if a.indexes != b.indexes {
            differences.push(format!(
                "{}: indexes\n  SPIRE   {:?}\n  project {:?}",
                a.name, a.indexes, b.indexes
            ));
        }
    }
    let spire_defaults = column_defaults(&store.spirekeep_url, engine).await;
    let project_defaults = column_defaults(&project.spirekeep_url, engine).await;
    for (column, default) in &spire_defaults {
        let ours = project_defaults.get(column);
        if ours != Some(default) {
            differences.push(format!(
                "{column}: default SPIRE {default:?}, project {ours:?}"
            ));
        }
    }
    let spire_options = spire::table_options(&store.spirekeep_url, engine).await;
    let project_options = spire::table_options(&project.spirekeep_url, engine).await;
    if spire_options != project_options {
        differences.push(format!(
            "table options\n  SPIRE   {spire_options:?}\n  project {project_options:?}"
        ));
    }
    assert!(
        differences.is_empty(),
        "{engine}: the project's schema-23 DDL differs from what spire-server 1.13.3 created:\n{}",
        differences.join("\n")
    );
    project.cleanup().await;
    store.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spire_ddl_matches_the_project_on_sqlite() {
    spire_ddl_matches_the_project(Engine::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spire_ddl_matches_the_project_on_postgres() {
    spire_ddl_matches_the_project(Engine::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spire_ddl_matches_the_project_on_mariadb() {
    spire_ddl_matches_the_project(Engine::Mysql).await;
}

// ------------------------------------------------ item 6: disaster recovery

/// What `populate` leaves running: the join-token agent and the workload
/// entry whose selector matches this test process.
struct Deployment {
    agent: SpireAgent,
    workload_id: String,
}

const ALIAS: &str = "spiffe://example.org/node/agent-1";
const FEDERATED: &str = "spiffe://federated.test";

/// Makes a serving deployment of `server`: a federated bundle, a join-token
/// agent (alias `spiffe://example.org/node/agent-1`, which SPIRE creates), 30
/// entries under that alias with selectors, DNS names, admin/downstream flags,
/// TTLs and federation; the agent is started and has fetched an SVID.
fn populate(server: &SpireServer, dir: &Path) -> Deployment {
    // A federated trust domain's bundle (any valid CA will do: the server's own).
    let pem_path = dir.join("federated.pem");
    std::fs::write(&pem_path, server.bundle_pem()).unwrap();
    server.cli(&[
        "bundle",
        "set",
        "-id",
        FEDERATED,
        "-format",
        "pem",
        "-path",
        pem_path.to_str().unwrap(),
    ]);
    // The join token makes SPIRE create the alias entry for the agent.
    let token = server.join_token(ALIAS);
    let uid = spire::current_uid();
    let workload_id = "spiffe://example.org/workload/0".to_string();
    for n in 0..30 {
        let spiffe_id = format!("spiffe://example.org/workload/{n}");
        let selector = if n == 0 {
            format!("unix:uid:{uid}")
        } else {
            format!("unix:uid:{}", 20_000 + n)
        };
        let dns = format!("w{n}.svc.example.org");
        let mut args = vec![
            "entry",
            "create",
            "-parentID",
            ALIAS,
            "-spiffeID",
            &spiffe_id,
            "-selector",
            &selector,
            "-selector",
            "unix:gid:0",
        ];
        if n % 3 == 0 {
            args.extend(["-dns", &dns]);
        }
        if n % 5 == 1 {
            args.extend(["-federatesWith", FEDERATED]);
        }
        if n == 7 {
            args.push("-admin");
        }
        if n == 8 {
            args.push("-downstream");
        }
        if n % 4 == 2 {
            args.extend(["-x509SVIDTTL", "1800"]);
        }
        server.cli(&args);
    }
    let mut agent = SpireAgent::new(server, &dir.join("agent-1"), &token);
    agent.start();
    agent
        .wait_for_svid(&workload_id, Duration::from_secs(60))
        .unwrap();
    Deployment { agent, workload_id }
}

async fn disaster_recovery(engine: Engine) {
    let Some(bin) = spire::spire_bin_dir() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let Some(store) = SpireDatastore::create(engine, dir.path(), "spire_dr").await else {
        return;
    };
    let mut server = SpireServer::new(&bin, &dir.path().join("server"), store.server_options());
    server.start();
    let Deployment {
        mut agent,
        workload_id,
    } = populate(&server, dir.path());
    let before = server.state();
    assert_eq!(before.entries.len(), 31, "30 entries and the alias");
    assert_eq!(before.agents.len(), 1);
    assert_eq!(before.bundles.len(), 1, "the federated bundle");

    // The real server's CA journal and keys.json agree, and inspect decodes
    // the journal: without the keys file it names the keys it lacks.
    let config = server.config.to_str().unwrap().to_string();
    let inspect = |what: &str| -> serde_json::Value {
        let out = spirekeep_ok(&["--json", "inspect", "--spire-config", &config]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{what}: {e}: {out}"))
    };
    let warnings = inspect("with keys")["warnings"].clone();
    assert!(
        warnings.as_array().is_none_or(Vec::is_empty),
        "{engine}: {warnings}"
    );
    let keys = server.dir.join("data/keys.json");
    let aside = server.dir.join("keys.json.aside");
    std::fs::rename(&keys, &aside).unwrap();
    let warnings = inspect("without keys")["warnings"].to_string();
    std::fs::rename(&aside, &keys).unwrap();
    assert!(
        warnings.contains("names keys that") && warnings.contains("x509-CA-"),
        "{engine}: {warnings}"
    );

    // Back up from the server's own server.conf while it serves, encrypted:
    // the snapshot also holds the server's data dir (keys.json: the CA keys).
    let repo = file_repo(dir.path());
    let identity = dir.path().join("identity.txt");
    let identity = identity.to_str().unwrap();
    let keygen = spirekeep_ok(&["keygen", "--output", identity]);
    let recipient = keygen
        .split_whitespace()
        .find(|w| w.starts_with("age1"))
        .expect("keygen prints the public key")
        .to_string();
    spirekeep_ok(&[
        "backup",
        "--spire-config",
        &config,
        "--recipient",
        &recipient,
        "--repo",
        &repo,
    ]);

    // Disaster: everything stops, the datastore is gone, and so is the
    // server's data dir with its CA keys.
    agent.stop();
    server.stop();
    store.destroy().await;
    let data_dir = server.dir.join("data");
    std::fs::remove_dir_all(&data_dir).unwrap();
    std::fs::create_dir_all(&data_dir).unwrap();

    spirekeep_ok(&[
        "restore",
        "latest",
        "--spire-config",
        &config,
        "--repo",
        &repo,
        "--identity",
        identity,
        "--server-files",
    ]);
    assert!(
        data_dir.join("keys.json").exists(),
        "{engine}: the keys file was not restored"
    );
    server.start();
    let after = server.state();
    assert_eq!(
        before.entries, after.entries,
        "{engine}: entries differ after the restore"
    );
    assert_eq!(before.agents, after.agents, "{engine}: agents differ");
    assert_eq!(before.bundles, after.bundles, "{engine}: bundles differ");
    // With its keys back, the server kept its CA: no new root was minted.
    assert_eq!(
        before.own_bundle,
        after.own_bundle,
        "{engine}: the own trust domain's bundle differs (a new CA?)\nserver log:\n{}",
        server.log()
    );

    // The agent, restarted with the SVID it had, is accepted and serves workloads.
    agent.start();
    agent
        .wait_for_svid(&workload_id, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{engine}: {e}\nserver log:\n{}", server.log()));
    agent.stop();
    server.stop();

    if engine == Engine::Sqlite {
        // Across engines: the SQLite snapshot into PostgreSQL and MariaDB, and
        // a server configured for each serves the same identities.
        for target_engine in [Engine::Postgres, Engine::Mysql] {
            let Some(target) =
                SpireDatastore::create(target_engine, dir.path(), "spire_dr_target").await
            else {
                continue;
            };
            let mut args = vec![
                "restore",
                "latest",
                "--datastore",
                target.spirekeep_url.as_str(),
                "--repo",
                repo.as_str(),
                "--identity",
                identity,
            ];
            if target_engine == Engine::Mysql {
                // SPIRE's sub-second times do not fit MySQL's DATETIME: the preflight says so.
                args.push("--accept-changes");
            }
            spirekeep_ok(&args);
            server.options = target.server_options();
            server.write_config();
            server.start();
            let moved = server.state();
            assert_eq!(
                before.entries, moved.entries,
                "SQLite -> {target_engine}: entries differ"
            );
            assert_eq!(
                before.agents, moved.agents,
                "SQLite -> {target_engine}: agents differ"
            );
            assert_eq!(
                before.bundles, moved.bundles,
                "SQLite -> {target_engine}: bundles differ"
            );
            agent.start();
            agent
                .wait_for_svid(&workload_id, Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("SQLite -> {target_engine}: {e}"));
            agent.stop();
            server.stop();
            target.cleanup().await;
        }
    }
    store.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaster_recovery_on_sqlite_and_across_engines() {
    disaster_recovery(Engine::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaster_recovery_on_postgres() {
    disaster_recovery(Engine::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaster_recovery_on_mariadb() {
    disaster_recovery(Engine::Mysql).await;
}

// --------------------------------------- item 7: the impact report is right

/// Waits until the server lists `agent_id` with a serial other than `serial`.
fn wait_for_rotation(server: &SpireServer, agent_id: &str, serial: &str, limit: Duration) {
    let started = Instant::now();
    while started.elapsed() < limit {
        if agent_serial(server, agent_id).is_some_and(|s| s != serial) {
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("agent {agent_id} did not rotate its SVID within {limit:?}");
}

/// The serial number the server holds for an agent.
fn agent_serial(server: &SpireServer, agent_id: &str) -> Option<String> {
    let path = agent_id.trim_start_matches("spiffe://example.org");
    server
        .state()
        .agents
        .iter()
        .find(|a| a["id"]["path"].as_str() == Some(path))
        .map(|a| a["x509svid_serial_number"].to_string())
}

async fn impact_report_names_the_rejected_agents(engine: Engine) {
    let Some(bin) = spire::spire_bin_dir() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let Some(store) = SpireDatastore::create(engine, dir.path(), "spire_impact").await else {
        return;
    };
    let mut options = store.server_options();
    // Agents rotate at half their SVID's life: about 30 s after attesting.
    options.agent_ttl = Some("60s".into());
    let mut server = SpireServer::new(&bin, &dir.path().join("server"), options);
    server.start();
    let mut agents: Vec<SpireAgent> = ["steady", "rotates", "new"]
        .iter()
        .map(|name| {
            let token = server.join_token(&format!("spiffe://example.org/node/{name}"));
            SpireAgent::new(&server, &dir.path().join(name), &token)
        })
        .collect();
    agents[0].start();
    agents[1].start();
    let rotating_id = agents[1].spiffe_id();
    let serial_at_backup = agent_serial(&server, &rotating_id).expect("agent listed");

    let repo = file_repo(dir.path());
    let config = server.config.to_str().unwrap().to_string();
    spirekeep_ok(&[
        "backup",
        "--spire-config",
        &config,
        "--server-files-in-clear",
        "--repo",
        &repo,
    ]);
    // "steady" keeps the SVID it had at the backup: it is stopped until the restore.
    agents[0].stop();
    // "rotates" rotates its SVID after the backup; "new" attests after it.
    wait_for_rotation(
        &server,
        &rotating_id,
        &serial_at_backup,
        Duration::from_secs(75),
    );
    agents[2].start();

    // What spirekeep says the restore will do.
    let out = spirekeep(
        &[
            "--json",
            "restore",
            "latest",
            "--replace",
            "--dry-run",
            "--spire-config",
            &config,
            "--repo",
            &repo,
        ],
        &[],
    );
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("dry run: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    let agents_impact =
        find_key(&plan, "agents").unwrap_or_else(|| panic!("no agent impact in {plan}"));
    let mut predicted: Vec<String> = agents_impact["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    predicted.sort();
    assert_eq!(agents_impact["attested_since"], 1, "{agents_impact}");
    assert_eq!(agents_impact["rotated_since"], 1, "{agents_impact}");

    // Reality: stop everything, restore, start the server, then each agent.
    for a in &mut agents {
        a.stop();
    }
    server.stop();
    spirekeep_ok(&[
        "restore",
        "latest",
        "--replace",
        "--spire-config",
        &config,
        "--repo",
        &repo,
    ]);
    server.start();
    let mut rejected = Vec::new();
    let mut table =
        String::from("agent                                             predicted  real\n");
    for a in &mut agents {
        let id = a.spiffe_id();
        let accepted = match a.try_start() {
            Ok(()) => !a.wait_exit(Duration::from_secs(10)),
            Err(_) => false,
        };
        let said_reattest = a.log().contains("Agent needs to re-attest");
        if !accepted {
            assert!(
                said_reattest,
                "{id} stopped for another reason:\n{}",
                a.log()
            );
            rejected.push(id.clone());
        }
        table.push_str(&format!(
            "{id:82} {:9}  {}\n",
            if predicted.contains(&id) {
                "re-attest"
            } else {
                "ok"
            },
            if accepted { "accepted" } else { "rejected" }
        ));
        a.stop();
    }
    eprintln!("{engine}: impact report against the real server\n{table}");
    rejected.sort();
    assert_eq!(
        predicted, rejected,
        "{engine}: the agents restore said must re-attest are not the ones SPIRE rejected\n{table}"
    );
    server.stop();
    store.cleanup().await;
}

/// The first object under `key` anywhere in `v`.
fn find_key<'a>(v: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    match v {
        serde_json::Value::Object(map) => map
            .get(key)
            .filter(|x| x.is_object())
            .or_else(|| map.values().find_map(|x| find_key(x, key))),
        serde_json::Value::Array(items) => items.iter().find_map(|x| find_key(x, key)),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impact_report_names_the_rejected_agents_on_sqlite() {
    impact_report_names_the_rejected_agents(Engine::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impact_report_names_the_rejected_agents_on_postgres() {
    impact_report_names_the_rejected_agents(Engine::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impact_report_names_the_rejected_agents_on_mariadb() {
    impact_report_names_the_rejected_agents(Engine::Mysql).await;
}

// -------------------------------------------- item 8: check against reality

/// A datastore at an older or newer schema, as the project's DDL and
/// generator make it (schemas 21 and 22 are schema 23 without the tables
/// those releases lacked).
async fn datastore_at(
    engine: Engine,
    dir: &Path,
    schema: u32,
    code_version: &str,
) -> Option<SpireDatastore> {
    let store = SpireDatastore::create(engine, dir, "spire_check").await?;
    let ds = store.open().await;
    let population = Population {
        entries: 20,
        seed: 11,
        schema: schema.max(23),
        code_version: code_version.to_string(),
        subsecond: engine != Engine::Mysql,
        ..Population::default()
    };
    create_spire_datastore(ds.as_ref(), &population)
        .await
        .unwrap();
    let mut script = String::new();
    if schema <= 22 {
        script.push_str("DROP TABLE ca_journals;\n");
    }
    if schema <= 21 {
        script.push_str(
            "DROP TABLE attested_node_entries_events;\nDROP TABLE registered_entries_events;\n",
        );
    }
    if schema < 23 {
        script.push_str(&format!("UPDATE migrations SET version = {schema};\n"));
    }
    if schema >= 24 {
        // Agents within SPIRE's skew of 1.13.3, so the verdict is about the datastore alone.
        script.push_str("UPDATE attested_node_entries SET agent_version = '1.13.3';\n");
    }
    if !script.is_empty() {
        ds.execute_script(&script).await.unwrap();
    }
    ds.close().await;
    Some(store)
}

struct CheckCase {
    schema: u32,
    code_version: &'static str,
    disable_migration: bool,
}

async fn check_agrees_with_spire(engine: Engine) {
    let Some(bin) = spire::spire_bin_dir() else {
        return;
    };
    let cases = [
        (21, "1.7.1", false),
        (22, "1.7.6", false),
        (22, "1.7.6", true),
        (23, "1.12.6", false),
        (23, "1.12.6", true),
        (23, "1.14.2", false),
        (24, "1.14.7", false),
        (24, "1.14.7", true),
        (25, "1.15.3", false),
    ]
    .map(|(schema, code_version, disable_migration)| CheckCase {
        schema,
        code_version,
        disable_migration,
    });
    let mut table = format!(
        "{engine}: check --target 1.13.3 against spire-server 1.13.3\n\
         schema  code_version  disable_migration  check        spire-server 1.13.3                                        agree\n"
    );
    let mut disagreements = Vec::new();
    for case in &cases {
        let dir = tempfile::tempdir().unwrap();
        let Some(store) = datastore_at(engine, dir.path(), case.schema, case.code_version).await
        else {
            return;
        };
        let mut options = store.server_options();
        options.disable_migration = case.disable_migration;
        let mut server = SpireServer::new(&bin, dir.path(), options);
        let out = spirekeep(
            &[
                "--json",
                "check",
                "--target",
                "1.13.3",
                // SPIRE's start-up does not look at agents; give check agents
                // within skew so its verdict is about the datastore alone.
                "--agent-version",
                "1.13.3",
                "--spire-config",
                server.config.to_str().unwrap(),
            ],
            &[],
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "check --json: {e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        let verdict = report["verdict"].as_str().unwrap_or("?").to_string();
        let started = server.try_start();
        let spire_result = match &started {
            Ok(()) => {
                let ds = store.open().await;
                let cat = ds.catalogue().await.unwrap();
                let row = spirekeep::inspect::read_migrations(ds.as_ref(), &cat)
                    .await
                    .unwrap()
                    .0
                    .unwrap();
                ds.close().await;
                format!("serves ({},{})", row.schema_version, row.code_version)
            }
            Err(log) => spire_refusal(log),
        };
        server.stop();
        // Deployable directly means SPIRE 1.13.3 starts and serves on it.
        let agree = (verdict == "ok") == started.is_ok();
        table.push_str(&format!(
            "{:<7} {:<13} {:<18} {:<12} {:<58} {}\n",
            case.schema,
            case.code_version,
            case.disable_migration,
            verdict,
            spire_result,
            if agree { "yes" } else { "NO" }
        ));
        if !agree {
            disagreements.push(format!(
                "schema {} ({}), disable_migration {}: check says {verdict}, SPIRE {spire_result}",
                case.schema, case.code_version, case.disable_migration
            ));
        }
        store.cleanup().await;
    }
    eprintln!("{table}");
    assert!(
        disagreements.is_empty(),
        "check disagrees with SPIRE:\n{}\n{table}",
        disagreements.join("\n")
    );
}

/// SPIRE's own words for why it refused to start.
fn spire_refusal(log: &str) -> String {
    for known in [
        "requires a previous SPIRE release",
        "auto-migration must be enabled",
        "incompatible DB schema and code version",
        "no migration support for unknown schema version",
    ] {
        if log.contains(known) {
            return format!("refuses: {known}");
        }
    }
    format!("refuses (unexpected): {}", log.lines().last().unwrap_or(""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_agrees_with_spire_on_sqlite() {
    check_agrees_with_spire(Engine::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_agrees_with_spire_on_postgres() {
    check_agrees_with_spire(Engine::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_agrees_with_spire_on_mariadb() {
    check_agrees_with_spire(Engine::Mysql).await;
}

// ------------------------------------------------ item 11: SPIRE's metrics

/// Metric names in PromQL expressions of a rule file or plan (anything that
/// looks like `spire_server_…`/`spire_agent_…`), with the line they are on
/// and the nearest `#` comment block above it.
fn spire_metric_names(text: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut comment = String::new();
    let mut in_comment = false;
    for line in text.lines() {
        if line.trim_start().starts_with('#') {
            if !in_comment {
                comment.clear();
            }
            comment.push_str(line);
            comment.push(' ');
            in_comment = true;
            continue;
        }
        in_comment = false;
        let mut rest = line;
        while let Some(at) = rest.find("spire_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            let name = &tail[..end];
            let preceded_ok = at == 0
                || !rest.as_bytes()[at - 1].is_ascii_alphanumeric()
                    && rest.as_bytes()[at - 1] != b'_';
            // A bare prefix (`spire_server_` in a comment) names no metric.
            if preceded_ok
                && !name.ends_with('_')
                && (name.starts_with("spire_server_") || name.starts_with("spire_agent_"))
            {
                out.push((name.to_string(), line.to_string(), comment.clone()));
            }
            rest = &tail[end..];
        }
    }
    out
}

/// The base names a scrape exposes (summaries also as `_sum`/`_count`).
fn scraped_names(scrape: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for line in scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = line.split(['{', ' ']).next().unwrap_or("");
        names.insert(name.to_string());
        for suffix in ["_sum", "_count", "_bucket"] {
            if let Some(base) = name.strip_suffix(suffix) {
                names.insert(base.to_string());
            }
        }
    }
    names
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_rules_and_gates_use_metrics_a_real_spire_exports() {
    let Some(bin) = spire::spire_bin_dir() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = SpireDatastore::create(Engine::Sqlite, dir.path(), "metrics")
        .await
        .unwrap();
    let mut options = store.server_options();
    // A short agent SVID life makes the agent rotate (and the server renew)
    // within the test, so the rotation series exist.
    options.agent_ttl = Some("20s".into());
    let mut server = SpireServer::new(&bin, &dir.path().join("server"), options);
    server.start();
    let Deployment {
        mut agent,
        workload_id,
    } = populate(&server, dir.path());
    agent
        .wait_for_svid(&workload_id, Duration::from_secs(30))
        .unwrap();
    let started = Instant::now();
    while !agent.scrape().contains("spire_agent_agent_svid_rotate{")
        && started.elapsed() < Duration::from_secs(60)
    {
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut scraped = scraped_names(&server.scrape());
    scraped.extend(scraped_names(&agent.scrape()));
    agent.stop();
    server.stop();
    assert!(
        scraped.contains("spire_server_started") && scraped.contains("spire_agent_started"),
        "the scrape lacks SPIRE's started gauges: {scraped:?}"
    );

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    files_under(&root.join("deploy"), &mut files);
    files_under(&root.join("plans"), &mut files);
    let mut missing = Vec::new();
    let mut checked = 0;
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for (name, line, comment) in spire_metric_names(&text) {
            checked += 1;
            // A name that needs a SPIRE setting the test fleet lacks (the
            // events-based cache, say) or an event the test does not cause
            // must say so on its line or in the comment above it.
            let says_why = |t: &str| {
                t.contains("needs ")
                    || t.contains("only with")
                    || t.contains("only when")
                    || t.contains("events-based cache")
            };
            let documented = says_why(&line) || says_why(&comment);
            if !scraped.contains(&name) && !documented {
                missing.push(format!(
                    "{}: {name}",
                    file.strip_prefix(root).unwrap().display()
                ));
            }
        }
    }
    missing.sort();
    missing.dedup();
    assert!(
        checked > 0,
        "no SPIRE metric names found under deploy/ and plans/"
    );
    assert!(
        missing.is_empty(),
        "metric names used by rules, dashboards or plans that a real SPIRE 1.13.3 does not export:\n{}\n\
         scraped: {scraped:?}",
        missing.join("\n")
    );
    store.cleanup().await;
}

// ---------------------------------------------- item 9: upgrade rehearsal

async fn rehearsal(engine: Engine) {
    let Some(bin) = spire::spire_bin_dir() else {
        return;
    };
    let spire_server = bin.join("spire-server");
    let mut rows = String::new();
    for (schema, code_version, accepted) in [(23, "1.12.6", true), (22, "1.7.6", false)] {
        let dir = tempfile::tempdir().unwrap();
        let Some(store) = datastore_at(Engine::Sqlite, dir.path(), schema, code_version).await
        else {
            return;
        };
        let repo = file_repo(dir.path());
        spirekeep_ok(&[
            "backup",
            "--datastore",
            &store.spirekeep_url,
            "--repo",
            &repo,
        ]);
        // The scratch: a temporary SQLite file, or an empty database in SPIRE's own form.
        let scratch = match engine {
            Engine::Sqlite => None,
            _ => Some(
                SpireDatastore::create(engine, dir.path(), "rehearsal_scratch")
                    .await
                    .unwrap(),
            ),
        };
        let mut args = vec![
            "--json",
            "verify",
            "--rehearse",
            "--spire-server",
            spire_server.to_str().unwrap(),
            "--repo",
            repo.as_str(),
        ];
        if let Some(s) = &scratch {
            args.extend(["--scratch", s.connection_string.as_str()]);
        }
        let out = spirekeep(&args, &[]);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "rehearse --json: {e}: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        rows.push_str(&format!("{engine} schema {schema}: {report}\n"));
        assert_eq!(report["accepted"], accepted, "{report}");
        assert_eq!(out.status.code(), Some(if accepted { 0 } else { 1 }));
        assert_eq!(report["schema_before"]["schema_version"], schema);
        if accepted {
            // 1.13.3 stores its own (higher) code version; the schema stays 23.
            assert_eq!(report["schema_after"]["schema_version"], 23);
            assert_eq!(report["schema_after"]["code_version"], "1.13.3");
        } else {
            let error = report["spire_error"].as_str().unwrap_or("");
            assert!(
                error.contains("requires a previous SPIRE release"),
                "SPIRE's own error is reported: {report}"
            );
            assert_eq!(report["schema_after"]["schema_version"], schema);
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("refuses snapshot"),
                "one-line error"
            );
        }
        assert!(
            report["spire_version"]
                .as_str()
                .unwrap_or("")
                .contains("1.13.3"),
            "{report}"
        );
        // The scratch is left empty again.
        if let Some(s) = scratch {
            let ds = s.open().await;
            let cat = ds.catalogue().await.unwrap();
            ds.close().await;
            assert!(cat.tables.is_empty(), "scratch not emptied: {cat:?}");
            s.cleanup().await;
        }
        store.cleanup().await;
    }
    eprintln!("{rows}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rehearsal_in_a_temporary_sqlite_file() {
    rehearsal(Engine::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rehearsal_in_a_postgres_scratch_database() {
    rehearsal(Engine::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rehearsal_in_a_mariadb_scratch_database() {
    rehearsal(Engine::Mysql).await;
}

// ------------------------------ item 10: rollback with real SPIRE processes

/// Runs `member.sh FLEET stop` for every member when dropped.
struct FleetGuard {
    fleet: PathBuf,
    members: Vec<&'static str>,
}

const MEMBER_SH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/spire/member.sh");

impl FleetGuard {
    fn act(&self, action: &str, name: &str) -> std::process::Output {
        spire::run(
            std::process::Command::new("sh")
                .arg(MEMBER_SH)
                .arg(&self.fleet)
                .args([action, name]),
            Duration::from_secs(90),
        )
    }
}

impl Drop for FleetGuard {
    fn drop(&mut self) {
        for m in &self.members {
            let _ = self.act("stop", m);
        }
    }
}

fn member_dir(fleet: &Path, name: &str, cmd: &str, health: &str) {
    let dir = fleet.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cmd"), cmd).unwrap();
    std::fs::write(dir.join("health"), health).unwrap();
    std::fs::write(dir.join("version"), "1.13.3\n").unwrap();
}

async fn failed_upgrade_rolls_back_real_spire(engine: Engine) {
    let Some(bin) = spire::spire_bin_dir() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let Some(store) = SpireDatastore::create(engine, dir.path(), "spire_rollback").await else {
        return;
    };
    let mut server = SpireServer::new(&bin, &dir.path().join("server"), store.server_options());
    server.start();
    let Deployment {
        mut agent,
        workload_id,
    } = populate(&server, dir.path());
    let before = server.state();
    agent.stop();
    server.stop();

    // The same processes, now run by the plan's executor as services.
    let fleet = dir.path().join("fleet");
    let server_bin = bin.join("spire-server");
    let agent_bin = bin.join("spire-agent");
    member_dir(
        &fleet,
        "server-1",
        &format!(
            "{} run -config {}",
            server_bin.display(),
            server.config.display()
        ),
        &format!(
            "{} healthcheck -socketPath {}",
            server_bin.display(),
            server.socket.display()
        ),
    );
    member_dir(
        &fleet,
        "agent-1",
        &format!(
            "{} run -config {} -joinToken {}",
            agent_bin.display(),
            agent.config.display(),
            agent.join_token
        ),
        &format!(
            "{} healthcheck -socketPath {}",
            agent_bin.display(),
            agent.socket.display()
        ),
    );
    let guard = FleetGuard {
        fleet: fleet.clone(),
        members: vec!["agent-1", "server-1"],
    };
    for m in ["server-1", "agent-1"] {
        let out = guard.act("start", m);
        assert!(
            out.status.success(),
            "{m}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let member = |action: &str| format!("sh {MEMBER_SH} {} {action}", fleet.display());
    let plan = format!(
        r#"format = 1
name = "real-spire-rollback"
target = "1.14.7"

[datastore]
connection_string_env = "REAL_SPIRE_DATASTORE"

[repository]
url = "file://{repo}"

[executor]
kind = "command"
timeout = "2m"

[executor.commands]
version = "{version} {{name}}"
upgrade = "{upgrade} {{name}} {{version}}"
rollback = "{rollback} {{name}} {{version}}"
stop = "{stop} {{name}}"
start = "{start} {{name}}"

[servers]
members = [{{ name = "server-1" }}]

# The server step also writes to the datastore (as a migration would); the
# restore must take it away again.
[servers.commands]
upgrade = "{upgrade} {{name}} {{version}} && {server_bin} entry create -socketPath {socket} -parentID spiffe://example.org/node/agent-1 -spiffeID spiffe://example.org/written-during-the-upgrade -selector unix:uid:4242 > {fleet}/written-during-the-upgrade"

[[servers.health]]
kind = "command"
command = "{server_bin} healthcheck -socketPath {socket}"
timeout = "10s"
interval = "500ms"
retries = 20

# Fails on purpose once the server reports the new release.
[[servers.health]]
kind = "command"
command = "test \"$(cat {fleet}/server-1/version)\" != 1.14.7"
timeout = "5s"
interval = "200ms"
retries = 1

# Before the first hop, the release itself must accept the pre-upgrade
# snapshot (the test has one release; a real plan names each hop's binary).
[rehearsal]
spire_server = "{rehearsal_bin}"

[[agents]]
name = "nodes"
batch = 1
members = [{{ name = "agent-1" }}]

[[agents.health]]
kind = "command"
command = "{agent_bin} healthcheck -socketPath {agent_socket}"
timeout = "10s"
interval = "500ms"
retries = 20
"#,
        repo = dir.path().join("repo").display(),
        version = member("version"),
        upgrade = member("upgrade"),
        rollback = member("rollback"),
        stop = member("stop"),
        start = member("start"),
        server_bin = server_bin.display(),
        socket = server.socket.display(),
        fleet = fleet.display(),
        agent_bin = agent_bin.display(),
        agent_socket = agent.socket.display(),
        rehearsal_bin = server_bin.display(),
    );
    let plan_path = dir.path().join("plan.toml");
    std::fs::write(&plan_path, plan).unwrap();
    let saved = dir.path().join("plan.json");
    let env = [("REAL_SPIRE_DATASTORE", store.spirekeep_url.as_str())];
    let out = spirekeep(
        &[
            "plan",
            plan_path.to_str().unwrap(),
            "--out",
            saved.to_str().unwrap(),
        ],
        &env,
    );
    assert!(
        out.status.success(),
        "plan: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = spirekeep(&["apply", saved.to_str().unwrap()], &env);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "{engine}: apply must fail the gate and roll back (exit 3):\n{text}"
    );
    eprintln!("{engine}: apply said:\n{text}");
    // The step itself ran (SPIRE wrote the entry) and the gate is what failed.
    let written =
        std::fs::read_to_string(fleet.join("written-during-the-upgrade")).unwrap_or_default();
    assert!(
        written.contains("Entry ID") && written.contains("written-during-the-upgrade"),
        "the upgrade step never wrote its entry: {written:?}\n{text}"
    );
    assert!(
        text.contains("gate command"),
        "the deliberate gate failed:\n{text}"
    );
    assert!(
        text.contains("accepts the snapshot"),
        "the plan's rehearsal ran before the first hop:\n{text}"
    );

    if engine == Engine::Sqlite {
        // A release that cannot run the data stops the plan before anything changes (exit 8).
        let refused_plan = std::fs::read_to_string(&plan_path).unwrap().replace(
            &format!("spire_server = \"{}\"", server_bin.display()),
            "spire_server = \"/nonexistent/spire-{version}/spire-server\"",
        );
        let refused_path = dir.path().join("refused.toml");
        std::fs::write(&refused_path, refused_plan).unwrap();
        let refused_saved = dir.path().join("refused.json");
        let out = spirekeep(
            &[
                "plan",
                refused_path.to_str().unwrap(),
                "--out",
                refused_saved.to_str().unwrap(),
            ],
            &env,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let entries_before = server.state().entries;
        let out = spirekeep(&["apply", refused_saved.to_str().unwrap()], &env);
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            out.status.code(),
            Some(8),
            "a failed rehearsal refuses the plan:\n{said}"
        );
        assert!(
            said.contains("/nonexistent/spire-1.14.7/spire-server"),
            "{said}"
        );
        assert_eq!(server.state().entries, entries_before, "nothing changed");
        let version = std::fs::read_to_string(fleet.join("server-1").join("version")).unwrap();
        assert_eq!(version.trim(), "1.13.3");
    }

    // Everything is back: the real server serves exactly what it did before
    // the upgrade, and the agent still gets its SVID.
    let after = server.state();
    assert_eq!(
        before.entries, after.entries,
        "{engine}: entries after the rollback differ (the upgrade's write must be gone)\n{text}"
    );
    assert_eq!(before.agents.len(), after.agents.len(), "{engine}: agents");
    assert_eq!(before.bundles, after.bundles, "{engine}: bundles");
    agent
        .wait_for_svid(&workload_id, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{engine}: after the rollback: {e}"));
    let version = std::fs::read_to_string(fleet.join("server-1").join("version")).unwrap();
    assert_eq!(
        version.trim(),
        "1.13.3",
        "the server is back at its release"
    );
    drop(guard);
    store.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_upgrade_rolls_back_real_spire_on_sqlite() {
    failed_upgrade_rolls_back_real_spire(Engine::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_upgrade_rolls_back_real_spire_on_postgres() {
    failed_upgrade_rolls_back_real_spire(Engine::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_upgrade_rolls_back_real_spire_on_mariadb() {
    failed_upgrade_rolls_back_real_spire(Engine::Mysql).await;
}
