//! `tqkv eval needle`: needle retrieval (a secret number hidden at several depths of filler
//! texts of several lengths) per cache kind.
//!
//! `tqkv eval kld`: the quality of KV caches on a model and a text — mean / max KL divergence
//! of the next-token distributions against a reference cache (f16), perplexity, top-1
//! agreement and KV bytes, per cache kind, as a table (and JSON). The measures are
//! tqkv_llama::eval's (llama.cpp's `perplexity --kl-divergence`).

use crate::chat::{self, ModelArgs};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::time::Instant;
use tqkv_llama::eval::{
    answer_is_right, greedy_answer, needle_case, score_window, scored_logits, windows, LogitStats,
    FACTUAL_QUESTIONS,
};

/// The text of the default measurement (present on Debian and Ubuntu machines).
const DEFAULT_TEXT: &str = "/usr/share/common-licenses/GPL-3";

/// What a KL-divergence measurement scores: the text, its windows and the reference cache.
#[derive(clap::Args)]
pub struct ScoreArgs {
    /// The reference cache kind.
    #[arg(long, default_value = "f16")]
    reference: String,
    /// The text file to score (UTF-8).
    #[arg(long, default_value = DEFAULT_TEXT)]
    text: String,
    /// Tokens per window (each run from an empty cache; its second half is scored).
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Windows scored at most (consecutive, from the start of the text).
    #[arg(long, default_value_t = 4)]
    windows: usize,
    /// Tokens of the text skipped before the first window (e.g. those a profile was measured
    /// on).
    #[arg(long, default_value_t = 0)]
    skip: usize,
    /// Tokens per forward call (chunked prefill).
    #[arg(long, default_value_t = 128)]
    chunk: usize,
    /// Cache configurations measured at once, each on its own copy of the caches (the weights
    /// shared); the results do not depend on it. Default: up to 4 (at most the cores) on the
    /// CPU, 1 on a GPU.
    #[arg(long)]
    jobs: Option<usize>,
}

#[derive(clap::Args)]
pub struct Args {
    /// Model, device, dtype and cache options; `--kv` takes a comma-separated list of kinds.
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    score: ScoreArgs,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<String>,
}

#[derive(serde::Serialize)]
struct Row {
    kind: String,
    tokens: usize,
    mean_kld: f64,
    max_kld: f64,
    ppl: f64,
    ppl_ref: f64,
    top1: f64,
    /// All-in bytes at the end of the last window: stored tokens + per-layer tables.
    kv_bytes: usize,
    /// Of which per-layer tables.
    table_bytes: usize,
    f16_bytes: usize,
    /// Tokens held at that point (the window minus its last token).
    context: usize,
    /// All-in bits per channel (per key or value coordinate).
    bits_per_channel: f64,
    /// All-in bytes per token over all layers.
    bytes_per_token: f64,
}

/// Memory of the model's caches now, all-in: (bytes incl. tables, table bytes, f16 bytes,
/// context, bits per channel, bytes per token).
fn sizes(model: &tqkv_llama::Llama) -> (usize, usize, usize, usize, f64, f64) {
    let m = model.kv_memory();
    let cfg = model.config();
    let n = model.position().max(1);
    let all = m.logical + m.tables;
    let channels = n * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim;
    (
        all,
        m.tables,
        model.kv_f16_bytes(),
        model.position(),
        8.0 * all as f64 / channels as f64,
        all as f64 / n as f64,
    )
}

fn read_text(path: &str) -> Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("reading the text {path:?} (give one with --text FILE)"))
}

/// The kinds of `--kv` (comma-separated), each checked, with the model options for each.
fn kinds_of(model: &ModelArgs, extra: &[&str]) -> Result<Vec<String>> {
    let kinds: Vec<String> = model
        .kv
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if kinds.is_empty() {
        bail!("--kv: no cache kind given");
    }
    // Every kind is checked before the model runs.
    for kind in kinds
        .iter()
        .map(String::as_str)
        .chain(extra.iter().copied())
    {
        chat::cache_config(&with_kind(model, kind)).with_context(|| format!("--kv {kind}"))?;
    }
    Ok(kinds)
}

