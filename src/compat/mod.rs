//! SPIRE compatibility: which releases exist, what a SPIRE server does with
//! the datastore when it starts, what SPIRE's upgrade policy allows, and how
//! to get from the current deployment to a target release.
//!
//! Everything here is pure: it takes facts (the `migrations` row, server and
//! agent versions, `disable_migration`) and returns decisions, so it can be
//! tested exhaustively against SPIRE's rules. The facts come from
//! `spire-reference.md` §3 (schema history), §4 (start-up rules), §5 (upgrade
//! policy) and §9 (release table); where SPIRE's behaviour and a guess differ,
//! SPIRE wins.
//!
//! - [`version`]: parsing `code_version` and SPIRE's compatibility rule;
//! - [`releases`]: the release table, data in `migrations-check/releases.csv`;
//! - [`rules`]: `migrateDB` as [`server_startup`], and the skew policy;
//! - [`path`]: upgrade and downgrade paths through the table;
//! - [`check`](mod@check): the `spirekeep check` decision and its rendering.
//!
//! ```
//! use spirekeep::compat::{check, render_human, CheckInput, MigrationRow, Verdict};
//!
//! let report = check(&CheckInput {
//!     target: "1.15.3".into(),
//!     datastore: Some(MigrationRow::new(23, "1.13.6")),
//!     ..CheckInput::default()
//! })?;
//! assert_eq!(report.verdict, Verdict::NeedsSteps); // through 1.14.7
//! println!("{}", render_human(&report));
//! # Ok::<(), spirekeep::compat::CheckError>(())
//! ```

pub mod check;
pub mod path;
pub mod releases;
pub mod rules;
pub mod version;

pub use check::{
    AgentCount, CheckError, CheckInput, CheckReport, CurrentState, Finding, FindingCode, Severity,
    Verdict, check, check_incomplete_datastore, check_with, render_human,
};
pub use path::{
    AgentMove, AgentSkew, Direction, Hop, HopKind, Path, PathError, PathOptions, PathStart,
    plan_path,
};
pub use releases::{Release, ReleaseTable, TableError};
pub use rules::{
    MigrationRow, Refusal, SCHEMA_AHEAD_WARNING, StartupOutcome, agent_supported, server_startup,
    servers_within_skew, upgrade_step_supported,
};
pub use version::{
    CodeVersionError, is_compatible_code_version, parse_code_version, policy_minor_gap,
};
