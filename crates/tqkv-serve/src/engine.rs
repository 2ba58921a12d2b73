//! The engine: one thread that owns the model and runs every request's sequence, with
//! continuous batching — requests join and leave the running batch between steps; a step runs
//! the decode token of every running sequence and, in what is left of the step's token budget,
//! prefill chunks of sequences still reading their prompt ([`Llama::forward_batch`]).
//!
//! Admission is by free tiles of the [`KvPool`]: a waiting request joins when the tiles its
//! prompt needs fit beside what the running sequences will hold after the step. When the pool
//! runs out mid-generation, cached prefixes go first (least recently used), then the most
//! recently admitted sequence is preempted by recomputation: its cache is dropped, its tiles
//! freed, and it waits at the head of the queue with its prompt and what it has generated, to
//! be prefilled again. A request whose client went away (its event channel closed) is
//! cancelled between steps and its tiles freed.
//!
//! Shared prefixes (paged kinds): a request may name a prefix of its prompt (a chat's system
//! message). Its prefill stops once at the prefix's end, where the engine keeps a snapshot of
//! the sequence (a fork: the tiles are shared, not copied); a later request with the same
//! prefix starts from a fork of the snapshot instead of prefilling it — the prefix's tiles are
//! held once, however many sequences read them.

use crate::pool::{CostCurve, KvPool, PoolError, Probes};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;
use tqkv_candle::CacheConfig;
use tqkv_llama::sampling::{Sampler, SamplingParams};
use tqkv_llama::{BatchItem, Llama, Sequence};

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Every sequence's cache kind.
    pub cache: CacheConfig,
    /// Bytes of KV cache for all sequences together.
    pub kv_memory: usize,
    /// Bytes per pool tile (0: chosen for the kind — 8 record positions of its widest layer
    /// for kinds that page, 64 KiB of budget for the others).
    pub tile_bytes: usize,
    /// Most sequences in the running batch.
    pub max_batch: usize,
    /// Most requests waiting for admission (more: [`SubmitError::QueueFull`]).
    pub max_waiting: usize,
    /// Most tokens one step runs (decode tokens first, then prefill chunks).
    pub step_tokens: usize,
    /// Most tokens per sequence (prompt + completion).
    pub max_context: usize,
    /// The cache kind's name (`--kv`), for `/metrics`.
    pub kind_name: String,
    /// Tokens of growth per sequence the pool must hold before a request is admitted.
    pub admit_lookahead: usize,
    /// Shortest prefix (tokens) kept and shared across requests (0: no prefix sharing; kinds
    /// that do not page never share).
    pub prefix_min: usize,
    /// Most prefix snapshots kept.
    pub prefix_cache: usize,
}

/// What one request asks for.
#[derive(Debug, Clone)]
pub struct GenParams {
    /// Sampling.
    pub sampling: SamplingParams,
    /// Most tokens generated.
    pub max_tokens: usize,
    /// Strings that end the completion (not included in it).
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
}

/// Why a completion ended (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context.
    Length,
}

impl Finish {
    /// OpenAI's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What the engine sends back for a request, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New text of the completion (may be empty while a multi-byte character or a possible
    /// stop string is held back).
    Text(String),
    /// The end.
    Done {
        /// Why.
        finish: Finish,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Completion tokens.
        completion_tokens: usize,
    },
    /// The request failed (its sequence's cache or the model said so).
    Error(String),
}

/// A request for the engine.
pub struct Request {
    /// Prompt token ids (≥ 1).
    pub prompt: Vec<u32>,
    /// Tokens of the prompt that other requests may share (a chat's system message), kept as
    /// a snapshot and forked instead of prefilled again (see the module docs).
    pub prefix: Option<usize>,
    /// What to generate.
    pub params: GenParams,
    /// Where its events go; dropping the receiver cancels the request.
    pub events: UnboundedSender<Event>,
}

/// Why a request was not taken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    /// Too many requests are waiting.
    #[error("the server is busy: {0} requests are waiting; retry later")]
    QueueFull(usize),
    /// The server is stopping.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The prompt with its completion does not fit the context.
    #[error("this model's maximum context length is {max} tokens; the request has {prompt} prompt tokens and asks for {completion} more")]
    TooLong {
        /// Prompt tokens.
        prompt: usize,
        /// Completion tokens asked.
        completion: usize,
        /// The limit.
        max: usize,
    },
    /// The prompt alone needs more KV memory than the pool has.
    #[error("the prompt needs {need} KV tiles and the pool has {total}; raise --kv-memory")]
    TooBig {
        /// Tiles needed.
        need: usize,
        /// Tiles in the pool.
        total: usize,
    },
    /// An empty prompt.
    #[error("the prompt is empty")]
    Empty,
}

