//! The HTTP API (`sdxl-worker serve`): jobs (submit, read, cancel, follow), validation,
//! capabilities, estimates, health, Prometheus metrics, the OpenAPI document and the live
//! status page. One file per concern:
//! - [`routes`]: the router and the list of served routes;
//! - [`jobs`]: `POST /v1/jobs`, `GET`/`DELETE /v1/jobs/{id}`, images, `POST /v1/validate`;
//! - [`capabilities`]: capabilities, schedulers, ControlNet types;
//! - [`estimate`]: run-time, memory and wait estimates fitted to the metrics rows;
//! - [`events`]: server-sent events of one job, from Postgres `LISTEN`;
//! - [`health`]: `/healthz` and `/readyz`;
//! - [`metrics`]: `/metrics` in the Prometheus text format;
//! - [`openapi`]: `/openapi.json`, generated from the handlers' types;
//! - [`status`]: the status page and its JSON;
//! - [`auth`]: optional bearer tokens and job ownership;
//! - [`error`]: the error enum with stable codes and the JSON error body.
//!
//! The API writes the `queued` row itself (so `GET` finds the job at once) and then publishes
//! the normalized message to `{prefix}.jobs` with publisher confirms; the intake sees the row
//! already there and routes the message to its work queue, exactly as for a duplicate publish.

pub mod auth;
pub mod capabilities;
pub mod error;
pub mod estimate;
pub mod events;
pub mod health;
pub mod jobs;
pub mod metrics;
pub mod openapi;
pub mod routes;
pub mod status;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::broker::{Broker, BrokerError, Topology};
use crate::config::{Config, LiveModels};
use crate::db::{Db, DbError};
use crate::storage::{Storage, StorageError};

pub use error::ApiError;
pub use routes::{router, ROUTES};

/// Why the API could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the HTTP server failed: {source}")]
    Serve {
        #[source]
        source: std::io::Error,
    },
}

impl ServeError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ServeError::Db(e) => e.code(),
            ServeError::Broker(e) => e.code(),
            ServeError::Storage(e) => e.code(),
            ServeError::Bind { .. } => "api_bind",
            ServeError::Serve { .. } => "api_serve",
        }
    }
}

/// What every handler shares.
pub struct ApiState {
    /// The configuration the server started with (its `models` are those of start).
    pub config: Config,
    /// The models in force, replaced by a configuration reload.
    pub models: LiveModels,
    pub db: Db,
    pub storage: Storage,
    /// Reconnected on first use after the connection was lost.
    broker: tokio::sync::Mutex<Option<Arc<Broker>>>,
}

impl ApiState {
    /// Connect to Postgres (applying migrations), storage and the broker (declaring the
    /// topology, so jobs have queues to land in before any worker started).
    pub async fn connect(config: Config) -> Result<Arc<ApiState>, ServeError> {
        let models = LiveModels::new(config.models.clone());
        ApiState::connect_live(config, models).await
    }

    /// [`ApiState::connect`] with the models read from `models` at every request.
    pub async fn connect_live(
        config: Config,
        models: LiveModels,
    ) -> Result<Arc<ApiState>, ServeError> {
        let db = Db::connect(&config.database).await?;
        db.migrate().await?;
        let storage = Storage::from_config(&config.storage).await?;
        let broker = connect_broker(&config).await?;
        Ok(Arc::new(ApiState {
            config,
            models,
            db,
            storage,
            broker: tokio::sync::Mutex::new(Some(Arc::new(broker))),
        }))
    }

    /// The broker connection, reconnecting when it was lost.
    pub async fn broker(&self) -> Result<Arc<Broker>, BrokerError> {
        let mut slot = self.broker.lock().await;
        if let Some(broker) = slot.as_ref() {
            if broker.is_connected() {
                return Ok(broker.clone());
            }
        }
        let broker = Arc::new(connect_broker(&self.config).await?);
        *slot = Some(broker.clone());
        Ok(broker)
    }

    /// How long a worker counts as alive after its last heartbeat.
    pub fn alive_window(&self) -> Duration {
        Duration::from_millis(self.config.worker.heartbeat_interval_ms.saturating_mul(3))
            .max(Duration::from_secs(5))
    }

    /// Close the connections.
    pub async fn close(&self) {
        if let Some(broker) = self.broker.lock().await.take() {
            broker.close().await;
        }
        self.db.close().await;
    }
}

async fn connect_broker(config: &Config) -> Result<Broker, BrokerError> {
    let topology = Topology::new(config.broker.prefix.clone(), config.broker.delivery_limit);
    let broker = Broker::connect(&config.broker.url, topology).await?;
    broker.declare_topology().await?;
    Ok(broker)
}

/// Serve the API on `listener` until `shutdown` completes.
pub async fn serve(
    state: Arc<ApiState>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let app = router(state.clone());
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "HTTP API listening");
    }
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| ServeError::Serve { source });
    state.close().await;
    result
}

/// Bind `api.listen` and serve until `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let models = LiveModels::new(config.models.clone());
    run_live(config, models, shutdown).await
}

/// [`run`] with the models read from `models` (see [`crate::config::live`]).
pub async fn run_live(
    config: Config,
    models: LiveModels,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let addr = config.api.listen.clone();
    let listener = TcpListener::bind(&addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let state = ApiState::connect_live(config, models).await?;
    serve(state, listener, shutdown).await
}
