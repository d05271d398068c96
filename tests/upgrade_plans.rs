//! Plan files and the Kubernetes executor without a cluster: every example
//! in `plans/` validates, and `apply --dry-run` of a Kubernetes plan shows
//! the exact kubectl commands (a fake `kubectl` on PATH answers the
//! read-only calls and records every call it gets).

mod upgrade;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use spirekeep::datastore::Engine;
use spirekeep::plan::file::{ExecutorKind, parse};
use upgrade::{SPIREKEEP, Store};

#[test]
fn example_plans_validate() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("plans");
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        seen += 1;
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            readme.contains(&name),
            "plans/README.md does not list {name}"
        );
        let mut file = parse(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        // the environment variable a plan reads its connection string from
        // is the operator's; stand in a literal one
        if file.datastore.connection_string_env.take().is_some() {
            file.datastore.connection_string = Some("/var/lib/spire/datastore.sqlite3".into());
        }
        let plan = file.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!plan.servers.is_empty(), "{name}");
        if file.executor.kind == ExecutorKind::Command {
            assert!(plan.server_commands.is_some(), "{name}");
        }
    }
    assert_eq!(seen, 3, "plans/ holds three examples");
}

const FAKE_KUBECTL: &str = r#"#!/bin/sh
echo "$*" >> "$FAKE_KUBECTL_LOG"
case "$*" in
  *"get statefulset/spire-server -o jsonpath="*) printf 'ghcr.io/spiffe/spire-server:1.14.7' ;;
  *"get daemonset/spire-agent -o jsonpath="*) printf 'ghcr.io/spiffe/spire-agent:1.14.7' ;;
  *) echo "fake kubectl: refusing to change anything: $*" >&2; exit 1 ;;
esac
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_dry_run_shows_the_kubectl_commands() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(Engine::Sqlite, dir.path(), 24, "1.14.7")
        .await
        .unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let kubectl = bin.join("kubectl");
    std::fs::write(&kubectl, FAKE_KUBECTL).unwrap();
    std::fs::set_permissions(&kubectl, std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = dir.path().join("kubectl.log");
    let plan = format!(
        r#"
format = 1
name = "k8s"
target = "1.15.3"
[datastore]
connection_string = "{}"
[repository]
url = "repo"
[executor]
kind = "kubernetes"
context = "kind-spire"
namespace = "spire"
server_image = "ghcr.io/spiffe/spire-server"
agent_image = "ghcr.io/spiffe/spire-agent"
rollout_timeout = "10m"
# kubectl gets a minimal environment: what it needs is named here
pass_env = ["FAKE_KUBECTL_LOG"]
[servers]
members = [{{ name = "spire-server" }}]
[[servers.health]]
kind = "http"
url = "http://127.0.0.1:1/ready"
retries = 0
timeout = "1s"
[[agents]]
name = "nodes"
members = [{{ name = "spire-agent" }}]
"#,
        store.conn
    );
    std::fs::write(dir.path().join("k8s.toml"), plan).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(SPIREKEEP)
            .args(args)
            .current_dir(dir.path())
            .env(
                "PATH",
                format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
            )
            .env("FAKE_KUBECTL_LOG", &log)
            .output()
            .unwrap();
        eprintln!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let out = run(&["plan", "k8s.toml", "--out", "plan.json"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("server spire-server 1.14.7 → 1.15.3"),
        "{text}"
    );
    assert!(
        text.contains("UNHEALTHY"),
        "the gate fails, and the plan says so: {text}"
    );

    let out = run(&["apply", "plan.json", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "$ kubectl --context=kind-spire --namespace=spire set image statefulset/spire-server spire-server=ghcr.io/spiffe/spire-server:1.15.3",
        "$ kubectl --context=kind-spire --namespace=spire rollout status statefulset/spire-server --timeout=600s",
        "$ kubectl --context=kind-spire --namespace=spire set image daemonset/spire-agent spire-agent=ghcr.io/spiffe/spire-agent:1.15.3",
        "$ kubectl --context=kind-spire --namespace=spire rollout status daemonset/spire-agent --timeout=600s",
        "$ kubectl --context=kind-spire --namespace=spire get statefulset/spire-server -o 'jsonpath={.spec.template.spec.containers[?(@.name==\"spire-server\")].image}'",
        "$ kubectl --context=kind-spire --namespace=spire scale statefulset/spire-server --replicas=0",
        "$ kubectl --context=kind-spire --namespace=spire set image daemonset/spire-agent spire-agent=ghcr.io/spiffe/spire-agent:1.14.7",
        "check: the migrations row of",
        "The live facts match the plan.",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    // the dry run read versions and changed nothing
    let calls = std::fs::read_to_string(&log).unwrap();
    assert!(!calls.is_empty());
    for call in calls.lines() {
        // reads only: versions, and each member's clock (`exec … date +%s`)
        assert!(
            call.contains(" get ") || call.ends_with(" -- date +%s"),
            "a dry run ran {call:?}"
        );
    }
    assert!(
        calls
            .lines()
            .any(|c| c.contains("exec statefulset/spire-server -c spire-server -- date +%s")),
        "the clock is read through kubectl exec: {calls}"
    );
    let json = run(&["--json", "apply", "plan.json", "--dry-run"]);
    let d: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(d["executor"], "kubernetes");
    assert_eq!(d["fresh"], true);
}

const STATEFUL_KUBECTL: &str = r#"#!/bin/sh
echo "$*" >> "$FAKE_KUBECTL_STATE/log"
state="$FAKE_KUBECTL_STATE"
case "$*" in
  *" set image "*) printf '%s' "${*##*=}" > "$state/image" ;;
  *"jsonpath={.spec.template"*) cat "$state/image" ;;
  *"jsonpath={.spec.replicas}"*) cat "$state/replicas" ;;
  *" annotate "*) v="${*##*replicas=}"; printf '%s' "${v%% *}" > "$state/annotation" ;;
  *"jsonpath={.metadata.annotations"*) cat "$state/annotation" 2>/dev/null ;;
  *" scale "*) printf '%s' "${*##*--replicas=}" > "$state/replicas"; touch "$state/terminating" ;;
  *" rollout status "*) echo "statefulset rolling update complete" ;;
  *"jsonpath={.spec.selector.matchLabels}"*) echo '{"app":"spire-server"}' ;;
  *" get pods -l app=spire-server -o name"*)
    # the pods go away one poll after the scale to zero
    if [ -f "$state/terminating" ]; then rm "$state/terminating"; echo pod/spire-server-0;
    elif [ "$(cat "$state/replicas")" != 0 ]; then echo pod/spire-server-0; fi ;;
  *) echo "unexpected: $*" >&2; exit 1 ;;
