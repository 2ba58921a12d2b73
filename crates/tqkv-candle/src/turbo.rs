//! The TurboQuant KV cache (TurboQuant §3–4, QJL §3 for prod keys): keys and values stored as
//! packed records of docs/FORMAT.md in u8 tensors on the cache's device, written by
//! [`crate::ops::TqAppend`] and read by [`crate::ops::TqAttend`] straight from the codes.
//!
//! Each layer gets its own seed (rotations and sketches are shared by the layer's KV heads).
//! For a fractional-bit split, each KV head's high-precision channels are chosen once, from the
//! first append (the first prefill chunk), by the spec's outlier rule (largest mean square over
//! that chunk's real tokens of all sequences), then fixed until the cache is rebuilt; `reset`
//! keeps them. Storage `[batch, kv_heads, capacity, record_bytes]` doubles when full.
//!
//! On CUDA the layer's tables are uploaded once (at calibration) and every op runs on the GPU:
//! attention by the fused kernel straight from the codes, for decode and, by default, for prefill
//! chunks too (the alternative, [`PrefillPath::Dequantize`], feeds candle's matmuls;
//! docs/KERNELS.md has the numbers).

use crate::cache::{KvCache, MemoryUsage, SeqState};
use crate::cuda_ops::GpuTables;
use crate::error::{fail, Error, Result};
use crate::exact::ExactStore;
use crate::ops::{ExactAttend, TqAppend, TqAttend, TqDequantize};
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;
use tqkv::{KvSpec, QuantSpec, VectorQuantizer};

/// How a CUDA TurboQuant cache attends with several query tokens (a prefill chunk).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrefillPath {
    /// Dequantize the cache once per chunk and use candle's matmuls (caches without sinks and
    /// window; those with them always take the fused path).
    Dequantize,
    /// The fused kernel, every query row reading the codes (the decode kernel's path): 1.26–1.28×
    /// faster than `Dequantize` for 512-token chunks at 16K–128K on an H100, 4 % slower at 4K
    /// (docs/KERNELS.md).
    #[default]
    Fused,
}

