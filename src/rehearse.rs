//! Upgrade rehearsal: restore a snapshot into a scratch datastore, start a
//! given `spire-server` binary on it with a generated configuration, and
//! report whether that release accepts the data, and the schema it leaves.
//!
//! This is the question `check` answers from SPIRE's rules, answered by the
//! release itself: SPIRE runs its migrations (or refuses) at start-up, before
//! its health check passes (spire-reference §4, §6). Nothing of the real
//! deployment is touched: the server gets its own socket, port, data
//! directory and an in-memory KeyManager, and the scratch is removed after.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Serialize;
use time::OffsetDateTime;
use tokio::process::{Child, Command};

use crate::datastore::{self, ConnectionSpec, Datastore, OpenMode, Value, quote_ident};
use crate::error::{Error, Result};
use crate::inspect::read_migrations;
use crate::snapshot::TableReader;
use crate::snapshot::backup::keep_lowest_id;
use crate::snapshot::manifest::Manifest;
use crate::snapshot::restore::{self, RestoreOptions};
use crate::store::Repository;
use crate::store::keys::SnapshotId;

/// The trust domain a rehearsal server runs with when the snapshot has no
/// registration entry to take it from.
pub const DEFAULT_TRUST_DOMAIN: &str = "rehearsal.spirekeep.invalid";

/// Where a rehearsal restores to.
pub enum Scratch {
    /// A temporary file datastore ([`ConnectionSpec::scratch_file`]), deleted afterwards.
    TemporaryFile,
    /// An empty datastore given by the operator: the connection string as
    /// SPIRE takes it, and its parsed form. Every table in it is dropped
    /// afterwards.
    Given {
        connection_string: String,
        spec: Box<ConnectionSpec>,
    },
}

/// How to rehearse.
pub struct RehearsalOptions {
    /// The `spire-server` binary of the release to try.
    pub spire_server: PathBuf,
    pub scratch: Scratch,
    /// The server's trust domain; `None`: the one SPIRE checks at start-up,
    /// that of the registration entry with the lowest id (SPIRE refuses to
    /// start when it differs: `validateTrustDomain` in `pkg/server/server.go`).
    pub trust_domain: Option<String>,
    /// How long the server may take to become healthy.
    pub timeout: Duration,
}

/// The `migrations` row: (schema version, code_version).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SchemaRow {
    pub schema_version: i64,
    pub code_version: String,
}

/// What a rehearsal found.
#[derive(Debug, Clone, Serialize)]
pub struct RehearsalReport {
    pub snapshot_id: SnapshotId,
    pub spire_server: String,
    /// What `spire-server --version` printed.
    pub spire_version: String,
    /// The scratch datastore, without any password.
    pub scratch: String,
    /// The trust domain the server ran with.
    pub trust_domain: String,
    /// The release started on the data and passed its health check.
    pub accepted: bool,
    /// The snapshot's `migrations` row, as restored.
    pub schema_before: Option<SchemaRow>,
    /// The row after the release ran (migrated, or unchanged when refused).
    pub schema_after: Option<SchemaRow>,
    /// SPIRE's own error when it refused to start.
    pub spire_error: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub rehearsed_at: OffsetDateTime,
    pub seconds: f64,
}

