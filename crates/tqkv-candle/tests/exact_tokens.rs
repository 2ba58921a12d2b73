//! TurboQuant caches with attention sinks (`-s<N>`) and an exact window (`-w<N>`, or sized from
//! a budget, `-b<bits>`) against an independent f64 reference: per query, the sink and window
//! positions use the f16-rounded keys and values, every other position the record the cache's
//! own quantizer writes of the f16-rounded vector (dequantized with
//! `VectorQuantizer::dequantize`), one softmax over all.
use candle_core::{DType, Device, Tensor};
use tqkv::rng::Rng;
use tqkv_candle::{Attention, CacheConfig, CacheKind, KvCache, TurboCache};

mod common;
use common::{flat, kv_like, max_abs_diff, qkv, seed};

fn f16_round(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

fn spec_of(kind: &str) -> tqkv::KvSpec {
    match kind.parse::<CacheKind>().unwrap() {
        CacheKind::Turbo(s) => s,
        _ => panic!("{kind} is not a TurboQuant kind"),
    }
}

/// Feeds q, k, v `[b, h, n, d]` (sequence i has `lens[i]` real tokens) in steps of `chunks`
/// (then one token at a time) through `cache`; returns the outputs of all positions.
fn run(
    cache: &mut dyn KvCache,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lens: &[usize],
    chunks: &[usize],
    scale: f64,
) -> Tensor {
    let n = q.dim(2).unwrap();
    let mut outs = Vec::new();
    let mut off = 0;
    let mut steps = chunks.iter().copied().chain(std::iter::repeat(1));
    while off < n {
        let c = steps.next().unwrap().min(n - off);
        let l: Vec<usize> = lens.iter().map(|&x| x.saturating_sub(off).min(c)).collect();
        cache
            .append(
                &k.narrow(2, off, c).unwrap(),
                &v.narrow(2, off, c).unwrap(),
                Some(&l),
            )
            .unwrap();
        outs.push(cache.attend(&q.narrow(2, off, c).unwrap(), scale).unwrap());
        off += c;
    }
    Tensor::cat(&outs, 2).unwrap()
}

/// The exact window of a query that sees `n` positions: `spec.window`, or the most tokens that
/// keep (n − s − W) records + (s + W) f16 tokens + the tables within the budget.
fn window_of(spec: &tqkv::KvSpec, n: usize, record_bytes: usize, tables: usize, d: usize) -> usize {
    let s = spec.sinks.min(n);
    let w = match spec.budget_bits {
        None => spec.window,
        Some(bits) => {
            // The budget holds from BUDGET_FROM tokens on; shorter sequences keep that window.
            let m = n.max(tqkv::spec::BUDGET_FROM);
            let sm = spec.sinks.min(m);
            // Key + value of an exact token: f16, or q8_0 (d bytes + an f16 scale per 32).
            let exact = match spec.exact_format {
                tqkv::ExactFormat::F16 => 4 * d,
                tqkv::ExactFormat::Q8 => 2 * (d + 2 * d / 32),
            };
            (0..=m - sm)
                .rev()
                .find(|&w| {
                    ((m - sm - w) * record_bytes + (sm + w) * exact + tables) as f64
                        <= m as f64 * 2.0 * d as f64 * bits as f64 / 8.0
                })
                .unwrap_or(0)
                .min(if spec.window > 0 {
                    spec.window
                } else {
                    usize::MAX
                })
        }
    };
    w.min(n - s)
}

/// llama.cpp's q8_0 round trip of rows of `d` (already f16-rounded), written out in f64: per
/// block of 32, s = f16(max |x| / 127), x ↦ f16(round(x / s) · s).
fn q8_round_trip(x: &[f64]) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for blk in x.chunks(32) {
        let amax = blk.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let s = half::f16::from_f64(amax / 127.0).to_f64();
        for &v in blk {
            let c = if s > 0.0 {
                (v / s).round().clamp(-127.0, 127.0)
            } else {
                0.0
            };
            out.push(half::f16::from_f64(c * s).to_f64());
        }
    }
    out
}

