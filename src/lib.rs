//! # tqkv — TurboQuant + QJL KV-cache quantization
//!
//! The CPU reference of the math in DESIGN.md: Lloyd–Max codebooks for the coordinates of a
//! randomly rotated unit vector ([`codebook`], TurboQuant §3.1), seeded rotations ([`rotation`]),
//! the MSE quantizer ([`mse`], TurboQuant Alg. 1), the QJL sketch ([`qjl`], QJL §3), the prod
//! quantizer and the fractional-bit channel split ([`quantizer`], TurboQuant Alg. 2 and §4.3),
//! CPU attention from packed records and its exact reference ([`attention`]), the specs
//! ([`spec`]), the bit packing of docs/FORMAT.md ([`packing`]) and the distortion
//! experiment ([`distortion`], TurboQuant §5.1).
//!
//! This crate is the oracle the CUDA kernels (feature `cuda`, issue 5) and the candle layer
//! (`tqkv-candle`) are checked against. Every fallible function returns [`Result`].
//!
//! ```
//! use tqkv::{BitsSpec, QuantSpec, VectorQuantizer};
//! let q = VectorQuantizer::new(QuantSpec::mse(BitsSpec::Uniform(4)), 128, 7)?;
//! let x: Vec<f32> = (0..128).map(|i| (i as f32 * 0.37).sin()).collect();
//! let mut rec = vec![0u8; q.record_bytes()];
//! q.quantize(&x, &mut rec)?;
//! let mut xh = vec![0.0; 128];
//! q.dequantize(&rec, &mut xh)?;
//! let err: f32 = x.iter().zip(&xh).map(|(a, b)| (a - b).powi(2)).sum();
//! let nx: f32 = x.iter().map(|a| a * a).sum();
//! assert!(err / nx < 0.03);
//! # Ok::<(), tqkv::Error>(())
//! ```

#![warn(missing_docs)]

pub mod attention;
pub mod codebook;
pub mod cpu_attention;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device_tables;
pub mod distortion;
pub mod error;
pub mod kernel;
pub mod lognorm;
pub mod mse;
pub mod packing;
pub mod paged;
pub mod qjl;
pub mod quantizer;
pub mod rng;
pub mod rotation;
pub mod simd;
pub mod spec;

pub use codebook::Codebook;
pub use error::{Error, Result};
pub use kernel::AttentionKernel;
pub use mse::MseQuantizer;
pub use qjl::QjlSketch;
pub use quantizer::{select_outliers, PreparedQuery, RecordLayout, VectorQuantizer};
pub use rotation::{Rotation, RotationKind};
pub use spec::{BitsSpec, ExactFormat, KvSpec, Mode, NormFormat, NormRule, OutlierRule, QuantSpec};
