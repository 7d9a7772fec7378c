//! The command line: `generate`, `migrate`, `worker`, `serve`, `submit`, `status`, `demo` and
//! `controlnets`, `models`.
//! Each command lives in its own file; this module parses arguments, sets up logging and
//! dispatches. Commands print results on stdout and logs on stderr.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::{Config, LogConfig, LogFormat};

pub mod controlnets;
pub mod demo;
pub mod generate;
pub mod migrate;
pub mod models;
pub mod progress;
pub mod serve;
pub mod status;
pub mod submit;
pub mod worker;

/// Exit code of `status` for an unknown job id.
pub const EXIT_NOT_FOUND: u8 = 2;

/// sdxl-worker: SDXL image generation on ONNX Runtime, fed by RabbitMQ, tracked in Postgres.
#[derive(Debug, Parser)]
#[command(name = "sdxl-worker", version, about)]
pub struct Cli {
    /// Configuration file (TOML). Without it: `SDXL_CONFIG`, then `config/sdxl-worker.toml`
    /// when present; environment variables (`SDXL_*`) override either.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate images locally from an ONNX SDXL model (no broker or database needed).
    Generate(generate::GenerateArgs),
    /// Create or upgrade the database tables.
    Migrate,
    /// Run a worker: the intake consumer and one consumer per configured device.
    Worker(worker::WorkerArgs),
    /// Run the HTTP API (jobs, estimates, capabilities, metrics, status page).
    Serve(serve::ServeArgs),
    /// Publish a job message to the broker and print its id.
    Submit(submit::SubmitArgs),
    /// Print the status row of a job as JSON.
    Status(status::StatusArgs),
    /// Run one job end to end on the CPU with the bundled tiny model.
    Demo(demo::DemoArgs),
    /// Print the ControlNet types, which have a model configured and how each is preprocessed.
    Controlnets,
    /// Manage the models of running processes (`models reload`).
    Models(models::ModelsArgs),
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let file = cli.config;
    let result = match cli.command {
        Command::Generate(args) => generate::run(args).map(|()| ExitCode::SUCCESS),
        Command::Migrate => service(file, migrate::run),
        Command::Worker(args) => {
            let reload_from = file.clone();
            service(file, |config| worker::run(config, reload_from, args))
        }
        Command::Serve(args) => {
            let reload_from = file.clone();
            service(file, |config| serve::run(config, reload_from, args))
        }
        Command::Models(args) => service(file, |config| models::run(config, args)),
        Command::Submit(args) => service(file, |config| submit::run(config, args)),
        Command::Status(args) => service(file, |config| status::run(config, args)),
        Command::Demo(args) => service(file, |config| demo::run(config, args)),
        Command::Controlnets => service(file, controlnets::run),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Loads the configuration, sets up logging and runs `command` on a Tokio runtime.
fn service<F, Fut>(config_file: Option<PathBuf>, command: F) -> anyhow::Result<ExitCode>
where
    F: FnOnce(Config) -> Fut,
    Fut: Future<Output = anyhow::Result<ExitCode>>,
{
    let config = Config::load(config_file.as_deref()).context("loading the configuration")?;
    init_logging(&config.log)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(command(config))
}

/// Noisy dependencies kept at `warn` unless the filter names them: ONNX Runtime logs each of
/// its options at `info`, and Postgres notices about idempotent DDL are not news.
const QUIET_TARGETS: [&str; 2] = ["ort", "sqlx::postgres::notice"];

/// Logs to stderr, filtered by `RUST_LOG` when set, else by `log.level`; `log.format` picks
/// human-readable text or one JSON object per line.
pub fn init_logging(log: &LogConfig) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let directives = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => directives,
        _ => log.level.clone(),
    };
    let filter = EnvFilter::try_new(with_quiet_targets(&directives))
        .with_context(|| format!("invalid log filter {directives:?}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // Already installed (an embedding program did it): keep theirs.
    drop(installed);
    Ok(())
}

/// `directives` plus `target=warn` for every quiet target it does not mention.
fn with_quiet_targets(directives: &str) -> String {
    let named = |target: &str| {
        directives.split(',').any(|directive| {
            let name = directive.split('=').next().unwrap_or_default().trim();
            name == target || name.starts_with(&format!("{target}::"))
        })
    };
    let mut filter = directives.trim().to_owned();
    for target in QUIET_TARGETS {
        if !named(target) {
            if !filter.is_empty() {
                filter.push(',');
            }
            filter.push_str(target);
            filter.push_str("=warn");
        }
    }
    filter
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noisy_dependencies_are_quiet_unless_named() {
        assert_eq!(
            with_quiet_targets("info"),
            "info,ort=warn,sqlx::postgres::notice=warn"
        );
        assert_eq!(
            with_quiet_targets("debug,ort=info"),
            "debug,ort=info,sqlx::postgres::notice=warn"
        );
        assert_eq!(
            with_quiet_targets(""),
            "ort=warn,sqlx::postgres::notice=warn"
        );
        assert_eq!(
            with_quiet_targets("sdxl_worker::report=debug,sqlx=info"),
            "sdxl_worker::report=debug,sqlx=info,ort=warn,sqlx::postgres::notice=warn"
        );
    }
}
