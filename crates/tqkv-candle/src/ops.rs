//! The candle ops of the TurboQuant cache — the boundary the CUDA kernels (issue 5) fill.
//!
//! * [`TqAppend`] (`InplaceOp2`): writes the records of new vectors into a packed cache tensor.
//!   dst: u8 `[batch, kv_heads, capacity, record_bytes]`, contiguous, offset 0.
//!   src: f32 / f16 / bf16 `[batch, kv_heads, tokens, head_dim]`, contiguous.
//!   Token t < new[b] of sequence b, head h goes to slot `start[b] + t`; padding is skipped.
//! * [`TqAttend`] (`CustomOp3`): attention of the queries over the packed K and V caches.
//!   q: f32 / f16 / bf16 `[batch, q_heads, tokens, head_dim]`, contiguous; k, v: the caches above.
//!   out: `[batch, q_heads, tokens, head_dim]`, f32 on the CPU, the queries' dtype on CUDA.
//!   Query row t of sequence b sees slots `0..visible(b, t)` (causal, per-sequence lengths; 0
//!   for padding rows → zeros).
//!
//! * [`TqDequantize`] (`CustomOp1`): the first `n` slots of a cache back to vectors
//!   `[batch, kv_heads, n, head_dim]` in f32 / f16 / bf16 (the CUDA prefill path feeds them to
//!   candle's matmuls).
//!
//! CPU: the reference of `tqkv` ([`tqkv::VectorQuantizer::quantize`],
//! [`tqkv::attention::attend_packed`]), parallel over (sequence, KV head). CUDA: the kernels of
//! `tqkv::cuda` through [`crate::cuda_ops`] on candle's stream, never a copy to the host.

use crate::cache::{grouped_attention, SeqState};
use crate::cuda_ops::GpuTables;
use crate::exact::ExactStore;
use candle_core::{CpuStorage, CudaStorage, DType, InplaceOp2, Layout, Result, Shape};
use std::sync::Arc;
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

fn u8_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [u8]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::U8(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{what} must be a contiguous u8 cache tensor"),
    }
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
    /// Slots per (sequence, head) in the cache tensor.
    pub capacity: usize,
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
        let (h, t, d) = (dims[1], dims[2], dims[3]);
        let rb = self.quantizers[0].record_bytes();
        // Quantizers [head · cycle + m]: slot s of a head is written by m = s % cycle.
        let cycle = (self.quantizers.len() / h).max(1);
        let cache = match (dst, dl.contiguous_offsets()) {
            (CpuStorage::U8(v), Some((0, end))) => &mut v[..end],
            _ => candle_core::bail!(
                "{}: the cache must be a contiguous u8 tensor at offset 0",
                self.name()
            ),
        };
        cache
            .par_chunks_mut(self.capacity * rb)
            .enumerate()
            .try_for_each(|(idx, slots)| -> Result<()> {
                let (b, head) = (idx / h, idx % h);
                for tok in 0..self.new[b] {
                    let off = (idx * t + tok) * d;
                    let slot = self.start[b] + tok;
                    let q = &self.quantizers[head * cycle + slot % cycle];
                    q.quantize(&x[off..off + d], &mut slots[slot * rb..(slot + 1) * rb])
                        .map_err(|e| {
                            candle_core::Error::msg(format!(
                                "{} of sequence {b}, head {head}, token {tok}: {e}",
                                self.what
                            ))
                        })?;
                }
                Ok(())
            })
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

/// The full-precision part of an attend: the store, and per query token where its packed range
/// ends (its window starts).
#[derive(Debug, Clone)]
pub struct ExactAttend {
    /// Sinks and recent tokens in f16 or q8_0 ([`crate::exact`]).
    pub store: ExactStore,
    /// `[batch, tokens]`: query token t of sequence b reads positions `0..min(sinks, vis)` and
    /// `packed_end[b·tokens + t]..vis` from the store, the rest from records
    /// (vis = `visible(b, t)`; 0 for padding rows).
    pub packed_end: Vec<usize>,
}