/// Counters and gauges the engine keeps for `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Sequences in the running batch.
    pub running: AtomicUsize,
    /// Requests waiting.
    pub waiting: AtomicUsize,
    /// Most sequences that ran together.
    pub peak_running: AtomicUsize,
    /// Pool tiles held.
    pub tiles_used: AtomicUsize,
    /// Most pool tiles held after a step.
    pub tiles_peak: AtomicUsize,
    /// Pool tiles in all.
    pub tiles_total: AtomicUsize,
    /// Bytes per tile.
    pub tile_bytes: AtomicUsize,
    /// Logical KV bytes held by the running sequences.
    pub kv_bytes: AtomicUsize,
    /// Tokens held by the running sequences.
    pub kv_tokens: AtomicUsize,
    /// Prompt tokens prefilled (recomputation included).
    pub prompt_tokens: AtomicU64,
    /// Tokens generated.
    pub generated_tokens: AtomicU64,
    /// Requests finished, by outcome: stop, length, error, cancelled.
    pub finished: [AtomicU64; 4],
    /// Sequences preempted.
    pub preemptions: AtomicU64,
    /// Steps run.
    pub steps: AtomicU64,
    /// Tokens per second over the last second of steps (f64 bits).
    pub tokens_per_s: AtomicU64,
    /// Steps after which the pool's count disagreed with the caches (tiles held ≠ ⌈bytes /
    /// tile⌉ of some sequence, the arena's count ≠ the distinct tiles the caches hold, or more
    /// tiles than the pool has): 0 unless there is a bug.
    pub accounting_errors: AtomicU64,
    /// Prefix snapshots kept.
    pub prefix_snapshots: AtomicUsize,
    /// Tiles the prefix snapshots hold (shared with the sequences forked from them).
    pub prefix_tiles: AtomicUsize,
    /// Requests that started from a prefix snapshot.
    pub prefix_hits: AtomicU64,
    /// Prompt tokens not prefilled thanks to a snapshot.
    pub prefix_tokens: AtomicU64,
    /// Tiles referenced by more than one holder, counted once per extra holder (what sharing
    /// saves).
    pub tiles_shared: AtomicUsize,
    /// 1 when the tiles are an arena's (paged kinds), 0 for a byte budget.
    pub paged: AtomicUsize,
}

impl Metrics {
    /// Outcome indices of [`Self::finished`].
    pub const OUTCOMES: [&'static str; 4] = ["stop", "length", "error", "cancelled"];
}

enum Msg {
    Submit(Request),
    Drain,
}

/// The handle the HTTP layer holds.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Msg>,
    /// The engine's metrics.
    pub metrics: Arc<Metrics>,
    draining: Arc<AtomicBool>,
    max_waiting: usize,
    max_context: usize,
    step_tokens: usize,
    /// Tiles a sequence of n tokens holds (admission checks at submit).
    pool: Arc<Mutex<KvPool>>,
    /// Name of the cache kind.
    pub kind: String,
    done: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl EngineHandle {
    /// Queues a request; its events arrive on `req.events`.
    pub fn submit(&self, mut req: Request) -> Result<(), SubmitError> {
        if self.draining.load(Relaxed) {
            return Err(SubmitError::ShuttingDown);
        }
        if req.prompt.is_empty() {
            return Err(SubmitError::Empty);
        }
        let (prompt, completion) = (req.prompt.len(), req.params.max_tokens);
        if prompt + completion.max(1) > self.max_context {
            return Err(SubmitError::TooLong {
                prompt,
                completion,
                max: self.max_context,
            });
        }
        {
            // The prompt and at least one token must fit the pool alone; a completion longer
            // than the pool holds for one sequence is cut there (finish_reason "length").
            let pool = self.pool.lock().expect("pool lock");
            // Its prompt's last prefill chunk and its first decoded token, alone.
            let need = match (
                pool.alone_need(prompt, self.step_tokens),
                pool.alone_need(prompt + 1, 1),
            ) {
                (Some(a), Some(b)) => a.max(b),
                _ => usize::MAX,
            };
            if need > pool.total() {
                return Err(SubmitError::TooBig {
                    need,
                    total: pool.total(),
                });
            }
            let alone = pool.longest_alone();
            req.params.max_tokens = completion.min(alone.saturating_sub(prompt)).max(1);
        }
        let w = self.metrics.waiting.fetch_add(1, Relaxed);
        if w >= self.max_waiting {
            self.metrics.waiting.fetch_sub(1, Relaxed);
            return Err(SubmitError::QueueFull(w));
        }
        if self.tx.send(Msg::Submit(req)).is_err() {
            self.metrics.waiting.fetch_sub(1, Relaxed);
            return Err(SubmitError::ShuttingDown);
        }
        Ok(())
    }

    /// The KV bytes one sequence of `tokens` tokens holds (its tiles; a budget pool's curve).
    pub fn bytes_at(&self, tokens: usize) -> Option<usize> {
        self.pool.lock().expect("pool lock").bytes_at(tokens)
    }

    /// Bytes one sequence needs alone to prefill `prompt` tokens (in chunks of the step's
    /// tokens) and generate `completion` more (the pool's tiles, or a budget pool's curve).
    pub fn bytes_alone(&self, prompt: usize, completion: usize) -> Option<usize> {
        let pool = self.pool.lock().expect("pool lock");
        let tiles = pool
            .alone_need(prompt, self.step_tokens)?
            .max(pool.alone_need(prompt + completion, 1)?);
        Some(tiles * pool.tile_bytes())
    }

    /// Tiles one sequence of `tokens` tokens holds.
    pub fn tiles_at(&self, tokens: usize) -> Option<usize> {
        self.pool.lock().expect("pool lock").predict(tokens)
    }

    /// The most tokens per sequence.
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// Refuses new requests from now on (the taken ones go on).
    pub fn begin_drain(&self) {
        self.draining.store(true, Relaxed);
    }

    /// Refuses new requests, finishes the ones taken, and waits for the engine to stop.
    pub fn drain(&self) {
        self.begin_drain();
        let _ = self.tx.send(Msg::Drain);
        if let Some(h) = self.done.lock().expect("join lock").take() {
            let _ = h.join();
        }
    }

    /// Whether the engine refuses new requests.
    pub fn draining(&self) -> bool {
        self.draining.load(Relaxed)
    }
}

/// Engine start-up errors.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The pool.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// A setting.
    #[error("engine: {0}")]
    Config(String),
}

