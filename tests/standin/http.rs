//! A very small HTTP/1.1 server and client on loopback TCP: GET only, one
//! request per connection (`Connection: close`), bodies sized by
//! `Content-Length`. Enough for health checks, Prometheus scrapes and the
//! stand-in's own agent-to-server calls; nothing more.

use std::fmt::Write as _;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Longest request head the server reads.
const MAX_HEAD: usize = 16 * 1024;
/// Longest response the client reads.
const MAX_RESPONSE: usize = 4 * 1024 * 1024;
/// How long the server waits for a request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// A parsed GET request.
#[derive(Debug)]
pub struct Request {
    /// The decoded path, e.g. `/ready`.
    pub path: String,
    /// The decoded query pairs, in order.
    pub query: Vec<(String, String)>,
}

impl Request {
    /// The first value of query parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A response: status, content type, body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn json(status: u16, body: &serde_json::Value) -> Self {
        let mut body = body.to_string();
        body.push('\n');
        Self {
            status,
            content_type: "application/json",
            body,
        }
    }

    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Checks that `addr` is a loopback address: the stand-in never listens elsewhere.
pub fn require_loopback(addr: &SocketAddr) -> anyhow::Result<()> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        anyhow::bail!(
            "--listen {addr}: the stand-in listens on loopback addresses only (127.0.0.1, ::1)"
        )
    }
}

/// Serves `listener` forever, one task per connection.
pub async fn serve<H, F>(listener: TcpListener, handler: H)
where
    H: Fn(Request) -> F + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    let handler = Arc::new(handler);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let handler = Arc::clone(&handler);
                tokio::spawn(async move {
                    // A client that goes away mid-response is not our problem.
                    let _ = handle(stream, handler.as_ref()).await;
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                crate::log::warn("accept failed", &[("error", &e.to_string())]);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle<H, F>(mut stream: TcpStream, handler: &H) -> std::io::Result<()>
where
    H: Fn(Request) -> F,
    F: Future<Output = Response>,
{
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(head))) => head,
        Ok(Ok(None)) | Err(_) => return Ok(()),
        Ok(Err(HeadError::TooLarge)) => {
            return write_response(
                &mut stream,
                &Response::text(431, "request head too large\n"),
            )
            .await;
        }
        Ok(Err(HeadError::Io(e))) => return Err(e),
    };
    let resp = match parse_request(&head) {
        Ok((method, req)) if method == "GET" => handler(req).await,
        Ok((method, _)) => Response::text(405, format!("method {method} not allowed; GET only\n")),
        Err(why) => Response::text(400, format!("{why}\n")),
    };
    write_response(&mut stream, &resp).await
}

enum HeadError {
    TooLarge,
    Io(std::io::Error),
}

/// Reads up to the blank line that ends the request head. `None`: the client
/// closed the connection without sending a complete head.
async fn read_head(stream: &mut TcpStream) -> Result<Option<String>, HeadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.map_err(HeadError::Io)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find_head_end(&buf) {
            buf.truncate(end);
            return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
        }
        if buf.len() > MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = buf.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Parses the request line: `METHOD target HTTP/1.x`.
fn parse_request(head: &str) -> Result<(String, Request), String> {
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split_ascii_whitespace();
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("malformed request line {line:?}"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(format!("unsupported protocol {version}"));
    }
    // absolute-form (`http://host/path`) is allowed by HTTP/1.1: keep the path.
    let target = match target.split_once("://") {
        Some((_, rest)) if !target.starts_with('/') => rest.find('/').map_or("/", |i| &rest[i..]),
        _ => target,
    };
    if !target.starts_with('/') {
        return Err(format!("unsupported request target {target:?}"));
    }
    let target = target.split('#').next().unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let path = percent_decode(path, false)?;
    let mut pairs = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        pairs.push((percent_decode(k, true)?, percent_decode(v, true)?));
    }
    Ok((method.to_string(), Request { path, query: pairs }))
}

/// Decodes `%XX` escapes (and `+` as a space in query strings).
pub fn percent_decode(s: &str, plus_is_space: bool) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
                out.push(hex);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} does not decode to UTF-8"))
}

/// Encodes a query-string value.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

async fn write_response(stream: &mut TcpStream, resp: &Response) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n",
        resp.status,
        reason(resp.status),
        resp.content_type,
        resp.body.len(),
        if resp.status == 405 {
            "Allow: GET\r\n"
        } else {
            ""
        },
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(resp.body.as_bytes()).await?;
    stream.flush().await?;
    stream.shutdown().await
}

// ---------------------------------------------------------------- client

/// An `http://` URL on a loopback host.
#[derive(Debug, Clone)]
pub struct Url {
    pub addr: SocketAddr,
    /// Path and query, e.g. `/ready` (empty when the URL has none).
    pub path: String,
}

impl Url {
    /// Parses `http://127.0.0.1:8080[/path]`; `localhost` means 127.0.0.1.
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| anyhow::anyhow!("{url}: only http:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| anyhow::anyhow!("{url}: the URL must name a port"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| anyhow::anyhow!("{url}: bad port {port:?}"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
            IpAddr::from([127, 0, 0, 1])
        } else {
            host.parse().map_err(|_| {
                anyhow::anyhow!("{url}: the host must be a loopback IP address or localhost")
            })?
        };
        if !ip.is_loopback() {
            anyhow::bail!("{url}: the stand-in talks to loopback addresses only");
        }
        Ok(Self {
            addr: SocketAddr::new(ip, port),
            path: path.to_string(),
        })
    }

    /// The same server with another path.
    pub fn with_path(&self, path: &str) -> Self {
        Self {
            addr: self.addr,
            path: path.to_string(),
        }
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.addr, self.path)
    }
}

/// GETs `url`; returns the status and body. Errors are transport failures
/// (refused, timed out, malformed response), as text for messages.
pub async fn get(url: &Url, timeout: Duration) -> Result<(u16, String), String> {
    match tokio::time::timeout(timeout, get_inner(url)).await {
        Ok(r) => r.map_err(|e| format!("GET {url}: {e}")),
        Err(_) => Err(format!(
            "GET {url}: no answer within {} ms",
            timeout.as_millis()
        )),
    }
}

async fn get_inner(url: &Url) -> std::io::Result<(u16, String)> {
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let mut stream = TcpStream::connect(url.addr).await?;
    let path = if url.path.is_empty() {
        "/"
    } else {
        url.path.as_str()
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: spire-standin\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        url.addr
    );
    stream.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_RESPONSE {
            return Err(bad("response too large".into()));
        }
    }
    let end = find_head_end(&buf).ok_or_else(|| bad("incomplete response head".into()))?;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let body_start = if buf[end..].starts_with(b"\r\n\r\n") {
        end + 4
    } else {
        end + 2
    };
    let status_line = head.lines().next().unwrap_or_default();
    let mut parts = status_line.split_ascii_whitespace();
    let status: u16 = match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => code
            .parse()
            .map_err(|_| bad(format!("bad status line {status_line:?}")))?,
        _ => return Err(bad(format!("bad status line {status_line:?}"))),
    };
    let mut body = &buf[body_start..];
    let length = head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())
            .flatten()
    });
    if let Some(len) = length {
        if body.len() < len {
            return Err(bad(format!("body shorter than Content-Length {len}")));
        }
        body = &body[..len];
    }
    Ok((status, String::from_utf8_lossy(body).into_owned()))
}
