//! What this deployment offers: `GET /v1/capabilities` (models, schedulers, ControlNet types,
//! limits, GPUs and live workers), `GET /v1/schedulers` and `GET /v1/controlnet-types`.
//!
//! Each section is its own list of objects so new entries and new fields (styles, refiners,
//! more models) can be added without changing what clients already read.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::authenticate;
use super::error::{ApiError, ErrorBody};
use super::ApiState;
use crate::db::WorkerRow;
use crate::engine::controlnet::ControlType;
use crate::engine::SchedulerKind;

/// A model jobs may name.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelView {
    pub name: String,
    /// Used by jobs that name no model.
    pub default: bool,
    /// Size of jobs that give none.
    pub default_width: u32,
    pub default_height: u32,
    /// Devices (`worker_id/device`) whose sessions hold this model now.
    pub loaded_on: Vec<String>,
}

/// A scheduler with its usual names.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SchedulerView {
    /// The project id jobs use (`euler_a`).
    pub id: String,
    /// The diffusers class (`EulerAncestralDiscreteScheduler`).
    pub diffusers_class: String,
    /// The AUTOMATIC1111 name (`Euler a`), also accepted in jobs.
    pub a1111_name: String,
    /// Whether `limits.schedulers` lets jobs use it here.
    pub enabled: bool,
}

/// A ControlNet conditioning type.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ControlNetTypeView {
    /// `canny`, `depth`, `openpose`: the `type` of a job's `controlnets` entry.
    pub id: String,
    pub description: String,
    /// Whether the server can turn a plain image into this conditioning itself (`preprocess:
    /// true`): built in for canny, through a configured ONNX preprocessor for the others.
    pub builtin_preprocessor: bool,
    /// `builtin`, `model` (a configured ONNX preprocessor) or null (send a processed image).
    pub preprocessor: Option<String>,
    /// Whether this deployment configures a ControlNet model of this type (`[controlnet]`);
    /// workers load it with the first job that uses it.
    pub model_loaded: bool,
}

/// A style preset jobs can name in `"style"`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StyleView {
    pub name: String,
    pub description: String,
    /// The prompt template; `{prompt}` stands for the job's prompt.
    pub prompt: String,
    /// Put before the job's own negative prompt.
    pub negative_prompt: String,
}

/// One GPU (or CPU) consumer of a live worker.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct GpuView {
    pub worker_id: String,
    pub host: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// The GPU's name, when the driver reports it.
    pub name: Option<String>,
    pub memory_total_bytes: Option<u64>,
    pub memory_used_bytes: Option<u64>,
    pub models_loaded: Vec<String>,
    /// The job it is running, if any.
    pub current_job: Option<uuid::Uuid>,
    pub last_seen: DateTime<Utc>,
}

/// Everything `GET /v1/capabilities` reports.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CapabilitiesView {
    /// Version of sdxl-worker serving the API.
    pub version: String,
    /// Job message versions accepted.
    pub job_versions: Vec<u64>,
    pub models: Vec<ModelView>,
    pub schedulers: Vec<SchedulerView>,
    pub controlnet_types: Vec<ControlNetTypeView>,
    pub styles: Vec<StyleView>,
    /// The limits every job must respect (`limits.*` of the configuration).
    #[schema(value_type = Object)]
    pub limits: serde_json::Value,
    pub gpus: Vec<GpuView>,
    /// Workers whose heartbeat is recent.
    pub workers_alive: usize,
    /// Whether bearer tokens are required.
    pub auth_required: bool,
}

/// Every scheduler this build has, with whether it is enabled here.
pub fn schedulers(state: &ApiState) -> Vec<SchedulerView> {
    SchedulerKind::ALL
        .iter()
        .map(|kind| SchedulerView {
            id: kind.id().to_owned(),
            diffusers_class: kind.diffusers_class().to_owned(),
            a1111_name: kind.a1111_name().to_owned(),
            enabled: state.config.limits.schedulers.contains(kind),
        })
        .collect()
}

