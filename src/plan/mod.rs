//! Staged upgrades: plan files, live facts, stages, the journal, and `apply`
//! with restore-on-failure.
//!
//! The flow (docs/ARCHITECTURE.md, "Staged upgrades"):
//!
//! 1. [`file`]: a TOML plan file is read and validated into a [`file::Plan`]
//!    before anything is contacted ([`template`] holds the placeholders);
//! 2. [`facts`]: the live facts are read (the datastore's `migrations` row and
//!    agents, each member's version through the [`executor`], health through
//!    the [`health`] gates) and fingerprinted;
//! 3. [`stages`]: [`crate::compat`] computes the path and SPIRE's start-up
//!    outcome at every hop; the stages put the members in SPIRE's order and
//!    check the skew after every step; the result is a [`model::SavedPlan`];
//! 4. [`apply`]: the saved plan is executed step by step, each step written
//!    to the [`journal`] before and after it runs, with the pre-upgrade
//!    snapshot taken, verified and pinned through [`snapshots`].

pub mod apply;
pub mod error;
pub mod executor;
pub mod facts;
pub mod file;
pub mod health;
pub mod journal;
pub mod model;
pub mod snapshots;
pub mod stages;
pub mod template;

pub use apply::{
    ApplyOptions, ApplyReport, DryRun, NoProgress, Progress, StepStatus, apply, dry_run,
};
pub use error::PlanError;
pub use file::{Plan, PlanFile};
pub use journal::Outcome;
pub use model::{SavedPlan, Step, StepKind};
pub use stages::{StageOptions, StagesError, compute};
