//! One vector ⇄ one packed record: TurboQuant-MSE and TurboQuant-prod (TurboQuant §3.1–3.2,
//! Algorithms 1 and 2), the fractional-bit channel split (TurboQuant §4.3, "outlier" channels
//! coded by an independent instance at higher precision), and the plain QJL sketch (QJL §3).
//!
//! A [`VectorQuantizer`] holds, per channel group (one group for integer bits, two for a split):
//! the group's channels, its rotation Π_g and codebook (when the MSE stage has ≥ 1 bit) and its
//! QJL sketch S_g (prod mode). Prod mode sketches the residual in the rotated domain,
//! r' = Π_g x_g − n·c[idx], with S_g; since S_g Π_g has the law of S_g, this is the paper's
//! sign(S r) in distribution, and it saves un-rotating the residual. With no MSE stage (prod at
//! 1 bit = plain QJL) the sketch acts on x_g directly.
//!
//! The record layout is [`RecordLayout`] (docs/FORMAT.md): norms, then codes, then sign bits.

use crate::error::{check_finite, check_len, Error, Result};
use crate::mse::MseQuantizer;
use crate::packing::{pack_codes_unchecked, packed_len, unpack_codes_unchecked};
use crate::qjl::QjlSketch;
use crate::rng::derive_seed;
use crate::spec::{BitsSpec, Mode, NormFormat, NormRule, OutlierRule, QuantSpec};

/// Vectors quantized together by [`VectorQuantizer::quantize_batch`] (a dense rotation's
/// matrix is read once per block).
const BLOCK: usize = 4;

/// Byte offsets of one group's fields inside a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLayout {
    /// Channels in the group.
    pub dim: usize,
    /// Bits of the MSE stage (0 = none).
    pub mse_bits: u8,
    /// QJL sign bits (0 = none).
    pub sketch_dim: usize,
    /// Offset of the norm n (if `mse_bits > 0`).
    pub norm_offset: usize,
    /// Offset of the residual norm γ (if `sketch_dim > 0`).
    pub gamma_offset: usize,
    /// Offset of the packed codes.
    pub codes_offset: usize,
    /// Offset of the packed sign bits.
    pub signs_offset: usize,
}

/// The byte layout of one packed vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordLayout {
    /// Bytes per norm (2 for f16, 4 for f32).
    pub norm_bytes: usize,
    /// One entry per group, high-precision group first.
    pub groups: Vec<GroupLayout>,
    /// Total bytes of a record.
    pub bytes: usize,
}

impl RecordLayout {
    fn new(groups: &[(usize, u8, usize)], norm: NormFormat) -> Self {
        let nb = norm.bytes();
        let mut off = 0;
        let mut out: Vec<GroupLayout> = Vec::new();
        // Norms first (aligned at the start of the record), group by group: n, then γ.
        for &(dim, mse_bits, sketch_dim) in groups {
            let norm_offset = off;
            if mse_bits > 0 {
                off += nb;
            }
            let gamma_offset = off;
            if sketch_dim > 0 {
                off += nb;
            }
            out.push(GroupLayout {
                dim,
                mse_bits,
                sketch_dim,
                norm_offset,
                gamma_offset,
                codes_offset: 0,
                signs_offset: 0,
            });
        }
        for g in &mut out {
            g.codes_offset = off;
            if g.mse_bits > 0 {
                off += packed_len(g.dim, g.mse_bits);
            }
        }
        for g in &mut out {
            g.signs_offset = off;
            off += packed_len(g.sketch_dim, 1);
        }
        RecordLayout {
            norm_bytes: nb,
            groups: out,
            bytes: off,
        }
    }
}

#[derive(Debug, Clone)]
struct Group {
    channels: Vec<usize>,
    mse: Option<MseQuantizer>,
    qjl: Option<QjlSketch>,
}

/// A query prepared for [`VectorQuantizer::score`]: per group Π_g q_g and S_g (Π_g q_g).
#[derive(Debug, Clone)]
pub struct PreparedQuery {
    rotated: Vec<Vec<f32>>,
    projected: Vec<Vec<f32>>,
}

