//! A real SPIRE for the end-to-end tests: `spire-server` and `spire-agent`
//! built from source by `scripts/spire.sh` (v1.13.3), run as processes with
//! generated configurations on loopback, against a real datastore.
//!
//! The binaries come from `SPIREKEEP_SPIRE_BIN_DIR` (set by `scripts/test.sh`).
//! Without it the tests print one line saying how to enable them and pass,
//! unless `SPIREKEEP_TEST_REQUIRE_SPIRE=1` (CI), which makes that a failure.
//! Every process a test starts is killed when its handle drops, pass or fail.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use spirekeep::datastore::Engine;
use spirekeep::datastore::testkit::TestDatabase;

pub const TRUST_DOMAIN: &str = "example.org";
pub const SPIREKEEP: &str = env!("CARGO_BIN_EXE_spirekeep");

/// Where `spire-server` and `spire-agent` are, or `None` (after one line on
/// stderr) when they were not built and SPIRE is not required.
pub fn spire_bin_dir() -> Option<PathBuf> {
    let required = std::env::var("SPIREKEEP_TEST_REQUIRE_SPIRE").is_ok_and(|v| v == "1");
    match std::env::var_os("SPIREKEEP_SPIRE_BIN_DIR").map(PathBuf::from) {
        Some(dir) if dir.join("spire-server").is_file() && dir.join("spire-agent").is_file() => {
            Some(dir)
        }
        other => {
            let why = match other {
                Some(dir) => format!("no spire-server/spire-agent in {}", dir.display()),
                None => "SPIREKEEP_SPIRE_BIN_DIR is not set".to_string(),
            };
            assert!(
                !required,
                "a real SPIRE is required (SPIREKEEP_TEST_REQUIRE_SPIRE=1) but {why}"
            );
            eprintln!(
                "skipping: no real SPIRE ({why}); run `export SPIREKEEP_SPIRE_BIN_DIR=$(scripts/spire.sh)` \
                 (needs Go) or scripts/test.sh to enable the real-SPIRE tests"
            );
            None
        }
    }
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `connection_string` SPIRE takes for a test database (lib/pq key=value
/// or go-sql-driver DSN), with the test user's password.
pub fn spire_connection_string(db: &TestDatabase) -> String {
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
        Engine::Postgres => format!(
            "host={host} port={} user={user} password={password} dbname={name} sslmode=disable",
            url.port().unwrap_or(5432)
        ),
        Engine::Mysql => format!(
            "{user}:{password}@tcp({host}:{})/{name}?parseTime=true",
            url.port().unwrap_or(3306)
        ),
        Engine::Sqlite => unreachable!("SQLite datastores are files"),
    }
}

/// SPIRE's `database_type` for an engine.
pub fn database_type(engine: Engine) -> &'static str {
    match engine {
        Engine::Sqlite => "sqlite3",
        Engine::Postgres => "postgres",
        Engine::Mysql => "mysql",
    }
}

