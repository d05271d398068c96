//! The harness of the staged-upgrade tests: a stand-in SPIRE fleet
//! (`spire-standin` driven by `tests/standin/fleet.sh`) on a real datastore,
//! plan files written for it, and readers for the journal and the fleet logs.
//! Every member process is killed when the test ends, pass or fail.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use spirekeep::datastore::testkit::{Population, TestDatabase, create_spire_datastore};
use spirekeep::datastore::{self, Datastore, Engine, OpenMode, dsn};
use spirekeep::inspect::read_migrations;

pub const STANDIN: &str = env!("CARGO_BIN_EXE_spire-standin");
pub const SPIREKEEP: &str = env!("CARGO_BIN_EXE_spirekeep");
pub const FLEET_SH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/standin/fleet.sh");

/// A member of the fleet.
#[derive(Debug, Clone)]
pub struct MemberSpec {
    pub name: String,
    pub port: u16,
}

/// A datastore for the fleet: a SQLite file or a database on the test server.
pub struct Store {
    pub engine: Engine,
    /// As SPIRE (and spirekeep) take it.
    pub conn: String,
    db: Option<TestDatabase>,
}

impl Store {
    /// A datastore at schema `schema` written by `code_version`, with a small
    /// generated population; `None` when the engine's server is absent (and
    /// services are not required).
    pub async fn create(
        engine: Engine,
        dir: &Path,
        schema: u32,
        code_version: &str,
    ) -> Option<Self> {
        let (conn, db) = match engine {
            Engine::Sqlite => (dir.join("datastore.sqlite3").display().to_string(), None),
            _ => {
                let db = TestDatabase::create_or_skip(engine, "upgrade")
                    .await
                    .unwrap()?;
                (spire_dsn(&db), Some(db))
            }
        };
        let store = Self { engine, conn, db };
        let spec = dsn::parse(&store.conn, Some(engine), Path::new("/")).unwrap();
        let ds = datastore::open(&spec, OpenMode::Create).await.unwrap();
        let pop = Population {
            entries: 40,
            seed: 7,
            schema,
            code_version: code_version.into(),
            subsecond: engine != Engine::Mysql,
            ..Population::default()
        };
        create_spire_datastore(ds.as_ref(), &pop).await.unwrap();
        ds.close().await;
        Some(store)
    }

    pub async fn open(&self) -> Box<dyn Datastore> {
        let spec = dsn::parse(&self.conn, Some(self.engine), Path::new("/")).unwrap();
        datastore::open(&spec, OpenMode::ReadWrite).await.unwrap()
    }

    /// (schema, code_version).
    pub async fn row(&self) -> (i64, String) {
        let ds = self.open().await;
        let cat = ds.catalogue().await.unwrap();
        let row = read_migrations(ds.as_ref(), &cat).await.unwrap().0.unwrap();
        ds.close().await;
        (row.schema_version, row.code_version)
    }

    pub async fn cleanup(self) {
        if let Some(db) = self.db {
            db.cleanup().await.unwrap();
        }
    }
}

/// SPIRE-style connection strings for a test database.
pub fn spire_dsn(db: &TestDatabase) -> String {
    let url = url::Url::parse(db.url()).unwrap();
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .unwrap()
            .into_owned()
    };
    let user = decode(url.username());
    let password = decode(url.password().unwrap_or_default());
    let host = url.host_str().unwrap().to_string();
    let name = url.path().trim_start_matches('/').to_string();
    match db.engine() {
        Engine::Postgres => {
            let q = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
            format!(
                "host={host} port={} user={} password={} dbname={} sslmode=disable",
                url.port().unwrap_or(5432),
                q(&user),
                q(&password),
                q(&name)
            )
        }
        Engine::Mysql => format!(
            "{user}:{password}@tcp({host}:{})/{name}?parseTime=true",
            url.port().unwrap_or(3306)
        ),
        Engine::Sqlite => unreachable!(),
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The fleet, a working directory for plans and journals, and the guard.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub work: tempfile::TempDir,
    pub servers: Vec<MemberSpec>,
    pub agents: Vec<MemberSpec>,
    pub conn: String,
    children: Vec<Child>,
}

