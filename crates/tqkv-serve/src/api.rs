//! OpenAI's request and response bodies for `/v1/chat/completions` and `/v1/completions`, and
//! their checks: what a request may say, what the engine is asked, what goes back. Unknown
//! fields are ignored (as OpenAI's server and vLLM do); fields tqkv cannot honour (n > 1,
//! logprobs, penalties other than 0) are errors rather than silently dropped.

use crate::engine::GenParams;
use serde::Deserialize;
use serde_json::{json, Value};
use tqkv_llama::sampling::SamplingParams;

/// An error with OpenAI's body: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// What went wrong.
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `not_found_error`, …
    pub kind: &'static str,
    /// The offending field.
    pub param: Option<String>,
    /// OpenAI's `code`: `model_not_found`, `context_length_exceeded`, …
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 about `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            code: None,
        }
    }

    /// A 500 (`server_error`): the model or the engine failed the request.
    pub fn server(message: String) -> Self {
        ApiError {
            status: 500,
            message,
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// The body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// `stop`: a string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    /// Send a last chunk with the usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// The fields both endpoints share.
#[derive(Debug, Deserialize)]
pub struct Common {
    /// The model's id (`/v1/models`).
    pub model: Option<String>,
    /// Sampling temperature (OpenAI's default 1).
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    pub top_p: Option<f32>,
    /// Top-k (vLLM's extension; 0 or -1: all).
    pub top_k: Option<i64>,
    /// Min-p (vLLM's extension).
    pub min_p: Option<f32>,
    /// Seed of the draws.
    pub seed: Option<i64>,
    /// Most tokens generated.
    pub max_tokens: Option<i64>,
    /// The same, OpenAI's newer name.
    pub max_completion_tokens: Option<i64>,
    /// Stop strings.
    pub stop: Option<Stop>,
    /// Stream the completion as server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Choices per request (1 only).
    pub n: Option<i64>,
    /// Repetition penalty (vLLM's extension; 1 = none).
    pub repetition_penalty: Option<f32>,
    /// OpenAI's penalties (0 only).
    pub presence_penalty: Option<f32>,
    /// OpenAI's penalties (0 only).
    pub frequency_penalty: Option<f32>,
    /// Log-probabilities (not supported).
    pub logprobs: Option<Value>,
    /// Generate past end-of-sequence (vLLM's extension; benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
}

/// `/v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Value,
    /// Tools the template may render.
    pub tools: Option<Value>,
    /// The rest.
    #[serde(flatten)]
    pub common: Common,
}

/// `/v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// A string, a list of one string, or token ids.
    pub prompt: Value,
    /// Echo the prompt (not supported).
    #[serde(default)]
    pub echo: bool,
    /// The rest.
    #[serde(flatten)]
    pub common: Common,
}

/// Parses a body into `T`, with OpenAI's error for malformed JSON or wrong field types.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "the body is not valid JSON"
        } else {
            "the body does not match the request's schema"
        };
        ApiError {
            status: 400,
            message: format!("{what}: {e}"),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    })
}

/// Checks the model name against what is served.
pub fn check_model(asked: Option<&str>, served: &[String]) -> Result<(), ApiError> {
    match asked {
        None => Err(ApiError::invalid(
            "model",
            "you must provide a model parameter",
        )),
        Some(m) if served.iter().any(|s| s == m) => Ok(()),
        Some(m) => Err(ApiError {
            status: 404,
            message: format!(
                "the model `{m}` does not exist; this server serves `{}`",
                served.first().map(String::as_str).unwrap_or("")
            ),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }),
    }
}