/// Runs a command to completion with a time limit.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{cmd:?} did not finish in {limit:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends SIGTERM and waits (SIGKILL after `grace`).
fn terminate(child: &mut Child, grace: Duration) {
    if child.try_wait().unwrap().is_some() {
        return;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let started = Instant::now();
    while started.elapsed() < grace {
        if child.try_wait().unwrap().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// How a server's configuration is generated.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub engine: Engine,
    /// SPIRE's `connection_string`.
    pub connection_string: String,
    /// `server.agent_ttl` (agent SVID lifetime), e.g. "1h".
    pub agent_ttl: Option<String>,
    pub disable_migration: bool,
}

/// One spire-server: its directory, configuration and (when running) process.
pub struct SpireServer {
    pub bin_dir: PathBuf,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub port: u16,
    pub health_port: u16,
    pub metrics_port: u16,
    pub options: ServerOptions,
    child: Option<Child>,
    runs: u32,
}

impl SpireServer {
    /// Writes the configuration under `dir` (data dir `dir/data`, the disk
    /// KeyManager's `keys.json` in it); starts nothing.
    pub fn new(bin_dir: &Path, dir: &Path, options: ServerOptions) -> Self {
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let mut server = Self {
            bin_dir: bin_dir.to_path_buf(),
            dir: dir.to_path_buf(),
            config: dir.join("server.conf"),
            socket: dir.join("api.sock"),
            port: free_port(),
            health_port: free_port(),
            metrics_port: free_port(),
            options,
            child: None,
            runs: 0,
        };
        server.write_config();
        server
    }

    /// Rewrites `server.conf` from `self.options` (after changing them).
    pub fn write_config(&mut self) {
        let o = &self.options;
        let mut server_block = format!(
            "    bind_address = \"127.0.0.1\"\n    bind_port = \"{}\"\n    socket_path = \"{}\"\n    \
             trust_domain = \"{TRUST_DOMAIN}\"\n    data_dir = \"{}\"\n    log_level = \"DEBUG\"\n    \
             default_x509_svid_ttl = \"1h\"\n",
            self.port,
            self.socket.display(),
            self.dir.join("data").display(),
        );
        if let Some(ttl) = &o.agent_ttl {
            writeln!(server_block, "    agent_ttl = \"{ttl}\"").unwrap();
        }
        let conf = format!(
            "server {{\n{server_block}}}\n\n\
             plugins {{\n\
             \x20   DataStore \"sql\" {{\n\
             \x20       plugin_data {{\n\
             \x20           database_type = \"{}\"\n\
             \x20           connection_string = \"{}\"\n\
             \x20           disable_migration = {}\n\
             \x20       }}\n\
             \x20   }}\n\
             \x20   NodeAttestor \"join_token\" {{\n\
             \x20       plugin_data {{}}\n\
             \x20   }}\n\
             \x20   KeyManager \"disk\" {{\n\
             \x20       plugin_data {{\n\
             \x20           keys_path = \"{}\"\n\
             \x20       }}\n\
             \x20   }}\n\
             }}\n\n\
             health_checks {{\n\
             \x20   listener_enabled = true\n\
             \x20   bind_address = \"127.0.0.1\"\n\
             \x20   bind_port = \"{}\"\n\
             \x20   live_path = \"/live\"\n\
             \x20   ready_path = \"/ready\"\n\
             }}\n\n\
             telemetry {{\n\
             \x20   Prometheus {{\n\
             \x20       host = \"127.0.0.1\"\n\
             \x20       port = {}\n\
             \x20   }}\n\
             }}\n",
            database_type(o.engine),
            o.connection_string
                .replace('\\', "\\\\")
                .replace('"', "\\\""),
            o.disable_migration,
            self.dir.join("data").join("keys.json").display(),
            self.health_port,
            self.metrics_port,
        );
        std::fs::write(&self.config, conf).unwrap();
    }

    /// The log of the current (or last) run.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("server-{}.log", self.runs))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts `spire-server run` and waits until it is healthy; panics with
    /// its log when it exits or is not healthy in time.
    pub fn start(&mut self) {
        if let Err(log) = self.try_start() {
            panic!("spire-server did not become healthy; its log:\n{log}");
        }
    }

    /// Starts the server; `Err(log)` when it exits before it is healthy (the
    /// way SPIRE refuses a datastore) or is not healthy within a minute.
    pub fn try_start(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "server already running");
        self.runs += 1;
        let log = std::fs::File::create(self.log_path()).unwrap();
        let child = Command::new(self.bin_dir.join("spire-server"))
            .args(["run", "-config"])
            .arg(&self.config)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start spire-server");
        self.child = Some(child);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!("(exited: {status})\n{}", self.log()));
            }
            if self.healthy() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        self.stop();
        Err(format!("(not healthy after 60 s)\n{}", self.log()))
    }

    /// `spire-server healthcheck` on the admin socket.
    pub fn healthy(&self) -> bool {
        self.socket.exists()
            && Command::new(self.bin_dir.join("spire-server"))
                .args(["healthcheck", "-socketPath"])
                .arg(&self.socket)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
    }

    /// SIGTERM, as systemd stops it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, Duration::from_secs(15));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Runs `spire-server <args> -socketPath <socket>`; panics on failure.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.cli_output(args);
        assert!(
            out.status.success(),
            "spire-server {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn cli_output(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(self.bin_dir.join("spire-server"));
        cmd.args(args).arg("-socketPath").arg(&self.socket);
        run(&mut cmd, Duration::from_secs(30))
    }

    /// `-output json` of a listing command, parsed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-output", "json"]);
        let text = self.cli(&all);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"))
    }

    /// Entries, agents and bundles as the server's API lists them, each
    /// sorted so two listings of the same data compare equal.
    pub fn state(&self) -> ServedState {
        ServedState {
            entries: sorted(&self.json(&["entry", "show"]), "entries", "id"),
            agents: sorted(&self.json(&["agent", "list"]), "agents", "id"),
            bundles: sorted(&self.json(&["bundle", "list"]), "bundles", "trust_domain"),
            own_bundle: self.json(&["bundle", "show"]),
        }
    }

    /// A join token whose agent gets `spiffe_id` as its alias (SPIRE creates
    /// the alias entry).
    pub fn join_token(&self, spiffe_id: &str) -> String {
        let out = self.cli(&["token", "generate", "-spiffeID", spiffe_id, "-ttl", "3600"]);
        out.lines()
            .find_map(|l| l.strip_prefix("Token: "))
            .unwrap_or_else(|| panic!("no token in {out:?}"))
            .trim()
            .to_string()
    }

    /// The server's own bundle as PEM (an agent's bootstrap bundle).
    pub fn bundle_pem(&self) -> String {
        self.cli(&["bundle", "show", "-format", "pem"])
    }

    /// Prometheus text from the telemetry listener.
    pub fn scrape(&self) -> String {
        http_get(self.metrics_port, "/metrics")
    }
}

