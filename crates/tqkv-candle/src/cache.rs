//! The KV-cache trait a model calls once per layer, the per-sequence bookkeeping every cache
//! shares, and the input checks (shapes, dtypes, devices, NaN/Inf) that turn bad input into
//! errors that name the problem.
//!
//! Tensor layout everywhere: `[batch, heads, tokens, head_dim]`, as in candle's llama.

use crate::error::{fail, BadValue, Error, Result};
use candle_core::{DType, Device, Tensor};

/// Bytes a cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryUsage {
    /// Bytes of the tokens actually stored (what the cache's format costs per token × tokens).
    pub logical: usize,
    /// Bytes allocated (capacity included).
    pub allocated: usize,
    /// Bytes of per-layer tables the stored tokens need beside themselves (calibration,
    /// rotations, sketches), held once however many tokens and sequences there are; not part of
    /// `logical` or `allocated`.
    pub tables: usize,
}

impl std::ops::Add for MemoryUsage {
    type Output = MemoryUsage;
    fn add(self, o: MemoryUsage) -> MemoryUsage {
        MemoryUsage {
            logical: self.logical + o.logical,
            allocated: self.allocated + o.allocated,
            tables: self.tables + o.tables,
        }
    }
}

/// A per-layer KV cache.
///
/// Protocol per forward step: [`KvCache::append`] the step's new keys and values (a prefill
/// chunk or one decode token per sequence), then [`KvCache::attend`] with the queries of those
/// same tokens. Query t of sequence b sits at position `len_b − new_b + t` and sees every cached
/// position up to and including its own (causal); rows t ≥ new_b of a shorter sequence are
/// padding and come back as zeros. RoPE is applied by the caller before `append`/`attend`.
pub trait KvCache: Send + Sync {
    /// Appends keys and values `[batch, kv_heads, tokens, head_dim]`. `lens[b]` (default: all
    /// `tokens`) says how many leading tokens of sequence b are real; the rest is padding.
    /// On error the cache is unchanged.
    fn append(&mut self, k: &Tensor, v: &Tensor, lens: Option<&[usize]>) -> Result<()>;

    /// Attention of the queries `[batch, q_heads, tokens, head_dim]` of the last append over the
    /// cache: `softmax(scale · q Kᵀ + causal mask) V`, GQA when `q_heads` is a multiple of the
    /// KV heads. Returns `[batch, q_heads, tokens, head_dim]` in the queries' dtype and device.
    fn attend(&self, q: &Tensor, scale: f64) -> Result<Tensor>;

    /// Tokens stored per sequence.
    fn seq_lens(&self) -> &[usize];

    /// Opens a step: the appends until [`KvCache::commit_step`] or [`KvCache::rollback_step`]
    /// (one decode token, a prefill of several chunks, or one layer's part of a model step)
    /// can be undone as a whole — lengths, stored tokens, calibration and device status go
    /// back to what they were here. Errors if a step is open already.
    fn begin_step(&mut self) -> Result<()>;

    /// Starts reading what [`KvCache::check_step`] will look at (on CUDA: enqueues a copy of
    /// the device status word to page-locked host memory), without waiting. A model polls
    /// every layer after its step, then checks them: one wait per step.
    fn poll_step(&self) -> Result<()> {
        Ok(())
    }

    /// Checks what the step's appends left for later (on CUDA, the device status word that
    /// decode appends set on NaN/Inf input; nothing on the CPU, which checks at once), without
    /// closing the step: on error the caller rolls the step back (of every layer).
    fn check_step(&self) -> Result<()> {
        Ok(())
    }

    /// Closes the open step, keeping its appends (does nothing when none is open).
    fn commit_step(&mut self);

    /// Closes the open step, undoing its appends; the cache is as it was at
    /// [`KvCache::begin_step`]. Does nothing when no step is open. Should restoring fail (a
    /// device error), the cache is [`KvCache::reset`] and the error returned.
    fn rollback_step(&mut self) -> Result<()>;

