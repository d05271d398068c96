//! `spire-standin agent`: a SPIRE agent as spirekeep sees one.
//!
//! At start it attests to the server stand-in (retrying a few times, then
//! failing to start like a real agent that cannot attest). Then it renews
//! its SVID every second through the server and serves `/live`, `/ready`
//! (ready only while the server answers) and `/metrics`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::net::TcpListener;

use crate::http::{self, Request, Response, Url};
use crate::log;
use crate::metrics::Registry;
use crate::state::{HealthClock, StateDir};

/// How long one call to the server may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the agent renews its SVID (SPIRE: at half the SVID's TTL; here
/// every second, so a stalled rotation shows within a scrape or two).
const ROTATE_EVERY: Duration = Duration::from_secs(1);

#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// The member's state directory (`version` file and fault switches).
    #[arg(long)]
    state_dir: PathBuf,
    /// The server stand-in, e.g. http://127.0.0.1:8081.
    #[arg(long)]
    server: String,
    /// This agent's SPIFFE ID, e.g. spiffe://example.org/agent/node-a.
    #[arg(long)]
    spiffe_id: String,
    /// Loopback address for health checks and metrics.
    #[arg(long)]
    listen: SocketAddr,
    /// The node attestor this agent uses (stored in `data_type`).
    #[arg(long, default_value = "join_token")]
    attestor: String,
    /// How many times to try attesting before giving up.
    #[arg(long, default_value_t = 10)]
    attest_attempts: u32,
    /// The `host` label on every metric (default: the state directory's name).
    #[arg(long)]
    hostname: Option<String>,
    /// Leave the `host` label out (SPIRE's `EnableHostnameLabel = false`).
    #[arg(long)]
    no_hostname_label: bool,
}

struct Agent {
    server: Url,
    spiffe_id: String,
    health: HealthClock,
    metrics: Registry,
}

/// Exit codes: 0 after a signal, 1 when the agent cannot start.
pub async fn run(args: AgentArgs) -> u8 {
    match start(args).await {
        Ok(code) => code,
        Err(e) => {
            log::error("Agent crashed", &[("error", &format!("{e:#}"))]);
            eprintln!("agent failed to start: {e:#}");
            1
        }
    }
}

async fn start(args: AgentArgs) -> Result<u8> {
    let state = StateDir::open(&args.state_dir)?;
    let faults = state.faults()?;
    if let Some(msg) = &faults.fail_start {
        log::error("Agent crashed", &[("error", msg)]);
        eprintln!("agent failed to start: {msg}");
        return Ok(1);
    }
    http::require_loopback(&args.listen)?;
    let server = Url::parse(&args.server)?;
    let reported = state.reported_version(&faults)?;
    // Agents report their version to the server from v1.14.3 on
    // (spire-reference §5); older ones leave `agent_version` empty.
    let reports_version = state.installed_version()? >= semver::Version::new(1, 14, 3);
    let trust_domain = args
        .spiffe_id
        .strip_prefix("spiffe://")
        .and_then(|rest| rest.split('/').next())
        .filter(|td| !td.is_empty())
        .with_context(|| format!("--spiffe-id {:?} is not a SPIFFE ID", args.spiffe_id))?
        .to_string();
    log::info(
        "Starting agent",
        &[("version", &reported), ("spiffe_id", &args.spiffe_id)],
    );
    // Bind first, so a taken port fails the start before anything is written.
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let host = (!args.no_hostname_label)
        .then(|| args.hostname.clone().unwrap_or_else(|| state.member_name()));
    let agent = Arc::new(Agent {
        server,
        spiffe_id: args.spiffe_id.clone(),
        health: HealthClock::new(faults.unhealthy_after),
        metrics: Registry::new("spire_agent", host),
    });

    let told = if reports_version {
        reported.as_str()
    } else {
        ""
    };
    attest(&agent, told, &args.attestor, args.attest_attempts.max(1)).await?;
    agent.metrics.set_gauge(
        "started",
        &[
            ("version", &reported),
            ("trust_domain_id", &format!("spiffe://{trust_domain}")),
        ],
        1.0,
    );

    let rotator = tokio::spawn(rotate_forever(Arc::clone(&agent)));
    log::info(
        "Serving health checks and metrics",
        &[("address", &args.listen.to_string())],
    );
    let handler_agent = Arc::clone(&agent);
    let serving = tokio::spawn(http::serve(listener, move |req| {
        let a = Arc::clone(&handler_agent);
        async move { a.handle(req).await }
    }));
    crate::wait_for_shutdown().await;
    log::info("Stopping agent", &[]);
    serving.abort();
    rotator.abort();
    Ok(0)
}