/// A temporary directory removed when dropped.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Rehearses snapshot `id` with `options.spire_server`.
///
/// A release that refuses the data is not an error: the report says
/// `accepted: false` with SPIRE's message.
///
/// # Errors
/// The binary cannot be run, the snapshot cannot be read or restored, the
/// scratch datastore is not empty or cannot be reached.
pub async fn rehearse(
    repo: &Repository,
    id: &SnapshotId,
    options: &RehearsalOptions,
) -> Result<RehearsalReport> {
    let clock = Instant::now();
    let spire_version = spire_server_version(&options.spire_server).await?;
    let manifest = Manifest::load(repo, id).await?;
    let trust_domain = match &options.trust_domain {
        Some(td) => td.clone(),
        None => first_entry_trust_domain(repo, &manifest)
            .await?
            .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_string()),
    };
    let work = make_work_dir(id)?;

    let (spec, connection_string) = match &options.scratch {
        Scratch::TemporaryFile => {
            let spec = ConnectionSpec::scratch_file(&work.0, "datastore");
            let connection_string = spec
                .local_files()
                .first()
                .map_or_else(|| spec.redacted(), |p| p.display().to_string());
            (spec, connection_string)
        }
        Scratch::Given {
            connection_string,
            spec,
        } => ((**spec).clone(), connection_string.clone()),
    };
    let scratch_display = match &options.scratch {
        Scratch::TemporaryFile => format!("{} (temporary, deleted)", spec.redacted()),
        Scratch::Given { .. } => spec.redacted(),
    };

    let ds = datastore::open(&spec, OpenMode::Create).await?;
    let existing = restore::user_tables(ds.as_ref()).await?;
    if !existing.is_empty() {
        ds.close().await;
        return Err(Error::Unsupported(format!(
            "the scratch datastore {} is not empty ({} table(s): {}); a rehearsal restores into an empty \
             datastore and drops everything in it afterwards: give an empty database",
            spec.redacted(),
            existing.len(),
            restore::name_list(&existing)
        )));
    }
    let outcome = rehearse_in(
        repo,
        &manifest,
        ds.as_ref(),
        &work.0,
        &connection_string,
        &trust_domain,
        options,
    )
    .await;
    if matches!(options.scratch, Scratch::Given { .. }) {
        empty_scratch(ds.as_ref()).await;
    }
    ds.close().await;
    let (accepted, schema_before, schema_after, spire_error) = outcome?;
    Ok(RehearsalReport {
        snapshot_id: id.clone(),
        spire_server: options.spire_server.display().to_string(),
        spire_version,
        scratch: scratch_display,
        trust_domain,
        accepted,
        schema_before,
        schema_after,
        spire_error,
        rehearsed_at: OffsetDateTime::now_utc(),
        seconds: clock.elapsed().as_secs_f64(),
    })
}

type Outcome = (bool, Option<SchemaRow>, Option<SchemaRow>, Option<String>);

async fn rehearse_in(
    repo: &Repository,
    manifest: &Manifest,
    ds: &dyn Datastore,
    work: &Path,
    connection_string: &str,
    trust_domain: &str,
    options: &RehearsalOptions,
) -> Result<Outcome> {
    // The scratch may take whatever changes its engine needs (as a deep verify does).
    let restore_options = RestoreOptions {
        accept_changes: true,
        // A scratch copy compared with the snapshot: every row comes back.
        rules: crate::snapshot::live_rules::RuleOptions {
            keep_snapshot_join_tokens: true,
            ..crate::snapshot::live_rules::RuleOptions::default()
        },
        ..RestoreOptions::default()
    };
    let plan = restore::plan(repo, manifest, ds, &restore_options, &restore::Quiet).await?;
    if let Some(refusal) = plan.refusals.first() {
        return Err(Error::Aborted(format!(
            "the rehearsal could not restore snapshot {} into {}: {}",
            manifest.snapshot_id,
            ds.location(),
            refusal.message
        )));
    }
    restore::execute_unrecorded(repo, manifest, ds, &plan, &restore::Quiet).await?;
    let before = schema_row(ds).await?;

    let config = write_config(work, ds, connection_string, trust_domain)?;
    let log_path = work.join("spire-server.log");
    tracing::info!(
        snapshot = %manifest.snapshot_id,
        spire_server = %options.spire_server.display(),
        "starting spire-server on the restored data"
    );
    let mut child = start_server(&options.spire_server, &config, work, &log_path)?;
    let socket = work.join("api.sock");
    let started = Instant::now();
    let accepted = loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| Error::Aborted(format!("cannot watch spire-server: {e}")))?
        {
            tracing::info!(%status, "spire-server exited before it was healthy");
            break false;
        }
        if healthy(&options.spire_server, &socket).await {
            break true;
        }
        if started.elapsed() > options.timeout {
            tracing::warn!("spire-server was not healthy within {:?}", options.timeout);
            break false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    stop(&mut child).await;
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let spire_error = if accepted {
        None
    } else {
        Some(spire_error(&log).unwrap_or_else(|| {
            format!(
                "spire-server was not healthy within {} s and logged no error",
                options.timeout.as_secs()
            )
        }))
    };
    let after = schema_row(ds).await?;
    Ok((accepted, before, after, spire_error))
}

