//! `tqkv distortion`: the distortion experiment of TurboQuant §5.1 as a command
//! (see `tqkv::distortion` for what each number means and the theory it is compared with).

use anyhow::{Context, Result};
use serde_json::json;
use tqkv::distortion::DistortionRow;
use tqkv::{BitsSpec, Mode, NormFormat, QuantSpec, RotationKind};

#[derive(clap::Args)]
pub struct Args {
    /// Vector dimension d (≥ 16).
    #[arg(long, default_value_t = 128)]
    dim: usize,
    /// Comma-separated bit settings: 1..8, x.5 (half the channels at x+0.5, half at x−0.5),
    /// paper2.5 (a quarter at 3 + the rest at 2), or K@B+J@C.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4")]
    bits: Vec<String>,
    /// Comma-separated modes: mse, prod (Gaussian QJL sketch), prod-orth (orthogonal sketch).
    #[arg(long, value_delimiter = ',', default_value = "mse")]
    mode: Vec<String>,
    /// Rotation: dense (Haar) or hadamard.
    #[arg(long, default_value = "dense")]
    rotation: String,
    /// QJL sign bits m for prod mode (default: d; only with integer bits).
    #[arg(long)]
    sketch_dim: Option<usize>,
    /// Norm storage: f16 or f32.
    #[arg(long, default_value = "f16")]
    norm: String,
    /// Number of random vectors (and of random queries).
    #[arg(long, default_value_t = 100_000)]
    samples: usize,
    /// Seed of the rotations, sketches and vectors.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Multiply each vector by a log-uniform factor in [1/16, 256]: the reported numbers are
    /// relative, so only the rounding of stored norms can change them (f16 vs f32 norms).
    #[arg(long)]
    scale_norms: bool,
    /// Print one JSON document instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let rotation: RotationKind = a.rotation.parse()?;
    let norm: NormFormat = a.norm.parse()?;
    if a.samples < 2 {
        anyhow::bail!("--samples must be at least 2 (got {})", a.samples);
    }
    let mut rows: Vec<(String, &'static str, DistortionRow)> = Vec::new();
    for mode_name in &a.mode {
        let mut mode: Mode = mode_name.parse()?;
        let sketch = match &mut mode {
            Mode::Mse => "none",
            Mode::Prod {
                sketch_dim,
                orthogonal,
            } => {
                *sketch_dim = a.sketch_dim;
                if *orthogonal {
                    "orthogonal"
                } else {
                    "gaussian"
                }
            }
        };
        for bits_text in &a.bits {
            let bits: BitsSpec = bits_text.parse()?;
            let spec = QuantSpec {
                mode,
                ..QuantSpec::mse(bits).with_rotation(rotation).with_norm(norm)
            };
            let row = tqkv::distortion::run_scaled(spec, a.dim, a.samples, a.seed, a.scale_norms)
                .with_context(|| {
                format!("bits {bits_text}, mode {mode_name}, dim {}", a.dim)
            })?;
            rows.push((bits_text.clone(), sketch, row));
        }
    }
    if a.json {
        let rows: Vec<_> = rows
            .iter()
            .map(|(bits_text, sketch, r)| {
                let bits = bits_text
                    .parse::<f64>()
                    .map(|b| json!(b))
                    .unwrap_or_else(|_| json!(r.code_bits));
                json!({
                    "bits": bits,
                    "spec": bits_text,
                    "mode": r.mode,
                    "sketch": sketch,
                    "code_bits": r.code_bits,
                    "record_bytes": r.record_bytes,
                    "mse": r.mse,
                    "mse_theory": r.mse_theory,
                    "ip_scale": r.ip_scale,
                    "ip_scale_theory": r.ip_scale_theory,
                    "ip_bias": r.ip_bias,
                    "ip_bias_se": r.ip_bias_se,
                    "ip_var": r.ip_var,
                })
            })
            .collect();
        let doc = json!({
            "dim": a.dim,
            "rotation": rotation.name(),
            "norm": a.norm,
            "samples": a.samples,
            "scale_norms": a.scale_norms,
            "seed": a.seed,
            "rows": rows,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!(
            "dim {}  rotation {}  norms {}  samples {}  seed {}",
            a.dim,
            rotation.name(),
            a.norm,
            a.samples,
            a.seed
        );
        println!(
            "{:<9} {:<5} {:<10} {:>9} {:>6} {:>9} {:>10} {:>6} {:>8} {:>8} {:>20} {:>10}",
            "bits",
            "mode",
            "sketch",
            "code_bits",
            "bytes",
            "mse",
            "mse_theory",
            "ratio",
            "ip_scale",
            "(theory)",
            "ip_bias ± se",
            "ip_var"
        );
        for (bits_text, sketch, r) in &rows {
            println!(
                "{:<9} {:<5} {:<10} {:>9.3} {:>6} {:>9.5} {:>10.5} {:>6.3} {:>8.4} {:>8.4} {:>20} {:>10.3e}",
                bits_text,
                r.mode,
                sketch,
                r.code_bits,
                r.record_bytes,
                r.mse,
                r.mse_theory,
                r.mse / r.mse_theory,
                r.ip_scale,
                r.ip_scale_theory,
                format!("{:+.2e} ± {:.1e}", r.ip_bias, r.ip_bias_se),
                r.ip_var
            );
        }
    }
    Ok(())
}