impl Drop for SpireServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Entries, agents and bundles served by a server.
#[derive(Debug, Clone, PartialEq)]
pub struct ServedState {
    pub entries: Vec<serde_json::Value>,
    pub agents: Vec<serde_json::Value>,
    /// Federated bundles (`bundle list`).
    pub bundles: Vec<serde_json::Value>,
    /// The server's own trust domain's bundle (`bundle show`).
    pub own_bundle: serde_json::Value,
}

/// The array under `key` (SPIRE 1.13 wraps listings in an object), sorted by `by`.
fn sorted(v: &serde_json::Value, key: &str, by: &str) -> Vec<serde_json::Value> {
    let v = match v {
        serde_json::Value::Array(items) if items.len() == 1 => &items[0],
        other => other,
    };
    let mut items = v
        .get(key)
        .and_then(|x| x.as_array())
        .cloned()
        .unwrap_or_default();
    let key_of = |item: &serde_json::Value| match item.get(by) {
        Some(serde_json::Value::Object(_)) => item[by].to_string(),
        Some(x) => x.to_string(),
        None => item.to_string(),
    };
    items.sort_by_key(key_of);
    items
}

/// A minimal HTTP/1.0 GET on 127.0.0.1; the body.
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}

/// One spire-agent with a join token, the disk KeyManager (its SVID survives
/// a restart) and the unix workload attestor.
pub struct SpireAgent {
    pub bin_dir: PathBuf,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub metrics_port: u16,
    pub join_token: String,
    child: Option<Child>,
    runs: u32,
}

impl SpireAgent {
    /// Writes the agent's configuration (bootstrap bundle from `server`).
    pub fn new(server: &SpireServer, dir: &Path, join_token: &str) -> Self {
        std::fs::create_dir_all(dir.join("data")).unwrap();
        std::fs::write(dir.join("bootstrap.crt"), server.bundle_pem()).unwrap();
        let agent = Self {
            bin_dir: server.bin_dir.clone(),
            dir: dir.to_path_buf(),
            config: dir.join("agent.conf"),
            socket: dir.join("workload.sock"),
            metrics_port: free_port(),
            join_token: join_token.to_string(),
            child: None,
            runs: 0,
        };
        let conf = format!(
            "agent {{\n\
             \x20   data_dir = \"{data}\"\n\
             \x20   log_level = \"DEBUG\"\n\
             \x20   server_address = \"127.0.0.1\"\n\
             \x20   server_port = \"{port}\"\n\
             \x20   socket_path = \"{socket}\"\n\
             \x20   trust_bundle_path = \"{bundle}\"\n\
             \x20   trust_domain = \"{TRUST_DOMAIN}\"\n\
             }}\n\n\
             plugins {{\n\
             \x20   NodeAttestor \"join_token\" {{\n\
             \x20       plugin_data {{}}\n\
             \x20   }}\n\
             \x20   KeyManager \"disk\" {{\n\
             \x20       plugin_data {{\n\
             \x20           directory = \"{data}\"\n\
             \x20       }}\n\
             \x20   }}\n\
             \x20   WorkloadAttestor \"unix\" {{\n\
             \x20       plugin_data {{}}\n\
             \x20   }}\n\
             }}\n\n\
             telemetry {{\n\
             \x20   Prometheus {{\n\
             \x20       host = \"127.0.0.1\"\n\
             \x20       port = {metrics}\n\
             \x20   }}\n\
             }}\n",
            data = dir.join("data").display(),
            port = server.port,
            socket = agent.socket.display(),
            bundle = dir.join("bootstrap.crt").display(),
            metrics = agent.metrics_port,
        );
        std::fs::write(&agent.config, conf).unwrap();
        agent
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("agent-{}.log", self.runs))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts `spire-agent run` (with its join token) and waits until its
    /// Workload API answers the health check.
    pub fn start(&mut self) {
        if let Err(log) = self.try_start() {
            panic!("spire-agent did not become healthy; its log:\n{log}");
        }
    }

