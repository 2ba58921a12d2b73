//! CPU throughput of the reference quantizer: quantize, dequantize and score (from codes),
//! in vectors/s, at d = 64 and 128, next to the f16 baseline (convert to f16 / back / dot with an
//! f16 key) in the same run.
//!
//! Run: `scripts/bench-cpu.sh` (criterion output in target/criterion, table in docs/BENCH_CPU.md).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use std::hint::black_box;
use tqkv::cpu_attention::HeadRecords;
use tqkv::rng::Rng;
use tqkv::simd::Isa;
use tqkv::{BitsSpec, OutlierRule, QuantSpec, RotationKind, VectorQuantizer};

const N: usize = 256;
/// Keys per query of the kernel's scoring bench.
const CTX: usize = 4096;

fn setups() -> Vec<(String, VectorQuantizer)> {
    let mut v = Vec::new();
    for d in [64usize, 128] {
        for (name, spec) in [
            ("mse4", QuantSpec::mse(BitsSpec::Uniform(4))),
            (
                "tq3.5",
                QuantSpec::mse("3.5".parse().unwrap()).with_outliers(OutlierRule::Fixed),
            ),
            ("prod3", QuantSpec::prod(BitsSpec::Uniform(3))),
            (
                "mse4-hadamard",
                QuantSpec::mse(BitsSpec::Uniform(4)).with_rotation(RotationKind::Hadamard),
            ),
        ] {
            v.push((
                format!("{name}/d{d}"),
                VectorQuantizer::new(spec, d, 1).unwrap(),
            ));
        }
    }
    v
}

/// One criterion group `op` with one benchmark `name` over N vectors.
fn run(c: &mut Criterion, op: &str, name: &str, mut f: impl FnMut()) {
    let mut g = c.benchmark_group(op);
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function(BenchmarkId::from_parameter(name), |b| b.iter(&mut f));
    g.finish();
}

fn baseline_f16(c: &mut Criterion) {
    for d in [64usize, 128] {
        let name = format!("f16/d{d}");
        let mut rng = Rng::new(7);
        let xs: Vec<f32> = (0..N * d).map(|_| rng.gaussian() as f32).collect();
        let hs: Vec<f16> = xs.iter().map(|&v| f16::from_f32(v)).collect();
        let mut out16 = vec![f16::ZERO; d];
        run(c, "quantize", &name, || {
            for x in xs.chunks_exact(d) {
                for (o, &v) in out16.iter_mut().zip(black_box(x)) {
                    *o = f16::from_f32(v);
                }
                black_box(&out16);
            }
        });
        let mut out = vec![0.0f32; d];
        run(c, "dequantize", &name, || {
            for h in hs.chunks_exact(d) {
                for (o, &v) in out.iter_mut().zip(black_box(h)) {
                    *o = v.to_f32();
                }
                black_box(&out);
            }
        });
        let q = &xs[..d];
        run(c, "score", &name, || {
            let mut s = 0.0f32;
            for h in hs.chunks_exact(d) {
                s += black_box(h)
                    .iter()
                    .zip(q)
                    .map(|(&k, &q)| k.to_f32() * q)
                    .sum::<f32>();
            }
            black_box(s);
        });
    }
}

fn bench(c: &mut Criterion) {
    for (name, q) in setups() {
        let d = q.dim();
        let mut rng = Rng::new(7);
        let xs: Vec<f32> = (0..N * d).map(|_| rng.gaussian() as f32).collect();
        let rb = q.record_bytes();
        let mut recs = vec![0u8; N * rb];
        for (x, r) in xs.chunks_exact(d).zip(recs.chunks_exact_mut(rb)) {
            q.quantize(x, r).unwrap();
        }
        let query = q.prepare_query(&xs[..d]).unwrap();
        let mut rec = vec![0u8; rb];
        run(c, "quantize", &name, || {
            for x in xs.chunks_exact(d) {
                q.quantize(black_box(x), &mut rec).unwrap();
            }
        });
        // The batch API the cache's append uses (the same records; a dense rotation as a
        // blocked product of four vectors at a time).
        let mut batch = vec![0u8; N * rb];
        q.quantize_batch(&xs, &mut batch).unwrap();
        assert_eq!(batch, recs, "{name}: quantize_batch wrote other records");
        run(c, "quantize-batch", &name, || {
            q.quantize_batch(black_box(&xs), &mut batch).unwrap();
        });
        let mut out = vec![0.0f32; d];
        run(c, "dequantize", &name, || {
            for r in recs.chunks_exact(rb) {
                q.dequantize(black_box(r), &mut out).unwrap();
            }
        });
        run(c, "score", &name, || {
            let mut s = 0.0f32;
            for r in recs.chunks_exact(rb) {
                s += q.score(&query, black_box(r)).unwrap();
            }
            black_box(s);
        });
        // The kernel path: one query against a context of CTX keys at once, from the codes.
        let ys: Vec<f32> = (0..CTX * d).map(|_| rng.gaussian() as f32).collect();
        let mut keys = vec![0u8; CTX * rb];
        for (x, r) in ys.chunks_exact(d).zip(keys.chunks_exact_mut(rb)) {
            q.quantize(x, r).unwrap();
        }
        let mut scores = vec![0.0f32; CTX];
        let qs = std::slice::from_ref(&q);
        let mut g = c.benchmark_group("score-kernel");
        g.throughput(Throughput::Elements(CTX as u64));
        g.bench_function(BenchmarkId::from_parameter(&name), |b| {
            b.iter(|| {
                tqkv::cpu_attention::score_tiles(
                    Isa::detect(),
                    qs,
                    black_box(&xs[..d]),
                    HeadRecords::dense(&keys, rb),
                    &mut scores,
                )
                .unwrap();
                black_box(&scores);
            })
        });
        g.finish();
    }
}
criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(2)).warm_up_time(std::time::Duration::from_millis(500));
    targets = baseline_f16, bench
}
criterion_main!(benches);