    /// Forgets every token (keeps the configuration and, where it has one, the calibration);
    /// closes an open step.
    fn reset(&mut self);

    /// Bytes held.
    fn memory(&self) -> MemoryUsage;

    /// A short name of the kind, e.g. `f16`, `q8`, `tq3.5`.
    fn kind_name(&self) -> String;

    /// Tiles of its arena the cache holds (a tile shared with other caches counts in each);
    /// 0 for kinds that keep their own buffers.
    fn tiles_held(&self) -> usize {
        0
    }

    /// The arena tiles the cache holds references to (empty for kinds that keep their own
    /// buffers): accounting checks count the distinct ones against the arena's own count.
    fn tile_ids(&self) -> Vec<u32> {
        Vec::new()
    }

    /// For a paged cache: (tiles it holds right after appending a sequence from `have` to
    /// `total` tokens, tiles it holds once that step commits) — what a server plans its
    /// arena with. `None` for kinds that keep their own buffers, or before the calibration a
    /// kind's layout depends on.
    fn tiles_for(&self, _have: usize, _total: usize) -> Option<(usize, usize)> {
        None
    }

    /// Drops the tokens of sequence `seq` past `len` (≤ its length), as if they had never been
    /// appended; outside a step. A kind that quantized positions the shorter sequence reads
    /// exactly (a TurboQuant window) errors and changes nothing, unless it kept their rows
    /// ([`KvCache::set_truncation_margin`]).
    fn truncate(&mut self, _seq: usize, _len: usize) -> Result<()> {
        Err(Error::Unsupported(format!(
            "the {} KV cache cannot be truncated",
            self.kind_name()
        )))
    }

    /// Keeps what truncating any sequence by up to `tokens` tokens needs (a TurboQuant cache
    /// with an exact window: the rows of the positions those shorter windows read, held longer;
    /// nothing for kinds that can always truncate).
    fn set_truncation_margin(&mut self, _tokens: usize) {}

    /// A new cache (batch 1) holding sequence `seq` of this one, sharing its storage where
    /// the kind can (paged caches: the tiles, reference-counted), outside a step.
    fn fork(&self, _seq: usize) -> Result<Box<dyn KvCache>> {
        Err(Error::Unsupported(format!(
            "the {} KV cache cannot be forked",
            self.kind_name()
        )))
    }
}

/// Shape and bookkeeping shared by all caches: sequence lengths and the last append.
#[derive(Debug, Clone)]
pub struct SeqState {
    /// KV heads.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Largest number of tokens per sequence (None: unbounded).
    pub max_tokens: Option<usize>,
    /// Tokens stored per sequence (empty until the first append fixes the batch size).
    pub lens: Vec<usize>,
    /// Real tokens per sequence in the last append.
    pub last_new: Vec<usize>,
    /// Tokens dimension of the last append (padding included).
    pub last_chunk: usize,
}

impl SeqState {
    /// A state for `kv_heads` heads of `head_dim`.
    pub fn new(kv_heads: usize, head_dim: usize, max_tokens: Option<usize>) -> Self {
        SeqState {
            kv_heads,
            head_dim,
            max_tokens,
            lens: Vec::new(),
            last_new: Vec::new(),
            last_chunk: 0,
        }
    }

