//! SPIRE's version rules: how a `code_version` is parsed and which versions
//! SPIRE and its documentation consider compatible.
//!
//! References are to `spire-reference.md` (§3: the `migrations` table, §4: the
//! start-up rules, §5: the documented upgrade policy).

use std::cmp::Ordering;

use semver::Version;

/// A `migrations.code_version` that SPIRE's parser (`blang/semver`) rejects.
///
/// SPIRE refuses to start on such a datastore with "error getting DB code
/// version" (§3), so this is never something to work around silently.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("error getting DB code version: {value:?} is not a semantic version ({reason})")]
pub struct CodeVersionError {
    /// The stored string, exactly as found.
    pub value: String,
    /// Why the parser rejected it.
    pub reason: String,
}

/// Parses a `code_version` the way SPIRE does (§3).
///
/// - The empty string (rows written before v0.9, or a row SPIRE just created)
///   is 0.0.0.
/// - Anything else must be strict semver, as `blang/semver`'s `Parse` wants
///   it: no `v` prefix, no surrounding spaces, no leading zeros. Release
///   builds store `1.15.3`; dev builds store `1.16.0-dev-<githash>` or
///   `…-dev-unk` (e.g. `1.14.2-dev-27d2083`, whose pre-release identifier
///   `dev-27d2083` is alphanumeric and therefore valid).
///
/// # Errors
///
/// [`CodeVersionError`] when the string is neither empty nor semver.
pub fn parse_code_version(value: &str) -> Result<Version, CodeVersionError> {
    if value.is_empty() {
        return Ok(Version::new(0, 0, 0));
    }
    Version::parse(value).map_err(|e| CodeVersionError {
        value: value.to_owned(),
        reason: e.to_string(),
    })
}

/// SPIRE's `isCompatibleCodeVersion` (§4): the majors are equal and the
/// minors differ by at most one. Patch versions and pre-release tags are
/// ignored.
///
/// This is the rule of current SPIRE code. The 0.12.x/1.0.x exception that
/// v1.0.x carried is applied only where a 1.0.x server is simulated (see
/// [`crate::compat::server_startup`]).
#[must_use]
pub fn is_compatible_code_version(a: &Version, b: &Version) -> bool {
    a.major == b.major && a.minor.abs_diff(b.minor) <= 1
}

/// `isCompatibleCodeVersion` as the *running* release implemented it: v1.0.x
/// code also treated 0.12.x and 1.0.x as compatible ("remove in 1.1.0", §4).
pub(crate) fn startup_compatible(running: &Version, stored: &Version) -> bool {
    if running.major == 1 && running.minor == 0 && is_zero_twelve_and_one_zero(running, stored) {
        return true;
    }
    is_compatible_code_version(running, stored)
}

/// How many minor versions apart two versions are under SPIRE's documented
/// policy (§5), in either order. Same major: the difference of the minors.
/// 0.12.x and 1.0.x count as one minor apart (the documented exception).
/// Any other pair of majors is not comparable: `None`.
#[must_use]
pub fn policy_minor_gap(a: &Version, b: &Version) -> Option<u64> {
    if a.major == b.major {
        Some(a.minor.abs_diff(b.minor))
    } else if is_zero_twelve_and_one_zero(a, b) {
        Some(1)
    } else {
        None
    }
}

fn is_zero_twelve_and_one_zero(a: &Version, b: &Version) -> bool {
    let zero_twelve = |v: &Version| v.major == 0 && v.minor == 12;
    let one_zero = |v: &Version| v.major == 1 && v.minor == 0;
    (zero_twelve(a) && one_zero(b)) || (one_zero(a) && zero_twelve(b))
}

/// Orders versions by semver precedence, as `blang/semver`'s `Compare` does:
/// build metadata is ignored (Rust's `Ord` on [`Version`] would not ignore it).
#[must_use]
pub fn precedence(a: &Version, b: &Version) -> Ordering {
    a.cmp_precedence(b)
}

/// The oldest (lowest precedence) of a set of versions.
pub(crate) fn oldest<'a>(versions: impl IntoIterator<Item = &'a Version>) -> Option<&'a Version> {
    versions.into_iter().min_by(|a, b| precedence(a, b))
}

/// The newest (highest precedence) of a set of versions.
pub(crate) fn newest<'a>(versions: impl IntoIterator<Item = &'a Version>) -> Option<&'a Version> {
    versions.into_iter().max_by(|a, b| precedence(a, b))
}

/// `1.12.x`: the minor line a version belongs to, for messages.
#[must_use]
pub fn minor_line(v: &Version) -> String {
    format!("{}.{}.x", v.major, v.minor)
}