esac
"#;

/// The Kubernetes executor's actions run against a kubectl that keeps state:
/// set image + rollout status, the image tag read back, stop by scaling to
/// zero with the replica count remembered, start by scaling back.
#[tokio::test]
async fn kubernetes_executor_actions() {
    use semver::Version;
    use spirekeep::plan::executor::{Action, build};
    let dir = tempfile::tempdir().unwrap();
    let kubectl = dir.path().join("kubectl");
    std::fs::write(&kubectl, STATEFUL_KUBECTL).unwrap();
    std::fs::set_permissions(&kubectl, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        dir.path().join("image"),
        "ghcr.io/spiffe/spire-server:1.14.7",
    )
    .unwrap();
    std::fs::write(dir.path().join("replicas"), "2").unwrap();
    let toml = format!(
        r#"
format = 1
target = "1.15.3"
[datastore]
connection_string = "/x.sqlite3"
[repository]
url = "/repo"
[executor]
kind = "kubernetes"
kubectl = "{}"
namespace = "spire"
server_image = "ghcr.io/spiffe/spire-server"
agent_image = "ghcr.io/spiffe/spire-agent"
env = {{ FAKE_KUBECTL_STATE = "{}" }}
[servers]
members = [{{ name = "spire-server" }}]
"#,
        kubectl.display(),
        dir.path().display()
    );
    let plan = parse(&toml).unwrap().validate().unwrap();
    let exec = build(&plan);
    let s = plan.member("spire-server").unwrap();
    assert_eq!(exec.version(s).await.unwrap(), Version::new(1, 14, 7));
    let r = exec
        .run(Action::Upgrade, s, Some(&Version::new(1, 15, 3)), true)
        .await;
    assert!(r.ok, "{r:?}");
    assert_eq!(r.runs.len(), 2);
    assert_eq!(exec.version(s).await.unwrap(), Version::new(1, 15, 3));
    let r = exec.run(Action::Stop, s, None, true).await;
    assert!(r.ok, "{r:?}");
    let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
    assert_eq!(
        (read("replicas").as_str(), read("annotation").as_str()),
        ("0", "2")
    );
    let r = exec.run(Action::Start, s, None, true).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(read("replicas"), "2");
    let log = read("log");
    let calls: Vec<&str> = log.lines().collect();
    assert_eq!(
        calls,
        [
            "--namespace=spire get statefulset/spire-server -o jsonpath={.spec.template.spec.containers[?(@.name==\"spire-server\")].image}",
            "--namespace=spire set image statefulset/spire-server spire-server=ghcr.io/spiffe/spire-server:1.15.3",
            "--namespace=spire rollout status statefulset/spire-server --timeout=600s",
            "--namespace=spire get statefulset/spire-server -o jsonpath={.spec.template.spec.containers[?(@.name==\"spire-server\")].image}",
            "--namespace=spire get statefulset/spire-server -o jsonpath={.spec.replicas}",
            "--namespace=spire annotate statefulset/spire-server spirekeep.spiffe.io/replicas=2 --overwrite",
            "--namespace=spire scale statefulset/spire-server --replicas=0",
            // the stop waits until the pods are gone
            "--namespace=spire get statefulset/spire-server -o jsonpath={.spec.selector.matchLabels}",
            "--namespace=spire get pods -l app=spire-server -o name",
            "--namespace=spire get pods -l app=spire-server -o name",
            "--namespace=spire get statefulset/spire-server -o jsonpath={.metadata.annotations.spirekeep\\.spiffe\\.io/replicas}",
            "--namespace=spire scale statefulset/spire-server --replicas=2",
            "--namespace=spire rollout status statefulset/spire-server --timeout=600s",
        ]
    );
    // a failing kubectl call fails the action with the command and its output
    std::fs::write(dir.path().join("image"), "").unwrap();
    let e = exec.version(s).await.unwrap_err();
    assert!(e.contains("cannot find a version"), "{e}");
}
