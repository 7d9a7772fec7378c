//! A GPU-scoped consumer: one per device. It pulls work with basic.get, the high lane always
//! before the normal lane, only while it holds fewer than `worker.prefetch` jobs, and runs each
//! job's inference on its own engine thread. With `worker.prefetch` 2 the next job's denoising
//! overlaps the previous job's PNG encoding, upload and result write. With `worker.max_batch`
//! N above 1, up to N compatible jobs hold the engine at once and denoise as one batch (see
//! [`super::engine_batch`]); a job that cannot be batched holds it alone.
//!
//! When the configured models change (a reload), the engine thread drops the loaded models
//! that are no longer configured at their directory, after the job it is running.
//!
//! On stop it takes no new job and gives the jobs in flight `worker.shutdown_grace_ms` to
//! finish; jobs still running then are stopped at their next step and returned to the queue.
//! When the broker closes its work channel alone (a job outlived the consumer timeout) it
//! opens another and carries on; the other consumers of the process are not disturbed.

use std::sync::Arc;
use std::time::Duration;

use nvml_wrapper::Nvml;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use super::devices::GpuMemoryProbe;
use super::engine_batch::Batching;
use super::engine_thread::{EngineThread, ModelRef};
use super::{process, Shared, WorkerError};
use crate::broker::WorkPuller;
use crate::engine::{runtime, Device, EngineError, EngineOptions};

/// What the jobs of one consumer share.
pub(crate) struct ConsumerContext {
    pub shared: Arc<Shared>,
    /// `cpu` or `cuda:N`, as recorded in job rows.
    pub device: String,
    pub engine: EngineThread,
    /// Permits to use the engine: `worker.max_batch` of them; a batchable job takes one, any
    /// other job all of them.
    pub engine_slot: Arc<Semaphore>,
    /// `worker.max_batch`.
    pub max_batch: u32,
    pub gpu_memory: Option<GpuMemoryProbe>,
    /// Set when the shutdown grace period is over: running jobs stop and go back to the queue.
    pub abort: watch::Receiver<bool>,
}

/// Least time between two reopenings of the work channel.
const REOPEN_INTERVAL: Duration = Duration::from_secs(5);

pub(crate) struct GpuConsumer {
    context: Arc<ConsumerContext>,
    abort: watch::Sender<bool>,
    puller: WorkPuller,
}

impl GpuConsumer {
    /// Opens the pull channel and starts the engine thread (the model loads with the first job).
    /// `cpu_threads` caps ONNX Runtime's intra-op threads of a CPU consumer.
    pub async fn start(
        shared: Arc<Shared>,
        device: Device,
        nvml: Option<Arc<Nvml>>,
        cpu_threads: Option<usize>,
    ) -> Result<GpuConsumer, WorkerError> {
        check_device(device).await?;
        let puller = shared.broker.work_puller().await?;
        let options = EngineOptions {
            device,
            intra_threads: if device == Device::Cpu {
                cpu_threads
            } else {
                None
            },
            cuda: shared.config.cuda,
            ..EngineOptions::default()
        };
        let cache_budget = shared.config.worker.model_cache_mb.saturating_mul(1 << 20);
        let controlnets = super::control::paths(&shared.config.controlnet);
        let worker = &shared.config.worker;
        let max_batch = worker.max_batch.max(1);
        let engine_slot = Arc::new(Semaphore::new(max_batch as usize));
        let batching = Batching::new(
            max_batch as usize,
            Duration::from_millis(worker.batch_window_ms),
            engine_slot.clone(),
        );
        let engine = EngineThread::spawn(options, cache_budget, controlnets, batching).map_err(
            |source| WorkerError::EngineThread {
                device: device.to_string(),
                source,
            },
        )?;
        let (abort, abort_rx) = watch::channel(false);
        let gpu_memory = nvml.and_then(|nvml| GpuMemoryProbe::new(nvml, device));
        shared
            .status
            .register(&device.to_string(), gpu_memory.clone());
        let context = ConsumerContext {
            shared,
            device: device.to_string(),
            engine,
            engine_slot,
            max_batch,
            gpu_memory,
            abort: abort_rx,
        };
        Ok(GpuConsumer {
            context: Arc::new(context),
            abort,
            puller,
        })
    }

