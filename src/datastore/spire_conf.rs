//! Reading the datastore settings out of SPIRE's `server.conf`.
//!
//! SPIRE requires exactly one `DataStore "sql"` block (spire-reference §1):
//!
//! ```hcl
//! plugins {
//!     DataStore "sql" {
//!         plugin_data {
//!             database_type = "sqlite3"
//!             connection_string = "./.data/datastore.sqlite3"
//!         }
//!     }
//! }
//! ```
//!
//! `database_type` may also take SPIRE's block form (`database_type "aws_postgres" { region = "..." }`),
//! which spirekeep recognises only to say it is not supported yet.

use std::path::{Path, PathBuf};

use hcl::{Body, Expression};

use super::dsn::{self, ConnectionSpec, Engine};
use crate::error::{Error, Result};

/// What spirekeep needs from a SPIRE server configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpireDatastoreConfig {
    /// `database_type` (`sqlite3`, `postgres`, `mysql`, or an unsupported name).
    pub database_type: String,
    /// `connection_string`, exactly as written (it may hold a password: never print it).
    pub connection_string: String,
    /// `disable_migration`, which changes SPIRE's start-up rules (spire-reference §4).
    pub disable_migration: bool,
    /// `server { data_dir = ... }`, if set.
    pub data_dir: Option<String>,
    /// The `KeyManager` plugin: where the CA private keys live.
    pub key_manager: KeyManagerConfig,
}

/// SPIRE's `KeyManager` plugin, as far as backups care: whether the CA
/// private keys are in a file spirekeep can copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyManagerConfig {
    /// `KeyManager "disk" { plugin_data { keys_path = ... } }`: the keys
    /// file, exactly as written.
    Disk { keys_path: String },
    /// `KeyManager "memory"`: the keys exist only in the running server.
    Memory,
    /// Another KeyManager (a cloud KMS, an external plugin): its name.
    Other(String),
    /// No usable KeyManager block (none, several, or a disk one without
    /// `keys_path`, all of which SPIRE refuses): why.
    Unusable(String),
}

/// The files of a SPIRE server on disk, resolved against its working
/// directory (see [`SpireDatastoreConfig::server_layout`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLayout {
    /// `data_dir`, resolved; `None` when server.conf does not set it.
    pub data_dir: Option<PathBuf>,
    /// The disk KeyManager's `keys_path`, resolved; `None` for any other KeyManager.
    pub keys_path: Option<PathBuf>,
    /// The KeyManager as configured.
    pub key_manager: KeyManagerConfig,
    /// The files that hold the datastore, when it lives on this disk (a
    /// SQLite file and its side files): the datastore snapshot covers them,
    /// so a copy of the data dir leaves them out. Empty for a database server.
    pub datastore_files: Vec<PathBuf>,
}

impl SpireDatastoreConfig {
    /// Turns the settings into a connection, resolving relative SQLite paths
    /// against `workdir` (the SPIRE server's working directory).
    ///
    /// # Errors
    /// Unsupported `database_type` values and malformed connection strings.
    pub fn connection(&self, workdir: &Path) -> Result<ConnectionSpec> {
        let engine = Engine::from_database_type(&self.database_type)?;
        dsn::parse(&self.connection_string, Some(engine), workdir)
    }

    /// Where the server keeps its files: `data_dir`, the disk KeyManager's
    /// `keys_path` and the SQLite file, relative paths resolved against
    /// `workdir` (the directory SPIRE runs in, as for [`Self::connection`]).
    #[must_use]
    pub fn server_layout(&self, workdir: &Path) -> ServerLayout {
        let resolve = |p: &str| normalize(&workdir.join(p));
        let datastore_files = self
            .connection(workdir)
            .map(|spec| spec.local_files().iter().map(|p| normalize(p)).collect())
            .unwrap_or_default();
        ServerLayout {
            data_dir: self.data_dir.as_deref().map(resolve),
            keys_path: match &self.key_manager {
                KeyManagerConfig::Disk { keys_path } => Some(resolve(keys_path)),
                _ => None,
            },
            key_manager: self.key_manager.clone(),
            datastore_files,
        }
    }
}

