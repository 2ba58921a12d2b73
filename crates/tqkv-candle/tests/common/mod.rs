//! Helpers shared by the cache tests: fresh seeds (printed, replayable), layer-like Q/K/V, f64
//! views of tensors and their largest difference.
#![allow(dead_code)]
use candle_core::{DType, Device, Tensor};
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

/// Layer-like queries `[b, hq, n, d]` (scale 0.25) and keys, values `[b, hk, n, d]`.
pub fn qkv(
    rng: &mut Rng,
    (b, hq, hk, n, d): (usize, usize, usize, usize, usize),
) -> (Tensor, Tensor, Tensor) {
    let q = kv_like(rng, (b, hq, n, d), 0.25);
    let k = kv_like(rng, (b, hk, n, d), 1.0);
    let v = kv_like(rng, (b, hk, n, d), 1.0);
    (q, k, v)
}

/// All elements as f64, in row-major order.
pub fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The largest |a − b| over paired elements.
pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}