/// Attests, retrying every half second, telling the server `version` (empty:
/// not reported). Each try is counted in `spire_agent_node_attestor_new_svid{status}`.
///
/// Simplification: the stand-in attests afresh at every start; a real agent
/// reuses the SVID it keeps on disk and reports its version when it next
/// attests or renews.
async fn attest(agent: &Agent, version: &str, attestor: &str, attempts: u32) -> Result<()> {
    let url = agent.server.with_path(&format!(
        "/attest?spiffe_id={}&version={}&attestor={}",
        http::percent_encode(&agent.spiffe_id),
        http::percent_encode(version),
        http::percent_encode(attestor)
    ));
    let mut last = String::new();
    for attempt in 1..=attempts {
        let t0 = Instant::now();
        let result = http::get(&url, CALL_TIMEOUT).await;
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        match result {
            Ok((200, body)) => {
                agent.metrics.call("node.attestor.new_svid", "OK", ms);
                let serial = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["serial_number"].as_str().map(str::to_string))
                    .unwrap_or_default();
                log::info(
                    "Node attestation was successful",
                    &[("spiffe_id", &agent.spiffe_id), ("serial_number", &serial)],
                );
                return Ok(());
            }
            Ok((status, body)) => {
                let code = grpc_code(status, &body);
                agent.metrics.call("node.attestor.new_svid", code, ms);
                last = format!("server answered {status} ({code}): {}", body.trim());
                // A refusal is final; only an unavailable server is worth waiting for.
                if code == "InvalidArgument" || code == "PermissionDenied" {
                    break;
                }
            }
            Err(e) => {
                agent
                    .metrics
                    .call("node.attestor.new_svid", "Unavailable", ms);
                last = e;
            }
        }
        log::warn(
            "Node attestation failed; retrying",
            &[("attempt", &attempt.to_string()), ("error", &last)],
        );
        if attempt < attempts {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    anyhow::bail!("failed to attest: {last}")
}

/// Renews the SVID every second: `spire_agent_agent_svid_rotate{status}`
/// grows with `status="OK"` while the server answers.
async fn rotate_forever(agent: Arc<Agent>) {
    let url = agent.server.with_path(&format!(
        "/renew?spiffe_id={}",
        http::percent_encode(&agent.spiffe_id)
    ));
    let mut tick = tokio::time::interval(ROTATE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let t0 = Instant::now();
        let status = match http::get(&url, CALL_TIMEOUT).await {
            Ok((200, _)) => "OK",
            Ok((status, body)) => grpc_code(status, &body),
            Err(_) => "Unavailable",
        };
        agent.metrics.call(
            "agent_svid.rotate",
            status,
            t0.elapsed().as_secs_f64() * 1000.0,
        );
        if status != "OK" {
            log::warn("Could not rotate agent SVID", &[("status", status)]);
        }
    }
}

/// The gRPC status code a failed call maps to.
fn grpc_code(http_status: u16, body: &str) -> &'static str {
    let named = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["code"].as_str().map(str::to_string));
    match named.as_deref() {
        Some("InvalidArgument") => "InvalidArgument",
        Some("PermissionDenied") => "PermissionDenied",
        Some("Unavailable") => "Unavailable",
        Some("Internal") => "Internal",
        _ => match http_status {
            400 => "InvalidArgument",
            403 => "PermissionDenied",
            503 => "Unavailable",
            500 => "Internal",
            _ => "Unknown",
        },
    }
}

impl Agent {
    async fn handle(&self, req: Request) -> Response {
        match req.path.as_str() {
            "/live" => match self.health.fault() {
                None => Response::json(200, &serde_json::json!({ "agent": {} })),
                Some(why) => Response::json(500, &serde_json::json!({ "agent": { "err": why } })),
            },
            "/ready" => match self.not_ready().await {
                None => Response::json(200, &serde_json::json!({ "agent": {} })),
                Some(why) => Response::json(500, &serde_json::json!({ "agent": { "err": why } })),
            },
            "/metrics" => {
                let uptime_ms = (self.health.uptime().as_secs_f64() * 1000.0).floor();
                self.metrics.set_gauge("uptime_in_ms", &[], uptime_ms);
                Response {
                    status: 200,
                    content_type: "text/plain; version=0.0.4; charset=utf-8",
                    body: self.metrics.render(),
                }
            }
            _ => Response::text(404, "404 page not found\n"),
        }
    }

    /// Ready while healthy and the server answers `/live` with 200.
    async fn not_ready(&self) -> Option<String> {
        if let Some(why) = self.health.fault() {
            return Some(why);
        }
        match http::get(&self.server.with_path("/live"), CALL_TIMEOUT).await {
            Ok((200, _)) => None,
            Ok((status, _)) => Some(format!(
                "the server at {} answers {status}",
                self.server.addr
            )),
            Err(e) => Some(format!("the server does not answer: {e}")),
        }
    }
}
