//! The first request head of a connection, from any client, through the engine's strictness
//! check: no input may panic; a head the check lets through never has both length headers or a
//! bare LF (what a strict origin would refuse must never be forwarded).
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft::proxy::strict::{head_end, head_problem};

fuzz_target!(|data: &[u8]| {
    let Some(end) = head_end(data) else {
        return;
    };
    assert!(end <= data.len());
    let head = &data[..end];
    if head_problem(head).is_none() {
        let text = String::from_utf8_lossy(head).to_ascii_lowercase();
        assert!(
            !(text.contains("\r\ncontent-length:") && text.contains("\r\ntransfer-encoding:")),
            "both length headers let through"
        );
        for (i, b) in head.iter().enumerate() {
            assert!(*b != b'\n' || (i > 0 && head[i - 1] == b'\r'), "bare LF let through");
        }
    }
});
