// The AEAD micro benchmark of notes.md, section 1: a throwaway crate (ring = "0.17.14",
// aws-lc-rs = "1"), `cargo build --release`, run twice.
use std::time::Instant;

/// Time `n` seals of a `size`-byte buffer; `seal(i, buf)` seals with nonce `i`.
fn time(name: &str, size: usize, n: usize, mut seal: impl FnMut(u64, &mut [u8])) {
    let mut buf = vec![1u8; size];
    let t = Instant::now();
    for i in 0..n {
        seal(i as u64, &mut buf);
    }
    let e = t.elapsed();
    println!(
        "{name:6} {size:6}: {:.2} GB/s, {:.0} ns/op",
        (n * size) as f64 / e.as_secs_f64() / 1e9,
        e.as_nanos() as f64 / n as f64
    );
}

fn nonce(i: u64) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce[4..].copy_from_slice(&i.to_be_bytes());
    nonce
}

fn main() {
    let key = [7u8; 16];
    let n = 200_000usize;
    let ring_key = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_128_GCM, &key).unwrap(),
    );
    let lc_key = aws_lc_rs::aead::LessSafeKey::new(
        aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_128_GCM, &key).unwrap(),
    );
    for size in [16384usize, 1024, 100] {
        time("ring", size, n, |i, buf| {
            let nonce = ring::aead::Nonce::assume_unique_for_key(nonce(i));
            let aad = ring::aead::Aad::from(&[0u8; 5]);
            let _ = std::hint::black_box(ring_key.seal_in_place_separate_tag(nonce, aad, buf).unwrap());
        });
        time("awslc", size, n, |i, buf| {
            let nonce = aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce(i));
            let aad = aws_lc_rs::aead::Aad::from(&[0u8; 5]);
            let _ = std::hint::black_box(lc_key.seal_in_place_separate_tag(nonce, aad, buf).unwrap());
        });
    }
}
