//! The TurboQuant KV cache (TurboQuant §3–4, QJL §3 for prod keys): keys and values stored as
//! packed records of docs/FORMAT.md in u8 tensors on the cache's device, written by
//! [`crate::ops::TqAppend`] and read by [`crate::ops::TqAttend`] straight from the codes.
//!
//! Each layer gets its own seed (rotations and sketches are shared by the layer's KV heads).
//! For a fractional-bit split, each KV head's high-precision channels are chosen once, from the
//! first append (the first prefill chunk), by the spec's outlier rule (largest mean square over
//! that chunk's real tokens of all sequences), then fixed until the cache is rebuilt; `reset`
//! keeps them.
//!
//! Storage is paged (`tqkv::paged`): records and exact rows live in the tiles of an arena
//! ([`TileArena`]) — the cache's own, which grows, or one shared with other caches
//! ([`TurboCache::new_in`]: every layer of every sequence a server runs) — and each sequence
//! reaches them through its tables. A tile is allocated when a position first needs it and
//! released when the sequence no longer does: exact tiles once every position in them has left
//! the window (the tile of the sinks stays), every tile at `reset` and drop. A step's
//! allocations and releases are undone by its rollback without copying a byte: positions are
//! only ever written past what the step started with, and released tiles are held until the
//! step commits. [`TurboCache::fork`] shares a sequence's tiles (reference-counted) with a new
//! cache; a tile is copied before a holder writes into it while others hold it too.
//!
//! On CUDA the layer's tables are uploaded once (at calibration) and every op runs on the GPU:
//! attention by the fused kernel straight from the codes, for decode and, by default, for prefill
//! chunks too (the alternative, [`PrefillPath::Dequantize`], feeds candle's matmuls;
//! docs/KERNELS.md has the numbers).

use crate::arena::TileArena;
use crate::cache::{KvCache, MemoryUsage, SeqState};
use crate::cuda_ops::GpuTables;
use crate::error::{fail, Error, Result};
use crate::exact::ExactPart;
use crate::ops::{ExactAttend, TqAppend, TqAttend, TqDequantize};
use crate::tile_tables::{copied, need_tiles, provide, taken_since, Need};
use candle_core::{DType, Device, Tensor};
use std::ops::Range;
use std::sync::Arc;
use tqkv::paged::{ExactTiles, RecordTiles, TileRows, NO_TILE};
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
    /// Bytes of a key record + a value record.
    record_bytes: usize,
    /// Where records and exact rows live.
    arena: Arc<TileArena>,
    /// How the records fill a tile.
    rec: RecordTiles,
    /// Sinks and the window in f16 or q8_0 ([`crate::exact`]), for specs that keep exact tokens.
    exact: Option<ExactPart>,
    /// Each sequence's tables (empty until the first append fixes the batch).
    seqs: Vec<SeqTables>,
    /// Exact rows kept for truncating by up to this many tokens
    /// ([`KvCache::set_truncation_margin`]).
    margin: usize,
    /// The open step: what [`KvCache::rollback_step`] restores.
    step: Option<Saved>,
}

/// One sequence's tables: the tile of each `slots`-position run of records, and of each
/// `rows`-position run of exact rows ([`NO_TILE`] where none is held).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct SeqTables {
    rec: Vec<u32>,
    exact: Vec<u32>,
}

impl SeqTables {
    /// The tiles held.
    fn held(&self) -> impl Iterator<Item = u32> + '_ {
        self.rec
            .iter()
            .chain(&self.exact)
            .copied()
            .filter(|&t| t != NO_TILE)
    }
}

/// A TurboQuant cache's state at the start of a step: its lengths, calibration and tables.
/// Nothing in a tile is saved — positions are written only past the lengths held, and a
/// released tile stays held (in `retired`) until the step commits.
struct Saved {
    state: SeqState,
    /// Whether the cache was calibrated (quantizers, means, GPU tables) at the start.
    calibrated: bool,
    seqs: Vec<SeqTables>,
    /// Tiles taken out of the tables during the step: released at commit; at rollback those
    /// of the saved tables go back with them, the others are released.
    retired: Vec<u32>,
    /// The step's decode appends checked on the device (CUDA), located on the host on error.
    pending: crate::cache::PendingChecks,
}

