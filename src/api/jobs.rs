//! Jobs over HTTP: submit (`POST /v1/jobs`), read (`GET /v1/jobs/{id}`), cancel
//! (`DELETE /v1/jobs/{id}`), fetch an image (`GET /v1/jobs/{id}/images/{index}`) and check a
//! message without running it (`POST /v1/validate`).
//!
//! Bodies are read as bytes and validated by the job contract ([`crate::job`]), so malformed
//! JSON, wrong types and unknown fields get the contract's stable codes. `POST /v1/jobs` is
//! idempotent on the job id: the first call writes the `queued` row and answers 201; a repeat
//! answers 200 with the row as it stands (and publishes the message again while the job is
//! still queued, in case the first publish was lost). A body without an `id` gets a new one.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use lapin::types::ShortString;
use lapin::BasicProperties;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth::{authenticate, check_owner, Caller};
use super::error::{ApiError, ErrorBody};
use super::ApiState;
use crate::db::{CancelOutcome, JobRow, JobState};
use crate::job::{self, codes, JobRejection, ValidJob};

/// Progress of a running job.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProgressView {
    /// Denoising steps done.
    pub step: i32,
    /// Denoising steps in all.
    pub total: i32,
}

/// Why a job failed (or was cancelled by the system).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobErrorView {
    pub code: String,
    pub message: Option<String>,
    /// For `invalid_request`: `{"errors": [{"field", "code", "message"}]}`.
    #[schema(value_type = Option<Object>)]
    pub details: Option<Value>,
}

/// One stored image.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ImageView {
    pub index: u32,
    /// Object-storage key.
    pub key: String,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    /// Where to download it: a presigned URL valid for `api.url_ttl_secs` (S3 storage), or
    /// this API's `/v1/jobs/{id}/images/{index}` (local storage).
    pub url: String,
}

/// The status row of a job.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobView {
    pub id: Uuid,
    /// `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    #[schema(value_type = String, example = "running")]
    pub state: JobState,
    pub model: Option<String>,
    pub priority: u8,
    /// Starts so far.
    pub attempt: i32,
    pub worker_id: Option<String>,
    pub device: Option<String>,
    pub progress: Option<ProgressView>,
    /// A cancellation was asked for while the job was running.
    pub cancel_requested: bool,
    pub error: Option<JobErrorView>,
    pub images: Vec<ImageView>,
    /// The normalized request (every default resolved, the seed recorded).
    #[schema(value_type = Object)]
    pub request: Value,
    /// Timings of the finished job, in milliseconds.
    #[schema(value_type = Option<Object>)]
    pub metrics: Option<Value>,
    pub created_at: DateTime<Utc>,
    pub queued_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

/// The result of `POST /v1/validate`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ValidationView {
    /// Whether the message would be accepted.
    pub valid: bool,
    /// The normalized message (defaults filled in) when valid.
    #[schema(value_type = Option<Object>)]
    pub normalized: Option<Value>,
    /// Every invalid field when not.
    #[schema(value_type = Vec<super::error::FieldErrorDoc>)]
    pub errors: Vec<crate::job::FieldError>,
}

/// The result of `DELETE /v1/jobs/{id}`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CancelView {
    pub id: Uuid,
    /// `cancelled` (it was queued), or `running` (it stops at its next step).
    #[schema(value_type = String)]
    pub state: JobState,
    pub cancel_requested: bool,
}

/// The request body as bytes: within the body limit, JSON (or no) content type.
pub(crate) fn read_body(
    state: &ApiState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Bytes, ApiError> {
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let text = ct.to_str().unwrap_or_default().to_ascii_lowercase();
        let essence = text.split(';').next().unwrap_or_default().trim();
        if essence != "application/json" && !essence.ends_with("+json") {
            return Err(ApiError::UnsupportedMediaType { found: text });
        }
    }
    match body {
        Ok(bytes) => Ok(bytes),
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Err(ApiError::BodyTooLarge {
                limit: state.config.api.body_limit_bytes,
            })
        }
        Err(rejection) => Err(ApiError::BadBody {
            reason: rejection.body_text(),
        }),
    }
}

/// The body with an `id` added when it is a JSON object without one, and the id it has.
fn with_id(body: &[u8]) -> Result<Vec<u8>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::Unreadable {
            code: codes::EMPTY_BODY,
            message: "the request body is empty".to_owned(),
        });
    }
    let mut value: Value = serde_json::from_slice(body).map_err(|e| ApiError::Unreadable {
        code: codes::NOT_JSON,
        message: format!("the body is not JSON: {e}"),
    })?;
    match value.as_object_mut() {
        Some(object) if !object.contains_key("id") || object["id"].is_null() => {
            object.insert("id".to_owned(), Value::String(Uuid::new_v4().to_string()));
            Ok(serde_json::to_vec(&value).unwrap_or_default())
        }
        _ => Ok(body.to_vec()),
    }
}

