//! The SPIRE fleet stand-in (`spire-standin` + `tests/standin/fleet.sh`) run
//! as real processes against real datastores: a staged upgrade 1.13.6 →
//! 1.14.7 → 1.15.3 with two agents, SPIRE's refusal of a too-old server, the
//! `disable_migration` rules, and every fault switch.
//!
//! SQLite always; PostgreSQL and MariaDB with the services of
//! `scripts/test-services.sh` (skipped without them unless
//! `SPIREKEEP_TEST_REQUIRE_SERVICES=1`). Every process a test starts is
//! killed when the test ends, pass or fail ([`Fleet`]'s `Drop`).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use spirekeep::datastore::testkit::{SPIRE_TABLES, TestDatabase};
use spirekeep::datastore::{self, Datastore, Engine, OpenMode, dsn};
use spirekeep::inspect::read_migrations;

const BIN: &str = env!("CARGO_BIN_EXE_spire-standin");
const FLEET_SH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/standin/fleet.sh");

// ---------------------------------------------------------------- processes

/// A fleet directory, and the guard that kills every member process (and
/// every process spawned directly) when the test ends.
struct Fleet {
    dir: tempfile::TempDir,
    members: Vec<String>,
    children: Vec<Child>,
}

impl Fleet {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            members: Vec::new(),
            children: Vec::new(),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn member_dir(&self, name: &str) -> PathBuf {
        self.path().join(name)
    }

    /// Creates `<fleet>/<name>/` with `version`, `role` and `args` (one argument a line).
    fn add_member(&mut self, name: &str, role: &str, version: &str, args: &[String]) {
        let d = self.member_dir(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("version"), format!("{version}\n")).unwrap();
        std::fs::write(d.join("role"), format!("{role}\n")).unwrap();
        std::fs::write(d.join("args"), args.join("\n") + "\n").unwrap();
        self.members.push(name.to_string());
    }

    /// The member's argument list as `fleet.sh start` passes it.
    fn member_args(&self, name: &str) -> Vec<String> {
        let d = self.member_dir(name);
        let role = std::fs::read_to_string(d.join("role"))
            .unwrap()
            .trim()
            .to_string();
        let mut args = vec![role, "--state-dir".into(), d.display().to_string()];
        args.extend(
            std::fs::read_to_string(d.join("args"))
                .unwrap()
                .lines()
                .filter(|l| !l.is_empty())
                .map(str::to_string),
        );
        args
    }

    fn set_fault(&self, name: &str, file: &str, content: &str) {
        std::fs::write(self.member_dir(name).join(file), content).unwrap();
    }

    fn clear_fault(&self, name: &str, file: &str) {
        std::fs::remove_file(self.member_dir(name).join(file)).unwrap();
    }

