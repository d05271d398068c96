//! `spirekeep check` against generated SPIRE datastores at schemas 23, 24 and
//! 25 on SQLite, PostgreSQL and MySQL, with targets across 1.8 … 1.15.
//!
//! The expectations come from spire-reference.md, not from the code under
//! test: §9 (which release has which schema and minimum schema), §4 (what a
//! server does at start-up: migrate, run on a newer schema within ±1 minor
//! of the stored code_version, or refuse) and §5 (one minor per upgrade,
//! agents never newer than the oldest server and at most one minor older,
//! downgrades move the agents first).

mod common;

use std::process::Output;

use common::{SpireFixture, assert_one_line_error, spirekeep, stderr, stdout};
use serde_json::Value as Json;
use spirekeep::datastore::Engine;
use spirekeep::datastore::testkit::Population;

// ------------------------------------------------------------------ helpers

/// Runs `spirekeep --json check --target <target> <args>` and returns the
/// exit code and the report, after checking that the exit code matches the
/// verdict (0: ok, 6: needs_steps, 1: refused) and nothing went to stderr.
fn check(target: &str, args: &[&str]) -> (i32, Json) {
    let mut all = vec!["--json", "check", "--target", target];
    all.extend_from_slice(args);
    let out = spirekeep(&all, &[]);
    let code = out.status.code().expect("exit code");
    let err = stderr(&out);
    assert!(
        !err.contains("error:") && !err.contains("panicked"),
        "check {all:?}: stderr:\n{err}"
    );
    let report: Json = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("check {all:?}: not JSON ({e}):\n{}", stdout(&out)));
    let expected_code = match report["verdict"].as_str() {
        Some("ok") => 0,
        Some("needs_steps") => 6,
        Some("refused") => 1,
        other => panic!("verdict {other:?} in {report:#}"),
    };
    assert_eq!(code, expected_code, "exit code for {all:?}: {report:#}");
    (code, report)
}

/// `check` on a datastore.
fn check_ds(fx: &SpireFixture, target: &str, extra: &[&str]) -> Json {
    let url = fx.url();
    let mut args = vec!["--datastore", url.as_str()];
    args.extend_from_slice(extra);
    check(target, &args).1
}

fn verdict(r: &Json) -> &str {
    r["verdict"].as_str().unwrap()
}

/// The release each server hop ends at.
fn hops(r: &Json) -> Vec<String> {
    r["path"]["hops"]
        .as_array()
        .map(|h| {
            h.iter()
                .map(|h| h["to"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Finding codes, with a trailing `*` when allowed.
fn findings(r: &Json) -> Vec<String> {
    r["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let code = f["code"].as_str().unwrap();
            if f["allowed"] == true {
                format!("{code}*")
            } else {
                code.to_owned()
            }
        })
        .collect()
}

fn finding<'a>(r: &'a Json, code: &str) -> &'a Json {
    r["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["code"] == code)
        .unwrap_or_else(|| panic!("no {code} finding in {r:#}"))
}

/// One row of the target matrix: the verdict and server hops expected.
struct Expect {
    target: &'static str,
    verdict: &'static str,
    hops: &'static [&'static str],
    /// Finding codes (`*`: allowed), in report order.
    findings: &'static [&'static str],
}

const fn expect(
    target: &'static str,
    verdict: &'static str,
    hops: &'static [&'static str],
    findings: &'static [&'static str],
) -> Expect {
    Expect {
        target,
        verdict,
        hops,
        findings,
    }
}

fn assert_matrix(fx: &SpireFixture, what: &str, extra: &[&str], rows: &[Expect]) {
    for e in rows {
        let r = check_ds(fx, e.target, extra);
        let ctx = format!("{what} on {} -> {}: {r:#}", fx.engine, e.target);
        assert_eq!(verdict(&r), e.verdict, "verdict, {ctx}");
        assert_eq!(hops(&r), e.hops, "hops, {ctx}");
        assert_eq!(findings(&r), e.findings, "findings, {ctx}");
        assert_eq!(r["target"], e.target, "{ctx}");
        // every computed path ends at the target
        if let Some(last) = hops(&r).last() {
            assert_eq!(last, e.target, "{ctx}");
        }
    }
}

/// Agents in `r.current`: (known versions with counts, unknown count).
fn agents(r: &Json) -> (Vec<(String, u64)>, u64) {
    let known = r["current"]["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["version"].as_str().unwrap().to_owned(),
                a["count"].as_u64().unwrap(),
            )
        })
        .collect();
    (known, r["current"]["agents_unknown"].as_u64().unwrap())
}

fn population(schema: u32, code_version: &str) -> Population {
    Population {
        entries: 120, // 12 agents
        schema,
        code_version: code_version.into(),
        ..Population::default()
    }
}

async fn fixture(engine: Engine, hint: &str, pop: &Population) -> Option<SpireFixture> {
    SpireFixture::create(engine, hint, pop).await
}

/// Runs SQL on the fixture (rewriting what agents report, or the migrations row).
async fn exec(fx: &SpireFixture, sql: &str) {
    let ds = fx.open().await;
    ds.execute_script(sql).await.expect(sql);
    ds.close().await;
}

/// Ground truth for the agents of a generated datastore, straight from SQL.
async fn agent_versions_in(fx: &SpireFixture) -> Vec<(Option<String>, u64)> {
    let ds = fx.open().await;
    let counts = ds
        .count_by("attested_node_entries", "agent_version")
        .await
        .unwrap();
    ds.close().await;
    counts
}

