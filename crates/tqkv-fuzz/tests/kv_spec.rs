//! Fuzz target: the KV cache spec grammar (`tq3.5`, `tqk4v2-had-pn-c-s1-b4-r4-wq8`,
//! `tq3.5@0-1=q8@29=f16`, `K@B+J@C` bits, …): parse, build the cache of one layer, and run one
//! prefill and one decode step through it when the spec's exact tokens are small.
use candle_core::{DType, Device, Tensor};
use tqkv_candle::{Attention, CacheConfig, CacheKind};

#[global_allocator]
static ALLOC: tqkv_fuzz::Counting = tqkv_fuzz::Counting;

fn target(bytes: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return false;
    };
    let Ok(cfg) = text.parse::<CacheConfig>() else {
        return false;
    };
    let (hk, d) = (2, 64);
    // Sinks and windows allocate their slots up front (up to 2²⁰ tokens each); keep the
    // step small where they are.
    if let CacheKind::Turbo(s) = cfg.default {
        if s.sinks + s.window > 4096 {
            return true;
        }
    }
    let Ok(c) = cfg.build_in(3, 8, hk, d, &Device::Cpu) else {
        return true;
    };
    let mut a = Attention::new(c, 4, hk, d).unwrap();
    let x = |t: usize, h: usize| Tensor::ones((1, h, t, d), DType::F32, &Device::Cpu).unwrap();
    if a.forward(&x(5, 4), &x(5, hk), &x(5, hk)).is_ok() {
        let _ = a.forward(&x(1, 4), &x(1, hk), &x(1, hk));
    }
    true
}

#[test]
fn fuzz_kv_spec_grammar() {
    let seeds: Vec<Vec<u8>> = [
        "tq3.5",
        "tq2.5",
        "tq4",
        "tqk4v2-had-pn-c-s1-b4-r4-wq8",
        "tqk3v1.5-had-pn-c-s1-b3-r4-n8v-wq8",
        "tq3-qjl-ks0.5-fc",
        "tq3.5@0-1=q8@7=f16",
        "tq32@3+96@2-had",
        "kivi2-r64",
        "q4h@2=kivi4",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    for s in &seeds {
        assert!(target(s), "{}", String::from_utf8_lossy(s));
    }
    let r = tqkv_fuzz::run("kv_spec", &seeds, target);
    assert!(r.accepted > 0);
}
