//! The typed configuration sections and their embedded defaults.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

use crate::config::redact::redact_url;
use crate::engine::{Device, SchedulerKind};

/// RabbitMQ connection and topology settings.
#[derive(Clone, PartialEq, Serialize)]
pub struct BrokerConfig {
    /// AMQP URL; the password inside it is a secret.
    pub url: String,
    /// Prefix of every exchange and queue name (`{prefix}.jobs`, `{prefix}.work.high`, ...).
    pub prefix: String,
    /// `x-delivery-limit` of the work queues: deliveries before a message is dead-lettered.
    pub delivery_limit: u32,
    /// Prefetch of the intake consumer.
    pub intake_prefetch: u16,
    /// First delay before reconnecting after the connection is lost, doubled up to the maximum.
    pub reconnect_delay_ms: u64,
    /// Largest delay between reconnection attempts.
    pub reconnect_max_delay_ms: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
            prefix: "sdxl".to_owned(),
            delivery_limit: 5,
            intake_prefetch: 16,
            reconnect_delay_ms: 500,
            reconnect_max_delay_ms: 30_000,
        }
    }
}

impl fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerConfig")
            .field("url", &redact_url(&self.url))
            .field("prefix", &self.prefix)
            .field("delivery_limit", &self.delivery_limit)
            .field("intake_prefetch", &self.intake_prefetch)
            .field("reconnect_delay_ms", &self.reconnect_delay_ms)
            .field("reconnect_max_delay_ms", &self.reconnect_max_delay_ms)
            .finish()
    }
}

/// Postgres settings.
#[derive(Clone, PartialEq, Serialize)]
pub struct DatabaseConfig {
    /// Postgres URL; the password inside it is a secret.
    pub url: String,
    /// Schema holding the tables; created if absent and used as `search_path`.
    pub schema: String,
    /// Size of the connection pool.
    pub max_connections: u32,
    /// How long to wait for a pooled connection (and for the first connection) before failing.
    pub acquire_timeout_ms: u64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "postgres://postgres@127.0.0.1:5432/postgres".to_owned(),
            schema: "public".to_owned(),
            max_connections: 8,
            acquire_timeout_ms: 10_000,
        }
    }
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &redact_url(&self.url))
            .field("schema", &self.schema)
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout_ms", &self.acquire_timeout_ms)
            .finish()
    }
}

/// Where images are written. S3 credentials are not part of the configuration: they come from
/// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "backend", rename_all = "snake_case")]
pub enum StorageConfig {
    /// A directory on the local file system (created if absent).
    Local { path: PathBuf, prefix: String },
    /// An S3-compatible bucket (AWS S3, MinIO, Garage, Ceph, R2, ...).
    S3 {
        /// Endpoint URL for non-AWS servers; `None` uses AWS for `region`.
        endpoint: Option<String>,
        region: String,
        bucket: String,
        prefix: String,
        /// Allow plain `http://` endpoints (local servers).
        allow_http: bool,
        /// Path-style requests (`endpoint/bucket/key`) instead of virtual-hosted style.
        path_style: bool,
    },
}

impl StorageConfig {
    /// The key prefix of this backend.
    pub fn prefix(&self) -> &str {
        match self {
            StorageConfig::Local { prefix, .. } | StorageConfig::S3 { prefix, .. } => prefix,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig::Local {
            path: PathBuf::from("out"),
            prefix: String::new(),
        }
    }
}

/// Which devices a worker process runs GPU consumers on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DevicesSetting {
    /// Every CUDA GPU that is visible, or the CPU when there is none.
    Auto,
    /// Exactly these devices, one consumer each.
    List(Vec<Device>),
}

impl DevicesSetting {
    /// Parse `auto` or a comma-separated list of `cpu` / `cuda:N` (`cuda` means `cuda:0`).
    pub fn parse(text: &str) -> Result<DevicesSetting, String> {
        let trimmed = text.trim();
        if trimmed.eq_ignore_ascii_case("auto") {
            return Ok(DevicesSetting::Auto);
        }
        let items: Vec<&str> = trimmed.split(',').map(str::trim).collect();
        DevicesSetting::from_items(&items)
    }

    /// Parse a list of `cpu` / `cuda:N` labels.
    pub fn from_items(items: &[&str]) -> Result<DevicesSetting, String> {
        let mut devices = Vec::with_capacity(items.len());
        for item in items {
            let device = parse_device(item)?;
            if devices.contains(&device) {
                return Err(format!("device {item:?} is listed twice"));
            }
            devices.push(device);
        }
        if devices.is_empty() {
            return Err("expected \"auto\" or at least one device".to_owned());
        }
        Ok(DevicesSetting::List(devices))
    }
}

/// The label of a device as written in configuration and in job rows (`cpu`, `cuda:0`).
pub fn device_label(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".to_owned(),
        Device::Cuda { index } => format!("cuda:{index}"),
    }
}

