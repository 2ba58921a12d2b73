//! `tqkv bench attention`: decode attention (one query token per sequence) and prefill-chunk
//! attention over a filled cache, per cache kind, batch and context, on any candle device —
//! with the f16 cache as the baseline in the same run, and the device's copy bandwidth measured
//! in the same run so that the packed cache's bytes/s can be read as a fraction of it.
//! Absolute times mean something only on a GPU (docs/KERNELS.md).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::time::Instant;
use tqkv_candle::{CacheConfig, CacheKind, KvCache, PrefillPath, TurboCache};

#[derive(clap::Args)]
pub struct Args {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Cache kinds, comma-separated (f16 first: it is the baseline of the ratios).
    #[arg(
        long,
        default_value = "f16,tq3.5-paper,tq3.5,tq2.5",
        value_delimiter = ','
    )]
    kv: Vec<String>,
    /// Context lengths, comma-separated (ascending; the cache is filled progressively).
    #[arg(
        long,
        default_value = "4096,16384,32768,65536,131072",
        value_delimiter = ','
    )]
    contexts: Vec<usize>,
    /// Batch sizes, comma-separated.
    #[arg(long, default_value = "1,16", value_delimiter = ',')]
    batch: Vec<usize>,
    /// Query heads (Llama-3.1-8B: 32).
    #[arg(long, default_value_t = 32)]
    q_heads: usize,
    /// KV heads (Llama-3.1-8B: 8).
    #[arg(long, default_value_t = 8)]
    kv_heads: usize,
    /// Head dimension.
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    /// Timed repetitions per point (after 3 warm-ups).
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Query tokens of the prefill-chunk timing (0: skip it). Timed at batch 1 only.
    #[arg(long, default_value_t = 512)]
    prefill_chunk: usize,
    /// Split kernels of the CUDA attention to time for TurboQuant kinds, comma-separated
    /// (`split`: the verified CUDA-core kernel; `tc`: the tensor-core one). A kind whose layout
    /// the tensor-core kernel does not take runs the split kernel and is labelled so.
    #[arg(long, default_value = "split,tc", value_delimiter = ',')]
    kernels: Vec<tqkv::AttentionKernel>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(serde::Serialize)]
struct Point {
    kind: String,
    op: String,
    batch: usize,
    context: usize,
    ms: f64,
    cache_bytes: usize,
    gbps: f64,
    frac_copy: f64,
}

fn sync(dev: &Device) -> Result<()> {
    dev.synchronize()?;
    Ok(())
}

fn time(dev: &Device, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    sync(dev)?;
    let t0 = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    sync(dev)?;
    Ok(t0.elapsed().as_secs_f64() * 1e3 / iters as f64)
}

/// The cache kind of a label (`tq3.5 [tc]` → `tq3.5`).
fn kind_of(label: &str) -> &str {
    label.split(" [").next().unwrap_or(label)
}

/// Device copy bandwidth in GB/s, bytes read + written, over a 1 GiB f16 buffer.
fn copy_bandwidth(dev: &Device) -> Result<f64> {
    let n = 512 * 1024 * 1024;
    let a = Tensor::zeros(n, DType::F16, dev)?;
    let ms = time(dev, 10, || {
        let _b = a.copy()?;
        Ok(())
    })?;
    Ok(2.0 * (n * 2) as f64 / (ms * 1e-3) / 1e9)
}

fn build(
    kind: &str,
    hk: usize,
    d: usize,
    dev: &Device,
    path: PrefillPath,
    kernel: tqkv::AttentionKernel,
) -> Result<Box<dyn KvCache>> {
    let k: CacheKind = kind.parse()?;
    Ok(match k {
        CacheKind::Turbo(spec) => {
            let mut c = TurboCache::new(spec, hk, d, dev, 0x7e57, None)?;
            c.set_prefill_path(path);
            c.set_attention_kernel(kernel);
            Box::new(c)
        }
        other => CacheConfig::new(other).build(0, hk, d, dev)?,
    })
}

/// The (label, kernel) pairs to time for `kind`: every requested kernel for TurboQuant kinds
/// on CUDA (labelled `kind [tc]` for the tensor-core one), one run otherwise.
fn variants(
    kind: &str,
    kernels: &[tqkv::AttentionKernel],
    dev: &Device,
) -> Vec<(String, tqkv::AttentionKernel)> {
    if !kind.starts_with("tq") || !dev.is_cuda() || kernels.is_empty() {
        return vec![(kind.to_string(), tqkv::AttentionKernel::Split)];
    }
    kernels
        .iter()
        .map(|&k| match k {
            tqkv::AttentionKernel::Split => (kind.to_string(), k),
            other => (format!("{kind} [{other}]"), k),
        })
        .collect()
}

