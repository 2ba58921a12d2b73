//! Per-token baseline caches: `q8` (llama.cpp's q8_0: blocks of 32 channels, one f16 scale,
//! int8 values), `q4h` (llama.cpp's current default: a Hadamard rotation, then q4_0 blocks of
//! 32 with one f16 scale and 4-bit values) and `q5h` (the same with q5_0's 5-bit values). CPU reference; attention dequantizes the history and
//! runs exact attention ([`tqkv::cpu_attention::attend_dense`], checked against
//! [`tqkv::attention::attend_exact`]).
//!
//! Storage: per (sequence, KV head) one growing byte vector of fixed-size records (amortised
//! doubling, never a copy of the history per step). A block shorter than 32 (head_dim not a
//! multiple of 32) is quantized the same way over its channels.

use crate::cache::{grouped_attention, host_f32, KvCache, MemoryUsage, SeqState};
use crate::error::{fail, Result};
use candle_core::Tensor;
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

/// llama.cpp's `q4_0` / `q5_0` after its Hadamard rotation (`-ctk q4_0` / `q5_0` with the
/// automatic rotation), for `BITS` = 4 or 5: per block of 32 of y = H·D·x, m = the value of
/// largest magnitude, scale = m / −2^(BITS−1) (f16), q = clamp(round(y/scale) + 2^(BITS−1), 0,
/// 2^BITS − 1), packed `BITS` bits each, low bits first (4.5 / 5.5 bits per channel).
#[derive(Debug, Clone)]
pub struct BlockHadamard<const BITS: u8> {
    rotation: Rotation,
}

/// q4_0 after a Hadamard rotation (`q4h`).
pub type Q4Hadamard = BlockHadamard<4>;
/// q5_0 after a Hadamard rotation (`q5h`).
pub type Q5Hadamard = BlockHadamard<5>;

impl<const BITS: u8> BlockHadamard<BITS> {
    const HALF: f32 = (1u32 << (BITS - 1)) as f32;
    const MAX: f32 = ((1u32 << BITS) - 1) as f32;

    /// The codec for `dim` (a multiple of 16, for the block Hadamard transform).
    pub fn new(dim: usize, seed: u64) -> Result<Self> {
        let rotation = Rotation::new(RotationKind::Hadamard, dim, seed)?;
        Ok(BlockHadamard { rotation })
    }
}