fn with_kind(model: &ModelArgs, kind: &str) -> ModelArgs {
    ModelArgs {
        kv: kind.to_string(),
        ..model.clone()
    }
}

fn bar(len: usize) -> Result<ProgressBar> {
    Ok(ProgressBar::new(len as u64).with_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len}, {elapsed}")?
            .progress_chars("=> "),
    ))
}

/// The model loaded once with the reference cache, the windows of the text and the reference
/// logits of each (kept on the host), with a progress bar sized for `runs` more passes.
struct Reference<'t> {
    m: tqkv_llama::Loaded,
    wins: Vec<&'t [u32]>,
    refs: Vec<candle_core::Tensor>,
    bar: ProgressBar,
}

fn reference<'t>(
    model: &ModelArgs,
    s: &ScoreArgs,
    ids: &'t mut Vec<u32>,
    runs: impl Fn(&tqkv_llama::Llama) -> usize,
) -> Result<Reference<'t>> {
    let text = read_text(&s.text)?;
    let mut m = chat::load(&with_kind(model, &s.reference))?;
    *ids = m
        .tokenizer
        .encode(text.as_str(), false)
        .map_err(|e| anyhow::anyhow!("tokenizing {:?}: {e}", s.text))?
        .get_ids()
        .to_vec();
    let ids: &'t Vec<u32> = ids;
    let wins = windows(&ids[s.skip.min(ids.len())..], s.ctx, s.windows)?;
    eprintln!(
        "{}: {} tokens; {} windows of {} after {} skipped (scored: the last {} positions of each), chunks of {}",
        s.text,
        ids.len(),
        wins.len(),
        s.ctx,
        s.skip,
        s.ctx - s.ctx / 2 - 1,
        s.chunk
    );
    let bar = bar(wins.len() * (runs(&m.model) + 1))?;
    bar.set_message(s.reference.clone());
    let mut refs = Vec::with_capacity(wins.len());
    for w in &wins {
        refs.push(scored_logits(&mut m.model, w, s.chunk)?);
        bar.inc(1);
    }
    Ok(Reference { m, wins, refs, bar })
}

/// What one cache configuration's pass measured: the scores, and the sizes of its caches at
/// the end (see [`sizes`]).
struct Pass {
    stats: LogitStats,
    sizes: (usize, usize, usize, usize, f64, f64),
}

/// `--jobs` as given, else: on the CPU up to 4 (at most the cores), since one pass leaves cores
/// idle between its parallel parts (element-wise ops, cache appends); on a GPU 1.
fn jobs_for(jobs: Option<usize>, model: &ModelArgs) -> usize {
    jobs.unwrap_or_else(|| {
        if on_cpu(model) {
            std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
        } else {
            1
        }
    })
}

fn on_cpu(model: &ModelArgs) -> bool {
    model.device.trim() == "cpu"
}