/// A path with `.` removed and `..` applied lexically (no file system
/// access), so `/opt/spire/./.data/keys.json` and `/opt/spire/.data` compare
/// as SPIRE means them.
#[must_use]
pub fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Reads and parses a SPIRE server config file.
///
/// With `expand_env`, `$VAR` and `${VAR}` are replaced from the environment
/// before parsing, as `spire-server run -expandEnv` does.
///
/// # Errors
/// An unreadable file, invalid HCL, or a missing or malformed `DataStore "sql"` block.
pub fn load(path: &Path, expand_env: bool) -> Result<SpireDatastoreConfig> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| conf_err(path, format!("cannot read it: {e}")))?;
    let text = if expand_env {
        expand_env_vars(&text)
    } else {
        text
    };
    parse(&text).map_err(|message| conf_err(path, message))
}

/// How deeply braces, brackets and parentheses may nest. SPIRE's own
/// configs need about six levels; the HCL parser's time grows steeply with
/// nesting (fuzzing found 991 bytes nested 37 deep that took over 10 s).
const MAX_NESTING: usize = 16;

/// Refuses text nested deeper than [`MAX_NESTING`] before the parser sees it.
/// Brackets count, and so do template interpolations (`${ … }`, `%{ … }`)
/// inside strings, since the parser reads those as expressions (fuzzing found
/// 564 bytes of interpolations and operators that took over 10 s). Other text
/// in strings and comments does not count.
fn check_nesting(text: &str) -> std::result::Result<(), String> {
    /// What encloses the current character.
    #[derive(PartialEq)]
    enum Frame {
        Bracket,
        Interpolation,
        Str,
    }
    let mut stack: Vec<Frame> = Vec::new();
    let mut depth = 0usize;
    let (mut line, mut column) = (1usize, 0usize);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        column += 1;
        if c == '\n' {
            (line, column) = (line + 1, 0);
            if stack.last() != Some(&Frame::Str) {
                continue;
            }
        }
        let opens = if stack.last() == Some(&Frame::Str) {
            match c {
                '\\' | '$' | '%' if chars.peek() == Some(&c) => {
                    // An escape, or `$${`/`%%{`: a literal, not an interpolation.
                    chars.next();
                    column += 1;
                    false
                }
                '\\' => {
                    chars.next();
                    column += 1;
                    false
                }
                '"' => {
                    stack.pop();
                    false
                }
                '$' | '%' if chars.next_if_eq(&'{').is_some() => {
                    column += 1;
                    stack.push(Frame::Interpolation);
                    true
                }
                _ => false,
            }
        } else {
            match c {
                '"' => {
                    stack.push(Frame::Str);
                    false
                }
                '#' => {
                    skip_line(&mut chars);
                    false
                }
                '/' if chars.next_if_eq(&'/').is_some() => {
                    skip_line(&mut chars);
                    false
                }
                '/' if chars.next_if_eq(&'*').is_some() => {
                    // A block comment: to its end, counting lines.
                    let mut star = false;
                    for c in chars.by_ref() {
                        if c == '\n' {
                            (line, column) = (line + 1, 0);
                        }
                        if star && c == '/' {
                            break;
                        }
                        star = c == '*';
                    }
                    false
                }
                '{' | '[' | '(' => {
                    stack.push(Frame::Bracket);
                    true
                }
                '}' | ']' | ')' => {
                    if stack.pop().is_some() {
                        depth -= 1;
                    }
                    false
                }
                _ => false,
            }
        };
        if opens {
            depth += 1;
            if depth > MAX_NESTING {
                return Err(format!(
                    "invalid HCL at line {line}, column {column}: nested more than {MAX_NESTING} levels deep (a SPIRE server.conf needs far fewer)"
                ));
            }
        }
    }
    Ok(())
}

/// Skips to the end of the line; the newline is left for the caller.
fn skip_line(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    while chars.next_if(|c| *c != '\n').is_some() {}
}

fn conf_err(path: &Path, message: String) -> Error {
    Error::SpireConfig {
        path: PathBuf::from(path),
        message,
    }
}

