//! The error type of the caches and the attention layer: every bad input or failed step is a
//! value of [`Error`] that says what was wrong with its numbers, so that callers match on
//! variants instead of message strings. Converts into `candle_core::Error` (for code that
//! works in candle's `Result`) and from it (candle ops inside the caches).

use candle_core::DType;

/// Where a non-finite value sits in an append `[batch, kv_heads, tokens, head_dim]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BadValue {
    /// Sequence (batch row).
    pub seq: usize,
    /// Position in the sequence (tokens held before the append + the token's index in it).
    pub pos: usize,
    /// KV head.
    pub head: usize,
    /// Channel.
    pub channel: usize,
    /// The value (NaN, inf or -inf).
    pub value: f32,
}

impl std::fmt::Display for BadValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} at sequence {}, position {}, KV head {}, channel {}",
            self.value, self.seq, self.pos, self.head, self.channel
        )
    }
}

/// Errors of the KV caches and of [`crate::Attention`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An append would hold more tokens than the cache's maximum.
    #[error(
        "KV cache full: sequence {seq} holds {have} tokens, appending {add} exceeds the maximum of {max}"
    )]
    CacheFull {
        /// The sequence.
        seq: usize,
        /// Tokens it holds.
        have: usize,
        /// Tokens the append adds.
        add: usize,
        /// The cache's maximum per sequence.
        max: usize,
    },
    /// The tile arena has fewer free tiles than an append needs; nothing was stored.
    #[error("KV arena full: {need} tiles needed, {free} free of {total}")]
    ArenaFull {
        /// Tiles the operation needed.
        need: usize,
        /// Tiles free.
        free: usize,
        /// Tiles in the arena.
        total: usize,
    },
    /// Tensors of the wrong rank or sizes, or batch / token counts that do not match the cache.
    #[error("shape: {0}")]
    Shape(String),
    /// A tensor of a dtype the operation does not take.
    #[error("{what} must be f32, f16 or bf16, got {got:?}")]
    DType {
        /// The argument.
        what: &'static str,
        /// Its dtype.
        got: DType,
    },
    /// Tensors on different devices, or on a device this cache kind has no kernels for.
    #[error("device: {0}")]
    Device(String),
    /// NaN or ±Inf among the keys or values of an append; the append was not committed.
    #[error("{what} contain a non-finite value: {at}")]
    NonFinite {
        /// `keys` or `values`.
        what: &'static str,
        /// Where.
        at: BadValue,
    },
    /// NaN or ±Inf among the queries of an attend.
    #[error("queries contain a non-finite value ({value}) at flat index {index}")]
    NonFiniteQuery {
        /// Index in the queries `[batch, q_heads, tokens, head_dim]`, row-major.
        index: usize,
        /// The value.
        value: f32,
    },
    /// `attend` before any append (or after `reset`).
    #[error("attend before any append: the cache is empty")]
    Empty,
    /// A spec, layout or device combination the caches do not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A KV cache kind string that does not parse, or a cache configuration that is invalid.
    #[error("KV cache kind: {0}")]
    Kind(String),
    /// A call out of protocol (e.g. a second step opened before the first is closed).
    #[error("{0}")]
    Protocol(String),
    /// The quantizer library rejected a configuration or input.
    #[error(transparent)]
    Quant(#[from] tqkv::Error),
    /// A candle operation failed (allocation, device, kernel launch).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Candle(c) => c,
            e => candle_core::Error::wrap(e),
        }
    }
}

/// Result alias of the caches.
pub type Result<T> = std::result::Result<T, Error>;

/// `return Err(Error::$variant(format!(...)))`.
macro_rules! fail {
    ($variant:ident, $($arg:tt)*) => {
        return Err($crate::Error::$variant(format!($($arg)*)))
    };
}
pub(crate) use fail;
