//! The errors of `plan/`, typed so each maps to the right exit code: a plan
//! file or saved plan that is wrong is bad input (2); a journal that cannot
//! be read or written, or a saved plan that cannot be written, is a runtime
//! failure (5), not bad input; a plan in the wrong state for what was asked
//! (finished, needs `--resume`, another plan's journal) is bad input (2).

use std::path::PathBuf;

use crate::error::ErrorKind;

/// What went wrong in `plan/`. Every message says what to do next.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// A plan file that does not parse or validate (the message names the key).
    #[error("{0}")]
    PlanFile(String),

    /// A saved plan that cannot be read, or is not one.
    #[error("{0}")]
    SavedPlan(String),

    /// A file `plan` or `apply` must write could not be written.
    #[error("cannot write {}: {detail}", path.display())]
    Write { path: PathBuf, detail: String },

    /// The journal could not be read, written or locked.
    #[error("{0}")]
    Journal(String),

    /// Another `apply` of the plan holds the journal.
    #[error(
        "journal {} is locked: another `spirekeep apply` of this plan is running (wait for it, or see `spirekeep status`)",
        path.display()
    )]
    JournalLocked { path: PathBuf },

    /// The plan is not in a state that allows what was asked (finished,
    /// applied before without `--resume`, another plan's journal).
    #[error("{0}")]
    State(String),
}

impl PlanError {
    /// The class of this error (for the exit code).
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::PlanFile(_) | Self::SavedPlan(_) | Self::State(_) => ErrorKind::Usage,
            Self::Write { .. } | Self::Journal(_) | Self::JournalLocked { .. } => {
                ErrorKind::Backend
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn journal_failures_are_not_bad_input() {
        let io = Error::from(PlanError::Journal(
            "cannot write journal /x: disk full".into(),
        ));
        assert_eq!(io.kind(), ErrorKind::Backend);
        let locked = Error::from(PlanError::JournalLocked {
            path: "/x.journal.jsonl".into(),
        });
        assert_eq!(locked.kind(), ErrorKind::Backend);
        assert!(locked.to_string().contains("another `spirekeep apply`"));
        let bad = Error::from(PlanError::PlanFile("target: 9.9.9 is not a release".into()));
        assert_eq!(bad.kind(), ErrorKind::Usage);
    }
}