/// Parses config text; the error is a message without the path.
///
/// # Errors
/// As [`load`].
pub fn parse(text: &str) -> std::result::Result<SpireDatastoreConfig, String> {
    check_nesting(text)?;
    // The HCL parser's full message quotes the offending line, which may be
    // the connection string with its password: keep the position and the
    // parser's own description of what it expected.
    let body: Body = hcl::parse(text).map_err(|e| match &e {
        hcl::Error::Parse(p) => format!(
            "invalid HCL at line {}, column {}: {}",
            p.location().line(),
            p.location().column(),
            p.message()
        ),
        other => format!(
            "invalid HCL: {}",
            other.to_string().lines().next().unwrap_or("syntax error")
        ),
    })?;

    let data_dir = body
        .blocks()
        .filter(|b| b.identifier() == "server")
        .find_map(|b| {
            b.body()
                .attributes()
                .find(|a| a.key() == "data_dir")
                .and_then(|a| as_string(a.expr()))
        });

    let mut datastores = Vec::new();
    for plugins in body.blocks().filter(|b| b.identifier() == "plugins") {
        for block in plugins
            .body()
            .blocks()
            .filter(|b| b.identifier() == "DataStore")
        {
            datastores.push(block);
        }
    }
    let block = match datastores.as_slice() {
        [] => return Err("no DataStore block under plugins { ... }; SPIRE requires exactly one DataStore \"sql\"".into()),
        [one] => *one,
        _ => return Err(format!("{} DataStore blocks; SPIRE requires exactly one", datastores.len())),
    };
    let name = block
        .labels()
        .first()
        .map(|l| l.as_str().to_string())
        .unwrap_or_default();
    if name != "sql" {
        return Err(format!(
            "DataStore \"{name}\" is not supported: SPIRE accepts only the built-in \"sql\" datastore"
        ));
    }
    let plugin_data = plugin_data(block.body()).ok_or("DataStore \"sql\" has no plugin_data")?;

    let database_type = match plugin_data.iter().find(|(k, _)| k == "database_type") {
        Some((_, Setting::Value(v))) => as_string(v).ok_or("database_type must be a string")?,
        // Block form: database_type "aws_postgres" { region = "..." }
        Some((_, Setting::Block(label))) => label.clone(),
        None => return Err("database_type must be set".into()),
    };
    let connection_string = match plugin_data.iter().find(|(k, _)| k == "connection_string") {
        Some((_, Setting::Value(Expression::String(s)))) => s.clone(),
        Some((_, Setting::Value(Expression::TemplateExpr(_)))) => {
            return Err("connection_string uses ${...} interpolation; pass --expand-env (as for spire-server -expandEnv)".into())
        }
        Some(_) => return Err("connection_string must be a string".into()),
        None => return Err("connection_string must be set".into()),
    };
    let disable_migration = match plugin_data.iter().find(|(k, _)| k == "disable_migration") {
        None => false,
        Some((_, Setting::Value(e))) => hcl1_bool(e).ok_or_else(|| {
            "disable_migration must be true or false (SPIRE also reads \"true\", \"false\", 1 and 0); SPIRE refuses any other value".to_string()
        })?,
        Some((_, Setting::Block(_))) => {
            return Err("disable_migration must be true or false, not a block".into());
        }
    };
    Ok(SpireDatastoreConfig {
        database_type,
        connection_string,
        disable_migration,
        data_dir,
        key_manager: key_manager(&body),
    })
}

/// The `KeyManager` block. Problems here never stop the datastore from
/// being read: they become [`KeyManagerConfig::Unusable`].
fn key_manager(body: &Body) -> KeyManagerConfig {
    let blocks: Vec<&hcl::Block> = body
        .blocks()
        .filter(|b| b.identifier() == "plugins")
        .flat_map(|p| p.body().blocks().filter(|b| b.identifier() == "KeyManager"))
        .collect();
    let block = match blocks.as_slice() {
        [] => {
            return KeyManagerConfig::Unusable(
                "no KeyManager block under plugins { ... } (SPIRE requires exactly one)".into(),
            );
        }
        [one] => *one,
        _ => {
            return KeyManagerConfig::Unusable(format!(
                "{} KeyManager blocks (SPIRE requires exactly one)",
                blocks.len()
            ));
        }
    };
    let name = block
        .labels()
        .first()
        .map(|l| l.as_str().to_string())
        .unwrap_or_default();
    match name.as_str() {
        "memory" => KeyManagerConfig::Memory,
        "disk" => {
            let keys_path = plugin_data(block.body()).and_then(|data| {
                data.into_iter().find_map(|(k, v)| match v {
                    Setting::Value(e) if k == "keys_path" => as_string(&e),
                    _ => None,
                })
            });
            match keys_path {
                Some(p) if !p.is_empty() => KeyManagerConfig::Disk { keys_path: p },
                _ => KeyManagerConfig::Unusable(
                    "KeyManager \"disk\" has no keys_path string in its plugin_data (SPIRE refuses to start: \"keys_path is required\")".into(),
                ),
            }
        }
        _ => KeyManagerConfig::Other(name),
    }
}

