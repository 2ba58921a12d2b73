//! Shared helpers of the integration tests.
#![allow(dead_code)]

/// A fresh seed per run (printed, so that a failure can be replayed with TQKV_TEST_SEED).
pub fn fresh_seed(test: &str) -> u64 {
    let seed = match std::env::var("TQKV_TEST_SEED") {
        Ok(s) => s.parse().expect("TQKV_TEST_SEED must be a u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    };
    eprintln!("{test}: seed {seed} (replay with TQKV_TEST_SEED={seed})");
    seed
}

/// Gaussian vector with per-channel scales (f64 Box–Muller from the crate's generator).
pub fn gaussian_vec(rng: &mut tqkv::rng::Rng, scales: &[f32]) -> Vec<f32> {
    scales.iter().map(|&s| s * rng.gaussian() as f32).collect()
}

/// f64 dot product.
pub fn dot64(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}