fn parse_device(item: &str) -> Result<Device, String> {
    let lower = item.trim().to_ascii_lowercase();
    if lower == "cpu" {
        return Ok(Device::Cpu);
    }
    if lower == "cuda" {
        return Ok(Device::Cuda { index: 0 });
    }
    if let Some(index) = lower.strip_prefix("cuda:") {
        if let Ok(index) = index.parse::<u32>() {
            return Ok(Device::Cuda { index });
        }
    }
    Err(format!(
        "unknown device {item:?}: expected \"cpu\", \"cuda\" or \"cuda:N\""
    ))
}

impl Serialize for DevicesSetting {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            DevicesSetting::Auto => serializer.serialize_str("auto"),
            DevicesSetting::List(devices) => {
                let labels: Vec<String> = devices.iter().map(|d| device_label(*d)).collect();
                labels.serialize(serializer)
            }
        }
    }
}

/// Settings of the GPU consumers of one process.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerConfig {
    /// Name recorded in job rows; `None` lets the process derive one (host name and pid).
    pub id: Option<String>,
    pub devices: DevicesSetting,
    /// Jobs a GPU consumer holds at once (claimed but unfinished).
    pub prefetch: u32,
    /// Most jobs one consumer denoises together in one UNet batch (dynamic batching); 1 runs
    /// every job alone. Batches form from the jobs a consumer holds, so `prefetch` must be at
    /// least this (twice this lets the next batch gather while the last one is stored).
    pub max_batch: u32,
    /// How long a batch waits for jobs that are being claimed when it starts, at most.
    pub batch_window_ms: u64,
    /// ONNX Runtime intra-op threads of each CPU consumer; 0 (auto) gives one CPU consumer
    /// ONNX Runtime's default (one per core) and several an equal share of the cores.
    pub cpu_threads: u32,
    /// Attempts before a job that keeps failing with retryable errors is marked failed.
    pub max_attempts: u32,
    /// Least time between two progress updates of a job row.
    pub progress_interval_ms: u64,
    /// Pause between polls of the work queues when both are empty.
    pub poll_interval_ms: u64,
    /// Longest a single job may run before it is failed with `timeout`: the upper bound of
    /// every job's timeout.
    pub job_timeout_ms: u64,
    /// Least timeout of a job whose timeout comes from its cost estimate.
    pub job_timeout_min_ms: u64,
    /// Time allowed per megapixel-step of a job (width x height x steps x images / 10^6) on top
    /// of `job_timeout_min_ms`; 0 gives every job `job_timeout_ms`.
    pub job_timeout_per_megapixel_step_ms: u64,
    /// On shutdown, how long running jobs may take to finish before they are returned.
    pub shutdown_grace_ms: u64,
    /// Time between two heartbeats (the worker's row in the `workers` table).
    pub heartbeat_interval_ms: u64,
    /// Memory each consumer may fill with loaded models, in MiB (estimated from the models'
    /// graph and weight files); least recently used models are evicted beyond it. 0 keeps one
    /// model at a time.
    pub model_cache_mb: u64,
    /// Serve identical requests from the stored images of an earlier job unless the job says
    /// `"cache": false`.
    pub result_cache: bool,
    /// A `running` job whose worker has not written a heartbeat for this long (or stopped)
    /// is recovered: queued again, or failed with `worker_lost` after its last attempt.
    pub lease_ms: u64,
    /// Time between two sweeps for such jobs (every worker sweeps; one at a time does).
    pub lease_sweep_interval_ms: u64,
    /// File the worker writes its process id to while it runs (`None`: no file), for
    /// `sdxl-worker models reload`.
    pub pid_file: Option<PathBuf>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            id: None,
            devices: DevicesSetting::List(vec![Device::Cpu]),
            prefetch: 1,
            max_batch: 1,
            batch_window_ms: 50,
            cpu_threads: 0,
            max_attempts: 3,
            progress_interval_ms: 500,
            poll_interval_ms: 200,
            job_timeout_ms: 600_000,
            job_timeout_min_ms: 120_000,
            job_timeout_per_megapixel_step_ms: 2_000,
            shutdown_grace_ms: 30_000,
            heartbeat_interval_ms: 5_000,
            model_cache_mb: 0,
            result_cache: false,
            lease_ms: 60_000,
            lease_sweep_interval_ms: 15_000,
            pid_file: None,
        }
    }
}

/// One model a deployment can run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelEntry {
    /// Name used in job messages.
    pub name: String,
    /// Directory in the Optimum ONNX layout (absolute once loaded).
    pub path: PathBuf,
    /// Width used when a job gives none; `None` means 1024.
    pub default_width: Option<u32>,
    /// Height used when a job gives none; `None` means 1024.
    pub default_height: Option<u32>,
    /// The SDXL refiner that jobs asking for `refiner` hand over to (a directory in the Optimum
    /// ONNX layout, absolute once loaded); `None`: the model has no refiner.
    pub refiner: Option<PathBuf>,
}

/// Image side used when neither the job nor the model gives one.
pub const FALLBACK_SIDE: u32 = 1024;

