//! `spire-standin server`: a SPIRE server as spirekeep sees one.
//!
//! At start it applies SPIRE's start-up rules to the real datastore
//! ([`crate::migrate`]); then it serves, on one loopback listener:
//!
//! - `/live`, `/ready`: 200 or 500 with per-subsystem JSON details, like
//!   SPIRE's health listener. `/ready` runs a cheap query on every request,
//!   so it fails as soon as the datastore is unreachable;
//! - `/metrics`: Prometheus text with SPIRE's real metric names;
//! - `/attest?spiffe_id=&version=&attestor=`: records an agent in
//!   `attested_node_entries` (what SPIRE's `AttestAgent` RPC does to the
//!   datastore) and counts the call;
//! - `/renew?spiffe_id=`: the agent's periodic SVID renewal; answers while
//!   the server is ready, and counts the call.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use spirekeep::compat::{ReleaseTable, StartupOutcome};
use spirekeep::datastore::{self, Datastore, Engine, OpenMode, dsn};
use time::OffsetDateTime;
use tokio::net::TcpListener;

use crate::http::{self, Request, Response};
use crate::log;
use crate::metrics::Registry;
use crate::migrate::{self, StartError};
use crate::sql;
use crate::state::{HealthClock, StateDir};

/// How long a readiness query may take before the datastore counts as down.
const READY_QUERY_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// The member's state directory (`version` file and fault switches).
    #[arg(long)]
    state_dir: PathBuf,
    /// The datastore's connection string, as SPIRE's `connection_string`
    /// takes it (SQLite path or file: URI, lib/pq string or URL, go-sql-driver DSN).
    #[arg(long)]
    datastore: String,
    /// SPIRE's `database_type` (sqlite3, postgres, mysql); guessed from the
    /// connection string when absent.
    #[arg(long)]
    database_type: Option<String>,
    /// Loopback address for health checks, metrics and the agent API.
    #[arg(long)]
    listen: SocketAddr,
    /// The trust domain (`example.org` or `spiffe://example.org`).
    #[arg(long, default_value = "example.org")]
    trust_domain: String,
    /// SPIRE's `disable_migration = true`.
    #[arg(long)]
    disable_migration: bool,
    /// The `host` label on every metric (default: the state directory's name).
    #[arg(long)]
    hostname: Option<String>,
    /// Leave the `host` label out (SPIRE's `EnableHostnameLabel = false`).
    #[arg(long)]
    no_hostname_label: bool,
}

struct Server {
    ds: Box<dyn Datastore>,
    engine: Engine,
    trust_domain: String,
    /// Whether the running release has `AttestedNode.AgentVersion` (v1.14.3+, schema 24).
    code_has_agent_version: bool,
    health: HealthClock,
    metrics: Registry,
}

/// Exit codes: 0 after a signal, 1 when the server cannot start (SPIRE's
/// refusals included), 2 when the `half-migrate` fault crashes it.
pub async fn run(args: ServerArgs) -> u8 {
    match start(args).await {
        Ok(()) => 0,
        Err(Failure::Exit(code)) => code,
        Err(Failure::Error(e)) => {
            log::error("Fatal run error", &[("error", &format!("{e:#}"))]);
            eprintln!("server failed to start: {e:#}");
            1
        }
    }
}

enum Failure {
    Exit(u8),
    Error(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Self::Error(e)
    }
}

