//! Peer benchmark: tqkv against the two TurboQuant crates on crates.io, `tq-kv` 0.6 and
//! `turboquant-rs` 0.4, on the same vectors.
//!
//! For N = 4096 Gaussian vectors (seeded, [`tqkv::rng::Rng`]) of d = 128 and d = 64 at 3 and 4
//! bits, each library's closest equivalent of TurboQuant-MSE (rotation + per-coordinate
//! Lloyd–Max codebook + one norm per vector, no QJL) is measured for:
//!
//! 1. MSE: mean over vectors of ‖x − x̂‖² / ‖x‖², x̂ from the library's own dequantize;
//! 2. inner products against 64 Gaussian queries, from the library's own score path (a
//!    dequantize + dot where it has none): signed bias mean(ŝ − s) / mean|s|, the regression
//!    slope Σŝs / Σs² − 1 (the multiplicative bias, which the signed mean cannot see on data
//!    symmetric about 0) and the relative RMS error sqrt(mean (ŝ − s)²) / mean|s|;
//! 3. quantize throughput (all N vectors), vectors/s;
//! 4. score throughput (one query against all N compressed keys, over the 64 queries), keys/s.
//!
//! Times are the best (minimum) of 5 repetitions, single thread. Supplementary rows: tqkv's
//! projected norm rule (unshrunk scores), its least-squares norm rule (the per-vector norm
//! that minimises the error, same bytes), and TurboQuant-prod ((b−1)-bit MSE + 1-bit QJL of
//! the residual) where a library has it.
//! Output: a markdown table on stdout, with the machine, the date and the command.

use std::error::Error;
use std::hint::black_box;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tqkv::cpu_attention::{score_tiles, HeadRecords};
use tqkv::rng::Rng;
use tqkv::simd::Isa;
use tqkv::{BitsSpec, NormRule, QuantSpec, RotationKind, VectorQuantizer};

type Res<T> = Result<T, Box<dyn Error>>;

/// Vectors (keys) per setting.
const N: usize = 4096;
/// Queries for the inner-product metrics and the score throughput.
const QUERIES: usize = 64;
/// Timing repetitions (the minimum is reported).
const REPS: usize = 5;
/// Seed of the vectors.
const DATA_SEED: u64 = 1;
/// Seed of the queries.
const QUERY_SEED: u64 = 2;
/// Seed of every library's rotation.
const QUANT_SEED: u64 = 42;
/// Seed of turboquant-rs's QJL matrix (prod rows).
const QJL_SEED: u64 = 43;
/// Dimensions measured.
const DIMS: [usize; 2] = [128, 64];
/// Bit widths measured.
const BITS: [u8; 2] = [3, 4];

/// The vectors and queries of one dimension, and the exact inner products.
struct Data {
    d: usize,
    /// `[N, d]` row-major.
    xs: Vec<f32>,
    /// `[QUERIES, d]` row-major.
    qs: Vec<f32>,
    /// `[QUERIES, N]`: ⟨q_i, x_j⟩ in f64.
    truth: Vec<f64>,
    /// mean |⟨q, x⟩| over all pairs.
    mean_abs: f64,
}

impl Data {
    fn new(d: usize) -> Self {
        let gaussians = |seed: u64, n: usize| -> Vec<f32> {
            let mut rng = Rng::new(seed);
            (0..n).map(|_| rng.gaussian() as f32).collect()
        };
        let xs = gaussians(DATA_SEED, N * d);
        let qs = gaussians(QUERY_SEED, QUERIES * d);
        let mut truth: Vec<f64> = Vec::with_capacity(QUERIES * N);
        for q in qs.chunks_exact(d) {
            for x in xs.chunks_exact(d) {
                truth.push(q.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum());
            }
        }
        let mean_abs = truth.iter().map(|s| s.abs()).sum::<f64>() / truth.len() as f64;
        Data {
            d,
            xs,
            qs,
            truth,
            mean_abs,
        }
    }

    /// Mean of ‖x − x̂‖² / ‖x‖² over the vectors; `deq` is `[N, d]`.
    fn mse(&self, deq: &[f32]) -> f64 {
        assert_eq!(deq.len(), self.xs.len());
        let d = self.d;
        let total: f64 = self
            .xs
            .chunks_exact(d)
            .zip(deq.chunks_exact(d))
            .map(|(x, xh)| {
                let (mut err, mut nx) = (0.0f64, 0.0f64);
                for (&a, &b) in x.iter().zip(xh) {
                    err += (a as f64 - b as f64).powi(2);
                    nx += (a as f64).powi(2);
                }
                err / nx
            })
            .sum();
        total / N as f64
    }

