//! Per-token baseline caches: `q8` (llama.cpp's q8_0: blocks of 32 channels, one f16 scale,
//! int8 values) and `q4h` (llama.cpp's current default: a Hadamard rotation, then q4_0 blocks of
//! 32 with one f16 scale and 4-bit values). CPU reference; attention dequantizes the history and
//! runs exact attention ([`tqkv::attention::attend_exact`]).
//!
//! Storage: per (sequence, KV head) one growing byte vector of fixed-size records (amortised
//! doubling, never a copy of the history per step). A block shorter than 32 (head_dim not a
//! multiple of 32) is quantized the same way over its channels.

use crate::cache::{grouped_attention, host_f32, KvCache, MemoryUsage, SeqState};
use candle_core::{Result, Tensor};
use half::f16;
use tqkv::{Rotation, RotationKind};

const BLOCK: usize = 32;

/// A per-token vector codec.
pub trait Codec: Send + Sync + std::fmt::Debug {
    /// Bytes of one encoded vector of `dim`.
    fn record_bytes(&self, dim: usize) -> usize;
    /// Encodes `x` into `out`.
    fn encode(&self, x: &[f32], out: &mut [u8]);
    /// Decodes `rec` into `out`.
    fn decode(&self, rec: &[u8], out: &mut [f32]);
    /// Name, e.g. `q8`.
    fn name(&self) -> String;
    /// Bytes of the codec's own tables for vectors of `dim` (e.g. rotation signs).
    fn table_bytes(&self, dim: usize) -> usize {
        let _ = dim;
        0
    }
}

/// q8_0: per block of 32, scale = amax/127 (f16), q = round(x/scale) as i8.
#[derive(Debug, Clone, Copy)]
pub struct Q8;

impl Codec for Q8 {
    fn record_bytes(&self, dim: usize) -> usize {
        dim.div_ceil(BLOCK) * 2 + dim
    }
    fn encode(&self, x: &[f32], out: &mut [u8]) {
        let nb = x.len().div_ceil(BLOCK);
        for (i, blk) in x.chunks(BLOCK).enumerate() {
            let amax = blk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let s = f16::from_f32(amax / 127.0);
            out[2 * i..2 * i + 2].copy_from_slice(&s.to_le_bytes());
            let inv = if s.to_f32() > 0.0 {
                1.0 / s.to_f32()
            } else {
                0.0
            };
            for (j, &v) in blk.iter().enumerate() {
                out[2 * nb + i * BLOCK + j] = ((v * inv).round().clamp(-127.0, 127.0) as i8) as u8;
            }
        }
    }
    fn decode(&self, rec: &[u8], out: &mut [f32]) {
        let nb = out.len().div_ceil(BLOCK);
        for (i, blk) in out.chunks_mut(BLOCK).enumerate() {
            let s = f16::from_le_bytes([rec[2 * i], rec[2 * i + 1]]).to_f32();
            for (j, o) in blk.iter_mut().enumerate() {
                *o = (rec[2 * nb + i * BLOCK + j] as i8) as f32 * s;
            }
        }
    }
    fn name(&self) -> String {
        "q8".into()
    }
}

/// q5_0 after a Hadamard rotation (llama.cpp's `-ctk q5_0` with its automatic rotation): per
/// block of 32 of y = H·D·x, m = the value of largest magnitude, scale = m / −16 (f16),
/// q = clamp(round(y/scale) + 16, 0, 31), packed 5 bits each (5.5 bits per channel).
#[derive(Debug, Clone)]
pub struct Q5Hadamard {
    rotation: Rotation,
}

impl Q5Hadamard {
    /// The codec for `dim` (a multiple of 16, for the block Hadamard transform).
    pub fn new(dim: usize, seed: u64) -> Result<Self> {
        let rotation =
            Rotation::new(RotationKind::Hadamard, dim, seed).map_err(candle_core::Error::wrap)?;
        Ok(Q5Hadamard { rotation })
    }
}

