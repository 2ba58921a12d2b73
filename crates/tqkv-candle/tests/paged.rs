//! Paged storage: TurboQuant and f16 caches in one shared arena of small tiles give bit for bit the
//! outputs of caches with their own storage; the arena's count is exactly what the caches
//! hold and what `tiles_for` predicts; a full arena refuses an append and changes nothing;
//! forks share tiles and continue like a cache fed the same tokens; truncation gives the cache
//! that never saw the dropped tokens. Awkward sizes throughout (chunks of 1, 7, 99; tiles that
//! hold an odd number of positions).
mod common;

use candle_core::{Device, Tensor};
use common::{flat, kv_like, seed};
use std::sync::Arc;
use tqkv::rng::Rng;
use tqkv_candle::{Attention, CacheConfig, Error, TileArena};

const HK: usize = 2;
const HQ: usize = 6;
const D: usize = 64;
/// Kinds with every exact-row arrangement: none, sinks only, a fixed window, a budget window
/// in f16 and q8_0, rotation cycles, the presets.
const KINDS: &[&str] = &[
    "f16",
    "tq3.5-paper",
    "tq3-had-s2",
    "tq3-had-s2-w8",
    "tq3-had-s1-w5-wq8",
    "tq3-had-c-s1-b4-r2",
    "tq3.5",
    "tq2.5",
];

fn layer(kind: &str, arena: Option<&Arc<TileArena>>) -> Attention {
    let cfg = CacheConfig::new(kind.parse().unwrap());
    let cache = match arena {
        Some(a) => cfg.build_paged(1, 4, HK, D, a).unwrap(),
        None => cfg.build(1, HK, D, &Device::Cpu).unwrap(),
    };
    Attention::new(cache, HQ, HK, D).unwrap()
}

/// Q, K, V of `t` tokens of one sequence.
fn chunk(rng: &mut Rng, t: usize) -> (Tensor, Tensor, Tensor) {
    (
        kv_like(rng, (1, HQ, t, D), 0.25),
        kv_like(rng, (1, HK, t, D), 1.0),
        kv_like(rng, (1, HK, t, D), 1.0),
    )
}

/// One step of `a` (begin, forward, commit), its output as f64.
fn step(a: &mut Attention, (q, k, v): &(Tensor, Tensor, Tensor)) -> Vec<f64> {
    a.begin_step().unwrap();
    let o = a.forward(q, k, v).unwrap();
    a.commit_step();
    flat(&o)
}

