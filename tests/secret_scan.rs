//! No secret anywhere (issue 15, item 5): one test drives every command with
//! distinctive passwords, S3 keys, a Pushgateway password and a join token,
//! in both log formats and with `--json`, and scans everything that comes
//! out:
//!
//! - stdout and stderr of every command (text and JSON logs, `-vv`);
//! - every object the S3 server holds for the run, by its own HTTP API: the
//!   headers (metadata) of all of them, the whole body of manifests, pins,
//!   locks and records, and the decompressed rows of data objects (where only
//!   the join token may appear: it is data);
//! - the metrics: the `agent`'s `/metrics`, the one-shot textfile and what
//!   the Pushgateway took;
//! - the plan, its journal and the status report of an `apply`;
//! - the argument list, the parent's argument list and the environment of
//!   every process `apply` starts (a recorder wraps each command and gate).
//!
//! An age identity is key material too: encrypted backups, `verify` and
//! `restore` with the identity file, a refused wrong identity, `keygen` and
//! `agent`/`apply` with recipients and an identity from the environment
//! must never show the identity's secret key.
//!
//! The scan proves it can see: the join token must be found in the data
//! objects, and the recorder must have run.

mod common;
mod upgrade;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{SpireFixture, spirekeep, stderr, stdout, test_password};
use spirekeep::datastore::Engine;
use spirekeep::datastore::testkit::{Population, services_required};
use upgrade::{Fleet, PlanOpts, Store, free_port, http_get};

/// Distinctive S3 credentials (moto accepts any).
const S3_KEY_ID: &str = "AKIASECRETSCAN0000042";
const S3_SECRET: &str = "s3-secret-scan-Zq81Lm";
const S3_TOKEN: &str = "s3-session-scan-Tk55Wd";
/// The Pushgateway's basic-auth password, in its URL.
const PUSH_PASSWORD: &str = "pgw-pass-scan-Hy62";
/// A wrong PostgreSQL password (refused) and a MySQL DSN's password (the
/// server is not there): neither may be echoed.
const WRONG_PASSWORD: &str = "wrong-pass-scan-Ue90";
const MYSQL_PASSWORD: &str = "my-pass-scan-Rc73";
/// A live, unexpired join token in the datastore: it may appear only inside
/// data objects (it is the data), never in a report, log or manifest.
const JOIN_TOKEN: &str = "jt-secret-scan-5b0d2c9e";

fn s3_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("AWS_ACCESS_KEY_ID", S3_KEY_ID),
        ("AWS_SECRET_ACCESS_KEY", S3_SECRET),
        ("AWS_SESSION_TOKEN", S3_TOKEN),
    ]
}

/// The secret key line of the age identity the test generates
/// (`AGE-SECRET-KEY-1…`), once `keygen` has written it.
static AGE_SECRET_KEY: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Every secret, and whether it may appear in a data object's rows.
fn secrets() -> Vec<(String, bool)> {
    let mut s: Vec<(String, bool)> = [
        S3_KEY_ID,
        S3_SECRET,
        S3_TOKEN,
        PUSH_PASSWORD,
        WRONG_PASSWORD,
        MYSQL_PASSWORD,
    ]
    .iter()
    .map(|s| ((*s).to_string(), false))
    .collect();
    s.push((JOIN_TOKEN.into(), true));
    if let Some(key) = AGE_SECRET_KEY.get() {
        // The whole key, and its payload alone (after the fixed prefix).
        s.push((key.clone(), false));
        s.push((key["AGE-SECRET-KEY-1".len()..].to_string(), false));
    }
    // The fallback password is also the user name, which may appear.
    let password = test_password();
    if password != "spirekeep" {
        s.push((password, false));
    }
    s
}

/// Collects what it scanned and every secret it found.
#[derive(Default)]
struct Scan {
    findings: Vec<String>,
    scanned: usize,
    join_token_in_data: bool,
    /// Data objects stored encrypted (and read back with the identity).
    encrypted_objects: usize,
}

