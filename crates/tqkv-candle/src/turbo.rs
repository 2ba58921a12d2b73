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
use crate::ops::{TqAppend, TqAttend, TqDequantize};
use candle_core::{DType, Device, Result, Tensor};
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
fn token_mask(b: usize, t: usize, new: &[usize], from: usize, device: &Device) -> Result<Tensor> {
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

/// The per-(head, channel) mean of the real tokens `from..` of `x` `[b, h, t, d]`: `[1, h, 1, d]`
/// f32.
/// Errors when it is not finite (NaN/Inf among the keys).
fn key_mean(x: &Tensor, new: &[usize], from: usize) -> Result<Tensor> {
    let (b, h, t, d) = crate::cache::dims4("keys", x)?;
    let n = new
        .iter()
        .map(|&n| n.saturating_sub(from))
        .sum::<usize>()
        .max(1) as f64;
    let mask = token_mask(b, t, new, from, x.device())?;
    let mean = (x
        .to_dtype(DType::F32)?
        .broadcast_mul(&mask)?
        .sum(2)?
        .sum(0)?
        / n)?;
    let host = mean.flatten_all()?.to_vec1::<f32>()?;
    crate::cache::check_finite("keys", &host)?;
    mean.reshape((1, h, 1, d))
}

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
    /// `[1, kv_heads, 1, head_dim]` f32: the key mean subtracted before quantizing
    /// ([`KvSpec::center_keys`]), measured with the calibration.
    kmean: Option<Tensor>,
    /// Full-precision copies of keys and values (after centring) for the sinks and the window,
    /// f16 `[batch, kv_heads, sinks + ring, head_dim]`: position p < sinks at slot p, position
    /// p ≥ sinks at slot `sinks + p % ring` (a ring holding at least the last `window − 1`
    /// positions before the last append, and that append).
    exact_k: Option<Tensor>,
    exact_v: Option<Tensor>,
    ring: usize,
}

/// Copies the rows of positions `p0..p0 + n` (all ≥ `sinks`) of `src` `[1, h, ≥ n, d]` (row i =
/// position p0 + i) into the ring of capacity `ring` of sequence `b` of `dst`.
fn write_ring(
    dst: &Tensor,
    b: usize,
    src: &Tensor,
    (p0, n): (usize, usize),
    sinks: usize,
    ring: usize,
) -> Result<()> {
    let dst = dst.narrow(0, b, 1)?;
    let mut done = 0;
    while done < n {
        let slot = (p0 + done) % ring;
        let len = (ring - slot).min(n - done);
        dst.slice_set(&src.narrow(2, done, len)?.contiguous()?, 2, sinks + slot)?;
        done += len;
    }
    Ok(())
}