impl PreparedQuery {
    /// Π_g q_g of group g (q_g itself for a group without MSE stage).
    pub fn rotated(&self, g: usize) -> &[f32] {
        &self.rotated[g]
    }

    /// S_g Π_g q_g of group g (empty without a QJL stage).
    pub fn projected(&self, g: usize) -> &[f32] {
        &self.projected[g]
    }
}

/// Quantizes vectors of one dimension with one [`QuantSpec`] into fixed-size records.
#[derive(Debug, Clone)]
pub struct VectorQuantizer {
    dim: usize,
    spec: QuantSpec,
    groups: Vec<Group>,
    layout: RecordLayout,
}

impl VectorQuantizer {
    /// A quantizer for `dim`-dimensional vectors. For a split, the high-precision channels are
    /// 0..k; that is only allowed with [`OutlierRule::Fixed`] — the magnitude rule needs
    /// calibration vectors ([`Self::calibrate`]).
    pub fn new(spec: QuantSpec, dim: usize, seed: u64) -> Result<Self> {
        let k = spec.bits.hi_channels(dim)?;
        if k > 0 && spec.outliers == OutlierRule::Magnitude {
            return Err(Error::Config(
                "the magnitude outlier rule needs calibration vectors: use \
                 VectorQuantizer::calibrate, or OutlierRule::Fixed"
                    .into(),
            ));
        }
        Self::with_channels(spec, dim, &(0..k).collect::<Vec<_>>(), seed)
    }

    /// A quantizer whose split is chosen by the spec's outlier rule from `samples` (row-major
    /// vectors of `dim`, e.g. the first prefill's keys of one layer and head).
    pub fn calibrate(spec: QuantSpec, dim: usize, samples: &[f32], seed: u64) -> Result<Self> {
        let k = spec.bits.hi_channels(dim)?;
        let hi = select_outliers(samples, dim, k, spec.outliers)?;
        Self::with_channels(spec, dim, &hi, seed)
    }

    /// A quantizer with the given high-precision channels (ignored for uniform bits; for a
    /// split exactly `spec.bits.hi_channels(dim)` distinct indices < dim).
    pub fn with_channels(spec: QuantSpec, dim: usize, hi: &[usize], seed: u64) -> Result<Self> {
        let k = spec.bits.hi_channels(dim)?;
        let plan: Vec<(Vec<usize>, u8)> = match spec.bits {
            BitsSpec::Uniform(b) => vec![((0..dim).collect(), b)],
            BitsSpec::Split {
                hi_bits, lo_bits, ..
            } => {
                if hi.len() != k {
                    return Err(Error::Config(format!(
                        "split needs {k} high-precision channels, got {}",
                        hi.len()
                    )));
                }
                let mut is_hi = vec![false; dim];
                for &c in hi {
                    if c >= dim || is_hi[c] {
                        return Err(Error::Config(format!(
                            "high-precision channel {c} is out of range 0..{dim} or repeated"
                        )));
                    }
                    is_hi[c] = true;
                }
                let his: Vec<usize> = (0..dim).filter(|&c| is_hi[c]).collect();
                let los: Vec<usize> = (0..dim).filter(|&c| !is_hi[c]).collect();
                vec![(his, hi_bits), (los, lo_bits)]
            }
        };
        let mut groups = Vec::new();
        let mut shape = Vec::new();
        for (g, (channels, bits)) in plan.into_iter().enumerate() {
            let gd = channels.len();
            let (mse_bits, sketch) = match spec.mode {
                Mode::Mse => (bits, None),
                Mode::Prod {
                    sketch_dim,
                    orthogonal,
                } => {
                    if sketch_dim.is_some() && k > 0 {
                        return Err(Error::Config(
                            "an explicit QJL sketch dimension needs uniform bits (with a split, \
                             each group uses m = its dimension)"
                                .into(),
                        ));
                    }
                    (bits - 1, Some((sketch_dim.unwrap_or(gd), orthogonal)))
                }
            };
            let mse = if mse_bits > 0 {
                Some(MseQuantizer::new(
                    gd,
                    mse_bits,
                    spec.rotation,
                    derive_seed(seed, 2 * g as u64),
                )?)
            } else {
                None
            };
            let qjl = match sketch {
                Some((m, orth)) => Some(QjlSketch::new(
                    gd,
                    m,
                    orth,
                    derive_seed(seed, 2 * g as u64 + 1),
                )?),
                None => None,
            };
            shape.push((gd, mse_bits, qjl.as_ref().map_or(0, |q| q.sketch_dim())));
            groups.push(Group { channels, mse, qjl });
        }
        let layout = RecordLayout::new(&shape, spec.norm);
        Ok(Self {
            dim,
            spec,
            groups,
            layout,
        })
    }