/// With several passes at once on the CPU, each runs candle's element-wise ops on its own
/// thread: candle has one pool of workers for them (sized by `CANDLE_NUM_THREADS` when first
/// used), which takes one caller at a time and spins between calls, so passes side by side
/// queued behind each other on it (10 kinds at ctx 2048 on 2 cores: 104 s with the pool, 87 s
/// without; matrix products still use every core through rayon). Called before candle runs
/// anything, with the passes that will run at once; a `CANDLE_NUM_THREADS` the user set wins.
fn candle_pool_per_pass(at_once: usize, model: &ModelArgs) {
    if at_once > 1 && on_cpu(model) && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Only the main thread exists yet (nothing has been loaded or spawned).
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Runs each `(label, config)` over the windows against the reference logits, up to `jobs` at
/// once on threads of their own (each on a [`tqkv_llama::Llama::share`] of the model: the
/// weights shared, the caches its own). Results come in the order given and do not depend on
/// `jobs` (every pass computes the same thing whatever runs beside it); the first error in
/// that order is returned.
fn score_configs(
    r: &Reference<'_>,
    configs: &[(String, tqkv_candle::CacheConfig)],
    jobs: usize,
    chunk: usize,
) -> Result<Vec<Pass>> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    let n = configs.len();
    let next = AtomicUsize::new(0);
    let done: Mutex<Vec<Option<Result<Pass>>>> = Mutex::new((0..n).map(|_| None).collect());
    let mut models = Vec::new();
    for (label, cfg) in configs.iter().take(jobs.clamp(1, n.max(1))) {
        models.push(
            r.m.model
                .share(cfg)
                .with_context(|| format!("--kv {label}"))?,
        );
    }
    let (wins, refs, bar, next, slots) = (&r.wins, &r.refs, &r.bar, &next, &done);
    std::thread::scope(|scope| {
        for mut model in models {
            scope.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((label, cfg)) = configs.get(i) else {
                    break;
                };
                bar.set_message(label.clone());
                let mut pass = || -> Result<Pass> {
                    model
                        .set_cache_config(cfg)
                        .with_context(|| format!("--kv {label}"))?;
                    let mut stats = LogitStats::default();
                    for (w, rl) in wins.iter().zip(refs) {
                        let got = scored_logits(&mut model, w, chunk)?;
                        score_window(&mut stats, rl, &got, w)?;
                        bar.inc(1);
                    }
                    Ok(Pass {
                        stats,
                        sizes: sizes(&model),
                    })
                };
                let res = pass().with_context(|| format!("--kv {label}"));
                let failed = res.is_err();
                slots.lock().expect("no pass panics")[i] = Some(res);
                if failed {
                    // Nothing new starts after an error.
                    next.store(n, Ordering::Relaxed);
                    break;
                }
            });
        }
    });
    let done = done.into_inner().expect("no pass panics");
    done.into_iter()
        .zip(configs)
        .map(|(x, (label, _))| x.unwrap_or_else(|| bail!("--kv {label}: not run")))
        .collect()
}

