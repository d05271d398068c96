//! Connection strings, exactly as SPIRE users write them.
//!
//! SPIRE hands `connection_string` straight to its Go drivers, so the accepted
//! forms are theirs, not sqlx's: a SQLite path or `file:` URI (mattn/go-sqlite3),
//! a lib/pq `key=value` string or `postgres://` URL, and a go-sql-driver/mysql DSN
//! such as `user:pass@tcp(host:3306)/spire?parseTime=true`. sqlx-style
//! `mysql://` and `sqlite://` URLs are accepted too. Every form is turned into
//! sqlx connect options plus a display string with the password removed.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use percent_encoding::percent_decode_str;
use sqlx::mysql::{MySqlConnectOptions, MySqlSslMode};
use sqlx::postgres::{PgConnectOptions, PgSslMode};

use crate::error::{Error, Result};

/// The three SQL engines SPIRE supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Sqlite,
    Postgres,
    Mysql,
}

impl Engine {
    /// Maps SPIRE's `database_type` (`sqlite3`, `postgres`, `mysql`).
    ///
    /// # Errors
    /// `aws_postgres`/`aws_mysql` (IAM authentication) and unknown names.
    pub fn from_database_type(database_type: &str) -> Result<Self> {
        match database_type {
            "sqlite3" | "sqlite" => Ok(Self::Sqlite),
            "postgres" | "postgresql" => Ok(Self::Postgres),
            "mysql" | "mariadb" => Ok(Self::Mysql),
            "aws_postgres" | "aws_mysql" => Err(Error::Unsupported(format!(
                "database_type \"{database_type}\" (AWS IAM authentication) is not supported yet; \
                 connect with a password user through --datastore instead"
            ))),
            "" => Err(Error::ConnectionString(
                "database_type must be set (sqlite3, postgres or mysql)".into(),
            )),
            other => Err(Error::ConnectionString(format!(
                "unknown database_type \"{other}\": SPIRE accepts sqlite3, postgres and mysql"
            ))),
        }
    }

    /// SPIRE's name for the engine, as written in `database_type`.
    #[must_use]
    pub fn spire_name(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite3",
            Self::Postgres => "postgres",
            Self::Mysql => "mysql",
        }
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
            Self::Mysql => "mysql",
        })
    }
}

impl FromStr for Engine {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::from_database_type(s)
    }
}

/// How a datastore is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Read only (inspect, backup). A SQLite file is opened with `SQLITE_OPEN_READONLY`.
    ReadOnly,
    /// Read and write an existing datastore (restore).
    ReadWrite,
    /// Read and write, creating a SQLite file that does not exist yet.
    Create,
}

/// A parsed connection: the engine, the driver options, and a printable form.
#[derive(Debug, Clone)]
pub enum ConnectionSpec {
    Sqlite(SqliteSpec),
    Postgres(PostgresSpec),
    Mysql(MysqlSpec),
}

/// A SQLite datastore file.
#[derive(Debug, Clone)]
pub struct SqliteSpec {
    pub path: PathBuf,
}

/// A PostgreSQL connection. `Debug` prints the redacted form: the driver
/// options hold the password.
#[derive(Clone)]
pub struct PostgresSpec {
    pub options: PgConnectOptions,
    pub display: String,
}

/// A MySQL / MariaDB connection. `Debug` prints the redacted form.
#[derive(Clone)]
pub struct MysqlSpec {
    pub options: MySqlConnectOptions,
    pub display: String,
    /// Whether the DSN carried `parseTime=true`, which SPIRE requires.
    pub parse_time: bool,
}

impl fmt::Debug for PostgresSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresSpec")
            .field("display", &self.display)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for MysqlSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MysqlSpec")
            .field("display", &self.display)
            .field("parse_time", &self.parse_time)
            .finish_non_exhaustive()
    }
}

impl ConnectionSpec {
    /// The engine this connects to.
    #[must_use]
    pub fn engine(&self) -> Engine {
        match self {
            Self::Sqlite(_) => Engine::Sqlite,
            Self::Postgres(_) => Engine::Postgres,
            Self::Mysql(_) => Engine::Mysql,
        }
    }

    /// A throwaway datastore in a file in `dir`, named `stem` (SQLite: it
    /// holds every value as given and needs no server), for a restore drill or
    /// a rehearsal that was given no scratch database.
    #[must_use]
    pub fn scratch_file(dir: &Path, stem: &str) -> Self {
        Self::Sqlite(SqliteSpec {
            path: dir.join(format!("{stem}.sqlite3")),
        })
    }