/// Starts the engine thread over `model` (whose own caches are not used).
pub fn start(
    model: Llama,
    tokenizer: tokenizers::Tokenizer,
    eos_ids: Vec<u32>,
    cfg: EngineConfig,
) -> Result<EngineHandle, EngineError> {
    if cfg.max_batch == 0 || cfg.step_tokens == 0 || cfg.max_context == 0 {
        return Err(EngineError::Config(
            "max batch, step tokens and context must be ≥ 1".into(),
        ));
    }
    let mc = model.config();
    let max_context = cfg.max_context.min(mc.max_position_embeddings);
    let (layers, kv, d) = (mc.num_layers, mc.num_kv_heads, mc.head_dim);
    let kinds = (0..layers)
        .map(|l| cfg.cache.kind_for(l, layers, kv, d))
        .collect::<tqkv_candle::Result<Vec<_>>>()
        .map_err(|e| EngineError::Config(e.to_string()))?;
    let pool = if kinds.iter().all(|k| k.pages()) {
        // 8 record positions of the widest layer per tile (and one exact position), unless
        // told: a sequence holds whole tiles, so small ones waste little (~5 % at 256 tokens).
        let tile = if cfg.tile_bytes > 0 {
            cfg.tile_bytes
        } else {
            let mut widest = 0;
            for k in &kinds {
                if let Ok(Some((rec, exact))) = k.position_bytes(d) {
                    widest = widest.max(8 * rec).max(exact);
                }
            }
            (kv * widest).div_ceil(16).max(1) * 16
        };
        let tiles = KvPool::count(cfg.kv_memory, tile)?;
        let arena = tqkv_candle::TileArena::new(model.device(), tile, tiles)
            .map_err(|e| EngineError::Config(format!("allocating the KV arena: {e}")))?;
        let probes = Probes::new(&cfg.cache, layers, kv, d, tile, max_context)?;
        KvPool::paged(arena, probes)?
    } else {
        let tile = if cfg.tile_bytes > 0 {
            cfg.tile_bytes
        } else {
            64 << 10
        };
        let curve = CostCurve::measure(&cfg.cache, layers, kv, d, max_context)?;
        KvPool::new(cfg.kv_memory, tile, curve)?
    };
    let metrics = Arc::new(Metrics::default());
    metrics.tiles_total.store(pool.total(), Relaxed);
    metrics.tile_bytes.store(pool.tile_bytes(), Relaxed);
    metrics.paged.store(usize::from(pool.is_paged()), Relaxed);
    let arena = pool.arena().cloned();
    // Build one sequence now: a kind that cannot be built fails here, not per request.
    model
        .new_sequence(&cfg.cache)
        .map_err(|e| EngineError::Config(e.to_string()))?;
    let kind = cfg.kind_name.clone();
    let (tx, rx) = mpsc::channel();
    let draining = Arc::new(AtomicBool::new(false));
    let pool = Arc::new(Mutex::new(pool));
    let handle = EngineHandle {
        tx,
        metrics: metrics.clone(),
        draining: draining.clone(),
        max_waiting: cfg.max_waiting,
        max_context,
        step_tokens: cfg.step_tokens,
        pool: pool.clone(),
        kind,
        done: Arc::new(Mutex::new(None)),
    };
    let mut engine = Engine {
        model,
        tokenizer,
        eos_ids,
        cfg: EngineConfig { max_context, ..cfg },
        pool,
        arena,
        metrics,
        running: Vec::new(),
        waiting: VecDeque::new(),
        prefixes: Vec::new(),
        next_id: 0,
        steps: 0,
        rate: (Instant::now(), 0),
    };
    let h = std::thread::Builder::new()
        .name("tqkv-engine".into())
        .spawn(move || engine.run(rx))
        .map_err(|e| EngineError::Config(format!("starting the engine thread: {e}")))?;
    *handle.done.lock().expect("join lock") = Some(h);
    Ok(handle)
}

