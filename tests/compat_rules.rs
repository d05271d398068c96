//! The public compatibility API against SPIRE's rules (spire-reference §4,
//! §5) and property tests of the path planner over the release table.

use proptest::prelude::*;
use semver::Version;
use spirekeep::compat::{
    self, CheckInput, Direction, HopKind, MigrationRow, Path, PathError, PathOptions, PathStart,
    Refusal, Release, ReleaseTable, StartupOutcome, Verdict, agent_supported, plan_path,
    policy_minor_gap, server_startup,
};

fn v(s: &str) -> Version {
    Version::parse(s).unwrap()
}

fn table() -> &'static ReleaseTable {
    ReleaseTable::builtin()
}

fn release(s: &str) -> &'static Release {
    table().get(&v(s)).unwrap()
}

/// Every row of the example table in spire-reference §4 (running v1.15.3:
/// latest 25, minimum 23, and the other releases as listed).
#[test]
fn reference_section_4_examples() {
    enum Expect {
        Row(i64, &'static str),
        Refused(Refusal),
    }
    use Expect::{Refused, Row};
    let cases = [
        (24, "1.14.7", "1.15.3", false, Row(25, "1.15.3")),
        (23, "1.13.2", "1.15.3", false, Row(25, "1.15.3")),
        (
            22,
            "1.7.6",
            "1.15.3",
            false,
            Refused(Refusal::RequiresPreviousRelease { schema: 22 }),
        ),
        (25, "1.15.3", "1.14.7", false, Row(25, "1.15.3")),
        (
            25,
            "1.15.3",
            "1.13.6",
            false,
            Refused(Refusal::IncompatibleSchema),
        ),
        (24, "1.14.3", "1.14.2", false, Row(24, "1.14.3")),
        (24, "1.14.7", "1.15.3", true, Row(24, "1.14.7")),
        (
            23,
            "1.13.0",
            "1.15.3",
            true,
            Refused(Refusal::AutoMigrationRequired),
        ),
        (25, "1.15.3", "1.15.0", false, Row(25, "1.15.3")),
    ];
    for (schema, stored, running, disable, expect) in cases {
        let before = MigrationRow::new(schema, stored);
        let out = server_startup(release(running), Some(&before), disable);
        let what = format!("({schema}, {stored}) running {running} disable={disable}");
        match expect {
            Row(s, c) => {
                assert!(out.starts(), "{what}: {out:?}");
                assert_eq!(out.row_after(), Some(&MigrationRow::new(s, c)), "{what}");
            }
            Refused(r) => {
                assert_eq!(out.refusal(), Some(&r), "{what}");
                assert_eq!(out.row_after(), Some(&before), "{what}: unchanged");
            }
        }
    }
    // the kinds, not just the rows
    let out = server_startup(
        release("1.14.7"),
        Some(&MigrationRow::new(25, "1.15.3")),
        false,
    );
    assert_eq!(
        out.warning(),
        Some("DB schema is ahead of code version, upgrading SPIRE Server is recommended")
    );
    let out = server_startup(
        release("1.15.3"),
        Some(&MigrationRow::new(24, "1.14.7")),
        true,
    );
    assert!(matches!(
        out,
        StartupOutcome::StartedWithoutMigrating { .. }
    ));
}

#[test]
fn documented_policy_examples() {
    // 1.1.1 -> 1.3.0 is the doc's unsupported jump
    assert!(!compat::upgrade_step_supported(&v("1.1.1"), &v("1.3.0")));
    // servers 1.2.3 and 1.2.2 support agents 1.1.0 through 1.2.2
    let servers = [v("1.2.3"), v("1.2.2")];
    assert!(agent_supported(&v("1.1.0"), &servers));
    assert!(agent_supported(&v("1.2.2"), &servers));
    assert!(!agent_supported(&v("1.0.99"), &servers));
    assert!(!agent_supported(&v("1.2.3"), &servers));
    // 0.12.x counts as compatible with 1.0.x
    assert_eq!(policy_minor_gap(&v("0.12.3"), &v("1.0.0")), Some(1));
}

#[test]
fn check_report_for_a_typical_upgrade() {
    let report = compat::check(&CheckInput {
        target: "v1.15.3".into(),
        datastore: Some(MigrationRow::new(23, "1.13.6")),
        agents: vec![
            compat::AgentCount {
                version: "1.12.4".into(),
                count: 12,
            },
            compat::AgentCount {
                version: "1.13.6".into(),
                count: 40,
            },
        ],
        ..CheckInput::default()
    })
    .unwrap();
    assert_eq!(report.verdict, Verdict::NeedsSteps);
    let path = report.path.as_ref().unwrap();
    let to: Vec<String> = path.hops.iter().map(|h| h.to.to_string()).collect();
    assert_eq!(to, ["1.14.7", "1.15.3"]);
    let text = compat::render_human(&report);
    assert!(text.contains("move 12 agents (1.12.x) to 1.13.6"), "{text}");
    assert!(text.contains("1.13.6 -> 1.14.7"), "{text}");
}

// ---- property tests over the release table ----

fn release_index() -> impl Strategy<Value = usize> {
    0..table().releases().len()
}

fn natural_start(from: &Release) -> PathStart {
    PathStart {
        server: Some(from.version.clone()),
        row: Some(MigrationRow::new(from.schema, from.version.to_string())),
        agents: Vec::new(),
    }
}

/// Invariants every computed path has, whatever the start.
fn assert_path_invariants(path: &Path, target: &Release, options: PathOptions) {
    if let Some(last) = path.hops.last() {
        assert_eq!(last.to, target.version, "the path ends at the target");
    }
    for hop in &path.hops {
        let to = table().get(&hop.to).expect("every hop is a known release");
        assert!(hop.startup.starts(), "SPIRE accepts every hop: {hop:?}");
        if let (Some(from), true) = (&hop.from, options.one_minor_per_hop) {
            let gap = policy_minor_gap(from, &hop.to);
            assert!(
                gap.is_some_and(|g| g <= 1),
                "{from} -> {} moves {gap:?}",
                hop.to
            );
        }
        if let (StartupOutcome::Migrated { from_schema, .. }, Some(before)) =
            (&hop.startup, hop.schema_before)
        {
            assert_eq!(*from_schema, before);
            assert!(
                to.migrates_from(before),
                "{} cannot migrate from schema {before}",
                hop.to
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// From any release's natural datastore to any newer (or equal) release:
    /// a path always exists, ends at the target, moves at most one minor per
    /// hop, each hop starts from a schema the next release migrates from, and
    /// the datastore ends as the target writes it.
    #[test]
    fn upgrade_paths_exist_and_obey_the_policy(a in release_index(), b in release_index()) {
        let (from, target) = if a <= b { (a, b) } else { (b, a) };
        let (from, target) = (&table().releases()[from], &table().releases()[target]);
        let path = plan_path(table(), &natural_start(from), &target.version, PathOptions::default())
            .unwrap_or_else(|e| panic!("{} -> {}: {e}", from.version, target.version));
        assert_path_invariants(&path, target, PathOptions::default());
        for hop in &path.hops {
            let next = table().get(&hop.to).unwrap();
            let schema = hop.schema_before.unwrap();
            prop_assert!(next.migrates_from(schema), "{} from schema {schema}", hop.to);
            prop_assert_eq!(hop.kind, HopKind::Upgrade);
            prop_assert_eq!(hop.old_servers_can_restart, Some(true));
        }
        prop_assert_eq!(
            path.row_after(None).cloned(),
            if path.hops.is_empty() {
                None
            } else {
                Some(MigrationRow::new(target.schema, target.version.to_string()))
            }
        );
        if from.version == target.version {
            prop_assert_eq!(path.direction, Direction::AtTarget);
        }
        // never more hops than minor lines crossed (plus one patch hop)
        let lines = target.version.minor - from.version.minor;
        prop_assert!(u64::try_from(path.hops.len()).unwrap() <= lines + 1);
    }

    /// Downgrades: possible exactly when SPIRE runs the target on the
    /// datastore as it is (the stored code_version is never lowered, so it
    /// is the same test at every hop); then one minor per hop, agents first.
    #[test]
    fn downgrade_paths_match_spire(a in release_index(), b in release_index()) {
        prop_assume!(a != b);
        let (target, from) = if a < b { (a, b) } else { (b, a) };
        let (from, target) = (&table().releases()[from], &table().releases()[target]);
        let start = natural_start(from);
        let spire_runs_target = server_startup(target, start.row.as_ref(), false).starts();
        match plan_path(table(), &start, &target.version, PathOptions::default()) {
            Ok(path) => {
                prop_assert!(spire_runs_target);
                assert_path_invariants(&path, target, PathOptions::default());
                prop_assert_eq!(path.direction, Direction::Downgrade);
                prop_assert_eq!(path.row_after(None), start.row.as_ref());
            }
            Err(PathError::DowngradeRefused { .. }) => prop_assert!(!spire_runs_target),
            Err(e) => prop_assert!(false, "unexpected {e}"),
        }
    }

    /// Any start (known or unknown version, any schema and code version, with
    /// or without the policy): whatever path is found obeys the invariants,
    /// and relaxing the policy never makes the path longer.
    #[test]
    fn arbitrary_starts_give_sound_paths(
        server in proptest::option::of(release_index()),
        schema in 12i64..=26,
        code in proptest::option::of(release_index()),
        target in release_index(),
        relaxed in any::<bool>(),
    ) {
        let releases = table().releases();
        let target = &releases[target];
        let start = PathStart {
            server: server.map(|i| releases[i].version.clone()),
            row: Some(MigrationRow::new(
                schema,
                code.map_or_else(String::new, |i| releases[i].version.to_string()),
            )),
            agents: Vec::new(),
        };
        let options = PathOptions { one_minor_per_hop: !relaxed, keep_agents_in_skew: true };
        if let Ok(path) = plan_path(table(), &start, &target.version, options) {
            assert_path_invariants(&path, target, options);
            if !relaxed {
                let loose = PathOptions { one_minor_per_hop: false, ..options };
                let short = plan_path(table(), &start, &target.version, loose)
                    .expect("the relaxed planner finds a path when the strict one does");
                prop_assert!(short.hops.len() <= path.hops.len());
            }
        }
    }

    /// Agents moved before a hop land inside the skew window both while the
    /// hop rolls (oldest server: the lower of the two versions) and after it.
    #[test]
    fn agent_moves_land_in_the_window(
        a in release_index(),
        b in release_index(),
        agents in proptest::collection::vec((release_index(), 1u64..50), 0..6),
    ) {
        let (from, target) = if a <= b { (a, b) } else { (b, a) };
        let releases = table().releases();
        let (from, target) = (&releases[from], &releases[target]);
        let mut start = natural_start(from);
        // agents never newer than the servers at the start
        start.agents = agents
            .into_iter()
            .map(|(i, n)| (releases[i].version.clone(), n))
            .filter(|(v, _)| v <= &from.version)
            .collect();
        let path = plan_path(table(), &start, &target.version, PathOptions::default()).unwrap();
        prop_assert!(path.agent_skew.is_empty());
        for hop in &path.hops {
            if let (Some(m), Some(from)) = (&hop.agents_before, &hop.from) {
                prop_assert!(agent_supported(&m.to, std::slice::from_ref(from)), "{} vs {from}", m.to);
                prop_assert!(agent_supported(&m.to, std::slice::from_ref(&hop.to)), "{} vs {}", m.to, hop.to);
            }
        }
    }
}