impl Codec for Q5Hadamard {
    fn record_bytes(&self, dim: usize) -> usize {
        dim.div_ceil(BLOCK) * 2 + tqkv::packing::packed_len(dim, 5)
    }
    fn table_bytes(&self, dim: usize) -> usize {
        dim.div_ceil(8)
    }
    fn encode(&self, x: &[f32], out: &mut [u8]) {
        let mut y = vec![0.0f32; x.len()];
        self.rotation
            .apply(x, &mut y)
            .expect("lengths checked by the cache");
        let nb = y.len().div_ceil(BLOCK);
        let mut codes = vec![0u8; y.len()];
        for (i, blk) in y.chunks(BLOCK).enumerate() {
            let m = blk
                .iter()
                .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            let s = f16::from_f32(m / -16.0);
            out[2 * i..2 * i + 2].copy_from_slice(&s.to_le_bytes());
            let inv = if s.to_f32() != 0.0 {
                1.0 / s.to_f32()
            } else {
                0.0
            };
            for (j, &v) in blk.iter().enumerate() {
                codes[i * BLOCK + j] = ((v * inv).round() + 16.0).clamp(0.0, 31.0) as u8;
            }
        }
        tqkv::packing::pack_codes(&codes, 5, &mut out[2 * nb..]).expect("codes fit 5 bits");
    }
    fn decode(&self, rec: &[u8], out: &mut [f32]) {
        let nb = out.len().div_ceil(BLOCK);
        let mut codes = vec![0u8; out.len()];
        tqkv::packing::unpack_codes(&rec[2 * nb..], 5, &mut codes).expect("sizes match");
        let mut y = vec![0.0f32; out.len()];
        for (c, v) in y.iter_mut().enumerate() {
            let i = c / BLOCK;
            let s = f16::from_le_bytes([rec[2 * i], rec[2 * i + 1]]).to_f32();
            *v = (codes[c] as f32 - 16.0) * s;
        }
        self.rotation
            .apply_inverse(&y, out)
            .expect("lengths checked by the cache");
    }
    fn name(&self) -> String {
        "q5h".into()
    }
}

/// q4_0 after a Hadamard rotation: y = H·D·x, then per block of 32: m = the value of largest
/// magnitude, scale = m / −8 (f16), q = clamp(round(y/scale) + 8, 0, 15), two per byte.
#[derive(Debug, Clone)]
pub struct Q4Hadamard {
    rotation: Rotation,
}

impl Q4Hadamard {
    /// The codec for `dim` (a multiple of 16, for the block Hadamard transform).
    pub fn new(dim: usize, seed: u64) -> Result<Self> {
        let rotation =
            Rotation::new(RotationKind::Hadamard, dim, seed).map_err(candle_core::Error::wrap)?;
        Ok(Q4Hadamard { rotation })
    }
}

impl Codec for Q4Hadamard {
    fn record_bytes(&self, dim: usize) -> usize {
        dim.div_ceil(BLOCK) * 2 + dim.div_ceil(2)
    }
    fn table_bytes(&self, dim: usize) -> usize {
        dim.div_ceil(8)
    }
    fn encode(&self, x: &[f32], out: &mut [u8]) {
        let mut y = vec![0.0f32; x.len()];
        self.rotation
            .apply(x, &mut y)
            .expect("lengths checked by the cache");
        let nb = y.len().div_ceil(BLOCK);
        out[2 * nb..].iter_mut().for_each(|b| *b = 0);
        for (i, blk) in y.chunks(BLOCK).enumerate() {
            let m = blk
                .iter()
                .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            let s = f16::from_f32(m / -8.0);
            out[2 * i..2 * i + 2].copy_from_slice(&s.to_le_bytes());
            let inv = if s.to_f32() != 0.0 {
                1.0 / s.to_f32()
            } else {
                0.0
            };
            for (j, &v) in blk.iter().enumerate() {
                let q = ((v * inv).round() + 8.0).clamp(0.0, 15.0) as u8;
                let c = i * BLOCK + j;
                out[2 * nb + c / 2] |= q << (4 * (c % 2));
            }
        }
    }
    fn decode(&self, rec: &[u8], out: &mut [f32]) {
        let nb = out.len().div_ceil(BLOCK);
        let mut y = vec![0.0f32; out.len()];
        for (c, v) in y.iter_mut().enumerate() {
            let i = c / BLOCK;
            let s = f16::from_le_bytes([rec[2 * i], rec[2 * i + 1]]).to_f32();
            let q = (rec[2 * nb + c / 2] >> (4 * (c % 2))) & 15;
            *v = (q as f32 - 8.0) * s;
        }
        self.rotation
            .apply_inverse(&y, out)
            .expect("lengths checked by the cache");
    }
    fn name(&self) -> String {
        "q4h".into()
    }
}

