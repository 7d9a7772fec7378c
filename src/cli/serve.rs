//! `sdxl-worker serve`: runs the HTTP API (see [`crate::api`]) until Ctrl-C or SIGTERM.

use std::process::ExitCode;

use anyhow::Context;

use crate::config::Config;

/// Arguments of `serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (overrides `api.listen`), e.g. `0.0.0.0:8080`.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
}

/// Run `serve`.
pub async fn run(mut config: Config, args: ServeArgs) -> anyhow::Result<ExitCode> {
    if let Some(listen) = args.listen {
        config.api.listen = listen;
    }
    tracing::info!(config = %config.redacted(), "configuration");
    crate::api::run(config, super::worker::shutdown_signal())
        .await
        .context("the HTTP API stopped")?;
    Ok(ExitCode::SUCCESS)
}