    /// Vector dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Appends to `out[g]` the rotated unit coordinates Π_g x_g / ‖x_g‖ of each group g of `x`
    /// that has an MSE stage (a zero x_g adds nothing): the samples a fitted codebook of that
    /// group is made from. `out` has one entry per group.
    pub fn unit_coordinates(&self, x: &[f32], out: &mut [Vec<f32>]) -> Result<()> {
        check_len("vector", x.len(), self.dim)?;
        check_len("coordinate lists", out.len(), self.groups.len())?;
        check_finite("vector", x)?;
        for (group, o) in self.groups.iter().zip(out.iter_mut()) {
            let Some(mse) = &group.mse else { continue };
            let xg: Vec<f32> = group.channels.iter().map(|&c| x[c]).collect();
            let mut rot = vec![0.0f32; xg.len()];
            mse.rotation().apply_unchecked(&xg, &mut rot);
            let n = rot
                .iter()
                .map(|&v| (v as f64) * (v as f64))
                .sum::<f64>()
                .sqrt();
            if n > 0.0 {
                o.extend(rot.iter().map(|&v| (v as f64 / n) as f32));
            }
        }
        Ok(())
    }

    /// This quantizer with the MSE codebook of group g replaced by `codebooks[g]` where that is
    /// `Some` (same dimension and bits as the group's own).
    pub fn with_codebooks(
        mut self,
        codebooks: &[Option<std::sync::Arc<crate::codebook::Codebook>>],
    ) -> Result<Self> {
        check_len("codebooks", codebooks.len(), self.groups.len())?;
        for (group, cb) in self.groups.iter_mut().zip(codebooks) {
            if let (Some(mse), Some(cb)) = (&group.mse, cb) {
                group.mse = Some(mse.with_codebook(cb.clone())?);
            }
        }
        Ok(self)
    }

    /// The spec.
    pub fn spec(&self) -> &QuantSpec {
        &self.spec
    }

    /// The record layout.
    pub fn layout(&self) -> &RecordLayout {
        &self.layout
    }

    /// Bytes of one record.
    pub fn record_bytes(&self) -> usize {
        self.layout.bytes
    }

    /// The channels of group `g` (0 = high precision for a split), ascending.
    pub fn group_channels(&self, g: usize) -> &[usize] {
        &self.groups[g].channels
    }

    /// Number of groups (1 or 2).
    pub fn num_groups(&self) -> usize {
        self.groups.len()
    }

    /// The MSE stage of group `g`, if it has one.
    pub fn group_mse(&self, g: usize) -> Option<&MseQuantizer> {
        self.groups[g].mse.as_ref()
    }

    /// The QJL sketch of group `g`, if it has one.
    pub fn group_qjl(&self, g: usize) -> Option<&QjlSketch> {
        self.groups[g].qjl.as_ref()
    }

    /// Code bits per channel: MSE codes + QJL sign bits, norms not counted.
    pub fn code_bits_per_channel(&self) -> f64 {
        let bits: usize = self
            .layout
            .groups
            .iter()
            .map(|g| g.dim * g.mse_bits as usize + g.sketch_dim)
            .sum();
        bits as f64 / self.dim as f64
    }

    /// Stored bits per channel: the whole record (norms and padding included) over d.
    pub fn stored_bits_per_channel(&self) -> f64 {
        (self.layout.bytes * 8) as f64 / self.dim as f64
    }

