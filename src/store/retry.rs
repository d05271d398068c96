//! Retrying failed storage requests.
//!
//! The HTTP stores (S3, GCS, Azure) already retry a failed HTTP request inside
//! object_store (bounded by [`http_retry_config`]). This layer sits above any
//! store and retries what that cannot see: a request that failed after those
//! retries, one that hangs past [`RetryPolicy::attempt_timeout`], and a read
//! whose body broke off or ended short, which is resumed from the byte where
//! it stopped (pinned to the object's ETag, so a replaced object is never
//! stitched together). Each retry waits longer than the one before.
//!
//! What is retried: reads, listings, heads, deletes, whole-object puts and the
//! start of a multipart upload. Multipart parts are retried by object_store's
//! HTTP client only: a part that still fails fails the upload, which is then
//! aborted (the data cannot be sent again from here, it streams from the
//! database).

use std::time::Duration;

use object_store::{BackoffConfig, RetryConfig};

/// How often and how patiently a request is tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries in all (1 means no retry).
    pub attempts: u32,
    /// The wait before the first retry; each later wait doubles it.
    pub first_backoff: Duration,
    /// The longest wait between two tries.
    pub max_backoff: Duration,
    /// How long one request may take before it counts as failed (the wait for
    /// the response, or for the next piece of a body being read).
    pub attempt_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 4,
            first_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(16),
            attempt_timeout: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// Every request is tried once.
    #[must_use]
    pub fn never() -> Self {
        Self {
            attempts: 1,
            ..Self::default()
        }
    }

    /// The wait after failed try number `attempt` (1-based).
    #[must_use]
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(16);
        self.first_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// The HTTP-level retries spirekeep gives object_store's cloud clients: a few
/// quick ones for a dropped connection or a 5xx, so that a dead endpoint is
/// reported in seconds rather than minutes ([`RetryPolicy`] retries on top).
#[must_use]
pub fn http_retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(4),
            base: 2.0,
        },
        max_retries: 4,
        retry_timeout: Duration::from_secs(60),
    }
}

/// Whether trying the same request again may succeed: failures of the
/// transport or the server, not answers about the object (missing, exists,
/// changed) or the caller (denied, bad path, unsupported).
#[must_use]
pub fn is_transient(e: &object_store::Error) -> bool {
    matches!(
        e,
        object_store::Error::Generic { .. } | object_store::Error::JoinError { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy {
            attempts: 10,
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
            attempt_timeout: Duration::from_secs(1),
        };
        let waits: Vec<u128> = (1..=5).map(|a| p.backoff(a).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 500, 500]);
        assert_eq!(p.backoff(u32::MAX), Duration::from_millis(500));
    }

    #[test]
    fn only_transport_failures_are_transient() {
        let generic = object_store::Error::Generic {
            store: "S3",
            source: "connection reset".into(),
        };
        assert!(is_transient(&generic));
        let missing = object_store::Error::NotFound {
            path: "a".into(),
            source: "gone".into(),
        };
        assert!(!is_transient(&missing));
        let denied = object_store::Error::PermissionDenied {
            path: "a".into(),
            source: "no".into(),
        };
        assert!(!is_transient(&denied));
    }
}
