//! The candle ops of the TurboQuant cache — the boundary the CUDA kernels fill. Records live
//! in an arena of tiles ([`crate::arena::TileArena`]; `tqkv::paged` has the layouts) and every
//! op reaches a sequence's records through its table.
//!
//! * [`TqAppend`] (`InplaceOp2`): writes the records of new vectors into the arena.
//!   dst: the arena u8 `[tiles, tile_bytes]`, contiguous, offset 0.
//!   src: f32 / f16 / bf16 `[batch, kv_heads, tokens, head_dim]`, contiguous.
//!   Token t < new[b] of sequence b, head h goes to slot `start[b] + t` of its table.
//! * [`TqAttend`] (`CustomOp2`): attention of the queries over the records (and the exact rows
//!   of sinks and window, [`ExactAttend`], in the same arena).
//!   q: f32 / f16 / bf16 `[batch, q_heads, tokens, head_dim]`, contiguous; the arena as above.
//!   out: `[batch, q_heads, tokens, head_dim]`, f32 on the CPU, the queries' dtype on CUDA.
//!   Query row t of sequence b sees slots `0..visible(b, t)` (causal, per-sequence lengths; 0
//!   for padding rows → zeros).
//! * [`TqDequantize`] (`CustomOp1`): the first `n` slots of every sequence back to vectors
//!   `[batch, kv_heads, n, head_dim]` in f32 / f16 / bf16 (the CUDA prefill path feeds them to
//!   candle's matmuls).
//!
//! CPU: [`tqkv::VectorQuantizer::quantize`] and the SIMD kernel
//! [`tqkv::cpu_attention::attend_tiles`] (the records read in their tiles, checked against the
//! reference [`tqkv::attention::attend_cycled`]), parallel over (sequence, KV head) and, for
//! long contexts, chunks of positions. CUDA: the kernels of
//! `tqkv::cuda` through [`crate::cuda_ops`] on candle's stream, never a copy to the host.

use crate::cache::{grouped_attention, SeqState};
use crate::cuda_ops::GpuTables;
use crate::tile_ops::{arena_bytes, arena_bytes_mut};
use candle_core::{CpuStorage, CudaStorage, DType, InplaceOp2, Layout, Result, Shape};
use std::sync::Arc;
use tqkv::cpu_attention::{ExactSource, HeadRecords, PagedExact};
use tqkv::paged::{ExactTiles, RecordTiles, TileRows};
use tqkv::VectorQuantizer;

/// Contiguous f32 copy of a float storage region.
fn float_slice(s: &CpuStorage, l: &Layout, what: &str) -> Result<Vec<f32>> {
    let (start, end) = match l.contiguous_offsets() {
        Some(o) => o,
        None => candle_core::bail!("{what} must be contiguous"),
    };
    Ok(match s {
        CpuStorage::F32(v) => v[start..end].to_vec(),
        CpuStorage::F16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
        CpuStorage::BF16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
        _ => candle_core::bail!("{what} must be f32, f16 or bf16, got another dtype"),
    })
}

/// Records of slots `slots` of head `h` of one sequence, gathered into `out` (`[n, row_bytes]`
/// indexed by slot from 0; other slots stay as they are). Errors on a slot whose tile is not
/// held.
fn gather_records(
    arena: &[u8],
    rows: &TileRows,
    table: &[u32],
    h: usize,
    slots: std::ops::Range<usize>,
    out: &mut [u8],
) -> Result<()> {
    let rb = rows.row_bytes;
    for s in slots {
        let Some(at) = rows.at(table, s, h).filter(|&a| a + rb <= arena.len()) else {
            candle_core::bail!("record of slot {s} (head {h}): its tile is not held")
        };
        out[s * rb..(s + 1) * rb].copy_from_slice(&arena[at..at + rb]);
    }
    Ok(())
}

/// Exact attention of one KV head's queries over f32 keys and values (the codec and KIVI
/// caches; [`tqkv::attention::attend_exact`]'s layouts): the CPU kernel
/// ([`tqkv::cpu_attention::attend_dense`]), or `attend_exact` itself when
/// [`reference_attention`] asks for it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn exact_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: usize,
    visible: &[usize],
    scale: f32,
    out: &mut [f32],
) -> tqkv::Result<()> {
    if reference_attention() {
        return tqkv::attention::attend_exact(q, k, v, d, visible, scale, out);
    }
    let isa = tqkv::simd::Isa::detect();
    tqkv::cpu_attention::attend_dense(isa, q, k, v, d, visible, scale, out)
}

/// Whether `TQKV_CPU_ATTENTION=reference` asks for the reference CPU attention (read once):
/// the TurboQuant caches gather and unpack their records ([`tqkv::attention::attend_cycled`]),
/// the codec and KIVI caches run [`tqkv::attention::attend_exact`] — the paths before issue 14,
/// kept as the baseline of benchmarks in the same build.
fn reference_attention() -> bool {
    static REF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *REF.get_or_init(|| std::env::var("TQKV_CPU_ATTENTION").is_ok_and(|v| v == "reference"))
}