async fn start(args: ServerArgs) -> Result<(), Failure> {
    let state = StateDir::open(&args.state_dir)?;
    let faults = state.faults()?;
    if let Some(msg) = &faults.fail_start {
        log::error("Fatal run error", &[("error", msg)]);
        eprintln!("server failed to start: {msg}");
        return Err(Failure::Exit(1));
    }
    http::require_loopback(&args.listen)?;
    let installed = state.installed_version()?;
    let reported = state.reported_version(&faults)?;
    let code = ReleaseTable::builtin().get(&installed).with_context(|| {
        format!(
            "SPIRE {installed} is not a release spirekeep knows (migrations-check/releases.csv)"
        )
    })?;
    let trust_domain = args
        .trust_domain
        .strip_prefix("spiffe://")
        .unwrap_or(&args.trust_domain)
        .to_string();
    if trust_domain.is_empty()
        || !trust_domain
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))
    {
        return Err(anyhow::anyhow!("invalid trust domain {:?}", args.trust_domain).into());
    }
    log::info(
        "Starting SPIRE server",
        &[
            ("version", &reported),
            ("trust_domain_id", &format!("spiffe://{trust_domain}")),
        ],
    );

    let engine = match &args.database_type {
        Some(t) => Some(Engine::from_database_type(t).map_err(anyhow::Error::from)?),
        None => None,
    };
    let workdir = std::env::current_dir().context("reading the working directory")?;
    let spec = dsn::parse(&args.datastore, engine, &workdir).map_err(anyhow::Error::from)?;
    if let dsn::ConnectionSpec::Mysql(m) = &spec
        && !m.parse_time
    {
        // SPIRE's own check (spire-reference §1).
        return Err(anyhow::anyhow!(
            "datastore-sql: invalid mysql config: missing parseTime=true param in connection_string"
        )
        .into());
    }
    log::info(
        "Opening SQL database",
        &[
            ("db_type", spec.engine().spire_name()),
            ("subsystem_name", "sql"),
        ],
    );
    let ds = datastore::open(&spec, OpenMode::Create)
        .await
        .map_err(|e| anyhow::anyhow!("datastore-sql: {e}"))?;

    let outcome = match migrate::startup(
        ds.as_ref(),
        code,
        args.disable_migration,
        faults.half_migrate,
    )
    .await
    {
        Ok(o) => o,
        Err(StartError::Refused(refusal)) => {
            // SPIRE logs the error and `spire-server run` exits 1.
            let msg = format!("datastore-sql: {refusal}");
            log::error("Fatal run error", &[("error", &msg)]);
            eprintln!("server failed to start: {msg}");
            ds.close().await;
            return Err(Failure::Exit(1));
        }
        Err(StartError::HalfMigrated { from, to }) => {
            log::error(
                "half-migrate fault: crashing after the DDL of a migration step, before the migrations row",
                &[
                    ("from_schema", &from.to_string()),
                    ("to_schema", &to.to_string()),
                ],
            );
            eprintln!("server crashed while migrating schema {from} to {to} (half-migrate fault)");
            // A crash: no clean shutdown of the pool.
            return Err(Failure::Exit(2));
        }
        Err(StartError::Failed(e)) => {
            ds.close().await;
            return Err(Failure::Error(e.context("datastore-sql")));
        }
    };
    log_outcome(&outcome);

    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let host = (!args.no_hostname_label)
        .then(|| args.hostname.clone().unwrap_or_else(|| state.member_name()));
    let metrics = Registry::new("spire_server", host);
    let td_id = format!("spiffe://{trust_domain}");
    metrics.set_gauge(
        "started",
        &[("version", &reported), ("trust_domain_id", &td_id)],
        1.0,
    );
    // The CA manager prepares and activates an X.509 CA and a JWT key at start.
    let t0 = Instant::now();
    for key in [
        "ca.manager.x509_ca.prepare",
        "ca.manager.x509_ca.activate",
        "ca.manager.jwt_key.prepare",
        "manager.jwt_key.activate",
    ] {
        metrics.call(key, "OK", t0.elapsed().as_secs_f64() * 1000.0);
    }
    let server = Arc::new(Server {
        ds,
        engine: spec.engine(),
        trust_domain,
        code_has_agent_version: code.schema >= 24,
        health: HealthClock::new(faults.unhealthy_after),
        metrics,
    });
    log::info(
        "Serving health checks, metrics and the agent API",
        &[("address", &args.listen.to_string())],
    );
    let handler_server = Arc::clone(&server);
    let serving = tokio::spawn(http::serve(listener, move |req| {
        let s = Arc::clone(&handler_server);
        async move { s.handle(req).await }
    }));
    crate::wait_for_shutdown().await;
    log::info("Stopping SPIRE server", &[]);
    serving.abort();
    server.ds.close().await;
    Ok(())
}

fn log_outcome(outcome: &StartupOutcome) {
    let row = outcome.row_after();
    let fields = [
        (
            "schema",
            row.map(|r| r.schema.to_string()).unwrap_or_default(),
        ),
        (
            "code_version",
            row.map(|r| r.code_version.clone()).unwrap_or_default(),
        ),
    ];
    let what = match outcome {
        StartupOutcome::Initialized { .. } => "initialised a new datastore",
        StartupOutcome::UpToDate {
            code_version_bumped: true,
            ..
        } => "schema up to date; code_version raised",
        StartupOutcome::UpToDate { .. } => "schema up to date",
        StartupOutcome::StartedWithoutMigrating { .. } => {
            "disable_migration: running on the schema as it is"
        }
        StartupOutcome::SchemaAhead { .. } => "running on a newer schema",
        StartupOutcome::Migrated { .. } => "migrated",
        StartupOutcome::Refused { .. } => "refused",
    };
    let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    log::info(&format!("Datastore start-up: {what}"), &fields);
}

