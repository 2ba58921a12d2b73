//! `tqkv bench serve`: a bounded load test of the server on 127.0.0.1, per cache kind at the
//! same `--kv-memory`. N clients send fixed prompts of `--prompt-tokens` tokens (token ids, so
//! every kind gets the same input) asking for exactly `--max-tokens` tokens (`ignore_eos`),
//! streamed; reported: throughput, time to first token and inter-token latency percentiles,
//! the most sequences the server ran at once, and preemptions. With `--system-tokens N` the
//! requests are chats that share one system message of about N tokens (its tiles held once by
//! the kinds that page, `--prefix-min` permitting) and the table adds the peak tiles held and
//! the requests that started from the kept prefix.

use crate::chat::ModelArgs;
use crate::serve::EngineArgs;
use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use serde_json::json;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// Options.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Cache kinds, comma-separated (each gets a server of its own, one after the other).
    #[arg(long = "kinds", default_value = "f16,tq3.5,tq2.5")]
    pub kinds: String,
    /// Concurrent clients.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// Requests in all.
    #[arg(long, default_value_t = 64)]
    pub requests: usize,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 200)]
    pub prompt_tokens: usize,
    /// Completion tokens per request.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// A chat system message of about this many tokens shared by every request (0: plain
    /// completions of token ids).
    #[arg(long, default_value_t = 0)]
    pub system_tokens: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// What one request sends: token ids to `/v1/completions`, or a chat (system, user text) to
/// `/v1/chat/completions`.
#[derive(Clone)]
enum Body {
    Ids(Vec<u32>),
    Chat(std::sync::Arc<str>, String),
}

/// One request's timings.
struct Timing {
    ttft: Duration,
    gaps: Vec<Duration>,
    tokens: usize,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Prompt `i`: `n` token ids of a fixed text, starting at an offset of its own.
fn prompt(tok: &tokenizers::Tokenizer, i: usize, n: usize) -> Result<Vec<u32>> {
    const TEXT: &str = "The licenses for most software and other practical works are designed to \
        take away your freedom to share and change the works. By contrast, the GNU General Public \
        License is intended to guarantee your freedom to share and change all versions of a \
        program, to make sure it remains free software for all its users. When we speak of free \
        software, we are referring to freedom, not price. Our General Public Licenses are designed \
        to make sure that you have the freedom to distribute copies of free software, that you \
        receive source code or can get it if you want it, that you can change the software or use \
        pieces of it in new free programs, and that you know you can do these things. ";
    let text = format!("Request {i}. {}", TEXT.repeat(n / 40 + 2));
    let ids = tok
        .encode(text, false)
        .map_err(anyhow::Error::msg)?
        .get_ids()
        .to_vec();
    if ids.len() < n {
        bail!("the bench text is too short for {n} tokens");
    }
    Ok(ids[..n].to_vec())
}

async fn one(
    client: &reqwest::Client,
    base: &str,
    model: &str,
    req: Body,
    max: usize,
) -> Result<Timing> {
    let t0 = Instant::now();
    let common = json!({
        "model": model, "max_tokens": max, "temperature": 0,
        "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true},
    });
    let (url, mut body) = match req {
        Body::Ids(ids) => (format!("{base}/v1/completions"), json!({ "prompt": ids })),
        Body::Chat(system, user) => (
            format!("{base}/v1/chat/completions"),
            json!({ "messages": [
                {"role": "system", "content": &*system},
                {"role": "user", "content": user},
            ]}),
        ),
    };
    for (k, v) in common.as_object().into_iter().flatten() {
        body[k] = v.clone();
    }
    let resp = client.post(url).json(&body).send().await?;
    if !resp.status().is_success() {
        bail!(
            "{}: {}",
            resp.status(),
            resp.text().await.unwrap_or_default()
        );
    }
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    let (mut first, mut last) = (None, Instant::now());
    let mut gaps = Vec::new();
    let mut tokens = 0;
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk?);
        while let Some(p) = buf.windows(2).position(|w| w == b"\n\n") {
            let ev: Vec<u8> = buf.drain(..p + 2).collect();
            let line = String::from_utf8_lossy(&ev);
            let Some(data) = line.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(data)?;
            if let Some(e) = v.get("error") {
                bail!("stream error: {e}");
            }
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                tokens = u["completion_tokens"].as_u64().unwrap_or(0) as usize;
            }
            let c = &v["choices"][0];
            let text = c["text"]
                .as_str()
                .or_else(|| c["delta"]["content"].as_str())
                .unwrap_or("");
            if !text.is_empty() {
                let now = Instant::now();
                match first {
                    None => first = Some(now - t0),
                    Some(_) => gaps.push(now - last),
                }
                last = now;
            }
        }
    }
    Ok(Timing {
        ttft: first.context("no token came back")?,
        gaps,
        tokens,
    })
}

