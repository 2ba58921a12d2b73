//! The full-precision baseline cache (f32 / f16 / bf16), built from candle tensor ops only, so
//! it runs on every candle device (CPU and CUDA) with no kernels of ours.
//!
//! Storage: K and V tensors `[batch, kv_heads, capacity, head_dim]` on the device, whose
//! capacity doubles when full (one copy of the history per doubling, never one per step), up to
//! the configured maximum; or, built in an arena ([`FullCache::new_in`]: a server's), tiles of
//! `slots` positions — keys `[kv_heads, slots, head_dim]` then values, in the cache's dtype —
//! reached through per-sequence tables (`tqkv::paged::full_tiles`), gathered into dense K and V
//! for each attend (vLLM's paged layout, without a paged attention kernel: one copy per call).
//! Attention: GQA by viewing the queries as `[batch, kv_heads, groups·tokens, head_dim]` (no
//! repeated K/V heads materialised), scores in the cache dtype, softmax in f32 with the causal /
//! length mask, zeros for padding rows.

use crate::arena::TileArena;
use crate::cache::{KvCache, MemoryUsage, SeqState};
use crate::error::{fail, Error, Result};
use crate::tile_ops::{GatherRows, RowsPlace, ScatterRows};
use crate::tile_tables::{copied, need_tiles, provide, taken_since};
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;
use tqkv::paged::{TileRows, NO_TILE};

/// Keys and values kept as they came, in one float dtype.
#[derive(Debug)]
pub struct FullCache {
    state: SeqState,
    dtype: DType,
    device: Device,
    k: Option<Tensor>,
    v: Option<Tensor>,
    capacity: usize,
    /// The arena, where keys and values sit in its tiles, and each sequence's table.
    paged: Option<Paged>,
    /// CUDA: the status word decode steps check their keys and values into (no host round
    /// trip per token; [`FullCache::check_status`] reads it).
    status: Option<std::sync::Arc<crate::cuda_ops::DeviceStatus>>,
    /// The open step: what [`KvCache::rollback_step`] restores.
    step: Option<Saved>,
}

/// A full cache in an arena.
#[derive(Debug)]
struct Paged {
    arena: Arc<TileArena>,
    keys: TileRows,
    values: TileRows,
    tables: Vec<Vec<u32>>,
}

