//! The Llama-family decoder (Llama 2/3.x, Mistral, SmolLM2, Qwen2) over tqkv-candle's attention
//! layer, so that every layer's KV cache is whatever [`tqkv_candle::CacheConfig`] says.
//!
//! Weights come from Hugging Face safetensors (dense, in f32/f16/bf16) or from a GGUF file
//! (quantized matmuls through candle's `QMatMul`, activations in f32). GGUF stores the q/k rows
//! permuted for interleaved RoPE (llama.cpp's layout), so GGUF models rotate adjacent pairs
//! (`rope_i`) and safetensors models rotate halves (`rope`), which is the same function of the
//! original weights.

use crate::config::LlamaConfig;
use crate::{Error, Result};
use candle_core::quantized::{gguf_file, QMatMul};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, RmsNorm, VarBuilder};
use std::path::Path;
use tqkv_candle::{Attention, CacheConfig, MemoryUsage};

/// A dense or quantized linear layer (x Wᵀ + b).
#[derive(Debug, Clone)]
pub enum Linear {
    /// Dense weights.
    Dense(candle_nn::Linear),
    /// GGUF quantized weights.
    Quant(QMatMul, Option<Tensor>),
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Linear::Dense(l) => l.forward(x),
            Linear::Quant(w, b) => {
                let y = w.forward(x)?;
                match b {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
        }
    }
}

/// Where weights are read from.
enum Source<'a> {
    Safetensors(VarBuilder<'a>),
    Gguf {
        content: &'a gguf_file::Content,
        file: std::cell::RefCell<std::fs::File>,
        path: &'a Path,
        dequantize: bool,
    },
}

impl Source<'_> {
    fn qtensor(&self, name: &str, dev: &Device) -> Result<candle_core::quantized::QTensor> {
        match self {
            Source::Gguf {
                content,
                file,
                path,
                ..
            } => content
                .tensor(&mut *file.borrow_mut(), name, dev)
                .map_err(|e| {
                    Error::Weights(format!(
                        "{}: tensor {name}: {e} (missing, truncated or corrupt file?)",
                        path.display()
                    ))
                }),
            Source::Safetensors(_) => unreachable!(),
        }
    }

    fn has_gguf(&self, name: &str) -> bool {
        matches!(self, Source::Gguf { content, .. } if content.tensor_infos.contains_key(name))
    }

    fn linear(
        &self,
        hf: &str,
        gg: &str,
        din: usize,
        dout: usize,
        bias: bool,
        dev: &Device,
    ) -> Result<Linear> {
        match self {
            Source::Safetensors(vb) => {
                let l = if bias {
                    candle_nn::linear(din, dout, vb.pp(hf))
                } else {
                    candle_nn::linear_no_bias(din, dout, vb.pp(hf))
                };
                Ok(Linear::Dense(
                    l.map_err(|e| Error::Weights(format!("{hf}: {e}")))?,
                ))
            }
            Source::Gguf { dequantize, .. } => {
                let w = self.qtensor(&format!("{gg}.weight"), dev)?;
                if w.shape().dims() != [dout, din] {
                    return Err(Error::Weights(format!(
                        "{gg}.weight has shape {:?}, the config implies [{dout}, {din}]",
                        w.shape().dims()
                    )));
                }
                let b = if bias {
                    Some(self.qtensor(&format!("{gg}.bias"), dev)?.dequantize(dev)?)
                } else {
                    None
                };
                if *dequantize {
                    return Ok(Linear::Dense(candle_nn::Linear::new(w.dequantize(dev)?, b)));
                }
                Ok(Linear::Quant(QMatMul::from_qtensor(w)?, b))
            }
        }
    }

    fn vector(&self, hf: &str, gg: &str, n: usize, dev: &Device, dtype: DType) -> Result<Tensor> {
        let t = match self {
            Source::Safetensors(vb) => vb
                .get(n, hf)
                .map_err(|e| Error::Weights(format!("{hf}: {e}")))?,
            Source::Gguf { .. } => self.qtensor(gg, dev)?.dequantize(dev)?,
        };
        if t.dims() != [n] {
            return Err(Error::Weights(format!(
                "{hf}/{gg} has shape {:?}, expected [{n}]",
                t.dims()
            )));
        }
        Ok(t.to_dtype(dtype)?)
    }
}

