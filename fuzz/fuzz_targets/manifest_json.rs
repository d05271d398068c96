//! Manifest and verification-record JSON: any bytes are refused with an error
//! or parsed; a parsed manifest re-serializes to JSON that parses back equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spirekeep::snapshot::{Manifest, VerificationRecord};

fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = Manifest::from_json(data) {
        let _ = manifest.problems();
        let _ = manifest.validate();
        let _ = manifest.total_rows();
        let _ = manifest.total_size();
        let again = Manifest::from_json(manifest.to_json_pretty().as_bytes())
            .expect("a manifest spirekeep wrote must read back");
        assert_eq!(again, manifest);
    }
    if let Ok(record) = VerificationRecord::from_json(data) {
        let again = VerificationRecord::from_json(record.to_json_pretty().as_bytes())
            .expect("a record spirekeep wrote must read back");
        assert_eq!(again, record);
    }
});
