//! The exit-code table (issue 13): one table for every command, the same in
//! `spirekeep --help` and the README, and every code `check` can return,
//! end to end with the real binary, so `spirekeep check --target X && upgrade`
//! only upgrades when the target can be deployed directly.

mod common;

use common::{assert_one_line_error, spirekeep, stderr, stdout};
use spirekeep::cli::exit;

/// The bundled datastore: schema 25, code_version 1.15.3; agents 4 x 1.14.3,
/// 7 x 1.14.7, 5 x 1.15.3 and 4 that did not report a version.
fn example() -> &'static str {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/spire-datastore.sqlite3"
    )
}

/// `(code, meaning)` rows of the README's "Output and exit codes" table,
/// backticks removed.
fn readme_table() -> Vec<(u8, String)> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let section = readme
        .split("## Output and exit codes")
        .nth(1)
        .expect("README has an \"Output and exit codes\" section");
    let section = section.split("\n## ").next().unwrap_or(section);
    section
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.trim().trim_matches('|').split('|').collect();
            let code = cells.first()?.trim().parse::<u8>().ok()?;
            Some((code, cells.get(1)?.trim().replace('`', "")))
        })
        .collect()
}

/// `(code, meaning)` rows of the table at the end of `--help`.
fn help_table(text: &str) -> Vec<(u8, String)> {
    let table = text
        .split("Exit codes (every command):")
        .nth(1)
        .unwrap_or_else(|| panic!("no exit-code table in --help:\n{text}"));
    table
        .lines()
        .filter_map(|line| {
            let (code, meaning) = line.trim().split_once("  ")?;
            Some((code.parse::<u8>().ok()?, meaning.trim().to_owned()))
        })
        .collect()
}

#[test]
fn one_table_in_help_and_readme_with_all_ten_codes() {
    let out = spirekeep(&["--help"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let help = help_table(&stdout(&out));
    let codes: Vec<u8> = help.iter().map(|(c, _)| *c).collect();
    assert_eq!(
        codes,
        (0..=9).collect::<Vec<u8>>(),
        "--help table: {help:?}"
    );
    assert_eq!(readme_table(), help, "README and --help disagree");
    // The constants others use carry the agreed numbers.
    assert_eq!(
        [
            exit::OK,
            exit::CHECK_FAILED,
            exit::USAGE,
            exit::ROLLED_BACK,
            exit::UNREACHABLE,
            exit::FAILED,
            exit::NEEDS_STEPS,
            exit::ROLLBACK_FAILED,
            exit::REFUSED,
            exit::NOTHING_TO_DO,
        ],
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    );
    let meaning = |code: u8| help[usize::from(code)].1.clone();
    assert!(meaning(exit::NEEDS_STEPS).contains("needs_steps"));
    assert!(meaning(exit::ROLLBACK_FAILED).contains("could NOT roll back"));
    assert!(meaning(exit::REFUSED).contains("refused before touching anything"));
    assert!(meaning(exit::NOTHING_TO_DO).contains("nothing to do"));
}

/// Runs `check` on the example datastore and returns (exit code, verdict).
fn check_example(args: &[&str]) -> (i32, String) {
    let mut all = vec!["--json", "check", "--datastore", example()];
    all.extend_from_slice(args);
    let out = spirekeep(&all, &[]);
    let report: serde_json::Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("{all:?}: not JSON ({e}): {}", stdout(&out)));
    (
        out.status.code().expect("exit code"),
        report["verdict"].as_str().unwrap_or_default().to_owned(),
    )
}

#[test]
fn check_exits_0_only_for_ok() {
    // At the target already, every agent within the skew: deploy directly.
    let (code, verdict) =
        check_example(&["--target", "1.15.3", "--allow", "agent_version_unknown"]);
    assert_eq!((code, verdict.as_str()), (0, "ok"));
}

#[test]
fn check_exits_6_for_needs_steps() {
    // Down to 1.14.7: the 1.15 agents must move first, so not directly.
    let (code, verdict) =
        check_example(&["--target", "1.14.7", "--allow", "agent_version_unknown"]);
    assert_eq!((code, verdict.as_str()), (6, "needs_steps"));
    // The human form exits the same way, so `check && upgrade` stops here.
    let out = spirekeep(
        &[
            "check",
            "--datastore",
            example(),
            "--target",
            "1.14.7",
            "--allow",
            "agent_version_unknown",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(stdout(&out).contains("Verdict: NEEDS STEPS"));
}

#[test]
fn check_exits_1_for_refused() {
    // 1.12.6 cannot run on schema 25 (no down migrations).
    let (code, verdict) = check_example(&["--target", "1.12.6"]);
    assert_eq!((code, verdict.as_str()), (1, "refused"));
    // A skippable finding not allowed refuses too.
    let (code, verdict) = check_example(&["--target", "1.15.3"]);
    assert_eq!((code, verdict.as_str()), (1, "refused"));
}

#[test]
fn check_exits_2_for_bad_input() {
    let out = spirekeep(
        &["check", "--datastore", example(), "--target", "latest"],
        &[],
    );
    assert_one_line_error(&out, 2, "is not a SPIRE version");
    let out = spirekeep(&["check", "--target", "1.15.3"], &[]);
    assert_one_line_error(&out, 2, "no datastore given");
}

#[test]
fn check_exits_4_when_the_datastore_cannot_be_reached() {
    let out = spirekeep(
        &[
            "check",
            "--datastore",
            "postgres://spirekeep:pw@127.0.0.1:1/spire?sslmode=disable",
            "--target",
            "1.15.3",
        ],
        &[],
    );
    assert_one_line_error(&out, 4, "cannot reach the datastore");
}

#[test]
fn check_exits_5_when_the_datastore_fails_while_read() {
    // A SQLite file whose header is sound but whose pages are damaged: the
    // engine reports corruption while reading (not "not a database").
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("damaged.sqlite3");
    let mut bytes = std::fs::read(example()).unwrap();
    let page_size = usize::from(u16::from_be_bytes([bytes[16], bytes[17]]));
    assert!(bytes.len() > 4 * page_size, "example too small");
    for b in &mut bytes[page_size..] {
        *b = 0xA5;
    }
    std::fs::write(&path, &bytes).unwrap();
    let out = spirekeep(
        &[
            "check",
            "--datastore",
            path.to_str().unwrap(),
            "--target",
            "1.15.3",
        ],
        &[],
    );
    assert_one_line_error(&out, 5, "");
}