    /// Quantizes `x` (length d, finite) into `record` (length [`Self::record_bytes`]).
    ///
    /// Runs in the best code path of the machine ([`crate::simd::Isa::detect`]; the same
    /// records on every path), with per-thread scratch buffers (nothing allocated per call).
    pub fn quantize(&self, x: &[f32], record: &mut [u8]) -> Result<()> {
        self.quantize_on(crate::simd::Isa::detect(), x, record)
    }

    /// [`Self::quantize`] on the code path `isa` (one of [`crate::simd::Isa::available`]; tests
    /// and benchmarks compare them).
    pub fn quantize_on(&self, isa: crate::simd::Isa, x: &[f32], record: &mut [u8]) -> Result<()> {
        check_len("vector", x.len(), self.dim)?;
        check_len("record", record.len(), self.layout.bytes)?;
        check_finite("vector", x)?;
        self.quantize_checked(isa, x, record)
    }

    /// Quantizes `xs` (a whole number of d-vectors, one after the other) into `records` (one
    /// record each, one after the other): the same records as [`Self::quantize`] per vector,
    /// faster for dense rotations (the rotation of four vectors at a time is one blocked matrix
    /// product). Errors, with `records` unspecified: a length that is not a whole number of
    /// vectors or records, a non-finite value, a norm the format cannot hold.
    pub fn quantize_batch(&self, xs: &[f32], records: &mut [u8]) -> Result<()> {
        self.quantize_batch_on(crate::simd::Isa::detect(), xs, records)
    }

    /// [`Self::quantize_batch`] on the code path `isa`.
    pub fn quantize_batch_on(
        &self,
        isa: crate::simd::Isa,
        xs: &[f32],
        records: &mut [u8],
    ) -> Result<()> {
        let count = xs.len() / self.dim.max(1);
        check_len("vectors", xs.len(), count * self.dim)?;
        check_len("records", records.len(), count * self.layout.bytes)?;
        check_finite("vector", xs)?;
        self.quantize_checked(isa, xs, records)
    }

    /// Both entry points after their checks.
    fn quantize_checked(
        &self,
        isa: crate::simd::Isa,
        xs: &[f32],
        records: &mut [u8],
    ) -> Result<()> {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        SCRATCH.with(|cell| {
            // Re-entrance (none today) falls back to a fresh buffer.
            let mut fresh = Vec::new();
            let mut guard = cell.try_borrow_mut();
            let buf = match guard.as_mut() {
                Ok(b) => &mut **b,
                Err(_) => &mut fresh,
            };
            let need = (2 * BLOCK + 1) * self.dim;
            if buf.len() < need {
                buf.resize(need, 0.0);
            }
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: Isa::Avx2 is only offered where AVX2, FMA and F16C were detected.
                crate::simd::Isa::Avx2 => unsafe { self.quantize_avx2(xs, records, buf) },
                _ => self.quantize_blocks::<crate::simd::ScalarUnpack>(xs, records, buf),
            }
        })
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn quantize_avx2(&self, xs: &[f32], records: &mut [u8], buf: &mut [f32]) -> Result<()> {
        self.quantize_blocks::<crate::simd::Avx2Unpack>(xs, records, buf)
    }

    /// The body of [`Self::quantize_batch`] (checked inputs), [`BLOCK`] vectors at a time;
    /// `buf` ≥ (2·BLOCK + 1)·d floats.
    #[inline(always)]
    fn quantize_blocks<U: crate::simd::Unpack>(
        &self,
        xs: &[f32],
        records: &mut [u8],
        buf: &mut [f32],
    ) -> Result<()> {
        let (d, rb) = (self.dim, self.layout.bytes);
        for (xb, rbk) in xs.chunks(BLOCK * d).zip(records.chunks_mut(BLOCK * rb)) {
            self.quantize_block::<U>(xb, rbk, buf)?;
        }
        Ok(())
    }