    /// Checks an append and returns (batch, tokens, new tokens per sequence) without changing
    /// anything; [`Self::commit`] records it once the data is stored.
    pub fn plan(
        &self,
        k: &Tensor,
        v: &Tensor,
        lens: Option<&[usize]>,
    ) -> Result<(usize, usize, Vec<usize>)> {
        let (b, h, t, d) = dims4("keys", k)?;
        let vd = dims4("values", v)?;
        if vd != (b, h, t, d) {
            fail!(Shape,
                "keys {:?} and values {:?} must have the same shape [batch, kv_heads, tokens, head_dim]",
                k.dims(),
                v.dims()
            );
        }
        if h != self.kv_heads || d != self.head_dim {
            fail!(
                Shape,
                "this cache holds {} KV heads of dim {}, got keys with {h} heads of dim {d}",
                self.kv_heads,
                self.head_dim
            );
        }
        check_float("keys", k)?;
        check_float("values", v)?;
        if !k.device().same_device(v.device()) {
            fail!(Device, "keys and values are on different devices");
        }
        if !self.lens.is_empty() && self.lens.len() != b {
            fail!(Shape,
                "the cache holds {} sequences, the append has batch {b}; reset() to change the batch",
                self.lens.len()
            );
        }
        let new: Vec<usize> = match lens {
            None => vec![t; b],
            Some(l) => {
                if l.len() != b {
                    fail!(Shape, "lens has {} entries for a batch of {b}", l.len());
                }
                if let Some((i, &n)) = l.iter().enumerate().find(|(_, &n)| n > t) {
                    fail!(Shape, "lens[{i}] = {n} exceeds the {t} tokens appended");
                }
                l.to_vec()
            }
        };
        if let Some(max) = self.max_tokens {
            for (i, &n) in new.iter().enumerate() {
                let have = self.lens.get(i).copied().unwrap_or(0);
                if have + n > max {
                    return Err(Error::CacheFull {
                        seq: i,
                        have,
                        add: n,
                        max,
                    });
                }
            }
        }
        Ok((b, t, new))
    }

    /// Records an append planned by [`Self::plan`].
    pub fn commit(&mut self, b: usize, t: usize, new: Vec<usize>) {
        if self.lens.is_empty() {
            self.lens = vec![0; b];
        }
        for (l, n) in self.lens.iter_mut().zip(&new) {
            *l += n;
        }
        self.last_new = new;
        self.last_chunk = t;
    }

    /// Start position of the last append in sequence b.
    pub fn start(&self, b: usize) -> usize {
        self.lens[b] - self.last_new[b]
    }

    /// Positions visible to query row t of sequence b (0 for padding rows).
    pub fn visible(&self, b: usize, t: usize) -> usize {
        if t < self.last_new[b] {
            self.start(b) + t + 1
        } else {
            0
        }
    }

    /// Checks the queries of an attend: returns (batch, q_heads, tokens, groups).
    pub fn check_queries(&self, q: &Tensor) -> Result<(usize, usize, usize, usize)> {
        let (b, hq, t, d) = dims4("queries", q)?;
        check_float("queries", q)?;
        if self.lens.is_empty() {
            return Err(Error::Empty);
        }
        if b != self.lens.len() || t != self.last_chunk {
            fail!(
                Shape,
                "queries [batch {b}, tokens {t}] must match the last append [batch {}, tokens {}]",
                self.lens.len(),
                self.last_chunk
            );
        }
        if d != self.head_dim {
            fail!(
                Shape,
                "query head_dim {d} differs from the cache's {}",
                self.head_dim
            );
        }
        if hq == 0 || hq % self.kv_heads != 0 {
            fail!(
                Shape,
                "{hq} query heads is not a multiple of the {} KV heads (GQA)",
                self.kv_heads
            );
        }
        Ok((b, hq, t, hq / self.kv_heads))
    }

    /// Forgets all sequences.
    pub fn reset(&mut self) {
        self.lens.clear();
        self.last_new.clear();
        self.last_chunk = 0;
    }
}

/// The four dims of a rank-4 tensor, or an error naming it.
pub fn dims4(what: &str, t: &Tensor) -> Result<(usize, usize, usize, usize)> {
    match t.dims() {
        &[a, b, c, d] => Ok((a, b, c, d)),
        dims => fail!(
            Shape,
            "{what} must have rank 4 [batch, heads, tokens, head_dim], got shape {dims:?}"
        ),
    }
}

/// Errors unless `t` is f32, f16 or bf16.
pub fn check_float(what: &'static str, t: &Tensor) -> Result<()> {
    match t.dtype() {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        got => Err(Error::DType { what, got }),
    }
}