/// The rows of positions `p0..p0 + n` (all ≥ `sinks`) of sequence `b` from a ring of capacity
/// `ring`: `[1, h, n, d]`.
fn read_ring(
    src: &Tensor,
    b: usize,
    (p0, n): (usize, usize),
    sinks: usize,
    ring: usize,
) -> Result<Tensor> {
    let src = src.narrow(0, b, 1)?;
    let mut parts = Vec::new();
    let mut done = 0;
    while done < n {
        let slot = (p0 + done) % ring;
        let len = (ring - slot).min(n - done);
        parts.push(src.narrow(2, sinks + slot, len)?);
        done += len;
    }
    Tensor::cat(&parts, 2)
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
        for s in [spec.key, spec.value] {
            VectorQuantizer::new(s.with_outliers(tqkv::OutlierRule::Fixed), head_dim, seed)
                .map_err(candle_core::Error::wrap)?;
        }
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
            kmean: None,
            exact_k: None,
            exact_v: None,
            ring: 0,
        })
    }

    /// Chooses how CUDA prefill chunks attend (no effect on the CPU, which always reads codes).
    pub fn set_prefill_path(&mut self, p: PrefillPath) {
        self.prefill = p;
    }

    /// On CUDA, reads the device status word that appends set on NaN/Inf keys or values
    /// (synchronizes); prefill appends check it themselves, single-token appends leave it to
    /// this call (attention over a cache holding such input returns NaN meanwhile).
    pub fn check_status(&self) -> Result<()> {
        match &self.gpu {
            Some(g) => g.check(&self.device),
            None => Ok(()),
        }
    }

    /// The per-head quantizers of keys and values (after the first append).
    pub fn quantizers(&self) -> Option<(&[VectorQuantizer], &[VectorQuantizer])> {
        Some((self.kq.as_deref()?, self.vq.as_deref()?))
    }

    /// Chooses each head's channels from the first append's real tokens.
    fn calibrate(
        &self,
        spec: QuantSpec,
        x: &Tensor,
        new: &[usize],
        from: usize,
        seed: u64,
    ) -> Result<Vec<VectorQuantizer>> {
        let (b, h, t, d) = crate::cache::dims4("calibration", x)?;
        let k = spec.bits.hi_channels(d).map_err(candle_core::Error::wrap)?;
        let mut out = Vec::with_capacity(h);
        if k == 0 || spec.outliers == tqkv::OutlierRule::Fixed {
            let q = VectorQuantizer::new(spec.with_outliers(tqkv::OutlierRule::Fixed), d, seed)
                .map_err(candle_core::Error::wrap)?;
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
            out.push(
                VectorQuantizer::calibrate(spec, d, &sample, seed)
                    .map_err(candle_core::Error::wrap)?,
            );
        }
        Ok(out)
    }

    /// The exact store after an append of `t` tokens (padding included) whose real tokens are
    /// `new[b]` after `have[b]`: the ring grown if it cannot hold the last `window − 1`
    /// positions and the append, then the append's sink and window positions written (`k`, `v`
    /// `[b, h, t, d]`, keys centred). `None` without sinks and window.
    #[allow(clippy::type_complexity)]
    fn store_exact(
        &self,
        k: &Tensor,
        v: &Tensor,
        have: &[usize],
        new: &[usize],
        t: usize,
    ) -> Result<Option<(Tensor, Tensor, usize)>> {
        let (sk, w) = (self.spec.sinks, self.spec.window);
        if sk == 0 && w == 0 {
            return Ok(None);
        }
        let (h, d) = (self.state.kv_heads, self.state.head_dim);
        let need = if w > 0 { w - 1 + t } else { 0 };
        let (ek, ev, ring) = match (&self.exact_k, &self.exact_v) {
            (Some(ek), Some(ev)) if self.ring >= need => (ek.clone(), ev.clone(), self.ring),
            _ => {
                let ring = need.max(2 * self.ring);
                let shape = (have.len(), h, sk + ring, d);
                let nk = Tensor::zeros(shape, DType::F16, &self.device)?;
                let nv = Tensor::zeros(shape, DType::F16, &self.device)?;
                if let (Some(ok), Some(ov)) = (&self.exact_k, &self.exact_v) {
                    for (old, fresh) in [(ok, &nk), (ov, &nv)] {
                        if sk > 0 {
                            fresh.slice_set(&old.narrow(2, 0, sk)?.contiguous()?, 2, 0)?;
                        }
                        if self.ring == 0 {
                            continue;
                        }
                        for (i, &len) in have.iter().enumerate() {
                            let lo = sk.max(len.saturating_sub(w.saturating_sub(1)));
                            if lo < len {
                                let rows = read_ring(old, i, (lo, len - lo), sk, self.ring)?;
                                write_ring(fresh, i, &rows, (lo, len - lo), sk, ring)?;
                            }
                        }
                    }
                }
                (nk, nv, ring)
            }
        };
        let k16 = k.to_dtype(DType::F16)?;
        let v16 = v.to_dtype(DType::F16)?;
        for (i, (&hv, &n)) in have.iter().zip(new).enumerate() {
            if n == 0 {
                continue;
            }
            let sink_end = sk.min(hv + n);
            for (dst, src) in [(&ek, &k16), (&ev, &v16)] {
                let src = src.narrow(0, i, 1)?;
                if hv < sink_end {
                    dst.narrow(0, i, 1)?.slice_set(
                        &src.narrow(2, 0, sink_end - hv)?.contiguous()?,
                        2,
                        hv,
                    )?;
                }
                let p0 = hv.max(sk);
                if ring > 0 && p0 < hv + n {
                    let rows = src.narrow(2, p0 - hv, hv + n - p0)?;
                    write_ring(dst, i, &rows, (p0, hv + n - p0), sk, ring)?;
                }
            }
        }
        Ok(Some((ek, ev, ring)))
    }

    fn grow(&mut self, batch: usize, needed: usize) -> Result<()> {
        let widths = match (&self.kq, &self.vq) {
            (Some(k), Some(v)) => (k[0].record_bytes(), v[0].record_bytes()),
            _ => candle_core::bail!("the cache is not calibrated yet"),
        };
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
}

