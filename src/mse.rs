//! TurboQuant's MSE quantizer, Q_mse (TurboQuant §3.1, Algorithm 1).
//!
//! n = ‖x‖, y = Π x / n, idx_j = nearest centroid of y_j in the Lloyd–Max codebook for (d, b);
//! stored: idx (b bits each) and n. Dequantize: x̂ = n · Πᵀ c[idx]. Inner products are taken in
//! the rotated domain: ⟨q, x̂⟩ = n · ⟨Π q, c[idx]⟩ (DESIGN.md, "Attention in the rotated domain").
//! A zero vector is stored as n = 0 with the codes of the zero coordinate and decodes to zero.

use crate::codebook::Codebook;
use crate::error::{check_finite, check_len, Result};
use crate::rotation::{Rotation, RotationKind};
use std::sync::Arc;

/// The MSE quantizer for one group of `dim` channels at `bits` bits.
#[derive(Debug, Clone)]
pub struct MseQuantizer {
    rotation: Arc<Rotation>,
    codebook: Arc<Codebook>,
}

impl MseQuantizer {
    /// Builds the quantizer: a rotation of `kind` fixed by `seed` and the cached codebook.
    pub fn new(dim: usize, bits: u8, kind: RotationKind, seed: u64) -> Result<Self> {
        let codebook = Codebook::get(dim, bits)?;
        let rotation = Arc::new(Rotation::new(kind, dim, seed)?);
        Ok(Self { rotation, codebook })
    }

    /// The same rotation with another codebook of the same dimension and bits (e.g. one fitted
    /// to measured coordinates, [`Codebook::fitted`]).
    pub fn with_codebook(&self, codebook: Arc<Codebook>) -> Result<Self> {
        if codebook.dim() != self.dim() || codebook.bits() != self.bits() {
            return Err(crate::error::Error::Config(format!(
                "a codebook for dim {} at {} bits cannot replace one for dim {} at {} bits",
                codebook.dim(),
                codebook.bits(),
                self.dim(),
                self.bits()
            )));
        }
        Ok(Self {
            rotation: self.rotation.clone(),
            codebook,
        })
    }

    /// Dimension of the group.
    pub fn dim(&self) -> usize {
        self.codebook.dim()
    }

    /// Bits per coordinate.
    pub fn bits(&self) -> u8 {
        self.codebook.bits()
    }

    /// The rotation Π.
    pub fn rotation(&self) -> &Rotation {
        &self.rotation
    }

    /// The codebook.
    pub fn codebook(&self) -> &Codebook {
        &self.codebook
    }

    /// Quantizes `x`: writes one code per coordinate into `codes` and returns n = ‖x‖.
    pub fn quantize(&self, x: &[f32], codes: &mut [u8]) -> Result<f32> {
        check_len("mse input", x.len(), self.dim())?;
        check_len("mse codes", codes.len(), self.dim())?;
        check_finite("mse input", x)?;
        let mut rot = vec![0.0f32; self.dim()];
        self.rotation.apply_unchecked(x, &mut rot);
        Ok(self.encode_rotated(&rot, codes))
    }

    /// Codes an already rotated vector `rot = Π x`; returns its norm. No checks.
    #[inline(always)]
    pub(crate) fn encode_rotated(&self, rot: &[f32], codes: &mut [u8]) -> f32 {
        let n = crate::simd::sumsq64(rot).sqrt() as f32;
        let inv = if n > 0.0 { 1.0 / n } else { 0.0 };
        // Codebook::encode for 8 coordinates at a time: the number of boundaries strictly
        // below each (the same codes; the loop over 8 lanes vectorises).
        let bounds = self.codebook.boundaries();
        for (cc, rc) in codes.chunks_mut(8).zip(rot.chunks(8)) {
            let mut t = [0.0f32; 8];
            for (tk, &v) in t.iter_mut().zip(rc) {
                *tk = v * inv;
            }
            let mut idx = [0u32; 8];
            for &b in bounds {
                for k in 0..8 {
                    idx[k] += (t[k] > b) as u32;
                }
            }
            for (c, &i) in cc.iter_mut().zip(&idx) {
                *c = i as u8;
            }
        }
        n
    }

    /// Writes n·c[idx] (the reconstruction in the rotated domain) into `out`. No checks.
    pub(crate) fn decode_rotated(&self, norm: f32, codes: &[u8], out: &mut [f32]) {
        let c = self.codebook.centroids();
        for (o, &k) in out.iter_mut().zip(codes) {
            *o = norm * c[k as usize];
        }
    }

    /// Dequantizes: `out = n · Πᵀ c[idx]`.
    pub fn dequantize(&self, norm: f32, codes: &[u8], out: &mut [f32]) -> Result<()> {
        check_len("mse codes", codes.len(), self.dim())?;
        check_len("mse output", out.len(), self.dim())?;
        let mut rot = vec![0.0f32; self.dim()];
        self.decode_rotated(norm, codes, &mut rot);
        self.rotation.apply_inverse_unchecked(&rot, out);
        Ok(())
    }

    /// ⟨q, x̂⟩ from the rotated query `q_rot = Π q`: n · Σ_j q_rot[j] · c[idx_j]. No checks.
    #[inline]
    pub(crate) fn dot_rotated(&self, q_rot: &[f32], norm: f32, codes: &[u8]) -> f32 {
        let c = self.codebook.centroids();
        let mut acc = 0.0f32;
        for (&q, &k) in q_rot.iter().zip(codes) {
            acc += q * c[k as usize];
        }
        norm * acc
    }
}
