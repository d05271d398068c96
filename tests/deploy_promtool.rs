//! The deployment examples (`deploy/`, `docker-compose.yml`, `Dockerfile`) are checked by the tools
//! that read them, so that they work as shipped:
//!
//! - `promtool check rules` and `promtool test rules` on `deploy/prometheus/`, and
//!   `promtool check config` on the playground's Prometheus config. promtool comes from Debian's
//!   `prometheus` package (installed by `scripts/test-services.sh`). Without it these tests skip,
//!   unless `SPIREKEEP_TEST_REQUIRE_SERVICES=1` makes that a failure.
//! - Every alert has `for:`, a severity, a summary and a description, and a unit test that fires it
//!   and one that shows it quiet (plain text checks, no tool needed).
//! - Every YAML/JSON file under `deploy/` and `docker-compose.yml` parses, and every spirekeep
//!   invocation in them uses only the command-line contract's flags. This needs `python3` with
//!   PyYAML (no YAML crate is a dependency); without PyYAML it skips (promtool still parses the
//!   Prometheus files).
//! - Every file `docker-compose.yml` and `kustomization.yaml` refer to exists, and spirekeep's own
//!   `server.conf` parser reads the playground's `server.conf`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn services_required() -> bool {
    std::env::var("SPIREKEEP_TEST_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// Files directly in `dir` whose names end with `suffix`, sorted.
fn files_ending(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.is_file() && p.to_string_lossy().ends_with(suffix))
        .collect();
    files.sort();
    files
}

