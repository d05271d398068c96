//! `spirekeep inspect` on generated SPIRE datastores, on every engine, reached
//! through every connection-string form SPIRE accepts and through server.conf.

mod common;

use common::{SpireFixture, assert_one_line_error, spirekeep, stderr, stdout, test_password};
use serde_json::Value as Json;
use spirekeep::datastore::Engine;
use spirekeep::datastore::testkit::Population;

fn inspect_json(args: &[&str], env: &[(&str, &str)]) -> Json {
    let mut all = vec!["inspect", "--json"];
    all.extend_from_slice(args);
    let out = spirekeep(&all, env);
    assert!(
        out.status.success(),
        "inspect {args:?} failed: {}",
        stderr(&out)
    );
    serde_json::from_str(&stdout(&out)).expect("json")
}

/// Checks one inspect report against what the generator wrote.
fn assert_report(report: &Json, fx: &SpireFixture, pop: &Population) {
    assert_eq!(report["engine"], fx.engine.to_string());
    assert_eq!(report["schema_version"], i64::from(pop.schema));
    assert_eq!(report["code_version"], pop.code_version.as_str());
    assert_eq!(report["entries"], fx.counts.rows("registered_entries"));
    assert_eq!(report["bundles"], fx.counts.rows("bundles"));
    assert_eq!(report["join_tokens"], fx.counts.rows("join_tokens"));
    assert_eq!(
        report["agents"]["total"],
        fx.counts.rows("attested_node_entries")
    );
    let tables = report["tables"].as_array().unwrap();
    assert_eq!(tables.len(), 13, "SPIRE has 13 tables");
    for t in tables {
        let name = t["name"].as_str().unwrap();
        assert_eq!(t["rows"], fx.counts.rows(name), "rows of {name}");
        assert_eq!(t["known"], true);
    }
    match &report["agents"]["by_version"] {
        Json::Null => assert_eq!(pop.schema, 23, "agent_version exists from schema 24"),
        Json::Array(list) => {
            assert!(pop.schema >= 24);
            let sum: u64 = list.iter().map(|v| v["count"].as_u64().unwrap()).sum();
            assert_eq!(sum, fx.counts.rows("attested_node_entries"));
            assert!(list.len() >= 2, "a mix of agent versions: {list:?}");
        }
        other => panic!("by_version: {other}"),
    }
}

fn server_conf(database_type: &str, connection_string: &str) -> String {
    format!(
        r#"server {{
    bind_address = "0.0.0.0"
    bind_port = "8081"
    trust_domain = "example.org"
    data_dir = "./.data"
}}