/// The reference: query p of sequence b reads position j from the f16-rounded k, v (for q8_0
/// exact tokens, their q8_0 round trip) when j < sinks or j ≥ p + 1 − window(p + 1), else from
/// the dequantized record of the cache's quantizer (written from those same rows).
#[allow(clippy::too_many_arguments)]
fn reference(
    cache: &TurboCache,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lens: &[usize],
    spec: &tqkv::KvSpec,
    scale: f64,
) -> Vec<f64> {
    let (b, hq, n, d) = q.dims4().unwrap();
    let hk = k.dim(1).unwrap();
    let (kq, vq) = cache.quantizers().unwrap();
    let qf = flat(q);
    let (mut k16, mut v16) = (flat(&f16_round(k)), flat(&f16_round(v)));
    if spec.exact_format == tqkv::ExactFormat::Q8 {
        k16 = q8_round_trip(&k16);
        v16 = q8_round_trip(&v16);
    }
    // Records are written from the f16 rows when the cache keeps exact tokens, else from the
    // vectors as given.
    let (k32, v32) = (flat(k), flat(v));
    let (kf, vf) = if spec.has_exact() {
        (&k16, &v16)
    } else {
        (&k32, &v32)
    };
    let rb = kq[0].record_bytes() + vq[0].record_bytes();
    let tables = cache.memory().tables / hk;
    // Quantizers [head · cycle + m]: position j's record was written by m = j % cycle.
    let cycle = kq.len() / hk;
    let deq = |x: &[f64], qz: &tqkv::VectorQuantizer| -> Vec<f64> {
        let x32: Vec<f32> = x.iter().map(|&a| a as f32).collect();
        let mut rec = vec![0u8; qz.record_bytes()];
        qz.quantize(&x32, &mut rec).unwrap();
        let mut out = vec![0f32; d];
        qz.dequantize(&rec, &mut out).unwrap();
        out.into_iter().map(f64::from).collect()
    };
    let mut out = vec![0.0; b * hq * n * d];
    for bi in 0..b {
        for h in 0..hk {
            let row = |j: usize| ((bi * hk + h) * n + j) * d;
            let kd: Vec<Vec<f64>> = (0..lens[bi])
                .map(|j| deq(&kf[row(j)..row(j) + d], &kq[h * cycle + j % cycle]))
                .collect();
            let vd: Vec<Vec<f64>> = (0..lens[bi])
                .map(|j| deq(&vf[row(j)..row(j) + d], &vq[h * cycle + j % cycle]))
                .collect();
            for g in 0..hq / hk {
                let qh = h * (hq / hk) + g;
                for p in 0..lens[bi] {
                    let window = window_of(spec, p + 1, rb, tables, d);
                    let exact = |j: usize| j < spec.sinks || j + window > p;
                    let key = |j: usize| -> &[f64] {
                        if exact(j) {
                            &k16[row(j)..row(j) + d]
                        } else {
                            &kd[j]
                        }
                    };
                    let val = |j: usize| -> &[f64] {
                        if exact(j) {
                            &v16[row(j)..row(j) + d]
                        } else {
                            &vd[j]
                        }
                    };
                    let qi = &qf[((bi * hq + qh) * n + p) * d..][..d];
                    let s: Vec<f64> = (0..=p)
                        .map(|j| scale * qi.iter().zip(key(j)).map(|(a, b)| a * b).sum::<f64>())
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                    let o = &mut out[((bi * hq + qh) * n + p) * d..][..d];
                    for (j, sj) in s.iter().enumerate() {
                        let w = (sj - m).exp() / z;
                        for (x, &vv) in o.iter_mut().zip(val(j)) {
                            *x += w * vv;
                        }
                    }
                }
            }
        }
    }
    out
}

