//! The full-precision baseline cache (f32 / f16 / bf16), built from candle tensor ops only, so
//! it runs on every candle device (CPU and CUDA) with no kernels of ours.
//!
//! Storage: K and V tensors `[batch, kv_heads, capacity, head_dim]` on the device. The capacity
//! doubles when full (one copy of the history per doubling, never one per step), up to the
//! configured maximum. Attention: GQA by viewing the queries as `[batch, kv_heads, groups·tokens,
//! head_dim]` (no repeated K/V heads materialised), scores in the cache dtype, softmax in f32
//! with the causal / length mask, zeros for padding rows.

use crate::cache::{KvCache, MemoryUsage, SeqState};
use candle_core::{DType, Device, Result, Tensor};

/// Keys and values kept as they came, in one float dtype.
#[derive(Debug, Clone)]
pub struct FullCache {
    state: SeqState,
    dtype: DType,
    device: Device,
    k: Option<Tensor>,
    v: Option<Tensor>,
    capacity: usize,
    /// CUDA: the status word decode steps check their keys and values into (no host round
    /// trip per token; [`FullCache::check_status`] reads it).
    status: Option<std::sync::Arc<crate::cuda_ops::DeviceStatus>>,
}

impl FullCache {
    /// On CUDA, reads the status word single-token appends set on NaN/Inf keys or values
    /// (synchronizes; attention over such a cache returns NaN meanwhile). Prefill appends, and
    /// every append on the CPU, check at once and leave the cache unchanged on error.
    pub fn check_status(&self) -> Result<()> {
        match &self.status {
            Some(s) => s.check(&self.device),
            None => Ok(()),
        }
    }

    /// A cache for `kv_heads` heads of `head_dim` in `dtype` (f32, f16 or bf16) on `device`.
    pub fn new(
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
        max_tokens: Option<usize>,
    ) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            candle_core::bail!("a full-precision cache stores f32, f16 or bf16, not {dtype:?}");
        }
        Ok(FullCache {
            state: SeqState::new(kv_heads, head_dim, max_tokens),
            dtype,
            device: device.clone(),
            k: None,
            v: None,
            capacity: 0,
            status: None,
        })
    }

    fn grow(&mut self, batch: usize, needed: usize) -> Result<()> {
        let d = self.state.head_dim;
        self.capacity = crate::cache::grow_pair(
            &mut self.k,
            &mut self.v,
            self.capacity,
            needed,
            self.state.max_tokens,
            (batch, self.state.kv_heads),
            (d, d),
            self.dtype,
            &self.device,
        )?;
        Ok(())
    }
}

/// Errors if `t` holds NaN or ±Inf (one reduction on the device, one scalar to the host).
pub(crate) fn check_finite_tensor(what: &str, t: &Tensor) -> Result<()> {
    let s = t
        .to_dtype(DType::F32)?
        .affine(0.0, 0.0)?
        .sum_all()?
        .to_scalar::<f32>()?;
    if !s.is_finite() {
        candle_core::bail!("{what} contain NaN or Inf");
    }
    Ok(())
}