/// The engine's parameters of a request with a prompt of `prompt` tokens and a context of
/// `context` tokens; `seed` draws when the request gives none.
pub fn gen_params(
    c: &Common,
    prompt: usize,
    context: usize,
    seed: u64,
) -> Result<GenParams, ApiError> {
    let bad = ApiError::invalid;
    let finite = |name: &str, x: Option<f32>, lo: f32, hi: f32| -> Result<Option<f32>, ApiError> {
        match x {
            Some(v) if !(v.is_finite() && v >= lo && v <= hi) => {
                Err(bad(name, format!("{name} = {v} is outside [{lo}, {hi}]")))
            }
            _ => Ok(x),
        }
    };
    if let Some(n) = c.n {
        if n != 1 {
            return Err(bad(
                "n",
                format!("n = {n}: this server returns one choice (n = 1)"),
            ));
        }
    }
    if matches!(&c.logprobs, Some(v) if !v.is_null() && v != &Value::Bool(false)) {
        return Err(ApiError::invalid("logprobs", "logprobs are not supported"));
    }
    for (name, v) in [
        ("presence_penalty", c.presence_penalty),
        ("frequency_penalty", c.frequency_penalty),
    ] {
        if let Some(v) = v {
            if v != 0.0 {
                return Err(bad(
                    name,
                    format!("{name} = {v}: not supported (use repetition_penalty)"),
                ));
            }
        }
    }
    let temperature = finite("temperature", c.temperature, 0.0, 2.0)?.unwrap_or(1.0);
    let top_p = finite("top_p", c.top_p, 0.0, 1.0)?.unwrap_or(1.0);
    if top_p == 0.0 {
        return Err(ApiError::invalid("top_p", "top_p must be > 0"));
    }
    let min_p = finite("min_p", c.min_p, 0.0, 1.0)?.unwrap_or(0.0);
    let repeat = finite("repetition_penalty", c.repetition_penalty, 0.01, 100.0)?.unwrap_or(1.0);
    let top_k = match c.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => return Err(bad("top_k", format!("top_k = {k} (use -1 or 0 for all)"))),
    };
    let seed = match c.seed {
        None => seed,
        Some(s) => s as u64,
    };
    let left = context.saturating_sub(prompt);
    let (name, asked) = match (c.max_completion_tokens, c.max_tokens) {
        (Some(m), _) => ("max_completion_tokens", Some(m)),
        (None, m) => ("max_tokens", m),
    };
    let max_tokens = match asked {
        None => left,
        Some(m) if m < 1 => {
            return Err(bad(name, format!("{name} = {m}: must be at least 1")));
        }
        Some(m) => m as usize,
    };
    if prompt + max_tokens.max(1) > context {
        return Err(ApiError {
            status: 400,
            message: format!(
                "this model's maximum context length is {context} tokens; the prompt has \
                 {prompt} tokens and {max_tokens} more were asked for"
            ),
            kind: "invalid_request_error",
            param: Some(if asked.is_some() { name } else { "messages" }.into()),
            code: Some("context_length_exceeded"),
        });
    }
    let stop = match &c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > 4 {
        return Err(ApiError::invalid("stop", "at most 4 stop sequences"));
    }
    Ok(GenParams {
        sampling: SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty: repeat,
            repeat_last_n: 64,
            seed,
        },
        max_tokens,
        stop,
        ignore_eos: c.ignore_eos,
    })
}

/// The conversation as the template wants it: `content` given as a list of parts becomes its
/// text parts joined. Errors on what is not a list of messages with roles.
pub fn normalise_messages(messages: &Value) -> Result<Value, ApiError> {
    let bad = |m: String| ApiError::invalid("messages", m);
    let list = messages
        .as_array()
        .ok_or_else(|| bad("messages must be a list".into()))?;
    if list.is_empty() {
        return Err(bad("messages must not be empty".into()));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let mut m = m
            .as_object()
            .cloned()
            .ok_or_else(|| bad(format!("messages[{i}] is not an object")))?;
        match m.get("role") {
            Some(Value::String(_)) => {}
            _ => return Err(bad(format!("messages[{i}] has no role"))),
        }
        if let Some(Value::Array(parts)) = m.get("content") {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => text.push_str(t),
                    _ => {
                        return Err(bad(format!(
                            "messages[{i}].content[{j}]: only text parts are supported"
                        )))
                    }
                }
            }
            m.insert("content".into(), Value::String(text));
        }
        out.push(Value::Object(m));
    }
    Ok(Value::Array(out))
}

/// `usage`.
pub fn usage(prompt: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common(v: Value) -> Common {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn parameters_are_checked() {
        let ok = gen_params(
            &common(json!({"max_tokens": 5, "temperature": 0})),
            10,
            100,
            7,
        )
        .unwrap();
        assert_eq!(
            (ok.max_tokens, ok.sampling.temperature, ok.sampling.seed),
            (5, 0.0, 7)
        );
        let dflt = gen_params(&common(json!({})), 10, 100, 7).unwrap();
        assert_eq!(
            (
                dflt.max_tokens,
                dflt.sampling.temperature,
                dflt.sampling.top_k
            ),
            (90, 1.0, 0)
        );
        for (body, param) in [
            (json!({"max_tokens": -1}), "max_tokens"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (
                json!({"max_completion_tokens": 91}),
                "max_completion_tokens",
            ),
            (json!({"temperature": 3}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"top_k": -2}), "top_k"),
            (json!({"n": 2}), "n"),
            (json!({"presence_penalty": 0.5}), "presence_penalty"),
            (json!({"logprobs": true}), "logprobs"),
            (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
        ] {
            let e = gen_params(&common(body.clone()), 10, 100, 0).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (400, Some(param)), "{body}");
        }
        let e = gen_params(&common(json!({})), 100, 100, 0).unwrap_err();
        assert_eq!(e.code, Some("context_length_exceeded"));
    }

    #[test]
    fn models_and_messages() {
        let served = vec!["a".to_string()];
        assert!(check_model(Some("a"), &served).is_ok());
        assert_eq!(check_model(Some("b"), &served).unwrap_err().status, 404);
        assert_eq!(check_model(None, &served).unwrap_err().status, 400);
        let m = normalise_messages(&json!([{"role": "user", "content": [
            {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]))
        .unwrap();
        assert_eq!(m[0]["content"], "ab");
        for bad in [json!([]), json!({}), json!([{"content": "x"}]), json!([1])] {
            assert!(normalise_messages(&bad).is_err(), "{bad}");
        }
        let e = parse::<ChatRequest>(b"{not json").unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        let e = parse::<ChatRequest>(br#"{"model": "a", "messages": [], "max_tokens": "x"}"#)
            .unwrap_err();
        assert!(e.message.contains("schema"), "{}", e.message);
    }
}
