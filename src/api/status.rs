//! The live status page: `GET /` serves one static HTML page (embedded in the binary) that
//! polls `GET /v1/status` every two seconds and draws workers and their GPUs, queue depth,
//! jobs per state, throughput over the last 15 minutes and recent jobs with thumbnails.
//! With authentication on, the page asks for a token (kept in the browser's session storage)
//! and sends it with its requests; thumbnails are shown for that token's jobs only.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth::authenticate;
use super::capabilities::{gpus, GpuView};
use super::error::{ApiError, ErrorBody};
use super::jobs::{may_read, ProgressView};
use super::ApiState;
use crate::broker::Lane;
use crate::db::{JobState, MinuteCount};

/// The page, embedded at build time.
const PAGE: &str = include_str!("status.html");

/// Recent jobs shown.
const RECENT_JOBS: u32 = 12;
/// Minutes of throughput shown.
const THROUGHPUT_MINUTES: u32 = 15;

/// A worker process.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct WorkerView {
    pub worker_id: String,
    pub host: String,
    pub version: String,
    pub intake: bool,
    pub alive: bool,
    pub started_at: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
}

/// Messages ready in each queue.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct QueueView {
    pub intake: u32,
    pub high: u32,
    pub normal: u32,
    pub dead: u32,
}

/// One recent job.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RecentJob {
    pub id: Uuid,
    #[schema(value_type = String)]
    pub state: JobState,
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub width: Option<u64>,
    pub height: Option<u64>,
    pub steps: Option<u64>,
    pub progress: Option<ProgressView>,
    pub error_code: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// URL of the first image, when the caller may read it.
    pub thumbnail: Option<String>,
}

/// Finished jobs in one minute.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MinuteView {
    pub minute: DateTime<Utc>,
    pub succeeded: i64,
    pub failed: i64,
    pub cancelled: i64,
    pub images: i64,
}

/// Everything the status page shows.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StatusView {
    pub generated_at: DateTime<Utc>,
    pub workers: Vec<WorkerView>,
    pub gpus: Vec<GpuView>,
    pub queue: QueueView,
    /// Jobs in each state.
    pub jobs: BTreeMap<String, i64>,
    pub throughput: Vec<MinuteView>,
    pub recent: Vec<RecentJob>,
}

/// The status page (HTML).
#[utoipa::path(get, path = "/", tag = "status",
    responses((status = 200, description = "The live status page", content_type = "text/html"),
              (status = 404, description = "api.status_page is off", body = ErrorBody)))]
pub async fn page(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    if !state.config.api.status_page {
        return Err(ApiError::StatusPageOff);
    }
    Ok((
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response())
}

/// What the status page shows, as JSON.
#[utoipa::path(get, path = "/v1/status", tag = "status",
    responses((status = 200, description = "Workers, queues, jobs, throughput, recent jobs", body = StatusView),
              (status = 401, description = "Missing or unknown token", body = ErrorBody)),
    security((), ("bearer" = [])))]
pub async fn status(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> Result<Json<StatusView>, ApiError> {
    let caller = authenticate(&state.config.api.tokens, &headers)?;
    let window = state.alive_window();
    let live = state.db.live_workers(window).await?;
    let all = state.db.list_workers(50).await?;
    let now = Utc::now();
    let cutoff = now - chrono::Duration::from_std(window).unwrap_or_default();
    let workers = all
        .iter()
        .map(|w| WorkerView {
            worker_id: w.worker_id.clone(),
            host: w.host.clone(),
            version: w.version.clone(),
            intake: w.intake,
            alive: w.stopped_at.is_none() && w.last_seen > cutoff,
            started_at: w.started_at,
            last_seen: w.last_seen,
        })
        .collect();
    let broker = state.broker().await?;
    let t = broker.topology().clone();
    let queue = QueueView {
        intake: broker.queue_depth(&t.intake_queue()).await?,
        high: broker.queue_depth(&t.work_queue(Lane::High)).await?,
        normal: broker.queue_depth(&t.work_queue(Lane::Normal)).await?,
        dead: broker.queue_depth(&t.dead_queue()).await?,
    };
    let jobs = state
        .db
        .count_by_state()
        .await?
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    let throughput = state
        .db
        .throughput(THROUGHPUT_MINUTES)
        .await?
        .into_iter()
        .map(|m: MinuteCount| MinuteView {
            minute: m.minute,
            succeeded: m.succeeded,
            failed: m.failed,
            cancelled: m.cancelled,
            images: m.images,
        })
        .collect();
    let ttl = Duration::from_secs(state.config.api.url_ttl_secs);
    let mut recent = Vec::new();
    for row in state.db.list(None, RECENT_JOBS).await? {
        let thumbnail = match row.images.first() {
            Some(image) if may_read(&state, &caller, row.id).await => {
                match state.storage.presigned_get_url(&image.key, ttl).await {
                    Some(Ok(url)) => Some(url),
                    Some(Err(_)) => None,
                    None => Some(format!("/v1/jobs/{}/images/{}", row.id, image.index)),
                }
            }
            _ => None,
        };
        let field = |name: &str| row.request.get(name).and_then(serde_json::Value::as_u64);
        recent.push(RecentJob {
            id: row.id,
            state: row.state,
            model: row.model.clone(),
            prompt: row
                .request
                .get("prompt")
                .and_then(serde_json::Value::as_str)
                .map(|p| p.chars().take(120).collect()),
            width: field("width"),
            height: field("height"),
            steps: field("steps"),
            progress: match (row.progress_step, row.progress_total) {
                (Some(step), Some(total)) => Some(ProgressView { step, total }),
                _ => None,
            },
            error_code: row.error_code.clone(),
            created_at: row.created_at,
            finished_at: row.finished_at,
            thumbnail,
        });
    }
    Ok(Json(StatusView {
        generated_at: now,
        workers,
        gpus: gpus(&live),
        queue,
        jobs,
        throughput,
        recent,
    }))
}
