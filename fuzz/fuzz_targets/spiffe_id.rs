//! SPIFFE id and CONNECT authority parsing: never panic; whatever parses prints back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(id) = s.parse::<zring_hbone::SpiffeId>() {
            let again: zring_hbone::SpiffeId = id.to_string().parse().expect("round trip");
            assert_eq!(again, id);
        }
        let _ = zring_hbone::server::parse_authority(s);
    }
});
