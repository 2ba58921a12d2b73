//! Helpers shared by the model tests.
#![allow(dead_code)]
use candle_core::{Device, Tensor};
use std::path::Path;
use tqkv_candle::CacheConfig;
use tqkv_llama::LoadOptions;

/// Load options for `model` on the CPU with the `kv` cache.
pub fn options(model: &Path, kv: &str, dequantize: Option<bool>) -> LoadOptions {
    LoadOptions {
        model: Some(model.display().to_string()),
        revision: None,
        device: Device::Cpu,
        dtype: None,
        cache: kv.parse::<CacheConfig>().unwrap(),
        progress: false,
        dequantize,
    }
}

/// max |a − b| over all elements.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
