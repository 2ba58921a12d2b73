//! Steps are all-or-nothing: a forward that fails in any chunk (an injected fault in an append
//! or an attend, or NaN keys in a middle chunk) leaves the cache exactly as before — lengths,
//! stored tokens, the exact window, calibration — so that continuing gives bit-for-bit the
//! outputs of a run that never failed. Every cache kind, batch 2 with padding, chunks of 7.
mod common;

use candle_core::{Device, Tensor};
use common::{flat, kv_like, seed};
use tqkv::rng::Rng;
use tqkv_candle::fault::{FaultAt, FaultCache};
use tqkv_candle::{Attention, CacheConfig, Error, KvCache};

const KINDS: &[&str] = &[
    "f32",
    "f16",
    "q8",
    "q4h",
    "kivi4",
    "kivi2-r8",
    "tq3.5",
    "tq2.5",
    "tq4",
    "tq3.5-paper",
    "tq3-qjl",
    "tq3-had-s2-w8",
    "tq3-had-s2-w8-wq8",
    "tq3-had-c-s1-b4-r2",
];
const HK: usize = 2;
const HQ: usize = 6;
const D: usize = 64;
const CHUNK: usize = 7;

struct Step {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lens: Option<Vec<usize>>,
}

fn steps(rng: &mut Rng) -> Vec<Step> {
    let mut out = Vec::new();
    // Prefill (3 chunks, padding), decode, a second prefill (4 chunks), four decode steps.
    for (t, lens) in [
        (20, Some(vec![20, 13])),
        (1, None),
        (23, Some(vec![23, 17])),
        (1, None),
        (1, None),
        (1, None),
        (1, None),
    ] {
        out.push(Step {
            q: kv_like(rng, (2, HQ, t, D), 1.0),
            k: kv_like(rng, (2, HK, t, D), 1.0),
            v: kv_like(rng, (2, HK, t, D), 1.0),
            lens,
        });
    }
    out
}

fn layer(kind: &str, cache: impl FnOnce(Box<dyn KvCache>) -> Box<dyn KvCache>) -> Attention {
    let cfg = CacheConfig::new(kind.parse().unwrap());
    let c = cfg.build(3, HK, D, &Device::Cpu).unwrap();
    Attention::new(cache(c), HQ, HK, D)
        .unwrap()
        .with_chunk(CHUNK)
}

fn run(a: &mut Attention, s: &Step) -> tqkv_candle::Result<Tensor> {
    a.forward_with_lens(&s.q, &s.k, &s.v, s.lens.as_deref())
}

/// Bit-for-bit equality, reporting the first difference (not both vectors).
fn same(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!("{what}: element {i} is {} instead of {}", got[i], want[i]);
    }
}

/// What a caller can observe of a cache without attending: lengths, bytes held and tables
/// (a grown allocation may stay grown, as a `Vec`'s capacity does).
fn observe(a: &Attention) -> (Vec<usize>, usize, usize) {
    let m = a.memory();
    (a.cache().seq_lens().to_vec(), m.logical, m.tables)
}

#[test]
fn a_failed_step_leaves_the_cache_as_it_was() {
    let seed = seed("steps");
    for kind in KINDS {
        let mut rng = Rng::new(seed);
        let steps = steps(&mut rng);
        let mut reference = layer(kind, |c| c);
        let want: Vec<Vec<f64>> = steps
            .iter()
            .map(|s| flat(&run(&mut reference, s).unwrap()))
            .collect();
        let mut switch = None;
        let mut a = layer(kind, |c| {
            let (f, s) = FaultCache::new(c);
            switch = Some(s);
            Box::new(f)
        });
        let switch = switch.unwrap();
        for (i, s) in steps.iter().enumerate() {
            let chunks = s.q.dim(2).unwrap().div_ceil(CHUNK);
            // Fail at the last chunk's attend, at the first attend, at the second chunk's
            // append: each must leave the cache as it was (the first step: uncalibrated).
            let mut faults = vec![FaultAt::Attend(chunks - 1), FaultAt::Attend(0)];
            if chunks > 1 {
                faults.push(FaultAt::Append(1));
            }
            for f in faults {
                let before = observe(&a);
                switch.arm(f);
                match run(&mut a, s) {
                    Err(Error::Protocol(m)) if m == "injected fault" => {}
                    r => panic!("{kind}: step {i}, {f:?}: {:?}", r.map(|_| ())),
                }
                assert!(!switch.armed());
                assert_eq!(observe(&a), before, "{kind}: step {i}, {f:?} (seed {seed})");
            }
            let got = flat(&run(&mut a, s).unwrap());
            same(&got, &want[i], &format!("{kind}: step {i} (seed {seed})"));
        }
        assert_eq!(observe(&a), observe(&reference), "{kind}");
    }
}