    /// Up to [`BLOCK`] vectors: per group, the channels of every vector gathered, rotated
    /// together, then coded vector by vector.
    #[inline(always)]
    fn quantize_block<U: crate::simd::Unpack>(
        &self,
        xs: &[f32],
        records: &mut [u8],
        buf: &mut [f32],
    ) -> Result<()> {
        records.iter_mut().for_each(|b| *b = 0);
        let (d, rb) = (self.dim, self.layout.bytes);
        let k = xs.len() / d;
        let (xg_all, rest) = buf.split_at_mut(BLOCK * d);
        let (rot_all, rest) = rest.split_at_mut(BLOCK * d);
        let rec_all = &mut rest[..d];
        // Codes and signs: on the stack for the usual sizes.
        let mut codes_stack = [0u8; 256];
        let mut codes_heap = Vec::new();
        let maxg = self
            .layout
            .groups
            .iter()
            .map(|g| g.dim.max(g.sketch_dim))
            .max()
            .unwrap_or(0);
        let codes_buf: &mut [u8] = if maxg <= codes_stack.len() {
            &mut codes_stack[..]
        } else {
            codes_heap.resize(maxg, 0u8);
            &mut codes_heap[..]
        };
        for (group, gl) in self.groups.iter().zip(&self.layout.groups) {
            let gd = gl.dim;
            if gd == 0 {
                continue;
            }
            for (xgv, x) in xg_all.chunks_exact_mut(gd).zip(xs.chunks_exact(d)) {
                for (o, &c) in xgv.iter_mut().zip(&group.channels) {
                    *o = x[c];
                }
            }
            if let Some(mse) = &group.mse {
                mse.rotation()
                    .apply_many_unchecked::<U>(&xg_all[..k * gd], &mut rot_all[..k * gd]);
            }
            for v in 0..k {
                let record = &mut records[v * rb..(v + 1) * rb];
                let xg = &xg_all[v * gd..(v + 1) * gd];
                let rot = &mut rot_all[v * gd..(v + 1) * gd];
                // The vector the sketch acts on: the rotated residual, or x_g without MSE stage.
                let mut resid_is_rot = false;
                if let Some(mse) = &group.mse {
                    let codes = &mut codes_buf[..gd];
                    let mut n = mse.encode_rotated(rot, codes);
                    n = stored_norm(
                        self.spec.norm_rule,
                        n,
                        rot,
                        codes,
                        mse.codebook().centroids(),
                    );
                    let n = self.write_norm(record, gl.norm_offset, n)?;
                    pack_codes_unchecked(
                        codes,
                        gl.mse_bits,
                        &mut record[gl.codes_offset..gl.codes_offset + packed_len(gd, gl.mse_bits)],
                    );
                    if group.qjl.is_some() {
                        let rec = &mut rec_all[..gd];
                        mse.decode_rotated(n, codes, rec);
                        for (r, &b) in rot.iter_mut().zip(rec.iter()) {
                            *r -= b;
                        }
                        resid_is_rot = true;
                    }
                }
                if let Some(qjl) = &group.qjl {
                    let resid: &[f32] = if resid_is_rot { rot } else { xg };
                    let signs = &mut codes_buf[..gl.sketch_dim];
                    let gamma = qjl.sketch_unchecked(resid, signs);
                    self.write_norm(record, gl.gamma_offset, gamma)?;
                    pack_codes_unchecked(
                        signs,
                        1,
                        &mut record
                            [gl.signs_offset..gl.signs_offset + packed_len(gl.sketch_dim, 1)],
                    );
                }
            }
        }
        Ok(())
    }

