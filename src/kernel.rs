//! Which CUDA kernel computes the fused attention over the packed cache (docs/KERNELS.md).
//! Plain data, compiled with or without the `cuda` feature, so that the CLI and the candle
//! layer can name the choice on any build.

use crate::error::{Error, Result};

/// The split kernel of the fused attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum AttentionKernel {
    /// CUDA cores, any layout the kernels accept; verified on an H100 (the default).
    #[default]
    Split,
    /// Tensor cores (`mma.sync` m16n8k16), queries rotated once per step, 64-slot tiles read
    /// through an optional tile table; MSE-only layouts of 1–4 bits at head_dim 64, 96, 128,
    /// 256 (others fall back to [`AttentionKernel::Split`] in the candle layer). Built and
    /// checked against the CPU reference by the GPU tests, **not yet run on a GPU**.
    TensorCore,
}

impl AttentionKernel {
    /// The environment variable the candle layer reads when it builds a cache:
    /// `split` or `tc` (unset: [`AttentionKernel::Split`]).
    pub const ENV: &'static str = "TQKV_ATTENTION_KERNEL";

    /// The launcher's code (`kernel` argument of `tqkv_decode_attention`).
    pub fn code(self) -> i32 {
        match self {
            Self::Split => 0,
            Self::TensorCore => 1,
        }
    }

    /// Its short name, as parsed by `FromStr`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Split => "split",
            Self::TensorCore => "tc",
        }
    }

    /// The kernel named by [`Self::ENV`]; unset or empty is the default, anything else that
    /// does not parse is an error.
    pub fn from_env() -> Result<Self> {
        match std::env::var(Self::ENV) {
            Ok(v) if !v.trim().is_empty() => v.parse(),
            _ => Ok(Self::default()),
        }
    }
}

impl std::str::FromStr for AttentionKernel {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "split" => Ok(Self::Split),
            "tc" | "tensor-core" => Ok(Self::TensorCore),
            other => Err(Error::Config(format!(
                "unknown attention kernel `{other}` (split or tc)"
            ))),
        }
    }
}

impl std::fmt::Display for AttentionKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bad_names_are_errors() {
        for k in [AttentionKernel::Split, AttentionKernel::TensorCore] {
            assert_eq!(k.name().parse::<AttentionKernel>().unwrap(), k);
            assert_eq!(k.to_string(), k.name());
        }
        assert_eq!(
            "tensor-core".parse::<AttentionKernel>().unwrap(),
            AttentionKernel::TensorCore
        );
        assert!("fast".parse::<AttentionKernel>().is_err());
        assert_eq!(AttentionKernel::default().code(), 0);
        assert_eq!(AttentionKernel::TensorCore.code(), 1);
    }
}