/// Whether a step failed because the KV arena had no tile left (nothing was committed).
fn arena_full(e: &tqkv_llama::Error) -> bool {
    match e {
        tqkv_llama::Error::InSequence { source, .. } => arena_full(source),
        tqkv_llama::Error::Layer { source, .. } | tqkv_llama::Error::Cache(source) => {
            matches!(source, tqkv_candle::Error::ArenaFull { .. })
        }
        _ => false,
    }
}

/// A request inside the engine.
struct Active {
    id: u64,
    req: Request,
    /// Prompt and generated tokens: what the sequence will hold.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens of `tokens` in the cache.
    fed: usize,
    seq: Option<Sequence>,
    sampler: Sampler,
    /// Bytes of the completion's text sent.
    sent: usize,
    /// Ended by a stop string (the text after it is not sent).
    cut: bool,
    /// The shared prefix's length while it is still to be kept as a snapshot.
    snapshot_at: Option<usize>,
}

impl Active {
    fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Sends the completion's text from what was sent up to byte `upto` of `text`.
    fn send_text(&mut self, text: &str, upto: usize) {
        if upto > self.sent && text.is_char_boundary(upto) && text.is_char_boundary(self.sent) {
            let _ = self
                .req
                .events
                .send(Event::Text(text[self.sent..upto].to_string()));
            self.sent = upto;
        }
    }

    /// Bytes its caches hold (stored tokens and their tables): what a budget pool counts.
    fn held_bytes(&self) -> usize {
        self.seq.as_ref().map_or(0, |s| {
            let m = s.kv_memory();
            m.logical + m.tables
        })
    }

    /// The shared prefix of its prompt worth a snapshot (at least `min` tokens, shorter than
    /// the prompt).
    fn prefix(&self, min: usize) -> Option<usize> {
        self.req
            .prefix
            .filter(|&p| min > 0 && p >= min && p < self.prompt_len)
    }
}

/// A kept prefix: the sequence at the end of a prompt prefix, forked by later requests with
/// the same prefix.
struct Snapshot {
    /// Its id in the pool.
    id: u64,
    tokens: Vec<u32>,
    seq: Sequence,
    /// The step it was last forked (or made) at.
    used: u64,
}

struct Engine {
    model: Llama,
    tokenizer: tokenizers::Tokenizer,
    eos_ids: Vec<u32>,
    cfg: EngineConfig,
    pool: Arc<Mutex<KvPool>>,
    /// The arena of a paged pool (where new sequences' caches live).
    arena: Option<Arc<tqkv_candle::TileArena>>,
    metrics: Arc<Metrics>,
    running: Vec<Active>,
    waiting: VecDeque<Active>,
    /// Kept prefixes, least recently used first.
    prefixes: Vec<Snapshot>,
    next_id: u64,
    /// Steps run.
    steps: u64,
    /// Start of the current tokens/s window and the tokens in it.
    rate: (Instant, u64),
}

impl Engine {
    fn run(&mut self, rx: mpsc::Receiver<Msg>) {
        let mut draining = false;
        loop {
            // Take what arrived; wait when there is nothing to do.
            loop {
                let idle = self.running.is_empty() && self.waiting.is_empty();
                let msg = if idle && !draining {
                    match rx.recv() {
                        Ok(m) => m,
                        Err(_) => return,
                    }
                } else {
                    match rx.try_recv() {
                        Ok(m) => m,
                        Err(mpsc::TryRecvError::Empty) => break,
                        Err(mpsc::TryRecvError::Disconnected) => {
                            draining = true;
                            break;
                        }
                    }
                };
                match msg {
                    Msg::Submit(r) => self.enqueue(r),
                    Msg::Drain => draining = true,
                }
            }
            if draining && self.running.is_empty() && self.waiting.is_empty() {
                self.publish();
                return;
            }
            self.cancel_closed();
            self.admit();
            self.step();
            self.publish();
        }
    }

