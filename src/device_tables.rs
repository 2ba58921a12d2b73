//! The tables a GPU needs to reproduce [`VectorQuantizer`] exactly, flattened on the host:
//! rotations (dense Π or Hadamard signs), codebooks (boundaries, centroids), QJL sketches and
//! each KV head's channel order, plus the record layout. They mirror `TqSpec`/`TqGroup` in
//! kernels/tqkv_common.cuh; the CUDA wrappers upload them once per layer (issue 5). Always
//! compiled, so that the layout plumbing is tested on machines without a GPU.

use crate::error::{Error, Result};
use crate::quantizer::VectorQuantizer;
use crate::rotation::RotationKind;
use crate::spec::{NormFormat, NormRule};

/// One group's tables and layout numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupTables {
    /// Channels in the group.
    pub dim: usize,
    /// Bits of the MSE stage (0 = none).
    pub mse_bits: u8,
    /// QJL sign bits (0 = none).
    pub m: usize,
    /// 0 = dense, 1 = Hadamard.
    pub rot_kind: i32,
    /// Hadamard block size (dim for dense).
    pub had_block: usize,
    /// Byte offsets inside a record: n, γ, codes, signs.
    pub offsets: [usize; 4],
    /// Dense: Π row-major `[dim, dim]`; Hadamard: the ±1 signs `[dim]`; empty without MSE stage.
    pub rot: Vec<f32>,
    /// Decision boundaries `[2^b − 1]`.
    pub boundaries: Vec<f32>,
    /// Centroids `[2^b]`.
    pub centroids: Vec<f32>,
    /// S row-major `[m, dim]`.
    pub sketch: Vec<f32>,
    /// 1 / (m·κ).
    pub qjl_scale: f32,
}

/// The tables of one layer: shared groups plus per-head channel orders.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerTables {
    /// Vector dimension.
    pub head_dim: usize,
    /// Bytes per record.
    pub record_bytes: usize,
    /// How norms are stored.
    pub norm: NormFormat,
    /// Which norm the MSE stage stores.
    pub norm_rule: NormRule,
    /// The groups (1 or 2).
    pub groups: Vec<GroupTables>,
    /// `[heads, head_dim]`: for each head, group 0's channels then group 1's.
    pub channels: Vec<i32>,
}

impl LayerTables {
    /// Tables of the per-head quantizers of one layer. They must share everything but their
    /// channel assignment (same spec, dimension and seed), as the TurboQuant cache builds them.
    pub fn new(heads: &[VectorQuantizer]) -> Result<Self> {
        let first = heads
            .first()
            .ok_or_else(|| Error::Config("no quantizers".into()))?;
        let mut groups = Vec::new();
        for (g, gl) in first.layout().groups.iter().enumerate() {
            let (rot_kind, had_block, rot, boundaries, centroids) = match first.group_mse(g) {
                Some(mse) => {
                    let r = mse.rotation();
                    let (kind, rot) = match r.kind() {
                        RotationKind::Dense => (0, r.to_matrix()),
                        RotationKind::Hadamard => (1, r.signs().to_vec()),
                    };
                    let cb = mse.codebook();
                    (
                        kind,
                        r.block(),
                        rot,
                        cb.boundaries().to_vec(),
                        cb.centroids().to_vec(),
                    )
                }
                None => (0, gl.dim, Vec::new(), Vec::new(), Vec::new()),
            };
            let (sketch, qjl_scale) = match first.group_qjl(g) {
                Some(q) => (
                    q.matrix().to_vec(),
                    (1.0 / (q.sketch_dim() as f64 * q.kappa())) as f32,
                ),
                None => (Vec::new(), 0.0),
            };
            groups.push(GroupTables {
                dim: gl.dim,
                mse_bits: gl.mse_bits,
                m: gl.sketch_dim,
                rot_kind,
                had_block,
                offsets: [
                    gl.norm_offset,
                    gl.gamma_offset,
                    gl.codes_offset,
                    gl.signs_offset,
                ],
                rot,
                boundaries,
                centroids,
                sketch,
                qjl_scale,
            });
        }
        let mut channels = Vec::with_capacity(heads.len() * first.dim());
        for (h, q) in heads.iter().enumerate() {
            let same = q.dim() == first.dim()
                && q.layout() == first.layout()
                && q.spec() == first.spec()
                && (0..q.num_groups()).all(|g| {
                    q.group_mse(g).map(|m| m.rotation().to_matrix())
                        == first.group_mse(g).map(|m| m.rotation().to_matrix())
                        && q.group_qjl(g).map(|s| s.matrix().to_vec())
                            == first.group_qjl(g).map(|s| s.matrix().to_vec())
                });
            if !same {
                return Err(Error::Config(format!(
                    "head {h}'s quantizer differs from head 0's beyond its channel assignment"
                )));
            }
            for g in 0..q.num_groups() {
                channels.extend(q.group_channels(g).iter().map(|&c| c as i32));
            }
        }
        Ok(LayerTables {
            head_dim: first.dim(),
            record_bytes: first.record_bytes(),
            norm: first.spec().norm,
            norm_rule: first.spec().norm_rule,
            groups,
            channels,
        })
    }