enum Setting {
    Value(Expression),
    /// A nested block, with its first label.
    Block(String),
}

/// The settings in `plugin_data { ... }` (or `plugin_data = { ... }`).
fn plugin_data(body: &Body) -> Option<Vec<(String, Setting)>> {
    if let Some(block) = body.blocks().find(|b| b.identifier() == "plugin_data") {
        let mut out: Vec<(String, Setting)> = block
            .body()
            .attributes()
            .map(|a| (a.key().to_string(), Setting::Value(a.expr().clone())))
            .collect();
        for b in block.body().blocks() {
            let label = b
                .labels()
                .first()
                .map(|l| l.as_str().to_string())
                .unwrap_or_default();
            out.push((b.identifier().to_string(), Setting::Block(label)));
        }
        return Some(out);
    }
    let attr = body.attributes().find(|a| a.key() == "plugin_data")?;
    match attr.expr() {
        Expression::Object(obj) => Some(
            obj.iter()
                .map(|(k, v)| {
                    (
                        k.to_string().trim_matches('"').to_string(),
                        Setting::Value(v.clone()),
                    )
                })
                .collect(),
        ),
        _ => None,
    }
}

/// A bool as SPIRE's HCL v1 decoder reads it (`decodeBool`): a bool, a
/// string or a number whose text, quotes removed and lower-cased, is `true`
/// or `1` (true), `false` or `0` (false). HCL users often write
/// `disable_migration = "true"`; SPIRE honours it, so must we.
fn hcl1_bool(e: &Expression) -> Option<bool> {
    let text = match e {
        Expression::Bool(b) => return Some(*b),
        Expression::String(s) => s.replace('"', "").to_lowercase(),
        Expression::Number(n) => n.to_string(),
        _ => return None,
    };
    match text.as_str() {
        "true" | "1" => Some(true),
        "false" | "0" => Some(false),
        _ => None,
    }
}

