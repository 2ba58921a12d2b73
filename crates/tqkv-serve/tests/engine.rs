//! The engine on the default model (scripts/fetch-model.sh): continuous batching gives each
//! request what it gets alone; a pool too small for all of them at once admits some, preempts
//! and recomputes, and still answers every request the same; the pool's count agrees with the
//! caches' own after every step and is back to zero at the end; cancelled requests free their
//! tiles; bad requests are refused with the reason.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use tokio::sync::mpsc;
use tqkv_llama::sampling::SamplingParams;
use tqkv_serve::engine::{Metrics, SubmitError};
use tqkv_serve::{EngineConfig, EngineHandle, Event, Finish, GenParams, Request};

fn engine(
    kv: &str,
    kv_memory: usize,
    max_batch: usize,
    lookahead: usize,
) -> (EngineHandle, tokenizers::Tokenizer) {
    engine_with(kv, kv_memory, max_batch, lookahead, 32, 64)
}

fn engine_with(
    kv: &str,
    kv_memory: usize,
    max_batch: usize,
    lookahead: usize,
    prefix_min: usize,
    step_tokens: usize,
) -> (EngineHandle, tokenizers::Tokenizer) {
    let (cache, loaded) = common::load(kv);
    let cfg = EngineConfig {
        cache,
        kv_memory,
        tile_bytes: 0,
        max_batch,
        max_waiting: 64,
        step_tokens,
        max_context: 512,
        kind_name: kv.into(),
        admit_lookahead: lookahead,
        prefix_min,
        prefix_cache: 8,
    };
    let tok = loaded.tokenizer.clone();
    let h = tqkv_serve::start(loaded.model, loaded.tokenizer, loaded.eos_ids, cfg).unwrap();
    (h, tok)
}

fn greedy(max_tokens: usize) -> GenParams {
    GenParams {
        sampling: SamplingParams {
            temperature: 0.0,
            repeat_penalty: 1.0,
            ..Default::default()
        },
        max_tokens,
        stop: Vec::new(),
        ignore_eos: true,
    }
}

/// Submits every prompt at once; returns each one's text and finish.
fn run_all(
    h: &EngineHandle,
    prompts: &[Vec<u32>],
    max_tokens: usize,
) -> Vec<(String, Finish, usize)> {
    run_shared(h, prompts, None, max_tokens)
}

/// [`run_all`] with every prompt's first `prefix` tokens named a shared prefix.
fn run_shared(
    h: &EngineHandle,
    prompts: &[Vec<u32>],
    prefix: Option<usize>,
    max_tokens: usize,
) -> Vec<(String, Finish, usize)> {
    let mut rxs = Vec::new();
    for p in prompts {
        let (tx, rx) = mpsc::unbounded_channel();
        h.submit(Request {
            prompt: p.clone(),
            prefix,
            params: greedy(max_tokens),
            events: tx,
        })
        .unwrap();
        rxs.push(rx);
    }
    rxs.into_iter()
        .map(|mut rx| {
            let mut text = String::new();
            loop {
                match rx.blocking_recv().expect("the engine answers") {
                    Event::Text(t) => text.push_str(&t),
                    Event::Done {
                        finish,
                        completion_tokens,
                        ..
                    } => return (text, finish, completion_tokens),
                    Event::Error(e) => panic!("request failed: {e}"),
                }
            }
        })
        .collect()
}

fn prompts(tok: &tokenizers::Tokenizer, n: usize) -> Vec<Vec<u32>> {
    // Awkward lengths: 1 token, 7-ish, ~99.
    let long = "The GNU General Public License is a free, copyleft license for software and other \
                kinds of works. "
        .repeat(5);
    let texts = [
        "Hello",
        "Once upon a time there was",
        long.as_str(),
        "The capital of France is",
    ];
    (0..n)
        .map(|i| {
            let t = format!("{} {}", texts[i % texts.len()], i);
            let ids = tok.encode(t, false).unwrap().get_ids().to_vec();
            if i % 4 == 0 {
                ids[..1].to_vec()
            } else {
                ids
            }
        })
        .collect()
}

