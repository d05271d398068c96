//! What a restore never brings back from an older snapshot, and the live
//! agents it carries over (issue 12, items 2 and 3; spire-reference §11), on
//! every engine through the real binary: a live SPIRE datastore changes
//! after its snapshot (a join token used, a new one issued, the own bundle
//! rotated, an entry updated, agents attested, renewed, banned and evicted, a
//! join-token agent with its alias entry), then the snapshot is restored over
//! it with and without `--keep-live-agents`, and into an empty target.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{SpireFixture, file_repo, ok_json, spirekeep, stderr, stdout};
use serde_json::Value as Json;
use spirekeep::datastore::testkit::Population;
use spirekeep::datastore::{self, ColumnKind, Datastore, Engine, OpenMode, Value, dsn};

const OWN: &str = "spiffe://example.org";
const NEW_AGENT: &str = "spiffe://example.org/spire/agent/join_token/attested-since";
const ALIAS_ENTRY: &str = "alias-of-attested-since";

/// Every row of `table`, each as column → value.
async fn rows(ds: &dyn Datastore, table: &str) -> Vec<BTreeMap<String, Value>> {
    let catalogue = ds.catalogue().await.unwrap();
    let t = catalogue
        .table(table)
        .unwrap_or_else(|| panic!("no {table}"));
    ds.read_table(t)
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            t.columns
                .iter()
                .map(|c| c.name.clone())
                .zip(r)
                .collect::<BTreeMap<_, _>>()
        })
        .collect()
}

fn text(row: &BTreeMap<String, Value>, column: &str) -> String {
    match &row[column] {
        Value::Text(s) => s.clone(),
        Value::Null => String::new(),
        other => panic!("{column}: {other:?}"),
    }
}

fn int(row: &BTreeMap<String, Value>, column: &str) -> i64 {
    match &row[column] {
        Value::Int(i) => *i,
        other => panic!("{column}: {other:?}"),
    }
}

/// The agents as (spiffe id, serial number).
async fn agents(ds: &dyn Datastore) -> BTreeSet<(String, String)> {
    rows(ds, "attested_node_entries")
        .await
        .iter()
        .map(|r| (text(r, "spiffe_id"), text(r, "serial_number")))
        .collect()
}

async fn node_selectors(ds: &dyn Datastore) -> BTreeSet<(String, String, String)> {
    rows(ds, "node_resolver_map_entries")
        .await
        .iter()
        .map(|r| (text(r, "spiffe_id"), text(r, "type"), text(r, "value")))
        .collect()
}

async fn tokens(ds: &dyn Datastore) -> BTreeSet<String> {
    rows(ds, "join_tokens")
        .await
        .iter()
        .map(|r| text(r, "token"))
        .collect()
}

async fn own_bundle(ds: &dyn Datastore) -> Value {
    rows(ds, "bundles")
        .await
        .into_iter()
        .find(|r| text(r, "trust_domain") == OWN)
        .expect("the own bundle")["data"]
        .clone()
}

fn cols(names: &[(&str, ColumnKind)]) -> Vec<(String, ColumnKind)> {
    names.iter().map(|(n, k)| ((*n).to_string(), *k)).collect()
}