// ------------------------------------------------------------- the matrix

const UNKNOWN_OK: &[&str] = &["--allow", "agent_version_unknown"];

/// Schema 23, written by 1.13.6: no agent_version column, so every agent is
/// of unknown version.
const FROM_23: &[Expect] = &[
    // Downgrades within schema 23: SPIRE starts (same schema, §4 step 4);
    // the policy takes one minor at a time.
    expect(
        "1.8.11",
        "needs_steps",
        &["1.12.6", "1.11.3", "1.10.4", "1.9.6", "1.8.11"],
        &["agent_version_unknown*"],
    ),
    expect("1.12.6", "ok", &["1.12.6"], &["agent_version_unknown*"]),
    expect("1.13.6", "ok", &[], &["agent_version_unknown*"]),
    // 1.14.0-1.14.2 still have schema 23; 1.14.3+ migrate 23 -> 24.
    expect("1.14.2", "ok", &["1.14.2"], &["agent_version_unknown*"]),
    expect("1.14.7", "ok", &["1.14.7"], &["agent_version_unknown*"]),
    // Two minors: through the newest 1.14 (the start-up code alone would migrate 23 -> 25).
    expect(
        "1.15.0",
        "needs_steps",
        &["1.14.7", "1.15.0"],
        &["agent_version_unknown*"],
    ),
    expect(
        "1.15.3",
        "needs_steps",
        &["1.14.7", "1.15.3"],
        &["agent_version_unknown*"],
    ),
];

/// Schema 24, written by 1.14.7; agents report 1.14.3 and 1.14.7 (and some nothing).
const FROM_24: &[Expect] = &[
    // 1.12 and older are more than one minor from the stored 1.14.7: "incompatible DB schema".
    expect("1.8.11", "refused", &[], &["downgrade_refused"]),
    expect("1.12.6", "refused", &[], &["downgrade_refused"]),
    // 1.13.6 (latest 23) runs on schema 24 with a warning; the 1.14 agents go first.
    expect(
        "1.13.6",
        "needs_steps",
        &["1.13.6"],
        &["agent_version_unknown*"],
    ),
    // A patch downgrade across the schema bump runs on schema 24 (same minor);
    // the agents on 1.14.3 and 1.14.7 are newer than 1.14.2 and go first.
    expect(
        "1.14.2",
        "needs_steps",
        &["1.14.2"],
        &["agent_version_unknown*"],
    ),
    expect("1.14.7", "ok", &[], &["agent_version_unknown*"]),
    expect("1.15.0", "ok", &["1.15.0"], &["agent_version_unknown*"]),
    expect("1.15.3", "ok", &["1.15.3"], &["agent_version_unknown*"]),
];

/// Schema 25, written by 1.15.3; agents report 1.14.3, 1.14.7 and 1.15.3.
const FROM_25: &[Expect] = &[
    expect("1.9.6", "refused", &[], &["downgrade_refused"]),
    expect("1.13.6", "refused", &[], &["downgrade_refused"]),
    // 1.14.x runs on schema 25 (14 vs 15); agents on 1.15.3 are newer: they go first.
    expect(
        "1.14.0",
        "needs_steps",
        &["1.14.0"],
        &["agent_version_unknown*"],
    ),
    expect(
        "1.14.7",
        "needs_steps",
        &["1.14.7"],
        &["agent_version_unknown*"],
    ),
    // Even a patch downgrade: a 1.15.3 agent is newer than a 1.15.0 server.
    expect(
        "1.15.0",
        "needs_steps",
        &["1.15.0"],
        &["agent_version_unknown*"],
    ),
    expect("1.15.3", "ok", &[], &["agent_version_unknown*"]),
    expect("1.16.0", "refused", &[], &["unknown_release"]),
];