fn as_string(e: &Expression) -> Option<String> {
    match e {
        Expression::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// `os.ExpandEnv`: `$VAR` and `${VAR}`; unset variables become empty.
fn expand_env_vars(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        let name: String = if chars.peek() == Some(&'{') {
            chars.next();
            let mut n = String::new();
            for c in chars.by_ref() {
                if c == '}' {
                    break;
                }
                n.push(c);
            }
            n
        } else {
            let mut n = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_ascii_alphanumeric() || c == '_' {
                    n.push(c);
                    chars.next();
                } else {
                    break;
                }
            }
            if n.is_empty() {
                out.push('$');
                continue;
            }
            n
        };
        out.push_str(&std::env::var(&name).unwrap_or_default());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (fuzzing, `fuzz/known-slow/`): 991 bytes nested 37 deep kept
    /// the HCL parser busy for over 10 s; nesting is now refused up front.
    #[test]
    fn deep_nesting_is_refused_at_once() {
        let slow = include_str!("../../fuzz/known-slow/server_conf_hcl-nested-operators.hcl");
        let started = std::time::Instant::now();
        let e = parse(slow).unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert!(e.contains("nested more than 16 levels deep"), "{e}");
        assert!(e.starts_with("invalid HCL at line 1, column "), "{e}");
        // Braces in strings and comments do not count.
        let deep = "{".repeat(20);
        let conf = format!("# {deep}\n// {deep}\nserver {{\n  trust_domain = \"{deep}\\\"\"\n}}\n");
        assert!(check_nesting(&conf).is_ok());
        assert!(check_nesting(&"[".repeat(16)).is_ok());
        assert!(check_nesting(&"[".repeat(17)).is_err());
        assert!(check_nesting(&format!("/* {deep} */ x = 1")).is_ok());
    }

    /// Regression (fuzzing, `server_conf_hcl`): interpolations inside
    /// strings nest too; 564 bytes of them kept the parser busy over 10 s.
    #[test]
    fn nesting_inside_string_interpolations_counts() {
        let slow = include_str!("../../fuzz/known-slow/server_conf_hcl-timeout-4363b6e7.hcl");
        let started = std::time::Instant::now();
        let e = parse(slow).unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert!(e.contains("nested more than 16 levels deep"), "{e}");
        let nested = |n: usize| format!("x = {}1{}", "\"${".repeat(n), "}\"".repeat(n));
        assert!(check_nesting(&nested(16)).is_ok());
        assert!(check_nesting(&nested(17)).is_err());
        // Escaped and literal forms open nothing.
        let literal = format!("x = \"{}\"", "$${ %%{ \\\" {".repeat(20));
        assert!(check_nesting(&literal).is_ok(), "{literal}");
        // A string's own braces still do not count, nor do they close frames.
        assert!(check_nesting("a = [\"}}}}\", [[\"]]\"]]").is_ok());
    }

    const SAMPLE: &str = r#"
server {
    bind_address = "0.0.0.0"
    bind_port = "8081"
    trust_domain = "example.org"
    data_dir = "./.data"
    log_level = "DEBUG"
}

plugins {
    DataStore "sql" {
        plugin_data {
            database_type = "sqlite3"
            connection_string = "./.data/datastore.sqlite3"
        }
    }

    KeyManager "disk" {
        plugin_data {
            keys_path = "./.data/keys.json"
        }
    }
}
"#;

    #[test]
    fn reads_the_sample_server_conf() {
        let c = parse(SAMPLE).unwrap();
        assert_eq!(c.database_type, "sqlite3");
        assert_eq!(c.connection_string, "./.data/datastore.sqlite3");
        assert_eq!(c.data_dir.as_deref(), Some("./.data"));
        assert!(!c.disable_migration);
        let spec = c.connection(Path::new("/opt/spire")).unwrap();
        assert_eq!(
            spec.redacted(),
            "sqlite:/opt/spire/./.data/datastore.sqlite3"
        );
    }

    #[test]
    fn reads_the_key_manager_and_resolves_paths_like_spire() {
        let c = parse(SAMPLE).unwrap();
        assert_eq!(
            c.key_manager,
            KeyManagerConfig::Disk {
                keys_path: "./.data/keys.json".into()
            }
        );
        let layout = c.server_layout(Path::new("/opt/spire"));
        assert_eq!(layout.data_dir, Some(PathBuf::from("/opt/spire/.data")));
        assert_eq!(
            layout.keys_path,
            Some(PathBuf::from("/opt/spire/.data/keys.json"))
        );
        assert_eq!(
            layout.datastore_files,
            ["", "-wal", "-shm", "-journal"]
                .map(|s| PathBuf::from(format!("/opt/spire/.data/datastore.sqlite3{s}")))
        );
        // Absolute paths stay as written; `plugin_data = { ... }` works too.
        let abs = SAMPLE
            .replace("./.data/keys.json", "/var/lib/spire/../spire/keys.json")
            .replace(
                "plugin_data {\n            keys_path",
                "plugin_data = {\n            keys_path",
            );
        let layout = parse(&abs).unwrap().server_layout(Path::new("/opt/spire"));
        assert_eq!(
            layout.keys_path,
            Some(PathBuf::from("/var/lib/spire/keys.json"))
        );
    }

    #[test]
    fn memory_and_other_key_managers_are_recognised() {
        let with = |km: &str| SAMPLE.replace("KeyManager \"disk\"", km);
        let memory = parse(&with("KeyManager \"memory\"")).unwrap();
        assert_eq!(memory.key_manager, KeyManagerConfig::Memory);
        assert_eq!(memory.server_layout(Path::new("/x")).keys_path, None);
        assert_eq!(
            parse(&with("KeyManager \"aws_kms\"")).unwrap().key_manager,
            KeyManagerConfig::Other("aws_kms".into())
        );
        let no_path = SAMPLE.replace("keys_path = \"./.data/keys.json\"", "");
        assert!(matches!(
            parse(&no_path).unwrap().key_manager,
            KeyManagerConfig::Unusable(m) if m.contains("keys_path")
        ));
        let none = SAMPLE.replace("KeyManager \"disk\"", "NodeAttestor \"join_token\"");
        assert!(matches!(
            parse(&none).unwrap().key_manager,
            KeyManagerConfig::Unusable(m) if m.contains("no KeyManager")
        ));
        // A non-SQLite datastore has no file to leave out.
        let pg = SAMPLE
            .replace("\"sqlite3\"", "\"postgres\"")
            .replace("./.data/datastore.sqlite3", "dbname=spire host=db");
        assert_eq!(
            parse(&pg)
                .unwrap()
                .server_layout(Path::new("/x"))
                .datastore_files,
            Vec::<PathBuf>::new()
        );
    }

    #[test]
    fn normalize_is_lexical() {
        assert_eq!(normalize(Path::new("/a/./b/../c")), PathBuf::from("/a/c"));
        assert_eq!(normalize(Path::new("./x")), PathBuf::from("x"));
        assert_eq!(normalize(Path::new("../x")), PathBuf::from("../x"));
    }

    #[test]
    fn aws_block_form_is_recognised_and_refused() {
        let text = r#"
plugins {
    DataStore "sql" {
        plugin_data {
            database_type "aws_postgres" {
                region = "us-east-1"
            }
            connection_string = "dbname=spire user=spire host=db"
        }
    }
}"#;
        let c = parse(text).unwrap();
        assert_eq!(c.database_type, "aws_postgres");
        let err = c.connection(Path::new("/")).unwrap_err().to_string();
        assert!(err.contains("not supported yet"), "{err}");
    }

    #[test]
    fn disable_migration_and_mysql() {
        let text = r#"
plugins {
    DataStore "sql" {
        plugin_data {
            database_type = "mysql"
            connection_string = "spire:pw@tcp(db:3306)/spire?parseTime=true"
            disable_migration = true
        }
    }
}"#;
        let c = parse(text).unwrap();
        assert!(c.disable_migration);
        assert_eq!(
            c.connection(Path::new("/")).unwrap().engine(),
            Engine::Mysql
        );
    }

    fn with_disable_migration(value: &str) -> std::result::Result<SpireDatastoreConfig, String> {
        parse(&format!(
            r#"
plugins {{
    DataStore "sql" {{
        plugin_data {{
            database_type = "sqlite3"
            connection_string = "./.data/datastore.sqlite3"
            disable_migration = {value}
        }}
    }}
}}"#
        ))
    }

    #[test]
    fn disable_migration_is_read_as_spire_reads_it() {
        // HCL v1's decodeBool accepts quoted and numeric forms (issue 13:
        // `"true"` used to be read as false).
        for (value, expected) in [
            ("true", true),
            ("false", false),
            ("\"true\"", true),
            ("\"TRUE\"", true),
            ("\"True\"", true),
            ("\"false\"", false),
            ("\"1\"", true),
            ("\"0\"", false),
            ("1", true),
            ("0", false),
        ] {
            let c = with_disable_migration(value).unwrap_or_else(|e| panic!("{value}: {e}"));
            assert_eq!(c.disable_migration, expected, "disable_migration = {value}");
        }
        // What SPIRE refuses, spirekeep refuses too, rather than guessing.
        for value in ["\"yes\"", "2", "\"\"", "[true]"] {
            let err = with_disable_migration(value).unwrap_err();
            assert!(
                err.contains("disable_migration must be true or false"),
                "{value}: {err}"
            );
        }
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        assert!(parse("server { }").unwrap_err().contains("no DataStore"));
        assert!(
            parse("plugins {\n DataStore \"x\" {\n plugin_data {\n }\n }\n}")
                .unwrap_err()
                .contains("only the built-in")
        );
        assert!(
            parse("plugins {\n DataStore \"sql\" {\n plugin_data {\n connection_string = \"x\"\n }\n }\n}")
                .unwrap_err()
                .contains("database_type must be set")
        );
        let err = parse(r#"plugins { DataStore "sql" { plugin_data { database_type = "postgres" connection_string = "password=hunter2 host=x" oops } } }"#).unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
        // Regression (issue 14): a syntax error printed "invalid HCL: " and nothing else.
        let err = parse(
            "plugins {\n    DataStore \"sql\" {\n        plugin_data {\n            database_type = \"postgres\"\n            connection_string = \"password=hunter2\"\n        }\n    }\n}\nx = = 1\n",
        )
        .unwrap_err();
        assert!(err.starts_with("invalid HCL at line 9, column "), "{err}");
        assert!(
            err.len() > "invalid HCL at line 9, column 5: ".len(),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
        let err = parse(
            r#"
plugins {
    DataStore "sql" {
        plugin_data {
            database_type = "postgres"
            connection_string = "password=${DB_PASSWORD} host=x"
        }
    }
}"#,
        )
        .unwrap_err();
        assert!(err.contains("--expand-env"), "{err}");
    }

    #[test]
    fn expands_environment_like_spire() {
        let key = "SPIREKEEP_TEST_EXPAND_VAR_7731";
        // Reading only: we do not set env vars in tests (set_var is unsafe in edition 2024).
        assert_eq!(
            expand_env_vars(&format!("a ${{{key}}} b ${key}c $ d")),
            "a  b  $ d"
        );
        assert_eq!(expand_env_vars("cost $"), "cost $");
    }
}
