//! The attention layer a candle model embeds: append the step's keys and values to the layer's
//! cache, then attend with the step's queries (DESIGN.md "Attention in the rotated domain" for
//! the TurboQuant caches). RoPE is applied by the caller, as in candle's llama.
//!
//! Long prefills are split into chunks of at most `chunk` tokens (default 512): each chunk is
//! appended and its queries attend the cache (the quantized past plus the chunk itself), which
//! bounds the memory of the score matrix. GQA is handled by the caches without materialising
//! repeated KV heads.

use crate::cache::{dims4, KvCache, MemoryUsage};
use candle_core::{Result, Tensor};

/// Causal self-attention over a [`KvCache`].
pub struct Attention {
    cache: Box<dyn KvCache>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    scale: f64,
    chunk: usize,
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
            candle_core::bail!("{n_heads} query heads is not a multiple of {n_kv_heads} KV heads");
        }
        Ok(Attention {
            cache,
            n_heads,
            n_kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
            chunk: 512,
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
            candle_core::bail!(
                "expected queries with {} heads and keys with {} heads of dim {}, got {hq} and {hk} heads of dims {d} and {dk}",
                self.n_heads,
                self.n_kv_heads,
                self.head_dim
            );
        }
        if tk != t || k.dim(0)? != b {
            candle_core::bail!(
                "queries {:?} and keys {:?} must cover the same batch and tokens",
                q.dims(),
                k.dims()
            );
        }
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
        Tensor::cat(&outs, 2)
    }

    /// Replaces the cache (e.g. by one of another kind); returns the old one.
    pub fn set_cache(&mut self, cache: Box<dyn KvCache>) -> Box<dyn KvCache> {
        std::mem::replace(&mut self.cache, cache)
    }

    /// The cache.
    pub fn cache(&self) -> &dyn KvCache {
        self.cache.as_ref()
    }

    /// Forgets all tokens.
    pub fn reset(&mut self) {
        self.cache.reset()
    }

    /// Bytes held by the cache.
    pub fn memory(&self) -> MemoryUsage {
        self.cache.memory()
    }
}