pub fn run(args: Args) -> Result<()> {
    let s = &args.score;
    let kinds = kinds_of(&args.model, &[&s.reference])?;
    let config = |kind: &str| chat::cache_config(&with_kind(&args.model, kind));
    // The model once; the reference logits of every window first, then each kind in turn over
    // the same model with fresh caches.
    let t0 = Instant::now();
    let jobs = jobs_for(s.jobs, &args.model);
    candle_pool_per_pass(jobs.min(kinds.len()), &args.model);
    let mut ids = Vec::new();
    let r = reference(&args.model, s, &mut ids, |_| kinds.len())?;
    let configs = kinds
        .iter()
        .map(|k| Ok((k.clone(), config(k)?)))
        .collect::<Result<Vec<_>>>()?;
    let mut rows = Vec::new();
    for (kind, pass) in kinds
        .iter()
        .zip(score_configs(&r, &configs, jobs, s.chunk)?)
    {
        let Pass {
            stats: st,
            sizes: (kv_bytes, table_bytes, f16_bytes, context, bits, per_token),
        } = pass;
        rows.push(Row {
            kind: kind.clone(),
            tokens: st.tokens,
            mean_kld: st.mean_kld(),
            max_kld: st.kld_max,
            ppl: st.ppl(),
            ppl_ref: st.ppl_ref(),
            top1: st.top1(),
            kv_bytes,
            table_bytes,
            f16_bytes,
            context,
            bits_per_channel: bits,
            bytes_per_token: per_token,
        });
    }
    r.bar.finish_and_clear();
    eprintln!("done in {:.1?}", t0.elapsed());
    println!(
        "reference {}; {} scored tokens of {}; sizes all-in at {} tokens (tables included)\n",
        s.reference,
        rows.first().map_or(0, |x| x.tokens),
        s.text,
        rows.first().map_or(0, |x| x.context),
    );
    println!(
        "| kv | mean KLD | max KLD | PPL | PPL ({}) | Δ PPL | top-1 same | bits/channel | bytes/token | KV bytes vs f16 |",
        s.reference
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for row in &rows {
        println!(
            "| {} | {:.5} | {:.3} | {:.3} | {:.3} | {:+.2}% | {:.1}% | {:.3} | {:.0} | {:.2}× smaller |",
            row.kind,
            row.mean_kld,
            row.max_kld,
            row.ppl,
            row.ppl_ref,
            100.0 * (row.ppl / row.ppl_ref - 1.0),
            100.0 * row.top1,
            row.bits_per_channel,
            row.bytes_per_token,
            row.f16_bytes as f64 / row.kv_bytes.max(1) as f64
        );
    }
    if let Some(path) = &args.json {
        let v = serde_json::json!({
            "text": s.text,
            "reference": s.reference,
            "ctx": s.ctx,
            "chunk": s.chunk,
            "windows": r.wins.len(),
            "skip": s.skip,
            "rows": rows,
        });
        std::fs::write(path, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {path}"))?;
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct NeedleArgs {
    /// Model, device, dtype and cache options; `--kv` takes a comma-separated list of kinds.
    #[command(flatten)]
    model: ModelArgs,
    /// The filler text (UTF-8).
    #[arg(long, default_value = DEFAULT_TEXT)]
    text: String,
    /// Haystack lengths in tokens, comma-separated.
    #[arg(long, default_value = "256,512,1024", value_delimiter = ',')]
    lengths: Vec<usize>,
    /// Needle depths (0 = start, 1 = end), comma-separated.
    #[arg(long, default_value = "0,0.25,0.5,0.75,1", value_delimiter = ',')]
    depths: Vec<f64>,
    /// Tokens per prefill chunk.
    #[arg(long, default_value_t = 128)]
    chunk: usize,
    /// Seed of the secret numbers.
    #[arg(long, default_value_t = 299_792_458)]
    seed: u64,
    /// Also write every trial as JSON to this file.
    #[arg(long)]
    json: Option<String>,
}

pub fn run_needle(args: NeedleArgs) -> Result<()> {
    let filler = read_text(&args.text)?;
    let kinds = kinds_of(&args.model, &[])?;
    if args.lengths.is_empty() || args.depths.is_empty() {
        bail!("--lengths and --depths need at least one value each");
    }
    let mut rng = tqkv::rng::Rng::new(args.seed);
    let cases: Vec<(usize, f64, u32)> = args
        .lengths
        .iter()
        .flat_map(|&l| args.depths.iter().map(move |&d| (l, d)))
        .map(|(l, d)| (l, d, 10_000 + (rng.next_u64() % 90_000) as u32))
        .collect();
    let bar = bar(cases.len() * kinds.len())?;
    let mut results = Vec::new();
    let mut m = chat::load(&with_kind(&args.model, &kinds[0]))?;
    for kind in &kinds {
        bar.set_message(kind.clone());
        m.model
            .set_cache_config(&chat::cache_config(&with_kind(&args.model, kind))?)
            .with_context(|| format!("--kv {kind}"))?;
        for &(len, depth, secret) in &cases {
            let c = needle_case(&mut m, &filler, len, depth, secret, args.chunk, 32)?;
            results.push((kind.clone(), len, c));
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    println!(
        "needle retrieval in {} (found / trials; depths {:?})\n",
        args.text, args.depths
    );
    print!("| kv |");
    for l in &args.lengths {
        print!(" {l} tokens |");
    }
    println!(" all |");
    println!("|---|{}---|", "---|".repeat(args.lengths.len()));
    for kind in &kinds {
        print!("| {kind} |");
        let mine: Vec<_> = results.iter().filter(|r| &r.0 == kind).collect();
        for l in &args.lengths {
            let at: Vec<_> = mine.iter().filter(|r| r.1 == *l).collect();
            print!(
                " {}/{} |",
                at.iter().filter(|r| r.2.found).count(),
                at.len()
            );
        }
        println!(
            " {}/{} |",
            mine.iter().filter(|r| r.2.found).count(),
            mine.len()
        );
    }
    if let Some(path) = &args.json {
        let rows: Vec<_> = results
            .iter()
            .map(|(k, l, c)| serde_json::json!({"kv": k, "length": l, "case": c}))
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&rows)?)
            .with_context(|| format!("writing {path}"))?;
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct QaArgs {
    /// Model, device, dtype and cache options; `--kv` takes a comma-separated list of kinds.
    #[command(flatten)]
    model: ModelArgs,
    /// The reference cache kind.
    #[arg(long, default_value = "f16")]
    reference: String,
    /// Tokens generated per answer at most.
    #[arg(long, default_value_t = 24)]
    max_tokens: usize,
    /// Also write every answer as JSON to this file.
    #[arg(long)]
    json: Option<String>,
}

/// `tqkv eval qa`: greedy answers to short factual questions per cache kind against the
/// reference's.
pub fn run_qa(args: QaArgs) -> Result<()> {
    let kinds = kinds_of(&args.model, &[&args.reference])?;
    let mut m = chat::load(&with_kind(&args.model, &args.reference))?;
    let all: Vec<&String> = std::iter::once(&args.reference).chain(&kinds).collect();
    let bar = bar(all.len() * FACTUAL_QUESTIONS.len())?;
    let mut answers: Vec<Vec<String>> = Vec::new();
    for kind in &all {
        bar.set_message((*kind).clone());
        m.model
            .set_cache_config(&chat::cache_config(&with_kind(&args.model, kind))?)
            .with_context(|| format!("--kv {kind}"))?;
        let mut row = Vec::new();
        for (q, _) in FACTUAL_QUESTIONS {
            row.push(greedy_answer(&mut m, q, args.max_tokens)?);
            bar.inc(1);
        }
        answers.push(row);
    }
    bar.finish_and_clear();
    let right: Vec<Vec<bool>> = answers
        .iter()
        .map(|row| {
            row.iter()
                .zip(FACTUAL_QUESTIONS)
                .map(|(a, (_, w))| answer_is_right(a, w))
                .collect()
        })
        .collect();
    let ref_right = right[0].iter().filter(|&&r| r).count();
    println!(
        "{} factual questions, greedy, {} tokens at most; {} answers {} right\n",
        FACTUAL_QUESTIONS.len(),
        args.max_tokens,
        args.reference,
        ref_right
    );
    println!(
        "| kv | right | right where {r} is | same text as {r} | same text where {r} is right |",
        r = args.reference
    );
    println!("|---|---|---|---|---|");
    for (i, kind) in all.iter().enumerate().skip(1) {
        let n = FACTUAL_QUESTIONS.len();
        let both = (0..n).filter(|&j| right[0][j] && right[i][j]).count();
        let same = (0..n).filter(|&j| answers[i][j] == answers[0][j]).count();
        let same_right = (0..n)
            .filter(|&j| right[0][j] && answers[i][j] == answers[0][j])
            .count();
        println!(
            "| {kind} | {}/{n} | {both}/{ref_right} | {same}/{n} | {same_right}/{ref_right} |",
            right[i].iter().filter(|&&r| r).count()
        );
    }
    for (j, (q, _)) in FACTUAL_QUESTIONS.iter().enumerate() {
        for (i, kind) in all.iter().enumerate() {
            if i > 0 && right[0][j] && answers[i][j] != answers[0][j] {
                eprintln!(
                    "{kind}: {q} → {:?} ({} said {:?})",
                    answers[i][j], args.reference, answers[0][j]
                );
            }
        }
    }
    if let Some(path) = &args.json {
        let rows: Vec<_> = FACTUAL_QUESTIONS
            .iter()
            .enumerate()
            .map(|(j, (q, w))| {
                let per: serde_json::Map<String, serde_json::Value> = all
                    .iter()
                    .enumerate()
                    .map(|(i, k)| {
                        (
                            (*k).clone(),
                            serde_json::json!({"answer": answers[i][j], "right": right[i][j]}),
                        )
                    })
                    .collect();
                serde_json::json!({"question": q, "expected": w, "answers": per})
            })
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&rows)?)
            .with_context(|| format!("writing {path}"))?;
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct LayersArgs {
    /// Model, device and dtype options; `--kv` is the cache kind whose per-layer sensitivity is
    /// measured (one kind).
    #[command(flatten)]
    model: ModelArgs,
    /// The text and reference (every other layer keeps the reference kind).
    #[command(flatten)]
    score: ScoreArgs,
    /// With --down: the kind given to the most sensitive layers.
    #[arg(long)]
    up: Option<String>,
    /// With --up: the kind given to the least sensitive layers.
    #[arg(long)]
    down: Option<String>,
    /// Layers moved up (and as many down).
    #[arg(long, default_value_t = 6)]
    count: usize,
    /// Also write the per-layer measures as JSON to this file.
    #[arg(long)]
    json: Option<String>,
}

/// `tqkv eval layers`: each layer's share of the KL divergence — the kind under test in that
/// layer alone, the reference everywhere else — ranked; with `--up` / `--down`, the per-layer
/// allocation (an `@` override string for `--kv`) that moves the most sensitive layers up and
/// the least sensitive down.
pub fn run_layers(args: LayersArgs) -> Result<()> {
    let s = &args.score;
    let kind = args.model.kv.trim().to_string();
    if kind.contains(',') {
        bail!("--kv: eval layers measures one kind, got {kind:?}");
    }
    kinds_of(&args.model, &[&s.reference])?;
    let jobs = jobs_for(s.jobs, &args.model);
    candle_pool_per_pass(jobs, &args.model);
    let mut ids = Vec::new();
    let r = reference(&args.model, s, &mut ids, |m| m.config().num_layers)?;
    let n_layers = r.m.model.config().num_layers;
    let configs = (0..n_layers)
        .map(|layer| {
            let spec = format!("{}@{layer}={kind}", s.reference);
            let cfg = chat::cache_config(&with_kind(&args.model, &spec))
                .with_context(|| format!("--kv {spec}"))?;
            Ok((format!("layer {layer}"), cfg))
        })
        .collect::<Result<Vec<_>>>()?;
    let per_layer: Vec<(usize, f64, f64)> = score_configs(&r, &configs, jobs, s.chunk)?
        .into_iter()
        .enumerate()
        .map(|(layer, p)| (layer, p.stats.mean_kld(), p.stats.top1()))
        .collect();
    r.bar.finish_and_clear();
    let total: f64 = per_layer.iter().map(|p| p.1).sum();
    let mut ranked = per_layer.clone();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!(
        "{kind} in one layer at a time, {} elsewhere; {} windows of {} of {}\n",
        s.reference,
        r.wins.len(),
        s.ctx,
        s.text
    );
    println!("| layer | mean KLD | share | top-1 same |");
    println!("|---|---|---|---|");
    for (l, kld, top1) in &ranked {
        println!(
            "| {l} | {kld:.5} | {:.1}% | {:.1}% |",
            100.0 * kld / total.max(1e-30),
            100.0 * top1
        );
    }
    println!("\nsum over layers: {total:.5}");
    if let (Some(up), Some(down)) = (&args.up, &args.down) {
        let c = args.count.min(n_layers / 2);
        let mut alloc = kind.clone();
        for (l, _, _) in &ranked[..c] {
            alloc.push_str(&format!("@{l}={up}"));
        }
        for (l, _, _) in &ranked[n_layers - c..] {
            alloc.push_str(&format!("@{l}={down}"));
        }
        chat::cache_config(&with_kind(&args.model, &alloc)).context("the allocation")?;
        println!("\nallocation (--kv):\n{alloc}");
    }
    if let Some(path) = &args.json {
        let rows: Vec<_> = per_layer
            .iter()
            .map(|(l, k, t)| serde_json::json!({"layer": l, "mean_kld": k, "top1": t}))
            .collect();
        let v = serde_json::json!({"kind": kind, "reference": s.reference, "text": s.text,
            "ctx": s.ctx, "skip": s.skip, "windows": r.wins.len(), "layers": rows});
        std::fs::write(path, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {path}"))?;
    }
    Ok(())
}