/// A full cache's state at the start of a step (tensors are shared, not copied: appends write
/// only past the saved lengths, and a grown capacity allocates new tensors; a paged cache's
/// tables are saved, and a tile it stops holding is kept until the step commits).
#[derive(Debug, Clone)]
struct Saved {
    state: SeqState,
    k: Option<Tensor>,
    v: Option<Tensor>,
    capacity: usize,
    tables: Vec<Vec<u32>>,
    retired: Vec<u32>,
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
            paged: None,
            status: None,
            step: None,
        })
    }

    /// A cache like [`Self::new`] whose keys and values live in the tiles of `arena` (on its
    /// device), shared with the other caches built in it. Errors when a tile holds no position.
    pub fn new_in(
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        arena: &Arc<TileArena>,
        max_tokens: Option<usize>,
    ) -> Result<Self> {
        let mut c = Self::new(kv_heads, head_dim, dtype, arena.device(), max_tokens)?;
        let (keys, values) = tqkv::paged::full_tiles(
            arena.tile_bytes(),
            kv_heads,
            head_dim,
            dtype.size_in_bytes(),
        )?;
        c.paged = Some(Paged {
            arena: arena.clone(),
            keys,
            values,
            tables: Vec::new(),
        });
        Ok(c)
    }

    /// Writes the append's real tokens into the arena's tiles: every tile they need first (all
    /// or none), then the rows; the tables change only on success.
    fn append_paged(
        &mut self,
        kx: &Tensor,
        vx: &Tensor,
        have: &[usize],
        new: &[usize],
    ) -> Result<()> {
        let p = self.paged.as_ref().expect("paged");
        let mut tables = p.tables.clone();
        tables.resize(have.len(), Vec::new());
        let mut wants = Vec::new();
        for (i, t) in tables.iter_mut().enumerate() {
            let tiles = p.keys.tiles_covering(have[i]..have[i] + new[i]);
            need_tiles(&p.arena, t, tiles, (i, 0), &mut wants);
        }
        let fresh = provide(&p.arena, &wants)?;
        for (&(i, _, j, _), &t) in wants.iter().zip(&fresh) {
            tables[i][j] = t;
        }
        let write = || -> Result<()> {
            let data = p.arena.tensor()?;
            for i in 0..have.len() {
                if new[i] == 0 {
                    continue;
                }
                for (x, rows) in [(kx, p.keys), (vx, p.values)] {
                    let rows_in = x.narrow(0, i, 1)?.narrow(2, 0, new[i])?.contiguous()?;
                    data.inplace_op2(
                        &rows_in,
                        &ScatterRows(RowsPlace {
                            rows,
                            table: tables[i].clone(),
                            first: have[i],
                            n: new[i],
                        }),
                    )?;
                }
            }
            Ok(())
        };
        if let Err(e) = write() {
            p.arena.release(&fresh);
            return Err(e);
        }
        let dropped: Vec<u32> = copied(&wants).collect();
        self.paged.as_mut().expect("paged").tables = tables;
        self.drop_refs(&dropped);
        Ok(())
    }

    /// Dense keys and values `[batch, kv_heads, max len, head_dim]` gathered from the tiles
    /// (zeros past a shorter sequence's length).
    fn gather(&self, p: &Paged) -> Result<(Tensor, Tensor)> {
        let data = p.arena.tensor()?;
        let l = self.state.lens.iter().copied().max().unwrap_or(0).max(1);
        let (h, d) = (self.state.kv_heads, self.state.head_dim);
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (i, &n) in self.state.lens.iter().enumerate() {
            for (rows, out) in [(p.keys, &mut ks), (p.values, &mut vs)] {
                let mut x = if n == 0 {
                    Tensor::zeros((1, h, 0, d), self.dtype, &self.device)?
                } else {
                    data.apply_op1_no_bwd(&GatherRows {
                        place: RowsPlace {
                            rows,
                            table: p.tables[i].clone(),
                            first: 0,
                            n,
                        },
                        dtype: self.dtype,
                    })?
                };
                if n < l {
                    let pad = Tensor::zeros((1, h, l - n, d), self.dtype, &self.device)?;
                    x = Tensor::cat(&[x, pad], 2)?;
                }
                out.push(x);
            }
        }
        Ok((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?))
    }

    /// Drops one reference to each of `tiles`: at once, or at the open step's commit.
    fn drop_refs(&mut self, tiles: &[u32]) {
        match (self.step.as_mut(), &self.paged) {
            (Some(st), _) => st.retired.extend_from_slice(tiles),
            (None, Some(p)) => p.arena.release(tiles),
            (None, None) => {}
        }
    }

    /// Every tile the cache holds (its tables and an open step's retired ones), released; the
    /// tables forgotten.
    fn release_all(&mut self) {
        let retired = self
            .step
            .as_ref()
            .map(|s| s.retired.clone())
            .unwrap_or_default();
        if let Some(p) = self.paged.as_mut() {
            let all: Vec<u32> = p
                .tables
                .iter()
                .flatten()
                .copied()
                .filter(|&t| t != NO_TILE)
                .chain(retired)
                .collect();
            p.arena.release(&all);
            p.tables.clear();
        }
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

impl FullCache {
    /// The end of an append once its tokens are stored: the device checks kept for the step,
    /// the lengths recorded.
    fn finish_append(
        &mut self,
        k: &Tensor,
        v: &Tensor,
        b: usize,
        t: usize,
        new: Vec<usize>,
        deferred: bool,
    ) -> Result<()> {
        if deferred {
            let before = self.state.clone();
            if let Some(st) = self.step.as_mut() {
                st.pending.push(k, v, &new, before);
            }
        }
        self.state.commit(b, t, new);
        Ok(())
    }
}

impl Drop for FullCache {
    fn drop(&mut self) {
        self.release_all();
    }
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
        let kx = k.to_dtype(self.dtype)?;
        let vx = v.to_dtype(self.dtype)?;
        if self.paged.is_some() {
            self.append_paged(&kx, &vx, &have, &new)?;
            return self.finish_append(k, v, b, t, new, deferred);
        }
        let needed = have.iter().zip(&new).map(|(h, n)| h + n).max().unwrap_or(0);
        self.grow(b, needed)?;
        let (kc, vc) = (self.k.as_ref().unwrap(), self.v.as_ref().unwrap());
        for i in 0..b {
            if new[i] == 0 {
                continue;
            }
            let ks = kx.narrow(0, i, 1)?.narrow(2, 0, new[i])?.contiguous()?;
            let vs = vx.narrow(0, i, 1)?.narrow(2, 0, new[i])?.contiguous()?;
            kc.narrow(0, i, 1)?.slice_set(&ks, 2, have[i])?;
            vc.narrow(0, i, 1)?.slice_set(&vs, 2, have[i])?;
        }
        self.finish_append(k, v, b, t, new, deferred)
    }

    fn attend(&self, q: &Tensor, scale: f64) -> Result<Tensor> {
        if let Some(p) = &self.paged {
            self.state.check_queries(q)?;
            crate::cache::check_cpu_queries(q)?;
            let (kc, vc) = self.gather(p)?;
            return dense_attention(&self.state, &kc, &vc, q, scale, self.dtype);
        }
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
            tables: self
                .paged
                .as_ref()
                .map(|p| p.tables.clone())
                .unwrap_or_default(),
            retired: Vec::new(),
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
        if let (Some(st), Some(p)) = (self.step.take(), &self.paged) {
            p.arena.release(&st.retired);
        }
    }

    fn rollback_step(&mut self) -> Result<()> {
        let Some(st) = self.step.take() else {
            return Ok(());
        };
        if let Some(p) = self.paged.as_mut() {
            let held = |t: &Vec<Vec<u32>>| -> Vec<u32> {
                t.iter()
                    .flatten()
                    .copied()
                    .filter(|&x| x != NO_TILE)
                    .collect()
            };
            let taken = taken_since(
                held(&st.tables).into_iter(),
                held(&p.tables).into_iter(),
                &st.retired,
            );
            p.arena.release(&taken);
            p.tables = st.tables;
        }
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
        self.release_all();
        self.state.reset();
        self.k = None;
        self.v = None;
        self.capacity = 0;
        self.status = None;
        self.step = None;
    }

    fn memory(&self) -> MemoryUsage {
        let per_token = 2 * self.state.kv_heads * self.state.head_dim * self.dtype.size_in_bytes();
        let allocated = match &self.paged {
            Some(p) => self.tiles_held() * p.arena.tile_bytes(),
            None => self.state.lens.len() * self.capacity * per_token,
        };
        MemoryUsage {
            logical: self.state.lens.iter().sum::<usize>() * per_token,
            allocated,
            tables: 0,
        }
    }

    fn tiles_held(&self) -> usize {
        self.tile_ids().len()
    }

    fn tile_ids(&self) -> Vec<u32> {
        self.paged.as_ref().map_or_else(Vec::new, |p| {
            p.tables
                .iter()
                .flatten()
                .copied()
                .filter(|&t| t != NO_TILE)
                .collect()
        })
    }

    fn tiles_for(&self, _have: usize, total: usize) -> Option<(usize, usize)> {
        let p = self.paged.as_ref()?;
        let n = p.keys.tiles_covering(0..total).len();
        Some((n, n))
    }

    fn truncate(&mut self, seq: usize, len: usize) -> Result<()> {
        if self.step.is_some() {
            fail!(Protocol, "truncate inside an open step");
        }
        let Some(&n) = self.state.lens.get(seq) else {
            fail!(Shape, "truncate: the cache holds no sequence {seq}");
        };
        if len > n {
            fail!(
                Shape,
                "truncate: sequence {seq} holds {n} tokens, not {len}"
            );
        }
        if let Some(p) = self.paged.as_mut() {
            let t = &mut p.tables[seq];
            let keep = p.keys.tiles_covering(0..len).end.min(t.len());
            let gone: Vec<u32> = t.drain(keep..).filter(|&t| t != NO_TILE).collect();
            p.arena.release(&gone);
        }
        // Own buffers: the positions past len are written over by the next append.
        self.state.lens[seq] = len;
        if let Some(x) = self.state.last_new.get_mut(seq) {
            *x = 0;
        }
        Ok(())
    }

    fn fork(&self, seq: usize) -> Result<Box<dyn KvCache>> {
        let Some(p) = &self.paged else {
            fail!(Unsupported, "only a paged full cache forks");
        };
        if self.step.is_some() {
            fail!(Protocol, "fork inside an open step");
        }
        let (Some(table), Some(&n)) = (p.tables.get(seq), self.state.lens.get(seq)) else {
            fail!(Shape, "fork: the cache holds no sequence {seq}");
        };
        // Shares every tile; the partial last one, where the next token goes, is its own copy.
        let mut table = table.clone();
        let last = n / p.keys.per_tile;
        let mut wants = Vec::new();
        if n % p.keys.per_tile != 0 {
            if let Some(&t) = table.get(last).filter(|&&t| t != NO_TILE) {
                wants.push((0, 0, last, crate::tile_tables::Need::Copy(t)));
            }
        }
        let fresh = provide(&p.arena, &wants)?;
        let copies: Vec<u32> = copied(&wants).collect();
        let shared: Vec<u32> = table
            .iter()
            .copied()
            .filter(|t| *t != NO_TILE && !copies.contains(t))
            .collect();
        if let Err(e) = p.arena.retain(&shared) {
            p.arena.release(&fresh);
            return Err(e);
        }
        for (w, &t) in wants.iter().zip(&fresh) {
            table[w.2] = t;
        }
        let mut state = self.state.clone();
        state.lens = vec![n];
        state.last_new = vec![0];
        state.last_chunk = 0;
        Ok(Box::new(FullCache {
            state,
            dtype: self.dtype,
            device: self.device.clone(),
            k: None,
            v: None,
            capacity: 0,
            paged: Some(Paged {
                arena: p.arena.clone(),
                keys: p.keys,
                values: p.values,
                tables: vec![table],
            }),
            status: None,
            step: None,
        }))
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