/// Sinks and windows of awkward sizes, over chunked prefills and decode steps that make the
/// ring grow, in a batch of two sequences of different lengths.
#[test]
fn sinks_and_window_match_the_reference() {
    let mut rng = Rng::new(seed("sinks_and_window"));
    let (b, hq, hk, n, d) = (2usize, 6usize, 2usize, 99usize, 64usize);
    let (q, k, v) = qkv(&mut rng, (b, hq, hk, n, d));
    let lens = [n, 57];
    let scale = 1.0 / (d as f64).sqrt();
    for (kind, chunks) in [
        ("tq3.5-s1", &[7usize, 1, 33][..]),
        ("tq3.5-w7", &[7, 1, 33]),
        ("tq3-s3-w7", &[40, 1, 1, 50]),
        ("tqk4v2-pn-s4-w24", &[5, 1, 1, 60]),
        ("tq2.5-w1", &[99]),
        ("tq3.5-s200", &[13, 1]),
        ("tq4-qjl-s2-w9", &[20, 30]),
        ("tq3-had-s2-b5", &[30, 1, 1, 20]),
        ("tqk3.5v2-had-pn-s1-b4-w9", &[64]),
        ("tq3.5-had-b3.5", &[9, 1, 1, 1, 80]),
        ("tq3-r3", &[10, 1, 1, 50]),
        ("tqk4v2-had-pn-s1-b4-r4", &[7, 1, 60]),
        ("tq3.5-qjlo-r2-s2-w5", &[33, 1, 1, 1]),
        ("tqk4v2-had-pn-s1-b4-r4-wq8", &[7, 1, 60]),
        ("tq3-s3-w7-wq8", &[40, 1, 1, 50]),
        ("tqk3v1.5-had-pn-s2-b3-wq8", &[1, 1, 97]),
    ] {
        let spec = spec_of(kind);
        let mut cache = TurboCache::new(spec, hk, d, &Device::Cpu, 7, None).unwrap();
        let got = flat(&run(&mut cache, &q, &k, &v, &lens, chunks, scale));
        let want = reference(&cache, &q, &k, &v, &lens, &spec, scale);
        // Padding rows of the shorter sequence: zeros in both.
        let diff = max_abs_diff(&got, &want);
        eprintln!("{kind:>18} chunks {chunks:?}: max |diff| {diff:.2e}");
        assert!(diff < 1e-4, "{kind}: differs from the reference by {diff}");
    }
}

/// With a window (or sinks) covering every token, the cache is exact attention over the
/// f16-rounded keys and values.
#[test]
fn a_window_of_all_tokens_is_exact_f16_attention() {
    let mut rng = Rng::new(seed("window_of_all"));
    let (b, hq, hk, n, d) = (1usize, 3usize, 1usize, 77usize, 64usize);
    let (q, k, v) = qkv(&mut rng, (b, hq, hk, n, d));
    let scale = 1.0 / (d as f64).sqrt();
    let f32_cache = |kk: &Tensor, vv: &Tensor| {
        let mut c = CacheConfig::new("f32".parse().unwrap())
            .build(0, hk, d, &Device::Cpu)
            .unwrap();
        flat(&run(c.as_mut(), &q, kk, vv, &[n], &[20, 1, 9], scale))
    };
    let want = f32_cache(&f16_round(&k), &f16_round(&v));
    // Centred kinds round the centred vectors to f16: compare with unrounded attention.
    let unrounded = f32_cache(&k, &v);
    for (kind, centred) in [
        ("tq2.5-w77", false),
        ("tq3.5-w500", false),
        ("tq3-s77", false),
        ("tq3.5-s10-w67", false),
        ("tq3-c-cv-w77", true),
        ("tq3.5-cv-s3-w80", true),
        ("tq3-ks-w77", true),
        ("tq2.5-c-ks1-fc-r2-s2-w90", true),
    ] {
        let mut cache = CacheConfig::new(kind.parse().unwrap())
            .build(0, hk, d, &Device::Cpu)
            .unwrap();
        let got = flat(&run(cache.as_mut(), &q, &k, &v, &[n], &[20, 1, 9], scale));
        let (diff, tol) = if centred {
            (max_abs_diff(&got, &unrounded), 1e-2)
        } else {
            (max_abs_diff(&got, &want), 1e-5)
        };
        eprintln!("{kind:>16}: max |diff| vs f32 attention {diff:.2e} (bound {tol:e})");
        assert!(diff < tol, "{kind}: {diff}");
    }
}

