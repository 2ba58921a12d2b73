//! The HTTP layer in-process on 127.0.0.1 (the openai-client tests, scripts/test-serve.sh, run
//! the real binary): OpenAI's bodies and errors, SSE chunks ending in `[DONE]`, the streamed
//! text equal to the whole one, /metrics in Prometheus' format, a drained stop.

mod common;

use serde_json::{json, Value};
use std::sync::Arc;
use tqkv_serve::{AppState, EngineConfig};

async fn server() -> (
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let (cache, loaded) = common::load("tq3.5");
    let cfg = EngineConfig {
        cache,
        kv_memory: 32 << 20,
        tile_bytes: 0,
        max_batch: 8,
        max_waiting: 16,
        step_tokens: 256,
        max_context: 256,
        kind_name: "tq3.5".into(),
        admit_lookahead: 64,
        prefix_min: 32,
        prefix_cache: 4,
    };
    let engine =
        tqkv_serve::start(loaded.model, loaded.tokenizer.clone(), loaded.eos_ids, cfg).unwrap();
    let state = Arc::new(AppState {
        engine,
        tokenizer: loaded.tokenizer,
        template: loaded.template,
        served: vec!["m".into()],
        counter: Default::default(),
        started: 0,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let h = tokio::spawn(tqkv_serve::serve(listener, state, async {
        let _ = rx.await;
    }));
    (base, tx, h)
}

async fn post(c: &reqwest::Client, url: &str, body: &str) -> (u16, String) {
    let r = c
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_api_in_process() {
    let (base, stop, server) = server().await;
    let c = reqwest::Client::new();
    let health = c.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let models: Value = c
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "m");

    let chat = format!("{base}/v1/chat/completions");
    let comp = format!("{base}/v1/completions");
    for (url, body, status, param) in [
        (&chat, "{\"model\": \"m\", \"messages\": [".to_string(), 400, Value::Null),
        (&chat, json!({"model": "x", "messages": [{"role": "user", "content": "hi"}]}).to_string(), 404, json!("model")),
        (&chat, json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}).to_string(), 400, json!("max_tokens")),
        (&comp, json!({"model": "m", "prompt": "word ".repeat(300), "max_tokens": 2}).to_string(), 400, json!("max_tokens")),
        (&comp, json!({"model": "m", "prompt": [1, 2, 99999999]}).to_string(), 400, json!("prompt")),
        (&comp, json!({"model": "m", "prompt": "a", "n": 3}).to_string(), 400, json!("n")),
    ] {
        let (s, text) = post(&c, url, &body).await;
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
        assert_eq!((s, &v["error"]["param"]), (status, &param), "{body}: {text}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{text}");
    }
    let (s, _) = post(&c, &format!("{base}/v2/nothing"), "{}").await;
    assert_eq!(s, 404);

    let body = json!({"model": "m", "messages": [{"role": "user", "content": "Name a colour."}],
                      "max_tokens": 12, "temperature": 0});
    let (s, text) = post(&c, &chat, &body.to_string()).await;
    assert_eq!(s, 200, "{text}");
    let whole: Value = serde_json::from_str(&text).unwrap();
    let want = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(
        whole["usage"]["total_tokens"],
        whole["usage"]["prompt_tokens"].as_u64().unwrap()
            + whole["usage"]["completion_tokens"].as_u64().unwrap()
    );

    let mut sb = body.clone();
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let (s, text) = post(&c, &chat, &sb.to_string()).await;
    assert_eq!(s, 200);
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .collect();
    assert_eq!(*events.last().unwrap(), "data: [DONE]", "{text}");
    let mut got = String::new();
    let mut finish = None;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        if let Some(ch) = v["choices"].as_array().and_then(|c| c.first()) {
            got.push_str(ch["delta"]["content"].as_str().unwrap_or(""));
            if !ch["finish_reason"].is_null() {
                finish = Some(ch["finish_reason"].clone());
            }
        } else {
            assert_eq!(
                v["usage"]["completion_tokens"],
                whole["usage"]["completion_tokens"]
            );
        }
    }
    assert_eq!(got, want);
    assert_eq!(finish.as_ref(), Some(&whole["choices"][0]["finish_reason"]));

    let metrics = c
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "tqkv_requests_running",
        "tqkv_requests_waiting",
        "tqkv_kv_tiles_used",
        "tqkv_kv_tiles_free",
        "tqkv_kv_bytes_per_token",
        "tqkv_tokens_per_second",
        "tqkv_generation_tokens_total",
    ] {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{kind=\"tq3.5\"}} ")));
        let value: f64 = line
            .unwrap_or_else(|| panic!("{name} missing:\n{metrics}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(value.is_finite());
        assert!(metrics.contains(&format!("# TYPE {name} ")));
    }
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