/// Bit-equal outputs (of the same length).
fn same(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Tiles of 1040 bytes: 8 or so record positions of 2 heads (an odd count for some kinds)
/// and 2–3 exact positions, so that every run crosses many tiles.
const TILE: usize = 1040;

#[test]
fn shared_small_tiles_equal_own_storage_and_are_counted_exactly() {
    let s = seed("paged_equal");
    for kind in KINDS {
        let mut rng = Rng::new(s);
        let chunks: Vec<_> = [1usize, 7, 99, 1, 1, 13, 1, 64, 1]
            .iter()
            .map(|&t| chunk(&mut rng, t))
            .collect();
        let arena = TileArena::new(&Device::Cpu, TILE, 4000).unwrap();
        // Three sequences in the arena, fed in turns; the reference has its own storage.
        let mut own = layer(kind, None);
        let mut paged: Vec<Attention> = (0..3).map(|_| layer(kind, Some(&arena))).collect();
        let mut lens = 0;
        for c in &chunks {
            let want = step(&mut own, c);
            for (i, p) in paged.iter_mut().enumerate() {
                let predicted = p.cache().tiles_for(lens, lens + c.1.dim(2).unwrap());
                let got = step(p, c);
                assert!(
                    same(&got, &want),
                    "{kind}: sequence {i} at {lens} tokens differs from own storage (seed {s})"
                );
                let (_, after) = p
                    .cache()
                    .tiles_for(lens, lens + c.1.dim(2).unwrap())
                    .unwrap();
                assert_eq!(
                    p.cache().tiles_held(),
                    after,
                    "{kind}: tiles after the step"
                );
                if let Some((_, after0)) = predicted {
                    assert_eq!(after0, after, "{kind}: prediction before the step");
                }
            }
            lens += c.1.dim(2).unwrap();
            let sum: usize = paged.iter().map(|p| p.cache().tiles_held()).sum();
            assert_eq!(
                arena.used(),
                sum,
                "{kind}: the arena counts what the caches hold"
            );
        }
        // The peak inside a step: what an append holds before its commit releases.
        let c = chunk(&mut rng, 40);
        let p = &mut paged[0];
        let (peak, _) = p.cache().tiles_for(lens, lens + 40).unwrap();
        let before = arena.used() - p.cache().tiles_held();
        p.begin_step().unwrap();
        p.forward(&c.0, &c.1, &c.2).unwrap();
        assert_eq!(
            arena.used() - before,
            peak,
            "{kind}: tiles held inside the step"
        );
        p.rollback_step().unwrap();
        drop(paged);
        assert_eq!(arena.used(), 0, "{kind}: dropped caches hold no tile");
    }
}

#[test]
fn a_full_arena_refuses_an_append_and_changes_nothing() {
    let s = seed("paged_full");
    for kind in ["tq3-had-s2-w8", "tq3.5", "f16"] {
        let mut rng = Rng::new(s);
        let arena = TileArena::new(&Device::Cpu, TILE, 12).unwrap();
        let mut a = layer(kind, Some(&arena));
        let mut own = layer(kind, None);
        let first = chunk(&mut rng, 20);
        assert!(same(&step(&mut a, &first), &step(&mut own, &first)));
        let used = arena.used();
        let big = chunk(&mut rng, 99);
        a.begin_step().unwrap();
        let e = a.forward(&big.0, &big.1, &big.2).unwrap_err();
        assert!(matches!(e, Error::ArenaFull { .. }), "{kind}: {e}");
        a.rollback_step().unwrap();
        assert_eq!(arena.used(), used, "{kind}: a refused append takes no tile");
        assert_eq!(a.cache().seq_lens(), &[20]);
        // It goes on as if the big chunk had never been offered.
        let next = chunk(&mut rng, 3);
        assert!(same(&step(&mut a, &next), &step(&mut own, &next)), "{kind}");
    }
}

#[test]
fn forks_share_tiles_and_continue_like_a_fresh_cache() {
    let s = seed("paged_fork");
    for kind in KINDS {
        let mut rng = Rng::new(s);
        let prefix: Vec<_> = [50usize, 1, 1, 30]
            .iter()
            .map(|&t| chunk(&mut rng, t))
            .collect();
        let tails: Vec<Vec<_>> = (0..2)
            .map(|_| {
                [1usize, 9, 1, 1]
                    .iter()
                    .map(|&t| chunk(&mut rng, t))
                    .collect()
            })
            .collect();
        let arena = TileArena::new(&Device::Cpu, TILE, 4000).unwrap();
        let mut base = layer(kind, Some(&arena));
        for c in &prefix {
            step(&mut base, c);
        }
        let held = base.cache().tiles_held();
        let used = arena.used();
        let mut forks: Vec<Attention> = (0..2).map(|_| base.fork().unwrap()).collect();
        // A fork copies at most its two partial tiles (records, exact rows); it shares the rest.
        let copied = arena.used() - used;
        assert!(copied <= 4, "{kind}: two forks copied {copied} tiles");
        assert_eq!(forks[0].cache().tiles_held(), held);
        let ids: std::collections::HashSet<u32> = [&base, &forks[0], &forks[1]]
            .iter()
            .flat_map(|a| a.cache().tile_ids())
            .collect();
        assert_eq!(
            ids.len(),
            arena.used(),
            "{kind}: the arena counts each shared tile once"
        );
        for (f, tail) in forks.iter_mut().zip(&tails) {
            let mut fresh = layer(kind, None);
            for c in &prefix {
                step(&mut fresh, c);
            }
            for c in tail {
                let (got, want) = (step(f, c), step(&mut fresh, c));
                assert!(
                    same(&got, &want),
                    "{kind}: a fork differs from a fresh cache (seed {s})"
                );
            }
        }
        // The base still reads its own tokens as before the forks wrote theirs.
        let c = chunk(&mut rng, 1);
        let mut fresh = layer(kind, None);
        for p in &prefix {
            step(&mut fresh, p);
        }
        assert!(
            same(&step(&mut base, &c), &step(&mut fresh, &c)),
            "{kind}: base after forks"
        );
        drop(forks);
        drop(base);
        assert_eq!(arena.used(), 0, "{kind}");
    }
}

#[test]
fn truncation_gives_the_cache_that_never_saw_the_tokens() {
    let s = seed("paged_truncate");
    for kind in KINDS {
        let mut rng = Rng::new(s);
        let arena = TileArena::new(&Device::Cpu, TILE, 4000).unwrap();
        let mut a = layer(kind, Some(&arena));
        // Truncation by up to 6 tokens is always possible; beyond, as the window allows.
        a.cache_mut().set_truncation_margin(6);
        let chunks: Vec<_> = [60usize, 1, 1, 1, 7, 1, 1]
            .iter()
            .map(|&t| chunk(&mut rng, t))
            .collect();
        for c in &chunks {
            step(&mut a, c);
        }
        let n = a.cache().seq_lens()[0];
        // The shortest length reachable: found by trying every length down from n.
        let mut reach = n;
        for len in (1..n).rev() {
            let mut probe = Attention::new(a.cache().fork(0).unwrap(), HQ, HK, D).unwrap();
            match probe.cache_mut().truncate(0, len) {
                Ok(()) => reach = len,
                Err(Error::Unsupported(_)) => break,
                Err(e) => panic!("{kind}: {e}"),
            }
        }
        assert!(
            reach <= n - 6,
            "{kind}: {n} tokens truncate only to {reach}"
        );
        for len in [reach, (reach + n) / 2, n - 1] {
            let mut t = Attention::new(a.cache().fork(0).unwrap(), HQ, HK, D).unwrap();
            t.cache_mut().truncate(0, len).unwrap();
            assert_eq!(t.cache().seq_lens(), &[len]);
            // A fresh cache with the same calibration (the first chunk, then reset: the
            // calibration stays) fed the same tokens up to len.
            let mut fresh = layer(kind, None);
            step(&mut fresh, &chunks[0]);
            fresh.reset();
            let mut fed = 0;
            for c in &chunks {
                let tk = c.1.dim(2).unwrap();
                let take = tk.min(len - fed);
                if take == 0 {
                    break;
                }
                let sl = |x: &Tensor| x.narrow(2, 0, take).unwrap();
                step(&mut fresh, &(sl(&c.0), sl(&c.1), sl(&c.2)));
                fed += take;
            }
            let next = chunk(&mut rng, 5);
            assert!(
                same(&step(&mut t, &next), &step(&mut fresh, &next)),
                "{kind}: truncated to {len} of {n} (seed {s})"
            );
        }
        // Too far: an error that changes nothing.
        if reach > 1 {
            let before = arena.used();
            let e = a.cache_mut().truncate(0, reach - 1).unwrap_err();
            assert!(matches!(e, Error::Unsupported(_)), "{kind}: {e}");
            assert_eq!((a.cache().seq_lens(), arena.used()), (&[n][..], before));
        }
        // To 0: every tile goes, the calibration stays.
        a.cache_mut().truncate(0, 0).unwrap();
        assert_eq!(a.cache().tiles_held(), 0, "{kind}");
        drop(a);
        assert_eq!(arena.used(), 0, "{kind}");
    }
}