/// What the live datastore went through since the snapshot; returns the
/// entry whose revision moved, with its live revision.
async fn change_since_the_snapshot(ds: &dyn Datastore) -> (String, i64) {
    use ColumnKind::{Bytes, Integer, Text};
    // A join token used (SPIRE deletes it), another issued.
    let used = tokens(ds).await.into_iter().next().unwrap();
    ds.execute_script(&format!("DELETE FROM join_tokens WHERE token = '{used}'"))
        .await
        .unwrap();
    ds.insert_rows(
        "join_tokens",
        &cols(&[("token", Text), ("expiry", Integer)]),
        &[vec![
            Value::Text("issued-since".into()),
            Value::Int(4_102_444_800),
        ]],
    )
    .await
    .unwrap();
    // The own bundle rotated: same row id, new data.
    let bundle = rows(ds, "bundles")
        .await
        .into_iter()
        .find(|r| text(r, "trust_domain") == OWN)
        .unwrap();
    ds.execute_script(&format!("DELETE FROM bundles WHERE trust_domain = '{OWN}'"))
        .await
        .unwrap();
    ds.insert_rows(
        "bundles",
        &cols(&[("id", Integer), ("trust_domain", Text), ("data", Bytes)]),
        &[vec![
            bundle["id"].clone(),
            Value::Text(OWN.into()),
            Value::Bytes(b"rotated-since".to_vec()),
        ]],
    )
    .await
    .unwrap();
    // Entries updated: a revision bumped, a TTL changed, a selector added.
    let mut all_entries = rows(ds, "registered_entries").await;
    let (ttl_entry, selector_entry) = (all_entries.remove(1), all_entries.remove(1));
    ds.execute_script(&format!(
        "UPDATE registered_entries SET ttl = 4242 WHERE entry_id = '{}'",
        text(&ttl_entry, "entry_id")
    ))
    .await
    .unwrap();
    ds.insert_rows(
        "selectors",
        &cols(&[
            ("registered_entry_id", Integer),
            ("type", Text),
            ("value", Text),
        ]),
        &[vec![
            selector_entry["id"].clone(),
            Value::Text("unix".into()),
            Value::Text("uid:4242".into()),
        ]],
    )
    .await
    .unwrap();
    let entry = all_entries.remove(0);
    let entry_id = text(&entry, "entry_id");
    let live_revision = int(&entry, "revision_number") + 1;
    ds.execute_script(&format!(
        "UPDATE registered_entries SET revision_number = {live_revision} WHERE entry_id = '{entry_id}'"
    ))
    .await
    .unwrap();
    // Agents: one renewed, one banned, one evicted, one attested (join token,
    // with its node selector and the alias entry SPIRE made for it).
    let all = rows(ds, "attested_node_entries").await;
    let (renewed, banned, evicted) = (
        text(&all[0], "spiffe_id"),
        text(&all[1], "spiffe_id"),
        text(&all[2], "spiffe_id"),
    );
    ds.execute_script(&format!(
        "UPDATE attested_node_entries SET serial_number = 'renewed-since' WHERE spiffe_id = '{renewed}';\n\
         UPDATE attested_node_entries SET serial_number = '' WHERE spiffe_id = '{banned}';\n\
         DELETE FROM attested_node_entries WHERE spiffe_id = '{evicted}'"
    ))
    .await
    .unwrap();
    ds.insert_rows(
        "attested_node_entries",
        &cols(&[
            ("spiffe_id", Text),
            ("data_type", Text),
            ("serial_number", Text),
        ]),
        &[vec![
            Value::Text(NEW_AGENT.into()),
            Value::Text("join_token".into()),
            Value::Text("4242".into()),
        ]],
    )
    .await
    .unwrap();
    ds.insert_rows(
        "node_resolver_map_entries",
        &cols(&[("spiffe_id", Text), ("type", Text), ("value", Text)]),
        &[vec![
            Value::Text(NEW_AGENT.into()),
            Value::Text("join_token".into()),
            Value::Text("attested-since".into()),
        ]],
    )
    .await
    .unwrap();
    ds.insert_rows(
        "registered_entries",
        &cols(&[
            ("entry_id", Text),
            ("spiffe_id", Text),
            ("parent_id", Text),
            ("revision_number", Integer),
        ]),
        &[vec![
            Value::Text(ALIAS_ENTRY.into()),
            Value::Text("spiffe://example.org/node/attested-since".into()),
            Value::Text(NEW_AGENT.into()),
            Value::Int(0),
        ]],
    )
    .await
    .unwrap();
    let alias = rows(ds, "registered_entries")
        .await
        .into_iter()
        .find(|r| text(r, "entry_id") == ALIAS_ENTRY)
        .unwrap();
    ds.insert_rows(
        "dns_names",
        &cols(&[("registered_entry_id", Integer), ("value", Text)]),
        &[vec![
            alias["id"].clone(),
            Value::Text("alias.example.org".into()),
        ]],
    )
    .await
    .unwrap();
    (entry_id, live_revision)
}

async fn open_sqlite(path: &str) -> Box<dyn Datastore> {
    let spec = dsn::parse(path, Some(Engine::Sqlite), std::path::Path::new(".")).unwrap();
    datastore::open(&spec, OpenMode::ReadWrite).await.unwrap()
}

fn restore_json(id: &str, url: &str, repo: &[String], extra: &[&str]) -> Json {
    let mut args = vec!["restore", id, "--datastore", url, "--replace"];
    args.extend(extra);
    ok_json(&args, repo)
}

