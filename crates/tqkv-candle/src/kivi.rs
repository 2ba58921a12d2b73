//! The KIVI baseline (Liu et al. 2024, "KIVI: a tuning-free asymmetric 2bit quantization for KV
//! cache", §3–4): keys quantized per channel over groups of G tokens, values per token over
//! groups of G channels, both asymmetric (min + scale, f16) at 2 or 4 bits, and a window of the
//! most recent tokens kept in f16. CPU reference; attention dequantizes and runs exact attention.
//!
//! Window rule (a streaming variant of KIVI's residual): at least R recent keys stay in f16
//! (R = 128 by default, `kivi4-r<R>` for another); whenever R + G keys are waiting, the oldest G
//! are quantized as one group. Values: the most recent R stay in f16, older ones are quantized
//! token by token. G = 32. With R = 0 only the incomplete last key group is in f16 (KIVI's
//! grouping over tokens needs whole groups).

use crate::cache::{grouped_attention, host_f32, KvCache, MemoryUsage, SeqState};
use crate::error::{fail, Result};
use candle_core::Tensor;
use half::f16;
use tqkv::packing::{pack_codes, packed_len, unpack_codes};

/// Group size (tokens for keys, channels for values).
pub const GROUP: usize = 32;
/// Recent tokens kept in f16 by default.
pub const RESIDUAL: usize = 128;

#[derive(Debug, Clone, Default)]
struct Head {
    /// Quantized key groups, each `GROUP` tokens.
    k_groups: Vec<u8>,
    k_groups_n: usize,
    /// Keys not yet quantized, f16, row-major [n, d].
    k_window: Vec<f16>,
    /// Quantized values, one record per token.
    v_quant: Vec<u8>,
    v_quant_n: usize,
    /// Recent values, f16.
    v_window: Vec<f16>,
    /// Inside a step: the window rows quantized since its start, oldest first (put back on
    /// rollback).
    k_drained: Vec<f16>,
    v_drained: Vec<f16>,
}

/// A head's sizes at the start of a step.
#[derive(Debug, Clone, Copy)]
struct HeadMark {
    k_groups: usize,
    k_groups_n: usize,
    k_window: usize,
    v_quant: usize,
    v_quant_n: usize,
    v_window: usize,
}

impl Head {
    fn mark(&self) -> HeadMark {
        HeadMark {
            k_groups: self.k_groups.len(),
            k_groups_n: self.k_groups_n,
            k_window: self.k_window.len(),
            v_quant: self.v_quant.len(),
            v_quant_n: self.v_quant_n,
            v_window: self.v_window.len(),
        }
    }

    /// Back to `m`: quantized groups cut, the drained rows put back before the window and the
    /// rows appended since cut off its end.
    fn restore(&mut self, m: &HeadMark) {
        self.k_groups.truncate(m.k_groups);
        self.k_groups_n = m.k_groups_n;
        self.v_quant.truncate(m.v_quant);
        self.v_quant_n = m.v_quant_n;
        for (drained, window, n) in [
            (&mut self.k_drained, &mut self.k_window, m.k_window),
            (&mut self.v_drained, &mut self.v_window, m.v_window),
        ] {
            let mut w = std::mem::take(drained);
            w.extend_from_slice(window);
            w.truncate(n);
            *window = w;
        }
    }
}

/// Asymmetric b-bit quantization of `x` (min and scale as f16, then the packed codes).
fn quant_asym(x: &[f32], bits: u8, out: &mut Vec<u8>) {
    let (lo, hi) = x
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let levels = ((1u32 << bits) - 1) as f32;
    let lo16 = f16::from_f32(lo);
    let s16 = f16::from_f32((hi - lo16.to_f32()).max(0.0) / levels);
    out.extend_from_slice(&lo16.to_le_bytes());
    out.extend_from_slice(&s16.to_le_bytes());
    let (lo, s) = (lo16.to_f32(), s16.to_f32());
    let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
    let codes: Vec<u8> = x
        .iter()
        .map(|&v| ((v - lo) * inv).round().clamp(0.0, levels) as u8)
        .collect();
    let start = out.len();
    out.resize(start + packed_len(x.len(), bits), 0);
    pack_codes(&codes, bits, &mut out[start..]).expect("codes fit their bits");
}