/// The oldest version an agent may run while `oldest_server` is the oldest
/// server: one minor older, any patch (§5), so `x.(m-1).0`; for a 1.0.x
/// server, 0.12.0 (the documented exception). `None` for x.0 servers of any
/// other major, where nothing older is supported.
#[must_use]
pub fn agent_floor(oldest_server: &Version) -> Option<Version> {
    match (oldest_server.major, oldest_server.minor) {
        (1, 0) => Some(Version::new(0, 12, 0)),
        (_, 0) => None,
        (major, minor) => Some(Version::new(major, minor - 1, 0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn release_and_dev_builds_parse() {
        assert_eq!(parse_code_version("1.15.3").unwrap(), v("1.15.3"));
        let dev = parse_code_version("1.16.0-dev-abc123").unwrap();
        assert_eq!((dev.major, dev.minor, dev.patch), (1, 16, 0));
        assert_eq!(dev.pre.as_str(), "dev-abc123");
        assert_eq!(
            parse_code_version("1.8.0-dev-unk").unwrap().pre.as_str(),
            "dev-unk"
        );
        let hash = parse_code_version("1.14.2-dev-27d2083").unwrap();
        assert_eq!(hash.pre.as_str(), "dev-27d2083");
        assert_eq!(hash.to_string(), "1.14.2-dev-27d2083");
    }

    #[test]
    fn empty_code_version_is_zero() {
        assert_eq!(parse_code_version("").unwrap(), Version::new(0, 0, 0));
    }

    #[test]
    fn garbage_is_refused_like_spire() {
        for bad in [
            "garbage",
            "v1.15.3",
            " 1.15.3",
            "1.15.3 ",
            "1.15",
            "1",
            "01.2.3",
            "1.2.3-01",
            "1.2.3-",
            "1.2.3-a..b",
            "1.2.3+",
            " ",
        ] {
            let err = parse_code_version(bad).unwrap_err();
            assert_eq!(err.value, bad);
            assert!(
                err.to_string().starts_with("error getting DB code version"),
                "{err}"
            );
        }
    }

    #[test]
    fn dev_build_is_older_than_its_release() {
        let dev = parse_code_version("1.14.2-dev-27d2083").unwrap();
        assert_eq!(precedence(&dev, &v("1.14.2")), Ordering::Less);
        assert_eq!(precedence(&dev, &v("1.14.1")), Ordering::Greater);
        // build metadata never changes precedence
        assert_eq!(precedence(&v("1.14.2+a"), &v("1.14.2+b")), Ordering::Equal);
    }

    #[test]
    fn compatibility_is_plus_minus_one_minor_same_major() {
        assert!(is_compatible_code_version(&v("1.15.3"), &v("1.14.0")));
        assert!(is_compatible_code_version(&v("1.14.0"), &v("1.15.3")));
        assert!(is_compatible_code_version(&v("1.15.3"), &v("1.15.0")));
        assert!(is_compatible_code_version(
            &v("1.16.0-dev-abc"),
            &v("1.15.3")
        ));
        assert!(!is_compatible_code_version(&v("1.15.3"), &v("1.13.6")));
        assert!(!is_compatible_code_version(&v("1.13.6"), &v("1.15.3")));
        assert!(!is_compatible_code_version(&v("2.0.0"), &v("1.15.0")));
        // current code has no 0.12/1.0 exception
        assert!(!is_compatible_code_version(&v("1.0.0"), &v("0.12.3")));
        assert!(!is_compatible_code_version(&v("1.15.3"), &v("0.0.0")));
    }

    #[test]
    fn v1_0_code_accepted_0_12() {
        assert!(startup_compatible(&v("1.0.0"), &v("0.12.3")));
        assert!(!startup_compatible(&v("1.1.0"), &v("0.12.3")));
        assert!(!startup_compatible(&v("1.0.0"), &v("0.11.0")));
        assert!(startup_compatible(&v("1.1.0"), &v("1.0.0")));
    }

    #[test]
    fn policy_gap() {
        assert_eq!(policy_minor_gap(&v("1.1.1"), &v("1.3.0")), Some(2));
        assert_eq!(policy_minor_gap(&v("1.3.0"), &v("1.1.1")), Some(2));
        assert_eq!(policy_minor_gap(&v("0.12.3"), &v("1.0.0")), Some(1));
        assert_eq!(policy_minor_gap(&v("1.0.0"), &v("0.12.0")), Some(1));
        assert_eq!(policy_minor_gap(&v("0.11.0"), &v("1.0.0")), None);
        assert_eq!(policy_minor_gap(&v("0.12.0"), &v("1.1.0")), None);
    }

    #[test]
    fn agent_floor_is_one_minor_down() {
        assert_eq!(agent_floor(&v("1.2.2")), Some(v("1.1.0")));
        assert_eq!(agent_floor(&v("1.0.4")), Some(v("0.12.0")));
        assert_eq!(agent_floor(&v("2.0.0")), None);
        assert_eq!(minor_line(&v("1.12.4")), "1.12.x");
    }
}
