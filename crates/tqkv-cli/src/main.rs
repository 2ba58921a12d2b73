//! The `tqkv` binary.
//!
//! * `tqkv distortion` — TurboQuant §5.1's distortion experiment on random unit vectors.
//! * `tqkv chat` — chat with a model whose KV cache is quantized (default: SmolLM2-135M-Instruct
//!   with a 3.5-bit TurboQuant cache).
//! * `tqkv generate` — raw completion of a prompt.
//! * `tqkv bench attention` — decode and prefill-chunk attention per cache kind against f16.
//! * `tqkv serve` — an OpenAI-compatible server (continuous batching, a KV memory budget).
//! * `tqkv bench serve` — a load test of the server per cache kind at the same KV memory.

mod bench;
mod bench_serve;
mod chat;
mod distortion;
mod eval;
mod serve;

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
    /// Chat with a model whose KV cache is quantized (default: SmolLM2-135M-Instruct, tq3.5).
    Chat {
        #[command(flatten)]
        model: chat::ModelArgs,
        #[command(flatten)]
        sample: chat::SampleArgs,
        /// One message, answered without the interactive loop.
        #[arg(long)]
        prompt: Option<String>,
        /// A system message opening the conversation.
        #[arg(long)]
        system: Option<String>,
    },
    /// Raw completion of a prompt (no chat template).
    Generate {
        #[command(flatten)]
        model: chat::ModelArgs,
        #[command(flatten)]
        sample: chat::SampleArgs,
        /// The text to continue.
        #[arg(long)]
        prompt: String,
    },
    /// An OpenAI-compatible server (`/v1/chat/completions`, `/v1/completions`, `/metrics`).
    Serve(serve::ServeArgs),
    /// Benchmarks (on a GPU: `tqkv bench attention --device cuda`).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Quality of KV caches on a model (`tqkv eval kld --kv q8,tq3.5,tq2.5`).
    #[command(subcommand)]
    Eval(EvalCommand),
}

#[derive(Subcommand)]
enum EvalCommand {
    /// KL divergence, perplexity and top-1 agreement of each cache against an f16 cache.
    Kld(eval::Args),
    /// Needle retrieval: a secret number hidden in filler text, asked for, per cache kind.
    Needle(eval::NeedleArgs),
    /// Greedy answers to short factual questions per cache kind, against f16's.
    Qa(eval::QaArgs),
    /// Each layer's share of a kind's KL divergence, and a per-layer allocation from it.
    Layers(eval::LayersArgs),
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum BenchCommand {
    /// Decode and prefill-chunk attention over a filled cache, per kind, vs the f16 cache.
    Attention(bench::Args),
    /// A load test of `tqkv serve` on 127.0.0.1 per cache kind at the same --kv-memory.
    Serve(bench_serve::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Distortion(args) => distortion::run(args),
        Command::Chat {
            model,
            sample,
            prompt,
            system,
        } => chat::run_chat(model, sample, prompt, system),
        Command::Generate {
            model,
            sample,
            prompt,
        } => chat::run_generate(model, sample, prompt),
        Command::Bench(BenchCommand::Attention(args)) => bench::run(args),
        Command::Bench(BenchCommand::Serve(args)) => bench_serve::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Eval(EvalCommand::Kld(args)) => eval::run(args),
        Command::Eval(EvalCommand::Needle(args)) => eval::run_needle(args),
        Command::Eval(EvalCommand::Qa(args)) => eval::run_qa(args),
        Command::Eval(EvalCommand::Layers(args)) => eval::run_layers(args),
    }
}
