//! Drives one job's inference on the engine thread: writes progress to the job row (the first
//! and the last step always, others at most every `worker.progress_interval_ms`), samples the
//! device's memory, and stops the run at the next step when the job is cancelled, taken over
//! by a newer attempt, runs past its timeout ([`job_timeout`]), or the worker's shutdown grace
//! ends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use uuid::Uuid;

use super::consumer::ConsumerContext;
use super::engine_batch::Claim;
use super::engine_thread::{EngineFailure, EngineJob, EngineRun, JobExtras, ModelRef};
use crate::config::WorkerConfig;
use crate::db::ProgressOutcome;
use crate::engine::{GenerateRequest, Progress};

/// Why a run was stopped before it finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopReason {
    /// Someone asked to cancel the job.
    CancelRequested,
    /// The row no longer belongs to this attempt.
    Lost,
    Timeout,
    /// The worker's shutdown grace period is over.
    Shutdown,
}

pub(crate) struct RunOutcome {
    pub result: Result<EngineRun, EngineFailure>,
    /// Set when the run was asked to stop (the engine may have finished anyway).
    pub stop: Option<StopReason>,
    /// Highest memory use sampled on the device during the run (GPUs only).
    pub peak_gpu_mem_bytes: Option<u64>,
}

struct Tracker<'a> {
    ctx: &'a ConsumerContext,
    id: Uuid,
    attempt: i32,
    interval: Duration,
    last_write: Option<Instant>,
    /// Latest progress not yet written.
    pending: Option<Progress>,
    stop: Option<StopReason>,
    cancel: Arc<AtomicBool>,
    peak: Option<u64>,
}

impl Tracker<'_> {
    fn request_stop(&mut self, reason: StopReason) {
        if self.stop.is_none() {
            self.stop = Some(reason);
            self.cancel.store(true, Ordering::Relaxed);
        }
    }

    fn sample_memory(&mut self) {
        if let Some(used) = self.ctx.gpu_memory.as_ref().and_then(|p| p.used_bytes()) {
            self.peak = Some(self.peak.map_or(used, |peak| peak.max(used)));
        }
    }

    async fn on_progress(&mut self, progress: Progress) {
        self.sample_memory();
        self.pending = Some(progress);
        let due = self
            .last_write
            .is_none_or(|last| last.elapsed() >= self.interval);
        if due || progress.step >= progress.total {
            self.flush().await;
        }
    }

    /// Writes the pending progress, if any.
    async fn flush(&mut self) {
        let Some(progress) = self.pending.take() else {
            return;
        };
        if self.stop.is_some() {
            return;
        }
        self.last_write = Some(Instant::now());
        let step = i32::try_from(progress.step).unwrap_or(i32::MAX);
        let total = i32::try_from(progress.total).unwrap_or(i32::MAX);
        match self
            .ctx
            .shared
            .db
            .record_progress(self.id, self.attempt, step, total)
            .await
        {
            Ok(ProgressOutcome::Recorded) => {}
            Ok(ProgressOutcome::CancelRequested) => self.request_stop(StopReason::CancelRequested),
            Ok(ProgressOutcome::Lost) => self.request_stop(StopReason::Lost),
            // Progress is informative; a failed write does not stop the job.
            Err(err) => tracing::warn!(job_id = %self.id, error = %err, "cannot record progress"),
        }
    }
}

/// What a job hands to the engine thread.
pub(crate) struct EngineWork {
    pub model: ModelRef,
    pub request: GenerateRequest,
    pub extras: JobExtras,
    /// Dropped once the job is submitted (see [`Claim`]).
    pub claim: Option<Claim>,
}

