//! The error type of the `tqkv` crate: every bad input is a value of [`Error`], never a panic.

/// Errors returned by the quantizers, codebooks, rotations and the packed format.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum Error {
    /// A bit width the codebooks do not provide.
    #[error("unsupported bit width {bits}: supported are {supported}")]
    UnsupportedBits {
        /// What was asked for.
        bits: String,
        /// What is supported, in words.
        supported: &'static str,
    },
    /// A vector dimension the operation cannot handle.
    #[error("unsupported dimension {dim}: {reason}")]
    UnsupportedDim {
        /// What was asked for.
        dim: usize,
        /// Why, naming what is supported.
        reason: String,
    },
    /// A slice of the wrong length.
    #[error("shape mismatch in {what}: expected {expected} elements, got {got}")]
    Shape {
        /// The argument that was wrong.
        what: &'static str,
        /// The expected length.
        expected: usize,
        /// The length given.
        got: usize,
    },
    /// NaN or ±Inf in an input vector.
    #[error("non-finite value {value} at index {index} of {what}")]
    NonFinite {
        /// The argument that held it.
        what: &'static str,
        /// Position in the slice.
        index: usize,
        /// The value, as text (NaN, inf, -inf).
        value: String,
    },
    /// A norm that does not fit the chosen norm storage.
    #[error("norm {norm} exceeds the range of {format} (max {max}); use NormFormat::F32")]
    NormOverflow {
        /// The norm that overflowed.
        norm: f32,
        /// The storage format.
        format: &'static str,
        /// Its largest finite value.
        max: f32,
    },
    /// An invalid configuration (a channel split, a sketch size, a spec).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A CUDA driver or kernel launch failure (feature `cuda`).
    #[error("CUDA: {0}")]
    Cuda(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Returns an error naming the first NaN/Inf in `x`.
pub fn check_finite(what: &'static str, x: &[f32]) -> Result<()> {
    match x.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(index) => Err(Error::NonFinite {
            what,
            index,
            value: format!("{}", x[index]),
        }),
    }
}

/// Returns an error unless `x.len() == expected`.
pub fn check_len(what: &'static str, x: usize, expected: usize) -> Result<()> {
    if x == expected {
        Ok(())
    } else {
        Err(Error::Shape {
            what,
            expected,
            got: x,
        })
    }
}