/// `tqkv bench serve`.
pub fn run(a: Args) -> Result<()> {
    if a.clients == 0 || a.requests == 0 || a.prompt_tokens == 0 || a.max_tokens == 0 {
        bail!("--clients, --requests, --prompt-tokens and --max-tokens must be ≥ 1");
    }
    let rt = crate::serve::runtime()?;
    let mut rows = Vec::new();
    let chat = a.system_tokens > 0;
    println!(
        "| kind | KV memory | KV bytes / token at full length | sequences that fit at full length | peak sequences | preemptions | tokens/s (completion) | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | wall (s) |{}\n|---|---|---|---|---|---|---|---|---|---|{}",
        if chat { " peak KV tiles | prefix hits |" } else { "" },
        if chat { "---|---|" } else { "" },
    );
    for kind in a.kinds.split(',').map(str::trim).filter(|k| !k.is_empty()) {
        let mut m = a.model.clone();
        m.kv = kind.to_string();
        let state = crate::serve::start(&m, &a.engine, None)?;
        let engine = state.engine.clone();
        let model = state.served[0].clone();
        let mut longest = a.prompt_tokens;
        let ids = (0..a.requests)
            .map(|i| prompt(&state.tokenizer, i, a.prompt_tokens))
            .collect::<Result<Vec<_>>>()?;
        let prompts: Vec<Body> = if chat {
            // One system message for all (the bench text's first tokens), each request's own
            // user text.
            let sys = prompt(&state.tokenizer, 0, a.system_tokens)?;
            let text = |ids: &[u32]| {
                state
                    .tokenizer
                    .decode(ids, true)
                    .map_err(anyhow::Error::msg)
            };
            let system: std::sync::Arc<str> = text(&sys)?.into();
            let mut v = Vec::new();
            for u in &ids {
                let user = text(u)?;
                let rendered = state
                    .template
                    .render_json(
                        &json!([{"role": "system", "content": &*system}, {"role": "user", "content": &user}]),
                        None,
                        true,
                    )
                    .map_err(anyhow::Error::msg)?;
                let n = state
                    .tokenizer
                    .encode(rendered, false)
                    .map_err(anyhow::Error::msg)?
                    .len();
                longest = longest.max(n);
                v.push(Body::Chat(system.clone(), user));
            }
            v
        } else {
            ids.into_iter().map(Body::Ids).collect()
        };
        // What the pool holds of sequences at full length (prompt + completion; a chat's prompt
        // is what the template renders, system message included).
        let full = longest + a.max_tokens;
        let per_seq = engine
            .bytes_at(full)
            .context("the context is shorter than prompt + completion")?;
        let tiles = engine
            .tiles_at(full)
            .context("the context is shorter than prompt + completion")?;
        let fit = engine.metrics.tiles_total.load(Relaxed) / tiles.max(1);
        let row = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let url = format!("http://{}", listener.local_addr()?);
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let server = tokio::spawn(tqkv_serve::serve(listener, state, async {
                let _ = stop_rx.await;
            }));
            let client = reqwest::Client::new();
            let queue = std::sync::Arc::new(std::sync::Mutex::new(prompts));
            let t0 = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..a.clients {
                let (client, url, model, queue) =
                    (client.clone(), url.clone(), model.clone(), queue.clone());
                let max = a.max_tokens;
                tasks.push(tokio::spawn(async move {
                    let mut out = Vec::new();
                    loop {
                        let Some(ids) = queue.lock().expect("queue").pop() else {
                            break;
                        };
                        out.push(one(&client, &url, &model, ids, max).await?);
                    }
                    anyhow::Ok(out)
                }));
            }
            let mut timings = Vec::new();
            for t in tasks {
                timings.extend(t.await??);
            }
            let wall = t0.elapsed().as_secs_f64();
            let _ = stop_tx.send(());
            server.await??;
            anyhow::Ok((timings, wall))
        })?;
        let (timings, wall) = row;
        let tokens: usize = timings.iter().map(|t| t.tokens).sum();
        let mut ttft: Vec<f64> = timings.iter().map(|t| t.ttft.as_secs_f64()).collect();
        let mut itl: Vec<f64> = timings
            .iter()
            .flat_map(|t| t.gaps.iter().map(|g| g.as_secs_f64() * 1e3))
            .collect();
        let m = &engine.metrics;
        let (peak, pre, tiles) = (
            m.peak_running.load(Relaxed),
            m.preemptions.load(Relaxed),
            m.tiles_total.load(Relaxed),
        );
        let (tiles_peak, hits) = (m.tiles_peak.load(Relaxed), m.prefix_hits.load(Relaxed));
        let r = json!({
            "kind": kind, "kv_memory": a.engine.kv_memory, "tiles": tiles,
            "bytes_per_token_full": per_seq as f64 / full as f64, "fit_full_length": fit,
            "peak_sequences": peak, "preemptions": pre,
            "completion_tokens": tokens, "tokens_per_s": tokens as f64 / wall,
            "ttft_p50_s": pct(&mut ttft, 50.0), "ttft_p99_s": pct(&mut ttft, 99.0),
            "itl_p50_ms": pct(&mut itl, 50.0), "itl_p99_ms": pct(&mut itl, 99.0),
            "wall_s": wall, "requests": timings.len(), "clients": a.clients,
            "prompt_tokens": a.prompt_tokens, "max_tokens": a.max_tokens,
            "system_tokens": a.system_tokens, "tiles_peak": tiles_peak, "prefix_hits": hits,
            "prefix_min": a.engine.prefix_min,
        });
        let extra = if chat {
            format!(" {tiles_peak} of {tiles} | {hits} |")
        } else {
            String::new()
        };
        println!(
            "| {kind} | {} | {:.0} | {fit} | {peak} | {pre} | {:.1} | {:.2} / {:.2} | {:.0} / {:.0} | {:.1} |{extra}",
            a.engine.kv_memory,
            per_seq as f64 / full as f64,
            r["tokens_per_s"].as_f64().unwrap_or(0.0),
            r["ttft_p50_s"].as_f64().unwrap_or(0.0),
            r["ttft_p99_s"].as_f64().unwrap_or(0.0),
            r["itl_p50_ms"].as_f64().unwrap_or(0.0),
            r["itl_p99_ms"].as_f64().unwrap_or(0.0),
            wall
        );
        if tokens != a.requests * a.max_tokens {
            bail!(
                "{kind}: {tokens} tokens came back, {} asked",
                a.requests * a.max_tokens
            );
        }
        rows.push(r);
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&rows)?)?;
    }
    Ok(())
}