    /// The files on this machine that hold the datastore: a SQLite file and the
    /// side files the engine keeps next to it (`-wal`, `-shm`, `-journal`),
    /// whether or not they exist now. None for a database server.
    #[must_use]
    pub fn local_files(&self) -> Vec<PathBuf> {
        match self {
            Self::Sqlite(s) => sqlite_files(&s.path).to_vec(),
            Self::Postgres(_) | Self::Mysql(_) => Vec::new(),
        }
    }

    /// Where it points, without any password: safe for logs, errors and `--json`.
    #[must_use]
    pub fn redacted(&self) -> String {
        match self {
            Self::Sqlite(s) => format!("sqlite:{}", s.path.display()),
            Self::Postgres(p) => p.display.clone(),
            Self::Mysql(m) => m.display.clone(),
        }
    }
}

/// A SQLite database file and its side files (`-wal`, `-shm`, `-journal`), in that order.
pub(crate) fn sqlite_files(path: &Path) -> [PathBuf; 4] {
    ["", "-wal", "-shm", "-journal"].map(|suffix| with_suffix(path, suffix))
}

/// `path` with `suffix` added to its file name (`a.db` → `a.db-wal`).
pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// Parses a connection string.
///
/// `engine` is SPIRE's `database_type` when known (from `server.conf` or
/// `--database-type`); without it the form of the string decides. Relative
/// SQLite paths are resolved against `workdir`, as the SPIRE server resolves
/// them against its own working directory.
///
/// # Errors
/// A string that is none of the accepted forms, or is malformed for its form.
pub fn parse(input: &str, engine: Option<Engine>, workdir: &Path) -> Result<ConnectionSpec> {
    let s = input.trim();
    if s.is_empty() {
        return Err(Error::ConnectionString("connection_string is empty".into()));
    }
    let engine = match engine {
        Some(e) => e,
        None => detect_engine(s).ok_or_else(|| {
            Error::ConnectionString(
                "cannot tell the engine from this string; pass --database-type sqlite3|postgres|mysql".into(),
            )
        })?,
    };
    match engine {
        Engine::Sqlite => parse_sqlite(s, workdir).map(ConnectionSpec::Sqlite),
        Engine::Postgres => parse_postgres(s).map(ConnectionSpec::Postgres),
        Engine::Mysql => parse_mysql(s).map(ConnectionSpec::Mysql),
    }
}

/// The connection string a SPIRE server can take for `spec`, which was
/// parsed from `input`: SQLite as an absolute path, PostgreSQL as given
/// (lib/pq reads both its `key=value` form and URLs), MySQL only in
/// go-sql-driver's DSN form with `parseTime=true` (SPIRE requires it).
///
/// # Errors
/// A MySQL URL (`mysql://…`) or a DSN without `parseTime=true`; the message
/// never repeats the string (it may hold a password).
pub fn spire_connection_string(input: &str, spec: &ConnectionSpec) -> Result<String> {
    match spec {
        ConnectionSpec::Sqlite(s) => Ok(s.path.display().to_string()),
        ConnectionSpec::Postgres(_) => Ok(input.trim().to_string()),
        ConnectionSpec::Mysql(m) => {
            let lower = input.trim().to_ascii_lowercase();
            if lower.starts_with("mysql://") || lower.starts_with("mariadb://") {
                Err(Error::ConnectionString(format!(
                    "{}: SPIRE cannot read a mysql:// URL; write it as SPIRE does: \
                     user:password@tcp(host:3306)/database?parseTime=true",
                    m.display
                )))
            } else if !m.parse_time {
                Err(Error::ConnectionString(format!(
                    "{}: SPIRE requires parseTime=true in a MySQL connection string",
                    m.display
                )))
            } else {
                Ok(input.trim().to_string())
            }
        }
    }
}

