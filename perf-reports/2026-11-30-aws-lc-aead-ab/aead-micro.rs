use std::time::Instant;
fn main() {
    let key = [7u8; 16];
    let n = 200_000usize;
    for size in [16384usize, 1024, 100] {
        let mut buf = vec![1u8; size];
        {
            use ring::aead::*;
            let k = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &key).unwrap());
            let t = Instant::now();
            for i in 0..n {
                let mut nonce = [0u8; 12];
                nonce[4..].copy_from_slice(&(i as u64).to_be_bytes());
                let tag = k.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&[0u8; 5]), &mut buf).unwrap();
                std::hint::black_box(tag);
            }
            let e = t.elapsed();
            println!("ring   {size:6}: {:.2} GB/s, {:.0} ns/op", (n * size) as f64 / e.as_secs_f64() / 1e9, e.as_nanos() as f64 / n as f64);
        }
        {
            use aws_lc_rs::aead::*;
            let k = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &key).unwrap());
            let t = Instant::now();
            for i in 0..n {
                let mut nonce = [0u8; 12];
                nonce[4..].copy_from_slice(&(i as u64).to_be_bytes());
                let tag = k.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&[0u8; 5]), &mut buf).unwrap();
                std::hint::black_box(tag);
            }
            let e = t.elapsed();
            println!("awslc  {size:6}: {:.2} GB/s, {:.0} ns/op", (n * size) as f64 / e.as_secs_f64() / 1e9, e.as_nanos() as f64 / n as f64);
        }
    }
}
