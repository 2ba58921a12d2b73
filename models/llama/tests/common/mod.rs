//! Helpers shared by the model tests.
#![allow(dead_code)]
use candle_core::{Device, Tensor};
use std::path::Path;
use tqkv_candle::CacheConfig;
use tqkv_llama::template::Message;
use tqkv_llama::{LoadOptions, Loaded};

/// Load options for `model` on the CPU with the `kv` cache.
pub fn options(model: &Path, kv: &str, dequantize: Option<bool>) -> LoadOptions {
    LoadOptions {
        model: Some(model.display().to_string()),
        revision: None,
        device: Device::Cpu,
        dtype: None,
        cache: CacheConfig::new(kv.parse().unwrap()),
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

/// The token ids of `question` as one user turn in the model's chat template, ready for the
/// assistant's answer.
pub fn prompt_ids(m: &Loaded, question: &str) -> Vec<u32> {
    let prompt = m
        .template
        .render(
            &[Message {
                role: "user".into(),
                content: question.into(),
            }],
            true,
        )
        .unwrap();
    m.tokenizer
        .encode(prompt.as_str(), false)
        .unwrap()
        .get_ids()
        .to_vec()
}

/// Greedy decoding of at most `max` tokens after the prompt `ids` (stops at an EOS token);
/// returns the generated ids.
pub fn greedy(m: &mut Loaded, ids: &[u32], max: usize) -> Vec<u32> {
    let mut logits = m.model.forward(ids, false).unwrap();
    let mut out = Vec::new();
    for _ in 0..max {
        let next = logits
            .flatten_all()
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        if m.eos_ids.contains(&next) {
            break;
        }
        out.push(next);
        logits = m.model.forward(&[next], false).unwrap();
    }
    out
}