/// Attention over the packed caches: see the module docs for layouts.
pub struct TqAttend {
    /// Sequence lengths and the last append.
    pub state: SeqState,
    /// Key quantizers `[head · cycle + m]` (cycle 1: one per KV head).
    pub kq: Arc<Vec<VectorQuantizer>>,
    /// Value quantizers, same arrangement.
    pub vq: Arc<Vec<VectorQuantizer>>,
    /// Slots per (sequence, head).
    pub capacity: usize,
    /// Softmax scale.
    pub scale: f32,
    /// The layer's tables on the GPU (CUDA caches only).
    pub gpu: Option<Arc<GpuTables>>,
    /// Sinks and window in full precision, if the spec keeps any.
    pub exact: Option<ExactAttend>,
    /// The split kernel on CUDA (a layout it does not take runs on the split kernel).
    pub kernel: tqkv::AttentionKernel,
}

impl candle_core::CustomOp3 for TqAttend {
    fn name(&self) -> &'static str {
        "tqkv-attend"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = float_slice(qs, ql, "queries")?;
        crate::cache::check_queries_finite(&q)?;
        let k = u8_slice(ks, kl, "key cache")?;
        let v = u8_slice(vs, vl, "value cache")?;
        let dims = ql.shape().dims().to_vec();
        let (hq, t) = (dims[1], dims[2]);
        let (rbk, rbv) = (self.kq[0].record_bytes(), self.vq[0].record_bytes());
        let h = self.state.kv_heads;
        let d = self.kq[0].dim();
        let host = |t: &candle_core::Tensor| -> Result<Vec<f32>> {
            t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
        };
        let exact = match &self.exact {
            Some(e) => {
                let (k, v) = e.store.slots_f16()?;
                Some((e, host(&k)?, host(&v)?))
            }
            None => None,
        };
        let out = grouped_attention(&self.state, &q, hq, t, |b, head, qq, vis, o| {
            let idx = b * h + head;
            let n = self.state.lens[b];
            let kr = &k[idx * self.capacity * rbk..][..n * rbk];
            let vr = &v[idx * self.capacity * rbv..][..n * rbv];
            // The exact rows these queries read: the sinks, and the positions from the
            // earliest window start of the append on (rows gathered in position order).
            let rows = exact.as_ref().map(|(e, ek, ev)| {
                let st = &e.store;
                let slots = st.sinks + st.ring;
                let base = idx * slots * d;
                let ns = st.sinks.min(n);
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
                let (mut wk, mut wv) = (Vec::new(), Vec::new());
                for p in lo..n {
                    let at = base + st.slot(p) * d;
                    wk.extend_from_slice(&ek[at..at + d]);
                    wv.extend_from_slice(&ev[at..at + d]);
                }
                let sink_k = ek[base..base + ns * d].to_vec();
                let sink_v = ev[base..base + ns * d].to_vec();
                (st.sinks, ends, sink_k, sink_v, lo, wk, wv)
            });
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
                kr,
                vr,
                ex.as_ref(),
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
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        crate::cuda_ops::attend(self, q, ql, k, kl, v, vl)
    }
}

/// Dequantize: see the module docs for layouts.
pub struct TqDequantize {
    /// Quantizers `[head · cycle + m]` (cycle 1: one per KV head).
    pub quantizers: Arc<Vec<VectorQuantizer>>,
    /// KV heads.
    pub heads: usize,
    /// Values (else keys): picks the GPU tables.
    pub values: bool,
    /// Sequences in the cache tensor.
    pub batch: usize,
    /// Slots per (sequence, head) in the cache tensor.
    pub capacity: usize,
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
        let cache = u8_slice(s, l, "cache")?;
        let cycle = (self.quantizers.len() / self.heads.max(1)).max(1);
        let h = self.heads;
        let d = self.quantizers[0].dim();
        let rb = self.quantizers[0].record_bytes();
        let (b, cap, n) = (self.batch, self.capacity, self.n);
        if cache.len() < b * h * cap * rb || n > cap {
            candle_core::bail!("tqkv-dequantize: the cache is smaller than {b}×{h}×{cap} records");
        }
        let mut out = vec![0f32; b * h * n * d];
        for (idx, o) in out.chunks_mut((n * d).max(1)).enumerate().take(b * h) {
            for s in 0..n {
                let q = &self.quantizers[(idx % h) * cycle + s % cycle];
                let rec = &cache[(idx * cap + s) * rb..][..rb];
                q.dequantize(rec, &mut o[s * d..(s + 1) * d])
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
