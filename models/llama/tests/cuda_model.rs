//! The default model on a CUDA device (feature `cuda`; skipped with a printed reason when no
//! device or no model file is present — the GPU machines have no network, so the GGUF must
//! already be in models/): first-step logits equal the CPU's within tolerance, and greedy
//! generation answers a factual question with the f16 cache and with TurboQuant caches, whose
//! kernels then run inside a real model.
#![cfg(feature = "cuda")]
mod common;
use candle_core::{Device, D};
use std::path::PathBuf;
use tqkv_llama::eval::{greedy, user_prompt_ids};
use tqkv_llama::load;

fn setup() -> Option<(Device, PathBuf)> {
    if !tqkv::cuda::driver_present() {
        eprintln!("SKIPPED: no CUDA driver library on this machine");
        return None;
    }
    let dev = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("SKIPPED: no CUDA device ({e})");
            return None;
        }
    };
    let path = std::env::var("TQKV_MODEL_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("models").join(tqkv_llama::loader::DEFAULT_GGUF));
    if !path.is_file() {
        eprintln!(
            "SKIPPED: no model file at {} (set TQKV_MODEL_GGUF)",
            path.display()
        );
        return None;
    }
    Some((dev, path))
}

#[test]
fn the_default_model_runs_on_cuda() {
    let Some((dev, path)) = setup() else { return };
    let q = "What is the capital of France? Answer with one word.";
    // First-step logits: CUDA against CPU, same weights, f16 cache.
    let mut cpu = load(&common::options(&path, "f16", None)).unwrap();
    let mut o = common::options(&path, "f16", None);
    o.device = dev.clone();
    let mut gpu = load(&o).unwrap();
    let ids = user_prompt_ids(&cpu, q).unwrap();
    let a = cpu.model.forward(&ids, false).unwrap();
    let b = gpu
        .model
        .forward(&ids, false)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    let spread = (a.max(D::Minus1).unwrap() - a.min(D::Minus1).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
    let diff = common::max_abs_diff(&a, &b);
    eprintln!("first-step logits: max |cuda − cpu| = {diff:.3e} (spread {spread:.2})");
    assert!(diff <= 2e-3 * spread, "{diff} vs spread {spread}");
    // Greedy answers on CUDA with the full-precision and the quantized caches.
    for kv in ["f16", "bf16", "tq3.5", "tq4"] {
        let mut o = common::options(&path, kv, None);
        o.device = dev.clone();
        let mut m = load(&o).unwrap();
        let ids = user_prompt_ids(&m, q).unwrap();
        let t0 = std::time::Instant::now();
        let out = greedy(&mut m, &ids, ids.len(), 16).unwrap();
        let text = m.tokenizer.decode(&out, true).unwrap();
        eprintln!(
            "cuda {kv}: {q} → {text:?} ({} tokens in {:.2?})",
            out.len(),
            t0.elapsed()
        );
        assert!(text.contains("Paris"), "cuda {kv}: {text:?}");
    }
}
