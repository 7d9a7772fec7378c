//! Errors of the HTTP API: one enum, a stable `code()` per variant, and the JSON body every
//! error response carries: `{"error": {"code", "message", "errors"?}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::broker::BrokerError;
use crate::db::{DbError, JobState};
use crate::job::FieldError;
use crate::storage::StorageError;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body cannot be read as a job message (not JSON, not an object, empty, no usable id).
    #[error("{message}")]
    Unreadable { code: &'static str, message: String },
    /// The message has invalid fields; every one is listed.
    #[error("invalid job message: {}", crate::job::summarize(.errors))]
    Invalid { errors: Vec<FieldError> },
    #[error("the request body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("the request body cannot be read: {reason}")]
    BadBody { reason: String },
    #[error("expected Content-Type application/json, found {found:?}")]
    UnsupportedMediaType { found: String },
    #[error("{what} {value:?} is not valid: {reason}")]
    BadParameter {
        what: &'static str,
        value: String,
        reason: String,
    },
    #[error("this route needs `Authorization: Bearer <token>` with a configured token")]
    Unauthorized,
    #[error("job {id} belongs to another API token")]
    Forbidden { id: uuid::Uuid },
    #[error("no job has id {id}")]
    JobNotFound { id: uuid::Uuid },
    #[error("job {id} has no image {index}")]
    ImageNotFound { id: uuid::Uuid, index: u32 },
    #[error("no route {method} {path}")]
    NoRoute { method: String, path: String },
    #[error("job {id} has already finished ({state})")]
    AlreadyFinished { id: uuid::Uuid, state: JobState },
    #[error("the status page is turned off (api.status_page = false)")]
    StatusPageOff,
    #[error("the database is unavailable: {source}")]
    Database {
        #[source]
        source: DbError,
    },
    #[error("the broker is unavailable: {source}")]
    Broker {
        #[source]
        source: BrokerError,
    },
    #[error("the image store failed: {source}")]
    Storage {
        #[source]
        source: StorageError,
    },
}

impl ApiError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unreadable { code, .. } => code,
            ApiError::Invalid { .. } => "invalid_request",
            ApiError::BodyTooLarge { .. } => "body_too_large",
            ApiError::BadBody { .. } => "bad_body",
            ApiError::UnsupportedMediaType { .. } => "unsupported_media_type",
            ApiError::BadParameter { .. } => "bad_parameter",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden { .. } => "forbidden",
            ApiError::JobNotFound { .. } => "job_not_found",
            ApiError::ImageNotFound { .. } => "image_not_found",
            ApiError::NoRoute { .. } => "no_route",
            ApiError::AlreadyFinished { .. } => "already_finished",
            ApiError::StatusPageOff => "status_page_off",
            ApiError::Database { .. } => "database_unavailable",
            ApiError::Broker { .. } => "broker_unavailable",
            ApiError::Storage { .. } => "storage_unavailable",
        }
    }

    /// The HTTP status of the response.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unreadable { .. } | ApiError::BadBody { .. } => StatusCode::BAD_REQUEST,
            ApiError::BadParameter { .. } => StatusCode::BAD_REQUEST,
            ApiError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ApiError::JobNotFound { .. }
            | ApiError::ImageNotFound { .. }
            | ApiError::NoRoute { .. }
            | ApiError::StatusPageOff => StatusCode::NOT_FOUND,
            ApiError::AlreadyFinished { .. } => StatusCode::CONFLICT,
            ApiError::Database { .. } | ApiError::Broker { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Storage { source } => match source {
                StorageError::NotFound { .. } => StatusCode::NOT_FOUND,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            },
        }
    }
}

impl From<DbError> for ApiError {
    fn from(source: DbError) -> Self {
        ApiError::Database { source }
    }
}

impl From<BrokerError> for ApiError {
    fn from(source: BrokerError) -> Self {
        ApiError::Broker { source }
    }
}

impl From<StorageError> for ApiError {
    fn from(source: StorageError) -> Self {
        ApiError::Storage { source }
    }
}

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable code (`invalid_request`, `not_json`, `body_too_large`, `job_not_found`, ...).
    pub code: String,
    /// A sentence for humans.
    pub message: String,
    /// For `invalid_request`: every invalid field.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<FieldErrorDoc>>)]
    pub errors: Option<Vec<FieldError>>,
}

/// One invalid field (see the job message contract).
#[derive(Debug, Serialize, ToSchema)]
#[allow(dead_code)]
pub struct FieldErrorDoc {
    /// The field's path (`width`, `scheduler_options.steps_offset`), or `$` for the whole.
    pub field: String,
    /// Stable code (`missing`, `wrong_type`, `out_of_range`, `unknown_field`, ...).
    pub code: String,
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(code = self.code(), error = %self, "API request failed");
        }
        let errors = match &self {
            ApiError::Invalid { errors } => Some(errors.clone()),
            _ => None,
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code().to_owned(),
                message: self.to_string(),
                errors,
            },
        };
        (status, Json(body)).into_response()
    }
}
