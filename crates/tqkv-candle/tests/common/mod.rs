//! Helpers shared by the cache tests: fresh seeds (printed, replayable) and layer-like K/V.
#![allow(dead_code)]
use candle_core::{Device, Tensor};
use tqkv::rng::Rng;

/// A fresh seed for `test`, or `TQKV_TEST_SEED` to replay one; printed either way.
pub fn seed(test: &str) -> u64 {
    let s = std::env::var("TQKV_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("{test}: seed {s} (replay with TQKV_TEST_SEED={s})");
    s
}

/// Keys/values like a real layer's: Gaussian with a few high-energy channels and an offset.
pub fn kv_like(rng: &mut Rng, shape: (usize, usize, usize, usize), scale: f64) -> Tensor {
    let (b, h, t, d) = shape;
    let mut v = Vec::with_capacity(b * h * t * d);
    for _ in 0..b * h * t {
        for c in 0..d {
            let s = if c % 16 == 3 { 4.0 } else { 1.0 };
            let offset = if c % 8 == 5 { 1.5 } else { 0.0 };
            v.push((scale * (s * rng.gaussian() + offset)) as f32);
        }
    }
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}
