//! The engine: one thread that owns the model and runs every request's sequence, with
//! continuous batching — requests join and leave the running batch between steps; a step runs
//! the decode token of every running sequence and, in what is left of the step's token budget,
//! prefill chunks of sequences still reading their prompt ([`Llama::forward_batch`]).
//!
//! Admission is by free tiles of the [`KvPool`]: a waiting request joins when the tiles its
//! prompt needs fit beside what the running sequences will hold after the step. When the pool
//! runs out mid-generation, the most recently admitted sequence is preempted by recomputation:
//! its cache is dropped, its tiles freed, and it waits at the head of the queue with its prompt
//! and what it has generated, to be prefilled again. A request whose client went away
//! (its event channel closed) is cancelled between steps and its tiles freed.

use crate::pool::{CostCurve, KvPool, PoolError};
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
    /// Bytes per pool tile.
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
    /// tile⌉ of some sequence, or more tiles than the pool has): 0 unless there is a bug.
    pub accounting_errors: AtomicU64,
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
            let need = pool.predict(prompt + 1).unwrap_or(usize::MAX);
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

    /// The KV bytes one sequence of `tokens` tokens holds (an upper bound; the pool's curve).
    pub fn bytes_at(&self, tokens: usize) -> Option<usize> {
        self.pool.lock().expect("pool lock").curve().bytes(tokens)
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
    let curve = CostCurve::measure(
        &cfg.cache,
        mc.num_layers,
        mc.num_kv_heads,
        mc.head_dim,
        max_context,
    )?;
    let pool = KvPool::new(cfg.kv_memory, cfg.tile_bytes, curve)?;
    let metrics = Arc::new(Metrics::default());
    metrics.tiles_total.store(pool.total(), Relaxed);
    metrics.tile_bytes.store(pool.tile_bytes(), Relaxed);
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
        metrics,
        running: Vec::new(),
        waiting: VecDeque::new(),
        next_id: 0,
        rate: (Instant::now(), 0),
    };
    let h = std::thread::Builder::new()
        .name("tqkv-engine".into())
        .spawn(move || engine.run(rx))
        .map_err(|e| EngineError::Config(format!("starting the engine thread: {e}")))?;
    *handle.done.lock().expect("join lock") = Some(h);
    Ok(handle)
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

    /// Bytes its caches hold (stored tokens and their tables): what the pool counts.
    fn held_bytes(&self) -> usize {
        self.seq.as_ref().map_or(0, |s| {
            let m = s.kv_memory();
            m.logical + m.tables
        })
    }
}

struct Engine {
    model: Llama,
    tokenizer: tokenizers::Tokenizer,
    eos_ids: Vec<u32>,
    cfg: EngineConfig,
    pool: Arc<Mutex<KvPool>>,
    metrics: Arc<Metrics>,
    running: Vec<Active>,
    waiting: VecDeque<Active>,
    next_id: u64,
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
    /// that the next tokens push out again (preemption by recomputation, paid in prefill).
    fn admit(&mut self) {
        let pool = self.pool.lock().expect("pool lock");
        let mut wants: Vec<(u64, usize)> = self
            .running
            .iter()
            .map(|a| (a.id, self.ahead_tiles(&pool, a)))
            .collect();
        let mut admitted = Vec::new();
        while self.running.len() + admitted.len() < self.cfg.max_batch {
            let Some(a) = self.waiting.front() else { break };
            // A prompt is admitted when all of it fits: its prefill may span several steps.
            wants.push((a.id, self.ahead_tiles(&pool, a)));
            // Nothing running: the head of the queue goes in, lookahead or not (it fits alone:
            // submit cut its completion to what the pool holds for one sequence).
            let alone = self.running.is_empty() && admitted.is_empty();
            if !(pool.fits(&wants) || alone) {
                wants.pop();
                break;
            }
            admitted.push(self.waiting.pop_front().expect("front"));
        }
        drop(pool);
        for mut a in admitted {
            self.metrics.waiting.fetch_sub(1, Relaxed);
            match self.model.new_sequence(&self.cfg.cache) {
                Ok(s) => {
                    a.seq = Some(s);
                    self.running.push(a);
                }
                Err(e) => self.fail(a, &e.to_string()),
            }
        }
        let n = self.running.len();
        self.metrics.peak_running.fetch_max(n, Relaxed);
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
            // first ran. One first chunk per step may exceed what the decode tokens left.
            let mut first_taken = false;
            for (p, a) in plan.iter_mut().zip(&self.running) {
                let left = a.tokens.len() - a.fed;
                if left <= 1 {
                    continue;
                }
                if a.fed == 0 {
                    let first = a.prompt_len.min(self.cfg.step_tokens).min(left);
                    if first <= budget || !first_taken {
                        *p = first;
                        budget = budget.saturating_sub(first);
                        first_taken = true;
                    }
                } else if budget > 0 {
                    *p = left.min(budget);
                    budget -= *p;
                }
            }
            let pool = self.pool.lock().expect("pool lock");
            let wants: Vec<(u64, usize)> = self
                .running
                .iter()
                .zip(&plan)
                .map(|(a, &n)| (a.id, pool.predict(a.fed + n).unwrap_or(usize::MAX)))
                .collect();
            let fits = pool.fits(&wants);
            drop(pool);
            if fits || self.running.len() == 1 {
                break plan;
            }
            self.preempt_last();
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
            let bytes = a.held_bytes();
            if self
                .pool
                .lock()
                .expect("pool lock")
                .set_bytes(a.id, bytes)
                .is_err()
            {
                over.push(a.id);
            }
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
                let bytes = self.running[i].held_bytes();
                if self
                    .pool
                    .lock()
                    .expect("pool lock")
                    .set_bytes(id, bytes)
                    .is_ok()
                {
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
        // Bytes and tokens held, and the pool's count against the caches' own: exact (a sequence
        // not yet fed holds no tiles), and within the pool.
        let (mut bytes, mut toks, mut held, mut exact) = (0, 0, 0, true);
        for a in &self.running {
            let b = a.held_bytes();
            bytes += b;
            toks += a.seq.as_ref().map_or(0, Sequence::position);
            held += pool.held(a.id);
            exact &= a.fed == 0 || pool.held(a.id) == pool.tiles_for(b);
        }
        if !exact || held != pool.used() || pool.used() > pool.total() {
            m.accounting_errors.fetch_add(1, Relaxed);
        }
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
