//! The table of configuration keys: dotted name, environment variable, description, and how a
//! value from a file or the environment is applied to the settings.

use std::path::PathBuf;

use crate::config::controlnet::ControlNetConfig;
use crate::config::load::Input;
use crate::config::types::{
    ApiConfig, ApiToken, BrokerConfig, DatabaseConfig, DevicesSetting, Limits, LogConfig,
    LogFormat, ModelsConfig, WorkerConfig,
};
use crate::engine::controlnet::ControlType;
use crate::engine::cuda::CudaOptions;
use crate::engine::SchedulerKind;

/// One configuration key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySpec {
    /// Dotted name: the TOML section and key (`storage.s3.bucket`).
    pub name: &'static str,
    /// The environment variable that overrides it.
    pub env: &'static str,
    /// What it does.
    pub doc: &'static str,
}

const fn key(name: &'static str, env: &'static str, doc: &'static str) -> KeySpec {
    KeySpec { name, env, doc }
}

/// Every configuration key, in the order of `config/example.toml`.
pub const KEYS: &[KeySpec] = &[
    key("broker.url", "SDXL_BROKER_URL", "AMQP URL of RabbitMQ"),
    key(
        "broker.prefix",
        "SDXL_BROKER_PREFIX",
        "prefix of exchange and queue names",
    ),
    key(
        "broker.delivery_limit",
        "SDXL_BROKER_DELIVERY_LIMIT",
        "deliveries before a work message is dead-lettered",
    ),
    key(
        "broker.intake_prefetch",
        "SDXL_BROKER_INTAKE_PREFETCH",
        "prefetch of the intake consumer",
    ),
    key(
        "broker.reconnect_delay_ms",
        "SDXL_BROKER_RECONNECT_DELAY_MS",
        "first reconnection delay",
    ),
    key(
        "broker.reconnect_max_delay_ms",
        "SDXL_BROKER_RECONNECT_MAX_DELAY_MS",
        "largest reconnection delay",
    ),
    key("database.url", "SDXL_DATABASE_URL", "Postgres URL"),
    key(
        "database.schema",
        "SDXL_DATABASE_SCHEMA",
        "schema of the tables (created if absent)",
    ),
    key(
        "database.max_connections",
        "SDXL_DATABASE_MAX_CONNECTIONS",
        "connection pool size",
    ),
    key(
        "database.acquire_timeout_ms",
        "SDXL_DATABASE_ACQUIRE_TIMEOUT_MS",
        "wait for a connection",
    ),
    key(
        "storage.backend",
        "SDXL_STORAGE_BACKEND",
        "\"local\" or \"s3\"",
    ),
    key(
        "storage.prefix",
        "SDXL_STORAGE_PREFIX",
        "prefix of every object key",
    ),
    key(
        "storage.path",
        "SDXL_STORAGE_PATH",
        "directory of the local backend",
    ),
    key(
        "storage.s3.endpoint",
        "SDXL_S3_ENDPOINT",
        "endpoint URL of a non-AWS server (empty: AWS)",
    ),
    key("storage.s3.region", "SDXL_S3_REGION", "region"),
    key(
        "storage.s3.bucket",
        "SDXL_S3_BUCKET",
        "bucket (required for the s3 backend)",
    ),
    key(
        "storage.s3.allow_http",
        "SDXL_S3_ALLOW_HTTP",
        "allow http:// endpoints",
    ),
    key(
        "storage.s3.path_style",
        "SDXL_S3_PATH_STYLE",
        "path-style requests instead of virtual-hosted",
    ),
    key(
        "worker.id",
        "SDXL_WORKER_ID",
        "name recorded in job rows (empty: host name and pid)",
    ),
    key(
        "worker.devices",
        "SDXL_WORKER_DEVICES",
        "\"auto\" or a list of \"cpu\" / \"cuda:N\"",
    ),
    key(
        "worker.model_cache_mb",
        "SDXL_WORKER_MODEL_CACHE_MB",
        "MiB of models a consumer keeps loaded (0: one model)",
    ),
    key(
        "worker.pid_file",
        "SDXL_WORKER_PID_FILE",
        "file holding the worker's pid while it runs, for `models reload` (empty: none)",
    ),
    key(
        "worker.result_cache",
        "SDXL_WORKER_RESULT_CACHE",
        "reuse the images of identical earlier requests",
    ),
    key(
        "worker.prefetch",
        "SDXL_WORKER_PREFETCH",
        "jobs a GPU consumer holds at once",
    ),
    key(
        "worker.max_batch",
        "SDXL_WORKER_MAX_BATCH",
        "most jobs denoised together in one batch",
    ),
    key(
        "worker.batch_window_ms",
        "SDXL_WORKER_BATCH_WINDOW_MS",
        "longest wait for jobs joining a batch",
    ),
    key(
        "worker.cpu_threads",
        "SDXL_WORKER_CPU_THREADS",
        "ONNX Runtime threads of a CPU consumer (0: auto)",
    ),
    key(
        "worker.max_attempts",
        "SDXL_WORKER_MAX_ATTEMPTS",
        "attempts before a job is failed",
    ),
    key(
        "worker.progress_interval_ms",
        "SDXL_WORKER_PROGRESS_INTERVAL_MS",
        "least time between progress updates",
    ),
    key(
        "worker.poll_interval_ms",
        "SDXL_WORKER_POLL_INTERVAL_MS",
        "pause between polls of empty work queues",
    ),
    key(
        "worker.job_timeout_ms",
        "SDXL_WORKER_JOB_TIMEOUT_MS",
        "longest run of one job",
    ),
    key(
        "worker.job_timeout_min_ms",
        "SDXL_WORKER_JOB_TIMEOUT_MIN_MS",
        "least timeout of a job (cost-estimated timeouts)",
    ),
    key(
        "worker.job_timeout_per_megapixel_step_ms",
        "SDXL_WORKER_JOB_TIMEOUT_PER_MEGAPIXEL_STEP_MS",
        "time per megapixel-step of a job's cost estimate (0: job_timeout_ms for all)",
    ),
    key(
        "worker.shutdown_grace_ms",
        "SDXL_WORKER_SHUTDOWN_GRACE_MS",
        "time running jobs get to finish on shutdown",
    ),
    key(
        "worker.heartbeat_interval_ms",
        "SDXL_WORKER_HEARTBEAT_INTERVAL_MS",
        "time between heartbeats",
    ),
    key(
        "worker.lease_ms",
        "SDXL_WORKER_LEASE_MS",
        "heartbeat age after which a worker's running jobs are recovered",
    ),
    key(
        "worker.lease_sweep_interval_ms",
        "SDXL_WORKER_LEASE_SWEEP_INTERVAL_MS",
        "time between sweeps for jobs of lost workers",
    ),
    key(
        "models.default",
        "SDXL_MODELS_DEFAULT",
        "model of jobs that name none",
    ),
    key(
        "models.available",
        "SDXL_MODELS_AVAILABLE",
        "models by name (env: \"name=path,name=path\")",
    ),
    key(
        "limits.min_side",
        "SDXL_LIMITS_MIN_SIDE",
        "smallest width or height",
    ),
    key(
        "limits.max_side",
        "SDXL_LIMITS_MAX_SIDE",
        "largest width or height",
    ),
    key(
        "limits.max_pixels",
        "SDXL_LIMITS_MAX_PIXELS",
        "largest width x height",
    ),
    key("limits.min_steps", "SDXL_LIMITS_MIN_STEPS", "fewest steps"),
    key("limits.max_steps", "SDXL_LIMITS_MAX_STEPS", "most steps"),
    key(
        "limits.min_guidance_scale",
        "SDXL_LIMITS_MIN_GUIDANCE_SCALE",
        "smallest guidance_scale",
    ),
    key(
        "limits.max_guidance_scale",
        "SDXL_LIMITS_MAX_GUIDANCE_SCALE",
        "largest guidance_scale",
    ),
    key(
        "limits.max_images",
        "SDXL_LIMITS_MAX_IMAGES",
        "most images per job",
    ),
    key(
        "limits.max_prompt_chars",
        "SDXL_LIMITS_MAX_PROMPT_CHARS",
        "longest prompt in characters",
    ),
    key(
        "limits.max_message_bytes",
        "SDXL_LIMITS_MAX_MESSAGE_BYTES",
        "largest job message",
    ),
    key(
        "limits.max_metadata_bytes",
        "SDXL_LIMITS_MAX_METADATA_BYTES",
        "largest metadata object",
    ),
    key(
        "limits.schedulers",
        "SDXL_LIMITS_SCHEDULERS",
        "schedulers jobs may use",
    ),
    key(
        "controlnet.canny",
        "SDXL_CONTROLNET_CANNY",
        "canny ControlNet export directory",
    ),
    key(
        "controlnet.depth",
        "SDXL_CONTROLNET_DEPTH",
        "depth ControlNet export directory",
    ),
    key(
        "controlnet.openpose",
        "SDXL_CONTROLNET_OPENPOSE",
        "OpenPose ControlNet export directory",
    ),
    key(
        "controlnet.depth_preprocessor",
        "SDXL_CONTROLNET_DEPTH_PREPROCESSOR",
        "ONNX depth estimator directory",
    ),
    key(
        "controlnet.openpose_preprocessor",
        "SDXL_CONTROLNET_OPENPOSE_PREPROCESSOR",
        "ONNX pose renderer directory",
    ),
    key(
        "controlnet.allow_image_urls",
        "SDXL_CONTROLNET_ALLOW_IMAGE_URLS",
        "accept https control image URLs",
    ),
    key(
        "controlnet.max_image_bytes",
        "SDXL_CONTROLNET_MAX_IMAGE_BYTES",
        "largest control image file",
    ),
    key(
        "controlnet.max_image_pixels",
        "SDXL_CONTROLNET_MAX_IMAGE_PIXELS",
        "largest decoded control image",
    ),
    key(
        "controlnet.max_units",
        "SDXL_CONTROLNET_MAX_UNITS",
        "most ControlNets per job",
    ),
    key(
        "controlnet.fetch_timeout_ms",
        "SDXL_CONTROLNET_FETCH_TIMEOUT_MS",
        "time allowed to fetch a control image",
    ),
    key(
        "cuda.conv_algo_search",
        "SDXL_CUDA_CONV_ALGO_SEARCH",
        "cuDNN convolution search: exhaustive, heuristic or default",
    ),
    key(
        "cuda.conv_max_workspace",
        "SDXL_CUDA_CONV_MAX_WORKSPACE",
        "let cuDNN take the workspace its fastest algorithms want",
    ),
    key(
        "cuda.arena_same_as_requested",
        "SDXL_CUDA_ARENA_SAME_AS_REQUESTED",
        "grow the memory arena by what is requested, not powers of two",
    ),
    key(
        "cuda.prefer_nhwc",
        "SDXL_CUDA_PREFER_NHWC",
        "prefer NHWC layouts for convolutions",
    ),
    key(
        "cuda.attention",
        "SDXL_CUDA_ATTENTION",
        "attention kernel: auto, flash, efficient, cudnn_flash or math",
    ),
    key(
        "cuda.io_binding",
        "SDXL_CUDA_IO_BINDING",
        "keep the UNet's inputs and outputs in device memory",
    ),
    key(
        "cuda.graph",
        "SDXL_CUDA_GRAPH",
        "capture the UNet in CUDA graphs (one static session per shape)",
    ),
    key(
        "cuda.graph_shapes",
        "SDXL_CUDA_GRAPH_SHAPES",
        "most shapes with a CUDA graph per consumer",
    ),
    key(
        "cuda.controlnet_graph",
        "SDXL_CUDA_CONTROLNET_GRAPH",
        "with cuda.graph, capture ControlNets in CUDA graphs too",
    ),
    key(
        "cuda.device_step",
        "SDXL_CUDA_DEVICE_STEP",
        "guidance and the Euler update on the device between UNet steps",
    ),
    key(
        "cuda.tf32",
        "SDXL_CUDA_TF32",
        "TF32 math in float32 graphs (text encoders, VAE)",
    ),
    key("log.level", "SDXL_LOG_LEVEL", "tracing filter directive"),
    key("log.format", "SDXL_LOG_FORMAT", "\"text\" or \"json\""),
    key("api.listen", "SDXL_API_LISTEN", "address of the HTTP API"),
    key(
        "api.tokens",
        "SDXL_API_TOKENS",
        "bearer tokens as name:secret (empty: no authentication)",
    ),
    key(
        "api.body_limit_bytes",
        "SDXL_API_BODY_LIMIT_BYTES",
        "largest request body",
    ),
    key(
        "api.status_page",
        "SDXL_API_STATUS_PAGE",
        "serve the live status page at /",
    ),
    key(
        "api.url_ttl_secs",
        "SDXL_API_URL_TTL_SECS",
        "lifetime of presigned image URLs",
    ),
];