/// Attention of `q` `[batch, q_heads, tokens, head_dim]` over dense `k`, `v`
/// `[batch, kv_heads, ≥ max len, head_dim]` holding `state`'s sequences: matmuls in `dtype`,
/// softmax in f32 with the causal / length mask, zeros for padding rows, GQA without repeating
/// K/V heads. Shared by [`FullCache`] and the TurboQuant cache's dequantized prefill on CUDA.
pub(crate) fn dense_attention(
    state: &SeqState,
    kc: &Tensor,
    vc: &Tensor,
    q: &Tensor,
    scale: f64,
    dtype: DType,
) -> Result<Tensor> {
    let (b, hq, t, g) = state.check_queries(q)?;
    let hk = state.kv_heads;
    let d = state.head_dim;
    let l = state.lens.iter().copied().max().unwrap_or(0).max(1);
    let k = kc.narrow(2, 0, l)?;
    let v = vc.narrow(2, 0, l)?;
    let qd = q.dtype();
    let q = (q.to_dtype(dtype)? * scale)?.reshape((b, hk, g * t, d))?;
    let scores = q
        .matmul(&k.t()?)?
        .to_dtype(DType::F32)?
        .reshape((b, hk, g, t, l))?;
    // Mask [b, 1, 1, t, l]: 0 where visible, -1e30 elsewhere, built on the device from the
    // b·t visible lengths (none at all when every row sees all l positions, as in a decode
    // step of equal lengths); row weights zero padding rows (only when there are any).
    let vis: Vec<u32> = (0..b)
        .flat_map(|i| (0..t).map(move |r| (i, r)))
        .map(|(i, r)| state.visible(i, r) as u32)
        .collect();
    let dev = q.device();
    let mut scores = scores;
    if vis.iter().any(|&x| x as usize != l) {
        let vt = Tensor::from_vec(vis.clone(), (b, 1, 1, t, 1), dev)?;
        let pos = Tensor::arange(0u32, l as u32, dev)?.reshape((1, 1, 1, 1, l))?;
        let mask = pos
            .broadcast_lt(&vt)?
            .to_dtype(DType::F32)?
            .affine(1e30, -1e30)?;
        scores = scores.broadcast_add(&mask)?;
    }
    let mut p = candle_nn::ops::softmax_last_dim(&scores)?;
    if vis.contains(&0) {
        let rows: Vec<f32> = vis.iter().map(|&x| f32::from(x > 0)).collect();
        let rows = Tensor::from_vec(rows, (b, 1, 1, t, 1), dev)?;
        p = p.broadcast_mul(&rows)?;
    }
    let p = p.reshape((b, hk, g * t, l))?.to_dtype(dtype)?;
    let out = p.matmul(&v.contiguous()?)?;
    out.reshape((b, hq, t, d))?.to_dtype(qd)
}

impl KvCache for FullCache {
    fn append(&mut self, k: &Tensor, v: &Tensor, lens: Option<&[usize]>) -> Result<()> {
        let (b, t, new) = self.state.plan(k, v, lens)?;
        if !k.device().same_device(&self.device) {
            candle_core::bail!(
                "keys are on {:?}, the cache on {:?}",
                k.device().location(),
                self.device.location()
            );
        }
        if t == 1 && self.device.is_cuda() {
            // A decode step on CUDA: checked on the device, no host round trip per token.
            if self.status.is_none() {
                self.status = Some(std::sync::Arc::new(crate::cuda_ops::DeviceStatus::new(
                    &self.device,
                )?));
            }
            let s = self.status.as_ref().unwrap();
            s.check_finite(k)?;
            s.check_finite(v)?;
        } else {
            check_finite_tensor("keys", k)?;
            check_finite_tensor("values", v)?;
        }
        let have: Vec<usize> = (0..b)
            .map(|i| self.state.lens.get(i).copied().unwrap_or(0))
            .collect();
        let needed = have.iter().zip(&new).map(|(h, n)| h + n).max().unwrap_or(0);
        self.grow(b, needed)?;
        let (kc, vc) = (self.k.as_ref().unwrap(), self.v.as_ref().unwrap());
        let k = k.to_dtype(self.dtype)?;
        let v = v.to_dtype(self.dtype)?;
        for i in 0..b {
            if new[i] == 0 {
                continue;
            }
            let ks = k.narrow(0, i, 1)?.narrow(2, 0, new[i])?.contiguous()?;
            let vs = v.narrow(0, i, 1)?.narrow(2, 0, new[i])?.contiguous()?;
            kc.narrow(0, i, 1)?.slice_set(&ks, 2, have[i])?;
            vc.narrow(0, i, 1)?.slice_set(&vs, 2, have[i])?;
        }
        self.state.commit(b, t, new);
        Ok(())
    }

    fn attend(&self, q: &Tensor, scale: f64) -> Result<Tensor> {
        let (kc, vc) = (self.k.as_ref().unwrap(), self.v.as_ref().unwrap());
        dense_attention(&self.state, kc, vc, q, scale, self.dtype)
    }

    fn seq_lens(&self) -> &[usize] {
        &self.state.lens
    }

    fn reset(&mut self) {
        self.state.reset();
        self.k = None;
        self.v = None;
        self.capacity = 0;
        self.status = None;
    }

    fn memory(&self) -> MemoryUsage {
        let per_token = 2 * self.state.kv_heads * self.state.head_dim * self.dtype.size_in_bytes();
        MemoryUsage {
            logical: self.state.lens.iter().sum::<usize>() * per_token,
            allocated: self.state.lens.len() * self.capacity * per_token,
            tables: 0,
        }
    }

    fn kind_name(&self) -> String {
        match self.dtype {
            DType::F32 => "f32",
            DType::F16 => "f16",
            _ => "bf16",
        }
        .into()
    }
}