async fn generated_datastores(engine: Engine) {
    // ---- schema 23
    let pop = population(23, "1.13.6");
    let Some(fx) = fixture(engine, "check23", &pop).await else {
        return;
    };
    let nodes = fx.counts.rows("attested_node_entries");
    assert_eq!(nodes, 12);
    assert_matrix(&fx, "schema 23", UNKNOWN_OK, FROM_23);
    // Without --allow: the unknown agents block, as a skippable finding.
    let r = check_ds(&fx, "1.14.7", &[]);
    assert_eq!(verdict(&r), "refused");
    assert_eq!(findings(&r), ["agent_version_unknown"]);
    let f = finding(&r, "agent_version_unknown");
    assert_eq!(f["severity"], "skippable");
    assert!(
        f["message"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{nodes} agents did not report a version")),
        "{f}"
    );
    // they must run 1.13.0-1.13.6 (one minor below 1.14.7, not newer than 1.13.6)
    assert!(
        f["way_out"]
            .as_str()
            .unwrap()
            .contains("1.13.0 to 1.13.6 before the hop to 1.14.7"),
        "{f}"
    );
    assert_eq!(agents(&r), (vec![], nodes));
    assert_eq!(r["current"]["datastore"]["schema"], 23);
    assert_eq!(r["current"]["datastore"]["code_version"], "1.13.6");
    assert_eq!(r["current"]["servers"], serde_json::json!(["1.13.6"]));
    assert_eq!(r["current"]["servers_assumed"], true);
    assert_eq!(r["source"]["servers"], "datastore");
    assert_eq!(r["source"]["agents"], "datastore");
    // The hops' start-up effects (§4): 23 -> 24 at 1.14.7, then 24 -> 25.
    let r = check_ds(&fx, "1.15.3", UNKNOWN_OK);
    let h = &r["path"]["hops"];
    assert_eq!(h[0]["from"], "1.13.6");
    assert_eq!(h[0]["startup"]["outcome"], "migrated");
    assert_eq!(h[0]["startup"]["from_schema"], 23);
    assert_eq!(
        h[0]["startup"]["row"],
        serde_json::json!({"schema": 24, "code_version": "1.14.7"})
    );
    assert_eq!(h[1]["startup"]["from_schema"], 24);
    assert_eq!(h[1]["startup"]["row"]["schema"], 25);
    // Staying on schema 23: only code_version moves up.
    let r = check_ds(&fx, "1.14.2", UNKNOWN_OK);
    assert_eq!(r["path"]["hops"][0]["startup"]["outcome"], "up_to_date");
    assert_eq!(
        r["path"]["hops"][0]["startup"]["row"]["code_version"],
        "1.14.2"
    );
    // Downgrades never skip a minor either; each hop is SPIRE-startable.
    let r = check_ds(&fx, "1.8.11", UNKNOWN_OK);
    assert_eq!(r["path"]["direction"], "downgrade");
    for h in r["path"]["hops"].as_array().unwrap() {
        assert_eq!(h["minor_gap"], 1, "{h}");
        assert_eq!(h["startup"]["outcome"], "up_to_date", "{h}");
        // code_version is never lowered (§3)
        assert_eq!(h["startup"]["row"]["code_version"], "1.13.6", "{h}");
    }
    fx.cleanup().await;

    // ---- schema 24
    let pop = population(24, "1.14.7");
    let fx = fixture(engine, "check24", &pop).await.unwrap();
    let truth = agent_versions_in(&fx).await;
    let unknown: u64 = truth
        .iter()
        .filter(|(v, _)| v.as_deref().unwrap_or("").is_empty())
        .map(|(_, n)| n)
        .sum();
    let known: Vec<(String, u64)> = truth
        .iter()
        .filter_map(|(v, n)| v.clone().filter(|v| !v.is_empty()).map(|v| (v, *n)))
        .collect();
    assert_eq!(
        known.iter().map(|(v, _)| v.as_str()).collect::<Vec<_>>(),
        ["1.14.3", "1.14.7"],
        "the generator's agents for 1.14.7"
    );
    assert!(unknown > 0);
    assert_matrix(&fx, "schema 24", UNKNOWN_OK, FROM_24);
    let r = check_ds(&fx, "1.14.7", &[]);
    assert_eq!(agents(&r), (known.clone(), unknown));
    assert_eq!(findings(&r), ["agent_version_unknown"]);
    // Downgrade to 1.13.6: every reporting agent (all on 1.14.x) moves first.
    let r = check_ds(&fx, "1.13.6", UNKNOWN_OK);
    let total_known: u64 = known.iter().map(|(_, n)| n).sum();
    let before = &r["path"]["hops"][0]["agents_before"];
    assert_eq!(before["count"], total_known, "{r:#}");
    assert_eq!(before["to"], "1.13.6");
    assert_eq!(before["required"], true);
    assert_eq!(r["path"]["hops"][0]["startup"]["outcome"], "schema_ahead");
    // 1.12.6 is refused with SPIRE's message and a way out.
    let r = check_ds(&fx, "1.12.6", UNKNOWN_OK);
    let f = finding(&r, "downgrade_refused");
    assert_eq!(f["severity"], "mandatory");
    assert!(r["path"].is_null());
    let msg = f["message"].as_str().unwrap();
    assert!(
        msg.contains("incompatible DB schema and code version"),
        "{msg}"
    );
    let way_out = f["way_out"].as_str().unwrap();
    assert!(
        way_out.contains("restore a datastore backup") && way_out.contains("1.13.0"),
        "{way_out}"
    );
    fx.cleanup().await;

    // ---- schema 25
    let pop = population(25, "1.15.3");
    let fx = fixture(engine, "check25", &pop).await.unwrap();
    assert_matrix(&fx, "schema 25", UNKNOWN_OK, FROM_25);
    let newest: u64 = agent_versions_in(&fx)
        .await
        .iter()
        .filter(|(v, _)| v.as_deref() == Some("1.15.3"))
        .map(|(_, n)| n)
        .sum();
    assert!(newest > 0);
    for target in ["1.14.7", "1.15.0"] {
        let r = check_ds(&fx, target, UNKNOWN_OK);
        let before = &r["path"]["hops"][0]["agents_before"];
        assert_eq!(before["count"], newest, "{target}: {r:#}");
        assert_eq!(before["from_lines"], serde_json::json!(["1.15.x"]));
        assert_eq!(before["to"], target);
    }
    // 1.13.6 is two minors from the stored 1.15.3: no downgrade below 1.14.0.
    let r = check_ds(&fx, "1.13.6", UNKNOWN_OK);
    let way_out = finding(&r, "downgrade_refused")["way_out"]
        .as_str()
        .unwrap();
    assert!(way_out.contains("no further than 1.14.0"), "{way_out}");
    assert!(way_out.contains("(schema 23)"), "{way_out}");
    // Newer than the table: a clear "unknown release", no path, no guess.
    let r = check_ds(&fx, "1.16.0", UNKNOWN_OK);
    let f = finding(&r, "unknown_release");
    assert_eq!(f["severity"], "mandatory");
    assert!(
        f["message"]
            .as_str()
            .unwrap()
            .contains("1.16.0 is not in spirekeep's release table"),
        "{f}"
    );
    assert!(
        f["way_out"]
            .as_str()
            .unwrap()
            .contains("migrations-check/releases.csv"),
        "{f}"
    );
    assert!(r["path"].is_null());
    // The location printed never carries a password.
    let source = r["source"]["datastore"].as_str().unwrap();
    let password = common::test_password();
    if password != "spirekeep" {
        // (the default password is also the user name)
        assert!(!source.contains(&password), "{source}");
        assert!(!r.to_string().contains(&password), "password in --json");
    }
    fx.cleanup().await;
}

/// Agents whose reported versions fall outside the skew window (§5).
async fn agents_out_of_skew(engine: Engine) {
    // Servers at 1.14.7 (schema 24). Three agents report 1.12.4 (already two
    // minors behind), two report 1.13.6 (fine now, two behind 1.15), seven 1.14.7.
    let pop = population(24, "1.14.7");
    let Some(fx) = fixture(engine, "skew-old", &pop).await else {
        return;
    };
    exec(
        &fx,
        "UPDATE attested_node_entries SET agent_version = '1.12.4' WHERE id <= 3;\n\
         UPDATE attested_node_entries SET agent_version = '1.13.6' WHERE id > 3 AND id <= 5;\n\
         UPDATE attested_node_entries SET agent_version = '1.14.7' WHERE id > 5;\n",
    )
    .await;
    let r = check_ds(&fx, "1.15.3", &[]);
    assert_eq!(
        agents(&r),
        (
            vec![
                ("1.12.4".into(), 3),
                ("1.13.6".into(), 2),
                ("1.14.7".into(), 7)
            ],
            0
        )
    );
    assert_eq!(verdict(&r), "needs_steps", "{r:#}");
    assert_eq!(hops(&r), ["1.15.3"]);
    assert!(findings(&r).is_empty(), "{r:#}");
    assert_eq!(
        r["path"]["hops"][0]["agents_before"],
        serde_json::json!({"count": 5, "from_lines": ["1.12.x", "1.13.x"], "to": "1.14.7", "required": true})
    );
    // Allowing agent_skew keeps the path to the servers but reports the agents,
    // each finding naming the agents to move.
    let r = check_ds(&fx, "1.15.3", &["--allow", "agent_skew"]);
    assert_eq!(verdict(&r), "ok", "{r:#}");
    assert!(r["path"]["hops"][0]["agents_before"].is_null());
    let skew: Vec<&Json> = r["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["code"] == "agent_skew")
        .collect();
    assert!(!skew.is_empty(), "{r:#}");
    assert!(skew.iter().all(|f| f["allowed"] == true));
    assert!(
        skew[0]["way_out"]
            .as_str()
            .unwrap()
            .contains("move these 5 agents (1.12.x, 1.13.x) to 1.14.7 first"),
        "{:#}",
        skew[0]
    );
    // At the target already: the 1.12 agents are out of skew today.
    let r = check_ds(&fx, "1.14.7", &[]);
    assert_eq!(verdict(&r), "needs_steps", "{r:#}");
    assert!(hops(&r).is_empty());
    // Only the three 1.12 agents break the skew; the two 1.13 ones are one
    // minor behind, within it, and are not counted (issue 13).
    assert_eq!(
        r["path"]["agents_last"],
        serde_json::json!({"count": 3, "from_lines": ["1.12.x"], "to": "1.14.7", "required": true})
    );
    let url = fx.url();
    let out = spirekeep(&["check", "--datastore", &url, "--target", "1.14.7"], &[]);
    assert!(
        stdout(&out).contains("1. agents  move 3 agents (1.12.x) to 1.14.7\n"),
        "{}",
        stdout(&out)
    );
    let r = check_ds(&fx, "1.14.7", &["--allow", "agent_skew"]);
    let f = finding(&r, "agent_skew");
    assert!(
        f["way_out"]
            .as_str()
            .unwrap()
            .contains("move these 3 agents (1.12.x) to 1.14.7 first"),
        "{f}"
    );
    // The human report says what to do, in order.
    let url = fx.url();
    let out = spirekeep(&["check", "--datastore", &url, "--target", "1.15.3"], &[]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    let text = stdout(&out);
    for needle in [
        "Verdict: NEEDS STEPS",
        "1. agents   move 5 agents (1.12.x, 1.13.x) to 1.14.7",
        "2. servers  1.14.7 -> 1.15.3  migrates schema 24 -> 25",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    fx.cleanup().await;

    // Servers at 1.15.3 (schema 25); seven agents already on 1.15.3, five on
    // 1.14.3. A downgrade to 1.14.7 must move the seven first (§5).
    let pop = population(25, "1.15.3");
    let fx = fixture(engine, "skew-new", &pop).await.unwrap();
    exec(
        &fx,
        "UPDATE attested_node_entries SET agent_version = '1.15.3' WHERE id <= 7;\n\
         UPDATE attested_node_entries SET agent_version = '1.14.3' WHERE id > 7;\n",
    )
    .await;
    let r = check_ds(&fx, "1.14.7", &[]);
    assert_eq!(verdict(&r), "needs_steps", "{r:#}");
    assert_eq!(hops(&r), ["1.14.7"]);
    assert!(findings(&r).is_empty(), "{r:#}");
    assert_eq!(
        r["path"]["hops"][0]["agents_before"],
        serde_json::json!({"count": 7, "from_lines": ["1.15.x"], "to": "1.14.7", "required": true})
    );
    assert_eq!(r["path"]["hops"][0]["startup"]["outcome"], "schema_ahead");
    // Staying on 1.15.3: nothing required, the 1.14 agents are one minor behind.
    let r = check_ds(&fx, "1.15.3", &[]);
    assert_eq!(verdict(&r), "ok", "{r:#}");
    assert!(findings(&r).is_empty());
    assert_eq!(
        r["path"]["agents_last"],
        serde_json::json!({"count": 5, "from_lines": ["1.14.x"], "to": "1.15.3", "required": false})
    );
    // Too far down whatever the agents do.
    let r = check_ds(&fx, "1.13.6", &[]);
    assert_eq!(findings(&r), ["downgrade_refused"]);
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_generated_datastores() {
    generated_datastores(Engine::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_generated_datastores() {
    generated_datastores(Engine::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mysql_generated_datastores() {
    generated_datastores(Engine::Mysql).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_agents_out_of_skew() {
    agents_out_of_skew(Engine::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_agents_out_of_skew() {
    agents_out_of_skew(Engine::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mysql_agents_out_of_skew() {
    agents_out_of_skew(Engine::Mysql).await;
}

// ------------------------------------------- rows SPIRE or people may leave

/// A SQLite datastore whose migrations row is then set by hand.
async fn with_row(schema: u32, sql: &str) -> SpireFixture {
    let fx = fixture(Engine::Sqlite, "row", &population(schema, "1.13.6"))
        .await
        .unwrap();
    exec(&fx, sql).await;
    fx
}

#[tokio::test(flavor = "multi_thread")]
async fn migrations_rows_as_found() {
    // Schema 22 (1.7.x): 1.15.3 would refuse ("requires a previous SPIRE
    // release"); the path goes through 1.8 first, one minor at a time.
    let fx = with_row(
        23,
        "UPDATE migrations SET version = 22, code_version = '1.7.6';",
    )
    .await;
    let r = check_ds(&fx, "1.15.3", UNKNOWN_OK);
    assert_eq!(verdict(&r), "needs_steps");
    assert_eq!(
        hops(&r),
        [
            "1.8.11", "1.9.6", "1.10.4", "1.11.3", "1.12.6", "1.13.6", "1.14.7", "1.15.3"
        ]
    );
    assert_eq!(r["path"]["hops"][0]["startup"]["outcome"], "migrated");
    assert_eq!(r["path"]["hops"][0]["startup"]["from_schema"], 22);
    fx.cleanup().await;

    // A dev build's code_version parses as SPIRE parses it.
    let fx = with_row(23, "UPDATE migrations SET code_version = '1.8.0-dev-unk';").await;
    let r = check_ds(&fx, "1.9.6", UNKNOWN_OK);
    assert_eq!(verdict(&r), "ok", "{r:#}");
    assert_eq!(hops(&r), ["1.9.6"]);
    assert_eq!(
        r["current"]["servers"],
        serde_json::json!(["1.8.0-dev-unk"])
    );
    fx.cleanup().await;

    // A code_version SPIRE cannot parse: every server refuses to start.
    let fx = with_row(23, "UPDATE migrations SET code_version = 'one.two';").await;
    let r = check_ds(&fx, "1.14.7", UNKNOWN_OK);
    assert_eq!(findings(&r), ["bad_code_version"]);
    let f = finding(&r, "bad_code_version");
    assert_eq!(f["severity"], "mandatory");
    assert!(
        f["message"]
            .as_str()
            .unwrap()
            .contains("error getting DB code version"),
        "{f}"
    );
    fx.cleanup().await;

    // An empty code_version: the servers' version is unknown (skippable).
    let fx = with_row(23, "UPDATE migrations SET code_version = '';").await;
    let r = check_ds(&fx, "1.14.7", UNKNOWN_OK);
    assert_eq!(findings(&r)[0], "current_version_unknown");
    assert_eq!(verdict(&r), "refused");
    // ... and naming the servers fixes it
    let r = check_ds(
        &fx,
        "1.14.7",
        &[
            "--allow",
            "agent_version_unknown",
            "--server-version",
            "1.13.6",
        ],
    );
    assert_eq!(verdict(&r), "ok", "{r:#}");
    assert_eq!(r["source"]["servers"], "flags");
    fx.cleanup().await;
}

/// A datastore SPIRE never finished creating (issue 13): SPIRE's tables with
/// an empty or missing `migrations` table. `check` used to plan from an
/// invented (0, "") row; it must say what the datastore is and refuse.
#[tokio::test(flavor = "multi_thread")]
async fn incomplete_datastores_are_described_and_refused() {
    for (what, sql) in [
        ("empty", "DELETE FROM migrations;"),
        ("missing", "DROP TABLE migrations;"),
    ] {
        let fx = with_row(23, sql).await;
        for extra in [
            &[][..],
            &["--server-version", "1.13.6"][..],
            &["--allow", "current_version_unknown,agent_version_unknown"][..],
        ] {
            let r = check_ds(&fx, "1.15.3", extra);
            assert_eq!(verdict(&r), "refused", "{what} {extra:?}: {r:#}");
            assert_eq!(
                findings(&r),
                ["incomplete_datastore"],
                "{what} {extra:?}: {r:#}"
            );
            assert!(
                r["path"].is_null(),
                "{what}: no path from an invented row: {r:#}"
            );
            assert!(r["current"]["datastore"].is_null(), "{r:#}");
            let f = finding(&r, "incomplete_datastore");
            assert_eq!(f["severity"], "mandatory");
            let message = f["message"].as_str().unwrap();
            for needle in [
                "SPIRE never finished creating",
                "the shape of schema 23",
                "12 attested agents",
            ] {
                assert!(
                    message.contains(needle),
                    "{what}: {needle:?} not in {message}"
                );
            }
            let tables = if what == "empty" {
                "13 of SPIRE's 13 tables"
            } else {
                "12 of SPIRE's 13 tables"
            };
            assert!(message.contains(tables), "{what}: {message}");
            assert!(
                f["way_out"].as_str().unwrap().contains("spirekeep restore"),
                "{f}"
            );
        }
        // The human report says so in one finding, with no path, exit 1.
        let url = fx.url();
        let out = spirekeep(&["check", "--datastore", &url, "--target", "1.15.3"], &[]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let text = stdout(&out);
        assert!(text.contains("Verdict: REFUSED"), "{text}");
        assert!(text.contains("mandatory  incomplete_datastore"), "{text}");
        assert!(!text.contains("\nPath\n"), "{text}");
        fx.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn disable_migration_from_server_conf_and_flag() {
    let fx = fixture(Engine::Sqlite, "dm", &population(24, "1.14.7"))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("server.conf");
    std::fs::write(
        &conf,
        format!(
            r#"server {{
    trust_domain = "example.org"
    data_dir = "./.data"
}}
plugins {{
    DataStore "sql" {{
        plugin_data {{
            database_type = "sqlite3"
            connection_string = "{}"
            disable_migration = true
        }}
    }}
}}
"#,
            fx.sqlite_path().display()
        ),
    )
    .unwrap();
    let conf = conf.to_str().unwrap();
    // One hop, compatible: 1.15.3 would start on schema 24 without migrating.
    let (_, r) = check(
        "1.15.3",
        &["--spire-config", conf, "--allow", "agent_version_unknown"],
    );
    assert_eq!(r["current"]["disable_migration"], true);
    assert_eq!(r["source"]["disable_migration"], "server.conf");
    assert_eq!(
        findings(&r),
        ["agent_version_unknown*", "migration_disabled"]
    );
    assert_eq!(finding(&r, "migration_disabled")["severity"], "skippable");
    assert_eq!(verdict(&r), "refused");
    let (code, r) = check(
        "1.15.3",
        &[
            "--spire-config",
            conf,
            "--allow",
            "agent_version_unknown,migration_disabled",
        ],
    );
    assert_eq!((code, verdict(&r)), (0, "ok"));
    fx.cleanup().await;

    // Two hops with migration off: the second server refuses to start (§4 step 5).
    let fx = fixture(Engine::Sqlite, "dm", &population(23, "1.13.6"))
        .await
        .unwrap();
    let r = check_ds(
        &fx,
        "1.15.3",
        &["--disable-migration", "--allow", "agent_version_unknown"],
    );
    assert_eq!(r["source"]["disable_migration"], "flag");
    assert_eq!(
        findings(&r),
        ["auto_migration_required", "agent_version_unknown*"]
    );
    let f = finding(&r, "auto_migration_required");
    assert_eq!(f["severity"], "mandatory");
    assert!(
        f["message"]
            .as_str()
            .unwrap()
            .contains("auto-migration must be enabled for current DB"),
        "{f}"
    );
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn servers_and_agents_from_flags() {
    let fx = fixture(Engine::Sqlite, "flags", &population(25, "1.15.3"))
        .await
        .unwrap();
    // HA servers two minors apart (§5: ±1 minor between newest and oldest).
    let r = check_ds(
        &fx,
        "1.15.3",
        &[
            "--server-version",
            "1.13.6",
            "--server-version",
            "v1.15.3",
            "--agent-version",
            "1.13.6=4",
        ],
    );
    assert_eq!(
        r["current"]["servers"],
        serde_json::json!(["1.13.6", "1.15.3"])
    );
    assert_eq!(r["source"]["agents"], "flags");
    assert_eq!(agents(&r), (vec![("1.13.6".into(), 4)], 0));
    // The 1.13.6 servers cannot restart on schema 25 / 1.15.3 (13 vs 15).
    assert_eq!(findings(&r), ["server_skew", "not_rolling_safe"]);
    assert_eq!(verdict(&r), "refused");
    assert_eq!(hops(&r), ["1.14.7", "1.15.3"]);
    assert!(
        finding(&r, "server_skew")["way_out"]
            .as_str()
            .unwrap()
            .contains("bring the 1.13.x servers up to 1.14.7 first"),
        "{r:#}"
    );
    fx.cleanup().await;

    // No datastore: the servers' release stands in for it (skippable finding).
    let (_, r) = check(
        "1.15.3",
        &[
            "--server-version",
            "1.14.7",
            "--agent-version",
            "1.14.7=3,1.14.3",
        ],
    );
    assert_eq!(findings(&r), ["datastore_unknown"]);
    assert_eq!(
        r["current"]["datastore"],
        serde_json::json!({"schema": 24, "code_version": "1.14.7"})
    );
    assert!(r["source"]["datastore"].is_null());
    assert_eq!(
        agents(&r),
        (vec![("1.14.3".into(), 1), ("1.14.7".into(), 3)], 0)
    );
    let (code, r) = check(
        "1.15.3",
        &["--server-version", "1.14.7", "--allow", "datastore_unknown"],
    );
    assert_eq!((code, verdict(&r)), (0, "ok"));
    // The one-minor rule with --allow minor_skip (SPIRE itself would accept the jump).
    let (_, r) = check(
        "1.15.3",
        &[
            "--server-version",
            "1.13.6",
            "--allow",
            "datastore_unknown,minor_skip",
        ],
    );
    assert_eq!(hops(&r), ["1.15.3"]);
    assert_eq!(
        findings(&r),
        ["datastore_unknown*", "minor_skip*", "not_rolling_safe"]
    );
}

#[test]
fn human_output_of_the_example_datastore() {
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/spire-datastore.sqlite3"
    );
    let out = spirekeep(
        &[
            "check",
            "--datastore",
            example,
            "--target",
            "1.14.7",
            "--allow",
            "agent_version_unknown",
        ],
        &[],
    );
    // NEEDS STEPS: exit 6, so `check && upgrade` does not go ahead.
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    let text = stdout(&out);
    for needle in [
        "SPIRE compatibility check, target 1.14.7",
        "Current state",
        &format!("source             sqlite:{example}"),
        "datastore          schema 25, code_version \"1.15.3\"",
        "Verdict: NEEDS STEPS",
        "1. agents   move 5 agents (1.15.x) to 1.14.7",
        "2. servers  1.15.3 -> 1.14.7  runs on the newer schema 25",
        "allowed    agent_version_unknown",
        "way out: ",
        "DB schema is ahead of code version",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    // Refused: exit 1, with the mandatory finding and its way out.
    let out = spirekeep(
        &["check", "--datastore", example, "--target", "1.12.6"],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("Verdict: REFUSED"), "{text}");
    assert!(text.contains("mandatory  downgrade_refused"), "{text}");
    assert!(
        text.contains("way out: SPIRE has no down migrations"),
        "{text}"
    );
}

// ------------------------------------------------------------------ bad input

fn example() -> &'static str {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/spire-datastore.sqlite3"
    )
}

fn run(args: &[&str]) -> Output {
    spirekeep(args, &[])
}

#[test]
fn garbage_target_is_bad_input_before_any_io() {
    // The datastore does not exist; the target is checked first.
    let out = run(&[
        "check",
        "--datastore",
        "/nonexistent/datastore.sqlite3",
        "--target",
        "latest",
    ]);
    assert_one_line_error(&out, 2, "target \"latest\" is not a SPIRE version");
    let out = run(&["check", "--datastore", example(), "--target", "1.15"]);
    assert_one_line_error(&out, 2, "target \"1.15\" is not a SPIRE version");
    // --json puts the error on stdout too
    let out = run(&["--json", "check", "--datastore", example(), "--target", "x"]);
    assert_eq!(out.status.code(), Some(2));
    let body: Json = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("is not a SPIRE version"),
        "{body}"
    );
}

#[test]
fn unknown_releases_are_findings_not_guesses() {
    // Newer than the table.
    let out = run(&["check", "--datastore", example(), "--target", "1.16.0"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("mandatory  unknown_release"), "{text}");
    assert!(
        text.contains("SPIRE 1.16.0 is not in spirekeep's release table"),
        "{text}"
    );
    assert!(
        !text.contains("\nPath\n"),
        "no path for an unknown release:\n{text}"
    );
    // Within the table's range but never released.
    let (_, r) = check("1.14.8", &["--datastore", example()]);
    assert_eq!(findings(&r)[0], "unknown_release");
    assert!(
        finding(&r, "unknown_release")["way_out"]
            .as_str()
            .unwrap()
            .contains("e.g. 1.14.7"),
        "{r:#}"
    );
}

#[test]
fn bad_flags() {
    let ds = example();
    for (args, needle) in [
        (
            vec!["--agent-version", "1.15=3"],
            "--agent-version 1.15=3: \"1.15\" is not a SPIRE version",
        ),
        (
            vec!["--agent-version", "1.15.3=zero"],
            "COUNT \"zero\" is not a positive whole number",
        ),
        (
            vec!["--agent-version", "1.15.3=0"],
            "is not a positive whole number",
        ),
        (
            vec!["--server-version", "1.x"],
            "server version \"1.x\" is not a SPIRE version",
        ),
        (
            vec!["--allow", "no_such_code"],
            "--allow no_such_code: no such finding code; skippable codes are: minor_skip",
        ),
        (
            vec!["--allow", "downgrade_refused"],
            "downgrade_refused is mandatory",
        ),
    ] {
        let mut all = vec!["check", "--datastore", ds, "--target", "1.15.3"];
        all.extend(args);
        assert_one_line_error(&run(&all), 2, needle);
    }
    // Neither a datastore nor the servers' versions: nothing to check.
    assert_one_line_error(
        &run(&["check", "--target", "1.15.3"]),
        2,
        "no datastore given",
    );
    // clap: --target is required
    let out = run(&["check", "--datastore", ds]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--target"), "{}", stderr(&out));
}

#[test]
fn unreadable_datastores() {
    assert_one_line_error(
        &run(&[
            "check",
            "--datastore",
            "/nonexistent/dir/datastore.sqlite3",
            "--target",
            "1.15.3",
        ]),
        2,
        "does not exist",
    );
    // An empty SQLite database is not a SPIRE datastore (yet).
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.sqlite3");
    std::fs::write(&empty, b"").unwrap();
    assert_one_line_error(
        &run(&[
            "check",
            "--datastore",
            empty.to_str().unwrap(),
            "--target",
            "1.15.3",
        ]),
        2,
        "is not a SPIRE datastore",
    );
    // Nothing listens on port 1: unreachable, exit 4.
    let out = run(&[
        "check",
        "--datastore",
        "postgres://spirekeep:pw@127.0.0.1:1/spire?sslmode=disable",
        "--target",
        "1.15.3",
    ]);
    assert_one_line_error(&out, 4, "cannot reach the datastore");
}

#[test]
fn help_lists_every_finding_code() {
    let out = run(&["check", "--help"]);
    assert!(out.status.success());
    let text = stdout(&out);
    for code in spirekeep::compat::FindingCode::ALL {
        assert!(
            text.contains(code.as_str()),
            "{code} missing from --help:\n{text}"
        );
    }
    assert!(
        text.contains("Exit codes: 0 ok (deploy the target directly), 6 needs steps"),
        "{text}"
    );
}

// ------------------------------------------- one reading of the SPIRE facts

/// `check`, `plan` and `inspect` read the same facts from the same datastore
/// (issue 13): NULL and empty agent versions are one "not reported" group,
/// an empty `migrations` table is no row for all three.
async fn check_plan_and_inspect_agree(engine: Engine) {
    let Some(fx) = fixture(engine, "agree", &population(24, "1.14.7")).await else {
        return;
    };
    exec(
        &fx,
        "UPDATE attested_node_entries SET agent_version = NULL WHERE id <= 2;\n\
         UPDATE attested_node_entries SET agent_version = '' WHERE id > 2 AND id <= 5;\n\
         UPDATE attested_node_entries SET agent_version = '1.13.6' WHERE id > 5 AND id <= 7;\n\
         UPDATE attested_node_entries SET agent_version = '1.14.7' WHERE id > 7;\n",
    )
    .await;
    let plan_facts = {
        let ds = fx.open().await;
        let facts = spirekeep::plan::facts::read_datastore_from(ds.as_ref(), false)
            .await
            .unwrap();
        ds.close().await;
        facts
    };
    // plan: one "" group of 5 (2 NULL + 3 empty), then the versions.
    let plan_agents: Vec<(String, u64)> = plan_facts
        .agents
        .clone()
        .unwrap()
        .into_iter()
        .map(|a| (a.version, a.count))
        .collect();
    assert_eq!(
        plan_agents,
        [
            (String::new(), 5),
            ("1.13.6".to_owned(), 2),
            ("1.14.7".to_owned(), 5)
        ]
    );
    assert_eq!(plan_facts.agents_total, 12);
    // check: the same groups, the "" one as agents without a version.
    let r = check_ds(&fx, "1.14.7", UNKNOWN_OK);
    assert_eq!(
        agents(&r),
        (vec![("1.13.6".into(), 2), ("1.14.7".into(), 5)], 5)
    );
    let row = plan_facts.row.clone().unwrap();
    assert_eq!(r["current"]["datastore"]["schema"], row.schema);
    assert_eq!(
        r["current"]["datastore"]["code_version"],
        row.code_version.as_str()
    );
    // inspect: the same groups too.
    let url = fx.url();
    let out = spirekeep(&["--json", "inspect", "--datastore", &url], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Json = serde_json::from_str(&stdout(&out)).unwrap();
    let inspect_agents: Vec<(String, u64)> = report["agents"]["by_version"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["version"].as_str().unwrap().to_owned(),
                a["count"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(inspect_agents, plan_agents);
    assert_eq!(report["schema_version"], row.schema);

    // An empty migrations table: no row for plan (which then refuses to
    // plan), a refusal for check, no schema for inspect.
    exec(&fx, "DELETE FROM migrations;").await;
    let ds = fx.open().await;
    let plan_facts = spirekeep::plan::facts::read_datastore_from(ds.as_ref(), false)
        .await
        .unwrap();
    ds.close().await;
    assert_eq!(plan_facts.row, None);
    let r = check_ds(&fx, "1.14.7", UNKNOWN_OK);
    assert_eq!(verdict(&r), "refused");
    assert_eq!(findings(&r), ["incomplete_datastore"]);
    let out = spirekeep(&["--json", "inspect", "--datastore", &url], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Json = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(report["schema_version"].is_null(), "{report:#}");
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_check_plan_and_inspect_agree() {
    check_plan_and_inspect_agree(Engine::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_check_plan_and_inspect_agree() {
    check_plan_and_inspect_agree(Engine::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mysql_check_plan_and_inspect_agree() {
    check_plan_and_inspect_agree(Engine::Mysql).await;
}