impl Scan {
    fn text(&mut self, what: &str, text: &str) {
        self.scanned += 1;
        for (secret, _) in secrets() {
            if text.contains(&secret) {
                self.findings.push(format!(
                    "{what} holds {secret:?}:\n{}",
                    excerpt(text, &secret)
                ));
            }
        }
    }

    /// Rows of a data object: only what is data may be there.
    fn data(&mut self, what: &str, rows: &[u8]) {
        self.scanned += 1;
        let text = String::from_utf8_lossy(rows);
        for (secret, is_data) in secrets() {
            if !text.contains(&secret) {
                continue;
            }
            if is_data {
                self.join_token_in_data = true;
            } else {
                self.findings.push(format!("{what} holds {secret:?}"));
            }
        }
    }

    fn output(&mut self, what: &str, out: &Output) {
        self.text(&format!("{what}: stdout"), &stdout(out));
        self.text(&format!("{what}: stderr"), &stderr(out));
        assert!(
            !stderr(out).contains("panicked"),
            "{what} panicked:\n{}",
            stderr(out)
        );
    }

    fn file(&mut self, what: &str, path: &Path) {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        self.text(
            &format!("{what} {}", path.display()),
            &String::from_utf8_lossy(&bytes),
        );
    }
}

fn excerpt(text: &str, secret: &str) -> String {
    let at = text.find(secret).unwrap_or(0);
    let start = text[..at]
        .char_indices()
        .rev()
        .nth(200)
        .map_or(0, |(i, _)| i);
    let end = text[at..]
        .char_indices()
        .nth(200 + secret.len())
        .map_or(text.len(), |(i, _)| at + i);
    text[start..end].to_string()
}

/// The S3 test server and a fresh prefix on it.
struct S3Prefix {
    endpoint: String,
    bucket: String,
    prefix: String,
}

impl S3Prefix {
    fn new(test: &str) -> Option<Self> {
        let Ok(endpoint) = std::env::var("SPIREKEEP_TEST_S3_ENDPOINT") else {
            assert!(
                !services_required(),
                "SPIREKEEP_TEST_S3_ENDPOINT is not set"
            );
            return None;
        };
        let bucket =
            std::env::var("SPIREKEEP_TEST_S3_BUCKET").unwrap_or_else(|_| "spirekeep-test".into());
        let n: u32 = rand::random();
        Some(Self {
            endpoint,
            bucket,
            prefix: format!("spirekeep-tests/{test}-{n:08x}"),
        })
    }

    fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    fn args(&self) -> Vec<String> {
        vec![
            "--repo".into(),
            self.url(),
            "--s3-endpoint".into(),
            self.endpoint.clone(),
        ]
    }

    /// The S3 server, through object_store's own client (signed requests,
    /// as the server wants), not through spirekeep's repository code.
    fn client(&self) -> object_store::aws::AmazonS3 {
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_bucket_name(&self.bucket)
            .with_region("us-east-1")
            .with_access_key_id("scan")
            .with_secret_access_key("scan")
            .build()
            .unwrap()
    }