/// Quantize-append: see the module docs for layouts.
pub struct TqAppend {
    /// Quantizers `[head · cycle + m]` (cycle 1: one per KV head; slot s of a head is written
    /// by m = s % cycle).
    pub quantizers: Arc<Vec<VectorQuantizer>>,
    /// First slot written per sequence.
    pub start: Vec<usize>,
    /// Real tokens per sequence.
    pub new: Vec<usize>,
    /// Each sequence's record table (its tiles hold every slot written).
    pub tables: Vec<Vec<u32>>,
    /// The records' place in the tiles (the keys or the values of a [`RecordTiles`]).
    pub rows: TileRows,
    /// `keys` or `values` (picks the GPU tables, names errors).
    pub what: &'static str,
    /// The layer's tables on the GPU (CUDA caches only).
    pub gpu: Option<Arc<GpuTables>>,
}

impl InplaceOp2 for TqAppend {
    fn name(&self) -> &'static str {
        "tqkv-append"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        src: &CpuStorage,
        sl: &Layout,
    ) -> Result<()> {
        use rayon::prelude::*;
        let x = float_slice(src, sl, self.what)?;
        let dims = sl.shape().dims();
        let (b_n, h, t, d) = (dims[0], dims[1], dims[2], dims[3]);
        let rb = self.quantizers[0].record_bytes();
        if rb != self.rows.row_bytes || self.tables.len() != b_n {
            candle_core::bail!(
                "{}: records of {rb} bytes for {b_n} sequences, the tiles hold {}-byte rows for {}",
                self.name(),
                self.rows.row_bytes,
                self.tables.len()
            );
        }
        // Quantizers [head · cycle + m]: slot s of a head is written by m = s % cycle.
        let cycle = (self.quantizers.len() / h).max(1);
        // Records of each (sequence, head), quantized in parallel, then copied into the tiles:
        // the tokens of one quantizer (slot class) in one batch.
        let recs: Vec<Vec<u8>> = (0..b_n * h)
            .into_par_iter()
            .map(|idx| -> Result<Vec<u8>> {
                let (b, head) = (idx / h, idx % h);
                let new = self.new[b];
                let mut out = vec![0u8; new * rb];
                let xs = &x[idx * t * d..(idx * t + new) * d];
                let classes = cycle.min(new);
                let fail = |e: tqkv::Error| {
                    candle_core::Error::msg(format!(
                        "{} of sequence {b}, head {head}: {e}",
                        self.what
                    ))
                };
                if classes == 1 {
                    let q = &self.quantizers[head * cycle + self.start[b] % cycle];
                    q.quantize_batch(xs, &mut out).map_err(fail)?;
                    return Ok(out);
                }
                let (mut xb, mut rbuf) = (Vec::new(), Vec::new());
                for first in 0..classes {
                    let toks = (first..new).step_by(cycle);
                    xb.clear();
                    for tok in toks.clone() {
                        xb.extend_from_slice(&xs[tok * d..(tok + 1) * d]);
                    }
                    rbuf.resize(toks.len() * rb, 0u8);
                    let q = &self.quantizers[head * cycle + (self.start[b] + first) % cycle];
                    q.quantize_batch(&xb, &mut rbuf).map_err(fail)?;
                    for (tok, r) in toks.zip(rbuf.chunks_exact(rb)) {
                        out[tok * rb..(tok + 1) * rb].copy_from_slice(r);
                    }
                }
                Ok(out)
            })
            .collect::<Result<_>>()?;
        let arena = arena_bytes_mut(dst, dl)?;
        for b in 0..b_n {
            let slots = self.start[b]..self.start[b] + self.new[b];
            let dense: Vec<u8> = recs[b * h..(b + 1) * h].concat();
            self.rows
                .scatter(arena, &self.tables[b], slots, &dense)
                .map_err(candle_core::Error::wrap)?;
        }
        Ok(())
    }

    fn cuda_fwd(
        &self,
        dst: &mut CudaStorage,
        dl: &Layout,
        src: &CudaStorage,
        sl: &Layout,
    ) -> Result<()> {
        crate::cuda_ops::append(self, dst, dl, src, sl)
    }
}

/// The full-precision part of an attend (sinks and windows): where the rows sit, and per query
/// token where its packed range ends (its window starts).
#[derive(Debug, Clone)]
pub struct ExactAttend {
    /// How the exact rows fill a tile.
    pub tiles: ExactTiles,
    /// Each sequence's exact table (position p in its entry p / rows).
    pub tables: Vec<Vec<u32>>,
    /// Attention sinks (positions `0..sinks`, read exactly by every query that sees them).
    pub sinks: usize,
    /// `[batch, tokens]`: query token t of sequence b reads positions `0..min(sinks, vis)` and
    /// `packed_end[b·tokens + t]..vis` from the exact rows, the rest from records
    /// (vis = `visible(b, t)`; 0 for padding rows).
    pub packed_end: Vec<usize>,
}