impl Server {
    async fn handle(&self, req: Request) -> Response {
        match req.path.as_str() {
            "/live" => self.live(),
            "/ready" => self.ready().await,
            "/metrics" => {
                let uptime_ms = (self.health.uptime().as_secs_f64() * 1000.0).floor();
                self.metrics.set_gauge("uptime_in_ms", &[], uptime_ms);
                Response {
                    status: 200,
                    content_type: "text/plain; version=0.0.4; charset=utf-8",
                    body: self.metrics.render(),
                }
            }
            "/attest" => self.attest(&req).await,
            "/renew" => self.renew(&req).await,
            _ => Response::text(404, "404 page not found\n"),
        }
    }

    fn live(&self) -> Response {
        match self.health.fault() {
            None => Response::json(200, &healthy_details()),
            Some(why) => Response::json(500, &details_with("server", &why)),
        }
    }

    /// `None` when ready, else which subsystem is not and why.
    async fn not_ready(&self) -> Option<(&'static str, String)> {
        if let Some(why) = self.health.fault() {
            return Some(("server", why));
        }
        // SPIRE's datastore check is ListBundles; counting bundles is as cheap.
        match tokio::time::timeout(READY_QUERY_TIMEOUT, self.ds.count_rows("bundles")).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(("catalog.datastore", e.to_string())),
            Err(_) => Some((
                "catalog.datastore",
                format!("no answer within {} s", READY_QUERY_TIMEOUT.as_secs()),
            )),
        }
    }

    async fn ready(&self) -> Response {
        match self.not_ready().await {
            None => Response::json(200, &healthy_details()),
            Some((subsystem, why)) => Response::json(500, &details_with(subsystem, &why)),
        }
    }

    async fn attest(&self, req: &Request) -> Response {
        const KEY: &str = "rpc.agent.v1.agent.attest_agent";
        let t0 = Instant::now();
        let (status, resp) = self.attest_inner(req).await;
        self.metrics
            .call(KEY, status, t0.elapsed().as_secs_f64() * 1000.0);
        if status != "OK" {
            log::warn(
                "Agent attestation failed",
                &[
                    ("status", status),
                    ("spiffe_id", req.param("spiffe_id").unwrap_or_default()),
                ],
            );
        }
        resp
    }

    async fn attest_inner(&self, req: &Request) -> (&'static str, Response) {
        let invalid = |m: String| ("InvalidArgument", grpc_error(400, "InvalidArgument", &m));
        let Some(spiffe_id) = req.param("spiffe_id") else {
            return invalid("missing spiffe_id".into());
        };
        if let Err(m) = valid_agent_id(spiffe_id, &self.trust_domain) {
            return invalid(m);
        }
        let version = req.param("version").unwrap_or_default();
        if !version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+'))
            || version.len() > 64
        {
            return invalid(format!("invalid agent version {version:?}"));
        }
        let attestor = req.param("attestor").unwrap_or("join_token");
        if attestor.is_empty()
            || attestor.len() > 64
            || !attestor
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return invalid(format!("invalid attestor {attestor:?}"));
        }
        if let Some(why) = self.health.fault() {
            return ("Unavailable", grpc_error(503, "Unavailable", &why));
        }
        match self.record_agent(spiffe_id, version, attestor).await {
            Ok((serial, expires)) => {
                log::info(
                    "Agent attestation request completed",
                    &[
                        ("spiffe_id", spiffe_id),
                        ("agent_version", version),
                        ("node_attestor_type", attestor),
                    ],
                );
                (
                    "OK",
                    Response::json(
                        200,
                        &serde_json::json!({
                            "spiffe_id": spiffe_id,
                            "serial_number": serial,
                            "expires_at": expires,
                        }),
                    ),
                )
            }
            Err(e) => (
                "Internal",
                grpc_error(500, "Internal", &format!("failed to record the agent: {e}")),
            ),
        }
    }

    /// Writes the agent's row (insert or update by SPIFFE ID) and its event
    /// row, as SPIRE's datastore does on attestation. Returns the serial
    /// number and expiry of the new agent SVID.
    async fn record_agent(
        &self,
        spiffe_id: &str,
        version: &str,
        attestor: &str,
    ) -> Result<(String, String)> {
        let e = self.engine;
        let now = OffsetDateTime::now_utc();
        let expires = now + time::Duration::hours(1);
        let serial = now.unix_timestamp_nanos().unsigned_abs().to_string();
        let ts = sql::timestamp(e, now);
        let mut values: Vec<(&str, String)> = vec![
            ("created_at", ts.clone()),
            ("updated_at", ts.clone()),
            ("spiffe_id", sql::string(e, spiffe_id)),
            ("data_type", sql::string(e, attestor)),
            ("serial_number", sql::string(e, &serial)),
            ("expires_at", sql::timestamp(e, expires)),
            ("new_serial_number", sql::string(e, "")),
            ("new_expires_at", "NULL".into()),
            // join_token agents cannot re-attest; the others can.
            (
                "can_reattest",
                sql::boolean(e, attestor != "join_token").into(),
            ),
        ];
        let mut update = vec![
            "updated_at",
            "data_type",
            "serial_number",
            "expires_at",
            "new_serial_number",
            "new_expires_at",
            "can_reattest",
        ];
        // SPIRE >= 1.14.3 stores the version the agent reports (spire-reference §5);
        // the column must exist (a server started with disable_migration may
        // run on an older schema).
        if self.code_has_agent_version
            && self
                .ds
                .catalogue()
                .await?
                .has_column("attested_node_entries", "agent_version")
        {
            values.push(("agent_version", sql::string(e, version)));
            update.push("agent_version");
        }
        let upsert = sql::upsert(e, "attested_node_entries", "spiffe_id", &values, &update);
        let event = sql::insert(
            e,
            "attested_node_entries_events",
            &[
                ("created_at", ts.clone()),
                ("updated_at", ts),
                ("spiffe_id", sql::string(e, spiffe_id)),
            ],
        );
        match e {
            // One simple-query string is one implicit transaction on PostgreSQL.
            Engine::Postgres => {
                self.ds
                    .execute_script(&format!("{upsert};\n{event};"))
                    .await?
            }
            // Elsewhere a failed script would leave an explicit transaction
            // open on a pooled connection: two autocommit statements instead
            // (the node row, which matters, is one atomic statement).
            Engine::Sqlite | Engine::Mysql => {
                self.ds.execute_script(&upsert).await?;
                self.ds.execute_script(&event).await?;
            }
        }
        Ok((serial, spirekeep::datastore::timefmt::canonical(expires)))
    }

    async fn renew(&self, req: &Request) -> Response {
        const KEY: &str = "rpc.agent.v1.agent.renew_agent";
        let t0 = Instant::now();
        let (status, resp) = match req.param("spiffe_id") {
            None => (
                "InvalidArgument",
                grpc_error(400, "InvalidArgument", "missing spiffe_id"),
            ),
            Some(id) => match valid_agent_id(id, &self.trust_domain) {
                Err(m) => ("InvalidArgument", grpc_error(400, "InvalidArgument", &m)),
                Ok(()) => match self.not_ready().await {
                    None => (
                        "OK",
                        Response::json(200, &serde_json::json!({ "spiffe_id": id })),
                    ),
                    Some((_, why)) => ("Unavailable", grpc_error(503, "Unavailable", &why)),
                },
            },
        };
        self.metrics
            .call(KEY, status, t0.elapsed().as_secs_f64() * 1000.0);
        resp
    }
}