    fn enqueue(&mut self, req: Request) {
        let id = self.next_id;
        self.next_id += 1;
        let sampler = match Sampler::new(req.params.sampling.clone()) {
            Ok(s) => s,
            Err(e) => {
                self.metrics.waiting.fetch_sub(1, Relaxed);
                let _ = req.events.send(Event::Error(e.to_string()));
                self.metrics.finished[2].fetch_add(1, Relaxed);
                return;
            }
        };
        let tokens = req.prompt.clone();
        self.waiting.push_back(Active {
            id,
            prompt_len: tokens.len(),
            tokens,
            req,
            fed: 0,
            seq: None,
            sampler,
            sent: 0,
            cut: false,
            snapshot_at: None,
        });
    }

    fn cancel_closed(&mut self) {
        let mut pool = self.pool.lock().expect("pool lock");
        let before = self.waiting.len();
        self.waiting.retain(|a| !a.req.events.is_closed());
        let gone_waiting = before - self.waiting.len();
        self.metrics.waiting.fetch_sub(gone_waiting, Relaxed);
        let mut gone = gone_waiting;
        self.running.retain(|a| {
            let closed = a.req.events.is_closed();
            if closed {
                pool.release(a.id);
                gone += 1;
            }
            !closed
        });
        self.metrics.finished[3].fetch_add(gone as u64, Relaxed);
    }

    /// Tiles a sequence will hold `admit_lookahead` tokens from now, at most at its full length
    /// (which is never below what it holds: it ends there).
    fn ahead_tiles(&self, pool: &KvPool, a: &Active) -> usize {
        let full = (a.prompt_len + a.req.params.max_tokens).min(self.cfg.max_context);
        let ahead = (a.tokens.len() + self.cfg.admit_lookahead).min(full);
        pool.predict(ahead).unwrap_or(usize::MAX)
    }

    /// Admits waiting requests, first come first served, while the batch has room and the pool
    /// holds every running sequence and the new ones `admit_lookahead` tokens ahead (capped at
    /// their full length): admitting on what they hold now alone would let short prompts in
    /// that the next tokens push out again (preemption by recomputation, paid in prefill). A
    /// request whose prompt starts with a kept prefix starts from a fork of it: its shared
    /// tiles cost nothing, and what the fork holds counts from the start.
    fn admit(&mut self) {
        while self.running.len() < self.cfg.max_batch {
            let Some(mut a) = self.waiting.pop_front() else {
                break;
            };
            if a.seq.is_none() {
                if let Err(e) = self.start_sequence(&mut a) {
                    self.metrics.waiting.fetch_sub(1, Relaxed);
                    self.fail(a, &e);
                    continue;
                }
            }
            let fits = {
                let pool = self.pool.lock().expect("pool lock");
                let mut wants: Vec<(u64, usize)> = self
                    .running
                    .iter()
                    .map(|r| (r.id, self.ahead_tiles(&pool, r)))
                    .collect();
                wants.push((a.id, self.ahead_tiles(&pool, &a)));
                // Nothing running: the head of the queue goes in, lookahead or not (it fits
                // alone: submit cut its completion to what the pool holds for one sequence).
                pool.fits(&wants) || self.running.is_empty()
            };
            if !fits && self.evict_prefix() {
                self.waiting.push_front(a);
                continue;
            }
            if !fits {
                // Back to the head of the queue, its cache dropped (a fork's tiles freed).
                a.seq = None;
                a.fed = 0;
                self.pool.lock().expect("pool lock").release(a.id);
                self.waiting.push_front(a);
                break;
            }
            self.metrics.waiting.fetch_sub(1, Relaxed);
            self.running.push(a);
        }
        let n = self.running.len();
        self.metrics.peak_running.fetch_max(n, Relaxed);
    }

    /// Builds the sequence of a request about to be admitted: a fork of a kept prefix of its
    /// prompt, or a fresh one (which keeps its prefix as a snapshot once prefilled).
    fn start_sequence(&mut self, a: &mut Active) -> Result<(), String> {
        a.snapshot_at = None;
        let prefix = if self.arena.is_some() {
            a.prefix(self.cfg.prefix_min)
        } else {
            None
        };
        if let Some(p) = prefix {
            let hit = self
                .prefixes
                .iter()
                .position(|s| s.tokens[..] == a.tokens[..p]);
            if let Some(i) = hit {
                self.prefixes[i].used = self.steps;
                // A fork copies at most its partial tiles; an arena too full for them makes
                // it prefill instead.
                if let Ok(seq) = self.prefixes[i].seq.fork() {
                    let held = seq.tiles_held();
                    let _ = self.pool.lock().expect("pool lock").set_tiles(a.id, held);
                    a.seq = Some(seq);
                    a.fed = p;
                    self.metrics.prefix_hits.fetch_add(1, Relaxed);
                    self.metrics.prefix_tokens.fetch_add(p as u64, Relaxed);
                    return Ok(());
                }
            } else if self.cfg.prefix_cache > 0 {
                a.snapshot_at = Some(p);
            }
        }
        let seq = match &self.arena {
            Some(arena) => self.model.new_sequence_in(&self.cfg.cache, arena),
            None => self.model.new_sequence(&self.cfg.cache),
        };
        a.seq = Some(seq.map_err(|e| e.to_string())?);
        a.fed = 0;
        Ok(())
    }

