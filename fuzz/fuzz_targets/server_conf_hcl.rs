//! `server.conf` HCL: the DataStore "sql" block is read or refused with an
//! error, never a panic; an accepted block's connection is parsed too, and no
//! error message repeats the connection string's password.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spirekeep::datastore::spire_conf;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(conf) = spire_conf::parse(text) {
        match conf.connection(std::path::Path::new("/var/lib/spire")) {
            Ok(spec) => {
                let _ = spec.redacted();
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
});