/// Attention over the records: see the module docs for layouts.
pub struct TqAttend {
    /// Sequence lengths and the last append.
    pub state: SeqState,
    /// Key quantizers `[head · cycle + m]` (cycle 1: one per KV head).
    pub kq: Arc<Vec<VectorQuantizer>>,
    /// Value quantizers, same arrangement.
    pub vq: Arc<Vec<VectorQuantizer>>,
    /// How the records fill a tile.
    pub records: RecordTiles,
    /// Each sequence's record table.
    pub tables: Vec<Vec<u32>>,
    /// Softmax scale.
    pub scale: f32,
    /// The layer's tables on the GPU (CUDA caches only).
    pub gpu: Option<Arc<GpuTables>>,
    /// Sinks and window in full precision, if the spec keeps any.
    pub exact: Option<ExactAttend>,
    /// The split kernel on CUDA (a layout it does not take runs on the split kernel).
    pub kernel: tqkv::AttentionKernel,
}

impl TqAttend {
    /// The reference path of one (sequence, KV head): the records gathered out of their tiles
    /// and the exact rows decoded, then [`tqkv::attention::attend_cycled`] (unpacks the whole
    /// history). Kept as the baseline of the kernel: `TQKV_CPU_ATTENTION=reference` selects it
    /// (benchmarks compare both in one build).
    #[allow(clippy::too_many_arguments)]
    fn reference_head(
        &self,
        arena: &[u8],
        t: usize,
        b: usize,
        head: usize,
        qq: &[f32],
        vis: &[usize],
        o: &mut [f32],
    ) -> crate::Result<()> {
        let (kr, vr) = (self.records.keys(), self.records.values());
        let h = self.state.kv_heads;
        let d = self.kq[0].dim();
        let n = self.state.lens[b];
        let table = &self.tables[b];
        // The exact rows these queries read: the sinks, and the positions from the
        // earliest window start of the append on (rows in position order).
        let rows = match &self.exact {
            Some(e) => {
                let ns = e.sinks.min(n);
                let ends: Vec<usize> = (0..vis.len())
                    .map(|i| e.packed_end[b * t + i % t])
                    .collect();
                let lo = ends
                    .iter()
                    .zip(vis)
                    .filter(|(&pe, &v)| pe < v)
                    .map(|(&pe, _)| pe)
                    .min()
                    .unwrap_or(n);
                let et = &e.tables[b];
                let er = e.tiles.rows();
                let read = |range: std::ops::Range<usize>| -> Result<(Vec<f32>, Vec<f32>)> {
                    let (mut ks, mut vs) =
                        (vec![0f32; range.len() * d], vec![0f32; range.len() * d]);
                    for (i, p) in range.enumerate() {
                        let Some(at) = er.at(et, p, head) else {
                            candle_core::bail!("exact row of position {p}: its tile is not held")
                        };
                        e.tiles.decode_row(
                            &arena[at..at + er.row_bytes],
                            &mut ks[i * d..(i + 1) * d],
                            &mut vs[i * d..(i + 1) * d],
                        );
                    }
                    Ok((ks, vs))
                };
                let (sk, sv) = read(0..ns)?;
                let (wk, wv) = read(lo.max(ns)..n)?;
                // Window rows start at max(lo, sinks): a query's packed end is ≥ its sinks.
                Some((e.sinks, ends, sk, sv, lo.max(ns), wk, wv))
            }
            None => None,
        };
        // Records of the slots some query reads from them.
        let (from, to) = match &rows {
            Some((sinks, ends, ..)) => {
                let to = ends
                    .iter()
                    .zip(vis)
                    .map(|(&pe, &v)| pe.min(v))
                    .max()
                    .unwrap_or(0);
                ((*sinks).min(n), to)
            }
            None => (0, vis.iter().copied().max().unwrap_or(0)),
        };
        let mut krec = vec![0u8; n * kr.row_bytes];
        let mut vrec = vec![0u8; n * vr.row_bytes];
        if from < to {
            gather_records(arena, &kr, table, head, from..to, &mut krec)?;
            gather_records(arena, &vr, table, head, from..to, &mut vrec)?;
        }
        let ex =
            rows.as_ref().map(
                |(sinks, ends, sk, sv, lo, wk, wv)| tqkv::attention::ExactRows {
                    sinks: *sinks,
                    packed_end: ends,
                    sink_k: sk,
                    sink_v: sv,
                    win_start: *lo,
                    win_k: wk,
                    win_v: wv,
                },
            );
        let cycle = (self.kq.len() / h).max(1);
        tqkv::attention::attend_cycled(
            &self.kq[head * cycle..(head + 1) * cycle],
            &self.vq[head * cycle..(head + 1) * cycle],
            qq,
            &krec,
            &vrec,
            ex.as_ref(),
            vis,
            self.scale,
            o,
        )
        .map_err(crate::Error::from)
    }
}

