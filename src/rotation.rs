//! Random orthogonal rotations Π (TurboQuant §3, "random rotation"; QJL §3 uses the same idea).
//!
//! * [`RotationKind::Dense`]: a Haar-random orthogonal matrix, the Q factor of the QR
//!   decomposition of a d×d standard Gaussian matrix with the sign fix (R's diagonal made
//!   positive), computed in f64 by twice-iterated modified Gram–Schmidt. Any d; O(d²) to apply.
//! * [`RotationKind::Hadamard`]: Π = H·D with D a random ±1 diagonal and H the normalised
//!   Walsh–Hadamard transform, block-diagonal with blocks of B = the largest power of two
//!   dividing d (B = d when d is a power of two). B must be at least 16. O(d log B) to apply.
//!
//! Both are generated on the CPU from a `u64` seed (see [`crate::rng`]) and are uploaded as they
//! are; the GPU never re-derives them. `apply` computes Π x, `apply_inverse` computes Πᵀ y.

use crate::error::{check_len, Error, Result};
use crate::rng::Rng;

/// Largest dimension of a dense rotation (its generation is O(d³)).
pub const MAX_DENSE_DIM: usize = 4096;
/// Smallest Hadamard block.
pub const MIN_HADAMARD_BLOCK: usize = 16;

/// Which family of rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RotationKind {
    /// Haar-random dense orthogonal matrix.
    Dense,
    /// Random signs followed by a (block) normalised Walsh–Hadamard transform.
    Hadamard,
}

impl RotationKind {
    /// The name used on the command line and in reports: `dense` or `hadamard`.
    pub fn name(self) -> &'static str {
        match self {
            RotationKind::Dense => "dense",
            RotationKind::Hadamard => "hadamard",
        }
    }
}

impl std::str::FromStr for RotationKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "dense" => Ok(RotationKind::Dense),
            "hadamard" => Ok(RotationKind::Hadamard),
            _ => Err(Error::Config(format!(
                "unknown rotation {s:?}: supported are dense, hadamard"
            ))),
        }
    }
}

/// A seeded orthogonal d×d rotation.
#[derive(Debug, Clone)]
pub struct Rotation {
    dim: usize,
    kind: RotationKind,
    /// Dense: Π row-major. Empty for Hadamard.
    matrix: Vec<f32>,
    /// Dense: Πᵀ row-major (so that both directions are row dot products). Empty for Hadamard.
    matrix_t: Vec<f32>,
    /// Hadamard: the ±1 diagonal D. Empty for dense.
    signs: Vec<f32>,
    /// Hadamard block size B.
    block: usize,
}

impl Rotation {
    /// A rotation of `kind` for dimension `dim`, fixed by `seed`.
    ///
    /// Errors: `dim == 0`; dense above [`MAX_DENSE_DIM`]; Hadamard when the largest power of two
    /// dividing `dim` is below [`MIN_HADAMARD_BLOCK`].
    pub fn new(kind: RotationKind, dim: usize, seed: u64) -> Result<Self> {
        if dim == 0 {
            return Err(Error::UnsupportedDim {
                dim,
                reason: "a rotation needs dim ≥ 1".into(),
            });
        }
        let mut rng = Rng::new(seed);
        match kind {
            RotationKind::Dense => {
                if dim > MAX_DENSE_DIM {
                    return Err(Error::UnsupportedDim {
                        dim,
                        reason: format!("dense rotations support dim ≤ {MAX_DENSE_DIM}"),
                    });
                }
                let q = haar_orthogonal(dim, &mut rng);
                let matrix: Vec<f32> = q.iter().map(|&v| v as f32).collect();
                let matrix_t = transpose(&matrix, dim, dim);
                Ok(Rotation {
                    dim,
                    kind,
                    matrix,
                    matrix_t,
                    signs: Vec::new(),
                    block: dim,
                })
            }
            RotationKind::Hadamard => {
                let block = 1usize << dim.trailing_zeros();
                if block < MIN_HADAMARD_BLOCK {
                    return Err(Error::UnsupportedDim {
                        dim,
                        reason: format!(
                            "the Hadamard rotation needs dim = 2^k·m with 2^k ≥ {MIN_HADAMARD_BLOCK} \
                             (largest power-of-two block here: {block}); use the dense rotation"
                        ),
                    });
                }
                let signs = (0..dim).map(|_| rng.sign() as f32).collect();
                Ok(Rotation {
                    dim,
                    kind,
                    matrix: Vec::new(),
                    matrix_t: Vec::new(),
                    signs,
                    block,
                })
            }
        }
    }

