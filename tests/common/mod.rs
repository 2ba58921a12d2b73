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

/// Per-head quantizers of one layer as the TurboQuant cache builds them: one spec and layer
/// seed, each head calibrated on 8 Gaussian vectors with its own channel scales drawn from
/// [min_scale, min_scale + 3) (so each head picks different outlier channels). `mode` is a
/// `Mode` name, optionally with `-projected` for `NormRule::Projected` and then `-log8` for
/// `NormFormat::Log8` norms (else f16).
pub fn layer_heads(
    rng: &mut tqkv::rng::Rng,
    (bits, mode, rot): (&str, &str, &str),
    d: usize,
    h: usize,
    min_scale: f32,
) -> Vec<tqkv::VectorQuantizer> {
    let (mode, norm) = match mode.strip_suffix("-log8") {
        Some(m) => (m, tqkv::NormFormat::Log8),
        None => (mode, tqkv::NormFormat::F16),
    };
    let (mode, rule) = match mode.strip_suffix("-projected") {
        Some(m) => (m, tqkv::NormRule::Projected),
        None => (mode, tqkv::NormRule::Exact),
    };
    let mut spec = tqkv::QuantSpec::mse(bits.parse().unwrap())
        .with_rotation(rot.parse().unwrap())
        .with_outliers(tqkv::OutlierRule::Magnitude)
        .with_norm_rule(rule)
        .with_norm(norm);
    spec.mode = mode.parse().unwrap();
    let seed = rng.next_u64();
    (0..h)
        .map(|_| {
            let scales: Vec<f32> = (0..d)
                .map(|_| min_scale + rng.uniform() as f32 * 3.0)
                .collect();
            let calib: Vec<f32> = (0..8).flat_map(|_| gaussian_vec(rng, &scales)).collect();
            tqkv::VectorQuantizer::calibrate(spec, d, &calib, seed).unwrap()
        })
        .collect()
}
