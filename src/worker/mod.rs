//! The worker process: connects to Postgres, storage and RabbitMQ, declares the topology, and
//! runs the intake consumer and one GPU-scoped consumer per configured device until told to
//! stop.
//!
//! - [`intake`]: validates every message from `{p}.intake`, writes the `queued` row (or a
//!   `failed` row / a dead letter for an invalid message) and routes it to the high or normal
//!   work queue.
//! - [`consumer`]: one per device; pulls work (high before normal), keeps at most
//!   `worker.prefetch` jobs in flight and hands inference to an [`engine_thread`].
//! - [`process`]: what happens to one job: attempt, progress, images, result, acknowledgement.
//! - [`lease`]: recovers `running` jobs whose worker stopped writing its heartbeat.
//!
//! Every message is acknowledged only after the rows and objects it stands for are written.

mod consumer;
mod control;
pub mod devices;
mod engine_batch;
mod engine_thread;
mod fault;
mod heartbeat;
mod image_input;
mod intake;
mod lease;
pub mod model_cache;
mod output;
mod process;
pub mod result_cache;
mod run;
mod settle;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::broker::{Broker, BrokerError, Topology};
use crate::config::{Config, DevicesSetting, LiveModels};
use crate::db::{Db, DbError};
use crate::engine::Device;
use crate::storage::{Storage, StorageError};

pub use devices::auto_devices;
pub use fault::ABORT_ON_PROMPT_ENV;
pub use lease::{sweep_lost_jobs, SweepReport, WORKER_LOST_CODE};

/// Why the worker could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The OS refused to start an engine thread.
    #[error("cannot start the engine thread for {device}: {source}")]
    EngineThread {
        device: String,
        #[source]
        source: std::io::Error,
    },
    /// ONNX Runtime cannot run on a configured device (library missing, no CUDA).
    #[error("cannot run inference on {device}")]
    EngineStart {
        device: String,
        #[source]
        source: crate::engine::EngineError,
    },
    /// The broker ended the intake subscription (connection lost or consumer cancelled).
    #[error("the intake subscription ended unexpectedly")]
    IntakeClosed,
    /// The engine failed in a way another attempt may not (out of device memory, a device
    /// fault, the engine thread gone).
    #[error("{message}")]
    Engine { code: &'static str, message: String },
    /// The worker is stopping; the job goes back to the queue.
    #[error("the worker is shutting down")]
    ShuttingDown,
    /// A worker task ended abnormally (a bug: tasks handle their errors).
    #[error("a worker task ended abnormally: {0}")]
    Task(String),
}

impl WorkerError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            WorkerError::Db(err) => err.code(),
            WorkerError::Broker(err) => err.code(),
            WorkerError::Storage(err) => err.code(),
            WorkerError::EngineThread { .. } => "engine_thread_start",
            WorkerError::EngineStart { source, .. } => source.code(),
            WorkerError::IntakeClosed => "intake_closed",
            WorkerError::Engine { code, .. } => code,
            WorkerError::ShuttingDown => "shutting_down",
            WorkerError::Task(_) => "worker_task_failed",
        }
    }

    /// Whether restarting the worker later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            WorkerError::Db(err) => err.is_retryable(),
            WorkerError::Broker(err) => err.is_retryable(),
            WorkerError::Storage(err) => err.is_retryable(),
            WorkerError::EngineThread { .. }
            | WorkerError::IntakeClosed
            | WorkerError::Engine { .. }
            | WorkerError::ShuttingDown => true,
            WorkerError::EngineStart { .. } | WorkerError::Task(_) => false,
        }
    }
}

/// Which parts of a worker run in this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOptions {
    /// Run the intake consumer.
    pub intake: bool,
    /// Run the GPU consumers of `worker.devices`.
    pub consumers: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            intake: true,
            consumers: true,
        }
    }
}

/// What every task of a worker shares.
pub(crate) struct Shared {
    /// The configuration the worker started with; its `models` are those of start, the ones
    /// in force are in `models`.
    pub config: Config,
    /// The models in force (replaced by a configuration reload).
    pub models: LiveModels,
    pub db: Db,
    pub storage: Storage,
    pub broker: Broker,
    pub worker_id: String,
    /// What the consumers are doing, for the heartbeat.
    pub status: Arc<heartbeat::StatusBoard>,
}

/// Runs a complete worker (intake and GPU consumers) until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), WorkerError> {
    run_with(config, RunOptions::default(), shutdown).await
}

