//! # tqkv-candle — quantized KV caches and an attention layer for candle models
//!
//! A model calls one [`Attention`] per layer: `forward(q, k_new, v_new)` appends the step's keys
//! and values to the layer's [`KvCache`] and attends with its queries (tensors
//! `[batch, heads, tokens, head_dim]`, RoPE applied by the caller). The cache kind is one config
//! value ([`CacheKind`], e.g. `"tq3.5"`, `"f16"`, `"q4h"`), with per-layer overrides in
//! [`CacheConfig`]:
//!
//! * [`TurboCache`] — TurboQuant (TurboQuant §3–4; QJL §3 for prod keys): packed records of
//!   docs/FORMAT.md, written and read by the candle ops of [`ops`] (the CPU reference of `tqkv`
//!   on the CPU; the kernels of `tqkv::cuda` on CUDA, through [`cuda_ops`], feature `cuda`);
//! * baselines for side-by-side numbers: [`FullCache`] (f32/f16/bf16, any device),
//!   [`CodecCache`] with [`Q8`] (q8_0-like) or [`Q4Hadamard`] (llama.cpp's rotated q4_0), and
//!   [`KiviCache`] (KIVI 2/4 bits with its full-precision window).
//!
//! ```
//! use candle_core::{Device, Tensor, DType};
//! use tqkv_candle::{Attention, CacheConfig};
//! let dev = Device::Cpu;
//! let cfg = CacheConfig::new("tq3.5".parse()?);
//! let mut attn = Attention::new(cfg.build(0, 2, 64, &dev)?, 6, 2, 64)?;
//! let q = Tensor::randn(0f32, 1., (1, 6, 5, 64), &dev)?;
//! let k = Tensor::randn(0f32, 1., (1, 2, 5, 64), &dev)?;
//! let v = Tensor::randn(0f32, 1., (1, 2, 5, 64), &dev)?;
//! let out = attn.forward(&q, &k, &v)?;          // prefill of 5 tokens
//! assert_eq!(out.dims(), &[1, 6, 5, 64]);
//! # Ok::<(), candle_core::Error>(())
//! ```
#![warn(missing_docs)]

pub mod arena;
pub mod attention;
pub mod cache;
pub mod codec;
pub mod config;
#[cfg_attr(feature = "cuda", path = "cuda_ops.rs")]
#[cfg_attr(not(feature = "cuda"), path = "cuda_stub.rs")]
pub mod cuda_ops;
pub mod error;
pub mod exact;
pub mod fault;
pub mod full;
pub mod kivi;
pub mod ops;
pub mod profiles;
pub mod tile_ops;
mod tile_tables;
pub mod turbo;

pub use arena::TileArena;
pub use attention::Attention;
pub use cache::{KvCache, MemoryUsage};
pub use codec::{BlockHadamard, CodecCache, Q4Hadamard, Q5Hadamard, Q8};
pub use config::{CacheConfig, CacheKind};
pub use error::{BadValue, Error, Result};
pub use full::FullCache;
pub use kivi::KiviCache;
pub use turbo::{PrefillPath, TurboCache};