/// Runs a job's work on the consumer's engine thread and follows it to the end.
pub(crate) async fn run_engine(
    ctx: &ConsumerContext,
    id: Uuid,
    attempt: i32,
    work: EngineWork,
    timeout: Duration,
) -> RunOutcome {
    let EngineWork {
        model,
        request,
        extras,
        claim,
    } = work;
    let worker = &ctx.shared.config.worker;
    let (progress_tx, mut progress_rx) = mpsc::unbounded_channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let mut tracker = Tracker {
        ctx,
        id,
        attempt,
        interval: Duration::from_millis(worker.progress_interval_ms),
        last_write: None,
        pending: None,
        stop: None,
        cancel: cancel.clone(),
        peak: None,
    };
    tracker.sample_memory();
    let status = &ctx.shared.status;
    status.set_job(&ctx.device, Some(id));
    let job = EngineJob {
        model,
        request,
        progress: progress_tx,
        cancel,
        control: extras.control,
        refiner: extras.refiner,
    };
    let run = ctx.engine.submit(job);
    drop(claim);
    tokio::pin!(run);
    let timeout = tokio::time::sleep(timeout);
    tokio::pin!(timeout);
    let mut abort = ctx.abort.clone();

    let result = loop {
        tokio::select! {
            result = &mut run => break result,
            Some(progress) = progress_rx.recv() => tracker.on_progress(progress).await,
            () = &mut timeout, if tracker.stop.is_none() => {
                tracing::warn!(job_id = %id, "job timed out: stopping it");
                tracker.request_stop(StopReason::Timeout);
            }
            () = super::signalled(&mut abort), if tracker.stop.is_none() => {
                tracker.request_stop(StopReason::Shutdown);
            }
        }
    };
    while let Ok(progress) = progress_rx.try_recv() {
        tracker.pending = Some(progress);
    }
    if result.is_ok() {
        tracker.flush().await;
    }
    tracker.sample_memory();
    status.set_job(&ctx.device, None);
    status.set_models(&ctx.device, ctx.engine.loaded_models());
    RunOutcome {
        result,
        stop: tracker.stop,
        peak_gpu_mem_bytes: tracker.peak,
    }
}

/// A job's timeout from its cost estimate: `worker.job_timeout_min_ms` plus
/// `worker.job_timeout_per_megapixel_step_ms` per megapixel-step (width x height x steps x
/// images / 10^6), at most `worker.job_timeout_ms` (which every job gets when the per-step
/// time is 0).
pub(crate) fn job_timeout(worker: &WorkerConfig, request: &GenerateRequest) -> Duration {
    timeout_for(
        worker,
        request.width,
        request.height,
        request.steps,
        request.num_images,
    )
}

fn timeout_for(
    worker: &WorkerConfig,
    width: u32,
    height: u32,
    steps: u32,
    images: u32,
) -> Duration {
    let cap = Duration::from_millis(worker.job_timeout_ms);
    if worker.job_timeout_per_megapixel_step_ms == 0 {
        return cap;
    }
    let megapixel_steps =
        f64::from(width) * f64::from(height) * f64::from(steps) * f64::from(images.max(1)) / 1e6;
    let estimate_ms = worker.job_timeout_min_ms as f64
        + megapixel_steps * worker.job_timeout_per_megapixel_step_ms as f64;
    Duration::from_millis(estimate_ms.min(u64::MAX as f64) as u64).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_grow_with_the_cost_and_stay_within_the_cap() {
        let worker = WorkerConfig::default();
        let sdxl = timeout_for(&worker, 1024, 1024, 30, 1);
        assert_eq!(sdxl, Duration::from_millis(120_000 + 62_914));
        assert!(timeout_for(&worker, 1024, 1024, 30, 2) > sdxl);
        assert_eq!(
            timeout_for(&worker, 64, 64, 2, 1),
            Duration::from_millis(120_016)
        );
        assert_eq!(
            timeout_for(&worker, 2048, 2048, 150, 4),
            Duration::from_millis(worker.job_timeout_ms)
        );
        let fixed = WorkerConfig {
            job_timeout_per_megapixel_step_ms: 0,
            ..WorkerConfig::default()
        };
        assert_eq!(
            timeout_for(&fixed, 64, 64, 2, 1),
            Duration::from_millis(fixed.job_timeout_ms)
        );
    }
}