#[derive(Clone)]
struct Block {
    attn_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    mlp_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// A Llama-family model with its per-layer KV caches.
pub struct Llama {
    cfg: LlamaConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    /// RoPE's inverse frequencies `[1, head_dim / 2]` f32.
    inv_freq: Tensor,
    /// cos and sin of positions `0..cos.dim(0)` (grown on demand, [`Self::rope_tables`]).
    cos: Tensor,
    sin: Tensor,
    interleaved_rope: bool,
    device: Device,
    dtype: DType,
    /// The model's own sequence ([`Self::forward`]); a server holds its own [`Sequence`]s and
    /// runs them with [`Self::forward_batch`].
    seq: Sequence,
}

/// One sequence's KV state: every layer's attention over its own cache, and the position (the
/// tokens held). Built by [`Llama::new_sequence`]; run by [`Llama::forward_batch`].
#[derive(Default)]
pub struct Sequence {
    layers: Vec<Attention>,
    pos: usize,
}

impl Sequence {
    /// Tokens held.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// KV-cache bytes over all layers.
    pub fn kv_memory(&self) -> MemoryUsage {
        self.layers
            .iter()
            .map(|a| a.memory())
            .fold(MemoryUsage::default(), |a, m| a + m)
    }

    /// Tiles of a shared arena its caches hold (0 for kinds that keep their own buffers).
    pub fn tiles_held(&self) -> usize {
        self.layers.iter().map(|a| a.cache().tiles_held()).sum()
    }

    /// The arena tiles its caches reference (with repeats where two layers share one: never,
    /// in practice), for accounting checks.
    pub fn tile_ids(&self) -> Vec<u32> {
        self.layers
            .iter()
            .flat_map(|a| a.cache().tile_ids())
            .collect()
    }

    /// A sequence holding the same tokens whose caches share this one's storage where the
    /// kind can ([`tqkv_candle::KvCache::fork`]: paged caches share their tiles, each copying
    /// the partial tiles it will write into). Errors, forking nothing, for kinds that cannot.
    pub fn fork(&self) -> Result<Sequence> {
        let layers = self
            .layers
            .iter()
            .map(Attention::fork)
            .collect::<tqkv_candle::Result<Vec<_>>>()?;
        Ok(Sequence {
            layers,
            pos: self.pos,
        })
    }

    /// Forgets every token (keeps the caches' kinds and calibration).
    pub fn reset(&mut self) {
        for a in &mut self.layers {
            a.reset();
        }
        self.pos = 0;
    }

    /// Rolls back the steps opened in layers `0..n` after `e`; returns `e`, or, when a layer
    /// cannot be restored (a device error), resets the sequence and says so.
    fn undo(&mut self, n: usize, e: Error) -> Error {
        let mut failed = None;
        for (i, a) in self.layers.iter_mut().enumerate().take(n) {
            if let Err(r) = a.rollback_step() {
                failed.get_or_insert((i, r));
            }
        }
        match failed {
            None => e,
            Some((i, r)) => {
                self.reset();
                Error::Reset(format!(
                    "{e}; undoing the step failed in layer {i} ({r}): the conversation was reset"
                ))
            }
        }
    }

    /// Starts reading what every layer's step left to check (on CUDA: copies the status words
    /// to page-locked memory), without waiting.
    fn poll(&self) -> Result<()> {
        for (i, a) in self.layers.iter().enumerate() {
            a.poll_step().map_err(|e| Error::Layer {
                layer: i,
                source: e,
            })?;
        }
        Ok(())
    }