    /// Drops the least recently used prefix snapshot (its tiles that no fork holds go back to
    /// the arena); false when none is kept.
    fn evict_prefix(&mut self) -> bool {
        let Some(i) = (0..self.prefixes.len()).min_by_key(|&i| self.prefixes[i].used) else {
            return false;
        };
        let s = self.prefixes.remove(i);
        self.pool.lock().expect("pool lock").release(s.id);
        true
    }

    /// Keeps sequence `i`'s prefix as a snapshot if it has just been prefilled to its end.
    fn keep_prefix(&mut self, i: usize) {
        let a = &mut self.running[i];
        let Some(p) = a.snapshot_at else { return };
        if a.fed != p {
            return;
        }
        a.snapshot_at = None;
        if self.prefixes.iter().any(|s| s.tokens[..] == a.tokens[..p]) {
            return;
        }
        let Some(Ok(seq)) = a.seq.as_ref().map(Sequence::fork) else {
            return;
        };
        let tokens = a.tokens[..p].to_vec();
        if self.prefixes.len() >= self.cfg.prefix_cache {
            self.evict_prefix();
        }
        let id = self.next_id;
        self.next_id += 1;
        let _ = self
            .pool
            .lock()
            .expect("pool lock")
            .set_tiles(id, seq.tiles_held());
        self.prefixes.push(Snapshot {
            id,
            tokens,
            seq,
            used: self.steps,
        });
    }

    fn fail(&mut self, a: Active, why: &str) {
        self.pool.lock().expect("pool lock").release(a.id);
        let _ = a.req.events.send(Event::Error(why.to_string()));
        self.metrics.finished[2].fetch_add(1, Relaxed);
    }

    /// Preempts the most recently admitted running sequence: its cache goes, its tiles are
    /// freed, and it waits first in line to be prefilled again.
    fn preempt_last(&mut self) {
        if !self.running.is_empty() {
            self.preempt(self.running.len() - 1);
        }
    }

    /// Preempts running sequence `j` (see [`Self::preempt_last`]).
    fn preempt(&mut self, j: usize) {
        let mut a = self.running.remove(j);
        self.pool.lock().expect("pool lock").release(a.id);
        a.seq = None;
        a.fed = 0;
        self.waiting.push_front(a);
        self.metrics.waiting.fetch_add(1, Relaxed);
        self.metrics.preemptions.fetch_add(1, Relaxed);
    }