fn dequant_asym(rec: &[u8], bits: u8, out: &mut [f32]) {
    let lo = f16::from_le_bytes([rec[0], rec[1]]).to_f32();
    let s = f16::from_le_bytes([rec[2], rec[3]]).to_f32();
    let mut codes = vec![0u8; out.len()];
    unpack_codes(&rec[4..4 + packed_len(out.len(), bits)], bits, &mut codes).expect("sizes match");
    for (o, &c) in out.iter_mut().zip(&codes) {
        *o = lo + c as f32 * s;
    }
}

fn asym_bytes(n: usize, bits: u8) -> usize {
    4 + packed_len(n, bits)
}

/// The KIVI cache at 2 or 4 bits.
#[derive(Debug)]
pub struct KiviCache {
    state: SeqState,
    bits: u8,
    residual: usize,
    heads: Vec<Head>,
    /// The open step: the state and every head's sizes at its start.
    step: Option<(SeqState, Vec<HeadMark>)>,
}

impl KiviCache {
    /// A cache of `bits` (2 or 4) with `residual` recent tokens in f16, for `kv_heads` heads of
    /// `head_dim`.
    pub fn new(
        bits: u8,
        residual: usize,
        kv_heads: usize,
        head_dim: usize,
        max_tokens: Option<usize>,
    ) -> Result<Self> {
        if bits != 2 && bits != 4 {
            fail!(Unsupported, "KIVI supports 2 or 4 bits, not {bits}");
        }
        Ok(KiviCache {
            state: SeqState::new(kv_heads, head_dim, max_tokens),
            bits,
            residual,
            heads: Vec::new(),
            step: None,
        })
    }

    fn value_record_bytes(&self) -> usize {
        let d = self.state.head_dim;
        (0..d)
            .step_by(GROUP)
            .map(|c| asym_bytes(GROUP.min(d - c), self.bits))
            .sum()
    }

    fn push(&self, head: &mut Head, k: &[f32], v: &[f32], undo: bool) {
        let d = self.state.head_dim;
        head.k_window.extend(k.iter().map(|&x| f16::from_f32(x)));
        head.v_window.extend(v.iter().map(|&x| f16::from_f32(x)));
        while head.k_window.len() / d >= self.residual + GROUP {
            // Quantize the oldest GROUP keys channel by channel.
            let block: Vec<f32> = head.k_window[..GROUP * d]
                .iter()
                .map(|x| x.to_f32())
                .collect();
            for c in 0..d {
                let col: Vec<f32> = (0..GROUP).map(|t| block[t * d + c]).collect();
                quant_asym(&col, self.bits, &mut head.k_groups);
            }
            head.k_groups_n += 1;
            let gone = head.k_window.drain(..GROUP * d);
            if undo {
                head.k_drained.extend(gone);
            }
        }
        while head.v_window.len() / d > self.residual {
            let tok: Vec<f32> = head.v_window[..d].iter().map(|x| x.to_f32()).collect();
            for blk in tok.chunks(GROUP) {
                quant_asym(blk, self.bits, &mut head.v_quant);
            }
            head.v_quant_n += 1;
            let gone = head.v_window.drain(..d);
            if undo {
                head.v_drained.extend(gone);
            }
        }
    }

    fn keys(&self, head: &Head) -> Vec<f32> {
        let d = self.state.head_dim;
        let gb = asym_bytes(GROUP, self.bits);
        let mut out = vec![0.0f32; head.k_groups_n * GROUP * d];
        let mut col = vec![0.0f32; GROUP];
        for g in 0..head.k_groups_n {
            for c in 0..d {
                let off = (g * d + c) * gb;
                dequant_asym(&head.k_groups[off..off + gb], self.bits, &mut col);
                for (t, &x) in col.iter().enumerate() {
                    out[(g * GROUP + t) * d + c] = x;
                }
            }
        }
        out.extend(head.k_window.iter().map(|x| x.to_f32()));
        out
    }