fn detect_engine(s: &str) -> Option<Engine> {
    let lower = s.to_ascii_lowercase();
    if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
        return Some(Engine::Postgres);
    }
    if lower.starts_with("mysql://") || lower.starts_with("mariadb://") {
        return Some(Engine::Mysql);
    }
    if lower.starts_with("sqlite:") || lower.starts_with("file:") {
        return Some(Engine::Sqlite);
    }
    if lower.contains("://") {
        return None;
    }
    if looks_like_go_mysql_dsn(s) {
        return Some(Engine::Mysql);
    }
    if looks_like_pq_keywords(s) {
        return Some(Engine::Postgres);
    }
    // Anything else that has no spaces or '=' is taken as a file path.
    if !s.contains('=') && !s.contains(char::is_whitespace) {
        return Some(Engine::Sqlite);
    }
    None
}

fn looks_like_go_mysql_dsn(s: &str) -> bool {
    let before_db = s.rsplit_once('/').map(|(l, _)| l);
    match before_db {
        Some(left) => {
            left.contains("@tcp(")
                || left.contains("@unix(")
                || left.starts_with("tcp(")
                || left.starts_with("unix(")
                || (left.contains('@') && !left.contains('='))
        }
        None => false,
    }
}

fn looks_like_pq_keywords(s: &str) -> bool {
    const KEYS: [&str; 6] = ["host", "dbname", "user", "port", "sslmode", "password"];
    parse_pq_keywords(s)
        .is_ok_and(|kv| !kv.is_empty() && kv.iter().any(|(k, _)| KEYS.contains(&k.as_str())))
}

// ---------------------------------------------------------------- SQLite

fn parse_sqlite(s: &str, workdir: &Path) -> Result<SqliteSpec> {
    let lower = s.to_ascii_lowercase();
    let raw_path =
        if lower.starts_with("sqlite::memory:") || s == ":memory:" || lower.contains("mode=memory")
        {
            return Err(Error::ConnectionString(
                "an in-memory SQLite database cannot be a SPIRE datastore; give a file path".into(),
            ));
        } else if let Some(rest) = strip_prefix_ci(s, "sqlite://") {
            uri_path(rest, true)?
        } else if let Some(rest) = strip_prefix_ci(s, "sqlite:") {
            uri_path(rest, false)?
        } else if let Some(rest) = strip_prefix_ci(s, "file:") {
            uri_path(rest, false)?
        } else if s.contains("://") {
            // SPIRE rejects any URI scheme other than file: for sqlite3.
            return Err(Error::ConnectionString(format!(
                "a SQLite connection_string must be a path or a file: URI, not a {}:// URL",
                s.split("://").next().unwrap_or_default()
            )));
        } else {
            s.to_string()
        };
    if raw_path.is_empty() {
        return Err(Error::ConnectionString(
            "the SQLite connection string has no file path".into(),
        ));
    }
    let path = PathBuf::from(&raw_path);
    let path = if path.is_absolute() {
        path
    } else {
        workdir.join(path)
    };
    Ok(SqliteSpec { path })
}

/// The file path of a `file:`/`sqlite:` URI body: query and fragment removed,
/// `//authority` handled, percent escapes decoded.
fn uri_path(rest: &str, double_slash_consumed: bool) -> Result<String> {
    let body = rest.split(['?', '#']).next().unwrap_or_default();
    let path = if double_slash_consumed {
        // sqlite://./x.db or sqlite:///abs/x.db
        body.to_string()
    } else if let Some(after) = body.strip_prefix("//") {
        // file://host/path: only an empty host or localhost is a local file.
        let (host, path) = after.split_at(after.find('/').unwrap_or(after.len()));
        if !(host.is_empty() || host.eq_ignore_ascii_case("localhost")) {
            return Err(Error::ConnectionString(format!(
                "file URI names a remote host \"{host}\""
            )));
        }
        path.to_string()
    } else {
        body.to_string()
    };
    percent_decode_str(&path)
        .decode_utf8()
        .map(|p| p.into_owned())
        .map_err(|_| {
            Error::ConnectionString("the file URI's path is not valid UTF-8 after decoding".into())
        })
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    if s.len() >= prefix.len()
        && s.is_char_boundary(prefix.len())
        && s[..prefix.len()].eq_ignore_ascii_case(prefix)
    {
        Some(&s[prefix.len()..])
    } else {
        None
    }
}

// ---------------------------------------------------------------- PostgreSQL

fn parse_postgres(s: &str) -> Result<PostgresSpec> {
    let lower = s.to_ascii_lowercase();
    let pairs = if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
        pq_url_to_pairs(s)?
    } else {
        parse_pq_keywords(s)?
    };
    postgres_from_pairs(&pairs)
}

