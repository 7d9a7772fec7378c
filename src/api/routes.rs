//! The router: every route, the body limit, request tracing and the JSON fallback for
//! unknown routes. [`ROUTES`] lists what is served; a test checks that it equals the paths of
//! the OpenAPI document.

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::routing::{get, post};
use axum::Router;
use tower_http::trace::TraceLayer;

use super::error::ApiError;
use super::{capabilities, estimate, events, health, jobs, metrics, openapi, status, ApiState};

/// Every served route: method and path (axum's `{param}` syntax, as in OpenAPI).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs/{id}"),
    ("DELETE", "/v1/jobs/{id}"),
    ("GET", "/v1/jobs/{id}/events"),
    ("GET", "/v1/jobs/{id}/images/{index}"),
    ("POST", "/v1/validate"),
    ("POST", "/v1/estimate"),
    ("GET", "/v1/capabilities"),
    ("GET", "/v1/schedulers"),
    ("GET", "/v1/controlnet-types"),
    ("GET", "/v1/status"),
];

/// The API's router over `state`.
pub fn router(state: Arc<ApiState>) -> Router {
    let limit = state.config.api.body_limit_bytes;
    Router::new()
        .route("/", get(status::page))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(metrics::metrics))
        .route("/openapi.json", get(openapi::openapi_json))
        .route("/v1/jobs", post(jobs::submit))
        .route("/v1/jobs/{id}", get(jobs::get_job).delete(jobs::cancel_job))
        .route("/v1/jobs/{id}/events", get(events::job_events))
        .route("/v1/jobs/{id}/images/{index}", get(jobs::get_image))
        .route("/v1/validate", post(jobs::validate))
        .route("/v1/estimate", post(estimate::estimate))
        .route("/v1/capabilities", get(capabilities::capabilities))
        .route("/v1/schedulers", get(capabilities::list_schedulers))
        .route(
            "/v1/controlnet-types",
            get(capabilities::list_controlnet_types),
        )
        .route("/v1/status", get(status::status))
        .fallback(no_route)
        .method_not_allowed_fallback(no_route)
        .layer(DefaultBodyLimit::max(limit))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::NoRoute {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}
