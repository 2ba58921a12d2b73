//! Model hyper-parameters of the Llama family (Llama 2/3.x, Mistral, SmolLM2, Qwen2), read from a
//! Hugging Face `config.json` or from GGUF metadata, validated so that a malformed config is an
//! error naming the field.

use crate::{Error, Result};
use serde::Deserialize;

/// Llama-3.1-style RoPE frequency scaling.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Llama3RopeScaling {
    /// Scale factor of the low frequencies.
    pub factor: f64,
    /// Wavelength threshold (as a fraction of the original context) of the low band.
    pub low_freq_factor: f64,
    /// Wavelength threshold of the high band.
    pub high_freq_factor: f64,
    /// The context the model was pre-trained with.
    pub original_max_position_embeddings: usize,
}

/// Everything the forward pass needs.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Architecture name as given (`llama`, `mistral`, `qwen2`).
    pub architecture: String,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// KV heads (GQA).
    pub num_kv_heads: usize,
    /// Per-head dimension.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// Llama 3.1 RoPE scaling, if any.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Largest position.
    pub max_position_embeddings: usize,
    /// Output projection shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections have biases (Qwen2).
    pub attention_bias: bool,
}

#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    attention_bias: Option<bool>,
}

fn default_theta() -> f64 {
    10000.0
}
fn default_eps() -> f64 {
    1e-5
}
fn default_max_pos() -> usize {
    4096
}

/// Architectures this runner implements (HF `model_type` / GGUF `general.architecture`).
pub const SUPPORTED: &[&str] = &["llama", "mistral", "qwen2"];

