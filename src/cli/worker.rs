//! `sdxl-worker worker`: runs a worker until Ctrl-C or SIGTERM, then stops taking jobs,
//! finishes the ones in flight and exits. SIGHUP reloads `[models]` (see [`super::models`]).

use std::process::ExitCode;

use anyhow::Context;

use std::path::PathBuf;

use super::models::{reload_on_hangup, PidFile};
use crate::config::{Config, LiveModels};
use crate::worker::{self, RunOptions};

/// Arguments of `worker`.
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// Run only the intake consumer (validation, status rows, routing), no GPU consumer.
    #[arg(long, conflicts_with = "no_intake")]
    pub intake_only: bool,
    /// Run only the GPU consumers, no intake consumer.
    #[arg(long)]
    pub no_intake: bool,
}

/// Run `worker`; `file` is the configuration file it was started with, read again on SIGHUP.
pub async fn run(
    config: Config,
    file: Option<PathBuf>,
    args: WorkerArgs,
) -> anyhow::Result<ExitCode> {
    tracing::info!(config = %config.redacted(), "configuration");
    let options = RunOptions {
        intake: !args.no_intake,
        consumers: !args.intake_only,
    };
    let _pid_file = match &config.worker.pid_file {
        Some(path) => Some(PidFile::create(path)?),
        None => None,
    };
    let models = LiveModels::new(config.models.clone());
    let reloads = tokio::spawn(reload_on_hangup(file, config.clone(), models.clone()));
    let result = worker::run_live(config, options, models, shutdown_signal()).await;
    reloads.abort();
    result.context("the worker stopped")?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = interrupt => tracing::info!("interrupted"),
        () = terminate => tracing::info!("terminated"),
    }
}
