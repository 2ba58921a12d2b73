//! The attention layer a candle model embeds: append the step's keys and values to the layer's
//! cache, then attend with the step's queries (DESIGN.md "Attention in the rotated domain" for
//! the TurboQuant caches). RoPE is applied by the caller, as in candle's llama.
//!
//! Long prefills are split into chunks of at most `chunk` tokens (default 512): each chunk is
//! appended and its queries attend the cache (the quantized past plus the chunk itself), which
//! bounds the memory of the score matrix. GQA is handled by the caches without materialising
//! repeated KV heads.
//!
//! Each forward is one step of the cache ([`KvCache::begin_step`]): it completes, or the cache
//! is left exactly as before (every chunk undone). A caller that runs several layers as one
//! step (a model) opens the step itself with [`Attention::begin_step`] and closes it after the
//! last layer with [`Attention::check_step`] + [`Attention::commit_step`], or
//! [`Attention::rollback_step`].

use crate::cache::{dims4, KvCache, MemoryUsage};
use crate::error::{fail, Error, Result};
use candle_core::Tensor;

/// Causal self-attention over a [`KvCache`].
pub struct Attention {
    cache: Box<dyn KvCache>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    scale: f64,
    chunk: usize,
    /// A step opened by the caller ([`Self::begin_step`]) is open.
    step_open: bool,
}

impl Attention {
    /// A layer with `n_heads` query heads and `n_kv_heads` KV heads of `head_dim`, over `cache`;
    /// softmax scale 1/√head_dim.
    pub fn new(
        cache: Box<dyn KvCache>,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        if n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            fail!(
                Shape,
                "{n_heads} query heads is not a multiple of {n_kv_heads} KV heads"
            );
        }
        Ok(Attention {
            cache,
            n_heads,
            n_kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
            chunk: 512,
            step_open: false,
        })
    }

    /// Replaces the softmax scale.
    pub fn with_scale(mut self, scale: f64) -> Self {
        self.scale = scale;
        self
    }

    /// Sets the largest prefill chunk (≥ 1).
    pub fn with_chunk(mut self, chunk: usize) -> Self {
        self.chunk = chunk.max(1);
        self
    }

    /// `q` `[batch, n_heads, tokens, head_dim]`, `k`, `v` `[batch, n_kv_heads, tokens, head_dim]`
    /// (all sequences have `tokens` real tokens). Returns `[batch, n_heads, tokens, head_dim]`.
    pub fn forward(&mut self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        self.forward_with_lens(q, k, v, None)
    }

    /// As [`Self::forward`], where sequence b has only `lens[b]` real (leading) tokens; the
    /// output rows of padding tokens are zeros.
    pub fn forward_with_lens(
        &mut self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        lens: Option<&[usize]>,
    ) -> Result<Tensor> {
        let (b, hq, t, d) = dims4("queries", q)?;
        let (_, hk, tk, dk) = dims4("keys", k)?;
        if hq != self.n_heads || hk != self.n_kv_heads || d != self.head_dim || dk != self.head_dim
        {
            fail!(
                Shape,
                "expected queries with {} heads and keys with {} heads of dim {}, got {hq} and {hk} heads of dims {d} and {dk}",
                self.n_heads,
                self.n_kv_heads,
                self.head_dim
            );
        }
        if tk != t || k.dim(0)? != b {
            fail!(
                Shape,
                "queries {:?} and keys {:?} must cover the same batch and tokens",
                q.dims(),
                k.dims()
            );
        }
        if self.step_open {
            return self.run(q, k, v, lens);
        }
        self.cache.begin_step()?;
        let out = self
            .run(q, k, v, lens)
            .and_then(|y| self.cache.poll_step().map(|()| y))
            .and_then(|y| self.cache.check_step().map(|()| y));
        match out {
            Ok(y) => {
                self.cache.commit_step();
                Ok(y)
            }
            Err(e) => Err(undo(self.cache.as_mut(), e)),
        }
    }

    /// The appends and attends of one forward, in chunks.
    fn run(
        &mut self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        lens: Option<&[usize]>,
    ) -> Result<Tensor> {
        let t = q.dim(2)?;
        if t <= self.chunk {
            self.cache.append(k, v, lens)?;
            return self.cache.attend(q, self.scale);
        }
        let mut outs = Vec::new();
        let mut off = 0;
        while off < t {
            let n = self.chunk.min(t - off);
            let chunk_lens: Option<Vec<usize>> =
                lens.map(|l| l.iter().map(|&x| x.saturating_sub(off).min(n)).collect());
            self.cache.append(
                &k.narrow(2, off, n)?,
                &v.narrow(2, off, n)?,
                chunk_lens.as_deref(),
            )?;
            outs.push(self.cache.attend(&q.narrow(2, off, n)?, self.scale)?);
            off += n;
        }
        Ok(Tensor::cat(&outs, 2)?)
    }

    /// Opens a step spanning several forwards (e.g. every layer of a model step): forwards
    /// until [`Self::commit_step`] or [`Self::rollback_step`] append inside it.
    pub fn begin_step(&mut self) -> Result<()> {
        self.cache.begin_step()?;
        self.step_open = true;
        Ok(())
    }

    /// Starts reading what [`Self::check_step`] checks, without waiting (see
    /// [`KvCache::poll_step`]).
    pub fn poll_step(&self) -> Result<()> {
        self.cache.poll_step()
    }

    /// Checks what the step's appends deferred (the CUDA status word), without closing it.
    pub fn check_step(&self) -> Result<()> {
        self.cache.check_step()
    }

    /// Closes the step opened by [`Self::begin_step`], keeping its appends.
    pub fn commit_step(&mut self) {
        self.cache.commit_step();
        self.step_open = false;
    }

    /// Closes the step opened by [`Self::begin_step`], undoing its appends.
    pub fn rollback_step(&mut self) -> Result<()> {
        self.step_open = false;
        self.cache.rollback_step()
    }

    /// Replaces the cache (e.g. by one of another kind); returns the old one.
    pub fn set_cache(&mut self, cache: Box<dyn KvCache>) -> Box<dyn KvCache> {
        self.step_open = false;
        std::mem::replace(&mut self.cache, cache)
    }

    /// The cache.
    pub fn cache(&self) -> &dyn KvCache {
        self.cache.as_ref()
    }

    /// A layer like this one over a fork of its cache's sequence `0` ([`KvCache::fork`]).
    pub fn fork(&self) -> Result<Attention> {
        if self.step_open {
            fail!(Protocol, "fork inside an open step");
        }
        Ok(Attention {
            cache: self.cache.fork(0)?,
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            scale: self.scale,
            chunk: self.chunk,
            step_open: false,
        })
    }

    /// The cache, mutably (truncation and the like; a step of the layer must not be open).
    pub fn cache_mut(&mut self) -> &mut dyn KvCache {
        self.cache.as_mut()
    }

    /// Forgets all tokens (and closes an open step).
    pub fn reset(&mut self) {
        self.step_open = false;
        self.cache.reset()
    }

    /// Bytes held by the cache.
    pub fn memory(&self) -> MemoryUsage {
        self.cache.memory()
    }
}

/// Rolls the open step of `cache` back after `e`; returns `e`, or, if restoring failed too (the
/// cache has then reset itself), an error saying both.
pub(crate) fn undo(cache: &mut dyn KvCache, e: Error) -> Error {
    match cache.rollback_step() {
        Ok(()) => e,
        Err(r) => Error::Protocol(format!(
            "{e}; undoing the step failed too ({r}), so the cache was reset"
        )),
    }
}