    /// Scans every object: its attributes (metadata) always, its body by kind.
    async fn scan(&self, scan: &mut Scan, identity: Option<&Path>) -> usize {
        use futures::TryStreamExt;
        use object_store::{ObjectStore, ObjectStoreExt};
        let client = self.client();
        let prefix = object_store::path::Path::from(self.prefix.as_str());
        let objects: Vec<_> = client.list(Some(&prefix)).try_collect().await.unwrap();
        for meta in &objects {
            let key = meta.location.to_string();
            let got = client.get(&meta.location).await.unwrap();
            let attributes: String = got
                .attributes
                .iter()
                .map(|(k, v)| format!("{k:?}: {}\n", v.as_ref()))
                .collect();
            scan.text(
                &format!("s3 object {key}: metadata"),
                &format!(
                    "{attributes}e_tag: {:?}\nversion: {:?}\n",
                    meta.e_tag, meta.version
                ),
            );
            let body = got.bytes().await.unwrap();
            if key.ends_with(".zst.age") {
                // The ciphertext as stored, then the rows it holds.
                scan.data(&format!("s3 encrypted object {key}"), &body);
                let identities = spirekeep::store::crypt::Identities::from_file(
                    identity.expect("an encrypted object, and no identity to read it"),
                )
                .unwrap();
                let plain = identities.open(&body[..]).unwrap();
                let rows = zstd::decode_all(plain)
                    .unwrap_or_else(|e| panic!("{key} does not decrypt to zstd: {e}"));
                scan.data(&format!("s3 data object {key}, decrypted"), &rows);
                scan.encrypted_objects += 1;
            } else if key.ends_with(".zst") {
                let rows = zstd::decode_all(&body[..])
                    .unwrap_or_else(|e| panic!("{key} is not zstd: {e}"));
                scan.data(&format!("s3 data object {key}"), &rows);
            } else {
                scan.text(
                    &format!("s3 object {key}: body"),
                    &String::from_utf8_lossy(&body),
                );
            }
        }
        objects.len()
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A real Pushgateway on a free port: its address.
fn start_pushgateway() -> Option<(KillOnDrop, String)> {
    let found = Command::new("sh")
        .args(["-c", "command -v prometheus-pushgateway"])
        .output()
        .ok()
        .filter(|o| o.status.success());
    let Some(found) = found else {
        assert!(
            !services_required(),
            "prometheus-pushgateway is not installed"
        );
        return None;
    };
    let bin = stdout(&found).trim().to_string();
    let addr = format!("127.0.0.1:{}", free_port());
    let child = Command::new(bin)
        .arg(format!("--web.listen-address={addr}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let guard = KillOnDrop(child);
    let start = Instant::now();
    while http_get(&addr, "/-/ready").is_none_or(|(s, _)| s != 200) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the Pushgateway did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Some((guard, addr))
}

/// `spirekeep agent` on a 2-second schedule until it has backed up once:
/// its output and its `/metrics`.
fn run_agent(
    log_args: &[&str],
    datastore: &str,
    repo: &[String],
    env: &[(String, String)],
) -> (Output, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut args: Vec<&str> = log_args.to_vec();
    args.extend([
        "agent",
        "--datastore",
        datastore,
        "--listen",
        &addr,
        "--schedule",
        "*/2 * * * * *",
        "--keep-last",
        "5",
    ]);
    args.extend(repo.iter().map(String::as_str));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_spirekeep"));
    for (key, _) in std::env::vars() {
        if key.starts_with("SPIREKEEP_") && !key.starts_with("SPIREKEEP_TEST_") {
            cmd.env_remove(key);
        }
    }
    let child = cmd
        .args(&args)
        .envs(s3_env())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut guard = KillOnDrop(child);
    let start = Instant::now();
    let metrics = loop {
        if let Some((200, text)) = http_get(&addr, "/metrics")
            && text.contains("spirekeep_backup_last_success_timestamp_seconds")
        {
            break text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the agent did not back up within 60 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let pid = guard.0.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let start = Instant::now();
    while guard.0.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the agent did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut out = Output {
        status: guard.0.wait().unwrap(),
        stdout: Vec::new(),
        stderr: Vec::new(),
    };
    guard
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut out.stdout)
        .unwrap();
    guard
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_end(&mut out.stderr)
        .unwrap();
    (out, metrics)
}

/// A script that records its argument list, its parent's and its
/// environment into `dir`, then runs its arguments.
fn recorder(dir: &Path) -> PathBuf {
    let script = dir.join("record.sh");
    let body = format!(
        "#!/bin/sh\nf=\"{}/$$.$(date +%s%N).rec\"\n\
         {{ printf 'argv:'; printf ' %s' \"$@\"; printf '\\nparent argv: '; \
         tr '\\000' ' ' < /proc/$PPID/cmdline; printf '\\nenv:\\n'; env; }} > \"$f\"\n\
         exec \"$@\"\n",
        dir.display()
    );
    std::fs::write(&script, body).unwrap();
    let _ = Command::new("chmod").arg("+x").arg(&script).status();
    script
}

/// The data commands, each run with `log_args` and the output recorded.
#[allow(clippy::too_many_arguments)]
fn data_commands(
    log_args: &[&str],
    json: bool,
    url: &str,
    spire_conf: &str,
    repo: &[String],
    scratch: &str,
    textfile: &str,
    pushgateway: &str,
) -> Vec<(String, Output)> {
    let wrong = format!(
        "postgres://spirekeep_auth:{WRONG_PASSWORD}@127.0.0.1:5432/postgres?sslmode=disable"
    );
    let mysql = format!("spirekeep:{MYSQL_PASSWORD}@tcp(127.0.0.1:1)/spire?parseTime=true");
    let unreachable_gateway = format!("http://pgw:{PUSH_PASSWORD}@127.0.0.1:1");
    let r = |args: &[&str]| -> Vec<String> {
        args.iter()
            .map(|s| (*s).to_string())
            .chain(repo.iter().cloned())
            .collect()
    };
    let plain = |args: &[&str]| -> Vec<String> { args.iter().map(|s| (*s).to_string()).collect() };
    let run = |command: Vec<String>| -> (String, Output) {
        let mut args: Vec<&str> = log_args.to_vec();
        args.push("-vv");
        if json {
            args.push("--json");
        }
        args.extend(command.iter().map(String::as_str));
        let out = spirekeep(&args, &s3_env());
        (command.join(" "), out)
    };
    let mut outputs: Vec<(String, Output)> = vec![
        plain(&["inspect", "--datastore", url]),
        plain(&["inspect", "--spire-config", spire_conf]),
        plain(&["check", "--datastore", url, "--target", "1.15.3"]),
        r(&[
            "backup",
            "--datastore",
            url,
            "--label",
            "secretscan",
            "--metrics-textfile",
            textfile,
            "--pushgateway",
            pushgateway,
        ]),
        r(&["list"]),
        r(&["show", "latest"]),
        r(&["verify", "latest", "--deep"]),
        r(&["restore", "latest", "--datastore", scratch]),
        r(&[
            "restore",
            "latest",
            "--datastore",
            url,
            "--replace",
            "--dry-run",
        ]),
        r(&[
            "pin",
            "add",
            "latest",
            "--holder",
            "scan",
            "--reason",
            "secret scan",
        ]),
    ]
    .into_iter()
    .map(run)
    .collect();
    // pin remove takes an id, not "latest".
    let show = spirekeep(
        &r(&["--json", "show", "latest"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        &s3_env(),
    );
    let shown: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    let id = shown["summary"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no summary.id in `show --json`"))
        .to_string();
    let commands: Vec<Vec<String>> = vec![
        r(&["pin", "list"]),
        r(&["pin", "remove", &id, "--holder", "scan"]),
        r(&["lock", "show"]),
        r(&["prune", "--keep-last", "1", "--dry-run"]),
        // Failures: each must fail without echoing what it was given.
        plain(&["inspect", "--datastore", &wrong]),
        plain(&["inspect", "--datastore", &mysql]),
        r(&[
            "backup",
            "--datastore",
            url,
            "--pushgateway",
            &unreachable_gateway,
        ]),
        plain(&[
            "backup",
            "--datastore",
            url,
            "--pushgateway",
            &format!("ftp://u:{PUSH_PASSWORD}@x"),
        ]),
    ];
    outputs.extend(commands.into_iter().map(run));
    outputs
}

/// The encrypted path: a backup to an age recipient, then list, show,
/// verify without and with the identity, a restore with it, and a restore
/// refused for a wrong identity; each run with `log_args`.
#[allow(clippy::too_many_arguments)]
fn age_commands(
    log_args: &[&str],
    json: bool,
    url: &str,
    repo: &[String],
    recipient: &str,
    identity: &str,
    wrong_identity: &str,
    scratch: &str,
) -> Vec<(String, Output)> {
    let commands: Vec<Vec<&str>> = vec![
        vec!["keygen", "-y", identity],
        vec!["backup", "--datastore", url, "--recipient", recipient],
        vec!["list"],
        vec!["show", "latest"],
        vec!["verify", "latest", "--deep"],
        vec!["verify", "latest", "--deep", "--identity", identity],
        vec![
            "restore",
            "latest",
            "--datastore",
            scratch,
            "--identity",
            identity,
        ],
        // Refused: the snapshot is not encrypted to this identity.
        vec![
            "restore",
            "latest",
            "--datastore",
            scratch,
            "--identity",
            wrong_identity,
        ],
    ];
    commands
        .into_iter()
        .map(|command| {
            let mut args: Vec<&str> = log_args.to_vec();
            args.push("-vv");
            if json {
                args.push("--json");
            }
            args.extend(command.iter().copied());
            if command[0] != "keygen" {
                args.extend(repo.iter().map(String::as_str));
            }
            (command.join(" "), spirekeep(&args, &s3_env()))
        })
        .collect()
}

/// plan, apply (real in one round, `--dry-run` in the other) and status on a
/// stand-in fleet whose datastore has a password; every command and gate
/// goes through the recorder.
fn upgrade_commands(
    fleet: &Fleet,
    o: &PlanOpts,
    rec: &Path,
    log_args: &[&str],
    real: bool,
    env: &[(String, String)],
) -> Vec<(String, Output)> {
    let sh = upgrade::FLEET_SH;
    let toml = fleet
        .plan_toml(o)
        .replace(&format!("= \"{sh}"), &format!("= \"{} {sh}", rec.display()))
        .replace(
            "command = \"$SPIRE_STANDIN_BIN",
            &format!("command = \"{} $SPIRE_STANDIN_BIN", rec.display()),
        );
    let plan_toml = fleet.path("plan.toml");
    std::fs::write(&plan_toml, toml).unwrap();
    let plan_json = fleet.path("plan.json");
    let (toml_s, json_s) = (plan_toml.to_str().unwrap(), plan_json.to_str().unwrap());
    let mut runs: Vec<Vec<&str>> = vec![vec!["plan", toml_s, "--out", json_s]];
    if real {
        runs.push(vec!["--json", "apply", json_s]);
    } else {
        runs.push(vec!["apply", json_s, "--dry-run"]);
    }
    runs.push(vec!["status", json_s]);
    runs.push(vec!["--json", "status", json_s]);
    runs.into_iter()
        .map(|command| {
            let mut args: Vec<&str> = log_args.to_vec();
            args.push("-vv");
            args.extend(command.iter().copied());
            let out = fleet
                .command(&args)
                .envs(s3_env())
                .envs(env.iter().map(|(k, v)| (k, v)))
                .output()
                .unwrap();
            (command.join(" "), out)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_reaches_any_output_object_metric_journal_or_child_process() {
    let Some(repo) = S3Prefix::new("secretscan") else {
        return;
    };
    let Some(apply_repo) = S3Prefix::new("secretscan-apply") else {
        return;
    };
    let Some(age_repo) = S3Prefix::new("secretscan-age") else {
        return;
    };
    let pop = Population {
        entries: 50,
        schema: 24,
        code_version: "1.14.7".into(),
        ..Population::default()
    };
    let Some(fx) = SpireFixture::create(Engine::Postgres, "secretscan", &pop).await else {
        return;
    };
    let Some((_gateway, gateway_addr)) = start_pushgateway() else {
        return;
    };
    let url = fx.url();
    assert!(
        url.contains(&test_password()),
        "the URL carries the password"
    );
    let expiry = time::OffsetDateTime::now_utc().unix_timestamp() + 86_400;
    let ds = fx.open().await;
    ds.execute_script(&format!(
        "INSERT INTO join_tokens (token, expiry) VALUES ('{JOIN_TOKEN}', {expiry})"
    ))
    .await
    .unwrap();
    ds.close().await;

    let dir = tempfile::tempdir().unwrap();
    let spire_conf = dir.path().join("server.conf");
    std::fs::write(
        &spire_conf,
        format!(
            "server {{\n  trust_domain = \"example.org\"\n}}\nplugins {{\n  DataStore \"sql\" {{\n    plugin_data {{\n      database_type = \"postgres\"\n      connection_string = \"{url}\"\n    }}\n  }}\n}}\n"
        ),
    )
    .unwrap();
    let pushgateway = format!("http://pgw:{PUSH_PASSWORD}@{gateway_addr}");

    // Age key material: an identity, and a second one the snapshots are not
    // encrypted to. keygen prints the public key only.
    let mut scan = Scan::default();
    let identity = dir.path().join("identity.txt");
    let wrong_identity = dir.path().join("wrong-identity.txt");
    let mut recipient = String::new();
    for (path, is_ours) in [(&identity, true), (&wrong_identity, false)] {
        let out = spirekeep(&["keygen", "--output", path.to_str().unwrap()], &[]);
        assert!(out.status.success(), "keygen: {}", stderr(&out));
        let key = std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .find(|l| l.starts_with("AGE-SECRET-KEY-1"))
            .expect("keygen wrote no AGE-SECRET-KEY-1 line")
            .to_string();
        if is_ours {
            AGE_SECRET_KEY.set(key).unwrap();
            recipient = stdout(&out)
                .split_whitespace()
                .find(|w| w.starts_with("age1"))
                .expect("keygen printed no age1 public key")
                .to_string();
        }
        scan.output("keygen --output", &out);
    }
    let (identity_s, wrong_identity_s) =
        (identity.to_str().unwrap(), wrong_identity.to_str().unwrap());
    // The scan sees key material: the identity file itself is a finding.
    let mut control = Scan::default();
    control.file("the identity file", &identity);
    assert!(
        !control.findings.is_empty(),
        "the scan does not recognise the age secret key"
    );
    // apply and the agent take their keys from the environment.
    let age_env: Vec<(String, String)> = vec![
        ("SPIREKEEP_AGE_RECIPIENTS".into(), recipient.clone()),
        ("SPIREKEEP_AGE_IDENTITY_FILE".into(), identity_s.into()),
    ];

    // The stand-in fleet's datastore, with a password of its own connection.
    let store = Store::create(Engine::Postgres, dir.path(), 24, "1.14.7")
        .await
        .unwrap();
    let fleet = Fleet::new(&store.conn, 1, 1, "1.14.7");
    fleet.start_all();
    let mut o = PlanOpts::new("1.15.3", &apply_repo.url());
    o.s3 = Some((apply_repo.endpoint.clone(), apply_repo.bucket.clone()));
    let rec_dir = dir.path().join("recorded");
    std::fs::create_dir_all(&rec_dir).unwrap();
    let rec = recorder(&rec_dir);

    let mut files: Vec<PathBuf> = Vec::new();
    for (round, (log_args, json)) in [
        (vec!["--log-format", "text"], false),
        (vec!["--log-format", "json"], true),
    ]
    .into_iter()
    .enumerate()
    {
        let scratch = dir.path().join(format!("restored-{round}.sqlite3"));
        let textfile = dir.path().join(format!("backup-{round}.prom"));
        let outputs = data_commands(
            &log_args,
            json,
            &url,
            spire_conf.to_str().unwrap(),
            &repo.args(),
            scratch.to_str().unwrap(),
            textfile.to_str().unwrap(),
            &pushgateway,
        );
        // Every command ran for real: a refusal would leave little to scan.
        for (what, out) in &outputs[..14] {
            // check's verdict is its exit code (1: refused, the unknown agent).
            let verdict = what.starts_with("check") && out.status.code() == Some(1);
            assert!(
                out.status.success() || verdict,
                "round {round}: {what}: {}{}",
                stdout(out),
                stderr(out)
            );
        }
        for (what, out) in &outputs {
            scan.output(&format!("round {round}: {what}"), out);
        }
        // The refused ones (the unreachable Pushgateway is only a warning).
        for i in [14, 15, 17] {
            let (what, out) = &outputs[i];
            assert!(!out.status.success(), "{what} should have failed");
        }
        files.push(textfile);

        let age_scratch = dir.path().join(format!("restored-age-{round}.sqlite3"));
        let outputs = age_commands(
            &log_args,
            json,
            &url,
            &age_repo.args(),
            &recipient,
            identity_s,
            wrong_identity_s,
            age_scratch.to_str().unwrap(),
        );
        let (refused, ran) = outputs.split_last().unwrap();
        for (what, out) in ran {
            assert!(
                out.status.success(),
                "round {round}: {what}: {}{}",
                stdout(out),
                stderr(out)
            );
        }
        assert!(
            !refused.1.status.success(),
            "{} should have failed",
            refused.0
        );
        for (what, out) in &outputs {
            scan.output(&format!("round {round}: {what}"), out);
        }

        // The agent: plaintext in the first round, encrypted in the second.
        let (out, metrics) = if round == 0 {
            run_agent(&log_args, &url, &repo.args(), &[])
        } else {
            run_agent(&log_args, &url, &age_repo.args(), &age_env)
        };
        scan.output(&format!("round {round}: agent"), &out);
        scan.text(&format!("round {round}: agent /metrics"), &metrics);

        let outputs = upgrade_commands(&fleet, &o, &rec, &log_args, json, &age_env);
        for (what, out) in &outputs {
            assert!(
                out.status.success(),
                "round {round}: {what}: {}{}",
                stdout(out),
                stderr(out)
            );
            scan.output(&format!("round {round}: {what}"), out);
        }
    }

    // What the Pushgateway holds.
    let (status, pushed) = http_get(&gateway_addr, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(pushed.contains("spirekeep_backup_last_success_timestamp_seconds"));
    scan.text("the Pushgateway's /metrics", &pushed);
    // Metric files, the plan, its journal and the apply's work directory.
    for f in &files {
        scan.file("metrics textfile", f);
    }
    for entry in std::fs::read_dir(fleet.path("")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            scan.file("plan work file", &path);
        }
    }
    assert!(
        !fleet.journal().is_empty(),
        "the apply wrote no journal: nothing was scanned"
    );
    // Every process apply started.
    let recorded: Vec<PathBuf> = std::fs::read_dir(&rec_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "rec"))
        .collect();
    assert!(
        recorded.len() >= 6,
        "the recorder ran {} times: the commands did not go through it",
        recorded.len()
    );
    for f in &recorded {
        scan.file(
            "a child process of apply (argv, parent argv, environment)",
            f,
        );
    }
    // Every object in both repositories.
    let objects = repo.scan(&mut scan, None).await
        + apply_repo.scan(&mut scan, Some(&identity)).await
        + age_repo.scan(&mut scan, Some(&identity)).await;
    assert!(objects >= 10, "only {objects} objects in the repositories");
    assert!(
        scan.encrypted_objects >= 13,
        "only {} encrypted data objects: the encrypted backups did not run",
        scan.encrypted_objects
    );
    assert!(
        scan.join_token_in_data,
        "the join token was not found in any data object: the scan does not see the rows"
    );
    assert!(
        scan.findings.is_empty(),
        "{} secret(s) found in {} things scanned:\n\n{}",
        scan.findings.len(),
        scan.scanned,
        scan.findings.join("\n\n")
    );
    eprintln!(
        "secret scan: {} outputs, files and objects scanned ({objects} objects, {} of them encrypted, {} child processes), no secret found",
        scan.scanned,
        scan.encrypted_objects,
        recorded.len()
    );
    drop(fleet);
    store.cleanup().await;
    fx.cleanup().await;
}