fn idle(m: &Metrics) {
    for _ in 0..200 {
        // Kept prefixes hold their tiles; nothing else does.
        if m.tiles_used.load(Relaxed) == m.prefix_tiles.load(Relaxed)
            && m.running.load(Relaxed) == 0
            && m.waiting.load(Relaxed) == 0
        {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("not idle: {m:?}");
}

#[test]
fn batching_and_preemption_answer_as_alone_and_the_pool_empties() {
    // Prefill chunks of 16 tokens: a paged cache holds a chunk's exact rows until its step
    // commits, and a pool for half of the requests must still hold the longest alone.
    let with = |kv: &str, mem: usize, batch: usize, ahead: usize| {
        engine_with(kv, mem, batch, ahead, 32, 16)
    };
    for kv in ["f16", "tq3.5"] {
        let (alone, tok) = with(kv, 1 << 30, 1, 64);
        let ps = prompts(&tok, 8);
        let want = run_all(&alone, &ps, 20);
        // Half of what all of them hold at full length, and room for the longest alone.
        let full: Vec<usize> = ps
            .iter()
            .map(|p| alone.bytes_at(p.len() + 20).unwrap())
            .collect();
        let need = ps
            .iter()
            .map(|p| alone.bytes_alone(p.len(), 20).unwrap())
            .max()
            .unwrap();
        let budget = (full.iter().sum::<usize>() / 2).max(need + (16 << 10));
        alone.drain();
        // All at once, room for all.
        let (roomy, _) = with(kv, 1 << 30, 16, 64);
        assert_eq!(run_all(&roomy, &ps, 20), want, "{kv}: batched");
        let m = &roomy.metrics;
        idle(m);
        assert!(m.peak_running.load(Relaxed) >= 4, "{kv}: {m:?}");
        assert_eq!(m.accounting_errors.load(Relaxed), 0, "{kv}");
        roomy.drain();
        // A pool for half of them at full length, admitting on what they hold now (no
        // lookahead): admission waits, and growth preempts and recomputes.
        let (tight, _) = with(kv, budget, 16, 0);
        let got = run_all(&tight, &ps, 20);
        let m = &tight.metrics;
        idle(m);
        assert_eq!(got, want, "{kv}: under a tight pool ({m:?})");
        let (peak, pre) = (m.peak_running.load(Relaxed), m.preemptions.load(Relaxed));
        assert!(
            peak < 8 || pre > 0,
            "{kv}: the pool of {budget} bytes held all at once"
        );
        assert_eq!(m.accounting_errors.load(Relaxed), 0, "{kv}");
        assert_eq!(m.finished[1].load(Relaxed), 8, "{kv}: {m:?}");
        eprintln!("{kv}: pool of {budget} bytes: peak {peak} running, {pre} preemptions");
        tight.drain();
    }
}

#[test]
fn cancelled_requests_free_their_tiles_and_bad_ones_are_refused() {
    // Room for all four at once: each is cancelled while it runs.
    let (h, tok) = engine("tq3.5", 16 << 20, 8, 64);
    let ps = prompts(&tok, 4);
    let mut keep = Vec::new();
    for p in &ps {
        let (tx, rx) = mpsc::unbounded_channel();
        h.submit(Request {
            prompt: p.clone(),
            prefix: None,
            params: greedy(400),
            events: tx,
        })
        .unwrap();
        keep.push(rx);
    }
    // Read a few tokens of each, then hang up.
    for rx in keep.iter_mut() {
        let mut n = 0;
        while n < 3 {
            if let Event::Text(_) = rx.blocking_recv().unwrap() {
                n += 1;
            }
        }
    }
    assert!(h.metrics.tiles_used.load(Relaxed) > 0);
    drop(keep);
    idle(&h.metrics);
    assert_eq!(h.metrics.finished[3].load(Relaxed), 4);
    let (tx, _rx) = mpsc::unbounded_channel();
    let too_long = Request {
        prefix: None,
        prompt: vec![1; 500],
        params: greedy(20),
        events: tx.clone(),
    };
    assert!(matches!(
        h.submit(too_long),
        Err(SubmitError::TooLong {
            prompt: 500,
            completion: 20,
            max: 512
        })
    ));
    let empty = Request {
        prefix: None,
        prompt: Vec::new(),
        params: greedy(20),
        events: tx.clone(),
    };
    assert_eq!(h.submit(empty), Err(SubmitError::Empty));
    h.drain();
    let late = Request {
        prefix: None,
        prompt: vec![1],
        params: greedy(1),
        events: tx,
    };
    assert_eq!(h.submit(late), Err(SubmitError::ShuttingDown));
}

#[test]
fn a_shared_prefix_is_stored_once_and_answers_as_prefilled() {
    // Requests with one long system prefix and different questions: alone (the first keeps the
    // prefix, the others fork it) and all at once give the same text; sharing holds fewer tiles
    // at the peak than the same requests with sharing off.
    let (cache, loaded) = common::load("tq3.5");
    let tok = loaded.tokenizer.clone();
    drop((cache, loaded));
    let system = "You answer questions about the GNU General Public License, a free, copyleft \
                  license for software and other kinds of works. Be brief and exact. "
        .repeat(4);
    let sys_ids = tok
        .encode(system.clone(), false)
        .unwrap()
        .get_ids()
        .to_vec();
    let questions = [
        "What is copyleft?",
        "Who wrote it?",
        "Is it free?",
        "Name a version.",
    ];
    let ps: Vec<Vec<u32>> = questions
        .iter()
        .map(|q| {
            let mut ids = sys_ids.clone();
            ids.extend(tok.encode(*q, false).unwrap().get_ids());
            ids
        })
        .collect();
    let p = Some(sys_ids.len());
    assert!(sys_ids.len() >= 32, "the prefix is long enough to share");
    let (alone, _) = engine("tq3.5", 64 << 20, 1, 64);
    let want = run_shared(&alone, &ps, p, 12);
    let m = &alone.metrics;
    idle(m);
    assert_eq!(m.prefix_hits.load(Relaxed), 3, "{m:?}");
    assert_eq!(
        m.prefix_tokens.load(Relaxed),
        3 * sys_ids.len() as u64,
        "{m:?}"
    );
    assert_eq!(m.prefix_snapshots.load(Relaxed), 1);
    assert_eq!(m.accounting_errors.load(Relaxed), 0);
    alone.drain();
    let mut peaks = Vec::new();
    for prefix_min in [32, 0] {
        let (h, _) = engine_with("tq3.5", 64 << 20, 8, 64, prefix_min, 64);
        // One request first (it keeps the prefix), then the others at once.
        let first = run_shared(&h, &ps[..1], p, 12);
        let rest = run_shared(&h, &ps[1..], p, 12);
        let m = &h.metrics;
        idle(m);
        assert_eq!(m.accounting_errors.load(Relaxed), 0);
        if prefix_min > 0 {
            let got: Vec<_> = first.into_iter().chain(rest).collect();
            assert_eq!(got, want, "shared prefix at once vs alone");
            assert_eq!(m.prefix_hits.load(Relaxed), 3, "{m:?}");
        } else {
            assert_eq!(m.prefix_hits.load(Relaxed), 0, "{m:?}");
        }
        peaks.push(m.tiles_peak.load(Relaxed));
        h.drain();
    }
    assert!(
        peaks[0] < peaks[1],
        "sharing holds fewer tiles at the peak: {peaks:?}"
    );
}