impl candle_core::CustomOp2 for TqAttend {
    fn name(&self) -> &'static str {
        "tqkv-attend"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        s: &CpuStorage,
        l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = float_slice(qs, ql, "queries")?;
        crate::cache::check_queries_finite(&q)?;
        let arena = arena_bytes(s, l)?;
        let dims = ql.shape().dims().to_vec();
        let (hq, t) = (dims[1], dims[2]);
        let (kr, vr) = (self.records.keys(), self.records.values());
        let h = self.state.kv_heads;
        let isa = tqkv::simd::Isa::detect();
        let cycle = (self.kq.len() / h).max(1);
        let reference = reference_attention();
        let out = grouped_attention(&self.state, &q, hq, t, |b, head, qq, vis, o| {
            if reference {
                return self.reference_head(arena, t, b, head, qq, vis, o);
            }
            let table = &self.tables[b];
            let recs = |rows| HeadRecords {
                arena,
                rows,
                table,
                head,
            };
            // Query i of the group (row i of `qq`) is token i % t of sequence b.
            let ends: Vec<usize> = match &self.exact {
                Some(e) => (0..vis.len())
                    .map(|i| e.packed_end[b * t + i % t])
                    .collect(),
                None => Vec::new(),
            };
            let paged = self.exact.as_ref().map(|e| PagedExact {
                arena,
                tiles: e.tiles,
                table: &e.tables[b],
                head,
                sinks: e.sinks,
                packed_end: &ends,
            });
            tqkv::cpu_attention::attend_tiles(
                isa,
                &self.kq[head * cycle..(head + 1) * cycle],
                &self.vq[head * cycle..(head + 1) * cycle],
                qq,
                recs(kr),
                recs(vr),
                paged.as_ref().map(|p| p as &dyn ExactSource),
                vis,
                self.scale,
                o,
            )
            .map_err(crate::Error::from)
        })?;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        s: &CudaStorage,
        l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        crate::cuda_ops::attend(self, q, ql, s, l)
    }
}

/// Dequantize: see the module docs for layouts.
pub struct TqDequantize {
    /// Quantizers `[head · cycle + m]` (cycle 1: one per KV head).
    pub quantizers: Arc<Vec<VectorQuantizer>>,
    /// Values (else keys): picks the GPU tables.
    pub values: bool,
    /// The records' place in the tiles.
    pub rows: TileRows,
    /// Each sequence's record table (every slot `0..n` held).
    pub tables: Vec<Vec<u32>>,
    /// Slots to dequantize.
    pub n: usize,
    /// Output dtype (f32, f16 or bf16).
    pub dtype: DType,
    /// The layer's tables on the GPU (CUDA caches only).
    pub gpu: Option<Arc<GpuTables>>,
}

impl candle_core::CustomOp1 for TqDequantize {
    fn name(&self) -> &'static str {
        "tqkv-dequantize"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let arena = arena_bytes(s, l)?;
        let h = self.rows.heads;
        let cycle = (self.quantizers.len() / h.max(1)).max(1);
        let d = self.quantizers[0].dim();
        let rb = self.quantizers[0].record_bytes();
        let (b, n) = (self.tables.len(), self.n);
        let mut out = vec![0f32; b * h * n * d];
        let mut rec = vec![0u8; n * rb];
        for (idx, o) in out.chunks_mut((n * d).max(1)).enumerate().take(b * h) {
            gather_records(
                arena,
                &self.rows,
                &self.tables[idx / h],
                idx % h,
                0..n,
                &mut rec,
            )?;
            for s in 0..n {
                let q = &self.quantizers[(idx % h) * cycle + s % cycle];
                q.dequantize(&rec[s * rb..(s + 1) * rb], &mut o[s * d..(s + 1) * d])
                    .map_err(candle_core::Error::wrap)?;
            }
        }
        let storage = match self.dtype {
            DType::F32 => CpuStorage::F32(out),
            DType::F16 => CpuStorage::F16(out.iter().map(|&x| half::f16::from_f32(x)).collect()),
            DType::BF16 => CpuStorage::BF16(out.iter().map(|&x| half::bf16::from_f32(x)).collect()),
            other => candle_core::bail!(
                "tqkv-dequantize: output must be f32, f16 or bf16, not {other:?}"
            ),
        };
        Ok((storage, Shape::from((b, h, n, d))))
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        crate::cuda_ops::dequantize(self, s, l)
    }
}