/// A query reads the window it would read when decoding, so a chunked prefill gives what
/// token-by-token decoding gives (after the same first chunk, which calibrates).
#[test]
fn chunked_prefill_equals_token_by_token_decoding() {
    let mut rng = Rng::new(seed("chunked_equals_decode"));
    let (b, hq, hk, n, d) = (1usize, 4usize, 2usize, 71usize, 64usize);
    let (q, k, v) = qkv(&mut rng, (b, hq, hk, n, d));
    for kind in [
        "tq3.5-pn-c-s4-w24",
        "tqk3v2-s2-w5",
        "tqk4v2-had-pn-c-s1-b4",
        "tq3.5",
        "tqk3v2-had-ks-fc-r3-s1-w7",
        "tqk3v1.5-had-pn-c-s1-b3-r4-wq8",
        "tq3-s2-w9-wq8",
    ] {
        let cfg = CacheConfig::new(kind.parse().unwrap());
        let build = || Attention::new(cfg.build(0, hk, d, &Device::Cpu).unwrap(), hq, hk, d);
        let mut whole = build().unwrap();
        let mut steps = build().unwrap();
        let a = flat(&run_layer(&mut whole, &q, &k, &v, &[10, 61]));
        let c = flat(&run_layer(&mut steps, &q, &k, &v, &[10]));
        let diff = max_abs_diff(&a, &c);
        eprintln!("{kind}: chunked vs decode max |diff| {diff:.2e}");
        assert!(diff < 1e-5, "{kind}: {diff}");
        // The layer's own chunking of a long prefill gives the same again.
        let mut auto = build().unwrap().with_chunk(10);
        let o = flat(&auto.forward(&q, &k, &v).unwrap());
        let diff = max_abs_diff(&o, &c);
        assert!(diff < 1e-5, "{kind}: layer chunking differs by {diff}");
    }
}

fn run_layer(a: &mut Attention, q: &Tensor, k: &Tensor, v: &Tensor, chunks: &[usize]) -> Tensor {
    let n = q.dim(2).unwrap();
    let mut outs = Vec::new();
    let mut off = 0;
    let mut steps = chunks.iter().copied().chain(std::iter::repeat(1));
    while off < n {
        let c = steps.next().unwrap().min(n - off);
        let sl = |t: &Tensor| t.narrow(2, off, c).unwrap();
        outs.push(a.forward(&sl(q), &sl(k), &sl(v)).unwrap());
        off += c;
    }
    Tensor::cat(&outs, 2).unwrap()
}

/// Bytes: a record per token outside the sinks and window, an f16 key and value per token in
/// them.
#[test]
fn exact_tokens_are_counted_in_the_memory() {
    let dev = Device::Cpu;
    let x = Tensor::ones((2, 3, 100, 64), DType::F32, &dev).unwrap();
    let bytes = |kind: &str, t: usize| {
        let mut c = CacheConfig::new(kind.parse().unwrap())
            .build(0, 3, 64, &dev)
            .unwrap();
        let xs = x.narrow(2, 0, t).unwrap();
        c.append(&xs, &xs, None).unwrap();
        let m = c.memory();
        assert!(m.allocated >= m.logical, "{kind}");
        m.logical
    };
    let rec = bytes("tq3.5-paper", 100) / (2 * 3 * 100);
    let exact = 2 * 64 * 2;
    for (kind, t, held) in [
        ("tq3.5-s4", 100, 4),
        ("tq3.5-w24", 100, 24),
        ("tq3.5-s4-w24", 100, 28),
        ("tq3.5-s4-w24", 10, 10),
        ("tq3.5-s4-w24", 3, 3),
        ("tq3.5-s8-w500", 100, 100),
    ] {
        assert_eq!(
            bytes(kind, t),
            2 * 3 * ((t - held) * rec + held * exact),
            "{kind} after {t} tokens"
        );
    }
}

#[test]
fn exact_token_suffixes_parse_and_name_the_cache() {
    let s = spec_of("tqk3.5v2-pn-c-s4-w24");
    assert_eq!((s.sinks, s.window), (4, 24));
    assert!(s.center_keys);
    let c = CacheConfig::new("tqk3.5v2-pn-c-s4-w24".parse().unwrap())
        .build(0, 1, 64, &Device::Cpu)
        .unwrap();
    assert_eq!(c.kind_name(), "tqk3.5v2-c-pn-s4-w24");
    let q8 = CacheConfig::new("tq3-s2-w5-wq8".parse().unwrap())
        .build(0, 1, 64, &Device::Cpu)
        .unwrap();
    assert_eq!(q8.kind_name(), "tq3-s2-w5-wq8");
    assert_eq!(spec_of("tq3-w5-wq8").exact_format, tqkv::ExactFormat::Q8);
    // q8_0 exact tokens need some exact tokens and whole blocks of 32 channels.
    assert!(CacheConfig::new("tq3-s1-wq8".parse().unwrap())
        .build(0, 1, 48, &Device::Cpu)
        .is_err());
    for bad in [
        "tq3.5-s",
        "tq3.5-w-1",
        "tq3.5-w99999999999",
        "tq3.5-sx",
        "tq3-wq8",
        "tq3-wq9",
    ] {
        assert!(bad.parse::<CacheKind>().is_err(), "{bad}");
    }
}

