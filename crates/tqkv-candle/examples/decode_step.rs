//! Times decode steps of one layer (SmolLM2-135M's shapes) over a cache kind, for profiling:
//! `cargo run --release -p tqkv-candle --example decode_step -- tq3.5 4096 2000`.
use candle_core::{Device, Tensor};
use tqkv_candle::{Attention, CacheConfig};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let kind = args.get(1).map_or("tq3.5", |s| s.as_str());
    let ctx: usize = args.get(2).map_or(Ok(4096), |s| s.parse())?;
    let steps: usize = args.get(3).map_or(Ok(1000), |s| s.parse())?;
    let dev = Device::Cpu;
    let (hq, hk, d) = (9usize, 3usize, 64usize);
    let cfg = CacheConfig::new(kind.parse()?);
    let mut attn = Attention::new(cfg.build(0, hk, d, &dev)?, hq, hk, d)?;
    let k = Tensor::randn(0f32, 1.0, (1, hk, ctx, d), &dev)?;
    attn.cache_mut().append(&k, &k, None)?;
    let q1 = Tensor::randn(0f32, 1.0, (1, hq, 1, d), &dev)?;
    let k1 = Tensor::randn(0f32, 1.0, (1, hk, 1, d), &dev)?;
    let t0 = std::time::Instant::now();
    for _ in 0..steps {
        attn.forward(&q1, &k1, &k1)?;
    }
    let dt = t0.elapsed().as_secs_f64() / steps as f64;
    println!("{kind} ctx {ctx}: {:.1} µs per step", dt * 1e6);
    Ok(())
}
