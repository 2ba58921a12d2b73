//! Fuzz target: Hugging Face `config.json` → `LlamaConfig` (and the RoPE tables it implies).
#[global_allocator]
static ALLOC: tqkv_fuzz::Counting = tqkv_fuzz::Counting;

const SMOLLM2: &str = r#"{"architectures": ["LlamaForCausalLM"], "attention_bias": false, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664, "intermediate_size": 1536, "max_position_embeddings": 8192, "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3, "rms_norm_eps": 1e-05, "rope_scaling": null, "rope_theta": 100000, "tie_word_embeddings": true, "torch_dtype": "bfloat16", "vocab_size": 49152}"#;
const LLAMA31: &str = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 131072, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"}, "rope_theta": 500000.0, "tie_word_embeddings": false, "vocab_size": 128256}"#;
const QWEN2: &str = r#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864, "max_position_embeddings": 32768, "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": true, "vocab_size": 151936}"#;

fn target(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes);
    match tqkv_llama::LlamaConfig::from_hf_json(&text) {
        Ok(cfg) => {
            let f = cfg.inv_freq();
            assert_eq!(f.len(), cfg.head_dim / 2);
            true
        }
        Err(_) => false,
    }
}

#[test]
fn fuzz_config_json() {
    let seeds: Vec<Vec<u8>> = [SMOLLM2, LLAMA31, QWEN2]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
    for s in &seeds {
        assert!(target(s), "{}", String::from_utf8_lossy(s));
    }
    let r = tqkv_fuzz::run("config", &seeds, target);
    assert!(r.accepted > 0);
}