/// A budget window keeps the whole cache (tables included) within its bits per channel at
/// every length from BUDGET_FROM tokens on, and uses what the budget leaves; below that it keeps
/// the window a BUDGET_FROM-token sequence has.
#[test]
fn a_budget_window_stays_within_its_budget_at_every_length() {
    let mut rng = Rng::new(seed("budget_window"));
    let (hk, d, len) = (3usize, 64usize, 700usize);
    let from = tqkv::spec::BUDGET_FROM;
    for (kind, bits, sinks) in [
        ("tqk3.5v2-had-pn-c-s1-b4", 4.0, 1),
        ("tq3-had-pn-b3.5", 3.5, 0),
        ("tq2.5-had-pn-s2-b3", 3.0, 2),
        ("tqk3v1.5-had-pn-c-s1-b3-r4-wq8", 3.0, 1),
        ("tqk4v2-had-pn-s1-b4-wq8", 4.0, 1),
    ] {
        // Bytes of an exact token's key and value: f16, or q8_0 (d + 2 per 32 channels each).
        let eb = if kind.ends_with("-wq8") {
            2 * (d + 2 * d / 32)
        } else {
            4 * d
        };
        let mut c = CacheConfig::new(kind.parse().unwrap())
            .build(0, hk, d, &Device::Cpu)
            .unwrap();
        let x = kv_like(&mut rng, (1, hk, len, d), 1.0);
        let rec = kind_record_bytes(kind, d);
        let (mut windows, mut at_from) = (0, 0);
        for n in 1..=len {
            let one = x.narrow(2, n - 1, 1).unwrap();
            c.append(&one, &one, None).unwrap();
            let m = c.memory();
            let f16 = (n * hk * 2 * d * 2) as f64;
            let all_in = (m.logical + m.tables) as f64;
            // Tokens held exactly: each costs 4·d bytes instead of a record.
            let exact = (m.logical - n * hk * rec) / (hk * (eb - rec));
            assert_eq!(
                m.logical,
                hk * ((n - exact) * rec + exact * eb),
                "{kind} at {n}"
            );
            let window = exact - sinks.min(n);
            if n == from {
                at_from = window;
            }
            if n < from {
                continue;
            }
            if window > 0 {
                windows += 1;
                assert!(
                    all_in * 16.0 / bits <= f16,
                    "{kind}: {all_in} bytes at {n} tokens exceed the budget"
                );
            }
            // The window takes what the budget leaves: one more exact token would not fit.
            let more = all_in + (hk * (eb - rec)) as f64;
            assert!(
                more * 16.0 / bits > f16,
                "{kind}: at {n} tokens the window could hold one more token"
            );
        }
        // Below BUDGET_FROM: the same window as at BUDGET_FROM (as far as the tokens go).
        let mut short = CacheConfig::new(kind.parse().unwrap())
            .build(0, hk, d, &Device::Cpu)
            .unwrap();
        let xs = x.narrow(2, 0, 100).unwrap();
        short.append(&xs, &xs, None).unwrap();
        let m = short.memory();
        let exact = (m.logical - 100 * hk * rec) / (hk * (eb - rec));
        assert_eq!(
            exact,
            (sinks + at_from).min(100),
            "{kind}: window at 100 tokens"
        );
        eprintln!(
            "{kind}: window {at_from} at {from}; a window at {windows} lengths of {from}..={len}"
        );
        // tq2.5-paper records already take 3 bits per channel: no room for a window.
        let room = !kind.starts_with("tq2.5");
        assert_eq!(windows == len - from + 1, room, "{kind}: {windows}");
    }
}

fn kind_record_bytes(kind: &str, d: usize) -> usize {
    let s = spec_of(kind);
    [s.key, s.value]
        .iter()
        .map(|q| {
            tqkv::VectorQuantizer::new(q.with_outliers(tqkv::OutlierRule::Fixed), d, 0)
                .unwrap()
                .record_bytes()
        })
        .sum()
}
