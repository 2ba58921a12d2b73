//! # tqkv-llama — Llama-family models over tqkv's quantized KV caches
//!
//! [`Llama`] runs Llama 2/3.x, Mistral, SmolLM2 and Qwen2 (q/k/v biases) from Hugging Face
//! safetensors or GGUF, with every layer's KV cache chosen by a [`tqkv_candle::CacheConfig`].
//! [`loader`] finds and loads a model (hub repo id, local directory or `.gguf`) with its
//! tokenizer and chat template; [`sampling`] and [`template`] do the rest of a chat turn;
//! [`eval`] measures a cache's quality on the model (KL divergence, perplexity, top-1).
#![warn(missing_docs)]

pub mod config;
pub mod eval;
pub mod gguf;
pub mod loader;
pub mod model;
#[path = "sampler.rs"]
pub mod sampling;
#[path = "chat_template.rs"]
pub mod template;

pub use config::LlamaConfig;
pub use loader::{load, LoadOptions, Loaded, ModelSource};
pub use model::{BatchItem, Llama, Sequence};

/// Errors of model loading and running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A malformed or inconsistent configuration.
    #[error("model config: {0}")]
    Config(String),
    /// An architecture this runner does not implement.
    #[error(
        "unsupported architecture {0:?}: supported are llama, mistral, qwen2 (SmolLM2 is llama)"
    )]
    UnsupportedArchitecture(String),
    /// Missing, truncated or mismatched weights.
    #[error("model weights: {0}")]
    Weights(String),
    /// Tokenizer missing or unusable.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Chat template problems.
    #[error("chat template: {0}")]
    Template(String),
    /// Finding or downloading the model.
    #[error("model files: {0}")]
    Files(String),
    /// Bad input to the model.
    #[error("input: {0}")]
    Input(String),
    /// The context window is full.
    #[error("context full: {have} tokens held, {add} more exceed the model's {max}")]
    ContextFull {
        /// Tokens held.
        have: usize,
        /// Tokens to add.
        add: usize,
        /// The limit.
        max: usize,
    },
    /// A KV cache or attention error of one layer (NaN/Inf keys or values naming sequence and
    /// position, a full cache, a device failure); the step was undone in every layer.
    #[error("layer {layer}: {source}")]
    Layer {
        /// The layer.
        layer: usize,
        /// What its cache said.
        #[source]
        source: tqkv_candle::Error,
    },
    /// A KV cache error outside a step (building the caches of a kind).
    #[error(transparent)]
    Cache(#[from] tqkv_candle::Error),
    /// An error of one item of [`Llama::forward_batch`] (its tokens, its context, its caches);
    /// the step was undone for every item.
    #[error("sequence {seq}: {source}")]
    InSequence {
        /// The item's index.
        seq: usize,
        /// What went wrong.
        #[source]
        source: Box<Error>,
    },
    /// Undoing a failed step failed too (a device error): the model was reset.
    #[error("{0}")]
    Reset(String),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, Error>;