impl Fleet {
    /// Members `server-1..` and `agent-1..`, all at `version`, not started.
    pub fn new(conn: &str, servers: usize, agents: usize, version: &str) -> Self {
        let mut f = Self {
            dir: tempfile::tempdir().unwrap(),
            work: tempfile::tempdir().unwrap(),
            servers: Vec::new(),
            agents: Vec::new(),
            conn: conn.into(),
            children: Vec::new(),
        };
        for i in 1..=servers {
            let m = MemberSpec {
                name: format!("server-{i}"),
                port: free_port(),
            };
            f.write_member(
                &m.name,
                "server",
                version,
                &[
                    "--datastore".into(),
                    conn.into(),
                    "--listen".into(),
                    format!("127.0.0.1:{}", m.port),
                    "--trust-domain".into(),
                    "example.org".into(),
                ],
            );
            f.servers.push(m);
        }
        let sp = f.servers[0].port;
        for i in 1..=agents {
            let m = MemberSpec {
                name: format!("agent-{i}"),
                port: free_port(),
            };
            f.write_member(
                &m.name,
                "agent",
                version,
                &[
                    "--server".into(),
                    format!("http://127.0.0.1:{sp}"),
                    "--spiffe-id".into(),
                    format!("spiffe://example.org/agent/{}", m.name),
                    "--listen".into(),
                    format!("127.0.0.1:{}", m.port),
                    "--attest-attempts".into(),
                    "3".into(),
                ],
            );
            f.agents.push(m);
        }
        f
    }

