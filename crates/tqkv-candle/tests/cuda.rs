//! The caches on a CUDA device against the same caches on the CPU (feature `cuda`; skipped with
//! a printed reason when no device is present). The CPU TurboQuant cache is the oracle: the
//! CUDA one quantizes with the kernels and attends with the fused kernel (decode) or the
//! dequantize + matmul path (prefill); outputs agree within the stated tolerances (codes can
//! differ at boundary ties, which moves an output by far less than the tolerance).
#![cfg(feature = "cuda")]
use candle_core::{DType, Device, Tensor};
use tqkv::rng::Rng;
use tqkv::AttentionKernel;
use tqkv_candle::{Attention, CacheConfig, CacheKind, FullCache, KvCache, PrefillPath, TurboCache};

mod common;
use common::{kv_like, seed};

fn cuda() -> Option<Device> {
    if !tqkv::cuda::driver_present() {
        eprintln!("SKIPPED: no CUDA driver library on this machine");
        return None;
    }
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("SKIPPED: no CUDA device ({e})");
            None
        }
    }
}

/// ‖a − b‖ / ‖b‖ over all elements, in f64.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let f = |t: &Tensor| -> Vec<f64> {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (a, b) = (f(a), f(b));
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-30)).sqrt()
}

fn turbo(kind: &str, h: usize, d: usize, dev: &Device, seed: u64) -> TurboCache {
    let CacheKind::Turbo(spec) = kind.parse().unwrap() else {
        panic!("{kind} is not a TurboQuant kind")
    };
    TurboCache::new(spec, h, d, dev, seed, None).unwrap()
}

#[test]
fn turbo_cache_on_cuda_matches_the_cpu_cache() {
    let Some(gpu) = cuda() else { return };
    let mut rng = Rng::new(seed("turbo cuda vs cpu"));
    for (kind, d) in [
        ("tq3.5-paper", 128usize),
        ("tq2.5-paper", 64),
        ("tq3.5", 64),
        ("tq4-qjl", 128),
        ("tqk4v3", 96),
        ("tq3.5-had", 128),
        ("tq3.5-pn-c", 64),
        ("tqk4v2-had-pn-c-s1-b4", 64),
        ("tqk3.5v2.5-pn-c-s4-w9", 128),
        ("tq3-had-pnk-cv-s2", 96),
        ("tqk4v2-had-pn-c-s1-b4-r2", 64),
        ("tq3.5-paper-r4", 128),
        ("tq4-qjl-r2-s3-w5", 64),
        ("tqk3v1.5-had-pn-c-s1-b3-r4-wq8", 64),
        ("tq3-s2-w9-wq8", 128),
        ("tqk3v1.5-had-pn-c-s1-b3-r4-n8-wq8", 64),
        ("tq3.5-n8v", 96),
    ] {
        for (dtype, tol_decode, tol_prefill) in [
            (DType::F32, 2e-3f64, 2e-3f64),
            (DType::F16, 3e-3, 5e-3),
            (DType::BF16, 1e-2, 3e-2),
        ] {
            // The tensor-core kernel (f16 operands) within 4e-3 at least; where it does not
            // take the layout the cache runs the split kernel, which this also checks.
            for (path, kernel) in [
                (PrefillPath::Dequantize, AttentionKernel::Split),
                (PrefillPath::Fused, AttentionKernel::Split),
                (PrefillPath::Fused, AttentionKernel::TensorCore),
            ] {
                let (tol_decode, tol_prefill) = match kernel {
                    AttentionKernel::Split => (tol_decode, tol_prefill),
                    AttentionKernel::TensorCore => (tol_decode.max(4e-3), tol_prefill.max(4e-3)),
                };
                let (b, hq, hk, t) = (2usize, 8usize, 2usize, 37usize);
                let cache_seed = rng.next_u64();
                let mut cpu = turbo(kind, hk, d, &Device::Cpu, cache_seed);
                let mut cud = turbo(kind, hk, d, &gpu, cache_seed);
                cud.set_prefill_path(path);
                cud.set_attention_kernel(kernel);
                let lens = [t, 20];
                let ctx = format!("{kind} d={d} {dtype:?} {path:?} {kernel}");
                // Prefill (ragged), then decode steps (past a window of 9).
                for step in 0..12 {
                    let tt = if step == 0 { t } else { 1 };
                    let k = kv_like(&mut rng, (b, hk, tt, d), 1.0)
                        .to_dtype(dtype)
                        .unwrap();
                    let v = kv_like(&mut rng, (b, hk, tt, d), 1.0)
                        .to_dtype(dtype)
                        .unwrap();
                    let q = kv_like(&mut rng, (b, hq, tt, d), 1.0)
                        .to_dtype(dtype)
                        .unwrap();
                    let l = if step == 0 { Some(&lens[..]) } else { None };
                    cpu.append(&k, &v, l).unwrap();
                    cud.append(&k.to_device(&gpu).unwrap(), &v.to_device(&gpu).unwrap(), l)
                        .unwrap();
                    let want = cpu.attend(&q, 0.1).unwrap();
                    let got = cud.attend(&q.to_device(&gpu).unwrap(), 0.1).unwrap();
                    assert_eq!(got.dtype(), dtype);
                    let r = rel(&got, &want);
                    let tol = if step == 0 { tol_prefill } else { tol_decode };
                    eprintln!("{ctx} step {step}: relative error {r:.2e}");
                    assert!(
                        r <= tol,
                        "{ctx} step {step}: relative error {r:.2e} > {tol:e}"
                    );
                }
                cud.check_status().unwrap();
                assert_eq!(cud.seq_lens(), cpu.seq_lens());
                assert_eq!(cud.memory(), cpu.memory());
            }
        }
    }
}