/// Splits a lib/pq `key=value` string. Values may be single-quoted; a backslash
/// escapes the next character, as in lib/pq's `parseOpts`.
fn parse_pq_keywords(s: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(Error::ConnectionString(format!(
                "missing \"=\" after {} in key=value connection string (pairs are separated by \
                 spaces; quote a value that holds spaces: password='a b')",
                shown_keyword(&key)
            )));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '\'' => {
                        closed = true;
                        break;
                    }
                    c => value.push(c),
                }
            }
            if !closed {
                return Err(Error::ConnectionString(format!(
                    "unterminated quoted value for {}",
                    shown_keyword(&key)
                )));
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        if key.is_empty() {
            return Err(Error::ConnectionString(
                "empty key in key=value connection string".into(),
            ));
        }
        out.push((key, value));
    }
    Ok(out)
}

/// A key of a lib/pq string for an error message: named when it is one of
/// lib/pq's keywords, otherwise not shown (it may be part of a password
/// that holds a space).
fn shown_keyword(key: &str) -> String {
    const KEYWORDS: [&str; 14] = [
        "host",
        "hostaddr",
        "port",
        "dbname",
        "user",
        "password",
        "sslmode",
        "sslrootcert",
        "sslcert",
        "sslkey",
        "application_name",
        "connect_timeout",
        "options",
        "target_session_attrs",
    ];
    if KEYWORDS.contains(&key) {
        format!("\"{key}\"")
    } else {
        "a key".to_string()
    }
}

/// Turns a `postgres://` URL into lib/pq pairs, as lib/pq's `ParseURL` does.
fn pq_url_to_pairs(s: &str) -> Result<Vec<(String, String)>> {
    let url = url::Url::parse(s)
        .map_err(|e| Error::ConnectionString(format!("invalid postgres URL: {e}")))?;
    let mut pairs = Vec::new();
    let decode = |v: &str| percent_decode_str(v).decode_utf8_lossy().into_owned();
    if !url.username().is_empty() {
        pairs.push(("user".to_string(), decode(url.username())));
    }
    if let Some(p) = url.password() {
        pairs.push(("password".to_string(), decode(p)));
    }
    if let Some(h) = url.host_str() {
        let h = h.trim_start_matches('[').trim_end_matches(']');
        if !h.is_empty() {
            pairs.push(("host".to_string(), decode(h)));
        }
    }
    if let Some(p) = url.port() {
        pairs.push(("port".to_string(), p.to_string()));
    }
    let db = url.path().trim_start_matches('/');
    if !db.is_empty() {
        pairs.push(("dbname".to_string(), decode(db)));
    }
    for (k, v) in url.query_pairs() {
        pairs.push((k.into_owned(), v.into_owned()));
    }
    Ok(pairs)
}

