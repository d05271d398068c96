//! The agent's HTTP endpoint: `GET /metrics` and `GET /healthz`, nothing else.
//!
//! A deliberately tiny HTTP/1.1 server on a tokio listener (one request per
//! connection, `Connection: close`, request heads up to 8 KiB, 10 s to send
//! one): two read-only endpoints do not justify a web framework.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::AgentState;
use crate::metrics::CONTENT_TYPE;

const MAX_HEAD: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves until `stop` turns true.
pub(crate) async fn serve(
    listener: TcpListener,
    state: Arc<AgentState>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let state = Arc::clone(&state);
                    tokio::spawn(async move {
                        if let Err(e) = handle(stream, peer, &state).await {
                            tracing::debug!(%peer, error = %e, "HTTP request failed");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = stop.changed() => {
                if *stop.borrow() {
                    return;
                }
            }
        }
    }
}

async fn handle(
    mut stream: TcpStream,
    peer: SocketAddr,
    state: &AgentState,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let complete = tokio::time::timeout(READ_TIMEOUT, async {
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            head.extend_from_slice(&buf[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
                return Ok(true);
            }
            if head.len() > MAX_HEAD {
                return Ok(false);
            }
        }
    })
    .await;
    let Ok(Ok(true)) = complete else {
        return respond(&mut stream, 400, "text/plain", "bad request\n", false).await;
    };
    let text = String::from_utf8_lossy(&head);
    let mut parts = text.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return respond(
            &mut stream,
            405,
            "text/plain",
            "only GET and HEAD\n",
            head_only,
        )
        .await;
    }
    tracing::debug!(%peer, path, "HTTP request");
    match path {
        "/metrics" => {
            let body = state.render_metrics();
            respond(&mut stream, 200, CONTENT_TYPE, &body, head_only).await
        }
        "/healthz" => {
            let (healthy, body) = state.health();
            let status = if healthy { 200 } else { 503 };
            respond(
                &mut stream,
                status,
                "text/plain; charset=utf-8",
                &body,
                head_only,
            )
            .await
        }
        "/" => {
            respond(
                &mut stream,
                200,
                "text/plain; charset=utf-8",
                "spirekeep agent: /metrics (Prometheus), /healthz\n",
                head_only,
            )
            .await
        }
        _ => respond(&mut stream, 404, "text/plain", "not found\n", head_only).await,
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(body);
    }
    stream.write_all(out.as_bytes()).await?;
    stream.shutdown().await
}