    fn write_member(&self, name: &str, role: &str, version: &str, args: &[String]) {
        let d = self.dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("version"), format!("{version}\n")).unwrap();
        std::fs::write(d.join("role"), format!("{role}\n")).unwrap();
        std::fs::write(d.join("args"), args.join("\n") + "\n").unwrap();
    }

    pub fn member_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn names(&self) -> Vec<String> {
        self.servers
            .iter()
            .chain(&self.agents)
            .map(|m| m.name.clone())
            .collect()
    }

    /// Runs `fleet.sh ARGS`, which must succeed.
    pub fn sh(&self, args: &[&str]) -> String {
        let out = Command::new("bash")
            .arg(FLEET_SH)
            .args(args)
            .env("STANDIN_FLEET_DIR", self.dir.path())
            .env("SPIRE_STANDIN_BIN", STANDIN)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "fleet.sh {args:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts every member, then waits until every agent has renewed its SVID
    /// at least once: a plan made before that would see an agent whose
    /// rotation counter has not moved yet and call it unhealthy.
    pub fn start_all(&self) {
        for n in self.names() {
            self.sh(&["start", &n]);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        for agent in &self.agents {
            while self.rotations_ok(agent.port) < 1.0 {
                assert!(
                    Instant::now() < deadline,
                    "{} has not renewed its SVID within 60 s of the fleet's start\n{}",
                    agent.name,
                    self.logs()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// `spire_agent_agent_svid_rotate{status="OK"}` of the agent on `port`
    /// (0 while it does not answer or has not rotated yet).
    pub fn rotations_ok(&self, port: u16) -> f64 {
        let Some((200, body)) = http_get(&format!("127.0.0.1:{port}"), "/metrics") else {
            return 0.0;
        };
        body.lines()
            .filter(|l| {
                l.starts_with("spire_agent_agent_svid_rotate{") && l.contains("status=\"OK\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Every member's log, for a failure message: a refused gate or a missing
    /// journal record is only diagnosable with what the members said.
    pub fn logs(&self) -> String {
        self.names()
            .iter()
            .map(|n| format!("==== log of {n} ====\n{}", self.log(n)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn version(&self, name: &str) -> String {
        self.sh(&["version", name]).trim().to_string()
    }

    pub fn versions(&self) -> Vec<(String, String)> {
        self.names()
            .into_iter()
            .map(|n| {
                let v = self.version(&n);
                (n, v)
            })
            .collect()
    }

    pub fn set_fault(&self, name: &str, file: &str, content: &str) {
        std::fs::write(self.member_dir(name).join(file), content).unwrap();
    }

    pub fn clear_fault(&self, name: &str, file: &str) {
        let _ = std::fs::remove_file(self.member_dir(name).join(file));
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.member_dir(name).join("log")).unwrap_or_default()
    }

    /// How many times fleet.sh started `name` at `version`.
    pub fn starts(&self, name: &str, version: &str) -> usize {
        let role = std::fs::read_to_string(self.member_dir(name).join("role")).unwrap();
        let needle = format!("---- fleet.sh: starting {name} ({} {version})", role.trim());
        self.log(name)
            .lines()
            .filter(|l| l.starts_with(&needle))
            .count()
    }

    /// Whether `/ready` of a member answers 200.
    pub fn ready(&self, port: u16) -> bool {
        matches!(
            http_get(&format!("127.0.0.1:{port}"), "/ready"),
            Some((200, _))
        )
    }

    /// A plan file for this fleet.
    pub fn plan_toml(&self, o: &PlanOpts) -> String {
        let members = |list: &[MemberSpec]| {
            list.iter()
                .map(|m| {
                    format!(
                        "{{ name = \"{}\", vars = {{ port = \"{}\" }} }}",
                        m.name, m.port
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let s3 = match &o.s3 {
            Some((endpoint, _)) => format!(
                "s3_endpoint = \"{endpoint}\"\ns3_path_style = true\ns3_allow_http = true\n"
            ),
            None => String::new(),
        };
        let text = r#"
format = 1
name = "@NAME@"
target = "@TARGET@"
order = "@ORDER@"
@EXTRA@

[datastore]
connection_string_env = "STANDIN_DATASTORE"

[repository]
url = "@REPO@"
@S3@
[executor]
kind = "command"
timeout = "90s"
@EXECUTOR_EXTRA@
[executor.env]
STANDIN_FLEET_DIR = "@FLEET@"
SPIRE_STANDIN_BIN = "@BIN@"
STANDIN_START_TIMEOUT = "30"

[executor.commands]
version = "@SH@ version {name}"
upgrade = "@SH@ upgrade {name} {version} && @SH@ start {name}"
rollback = "@SH@ rollback {name} {version}"
stop = "@SH@ stop {name}"
start = "@SH@ start {name}"
clock = "@SH@ clock {name}"

[servers]
members = [@SERVERS@]

[[servers.health]]
kind = "command"
command = "$SPIRE_STANDIN_BIN healthcheck --url http://127.0.0.1:{port}"
timeout = "5s"
interval = "300ms"
retries = 10

[[servers.health]]
kind = "http"
url = "http://127.0.0.1:{port}/ready"
timeout = "3s"
interval = "300ms"
retries = 10

[[servers.health]]
kind = "metric"
url = "http://127.0.0.1:{port}/metrics"
metric = "spire_server_started"
labels = { version = "{version}" }
condition = "== 1"
interval = "300ms"
retries = 5

[[agents]]
name = "nodes"
batch = @BATCH@
max_failure_ratio = @RATIO@
members = [@AGENTS@]

[[agents.health]]
kind = "http"
url = "http://127.0.0.1:{port}/ready"
timeout = "3s"
interval = "300ms"
retries = 15

[[agents.health]]
kind = "metric"
url = "http://127.0.0.1:{port}/metrics"
metric = "spire_agent_agent_svid_rotate"
labels = { status = "OK" }
condition = "increases"
window = "2500ms"
interval = "300ms"
retries = 4

[[post_checks]]
kind = "metric"
url = "http://127.0.0.1:@SP@/metrics"
metric = "spire_server_rpc_agent_v1_agent_attest_agent"
labels_not = { status = "OK" }
condition = "does_not_increase"
window = "1s"
retries = 1
"#;
        text.replace("@NAME@", &o.name)
            .replace("@TARGET@", &o.target)
            .replace("@ORDER@", &o.order)
            .replace("@REPO@", &o.repo)
            .replace("@S3@", &s3)
            .replace("@FLEET@", &self.dir.path().display().to_string())
            .replace("@BIN@", STANDIN)
            .replace("@SH@", FLEET_SH)
            .replace("@SERVERS@", &members(&self.servers))
            .replace("@AGENTS@", &members(&self.agents))
            .replace("@BATCH@", &o.batch)
            .replace("@RATIO@", &o.max_failure_ratio)
            .replace("@EXTRA@", &o.extra)
            .replace("@EXECUTOR_EXTRA@", &o.executor_extra)
            .replace("@SP@", &self.servers[0].port.to_string())
    }

    /// Writes the plan file and returns its path.
    pub fn write_plan(&self, o: &PlanOpts) -> PathBuf {
        let p = self.work.path().join("plan.toml");
        std::fs::write(&p, self.plan_toml(o)).unwrap();
        p
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    /// Runs spirekeep to completion.
    pub fn spirekeep(&self, args: &[&str]) -> Output {
        let out = self.command(args).output().unwrap();
        eprintln!(
            "$ spirekeep {} -> {}\n--- stdout\n{}--- stderr\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// A spirekeep command with the fleet's environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(SPIREKEEP);
        cmd.args(args).current_dir(self.work.path());
        for (key, _) in std::env::vars() {
            if key.starts_with("SPIREKEEP_") && !key.starts_with("SPIREKEEP_TEST_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("STANDIN_DATASTORE", &self.conn)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        cmd
    }

    /// Starts spirekeep in the background (killed by the guard).
    pub fn spawn(&mut self, args: &[&str]) -> usize {
        let child = self
            .command(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(child);
        self.children.len() - 1
    }

    pub fn kill(&mut self, i: usize) {
        let c = &mut self.children[i];
        let _ = c.kill(); // SIGKILL
        let _ = c.wait();
    }

    /// `plan plan.toml --out plan.json`, which must succeed.
    pub fn plan(&self, o: &PlanOpts) -> PathBuf {
        let toml = self.write_plan(o);
        let out_path = self.path("plan.json");
        let out = self.spirekeep(&[
            "plan",
            toml.to_str().unwrap(),
            "--out",
            out_path.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(0), "plan failed");
        out_path
    }

    /// `--json apply ARGS`: (exit code, report).
    pub fn apply(&self, extra: &[&str]) -> (i32, serde_json::Value) {
        let (code, report, _) = self.apply_full(extra);
        (code, report)
    }

    /// `--json apply ARGS`: (exit code, report, stderr).
    pub fn apply_full(&self, extra: &[&str]) -> (i32, serde_json::Value, String) {
        let plan = self.path("plan.json");
        let mut args = vec!["--json", "apply", plan.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = self.spirekeep(&args);
        let report = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        (
            out.status.code().unwrap_or(-1),
            report,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The journal records.
    pub fn journal(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.path("plan.journal.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Waits until the journal shows `event` for `step`.
    pub fn wait_journal(&self, event: &str, step: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self
                .journal()
                .iter()
                .any(|r| r["event"] == event && r["step"] == step)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no {event} for {step} within {timeout:?}: {:#?}\n{}",
                self.journal(),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A plain HTTP/1.1 GET: (status, body), `None` when nothing answers.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let status = raw.split(' ').nth(1)?.parse().ok()?;
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for name in self.names() {
            let d = self.member_dir(&name);
            let Ok(pid) = std::fs::read_to_string(d.join("pid")) else {
                continue;
            };
            let pid = pid.trim();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let dir = d.display().to_string();
            if cmdline.split(|b| *b == 0).any(|arg| arg == dir.as_bytes()) {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
    }
}

/// What to put in the plan file.
#[derive(Debug, Clone)]
pub struct PlanOpts {
    pub name: String,
    pub target: String,
    pub order: String,
    pub repo: String,
    pub s3: Option<(String, String)>,
    pub batch: String,
    /// `max_failure_ratio` of the agent group.
    pub max_failure_ratio: String,
    /// Top-level keys (before any table).
    pub extra: String,
    /// Keys of `[executor]`.
    pub executor_extra: String,
}

impl PlanOpts {
    pub fn new(target: &str, repo: &str) -> Self {
        Self {
            name: "t".into(),
            target: target.into(),
            order: "auto".into(),
            repo: repo.into(),
            s3: None,
            batch: "1".into(),
            max_failure_ratio: "0.0".into(),
            extra: String::new(),
            executor_extra: String::new(),
        }
    }
}

/// The S3 test server, if configured (`SPIREKEEP_TEST_REQUIRE_SERVICES=1`
/// makes its absence a failure).
pub fn s3_settings() -> Option<(String, String)> {
    let endpoint = std::env::var("SPIREKEEP_TEST_S3_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty());
    if endpoint.is_none()
        && std::env::var("SPIREKEEP_TEST_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
    {
        panic!("SPIREKEEP_TEST_REQUIRE_SERVICES=1 but SPIREKEEP_TEST_S3_ENDPOINT is not set");
    }
    let bucket =
        std::env::var("SPIREKEEP_TEST_S3_BUCKET").unwrap_or_else(|_| "spirekeep-test".into());
    endpoint.map(|e| (e, bucket))
}

/// Events of the journal for one step, in order.
pub fn events_of<'a>(journal: &'a [serde_json::Value], step: &str) -> Vec<&'a str> {
    journal
        .iter()
        .filter(|r| r["step"] == step)
        .filter_map(|r| r["event"].as_str())
        .collect()
}

/// Steps that completed, in order (each must appear once).
pub fn done_steps(journal: &[serde_json::Value]) -> Vec<String> {
    journal
        .iter()
        .filter(|r| r["event"] == "step_done")
        .map(|r| r["step"].as_str().unwrap().to_string())
        .collect()
}

/// Every step completes once, but the preflight, which runs on every run.
pub fn assert_no_step_done_twice(journal: &[serde_json::Value]) {
    let done = done_steps(journal);
    let mut seen = std::collections::BTreeSet::new();
    for s in done.iter().filter(|s| *s != "preflight") {
        assert!(seen.insert(s.clone()), "step {s} completed twice: {done:?}");
    }
}
