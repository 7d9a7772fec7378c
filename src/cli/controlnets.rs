//! `controlnets`: print the ControlNet types this build knows and, for each, whether the
//! configuration gives it a ControlNet model and how `preprocess: true` is served.

use std::process::ExitCode;

use crate::config::{controlnet_capabilities, Config};

/// Run `controlnets`: one JSON array on stdout.
pub async fn run(config: Config) -> anyhow::Result<ExitCode> {
    let capabilities = controlnet_capabilities(&config.controlnet);
    println!("{}", serde_json::to_string_pretty(&capabilities)?);
    Ok(ExitCode::SUCCESS)
}