    fn values(&self, head: &Head) -> Vec<f32> {
        let d = self.state.head_dim;
        let rb = self.value_record_bytes();
        let mut out = vec![0.0f32; head.v_quant_n * d];
        for (t, o) in out.chunks_exact_mut(d).enumerate() {
            let mut off = t * rb;
            for blk in o.chunks_mut(GROUP) {
                let n = asym_bytes(blk.len(), self.bits);
                dequant_asym(&head.v_quant[off..off + n], self.bits, blk);
                off += n;
            }
        }
        out.extend(head.v_window.iter().map(|x| x.to_f32()));
        out
    }
}

impl KvCache for KiviCache {
    fn append(&mut self, k: &Tensor, v: &Tensor, lens: Option<&[usize]>) -> Result<()> {
        let kind = self.kind_name();
        let (b, t, new) = self.state.plan(k, v, lens)?;
        let kx = host_f32("keys", &kind, k)?;
        let vx = host_f32("values", &kind, v)?;
        let dims = crate::cache::dims4("keys", k)?;
        self.state.check_host_values("keys", &kx, dims, &new)?;
        self.state.check_host_values("values", &vx, dims, &new)?;
        let undo = self.step.is_some();
        let (h, d) = (self.state.kv_heads, self.state.head_dim);
        if self.heads.is_empty() {
            self.heads = vec![Head::default(); b * h];
        }
        let mut heads = std::mem::take(&mut self.heads);
        {
            use rayon::prelude::*;
            let this = &*self;
            heads.par_iter_mut().enumerate().for_each(|(idx, head)| {
                let bi = idx / h;
                let off = idx * t * d;
                let n = new[bi] * d;
                this.push(head, &kx[off..off + n], &vx[off..off + n], undo);
            });
        }
        self.heads = heads;
        self.state.commit(b, t, new);
        Ok(())
    }

    fn attend(&self, q: &Tensor, scale: f64) -> Result<Tensor> {
        let (b, hq, t, _) = self.state.check_queries(q)?;
        let qx = host_f32("queries", &self.kind_name(), q)?;
        crate::cache::check_queries_finite(&qx)?;
        let d = self.state.head_dim;
        let out = grouped_attention(&self.state, &qx, hq, t, |bi, h, qs, vis, o| {
            let head = &self.heads[bi * self.state.kv_heads + h];
            Ok(crate::ops::exact_attention(
                qs,
                &self.keys(head),
                &self.values(head),
                d,
                vis,
                scale as f32,
                o,
            )?)
        })?;
        Ok(Tensor::from_vec(out, (b, hq, t, d), q.device())?.to_dtype(q.dtype())?)
    }

    fn seq_lens(&self) -> &[usize] {
        &self.state.lens
    }

    fn begin_step(&mut self) -> Result<()> {
        if self.step.is_some() {
            fail!(Protocol, "begin_step: a step is open already");
        }
        let marks = self.heads.iter().map(Head::mark).collect();
        self.step = Some((self.state.clone(), marks));
        Ok(())
    }

    fn commit_step(&mut self) {
        if self.step.take().is_some() {
            for h in &mut self.heads {
                h.k_drained = Vec::new();
                h.v_drained = Vec::new();
            }
        }
    }

    fn rollback_step(&mut self) -> Result<()> {
        let Some((state, marks)) = self.step.take() else {
            return Ok(());
        };
        if marks.is_empty() {
            self.heads.clear();
        } else {
            for (h, m) in self.heads.iter_mut().zip(&marks) {
                h.restore(m);
            }
        }
        self.state = state;
        Ok(())
    }

    fn reset(&mut self) {
        self.state.reset();
        self.step = None;
        self.heads.clear();
    }

    fn memory(&self) -> MemoryUsage {
        let logical: usize = self
            .heads
            .iter()
            .map(|h| {
                h.k_groups.len() + 2 * h.k_window.len() + h.v_quant.len() + 2 * h.v_window.len()
            })
            .sum();
        let allocated: usize = self
            .heads
            .iter()
            .map(|h| {
                h.k_groups.capacity()
                    + 2 * h.k_window.capacity()
                    + h.v_quant.capacity()
                    + 2 * h.v_window.capacity()
            })
            .sum();
        MemoryUsage {
            logical,
            allocated,
            tables: 0,
        }
    }

    fn kind_name(&self) -> String {
        if self.residual == RESIDUAL {
            format!("kivi{}", self.bits)
        } else {
            format!("kivi{}-r{}", self.bits, self.residual)
        }
    }
}
