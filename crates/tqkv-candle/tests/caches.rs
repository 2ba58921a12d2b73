//! Every cache kind against exact attention computed independently (f64, repeated KV heads),
//! plus chunking, GQA, dtypes, batches of different lengths, capacity and bad inputs.
use candle_core::{DType, Device, Tensor};
use tqkv::rng::Rng;
use tqkv_candle::{Attention, CacheConfig, CacheKind};

mod common;
use common::{flat, kv_like, max_abs_diff, qkv, seed};

/// Exact causal attention in f64 for all positions: q [b, hq, n, d], k, v [b, hk, n, d];
/// sequence b has `lens[b]` real tokens; rows ≥ lens[b] are zeros. GQA: query head i uses KV
/// head i / (hq / hk) (explicitly repeated).
fn reference(q: &Tensor, k: &Tensor, v: &Tensor, lens: &[usize], scale: f64) -> Vec<f64> {
    let (b, hq, n, d) = q.dims4().unwrap();
    let hk = k.dim(1).unwrap();
    let (q, k, v) = (flat(q), flat(k), flat(v));
    let mut out = vec![0.0; b * hq * n * d];
    for bi in 0..b {
        for h in 0..hq {
            let kh = h / (hq / hk);
            for p in 0..lens[bi] {
                let qi = &q[((bi * hq + h) * n + p) * d..][..d];
                let s: Vec<f64> = (0..=p)
                    .map(|j| {
                        scale
                            * (0..d)
                                .map(|c| qi[c] * k[((bi * hk + kh) * n + j) * d + c])
                                .sum::<f64>()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for (j, sj) in s.iter().enumerate() {
                    let w = (sj - m).exp() / z;
                    for c in 0..d {
                        out[((bi * hq + h) * n + p) * d + c] +=
                            w * v[((bi * hk + kh) * n + j) * d + c];
                    }
                }
            }
        }
    }
    out
}

/// Runs the layer over all n tokens in steps of `chunks` (the rest one token at a time) and
/// returns the outputs of all positions.
fn run(
    attn: &mut Attention,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lens: &[usize],
    chunks: &[usize],
) -> Tensor {
    let n = q.dim(2).unwrap();
    let mut outs = Vec::new();
    let mut off = 0;
    let mut steps = chunks.iter().copied().chain(std::iter::repeat(1));
    while off < n {
        let c = steps.next().unwrap().min(n - off);
        let l: Vec<usize> = lens.iter().map(|&x| x.saturating_sub(off).min(c)).collect();
        let o = attn
            .forward_with_lens(
                &q.narrow(2, off, c).unwrap(),
                &k.narrow(2, off, c).unwrap(),
                &v.narrow(2, off, c).unwrap(),
                Some(&l),
            )
            .unwrap();
        outs.push(o);
        off += c;
    }
    Tensor::cat(&outs, 2).unwrap()
}

fn rel_err(got: &Tensor, want: &[f64]) -> f64 {
    let g = flat(got);
    let num: f64 = g.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den).sqrt()
}

/// (kind, bound on the relative output error) — the bounds of docs/CACHES.md.
const KINDS: [(&str, f64); 21] = [
    ("f32", 1e-5),
    ("f16", 2e-3),
    ("bf16", 1e-2),
    ("q8", 1e-2),
    ("q4h", 0.09),
    ("kivi4", 0.02),
    ("kivi2", 0.09),
    ("q5h", 0.05),
    ("tq4-paper", 0.11),
    ("tq3.5-paper", 0.13),
    ("tq3", 0.2),
    ("tq2.5-paper", 0.24),
    ("tq4", 0.11),
    ("tq3.5", 0.13),
    ("tq2.5", 0.24),
    ("kivi4-r0", 0.1),
    ("tq4-qjl", 0.14),
    ("tq3.5-had", 0.13),
    ("tq3.5-c", 0.13),
    ("tq3.5-pn", 0.13),
    ("tq2.5-qjlo", 0.26),
];

#[test]
fn every_cache_is_close_to_exact_attention() {
    let mut rng = Rng::new(seed("every_cache"));
    let (b, hq, hk, n, d) = (2usize, 6usize, 2usize, 200usize, 64usize);
    let (q, k, v) = qkv(&mut rng, (b, hq, hk, n, d));
    let lens = [n, 171];
    let scale = 1.0 / (d as f64).sqrt();
    let want = reference(&q, &k, &v, &lens, scale);
    for (kind, bound) in KINDS {
        let cfg = CacheConfig::new(kind.parse().unwrap());
        let mut attn =
            Attention::new(cfg.build(0, hk, d, &Device::Cpu).unwrap(), hq, hk, d).unwrap();
        let out = run(&mut attn, &q, &k, &v, &lens, &[97, 33, 7]);
        let e = rel_err(&out, &want);
        eprintln!("{kind:>10}: relative error {e:.4} (bound {bound})");
        assert!(e < bound, "{kind}: relative error {e} ≥ {bound}");
        assert_eq!(attn.cache().seq_lens(), &lens);
    }
}

/// Keys with a large common offset per channel: centring removes it before quantizing (softmax
/// ignores the constant q·μ it leaves in every score), so the error drops clearly below
/// the uncentred cache's (about 0.6× here).
#[test]
fn centred_keys_remove_a_per_channel_offset() {
    let mut rng = Rng::new(seed("centred_keys"));
    let (b, hq, hk, n, d) = (1usize, 4usize, 2usize, 150usize, 64usize);
    let q = kv_like(&mut rng, (b, hq, n, d), 0.25);
    let offset: Vec<f32> = (0..hk * d).map(|_| 6.0 * rng.gaussian() as f32).collect();
    let offset = Tensor::from_vec(offset, (1, hk, 1, d), &Device::Cpu).unwrap();
    let k = kv_like(&mut rng, (b, hk, n, d), 1.0)
        .broadcast_add(&offset)
        .unwrap();
    let v = kv_like(&mut rng, (b, hk, n, d), 1.0);
    let want = reference(&q, &k, &v, &[n], 1.0 / (d as f64).sqrt());
    let err = |kind: &str| {
        let cfg = CacheConfig::new(kind.parse().unwrap());
        let mut attn =
            Attention::new(cfg.build(0, hk, d, &Device::Cpu).unwrap(), hq, hk, d).unwrap();
        rel_err(&run(&mut attn, &q, &k, &v, &[n], &[64, 1, 85]), &want)
    };
    let (plain, centred) = (err("tq3.5-paper"), err("tq3.5-c"));
    eprintln!("offset keys: tq3.5 {plain:.4}, tq3.5-c {centred:.4}");
    assert!(
        centred < 0.11 && centred < 0.75 * plain,
        "{centred} vs {plain}"
    );
}

#[test]
fn prefill_then_decode_equals_one_shot() {
    let mut rng = Rng::new(seed("prefill_then_decode"));
    let (b, hq, hk, n, d) = (1usize, 4usize, 2usize, 23usize, 64usize);
    let (q, k, v) = qkv(&mut rng, (b, hq, hk, n, d));
    for (kind, _) in KINDS {
        let cfg = CacheConfig::new(kind.parse().unwrap());
        let build =
            || Attention::new(cfg.build(3, hk, d, &Device::Cpu).unwrap(), hq, hk, d).unwrap();
        // The same first chunk (it calibrates the split), then decode vs one chunk.
        let a = run(&mut build(), &q, &k, &v, &[n], &[9]);
        let c = run(&mut build(), &q, &k, &v, &[n], &[9, 14]);
        let (fa, fc) = (flat(&a), flat(&c));
        let diff = max_abs_diff(&fa, &fc);
        // bf16 scores and sums round at 8 bits: one chunk and single tokens may differ by an
        // ulp of outputs up to 2 (seed 1796239682150521519: 0.0039).
        let tol = if kind == "bf16" { 1e-2 } else { 1e-4 };
        assert!(diff < tol, "{kind}: decode and one-shot differ by {diff}");
        // The layer's own chunking of a long prefill (chunk 5) gives the same as one chunk.
        let mut chunked = build().with_chunk(5);
        let mut whole = build();
        let o1 = chunked.forward(&q, &k, &v).unwrap();
        let o2 = whole.forward(&q, &k, &v).unwrap();
        if !kind.starts_with("tq") {
            // bf16 again rounds at 8 bits (seed 1796287165530999551: 0.00049, an ulp at 0.25).
            let diff = max_abs_diff(&flat(&o1), &flat(&o2));
            assert!(diff < tol, "{kind}: chunked prefill differs by {diff}");
        }
    }
}

#[test]
fn gqa_equals_repeated_kv_heads() {
    let mut rng = Rng::new(seed("gqa"));
    let (b, hq, hk, n, d) = (2usize, 6usize, 2usize, 13usize, 64usize);
    let (q, k, v) = qkv(&mut rng, (b, hq, hk, n, d));
    // Repeat each KV head 3 times: head i of the repeated tensor is KV head i / 3.
    let rep = |t: &Tensor| {
        let parts: Vec<Tensor> = (0..hq)
            .map(|i| t.narrow(1, i / (hq / hk), 1).unwrap())
            .collect();
        Tensor::cat(&parts, 1).unwrap()
    };
    let (kr, vr) = (rep(&k), rep(&v));
    // Budget windows are sized with the layer's tables shared by its KV heads, so a window can
    // differ by a token between 2 and 6 heads: those kinds are compared in exact_tokens.rs.
    for (kind, _) in KINDS
        .into_iter()
        .filter(|(k, _)| !matches!(*k, "tq4" | "tq3.5" | "tq2.5"))
    {
        let cfg = CacheConfig::new(kind.parse().unwrap());
        let mut g = Attention::new(cfg.build(0, hk, d, &Device::Cpu).unwrap(), hq, hk, d).unwrap();
        let mut m = Attention::new(cfg.build(0, hq, d, &Device::Cpu).unwrap(), hq, hq, d).unwrap();
        let a = run(&mut g, &q, &k, &v, &[n, 9], &[6]);
        let c = run(&mut m, &q, &kr, &vr, &[n, 9], &[6]);
        let diff = max_abs_diff(&flat(&a), &flat(&c));
        // Half-precision matmuls of other shapes round differently; everything else is exact.
        let tol = if kind.ends_with("16") { 2e-2 } else { 1e-5 };
        assert!(
            diff < tol,
            "{kind}: GQA and repeated heads differ by {diff}"
        );
        // GQA stores a third of the bytes.
        assert_eq!(3 * g.memory().logical, m.memory().logical, "{kind}");
    }
}

#[test]
fn sequences_of_different_lengths_match_running_them_alone() {
    let mut rng = Rng::new(seed("ragged_batch"));
    let (hq, hk, n, d) = (4usize, 2usize, 19usize, 64usize);
    let q = kv_like(&mut rng, (3, hq, n, d), 0.25);
    let k = kv_like(&mut rng, (3, hk, n, d), 1.0);
    let v = kv_like(&mut rng, (3, hk, n, d), 1.0);
    let lens = [19usize, 4, 11];
    // Uniform-bit TurboQuant kinds: a split would calibrate on the batch's first chunk.
    for kind in [
        "f32",
        "q8",
        "kivi4",
        "q4h",
        "tq4-paper",
        "tq3-qjl",
        "tq3-had-pn-s1-w9",
    ] {
        let cfg = CacheConfig::new(kind.parse().unwrap());
        let mut batched =
            Attention::new(cfg.build(0, hk, d, &Device::Cpu).unwrap(), hq, hk, d).unwrap();
        let out = run(&mut batched, &q, &k, &v, &lens, &[8]);
        for (i, &l) in lens.iter().enumerate() {
            let mut alone =
                Attention::new(cfg.build(0, hk, d, &Device::Cpu).unwrap(), hq, hk, d).unwrap();
            let sl = |t: &Tensor| t.narrow(0, i, 1).unwrap().narrow(2, 0, l).unwrap();
            let o = run(&mut alone, &sl(&q), &sl(&k), &sl(&v), &[l], &[8]);
            let mine = out.narrow(0, i, 1).unwrap();
            let diff = max_abs_diff(&flat(&mine.narrow(2, 0, l).unwrap()), &flat(&o));
            assert!(diff < 1e-5, "{kind} sequence {i}: {diff}");
            if l < n {
                let pad = flat(&mine.narrow(2, l, n - l).unwrap());
                assert!(
                    pad.iter().all(|&x| x == 0.0),
                    "{kind}: padding rows must be zeros"
                );
            }
        }
    }
}

#[test]
fn half_precision_inputs_keep_their_dtype() {
    let mut rng = Rng::new(seed("dtypes"));
    let (b, hq, hk, n, d) = (1usize, 2usize, 1usize, 10usize, 64usize);
    let (q, k, v) = qkv(&mut rng, (b, hq, hk, n, d));
    for kind in ["f16", "bf16", "f32", "q8", "q4h", "kivi2", "tq3.5"] {
        let cfg = CacheConfig::new(kind.parse().unwrap());
        let mut ref32 =
            Attention::new(cfg.build(0, hk, d, &Device::Cpu).unwrap(), hq, hk, d).unwrap();
        let want = flat(&ref32.forward(&q, &k, &v).unwrap());
        for dt in [DType::F16, DType::BF16] {
            let mut a =
                Attention::new(cfg.build(0, hk, d, &Device::Cpu).unwrap(), hq, hk, d).unwrap();
            let (qq, kk, vv) = (
                q.to_dtype(dt).unwrap(),
                k.to_dtype(dt).unwrap(),
                v.to_dtype(dt).unwrap(),
            );
            let out = a.forward(&qq, &kk, &vv).unwrap();
            assert_eq!(out.dtype(), dt, "{kind}");
            let e = rel_err(&out, &want);
            assert!(e < 0.05, "{kind} {dt:?}: {e}");
        }
    }
}

#[test]
fn bad_inputs_are_errors_that_name_the_problem() {
    let dev = Device::Cpu;
    let z = |s: (usize, usize, usize, usize)| Tensor::zeros(s, DType::F32, &dev).unwrap();
    for (kind, _) in KINDS {
        let cfg = CacheConfig::new(kind.parse().unwrap());
        let mut a = Attention::new(cfg.build(0, 2, 64, &dev).unwrap(), 4, 2, 64).unwrap();
        let err = |r: tqkv_candle::Result<Tensor>| r.unwrap_err().to_string();
        let e = err(a.forward(
            &Tensor::zeros((4, 3, 64), DType::F32, &dev).unwrap(),
            &z((1, 2, 3, 64)),
            &z((1, 2, 3, 64)),
        ));
        assert!(e.contains("rank 4"), "{kind}: {e}");
        let e = err(a.forward(&z((1, 4, 3, 64)), &z((1, 3, 3, 64)), &z((1, 3, 3, 64))));
        assert!(e.contains("heads"), "{kind}: {e}");
        let e = err(a.forward(&z((1, 4, 3, 64)), &z((1, 2, 3, 64)), &z((1, 2, 3, 32))));
        assert!(e.contains("same shape") || e.contains("dim"), "{kind}: {e}");
        let ints = Tensor::zeros((1, 2, 3, 64), DType::U32, &dev).unwrap();
        let e = err(a.forward(&z((1, 4, 3, 64)), &ints, &ints));
        assert!(e.contains("f32, f16 or bf16"), "{kind}: {e}");
        for bad in [f32::NAN, f32::INFINITY] {
            let mut k = vec![0.5f32; 2 * 3 * 64];
            k[70] = bad;
            let k = Tensor::from_vec(k, (1, 2, 3, 64), &dev).unwrap();
            match a.forward(&z((1, 4, 3, 64)), &k, &z((1, 2, 3, 64))) {
                // Flat index 70 of [1, 2, 3, 64]: sequence 0, head 0, token 1, channel 6.
                Err(tqkv_candle::Error::NonFinite { what: "keys", at }) => {
                    assert_eq!(
                        (at.seq, at.pos, at.head, at.channel),
                        (0, 1, 0, 6),
                        "{kind}"
                    );
                    assert!(at.value.is_nan() == bad.is_nan(), "{kind}");
                }
                r => panic!(
                    "{kind}: expected a non-finite error, got {:?}",
                    r.map(|_| ())
                ),
            }
            assert!(
                a.cache().seq_lens().is_empty() || a.cache().seq_lens() == [0],
                "{kind}: a failed append changed the cache"
            );
        }
        // Still usable after the errors.
        a.forward(&z((1, 4, 3, 64)), &z((1, 2, 3, 64)), &z((1, 2, 3, 64)))
            .unwrap();
        assert_eq!(a.cache().seq_lens(), &[3]);
    }
    assert!("tq9".parse::<CacheKind>().is_err());
    let e = "int3".parse::<CacheKind>().unwrap_err().to_string();
    assert!(e.contains("tq3.5") && e.contains("kivi2"), "{e}");
    // Unsupported head_dim for the Hadamard-based kinds.
    assert!(CacheConfig::new("q4h".parse().unwrap())
        .build(0, 1, 20, &dev)
        .is_err());
    assert!(CacheConfig::new("tq3.5-had".parse().unwrap())
        .build(0, 1, 20, &dev)
        .is_err());
    assert!(CacheConfig::new("tq3.5-paper".parse().unwrap())
        .build(0, 1, 8, &dev)
        .is_err());
    assert!(CacheConfig::new("tq3.5".parse().unwrap())
        .build(0, 1, 8, &dev)
        .is_err());
}

#[test]
fn a_full_cache_is_a_clear_error_and_loses_nothing() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(seed("capacity"));
    for (kind, _) in KINDS {
        let cfg = CacheConfig::new(kind.parse().unwrap()).with_max_tokens(10);
        let mut a = Attention::new(cfg.build(0, 1, 64, &dev).unwrap(), 1, 1, 64).unwrap();
        let x = kv_like(&mut rng, (1, 1, 8, 64), 1.0);
        let first = a.forward(&x, &x, &x).unwrap();
        match a.forward(&x, &x, &x) {
            Err(tqkv_candle::Error::CacheFull {
                seq: 0,
                have: 8,
                add: 8,
                max: 10,
            }) => {}
            r => panic!("{kind}: expected CacheFull, got {:?}", r.map(|_| ())),
        }
        assert_eq!(a.cache().seq_lens(), &[8]);
        let one = x.narrow(2, 0, 2).unwrap();
        a.forward(&one, &one, &one).unwrap();
        assert_eq!(a.cache().seq_lens(), &[10]);
        let _ = first;
    }
}