async fn rules_on_a_live_target(engine: Engine) {
    let population = Population {
        seed: 21,
        four_byte_utf8: Some(false),
        subsecond: false,
        ..Population::new(40)
    };
    let Some(fx) = SpireFixture::create(engine, "rules", &population).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let repo = file_repo(&dir);
    let backup = ok_json(&["backup", "--datastore", &fx.url()], &repo);
    let id = backup["id"].as_str().unwrap().to_string();
    let ds = fx.open().await;
    let snapshot_agents = agents(ds.as_ref()).await;
    let snapshot_selectors = node_selectors(ds.as_ref()).await;
    let snapshot_tokens = tokens(ds.as_ref()).await;
    let snapshot_bundle = own_bundle(ds.as_ref()).await;
    let (moved_entry, live_revision) = change_since_the_snapshot(ds.as_ref()).await;
    let live_agents = agents(ds.as_ref()).await;
    let live_selectors = node_selectors(ds.as_ref()).await;
    let live_tokens = tokens(ds.as_ref()).await;
    ds.close().await;
    let url = fx.url();

    // The dry run shows what the rules will do, and changes nothing.
    let plan = restore_json(&id, &url, &repo, &["--keep-live-agents", "--dry-run"]);
    let impact = &plan["impact"];
    assert_eq!(impact["entries"]["changed_since"], 2, "{impact}");
    assert_eq!(impact["entry_changes"]["by_aspect"]["ttls"]["count"], 1);
    assert_eq!(
        impact["entry_changes"]["by_aspect"]["selectors"]["count"],
        1
    );
    assert_eq!(impact["entries"]["created_since"], 1, "the alias entry");
    assert_eq!(impact["bundles"]["changed_since"], 1);
    assert_eq!(impact["bundles"]["changed_examples"][0], OWN);
    assert_eq!(impact["join_tokens"]["used_since"], 1);
    assert_eq!(impact["join_tokens"]["issued_since"], 1);
    assert_eq!(impact["federation"]["changed_since"], 0);
    assert_eq!(impact["ca_journal"]["changed_since"], 0);
    let rules = &plan["rules"];
    assert_eq!(rules["live_datastore"], true, "{rules}");
    assert_eq!(rules["trust_domain"], OWN);
    assert_eq!(rules["join_tokens"]["mode"], "live");
    assert_eq!(rules["join_tokens"]["dropped_gone_live"], 1);
    assert_eq!(rules["own_bundle"]["kept"], "live");
    assert_eq!(rules["own_bundle"]["differed"], true);
    assert_eq!(rules["revisions"]["moved"], 1);
    assert_eq!(rules["revisions"]["examples"][0], moved_entry.as_str());
    assert_eq!(rules["agents"]["only_live"], 1);
    assert_eq!(rules["agents"]["only_in_snapshot"], 1);
    assert_eq!(rules["agents"]["alias_entries_carried"], 1);
    assert_eq!(rules["agents"]["examples_only_live"][0], NEW_AGENT);
    let ds = fx.open().await;
    assert_eq!(
        agents(ds.as_ref()).await,
        live_agents,
        "a dry run changed the agents"
    );
    ds.close().await;

    // --keep-live-agents: the live agents, their selectors and the alias entry stay.
    let report = restore_json(&id, &url, &repo, &["--keep-live-agents"]);
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["rules"], *rules, "the load did what the plan said");
    let ds = fx.open().await;
    assert_eq!(agents(ds.as_ref()).await, live_agents);
    assert!(
        live_agents.iter().any(|(_, serial)| serial.is_empty()),
        "the banned agent stays banned"
    );
    assert_eq!(node_selectors(ds.as_ref()).await, live_selectors);
    let entries = rows(ds.as_ref(), "registered_entries").await;
    let alias = entries
        .iter()
        .find(|r| text(r, "entry_id") == ALIAS_ENTRY)
        .expect("the alias entry of the agent attested since");
    let max_other = entries
        .iter()
        .filter(|r| text(r, "entry_id") != ALIAS_ENTRY)
        .map(|r| int(r, "id"))
        .max()
        .unwrap();
    assert!(
        int(alias, "id") > max_other,
        "the alias got an id past the snapshot's"
    );
    let dns: Vec<_> = rows(ds.as_ref(), "dns_names")
        .await
        .into_iter()
        .filter(|r| text(r, "value") == "alias.example.org")
        .collect();
    assert_eq!(dns.len(), 1);
    assert_eq!(int(&dns[0], "registered_entry_id"), int(alias, "id"));
    // The rules: tokens, own bundle, revisions.
    let restored_tokens = tokens(ds.as_ref()).await;
    let expected: BTreeSet<String> = snapshot_tokens
        .intersection(&live_tokens)
        .cloned()
        .collect();
    assert_eq!(
        restored_tokens, expected,
        "only the snapshot's tokens still live"
    );
    assert!(!restored_tokens.contains("issued-since"));
    assert_eq!(
        own_bundle(ds.as_ref()).await,
        Value::Bytes(b"rotated-since".to_vec())
    );
    let moved = entries
        .iter()
        .find(|r| text(r, "entry_id") == moved_entry)
        .unwrap();
    assert_eq!(int(moved, "revision_number"), live_revision + 1);
    ds.close().await;

    // Without --keep-live-agents (after the live changes again): the snapshot's agents.
    let report = restore_json(&id, &url, &repo, &[]);
    assert_eq!(report["ok"], true, "{report}");
    assert!(report["rules"]["agents"].is_null());
    let ds = fx.open().await;
    assert_eq!(agents(ds.as_ref()).await, snapshot_agents);
    assert_eq!(node_selectors(ds.as_ref()).await, snapshot_selectors);
    assert!(
        !rows(ds.as_ref(), "registered_entries")
            .await
            .iter()
            .any(|r| text(r, "entry_id") == ALIAS_ENTRY)
    );
    ds.close().await;

    // Every rule off, as told: the snapshot exactly.
    let report = restore_json(
        &id,
        &url,
        &repo,
        &[
            "--keep-join-tokens",
            "--keep-snapshot-bundle",
            "--keep-snapshot-revisions",
        ],
    );
    assert_eq!(report["ok"], true, "{report}");
    let ds = fx.open().await;
    assert_eq!(tokens(ds.as_ref()).await, snapshot_tokens);
    assert_eq!(own_bundle(ds.as_ref()).await, snapshot_bundle);
    for t in &report["tables"].as_array().unwrap()[..] {
        assert_eq!(t["matches_manifest"], true, "{t}");
    }
    ds.close().await;
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rules_on_a_live_target_sqlite() {
    rules_on_a_live_target(Engine::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rules_on_a_live_target_postgres() {
    rules_on_a_live_target(Engine::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rules_on_a_live_target_mysql() {
    rules_on_a_live_target(Engine::Mysql).await;
}

/// Into an empty target (the datastore is lost): nothing tells which
/// tokens were used since, so the unexpired ones stay out unless told.
#[tokio::test(flavor = "multi_thread")]
async fn without_a_live_datastore_unexpired_tokens_stay_out() {
    let Some(fx) = SpireFixture::create(Engine::Sqlite, "rules-empty", &Population::new(30)).await
    else {
        return;
    };
    let ds = fx.open().await;
    ds.insert_rows(
        "join_tokens",
        &cols(&[("token", ColumnKind::Text), ("expiry", ColumnKind::Integer)]),
        &[
            vec![Value::Text("expired-long-ago".into()), Value::Int(1)],
            vec![
                Value::Text("valid-for-years".into()),
                Value::Int(4_102_444_800),
            ],
        ],
    )
    .await
    .unwrap();
    let all = tokens(ds.as_ref()).await;
    ds.close().await;
    let dir = tempfile::tempdir().unwrap();
    let repo = file_repo(&dir);
    let backup = ok_json(&["backup", "--datastore", &fx.url()], &repo);
    let id = backup["id"].as_str().unwrap();

    let target = dir.path().join("lost.sqlite3");
    let target = target.to_str().unwrap();
    // The dry run counts them; the text says what to do.
    let mut args = vec!["restore", id, "--datastore", target, "--dry-run"];
    args.extend(repo.iter().map(String::as_str));
    let out = spirekeep(&args, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("unexpired left out"),
        "{}",
        stdout(&out)
    );
    let report = ok_json(&["restore", id, "--datastore", target], &repo);
    let rule = &report["rules"]["join_tokens"];
    assert_eq!(rule["mode"], "unexpired-dropped");
    let ds = open_sqlite(target).await;
    let kept = tokens(ds.as_ref()).await;
    ds.close().await;
    // SPIRE runs its SQLite datastore in WAL mode: the restored file is in it.
    {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{target}"))
            .await
            .unwrap();
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        conn.close().await.unwrap();
    }
    assert!(kept.contains("expired-long-ago"));
    assert!(!kept.contains("valid-for-years"));
    assert_eq!(
        rule["kept"].as_u64().unwrap() + rule["dropped_unexpired"].as_u64().unwrap(),
        all.len() as u64
    );
    assert_eq!(kept.len() as u64, rule["kept"].as_u64().unwrap());

    // As told, all of them.
    let told = dir.path().join("told.sqlite3");
    let told = told.to_str().unwrap();
    ok_json(
        &["restore", id, "--datastore", told, "--keep-join-tokens"],
        &repo,
    );
    let ds = open_sqlite(told).await;
    assert_eq!(tokens(ds.as_ref()).await, all);
    ds.close().await;
    fx.cleanup().await;
}
