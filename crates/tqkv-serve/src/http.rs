//! The HTTP layer (axum on tokio): `/v1/chat/completions`, `/v1/completions` (streamed as
//! server-sent events in OpenAI's chunk format, ending with `data: [DONE]`, or whole),
//! `/v1/models`, `/health`, `/metrics` (Prometheus text format).
//!
//! A handler renders and tokenizes the prompt, submits it to the engine and relays the
//! engine's events. A client that goes away drops the response, which drops the event
//! receiver, which cancels the request in the engine and frees its tiles.

use crate::api::{self, ApiError, ChatRequest, Common, CompletionRequest};
use crate::engine::{EngineHandle, Event, Finish, Request, SubmitError};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tqkv_llama::template::ChatTemplate;

/// What the handlers share.
pub struct AppState {
    /// The engine.
    pub engine: EngineHandle,
    /// The tokenizer.
    pub tokenizer: tokenizers::Tokenizer,
    /// The model's chat template.
    pub template: ChatTemplate,
    /// Model ids answered to (the first is `/v1/models`' id).
    pub served: Vec<String>,
    /// Requests so far (ids and default seeds).
    pub counter: AtomicU64,
    /// Start time (UNIX seconds), `owned_by`/`created` of the model.
    pub started: u64,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        (status, Json(self.body())).into_response()
    }
}

/// The router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError {
                status: 404,
                message: "no such endpoint".into(),
                kind: "not_found_error",
                param: None,
                code: None,
            }
        })
        .with_state(state)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn health(State(s): State<Arc<AppState>>) -> Response {
    if s.engine.draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

async fn models(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": s.served[0],
            "object": "model",
            "created": s.started,
            "owned_by": "tqkv",
            "max_model_len": s.engine.max_context(),
        }],
    }))
}

/// Which endpoint a completion answers.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

impl Kind {
    /// OpenAI's `object` of a whole response or of a streamed chunk.
    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }
}