/// The trust domain of the registration entry with the lowest id, the one
/// SPIRE compares with its own at start-up; `None` without entries. Reads the
/// whole table: rows are stored in the order the engine read them, not
/// always by id (see [`crate::datastore::SnapshotRead::stream_rows`]).
async fn first_entry_trust_domain(
    repo: &Repository,
    manifest: &Manifest,
) -> Result<Option<String>> {
    let (Some(data), Some(table)) = (
        manifest
            .tables
            .iter()
            .find(|t| t.name == "registered_entries"),
        manifest.catalogue.table("registered_entries"),
    ) else {
        return Ok(None);
    };
    let Some(spiffe_id_at) = table.columns.iter().position(|c| c.name == "spiffe_id") else {
        return Ok(None);
    };
    let mut first = None;
    for object in &data.objects {
        let mut reader = TableReader::open(repo, table, object).await?;
        while let Some(batch) = reader.next_batch().await? {
            keep_lowest_id(table, &mut first, &batch);
        }
    }
    Ok(match first.as_ref().and_then(|row| row.get(spiffe_id_at)) {
        Some(Value::Text(spiffe_id)) => url::Url::parse(spiffe_id)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string)),
        _ => None,
    })
}

async fn schema_row(ds: &dyn Datastore) -> Result<Option<SchemaRow>> {
    let catalogue = ds.catalogue().await?;
    let (row, _) = read_migrations(ds, &catalogue).await?;
    Ok(row.map(|r| SchemaRow {
        schema_version: r.schema_version,
        code_version: r.code_version,
    }))
}

/// Drops every table of a scratch datastore the operator gave.
async fn empty_scratch(ds: &dyn Datastore) {
    let Ok(tables) = restore::user_tables(ds).await else {
        return;
    };
    for table in tables {
        let sql = format!("DROP TABLE IF EXISTS {}", quote_ident(ds.engine(), &table));
        if let Err(e) = ds.execute_script(&sql).await {
            tracing::warn!(%table, error = %e, "could not drop a table from the scratch datastore");
        }
    }
}

fn make_work_dir(id: &SnapshotId) -> Result<WorkDir> {
    let suffix: u32 = rand::random();
    let dir = std::env::temp_dir().join(format!("spirekeep-rehearse-{id}-{suffix:08x}"));
    std::fs::create_dir(&dir).map_err(|e| {
        Error::Aborted(format!(
            "cannot create a scratch directory {} for the rehearsal: {e}; set TMPDIR",
            dir.display()
        ))
    })?;
    restrict(&dir, 0o700);
    Ok(WorkDir(dir))
}

#[cfg(unix)]
fn restrict(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
}

#[cfg(not(unix))]
fn restrict(_: &Path, _: u32) {}

/// An HCL string literal. SPIRE reads its configuration with HCL 1, where
/// `${` and `%{` are plain text.
fn hcl_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A server.conf of its own: loopback port, socket and data directory under
/// `work`, an in-memory KeyManager, the scratch datastore. It holds the
/// scratch's password, so it is readable by its owner only.
fn write_config(
    work: &Path,
    ds: &dyn Datastore,
    connection_string: &str,
    trust_domain: &str,
) -> Result<PathBuf> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::Aborted(format!("no free port on 127.0.0.1 for the rehearsal: {e}")))?;
    let data_dir = work.join("data");
    std::fs::create_dir_all(&data_dir)
        .map_err(|e| Error::Aborted(format!("cannot create {}: {e}", data_dir.display())))?;
    let conf = format!(
        "server {{\n  bind_address = \"127.0.0.1\"\n  bind_port = \"{port}\"\n  socket_path = {}\n  \
         trust_domain = {}\n  data_dir = {}\n  log_level = \"INFO\"\n}}\n\n\
         plugins {{\n  DataStore \"sql\" {{\n    plugin_data {{\n      database_type = {}\n      \
         connection_string = {}\n    }}\n  }}\n  KeyManager \"memory\" {{\n    plugin_data {{}}\n  }}\n  \
         NodeAttestor \"join_token\" {{\n    plugin_data {{}}\n  }}\n}}\n",
        hcl_string(&work.join("api.sock").display().to_string()),
        hcl_string(trust_domain),
        hcl_string(&data_dir.display().to_string()),
        hcl_string(ds.engine().spire_name()),
        hcl_string(connection_string),
    );
    let path = work.join("server.conf");
    std::fs::write(&path, conf)
        .map_err(|e| Error::Aborted(format!("cannot write {}: {e}", path.display())))?;
    restrict(&path, 0o600);
    Ok(path)
}

