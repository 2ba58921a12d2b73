//! The QJL 1-bit sketch and its unbiased inner-product estimator (QJL §3, Def. 1 and Lemma 3;
//! TurboQuant §3.2 uses it on the residual of the MSE stage).
//!
//! Store z = sign(S k) ∈ {±1}^m and ‖k‖. Estimate ⟨q, k⟩ ≈ ‖k‖ / (m·κ) · ⟨S q, z⟩, where κ is the
//! constant for which a single row s satisfies E[⟨s, q⟩·sign⟨s, k⟩] = κ·⟨q, k⟩/‖k‖:
//!
//! * Gaussian S (i.i.d. N(0, 1), the papers' choice): κ = √(2/π), i.e. the papers' √(π/2)/m.
//! * Orthogonal S (rows of independent Haar-random d×d blocks, each row of length √d, so that
//!   the sketch has the Gaussian's scale): each row is uniform on the sphere of radius √d, so
//!   κ = √d · E|u₁| = √d · Γ(d/2) / (√π · Γ((d+1)/2)) for u uniform on S^(d−1). This rescaling
//!   keeps the estimator unbiased (tested); κ → √(2/π) as d grows.
//!
//! Variance (Gaussian S): Var = ‖k‖²/m · (π/2 · ‖q‖² − ⟨q, k̂⟩²).

use crate::error::{check_finite, check_len, Error, Result};
use crate::rng::Rng;
use crate::rotation::{dot, matvec, transpose, Rotation, RotationKind};

/// Largest sketch dimension m.
pub const MAX_SKETCH_DIM: usize = 1 << 16;

/// The random projection S (m×d) of a QJL sketch.
#[derive(Debug, Clone)]
pub struct QjlSketch {
    dim: usize,
    m: usize,
    orthogonal: bool,
    /// S, row-major m×d.
    s: Vec<f32>,
    /// Sᵀ, row-major d×m.
    s_t: Vec<f32>,
    kappa: f64,
}

impl QjlSketch {
    /// A sketch of `m` sign bits for vectors of dimension `dim`, fixed by `seed`.
    /// `orthogonal` selects orthogonalised rows (rescaled, see the module docs).
    pub fn new(dim: usize, m: usize, orthogonal: bool, seed: u64) -> Result<Self> {
        if dim == 0 {
            return Err(Error::UnsupportedDim {
                dim,
                reason: "a QJL sketch needs dim ≥ 1".into(),
            });
        }
        if m == 0 || m > MAX_SKETCH_DIM {
            return Err(Error::Config(format!(
                "QJL sketch dimension m = {m}: supported are 1..={MAX_SKETCH_DIM}"
            )));
        }
        let mut s = Vec::with_capacity(m * dim);
        let kappa = if orthogonal {
            let scale = (dim as f32).sqrt();
            let mut block = 0u64;
            while s.len() < m * dim {
                let r = Rotation::new(
                    RotationKind::Dense,
                    dim,
                    crate::rng::derive_seed(seed, block),
                )?;
                let need = (m * dim - s.len()).min(dim * dim);
                s.extend(r.to_matrix()[..need].iter().map(|v| v * scale));
                block += 1;
            }
            (dim as f64).sqrt() * mean_abs_sphere_coord(dim)
        } else {
            let mut rng = Rng::new(seed);
            s.extend((0..m * dim).map(|_| rng.gaussian() as f32));
            (2.0 / std::f64::consts::PI).sqrt()
        };
        let s_t = transpose(&s, m, dim);
        Ok(Self {
            dim,
            m,
            orthogonal,
            s,
            s_t,
            kappa,
        })
    }

    /// Input dimension d.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of sign bits m.
    pub fn sketch_dim(&self) -> usize {
        self.m
    }

    /// Whether the rows are orthogonalised.
    pub fn orthogonal(&self) -> bool {
        self.orthogonal
    }

    /// κ of the module docs (√(2/π) for Gaussian S).
    pub fn kappa(&self) -> f64 {
        self.kappa
    }

    /// The matrix S, row-major m×d.
    pub fn matrix(&self) -> &[f32] {
        &self.s
    }

    /// `out = S x` (m values): the query side of the estimator.
    pub fn project(&self, x: &[f32], out: &mut [f32]) -> Result<()> {
        check_len("qjl input", x.len(), self.dim)?;
        check_len("qjl projection", out.len(), self.m)?;
        matvec_rect(&self.s, self.dim, x, out);
        Ok(())
    }

    /// Sketches `x`: writes sign(S x) as 0/1 codes (1 ↔ +1; sign(0) = +1) into `signs` and
    /// returns ‖x‖.
    pub fn sketch(&self, x: &[f32], signs: &mut [u8]) -> Result<f32> {
        check_len("qjl input", x.len(), self.dim)?;
        check_len("qjl signs", signs.len(), self.m)?;
        check_finite("qjl input", x)?;
        Ok(self.sketch_unchecked(x, signs))
    }

    #[inline(always)]
    pub(crate) fn sketch_unchecked(&self, x: &[f32], signs: &mut [u8]) -> f32 {
        for (z, row) in signs.iter_mut().zip(self.s.chunks_exact(self.dim)) {
            *z = (dot(row, x) >= 0.0) as u8;
        }
        crate::simd::sumsq64(x).sqrt() as f32
    }

    /// The estimate of ⟨q, x⟩ from `sq = S q`, the signs of x and ‖x‖.
    #[inline]
    pub fn estimate(&self, sq: &[f32], signs: &[u8], norm: f32) -> f32 {
        let mut acc = 0.0f32;
        for (&v, &z) in sq.iter().zip(signs) {
            acc += if z != 0 { v } else { -v };
        }
        (norm as f64 / (self.m as f64 * self.kappa)) as f32 * acc
    }

    /// The vector whose inner product with any q equals [`Self::estimate`]:
    /// `out = ‖x‖/(m·κ) · Sᵀ z` (QJL's dequantization, TurboQuant Alg. 2 line 10).
    pub(crate) fn reconstruct_unchecked(&self, signs: &[u8], norm: f32, out: &mut [f32]) {
        let z: Vec<f32> = signs
            .iter()
            .map(|&b| if b != 0 { 1.0 } else { -1.0 })
            .collect();
        matvec_rect(&self.s_t, self.m, &z, out);
        let a = (norm as f64 / (self.m as f64 * self.kappa)) as f32;
        for o in out.iter_mut() {
            *o *= a;
        }
    }
}

/// `out = M x` for a row-major (out.len() × cols) matrix.
fn matvec_rect(m: &[f32], cols: usize, x: &[f32], out: &mut [f32]) {
    if out.len() == cols {
        matvec(m, cols, x, out);
    } else {
        for (o, row) in out.iter_mut().zip(m.chunks_exact(cols)) {
            *o = dot(row, x);
        }
    }
}

/// E|u₁| for u uniform on the unit sphere in R^d: Γ(d/2) / (√π · Γ((d+1)/2)).
pub fn mean_abs_sphere_coord(d: usize) -> f64 {
    // r(d) = Γ(d/2)/Γ((d+1)/2); r(1) = √π, r(2) = 2/√π, r(d+2) = d/(d+1) · r(d).
    let sqrt_pi = std::f64::consts::PI.sqrt();
    let mut r = if d % 2 == 1 { sqrt_pi } else { 2.0 / sqrt_pi };
    let mut k = if d % 2 == 1 { 1 } else { 2 };
    while k < d {
        r *= k as f64 / (k as f64 + 1.0);
        k += 2;
    }
    r / sqrt_pi
}