plugins {{
    DataStore "sql" {{
        plugin_data {{
            database_type = "{database_type}"
            connection_string = "{connection_string}"
        }}
    }}

    KeyManager "disk" {{
        plugin_data {{
            keys_path = "./.data/keys.json"
        }}
    }}
}}
"#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_every_form() {
    for schema in [23, 24, 25] {
        let code_version = match schema {
            23 => "1.13.2",
            24 => "1.14.7",
            _ => "1.16.0-dev-abc1234",
        };
        let pop = Population {
            entries: 150,
            schema,
            hostile: true,
            code_version: code_version.into(),
            ..Population::default()
        };
        let fx = SpireFixture::create(Engine::Sqlite, "inspect", &pop)
            .await
            .unwrap();
        let path = fx.sqlite_path();
        let dir = path.parent().unwrap();
        let p = path.display().to_string();
        // A SPIRE-style layout: <workdir>/.data/datastore.sqlite3, referenced relatively.
        std::fs::create_dir_all(dir.join(".data")).unwrap();
        std::fs::copy(&path, dir.join(".data/datastore.sqlite3")).unwrap();
        let workdir = dir.display().to_string();
        let forms: Vec<Vec<String>> = vec![
            vec!["--datastore".into(), p.clone()],
            vec![
                "--datastore".into(),
                format!("file:{p}?_foreign_keys=on&_journal_mode=WAL"),
            ],
            vec!["--datastore".into(), format!("sqlite://{p}")],
            vec![
                "--datastore".into(),
                "./.data/datastore.sqlite3".into(),
                "--spire-workdir".into(),
                workdir.clone(),
            ],
        ];
        for form in &forms {
            let args: Vec<&str> = form.iter().map(String::as_str).collect();
            assert_report(&inspect_json(&args, &[]), &fx, &pop);
        }
        let conf = dir.join("server.conf");
        std::fs::write(&conf, server_conf("sqlite3", "./.data/datastore.sqlite3")).unwrap();
        let report = inspect_json(
            &[
                "--spire-config",
                conf.to_str().unwrap(),
                "--spire-workdir",
                &workdir,
            ],
            &[],
        );
        assert_report(&report, &fx, &pop);
        // The connection string can also come from the environment.
        assert_report(
            &inspect_json(&[], &[("SPIREKEEP_DATASTORE", &p)]),
            &fx,
            &pop,
        );
        fx.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_in_wal_mode_is_read_through_sqlite() {
    let pop = Population {
        entries: 60,
        ..Population::default()
    };
    let fx = SpireFixture::create(Engine::Sqlite, "wal", &pop)
        .await
        .unwrap();
    let path = fx.sqlite_path();
    // Switch to WAL and leave a committed write in the -wal file (no checkpoint):
    // a file copy of datastore.sqlite3 alone would miss it.
    let url = format!("sqlite://{}", path.display());
    use sqlx::Connection;
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("PRAGMA journal_mode=WAL")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("PRAGMA wal_autocheckpoint=0")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("INSERT INTO join_tokens (created_at, updated_at, token, expiry) VALUES ('2026-01-01 00:00:00+00:00', '2026-01-01 00:00:00+00:00', 'wal-only-token', 1)")
        .execute(&mut conn)
        .await
        .unwrap();
    assert!(
        path.with_extension("sqlite3-wal").exists(),
        "the -wal file exists"
    );
    let report = inspect_json(&["--datastore", path.to_str().unwrap()], &[]);
    assert_eq!(
        report["join_tokens"],
        fx.counts.rows("join_tokens") + 1,
        "the row still in the WAL is seen"
    );
    conn.close().await.unwrap();
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_every_form() {
    let pop = Population {
        entries: 200,
        hostile: true,
        schema: 24,
        code_version: "1.14.7".into(),
        ..Population::default()
    };
    let Some(fx) = SpireFixture::create(Engine::Postgres, "inspect", &pop).await else {
        return;
    };
    let url = url::Url::parse(&fx.url()).unwrap();
    let (host, port, db) = (
        url.host_str().unwrap().to_string(),
        url.port().unwrap_or(5432),
        url.path().trim_start_matches('/').to_string(),
    );
    let pw = test_password();
    let forms = [
        format!("postgres://spirekeep:{pw}@{host}:{port}/{db}?sslmode=disable"),
        format!("postgresql://spirekeep:{pw}@{host}:{port}/{db}"),
        format!("dbname={db} user=spirekeep host={host} port={port} sslmode=disable password={pw}"),
        // lib/pq's default sslmode is require: the local server has a certificate.
        format!("dbname={db} user=spirekeep host={host} port={port} password='{pw}'"),
    ];
    for form in &forms {
        let report = inspect_json(&["--datastore", form], &[]);
        assert_report(&report, &fx, &pop);
        assert!(!report.to_string().contains(&pw), "password in --json");
    }
    // The password from PGPASSWORD, as lib/pq allows.
    let kv = format!("dbname={db} user=spirekeep host={host} port={port} sslmode=disable");
    assert_report(
        &inspect_json(&["--datastore", &kv], &[("PGPASSWORD", &pw)]),
        &fx,
        &pop,
    );
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("server.conf");
    std::fs::write(&conf, server_conf("postgres", &forms[2])).unwrap();
    assert_report(
        &inspect_json(&["--spire-config", conf.to_str().unwrap()], &[]),
        &fx,
        &pop,
    );
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mysql_every_form() {
    let pop = Population {
        entries: 200,
        hostile: true,
        schema: 25,
        code_version: "1.15.3".into(),
        ..Population::default()
    };
    let Some(fx) = SpireFixture::create(Engine::Mysql, "inspect", &pop).await else {
        return;
    };
    let url = url::Url::parse(&fx.url()).unwrap();
    let (host, port, db) = (
        url.host_str().unwrap().to_string(),
        url.port().unwrap_or(3306),
        url.path().trim_start_matches('/').to_string(),
    );
    let pw = test_password();
    let mut forms = vec![
        format!("spirekeep:{pw}@tcp({host}:{port})/{db}?parseTime=true"),
        format!("spirekeep:{pw}@tcp({host})/{db}?parseTime=true&charset=utf8"),
        format!("mysql://spirekeep:{pw}@{host}:{port}/{db}"),
    ];
    if let Ok(sock) = std::env::var("SPIREKEEP_TEST_MYSQL_SOCKET")
        && !sock.is_empty()
    {
        forms.push(format!("spirekeep:{pw}@unix({sock})/{db}?parseTime=true"));
    }
    for form in &forms {
        let report = inspect_json(&["--datastore", form], &[]);
        assert_report(&report, &fx, &pop);
        assert!(!report.to_string().contains(&pw), "password in --json");
    }
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("server.conf");
    std::fs::write(&conf, server_conf("mysql", &forms[0])).unwrap();
    assert_report(
        &inspect_json(&["--spire-config", conf.to_str().unwrap()], &[]),
        &fx,
        &pop,
    );
    fx.cleanup().await;
}

#[test]
fn human_output_is_a_readable_table() {
    let out = spirekeep(
        &[
            "inspect",
            "--datastore",
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/examples/spire-datastore.sqlite3"
            ),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for needle in [
        "schema version  25",
        "code version    1.15.3",
        "registered_entries",
        "TABLE",
        "ROWS",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
}

// ------------------------------------------------------------------ bad input

#[test]
fn missing_sqlite_file() {
    let out = spirekeep(
        &[
            "inspect",
            "--datastore",
            "/nonexistent/dir/datastore.sqlite3",
        ],
        &[],
    );
    assert_one_line_error(&out, 2, "does not exist");
}

#[test]
fn a_file_that_is_not_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("datastore.sqlite3");
    std::fs::write(
        &f,
        "this is not a database, just some text that is long enough to look like a header.....\n"
            .repeat(20),
    )
    .unwrap();
    let out = spirekeep(&["inspect", "--datastore", f.to_str().unwrap()], &[]);
    assert_one_line_error(&out, 2, "not a SQLite database");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sqlite_database_that_is_not_spire() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("other.db");
    let url = format!("sqlite://{}?mode=rwc", f.display());
    use sqlx::Connection;
    let mut c = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("CREATE TABLE users (id integer primary key, name text)")
        .execute(&mut c)
        .await
        .unwrap();
    c.close().await.unwrap();
    let out = spirekeep(&["inspect", "--datastore", f.to_str().unwrap()], &[]);
    assert_one_line_error(
        &out,
        2,
        "is not a SPIRE datastore: it has no `migrations` table",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn empty_server_databases_are_not_spire() {
    for engine in [Engine::Postgres, Engine::Mysql] {
        let Some(db) = spirekeep::datastore::testkit::TestDatabase::create_or_skip(engine, "empty")
            .await
            .unwrap()
        else {
            continue;
        };
        let out = spirekeep(&["inspect", "--datastore", db.url()], &[]);
        assert_one_line_error(&out, 2, "the database has no tables");
        assert!(!stderr(&out).contains(&test_password()));
        db.cleanup().await.unwrap();
    }
}

#[test]
fn unreachable_hosts() {
    for dsn in [
        "host=127.0.0.1 port=1 user=spire password=hunter2-secret dbname=spire sslmode=disable",
        "spire:hunter2-secret@tcp(127.0.0.1:1)/spire?parseTime=true",
    ] {
        let out = spirekeep(&["inspect", "--datastore", dsn], &[]);
        assert_one_line_error(&out, 4, "cannot reach the datastore");
        assert!(
            !stderr(&out).contains("hunter2-secret") && !stdout(&out).contains("hunter2-secret")
        );
        let out = spirekeep(&["inspect", "--json", "--datastore", dsn], &[]);
        assert!(
            !stdout(&out).contains("hunter2-secret"),
            "password in --json error"
        );
        let err: Json = serde_json::from_str(&stdout(&out)).expect("--json error body");
        assert!(err["error"].as_str().unwrap().contains("cannot reach"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_passwords_are_refused_and_never_printed() {
    if !spirekeep::datastore::testkit::services_required()
        && std::env::var("SPIREKEEP_TEST_PG_URL").is_err()
    {
        eprintln!("skipping: no test servers");
        return;
    }
    // spirekeep_auth has a scram password that is really checked (scripts/test-services.sh).
    let cases = [
        ("postgres://spirekeep_auth:Wrong-Pass-123@127.0.0.1:5432/postgres?sslmode=disable".to_string(), "Wrong-Pass-123"),
        ("user=spirekeep_auth password=Wrong-Pass-456 host=127.0.0.1 dbname=postgres sslmode=disable".to_string(), "Wrong-Pass-456"),
        ("spirekeep:Wrong-Pass-789@tcp(127.0.0.1:3306)/mysql?parseTime=true".to_string(), "Wrong-Pass-789"),
    ];
    for (dsn, pw) in &cases {
        let out = spirekeep(&["inspect", "--datastore", dsn], &[]);
        assert_one_line_error(&out, 4, "refused the credentials");
        assert!(
            !stderr(&out).contains(pw) && !stdout(&out).contains(pw),
            "password printed: {}",
            stderr(&out)
        );
        let out = spirekeep(&["inspect", "--json", "-vv", "--datastore", dsn], &[]);
        assert!(
            !stderr(&out).contains(pw) && !stdout(&out).contains(pw),
            "password in logs or --json"
        );
    }
}

#[test]
fn malformed_inputs() {
    let out = spirekeep(
        &["inspect", "--datastore", "spire:pw@tcp(db:3306/spire"],
        &[],
    );
    assert_one_line_error(&out, 2, "invalid");
    let out = spirekeep(
        &["inspect", "--datastore", "weird value = with spaces"],
        &[],
    );
    assert_one_line_error(&out, 2, "--database-type");
    let out = spirekeep(&["inspect"], &[]);
    assert_one_line_error(&out, 2, "no datastore given");
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("server.conf");
    std::fs::write(
        &conf,
        server_conf("aws_postgres", "dbname=spire host=db password=hunter2"),
    )
    .unwrap();
    let out = spirekeep(&["inspect", "--spire-config", conf.to_str().unwrap()], &[]);
    assert_one_line_error(&out, 2, "not supported yet");
    std::fs::write(&conf, "plugins {\n  DataStore \"sql\" {\n    plugin_data {\n      database_type = \"postgres\"\n      connection_string = \"password=hunter2 host=db\"\n      oops\n    }\n  }\n}\n").unwrap();
    let out = spirekeep(&["inspect", "--spire-config", conf.to_str().unwrap()], &[]);
    assert_one_line_error(&out, 2, "invalid HCL");
    assert!(!stderr(&out).contains("hunter2"));
    let out = spirekeep(
        &["inspect", "--spire-config", "/nonexistent/server.conf"],
        &[],
    );
    assert_one_line_error(&out, 2, "cannot read it");
}