/// Every file under `dir`, recursively, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in
            std::fs::read_dir(&d).unwrap_or_else(|e| panic!("cannot list {}: {e}", d.display()))
        {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn rule_files() -> Vec<PathBuf> {
    let files = files_ending(&root().join("deploy/prometheus"), ".yml");
    assert_eq!(
        files.len(),
        2,
        "expected spire-alerts.yml and spirekeep-alerts.yml: {files:?}"
    );
    files
}

fn rule_test_files() -> Vec<PathBuf> {
    let files = files_ending(&root().join("deploy/prometheus/tests"), ".test.yml");
    assert_eq!(
        files.len(),
        2,
        "expected one test file per rule file: {files:?}"
    );
    files
}

fn describe(output: &Output) -> String {
    format!(
        "exit status {}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Whether promtool can run; prints a skip notice (or fails, when services are required) if not.
fn have_promtool(test: &str) -> bool {
    match Command::new("promtool").arg("--version").output() {
        Ok(out) if out.status.success() => true,
        other => {
            let why = match other {
                Ok(out) => format!("`promtool --version` failed: {}", describe(&out)),
                Err(e) => format!("promtool is not on PATH ({e})"),
            };
            assert!(
                !services_required(),
                "{why}, and SPIREKEEP_TEST_REQUIRE_SERVICES=1: install Debian's `prometheus` package \
                 (scripts/test-services.sh does)"
            );
            eprintln!("skipping {test}: {why}; install Debian's `prometheus` package");
            false
        }
    }
}

fn promtool(args: &[&str], files: &[PathBuf]) -> Output {
    let mut cmd = Command::new("promtool");
    cmd.args(args).args(files).current_dir(root());
    cmd.output().expect("promtool runs")
}

#[test]
fn promtool_check_rules_accepts_every_rule_file() {
    if !have_promtool("promtool_check_rules_accepts_every_rule_file") {
        return;
    }
    let files = rule_files();
    let out = promtool(&["check", "rules"], &files);
    assert!(
        out.status.success(),
        "promtool check rules: {}",
        describe(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.matches("SUCCESS").count(),
        files.len(),
        "one SUCCESS per rule file: {}",
        describe(&out)
    );
}

#[test]
fn promtool_rule_unit_tests_pass() {
    if !have_promtool("promtool_rule_unit_tests_pass") {
        return;
    }
    let files = rule_test_files();
    let out = promtool(&["test", "rules"], &files);
    assert!(
        out.status.success(),
        "promtool test rules: {}",
        describe(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("FAILED"), "{}", describe(&out));
}

#[test]
fn promtool_check_config_accepts_the_playground_prometheus_config() {
    if !have_promtool("promtool_check_config_accepts_the_playground_prometheus_config") {
        return;
    }
    let out = promtool(
        &["check", "config"],
        &[root().join("deploy/compose/prometheus.yml")],
    );
    assert!(
        out.status.success(),
        "promtool check config: {}",
        describe(&out)
    );
}

/// One alerting rule as written in a rule file.
struct Rule {
    name: String,
    file: String,
    body: String,
}

/// Splits a rule file into its alerting rules (plain text: the layout of deploy/prometheus).
fn alerting_rules(path: &Path) -> Vec<Rule> {
    let file = path.file_name().unwrap().to_string_lossy().into_owned();
    let mut rules = Vec::new();
    let mut current: Option<Rule> = None;
    for line in read(path).lines() {
        let t = line.trim_start();
        if let Some(name) = t.strip_prefix("- alert:") {
            rules.extend(current.take());
            current = Some(Rule {
                name: name.trim().to_string(),
                file: file.clone(),
                body: String::new(),
            });
        } else if t.starts_with("- name:") || t.starts_with("- record:") {
            rules.extend(current.take());
        } else if let Some(rule) = current.as_mut() {
            rule.body.push_str(t);
            rule.body.push('\n');
        }
    }
    rules.extend(current);
    rules
}

/// (alertname, fires) for every `alert_rule_test` case: fires when its `exp_alerts` lists an
/// alert, quiet when it is `exp_alerts: []`.
fn alert_test_cases(text: &str) -> Vec<(String, bool)> {
    let mut cases: Vec<(String, bool)> = Vec::new();
    let mut open = false;
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(name) = t.strip_prefix("alertname:") {
            cases.push((name.trim().to_string(), false));
            open = true;
        } else if t.starts_with("- eval_time:") || t.starts_with("- name:") {
            open = false;
        } else if open
            && t.starts_with("- exp_labels:")
            && let Some(case) = cases.last_mut()
        {
            case.1 = true;
        }
    }
    cases
}

#[test]
fn every_alert_is_complete_and_has_a_firing_and_a_quiet_unit_test() {
    let rules: Vec<Rule> = rule_files()
        .iter()
        .flat_map(|p| alerting_rules(p))
        .collect();
    assert!(
        rules.len() >= 15,
        "only {} alerting rules found",
        rules.len()
    );

    let mut names = std::collections::BTreeSet::new();
    for rule in &rules {
        assert!(
            names.insert(rule.name.clone()),
            "{} is defined twice",
            rule.name
        );
        for key in ["expr:", "for:", "severity:", "summary:", "description:"] {
            assert!(
                rule.body.lines().any(|l| l.starts_with(key)),
                "{} in {} has no `{key}`",
                rule.name,
                rule.file
            );
        }
        assert!(
            rule.body.contains("Way out"),
            "{} in {}: the description must name the way out",
            rule.name,
            rule.file
        );
    }

    let cases: Vec<(String, bool)> = rule_test_files()
        .iter()
        .flat_map(|p| alert_test_cases(&read(p)))
        .collect();
    for name in &names {
        assert!(
            cases.iter().any(|(n, fires)| n == name && *fires),
            "no unit test fires {name}"
        );
        assert!(
            cases.iter().any(|(n, fires)| n == name && !*fires),
            "no unit test shows {name} quiet (exp_alerts: [])"
        );
    }
    for (name, _) in &cases {
        assert!(
            names.contains(name),
            "a unit test names an unknown alert {name}"
        );
    }
}

#[test]
fn spire_alerts_use_spire_metric_names() {
    // SPIRE's Prometheus sink (hashicorp/go-metrics) adds no `_total` to counters.
    let text = read(&root().join("deploy/prometheus/spire-alerts.yml"));
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        assert!(
            !(word.starts_with("spire_") && word.ends_with("_total")),
            "{word}: SPIRE's counters have no _total suffix"
        );
    }
    for metric in [
        "spire_agent_agent_svid_rotate",
        "spire_server_rpc_agent_v1_agent_attest_agent",
        "spire_agent_started",
        "spire_server_ca_manager_x509_ca_prepare",
    ] {
        assert!(
            text.contains(metric),
            "spire-alerts.yml does not use {metric}"
        );
    }
}

/// Parses every file given and checks the spirekeep invocations against the CLI contract.
/// Exit 3: PyYAML is not importable.
const PYTHON_CHECK: &str = r#"
import json, sys
try:
    import yaml
except ImportError:
    sys.exit(3)

# The spirekeep command-line contract the examples are written against.
FLAGS = {
    "backup": {"--spire-config", "--datastore", "--repo", "--label", "--s3-endpoint",
               "--metrics-textfile", "--pushgateway", "--json"},
    "prune": {"--repo", "--keep-last", "--keep-hourly", "--keep-daily", "--keep-weekly",
              "--keep-monthly", "--dry-run"},
    "verify": {"--deep", "--repo"},
    "agent": {"--spire-config", "--repo", "--schedule", "--verify-schedule", "--keep-last",
              "--keep-daily", "--keep-weekly", "--keep-monthly", "--listen"},
}
REQUIRED = {
    "backup": {"--repo"},
    "prune": {"--repo", "--keep-last", "--keep-hourly", "--keep-daily", "--keep-weekly",
              "--keep-monthly"},
    "verify": {"--repo"},
    "agent": FLAGS["agent"],
}

errors = []
invocations = 0

def check_args(where, args):
    global invocations
    if not isinstance(args, list) or not args:
        errors.append(f"{where}: no spirekeep arguments")
        return
    invocations += 1
    sub = str(args[0])
    if sub not in FLAGS:
        errors.append(f"{where}: unknown spirekeep command {sub!r}")
        return
    flags = {str(a).split("=", 1)[0] for a in args[1:] if str(a).startswith("--")}
    for flag in sorted(flags - FLAGS[sub]):
        errors.append(f"{where}: `spirekeep {sub}` has no {flag}")
    for flag in sorted(REQUIRED[sub] - flags):
        errors.append(f"{where}: `spirekeep {sub}` needs {flag}")

def containers(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from containers(value)
    elif isinstance(node, list):
        for value in node:
            yield from containers(value)

for path in sys.argv[1:]:
    try:
        with open(path, encoding="utf-8") as fh:
            if path.endswith(".json"):
                json.load(fh)
                continue
            docs = [d for d in yaml.safe_load_all(fh) if d is not None]
    except Exception as e:
        errors.append(f"{path}: does not parse: {e}")
        continue
    if not docs:
        errors.append(f"{path}: no YAML document")
    if "/deploy/kubernetes/" in path:
        for d in docs:
            if not isinstance(d, dict) or "apiVersion" not in d or "kind" not in d:
                errors.append(f"{path}: a document without apiVersion and kind")
                continue
            name = (d.get("metadata") or {}).get("name")
            if d["kind"] != "Kustomization" and not name:
                errors.append(f"{path}: a {d['kind']} without metadata.name")
            for c in containers(d):
                if "spirekeep" in str(c.get("image", "")):
                    check_args(f"{path} {d['kind']}/{name} container {c.get('name')}", c.get("args"))
    if path.endswith("docker-compose.yml"):
        services = docs[0].get("services") if isinstance(docs[0], dict) else None
        if not isinstance(services, dict) or not services:
            errors.append(f"{path}: no services")
            continue
        for name, svc in services.items():
            if "image" not in svc and "build" not in svc:
                errors.append(f"{path}: service {name} has neither image nor build")
            if str(svc.get("image", "")).startswith("spirekeep"):
                check_args(f"{path} service {name}", svc.get("command"))

# compose: agent + one-shot backup; kubernetes: agent, backup, verify, prune.
if invocations < 6:
    errors.append(f"only {invocations} spirekeep invocations found, expected at least 6")
for e in errors:
    print(e, file=sys.stderr)
print(f"{len(sys.argv) - 1} files parsed, {invocations} spirekeep invocations checked")
sys.exit(1 if errors else 0)
"#;

#[test]
fn deploy_yaml_and_json_parse_and_use_the_cli_contract() {
    let mut files: Vec<PathBuf> = files_under(&root().join("deploy"))
        .into_iter()
        .filter(|p| {
            let s = p.to_string_lossy();
            s.ends_with(".yml") || s.ends_with(".yaml") || s.ends_with(".json")
        })
        .collect();
    files.push(root().join("docker-compose.yml"));
    assert!(files.len() >= 9, "deploy files: {files:?}");

    let mut args: Vec<OsString> = vec!["-c".into(), PYTHON_CHECK.into()];
    args.extend(files.iter().map(|p| p.clone().into_os_string()));
    let out = match Command::new("python3").args(&args).output() {
        Ok(out) => out,
        Err(e) => {
            assert!(
                !services_required(),
                "python3 is not on PATH ({e}), and SPIREKEEP_TEST_REQUIRE_SERVICES=1"
            );
            eprintln!("skipping the YAML checks: python3 is not on PATH ({e})");
            return;
        }
    };
    if out.status.code() == Some(3) {
        // PyYAML is not a declared dependency: promtool still parses the Prometheus files.
        eprintln!(
            "skipping the YAML checks: python3 has no PyYAML (Debian: python3-yaml; PyPI: PyYAML)"
        );
        return;
    }
    assert!(out.status.success(), "YAML/JSON checks: {}", describe(&out));
}

#[test]
fn docker_compose_refers_only_to_files_that_exist() {
    let root = root();
    let text = read(&root.join("docker-compose.yml"));
    assert!(
        text.lines().take(12).any(|l| l.contains("UNTESTED")),
        "docker-compose.yml must say at the top that it is untested here"
    );
    let mut refs = 0;
    for line in text.lines() {
        let t = line.trim();
        let t = t.strip_prefix("- ").unwrap_or(t);
        if let Some(rest) = t.strip_prefix("./") {
            let host = rest.split(':').next().unwrap();
            assert!(
                root.join(host).exists(),
                "docker-compose.yml mounts ./{host}, which does not exist"
            );
            refs += 1;
        } else if let Some(dockerfile) = t.strip_prefix("dockerfile:") {
            assert!(
                root.join(dockerfile.trim()).is_file(),
                "no {}",
                dockerfile.trim()
            );
            refs += 1;
        } else if let Some(context) = t.strip_prefix("context:") {
            assert!(
                root.join(context.trim()).is_dir(),
                "no build context {}",
                context.trim()
            );
        }
    }
    // server.conf three times, agent.conf, prometheus.yml, deploy/prometheus, the Dockerfile twice.
    assert!(
        refs >= 8,
        "only {refs} file references found in docker-compose.yml"
    );

    // Prometheus loads /etc/prometheus/rules/*-alerts.yml from ./deploy/prometheus.
    assert!(text.contains("./deploy/prometheus:/etc/prometheus/rules:ro"));
    let prometheus = read(&root.join("deploy/compose/prometheus.yml"));
    assert!(prometheus.contains("/etc/prometheus/rules/*-alerts.yml"));
    assert_eq!(
        files_ending(&root.join("deploy/prometheus"), "-alerts.yml").len(),
        2
    );

    let readme = read(&root.join("deploy/compose/README.md"));
    assert!(
        readme.contains("Untested here"),
        "deploy/compose/README.md must say it is untested"
    );

    let dockerfile = read(&root.join("Dockerfile"));
    assert!(
        dockerfile.contains("FROM rust:1.95"),
        "multi-stage build on rust:1.95"
    );
    assert!(dockerfile.contains("FROM debian:bookworm-slim"));
    assert!(
        dockerfile.contains("USER 65532"),
        "the image runs as non-root"
    );
}

#[test]
fn kustomization_lists_files_that_exist() {
    let dir = root().join("deploy/kubernetes");
    let text = read(&dir.join("kustomization.yaml"));
    let mut in_resources = false;
    let mut listed = Vec::new();
    for line in text.lines() {
        if line.starts_with("resources:") {
            in_resources = true;
            continue;
        }
        if in_resources {
            let t = line.trim();
            if let Some(file) = t.strip_prefix("- ").or_else(|| t.strip_prefix("# - ")) {
                listed.push(file.trim().to_string());
            } else if !line.starts_with(' ') && !t.is_empty() {
                in_resources = false;
            }
        }
    }
    // The active route and the alternative one (commented out).
    assert_eq!(
        listed,
        ["spirekeep-agent.yaml", "spirekeep-cronjob.yaml"],
        "{text}"
    );
    for file in &listed {
        assert!(
            dir.join(file).is_file(),
            "kustomization.yaml lists {file}, which does not exist"
        );
    }
}

#[test]
fn spirekeep_reads_the_playground_spire_configs() {
    use spirekeep::datastore::{Engine, spire_conf};

    let server = root().join("deploy/compose/server.conf");
    let conf = spire_conf::load(&server, false)
        .unwrap_or_else(|e| panic!("spirekeep cannot read {}: {e}", server.display()));
    assert_eq!(conf.database_type, "postgres");
    assert_eq!(
        conf.data_dir.as_deref(),
        Some("/var/lib/spire/server/.data")
    );
    let spec = conf
        .connection(Path::new("/"))
        .unwrap_or_else(|e| panic!("connection string of {}: {e}", server.display()));
    assert_eq!(spec.engine(), Engine::Postgres);

    // The agent's config is HCL too (SPIRE expands ${SPIRE_JOIN_TOKEN} before parsing).
    let agent = root().join("deploy/compose/agent.conf");
    let text = read(&agent).replace("${SPIRE_JOIN_TOKEN}", "token");
    let body: hcl::Body =
        hcl::parse(&text).unwrap_or_else(|e| panic!("{} is not valid HCL: {e}", agent.display()));
    assert!(body.blocks().any(|b| b.identifier() == "agent"));
    assert!(body.blocks().any(|b| b.identifier() == "plugins"));
}

// ------------------------------------------------- metric names: one list, every use

/// SPIRE's metric names: `deploy/spire-metric-names.txt`, the one list the alert rules and the
/// dashboard are checked against.
fn spire_metric_names() -> std::collections::BTreeSet<String> {
    let names: std::collections::BTreeSet<String> =
        read(&root().join("deploy/spire-metric-names.txt"))
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect();
    assert!(names.len() >= 20, "only {} SPIRE metric names", names.len());
    for name in &names {
        assert!(
            (name.starts_with("spire_server_") || name.starts_with("spire_agent_"))
                && !name.ends_with("_total"),
            "{name}: not a SPIRE Prometheus name (spire_server_/spire_agent_, no _total)"
        );
    }
    names
}

/// Every metric family spirekeep exports: rendered from a report with every family present.
fn spirekeep_metric_names() -> std::collections::BTreeSet<String> {
    use spirekeep::metrics::{
        FailureCounters, LockFact, MetricsReport, RepoFacts, SnapshotPoint, UpgradeFact,
    };
    let now = time::OffsetDateTime::now_utc();
    let point = SnapshotPoint {
        id: spirekeep::store::keys::SnapshotId::parse("20261128T093000Z-5b1e55").unwrap(),
        started_at: now,
        finished_at: now,
        size: 1,
        rows: 1,
    };
    let report = MetricsReport {
        repository: "s3://b/p".into(),
        facts: Some(RepoFacts {
            snapshots: 1,
            last: Some(point.clone()),
            last_verified: Some(point),
            last_verification: Some((true, now)),
            lock: Some(LockFact {
                held: true,
                holder: "h:1".into(),
                purpose: "backup".into(),
                expires_at: 1,
            }),
            upgrade: Some(UpgradeFact {
                plan_id: "p".into(),
                current_step: Some("s".into()),
                outcome: Some("completed".into()),
                ..UpgradeFact::default()
            }),
        }),
        expected_interval: Some(std::time::Duration::from_secs(3600)),
        backup_failures: FailureCounters::default(),
        verify_failures: Some(FailureCounters::default()),
        prune_failures: Some(FailureCounters::default()),
    };
    report
        .render()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Words in a PromQL expression that name a SPIRE or spirekeep metric.
fn metric_words(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("spire_") || w.starts_with("spirekeep_"))
        .map(str::to_owned)
        .collect()
}

/// Checks that every metric an expression names is exported by spirekeep or SPIRE (a summary's
/// `_sum`/`_count` series count as its name). Returns how many names were checked.
fn check_expression(
    what: &str,
    expr: &str,
    spire: &std::collections::BTreeSet<String>,
    ours: &std::collections::BTreeSet<String>,
) -> usize {
    let words = metric_words(expr);
    for word in &words {
        let base = word
            .strip_suffix("_sum")
            .or_else(|| word.strip_suffix("_count"))
            .unwrap_or(word);
        let known = if word.starts_with("spirekeep_") {
            ours.contains(word.as_str())
        } else {
            spire.contains(word.as_str()) || spire.contains(base)
        };
        assert!(
            known,
            "{what}: `{word}` is neither a metric spirekeep exports ({ours:?}) nor one in deploy/spire-metric-names.txt\n{expr}"
        );
    }
    words.len()
}

/// The `expr:` of an alerting rule body (from [`alerting_rules`]).
fn rule_expr(body: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("expr:") {
            inside = true;
            out.push_str(rest);
            out.push('\n');
        } else if inside && (line.starts_with("for:") || line.starts_with("labels:")) {
            break;
        } else if inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[test]
fn alert_rules_name_only_metrics_spire_or_spirekeep_export() {
    let spire = spire_metric_names();
    let ours = spirekeep_metric_names();
    let mut checked = 0;
    for path in rule_files() {
        for rule in alerting_rules(&path) {
            let expr = rule_expr(&rule.body);
            assert!(!expr.trim().is_empty(), "{}: no expr", rule.name);
            checked += check_expression(&format!("alert {}", rule.name), &expr, &spire, &ours);
        }
    }
    assert!(
        checked >= 20,
        "only {checked} metric names checked in the alert rules"
    );
}

/// Every panel, rows' nested panels included.
fn dashboard_panels(dashboard: &serde_json::Value) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        out.push(panel.clone());
        if let Some(inner) = panel["panels"].as_array() {
            out.extend(inner.iter().cloned());
        }
    }
    out
}

#[test]
fn grafana_dashboard_names_only_real_metrics_and_covers_the_rows() {
    let spire = spire_metric_names();
    let ours = spirekeep_metric_names();
    let dashboard: serde_json::Value =
        serde_json::from_str(&read(&root().join("deploy/grafana/spirekeep.json")))
            .expect("deploy/grafana/spirekeep.json is JSON");
    let panels = dashboard_panels(&dashboard);
    let mut used = std::collections::BTreeSet::new();
    let mut exprs = 0;
    for panel in &panels {
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().unwrap_or("?");
        let targets = panel["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no targets");
        for t in targets {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{title}: a target without expr"));
            assert!(
                check_expression(&format!("panel {title:?}"), expr, &spire, &ours) > 0,
                "panel {title:?}: {expr} names no SPIRE or spirekeep metric"
            );
            used.extend(metric_words(expr));
            exprs += 1;
        }
    }
    assert!(exprs >= 30, "only {exprs} expressions");
    // The rows the issue asks for, by what they show.
    for metric in [
        "spirekeep_backup_last_success_timestamp_seconds",
        "spirekeep_backup_expected_interval_seconds",
        "spirekeep_backup_last_verified_success_timestamp_seconds",
        "spirekeep_backup_last_size_bytes",
        "spirekeep_backup_last_duration_seconds",
        "spirekeep_snapshots",
        "spirekeep_prune_failures_total",
        "spirekeep_lock_held",
        "spirekeep_upgrade_current_step",
        "spirekeep_upgrade_steps_done",
        "spirekeep_upgrade_step_failures",
        "spire_server_ca_manager_x509_ca_prepare",
        "spire_server_rpc_agent_v1_agent_attest_agent",
        "spire_agent_started",
    ] {
        assert!(
            used.contains(metric),
            "the dashboard does not show {metric}"
        );
    }
}

#[test]
fn grafana_dashboard_is_importable_and_provisioned() {
    let root = root();
    let dashboard: serde_json::Value =
        serde_json::from_str(&read(&root.join("deploy/grafana/spirekeep.json"))).unwrap();
    // Importable as is: no fixed numeric id, a stable uid, a data source chosen by variable.
    assert!(
        dashboard["id"].is_null(),
        "a dashboard to import has id null"
    );
    assert_eq!(dashboard["uid"], "spirekeep-overview");
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    assert!(dashboard["title"].as_str().is_some_and(|t| !t.is_empty()));
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        variables.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "a Prometheus data-source variable"
    );
    let mut ids = std::collections::BTreeSet::new();
    for panel in dashboard_panels(&dashboard) {
        let title = panel["title"].as_str().unwrap_or("?").to_owned();
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "{title}: duplicate id"
        );
        let grid = &panel["gridPos"];
        for k in ["h", "w", "x", "y"] {
            assert!(grid[k].is_u64(), "{title}: gridPos.{k}");
        }
        assert!(
            grid["x"].as_u64().unwrap() + grid["w"].as_u64().unwrap() <= 24,
            "{title}: wider than the grid"
        );
        if panel["type"] != "row" {
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
            assert!(
                panel["description"].as_str().is_some_and(|d| !d.is_empty()),
                "{title}: say what it shows"
            );
        }
    }
    // The compose playground provisions it into Grafana, against its Prometheus.
    let compose = read(&root.join("docker-compose.yml"));
    assert!(
        compose.contains(
            "./deploy/grafana/spirekeep.json:/var/lib/grafana/dashboards/spirekeep.json:ro"
        )
    );
    assert!(compose.contains("./deploy/grafana/provisioning:/etc/grafana/provisioning:ro"));
    let provider = read(&root.join("deploy/grafana/provisioning/dashboards/spirekeep.yml"));
    assert!(provider.contains("path: /var/lib/grafana/dashboards"));
    let datasource = read(&root.join("deploy/grafana/provisioning/datasources/prometheus.yml"));
    assert!(datasource.contains("url: http://prometheus:9090"));
    assert!(
        compose.contains("  prometheus:\n"),
        "the datasource points at the compose Prometheus"
    );
}

#[test]
fn promtool_parses_every_dashboard_expression() {
    if !have_promtool("promtool_parses_every_dashboard_expression") {
        return;
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&read(&root().join("deploy/grafana/spirekeep.json"))).unwrap();
    // Each expression as a recording rule, so `promtool check rules` parses it as PromQL
    // (Grafana's $repository variable becomes a regex that matches everything).
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut n = 0;
    for panel in dashboard_panels(&dashboard) {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap().replace("$repository", ".*");
            n += 1;
            rules.push_str(&format!(
                "      - record: dashboard:expression_{n}\n        expr: {}\n",
                serde_json::Value::String(expr)
            ));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-rules.yml");
    std::fs::write(&file, rules).unwrap();
    let out = promtool(&["check", "rules"], &[file]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(n >= 30, "only {n} expressions");
}