    /// The dimension d.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The family.
    pub fn kind(&self) -> RotationKind {
        self.kind
    }

    /// Hadamard block size (d for dense).
    pub fn block(&self) -> usize {
        self.block
    }

    /// The random signs D of a Hadamard rotation (empty for dense).
    pub fn signs(&self) -> &[f32] {
        &self.signs
    }

    /// `out = Π x`. Errors on length mismatches.
    pub fn apply(&self, x: &[f32], out: &mut [f32]) -> Result<()> {
        check_len("rotation input", x.len(), self.dim)?;
        check_len("rotation output", out.len(), self.dim)?;
        self.apply_unchecked(x, out);
        Ok(())
    }

    /// `out = Πᵀ y`. Errors on length mismatches.
    pub fn apply_inverse(&self, y: &[f32], out: &mut [f32]) -> Result<()> {
        check_len("rotation input", y.len(), self.dim)?;
        check_len("rotation output", out.len(), self.dim)?;
        self.apply_inverse_unchecked(y, out);
        Ok(())
    }

    #[inline(always)]
    pub(crate) fn apply_unchecked(&self, x: &[f32], out: &mut [f32]) {
        match self.kind {
            RotationKind::Dense => matvec(&self.matrix, self.dim, x, out),
            RotationKind::Hadamard => {
                for ((o, &v), &s) in out.iter_mut().zip(x).zip(&self.signs) {
                    *o = v * s;
                }
                self.fwht_blocks(out);
            }
        }
    }

    /// `outs[v·d..(v+1)·d] = Π xs[v·d..(v+1)·d]` for every vector of `xs` (a whole number of
    /// d-vectors; `outs` as long): the same values as [`Self::apply_unchecked`] per vector. A
    /// dense rotation reads its matrix once per four vectors (a blocked matrix product).
    #[inline(always)]
    pub(crate) fn apply_many_unchecked<U: crate::simd::Unpack>(
        &self,
        xs: &[f32],
        outs: &mut [f32],
    ) {
        let d = self.dim;
        match self.kind {
            RotationKind::Dense => {
                let mut xc = xs.chunks_exact(d);
                let mut oc = outs.chunks_exact_mut(d);
                loop {
                    match xc.len().min(4) {
                        0 => break,
                        1 => many::<U, 1>(&self.matrix, d, &mut xc, &mut oc),
                        2 => many::<U, 2>(&self.matrix, d, &mut xc, &mut oc),
                        3 => many::<U, 3>(&self.matrix, d, &mut xc, &mut oc),
                        _ => many::<U, 4>(&self.matrix, d, &mut xc, &mut oc),
                    }
                }
            }
            RotationKind::Hadamard => {
                for (x, o) in xs.chunks_exact(d).zip(outs.chunks_exact_mut(d)) {
                    self.apply_unchecked(x, o);
                }
            }
        }
    }

    pub(crate) fn apply_inverse_unchecked(&self, y: &[f32], out: &mut [f32]) {
        match self.kind {
            RotationKind::Dense => matvec(&self.matrix_t, self.dim, y, out),
            RotationKind::Hadamard => {
                out.copy_from_slice(y);
                self.fwht_blocks(out);
                for (o, &s) in out.iter_mut().zip(&self.signs) {
                    *o *= s;
                }
            }
        }
    }

    #[inline(always)]
    fn fwht_blocks(&self, v: &mut [f32]) {
        let scale = 1.0 / (self.block as f32).sqrt();
        for blk in v.chunks_exact_mut(self.block) {
            fwht(blk);
            for x in blk.iter_mut() {
                *x *= scale;
            }
        }
    }

    /// Π as a dense row-major d×d matrix (what a kernel uploads, and what tests check).
    pub fn to_matrix(&self) -> Vec<f32> {
        match self.kind {
            RotationKind::Dense => self.matrix.clone(),
            RotationKind::Hadamard => {
                let d = self.dim;
                let mut m = vec![0.0f32; d * d];
                let mut e = vec![0.0f32; d];
                let mut col = vec![0.0f32; d];
                for j in 0..d {
                    e.iter_mut().for_each(|v| *v = 0.0);
                    e[j] = 1.0;
                    self.apply_unchecked(&e, &mut col);
                    for i in 0..d {
                        m[i * d + j] = col[i];
                    }
                }
                m
            }
        }
    }
}

