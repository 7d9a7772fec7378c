//! `GET /v1/jobs/{id}/events`: server-sent events of one job, fed by Postgres `LISTEN` on
//! [`crate::db::NOTIFY_CHANNEL`].
//!
//! The stream starts with a `state` event carrying the whole row (as `GET /v1/jobs/{id}`
//! shows it), then sends `progress` events (`{"step", "total"}`) while the job runs and a
//! `state` event with the row at every change of state. After a terminal state it sends that
//! row and ends. Each stream holds one database connection of its own for `LISTEN`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde::Deserialize;
use sqlx::postgres::PgListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use uuid::Uuid;

use super::auth::{authenticate, check_owner};
use super::error::{ApiError, ErrorBody};
use super::jobs::{parse_id, view};
use super::ApiState;
use crate::db::NOTIFY_CHANNEL;

/// The payload of a change notification.
#[derive(Debug, Deserialize)]
struct Notice {
    schema: String,
    id: Uuid,
    state: String,
    progress_step: Option<i32>,
    progress_total: Option<i32>,
}

/// Progress and state changes of a job as server-sent events.
#[utoipa::path(
    get, path = "/v1/jobs/{id}/events", tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id")),
    responses(
        (status = 200, description = "`text/event-stream`: `state` events (the row) and `progress` events (`{\"step\", \"total\"}`); ends after a terminal state", content_type = "text/event-stream"),
        (status = 403, description = "Another token's job", body = ErrorBody),
        (status = 404, description = "No job has this id", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn job_events(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let caller = authenticate(&state.config.api.tokens, &headers)?;
    let id = parse_id(&id)?;
    check_owner(&state, &caller, id).await?;
    // Listen before reading the row, so no change between the two is missed.
    let mut listener = PgListener::connect_with(state.db.pool())
        .await
        .map_err(|source| crate::db::DbError::Query {
            op: "listen",
            source,
        })?;
    listener
        .listen(NOTIFY_CHANNEL)
        .await
        .map_err(|source| crate::db::DbError::Query {
            op: "listen",
            source,
        })?;
    let row = state
        .db
        .get(id)
        .await?
        .ok_or(ApiError::JobNotFound { id })?;
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(forward(
        state.clone(),
        listener,
        id,
        row.state.is_terminal(),
        tx,
        row,
    ));
    Ok(Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

async fn forward(
    state: Arc<ApiState>,
    mut listener: PgListener,
    id: Uuid,
    terminal: bool,
    tx: mpsc::Sender<Result<Event, Infallible>>,
    row: crate::db::JobRow,
) {
    let mut last_state = row.state;
    if !send_row(&state, &tx, row).await || terminal {
        return;
    }
    loop {
        let notification = tokio::select! {
            () = tx.closed() => return,
            n = listener.recv() => n,
        };
        let notice: Notice = match notification {
            Ok(n) => match serde_json::from_str(n.payload()) {
                Ok(notice) => notice,
                Err(_) => continue,
            },
            Err(err) => {
                tracing::warn!(error = %err, job_id = %id, "LISTEN connection lost; ending the event stream");
                return;
            }
        };
        if notice.id != id || notice.schema != state.db.schema() {
            continue;
        }
        if notice.state == last_state.as_str() {
            if let (Some(step), Some(total)) = (notice.progress_step, notice.progress_total) {
                let data = serde_json::json!({ "step": step, "total": total }).to_string();
                if tx
                    .send(Ok(Event::default().event("progress").data(data)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            continue;
        }
        // A change of state: send the row as it is now.
        let row = match state.db.get(id).await {
            Ok(Some(row)) => row,
            _ => return,
        };
        last_state = row.state;
        let done = row.state.is_terminal();
        if !send_row(&state, &tx, row).await || done {
            return;
        }
    }
}

async fn send_row(
    state: &ApiState,
    tx: &mpsc::Sender<Result<Event, Infallible>>,
    row: crate::db::JobRow,
) -> bool {
    let data = match view(state, row).await {
        Ok(view) => serde_json::to_string(&view).unwrap_or_default(),
        Err(err) => {
            tracing::warn!(error = %err, "cannot render a job row for its event stream");
            return false;
        }
    };
    tx.send(Ok(Event::default().event("state").data(data)))
        .await
        .is_ok()
}
