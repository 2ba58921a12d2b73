//! The distortion experiment of TurboQuant §5.1 (Fig. 3): quantize random unit vectors, measure
//! the reconstruction MSE and the inner-product error against random unit queries, and compare
//! with theory. Backs `tqkv distortion` and the tests.
//!
//! Per sample i: x_i uniform on S^(d−1), y_i uniform on S^(d−1) (independent streams derived
//! from the seed and i, so results do not depend on the thread count), x̂_i = dequantize(
//! quantize(x_i)) (optionally x_i scaled by a random factor, see [`measure_scaled`]). Reported: `mse` = mean ‖x−x̂‖²/‖x‖²; `ip_scale` = least-squares slope of
//! ⟨y,x̂⟩ on ⟨y,x⟩; `ip_bias` = mean(⟨y,x̂⟩ − ⟨y,x⟩) (divided by ‖x‖ when x is scaled) and its standard error; `ip_var` = the
//! variance of that difference.
//!
//! Theory (`mse_theory`, `ip_scale_theory`), per group g of d_g channels at b_g bits, weighted
//! by d_g/d (the expected share of ‖x‖² in the group):
//! * mse: D(d_g, b_g), the exact Lloyd–Max value of [`crate::codebook::Codebook::unit_mse`];
//!   ip_scale = 1 − D (the centroid condition makes E⟨x, x̂⟩ = ‖x‖²(1 − D)).
//! * prod: E‖r‖² = D(d_g, b_g − 1)·‖x_g‖² (D(·, 0) = 1) and the QJL reconstruction a·Sᵀz with
//!   a = γ/(mκ) has E‖r − a·Sᵀz‖² = γ²[(m·d_g + P·κ²)/(m²κ²) − 1], P = ordered row pairs from
//!   different independent blocks (Gaussian: m(m−1); orthogonal, m ≤ d_g: 0). For Gaussian S
//!   with m = d_g this is γ²(π/2 − 1/d_g). ip_scale = 1 (unbiased).

use crate::codebook::Codebook;
use crate::error::Result;
use crate::rng::{derive_seed, Rng};
use crate::rotation::dot;
use crate::spec::{Mode, QuantSpec};
use crate::VectorQuantizer;
use rayon::prelude::*;

/// One row of the experiment (one bit setting).
#[derive(Debug, Clone, PartialEq)]
pub struct DistortionRow {
    /// The bits, as given (e.g. `3` or `3.5`).
    pub bits: String,
    /// `mse` or `prod`.
    pub mode: &'static str,
    /// Code bits per channel (MSE codes + sign bits).
    pub code_bits: f64,
    /// Bytes of one packed record (norms included).
    pub record_bytes: usize,
    /// Mean ‖x−x̂‖²/‖x‖².
    pub mse: f64,
    /// Its theoretical value.
    pub mse_theory: f64,
    /// Least-squares slope of ⟨y,x̂⟩ on ⟨y,x⟩.
    pub ip_scale: f64,
    /// Its theoretical value.
    pub ip_scale_theory: f64,
    /// Mean of ⟨y,x̂⟩ − ⟨y,x⟩.
    pub ip_bias: f64,
    /// Standard error of `ip_bias`.
    pub ip_bias_se: f64,
    /// Variance of ⟨y,x̂⟩ − ⟨y,x⟩.
    pub ip_var: f64,
}

#[derive(Default, Clone, Copy)]
struct Acc {
    n: f64,
    mse: f64,
    a: f64,
    b: f64,
    aa: f64,
    ab: f64,
    e: f64,
    ee: f64,
}

impl Acc {
    fn add(&mut self, o: &Acc) {
        self.n += o.n;
        self.mse += o.mse;
        self.a += o.a;
        self.b += o.b;
        self.aa += o.aa;
        self.ab += o.ab;
        self.e += o.e;
        self.ee += o.ee;
    }
}

const CHUNK: usize = 512;

/// Runs the experiment for one quantizer over `samples` vectors; `seed` fixes the vectors.
pub fn measure(q: &VectorQuantizer, samples: usize, seed: u64) -> Result<DistortionRow> {
    measure_scaled(q, samples, seed, false)
}