#[test]
fn full_cache_and_attention_layer_on_cuda_match_the_cpu() {
    let Some(gpu) = cuda() else { return };
    let mut rng = Rng::new(seed("full/layer cuda vs cpu"));
    let (b, hq, hk, d) = (1usize, 6usize, 2usize, 64usize);
    for kind in [
        "f16",
        "bf16",
        "f32",
        "tq3.5",
        "tq2.5-qjl",
        "tqk4v2-had-pn-c-s1-w20",
    ] {
        let cfg = CacheConfig::new(kind.parse().unwrap());
        let mut cpu = Attention::new(cfg.build(3, hk, d, &Device::Cpu).unwrap(), hq, hk, d)
            .unwrap()
            .with_chunk(16);
        let mut cud = Attention::new(cfg.build(3, hk, d, &gpu).unwrap(), hq, hk, d)
            .unwrap()
            .with_chunk(16);
        for tt in [41usize, 1, 1, 7, 1] {
            let q = kv_like(&mut rng, (b, hq, tt, d), 1.0);
            let k = kv_like(&mut rng, (b, hk, tt, d), 1.0);
            let v = kv_like(&mut rng, (b, hk, tt, d), 1.0);
            let want = cpu.forward(&q, &k, &v).unwrap();
            let got = cud
                .forward(
                    &q.to_device(&gpu).unwrap(),
                    &k.to_device(&gpu).unwrap(),
                    &v.to_device(&gpu).unwrap(),
                )
                .unwrap();
            let r = rel(&got, &want);
            eprintln!("{kind} chunk of {tt}: relative error {r:.2e}");
            let tol = if kind == "bf16" { 2e-2 } else { 5e-3 };
            assert!(r <= tol, "{kind}, chunk of {tt}: {r:.2e}");
        }
    }
}

#[test]
fn nan_input_on_cuda_is_an_error_and_keeps_the_cache() {
    let Some(gpu) = cuda() else { return };
    let mut rng = Rng::new(seed("cuda nan"));
    let (hk, d) = (2usize, 64usize);
    let mut c = turbo("tq3.5", hk, d, &gpu, 7);
    let k = kv_like(&mut rng, (1, hk, 9, d), 1.0)
        .to_device(&gpu)
        .unwrap();
    c.append(&k, &k, None).unwrap();
    // A prefill chunk with NaN: an error at once, and nothing committed.
    let mut bad = kv_like(&mut rng, (1, hk, 5, d), 1.0)
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    bad[70] = f32::NAN;
    let bad = Tensor::from_vec(bad, (1, hk, 5, d), &gpu).unwrap();
    let e = c.append(&bad, &bad, None).unwrap_err().to_string();
    assert!(e.contains("NaN"), "{e}");
    assert_eq!(c.seq_lens(), &[9]);
    let q = kv_like(&mut rng, (1, 4, 1, d), 1.0)
        .to_device(&gpu)
        .unwrap();
    let one = kv_like(&mut rng, (1, hk, 1, d), 1.0)
        .to_device(&gpu)
        .unwrap();
    c.append(&one, &one, None).unwrap();
    let out = c.attend(&q, 0.125).unwrap();
    let finite = out
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|x| x.is_finite());
    assert!(
        finite,
        "a clean cache gives finite attention after the rejected chunk"
    );
    // A decode token with Inf outside a step: an error at once, naming where.
    let inf = (one.ones_like().unwrap() * f64::INFINITY).unwrap();
    match c.append(&inf, &one, None) {
        Err(tqkv_candle::Error::NonFinite { what: "keys", at }) => {
            assert_eq!((at.seq, at.pos, at.head, at.channel), (0, 10, 0, 0));
        }
        r => panic!("expected NonFinite, got {r:?}"),
    }
    assert_eq!(c.seq_lens(), &[10]);
    // Inside a step the check is deferred to the device status word, read once by check_step
    // (what a model does after its last layer); rolling back leaves the cache as before.
    c.begin_step().unwrap();
    c.append(&inf, &one, None).unwrap();
    let _ = c.attend(&q, 0.125).unwrap();
    match c.check_step() {
        Err(tqkv_candle::Error::NonFinite { what: "keys", at }) => {
            assert_eq!((at.seq, at.pos), (0, 10));
        }
        r => panic!("expected NonFinite from check_step, got {r:?}"),
    }
    c.rollback_step().unwrap();
    assert_eq!(c.seq_lens(), &[10]);
    c.begin_step().unwrap();
    c.append(&one, &one, None).unwrap();
    let out = c.attend(&q, 0.125).unwrap();
    c.check_step().unwrap();
    c.commit_step();
    assert!(out
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|x| x.is_finite()));
    assert_eq!(c.seq_lens(), &[11]);
    // FullCache on CUDA rejects NaN at append.
    let mut f = FullCache::new(hk, d, DType::F16, &gpu, None).unwrap();
    assert!(f.append(&bad, &bad, None).is_err());
    f.append(&k, &k, None).unwrap();
    f.begin_step().unwrap();
    f.append(&inf, &one, None).unwrap();
    assert!(matches!(
        f.check_step(),
        Err(tqkv_candle::Error::NonFinite { what: "keys", .. })
    ));
    f.rollback_step().unwrap();
    assert_eq!(f.seq_lens(), &[9]);
}