    /// Pulls and runs jobs until `stop` is set, then finishes the jobs in flight.
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> Result<(), WorkerError> {
        let GpuConsumer {
            context,
            abort,
            mut puller,
        } = self;
        let mut last_reopen: Option<std::time::Instant> = None;
        let worker = &context.shared.config.worker;
        let permits = Arc::new(Semaphore::new(worker.prefetch.max(1) as usize));
        let poll = Duration::from_millis(worker.poll_interval_ms.max(1));
        let grace = Duration::from_millis(worker.shutdown_grace_ms);
        tracing::info!(device = %context.device, prefetch = worker.prefetch, "GPU consumer started");

        let mut models = context.shared.models.subscribe();
        let mut tasks = JoinSet::new();
        let result = loop {
            reap(&mut tasks);
            let permit = tokio::select! {
                biased;
                () = super::signalled(&mut stop) => break Ok(()),
                Ok(()) = models.changed() => {
                    let configured = models.borrow_and_update().clone();
                    context.engine.retain(configured.models.iter().map(|m| ModelRef {
                        name: m.name.clone(),
                        path: m.path.clone(),
                    }).collect());
                    continue;
                }
                permit = permits.clone().acquire_owned() => permit,
            };
            let Ok(permit) = permit else { break Ok(()) };
            // A batch forming on the engine thread waits (briefly) for the job this pull may
            // bring, until it is submitted or turns out not to be batchable.
            let claim = context.engine.claim();
            match puller.pull().await {
                Ok(Some(message)) => {
                    let context = context.clone();
                    tasks.spawn(async move {
                        process::handle(&context, message, claim).await;
                        drop(permit);
                    });
                }
                Ok(None) => {
                    drop(permit);
                    tokio::select! {
                        () = super::signalled(&mut stop) => {}
                        () = tokio::time::sleep(poll) => {}
                    }
                }
                Err(err) => {
                    drop(permit);
                    // The broker closed this channel alone (a delivery outlived its consumer
                    // timeout): open another instead of restarting the whole worker, unless
                    // that just happened (then the failure is not about one delivery).
                    let recent = last_reopen.is_some_and(|at| at.elapsed() < REOPEN_INTERVAL);
                    if recent || !context.shared.broker.is_connected() {
                        break Err(WorkerError::from(err));
                    }
                    match context.shared.broker.work_puller().await {
                        Ok(reopened) => {
                            tracing::warn!(error = %err, "the work channel was closed by the broker; reopened it");
                            puller = reopened;
                            last_reopen = Some(std::time::Instant::now());
                        }
                        Err(_) => break Err(WorkerError::from(err)),
                    }
                }
            }
        };

        finish_in_flight(&mut tasks, &abort, grace).await;
        puller.close().await;
        match Arc::try_unwrap(context) {
            Ok(context) => context.engine.shutdown().await,
            Err(_) => tracing::error!("job tasks outlived their consumer"),
        }
        tracing::info!("GPU consumer stopped");
        result
    }
}

/// Fails at start, not on the first job, when ONNX Runtime cannot run on `device`.
async fn check_device(device: Device) -> Result<(), WorkerError> {
    let start_error = |source| WorkerError::EngineStart {
        device: device.to_string(),
        source,
    };
    let checked = tokio::task::spawn_blocking(move || match device {
        Device::Cpu => runtime::environment().map(|_| ()),
        Device::Cuda { index } => match runtime::cuda_available() {
            Ok(true) => Ok(()),
            Ok(false) => Err(EngineError::CudaUnavailable {
                index,
                reason: "the loaded ONNX Runtime has no CUDA execution provider".to_owned(),
            }),
            Err(err) => Err(err),
        },
    })
    .await
    .map_err(|join| WorkerError::Task(join.to_string()))?;
    checked.map_err(start_error)
}

/// Collects finished job tasks; a panicking task is logged (its message is redelivered).
fn reap(tasks: &mut JoinSet<()>) {
    while let Some(joined) = tasks.try_join_next() {
        if let Err(err) = joined {
            tracing::error!(error = %err, "a job task ended abnormally");
        }
    }
}

async fn finish_in_flight(tasks: &mut JoinSet<()>, abort: &watch::Sender<bool>, grace: Duration) {
    if !tasks.is_empty() {
        tracing::info!(jobs = tasks.len(), "waiting for the jobs in flight");
    }
    let deadline = tokio::time::sleep(grace);
    tokio::pin!(deadline);
    let mut aborted = false;
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                None => break,
                Some(Err(err)) => tracing::error!(error = %err, "a job task ended abnormally"),
                Some(Ok(())) => {}
            },
            () = &mut deadline, if !aborted => {
                tracing::warn!(jobs = tasks.len(), "shutdown grace period over: returning the jobs in flight");
                aborted = true;
                let _ = abort.send(true);
            }
        }
    }
}
