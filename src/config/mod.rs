//! Layered configuration: embedded defaults, then a TOML file, then environment variables.
//!
//! Every setting has a dotted key (`broker.url`), one environment variable (`SDXL_BROKER_URL`)
//! and a default that runs the local demo on a fresh machine; [`KEYS`] lists them all and
//! `config/example.toml` documents each one. The file comes from `--config FILE`, else from
//! `SDXL_CONFIG`, else `config/sdxl-worker.toml` when that file exists.
//!
//! Errors name the key and where its value came from (the file and line, or the variable).
//! Secrets (passwords inside URLs) never appear in [`Config::redacted`] or in `Debug` output.

mod check;
pub mod controlnet;
mod keys;
pub mod live;
mod load;
mod redact;
mod types;

use std::path::Path;

pub use keys::{KeySpec, KEYS};
pub use live::LiveModels;
pub use load::{ConfigError, Origin};
pub use redact::redact_url;
pub use types::{
    device_label, ApiConfig, ApiToken, BrokerConfig, DatabaseConfig, DevicesSetting, LogConfig,
    LogFormat, ModelEntry, ModelsConfig, StorageConfig, WorkerConfig, FALLBACK_SIDE,
};

/// Size, step and payload limits applied to every job message (see [`crate::job`]).
pub use types::Limits;

pub use controlnet::{
    capabilities as controlnet_capabilities, ControlNetCapability, ControlNetConfig,
};

/// Default path of the configuration file, relative to the working directory.
pub const DEFAULT_CONFIG_FILE: &str = "config/sdxl-worker.toml";

/// Environment variable naming the configuration file.
pub const CONFIG_FILE_ENV: &str = "SDXL_CONFIG";

/// The whole configuration of one process.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Config {
    pub broker: BrokerConfig,
    pub database: DatabaseConfig,
    pub storage: StorageConfig,
    pub worker: WorkerConfig,
    pub models: ModelsConfig,
    pub limits: Limits,
    pub controlnet: ControlNetConfig,
    /// Settings of the CUDA execution provider (GPU consumers only).
    pub cuda: crate::engine::cuda::CudaOptions,
    pub log: LogConfig,
    pub api: ApiConfig,
}

impl Config {
    /// Load defaults, then `file` (or `SDXL_CONFIG`, or `config/sdxl-worker.toml` if present),
    /// then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Config::load_from(file, &|name| std::env::var(name).ok())
    }

    /// Like [`Config::load`], reading environment variables through `env` instead of the
    /// process environment (so callers and tests can supply their own).
    pub fn load_from(
        file: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        load::load(file, env)
    }

    /// The configuration as JSON with secrets masked, for logs and diagnostics.
    pub fn redacted(&self) -> serde_json::Value {
        redact::redacted_config(self)
    }
}

impl Default for Config {
    /// The embedded defaults (no file, no environment), with the default model's relative
    /// path resolved against the working directory or, failing that, the crate directory.
    fn default() -> Self {
        load::defaults_resolved()
    }
}