#[test]
fn nan_in_a_middle_chunk_names_its_position_and_undoes_the_earlier_chunks() {
    let seed = seed("steps-nan");
    for kind in KINDS {
        let mut rng = Rng::new(seed);
        let steps = steps(&mut rng);
        let mut reference = layer(kind, |c| c);
        let mut a = layer(kind, |c| c);
        for (i, s) in steps.iter().enumerate() {
            let t = s.q.dim(2).unwrap();
            if t > CHUNK {
                // Sequence 1, head 1, token 9 (the second chunk), channel 5.
                let mut v = s.v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                v[((HK + 1) * t + 9) * D + 5] = f32::NAN;
                let bad = Tensor::from_vec(v, s.v.dims(), &Device::Cpu).unwrap();
                let before = observe(&a);
                match a.forward_with_lens(&s.q, &s.k, &bad, s.lens.as_deref()) {
                    Err(Error::NonFinite { what: "values", at }) => {
                        let held = before.0.get(1).copied().unwrap_or(0);
                        assert_eq!(
                            (at.seq, at.pos, at.head, at.channel),
                            (1, held + 9, 1, 5),
                            "{kind}: step {i}"
                        );
                        assert!(at.value.is_nan());
                    }
                    r => panic!("{kind}: step {i}: {:?}", r.map(|_| ())),
                }
                assert_eq!(observe(&a), before, "{kind}: step {i} (seed {seed})");
            }
            let got = flat(&run(&mut a, s).unwrap());
            let want = flat(&run(&mut reference, s).unwrap());
            same(&got, &want, &format!("{kind}: step {i} (seed {seed})"));
        }
    }
}

#[test]
fn steps_follow_their_protocol() {
    for kind in KINDS {
        let mut a = layer(kind, |c| c);
        let mut rng = Rng::new(seed("steps-protocol"));
        let s = &steps(&mut rng)[0];
        // Closing a step that is not open does nothing.
        a.commit_step();
        a.rollback_step().unwrap();
        a.begin_step().unwrap();
        assert!(
            matches!(a.begin_step(), Err(Error::Protocol(_))),
            "{kind}: a second begin_step"
        );
        // A caller's step spans several forwards; rolling it back undoes all of them.
        run(&mut a, s).unwrap();
        run(&mut a, &steps(&mut rng)[1]).unwrap();
        a.rollback_step().unwrap();
        assert!(
            a.cache().seq_lens().iter().all(|&n| n == 0),
            "{kind}: {:?}",
            a.cache().seq_lens()
        );
        assert!(matches!(a.cache().attend(&s.q, 0.125), Err(Error::Empty)));
        // attend on a fresh or reset cache is an error, never a panic.
        a.reset();
        assert!(
            matches!(a.cache().attend(&s.q, 0.125), Err(Error::Empty)),
            "{kind}"
        );
        run(&mut a, s).unwrap();
        assert_eq!(a.cache().seq_lens(), &[20, 13]);
    }
}

#[test]
fn nan_queries_are_an_error_on_the_cpu() {
    for kind in KINDS {
        let mut a = layer(kind, |c| c);
        let mut rng = Rng::new(seed("steps-nan-q"));
        let st = steps(&mut rng);
        run(&mut a, &st[0]).unwrap();
        let s = &st[1];
        run(&mut a, s).unwrap();
        let mut q = s.q.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        q[77] = f32::INFINITY;
        let q = Tensor::from_vec(q, s.q.dims(), &Device::Cpu).unwrap();
        match a.cache().attend(&q, 0.125) {
            Err(Error::NonFiniteQuery { index: 77, value }) => assert!(value.is_infinite()),
            r => panic!("{kind}: {:?}", r.map(|_| ())),
        }
    }
}