/// Runs the parts of a worker that `options` selects until `shutdown` resolves, then stops
/// taking jobs, lets the jobs in flight finish (within `worker.shutdown_grace_ms`) and returns.
///
/// When the broker connection is lost, every part stops (jobs in flight finish; messages
/// whose ack is lost are redelivered and skipped as duplicates), and the worker reconnects
/// after `broker.reconnect_delay_ms`, doubling up to `broker.reconnect_max_delay_ms`, and
/// starts again. Other failures (the database schema, ONNX Runtime missing) end the run with
/// the error.
pub async fn run_with(
    config: Config,
    options: RunOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    let models = LiveModels::new(config.models.clone());
    run_live(config, options, models, shutdown).await
}

/// [`run_with`] with the models taken from `models` for every job, so that a configuration
/// reload ([`crate::config::live`]) applies to new jobs: new models are accepted, removed
/// ones fail their jobs with `unknown_model`, and each consumer drops the loaded engines of
/// models that are gone or moved. Jobs already running finish on the model they started with.
pub async fn run_live(
    config: Config,
    options: RunOptions,
    models: LiveModels,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    let worker_id = config.worker.id.clone().unwrap_or_else(default_worker_id);
    let db = Db::connect(&config.database).await?;
    db.migrate().await?;
    let storage = Storage::from_config(&config.storage).await?;
    let topology = Topology::new(config.broker.prefix.clone(), config.broker.delivery_limit);
    let initial_delay = Duration::from_millis(config.broker.reconnect_delay_ms.max(1));
    let max_delay = Duration::from_millis(config.broker.reconnect_max_delay_ms).max(initial_delay);
    let status = Arc::new(heartbeat::StatusBoard::default());
    let (beat_stop, beat_stop_rx) = watch::channel(false);
    let beats = tokio::spawn(heartbeat::run(
        db.clone(),
        heartbeat::Identity {
            worker_id: worker_id.clone(),
            intake: options.intake,
            started_at: chrono::Utc::now(),
        },
        status.clone(),
        Duration::from_millis(config.worker.heartbeat_interval_ms.max(1)),
        beat_stop_rx,
    ));

    tokio::pin!(shutdown);
    let mut delay = initial_delay;
    let result = loop {
        let ended = match connect_broker(&config.broker.url, &topology).await {
            Ok(broker) => {
                let shared = Arc::new(Shared {
                    config: config.clone(),
                    models: models.clone(),
                    db: db.clone(),
                    storage: storage.clone(),
                    broker,
                    worker_id: worker_id.clone(),
                    status: status.clone(),
                });
                let ended = run_connected(&shared, &options, shutdown.as_mut()).await;
                shared.broker.close().await;
                ended
            }
            Err(err) => ConnectionEnd::Failed {
                error: err,
                started: false,
            },
        };
        let error = match ended {
            ConnectionEnd::Shutdown(result) => break result,
            ConnectionEnd::Failed { error, .. } if !reconnects_after(&error) => break Err(error),
            ConnectionEnd::Failed { error, started } => {
                if started {
                    delay = initial_delay;
                }
                error
            }
        };
        tracing::warn!(error = %error, code = error.code(), retry_in_ms = delay.as_millis() as u64, "broker connection lost; reconnecting");
        tokio::select! {
            () = shutdown.as_mut() => break Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(max_delay);
    };
    let _ = beat_stop.send(true);
    if beats.await.is_err() {
        tracing::error!("the heartbeat task ended abnormally");
    }
    db.close().await;
    tracing::info!("worker stopped");
    result
}

async fn connect_broker(url: &str, topology: &Topology) -> Result<Broker, WorkerError> {
    let broker = Broker::connect(url, topology.clone()).await?;
    if let Err(err) = broker.declare_topology().await {
        broker.close().await;
        return Err(err.into());
    }
    Ok(broker)
}

/// Whether a failure is a lost or refused broker connection, which reconnecting can fix.
fn reconnects_after(error: &WorkerError) -> bool {
    match error {
        WorkerError::Broker(err) => err.is_retryable(),
        WorkerError::IntakeClosed => true,
        _ => false,
    }
}

/// How one run of the worker on a broker connection ended.
enum ConnectionEnd {
    /// `shutdown` resolved; the result of stopping.
    Shutdown(Result<(), WorkerError>),
    /// A part failed; `started` tells whether every part had started.
    Failed { error: WorkerError, started: bool },
}

/// Runs the intake and the consumers on one broker connection until `shutdown` resolves or a
/// part fails; then stops every part.
async fn run_connected(
    shared: &Arc<Shared>,
    options: &RunOptions,
    shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> ConnectionEnd {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    if let Err(error) = start_tasks(shared, options, &stop_rx, &mut tasks).await {
        let _ = stop_tx.send(true);
        drain(&mut tasks).await;
        return ConnectionEnd::Failed {
            error,
            started: false,
        };
    }
    tracing::info!(
        worker_id = %shared.worker_id,
        prefix = %shared.broker.topology().prefix,
        intake = options.intake,
        consumers = tasks.len() - usize::from(options.intake) - 1,
        "worker started"
    );

    let failure = tokio::select! {
        () = shutdown => {
            tracing::info!("shutdown requested: finishing the jobs in flight");
            None
        }
        Some(joined) = tasks.join_next() => Some(task_failure(joined).unwrap_or_else(|| {
            WorkerError::Task("a worker task ended before the worker was stopped".to_owned())
        })),
    };
    let _ = stop_tx.send(true);
    let drained = drain(&mut tasks).await;
    match failure {
        // A broker connection or channel lost while stopping fails nothing: every delivery
        // not acknowledged goes back to its queue.
        None => ConnectionEnd::Shutdown(match drained {
            Some(error) if reconnects_after(&error) => {
                tracing::warn!(error = %error, code = error.code(), "the broker connection was lost while stopping");
                Ok(())
            }
            Some(error) => Err(error),
            None => Ok(()),
        }),
        Some(error) => {
            tracing::error!(error = %error, code = error.code(), "a worker task stopped; stopping the others");
            ConnectionEnd::Failed {
                error,
                started: true,
            }
        }
    }
}

async fn start_tasks(
    shared: &Arc<Shared>,
    options: &RunOptions,
    stop: &watch::Receiver<bool>,
    tasks: &mut JoinSet<Result<(), WorkerError>>,
) -> Result<(), WorkerError> {
    if options.intake {
        // A consumer tag is an AMQP short string: keep it well under 255 bytes.
        let mut id = shared.worker_id.clone();
        while id.len() > 120 {
            id.pop();
        }
        let tag = format!("{id}-intake");
        let stream = shared
            .broker
            .intake_consumer(shared.config.broker.intake_prefetch, &tag)
            .await?;
        tasks.spawn(intake::run(shared.clone(), stream, stop.clone()));
    }
    tasks.spawn(lease::run(shared.clone(), stop.clone()));
    if options.consumers {
        let nvml = devices::nvml();
        let devices: Vec<Device> = match &shared.config.worker.devices {
            DevicesSetting::Auto => auto_devices(nvml.as_deref()),
            DevicesSetting::List(devices) => devices.clone(),
        };
        let cpu_threads = match shared.config.worker.cpu_threads {
            0 => cpu_threads_per_consumer(&devices),
            n => Some(n as usize),
        };
        for device in devices {
            let consumer =
                consumer::GpuConsumer::start(shared.clone(), device, nvml.clone(), cpu_threads)
                    .await?;
            tasks.spawn(consumer.run(stop.clone()));
        }
    }
    Ok(())
}

/// `worker.cpu_threads` 0 (auto): with several CPU consumers, each gets an equal share of the
/// cores for ONNX Runtime's intra-op threads instead of one thread per core each (which
/// oversubscribes the machine); one CPU consumer gets ONNX Runtime's default.
fn cpu_threads_per_consumer(devices: &[Device]) -> Option<usize> {
    let cpu_consumers = devices.iter().filter(|d| **d == Device::Cpu).count();
    if cpu_consumers < 2 {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some((cores / cpu_consumers).max(1))
}

/// Waits for every task; returns the first failure.
async fn drain(tasks: &mut JoinSet<Result<(), WorkerError>>) -> Option<WorkerError> {
    let mut first = None;
    while let Some(joined) = tasks.join_next().await {
        if let Some(err) = task_failure(joined) {
            tracing::error!(error = %err, code = err.code(), "worker task failed");
            first.get_or_insert(err);
        }
    }
    first
}

fn task_failure(
    joined: Result<Result<(), WorkerError>, tokio::task::JoinError>,
) -> Option<WorkerError> {
    match joined {
        Ok(Ok(())) => None,
        Ok(Err(err)) => Some(err),
        Err(join) => Some(WorkerError::Task(join.to_string())),
    }
}

/// Longest wait for an unreachable database before a delivery is returned anyway.
const DB_RECOVERY_WAIT: Duration = Duration::from_secs(120);

/// After a database failure, waits (up to [`DB_RECOVERY_WAIT`]) until Postgres answers again,
/// so that a returned message is not redelivered, and its delivery limit spent, while the
/// database is down.
pub(crate) async fn wait_for_database(db: &Db) {
    let deadline = tokio::time::Instant::now() + DB_RECOVERY_WAIT;
    let mut pause = Duration::from_millis(200);
    while db.ping().await.is_err() {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!("the database is still unreachable");
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// Resolves once the flag behind `flag` is set (or its sender is gone).
pub(crate) async fn signalled(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}

/// `{host}-{pid}`, the worker id when none is configured.
fn default_worker_id() -> String {
    format!("{}-{}", host_name(), std::process::id())
}

/// This machine's host name (`worker` when it cannot be read).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "worker".to_owned())
}
