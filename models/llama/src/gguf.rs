//! What a GGUF file says besides its tensors: the model config (`llama.*` / `qwen2.*` keys), the
//! tokenizer (`tokenizer.ggml.*`, rebuilt as a Hugging Face `tokenizers` BPE with byte-level
//! pre-tokenization for `gpt2`-type vocabularies) and the chat template.

use crate::config::{LlamaConfig, SUPPORTED};
use crate::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::json;

fn get<'a>(c: &'a Content, key: &str) -> Result<&'a Value> {
    c.metadata
        .get(key)
        .ok_or_else(|| Error::Config(format!("GGUF metadata has no {key}")))
}

/// An unsigned integer from metadata of any integer type; negative values are errors.
fn get_u(c: &Content, key: &str) -> Result<usize> {
    let v = get(c, key)?;
    let n: i128 = match v {
        Value::U8(x) => (*x).into(),
        Value::U16(x) => (*x).into(),
        Value::U32(x) => (*x).into(),
        Value::U64(x) => (*x).into(),
        Value::I8(x) => (*x).into(),
        Value::I16(x) => (*x).into(),
        Value::I32(x) => (*x).into(),
        Value::I64(x) => (*x).into(),
        other => {
            return Err(Error::Config(format!(
                "GGUF {key}: expected an integer, got {other:?}"
            )))
        }
    };
    usize::try_from(n).map_err(|_| Error::Config(format!("GGUF {key}: {n} is not a valid count")))
}

/// Reads a GGUF header (metadata and tensor table) and checks that every tensor lies inside
/// the `len` bytes of the file with a size that does not overflow, so that reading any tensor
/// allocates at most the file's size. A panic inside the parser (a dependency's bug on a
/// malformed file) is turned into an error too.
pub fn read_content<R: std::io::Read + std::io::Seek>(r: &mut R, len: u64) -> Result<Content> {
    let content = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(r)))
        .map_err(|_| Error::Weights("not a readable GGUF file (the parser gave up)".into()))?
        .map_err(|e| Error::Weights(format!("not a readable GGUF file: {e}")))?;
    check_tensors(&content, len)?;
    Ok(content)
}

/// Every tensor of `c` inside a file of `len` bytes (see [`read_content`]).
pub fn check_tensors(c: &Content, len: u64) -> Result<()> {
    for (name, info) in &c.tensor_infos {
        let bad = |why: String| Error::Weights(format!("tensor {name}: {why}"));
        let elems = info
            .shape
            .dims()
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
            .ok_or_else(|| bad(format!("shape {:?} overflows", info.shape.dims())))?;
        let (bs, ts) = (
            info.ggml_dtype.block_size() as u64,
            info.ggml_dtype.type_size() as u64,
        );
        if bs == 0 || elems % bs != 0 {
            return Err(bad(format!(
                "{elems} elements are not whole blocks of {bs} ({:?})",
                info.ggml_dtype
            )));
        }
        let end = (elems / bs)
            .checked_mul(ts)
            .and_then(|b| b.checked_add(info.offset))
            .and_then(|b| b.checked_add(c.tensor_data_offset))
            .ok_or_else(|| bad("offset and size overflow".into()))?;
        if end > len {
            return Err(Error::Weights(format!(
                "truncated ({len} bytes, tensor {name} ends at {end})"
            )));
        }
    }
    Ok(())
}

fn get_f(c: &Content, key: &str) -> Result<f64> {
    get(c, key)?
        .to_f32()
        .map(|x| x as f64)
        .map_err(|e| Error::Config(format!("GGUF {key}: {e}")))
}

