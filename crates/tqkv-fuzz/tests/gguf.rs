//! Fuzz target: GGUF header and metadata, the GGUF → tokenizer conversion and the chat
//! template a GGUF carries, from a small valid file written here (a Llama-type header with a
//! 300-token BPE vocabulary, its merges, a chat template and three tiny tensors).
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::io::Cursor;
use tqkv_llama::template::Message;

#[global_allocator]
static ALLOC: tqkv_fuzz::Counting = tqkv_fuzz::Counting;

fn seed_file(template: &str, pre: &str) -> Vec<u8> {
    let s = |x: &str| Value::String(x.into());
    // GPT-2's byte → character alphabet (printable bytes as themselves, the rest from U+0100).
    let mut extra = 0;
    let mut tokens: Vec<Value> = (0..256u32)
        .map(|b| {
            let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
            let c = if printable {
                b
            } else {
                extra += 1;
                255 + extra
            };
            s(&char::from_u32(c).unwrap().to_string())
        })
        .collect();
    for t in ["<|im_start|>", "<|im_end|>", "ab", "abc", "Ġthe", "he"] {
        tokens.push(s(t));
    }
    let n = tokens.len();
    let types: Vec<Value> = (0..n)
        .map(|i| Value::I32(if (256..258).contains(&i) { 3 } else { 1 }))
        .collect();
    let merges = vec![s("a b"), s("ab c"), s("h e")];
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", s("llama")),
        ("llama.embedding_length", Value::U32(8)),
        ("llama.attention.head_count", Value::U32(2)),
        ("llama.attention.head_count_kv", Value::U32(1)),
        ("llama.feed_forward_length", Value::U32(16)),
        ("llama.block_count", Value::U32(1)),
        ("llama.context_length", Value::U32(64)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s(pre)),
        ("tokenizer.ggml.tokens", Value::Array(tokens)),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.merges", Value::Array(merges)),
        ("tokenizer.ggml.eos_token_id", Value::U32(257)),
        ("tokenizer.ggml.bos_token_id", Value::U32(256)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        ("tokenizer.chat_template", s(template)),
    ];
    let dev = Device::Cpu;
    let t = |shape: &[usize]| {
        QTensor::quantize(
            &Tensor::ones(shape, candle_core::DType::F32, &dev).unwrap(),
            GgmlDType::F32,
        )
        .unwrap()
    };
    let (emb, norm, q) = (t(&[n, 8]), t(&[8]), t(&[8, 8]));
    let tensors = [
        ("token_embd.weight", &emb),
        ("output_norm.weight", &norm),
        ("blk.0.attn_q.weight", &q),
    ];
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let mut out = Cursor::new(Vec::new());
    gguf_file::write(&mut out, &meta_refs, &tensors).unwrap();
    out.into_inner()
}

fn target(bytes: &[u8]) -> bool {
    let mut r = Cursor::new(bytes);
    let Ok(content) = tqkv_llama::gguf::read_content(&mut r, bytes.len() as u64) else {
        return false;
    };
    let _ = tqkv_llama::gguf::config_from_gguf(&content);
    let Ok(tok) = tqkv_llama::gguf::tokenizer_from_gguf(&content) else {
        return false;
    };
    let _ = tok.tokenizer.encode("the abc <|im_start|>hello", false);
    if let Some(src) = &tok.chat_template {
        if let Ok(t) = tqkv_llama::template::ChatTemplate::new(src, &tok.bos, &tok.eos) {
            let m = Message {
                role: "user".into(),
                content: "hi".into(),
            };
            let _ = t.render(&[m], true);
        }
    }
    // Every tensor the header lists can be read without reading past the file.
    for name in content.tensor_infos.keys() {
        let _ = content.tensor(&mut r, name, &Device::Cpu);
    }
    true
}

#[test]
fn fuzz_gguf() {
    let seeds = vec![
        seed_file(
            "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}",
            "smollm",
        ),
        seed_file("{{ bos_token }}{{ messages[0].content | trim }}", "llama-bpe"),
    ];
    {
        let mut r = Cursor::new(&seeds[0]);
        let c = tqkv_llama::gguf::read_content(&mut r, seeds[0].len() as u64).unwrap();
        tqkv_llama::gguf::tokenizer_from_gguf(&c)
            .map(|_| ())
            .unwrap();
    }
    let r = tqkv_fuzz::run("gguf", &seeds, target);
    assert!(r.accepted > 0);
}

/// Inputs found while writing the target, kept as regression tests.
#[test]
fn known_bad_headers_are_errors() {
    let base = |extra: Vec<(&str, Value)>| {
        let meta: Vec<(&str, &Value)> = extra.iter().map(|(k, v)| (*k, v)).collect();
        let mut out = Cursor::new(Vec::new());
        gguf_file::write(&mut out, &meta, &[]).unwrap();
        out.into_inner()
    };
    // general.alignment 0: candle's parser divides by it (a panic, turned into an error).
    let f = base(vec![("general.alignment", Value::U32(0))]);
    assert!(tqkv_llama::gguf::read_content(&mut Cursor::new(&f), f.len() as u64).is_err());
    // A negative block count is an error, not 2⁶⁴ − 1 layers.
    let f = base(vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", Value::U32(8)),
        ("llama.attention.head_count", Value::U32(2)),
        ("llama.feed_forward_length", Value::U32(16)),
        ("llama.block_count", Value::I32(-1)),
        ("llama.vocab_size", Value::U32(10)),
    ]);
    let c = tqkv_llama::gguf::read_content(&mut Cursor::new(&f), f.len() as u64).unwrap();
    let e = tqkv_llama::gguf::config_from_gguf(&c)
        .unwrap_err()
        .to_string();
    assert!(e.contains("block_count") && e.contains("-1"), "{e}");
    // A tensor whose offset runs past the file (or overflows) is refused before any read.
    let mut f = seed_file("", "smollm");
    let len = f.len() as u64;
    let c = tqkv_llama::gguf::read_content(&mut Cursor::new(&f), len).unwrap();
    assert!(tqkv_llama::gguf::check_tensors(&c, len - 1).is_err());
    f.truncate(f.len() - 4);
    assert!(tqkv_llama::gguf::read_content(&mut Cursor::new(&f), f.len() as u64).is_err());
}
