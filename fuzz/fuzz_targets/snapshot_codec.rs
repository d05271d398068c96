//! The snapshot codec: the first byte picks the zstd-compressed object reader
//! (`ObjectDecoder`, what verify and restore use) or the raw SPKD decoder.
//! Any bytes give rows or an error, never a panic; rows that decode encode
//! again and decode to the same canonical bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spirekeep::snapshot::codec::ObjectDecoder;
use spirekeep::snapshot::format::{Decoder, Encoder, encode_values};

const MAX_ROWS: usize = 10_000;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        if let Ok(mut dec) = ObjectDecoder::new(rest, "fuzz") {
            let mut n = 0;
            while let Ok(Some(_)) = dec.next_row() {
                n += 1;
                if n > MAX_ROWS {
                    return;
                }
            }
            let _ = dec.finish();
        }
        return;
    }
    let Ok(mut dec) = Decoder::new(rest, "fuzz") else {
        return;
    };
    let header = dec.header().clone();
    let mut rows = Vec::new();
    loop {
        match dec.next_row() {
            Ok(Some(row)) => {
                rows.push(row);
                if rows.len() > MAX_ROWS {
                    return;
                }
            }
            Ok(None) => break,
            Err(_) => return,
        }
    }
    // A whole object decoded: it must survive a round trip.
    let Ok(mut enc) = Encoder::new(Vec::new(), &header) else {
        return;
    };
    for row in &rows {
        enc.write_row(row).expect("a decoded row encodes");
    }
    let bytes = enc.finish().expect("writing to a Vec");
    let mut again = Decoder::new(&bytes[..], "fuzz").expect("re-encoded header decodes");
    assert_eq!(again.header(), &header);
    for row in &rows {
        let back = again.next_row().expect("re-encoded row").expect("a row");
        let (mut a, mut b) = (Vec::new(), Vec::new());
        encode_values(&mut a, row);
        encode_values(&mut b, &back);
        assert_eq!(a, b, "canonical encoding changed in a round trip");
    }
    assert!(again.next_row().expect("trailer").is_none());
});