#[test]
fn memory_accounting_matches_the_format() {
    let dev = Device::Cpu;
    let x = Tensor::ones((2, 3, 100, 128), DType::F32, &dev).unwrap();
    let bytes = |kind: &str| {
        let mut c = CacheConfig::new(kind.parse().unwrap())
            .build(0, 3, 128, &dev)
            .unwrap();
        c.append(&x, &x, None).unwrap();
        let m = c.memory();
        assert!(m.allocated >= m.logical, "{kind}");
        m.logical
    };
    let per_token_heads = 2 * 3 * 100;
    assert_eq!(bytes("f16"), per_token_heads * 2 * 256);
    assert_eq!(bytes("f32"), per_token_heads * 2 * 512);
    assert_eq!(bytes("q8"), per_token_heads * 2 * (128 + 8));
    assert_eq!(bytes("q4h"), per_token_heads * 2 * (64 + 8));
    assert_eq!(bytes("q5h"), per_token_heads * 2 * (80 + 8));
    assert_eq!(bytes("tq3.5-paper"), per_token_heads * 2 * 60);
    assert_eq!(bytes("tq2.5-paper"), per_token_heads * 2 * 44);
    assert_eq!(bytes("tq4-qjl"), per_token_heads * (68 + 66));
    assert_eq!(bytes("tqk4v2"), per_token_heads * (66 + 34));
}