fn postgres_from_pairs(pairs: &[(String, String)]) -> Result<PostgresSpec> {
    // PgConnectOptions::new() reads PGHOST, PGUSER, PGPASSWORD, ... like libpq and lib/pq do.
    let mut o = PgConnectOptions::new();
    let mut sslmode: Option<String> = None;
    let mut has_root_cert = false;
    let mut runtime: Vec<(String, String)> = Vec::new();
    for (k, v) in pairs {
        match k.as_str() {
            "host" | "hostaddr" => o = o.host(v),
            "port" => {
                let port = v
                    .parse::<u16>()
                    .map_err(|_| Error::ConnectionString(format!("invalid port \"{v}\"")))?;
                o = o.port(port);
            }
            "dbname" => o = o.database(v),
            "user" => o = o.username(v),
            "password" => o = o.password(v),
            "sslmode" => sslmode = Some(v.clone()),
            "sslrootcert" => {
                has_root_cert = true;
                o = o.ssl_root_cert(v.as_str());
            }
            "sslcert" => o = o.ssl_client_cert(v.as_str()),
            "sslkey" => o = o.ssl_client_key(v.as_str()),
            "application_name" => o = o.application_name(v),
            // lib/pq settings with no effect on what spirekeep reads.
            "connect_timeout"
            | "fallback_application_name"
            | "binary_parameters"
            | "disable_prepared_binary_result"
            | "krbsrvname"
            | "krbspn"
            | "sslsni"
            | "sslinline"
            | "sslpassword"
            | "target_session_attrs" => {}
            // Everything else lib/pq sends as a run-time parameter.
            _ => runtime.push((k.clone(), v.clone())),
        }
    }
    // lib/pq's default sslmode is "require" (spire-reference §1); with a root
    // certificate it verifies the CA, as lib/pq does.
    let mode = match sslmode.as_deref() {
        None | Some("" | "require") if has_root_cert => PgSslMode::VerifyCa,
        None | Some("" | "require") => PgSslMode::Require,
        Some("disable") => PgSslMode::Disable,
        Some("allow") => PgSslMode::Allow,
        Some("prefer") => PgSslMode::Prefer,
        Some("verify-ca") => PgSslMode::VerifyCa,
        Some("verify-full") => PgSslMode::VerifyFull,
        Some(other) => {
            return Err(Error::ConnectionString(format!(
                "unknown sslmode \"{other}\""
            )));
        }
    };
    o = o.ssl_mode(mode);
    if !runtime.is_empty() {
        o = o.options(runtime.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    }
    let display = format!(
        "postgres://{}@{}:{}/{}",
        o.get_username(),
        o.get_host(),
        o.get_port(),
        o.get_database().unwrap_or(o.get_username())
    );
    Ok(PostgresSpec {
        options: o,
        display,
    })
}

// ---------------------------------------------------------------- MySQL

fn parse_mysql(s: &str) -> Result<MysqlSpec> {
    let lower = s.to_ascii_lowercase();
    if lower.starts_with("mysql://") || lower.starts_with("mariadb://") {
        let normalised = if lower.starts_with("mariadb://") {
            format!("mysql://{}", &s["mariadb://".len()..])
        } else {
            s.to_string()
        };
        let options = MySqlConnectOptions::from_str(&normalised).map_err(|e| {
            Error::ConnectionString(format!("invalid mysql URL: {}", scrub(&e.to_string(), s)))
        })?;
        let url = url::Url::parse(&normalised)
            .map_err(|e| Error::ConnectionString(format!("invalid mysql URL: {e}")))?;
        let parse_time = url
            .query_pairs()
            .any(|(k, v)| k == "parseTime" && v == "true");
        let display = format!(
            "mysql://{}@{}:{}{}",
            url.username(),
            url.host_str().unwrap_or("localhost"),
            url.port().unwrap_or(3306),
            url.path()
        );
        return Ok(MysqlSpec {
            options,
            display,
            parse_time,
        });
    }
    parse_go_mysql_dsn(s)
}

/// Parses `[user[:password]@][net[(addr)]]/dbname[?param=value&...]` the way
/// go-sql-driver/mysql's `ParseDSN` does: the last `/` starts the database name
/// and the last `@` before it ends the credentials, so passwords may contain
/// `@`, `:` and `/`.
fn parse_go_mysql_dsn(s: &str) -> Result<MysqlSpec> {
    // go-sql-driver's ParseDSN: the last '/' starts the database name, the
    // first '?' after it the parameters, and the last '@' before it ends the
    // user info; the first ':' in the user info starts the password.
    let Some(slash) = s.rfind('/') else {
        return Err(Error::ConnectionString(
            "invalid MySQL DSN: missing the slash before the database name (user:pass@tcp(host:3306)/spire?parseTime=true)".into(),
        ));
    };
    let left = &s[..slash];
    let after_slash = &s[slash + 1..];
    let (dbname_raw, query) = match after_slash.find('?') {
        Some(q) => (&after_slash[..q], Some(&after_slash[q + 1..])),
        None => (after_slash, None),
    };
    let dbname = percent_decode_str(dbname_raw)
        .decode_utf8_lossy()
        .into_owned();
    let (creds, netaddr) = match left.rfind('@') {
        Some(at) => (Some(&left[..at]), &left[at + 1..]),
        None => (None, left),
    };
    let mut o = MySqlConnectOptions::new();
    let mut user = String::new();
    if let Some(creds) = creds {
        let (u, p) = match creds.find(':') {
            Some(c) => (&creds[..c], Some(&creds[c + 1..])),
            None => (creds, None),
        };
        user = u.to_string();
        o = o.username(u);
        if let Some(p) = p {
            o = o.password(p);
        }
    }
    let (net, addr) = match netaddr.find('(') {
        Some(open) => {
            if !netaddr.ends_with(')') {
                return Err(Error::ConnectionString(
                    if netaddr[open + 1..].contains(')') {
                        // go-sql-driver's errInvalidDSNUnescaped.
                        "invalid MySQL DSN: did you forget to escape a parameter value?".into()
                    } else {
                        "invalid MySQL DSN: network address not terminated (missing closing brace)"
                            .into()
                    },
                ));
            }
            (&netaddr[..open], &netaddr[open + 1..netaddr.len() - 1])
        }
        None => (netaddr, ""),
    };
    let shown_addr;
    match net {
        "" | "tcp" | "tcp6" | "tcp4" => {
            let addr = if addr.is_empty() {
                "127.0.0.1:3306"
            } else {
                addr
            };
            let (host, port) = split_host_port(addr)?;
            o = o.host(&host).port(port);
            shown_addr = format!("tcp({host}:{port})");
        }
        "unix" => {
            let path = if addr.is_empty() {
                "/tmp/mysql.sock"
            } else {
                addr
            };
            o = o.socket(path);
            shown_addr = format!("unix({path})");
        }
        other => {
            // Without an '@' the network part may be user info (a password):
            // name it only when it looks like a network name.
            let shown = if other.len() <= 8 && other.bytes().all(|b| b.is_ascii_alphanumeric()) {
                format!(" \"{other}\"")
            } else {
                String::new()
            };
            return Err(Error::ConnectionString(format!(
                "unsupported MySQL network{shown} before the address: use tcp(host:port) or unix(path); \
                 user and password go before an '@' (user:password@tcp(host:3306)/spire)"
            )));
        }
    }
    if !dbname.is_empty() {
        o = o.database(&dbname);
    }
    let mut parse_time = false;
    let mut tls: Option<String> = None;
    if let Some(query) = query {
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode_str(v).decode_utf8_lossy().into_owned();
            match k {
                "parseTime" => parse_time = v == "true",
                "tls" => tls = Some(v),
                "charset" => {
                    if let Some(first) = v.split(',').next() {
                        o = o.charset(first);
                    }
                }
                _ => {}
            }
        }
    }
    // go-sql-driver's default is no TLS.
    let mode = match tls.as_deref() {
        None | Some("false") => MySqlSslMode::Disabled,
        Some("true") => MySqlSslMode::VerifyIdentity,
        Some("skip-verify") => MySqlSslMode::Required,
        Some("preferred") => MySqlSslMode::Preferred,
        Some(custom) => {
            return Err(Error::Unsupported(format!(
                "tls={custom} names a TLS config registered inside SPIRE; use --spire-config so root_ca_path and the client certificate are read, or tls=true"
            )));
        }
    };
    o = o.ssl_mode(mode);
    let display = format!("mysql {user}@{shown_addr}/{dbname}");
    Ok(MysqlSpec {
        options: o,
        display,
        parse_time,
    })
}

