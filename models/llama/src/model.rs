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
    attn: Attention,
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
    pos: usize,
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
                attn: Attention::new(
                    cache.build_in(i, cfg.num_layers, nkv, d, device)?,
                    nh,
                    nkv,
                    d,
                )?,
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
            pos: 0,
            cfg,
        };
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
                have: self.pos,
                add: end - self.pos,
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
        self.pos
    }

    /// Forgets the conversation (every layer's cache).
    pub fn reset(&mut self) {
        for b in &mut self.blocks {
            b.attn.reset();
        }
        self.pos = 0;
    }

    /// Replaces every layer's cache by a fresh one of `cache` (the position goes back to 0). All
    /// caches are built before any is replaced: on error the model keeps its caches.
    pub fn set_cache_config(&mut self, cache: &CacheConfig) -> Result<()> {
        let (n, nkv, d) = (
            self.cfg.num_layers,
            self.cfg.num_kv_heads,
            self.cfg.head_dim,
        );
        let fresh = (0..n)
            .map(|i| cache.build_in(i, n, nkv, d, &self.device))
            .collect::<tqkv_candle::Result<Vec<_>>>()?;
        for (b, c) in self.blocks.iter_mut().zip(fresh) {
            b.attn.set_cache(c);
        }
        self.pos = 0;
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
        let n = self.blocks.len();
        let b = self
            .blocks
            .get_mut(layer)
            .ok_or_else(|| Error::Input(format!("layer {layer} of a {n}-layer model")))?;
        Ok(b.attn.set_cache(cache))
    }

    /// KV-cache bytes over all layers.
    pub fn kv_memory(&self) -> MemoryUsage {
        self.blocks
            .iter()
            .map(|b| b.attn.memory())
            .fold(MemoryUsage::default(), |a, m| a + m)
    }

    /// Bytes an f16 cache would take for the tokens held now.
    pub fn kv_f16_bytes(&self) -> usize {
        self.pos * self.cfg.num_layers * 2 * self.cfg.num_kv_heads * self.cfg.head_dim * 2
    }

    /// Runs `tokens` (one sequence) through the model, appending them to the caches; returns the
    /// logits (f32) of every position `[tokens, vocab]` if `all`, else of the last `[1, vocab]`.
    pub fn forward(&mut self, tokens: &[u32], all: bool) -> Result<Tensor> {
        if tokens.is_empty() {
            return Err(Error::Input("no tokens to run".into()));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(Error::Input(format!(
                "token id {t} is outside the vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        let t = tokens.len();
        if self.pos + t > self.cfg.max_position_embeddings {
            return Err(Error::ContextFull {
                have: self.pos,
                add: t,
                max: self.cfg.max_position_embeddings,
            });
        }
        self.rope_tables(self.pos + t)?;
        // One step over every layer: it completes, or every cache is as it was (a failure in
        // layer i must not leave layers 0..i one chunk ahead of the position).
        for i in 0..self.blocks.len() {
            if let Err(e) = self.blocks[i].attn.begin_step() {
                return Err(self.undo(
                    i,
                    Error::Layer {
                        layer: i,
                        source: e,
                    },
                ));
            }
        }
        let out = self.run(tokens, all).and_then(|logits| {
            // What the appends left to the device (CUDA decode: the status words): every
            // layer's word is copied to page-locked memory after the step's work, then read;
            // only the first read waits (for the step, which the logits' read waits for anyway).
            for (i, b) in self.blocks.iter().enumerate() {
                b.attn.poll_step().map_err(|e| Error::Layer {
                    layer: i,
                    source: e,
                })?;
            }
            for (i, b) in self.blocks.iter().enumerate() {
                b.attn.check_step().map_err(|e| Error::Layer {
                    layer: i,
                    source: e,
                })?;
            }
            Ok(logits)
        });
        match out {
            Ok(logits) => {
                for b in &mut self.blocks {
                    b.attn.commit_step();
                }
                self.pos += t;
                Ok(logits)
            }
            Err(e) => Err(self.undo(self.blocks.len(), e)),
        }
    }

    /// Rolls back the steps opened in layers `0..n` after `e`; returns `e`, or, when a layer
    /// cannot be restored (a device error), resets the model and says so.
    fn undo(&mut self, n: usize, e: Error) -> Error {
        let mut failed = None;
        for (i, b) in self.blocks.iter_mut().enumerate().take(n) {
            if let Err(r) = b.attn.rollback_step() {
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

    /// The layers and the head over `tokens` at positions `self.pos..`, inside the open step.
    fn run(&mut self, tokens: &[u32], all: bool) -> Result<Tensor> {
        let t = tokens.len();
        let ids = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let mut x = self.embed.forward(&ids)?;
        let cos = self.cos.narrow(0, self.pos, t)?;
        let sin = self.sin.narrow(0, self.pos, t)?;
        let (nh, nkv, d) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        for (layer, blk) in self.blocks.iter_mut().enumerate() {
            let r = x.clone();
            let h = blk.attn_norm.forward(&x)?;
            let split = |y: Tensor, n: usize| -> candle_core::Result<Tensor> {
                y.reshape((1, t, n, d))?.transpose(1, 2)?.contiguous()
            };
            let q = split(blk.q.forward(&h)?, nh)?;
            let k = split(blk.k.forward(&h)?, nkv)?;
            let v = split(blk.v.forward(&h)?, nkv)?;
            let (q, k) = if self.interleaved_rope {
                (
                    candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?,
                    candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?,
                )
            } else {
                (
                    candle_nn::rotary_emb::rope(&q, &cos, &sin)?,
                    candle_nn::rotary_emb::rope(&k, &cos, &sin)?,
                )
            };
            let y = blk
                .attn
                .forward(&q, &k, &v)
                .map_err(|source| Error::Layer { layer, source })?;
            let y = y.transpose(1, 2)?.reshape((1, t, nh * d))?;
            x = (r + blk.o.forward(&y)?)?;
            let r = x.clone();
            let h = blk.mlp_norm.forward(&x)?;
            let m = (candle_nn::ops::silu(&blk.gate.forward(&h)?)? * blk.up.forward(&h)?)?;
            x = (r + blk.down.forward(&m)?)?;
        }
        let x = self.norm.forward(&x)?;
        let x = if all { x } else { x.narrow(1, t - 1, 1)? };
        let logits = self.lm_head.forward(&x)?.squeeze(0)?.to_dtype(DType::F32)?;
        Ok(logits)
    }
}
