//! Every connection-string form (SQLite paths and file: URIs, lib/pq keywords
//! and URLs, go-sql-driver DSNs), with and without a declared engine: an error
//! or a connection, never a panic, and a password never shows in the redacted
//! form unless it is also the user, host, socket or database name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spirekeep::datastore::dsn::ConnectionSpec;
use spirekeep::datastore::{Engine, dsn};

/// A password no generated input contains by chance.
const PASSWORD: &str = "Fz9pw0x7e";

/// What the redacted form may legitimately show.
fn shown_fields(spec: &ConnectionSpec) -> String {
    match spec {
        ConnectionSpec::Sqlite(s) => s.path.display().to_string(),
        ConnectionSpec::Postgres(p) => format!(
            "{} {} {:?} {:?}",
            p.options.get_username(),
            p.options.get_host(),
            p.options.get_database(),
            p.options.get_socket()
        ),
        ConnectionSpec::Mysql(m) => format!(
            "{} {} {:?} {:?}",
            m.options.get_username(),
            m.options.get_host(),
            m.options.get_database(),
            m.options.get_socket()
        ),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let workdir = std::path::Path::new("/var/lib/spire");
    // `@PW@` in the input stands for the password, so the fuzzer can place it
    // anywhere (after user:, in password=..., in a query) and we can look for it.
    let input = text.replace("@PW@", PASSWORD);
    for engine in [
        None,
        Some(Engine::Sqlite),
        Some(Engine::Postgres),
        Some(Engine::Mysql),
    ] {
        match dsn::parse(&input, engine, workdir) {
            Ok(spec) => {
                let shown = spec.redacted();
                if shown.contains(PASSWORD) {
                    let fields = shown_fields(&spec);
                    assert!(
                        fields.contains(PASSWORD),
                        "password in the redacted form {shown:?} (fields {fields:?})"
                    );
                }
                let _ = format!("{spec:?}");
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
});
