//! The `tqkv` binary.
//!
//! * `tqkv distortion` — TurboQuant §5.1's distortion experiment on random unit vectors.
//! * `tqkv chat` — chat with a model whose KV cache is quantized (the model runner lands with
//!   issue 4; until then the command says so and exits with status 2).

mod distortion;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tqkv",
    version,
    about = "TurboQuant + QJL KV-cache quantization"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Quantize random unit vectors and report MSE and inner-product error against theory.
    Distortion(distortion::Args),
    /// Chat with a model whose KV cache is quantized (default: SmolLM2-135M-Instruct).
    Chat {
        /// Hugging Face repo id, local directory or .gguf file.
        #[arg(long)]
        model: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Distortion(args) => distortion::run(args),
        Command::Chat { model } => {
            let model = model.unwrap_or_else(|| "HuggingFaceTB/SmolLM2-135M-Instruct".into());
            eprintln!(
                "tqkv chat: the model runner is not built yet (issue 4: Llama-style runner and \
                 `tqkv chat`), so {model} cannot be loaded. What works today: \
                 `tqkv distortion --dim 128 --bits 1,2,3,4 --mode mse,prod`."
            );
            std::process::exit(2);
        }
    }
}