/// Validate a body as a job message (adding an id when it has none).
pub(crate) fn validate_body(state: &ApiState, body: &[u8]) -> Result<ValidJob, ApiError> {
    let body = with_id(body)?;
    let models = state.models.current();
    let config = &state.config;
    job::parse_and_validate_with(&body, &config.limits, &models, &config.controlnet).map_err(
        |rejection| match rejection {
            JobRejection::Invalid { errors, .. } => ApiError::Invalid { errors },
            JobRejection::Unreadable { code, message } => ApiError::Unreadable { code, message },
        },
    )
}

/// A job id from the path.
pub(crate) fn parse_id(text: &str) -> Result<Uuid, ApiError> {
    let id = Uuid::parse_str(text).map_err(|e| ApiError::BadParameter {
        what: "job id",
        value: text.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(id)
}

/// The view of a row, with image URLs and metrics.
pub(crate) async fn view(state: &ApiState, row: JobRow) -> Result<JobView, ApiError> {
    let ttl = Duration::from_secs(state.config.api.url_ttl_secs);
    let mut images = Vec::with_capacity(row.images.len());
    for image in &row.images {
        let url = match state.storage.presigned_get_url(&image.key, ttl).await {
            Some(url) => url?,
            None => format!("/v1/jobs/{}/images/{}", row.id, image.index),
        };
        images.push(ImageView {
            index: image.index,
            key: image.key.clone(),
            seed: image.seed,
            width: image.width,
            height: image.height,
            url,
        });
    }
    let metrics = if row.state.is_terminal() {
        state
            .db
            .get_metrics(row.id)
            .await?
            .map(|m| serde_json::to_value(m).unwrap_or(Value::Null))
    } else {
        None
    };
    let progress = match (row.progress_step, row.progress_total) {
        (Some(step), Some(total)) => Some(ProgressView { step, total }),
        _ => None,
    };
    let error = row.error_code.clone().map(|code| JobErrorView {
        code,
        message: row.error_message.clone(),
        details: row.error_details.clone(),
    });
    Ok(JobView {
        id: row.id,
        state: row.state,
        model: row.model,
        priority: row.priority,
        attempt: row.attempt,
        worker_id: row.worker_id,
        device: row.device,
        progress,
        cancel_requested: row.cancel_requested,
        error,
        images,
        request: row.request,
        metrics,
        created_at: row.created_at,
        queued_at: row.queued_at,
        started_at: row.started_at,
        finished_at: row.finished_at,
        updated_at: row.updated_at,
    })
}

/// Submit a job.
#[utoipa::path(
    post, path = "/v1/jobs", tag = "jobs",
    request_body(content = Object, description = "A version 1 job message (JobMessage); `id` may be left out", content_type = "application/json"),
    responses(
        (status = 201, description = "Queued", body = JobView),
        (status = 200, description = "A job with this id exists: its row as it stands", body = JobView),
        (status = 400, description = "Unreadable body", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "The id belongs to another token's job", body = ErrorBody),
        (status = 413, description = "Body over api.body_limit_bytes", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "Invalid fields", body = ErrorBody),
        (status = 503, description = "Database or broker unavailable", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn submit(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let caller = authenticate(&state.config.api.tokens, &headers)?;
    let body = read_body(&state, &headers, body)?;
    let job = validate_body(&state, &body)?;
    let created = state.db.insert_queued(&job).await?;
    if created {
        if let Some(owner) = caller.owner() {
            state.db.set_owner(job.id, owner).await?;
        }
    } else {
        check_owner(&state, &caller, job.id).await?;
    }
    let row = state
        .db
        .get(job.id)
        .await?
        .ok_or(ApiError::JobNotFound { id: job.id })?;
    if row.state == JobState::Queued {
        // The row's request, not this body: a repeat without a seed must not change it.
        let body = serde_json::to_vec(&row.request).unwrap_or_else(|_| job.to_body());
        publish(&state, &body, job.id, row.priority).await?;
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let location = format!("/v1/jobs/{}", job.id);
    let view = view(&state, row).await?;
    Ok((status, [(header::LOCATION, location)], Json(view)).into_response())
}

async fn publish(state: &ApiState, body: &[u8], id: Uuid, priority: u8) -> Result<(), ApiError> {
    let properties = BasicProperties::default()
        .with_message_id(ShortString::from(id.to_string()))
        .with_content_type(ShortString::from("application/json"))
        .with_priority(priority);
    let broker = state.broker().await?;
    broker.publish_job(body, properties).await?;
    Ok(())
}

/// Read a job's status row.
#[utoipa::path(
    get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id")),
    responses(
        (status = 200, description = "The row", body = JobView),
        (status = 400, description = "Not a UUID", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "Another token's job", body = ErrorBody),
        (status = 404, description = "No job has this id", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn get_job(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let caller = authenticate(&state.config.api.tokens, &headers)?;
    let id = parse_id(&id)?;
    let row = state
        .db
        .get(id)
        .await?
        .ok_or(ApiError::JobNotFound { id })?;
    check_owner(&state, &caller, id).await?;
    Ok(Json(view(&state, row).await?))
}

/// Cancel a queued or running job.
#[utoipa::path(
    delete, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id")),
    responses(
        (status = 200, description = "Cancelled (it was queued)", body = CancelView),
        (status = 202, description = "Running: it stops at its next denoising step and ends `cancelled`", body = CancelView),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "Another token's job", body = ErrorBody),
        (status = 404, description = "No job has this id", body = ErrorBody),
        (status = 409, description = "Already finished", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn cancel_job(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let caller = authenticate(&state.config.api.tokens, &headers)?;
    let id = parse_id(&id)?;
    check_owner(&state, &caller, id).await?;
    let (status, view) = match state.db.cancel(id).await? {
        CancelOutcome::Cancelled => (
            StatusCode::OK,
            CancelView {
                id,
                state: JobState::Cancelled,
                cancel_requested: false,
            },
        ),
        CancelOutcome::Requested { .. } => (
            StatusCode::ACCEPTED,
            CancelView {
                id,
                state: JobState::Running,
                cancel_requested: true,
            },
        ),
        CancelOutcome::AlreadyTerminal(state) => {
            return Err(ApiError::AlreadyFinished { id, state })
        }
        CancelOutcome::NotFound => return Err(ApiError::JobNotFound { id }),
    };
    Ok((status, Json(view)).into_response())
}

/// Download one image of a succeeded job (PNG).
#[utoipa::path(
    get, path = "/v1/jobs/{id}/images/{index}", tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id"), ("index" = u32, Path, description = "Image index")),
    responses(
        (status = 200, description = "The PNG", content_type = "image/png"),
        (status = 403, description = "Another token's job", body = ErrorBody),
        (status = 404, description = "No such job or image", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn get_image(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path((id, index)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let caller = authenticate(&state.config.api.tokens, &headers)?;
    let id = parse_id(&id)?;
    let index: u32 = index.parse().map_err(|_| ApiError::BadParameter {
        what: "image index",
        value: index.clone(),
        reason: "expected a non-negative integer".to_owned(),
    })?;
    let row = state
        .db
        .get(id)
        .await?
        .ok_or(ApiError::JobNotFound { id })?;
    check_owner(&state, &caller, id).await?;
    let image = row
        .images
        .iter()
        .find(|i| i.index == index)
        .ok_or(ApiError::ImageNotFound { id, index })?;
    let bytes = state.storage.get(&image.key).await?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/png"),
            (header::CACHE_CONTROL, "private, max-age=3600"),
        ],
        Body::from(bytes),
    )
        .into_response())
}

/// Check a job message without running it.
#[utoipa::path(
    post, path = "/v1/validate", tag = "jobs",
    request_body(content = Object, description = "A version 1 job message (JobMessage); `id` may be left out", content_type = "application/json"),
    responses(
        (status = 200, description = "Whether it is valid, with every field error", body = ValidationView),
        (status = 400, description = "Unreadable body", body = ErrorBody),
        (status = 413, description = "Body over api.body_limit_bytes", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn validate(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ValidationView>, ApiError> {
    authenticate(&state.config.api.tokens, &headers)?;
    let body = read_body(&state, &headers, body)?;
    let view = match validate_body(&state, &body) {
        Ok(job) => ValidationView {
            valid: true,
            normalized: Some(job.request_json()),
            errors: Vec::new(),
        },
        Err(ApiError::Invalid { errors }) => ValidationView {
            valid: false,
            normalized: None,
            errors,
        },
        Err(other) => return Err(other),
    };
    Ok(Json(view))
}

/// Whether the caller may see job `id`'s thumbnail on the status page.
pub(crate) async fn may_read(state: &ApiState, caller: &Caller, id: Uuid) -> bool {
    check_owner(state, caller, id).await.is_ok()
}
