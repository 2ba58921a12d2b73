//! Soak: thousands of decode steps over several sequences of different lengths (some skip
//! steps), with prefills, resets and failed steps between rounds. Memory stays bounded (reset
//! frees everything; the allocation never exceeds a small multiple of what is held) and every
//! round's outputs equal those of a fresh cache fed the same round.
mod common;

use candle_core::Tensor;
use common::{flat, kv_like, seed};
use tqkv::rng::Rng;
use tqkv_candle::{Attention, CacheConfig};

const HK: usize = 2;
const HQ: usize = 4;
const D: usize = 64;

fn layer(kind: &str) -> Attention {
    let cfg = CacheConfig::new(kind.parse().unwrap());
    Attention::new(
        cfg.build(1, HK, D, &candle_core::Device::Cpu).unwrap(),
        HQ,
        HK,
        D,
    )
    .unwrap()
    .with_chunk(16)
}

/// One round: a prefill of 3 sequences (lengths 40, 17, 1), then `steps` decode steps where
/// sequence 1 skips every third step; returns every output, flattened.
fn round(
    a: &mut Attention,
    rng: &mut Rng,
    steps: usize,
    check: &mut dyn FnMut(&Attention),
) -> Vec<f64> {
    let mut out = Vec::new();
    let x = |rng: &mut Rng, h: usize, t: usize| kv_like(rng, (3, h, t, D), 1.0);
    let (q, k, v) = (x(rng, HQ, 40), x(rng, HK, 40), x(rng, HK, 40));
    out.extend(flat(
        &a.forward_with_lens(&q, &k, &v, Some(&[40, 17, 1])).unwrap(),
    ));
    for s in 0..steps {
        let (q, k, v): (Tensor, Tensor, Tensor) = (x(rng, HQ, 1), x(rng, HK, 1), x(rng, HK, 1));
        let lens = [1, usize::from(s % 3 != 0), 1];
        out.extend(flat(&a.forward_with_lens(&q, &k, &v, Some(&lens)).unwrap()));
        check(a);
    }
    out
}

#[test]
fn thousands_of_steps_stay_bounded_and_reproducible() {
    let seed = seed("soak");
    let steps = 500;
    for kind in ["tq3.5", "tq2.5", "kivi2-r8", "q8", "f16"] {
        let mut a = layer(kind);
        let mut rng = Rng::new(seed);
        let mut first = 0;
        for r in 0..3 {
            let state = rng.next_u64();
            if r == 0 {
                first = state;
            }
            let mut bound = |a: &Attention| {
                let m = a.memory();
                // Capacity doubles: at most ~2× what is held, plus the window's ring and the
                // first allocation (16 slots per sequence).
                let held = m.logical.max(1);
                assert!(
                    m.allocated <= 3 * held + 3 * HK * 16 * 2 * D * 4 * 4,
                    "{kind}: round {r}: {} bytes allocated for {held} held",
                    m.allocated
                );
            };
            let got = round(&mut a, &mut Rng::new(state), steps, &mut bound);
            let lens = a.cache().seq_lens().to_vec();
            let skipped = steps.div_ceil(3);
            assert_eq!(
                lens,
                vec![40 + steps, 17 + steps - skipped, 1 + steps],
                "{kind}"
            );
            // A fresh cache fed the same round gives the same outputs, bit for bit (after the
            // first round's prefill and a reset: a TurboQuant cache keeps its calibration).
            let mut fresh = layer(kind);
            if r > 0 {
                round(&mut fresh, &mut Rng::new(first), 0, &mut |_| {});
                fresh.reset();
            }
            let want = round(&mut fresh, &mut Rng::new(state), steps, &mut |_| {});
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{kind}: round {r} differs from a fresh run (seed {seed})"
            );
            // A failed step between rounds changes nothing; reset frees everything.
            let bad = Tensor::full(f32::NAN, (3, HK, 1, D), &candle_core::Device::Cpu).unwrap();
            let q = Tensor::zeros(
                (3, HQ, 1, D),
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )
            .unwrap();
            assert!(a.forward(&q, &bad, &bad).is_err());
            assert_eq!(a.cache().seq_lens(), &lens[..]);
            a.reset();
            assert_eq!(
                a.memory().allocated,
                0,
                "{kind}: reset keeps {} bytes",
                a.memory().allocated
            );
        }
    }
}