/// The subsystems SPIRE's server registers health checks for.
const SUBSYSTEMS: [&str; 4] = [
    "catalog.datastore",
    "server",
    "server.ca",
    "server.ca.rotator",
];

fn healthy_details() -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = SUBSYSTEMS
        .iter()
        .map(|s| ((*s).to_string(), serde_json::json!({})))
        .collect();
    serde_json::Value::Object(map)
}

fn details_with(subsystem: &str, why: &str) -> serde_json::Value {
    let mut v = healthy_details();
    v[subsystem] = serde_json::json!({ "err": why });
    v
}

fn grpc_error(http_status: u16, code: &str, message: &str) -> Response {
    Response::json(
        http_status,
        &serde_json::json!({ "code": code, "message": message }),
    )
}

/// An agent ID in `trust_domain`: `spiffe://<td>/<path>`, path segments of
/// letters, digits, `.`, `-`, `_` (the SPIFFE ID charset).
fn valid_agent_id(id: &str, trust_domain: &str) -> Result<(), String> {
    let prefix = format!("spiffe://{trust_domain}/");
    let Some(path) = id.strip_prefix(&prefix) else {
        return Err(format!(
            "{id:?} is not an ID in trust domain {trust_domain:?}"
        ));
    };
    let ok = !path.is_empty()
        && id.len() <= 255
        && path.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        });
    if ok {
        Ok(())
    } else {
        Err(format!("{id:?} is not a valid SPIFFE ID"))
    }
}