    /// Dequantizes `record` into `out` (length d): per group Π_gᵀ(n·c[idx] + γ/(mκ)·S_gᵀ z).
    pub fn dequantize(&self, record: &[u8], out: &mut [f32]) -> Result<()> {
        check_len("record", record.len(), self.layout.bytes)?;
        check_len("output", out.len(), self.dim)?;
        for (group, gl) in self.groups.iter().zip(&self.layout.groups) {
            let mut rot = vec![0.0f32; gl.dim];
            if let Some(qjl) = &group.qjl {
                let signs = self.unpack(record, gl.signs_offset, gl.sketch_dim, 1);
                let gamma = self.read_norm(record, gl.gamma_offset);
                qjl.reconstruct_unchecked(&signs, gamma, &mut rot);
            }
            let xg = if let Some(mse) = &group.mse {
                let codes = self.unpack(record, gl.codes_offset, gl.dim, gl.mse_bits);
                let n = self.read_norm(record, gl.norm_offset);
                let c = mse.codebook().centroids();
                for (r, &k) in rot.iter_mut().zip(&codes) {
                    *r += n * c[k as usize];
                }
                let mut xg = vec![0.0f32; gl.dim];
                mse.rotation().apply_inverse_unchecked(&rot, &mut xg);
                xg
            } else {
                rot
            };
            for (&c, v) in group.channels.iter().zip(xg) {
                out[c] = v;
            }
        }
        Ok(())
    }

    /// Prepares a query for [`Self::score`] (rotates it and projects it once).
    pub fn prepare_query(&self, q: &[f32]) -> Result<PreparedQuery> {
        check_len("query", q.len(), self.dim)?;
        check_finite("query", q)?;
        let mut rotated = Vec::new();
        let mut projected = Vec::new();
        for group in &self.groups {
            let qg: Vec<f32> = group.channels.iter().map(|&c| q[c]).collect();
            let qr = match &group.mse {
                Some(mse) => {
                    let mut r = vec![0.0f32; qg.len()];
                    mse.rotation().apply_unchecked(&qg, &mut r);
                    r
                }
                None => qg,
            };
            let sq = match &group.qjl {
                Some(qjl) => {
                    let mut s = vec![0.0f32; qjl.sketch_dim()];
                    qjl.project(&qr, &mut s)?;
                    s
                }
                None => Vec::new(),
            };
            rotated.push(qr);
            projected.push(sq);
        }
        Ok(PreparedQuery { rotated, projected })
    }

    /// The estimate of ⟨q, x⟩ from a prepared query and a record, straight from the codes:
    /// Σ_g n_g·⟨Π_g q_g, c[idx_g]⟩ + γ_g/(m_g κ)·⟨S_g Π_g q_g, z_g⟩. Equals ⟨q, dequantize⟩ up to
    /// float rounding.
    pub fn score(&self, query: &PreparedQuery, record: &[u8]) -> Result<f32> {
        check_len("record", record.len(), self.layout.bytes)?;
        if query.rotated.len() != self.groups.len() {
            return Err(Error::Config(
                "prepared query belongs to a different quantizer".into(),
            ));
        }
        let mut total = 0.0f32;
        for (g, (group, gl)) in self.groups.iter().zip(&self.layout.groups).enumerate() {
            if let Some(mse) = &group.mse {
                let codes = self.unpack(record, gl.codes_offset, gl.dim, gl.mse_bits);
                let n = self.read_norm(record, gl.norm_offset);
                total += mse.dot_rotated(&query.rotated[g], n, &codes);
            }
            if let Some(qjl) = &group.qjl {
                let signs = self.unpack(record, gl.signs_offset, gl.sketch_dim, 1);
                let gamma = self.read_norm(record, gl.gamma_offset);
                total += qjl.estimate(&query.projected[g], &signs, gamma);
            }
        }
        Ok(total)
    }

    fn unpack(&self, record: &[u8], offset: usize, n: usize, bits: u8) -> Vec<u8> {
        let mut out = vec![0u8; n];
        unpack_codes_unchecked(
            &record[offset..offset + packed_len(n, bits)],
            bits,
            &mut out,
        );
        out
    }

    /// Stores a norm; returns the value as stored (what the decoder will see).
    fn write_norm(&self, record: &mut [u8], offset: usize, v: f32) -> Result<f32> {
        let fmt = self.spec.norm;
        match fmt.write(record, offset, v) {
            (stored, true) => Ok(stored),
            (_, false) => Err(Error::NormOverflow {
                norm: v,
                format: fmt.name(),
                max: fmt.max(),
            }),
        }
    }