/// A cache of per-token records written by a [`Codec`].
#[derive(Debug)]
pub struct CodecCache<C: Codec> {
    state: SeqState,
    codec: C,
    rb: usize,
    /// Per (sequence, head): keys' and values' records.
    k: Vec<Vec<u8>>,
    v: Vec<Vec<u8>>,
}

impl<C: Codec> CodecCache<C> {
    /// A cache for `kv_heads` heads of `head_dim`.
    pub fn new(codec: C, kv_heads: usize, head_dim: usize, max_tokens: Option<usize>) -> Self {
        let rb = codec.record_bytes(head_dim);
        CodecCache {
            state: SeqState::new(kv_heads, head_dim, max_tokens),
            codec,
            rb,
            k: Vec::new(),
            v: Vec::new(),
        }
    }

    fn decode_all(&self, recs: &[u8], n: usize) -> Vec<f32> {
        let d = self.state.head_dim;
        let mut out = vec![0.0f32; n * d];
        for (o, r) in out.chunks_exact_mut(d).zip(recs.chunks_exact(self.rb)) {
            self.codec.decode(r, o);
        }
        out
    }
}

/// Appends the real tokens of `x` (host `[b, h, t, d]`) to per-(b, h) record vectors.
pub(crate) fn append_records(
    state: &SeqState,
    x: &[f32],
    t: usize,
    new: &[usize],
    rb: usize,
    store: &mut [Vec<u8>],
    encode: impl Fn(usize, &[f32], &mut [u8]) + Sync,
) {
    use rayon::prelude::*;
    let (h, d) = (state.kv_heads, state.head_dim);
    store.par_iter_mut().enumerate().for_each(|(idx, recs)| {
        let (b, head) = (idx / h, idx % h);
        let start = recs.len();
        recs.resize(start + new[b] * rb, 0);
        for tok in 0..new[b] {
            let off = ((b * h + head) * t + tok) * d;
            let r = start + tok * rb;
            encode(head, &x[off..off + d], &mut recs[r..r + rb]);
        }
    });
}

impl<C: Codec> KvCache for CodecCache<C> {
    fn append(&mut self, k: &Tensor, v: &Tensor, lens: Option<&[usize]>) -> Result<()> {
        let kind = self.codec.name();
        let (b, t, new) = self.state.plan(k, v, lens)?;
        let kx = host_f32("keys", &kind, k)?;
        let vx = host_f32("values", &kind, v)?;
        if self.k.is_empty() {
            self.k = vec![Vec::new(); b * self.state.kv_heads];
            self.v = vec![Vec::new(); b * self.state.kv_heads];
        }
        let codec = &self.codec;
        append_records(
            &self.state,
            &kx,
            t,
            &new,
            self.rb,
            &mut self.k,
            |_, x, r| codec.encode(x, r),
        );
        append_records(
            &self.state,
            &vx,
            t,
            &new,
            self.rb,
            &mut self.v,
            |_, x, r| codec.encode(x, r),
        );
        self.state.commit(b, t, new);
        Ok(())
    }

    fn attend(&self, q: &Tensor, scale: f64) -> Result<Tensor> {
        let (b, hq, t, _) = self.state.check_queries(q)?;
        let qx = host_f32("queries", &self.codec.name(), q)?;
        let d = self.state.head_dim;
        let out = grouped_attention(&self.state, &qx, hq, t, |bi, h, qs, vis, o| {
            let idx = bi * self.state.kv_heads + h;
            let n = self.state.lens[bi];
            let kf = self.decode_all(&self.k[idx], n);
            let vf = self.decode_all(&self.v[idx], n);
            tqkv::attention::attend_exact(qs, &kf, &vf, d, vis, scale as f32, o)
                .map_err(candle_core::Error::wrap)
        })?;
        Tensor::from_vec(out, (b, hq, t, d), q.device())?.to_dtype(q.dtype())
    }

    fn seq_lens(&self) -> &[usize] {
        &self.state.lens
    }

    fn reset(&mut self) {
        self.state.reset();
        self.k.clear();
        self.v.clear();
    }

    fn memory(&self) -> MemoryUsage {
        let logical = self.state.lens.iter().sum::<usize>() * self.state.kv_heads * 2 * self.rb;
        let allocated = self.k.iter().chain(&self.v).map(|r| r.capacity()).sum();
        MemoryUsage {
            logical,
            allocated,
            tables: self.codec.table_bytes(self.state.head_dim),
        }
    }

    fn kind_name(&self) -> String {
        self.codec.name()
    }
}
