//! The full-precision baseline cache (f32 / f16 / bf16), built from candle tensor ops only, so
//! it runs on every candle device (CPU and CUDA) with no kernels of ours.
//!
//! Storage: K and V tensors `[batch, kv_heads, capacity, head_dim]` on the device. The capacity
//! doubles when full (one copy of the history per doubling, never one per step), up to the
//! configured maximum. Attention: GQA by viewing the queries as `[batch, kv_heads, groups·tokens,
//! head_dim]` (no repeated K/V heads materialised), scores in the cache dtype, softmax in f32
//! with the causal / length mask, zeros for padding rows.

use crate::cache::{KvCache, MemoryUsage, SeqState};
use crate::error::{fail, Error, Result};
use candle_core::{DType, Device, Tensor};

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
    /// The open step: what [`KvCache::rollback_step`] restores.
    step: Option<Saved>,
}

/// A full cache's state at the start of a step (tensors are shared, not copied: appends write
/// only past the saved lengths, and a grown capacity allocates new tensors).
#[derive(Debug, Clone)]
struct Saved {
    state: SeqState,
    k: Option<Tensor>,
    v: Option<Tensor>,
    capacity: usize,
    /// The step's decode appends checked on the device (CUDA), located on the host on error.
    pending: crate::cache::PendingChecks,
}

impl FullCache {
    /// On CUDA, reads the status word single-token appends set on NaN/Inf keys or values
    /// (synchronizes; attention over such a cache returns NaN meanwhile). Prefill appends, and
    /// every append on the CPU, check at once and leave the cache unchanged on error.
    pub fn check_status(&self) -> Result<()> {
        match &self.status {
            Some(s) => Ok(s.check(&self.device)?),
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
            fail!(
                Unsupported,
                "a full-precision cache stores f32, f16 or bf16, not {dtype:?}"
            );
        }
        Ok(FullCache {
            state: SeqState::new(kv_heads, head_dim, max_tokens),
            dtype,
            device: device.clone(),
            k: None,
            v: None,
            capacity: 0,
            status: None,
            step: None,
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
    Ok(out.reshape((b, hq, t, d))?.to_dtype(qd)?)
}

impl KvCache for FullCache {
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
        let deferred = t == 1 && self.device.is_cuda() && self.step.is_some();
        if deferred {
            // A decode step on CUDA inside a step: checked on the device (no host round trip
            // per token and layer), read once by `check_step` before the step is committed.
            if self.status.is_none() {
                self.status = Some(std::sync::Arc::new(crate::cuda_ops::DeviceStatus::new(
                    &self.device,
                )?));
            }
            let s = self.status.as_ref().unwrap();
            s.check_finite(k)?;
            s.check_finite(v)?;
        } else {
            self.state.check_values("keys", k, &new)?;
            self.state.check_values("values", v, &new)?;
        }
        let have: Vec<usize> = (0..b)
            .map(|i| self.state.lens.get(i).copied().unwrap_or(0))
            .collect();
        let needed = have.iter().zip(&new).map(|(h, n)| h + n).max().unwrap_or(0);
        self.grow(b, needed)?;
        let (kc, vc) = (self.k.as_ref().unwrap(), self.v.as_ref().unwrap());
        let kx = k.to_dtype(self.dtype)?;
        let vx = v.to_dtype(self.dtype)?;
        for i in 0..b {
            if new[i] == 0 {
                continue;
            }
            let ks = kx.narrow(0, i, 1)?.narrow(2, 0, new[i])?.contiguous()?;
            let vs = vx.narrow(0, i, 1)?.narrow(2, 0, new[i])?.contiguous()?;
            kc.narrow(0, i, 1)?.slice_set(&ks, 2, have[i])?;
            vc.narrow(0, i, 1)?.slice_set(&vs, 2, have[i])?;
        }
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
        let (Some(kc), Some(vc)) = (self.k.as_ref(), self.v.as_ref()) else {
            return Err(Error::Empty);
        };
        crate::cache::check_cpu_queries(q)?;
        dense_attention(&self.state, kc, vc, q, scale, self.dtype)
    }

    fn begin_step(&mut self) -> Result<()> {
        if self.step.is_some() {
            fail!(Protocol, "begin_step: a step is open already");
        }
        self.step = Some(Saved {
            state: self.state.clone(),
            k: self.k.clone(),
            v: self.v.clone(),
            capacity: self.capacity,
            pending: Default::default(),
        });
        Ok(())
    }

    fn poll_step(&self) -> Result<()> {
        if let (Some(st), Some(status)) = (&self.step, &self.status) {
            if !st.pending.is_empty() {
                status.request(&self.device)?;
            }
        }
        Ok(())
    }

    fn check_step(&self) -> Result<()> {
        let (Some(st), Some(status)) = (&self.step, &self.status) else {
            return Ok(());
        };
        if st.pending.is_empty() {
            return Ok(());
        }
        // A bad status names the value: the step's decode inputs are still held.
        st.pending.check(status.collect(&self.device))
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
        if let Some(s) = &self.status {
            if let Err(e) = s.clear(&self.device) {
                self.reset();
                return Err(e.into());
            }
        }
        Ok(())
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
        self.step = None;
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
