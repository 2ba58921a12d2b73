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
    /// Dequantize the cache once per chunk and use candle's matmuls.
    Dequantize,
    /// The fused kernel, every query row reading the codes (the decode kernel's path): 1.26–1.28×
    /// faster than `Dequantize` for 512-token chunks at 16K–128K on an H100, 4 % slower at 4K
    /// (docs/KERNELS.md).
    #[default]
    Fused,
}

/// `[b, 1, t, 1]` f32: 1 for the real tokens `t < new[b]`, 0 for padding.
fn token_mask(b: usize, t: usize, new: &[usize], device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..b)
        .flat_map(|i| (0..t).map(move |j| if j < new[i] { 1.0 } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (b, 1, t, 1), device)
}

/// The per-(head, channel) mean of the real tokens of `x` `[b, h, t, d]`: `[1, h, 1, d]` f32.
/// Errors when it is not finite (NaN/Inf among the keys).
fn key_mean(x: &Tensor, new: &[usize]) -> Result<Tensor> {
    let (b, h, t, d) = crate::cache::dims4("keys", x)?;
    let n = new.iter().sum::<usize>().max(1) as f64;
    let mask = token_mask(b, t, new, x.device())?;
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
        let mask = token_mask(b, t, new, x.device())?;
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
        if fresh && self.spec.center_keys {
            self.kmean = Some(key_mean(k, &new)?);
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
            self.kq = Some(Arc::new(self.calibrate(self.spec.key, k, &new, ks)?));
            self.vq = Some(Arc::new(self.calibrate(self.spec.value, v, &new, vs)?));
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
        self.state.commit(b, t, new);
        Ok(())
    }

    fn attend(&self, q: &Tensor, scale: f64) -> Result<Tensor> {
        let (b, _, t, _) = self.state.check_queries(q)?;
        if self.gpu.is_some() && t > 1 && self.prefill == PrefillPath::Dequantize {
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
        let op = TqAttend {
            state: self.state.clone(),
            kq: self.kq.clone().unwrap(),
            vq: self.vq.clone().unwrap(),
            capacity: self.capacity,
            scale: scale as f32,
            gpu: self.gpu.clone(),
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
        let h = self.state.kv_heads;
        MemoryUsage {
            logical: self.state.lens.iter().sum::<usize>() * h * rb,
            allocated: self.state.lens.len() * h * self.capacity * rb,
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
        s
    }
}