/// Copies a CPU tensor into a contiguous f32 vector; on another device an error says that this
/// cache kind has no kernels there (never a silent copy to the host). Values are not checked:
/// appends call [`SeqState::check_values`], attends [`check_queries_finite`].
pub fn host_f32(what: &str, kind: &str, t: &Tensor) -> Result<Vec<f32>> {
    if !matches!(t.device(), Device::Cpu) {
        fail!(
            Device,
            "the {kind} KV cache runs on the CPU only (no {} kernels for it); {what} is on {:?}",
            device_name(t.device()),
            t.device().location()
        );
    }
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Errors with the index of the first NaN/Inf among queries (row-major).
pub fn check_queries_finite(q: &[f32]) -> Result<()> {
    match q.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(Error::NonFiniteQuery {
            index,
            value: q[index],
        }),
        None => Ok(()),
    }
}

/// On the CPU, [`check_queries_finite`] of a query tensor (one reduction; the values are
/// copied only to locate a bad one). On CUDA nothing: a NaN query gives NaN rows there, rather
/// than a host sync per attention.
pub fn check_cpu_queries(q: &Tensor) -> Result<()> {
    if !matches!(q.device(), Device::Cpu) || all_finite(q)? {
        return Ok(());
    }
    check_queries_finite(&q.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Whether every element of `x` is finite: one reduction on its device (x · 0 is NaN exactly
/// where x is NaN or ±Inf), one scalar to the host.
fn all_finite(x: &Tensor) -> Result<bool> {
    let s = x
        .to_dtype(DType::F32)?
        .affine(0.0, 0.0)?
        .sum_all()?
        .to_scalar::<f32>()?;
    Ok(s.is_finite())
}

/// The decode appends of an open step whose values were checked on the device (the CUDA
/// status word), kept so that a bad status can name the value.
#[derive(Debug, Clone, Default)]
pub(crate) struct PendingChecks(Vec<(Tensor, Tensor, Vec<usize>, SeqState)>);

impl PendingChecks {
    /// Records an append of keys `k`, values `v` (`new` real tokens per sequence) to a cache
    /// in state `before`.
    pub fn push(&mut self, k: &Tensor, v: &Tensor, new: &[usize], before: SeqState) {
        self.0.push((k.clone(), v.clone(), new.to_vec(), before));
    }

    /// Whether nothing waits for a device check.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `status` (the device word's read) turned into the step's result: on a bad status, the
    /// first NaN/Inf among the recorded appends as [`Error::NonFinite`] (copied to the host to
    /// locate it), else the status's own error.
    pub fn check(&self, status: candle_core::Result<()>) -> Result<()> {
        let Err(e) = status else {
            return Ok(());
        };
        for (k, v, new, before) in &self.0 {
            before.check_values("keys", k, new)?;
            before.check_values("values", v, new)?;
        }
        Err(e.into())
    }
}

impl SeqState {
    /// Where flat index `i` of an append `[b, h, t, d]` sits (positions from the lengths held
    /// before the append).
    fn bad_value(
        &self,
        i: usize,
        (_, h, t, d): (usize, usize, usize, usize),
        value: f32,
    ) -> BadValue {
        let seq = i / (h * t * d);
        BadValue {
            seq,
            pos: self.lens.get(seq).copied().unwrap_or(0) + (i / d) % t,
            head: (i / (t * d)) % h,
            channel: i % d,
            value,
        }
    }

    /// Errors if the real tokens of an append (host `x` `[b, h, t, d]` row-major; `new[b]`
    /// leading tokens of sequence b) hold a NaN or ±Inf, naming where; call before committing.
    pub fn check_host_values(
        &self,
        what: &'static str,
        x: &[f32],
        dims: (usize, usize, usize, usize),
        new: &[usize],
    ) -> Result<()> {
        let (_, h, t, d) = dims;
        let bad = x
            .iter()
            .enumerate()
            .position(|(i, v)| !v.is_finite() && (i / d) % t < new[i / (h * t * d)]);
        match bad {
            Some(i) => Err(Error::NonFinite {
                what,
                at: self.bad_value(i, dims, x[i]),
            }),
            None => Ok(()),
        }
    }

    /// As [`Self::check_host_values`] for a tensor on any device: one reduction on the device
    /// and one scalar to the host; the tensor is copied to the host only to locate a bad value.
    pub fn check_values(&self, what: &'static str, x: &Tensor, new: &[usize]) -> Result<()> {
        let dims = dims4(what, x)?;
        if matches!(x.device(), Device::Cpu) {
            let host = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            return self.check_host_values(what, &host, dims, new);
        }
        if all_finite(x)? {
            return Ok(());
        }
        let host = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        // Padding rows may hold anything: a bad value there is not an error.
        self.check_host_values(what, &host, dims, new)
    }
}

fn device_name(d: &Device) -> &'static str {
    match d {
        Device::Cpu => "CPU",
        Device::Cuda(_) => "CUDA",
        Device::Metal(_) => "Metal",
    }
}

/// Runs `f` for every (sequence, KV head) in parallel on the grouped queries and assembles the
/// output `[batch, q_heads, tokens, head_dim]` (row-major f32).
///
/// `f(b, h, queries, visible, out)` gets the `groups · tokens` queries of KV head h (query heads
/// h·groups .. (h+1)·groups, all tokens, row-major `[groups·tokens, head_dim]`), their visible
/// lengths, and writes their outputs.
pub fn grouped_attention<F>(
    state: &SeqState,
    q: &[f32],
    q_heads: usize,
    tokens: usize,
    f: F,
) -> Result<Vec<f32>>
where
    F: Fn(usize, usize, &[f32], &[usize], &mut [f32]) -> Result<()> + Sync,
{
    use rayon::prelude::*;
    let d = state.head_dim;
    let b_n = state.lens.len();
    let g = q_heads / state.kv_heads;
    let block = g * tokens * d;
    // In [B, Hq, T, d] the queries of one (b, kv head) are contiguous: heads h·g..(h+1)·g.
    let mut out = vec![0.0f32; b_n * q_heads * tokens * d];
    out.par_chunks_mut(block)
        .enumerate()
        .try_for_each(|(idx, o)| {
            let (b, h) = (idx / state.kv_heads, idx % state.kv_heads);
            let qs = &q[idx * block..(idx + 1) * block];
            let visible: Vec<usize> = (0..g)
                .flat_map(|_| (0..tokens).map(move |t| state.visible(b, t)))
                .collect();
            f(b, h, qs, &visible, o)
        })?;
    Ok(out)
}

/// Grows a pair of `[batch, heads, capacity, width]` cache tensors (keys of width `widths.0`,
/// values of width `widths.1`) so that they hold `needed` slots: capacity doubles (at least 16,
/// at most the limit), the old contents are copied once. Returns the new capacity; does nothing
/// when there is room.
#[allow(clippy::too_many_arguments)]
pub(crate) fn grow_pair(
    k: &mut Option<Tensor>,
    v: &mut Option<Tensor>,
    capacity: usize,
    needed: usize,
    max_tokens: Option<usize>,
    (batch, heads): (usize, usize),
    widths: (usize, usize),
    dtype: DType,
    device: &Device,
) -> Result<usize> {
    if needed <= capacity && k.is_some() {
        return Ok(capacity);
    }
    let mut cap = needed.max(2 * capacity).max(16);
    if let Some(m) = max_tokens {
        cap = cap.min(m.max(needed));
    }
    for (slot, w) in [(k, widths.0), (v, widths.1)] {
        let t = Tensor::zeros((batch, heads, cap, w), dtype, device)?;
        if let Some(old) = slot.as_ref() {
            t.slice_set(old, 2, 0)?;
        }
        *slot = Some(t);
    }
    Ok(cap)
}