/// The spec of `name`.
pub fn spec(name: &str) -> Option<&'static KeySpec> {
    KEYS.iter().find(|k| k.name == name)
}

/// Storage settings before they become a [`crate::config::StorageConfig`].
#[derive(Debug, Clone)]
pub(crate) struct StorageSettings {
    pub backend: String,
    pub prefix: String,
    pub path: PathBuf,
    pub s3_endpoint: Option<String>,
    pub s3_region: String,
    pub s3_bucket: String,
    pub s3_allow_http: bool,
    pub s3_path_style: bool,
}

impl Default for StorageSettings {
    fn default() -> Self {
        StorageSettings {
            backend: "local".to_owned(),
            prefix: String::new(),
            path: PathBuf::from("out"),
            s3_endpoint: None,
            s3_region: "us-east-1".to_owned(),
            s3_bucket: String::new(),
            s3_allow_http: false,
            s3_path_style: true,
        }
    }
}

/// All settings while layers are applied.
#[derive(Debug, Clone, Default)]
pub(crate) struct Settings {
    pub broker: BrokerConfig,
    pub database: DatabaseConfig,
    pub storage: StorageSettings,
    pub worker: WorkerConfig,
    pub models: ModelsConfig,
    pub limits: Limits,
    pub controlnet: ControlNetConfig,
    pub cuda: CudaOptions,
    pub log: LogConfig,
    pub api: ApiConfig,
}

