//! `sdxl-worker serve`: runs the HTTP API (see [`crate::api`]) until Ctrl-C or SIGTERM;
//! SIGHUP reloads `[models]` (see [`super::models`]).

use std::process::ExitCode;

use anyhow::Context;

use std::path::PathBuf;

use crate::config::{Config, LiveModels};

/// Arguments of `serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (overrides `api.listen`), e.g. `0.0.0.0:8080`.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
}

/// Run `serve`.
pub async fn run(
    mut config: Config,
    file: Option<PathBuf>,
    args: ServeArgs,
) -> anyhow::Result<ExitCode> {
    if let Some(listen) = args.listen {
        config.api.listen = listen;
    }
    tracing::info!(config = %config.redacted(), "configuration");
    let models = LiveModels::new(config.models.clone());
    let reloads = tokio::spawn(super::models::reload_on_hangup(
        file,
        config.clone(),
        models.clone(),
    ));
    let result = crate::api::run_live(config, models, super::worker::shutdown_signal()).await;
    reloads.abort();
    result.context("the HTTP API stopped")?;
    Ok(ExitCode::SUCCESS)
}