/// `[b, 1, t, 1]` f32: 1 for the real tokens `from ≤ t < new[b]`, 0 elsewhere (padding, and
/// the first `from` tokens, which calibration skips).
fn token_mask(
    b: usize,
    t: usize,
    new: &[usize],
    from: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> = (0..b)
        .flat_map(|i| (0..t).map(move |j| if j >= from && j < new[i] { 1.0 } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (b, 1, t, 1), device)
}

/// The first tokens calibration skips: the sinks (stored exactly, and often outliers), unless
/// the first append holds nothing else.
fn calibration_start(sinks: usize, new: &[usize]) -> usize {
    if new.iter().any(|&n| n > sinks) {
        sinks
    } else {
        0
    }
}

/// The per-(head, channel) mean of `f(x)` over the real tokens `from..` of `x` `[b, h, t, d]`
/// (sequence i has `new[i]` of them): `[h, d]` f32, checked finite (NaN/Inf among the vectors
/// are an error).
fn masked_channel_mean(
    x: &Tensor,
    new: &[usize],
    from: usize,
    f: impl Fn(Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let (b, _, t, _) = crate::cache::dims4("keys", x)?;
    let n = new
        .iter()
        .map(|&n| n.saturating_sub(from))
        .sum::<usize>()
        .max(1) as f64;
    let mask = token_mask(b, t, new, from, x.device())?;
    let mean = (f(x.to_dtype(DType::F32)?)?
        .broadcast_mul(&mask)?
        .sum(2)?
        .sum(0)?
        / n)?;
    if mean
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .any(|x| !x.is_finite())
    {
        candle_core::bail!("the keys' channel means overflow f32");
    }
    Ok(mean)
}

/// The per-(head, channel) mean of the real tokens `from..` of `x` `[b, h, t, d]`: `[1, h, 1, d]`
/// f32.
fn channel_mean(x: &Tensor, new: &[usize], from: usize) -> candle_core::Result<Tensor> {
    let (_, h, _, d) = crate::cache::dims4("keys", x)?;
    masked_channel_mean(x, new, from, Ok)?.reshape((1, h, 1, d))
}

/// Per-(head, channel) scales rms^α of the real tokens `from..` of `x` `[b, h, t, d]` (after
/// centring), normalised per head to a geometric mean of 1: `[1, h, 1, d]` f32. Channels with
/// no energy get the head's smallest positive scale.
fn channel_scales(
    x: &Tensor,
    new: &[usize],
    from: usize,
    alpha: f32,
) -> candle_core::Result<Tensor> {
    let (_, h, _, d) = crate::cache::dims4("keys", x)?;
    let ms = masked_channel_mean(x, new, from, |x| x.sqr())?.to_vec2::<f32>()?;
    let mut out = Vec::with_capacity(h * d);
    for row in ms {
        let floor = row
            .iter()
            .copied()
            .filter(|&e| e > 0.0)
            .fold(f32::INFINITY, f32::min);
        let s: Vec<f64> = row
            .iter()
            .map(|&e| {
                let e = if e > 0.0 {
                    e
                } else if floor.is_finite() {
                    floor
                } else {
                    1.0
                };
                (e as f64).sqrt().powf(alpha as f64)
            })
            .collect();
        let g = (s.iter().map(|x| x.ln()).sum::<f64>() / d as f64).exp();
        out.extend(s.iter().map(|x| (x / g) as f32));
    }
    Tensor::from_vec(out, (1, h, 1, d), x.device())
}

/// A layer's key and value quantizers and GPU tables, as an append uses them.
type Calibration<'a> = (
    &'a Arc<Vec<VectorQuantizer>>,
    &'a Arc<Vec<VectorQuantizer>>,
    &'a Option<Arc<GpuTables>>,
);

/// Coordinates (rotated + sketch, per rotation) the CUDA attention kernel holds for all the
/// rotations of a cycle: [`KvSpec::rotations`] is capped at this over a spec's coordinates (4
/// rotations up to head_dim 128, 2 at 256).
pub const MAX_CYCLE_COORDS: usize = 512;

/// Keys and values in TurboQuant's packed format.
pub struct TurboCache {
    state: SeqState,
    spec: KvSpec,
    seed: u64,
    device: Device,
    kq: Option<Arc<Vec<VectorQuantizer>>>,
    vq: Option<Arc<Vec<VectorQuantizer>>>,
    k: Option<Tensor>,
    v: Option<Tensor>,
    capacity: usize,
    gpu: Option<Arc<GpuTables>>,
    prefill: PrefillPath,
    /// The split kernel of CUDA attention (from `TQKV_ATTENTION_KERNEL` at construction).
    kernel: tqkv::AttentionKernel,
    /// `[1, kv_heads, 1, head_dim]` f32: the key mean subtracted before quantizing
    /// ([`KvSpec::center_keys`]), measured with the calibration.
    kmean: Option<Tensor>,
    /// `[1, kv_heads, 1, head_dim]` f32: the value mean subtracted before quantizing and added
    /// to the outputs ([`KvSpec::center_values`]).
    vmean: Option<Tensor>,
    /// `[1, kv_heads, 1, head_dim]` f32: the key scales s ([`KvSpec::key_scale`]): records and
    /// exact copies hold k/s, queries are multiplied by s.
    kscale: Option<Tensor>,
    /// Sinks and the window in f16 or q8_0 ([`crate::exact`]), for specs that keep exact tokens.
    exact: Option<ExactStore>,
    /// Bytes of a key record + a value record.
    record_bytes: usize,
    /// The open step: what [`KvCache::rollback_step`] restores.
    step: Option<Saved>,
}

/// A TurboQuant cache's state at the start of a step. Tensors are shared, not copied: appends
/// write records only past the saved lengths and a grown capacity allocates new tensors; the
/// one thing a step overwrites in place is the ring of exact tokens, whose saved positions (the
/// window at the start) are copied out the first time a write would reach them.
struct Saved {
    state: SeqState,
    /// Whether the cache was calibrated (quantizers, means, GPU tables) at the start.
    calibrated: bool,
    k: Option<Tensor>,
    v: Option<Tensor>,
    capacity: usize,
    exact: Option<ExactStore>,
    /// The step replaced the exact store by a larger one (the saved store is no longer written).
    store_replaced: bool,
    /// Per sequence, the saved store's ring positions at the start and their stored rows,
    /// once copied out.
    window: Vec<Option<(usize, Vec<Tensor>)>>,
    /// The step's decode appends checked on the device (CUDA), located on the host on error.
    pending: crate::cache::PendingChecks,
}

impl TurboCache {
    /// A cache for `kv_heads` heads of `head_dim` with `spec`, on `device`; `seed` fixes the
    /// rotations and sketches. Errors early on a spec that cannot quantize `head_dim`.
    pub fn new(
        spec: KvSpec,
        kv_heads: usize,
        head_dim: usize,
        device: &Device,
        seed: u64,
        max_tokens: Option<usize>,
    ) -> Result<Self> {
        // Validate now (bits, dims, rotation) with the fixed rule; calibration comes later.
        let mut record_bytes = 0;
        let mut coords = 0;
        for s in [spec.key, spec.value] {
            let q = VectorQuantizer::new(s.with_outliers(tqkv::OutlierRule::Fixed), head_dim, seed)
                .map_err(Error::from)?;
            record_bytes += q.record_bytes();
            let c: usize = q
                .layout()
                .groups
                .iter()
                .map(|g| if g.mse_bits > 0 { g.dim } else { 0 } + g.sketch_dim)
                .sum();
            coords = coords.max(c);
        }
        if spec.rotations == 0 {
            fail!(Unsupported, "a rotation cycle needs at least one rotation");
        }
        // A cycle is capped where the fused kernel would run out of room (the rotated query
        // rows of every rotation: 512 coordinates), on every device alike.
        let mut spec = spec;
        spec.rotations = spec
            .rotations
            .min((MAX_CYCLE_COORDS / coords.max(1)).max(1));
        if spec.exact_format == tqkv::ExactFormat::Q8 && head_dim % tqkv::ExactFormat::Q8_BLOCK != 0
        {
            fail!(
                Unsupported,
                "exact tokens in q8_0 (-wq8) need a head_dim that is a multiple of {}, not {head_dim}",
                tqkv::ExactFormat::Q8_BLOCK
            );
        }
        if let Some(b) = spec.budget_bits {
            if !(b.is_finite() && b > 0.0 && b <= 16.0) {
                fail!(
                    Unsupported,
                    "a window budget of {b} bits per channel is not in (0, 16]"
                );
            }
        }
        let kernel = tqkv::AttentionKernel::from_env().map_err(Error::from)?;
        Ok(TurboCache {
            state: SeqState::new(kv_heads, head_dim, max_tokens),
            spec,
            seed,
            device: device.clone(),
            kq: None,
            vq: None,
            k: None,
            v: None,
            capacity: 0,
            gpu: None,
            prefill: PrefillPath::default(),
            kernel,
            kmean: None,
            vmean: None,
            kscale: None,
            exact: None,
            record_bytes,
            step: None,
        })
    }

    /// Chooses how CUDA prefill chunks attend (no effect on the CPU, which always reads codes).
    pub fn set_prefill_path(&mut self, p: PrefillPath) {
        self.prefill = p;
    }

    /// Chooses the split kernel of CUDA attention (no effect on the CPU). The default is
    /// [`tqkv::AttentionKernel::Split`], or what `TQKV_ATTENTION_KERNEL` (`split`, `tc`) said
    /// when the cache was built. A layout the tensor-core kernel does not take (QJL stages,
    /// more than 4 bits, head_dim other than 64/96/128/256) falls back to the split kernel.
    pub fn set_attention_kernel(&mut self, k: tqkv::AttentionKernel) {
        self.kernel = k;
    }

    /// The split kernel chosen for CUDA attention ([`Self::set_attention_kernel`]).
    pub fn attention_kernel(&self) -> tqkv::AttentionKernel {
        self.kernel
    }

    /// On CUDA, reads the device status word that appends set on NaN/Inf keys or values
    /// (synchronizes); prefill appends check it themselves, single-token appends leave it to
    /// this call (attention over a cache holding such input returns NaN meanwhile).
    pub fn check_status(&self) -> Result<()> {
        match &self.gpu {
            Some(g) => Ok(g.check(&self.device)?),
            None => Ok(()),
        }
    }

    /// The per-head quantizers of keys and values (after the first append).
    pub fn quantizers(&self) -> Option<(&[VectorQuantizer], &[VectorQuantizer])> {
        Some((self.kq.as_deref()?, self.vq.as_deref()?))
    }

    /// The quantizers of each head calibrated on the first append's real tokens `from..`: the
    /// channel split, then the fitted codebooks when the spec asks for them.
    fn calibrate(
        &self,
        spec: QuantSpec,
        x: &Tensor,
        new: &[usize],
        from: usize,
        seed: u64,
    ) -> Result<Vec<VectorQuantizer>> {
        let qs = self.calibrate_channels(spec, x, new, from, seed)?;
        let qs = self.cycle_rotations(spec, qs, seed)?;
        if !self.spec.fit_codebooks {
            return Ok(qs);
        }
        let (b, h, t, d) = crate::cache::dims4("calibration", x)?;
        let host = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let groups = qs[0].num_groups();
        let mut samples = vec![Vec::new(); groups];
        // Quantizers [head · cycle + m]: every rotation of a head sees that head's vectors.
        let cycle = (qs.len() / h.max(1)).max(1);
        for (idx, q) in qs.iter().enumerate() {
            let head = idx / cycle;
            for (i, &n) in new.iter().enumerate().take(b) {
                for tok in from.min(n)..n {
                    let off = ((i * h + head) * t + tok) * d;
                    q.unit_coordinates(&host[off..off + d], &mut samples)
                        .map_err(Error::from)?;
                }
            }
        }
        let mut books = Vec::with_capacity(groups);
        for (g, smp) in samples.iter().enumerate() {
            books.push(match (qs[0].group_mse(g), smp.is_empty()) {
                (Some(m), false) => Some(Arc::new(
                    tqkv::Codebook::fitted(m.dim(), m.bits(), smp, 50).map_err(Error::from)?,
                )),
                _ => None,
            });
        }
        qs.into_iter()
            .map(|q| q.with_codebooks(&books).map_err(Error::from))
            .collect()
    }

    /// Each head's quantizer followed by `rotations − 1` more with the same channels and other
    /// rotations: `[head · rotations + m]`.
    fn cycle_rotations(
        &self,
        spec: QuantSpec,
        qs: Vec<VectorQuantizer>,
        seed: u64,
    ) -> Result<Vec<VectorQuantizer>> {
        let m = self.spec.rotations.max(1);
        if m == 1 {
            return Ok(qs);
        }
        let d = self.state.head_dim;
        let mut out = Vec::with_capacity(qs.len() * m);
        for q in qs {
            let hi = if q.num_groups() > 1 {
                q.group_channels(0).to_vec()
            } else {
                Vec::new()
            };
            for r in 1..m {
                let s = tqkv::rng::derive_seed(seed, 1000 + r as u64);
                let v = VectorQuantizer::with_channels(spec, d, &hi, s).map_err(Error::from)?;
                if r == 1 {
                    out.push(q.clone());
                }
                out.push(v);
            }
        }
        Ok(out)
    }

    /// Chooses each head's channels from the first append's real tokens.
    fn calibrate_channels(
        &self,
        spec: QuantSpec,
        x: &Tensor,
        new: &[usize],
        from: usize,
        seed: u64,
    ) -> Result<Vec<VectorQuantizer>> {
        let (b, h, t, d) = crate::cache::dims4("calibration", x)?;
        let k = spec.bits.hi_channels(d).map_err(Error::from)?;
        let mut out = Vec::with_capacity(h);
        if k == 0 || spec.outliers == tqkv::OutlierRule::Fixed {
            let q = VectorQuantizer::new(spec.with_outliers(tqkv::OutlierRule::Fixed), d, seed)
                .map_err(Error::from)?;
            out.resize(h, q);
            return Ok(out);
        }
        // Mean square per (head, channel) over real tokens: one reduction on the device.
        let mask = token_mask(b, t, new, from, x.device())?;
        let energy = x
            .to_dtype(DType::F32)?
            .sqr()?
            .broadcast_mul(&mask)?
            .sum(2)?
            .sum(0)?
            .to_vec2::<f32>()?;
        for row in energy {
            // One "sample" whose squares are the energies: the rule ranks channels by it.
            let sample: Vec<f32> = row.iter().map(|e| e.sqrt()).collect();
            out.push(VectorQuantizer::calibrate(spec, d, &sample, seed).map_err(Error::from)?);
        }
        Ok(out)
    }

    fn grow(&mut self, batch: usize, needed: usize, widths: (usize, usize)) -> Result<()> {
        self.capacity = crate::cache::grow_pair(
            &mut self.k,
            &mut self.v,
            self.capacity,
            needed,
            self.state.max_tokens,
            (batch, self.state.kv_heads),
            widths,
            DType::U8,
            &self.device,
        )?;
        Ok(())
    }

    /// Bytes of one exact token of one KV head: its key and value (f16 or q8_0).
    fn exact_bytes(&self) -> usize {
        2 * self.spec.exact_format.vector_bytes(self.state.head_dim)
    }

    /// Bytes of the per-layer tables the records need beside themselves (0 before the first
    /// append): the key and value means of centred specs and the key scales (f32), the high-precision channels of each split
    /// (a bit mask per head), and per channel group the rotation (a dense Π in f32, or the ±1
    /// signs of a Hadamard rotation as bits), the QJL sketch (f32) and fitted codebooks (f32
    /// centroids), held once per layer since the heads of a layer share them. The theoretical
    /// Lloyd–Max codebooks depend only on (dim, bits) and are not counted.
    pub fn table_bytes(&self) -> usize {
        let (Some(kq), Some(vq)) = (&self.kq, &self.vq) else {
            return 0;
        };
        let (h, d) = (self.state.kv_heads, self.state.head_dim);
        let means = usize::from(self.kmean.is_some())
            + usize::from(self.vmean.is_some())
            + usize::from(self.kscale.is_some());
        let mut bytes = means * 4 * h * d;
        let cycle = self.spec.rotations.max(1);
        for q in [&kq[0], &vq[0]] {
            if q.num_groups() > 1 {
                bytes += h * d.div_ceil(8);
            }
            for g in 0..q.num_groups() {
                let dim = q.group_channels(g).len();
                if let Some(m) = q.group_mse(g) {
                    bytes += cycle
                        * match m.rotation().kind() {
                            tqkv::RotationKind::Dense => 4 * dim * dim,
                            tqkv::RotationKind::Hadamard => dim.div_ceil(8),
                        };
                    if self.spec.fit_codebooks {
                        bytes += 4 << m.bits();
                    }
                }
                if let Some(s) = q.group_qjl(g) {
                    bytes += cycle * 4 * s.sketch_dim() * dim;
                }
            }
        }
        bytes
    }

    /// A `[1, kv_heads, 1, d]` table repeated for the query heads of each KV head:
    /// `[1, hq, 1, d]`.
    fn per_query_head(&self, x: &Tensor, hq: usize) -> candle_core::Result<Tensor> {
        let (h, d) = (self.state.kv_heads, self.state.head_dim);
        x.reshape((1, h, 1, d))?
            .broadcast_as((1, h, hq / h, d))?
            .reshape((1, hq, 1, d))
    }

    /// `out` `[b, hq, t, d]` f32 plus the value mean of each query head's KV head on the rows
    /// that see something (padding rows stay zeros).
    fn add_value_mean(&self, out: Tensor, mean: &Tensor, hq: usize) -> candle_core::Result<Tensor> {
        let (b, _, t, _) = out.dims4()?;
        // In the output's dtype (f32 from the CPU op, the queries' dtype from the CUDA op).
        let per_q = self.per_query_head(mean, hq)?.to_dtype(out.dtype())?;
        let rows: Vec<f32> = (0..b)
            .flat_map(|i| (0..t).map(move |r| (i, r)))
            .map(|(i, r)| f32::from(self.state.visible(i, r) > 0))
            .collect();
        let rows = Tensor::from_vec(rows, (b, 1, t, 1), out.device())?.to_dtype(out.dtype())?;
        out.broadcast_add(&per_q.broadcast_mul(&rows)?)
    }

    /// The first position a query that sees `n` positions reads from a record (the start of its
    /// window; `n` without a window).
    fn packed_end(&self, n: usize) -> usize {
        if !self.spec.has_window() {
            return n;
        }
        let per_head = self.table_bytes() / self.state.kv_heads.max(1);
        self.spec.packed_end(
            n,
            self.record_bytes,
            self.exact_bytes(),
            per_head,
            self.state.head_dim,
        )
    }

    /// Positions of a sequence of `n` tokens that have records: `min(sinks, n)..packed_end(n)`.
    fn records(&self, n: usize) -> std::ops::Range<usize> {
        self.spec.sinks.min(n)..self.packed_end(n)
    }
}

impl KvCache for TurboCache {
    fn append(&mut self, k: &Tensor, v: &Tensor, lens: Option<&[usize]>) -> Result<()> {
        let (b, t, new) = self.state.plan(k, v, lens)?;
        if !k.device().same_device(&self.device) {
            fail!(
                Device,
                "keys are on {:?}, the cache on {:?}",
                k.device().location(),
                self.device.location()
            );
        }
        // Bad values are an error of this append, on every device: checked here (the CPU; a
        // prefill chunk on CUDA: one reduction), or, for a CUDA decode token inside a step, on
        // the device — the quantize-append kernel and the exact-token check set the status
        // word, which `check_step` reads once per step (no host round trip per token and layer).
        let deferred = t == 1 && self.device.is_cuda() && self.gpu.is_some() && self.step.is_some();
        if deferred {
            if let (true, Some(g)) = (self.spec.has_exact(), &self.gpu) {
                crate::cuda_ops::check_finite(k, g)?;
                crate::cuda_ops::check_finite(v, g)?;
            }
        } else {
            self.state.check_values("keys", k, &new)?;
            self.state.check_values("values", v, &new)?;
        }
        // Calibration of a fresh cache, committed only once the append succeeds.
        let fresh = self.kq.is_none();
        let from = calibration_start(self.spec.sinks, &new);
        let kmean = if fresh && self.spec.center_keys {
            Some(channel_mean(k, &new, from)?)
        } else {
            self.kmean.clone()
        };
        let vmean = if fresh && self.spec.center_values {
            Some(channel_mean(v, &new, from)?)
        } else {
            self.vmean.clone()
        };
        let (centred_k, centred_v);
        let k = match &kmean {
            Some(m) => {
                centred_k = k.to_dtype(DType::F32)?.broadcast_sub(m)?;
                &centred_k
            }
            None => k,
        };
        let v = match &vmean {
            Some(m) => {
                centred_v = v.to_dtype(DType::F32)?.broadcast_sub(m)?;
                &centred_v
            }
            None => v,
        };
        let kscale = match (fresh, self.spec.key_scale) {
            (true, Some(alpha)) => Some(channel_scales(k, &new, from, alpha)?),
            _ => self.kscale.clone(),
        };
        let scaled_k;
        let k = match &kscale {
            Some(sc) => {
                scaled_k = k.to_dtype(DType::F32)?.broadcast_div(sc)?;
                &scaled_k
            }
            None => k,
        };
        let (kq, vq, gpu) = if fresh {
            let ks = tqkv::rng::derive_seed(self.seed, 1);
            let vs = tqkv::rng::derive_seed(self.seed, 2);
            let kq = Arc::new(self.calibrate(self.spec.key, k, &new, from, ks)?);
            let vq = Arc::new(self.calibrate(self.spec.value, v, &new, from, vs)?);
            if self.device.is_cuda() && self.spec.rotations > 4 {
                fail!(
                    Unsupported,
                    "the CUDA kernels cycle at most 4 rotations, not {} (-r{})",
                    self.spec.rotations,
                    self.spec.rotations
                );
            }
            let gpu = if self.device.is_cuda() {
                Some(Arc::new(GpuTables::new(
                    &kq,
                    &vq,
                    self.spec.rotations,
                    &self.device,
                )?))
            } else {
                None
            };
            (kq, vq, gpu)
        } else {
            (
                self.kq.clone().unwrap(),
                self.vq.clone().unwrap(),
                self.gpu.clone(),
            )
        };
        if fresh {
            // The window size depends on the tables (and so on the calibration).
            self.kq = Some(kq.clone());
            self.vq = Some(vq.clone());
            self.kmean = kmean.clone();
            self.vmean = vmean.clone();
            self.kscale = kscale.clone();
        }
        let result = self.append_calibrated(k, v, b, t, &new, (&kq, &vq, &gpu));
        if fresh {
            match &result {
                Ok(()) => self.gpu = gpu,
                Err(_) => {
                    self.kq = None;
                    self.vq = None;
                    self.kmean = None;
                    self.vmean = None;
                    self.kscale = None;
                }
            }
        }
        result?;
        if deferred {
            let before = self.state.clone();
            if let Some(st) = self.step.as_mut() {
                st.pending.push(k, v, &new, before);
            }
        }
        self.state.commit(b, t, new);
        Ok(())
    }

    fn attend(&self, q: &Tensor, scale: f64) -> Result<Tensor> {
        let (b, _, t, _) = self.state.check_queries(q)?;
        let (Some(kq), Some(vq), Some(kc), Some(vc)) = (&self.kq, &self.vq, &self.k, &self.v)
        else {
            return Err(Error::Empty);
        };
        crate::cache::check_cpu_queries(q)?;
        if self.gpu.is_some()
            && t > 1
            && self.prefill == PrefillPath::Dequantize
            && !self.spec.has_exact()
        {
            let n = self.state.lens.iter().copied().max().unwrap_or(0).max(1);
            let dtype = q.dtype();
            let deq = |cache: &Tensor, qz: &Arc<Vec<VectorQuantizer>>, values: bool| {
                cache.apply_op1_no_bwd(&TqDequantize {
                    quantizers: qz.clone(),
                    heads: self.state.kv_heads,
                    values,
                    batch: b,
                    capacity: self.capacity,
                    n,
                    dtype,
                    gpu: self.gpu.clone(),
                })
            };
            let k = deq(self.k.as_ref().ok_or(Error::Empty)?, kq, false)?;
            let v = deq(self.v.as_ref().ok_or(Error::Empty)?, vq, true)?;
            return crate::full::dense_attention(&self.state, &k, &v, q, scale, dtype);
        }
        let exact = self.exact.as_ref().map(|store| ExactAttend {
            store: store.clone(),
            packed_end: (0..b)
                .flat_map(|i| {
                    (0..t).map(move |r| {
                        let vis = self.state.visible(i, r);
                        self.packed_end(vis)
                    })
                })
                .collect(),
        });
        let op = TqAttend {
            state: self.state.clone(),
            kq: kq.clone(),
            vq: vq.clone(),
            capacity: self.capacity,
            scale: scale as f32,
            gpu: self.gpu.clone(),
            exact,
            kernel: self.kernel,
        };
        let dtype = q.dtype();
        let q = match &self.kscale {
            Some(sc) => self
                .per_query_head(sc, q.dim(1)?)?
                .broadcast_mul(&q.to_dtype(DType::F32)?)?,
            None => q.clone(),
        };
        let q = q.contiguous()?;
        let out = q.apply_op3_no_bwd(kc, vc, &op)?;
        let out = match &self.vmean {
            Some(m) => self.add_value_mean(out, m, q.dim(1)?)?,
            None => out,
        };
        Ok(out.to_dtype(dtype)?)
    }

    fn seq_lens(&self) -> &[usize] {
        &self.state.lens
    }

    fn begin_step(&mut self) -> Result<()> {
        if self.step.is_some() {
            fail!(Protocol, "begin_step: a step is open already");
        }
        self.step = Some(Saved {
            state: self.state.clone(),
            calibrated: self.kq.is_some(),
            k: self.k.clone(),
            v: self.v.clone(),
            capacity: self.capacity,
            exact: self.exact.clone(),
            store_replaced: false,
            window: Vec::new(),
            pending: Default::default(),
        });
        Ok(())
    }

    fn poll_step(&self) -> Result<()> {
        if let (Some(st), Some(g)) = (&self.step, &self.gpu) {
            if !st.pending.is_empty() {
                g.request(&self.device)?;
            }
        }
        Ok(())
    }

    fn check_step(&self) -> Result<()> {
        let (Some(st), Some(g)) = (&self.step, &self.gpu) else {
            return Ok(());
        };
        if st.pending.is_empty() {
            return Ok(());
        }
        // A bad status names the value: the step's decode inputs are still held.
        st.pending.check(g.collect(&self.device))
    }

    fn commit_step(&mut self) {
        self.step = None;
    }

    fn rollback_step(&mut self) -> Result<()> {
        let Some(st) = self.step.take() else {
            return Ok(());
        };
        self.state = st.state;
        self.k = st.k;
        self.v = st.v;
        self.capacity = st.capacity;
        self.exact = st.exact;
        if !st.calibrated {
            self.kq = None;
            self.vq = None;
            self.kmean = None;
            self.vmean = None;
            self.kscale = None;
            self.gpu = None;
        }
        let restore = || -> Result<()> {
            if let Some(store) = &self.exact {
                for (i, w) in st.window.iter().enumerate() {
                    if let Some((p0, raw)) = w {
                        store.write_raw(i, *p0, raw)?;
                    }
                }
            }
            if let Some(g) = &self.gpu {
                g.clear(&self.device)?;
            }
            Ok(())
        };
        if let Err(e) = restore() {
            self.reset();
            return Err(e);
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.state.reset();
        self.step = None;
        self.k = None;
        self.v = None;
        self.capacity = 0;
        self.exact = None;
        if let Some(g) = &self.gpu {
            // Best effort: a failing device shows up again at the next append.
            let _ = g.clear(&self.device);
        }
    }

    fn memory(&self) -> MemoryUsage {
        let h = self.state.kv_heads;
        let (rb, eb) = (self.record_bytes, self.exact_bytes());
        let (mut records, mut exact) = (0, 0);
        for &n in &self.state.lens {
            let r = self.records(n);
            records += r.len();
            exact += n - r.len();
        }
        let slots = self.exact.as_ref().map_or(0, |e| e.sinks + e.ring);
        MemoryUsage {
            logical: h * (records * rb + exact * eb),
            allocated: self.state.lens.len() * h * (self.capacity * rb + slots * eb),
            tables: self.table_bytes(),
        }
    }

    fn kind_name(&self) -> String {
        let (k, v) = (self.spec.key, self.spec.value);
        let mut s = format!("tq{}", k.bits);
        if v.bits != k.bits {
            s = format!("tqk{}v{}", k.bits, v.bits);
        }
        if let tqkv::Mode::Prod { .. } = k.mode {
            s.push_str("-qjl");
        }
        if k.rotation == tqkv::RotationKind::Hadamard {
            s.push_str("-had");
        }
        if self.spec.center_keys {
            s.push_str("-c");
        }
        if self.spec.center_values {
            s.push_str("-cv");
        }
        if let Some(a) = self.spec.key_scale {
            s.push_str(&format!("-ks{a}"));
        }
        if self.spec.fit_codebooks {
            s.push_str("-fc");
        }
        if self.spec.rotations > 1 {
            s.push_str(&format!("-r{}", self.spec.rotations));
        }
        if k.norm_rule == tqkv::NormRule::Projected {
            s.push_str("-pn");
        }
        match (
            k.norm == tqkv::NormFormat::Log8,
            v.norm == tqkv::NormFormat::Log8,
        ) {
            (true, true) => s.push_str("-n8"),
            (true, false) => s.push_str("-n8k"),
            (false, true) => s.push_str("-n8v"),
            (false, false) => {}
        }
        if self.spec.sinks > 0 {
            s.push_str(&format!("-s{}", self.spec.sinks));
        }
        if self.spec.window > 0 {
            s.push_str(&format!("-w{}", self.spec.window));
        }
        if let Some(b) = self.spec.budget_bits {
            s.push_str(&format!("-b{b}"));
        }
        if self.spec.exact_format == tqkv::ExactFormat::Q8 {
            s.push_str("-wq8");
        }
        s
    }
}

impl TurboCache {
    /// The append once the quantizers exist: records for the positions that leave the window
    /// (from the ring) or never enter it (from `k`, `v`), then the exact copies. Changes nothing
    /// visible on error (a grown capacity aside).
    fn append_calibrated(
        &mut self,
        k: &Tensor,
        v: &Tensor,
        b: usize,
        t: usize,
        new: &[usize],
        (kq, vq, gpu): Calibration<'_>,
    ) -> Result<()> {
        let (h, d) = (self.state.kv_heads, self.state.head_dim);
        let sinks = self.spec.sinks;
        let have: Vec<usize> = (0..b)
            .map(|i| self.state.lens.get(i).copied().unwrap_or(0))
            .collect();
        let total: Vec<usize> = have.iter().zip(new).map(|(h, n)| h + n).collect();
        let needed = total.iter().copied().max().unwrap_or(0);
        // Records to write per sequence: from where the old records end to where the new end.
        let rec: Vec<std::ops::Range<usize>> = have
            .iter()
            .zip(&total)
            .map(|(&hv, &n)| {
                let (old, now) = (self.records(hv), self.records(n));
                old.end.max(now.start)..now.end
            })
            .collect();
        // The ring must hold every position from the oldest not yet quantized on.
        let mut replaced = false;
        let store = if self.spec.has_exact() {
            let ring_from = |i: usize| sinks.max(self.records(have[i]).end);
            let need = if self.spec.has_window() {
                (0..b)
                    .map(|i| total[i].saturating_sub(ring_from(i)))
                    .max()
                    .unwrap_or(0)
            } else {
                0
            };
            Some(match &self.exact {
                Some(e) if e.ring >= need => e.clone(),
                old => {
                    replaced = true;
                    let ring = if need == 0 {
                        0
                    } else {
                        need.max(2 * old.as_ref().map_or(0, |e| e.ring))
                    };
                    let keep: Vec<_> = (0..b).map(|i| ring_from(i)..have[i]).collect();
                    ExactStore::with_ring(
                        old.as_ref(),
                        (b, h, d),
                        self.spec.exact_format,
                        sinks,
                        ring,
                        &keep,
                        &self.device,
                    )?
                }
            })
        } else {
            None
        };
        if let (true, Some(st)) = (replaced, self.step.as_mut()) {
            // Writes now go to the new store; the saved one stays as it is.
            st.store_replaced = true;
        }
        // The source rows of the records, `[b, h, rows, d]`, sequence i's from rec[i].start on:
        // without exact tokens the append itself; else the rows as the store holds them (f16 or
        // q8_0, the same whether they come from the ring or the append, so chunking changes
        // nothing).
        let (ks, vs, start, count) = match &store {
            None => (k.contiguous()?, v.contiguous()?, have.clone(), new.to_vec()),
            Some(st) => {
                let rows = rec.iter().map(|r| r.len()).max().unwrap_or(0);
                let (mut kp, mut vp) = (Vec::new(), Vec::new());
                for i in 0..b {
                    let r = &rec[i];
                    let mut kparts = Vec::new();
                    let mut vparts = Vec::new();
                    let from_ring = r.start..r.end.min(have[i]);
                    if !from_ring.is_empty() {
                        let (rk, rv) = st.read(i, from_ring)?;
                        kparts.push(rk);
                        vparts.push(rv);
                    }
                    let lo = r.start.max(have[i]);
                    if lo < r.end {
                        // Rounded as the store would have held them.
                        for (x, parts) in [(k, &mut kparts), (v, &mut vparts)] {
                            parts.push(st.round(&x.narrow(0, i, 1)?.narrow(
                                2,
                                lo - have[i],
                                r.end - lo,
                            )?)?);
                        }
                    }
                    if r.len() < rows {
                        let pad =
                            Tensor::zeros((1, h, rows - r.len(), d), DType::F16, &self.device)?;
                        kparts.push(pad.clone());
                        vparts.push(pad);
                    }
                    if rows > 0 {
                        kp.push(Tensor::cat(&kparts, 2)?);
                        vp.push(Tensor::cat(&vparts, 2)?);
                    }
                }
                if rows == 0 {
                    (k.contiguous()?, v.contiguous()?, vec![0; b], vec![0; b])
                } else {
                    (
                        Tensor::cat(&kp, 0)?.contiguous()?,
                        Tensor::cat(&vp, 0)?.contiguous()?,
                        rec.iter().map(|r| r.start).collect(),
                        rec.iter().map(|r| r.len()).collect(),
                    )
                }
            }
        };
        self.grow(b, needed, (kq[0].record_bytes(), vq[0].record_bytes()))?;
        if count.iter().any(|&c| c > 0) {
            for (cache, x, q, what) in [
                (self.k.as_ref().unwrap(), &ks, kq, "keys"),
                (self.v.as_ref().unwrap(), &vs, vq, "values"),
            ] {
                cache.inplace_op2(
                    x,
                    &TqAppend {
                        quantizers: q.clone(),
                        start: start.clone(),
                        new: count.clone(),
                        capacity: self.capacity,
                        what,
                        gpu: gpu.clone(),
                    },
                )?;
            }
        }
        if t > 1 {
            if let Some(g) = gpu {
                // A prefill chunk: one status read is cheap next to the chunk. The bad token's
                // records were not written and nothing is committed, so the cache is intact.
                if let Err(e) = g.check(&self.device) {
                    g.clear(&self.device)?;
                    return Err(e.into());
                }
            }
        }
        if let Some(st) = &store {
            self.save_window(st, &have, &total)?;
            // The append's sinks and ring positions, into the store.
            for i in 0..b {
                let (hv, n) = (have[i], total[i]);
                let sink_end = sinks.min(n);
                let spans = [
                    hv.min(sink_end)..sink_end,
                    if st.ring > 0 { hv.max(sinks)..n } else { n..n },
                ];
                for r in spans {
                    if r.is_empty() {
                        continue;
                    }
                    let sl = |x: &Tensor| x.narrow(0, i, 1)?.narrow(2, r.start - hv, r.len());
                    st.write(i, r.start, &sl(k)?, &sl(v)?)?;
                }
            }
        }
        self.exact = store;
        Ok(())
    }

    /// Before the ring positions `have[i]..total[i]` are written into `store`: copies out the
    /// positions of the open step's saved window that the writes would overwrite (writing
    /// position p overwrites p − ring), once per sequence, so that a rollback can put them back.
    /// Nothing to do in a decode step (the ring always holds the window plus the new token) or
    /// once the step has replaced the store.
    fn save_window(&mut self, store: &ExactStore, have: &[usize], total: &[usize]) -> Result<()> {
        let Some(st) = &self.step else {
            return Ok(());
        };
        if st.store_replaced || store.ring == 0 {
            return Ok(());
        }
        let (sinks, r) = (self.spec.sinks, store.ring);
        let mut saves = Vec::new();
        for i in 0..have.len() {
            if st.window.get(i).is_some_and(|w| w.is_some()) {
                continue;
            }
            let l = st.state.lens.get(i).copied().unwrap_or(0);
            let a = sinks.max(self.records(l).end);
            let (s0, n) = (have[i].max(sinks), total[i]);
            let lo = s0.saturating_sub(r).max(a);
            let hi = n.saturating_sub(r).min(l);
            if a < l && s0 < n && lo < hi {
                saves.push((i, a..l));
            }
        }
        let mut copied = Vec::with_capacity(saves.len());
        for (i, range) in saves {
            let raw = store
                .read_raw(i, range.clone())?
                .into_iter()
                .map(|t| t.copy())
                .collect::<candle_core::Result<Vec<_>>>()?;
            copied.push((i, range.start, raw));
        }
        if let Some(st) = self.step.as_mut() {
            for (i, p0, raw) in copied {
                if st.window.len() <= i {
                    st.window.resize(i + 1, None);
                }
                st.window[i] = Some((p0, raw));
            }
        }
        Ok(())
    }
}