impl KvCache for TurboCache {
    fn append(&mut self, k: &Tensor, v: &Tensor, lens: Option<&[usize]>) -> Result<()> {
        let (b, t, new) = self.state.plan(k, v, lens)?;
        if !k.device().same_device(&self.device) {
            candle_core::bail!(
                "keys are on {:?}, the cache on {:?}",
                k.device().location(),
                self.device.location()
            );
        }
        let fresh = self.kq.is_none();
        let from = calibration_start(self.spec.sinks, &new);
        if fresh && self.spec.center_keys {
            self.kmean = Some(key_mean(k, &new, from)?);
        }
        let centred;
        let k = match &self.kmean {
            Some(m) => {
                centred = k.to_dtype(DType::F32)?.broadcast_sub(m)?;
                &centred
            }
            None => k,
        };
        if fresh {
            let ks = tqkv::rng::derive_seed(self.seed, 1);
            let vs = tqkv::rng::derive_seed(self.seed, 2);
            self.kq = Some(Arc::new(self.calibrate(
                self.spec.key,
                k,
                &new,
                from,
                ks,
            )?));
            self.vq = Some(Arc::new(self.calibrate(
                self.spec.value,
                v,
                &new,
                from,
                vs,
            )?));
            if self.device.is_cuda() {
                let (kq, vq) = (self.kq.as_ref().unwrap(), self.vq.as_ref().unwrap());
                self.gpu = Some(Arc::new(GpuTables::new(kq, vq, &self.device)?));
            }
        }
        let have: Vec<usize> = (0..b)
            .map(|i| self.state.lens.get(i).copied().unwrap_or(0))
            .collect();
        let needed = have.iter().zip(&new).map(|(h, n)| h + n).max().unwrap_or(0);
        self.grow(b, needed)?;
        let k = k.contiguous()?;
        let v = v.contiguous()?;
        for (cache, x, q, what) in [
            (
                self.k.as_ref().unwrap(),
                &k,
                self.kq.as_ref().unwrap(),
                "keys",
            ),
            (
                self.v.as_ref().unwrap(),
                &v,
                self.vq.as_ref().unwrap(),
                "values",
            ),
        ] {
            cache.inplace_op2(
                x,
                &TqAppend {
                    quantizers: q.clone(),
                    start: have.clone(),
                    new: new.clone(),
                    capacity: self.capacity,
                    what,
                    gpu: self.gpu.clone(),
                },
            )?;
        }
        if t > 1 {
            if let Some(g) = &self.gpu {
                // A prefill chunk: one status read is cheap next to the chunk. The bad token's
                // records were not written and nothing is committed, so the cache is intact.
                if let Err(e) = g.check(&self.device) {
                    g.clear(&self.device)?;
                    return Err(e);
                }
            }
        }
        if let Some((ek, ev, ring)) = self.store_exact(&k, &v, &have, &new, t)? {
            self.exact_k = Some(ek);
            self.exact_v = Some(ev);
            self.ring = ring;
        }
        self.state.commit(b, t, new);
        Ok(())
    }

    fn attend(&self, q: &Tensor, scale: f64) -> Result<Tensor> {
        let (b, _, t, _) = self.state.check_queries(q)?;
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
                    values,
                    batch: b,
                    capacity: self.capacity,
                    n,
                    dtype,
                    gpu: self.gpu.clone(),
                })
            };
            let k = deq(self.k.as_ref().unwrap(), self.kq.as_ref().unwrap(), false)?;
            let v = deq(self.v.as_ref().unwrap(), self.vq.as_ref().unwrap(), true)?;
            return crate::full::dense_attention(&self.state, &k, &v, q, scale, dtype);
        }
        let exact = match (&self.exact_k, &self.exact_v) {
            (Some(k), Some(v)) => Some(crate::ops::ExactStore {
                k: k.clone(),
                v: v.clone(),
                sinks: self.spec.sinks,
                window: self.spec.window,
                ring: self.ring,
            }),
            _ => None,
        };
        let op = TqAttend {
            state: self.state.clone(),
            kq: self.kq.clone().unwrap(),
            vq: self.vq.clone().unwrap(),
            capacity: self.capacity,
            scale: scale as f32,
            gpu: self.gpu.clone(),
            exact,
        };
        let q = q.contiguous()?;
        q.apply_op3_no_bwd(self.k.as_ref().unwrap(), self.v.as_ref().unwrap(), &op)?
            .to_dtype(q.dtype())
    }

    fn seq_lens(&self) -> &[usize] {
        &self.state.lens
    }

    fn reset(&mut self) {
        self.state.reset();
        self.k = None;
        self.v = None;
        self.capacity = 0;
        self.exact_k = None;
        self.exact_v = None;
        self.ring = 0;
        if let Some(g) = &self.gpu {
            // Best effort: a failing device shows up again at the next append.
            let _ = g.clear(&self.device);
        }
    }

    fn memory(&self) -> MemoryUsage {
        let rb = match (&self.kq, &self.vq) {
            (Some(k), Some(v)) => k[0].record_bytes() + v[0].record_bytes(),
            _ => 0,
        };
        let (h, d) = (self.state.kv_heads, self.state.head_dim);
        let (sk, w) = (self.spec.sinks, self.spec.window);
        // An exact token: f16 key and value.
        let eb = 2 * 2 * d;
        let exact: usize = self
            .state
            .lens
            .iter()
            .map(|&n| sk.min(n) + w.min(n - sk.min(n)))
            .sum();
        let slots = if self.exact_k.is_some() {
            sk + self.ring
        } else {
            0
        };
        MemoryUsage {
            logical: h * (self.state.lens.iter().sum::<usize>() * rb + exact * eb),
            allocated: self.state.lens.len() * h * (self.capacity * rb + slots * eb),
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
        if self.spec.center_keys {
            s.push_str("-c");
        }
        if k.norm_rule == tqkv::NormRule::Projected {
            s.push_str("-pn");
        }
        if self.spec.sinks > 0 {
            s.push_str(&format!("-s{}", self.spec.sinks));
        }
        if self.spec.window > 0 {
            s.push_str(&format!("-w{}", self.spec.window));
        }
        s
    }
}