/// The ControlNet conditioning types this build knows, with what the deployment's
/// `[controlnet]` configuration has for each.
pub fn controlnet_types(state: &ApiState) -> Vec<ControlNetTypeView> {
    crate::config::controlnet_capabilities(&state.config.controlnet)
        .into_iter()
        .map(|cap| ControlNetTypeView {
            id: cap.kind.id().to_owned(),
            description: match cap.kind {
                ControlType::Canny => "Canny edge map of a reference image",
                ControlType::Depth => "Depth map (near is bright)",
                ControlType::Openpose => "OpenPose skeleton rendering",
            }
            .to_owned(),
            builtin_preprocessor: cap.preprocessor.is_some(),
            preprocessor: cap.preprocessor.map(str::to_owned),
            model_loaded: cap.model,
        })
        .collect()
}

/// The style presets of this build (`config/styles.toml`).
pub fn styles() -> Vec<StyleView> {
    crate::styles::list_styles()
        .into_iter()
        .map(|s| StyleView {
            name: s.name,
            description: s.description,
            prompt: s.prompt,
            negative_prompt: s.negative_prompt,
        })
        .collect()
}

/// The consumers of live workers, one entry per device.
pub fn gpus(workers: &[WorkerRow]) -> Vec<GpuView> {
    workers
        .iter()
        .flat_map(|w| {
            w.devices.iter().map(move |d| GpuView {
                worker_id: w.worker_id.clone(),
                host: w.host.clone(),
                device: d.device.clone(),
                name: d.name.clone(),
                memory_total_bytes: d.memory_total_bytes,
                memory_used_bytes: d.memory_used_bytes,
                models_loaded: d.models_loaded.clone(),
                current_job: d.current_job,
                last_seen: w.last_seen,
            })
        })
        .collect()
}

/// Models, schedulers, ControlNet types, limits, GPUs and live workers.
#[utoipa::path(
    get, path = "/v1/capabilities", tag = "capabilities",
    responses(
        (status = 200, description = "What this deployment offers", body = CapabilitiesView),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn capabilities(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> Result<Json<CapabilitiesView>, ApiError> {
    authenticate(&state.config.api.tokens, &headers)?;
    let workers = state.db.live_workers(state.alive_window()).await?;
    let gpus = gpus(&workers);
    let configured = state.models.current();
    let models = configured
        .models
        .iter()
        .map(|m| {
            let (default_width, default_height) = m.default_size();
            ModelView {
                name: m.name.clone(),
                default: m.name == configured.default,
                default_width,
                default_height,
                loaded_on: gpus
                    .iter()
                    .filter(|g| g.models_loaded.contains(&m.name))
                    .map(|g| format!("{}/{}", g.worker_id, g.device))
                    .collect(),
            }
        })
        .collect();
    Ok(Json(CapabilitiesView {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        job_versions: vec![crate::job::VERSION],
        models,
        schedulers: schedulers(&state),
        controlnet_types: controlnet_types(&state),
        styles: styles(),
        limits: serde_json::to_value(&state.config.limits).unwrap_or_default(),
        gpus,
        workers_alive: workers.len(),
        auth_required: !state.config.api.tokens.is_empty(),
    }))
}

/// The schedulers, with their diffusers and A1111 names.
#[utoipa::path(
    get, path = "/v1/schedulers", tag = "capabilities",
    responses((status = 200, description = "Every scheduler", body = Vec<SchedulerView>),
              (status = 401, description = "Missing or unknown token", body = ErrorBody)),
    security((), ("bearer" = []))
)]
pub async fn list_schedulers(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> Result<Json<Vec<SchedulerView>>, ApiError> {
    authenticate(&state.config.api.tokens, &headers)?;
    Ok(Json(schedulers(&state)))
}

/// The ControlNet conditioning types and whether each has a model loaded.
#[utoipa::path(
    get, path = "/v1/controlnet-types", tag = "capabilities",
    responses((status = 200, description = "Every ControlNet type", body = Vec<ControlNetTypeView>),
              (status = 401, description = "Missing or unknown token", body = ErrorBody)),
    security((), ("bearer" = []))
)]
pub async fn list_controlnet_types(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> Result<Json<Vec<ControlNetTypeView>>, ApiError> {
    authenticate(&state.config.api.tokens, &headers)?;
    Ok(Json(controlnet_types(&state)))
}
