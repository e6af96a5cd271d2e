//! Arbitrary bytes as a SOCKS5 client's greeting and request, fed whole and byte by byte (as
//! they arrive from a socket): every prefix is "need more", a parse, or a reply code.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zring_core::socks5::{parse_greeting, parse_request, Target};

fuzz_target!(|data: &[u8]| {
    for end in 0..=data.len() {
        let _ = parse_greeting(&data[..end]);
        if let Ok(Some((target, used))) = parse_request(&data[..end]) {
            assert!(used <= end);
            if let Target::Name(name, _) = target {
                assert!(!name.is_empty() && name.len() <= 255);
            }
        }
    }
});