/// Apply one value to the key `name`. Returns a message (without the key or origin, which the
/// caller adds) when the value does not fit.
pub(crate) fn apply(s: &mut Settings, name: &str, v: &Input<'_>) -> Result<(), String> {
    match name {
        "broker.url" => s.broker.url = v.text()?,
        "broker.prefix" => s.broker.prefix = v.text()?,
        "broker.delivery_limit" => s.broker.delivery_limit = v.int()?,
        "broker.intake_prefetch" => s.broker.intake_prefetch = v.int()?,
        "broker.reconnect_delay_ms" => s.broker.reconnect_delay_ms = v.int()?,
        "broker.reconnect_max_delay_ms" => s.broker.reconnect_max_delay_ms = v.int()?,
        "database.url" => s.database.url = v.text()?,
        "database.schema" => s.database.schema = v.text()?,
        "database.max_connections" => s.database.max_connections = v.int()?,
        "database.acquire_timeout_ms" => s.database.acquire_timeout_ms = v.int()?,
        "storage.backend" => s.storage.backend = v.text()?.to_ascii_lowercase(),
        "storage.prefix" => s.storage.prefix = v.text()?,
        "storage.path" => s.storage.path = PathBuf::from(v.text()?),
        "storage.s3.endpoint" => s.storage.s3_endpoint = v.optional_text()?,
        "storage.s3.region" => s.storage.s3_region = v.text()?,
        "storage.s3.bucket" => s.storage.s3_bucket = v.text()?,
        "storage.s3.allow_http" => s.storage.s3_allow_http = v.flag()?,
        "storage.s3.path_style" => s.storage.s3_path_style = v.flag()?,
        "worker.id" => s.worker.id = v.optional_text()?,
        "worker.devices" => s.worker.devices = devices(v)?,
        "cuda.conv_algo_search" => s.cuda.conv_search = v.text()?.parse()?,
        "cuda.conv_max_workspace" => s.cuda.conv_max_workspace = v.flag()?,
        "cuda.arena_same_as_requested" => s.cuda.arena_same_as_requested = v.flag()?,
        "cuda.prefer_nhwc" => s.cuda.prefer_nhwc = v.flag()?,
        "cuda.attention" => s.cuda.attention = v.text()?.parse()?,
        "cuda.io_binding" => s.cuda.io_binding = v.flag()?,
        "cuda.graph" => s.cuda.graph = v.flag()?,
        "cuda.graph_shapes" => s.cuda.graph_shapes = v.int()?,
        "cuda.controlnet_graph" => s.cuda.controlnet_graph = v.flag()?,
        "cuda.device_step" => s.cuda.device_step = v.flag()?,
        "cuda.tf32" => s.cuda.tf32 = v.flag()?,
        "worker.prefetch" => s.worker.prefetch = v.int()?,
        "worker.max_batch" => s.worker.max_batch = v.int()?,
        "worker.batch_window_ms" => s.worker.batch_window_ms = v.int()?,
        "worker.cpu_threads" => s.worker.cpu_threads = v.int()?,
        "worker.model_cache_mb" => s.worker.model_cache_mb = v.int()?,
        "worker.result_cache" => s.worker.result_cache = v.flag()?,
        "worker.pid_file" => s.worker.pid_file = v.optional_text()?.map(PathBuf::from),
        "worker.max_attempts" => s.worker.max_attempts = v.int()?,
        "worker.progress_interval_ms" => s.worker.progress_interval_ms = v.int()?,
        "worker.poll_interval_ms" => s.worker.poll_interval_ms = v.int()?,
        "worker.job_timeout_ms" => s.worker.job_timeout_ms = v.int()?,
        "worker.job_timeout_min_ms" => s.worker.job_timeout_min_ms = v.int()?,
        "worker.job_timeout_per_megapixel_step_ms" => {
            s.worker.job_timeout_per_megapixel_step_ms = v.int()?
        }
        "worker.shutdown_grace_ms" => s.worker.shutdown_grace_ms = v.int()?,
        "worker.heartbeat_interval_ms" => s.worker.heartbeat_interval_ms = v.int()?,
        "worker.lease_ms" => s.worker.lease_ms = v.int()?,
        "worker.lease_sweep_interval_ms" => s.worker.lease_sweep_interval_ms = v.int()?,
        "models.default" => s.models.default = v.text()?,
        "models.available" => s.models.models = v.models()?,
        "limits.min_side" => s.limits.min_side = v.int()?,
        "limits.max_side" => s.limits.max_side = v.int()?,
        "limits.max_pixels" => s.limits.max_pixels = v.int()?,
        "limits.min_steps" => s.limits.min_steps = v.int()?,
        "limits.max_steps" => s.limits.max_steps = v.int()?,
        "limits.min_guidance_scale" => s.limits.min_guidance_scale = v.float()? as f32,
        "limits.max_guidance_scale" => s.limits.max_guidance_scale = v.float()? as f32,
        "limits.max_images" => s.limits.max_images = v.int()?,
        "limits.max_prompt_chars" => s.limits.max_prompt_chars = v.int()?,
        "limits.max_message_bytes" => s.limits.max_message_bytes = v.int()?,
        "limits.max_metadata_bytes" => s.limits.max_metadata_bytes = v.int()?,
        "limits.schedulers" => s.limits.schedulers = schedulers(v)?,
        "controlnet.canny" => set_path(&mut s.controlnet.models, ControlType::Canny, v)?,
        "controlnet.depth" => set_path(&mut s.controlnet.models, ControlType::Depth, v)?,
        "controlnet.openpose" => set_path(&mut s.controlnet.models, ControlType::Openpose, v)?,
        "controlnet.depth_preprocessor" => {
            set_path(&mut s.controlnet.preprocessors, ControlType::Depth, v)?
        }
        "controlnet.openpose_preprocessor" => {
            set_path(&mut s.controlnet.preprocessors, ControlType::Openpose, v)?
        }
        "controlnet.allow_image_urls" => s.controlnet.allow_image_urls = v.flag()?,
        "controlnet.max_image_bytes" => s.controlnet.max_image_bytes = v.int()?,
        "controlnet.max_image_pixels" => s.controlnet.max_image_pixels = v.int()?,
        "controlnet.max_units" => s.controlnet.max_units = v.int()?,
        "controlnet.fetch_timeout_ms" => s.controlnet.fetch_timeout_ms = v.int()?,
        "log.level" => s.log.level = v.text()?,
        "log.format" => s.log.format = log_format(&v.text()?)?,
        "api.listen" => s.api.listen = v.text()?,
        "api.tokens" => s.api.tokens = tokens(v)?,
        "api.body_limit_bytes" => s.api.body_limit_bytes = v.int()?,
        "api.status_page" => s.api.status_page = v.flag()?,
        "api.url_ttl_secs" => s.api.url_ttl_secs = v.int()?,
        other => return Err(format!("unknown key {other:?}")),
    }
    Ok(())
}