/// The model config from GGUF metadata.
pub fn config_from_gguf(c: &Content) -> Result<LlamaConfig> {
    let arch = get(c, "general.architecture")?
        .to_string()
        .map_err(|e| Error::Config(format!("general.architecture: {e}")))?
        .clone();
    if !SUPPORTED.contains(&arch.as_str()) {
        return Err(Error::UnsupportedArchitecture(arch));
    }
    let k = |s: &str| format!("{arch}.{s}");
    let hidden = get_u(c, &k("embedding_length"))?;
    let heads = get_u(c, &k("attention.head_count"))?;
    let kv = get_u(c, &k("attention.head_count_kv")).unwrap_or(heads);
    let head_dim = get_u(c, &k("attention.key_length"))
        .or_else(|_| get_u(c, &k("rope.dimension_count")))
        .unwrap_or(hidden / heads.max(1));
    let vocab = match get_u(c, &k("vocab_size")) {
        Ok(v) => v,
        Err(_) => get(c, "tokenizer.ggml.tokens")?
            .to_vec()
            .map_err(|e| Error::Config(e.to_string()))?
            .len(),
    };
    let cfg = LlamaConfig {
        attention_bias: arch == "qwen2",
        hidden_size: hidden,
        intermediate_size: get_u(c, &k("feed_forward_length"))?,
        num_layers: get_u(c, &k("block_count"))?,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        vocab_size: vocab,
        rope_theta: get_f(c, &k("rope.freq_base")).unwrap_or(10000.0),
        rope_scaling: None,
        rms_norm_eps: get_f(c, &k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        max_position_embeddings: get_u(c, &k("context_length")).unwrap_or(4096),
        tie_word_embeddings: !c.tensor_infos.contains_key("output.weight"),
        architecture: arch,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Tokenizer pieces read from GGUF metadata.
pub struct GgufTokenizer {
    /// The tokenizer.
    pub tokenizer: tokenizers::Tokenizer,
    /// BOS token text.
    pub bos: String,
    /// EOS token text.
    pub eos: String,
    /// EOS token id.
    pub eos_id: u32,
    /// Whether a BOS token is prepended.
    pub add_bos: bool,
    /// The chat template, if the file has one.
    pub chat_template: Option<String>,
}

/// Rebuilds the tokenizer of a GGUF file (`gpt2`-type BPE vocabularies).
pub fn tokenizer_from_gguf(c: &Content) -> Result<GgufTokenizer> {
    let model = get(c, "tokenizer.ggml.model")?
        .to_string()
        .map_err(|e| Error::Tokenizer(e.to_string()))?
        .clone();
    if model != "gpt2" {
        return Err(Error::Tokenizer(format!(
            "GGUF tokenizer model {model:?} is not supported (gpt2-type BPE is); use a Hugging Face \
             directory with tokenizer.json instead"
        )));
    }
    let strings = |key: &str| -> Result<Vec<String>> {
        get(c, key)?
            .to_vec()
            .map_err(|e| Error::Tokenizer(format!("{key}: {e}")))?
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|e| Error::Tokenizer(format!("{key}: {e}")))
            })
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<i32> = match c.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .iter()
            .map(|x| x.to_i32().unwrap_or(1))
            .collect(),
        None => vec![1; tokens.len()],
    };
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    // Control (3) and user-defined (4) tokens are matched whole, before BPE.
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
        .map(|(i, t)| json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": types[i] == 3}))
        .collect();
    let pre = c
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_default();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre_tokenizer = match pre.as_str() {
        "smollm" | "starcoder" | "refact" => {
            json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level]})
        }
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}),
        _ => byte_level.clone(),
    };
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    });
    let tokenizer: tokenizers::Tokenizer = doc
        .to_string()
        .parse()
        .map_err(|e| Error::Tokenizer(format!("building the GGUF tokenizer: {e}")))?;
    let id = |key: &str| c.metadata.get(key).and_then(|v| v.to_u32().ok());
    let name = |i: Option<u32>| {
        i.and_then(|i| tokens.get(i as usize).cloned())
            .unwrap_or_default()
    };
    let eos_id = id("tokenizer.ggml.eos_token_id")
        .ok_or_else(|| Error::Tokenizer("GGUF has no eos_token_id".into()))?;
    if eos_id as usize >= tokens.len() {
        return Err(Error::Tokenizer(format!(
            "GGUF eos_token_id {eos_id} is outside the {} tokens",
            tokens.len()
        )));
    }
    Ok(GgufTokenizer {
        tokenizer,
        bos: name(id("tokenizer.ggml.bos_token_id")),
        eos: name(Some(eos_id)),
        eos_id,
        add_bos: c
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false),
        chat_template: c
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok().cloned()),
    })
}
