//! `/healthz` (the process answers) and `/readyz` (the broker, the database and the image
//! store all answer; 503 with the failing ones otherwise).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::ApiState;

/// How long each readiness check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// One dependency's readiness.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CheckView {
    pub ok: bool,
    /// Why not, with its stable code first.
    pub error: Option<String>,
}

/// Readiness of every dependency.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ReadyView {
    pub ready: bool,
    pub broker: CheckView,
    pub database: CheckView,
    pub storage: CheckView,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "Alive", content_type = "text/plain")))]
pub async fn healthz() -> &'static str {
    "ok"
}

async fn check<E: std::fmt::Display>(
    code: &'static str,
    f: impl std::future::Future<Output = Result<(), E>>,
) -> CheckView {
    match tokio::time::timeout(CHECK_TIMEOUT, f).await {
        Ok(Ok(())) => CheckView {
            ok: true,
            error: None,
        },
        Ok(Err(err)) => CheckView {
            ok: false,
            error: Some(format!("{code}: {err}")),
        },
        Err(_) => CheckView {
            ok: false,
            error: Some(format!("{code}: no answer within {CHECK_TIMEOUT:?}")),
        },
    }
}

/// Readiness: broker, database and storage answer.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, description = "Ready", body = ReadyView),
              (status = 503, description = "A dependency does not answer", body = ReadyView)))]
pub async fn readyz(State(state): State<Arc<ApiState>>) -> Response {
    let broker = check("broker_unavailable", async {
        let broker = state.broker().await?;
        let queue = broker.topology().intake_queue();
        broker.queue_depth(&queue).await.map(|_| ())
    })
    .await;
    let database = check("database_unavailable", state.db.ping()).await;
    let storage = check("storage_unavailable", state.storage.ping()).await;
    let ready = broker.ok && database.ok && storage.ok;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let view = ReadyView {
        ready,
        broker,
        database,
        storage,
    };
    (status, Json(view)).into_response()
}