    /// Quantizes `x` with head `head`'s tables only, following the kernel's steps
    /// (kernels/quantize_append.cu) in f64: the executable specification the CUDA kernel
    /// implements, checked against [`VectorQuantizer::quantize`] by the tests.
    pub fn quantize_like_kernel(&self, head: usize, x: &[f32], rec: &mut [u8]) {
        let d = self.head_dim;
        let ch = &self.channels[head * d..(head + 1) * d];
        rec.iter_mut().for_each(|b| *b = 0);
        let mut base = 0;
        for g in &self.groups {
            let xg: Vec<f32> = (0..g.dim).map(|j| x[ch[base + j] as usize]).collect();
            let mut resid = xg.clone();
            if g.mse_bits > 0 {
                let rot: Vec<f32> = match g.rot_kind {
                    0 => (0..g.dim)
                        .map(|i| crate::rotation::dot(&g.rot[i * g.dim..(i + 1) * g.dim], &xg))
                        .collect(),
                    _ => {
                        let mut v: Vec<f32> = xg.iter().zip(&g.rot).map(|(a, s)| a * s).collect();
                        let s = 1.0 / (g.had_block as f32).sqrt();
                        for blk in v.chunks_exact_mut(g.had_block) {
                            crate::rotation::fwht(blk);
                            blk.iter_mut().for_each(|x| *x *= s);
                        }
                        v
                    }
                };
                let n = rot.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt() as f32;
                let inv = if n > 0.0 { 1.0 / n } else { 0.0 };
                let codes: Vec<u8> = rot
                    .iter()
                    .map(|&v| g.boundaries.iter().filter(|&&b| v * inv > b).count() as u8)
                    .collect();
                // Codes come from the exact norm; the stored one follows the norm rule.
                let stored =
                    crate::quantizer::stored_norm(self.norm_rule, n, &rot, &codes, &g.centroids);
                let ns = self.put_norm(rec, g.offsets[0], stored);
                let len = crate::packing::packed_len(g.dim, g.mse_bits);
                crate::packing::pack_codes_unchecked(
                    &codes,
                    g.mse_bits,
                    &mut rec[g.offsets[2]..g.offsets[2] + len],
                );
                if g.m > 0 {
                    resid = rot
                        .iter()
                        .zip(&codes)
                        .map(|(&r, &c)| r - ns * g.centroids[c as usize])
                        .collect();
                }
            }
            if g.m > 0 {
                let gam = resid
                    .iter()
                    .map(|&v| (v as f64).powi(2))
                    .sum::<f64>()
                    .sqrt() as f32;
                self.put_norm(rec, g.offsets[1], gam);
                let signs: Vec<u8> = (0..g.m)
                    .map(|l| {
                        (crate::rotation::dot(&g.sketch[l * g.dim..(l + 1) * g.dim], &resid) >= 0.0)
                            as u8
                    })
                    .collect();
                let len = g.m.div_ceil(8);
                crate::packing::pack_codes_unchecked(
                    &signs,
                    1,
                    &mut rec[g.offsets[3]..g.offsets[3] + len],
                );
            }
            base += g.dim;
        }
    }

    /// Stores a norm as the kernel does (saturating where it does not fit; the kernel flags
    /// that in its status word).
    fn put_norm(&self, rec: &mut [u8], off: usize, v: f32) -> f32 {
        self.norm.write(rec, off, v).0
    }
}

/// The kernels' code of a norm rule (`TqSpec::norm_rule`, `TQ_NORM_*` in
/// kernels/tqkv_common.cuh).
pub fn norm_rule_code(rule: NormRule) -> i32 {
    match rule {
        NormRule::Exact => 0,
        NormRule::Projected => 1,
        NormRule::LeastSquares => 2,
    }
}