    fn set_version(&self, name: &str, version: &str) {
        std::fs::write(
            self.member_dir(name).join("version"),
            format!("{version}\n"),
        )
        .unwrap();
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.member_dir(name).join("log")).unwrap_or_default()
    }

    /// Runs `fleet.sh ARGS`.
    fn sh(&self, args: &[&str]) -> Output {
        let out = Command::new("bash")
            .arg(FLEET_SH)
            .args(args)
            .env("STANDIN_FLEET_DIR", self.path())
            .env("SPIRE_STANDIN_BIN", BIN)
            .env("STANDIN_START_TIMEOUT", "30")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        eprintln!(
            "$ fleet.sh {} -> {}\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Runs `fleet.sh ARGS`, which must succeed; returns its stdout.
    fn sh_ok(&self, args: &[&str]) -> String {
        let out = self.sh(args);
        assert!(
            out.status.success(),
            "fleet.sh {} failed: {}\nstdout: {}\nstderr: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `fleet.sh ARGS`, which must fail; returns its stderr.
    fn sh_fails(&self, args: &[&str]) -> String {
        let out = self.sh(args);
        assert!(
            !out.status.success(),
            "fleet.sh {} should have failed",
            args.join(" ")
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Runs `spire-standin ARGS` directly to completion (it must exit within
    /// 30 s): for exact exit codes.
    fn run_to_exit(&mut self, args: &[String]) -> Output {
        let child = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        self.children.push(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let child = self.children.last_mut().unwrap();
            if child.try_wait().unwrap().is_some() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "spire-standin {args:?} did not exit within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.children.pop().unwrap().wait_with_output().unwrap()
    }

    /// Starts `spire-standin ARGS` directly in the background; the guard kills it.
    fn spawn(&mut self, args: &[String]) -> usize {
        let child = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(child);
        self.children.len() - 1
    }

    fn kill_spawned(&mut self, i: usize) {
        let c = &mut self.children[i];
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for name in &self.members {
            let d = self.member_dir(name);
            let Ok(pid) = std::fs::read_to_string(d.join("pid")) else {
                continue;
            };
            let pid = pid.trim();
            // Only a process that is really this member (the pid may be reused).
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let dir = d.display().to_string();
            if cmdline.split(|b| *b == 0).any(|arg| arg == dir.as_bytes()) {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

// ---------------------------------------------------------------- HTTP and metrics

/// A blocking GET on loopback: (status, body); `None` when nothing answers.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

fn status_of(port: u16, path: &str) -> Option<u16> {
    http_get(port, path).map(|(s, _)| s)
}

fn metrics(port: u16) -> String {
    let (status, body) = http_get(port, "/metrics").expect("/metrics answers");
    assert_eq!(status, 200);
    body
}

/// The value of the sample `name` whose labels include `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (n, label_text) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            let have: Vec<(&str, &str)> = label_text
                .split(',')
                .filter(|p| !p.is_empty())
                .filter_map(|p| {
                    let (k, v) = p.split_once('=')?;
                    Some((k, v.trim_matches('"')))
                })
                .collect();
            labels
                .iter()
                .all(|want| have.contains(want))
                .then(|| value.parse().ok())
                .flatten()
        })
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------- datastore checks

async fn open(conn: &str) -> Box<dyn Datastore> {
    let spec = dsn::parse(conn, None, Path::new("/")).unwrap();
    datastore::open(&spec, OpenMode::ReadWrite).await.unwrap()
}

/// The datastore as a test sees it: the migrations row and two columns.
#[derive(Debug, PartialEq)]
struct DbState {
    schema: i64,
    code_version: String,
    agent_version_column: bool,
    additional_attributes_column: bool,
}

async fn db_state(conn: &str) -> DbState {
    let ds = open(conn).await;
    let cat = ds.catalogue().await.unwrap();
    let row = read_migrations(ds.as_ref(), &cat)
        .await
        .unwrap()
        .0
        .expect("a migrations row");
    for t in SPIRE_TABLES {
        assert!(cat.table(t).is_some(), "table {t} missing");
    }
    let state = DbState {
        schema: row.schema_version,
        code_version: row.code_version,
        agent_version_column: cat.has_column("attested_node_entries", "agent_version"),
        additional_attributes_column: cat.has_column("registered_entries", "additional_attributes"),
    };
    ds.close().await;
    state
}

fn db(schema: i64, code_version: &str) -> DbState {
    DbState {
        schema,
        code_version: code_version.into(),
        agent_version_column: schema >= 24,
        additional_attributes_column: schema >= 25,
    }
}

/// `agent_version` → number of agents.
async fn agent_versions(conn: &str) -> Vec<(Option<String>, u64)> {
    let ds = open(conn).await;
    let v = ds
        .count_by("attested_node_entries", "agent_version")
        .await
        .unwrap();
    ds.close().await;
    v
}

async fn agent_count(conn: &str) -> u64 {
    let ds = open(conn).await;
    let n = ds.count_rows("attested_node_entries").await.unwrap();
    ds.close().await;
    n
}

// ---------------------------------------------------------------- connection strings

/// SPIRE-style connection strings for a test database: a lib/pq key=value
/// string, or a go-sql-driver DSN with parseTime=true.
fn spire_dsn(db: &TestDatabase) -> String {
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

// ---------------------------------------------------------------- the scenario

fn server_args(conn: &str, port: u16) -> Vec<String> {
    vec![
        "--datastore".into(),
        conn.into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--trust-domain".into(),
        "example.org".into(),
    ]
}

fn agent_args(name: &str, server_port: u16, port: u16) -> Vec<String> {
    vec![
        "--server".into(),
        format!("http://127.0.0.1:{server_port}"),
        "--spiffe-id".into(),
        format!("spiffe://example.org/agent/{name}"),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
    ]
}

fn version_of(fleet: &Fleet, name: &str) -> String {
    fleet.sh_ok(&["version", name]).trim().to_string()
}

/// The staged upgrade, the refusal and the fault switches, on one datastore
/// (`conn`) plus a second, fresh one for the migration faults (`conn_h`).
async fn scenario(engine: Engine, conn: &str, conn_h: &str) {
    let mut fleet = Fleet::new();
    let sp = free_port();
    fleet.add_member("server-1", "server", "1.13.6", &server_args(conn, sp));

    // ---- a fresh datastore gets 1.13.6's schema: 23
    fleet.sh_ok(&["start", "server-1"]);
    assert_eq!(db_state(conn).await, db(23, "1.13.6"), "{engine}");
    let (status, body) = http_get(sp, "/ready").unwrap();
    assert_eq!(status, 200, "{body}");
    let details: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(details.get("catalog.datastore").is_some(), "{body}");
    assert_eq!(status_of(sp, "/live"), Some(200));
    let m = metrics(sp);
    let started = [
        ("version", "1.13.6"),
        ("trust_domain_id", "spiffe://example.org"),
    ];
    assert_eq!(
        sample(&m, "spire_server_started", &started),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "spire_server_started", &[("host", "server-1")]),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "spire_server_ca_manager_x509_ca_prepare",
            &[("status", "OK")]
        ),
        Some(1.0)
    );
    assert!(
        sample(&m, "spire_server_uptime_in_ms", &[]).is_some(),
        "{m}"
    );
    assert!(
        !m.contains("_total"),
        "SPIRE's counters have no _total suffix:\n{m}"
    );
    let hc = fleet.run_to_exit(&[
        "healthcheck".into(),
        "--url".into(),
        format!("http://127.0.0.1:{sp}"),
    ]);
    assert!(hc.status.success(), "{}", stderr(&hc));
    assert_eq!(stdout(&hc).trim(), "Server is healthy.");
    assert_eq!(version_of(&fleet, "server-1"), "1.13.6");
    // `spire-server --version` prints on stderr; the stand-in does the same.
    let v = fleet.run_to_exit(&[
        "version".into(),
        "--state-dir".into(),
        fleet.member_dir("server-1").display().to_string(),
    ]);
    assert_eq!((stdout(&v).as_str(), stderr(&v).trim()), ("", "1.13.6"));

    // ---- two agents at 1.13.6 attest
    let mut agent_ports = Vec::new();
    for name in ["agent-1", "agent-2"] {
        let port = free_port();
        fleet.add_member(name, "agent", "1.13.6", &agent_args(name, sp, port));
        fleet.sh_ok(&["start", name]);
        agent_ports.push(port);
    }
    assert_eq!(agent_count(conn).await, 2);
    let m = metrics(sp);
    assert_eq!(
        sample(
            &m,
            "spire_server_rpc_agent_v1_agent_attest_agent",
            &[("status", "OK")]
        ),
        Some(2.0),
        "{m}"
    );
    assert!(
        m.contains("# TYPE spire_server_rpc_agent_v1_agent_attest_agent counter"),
        "{m}"
    );
    assert!(
        m.contains("# TYPE spire_server_rpc_agent_v1_agent_attest_agent_elapsed_time summary"),
        "{m}"
    );
    assert!(
        sample(
            &m,
            "spire_server_rpc_agent_v1_agent_attest_agent_elapsed_time_count",
            &[("status", "OK")]
        ) == Some(2.0),
        "{m}"
    );
    let a1 = agent_ports[0];
    let am = metrics(a1);
    assert_eq!(
        sample(
            &am,
            "spire_agent_started",
            &[
                ("version", "1.13.6"),
                ("trust_domain_id", "spiffe://example.org")
            ]
        ),
        Some(1.0),
        "{am}"
    );
    assert_eq!(
        sample(
            &am,
            "spire_agent_node_attestor_new_svid",
            &[("status", "OK")]
        ),
        Some(1.0),
        "{am}"
    );
    let rotations = |port| {
        sample(
            &metrics(port),
            "spire_agent_agent_svid_rotate",
            &[("status", "OK")],
        )
        .unwrap_or(0.0)
    };
    let before = rotations(a1);
    wait_for("agent SVID rotations", Duration::from_secs(10), || {
        rotations(a1) >= before + 2.0
    });
    assert_eq!(status_of(a1, "/ready"), Some(200));

    // ---- server 1.13.6 → 1.14.7: schema 24
    fleet.sh_ok(&["upgrade", "server-1", "1.14.7"]);
    assert_eq!(db_state(conn).await, db(24, "1.14.7"), "{engine}");
    assert_eq!(version_of(&fleet, "server-1"), "1.14.7");
    assert_eq!(
        sample(
            &metrics(sp),
            "spire_server_started",
            &[("version", "1.14.7")]
        ),
        Some(1.0)
    );
    // agents attested before schema 24 have no version recorded
    assert_eq!(agent_versions(conn).await, vec![(None, 2)]);
    for &p in &agent_ports {
        wait_for("agents ready again", Duration::from_secs(10), || {
            status_of(p, "/ready") == Some(200)
        });
    }

    // ---- agents 1.13.6 → 1.14.7: they re-attest and report their version
    for name in ["agent-1", "agent-2"] {
        fleet.sh_ok(&["upgrade", name, "1.14.7"]);
        assert_eq!(version_of(&fleet, name), "1.14.7");
    }
    assert_eq!(agent_versions(conn).await, vec![(Some("1.14.7".into()), 2)]);
    assert_eq!(
        sample(
            &metrics(a1),
            "spire_agent_started",
            &[("version", "1.14.7")]
        ),
        Some(1.0)
    );

    // ---- server 1.14.7 → 1.15.3: schema 25
    fleet.sh_ok(&["upgrade", "server-1", "1.15.3"]);
    assert_eq!(db_state(conn).await, db(25, "1.15.3"), "{engine}");
    assert_eq!(
        sample(
            &metrics(sp),
            "spire_server_started",
            &[("version", "1.15.3")]
        ),
        Some(1.0)
    );
    let hc = fleet.run_to_exit(&[
        "healthcheck".into(),
        "--url".into(),
        format!("http://127.0.0.1:{sp}"),
    ]);
    assert!(hc.status.success(), "{}", stderr(&hc));
    assert_eq!(agent_count(conn).await, 2);
    // upgrade refuses to go down
    let err = fleet.sh_fails(&["upgrade", "server-1", "1.14.7"]);
    assert!(err.contains("use rollback"), "{err}");

    // ---- refusal: a 1.15.3 datastore started with 1.13.6
    fleet.sh_ok(&["stop", "server-1"]);
    assert_eq!(status_of(sp, "/live"), None);
    wait_for(
        "agents not ready without their server",
        Duration::from_secs(10),
        || status_of(a1, "/ready") == Some(500),
    );
    fleet.sh_ok(&["rollback", "server-1", "1.13.6"]);
    let err = fleet.sh_fails(&["start", "server-1"]);
    assert!(
        err.contains("incompatible DB schema and code version"),
        "{err}"
    );
    assert!(err.contains("exited with status 1"), "{err}");
    let out = fleet.run_to_exit(&fleet.member_args("server-1"));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("incompatible DB schema and code version"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        db_state(conn).await,
        db(25, "1.15.3"),
        "a refusal leaves the datastore alone"
    );
    let st = fleet.sh(&["status", "server-1"]);
    assert_eq!(st.status.code(), Some(3));

    // one minor back is compatible: 1.14.7 warns and runs on schema 25
    fleet.sh_ok(&["upgrade", "server-1", "1.14.7"]);
    fleet.sh_ok(&["start", "server-1"]);
    assert!(
        fleet
            .log("server-1")
            .contains("DB schema is ahead of code version")
    );
    assert_eq!(
        db_state(conn).await,
        db(25, "1.15.3"),
        "code_version is never lowered"
    );
    fleet.sh_ok(&["upgrade", "server-1", "1.15.3"]);
    assert_eq!(db_state(conn).await, db(25, "1.15.3"));

    // ---- fault: fail-start
    fleet.sh_ok(&["stop", "agent-1"]);
    fleet.set_fault("agent-1", "fail-start", "simulated broken install\n");
    let err = fleet.sh_fails(&["start", "agent-1"]);
    assert!(err.contains("simulated broken install"), "{err}");
    assert_eq!(fleet.sh(&["status", "agent-1"]).status.code(), Some(3));
    fleet.clear_fault("agent-1", "fail-start");
    // an agent older than 1.14.3 does not report its version: it is stored empty
    fleet.sh_ok(&["rollback", "agent-1", "1.13.6"]);
    fleet.sh_ok(&["start", "agent-1"]);
    assert_eq!(status_of(a1, "/ready"), Some(200));
    let versions = agent_versions(conn).await;
    assert_eq!(
        versions,
        vec![(Some(String::new()), 1), (Some("1.14.7".into()), 1)],
        "{engine}"
    );
    fleet.sh_ok(&["upgrade", "agent-1", "1.14.7"]);
    assert_eq!(agent_versions(conn).await, vec![(Some("1.14.7".into()), 2)]);

    // ---- fault: wrong-version (reported everywhere, installed unchanged)
    fleet.set_fault("agent-2", "wrong-version", "1.99.0\n");
    assert_eq!(version_of(&fleet, "agent-2"), "1.99.0");
    fleet.sh_ok(&["stop", "agent-2"]);
    fleet.sh_ok(&["start", "agent-2"]);
    let a2 = agent_ports[1];
    assert_eq!(
        sample(
            &metrics(a2),
            "spire_agent_started",
            &[("version", "1.99.0")]
        ),
        Some(1.0)
    );
    let versions = agent_versions(conn).await;
    assert!(
        versions.contains(&(Some("1.99.0".into()), 1)),
        "{versions:?}"
    );
    assert_eq!(
        std::fs::read_to_string(fleet.member_dir("agent-2").join("version"))
            .unwrap()
            .trim(),
        "1.14.7"
    );
    fleet.clear_fault("agent-2", "wrong-version");
    assert_eq!(version_of(&fleet, "agent-2"), "1.14.7");
    fleet.sh_ok(&["stop", "agent-2"]);
    fleet.sh_ok(&["start", "agent-2"]);
    assert_eq!(
        sample(
            &metrics(a2),
            "spire_agent_started",
            &[("version", "1.14.7")]
        ),
        Some(1.0)
    );

    // ---- fault: unhealthy-after
    fleet.set_fault("server-1", "unhealthy-after", "3\n");
    fleet.sh_ok(&["stop", "server-1"]);
    fleet.sh_ok(&["start", "server-1"]);
    assert_eq!(status_of(sp, "/ready"), Some(200));
    wait_for(
        "the server to turn unhealthy",
        Duration::from_secs(10),
        || status_of(sp, "/ready") == Some(500),
    );
    assert_eq!(status_of(sp, "/live"), Some(500));
    let hc = fleet.run_to_exit(&[
        "healthcheck".into(),
        "--url".into(),
        format!("http://127.0.0.1:{sp}"),
    ]);
    assert_eq!(hc.status.code(), Some(1));
    assert!(
        stderr(&hc).starts_with("server is unhealthy: "),
        "{}",
        stderr(&hc)
    );
    wait_for(
        "agents not ready with an unhealthy server",
        Duration::from_secs(10),
        || status_of(a1, "/ready") == Some(500),
    );
    fleet.clear_fault("server-1", "unhealthy-after");
    fleet.sh_ok(&["stop", "server-1"]);
    fleet.sh_ok(&["start", "server-1"]);
    assert_eq!(status_of(sp, "/ready"), Some(200));
    wait_for("agents ready again", Duration::from_secs(10), || {
        status_of(a1, "/ready") == Some(200)
    });

    // ---- disable_migration and half-migrate, on a second, fresh datastore
    let hp = free_port();
    fleet.add_member("server-h", "server", "1.13.6", &server_args(conn_h, hp));
    fleet.sh_ok(&["start", "server-h"]);
    fleet.sh_ok(&["stop", "server-h"]);
    assert_eq!(db_state(conn_h).await, db(23, "1.13.6"));
    let mut no_migration = fleet.member_args("server-h");
    no_migration.push("--disable-migration".into());
    // (23, 1.13.6) with 1.15.3 and disable_migration: two minors away, refused
    fleet.set_version("server-h", "1.15.3");
    let out = fleet.run_to_exit(&no_migration);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("auto-migration must be enabled for current DB"),
        "{}",
        stderr(&out)
    );
    // with 1.14.7 it starts on schema 23 without migrating
    fleet.set_version("server-h", "1.14.7");
    let child = fleet.spawn(&no_migration);
    wait_for("the unmigrated server", Duration::from_secs(20), || {
        status_of(hp, "/ready") == Some(200)
    });
    assert_eq!(db_state(conn_h).await, db(23, "1.13.6"));
    fleet.kill_spawned(child);

    // half-migrate "25" with 1.15.3: 23→24 completes, 24→25 crashes after its DDL
    fleet.set_version("server-h", "1.15.3");
    fleet.set_fault("server-h", "half-migrate", "25\n");
    let out = fleet.run_to_exit(&fleet.member_args("server-h"));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let half = db_state(conn_h).await;
    assert_eq!((half.schema, half.code_version.as_str()), (24, "1.15.3"));
    assert!(
        half.agent_version_column && half.additional_attributes_column,
        "{half:?}"
    );
    // half-migrate "" (the first step, now 24→25): crashes again, row unchanged
    fleet.set_fault("server-h", "half-migrate", "");
    let err = fleet.sh_fails(&["start", "server-h"]);
    assert!(err.contains("exited with status 2"), "{err}");
    let again = db_state(conn_h).await;
    assert_eq!(
        (again.schema, again.additional_attributes_column),
        (24, true)
    );
    // without the fault the step completes (its column is already there)
    fleet.clear_fault("server-h", "half-migrate");
    fleet.sh_ok(&["start", "server-h"]);
    assert_eq!(db_state(conn_h).await, db(25, "1.15.3"));

    // everything stops cleanly
    for name in ["agent-1", "agent-2", "server-1", "server-h"] {
        fleet.sh_ok(&["stop", name]);
        assert_eq!(fleet.sh(&["status", name]).status.code(), Some(3));
    }
    for p in [sp, hp, agent_ports[0], agent_ports[1]] {
        assert_eq!(status_of(p, "/live"), None, "port {p} still answers");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let conn = dir.path().join("datastore.sqlite3").display().to_string();
    let conn_h = dir.path().join("half.sqlite3").display().to_string();
    scenario(Engine::Sqlite, &conn, &conn_h).await;
    // SPIRE runs SQLite in WAL mode; so does the stand-in. The file header's
    // read and write format versions (bytes 18 and 19) are 2 in WAL mode.
    let header = std::fs::read(&conn).unwrap();
    assert_eq!(&header[..16], b"SQLite format 3\0");
    assert_eq!(
        (header[18], header[19]),
        (2, 2),
        "the datastore is not in WAL mode"
    );
}

async fn on_server(engine: Engine) {
    let Some(main) = TestDatabase::create_or_skip(engine, "standin_fleet")
        .await
        .unwrap()
    else {
        return;
    };
    let Some(half) = TestDatabase::create_or_skip(engine, "standin_half")
        .await
        .unwrap()
    else {
        return;
    };
    scenario(engine, &spire_dsn(&main), &spire_dsn(&half)).await;
    main.cleanup().await.unwrap();
    half.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_on_postgres() {
    on_server(Engine::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_on_mariadb() {
    on_server(Engine::Mysql).await;
}

/// The stand-in refuses what SPIRE refuses before touching a datastore.
#[test]
fn refuses_bad_setups() {
    let mut fleet = Fleet::new();
    let dir = tempfile::tempdir().unwrap();
    let conn = dir.path().join("ds.sqlite3").display().to_string();
    let port = free_port();
    fleet.add_member("s", "server", "1.13.6", &server_args(&conn, port));
    let mut args = fleet.member_args("s");
    // a MySQL DSN without parseTime=true (SPIRE's own check; no connection is made)
    let i = args.iter().position(|a| a == "--datastore").unwrap();
    args[i + 1] = "spire:pw@tcp(127.0.0.1:1)/spire".into();
    let out = fleet.run_to_exit(&args);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("missing parseTime=true"),
        "{}",
        stderr(&out)
    );
    // a version that is not a SPIRE release
    fleet.set_version("s", "1.13.99");
    let out = fleet.run_to_exit(&fleet.member_args("s"));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("1.13.99"), "{}", stderr(&out));
    assert!(
        !Path::new(&conn).exists(),
        "nothing is created for an unknown release"
    );
    // a non-loopback listener
    fleet.set_version("s", "1.13.6");
    let mut args = fleet.member_args("s");
    let i = args.iter().position(|a| a == "--listen").unwrap();
    args[i + 1] = "0.0.0.0:1".into();
    let out = fleet.run_to_exit(&args);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("loopback"), "{}", stderr(&out));
    // fleet.sh: bad member names and versions are usage errors
    assert_eq!(fleet.sh(&["start", "../s"]).status.code(), Some(2));
    assert_eq!(fleet.sh(&["upgrade", "s", "v1.14"]).status.code(), Some(2));
    assert_eq!(fleet.sh(&["start", "nobody"]).status.code(), Some(1));
}