fn fill(c: &mut dyn KvCache, to: usize, b: usize, hk: usize, d: usize, dev: &Device) -> Result<()> {
    let have = c.seq_lens().first().copied().unwrap_or(0);
    let mut left = to.saturating_sub(have);
    let step = (1 << 22) / (b * hk).max(1);
    while left > 0 {
        let n = left.min(step).max(1);
        let k = Tensor::randn(0f32, 1f32, (b, hk, n, d), dev)?.to_dtype(DType::F16)?;
        let v = Tensor::randn(0f32, 1f32, (b, hk, n, d), dev)?.to_dtype(DType::F16)?;
        c.append(&k, &v, None)?;
        left -= n;
    }
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    let dev = crate::chat::parse_device(&args.device)?;
    let (hq, hk, d) = (args.q_heads, args.kv_heads, args.head_dim);
    if hk == 0 || hq == 0 || hq % hk != 0 {
        bail!("--q-heads {hq} must be a positive multiple of --kv-heads {hk}");
    }
    if args.iters == 0 || args.batch.contains(&0) {
        bail!("--iters and every --batch must be at least 1");
    }
    let bw = copy_bandwidth(&dev).context("measuring copy bandwidth")?;
    eprintln!("device copy bandwidth (read + write): {bw:.0} GB/s");
    let scale = 1.0 / (d as f64).sqrt();
    let mut points = Vec::new();
    let mut contexts = args.contexts.clone();
    contexts.sort_unstable();
    if contexts.first() == Some(&0) {
        bail!("--contexts must be at least 1 token");
    }
    for &b in &args.batch {
        for kind in &args.kv {
            for (label, kernel) in variants(kind, &args.kernels, &dev) {
                let kind = &label;
                let mut c = build(kind_of(kind), hk, d, &dev, PrefillPath::Dequantize, kernel)?;
                for &ctx in &contexts {
                    fill(c.as_mut(), ctx - 1, b, hk, d, &dev)?;
                    let one =
                        Tensor::randn(0f32, 1f32, (b, hk, 1, d), &dev)?.to_dtype(DType::F16)?;
                    c.append(&one, &one, None)?;
                    let q = Tensor::randn(0f32, 1f32, (b, hq, 1, d), &dev)?.to_dtype(DType::F16)?;
                    let ms = time(&dev, args.iters, || {
                        c.attend(&q, scale)?;
                        Ok(())
                    })?;
                    let bytes = c.memory().logical;
                    let gbps = bytes as f64 / (ms * 1e-3) / 1e9;
                    eprintln!("{kind:>8} decode b={b:<3} ctx={ctx:<7} {ms:9.4} ms  {:8.1} MiB  {gbps:7.0} GB/s ({:.0}% of copy)",
                    bytes as f64 / (1 << 20) as f64, 100.0 * gbps / bw);
                    points.push(Point {
                        kind: kind.clone(),
                        op: "decode".into(),
                        batch: b,
                        context: ctx,
                        ms,
                        cache_bytes: bytes,
                        gbps,
                        frac_copy: gbps / bw,
                    });
                }
                drop(c);
                sync(&dev)?;
            }
        }
    }
    if args.prefill_chunk > 0 {
        let t = args.prefill_chunk;
        for kind0 in &args.kv {
            for (label, kernel) in variants(kind0, &args.kernels, &dev) {
                let kind = &label;
                // The dequantize path uses no attention kernel: time it once per kind.
                let paths: &[PrefillPath] = if !kind0.starts_with("tq") {
                    &[PrefillPath::Dequantize]
                } else if kernel == tqkv::AttentionKernel::Split {
                    &[PrefillPath::Dequantize, PrefillPath::Fused]
                } else {
                    &[PrefillPath::Fused]
                };
                for &path in paths {
                    let mut c = build(kind0, hk, d, &dev, path, kernel)?;
                    // Contexts that hold the chunk and a past (a shorter one is skipped).
                    for &ctx in contexts.iter().filter(|&&c| c > t) {
                        fill(c.as_mut(), ctx - t, 1, hk, d, &dev)?;
                        let k =
                            Tensor::randn(0f32, 1f32, (1, hk, t, d), &dev)?.to_dtype(DType::F16)?;
                        c.append(&k, &k, None)?;
                        let q =
                            Tensor::randn(0f32, 1f32, (1, hq, t, d), &dev)?.to_dtype(DType::F16)?;
                        let iters = (args.iters / 4).max(2);
                        let ms = time(&dev, iters, || {
                            c.attend(&q, scale)?;
                            Ok(())
                        })?;
                        let bytes = c.memory().logical;
                        let op = match path {
                            _ if !kind.starts_with("tq") => "prefill".to_string(),
                            PrefillPath::Dequantize => "prefill-dequantize".into(),
                            PrefillPath::Fused => "prefill-fused".into(),
                        };
                        eprintln!("{kind:>8} {op} chunk {t} ctx={ctx:<7} {ms:9.3} ms");
                        points.push(Point {
                            kind: kind.clone(),
                            op,
                            batch: 1,
                            context: ctx,
                            ms,
                            cache_bytes: bytes,
                            gbps: bytes as f64 / (ms * 1e-3) / 1e9,
                            frac_copy: bytes as f64 / (ms * 1e-3) / 1e9 / bw,
                        });
                    }
                    drop(c);
                    sync(&dev)?;
                }
            }
        }
    }
    // Table: per (op, batch, context), ms per kind and the speed-up over the first kind.
    let base = args.kv.first().cloned().unwrap_or_default();
    println!("copy bandwidth (read + write): {bw:.0} GB/s\n");
    println!("| op | batch | context | kind | ms | cache MiB | GB/s | % of copy | × vs {base} |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for p in &points {
        let b0 = points
            .iter()
            .find(|o| {
                o.kind == base
                    && o.batch == p.batch
                    && o.context == p.context
                    && (o.op == p.op || (o.op == "prefill" && p.op.starts_with("prefill")))
            })
            .map(|o| o.ms);
        println!(
            "| {} | {} | {} | {} | {:.4} | {:.1} | {:.0} | {:.0}% | {} |",
            p.op,
            p.batch,
            p.context,
            p.kind,
            p.ms,
            p.cache_bytes as f64 / (1 << 20) as f64,
            p.gbps,
            100.0 * p.frac_copy,
            b0.map_or("-".into(), |m| format!("{:.2}", m / p.ms))
        );
    }
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "device": format!("{:?}", dev.location()),
            "copy_gbps": bw,
            "q_heads": hq, "kv_heads": hk, "head_dim": d,
            "points": points,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