    /// [`Self::mse`] after rescaling each x̂ by its least-squares factor ⟨x, x̂⟩ / ‖x̂‖² (what
    /// storing the MSE-optimal norm per vector would give; no library does exactly this).
    fn mse_rescaled(&self, deq: &[f32]) -> f64 {
        assert_eq!(deq.len(), self.xs.len());
        let d = self.d;
        let total: f64 = self
            .xs
            .chunks_exact(d)
            .zip(deq.chunks_exact(d))
            .map(|(x, xh)| {
                let (mut xy, mut yy, mut xx) = (0.0f64, 0.0f64, 0.0f64);
                for (&a, &b) in x.iter().zip(xh) {
                    xy += a as f64 * b as f64;
                    yy += (b as f64).powi(2);
                    xx += (a as f64).powi(2);
                }
                // ‖x − αx̂‖² at α = xy / yy.
                (xx - xy * xy / yy) / xx
            })
            .sum();
        total / N as f64
    }

    /// Inner-product statistics of the estimates `est` (`[QUERIES, N]`).
    fn ip(&self, est: &[f32]) -> IpStats {
        assert_eq!(est.len(), self.truth.len());
        let (mut diff, mut sq, mut cross, mut ss) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for (&e, &s) in est.iter().zip(&self.truth) {
            let e = e as f64;
            diff += e - s;
            sq += (e - s).powi(2);
            cross += e * s;
            ss += s * s;
        }
        let m = est.len() as f64;
        IpStats {
            bias: diff / m / self.mean_abs,
            slope: cross / ss - 1.0,
            rms: (sq / m).sqrt() / self.mean_abs,
        }
    }
}

/// Inner-product error, relative to mean |⟨q, x⟩|.
struct IpStats {
    bias: f64,
    slope: f64,
    rms: f64,
}

/// What one library measured in one setting.
struct Measured {
    bytes: f64,
    mse: f64,
    /// MSE after the per-vector least-squares rescale of x̂ ([`Data::mse_rescaled`]).
    mse_ls: f64,
    ip: IpStats,
    /// Vectors quantized per second.
    quantize: f64,
    /// Keys scored per second.
    score: f64,
}

/// One line of the table (`None`: the library cannot do the setting).
struct Row {
    library: &'static str,
    setting: String,
    d: usize,
    bits: u8,
    m: Option<Measured>,
}