/// Record positions per tile of a cache's own arena.
const OWN_TILE_SLOTS: usize = 64;

impl TurboCache {
    /// A cache for `kv_heads` heads of `head_dim` with `spec`, on `device`; `seed` fixes the
    /// rotations and sketches. Its tiles are its own (an arena that grows, tiles of 64 record
    /// positions). Errors early on a spec that cannot quantize `head_dim`.
    pub fn new(
        spec: KvSpec,
        kv_heads: usize,
        head_dim: usize,
        device: &Device,
        seed: u64,
        max_tokens: Option<usize>,
    ) -> Result<Self> {
        let (kb, vb) = Self::record_sizes(&spec, head_dim, seed)?;
        let tile = RecordTiles::tile_bytes_for(OWN_TILE_SLOTS, kv_heads.max(1), kb, vb);
        let arena = TileArena::growing(device, tile)?;
        Self::new_in(spec, kv_heads, head_dim, &arena, seed, max_tokens)
    }

    /// A cache like [`Self::new`] whose records and exact rows live in `arena` (on the
    /// arena's device), shared with the other caches built in it. Errors when a tile of the
    /// arena holds no position of this cache's records or exact rows.
    pub fn new_in(
        spec: KvSpec,
        kv_heads: usize,
        head_dim: usize,
        arena: &Arc<TileArena>,
        seed: u64,
        max_tokens: Option<usize>,
    ) -> Result<Self> {
        // Validate now (bits, dims, rotation) with the fixed rule; calibration comes later.
        let (kb, vb) = Self::record_sizes(&spec, head_dim, seed)?;
        let record_bytes = kb + vb;
        let mut coords = 0;
        for s in [spec.key, spec.value] {
            let q = VectorQuantizer::new(s.with_outliers(tqkv::OutlierRule::Fixed), head_dim, seed)
                .map_err(Error::from)?;
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
        if kv_heads == 0 {
            fail!(Kind, "a KV cache needs kv_heads ≥ 1");
        }
        let tb = arena.tile_bytes();
        let rec = RecordTiles::new(tb, kv_heads, kb, vb)?;
        let exact = if spec.has_exact() {
            Some(ExactPart {
                tiles: ExactTiles::new(tb, kv_heads, head_dim, spec.exact_format)?,
            })
        } else {
            None
        };
        let kernel = tqkv::AttentionKernel::from_env().map_err(Error::from)?;
        Ok(TurboCache {
            state: SeqState::new(kv_heads, head_dim, max_tokens),
            spec,
            seed,
            device: arena.device().clone(),
            kq: None,
            vq: None,
            gpu: None,
            prefill: PrefillPath::default(),
            kernel,
            kmean: None,
            vmean: None,
            kscale: None,
            record_bytes,
            arena: arena.clone(),
            rec,
            exact,
            seqs: Vec::new(),
            margin: 0,
            step: None,
        })
    }

    /// Bytes of a key record and of a value record of `spec` at `head_dim` (checks the spec).
    fn record_sizes(spec: &KvSpec, head_dim: usize, seed: u64) -> Result<(usize, usize)> {
        let size = |s: QuantSpec| -> Result<usize> {
            Ok(
                VectorQuantizer::new(s.with_outliers(tqkv::OutlierRule::Fixed), head_dim, seed)
                    .map_err(Error::from)?
                    .record_bytes(),
            )
        };
        Ok((size(spec.key)?, size(spec.value)?))
    }

    /// The arena the cache's tiles live in.
    pub fn arena(&self) -> &Arc<TileArena> {
        &self.arena
    }

    /// Record positions per tile.
    pub fn record_tile_slots(&self) -> usize {
        self.rec.slots
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
        let (Some(kq), Some(vq)) = (&self.kq, &self.vq) else {
            return Err(Error::Empty);
        };
        let arena = self.arena.tensor()?;
        crate::cache::check_cpu_queries(q)?;
        let rec_tables: Vec<Vec<u32>> = self.seqs.iter().map(|s| s.rec.clone()).collect();
        if self.gpu.is_some()
            && t > 1
            && self.prefill == PrefillPath::Dequantize
            && !self.spec.has_exact()
        {
            let n = self.state.lens.iter().copied().max().unwrap_or(0).max(1);
            let dtype = q.dtype();
            let deq = |rows: TileRows, qz: &Arc<Vec<VectorQuantizer>>, values: bool| {
                arena.apply_op1_no_bwd(&TqDequantize {
                    quantizers: qz.clone(),
                    values,
                    rows,
                    tables: rec_tables.clone(),
                    n,
                    dtype,
                    gpu: self.gpu.clone(),
                })
            };
            let k = deq(self.rec.keys(), kq, false)?;
            let v = deq(self.rec.values(), vq, true)?;
            return crate::full::dense_attention(&self.state, &k, &v, q, scale, dtype);
        }
        let exact = self.exact.as_ref().map(|part| ExactAttend {
            tiles: part.tiles,
            tables: self.seqs.iter().map(|s| s.exact.clone()).collect(),
            sinks: self.spec.sinks,
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
            records: self.rec,
            tables: rec_tables,
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
        let out = q.apply_op2_no_bwd(&arena, &op)?;
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
            seqs: self.seqs.clone(),
            retired: Vec::new(),
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
        if let Some(st) = self.step.take() {
            self.arena.release(&st.retired);
        }
        // What no later query reads exactly can go now.
        for i in 0..self.seqs.len() {
            let n = self.state.lens.get(i).copied().unwrap_or(0);
            let gone = self.retire_exact(i, n);
            self.arena.release(&gone);
        }
    }

    fn rollback_step(&mut self) -> Result<()> {
        let Some(st) = self.step.take() else {
            return Ok(());
        };
        // Tiles the step took (in the tables now or retired since) that the saved tables do
        // not hold go back to the arena; the saved tables' tiles were never released.
        let taken = taken_since(
            st.seqs.iter().flat_map(|s| s.held()),
            self.seqs.iter().flat_map(|s| s.held()),
            &st.retired,
        );
        self.arena.release(&taken);
        self.state = st.state;
        self.seqs = st.seqs;
        if !st.calibrated {
            self.kq = None;
            self.vq = None;
            self.kmean = None;
            self.vmean = None;
            self.kscale = None;
            self.gpu = None;
        }
        if let Some(g) = &self.gpu {
            if let Err(e) = g.clear(&self.device) {
                self.reset();
                return Err(e.into());
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.release_all();
        self.state.reset();
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
        let allocated = if self.arena.is_growing() {
            self.arena.bytes()
        } else {
            self.tiles_held() * self.arena.tile_bytes()
        };
        MemoryUsage {
            logical: h * (records * rb + exact * eb),
            allocated,
            tables: self.table_bytes(),
        }
    }

    fn tiles_held(&self) -> usize {
        self.seqs.iter().map(|s| s.held().count()).sum()
    }

    fn tile_ids(&self) -> Vec<u32> {
        self.seqs.iter().flat_map(|s| s.held()).collect()
    }

    fn tiles_for(&self, have: usize, total: usize) -> Option<(usize, usize)> {
        self.kq.as_ref()?;
        Some(self.tile_counts(have, total))
    }

    fn truncate(&mut self, seq: usize, len: usize) -> Result<()> {
        self.truncate_seq(seq, len)
    }

    fn set_truncation_margin(&mut self, tokens: usize) {
        self.margin = tokens;
    }

    fn fork(&self, seq: usize) -> Result<Box<dyn KvCache>> {
        Ok(Box::new(self.fork_seq(seq)?))
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
        for (rule, tag) in [
            (tqkv::NormRule::Projected, "pn"),
            (tqkv::NormRule::LeastSquares, "ls"),
        ] {
            match (k.norm_rule == rule, v.norm_rule == rule) {
                (true, true) => s.push_str(&format!("-{tag}")),
                (true, false) => s.push_str(&format!("-{tag}k")),
                (false, true) => s.push_str(&format!("-{tag}v")),
                (false, false) => {}
            }
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

/// Sizes of the union of index ranges.
fn union_len(mut rs: Vec<Range<usize>>) -> usize {
    rs.retain(|r| !r.is_empty());
    rs.sort_by_key(|r| r.start);
    let (mut n, mut end) = (0, 0);
    for r in rs {
        let lo = r.start.max(end);
        if r.end > lo {
            n += r.end - lo;
        }
        end = end.max(r.end);
    }
    n
}

impl TurboCache {
    /// The append once the quantizers exist: records for the positions that leave the window
    /// (from the exact rows held, or from `k`, `v`), then the exact rows. Works on a copy of the
    /// tables and allocates every tile it needs first: on error the tiles it took are released
    /// and nothing visible changed.
    fn append_calibrated(
        &mut self,
        k: &Tensor,
        v: &Tensor,
        b: usize,
        _t: usize,
        new: &[usize],
        (kq, vq, gpu): Calibration<'_>,
    ) -> Result<()> {
        let sinks = self.spec.sinks;
        let have: Vec<usize> = (0..b)
            .map(|i| self.state.lens.get(i).copied().unwrap_or(0))
            .collect();
        let total: Vec<usize> = have.iter().zip(new).map(|(h, n)| h + n).collect();
        // Records to write per sequence: from where the old records end to where the new end.
        let rec: Vec<Range<usize>> = have
            .iter()
            .zip(&total)
            .map(|(&hv, &n)| {
                let (old, now) = (self.records(hv), self.records(n));
                old.end.max(now.start)..now.end
            })
            .collect();
        // Exact positions written: the sinks the append brings and, with a window, every
        // position after the sinks (each is in its own query's window).
        let spans: Vec<[Range<usize>; 2]> = (0..b)
            .map(|i| {
                let (hv, n) = (have[i], total[i]);
                let sink_end = sinks.min(n);
                [
                    hv.min(sink_end)..sink_end,
                    if self.spec.has_window() {
                        hv.max(sinks)..n
                    } else {
                        n..n
                    },
                ]
            })
            .collect();
        // The tables this append leaves, built aside; references dropped on success.
        let mut seqs = self.seqs.clone();
        seqs.resize(b, SeqTables::default());
        let mut drops = Vec::new();
        // Exact tiles no query of this append reads (wholly before the records' end).
        for (i, st) in seqs.iter_mut().enumerate() {
            drops.extend(self.retire_in(st, have[i]));
        }
        let mut wants = Vec::new();
        for (i, st) in seqs.iter_mut().enumerate() {
            let tiles = self.rec.keys().tiles_covering(rec[i].clone());
            need_tiles(&self.arena, &mut st.rec, tiles, (i, 0), &mut wants);
            if let Some(ex) = &self.exact {
                for r in &spans[i] {
                    let tiles = ex.tiles.rows().tiles_covering(r.clone());
                    need_tiles(&self.arena, &mut st.exact, tiles, (i, 1), &mut wants);
                }
            }
        }
        let fresh = provide(&self.arena, &wants)?;
        for (&(i, part, j, _), &t) in wants.iter().zip(&fresh) {
            let st = &mut seqs[i];
            (if part == 1 {
                &mut st.exact
            } else {
                &mut st.rec
            })[j] = t;
        }
        let result = (|| -> Result<()> {
            let data = self.arena.tensor()?;
            self.write_records(&data, &seqs, k, v, &have, &rec, (kq, vq, gpu))?;
            if let Some(ex) = &self.exact {
                // The append's sinks and window positions, into the exact rows.
                for (i, sp) in spans.iter().enumerate() {
                    for r in sp.iter().filter(|r| !r.is_empty()) {
                        let sl =
                            |x: &Tensor| x.narrow(0, i, 1)?.narrow(2, r.start - have[i], r.len());
                        ex.write(&data, &seqs[i].exact, r.start, &sl(k)?, &sl(v)?)?;
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            self.arena.release(&fresh);
            return Err(e);
        }
        drops.extend(copied(&wants));
        self.seqs = seqs;
        for t in drops {
            self.drop_ref(t);
        }
        Ok(())
    }

    /// Quantizes the records `rec[i]` of each sequence into the tiles of `seqs`: from the
    /// exact rows held for positions before `have[i]`, else from the append (rounded as the
    /// exact rows would hold them, so that chunking changes nothing).
    #[allow(clippy::too_many_arguments)]
    fn write_records(
        &self,
        data: &Tensor,
        seqs: &[SeqTables],
        k: &Tensor,
        v: &Tensor,
        have: &[usize],
        rec: &[Range<usize>],
        (kq, vq, gpu): Calibration<'_>,
    ) -> Result<()> {
        let b = have.len();
        let (h, d) = (self.state.kv_heads, self.state.head_dim);
        let (ks, vs, start, count): (Tensor, Tensor, Vec<usize>, Vec<usize>) = match &self.exact {
            // Without exact rows every new position is a record: rec[i] = have[i]..total[i].
            None => (
                k.contiguous()?,
                v.contiguous()?,
                rec.iter().map(|r| r.start).collect(),
                rec.iter().map(|r| r.len()).collect(),
            ),
            Some(ex) => {
                let rows = rec.iter().map(|r| r.len()).max().unwrap_or(0);
                if rows == 0 {
                    return Ok(());
                }
                let (mut kp, mut vp) = (Vec::new(), Vec::new());
                for i in 0..b {
                    let r = &rec[i];
                    let (mut kparts, mut vparts) = (Vec::new(), Vec::new());
                    let held = r.start..r.end.min(have[i]);
                    if !held.is_empty() {
                        let (rk, rv) = ex.read(data, &seqs[i].exact, held)?;
                        kparts.push(rk);
                        vparts.push(rv);
                    }
                    let lo = r.start.max(have[i]);
                    if lo < r.end {
                        for (x, parts) in [(k, &mut kparts), (v, &mut vparts)] {
                            parts.push(ex.round(&x.narrow(0, i, 1)?.narrow(
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
                    kp.push(Tensor::cat(&kparts, 2)?);
                    vp.push(Tensor::cat(&vparts, 2)?);
                }
                (
                    Tensor::cat(&kp, 0)?.contiguous()?,
                    Tensor::cat(&vp, 0)?.contiguous()?,
                    rec.iter().map(|r| r.start).collect(),
                    rec.iter().map(|r| r.len()).collect(),
                )
            }
        };
        if count.iter().all(|&c| c == 0) {
            return Ok(());
        }
        let tables: Vec<Vec<u32>> = seqs.iter().map(|s| s.rec.clone()).collect();
        for (x, q, rows, what) in [
            (&ks, kq, self.rec.keys(), "keys"),
            (&vs, vq, self.rec.values(), "values"),
        ] {
            data.inplace_op2(
                x,
                &TqAppend {
                    quantizers: q.clone(),
                    start: start.clone(),
                    new: count.clone(),
                    tables: tables.clone(),
                    rows,
                    what,
                    gpu: gpu.clone(),
                },
            )?;
        }
        if ks.dim(2)? > 1 {
            if let Some(g) = gpu {
                // A prefill chunk: one status read is cheap next to the chunk. The bad token's
                // records were not written and nothing is committed, so the cache is intact.
                if let Err(e) = g.check(&self.device) {
                    g.clear(&self.device)?;
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    /// Takes out of `st` the exact tiles no query of a sequence holding `n` tokens reads
    /// (every position in them before the records' end, none a sink) and returns them.
    fn retire_in(&self, st: &mut SeqTables, n: usize) -> Vec<u32> {
        let Some(ex) = &self.exact else {
            return Vec::new();
        };
        let rows = ex.tiles.rows;
        let bound = self.packed_end(n.saturating_sub(self.margin));
        let mut out = Vec::new();
        for (j, t) in st.exact.iter_mut().enumerate() {
            if *t != NO_TILE && (j + 1) * rows <= bound && j * rows >= self.spec.sinks {
                out.push(*t);
                *t = NO_TILE;
            }
        }
        out
    }

    /// [`Self::retire_in`] of sequence `i`.
    fn retire_exact(&mut self, i: usize, n: usize) -> Vec<u32> {
        let mut st = std::mem::take(&mut self.seqs[i]);
        let out = self.retire_in(&mut st, n);
        self.seqs[i] = st;
        out
    }

    /// Drops one reference to tile `t`: at once, or at the open step's commit.
    fn drop_ref(&mut self, t: u32) {
        match self.step.as_mut() {
            Some(st) => st.retired.push(t),
            None => self.arena.release(&[t]),
        }
    }

    /// Releases every tile the cache holds (tables and an open step's retired ones), closes
    /// the step and forgets the tables.
    fn release_all(&mut self) {
        let mut all: Vec<u32> = self.seqs.iter().flat_map(|s| s.held()).collect();
        if let Some(st) = self.step.take() {
            all.extend(st.retired);
        }
        self.arena.release(&all);
        self.seqs.clear();
    }

    /// (Tiles held right after appending a sequence from `have` to `total` tokens, tiles held
    /// once that step commits): the records' tiles, and the exact tiles of the sinks, of the
    /// window and of the positions the append writes. Calibrated caches only (the window
    /// depends on the tables).
    fn tile_counts(&self, have: usize, total: usize) -> (usize, usize) {
        let recs = self.rec.keys().tiles_covering(self.records(total)).len();
        let Some(ex) = &self.exact else {
            return (recs, recs);
        };
        let er = ex.tiles.rows();
        let s = self.spec.sinks;
        let sink_tiles = er.tiles_covering(0..s.min(total));
        let kept = |n: usize| self.packed_end(n.saturating_sub(self.margin))..n;
        let after = union_len(vec![sink_tiles.clone(), er.tiles_covering(kept(total))]);
        let mut during = vec![sink_tiles];
        if have > 0 {
            during.push(er.tiles_covering(kept(have)));
        }
        if self.spec.has_window() {
            during.push(er.tiles_covering(have.max(s)..total));
        }
        (recs + union_len(during), recs + after)
    }

    /// The shortest length sequence `i` can be truncated to (besides 0): exact rows of its
    /// window at that length must still be held.
    pub fn shortest_truncation(&self, i: usize) -> usize {
        let n = self.state.lens.get(i).copied().unwrap_or(0);
        let Some(ex) = &self.exact else {
            return 0;
        };
        let Some(st) = self.seqs.get(i) else {
            return 0;
        };
        let er = ex.tiles.rows();
        let held = |p: usize| er.at(&st.exact, p, 0).is_some();
        let mut len = n;
        while len > 1 {
            let l = len - 1;
            let ok = (self.packed_end(l)..l).all(held) && (0..self.spec.sinks.min(l)).all(held);
            if !ok {
                break;
            }
            len = l;
        }
        len
    }

    /// Drops the tokens of sequence `i` past `len` (see [`KvCache::truncate`]).
    fn truncate_seq(&mut self, i: usize, len: usize) -> Result<()> {
        if self.step.is_some() {
            fail!(Protocol, "truncate inside an open step");
        }
        let Some(&n) = self.state.lens.get(i) else {
            fail!(Shape, "truncate: the cache holds no sequence {i}");
        };
        if len > n {
            fail!(Shape, "truncate: sequence {i} holds {n} tokens, not {len}");
        }
        if len == n {
            return Ok(());
        }
        if len > 0 {
            let shortest = self.shortest_truncation(i);
            if len < shortest {
                fail!(
                    Unsupported,
                    "truncating sequence {i} from {n} to {len} tokens needs exact rows of positions \
                     that were quantized since; it can be truncated to {shortest}..{n} tokens or to 0"
                );
            }
        }
        let mut st = std::mem::take(&mut self.seqs[i]);
        let mut gone = Vec::new();
        let keep_rec = if len == 0 {
            0
        } else {
            self.rec.keys().tiles_covering(self.records(len)).end
        };
        for t in st.rec.iter_mut().skip(keep_rec) {
            gone.push(std::mem::replace(t, NO_TILE));
        }
        if let Some(ex) = &self.exact {
            let keep = if len == 0 {
                0
            } else {
                (len - 1) / ex.tiles.rows + 1
            };
            for t in st.exact.iter_mut().skip(keep) {
                gone.push(std::mem::replace(t, NO_TILE));
            }
        }
        gone.extend(self.retire_in(&mut st, len));
        gone.retain(|&t| t != NO_TILE);
        self.arena.release(&gone);
        self.seqs[i] = st;
        self.state.lens[i] = len;
        if let Some(x) = self.state.last_new.get_mut(i) {
            *x = 0;
        }
        Ok(())
    }

    /// A cache holding a copy of sequence `i` (batch 1) that shares its tiles (one more holder
    /// each) and its calibration: the tokens are stored once. The fork copies the (at most two)
    /// partial tiles it will write into; a holder that writes into a tile others still hold
    /// copies it first. Errors inside an open step.
    pub fn fork_seq(&self, i: usize) -> Result<TurboCache> {
        if self.step.is_some() {
            fail!(Protocol, "fork inside an open step");
        }
        let (Some(st), Some(&n)) = (self.seqs.get(i), self.state.lens.get(i)) else {
            fail!(Shape, "fork: the cache holds no sequence {i}");
        };
        // The tiles the fork will write into (the partial record tile, where the window's
        // next record goes, and the partial exact tile, where the next position goes) are its
        // own copies; the others are shared.
        let mut st = st.clone();
        let pe = self.packed_end(n);
        let mut wants = Vec::new();
        let mut own = |table: &[u32], part: usize, j: usize| {
            if let Some(&t) = table.get(j).filter(|&&t| t != NO_TILE) {
                wants.push((0, part, j, Need::Copy(t)));
            }
        };
        if pe % self.rec.slots != 0 {
            own(&st.rec, 0, pe / self.rec.slots);
        }
        if let Some(ex) = &self.exact {
            if n % ex.tiles.rows != 0 {
                own(&st.exact, 1, n / ex.tiles.rows);
            }
        }
        let fresh = provide(&self.arena, &wants)?;
        let copies: Vec<u32> = copied(&wants).collect();
        let shared: Vec<u32> = st.held().filter(|t| !copies.contains(t)).collect();
        if let Err(e) = self.arena.retain(&shared) {
            self.arena.release(&fresh);
            return Err(e);
        }
        for (&(_, part, j, _), &t) in wants.iter().zip(&fresh) {
            (if part == 1 {
                &mut st.exact
            } else {
                &mut st.rec
            })[j] = t;
        }
        // Its own status word: a bad value appended to the fork is the fork's error.
        let gpu = match &self.gpu {
            Some(g) => match g.fork(&self.device) {
                Ok(g) => Some(Arc::new(g)),
                Err(e) => {
                    self.arena.release(&st.held().collect::<Vec<_>>());
                    return Err(e.into());
                }
            },
            None => None,
        };
        let mut state = self.state.clone();
        state.lens = vec![n];
        state.last_new = vec![0];
        state.last_chunk = 0;
        Ok(TurboCache {
            state,
            spec: self.spec,
            seed: self.seed,
            device: self.device.clone(),
            kq: self.kq.clone(),
            vq: self.vq.clone(),
            gpu,
            prefill: self.prefill,
            kernel: self.kernel,
            kmean: self.kmean.clone(),
            vmean: self.vmean.clone(),
            kscale: self.kscale.clone(),
            record_bytes: self.record_bytes,
            arena: self.arena.clone(),
            rec: self.rec,
            exact: self.exact,
            seqs: vec![st],
            margin: self.margin,
            step: None,
        })
    }
}

impl Drop for TurboCache {
    fn drop(&mut self) {
        self.release_all();
    }
}