    /// Checks every layer's step after [`Self::poll`].
    fn check(&self) -> Result<()> {
        for (i, a) in self.layers.iter().enumerate() {
            a.check_step().map_err(|e| Error::Layer {
                layer: i,
                source: e,
            })?;
        }
        Ok(())
    }
}

/// One sequence's part of a [`Llama::forward_batch`]: its state, the tokens to run, and whether
/// the logits of every token (else of the last) come back.
pub struct BatchItem<'a> {
    /// The sequence (its position moves by `tokens.len()` on success).
    pub seq: &'a mut Sequence,
    /// Tokens to append (≥ 1).
    pub tokens: &'a [u32],
    /// Logits of every token `[tokens, vocab]` (else of the last, `[1, vocab]`).
    pub all: bool,
}

impl Llama {
    /// Loads Hugging Face safetensors (`files`, sharded or not) with `cfg`, in `dtype` on `device`.
    pub fn from_safetensors(
        files: &[std::path::PathBuf],
        cfg: LlamaConfig,
        dtype: DType,
        device: &Device,
        cache: &CacheConfig,
    ) -> Result<Self> {
        for f in files {
            if !f.exists() {
                return Err(Error::Weights(format!("{} does not exist", f.display())));
            }
        }
        // SAFETY: the files are mapped read-only; the caller must not modify them while loaded.
        let vb =
            unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }.map_err(|e| {
                Error::Weights(format!(
                    "reading safetensors {files:?}: {e} (truncated or corrupt file?)"
                ))
            })?;
        let src = Source::Safetensors(vb.pp("model"));
        let lm = if cfg.tie_word_embeddings {
            None
        } else {
            Some(Source::Safetensors(vb.pp("lm_head")))
        };
        Self::build(cfg, &src, lm.as_ref(), dtype, device, cache, false)
    }

    /// Loads a GGUF file: config from its metadata; weights as quantized matmuls on `device`, or
    /// dequantized to dense f32 when `dequantize` (exact products with the stored weights, and
    /// several times faster prefill on the CPU, at 4–8× the weight memory).
    pub fn from_gguf(
        path: &Path,
        device: &Device,
        cache: &CacheConfig,
        dequantize: bool,
    ) -> Result<(Self, gguf_file::Content)> {
        let mut f = std::fs::File::open(path)
            .map_err(|e| Error::Weights(format!("{}: {e}", path.display())))?;
        let len = f
            .metadata()
            .map_err(|e| Error::Weights(format!("{}: {e}", path.display())))?
            .len();
        let content = crate::gguf::read_content(&mut f, len).map_err(|e| match e {
            Error::Weights(m) => Error::Weights(format!("{}: {m}", path.display())),
            e => e,
        })?;
        let cfg = crate::gguf::config_from_gguf(&content)?;
        let src = Source::Gguf {
            content: &content,
            file: std::cell::RefCell::new(f),
            path,
            dequantize,
        };
        let model = Self::build(cfg, &src, None, DType::F32, device, cache, true)?;
        drop(src);
        Ok((model, content))
    }

    fn build(
        cfg: LlamaConfig,
        src: &Source,
        lm: Option<&Source>,
        dtype: DType,
        device: &Device,
        cache: &CacheConfig,
        gguf: bool,
    ) -> Result<Self> {
        cfg.validate()?;
        let (h, d, nh, nkv) = (
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_heads,
            cfg.num_kv_heads,
        );
        let embed_w = match src {
            Source::Safetensors(vb) => vb
                .get((cfg.vocab_size, h), "embed_tokens.weight")
                .map_err(|e| Error::Weights(format!("embed_tokens: {e}")))?,
            Source::Gguf { .. } => src
                .qtensor("token_embd.weight", device)?
                .dequantize(device)?,
        };
        if embed_w.dims() != [cfg.vocab_size, h] {
            return Err(Error::Weights(format!(
                "embedding has shape {:?}, expected [{}, {h}]",
                embed_w.dims(),
                cfg.vocab_size
            )));
        }
        let embed_w = embed_w.to_dtype(dtype)?;
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        let eps = cfg.rms_norm_eps;
        for i in 0..cfg.num_layers {
            let (p, g) = (format!("layers.{i}"), format!("blk.{i}"));
            let lin = |hf: &str, gg: &str, din, dout, bias| {
                src.linear(
                    &format!("{p}.{hf}"),
                    &format!("{g}.{gg}"),
                    din,
                    dout,
                    bias,
                    device,
                )
            };
            let b = cfg.attention_bias;
            blocks.push(Block {
                attn_norm: RmsNorm::new(
                    src.vector(
                        &format!("{p}.input_layernorm.weight"),
                        &format!("{g}.attn_norm.weight"),
                        h,
                        device,
                        dtype,
                    )?,
                    eps,
                ),
                q: lin("self_attn.q_proj", "attn_q", h, nh * d, b)?,
                k: lin("self_attn.k_proj", "attn_k", h, nkv * d, b)?,
                v: lin("self_attn.v_proj", "attn_v", h, nkv * d, b)?,
                o: lin("self_attn.o_proj", "attn_output", nh * d, h, false)?,
                mlp_norm: RmsNorm::new(
                    src.vector(
                        &format!("{p}.post_attention_layernorm.weight"),
                        &format!("{g}.ffn_norm.weight"),
                        h,
                        device,
                        dtype,
                    )?,
                    eps,
                ),
                gate: lin("mlp.gate_proj", "ffn_gate", h, cfg.intermediate_size, false)?,
                up: lin("mlp.up_proj", "ffn_up", h, cfg.intermediate_size, false)?,
                down: lin("mlp.down_proj", "ffn_down", cfg.intermediate_size, h, false)?,
            });
        }
        let norm = RmsNorm::new(
            src.vector("norm.weight", "output_norm.weight", h, device, dtype)?,
            eps,
        );
        let lm_head = match (lm, src) {
            (Some(Source::Safetensors(vb)), _) => Linear::Dense(
                candle_nn::linear_no_bias(h, cfg.vocab_size, vb.clone())
                    .map_err(|e| Error::Weights(format!("lm_head: {e}")))?,
            ),
            (_, Source::Gguf { .. }) if src.has_gguf("output.weight") => {
                src.linear("", "output", h, cfg.vocab_size, false, device)?
            }
            (
                _,
                Source::Gguf {
                    dequantize: true, ..
                },
            ) => Linear::Dense(candle_nn::Linear::new(embed_w.clone(), None)),
            (_, Source::Gguf { .. }) => Linear::Quant(
                QMatMul::from_qtensor(src.qtensor("token_embd.weight", device)?)?,
                None,
            ),
            _ => Linear::Dense(candle_nn::Linear::new(embed_w.clone(), None)),
        };
        let inv = cfg.inv_freq();
        let inv_freq = Tensor::from_vec(inv, (1, d / 2), device)?;
        let mut model = Llama {
            embed: Embedding::new(embed_w, h),
            blocks,
            norm,
            lm_head,
            cos: Tensor::zeros((0, d / 2), dtype, device)?,
            sin: Tensor::zeros((0, d / 2), dtype, device)?,
            inv_freq,
            interleaved_rope: gguf,
            device: device.clone(),
            dtype,
            seq: Sequence::default(),
            cfg,
        };
        model.seq = model.new_sequence(cache)?;
        model.rope_tables(1)?;
        Ok(model)
    }

    /// Makes the RoPE tables cover positions `0..end`: built for what a run needs (doubling,
    /// from 256, capped at `max_position_embeddings`), not for the whole configured context
    /// (a 1M-context config would otherwise allocate gigabytes up front).
    fn rope_tables(&mut self, end: usize) -> Result<()> {
        let have = self.cos.dim(0)?;
        if end <= have {
            return Ok(());
        }
        let max = self.cfg.max_position_embeddings;
        if end > max {
            return Err(Error::ContextFull {
                have: self.seq.pos,
                add: end.saturating_sub(self.seq.pos),
                max,
            });
        }
        let n = end.max(2 * have).max(256).min(max);
        let pos = Tensor::arange(0u32, n as u32, &self.device)?
            .to_dtype(DType::F32)?
            .reshape((n, 1))?;
        let ang = pos.broadcast_mul(&self.inv_freq)?;
        self.cos = ang.cos()?.to_dtype(self.dtype)?;
        self.sin = ang.sin()?.to_dtype(self.dtype)?;
        Ok(())
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Activation dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Tokens in the cache.
    pub fn position(&self) -> usize {
        self.seq.pos
    }

    /// Forgets the conversation (every layer's cache).
    pub fn reset(&mut self) {
        self.seq.reset();
    }

    /// A fresh sequence whose layers hold caches of `cache` (for [`Self::forward_batch`]).
    pub fn new_sequence(&self, cache: &CacheConfig) -> Result<Sequence> {
        let (n, nh, nkv, d) = (
            self.cfg.num_layers,
            self.cfg.num_heads,
            self.cfg.num_kv_heads,
            self.cfg.head_dim,
        );
        let layers = (0..n)
            .map(|i| {
                let c = cache.build_in(i, n, nkv, d, &self.device)?;
                Attention::new(c, nh, nkv, d)
            })
            .collect::<tqkv_candle::Result<Vec<_>>>()?;
        Ok(Sequence { layers, pos: 0 })
    }

    /// A fresh sequence whose layers hold caches of `cache` with their storage in `arena`
    /// (shared with every sequence built in it) for the kinds that page
    /// ([`tqkv_candle::CacheKind::pages`]); others keep their own buffers.
    pub fn new_sequence_in(
        &self,
        cache: &CacheConfig,
        arena: &std::sync::Arc<tqkv_candle::TileArena>,
    ) -> Result<Sequence> {
        let (n, nh, nkv, d) = (
            self.cfg.num_layers,
            self.cfg.num_heads,
            self.cfg.num_kv_heads,
            self.cfg.head_dim,
        );
        if !arena.device().same_device(&self.device) {
            return Err(Error::Input(
                "the KV arena is on another device than the model".into(),
            ));
        }
        let layers = (0..n)
            .map(|i| {
                let c = cache.build_paged(i, n, nkv, d, arena)?;
                Attention::new(c, nh, nkv, d)
            })
            .collect::<tqkv_candle::Result<Vec<_>>>()?;
        Ok(Sequence { layers, pos: 0 })
    }

    /// Another model over the same weights (the tensors are shared, not copied) with fresh
    /// caches of `cache`: to run several sequences on several threads at once.
    pub fn share(&self, cache: &CacheConfig) -> Result<Llama> {
        Ok(Llama {
            cfg: self.cfg.clone(),
            embed: self.embed.clone(),
            blocks: self.blocks.clone(),
            norm: self.norm.clone(),
            lm_head: self.lm_head.clone(),
            inv_freq: self.inv_freq.clone(),
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            interleaved_rope: self.interleaved_rope,
            device: self.device.clone(),
            dtype: self.dtype,
            seq: self.new_sequence(cache)?,
        })
    }

    /// Replaces every layer's cache by a fresh one of `cache` (the position goes back to 0). All
    /// caches are built before any is replaced: on error the model keeps its caches.
    pub fn set_cache_config(&mut self, cache: &CacheConfig) -> Result<()> {
        self.seq = self.new_sequence(cache)?;
        Ok(())
    }

    /// Replaces the cache of layer `layer` (e.g. by a wrapper that records or injects faults);
    /// returns the old one. The caller keeps the layers in step: the new cache should hold
    /// [`Self::position`] tokens, as the others do.
    pub fn set_layer_cache(
        &mut self,
        layer: usize,
        cache: Box<dyn tqkv_candle::KvCache>,
    ) -> Result<Box<dyn tqkv_candle::KvCache>> {
        let n = self.seq.layers.len();
        let a = self
            .seq
            .layers
            .get_mut(layer)
            .ok_or_else(|| Error::Input(format!("layer {layer} of a {n}-layer model")))?;
        Ok(a.set_cache(cache))
    }

    /// KV-cache bytes over all layers.
    pub fn kv_memory(&self) -> MemoryUsage {
        self.seq.kv_memory()
    }

    /// Bytes an f16 cache would take for the tokens held now.
    pub fn kv_f16_bytes(&self) -> usize {
        self.f16_bytes_per_token() * self.seq.pos
    }

    /// Bytes an f16 cache takes per token (all layers, keys and values).
    pub fn f16_bytes_per_token(&self) -> usize {
        self.cfg.num_layers * 2 * self.cfg.num_kv_heads * self.cfg.head_dim * 2
    }

    /// Runs `tokens` (one sequence) through the model, appending them to the caches; returns the
    /// logits (f32) of every position `[tokens, vocab]` if `all`, else of the last `[1, vocab]`.
    pub fn forward(&mut self, tokens: &[u32], all: bool) -> Result<Tensor> {
        let mut seq = std::mem::take(&mut self.seq);
        let out = self.forward_batch(&mut [BatchItem {
            seq: &mut seq,
            tokens,
            all,
        }]);
        self.seq = seq;
        match out {
            Ok(mut v) => Ok(v.remove(0)),
            Err(Error::InSequence { source, .. }) => Err(*source),
            Err(e) => Err(e),
        }
    }

    /// Runs several sequences as one ragged batch (continuous batching: a prefill chunk of one
    /// and decode tokens of others in the same step): the projections and the MLP see all
    /// tokens at once, each sequence attends over its own cache. Returns each item's logits
    /// (f32; `[tokens, vocab]` or `[1, vocab]`).
    ///
    /// One step over every layer of every item: it completes, or every sequence is as it was.
    /// An error that belongs to one item (bad tokens, a full context, its cache's NaN/Inf) is
    /// [`Error::InSequence`] with the item's index, so a server can drop that request and run
    /// the others again.
    pub fn forward_batch(&mut self, items: &mut [BatchItem<'_>]) -> Result<Vec<Tensor>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let nl = self.cfg.num_layers;
        let mut end = 0;
        for (i, it) in items.iter().enumerate() {
            let bad = in_seq(i);
            if it.tokens.is_empty() {
                return Err(bad(Error::Input("no tokens to run".into())));
            }
            if let Some(&t) = it
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.cfg.vocab_size)
            {
                return Err(bad(Error::Input(format!(
                    "token id {t} is outside the vocabulary of {}",
                    self.cfg.vocab_size
                ))));
            }
            if it.seq.layers.len() != nl {
                return Err(bad(Error::Input(format!(
                    "the sequence has {} layers, the model {nl}",
                    it.seq.layers.len()
                ))));
            }
            let (have, add, max) = (
                it.seq.pos,
                it.tokens.len(),
                self.cfg.max_position_embeddings,
            );
            if have + add > max {
                return Err(bad(Error::ContextFull { have, add, max }));
            }
            end = end.max(have + add);
        }
        self.rope_tables(end)?;
        // Open every layer's step of every item; on failure close what was opened.
        for i in 0..items.len() {
            for l in 0..nl {
                if let Err(e) = items[i].seq.layers[l].begin_step() {
                    let e = in_seq(i)(Error::Layer {
                        layer: l,
                        source: e,
                    });
                    let e = items[i].seq.undo(l, e);
                    return Err(undo_items(&mut items[..i], nl, e));
                }
            }
        }
        let out = self.run(items).and_then(|logits| {
            // Every item's layers are polled before any is checked: on CUDA the first check
            // waits for the step, the others find their words copied (one wait per step).
            for (i, it) in items.iter().enumerate() {
                it.seq.poll().map_err(in_seq(i))?;
            }
            for (i, it) in items.iter().enumerate() {
                it.seq.check().map_err(in_seq(i))?;
            }
            Ok(logits)
        });
        match out {
            Ok(logits) => {
                for it in items.iter_mut() {
                    for a in &mut it.seq.layers {
                        a.commit_step();
                    }
                    it.seq.pos += it.tokens.len();
                }
                Ok(logits)
            }
            Err(e) => Err(undo_items(items, nl, e)),
        }
    }

    /// The layers and the head over every item's tokens at its positions, inside the open steps.
    fn run(&self, items: &mut [BatchItem<'_>]) -> Result<Vec<Tensor>> {
        let all_tokens: Vec<u32> = items
            .iter()
            .flat_map(|it| it.tokens.iter().copied())
            .collect();
        let total = all_tokens.len();
        let ids = Tensor::new(all_tokens.as_slice(), &self.device)?.unsqueeze(0)?;
        let mut x = self.embed.forward(&ids)?;
        let (nh, nkv, d) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        // (offset in the batch, tokens, cos, sin) per item.
        let mut parts = Vec::with_capacity(items.len());
        let mut off = 0;
        for it in items.iter() {
            let t = it.tokens.len();
            parts.push((
                off,
                t,
                self.cos.narrow(0, it.seq.pos, t)?,
                self.sin.narrow(0, it.seq.pos, t)?,
            ));
            off += t;
        }
        for (layer, blk) in self.blocks.iter().enumerate() {
            let r = x.clone();
            let h = blk.attn_norm.forward(&x)?;
            let (qa, ka, va) = (blk.q.forward(&h)?, blk.k.forward(&h)?, blk.v.forward(&h)?);
            let mut ys = Vec::with_capacity(items.len());
            for (i, (it, (o, t, cos, sin))) in items.iter_mut().zip(&parts).enumerate() {
                let (o, t) = (*o, *t);
                let split = |y: &Tensor, n: usize| -> candle_core::Result<Tensor> {
                    let y = if t == total {
                        y.clone()
                    } else {
                        y.narrow(1, o, t)?
                    };
                    y.reshape((1, t, n, d))?.transpose(1, 2)?.contiguous()
                };
                let q = split(&qa, nh)?;
                let k = split(&ka, nkv)?;
                let v = split(&va, nkv)?;
                let (q, k) = if self.interleaved_rope {
                    (
                        candle_nn::rotary_emb::rope_i(&q, cos, sin)?,
                        candle_nn::rotary_emb::rope_i(&k, cos, sin)?,
                    )
                } else {
                    (
                        candle_nn::rotary_emb::rope(&q, cos, sin)?,
                        candle_nn::rotary_emb::rope(&k, cos, sin)?,
                    )
                };
                let y = it.seq.layers[layer]
                    .forward(&q, &k, &v)
                    .map_err(|source| in_seq(i)(Error::Layer { layer, source }))?;
                ys.push(y.transpose(1, 2)?.reshape((1, t, nh * d))?);
            }
            let y = if ys.len() == 1 {
                ys.pop().expect("one item")
            } else {
                Tensor::cat(&ys, 1)?
            };
            x = (r + blk.o.forward(&y)?)?;
            let r = x.clone();
            let h = blk.mlp_norm.forward(&x)?;
            let m = (candle_nn::ops::silu(&blk.gate.forward(&h)?)? * blk.up.forward(&h)?)?;
            x = (r + blk.down.forward(&m)?)?;
        }
        let x = self.norm.forward(&x)?;
        // The rows whose logits come back: all of an `all` item, else its last.
        let mut rows = Vec::new();
        for (it, (o, t, _, _)) in items.iter().zip(&parts) {
            if it.all {
                rows.extend((*o..o + t).map(|r| r as u32));
            } else {
                rows.push((o + t - 1) as u32);
            }
        }
        let x = if rows.len() == total {
            x
        } else if rows.len() == 1 {
            x.narrow(1, rows[0] as usize, 1)?
        } else {
            let idx = Tensor::new(rows.as_slice(), &self.device)?;
            x.index_select(&idx, 1)?
        };
        let logits = self.lm_head.forward(&x)?.squeeze(0)?.to_dtype(DType::F32)?;
        let mut out = Vec::with_capacity(items.len());
        let mut at = 0;
        for (it, (_, t, _, _)) in items.iter().zip(&parts) {
            let n = if it.all { *t } else { 1 };
            out.push(logits.narrow(0, at, n)?);
            at += n;
        }
        Ok(out)
    }
}

/// Wraps an error as item `i`'s of a [`Llama::forward_batch`].
fn in_seq(i: usize) -> impl Fn(Error) -> Error {
    move |e| Error::InSequence {
        seq: i,
        source: Box::new(e),
    }
}

/// Rolls back every layer's open step of `items` after `e` (see [`Sequence::undo`]).
fn undo_items(items: &mut [BatchItem<'_>], layers: usize, mut e: Error) -> Error {
    for it in items.iter_mut() {
        e = it.seq.undo(layers, e);
    }
    e
}
