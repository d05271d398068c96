//! Plan files: TOML parsing and validation, and the small value parsers
//! (release, duration, gate condition) they use. Errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spirekeep::plan::file;
use spirekeep::plan::health::Condition;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(mut plan) = file::parse(text) {
        plan.absolutize(std::path::Path::new("/plans"));
        let _ = plan.validate();
    }
    let _ = file::parse_release(text);
    let _ = file::parse_duration(text);
    let _ = Condition::parse(text);
});