    /// One step: plan the tokens of every running sequence, make room in the pool, run them
    /// as one batch, then sample where a sequence has read all it holds.
    fn step(&mut self) {
        if self.running.is_empty() {
            return;
        }
        // Tokens per running sequence this step: decode tokens first, then prefill chunks.
        let plan = loop {
            let mut budget = self.cfg.step_tokens;
            let mut plan = vec![0usize; self.running.len()];
            for (p, a) in plan.iter_mut().zip(&self.running) {
                if a.tokens.len() - a.fed == 1 {
                    *p = 1;
                    budget = budget.saturating_sub(1);
                }
            }
            // A sequence's first chunk is always min(prompt, step tokens), whatever else runs:
            // caches that calibrate on their first step (centred keys) then see the same
            // tokens as when the request runs alone, and a preempted sequence recomputes as it
            // first ran. One first chunk per step may exceed what the decode tokens left. No
            // chunk crosses the end of a shared prefix: the prefix's state is kept there (and
            // every request with that prefix calibrates on the same tokens).
            let mut first_taken = false;
            for (p, a) in plan.iter_mut().zip(&self.running) {
                let left = a.tokens.len() - a.fed;
                if left <= 1 {
                    continue;
                }
                let cut = self
                    .shared_prefix(a)
                    .filter(|&c| c > a.fed)
                    .map_or(usize::MAX, |c| c - a.fed);
                if a.fed == 0 {
                    let first = a.prompt_len.min(self.cfg.step_tokens).min(left).min(cut);
                    if first <= budget || !first_taken {
                        *p = first;
                        budget = budget.saturating_sub(first);
                        first_taken = true;
                    }
                } else if budget > 0 {
                    *p = left.min(budget).min(cut);
                    budget -= *p;
                }
            }
            let pool = self.pool.lock().expect("pool lock");
            let wants: Vec<(u64, usize)> = self
                .running
                .iter()
                .zip(&plan)
                .map(|(a, &n)| {
                    let need = pool.step_need(a.fed, a.fed + n).unwrap_or(usize::MAX);
                    (a.id, need)
                })
                .collect();
            let fits = pool.fits(&wants);
            drop(pool);
            if fits || (self.running.len() == 1 && self.prefixes.is_empty()) {
                break plan;
            }
            if !self.evict_prefix() {
                self.preempt_last();
            }
        };
        let mut idx: Vec<usize> = (0..self.running.len()).filter(|&i| plan[i] > 0).collect();
        if idx.is_empty() {
            return;
        }
        let result = {
            let mut items: Vec<BatchItem<'_>> = Vec::with_capacity(idx.len());
            for (i, a) in self.running.iter_mut().enumerate() {
                let n = plan[i];
                if n == 0 {
                    continue;
                }
                let seq = a.seq.as_mut().expect("running sequences hold a cache");
                items.push(BatchItem {
                    seq,
                    tokens: &a.tokens[a.fed..a.fed + n],
                    all: false,
                });
            }
            self.model.forward_batch(&mut items)
        };
        let logits = match result {
            Ok(l) => l,
            Err(e) if arena_full(&e) => {
                // The plan said it fits and the arena disagrees (nothing was committed): make
                // room as for a plan that does not fit, and run again next step.
                if !self.evict_prefix() && self.running.len() > 1 {
                    self.preempt_last();
                } else if self.running.len() == 1 {
                    let a = self.running.remove(0);
                    self.fail(a, &e.to_string());
                }
                return;
            }
            Err(tqkv_llama::Error::InSequence { seq, source }) => {
                // That request fails; the others run again next step (nothing was committed).
                let a = self.running.remove(idx[seq]);
                self.fail(a, &source.to_string());
                return;
            }
            Err(e) => {
                let why = e.to_string();
                for i in idx.drain(..).rev() {
                    let a = self.running.remove(i);
                    self.fail(a, &why);
                }
                return;
            }
        };
        let mut done = Vec::new();
        let mut over = Vec::new();
        let mut stepped = 0u64;
        for (&i, l) in idx.iter().zip(logits) {
            let n = plan[i];
            let a = &mut self.running[i];
            a.fed += n;
            stepped += n as u64;
            if self.set_held(i).is_err() {
                over.push(self.running[i].id);
            }
            self.keep_prefix(i);
            let a = &mut self.running[i];
            if n > 1 || a.fed <= a.prompt_len {
                // A prefill (of the prompt, or of a preempted sequence's whole text).
                self.metrics.prompt_tokens.fetch_add(n as u64, Relaxed);
            }
            if a.fed < a.tokens.len() {
                continue; // still prefilling
            }
            let next = l
                .flatten_all()
                .and_then(|l| l.to_vec1::<f32>())
                .map_err(|e| e.to_string())
                .and_then(|l| a.sampler.sample(&l, &a.tokens).map_err(|e| e.to_string()));
            match next {
                Ok(t) => {
                    if let Some(end) = self.accept(i, t) {
                        done.push((i, Ok(end)));
                    }
                }
                Err(e) => done.push((i, Err(e))),
            }
        }
        self.rate.1 += stepped;
        self.steps += 1;
        self.metrics.steps.fetch_add(1, Relaxed);
        for (i, end) in done.into_iter().rev() {
            let a = self.running.remove(i);
            match end {
                Ok(finish) => self.finish(a, finish),
                Err(e) => self.fail(a, &e),
            }
        }
        if !over.is_empty() {
            self.reconcile(&over);
        }
    }

    /// After a step whose sequences `over` (ids) hold more than the plan said (a KIVI residual,
    /// whose size depends on the chunks so far): preempts the most recently admitted other
    /// sequences until their tiles fit; a sequence that cannot fit even alone fails.
    fn reconcile(&mut self, over: &[u64]) {
        for &id in over {
            // (Not running: it finished in this step and its tiles are free.)
            while let Some(i) = self.running.iter().position(|a| a.id == id) {
                if self.set_held(i).is_ok() {
                    break;
                }
                match (0..self.running.len()).rev().find(|&j| j != i) {
                    Some(j) => self.preempt(j),
                    None => {
                        let a = self.running.remove(i);
                        self.fail(a, "the sequence outgrew the KV pool");
                        break;
                    }
                }
            }
        }
    }

    /// The end of the shared prefix of `a`'s prompt, when prefixes are shared.
    fn shared_prefix(&self, a: &Active) -> Option<usize> {
        self.arena.as_ref()?;
        a.prefix(self.cfg.prefix_min)
    }

    /// Tells the pool what running sequence `i` holds now: the tiles its caches reference
    /// (paged), or its bytes in tiles (budget; an error when more than is free).
    fn set_held(&mut self, i: usize) -> Result<(), PoolError> {
        let a = &self.running[i];
        let mut pool = self.pool.lock().expect("pool lock");
        if pool.is_paged() {
            let t = a.seq.as_ref().map_or(0, Sequence::tiles_held);
            pool.set_tiles(a.id, t)
        } else {
            pool.set_bytes(a.id, a.held_bytes())
        }
    }