    pub fn try_start(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "agent already running");
        self.runs += 1;
        let log = std::fs::File::create(self.log_path()).unwrap();
        let child = Command::new(self.bin_dir.join("spire-agent"))
            .args(["run", "-config"])
            .arg(&self.config)
            .args(["-joinToken", &self.join_token])
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start spire-agent");
        self.child = Some(child);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!("(exited: {status})\n{}", self.log()));
            }
            if self.healthy() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        self.stop();
        Err(format!("(not healthy after 60 s)\n{}", self.log()))
    }

    pub fn healthy(&self) -> bool {
        self.socket.exists()
            && Command::new(self.bin_dir.join("spire-agent"))
                .args(["healthcheck", "-socketPath"])
                .arg(&self.socket)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, Duration::from_secs(15));
        }
    }

    /// Whether the process is still running (a rejected `join_token` agent exits).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Waits up to `limit` for the agent process to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() < limit {
            if !self.is_running() {
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    /// `spire-agent api fetch x509`: the SPIFFE IDs of the SVIDs received, or
    /// the error output.
    pub fn fetch_x509(&self) -> Result<Vec<String>, String> {
        let mut cmd = Command::new(self.bin_dir.join("spire-agent"));
        cmd.args(["api", "fetch", "x509", "-timeout", "10s", "-socketPath"])
            .arg(&self.socket);
        let out = run(&mut cmd, Duration::from_secs(30));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("SPIFFE ID:"))
            .map(|s| s.trim().to_string())
            .collect())
    }

    /// Polls [`SpireAgent::fetch_x509`] until it returns an SVID for `id`.
    pub fn wait_for_svid(&self, id: &str, limit: Duration) -> Result<(), String> {
        let started = Instant::now();
        let mut last = String::new();
        while started.elapsed() < limit {
            match self.fetch_x509() {
                Ok(ids) if ids.iter().any(|x| x == id) => return Ok(()),
                Ok(ids) => last = format!("received {ids:?}"),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Err(format!(
            "no SVID for {id} within {limit:?}: {last}\nagent log:\n{}",
            self.log()
        ))
    }

    pub fn scrape(&self) -> String {
        http_get(self.metrics_port, "/metrics")
    }

    /// The agent's own SPIFFE ID (join token agents get one per token).
    pub fn spiffe_id(&self) -> String {
        format!(
            "spiffe://{TRUST_DOMAIN}/spire/agent/join_token/{}",
            self.join_token
        )
    }
}

impl Drop for SpireAgent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The uid the tests run as (the workload selector `unix:uid:<uid>`).
pub fn current_uid() -> String {
    let out = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs spirekeep with a clean `SPIREKEEP_*` environment plus `env`.
pub fn spirekeep(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(SPIREKEEP);
    cmd.args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("SPIREKEEP_") && !key.starts_with("SPIREKEEP_TEST_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    run(&mut cmd, Duration::from_secs(300))
}

/// [`spirekeep`] that must succeed; its stdout.
pub fn spirekeep_ok(args: &[&str]) -> String {
    let out = spirekeep(args, &[]);
    assert!(
        out.status.success(),
        "spirekeep {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ------------------------------------------------------- engine look-ups
// Tests may name engines: these read what the Datastore trait does not
// expose (column defaults, MySQL table options) to compare SPIRE's DDL with
// the project's.

/// Drops the test database and creates it again, empty.
pub async fn recreate_database(db: &TestDatabase) {
    let name = db.name().to_string();
    match db.engine() {
        Engine::Postgres => {
            let admin = std::env::var("SPIREKEEP_TEST_PG_URL")
                .unwrap_or_else(|_| "postgres://spirekeep@127.0.0.1:5432/postgres".into());
            let pool = sqlx::PgPool::connect(&admin).await.unwrap();
            for sql in [
                format!("DROP DATABASE \"{name}\" WITH (FORCE)"),
                format!("CREATE DATABASE \"{name}\""),
            ] {
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .execute(&pool)
                    .await
                    .unwrap();
            }
            pool.close().await;
        }
        Engine::Mysql => {
            let admin = std::env::var("SPIREKEEP_TEST_MYSQL_URL")
                .unwrap_or_else(|_| "mysql://spirekeep@127.0.0.1:3306/".into());
            let pool = sqlx::MySqlPool::connect(&admin).await.unwrap();
            for sql in [
                format!("DROP DATABASE `{name}`"),
                format!("CREATE DATABASE `{name}`"),
            ] {
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .execute(&pool)
                    .await
                    .unwrap();
            }
            pool.close().await;
        }
        Engine::Sqlite => unreachable!(),
    }
}

/// MariaDB's information_schema text, read as bytes (its VARBINARY-ish
/// columns do not always decode as String).
type BinaryColumnDefault = (Vec<u8>, Vec<u8>, Option<Vec<u8>>);
type BinaryTableOptions = (Vec<u8>, Option<Vec<u8>>, Option<Vec<u8>>, Option<Vec<u8>>);

/// `table.column` → the column's default as the engine reports it.
pub async fn column_defaults(
    url: &str,
    engine: Engine,
) -> std::collections::BTreeMap<String, Option<String>> {
    let rows: Vec<(String, String, Option<String>)> = match engine {
        Engine::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&format!("sqlite://{url}"))
                .await
                .unwrap();
            let rows = sqlx::query_as(
                "SELECT m.name, p.name, p.dflt_value FROM sqlite_master m, pragma_table_info(m.name) p \
                 WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%'",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            pool.close().await;
            rows
        }
        Engine::Postgres => {
            let pool = sqlx::PgPool::connect(url).await.unwrap();
            let rows = sqlx::query_as(
                "SELECT table_name::text, column_name::text, column_default::text FROM information_schema.columns \
                 WHERE table_schema = current_schema()",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            pool.close().await;
            rows
        }
        Engine::Mysql => {
            let pool = sqlx::MySqlPool::connect(url).await.unwrap();
            let rows: Vec<BinaryColumnDefault> = sqlx::query_as(
                "SELECT CAST(table_name AS BINARY), CAST(column_name AS BINARY), CAST(column_default AS BINARY) \
                 FROM information_schema.columns WHERE table_schema = DATABASE()",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            pool.close().await;
            let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
            rows.into_iter()
                .map(|(t, c, d)| (text(t), text(c), d.map(text)))
                .collect()
        }
    };
    rows.into_iter()
        .map(|(t, c, d)| (format!("{t}.{c}"), d))
        .collect()
}

/// MySQL: `table` → (engine, row format, collation); empty elsewhere.
pub async fn table_options(
    url: &str,
    engine: Engine,
) -> std::collections::BTreeMap<String, String> {
    if engine != Engine::Mysql {
        return std::collections::BTreeMap::new();
    }
    let pool = sqlx::MySqlPool::connect(url).await.unwrap();
    let rows: Vec<BinaryTableOptions> = sqlx::query_as(
        "SELECT CAST(table_name AS BINARY), CAST(engine AS BINARY), CAST(row_format AS BINARY), \
         CAST(table_collation AS BINARY) FROM information_schema.tables WHERE table_schema = DATABASE()",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    let text = |b: Option<Vec<u8>>| {
        b.map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    rows.into_iter()
        .map(|(t, e, r, c)| {
            (
                String::from_utf8_lossy(&t).into_owned(),
                format!("{} {} {}", text(e), text(r), text(c)),
            )
        })
        .collect()
}
