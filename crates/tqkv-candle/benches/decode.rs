//! One decode step of attention on the CPU (append one token, attend), per cache kind, at
//! SmolLM2-135M's shapes (9 query heads, 3 KV heads, head_dim 64; one layer) and 1K / 4K /
//! 16K context, batch 1. f16 is the baseline of the same run; `scripts/bench-decode-cpu.sh` writes
//! the ratios to docs/BENCH_DECODE_CPU.md.

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use tqkv_candle::{Attention, CacheConfig};

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let (hq, hk, d) = (9usize, 3usize, 64usize);
    for ctx in [1024usize, 4096, 16384] {
        let mut g = c.benchmark_group(format!("decode_ctx{ctx}"));
        for kind in ["f16", "f32", "q8", "q4h", "kivi4", "tq4", "tq3.5", "tq2.5"] {
            let cfg = CacheConfig::new(kind.parse().unwrap());
            let mut attn = Attention::new(cfg.build(0, hk, d, &dev).unwrap(), hq, hk, d).unwrap();
            // The context is appended without attention (a 16K prefill through attention
            // would take minutes for the kinds without a fast prefill path).
            let k = Tensor::randn(0f32, 1.0, (1, hk, ctx, d), &dev).unwrap();
            attn.cache_mut().append(&k, &k, None).unwrap();
            let q1 = Tensor::randn(0f32, 1.0, (1, hq, 1, d), &dev)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let k1 = Tensor::randn(0f32, 1.0, (1, hk, 1, d), &dev).unwrap();
            g.bench_function(BenchmarkId::from_parameter(kind), |b| {
                b.iter(|| {
                    // Keep the context fixed: reset to ctx tokens is too slow, so grow slowly;
                    // 2 000 iterations add < 50 % to 4K and are part of what is timed.
                    attn.forward(&q1, &k1, &k1).unwrap()
                })
            });
        }
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(std::time::Duration::from_secs(2)).warm_up_time(std::time::Duration::from_millis(300));
    targets = bench
}
criterion_main!(benches);
