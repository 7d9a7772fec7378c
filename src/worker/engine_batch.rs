//! Dynamic batching on the engine thread: which jobs may share a batch, gathering them from
//! the thread's queue, and running them as one [`Engine::generate_batch`] call.
//!
//! A batch starts when a batchable job reaches the thread. It takes the compatible jobs already
//! waiting there, then, while the consumer is pulling a message or other batchable jobs it has
//! pulled are on their way (each holds a [`Claim`] from the start of its pull until it is
//! submitted) and an engine permit is free for them, waits for them up to
//! `worker.batch_window_ms`. A lone job on an idle consumer
//! waits at most for one pull that finds the queue empty. Jobs that cannot join stay queued in
//! their order.
//!
//! Batches form from the jobs a consumer holds: `worker.prefetch` of 2 × `worker.max_batch`
//! lets the next batch gather while the last one's images are encoded and uploaded.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Semaphore};

use super::engine_thread::{
    ensure_model, panic_message, Command, EngineFailure, EngineJob, EngineRun, LoadedControlNets,
    ModelRef,
};
use super::model_cache::ModelCache;
use crate::engine::scheduler::SchedulerOverrides;
use crate::engine::{EngineOptions, GenerateRequest, Progress, SchedulerKind};

/// How an engine thread forms batches.
#[derive(Debug, Clone)]
pub struct Batching {
    /// Most jobs in one batch; 1 runs every job alone.
    pub max: usize,
    /// Longest wait for jobs being claimed when a batch starts.
    pub window: Duration,
    /// Jobs on their way to the engine thread (see [`Claim`]).
    pub on_the_way: Arc<OnTheWay>,
    /// The consumer's engine permits: when none is free, no job can join until the batch ends.
    pub slots: Arc<Semaphore>,
}

impl Batching {
    pub fn new(max: usize, window: Duration, slots: Arc<Semaphore>) -> Self {
        Batching {
            max: max.max(1),
            window,
            on_the_way: Arc::default(),
            slots,
        }
    }

    /// Marks a job as on its way to the engine until the returned claim is dropped.
    pub fn claim(&self) -> Claim {
        self.on_the_way.pulled.fetch_add(1, Ordering::SeqCst);
        Claim {
            on_the_way: self.on_the_way.clone(),
            admitted: false,
        }
    }

    /// Whether a job may still join a forming batch: one holds an engine permit and will be
    /// submitted, or one is being pulled or waits for a permit and a permit is free.
    fn more_coming(&self) -> bool {
        let admitted = self.on_the_way.admitted.load(Ordering::SeqCst);
        let pulled = self.on_the_way.pulled.load(Ordering::SeqCst);
        admitted > 0 || (pulled > 0 && self.slots.available_permits() > 0)
    }
}

/// Counts of the jobs on their way to a consumer's engine thread.
#[derive(Debug, Default)]
pub struct OnTheWay {
    /// Pulls in progress and pulled batchable jobs without an engine permit yet.
    pulled: AtomicUsize,
    /// Batchable jobs that hold an engine permit and are not submitted yet.
    admitted: AtomicUsize,
}

impl Default for Batching {
    fn default() -> Self {
        Batching::new(1, Duration::ZERO, Arc::new(Semaphore::new(1)))
    }
}

/// Held from the start of a pull until its job is submitted to the engine thread (see
/// [`Batching`]); [`Claim::admit`] once the job holds its engine permit.
pub struct Claim {
    on_the_way: Arc<OnTheWay>,
    admitted: bool,
}

