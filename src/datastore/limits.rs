//! What each engine can hold, as the cross-engine preflight
//! (`snapshot::adapt`) asks it: the one place that knows which values an
//! engine changes or refuses (spire-reference §10). The preflight works from
//! these answers and never from the engine's name.

use super::dsn::Engine;

/// How finely an engine's timestamp columns keep time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestampPrecision {
    /// Every nanosecond (SQLite's text timestamps).
    Nanoseconds,
    /// Microseconds: finer digits are truncated (PostgreSQL `timestamptz`).
    Microseconds,
    /// Whole seconds (SPIRE's MySQL `DATETIME` has no fractional part).
    Seconds,
}

/// The limits of one engine's SPIRE tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValueLimits {
    pub timestamps: TimestampPrecision,
    /// Whether text may contain NUL characters.
    pub text_holds_nul: bool,
    /// Whether text may hold four-byte UTF-8 characters (MySQL's `utf8` is utf8mb3).
    pub text_holds_four_byte_utf8: bool,
    /// Whether a declared integer width (`int`, `bigint unsigned`…) bounds the values.
    pub enforces_integer_widths: bool,
    /// Whether unique indexes compare text case-, accent- and trailing-space-
    /// insensitively (MySQL's `utf8_general_ci`), so rows distinct elsewhere collide.
    pub unique_keys_fold_text: bool,
    /// Whether every value goes in as given, whatever the declared type (SQLite).
    pub stores_any_value: bool,
    /// Whether rows from the same engine must pass the preflight too: another
    /// server of the same engine may have stored what this one's tables refuse.
    pub checks_rows_from_same_engine: bool,
}

impl Engine {
    /// What this engine's SPIRE tables can hold.
    #[must_use]
    pub fn value_limits(self) -> ValueLimits {
        match self {
            Engine::Sqlite => ValueLimits {
                timestamps: TimestampPrecision::Nanoseconds,
                text_holds_nul: true,
                text_holds_four_byte_utf8: true,
                enforces_integer_widths: false,
                unique_keys_fold_text: false,
                stores_any_value: true,
                checks_rows_from_same_engine: false,
            },
            Engine::Postgres => ValueLimits {
                timestamps: TimestampPrecision::Microseconds,
                text_holds_nul: false,
                text_holds_four_byte_utf8: true,
                enforces_integer_widths: true,
                unique_keys_fold_text: false,
                stores_any_value: false,
                checks_rows_from_same_engine: false,
            },
            Engine::Mysql => ValueLimits {
                timestamps: TimestampPrecision::Seconds,
                text_holds_nul: true,
                text_holds_four_byte_utf8: false,
                enforces_integer_widths: true,
                unique_keys_fold_text: true,
                stores_any_value: false,
                checks_rows_from_same_engine: true,
            },
        }
    }

    /// Whether rows from a `source` datastore must pass the preflight before
    /// they go into this engine: across engines (except into one that stores
    /// any value as given), and from the same engine where its limits say so.
    #[must_use]
    pub fn needs_preflight_from(self, source: Engine) -> bool {
        let limits = self.value_limits();
        !limits.stores_any_value && (source != self || limits.checks_rows_from_same_engine)
    }

    /// A note for the restore report on how the engine keeps its
    /// auto-increment counters past restored ids, when it does so by itself.
    #[must_use]
    pub fn auto_increment_note(self) -> Option<&'static str> {
        match self {
            Engine::Mysql => Some("InnoDB keeps AUTO_INCREMENT past the largest id on its own"),
            Engine::Sqlite | Engine::Postgres => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preflight_runs_across_engines_and_into_mysql() {
        use Engine::{Mysql, Postgres, Sqlite};
        assert!(Mysql.needs_preflight_from(Mysql));
        assert!(Mysql.needs_preflight_from(Sqlite));
        assert!(Postgres.needs_preflight_from(Sqlite));
        assert!(Postgres.needs_preflight_from(Mysql));
        assert!(!Postgres.needs_preflight_from(Postgres));
        assert!(!Sqlite.needs_preflight_from(Sqlite));
        assert!(!Sqlite.needs_preflight_from(Postgres));
        assert!(!Sqlite.needs_preflight_from(Mysql));
    }
}
