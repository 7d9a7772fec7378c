//! The command line: `generate`, `migrate`, `worker`, `submit`, `status` and `demo`.
//! Each command lives in its own file; this module parses arguments and dispatches.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod generate;

/// sdxl-worker: SDXL image generation on ONNX Runtime, fed by RabbitMQ, tracked in Postgres.
#[derive(Debug, Parser)]
#[command(name = "sdxl-worker", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate images locally from an ONNX SDXL model (no broker or database needed).
    Generate(generate::GenerateArgs),
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