    /// Takes token `t` for running sequence `i`; returns how it ends, if it does.
    fn accept(&mut self, i: usize, t: u32) -> Option<Finish> {
        let eos = self.eos_ids.contains(&t);
        let a = &mut self.running[i];
        if eos && !a.req.params.ignore_eos {
            return Some(Finish::Stop);
        }
        a.tokens.push(t);
        self.metrics.generated_tokens.fetch_add(1, Relaxed);
        let text = self
            .tokenizer
            .decode(a.generated(), true)
            .unwrap_or_default();
        // A stop string ends the completion before it.
        let stop_at = a
            .req
            .params
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| {
                text[a.sent.min(text.len())..]
                    .find(s.as_str())
                    .map(|p| p + a.sent)
            })
            .min();
        if let Some(p) = stop_at {
            a.send_text(&text, p);
            a.cut = true;
            return Some(Finish::Stop);
        }
        // Hold back an incomplete character and a tail that may begin a stop string.
        let mut upto = if text.ends_with('\u{FFFD}') {
            a.sent
        } else {
            text.len()
        };
        for s in &a.req.params.stop {
            for k in (1..s.len()).rev() {
                if s.is_char_boundary(k) && text.ends_with(&s[..k]) {
                    upto = upto.min(text.len() - k);
                    break;
                }
            }
        }
        a.send_text(&text, upto);
        if a.generated().len() >= a.req.params.max_tokens || a.tokens.len() >= self.cfg.max_context
        {
            return Some(Finish::Length);
        }
        None
    }

    fn finish(&mut self, mut a: Active, finish: Finish) {
        self.pool.lock().expect("pool lock").release(a.id);
        // What was held back for a stop string that did not come.
        if !a.cut {
            let text = self
                .tokenizer
                .decode(a.generated(), true)
                .unwrap_or_default();
            a.send_text(&text, text.len());
        }
        let _ = a.req.events.send(Event::Done {
            finish,
            prompt_tokens: a.prompt_len,
            completion_tokens: a.generated().len(),
        });
        let k = if finish == Finish::Stop { 0 } else { 1 };
        self.metrics.finished[k].fetch_add(1, Relaxed);
    }

    fn publish(&mut self) {
        let m = &self.metrics;
        let pool = self.pool.lock().expect("pool lock");
        m.running.store(self.running.len(), Relaxed);
        m.tiles_used.store(pool.used(), Relaxed);
        m.tiles_peak.fetch_max(pool.used(), Relaxed);
        // Bytes and tokens held, and the pool's count against the caches' own: exact (a sequence
        // not yet fed holds no tiles), and within the pool.
        let (mut bytes, mut toks, mut held, mut exact) = (0, 0, 0, true);
        for a in &self.running {
            let b = a.held_bytes();
            bytes += b;
            toks += a.seq.as_ref().map_or(0, Sequence::position);
            held += pool.held(a.id);
            exact &= if pool.is_paged() {
                pool.held(a.id) == a.seq.as_ref().map_or(0, Sequence::tiles_held)
            } else {
                a.fed == 0 || pool.held(a.id) == pool.tiles_for(b)
            };
        }
        let prefix_tiles: usize = self.prefixes.iter().map(|s| s.seq.tiles_held()).sum();
        if pool.is_paged() {
            // The arena counts each tile once: the distinct tiles of every cache, snapshots
            // included; what the holders reference beyond that is shared.
            let ids: std::collections::HashSet<u32> = self
                .running
                .iter()
                .filter_map(|a| a.seq.as_ref())
                .chain(self.prefixes.iter().map(|s| &s.seq))
                .flat_map(Sequence::tile_ids)
                .collect();
            exact &= ids.len() == pool.used();
            exact &= self
                .prefixes
                .iter()
                .all(|s| pool.held(s.id) == s.seq.tiles_held());
            held += prefix_tiles;
            m.tiles_shared
                .store(held.saturating_sub(pool.used()), Relaxed);
        } else {
            exact &= held == pool.used();
        }
        if !exact || pool.used() > pool.total() {
            m.accounting_errors.fetch_add(1, Relaxed);
        }
        m.prefix_snapshots.store(self.prefixes.len(), Relaxed);
        m.prefix_tiles.store(prefix_tiles, Relaxed);
        m.kv_bytes.store(bytes, Relaxed);
        m.kv_tokens.store(toks, Relaxed);
        let dt = self.rate.0.elapsed().as_secs_f64();
        if dt >= 1.0 || (self.running.is_empty() && dt > 0.0) {
            let r = self.rate.1 as f64 / dt;
            m.tokens_per_s.store(r.to_bits(), Relaxed);
            self.rate = (Instant::now(), 0);
        }
    }
}
