//! Arbitrary text as `zring control-plane`'s token file: parsed or refused, never a panic; a
//! token that parsed is found again by itself and by no other string.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zring_core::xds::authn::Tokens;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(tokens) = Tokens::parse(&text) else {
        return;
    };
    let first = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .find(|l| !l.is_empty())
        .and_then(|l| l.split_whitespace().next())
        .expect("a parsed file has a token");
    assert!(tokens.caller(Some(first)).is_some());
    assert!(tokens.caller(Some(&format!("{first}x"))).is_none() || text.contains(&format!("{first}x")));
});