fn split_host_port(addr: &str) -> Result<(String, u16)> {
    // [::1]:3306, host:3306, or a bare host (go-sql-driver adds :3306).
    if let Some(rest) = addr.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| Error::ConnectionString(format!("invalid address \"{addr}\"")))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p
                .parse()
                .map_err(|_| Error::ConnectionString(format!("invalid port in \"{addr}\"")))?,
            None => 3306,
        };
        return Ok((host.to_string(), port));
    }
    match addr.rsplit_once(':') {
        Some((host, port)) => Ok((
            host.to_string(),
            port.parse()
                .map_err(|_| Error::ConnectionString(format!("invalid port in \"{addr}\"")))?,
        )),
        None => Ok((addr.to_string(), 3306)),
    }
}

/// Removes the password of `original` from a message (sqlx errors may echo the URL).
fn scrub(message: &str, original: &str) -> String {
    match url::Url::parse(original)
        .ok()
        .and_then(|u| u.password().map(str::to_string))
    {
        Some(p) if !p.is_empty() => message.replace(&p, "***"),
        _ => message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wd() -> PathBuf {
        PathBuf::from("/opt/spire")
    }

    fn sqlite_path(s: &str) -> PathBuf {
        match parse(s, None, &wd()).unwrap() {
            ConnectionSpec::Sqlite(s) => s.path,
            other => panic!("expected sqlite, got {other:?}"),
        }
    }

    #[test]
    fn sqlite_forms_as_spire_writes_them() {
        assert_eq!(
            sqlite_path("./.data/datastore.sqlite3"),
            PathBuf::from("/opt/spire/./.data/datastore.sqlite3")
        );
        assert_eq!(
            sqlite_path("/var/lib/spire/server/.data/datastore.sqlite3"),
            PathBuf::from("/var/lib/spire/server/.data/datastore.sqlite3")
        );
        assert_eq!(
            sqlite_path("file:/tmp/ds.sqlite3?_foreign_keys=on"),
            PathBuf::from("/tmp/ds.sqlite3")
        );
        assert_eq!(
            sqlite_path("file:///tmp/my%20ds.sqlite3?cache=shared"),
            PathBuf::from("/tmp/my ds.sqlite3")
        );
        assert_eq!(
            sqlite_path("file:data/ds.db"),
            PathBuf::from("/opt/spire/data/ds.db")
        );
        assert_eq!(
            sqlite_path("sqlite://./x.db?mode=rwc"),
            PathBuf::from("/opt/spire/./x.db")
        );
        assert_eq!(
            sqlite_path("sqlite:///abs/x.db"),
            PathBuf::from("/abs/x.db")
        );
        let err = parse("sqlite::memory:", None, &wd())
            .unwrap_err()
            .to_string();
        assert!(err.contains("in-memory"), "{err}");
        let err = parse("http://x/y", Some(Engine::Sqlite), &wd())
            .unwrap_err()
            .to_string();
        assert!(err.contains("file: URI"), "{err}");
        let err = parse("file://remote/x.db", None, &wd())
            .unwrap_err()
            .to_string();
        assert!(err.contains("remote host"), "{err}");
    }

    #[test]
    fn lib_pq_keyword_strings() {
        let spec = parse(
            "dbname=spire user=spire host=db sslmode=disable password=s3cr3t",
            None,
            &wd(),
        )
        .unwrap();
        let ConnectionSpec::Postgres(p) = &spec else {
            panic!("not postgres")
        };
        assert_eq!(p.options.get_host(), "db");
        assert_eq!(p.options.get_database(), Some("spire"));
        assert_eq!(p.options.get_username(), "spire");
        assert!(matches!(p.options.get_ssl_mode(), PgSslMode::Disable));
        assert_eq!(spec.redacted(), "postgres://spire@db:5432/spire");
        assert!(
            !format!("{spec:?}").contains("s3cr3t"),
            "Debug must not print the password"
        );
        let kv = parse_pq_keywords(r"user = 'sp ire' password='it\'s' host=/var/run/postgresql")
            .unwrap();
        assert_eq!(kv[0], ("user".into(), "sp ire".into()));
        assert_eq!(kv[1], ("password".into(), "it's".into()));
        assert_eq!(kv[2], ("host".into(), "/var/run/postgresql".into()));
        assert!(parse_pq_keywords("user='unterminated").is_err());
    }

    #[test]
    fn lib_pq_default_sslmode_is_require() {
        let ConnectionSpec::Postgres(p) =
            parse("host=db dbname=spire user=spire", None, &wd()).unwrap()
        else {
            panic!()
        };
        assert!(matches!(p.options.get_ssl_mode(), PgSslMode::Require));
        let ConnectionSpec::Postgres(p) = parse("postgres://u:pw@h:5433/d", None, &wd()).unwrap()
        else {
            panic!()
        };
        assert!(matches!(p.options.get_ssl_mode(), PgSslMode::Require));
        assert_eq!(p.options.get_port(), 5433);
        assert_eq!(p.display, "postgres://u@h:5433/d");
        let ConnectionSpec::Postgres(p) =
            parse("postgresql://u@h/d?sslmode=disable", None, &wd()).unwrap()
        else {
            panic!()
        };
        assert!(matches!(p.options.get_ssl_mode(), PgSslMode::Disable));
        assert!(parse("host=db sslmode=bogus", None, &wd()).is_err());
    }

    #[test]
    fn go_mysql_dsns() {
        let spec = parse(
            "spire:p@ss:w/rd@tcp(db.example:3307)/spire?parseTime=true&charset=utf8",
            None,
            &wd(),
        )
        .unwrap();
        let ConnectionSpec::Mysql(m) = &spec else {
            panic!("not mysql")
        };
        assert!(m.parse_time);
        assert_eq!(spec.redacted(), "mysql spire@tcp(db.example:3307)/spire");
        let spec = parse(
            "root@unix(/run/mysqld/mysqld.sock)/spire?parseTime=true",
            None,
            &wd(),
        )
        .unwrap();
        assert_eq!(
            spec.redacted(),
            "mysql root@unix(/run/mysqld/mysqld.sock)/spire"
        );
        let spec = parse("u:pw@/spire", Some(Engine::Mysql), &wd()).unwrap();
        assert_eq!(spec.redacted(), "mysql u@tcp(127.0.0.1:3306)/spire");
        let ConnectionSpec::Mysql(m) = parse("u:pw@tcp(h)/d", None, &wd()).unwrap() else {
            panic!()
        };
        assert!(!m.parse_time);
        assert!(parse("u:pw@tcp(h:3306", Some(Engine::Mysql), &wd()).is_err());
        assert!(parse("u:pw@tcp(h:3306)/d?tls=custom", Some(Engine::Mysql), &wd()).is_err());
        let spec = parse("mysql://u:pw@127.0.0.1:3306/spire", None, &wd()).unwrap();
        assert_eq!(spec.redacted(), "mysql://u@127.0.0.1:3306/spire");
    }

    /// Regression (issue 14): `spire:ab/cd?ef@tcp(db)/spire` was split at the
    /// first '/' and the error printed `spire:ab`, part of the password.
    #[test]
    fn go_mysql_dsns_split_like_parse_dsn() {
        let mysql = |s: &str| match parse(s, Some(Engine::Mysql), &wd()) {
            Ok(ConnectionSpec::Mysql(m)) => Ok(m),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e.to_string()),
        };
        let m = mysql("spire:ab/cd?ef@tcp(db)/spire").unwrap();
        assert_eq!(m.display, "mysql spire@tcp(db:3306)/spire");
        assert_eq!(m.options.get_database(), Some("spire"));
        assert_eq!(m.options.get_username(), "spire");
        // Detected as MySQL without a database type, too.
        assert_eq!(
            parse("spire:ab/cd?ef@tcp(db)/spire", None, &wd())
                .unwrap()
                .engine(),
            Engine::Mysql
        );
        let m = mysql("u:p?x/y@z@tcp(h:3307)/d?parseTime=true").unwrap();
        assert_eq!(m.display, "mysql u@tcp(h:3307)/d");
        assert!(m.parse_time);
        let m = mysql("u:pw@unix(/run/mysqld/mysqld.sock)/spire?parseTime=true").unwrap();
        assert_eq!(m.display, "mysql u@unix(/run/mysqld/mysqld.sock)/spire");
        // A '/' in a parameter value must be escaped (go-sql-driver refuses it too).
        let e = mysql("u:pw@tcp(h)/d?x=a/b").unwrap_err();
        assert!(e.contains("escape"), "{e}");
        // The user info never shows up in an error.
        for (dsn, secret) in [
            ("spire:ab/cd?ef@tcp(db/spire", "ab/cd"),
            ("spire:s3cr3t/spire", "s3cr3t"),
            ("spire:s3cr3t@bogus(h)/spire", "s3cr3t"),
            ("spire:s3cr3t@tcp(h:99999)/spire", "s3cr3t"),
            ("spire:s3cr3t@tcp(h)spire", "s3cr3t"),
        ] {
            let e = mysql(dsn).unwrap_err();
            assert!(!e.contains(secret), "{dsn}: {e}");
            assert!(!e.contains("spire:"), "{dsn}: {e}");
        }
        // lib/pq strings: a password with a space cut at the space is not echoed.
        let e = parse("password=se cret host=x", Some(Engine::Postgres), &wd())
            .unwrap_err()
            .to_string();
        assert!(!e.contains("cret"), "{e}");
    }

    #[test]
    fn database_types() {
        assert_eq!(
            Engine::from_database_type("sqlite3").unwrap(),
            Engine::Sqlite
        );
        let err = Engine::from_database_type("aws_postgres")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not supported yet"), "{err}");
        assert!(
            Engine::from_database_type("")
                .unwrap_err()
                .to_string()
                .contains("must be set")
        );
        assert!(Engine::from_database_type("oracle").is_err());
    }

    #[test]
    fn undetectable_strings_ask_for_the_engine() {
        let err = parse("some thing = odd", None, &wd())
            .unwrap_err()
            .to_string();
        assert!(err.contains("--database-type"), "{err}");
    }
}