async fn chat(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    let r: ChatRequest = match api::parse(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let (prompt, prefix) = match (|| {
        api::check_model(r.common.model.as_deref(), &s.served)?;
        let messages = api::normalise_messages(&r.messages)?;
        let text = s
            .template
            .render_json(&messages, r.tools.as_ref(), true)
            .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
        let prompt = encode(&s, &text)?;
        let prefix = system_prefix(&s, &messages, r.tools.as_ref(), &prompt);
        Ok::<_, ApiError>((prompt, prefix))
    })() {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    complete(s, Kind::Chat, prompt, prefix, r.common).await
}

async fn completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    let r: CompletionRequest = match api::parse(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let prompt = match (|| {
        api::check_model(r.common.model.as_deref(), &s.served)?;
        if r.echo {
            return Err(ApiError::invalid("echo", "echo is not supported"));
        }
        let bad = || ApiError::invalid("prompt", "a string, a list of one string, or token ids");
        match &r.prompt {
            Value::String(t) => encode(&s, t),
            Value::Array(a) if a.len() == 1 && a[0].is_string() => {
                encode(&s, a[0].as_str().unwrap_or(""))
            }
            Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_u64) => a
                .iter()
                .map(|t| {
                    t.as_u64()
                        .and_then(|t| u32::try_from(t).ok())
                        .filter(|&t| (t as usize) < s.tokenizer.get_vocab_size(true))
                        .ok_or_else(|| {
                            ApiError::invalid(
                                "prompt",
                                format!("token id {t} is outside the vocabulary"),
                            )
                        })
                })
                .collect(),
            Value::Array(a) if a.len() > 1 && a.iter().all(Value::is_string) => Err(
                ApiError::invalid("prompt", "one prompt per request (send several requests)"),
            ),
            _ => Err(bad()),
        }
    })() {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    complete(s, Kind::Text, prompt, None, r.common).await
}

/// The prompt tokens of a chat's leading system message (rendered alone by the template,
/// without a generation prompt) when they begin `prompt`: the part of the prompt that requests
/// with the same system message share.
fn system_prefix(
    s: &AppState,
    messages: &Value,
    tools: Option<&Value>,
    prompt: &[u32],
) -> Option<usize> {
    let first = messages.as_array()?.first()?;
    if first.get("role")?.as_str()? != "system" {
        return None;
    }
    let text = s
        .template
        .render_json(&Value::Array(vec![first.clone()]), tools, false)
        .ok()?;
    let ids = s.tokenizer.encode(text, false).ok()?.get_ids().to_vec();
    (!ids.is_empty() && ids.len() < prompt.len() && prompt.starts_with(&ids)).then_some(ids.len())
}

fn encode(s: &AppState, text: &str) -> Result<Vec<u32>, ApiError> {
    let ids = s
        .tokenizer
        .encode(text, false)
        .map_err(|e| ApiError::invalid("prompt", format!("tokenizing: {e}")))?
        .get_ids()
        .to_vec();
    if ids.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    Ok(ids)
}

fn submit_error(e: SubmitError) -> ApiError {
    let (status, kind, code) = match &e {
        SubmitError::QueueFull(_) => (429, "rate_limit_error", None),
        SubmitError::ShuttingDown => (503, "server_error", None),
        SubmitError::TooLong { .. } => (
            400,
            "invalid_request_error",
            Some("context_length_exceeded"),
        ),
        SubmitError::TooBig { .. } | SubmitError::Empty => (400, "invalid_request_error", None),
    };
    ApiError {
        status,
        message: e.to_string(),
        kind,
        param: None,
        code,
    }
}

async fn complete(
    s: Arc<AppState>,
    kind: Kind,
    prompt: Vec<u32>,
    prefix: Option<usize>,
    c: Common,
) -> Response {
    let n = s.counter.fetch_add(1, Relaxed);
    let params = match api::gen_params(&c, prompt.len(), s.engine.max_context(), n) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    if let Err(e) = s.engine.submit(Request {
        prompt,
        prefix,
        params,
        events: tx,
    }) {
        return submit_error(e).into_response();
    }
    let id = match kind {
        Kind::Chat => format!("chatcmpl-{n}"),
        Kind::Text => format!("cmpl-{n}"),
    };
    let model = s.served[0].clone();
    let created = now();
    if c.stream {
        let usage = c.stream_options.is_some_and(|o| o.include_usage);
        stream(kind, id, model, created, usage, rx).into_response()
    } else {
        whole(kind, id, model, created, rx).await
    }
}

async fn whole(
    kind: Kind,
    id: String,
    model: String,
    created: u64,
    mut rx: mpsc::UnboundedReceiver<Event>,
) -> Response {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(t) => text.push_str(&t),
            Event::Error(e) => return ApiError::server(e).into_response(),
            Event::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            } => {
                let choice = match kind {
                    Kind::Chat => json!({
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": finish.as_str(),
                        "logprobs": null,
                    }),
                    Kind::Text => json!({
                        "index": 0,
                        "text": text,
                        "finish_reason": finish.as_str(),
                        "logprobs": null,
                    }),
                };
                return Json(json!({
                    "id": id,
                    "object": kind.object(false),
                    "created": created,
                    "model": model,
                    "choices": [choice],
                    "usage": api::usage(prompt_tokens, completion_tokens),
                }))
                .into_response();
            }
        }
    }
    ApiError::server("the engine stopped before the request finished".into()).into_response()
}