/// The best (minimum) wall time of [`REPS`] runs of `f`, in seconds.
fn best_of(mut f: impl FnMut() -> Res<()>) -> Res<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..REPS {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// tqkv: `VectorQuantizer::quantize_batch` (the batch API the cache's append uses: the same
/// records as `quantize` per vector; a dense rotation is a blocked product of four vectors at a
/// time) into one records buffer, `dequantize` per record, scores with
/// `cpu_attention::score_tiles` (the best ISA, one query at a time).
fn tqkv_run(data: &Data, spec: QuantSpec) -> Res<Measured> {
    let d = data.d;
    let q = VectorQuantizer::new(spec, d, QUANT_SEED)?;
    let rb = q.record_bytes();
    let mut recs = vec![0u8; N * rb];
    let t_quant = best_of(|| Ok(q.quantize_batch(&data.xs, &mut recs)?))?;
    // The batch writes what quantize writes vector by vector.
    let mut one = vec![0u8; rb];
    for (x, r) in data.xs.chunks_exact(d).zip(recs.chunks_exact(rb)).take(64) {
        q.quantize(x, &mut one)?;
        if one != r {
            return Err("quantize_batch and quantize disagree".into());
        }
    }
    let mut deq = vec![0.0f32; N * d];
    for (r, out) in recs.chunks_exact(rb).zip(deq.chunks_exact_mut(d)) {
        q.dequantize(r, out)?;
    }
    let kqs = std::slice::from_ref(&q);
    let isa = Isa::detect();
    let mut est = vec![0.0f32; QUERIES * N];
    let t_score = best_of(|| {
        for (qv, out) in data.qs.chunks_exact(d).zip(est.chunks_exact_mut(N)) {
            score_tiles(isa, kqs, qv, HeadRecords::dense(&recs, rb), out)?;
        }
        Ok(())
    })?;
    Ok(Measured {
        bytes: rb as f64,
        mse: data.mse(&deq),
        mse_ls: data.mse_rescaled(&deq),
        ip: data.ip(&est),
        quantize: N as f64 / t_quant,
        score: (QUERIES * N) as f64 / t_score,
    })
}

/// tq-kv: `compress_keys` (the batch V2 API, per-vector sigma, QJL off), `decompress_keys`,
/// scores with `pre_rotate_query_with_signs` + `fused_attention_scores` (AVX2+FMA
/// `fused_dot_product_with_centroids` per key where detected). Also returns the throughput of
/// the per-vector path `compress_single_key_with_signs` (same records).
fn tq_kv_run(data: &Data, bits: u8) -> Res<(Measured, f64)> {
    let d = data.d;
    let cfg = tq_kv::TurboQuantConfig {
        bits,
        rotation_seed: QUANT_SEED,
        ..Default::default()
    };
    let mut ck = tq_kv::compress_keys(&data.xs, d, &cfg);
    let t_quant = best_of(|| {
        ck = tq_kv::compress_keys(black_box(&data.xs), d, &cfg);
        Ok(())
    })?;
    let signs = tq_kv::hadamard::generate_signs(d, QUANT_SEED);
    let mut single = tq_kv::CompressedKeys::new_empty(bits, d, QUANT_SEED);
    let t_single = best_of(|| {
        single = tq_kv::CompressedKeys::new_empty(bits, d, QUANT_SEED);
        for x in data.xs.chunks_exact(d) {
            let (packed, norm) = tq_kv::compress_single_key_with_signs(x, d, &cfg, &signs);
            single.append_raw(&packed, norm);
        }
        Ok(())
    })?;
    if single.packed_indices != ck.packed_indices || single.norms != ck.norms {
        return Err("tq-kv: compress_single_key_with_signs differs from compress_keys".into());
    }
    let deq = tq_kv::decompress_keys(&ck, &cfg);
    let centroids = tq_kv::codebook::get_centroids(bits);
    let mut est = vec![0.0f32; QUERIES * N];
    let t_score = best_of(|| {
        for (qv, out) in data.qs.chunks_exact(d).zip(est.chunks_exact_mut(N)) {
            let rq = tq_kv::pre_rotate_query_with_signs(qv, &signs);
            let s = tq_kv::fused_attention_scores(&rq, &ck, centroids, 1.0);
            out.copy_from_slice(&s);
        }
        Ok(())
    })?;
    let m = Measured {
        bytes: ck.memory_bytes() as f64 / N as f64,
        mse: data.mse(&deq),
        mse_ls: data.mse_rescaled(&deq),
        ip: data.ip(&est),
        quantize: N as f64 / t_quant,
        score: (QUERIES * N) as f64 / t_score,
    };
    Ok((m, N as f64 / t_single))
}

/// turboquant-rs, MSE ("PolarQuant") path: `quantize_vec_with_codebook` per vector (codebook
/// and sign pattern fetched once), `dequantize_vec_with_codebook`; it has no MSE-mode score
/// function, so scores are `dequantize_vec_with_codebook` + dot.
fn turboquant_mse_run(data: &Data, bits: u8) -> Res<Measured> {
    use turboquant::codebook::get_codebook;
    use turboquant::rotation::generate_sign_pattern;
    use turboquant::{dequantize_vec_with_codebook, quantize_vec_with_codebook, PackedBlock};
    let d = data.d;
    let cfg = turboquant::TurboQuantConfig::new(bits, d)?.with_seed(QUANT_SEED);
    let cb = get_codebook(bits, d)?;
    let signs = generate_sign_pattern(d, QUANT_SEED);
    let mut blocks: Vec<PackedBlock> = Vec::new();
    let t_quant = best_of(|| {
        blocks = data
            .xs
            .chunks_exact(d)
            .map(|x| quantize_vec_with_codebook(&cfg, x, &cb, &signs))
            .collect::<turboquant::Result<_>>()?;
        Ok(())
    })?;
    let mut deq = Vec::with_capacity(N * d);
    for b in &blocks {
        deq.extend(dequantize_vec_with_codebook(&cfg, b, &cb, &signs)?);
    }
    let mut est = vec![0.0f32; QUERIES * N];
    let t_score = best_of(|| {
        for (qv, out) in data.qs.chunks_exact(d).zip(est.chunks_exact_mut(N)) {
            for (b, o) in blocks.iter().zip(out.iter_mut()) {
                *o = dot(qv, &dequantize_vec_with_codebook(&cfg, b, &cb, &signs)?);
            }
        }
        Ok(())
    })?;
    Ok(Measured {
        bytes: blocks[0].size_bytes() as f64,
        mse: data.mse(&deq),
        mse_ls: data.mse_rescaled(&deq),
        ip: data.ip(&est),
        quantize: N as f64 / t_quant,
        score: (QUERIES * N) as f64 / t_score,
    })
}

/// turboquant-rs, prod path (`bits` = total budget: (b−1)-bit PolarQuant + 1-bit QJL):
/// `quantize_with_qjl_resources`, scores with `precompute_query_projections` +
/// `estimate_inner_product_with_codebook` (what `QuantizedKVCache::attention_scores` runs);
/// x̂ is the MSE stage only (what its `dequantize_all_keys` returns).
fn turboquant_prod_run(data: &Data, bits: u8) -> Res<Measured> {
    use turboquant::quantize::DequantScratch;
    use turboquant::{
        dequantize_vec_with_codebook, estimate_inner_product_with_codebook,
        precompute_query_projections, quantize_with_qjl_resources, EstimationContext,
        QjlBatchResources, QjlBlock,
    };
    let d = data.d;
    let cfg = turboquant::TurboQuantConfig::new(bits, d)?.with_seed(QUANT_SEED);
    let mut res = QjlBatchResources::new(&cfg)?;
    let mut blocks: Vec<QjlBlock> = Vec::new();
    let t_quant = best_of(|| {
        blocks = data
            .xs
            .chunks_exact(d)
            .map(|x| quantize_with_qjl_resources(x, QJL_SEED, &mut res))
            .collect::<turboquant::Result<_>>()?;
        Ok(())
    })?;
    let mut deq = Vec::with_capacity(N * d);
    for b in &blocks {
        deq.extend(dequantize_vec_with_codebook(
            &res.polar_config,
            &b.polar_block,
            &res.polar_codebook,
            &res.polar_sign_pattern,
        )?);
    }
    let mut est = vec![0.0f32; QUERIES * N];
    let t_score = best_of(|| {
        let mut ctx = EstimationContext {
            polar_config: &res.polar_config,
            codebook: &res.polar_codebook,
            sign_pattern: &res.polar_sign_pattern,
            dim: d,
            scratch: DequantScratch::new(d),
        };
        for (qv, out) in data.qs.chunks_exact(d).zip(est.chunks_exact_mut(N)) {
            let rq = precompute_query_projections(qv, d, QJL_SEED);
            for (b, o) in blocks.iter().zip(out.iter_mut()) {
                *o = estimate_inner_product_with_codebook(qv, &rq, b, &mut ctx)?;
            }
        }
        Ok(())
    })?;
    let b0 = &blocks[0];
    Ok(Measured {
        // PackedBlock (f16 scale + codes) + sign bits + the f16 residual norm.
        bytes: (b0.polar_block.size_bytes() + b0.qjl_signs.len() + 2) as f64,
        mse: data.mse(&deq),
        mse_ls: data.mse_rescaled(&deq),
        ip: data.ip(&est),
        quantize: N as f64 / t_quant,
        score: (QUERIES * N) as f64 / t_score,
    })
}

/// `model name` of /proc/cpuinfo.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// UTC date and time, `YYYY-MM-DD HH:MM:SS UTC` (civil-from-days, H. Hinnant).
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|t| t.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn fmt_row(r: &Row) -> String {
    let head = format!("| {} | {} | {} | {} ", r.library, r.setting, r.d, r.bits);
    match &r.m {
        None => format!("{head}| n/a | n/a | n/a | n/a | n/a | n/a | n/a |"),
        Some(m) => format!(
            "{head}| {:.1} | {:.5} | {:+.4} | {:+.4} | {:.4} | {:.3} M | {:.2} M |",
            m.bytes,
            m.mse,
            m.ip.bias,
            m.ip.slope,
            m.ip.rms,
            m.quantize / 1e6,
            m.score / 1e6
        ),
    }
}

fn main() -> Res<()> {
    let argv: Vec<String> = std::env::args().collect();
    let rayon = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("# tqkv peer benchmark\n");
    println!(
        "- machine: {} ({} logical CPUs), tqkv ISA: {}",
        cpu_model(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        Isa::detect().name()
    );
    println!("- date: {}", utc_now());
    println!(
        "- command: `RAYON_NUM_THREADS={rayon} {}` (run by `cargo run --release` in \
         benches/peers)",
        argv.join(" ")
    );
    println!(
        "- load average at start: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "- N = {N} Gaussian vectors (seed {DATA_SEED}), {QUERIES} Gaussian queries (seed \
         {QUERY_SEED}), rotation seed {QUANT_SEED}; times: best of {REPS}, one thread\n"
    );
    println!(
        "| library | setting | d | bits | bytes/vector | MSE | IP bias | IP slope−1 | IP rel. \
         RMS error | quantize vectors/s | score keys/s |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut notes = Vec::new();
    let mut rows = Vec::new();
    let mut emit = |r: Row| {
        println!("{}", fmt_row(&r));
        rows.push(r);
    };
    for d in DIMS {
        let data = Data::new(d);
        for bits in BITS {
            let row = |library, setting: &str, m| Row {
                library,
                setting: setting.to_string(),
                d,
                bits,
                m,
            };
            let spec = QuantSpec::mse(BitsSpec::Uniform(bits));
            emit(row(
                "tqkv",
                "mse, hadamard",
                Some(tqkv_run(&data, spec.with_rotation(RotationKind::Hadamard))?),
            ));
            emit(row("tqkv", "mse, dense", Some(tqkv_run(&data, spec)?)));
            emit(row(
                "tqkv",
                "mse, hadamard, projected norm",
                Some(tqkv_run(
                    &data,
                    spec.with_rotation(RotationKind::Hadamard)
                        .with_norm_rule(NormRule::Projected),
                )?),
            ));
            emit(row(
                "tqkv",
                "mse, hadamard, least-squares norm",
                Some(tqkv_run(
                    &data,
                    spec.with_rotation(RotationKind::Hadamard)
                        .with_norm_rule(NormRule::LeastSquares),
                )?),
            ));
            emit(row(
                "tqkv",
                "mse, dense, least-squares norm",
                Some(tqkv_run(
                    &data,
                    spec.with_norm_rule(NormRule::LeastSquares),
                )?),
            ));
            let (m, single) = tq_kv_run(&data, bits)?;
            notes.push(format!(
                "tq-kv d={d} b={bits}: per-vector compress_single_key_with_signs {:.3} M \
                 vectors/s (batch compress_keys {:.3} M)",
                single / 1e6,
                m.quantize / 1e6
            ));
            emit(row("tq-kv", "mse (compress_keys), hadamard", Some(m)));
            emit(row(
                "turboquant-rs",
                "mse (quantize_vec), hadamard",
                Some(turboquant_mse_run(&data, bits)?),
            ));
        }
    }
    for d in DIMS {
        let data = Data::new(d);
        for bits in BITS {
            let row = |library, m| Row {
                library,
                setting: "prod: (b−1)-bit mse + 1-bit QJL".into(),
                d,
                bits,
                m,
            };
            let spec =
                QuantSpec::prod(BitsSpec::Uniform(bits)).with_rotation(RotationKind::Hadamard);
            emit(row("tqkv", Some(tqkv_run(&data, spec)?)));
            emit(row("tq-kv", None));
            emit(row(
                "turboquant-rs",
                Some(turboquant_prod_run(&data, bits)?),
            ));
        }
    }
    println!();
    for n in notes {
        println!("- {n}");
    }
    println!(
        "\nMSE rows again, with the MSE after rescaling each x̂ by its least-squares factor \
         ⟨x, x̂⟩/‖x̂‖² (the per-vector norm that minimises the error; no library stores it):\n"
    );
    println!("| library | setting | d | bits | MSE | MSE, LS-rescaled |");
    println!("|---|---|---:|---:|---:|---:|");
    for r in rows.iter().filter(|r| r.setting.starts_with("mse")) {
        if let Some(m) = &r.m {
            println!(
                "| {} | {} | {} | {} | {:.5} | {:.5} |",
                r.library, r.setting, r.d, r.bits, m.mse, m.mse_ls
            );
        }
    }
    Ok(())
}