impl ModelEntry {
    /// The (width, height) a job gets when it gives none.
    pub fn default_size(&self) -> (u32, u32) {
        (
            self.default_width.unwrap_or(FALLBACK_SIDE),
            self.default_height.unwrap_or(FALLBACK_SIDE),
        )
    }
}

/// The models of a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelsConfig {
    /// Model used by jobs that name none.
    pub default: String,
    /// Every model jobs may name, sorted by name.
    pub models: Vec<ModelEntry>,
}

impl ModelsConfig {
    /// The entry called `name`.
    pub fn get(&self, name: &str) -> Option<&ModelEntry> {
        self.models.iter().find(|m| m.name == name)
    }

    /// The model used by jobs that name none.
    pub fn default_entry(&self) -> Option<&ModelEntry> {
        self.get(&self.default)
    }

    /// Names of all models, in order.
    pub fn names(&self) -> Vec<&str> {
        self.models.iter().map(|m| m.name.as_str()).collect()
    }
}

impl Default for ModelsConfig {
    /// `tiny-sdxl` at `tests/fixtures/tiny-sdxl` (relative; resolved when configuration
    /// loads), whose natural size is 64x64 (UNet sample size 16, VAE factor 4), with the tiny
    /// refiner at `tests/fixtures/tiny-refiner`.
    fn default() -> Self {
        ModelsConfig {
            default: "tiny-sdxl".to_owned(),
            models: vec![ModelEntry {
                name: "tiny-sdxl".to_owned(),
                path: PathBuf::from("tests/fixtures/tiny-sdxl"),
                default_width: Some(64),
                default_height: Some(64),
                refiner: Some(PathBuf::from("tests/fixtures/tiny-refiner")),
            }],
        }
    }
}

/// Limits every job message must respect (see [`crate::job::parse_and_validate`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Limits {
    /// Smallest width or height in pixels (a multiple of 8).
    pub min_side: u32,
    /// Largest width or height in pixels (a multiple of 8).
    pub max_side: u32,
    /// Largest width × height.
    pub max_pixels: u64,
    pub min_steps: u32,
    pub max_steps: u32,
    pub min_guidance_scale: f32,
    pub max_guidance_scale: f32,
    /// Largest `num_images` of one job.
    pub max_images: u32,
    /// Longest prompt (each of the four prompt fields), in Unicode characters.
    pub max_prompt_chars: usize,
    /// Largest job message, in bytes.
    pub max_message_bytes: usize,
    /// Largest `metadata` object, in bytes of compact JSON.
    pub max_metadata_bytes: usize,
    /// Schedulers jobs may ask for.
    pub schedulers: Vec<SchedulerKind>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            min_side: 64,
            max_side: 2048,
            max_pixels: 2048 * 2048,
            min_steps: 1,
            max_steps: 150,
            min_guidance_scale: 0.0,
            max_guidance_scale: 30.0,
            max_images: 8,
            max_prompt_chars: 2000,
            max_message_bytes: 64 * 1024,
            max_metadata_bytes: 8 * 1024,
            schedulers: SchedulerKind::ALL.to_vec(),
        }
    }
}

/// Output format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

/// Logging settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogConfig {
    /// A `tracing` filter directive (`info`, `sdxl_worker=debug,lapin=warn`, ...).
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

/// One bearer token of the HTTP API: the name recorded as the owner of the jobs it creates,
/// and the secret clients send (`Authorization: Bearer SECRET`).
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken {
    pub name: String,
    pub secret: String,
}

impl ApiToken {
    /// Parse `name:secret`.
    pub fn parse(text: &str) -> Result<ApiToken, String> {
        let (name, secret) = text
            .split_once(':')
            .ok_or_else(|| "expected \"name:secret\"".to_owned())?;
        let name = name.trim();
        let name_ok = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !name_ok {
            return Err(
                "a token name is non-empty ASCII letters, digits, '_', '-' or '.'".to_owned(),
            );
        }
        if secret.len() < 8 {
            return Err(format!(
                "the secret of token {name:?} is shorter than 8 characters"
            ));
        }
        Ok(ApiToken {
            name: name.to_owned(),
            secret: secret.to_owned(),
        })
    }
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, crate::config::redact::MASK)
    }
}

impl Serialize for ApiToken {
    /// Only the name and a mask: the secret never leaves the process.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("{}:{}", self.name, crate::config::redact::MASK))
    }
}

/// Settings of the HTTP API (`sdxl-worker serve`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApiConfig {
    /// Address and port to listen on.
    pub listen: String,
    /// Bearer tokens; empty turns authentication off.
    pub tokens: Vec<ApiToken>,
    /// Largest request body, in bytes.
    pub body_limit_bytes: usize,
    /// Whether `/` serves the live status page.
    pub status_page: bool,
    /// Lifetime of presigned image URLs (S3 storage).
    pub url_ttl_secs: u64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: "127.0.0.1:8080".to_owned(),
            tokens: Vec::new(),
            body_limit_bytes: 262_144,
            status_page: true,
            url_ttl_secs: 3600,
        }
    }
}