/// The environment a SPIRE process gets: enough to run, none of spirekeep's
/// credentials.
fn minimal_env(cmd: &mut Command) {
    cmd.env_clear();
    for key in ["PATH", "TZ", "LANG", "HOME"] {
        if let Some(v) = std::env::var_os(key) {
            cmd.env(key, v);
        }
    }
}

async fn spire_server_version(bin: &Path) -> Result<String> {
    let mut cmd = Command::new(bin);
    cmd.arg("--version").stdin(Stdio::null());
    minimal_env(&mut cmd);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .map_err(|_| {
            Error::Aborted(format!(
                "{} --version did not answer in 30 s",
                bin.display()
            ))
        })?
        .map_err(|e| {
            Error::Unsupported(format!(
                "cannot run {}: {e}; give the path of a spire-server binary with --spire-server",
                bin.display()
            ))
        })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let version = text.trim().lines().next().unwrap_or("").trim().to_string();
    if !out.status.success() || version.is_empty() {
        return Err(Error::Unsupported(format!(
            "{} --version failed ({}): is it a spire-server binary?",
            bin.display(),
            out.status
        )));
    }
    Ok(version)
}

fn start_server(bin: &Path, config: &Path, work: &Path, log_path: &Path) -> Result<Child> {
    let log = std::fs::File::create(log_path)
        .map_err(|e| Error::Aborted(format!("cannot create {}: {e}", log_path.display())))?;
    let log_err = log
        .try_clone()
        .map_err(|e| Error::Aborted(format!("cannot open {}: {e}", log_path.display())))?;
    let mut cmd = Command::new(bin);
    cmd.args(["run", "-config"])
        .arg(config)
        .current_dir(work)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .kill_on_drop(true);
    minimal_env(&mut cmd);
    cmd.spawn()
        .map_err(|e| Error::Unsupported(format!("cannot start {}: {e}", bin.display())))
}

async fn healthy(bin: &Path, socket: &Path) -> bool {
    if !socket.exists() {
        return false;
    }
    let mut cmd = Command::new(bin);
    cmd.args(["healthcheck", "-socketPath"])
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    minimal_env(&mut cmd);
    matches!(
        tokio::time::timeout(Duration::from_secs(10), cmd.status()).await,
        Ok(Ok(status)) if status.success()
    )
}

/// SIGTERM (as systemd stops SPIRE), SIGKILL after 15 s.
async fn stop(child: &mut Child) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    if tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// SPIRE's last error from its log (logrus text format): the `error="…"`
/// field of the last `level=error` line, else its `msg`.
fn spire_error(log: &str) -> Option<String> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("level=error") || l.contains("level=fatal"))?;
    field(line, "error").or_else(|| field(line, "msg"))
}

/// The value of `key="…"` (or `key=word`) in a logrus text line.
fn field(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    if let Some(quoted) = rest.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = quoted.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        out.push(n);
                    }
                }
                '"' => return Some(out),
                c => out.push(c),
            }
        }
        Some(out)
    } else {
        Some(rest.split(' ').next().unwrap_or("").to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spire_error_takes_the_error_field_of_the_last_error_line() {
        let log = "time=\"2026-12-04T17:00:00Z\" level=info msg=\"Opening SQL database\"\n\
                   time=\"2026-12-04T17:00:00Z\" level=error msg=\"Fatal run error\" error=\"datastore-sql: \
                   migrating from schema version 21 requires a previous SPIRE release; please follow the \
                   upgrade strategy at doc/upgrading.md\"\n\
                   time=\"2026-12-04T17:00:00Z\" level=info msg=\"bye\"\n";
        assert_eq!(
            spire_error(log).as_deref(),
            Some(
                "datastore-sql: migrating from schema version 21 requires a previous SPIRE release; \
                 please follow the upgrade strategy at doc/upgrading.md"
            )
        );
    }

    #[test]
    fn spire_error_falls_back_to_msg_and_unescapes() {
        let log = "level=error msg=\"bad \\\"thing\\\"\"\n";
        assert_eq!(spire_error(log).as_deref(), Some("bad \"thing\""));
        assert_eq!(spire_error("level=info msg=ok\n"), None);
    }

    #[test]
    fn hcl_strings_escape_quotes_and_backslashes() {
        assert_eq!(hcl_string(r#"a"b\c${x}"#), r#""a\"b\\c${x}""#);
    }
}