impl Claim {
    /// The job got its engine permit: it will be submitted soon.
    pub fn admit(&mut self) {
        if !self.admitted {
            self.admitted = true;
            self.on_the_way.admitted.fetch_add(1, Ordering::SeqCst);
            self.on_the_way.pulled.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let counter = if self.admitted {
            &self.on_the_way.admitted
        } else {
            &self.on_the_way.pulled
        };
        counter.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What jobs must share to run in one batch. The engine groups them further (prompt
/// sequence length, exact timesteps) and runs groups that differ one after another.
#[derive(Debug, PartialEq)]
pub(super) struct BatchKey {
    model: ModelRef,
    width: u32,
    height: u32,
    steps: u32,
    scheduler: SchedulerKind,
    overrides: SchedulerOverrides,
    guidance: bool,
}

impl BatchKey {
    /// `None` for jobs that always run alone: ControlNets, a refiner, an init image, or
    /// injected latents.
    pub(super) fn of(job: &EngineJob) -> Option<BatchKey> {
        let r = &job.request;
        if job.control.is_some()
            || job.refiner.is_some()
            || r.controls.img2img.is_some()
            || r.initial_latents.is_some()
        {
            return None;
        }
        Some(BatchKey {
            model: job.model.clone(),
            width: r.width,
            height: r.height,
            steps: r.steps,
            scheduler: r.scheduler,
            overrides: r.scheduler_overrides.clone(),
            guidance: r.guidance_scale > 1.0,
        })
    }
}

pub(super) type Reply = oneshot::Sender<Result<EngineRun, EngineFailure>>;

/// Adds to `batch` (which holds the first job) the compatible jobs waiting in `backlog` or
/// arriving on `receiver`, up to `batching.max`. Other commands go to the back of `backlog`.
pub(super) fn gather(
    receiver: &mpsc::Receiver<Command>,
    backlog: &mut VecDeque<Command>,
    batch: &mut Vec<(EngineJob, Reply)>,
    key: &BatchKey,
    batching: &Batching,
) {
    let fits = |job: &EngineJob| BatchKey::of(job).as_ref() == Some(key);
    let mut kept = VecDeque::with_capacity(backlog.len());
    for command in backlog.drain(..) {
        match command {
            Command::Run { job, reply } if batch.len() < batching.max && fits(&job) => {
                batch.push((*job, reply));
            }
            other => kept.push_back(other),
        }
    }
    *backlog = kept;
    let deadline = Instant::now() + batching.window;
    while batch.len() < batching.max {
        let command = match receiver.try_recv() {
            Ok(command) => command,
            Err(mpsc::TryRecvError::Disconnected) => break,
            Err(mpsc::TryRecvError::Empty) => {
                let now = Instant::now();
                if !batching.more_coming() || now >= deadline {
                    break;
                }
                // Short waits, so that a claim that ends without a submission (a duplicate,
                // a failed start) ends the wait soon.
                let slice = (deadline - now).min(Duration::from_millis(2));
                match receiver.recv_timeout(slice) {
                    Ok(command) => command,
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
        };
        match command {
            Command::Run { job, reply } if fits(&job) => batch.push((*job, reply)),
            other => backlog.push_back(other),
        }
    }
}

/// Runs the jobs of a batch (at least two, all with the same [`BatchKey`]); returns each
/// job's reply channel with its result.
pub(super) fn run_batch(
    options: &EngineOptions,
    cache: &mut ModelCache,
    controlnets: &mut Option<LoadedControlNets>,
    batch: Vec<(EngineJob, Reply)>,
) -> Vec<(Reply, Result<EngineRun, EngineFailure>)> {
    let (jobs, replies): (Vec<EngineJob>, Vec<Reply>) = batch.into_iter().unzip();
    let model = jobs[0].model.clone();
    let results = run_jobs(options, cache, controlnets, &model, &jobs);
    replies.into_iter().zip(results).collect()
}

fn run_jobs(
    options: &EngineOptions,
    cache: &mut ModelCache,
    controlnets: &mut Option<LoadedControlNets>,
    model: &ModelRef,
    jobs: &[EngineJob],
) -> Vec<Result<EngineRun, EngineFailure>> {
    let model_load = match ensure_model(options, cache, controlnets, model) {
        Ok(load) => load,
        Err(failure) => {
            let text = failure.to_string();
            let code = failure.code();
            return jobs
                .iter()
                .map(|_| {
                    Err(EngineFailure::Batch {
                        code,
                        message: text.clone(),
                    })
                })
                .collect();
        }
    };
    let Some(engine) = cache.get(&model.name, &model.path) else {
        return jobs
            .iter()
            .map(|_| Err(EngineFailure::ThreadGone))
            .collect();
    };
    let requests: Vec<&GenerateRequest> = jobs.iter().map(|j| &j.request).collect();
    let mut on_progress = |run: usize, p: Progress| {
        let job = &jobs[run];
        let _ = job.progress.send(p);
        if job.cancel.load(Ordering::Relaxed) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        engine.generate_batch(&requests, &mut on_progress)
    }));
    match outcome {
        Ok(results) => jobs
            .iter()
            .zip(results)
            .map(|(job, result)| match result {
                Ok(output) => Ok(EngineRun { output, model_load }),
                Err(_) if job.cancel.load(Ordering::Relaxed) => Err(EngineFailure::Cancelled),
                Err(err) => Err(EngineFailure::Generate(err)),
            })
            .collect(),
        Err(panic) => {
            cache.remove(&model.name, &model.path);
            *controlnets = None;
            let message = panic_message(panic.as_ref());
            jobs.iter()
                .map(|_| Err(EngineFailure::Panicked(message.clone())))
                .collect()
        }
    }
}