/// An optional directory for one control type (an empty string removes it).
fn set_path(
    map: &mut std::collections::BTreeMap<ControlType, PathBuf>,
    kind: ControlType,
    v: &Input<'_>,
) -> Result<(), String> {
    match v.optional_text()? {
        Some(path) => map.insert(kind, PathBuf::from(path)),
        None => map.remove(&kind),
    };
    Ok(())
}

fn devices(v: &Input<'_>) -> Result<DevicesSetting, String> {
    match v.text_or_list()? {
        either::One(text) => DevicesSetting::parse(&text),
        either::Many(items) => {
            let refs: Vec<&str> = items.iter().map(String::as_str).collect();
            DevicesSetting::from_items(&refs)
        }
    }
}

fn schedulers(v: &Input<'_>) -> Result<Vec<SchedulerKind>, String> {
    let items = match v.text_or_list()? {
        either::One(text) if text.trim().eq_ignore_ascii_case("all") => {
            return Ok(SchedulerKind::ALL.to_vec())
        }
        either::One(text) => text.split(',').map(|s| s.trim().to_owned()).collect(),
        either::Many(items) => items,
    };
    let mut kinds = Vec::with_capacity(items.len());
    for item in &items {
        let kind = SchedulerKind::parse(item).ok_or_else(|| {
            let known: Vec<&str> = SchedulerKind::ALL.iter().map(|k| k.id()).collect();
            format!("unknown scheduler {item:?} (known: {})", known.join(", "))
        })?;
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    if kinds.is_empty() {
        return Err("at least one scheduler must be enabled".to_owned());
    }
    Ok(kinds)
}

fn tokens(v: &Input<'_>) -> Result<Vec<ApiToken>, String> {
    let items = match v.text_or_list()? {
        either::One(text) => text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        either::Many(items) => items,
    };
    let mut tokens: Vec<ApiToken> = Vec::with_capacity(items.len());
    for item in &items {
        let token = ApiToken::parse(item)?;
        if tokens
            .iter()
            .any(|t| t.name == token.name || t.secret == token.secret)
        {
            return Err(format!("token {:?} is listed twice", token.name));
        }
        tokens.push(token);
    }
    Ok(tokens)
}

fn log_format(text: &str) -> Result<LogFormat, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(format!(
            "unknown log format {other:?}: expected \"text\" or \"json\""
        )),
    }
}

/// A value that may be written as one string or as a list of strings.
pub(crate) mod either {
    pub enum TextOrList {
        One(String),
        Many(Vec<String>),
    }
    pub use TextOrList::{Many, One};
}