/// [`measure`], optionally multiplying each x by a log-uniform factor in [1/16, 256]. The
/// reported quantities are relative, so only the rounding of stored norms can change them:
/// this is how the f16-vs-f32 norm choice is measured (docs/FORMAT.md).
pub fn measure_scaled(
    q: &VectorQuantizer,
    samples: usize,
    seed: u64,
    scale_norms: bool,
) -> Result<DistortionRow> {
    let d = q.dim();
    let chunks: Vec<Result<Acc>> = (0..samples.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            let mut acc = Acc::default();
            let mut x = vec![0.0f32; d];
            let mut y = vec![0.0f32; d];
            let mut xh = vec![0.0f32; d];
            let mut rec = vec![0u8; q.record_bytes()];
            for i in c * CHUNK..((c + 1) * CHUNK).min(samples) {
                let mut rng = Rng::new(derive_seed(seed, i as u64));
                rng.unit_vector(&mut x);
                rng.unit_vector(&mut y);
                if scale_norms {
                    let f = (2f64.powf(-4.0 + 12.0 * rng.uniform())) as f32;
                    x.iter_mut().for_each(|v| *v *= f);
                }
                q.quantize(&x, &mut rec)?;
                q.dequantize(&rec, &mut xh)?;
                let err: f64 = x
                    .iter()
                    .zip(&xh)
                    .map(|(&a, &b)| ((a - b) as f64).powi(2))
                    .sum();
                let nx: f64 = x.iter().map(|&a| (a as f64).powi(2)).sum();
                let a = dot(&y, &x) as f64 / nx.sqrt();
                let b = dot(&y, &xh) as f64 / nx.sqrt();
                acc.n += 1.0;
                acc.mse += err / nx;
                acc.a += a;
                acc.b += b;
                acc.aa += a * a;
                acc.ab += a * b;
                acc.e += b - a;
                acc.ee += (b - a) * (b - a);
            }
            Ok(acc)
        })
        .collect();
    let mut t = Acc::default();
    for c in chunks {
        t.add(&c?);
    }
    let n = t.n.max(1.0);
    let cov = t.ab / n - (t.a / n) * (t.b / n);
    let var_a = t.aa / n - (t.a / n).powi(2);
    let mean_e = t.e / n;
    let var_e = (t.ee / n - mean_e * mean_e).max(0.0);
    let (mse_theory, ip_scale_theory) = theory(q)?;
    Ok(DistortionRow {
        bits: q.spec().bits.to_string(),
        mode: q.spec().mode.name(),
        code_bits: q.code_bits_per_channel(),
        record_bytes: q.record_bytes(),
        mse: t.mse / n,
        mse_theory,
        ip_scale: if var_a > 0.0 { cov / var_a } else { f64::NAN },
        ip_scale_theory,
        ip_bias: mean_e,
        ip_bias_se: (var_e / n).sqrt(),
        ip_var: var_e,
    })
}

/// (mse_theory, ip_scale_theory) of a quantizer, see the module docs.
pub fn theory(q: &VectorQuantizer) -> Result<(f64, f64)> {
    let d = q.dim() as f64;
    let mut mse = 0.0;
    let mut scale = 0.0;
    for (g, gl) in q.layout().groups.iter().enumerate() {
        let w = gl.dim as f64 / d;
        let dmse = if gl.mse_bits > 0 {
            Codebook::get(gl.dim, gl.mse_bits)?.unit_mse()
        } else {
            1.0
        };
        match q.spec().mode {
            Mode::Mse => {
                mse += w * dmse;
                scale += w * (1.0 - dmse);
            }
            Mode::Prod { .. } => {
                let qjl = q.group_qjl(g).expect("prod groups have a sketch");
                let m = qjl.sketch_dim() as f64;
                let k2 = qjl.kappa() * qjl.kappa();
                let pairs = if qjl.orthogonal() {
                    let dg = gl.dim;
                    let full = qjl.sketch_dim() / dg;
                    let rest = qjl.sketch_dim() % dg;
                    m * m - (full * dg * dg + rest * rest) as f64
                } else {
                    m * (m - 1.0)
                };
                let factor = (m * gl.dim as f64 + pairs * k2) / (m * m * k2) - 1.0;
                mse += w * dmse * factor;
                scale += w;
            }
        }
    }
    Ok((mse, scale))
}

/// Builds the quantizer of `spec` at `dim` (fixed split rule: the vectors are isotropic) and
/// measures it.
pub fn run(spec: QuantSpec, dim: usize, samples: usize, seed: u64) -> Result<DistortionRow> {
    run_scaled(spec, dim, samples, seed, false)
}

/// [`run`] with [`measure_scaled`]'s random norms.
pub fn run_scaled(
    spec: QuantSpec,
    dim: usize,
    samples: usize,
    seed: u64,
    scale_norms: bool,
) -> Result<DistortionRow> {
    let spec = spec.with_outliers(crate::spec::OutlierRule::Fixed);
    let q = VectorQuantizer::new(spec, dim, derive_seed(seed, 0x5150))?;
    measure_scaled(&q, samples, derive_seed(seed, 0xD15), scale_norms)
}