impl<const BITS: u8> Codec for BlockHadamard<BITS> {
    fn record_bytes(&self, dim: usize) -> usize {
        dim.div_ceil(BLOCK) * 2 + tqkv::packing::packed_len(dim, BITS)
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
            let s = f16::from_f32(m / -Self::HALF);
            out[2 * i..2 * i + 2].copy_from_slice(&s.to_le_bytes());
            let inv = if s.to_f32() != 0.0 {
                1.0 / s.to_f32()
            } else {
                0.0
            };
            for (j, &v) in blk.iter().enumerate() {
                codes[i * BLOCK + j] = ((v * inv).round() + Self::HALF).clamp(0.0, Self::MAX) as u8;
            }
        }
        tqkv::packing::pack_codes(&codes, BITS, &mut out[2 * nb..]).expect("codes fit BITS bits");
    }
    fn decode(&self, rec: &[u8], out: &mut [f32]) {
        let nb = out.len().div_ceil(BLOCK);
        let mut codes = vec![0u8; out.len()];
        tqkv::packing::unpack_codes(&rec[2 * nb..], BITS, &mut codes).expect("sizes match");
        let mut y = vec![0.0f32; out.len()];
        for (c, v) in y.iter_mut().enumerate() {
            let i = c / BLOCK;
            let s = f16::from_le_bytes([rec[2 * i], rec[2 * i + 1]]).to_f32();
            *v = (codes[c] as f32 - Self::HALF) * s;
        }
        self.rotation
            .apply_inverse(&y, out)
            .expect("lengths checked by the cache");
    }
    fn name(&self) -> String {
        format!("q{BITS}h")
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
    /// The open step: the state at its start (records past its lengths are cut on rollback).
    step: Option<SeqState>,
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
            step: None,
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
        let dims = crate::cache::dims4("keys", k)?;
        self.state.check_host_values("keys", &kx, dims, &new)?;
        self.state.check_host_values("values", &vx, dims, &new)?;
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
        crate::cache::check_queries_finite(&qx)?;
        let d = self.state.head_dim;
        let out = grouped_attention(&self.state, &qx, hq, t, |bi, h, qs, vis, o| {
            let idx = bi * self.state.kv_heads + h;
            let n = self.state.lens[bi];
            let kf = self.decode_all(&self.k[idx], n);
            let vf = self.decode_all(&self.v[idx], n);
            Ok(crate::ops::exact_attention(
                qs,
                &kf,
                &vf,
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
        self.step = Some(self.state.clone());
        Ok(())
    }

    fn commit_step(&mut self) {
        self.step = None;
    }

    fn rollback_step(&mut self) -> Result<()> {
        let Some(st) = self.step.take() else {
            return Ok(());
        };
        if st.lens.is_empty() {
            self.k.clear();
            self.v.clear();
        } else {
            let h = self.state.kv_heads;
            for (idx, (k, v)) in self.k.iter_mut().zip(&mut self.v).enumerate() {
                let n = st.lens[idx / h] * self.rb;
                k.truncate(n);
                v.truncate(n);
            }
        }
        self.state = st;
        Ok(())
    }

    fn reset(&mut self) {
        self.state.reset();
        self.step = None;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's q4_0 / q5_0 reference (`quantize_row_q4_0_ref`) written out naively in f64
    /// on the rotated vector: the decoded vector, before the inverse rotation.
    fn naive_block_q(y: &[f32], bits: u32) -> Vec<f64> {
        let half = (1u32 << (bits - 1)) as f64;
        let max = ((1u32 << bits) - 1) as f64;
        let mut out = Vec::new();
        for blk in y.chunks(BLOCK) {
            let mut m = 0.0f64;
            for &v in blk {
                if (v as f64).abs() > m.abs() {
                    m = v as f64;
                }
            }
            let d = f16::from_f64(m / -half).to_f64();
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            for &v in blk {
                let q = (v as f64 * id + half + 0.5).floor().min(max);
                out.push((q - half) * d);
            }
        }
        out
    }

    fn check<const BITS: u8>() {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        eprintln!("q{BITS}h codec: seed {seed}");
        let mut rng = tqkv::rng::Rng::new(seed);
        for dim in [16usize, 48, 64, 112, 128] {
            let codec = BlockHadamard::<BITS>::new(dim, seed ^ dim as u64).unwrap();
            let rot = Rotation::new(RotationKind::Hadamard, dim, seed ^ dim as u64).unwrap();
            let mut rec = vec![0u8; codec.record_bytes(dim)];
            for _ in 0..20 {
                let x: Vec<f32> = (0..dim).map(|_| (3.0 * rng.gaussian()) as f32).collect();
                codec.encode(&x, &mut rec);
                let mut got = vec![0.0f32; dim];
                codec.decode(&rec, &mut got);
                let mut y = vec![0.0f32; dim];
                rot.apply(&x, &mut y).unwrap();
                let want_y: Vec<f32> = naive_block_q(&y, BITS as u32)
                    .iter()
                    .map(|&v| v as f32)
                    .collect();
                let mut want = vec![0.0f32; dim];
                rot.apply_inverse(&want_y, &mut want).unwrap();
                let diff = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(diff < 1e-4, "q{BITS}h d={dim}: differs from q_0 by {diff}");
            }
        }
    }

    #[test]
    fn block_hadamard_codecs_equal_llama_cpp_q4_0_and_q5_0() {
        check::<4>();
        check::<5>();
    }
}