impl LlamaConfig {
    /// Parses a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let c: HfConfig =
            serde_json::from_str(text).map_err(|e| Error::Config(format!("config.json: {e}")))?;
        let arch = c.model_type.clone().unwrap_or_else(|| {
            c.architectures
                .first()
                .map(|a| a.to_lowercase().replace("forcausallm", ""))
                .unwrap_or_default()
        });
        if !SUPPORTED.contains(&arch.as_str()) {
            return Err(Error::UnsupportedArchitecture(arch));
        }
        let rope_scaling = match &c.rope_scaling {
            Some(v) if v.get("rope_type").and_then(|t| t.as_str()) == Some("llama3") => Some(
                serde_json::from_value(v.clone())
                    .map_err(|e| Error::Config(format!("config.json rope_scaling: {e}")))?,
            ),
            Some(v) if v.is_null() => None,
            Some(v) => {
                let kind = v
                    .get("rope_type")
                    .or_else(|| v.get("type"))
                    .cloned()
                    .unwrap_or_default();
                return Err(Error::Config(format!(
                    "config.json: rope_scaling type {kind} is not supported (llama3 is)"
                )));
            }
            None => None,
        };
        let heads = c.num_attention_heads;
        let cfg = LlamaConfig {
            attention_bias: c.attention_bias.unwrap_or(arch == "qwen2"),
            architecture: arch,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_hidden_layers,
            num_heads: heads,
            num_kv_heads: c.num_key_value_heads.unwrap_or(heads),
            head_dim: c
                .head_dim
                .unwrap_or(c.hidden_size.checked_div(heads).unwrap_or(0)),
            vocab_size: c.vocab_size,
            rope_theta: c.rope_theta,
            rope_scaling,
            rms_norm_eps: c.rms_norm_eps,
            max_position_embeddings: c.max_position_embeddings,
            tie_word_embeddings: c.tie_word_embeddings,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the invariants the forward pass relies on.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.num_layers == 0
            || self.hidden_size == 0
            || self.vocab_size == 0
            || self.intermediate_size == 0
        {
            return bad(format!(
                "layers, hidden size, vocab and MLP width must be positive: {self:?}"
            ));
        }
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.num_heads % self.num_kv_heads != 0
        {
            return bad(format!(
                "{} query heads is not a positive multiple of {} KV heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || self.head_dim % 2 != 0 {
            return bad(format!(
                "head_dim {} must be positive and even (RoPE)",
                self.head_dim
            ));
        }
        // Bounds far above any real model, so that sizes computed from them cannot overflow
        // and a malformed config fails here instead of in an allocation.
        for (what, v, max) in [
            ("num_hidden_layers", self.num_layers, 4096),
            ("hidden_size", self.hidden_size, 1 << 17),
            ("intermediate_size", self.intermediate_size, 1 << 20),
            ("num_attention_heads", self.num_heads, 1024),
            ("head_dim", self.head_dim, 1024),
            ("vocab_size", self.vocab_size, 1 << 24),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                1 << 26,
            ),
        ] {
            if v > max {
                return bad(format!("{what} = {v} exceeds {max}"));
            }
        }
        if self.max_position_embeddings == 0 {
            return bad("max_position_embeddings must be positive".into());
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        if !positive(self.rope_theta) || !positive(self.rms_norm_eps) {
            return bad("rope_theta and rms_norm_eps must be positive".into());
        }
        Ok(())
    }

    /// The RoPE inverse frequencies (with Llama 3.1 scaling when configured).
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d as f64))
            .collect();
        let Some(s) = &self.rope_scaling else {
            return base.iter().map(|&f| f as f32).collect();
        };
        let low_wavelen = s.original_max_position_embeddings as f64 / s.low_freq_factor;
        let high_wavelen = s.original_max_position_embeddings as f64 / s.high_freq_factor;
        base.iter()
            .map(|&f| {
                let wavelen = 2.0 * std::f64::consts::PI / f;
                let v = if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / s.factor
                } else {
                    let smooth = (s.original_max_position_embeddings as f64 / wavelen
                        - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * f / s.factor + smooth * f
                };
                v as f32
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA31: &str = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","hidden_size":4096,
        "intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,
        "vocab_size":128256,"rope_theta":500000.0,"max_position_embeddings":131072,"rms_norm_eps":1e-5,
        "rope_scaling":{"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
        "original_max_position_embeddings":8192,"rope_type":"llama3"}}"#;

    #[test]
    fn llama31_config_and_rope_scaling() {
        let c = LlamaConfig::from_hf_json(LLAMA31).unwrap();
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (32, 8, 128));
        assert!(!c.attention_bias && !c.tie_word_embeddings);
        let f = c.inv_freq();
        let base = |i: usize| 1.0 / 500000f64.powf(2.0 * i as f64 / 128.0);
        // High frequencies (wavelength < 8192/4) unchanged, low ones (> 8192) divided by 8, the
        // band between interpolated (Llama 3.1's reference implementation).
        for (i, &v) in f.iter().enumerate() {
            let w = 2.0 * std::f64::consts::PI / base(i);
            let want = if w < 2048.0 {
                base(i)
            } else if w > 8192.0 {
                base(i) / 8.0
            } else {
                let s = (8192.0 / w - 1.0) / 3.0;
                (1.0 - s) * base(i) / 8.0 + s * base(i)
            };
            assert!((v as f64 / want - 1.0).abs() < 1e-6, "i={i}: {v} vs {want}");
        }
        assert_eq!(f[0], 1.0);
    }

    #[test]
    fn qwen2_has_biases_and_bad_configs_are_errors() {
        let q = LLAMA31.replace("\"model_type\":\"llama\"", "\"model_type\":\"qwen2\"").replace(",\n        \"rope_scaling\":{\"factor\":8.0,\"low_freq_factor\":1.0,\"high_freq_factor\":4.0,\n        \"original_max_position_embeddings\":8192,\"rope_type\":\"llama3\"}", "");
        let c = LlamaConfig::from_hf_json(&q).unwrap();
        assert!(c.attention_bias && c.rope_scaling.is_none());
        let yarn = LLAMA31.replace("\"rope_type\":\"llama3\"", "\"rope_type\":\"yarn\"");
        assert!(LlamaConfig::from_hf_json(&yarn)
            .unwrap_err()
            .to_string()
            .contains("yarn"));
        assert!(LlamaConfig::from_hf_json("{not json").is_err());
        let odd = LLAMA31.replace("\"num_attention_heads\":32", "\"num_attention_heads\":30");
        assert!(LlamaConfig::from_hf_json(&odd)
            .unwrap_err()
            .to_string()
            .contains("multiple"));
        let m = LLAMA31.replace("\"model_type\":\"llama\"", "\"model_type\":\"mamba\"");
        assert!(matches!(
            LlamaConfig::from_hf_json(&m),
            Err(Error::UnsupportedArchitecture(_))
        ));
    }
}
