//! Protocol detection on a connection's first bytes (untrusted, from any pod): no input may
//! panic, and a decision taken on a prefix never changes when more bytes arrive (except the TLS
//! SNI, which is only read from a complete record).
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft::proxy::detect::{Detection, Protocol, detect, on_timeout};

fuzz_target!(|data: &[u8]| {
    let full = detect(data);
    let _ = on_timeout(data);
    for cut in 0..data.len() {
        if let Detection::Done(p) = detect(&data[..cut]) {
            if !matches!(p, Protocol::Tls { .. }) {
                assert_eq!(Detection::Done(p), full);
            }
        }
    }
});
