//! Arbitrary request paths through the waypoint's normaliser, under every mode: no panic; the
//! result is a fixed point (normalising it again changes nothing); under the RFC 3986 modes no
//! result holds a dot segment or an escape of an unreserved character (either would be a
//! second spelling of a path a policy names).
#![no_main]

use libfuzzer_sys::fuzz_target;
use zring_core::waypoint::normalize::{normalize_path, PathNormalization as N};

fn unreserved_escape(p: &str) -> bool {
    let b = p.as_bytes();
    (0..b.len().saturating_sub(2)).any(|i| {
        b[i] == b'%'
            && std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .is_some_and(|c| c.is_ascii_alphanumeric() || b"-._~".contains(&c))
    })
}

fuzz_target!(|data: &[u8]| {
    let raw = format!("/{}", String::from_utf8_lossy(data));
    for mode in [N::None, N::Base, N::MergeSlashes, N::DecodeAndMergeSlashes] {
        let Ok(once) = normalize_path(&raw, mode) else {
            continue;
        };
        let twice = normalize_path(&once, mode).expect("a normalised path normalises again");
        assert_eq!(once, twice, "not a fixed point under {mode:?}: {raw:?}");
        if mode != N::None {
            assert!(
                !once.split('/').any(|s| s == "." || s == ".."),
                "a dot segment survived: {raw:?} -> {once:?}"
            );
            assert!(!unreserved_escape(&once), "{raw:?} -> {once:?}");
        }
    }
});