    fn read_norm(&self, record: &[u8], offset: usize) -> f32 {
        self.spec.norm.read(record, offset)
    }
}

/// The `k` high-precision channels of a split by `rule`, ascending. `samples` holds row-major
/// vectors of `dim` (at least one for the magnitude rule; none needed for the fixed rule).
pub fn select_outliers(
    samples: &[f32],
    dim: usize,
    k: usize,
    rule: OutlierRule,
) -> Result<Vec<usize>> {
    if k > dim {
        return Err(Error::Config(format!(
            "cannot choose {k} channels out of {dim}"
        )));
    }
    match rule {
        OutlierRule::Fixed => Ok((0..k).collect()),
        OutlierRule::Magnitude => {
            if k == 0 {
                return Ok(Vec::new());
            }
            if dim == 0 || samples.is_empty() || samples.len() % dim != 0 {
                return Err(Error::Shape {
                    what: "calibration samples (a non-empty multiple of dim)",
                    expected: dim,
                    got: samples.len(),
                });
            }
            check_finite("calibration samples", samples)?;
            let mut energy = vec![0.0f64; dim];
            for row in samples.chunks_exact(dim) {
                for (e, &v) in energy.iter_mut().zip(row) {
                    *e += (v as f64) * (v as f64);
                }
            }
            let mut order: Vec<usize> = (0..dim).collect();
            // Largest energy first; ties to the lower index (stable sort).
            order.sort_by(|&a, &b| energy[b].total_cmp(&energy[a]));
            let mut hi: Vec<usize> = order[..k].to_vec();
            hi.sort_unstable();
            Ok(hi)
        }
    }
}

/// The MSE norm `rule` stores for the codes of `rot` (n = ‖rot‖, the exact norm the codes
/// were chosen with).
#[inline(always)]
pub(crate) fn stored_norm(
    rule: NormRule,
    n: f32,
    rot: &[f32],
    codes: &[u8],
    centroids: &[f32],
) -> f32 {
    match rule {
        NormRule::Exact => n,
        NormRule::Projected => projected_norm(n, rot, codes, centroids),
        NormRule::LeastSquares => least_squares_norm(n, rot, codes, centroids),
    }
}

/// [`NormRule::LeastSquares`]: ⟨rot, c[codes]⟩ / ‖c[codes]‖² (f64 sums, four partial sums
/// each), or `n` itself when either is not positive (only for the zero vector: codes keep the
/// signs of their coordinates).
#[inline(always)]
fn least_squares_norm(n: f32, rot: &[f32], codes: &[u8], centroids: &[f32]) -> f32 {
    let (mut dot, mut cc) = ([0.0f64; 4], [0.0f64; 4]);
    for (j, (&r, &k)) in rot.iter().zip(codes).enumerate() {
        let c = centroids[k as usize] as f64;
        dot[j % 4] += r as f64 * c;
        cc[j % 4] += c * c;
    }
    let dot = (dot[0] + dot[2]) + (dot[1] + dot[3]);
    let cc = (cc[0] + cc[2]) + (cc[1] + cc[3]);
    if dot > 0.0 && cc > 0.0 {
        (dot / cc) as f32
    } else {
        n
    }
}

/// [`NormRule::Projected`]: ‖x‖² / ⟨rot, ‖x‖·c[codes]⟩ (f64 sums), or `n` itself when the
/// projection is not positive (only for the zero vector: codes keep the signs of their
/// coordinates, so ⟨u, c⟩ > 0 otherwise).
#[inline(always)]
fn projected_norm(n: f32, rot: &[f32], codes: &[u8], centroids: &[f32]) -> f32 {
    // Four partial sums (the same value on every code path).
    let mut acc = [0.0f64; 4];
    for (j, (&r, &k)) in rot.iter().zip(codes).enumerate() {
        acc[j % 4] += r as f64 * centroids[k as usize] as f64;
    }
    let dot = (acc[0] + acc[2]) + (acc[1] + acc[3]);
    if dot > 0.0 {
        ((n as f64) * (n as f64) / dot) as f32
    } else {
        n
    }
}
