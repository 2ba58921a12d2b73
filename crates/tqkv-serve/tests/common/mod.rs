//! Helpers shared by the engine and HTTP tests.
#![allow(dead_code)]

/// The default model (scripts/fetch-model.sh) on the CPU with caches of `kv`, and that config.
pub fn load(kv: &str) -> (tqkv_candle::CacheConfig, tqkv_llama::Loaded) {
    let gguf =
        tqkv_llama::loader::default_gguf().expect("the default model (scripts/fetch-model.sh)");
    let cache: tqkv_candle::CacheConfig = kv.parse().unwrap();
    let loaded = tqkv_llama::load(&tqkv_llama::LoadOptions {
        model: Some(gguf.display().to_string()),
        revision: None,
        device: candle_core::Device::Cpu,
        dtype: None,
        cache: cache.clone(),
        progress: false,
        dequantize: None,
    })
    .unwrap();
    (cache, loaded)
}
