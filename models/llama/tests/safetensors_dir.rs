//! The Hugging Face directory path (config.json, sharded safetensors, tokenizer.json,
//! tokenizer_config.json with its chat template), checked against the GGUF path on the same
//! weights: the default GGUF is converted to an HF directory (weights dequantized, q/k rows
//! un-permuted from llama.cpp's interleaved-RoPE layout back to HF's half-split layout).
mod common;
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tqkv_llama::{load, LoadOptions};

fn opts(model: &Path) -> LoadOptions {
    common::options(model, "f32", Some(true))
}

/// GGUF [out, in] q/k rows are HF rows permuted per head: HF row (h, half, i) ↦ GGUF row
/// (h, i, half). Undo it.
fn unpermute(w: &Tensor, heads: usize) -> Tensor {
    let (out, inp) = w.dims2().unwrap();
    let d = out / heads;
    w.reshape((heads, d / 2, 2, inp))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((out, inp))
        .unwrap()
}

fn convert(gguf: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let dev = Device::Cpu;
    let mut f = std::fs::File::open(gguf).unwrap();
    let c = gguf_file::Content::read(&mut f).unwrap();
    let u = |k: &str| c.metadata[k].to_u32().unwrap() as usize;
    let (layers, heads, kv) = (
        u("llama.block_count"),
        u("llama.attention.head_count"),
        u("llama.attention.head_count_kv"),
    );
    let names: Vec<String> = c.tensor_infos.keys().cloned().collect();
    let mut shards: [HashMap<String, Tensor>; 2] = [HashMap::new(), HashMap::new()];
    for n in names {
        let t = c
            .tensor(&mut f, &n, &dev)
            .unwrap()
            .dequantize(&dev)
            .unwrap();
        let (hf, t) = if n == "token_embd.weight" {
            ("model.embed_tokens.weight".to_string(), t)
        } else if n == "output_norm.weight" {
            ("model.norm.weight".to_string(), t)
        } else {
            let rest = n.strip_prefix("blk.").unwrap();
            let (i, w) = rest.split_once('.').unwrap();
            let (name, t) = match w {
                "attn_q.weight" => ("self_attn.q_proj.weight", unpermute(&t, heads)),
                "attn_k.weight" => ("self_attn.k_proj.weight", unpermute(&t, kv)),
                "attn_v.weight" => ("self_attn.v_proj.weight", t),
                "attn_output.weight" => ("self_attn.o_proj.weight", t),
                "ffn_gate.weight" => ("mlp.gate_proj.weight", t),
                "ffn_up.weight" => ("mlp.up_proj.weight", t),
                "ffn_down.weight" => ("mlp.down_proj.weight", t),
                "attn_norm.weight" => ("input_layernorm.weight", t),
                "ffn_norm.weight" => ("post_attention_layernorm.weight", t),
                other => panic!("unexpected tensor {other}"),
            };
            (format!("model.layers.{i}.{name}"), t)
        };
        let shard = usize::from(hf.contains("layers.1") || hf.contains("layers.2"));
        shards[shard].insert(hf, t);
    }
    let mut weight_map = serde_json::Map::new();
    for (i, s) in shards.iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        for k in s.keys() {
            weight_map.insert(k.clone(), serde_json::json!(file));
        }
        candle_core::safetensors::save(s, dir.join(&file)).unwrap();
    }
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({"weight_map": weight_map}).to_string(),
    )
    .unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": u("llama.embedding_length"), "intermediate_size": u("llama.feed_forward_length"),
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "vocab_size": u("llama.vocab_size"), "rope_theta": c.metadata["llama.rope.freq_base"].to_f32().unwrap(),
        "rms_norm_eps": c.metadata["llama.attention.layer_norm_rms_epsilon"].to_f32().unwrap(),
        "max_position_embeddings": u("llama.context_length"), "tie_word_embeddings": true,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let t = tqkv_llama::gguf::tokenizer_from_gguf(&c).unwrap();
    t.tokenizer.save(dir.join("tokenizer.json"), false).unwrap();
    let tc = serde_json::json!({"bos_token": t.bos, "eos_token": {"content": t.eos}, "chat_template": t.chat_template});
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
}

#[test]
fn a_local_hf_directory_gives_the_same_logits_as_the_gguf() {
    let gguf: PathBuf = tqkv_llama::loader::default_gguf().unwrap();
    let dir = std::env::temp_dir().join(format!("tqkv-hfdir-{}", std::process::id()));
    convert(&gguf, &dir);
    let mut a = load(&opts(&gguf)).unwrap();
    let mut b = load(&opts(&dir)).unwrap();
    assert!(b.has_own_template);
    assert_eq!(a.eos_ids, b.eos_ids);
    let text = "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n";
    let ids = b.tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    assert_eq!(
        ids,
        a.tokenizer.encode(text, false).unwrap().get_ids().to_vec()
    );
    let la = a.model.forward(&ids, true).unwrap();
    let lb = b.model.forward(&ids, true).unwrap();
    let diff = common::max_abs_diff(&la, &lb);
    assert!(
        diff < 1e-3,
        "GGUF (interleaved RoPE) and HF (half RoPE) logits differ by {diff}"
    );
    // Decoding continues identically.
    let la = a.model.forward(&[42], false).unwrap();
    let lb = b.model.forward(&[42], false).unwrap();
    let diff = common::max_abs_diff(&la, &lb);
    assert!(diff < 1e-3, "{diff}");
    // bf16 activations from the same directory stay close.
    let mut o = opts(&dir);
    o.dtype = Some(candle_core::DType::BF16);
    let mut c = load(&o).unwrap();
    let lc = c.model.forward(&ids, false).unwrap();
    let la = {
        let mut a = load(&opts(&gguf)).unwrap();
        a.model.forward(&ids, false).unwrap()
    };
    let top = |l: &Tensor| {
        l.flatten_all()
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap()
    };
    assert_eq!(top(&la), top(&lc), "bf16 changes the next token");
    std::fs::remove_dir_all(&dir).ok();
}
