//! The Prometheus text parser behind metric health gates: any text gives
//! samples (malformed lines skipped), never a panic, and summing a selector
//! over it never panics either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spirekeep::plan::health::parse_samples;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for sample in parse_samples(text) {
        assert!(!sample.name.is_empty());
        assert!(
            !sample.name.contains(char::is_whitespace),
            "{:?}",
            sample.name
        );
    }
});