/// The next V vectors of `xs` through [`crate::simd::Unpack::matvec_many`] (the caller checked
/// that V are left).
#[inline(always)]
fn many<U: crate::simd::Unpack, const V: usize>(
    m: &[f32],
    d: usize,
    xs: &mut std::slice::ChunksExact<'_, f32>,
    outs: &mut std::slice::ChunksExactMut<'_, f32>,
) {
    let x: [&[f32]; V] = std::array::from_fn(|_| xs.next().expect("V vectors left"));
    let o: [&mut [f32]; V] = std::array::from_fn(|_| outs.next().expect("V outputs left"));
    U::matvec_many::<V>(m, d, x, o);
}

/// The transpose of a row-major rows×cols matrix.
pub(crate) fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = m[i * cols + j];
        }
    }
    t
}

/// `out = M x` for a row-major n×n matrix.
#[inline(never)]
pub(crate) fn matvec(m: &[f32], n: usize, x: &[f32], out: &mut [f32]) {
    for (o, row) in out.iter_mut().zip(m.chunks_exact(n)) {
        *o = dot(row, x);
    }
}

/// Dot product with 8 independent accumulators (vectorises on x86-64 and aarch64).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s = 0.0f32;
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]) + s
}

/// In-place unnormalised Walsh–Hadamard transform of a power-of-two-length slice.
#[inline(always)]
pub fn fwht(v: &mut [f32]) {
    let n = v.len();
    debug_assert!(n.is_power_of_two());
    let mut h = 1;
    if n >= 8 {
        // Stages h = 1, 2, 4 inside each group of 8, written out (the same additions in the
        // same order as the loop below, so the same result, without strided access).
        for c in v.chunks_exact_mut(8) {
            let a = [c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]];
            let b = [
                a[0] + a[1],
                a[0] - a[1],
                a[2] + a[3],
                a[2] - a[3],
                a[4] + a[5],
                a[4] - a[5],
                a[6] + a[7],
                a[6] - a[7],
            ];
            let e = [
                b[0] + b[2],
                b[1] + b[3],
                b[0] - b[2],
                b[1] - b[3],
                b[4] + b[6],
                b[5] + b[7],
                b[4] - b[6],
                b[5] - b[7],
            ];
            c[0] = e[0] + e[4];
            c[1] = e[1] + e[5];
            c[2] = e[2] + e[6];
            c[3] = e[3] + e[7];
            c[4] = e[0] - e[4];
            c[5] = e[1] - e[5];
            c[6] = e[2] - e[6];
            c[7] = e[3] - e[7];
        }
        h = 8;
    }
    while h < n {
        for blk in v.chunks_exact_mut(2 * h) {
            let (lo, hi) = blk.split_at_mut(h);
            for (x, y) in lo.iter_mut().zip(hi.iter_mut()) {
                let (a, b) = (*x, *y);
                *x = a + b;
                *y = a - b;
            }
        }
        h *= 2;
    }
}

/// A Haar-random orthogonal matrix (row-major, f64): Q of the QR of a Gaussian matrix with
/// R's diagonal positive. Gram–Schmidt on the columns yields exactly that Q.
fn haar_orthogonal(d: usize, rng: &mut Rng) -> Vec<f64> {
    // Columns stored contiguously: cols[j*d + i] = G[i][j].
    let mut cols: Vec<f64> = (0..d * d).map(|_| rng.gaussian()).collect();
    for j in 0..d {
        let (done, rest) = cols.split_at_mut(j * d);
        let cj = &mut rest[..d];
        for _pass in 0..2 {
            for k in 0..j {
                let ck = &done[k * d..(k + 1) * d];
                let p: f64 = ck.iter().zip(cj.iter()).map(|(a, b)| a * b).sum();
                for (x, &y) in cj.iter_mut().zip(ck) {
                    *x -= p * y;
                }
            }
        }
        let n: f64 = cj.iter().map(|v| v * v).sum::<f64>().sqrt();
        for x in cj.iter_mut() {
            *x /= n;
        }
    }
    // Row-major Q: Q[i][j] = cols[j*d + i].
    let mut q = vec![0.0f64; d * d];
    for j in 0..d {
        for i in 0..d {
            q[i * d + j] = cols[j * d + i];
        }
    }
    q
}
