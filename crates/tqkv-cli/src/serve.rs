//! `tqkv serve`: the OpenAI-compatible server (crates/tqkv-serve) on a model and cache kind.

use crate::chat::{load, ModelArgs};
use anyhow::{Context, Result};
use std::sync::Arc;
use tqkv_serve::{parse_bytes, AppState, EngineConfig, EngineHandle};

/// Server options.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// The model id clients send (default: the loaded model's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
}

/// Engine options of `serve` and `bench serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct EngineArgs {
    /// KV cache memory for all sequences together (e.g. 2GiB, 512MiB).
    #[arg(long, default_value = "1GiB")]
    pub kv_memory: String,
    /// Bytes per KV tile ("auto": 8 record positions of the widest layer for kinds that page,
    /// 64KiB of budget for the others).
    #[arg(long, default_value = "auto")]
    pub kv_tile: String,
    /// Most sequences in the running batch.
    #[arg(long, default_value_t = 64)]
    pub max_batch: usize,
    /// Most requests waiting (more get 429).
    #[arg(long, default_value_t = 256)]
    pub max_waiting: usize,
    /// Most tokens per engine step (decode tokens first, then prefill chunks).
    #[arg(long, default_value_t = 512)]
    pub step_tokens: usize,
    /// Admit a request only when the pool holds every sequence this many tokens ahead (capped
    /// at its full length); 0 admits on what they hold now and preempts as they grow.
    #[arg(long, default_value_t = 128)]
    pub admit_lookahead: usize,
    /// Shortest chat system prompt (tokens) kept once and shared by the requests that start
    /// with it (kinds that page; 0: no sharing).
    #[arg(long, default_value_t = 32)]
    pub prefix_min: usize,
    /// Most shared prefixes kept (least recently used go first, and whenever tiles run out).
    #[arg(long, default_value_t = 16)]
    pub prefix_cache: usize,
}

/// Loads the model and starts the engine; returns it with what the HTTP layer needs.
pub fn start(m: &ModelArgs, e: &EngineArgs, name: Option<String>) -> Result<Arc<AppState>> {
    let loaded = load(m)?;
    let cache = crate::chat::cache_config(m)?;
    let max_context = m
        .max_context
        .unwrap_or(loaded.model.config().max_position_embeddings);
    let cfg = EngineConfig {
        cache,
        kv_memory: parse_bytes(&e.kv_memory).context("--kv-memory")?,
        tile_bytes: if e.kv_tile == "auto" {
            0
        } else {
            parse_bytes(&e.kv_tile).context("--kv-tile")?
        },
        max_batch: e.max_batch,
        max_waiting: e.max_waiting,
        step_tokens: e.step_tokens,
        max_context,
        kind_name: m.kv.clone(),
        admit_lookahead: e.admit_lookahead,
        prefix_min: e.prefix_min,
        prefix_cache: e.prefix_cache,
    };
    let mut served = vec![name.unwrap_or_else(|| {
        loaded
            .name
            .rsplit('/')
            .next()
            .unwrap_or(&loaded.name)
            .trim_end_matches(".gguf")
            .to_string()
    })];
    for extra in [Some(loaded.name.clone()), m.model.clone()]
        .into_iter()
        .flatten()
    {
        if !served.contains(&extra) {
            served.push(extra);
        }
    }
    let engine: EngineHandle =
        tqkv_serve::start(loaded.model, loaded.tokenizer.clone(), loaded.eos_ids, cfg)?;
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(Arc::new(AppState {
        engine,
        tokenizer: loaded.tokenizer,
        template: loaded.template,
        served,
        counter: Default::default(),
        started,
    }))
}

/// A tokio runtime for the server.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .thread_name("tqkv-http")
        .build()?)
}

/// `tqkv serve`.
pub fn run(a: ServeArgs) -> Result<()> {
    let state = start(&a.model, &a.engine, a.served_model_name.clone())?;
    let rt = runtime()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .with_context(|| format!("listening on {}:{}", a.host, a.port))?;
        let addr = listener.local_addr()?;
        let m = &state.engine.metrics;
        let (pool, tile) = (
            m.tiles_total.load(std::sync::atomic::Ordering::Relaxed),
            m.tile_bytes.load(std::sync::atomic::Ordering::Relaxed),
        );
        let how = if m.paged.load(std::sync::atomic::Ordering::Relaxed) == 1 {
            "paged"
        } else {
            "a byte budget"
        };
        eprintln!(
            "serving {} with the {} KV cache on http://{addr}/v1 ({pool} KV tiles of {tile} bytes, {how}; {} sequences at most); Ctrl-C drains and stops",
            state.served[0], a.model.kv, a.engine.max_batch
        );
        println!("listening on http://{addr}");
        use std::io::Write;
        std::io::stdout().flush()?;
        tqkv_serve::serve(listener, state, tqkv_serve::http::signal()).await?;
        eprintln!("drained; stopped");
        Ok(())
    })
}