/// One chunk of a streamed completion.
fn chunk(
    kind: Kind,
    id: &str,
    model: &str,
    created: u64,
    text: Option<&str>,
    finish: Option<Finish>,
    role: bool,
) -> Value {
    let choice = match kind {
        Kind::Chat => {
            let mut delta = serde_json::Map::new();
            if role {
                delta.insert("role".into(), "assistant".into());
            }
            if let Some(t) = text {
                delta.insert("content".into(), t.into());
            }
            json!({"index": 0, "delta": delta, "finish_reason": finish.map(Finish::as_str), "logprobs": null})
        }
        Kind::Text => json!({
            "index": 0,
            "text": text.unwrap_or(""),
            "finish_reason": finish.map(Finish::as_str),
            "logprobs": null,
        }),
    };
    json!({"id": id, "object": kind.object(true), "created": created, "model": model, "choices": [choice]})
}

fn stream(
    kind: Kind,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    rx: mpsc::UnboundedReceiver<Event>,
) -> impl IntoResponse {
    let data = |v: Value| Ok::<_, Infallible>(SseEvent::default().data(v.to_string()));
    // A chat stream opens with the assistant's role; the chunks after carry text only.
    let opening =
        (kind == Kind::Chat).then(|| data(chunk(kind, &id, &model, created, Some(""), None, true)));
    let events = UnboundedReceiverStream::new(rx).flat_map(move |ev| {
        let mut out = Vec::new();
        match ev {
            Event::Text(t) if t.is_empty() => {}
            Event::Text(t) => {
                out.push(data(chunk(
                    kind,
                    &id,
                    &model,
                    created,
                    Some(&t),
                    None,
                    false,
                )));
            }
            Event::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            } => {
                out.push(data(chunk(
                    kind,
                    &id,
                    &model,
                    created,
                    None,
                    Some(finish),
                    false,
                )));
                if include_usage {
                    out.push(data(json!({
                        "id": id, "object": kind.object(true),
                        "created": created, "model": model, "choices": [],
                        "usage": api::usage(prompt_tokens, completion_tokens),
                    })));
                }
                out.push(Ok(SseEvent::default().data("[DONE]")));
            }
            Event::Error(e) => {
                out.push(data(ApiError::server(e).body()));
                out.push(Ok(SseEvent::default().data("[DONE]")));
            }
        }
        futures_util::stream::iter(out)
    });
    let all = futures_util::stream::iter(opening).chain(events);
    Sse::new(all)
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    let m = &s.engine.metrics;
    let kind = &s.engine.kind;
    let mut out = String::new();
    let mut put = |name: &str, help: &str, ty: &str, value: String| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {ty}\n{name}{{kind=\"{kind}\"}} {value}\n"
        ));
    };
    let (used, total) = (m.tiles_used.load(Relaxed), m.tiles_total.load(Relaxed));
    let (bytes, tokens) = (m.kv_bytes.load(Relaxed), m.kv_tokens.load(Relaxed));
    let per = if tokens == 0 {
        0.0
    } else {
        bytes as f64 / tokens as f64
    };
    // (name, type, help, value)
    let rows = [
        (
            "tqkv_requests_running",
            "gauge",
            "Sequences in the running batch.",
            m.running.load(Relaxed).to_string(),
        ),
        (
            "tqkv_requests_waiting",
            "gauge",
            "Requests waiting for KV tiles or a batch slot.",
            m.waiting.load(Relaxed).to_string(),
        ),
        (
            "tqkv_requests_running_peak",
            "gauge",
            "Most sequences that ran together.",
            m.peak_running.load(Relaxed).to_string(),
        ),
        (
            "tqkv_kv_tiles_used",
            "gauge",
            "KV pool tiles held by sequences.",
            used.to_string(),
        ),
        (
            "tqkv_kv_tiles_peak",
            "gauge",
            "Most KV pool tiles held after a step.",
            m.tiles_peak.load(Relaxed).to_string(),
        ),
        (
            "tqkv_kv_tiles_free",
            "gauge",
            "KV pool tiles free.",
            (total - used.min(total)).to_string(),
        ),
        (
            "tqkv_kv_tiles_total",
            "gauge",
            "KV pool tiles.",
            total.to_string(),
        ),
        (
            "tqkv_kv_tile_bytes",
            "gauge",
            "Bytes per KV pool tile.",
            m.tile_bytes.load(Relaxed).to_string(),
        ),
        (
            "tqkv_kv_bytes",
            "gauge",
            "KV cache bytes held by running sequences.",
            bytes.to_string(),
        ),
        (
            "tqkv_kv_tokens",
            "gauge",
            "Tokens held by running sequences.",
            tokens.to_string(),
        ),
        (
            "tqkv_kv_bytes_per_token",
            "gauge",
            "KV bytes per held token, all layers.",
            format!("{per:.2}"),
        ),
        (
            "tqkv_prompt_tokens_total",
            "counter",
            "Prompt tokens prefilled.",
            m.prompt_tokens.load(Relaxed).to_string(),
        ),
        (
            "tqkv_generation_tokens_total",
            "counter",
            "Tokens generated.",
            m.generated_tokens.load(Relaxed).to_string(),
        ),
        (
            "tqkv_tokens_per_second",
            "gauge",
            "Tokens run per second over the last second.",
            format!("{:.2}", f64::from_bits(m.tokens_per_s.load(Relaxed))),
        ),
        (
            "tqkv_preemptions_total",
            "counter",
            "Sequences preempted (recomputed later).",
            m.preemptions.load(Relaxed).to_string(),
        ),
        (
            "tqkv_steps_total",
            "counter",
            "Engine steps.",
            m.steps.load(Relaxed).to_string(),
        ),
        (
            "tqkv_kv_paged",
            "gauge",
            "1 when the KV tiles are where the bytes live (an arena the kernels read through tables), 0 for a byte budget.",
            m.paged.load(Relaxed).to_string(),
        ),
        (
            "tqkv_kv_tiles_shared",
            "gauge",
            "References to KV tiles beyond the first (tiles stored once, read by several sequences).",
            m.tiles_shared.load(Relaxed).to_string(),
        ),
        (
            "tqkv_prefix_snapshots",
            "gauge",
            "Prompt prefixes kept for sharing.",
            m.prefix_snapshots.load(Relaxed).to_string(),
        ),
        (
            "tqkv_prefix_tiles",
            "gauge",
            "KV tiles held by the kept prefixes (shared with the sequences forked from them).",
            m.prefix_tiles.load(Relaxed).to_string(),
        ),
        (
            "tqkv_prefix_hits_total",
            "counter",
            "Requests that started from a kept prefix.",
            m.prefix_hits.load(Relaxed).to_string(),
        ),
        (
            "tqkv_prefix_tokens_total",
            "counter",
            "Prompt tokens not prefilled thanks to a kept prefix.",
            m.prefix_tokens.load(Relaxed).to_string(),
        ),
        (
            "tqkv_kv_accounting_errors_total",
            "counter",
            "Steps after which the pool disagreed with the caches (0 unless a bug).",
            m.accounting_errors.load(Relaxed).to_string(),
        ),
    ];
    for (name, ty, help, value) in rows {
        put(name, help, ty, value);
    }
    out.push_str("# HELP tqkv_requests_finished_total Requests finished, by outcome.\n# TYPE tqkv_requests_finished_total counter\n");
    for (i, o) in crate::engine::Metrics::OUTCOMES.iter().enumerate() {
        out.push_str(&format!(
            "tqkv_requests_finished_total{{kind=\"{kind}\",outcome=\"{o}\"}} {}\n",
            m.finished[i].load(Relaxed)
        ));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// Serves `router` on `listener` until `shutdown` completes; then refuses new requests, lets the
/// taken ones finish, and stops the engine.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let engine = state.engine.clone();
    let app = router(state);
    let e2 = engine.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            e2.begin_drain();
        })
        .await?;
    tokio::task::spawn_blocking(move || engine.drain())
        .await
        .map_err(std::io::Error::other)?;
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
pub async fn signal() {
    let int = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = int.await;
                    return;
                }
            };
        tokio::select! {
            _ = int => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = int.await;
    }
}
