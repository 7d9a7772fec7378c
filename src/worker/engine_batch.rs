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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::atomic::AtomicBool;

    use tokio::sync::mpsc as tokio_mpsc;

    use super::*;

    fn job(model: &str, width: u32) -> EngineJob {
        EngineJob {
            model: ModelRef {
                name: model.to_owned(),
                path: PathBuf::from("/models").join(model),
            },
            request: GenerateRequest {
                width,
                ..super::super::engine_thread::tests::request()
            },
            progress: tokio_mpsc::unbounded_channel().0,
            cancel: Arc::new(AtomicBool::new(false)),
            control: None,
            refiner: None,
        }
    }

    fn run(job: EngineJob) -> Command {
        Command::Run {
            job: Box::new(job),
            reply: oneshot::channel().0,
        }
    }

    fn widths(batch: &[(EngineJob, Reply)]) -> Vec<u32> {
        batch.iter().map(|(j, _)| j.request.width).collect()
    }

    fn backlog_widths(backlog: &VecDeque<Command>) -> Vec<u32> {
        backlog
            .iter()
            .map(|c| match c {
                Command::Run { job, .. } => job.request.width,
                Command::Retain(_) => 0,
            })
            .collect()
    }

    fn batching(max: usize, window_ms: u64) -> Batching {
        Batching::new(
            max,
            Duration::from_millis(window_ms),
            Arc::new(Semaphore::new(max)),
        )
    }

    #[test]
    fn only_jobs_that_run_alike_share_a_key() {
        let base = BatchKey::of(&job("a", 64)).expect("plain text-to-image batches");
        assert_eq!(BatchKey::of(&job("a", 64)).as_ref(), Some(&base));
        assert_ne!(BatchKey::of(&job("b", 64)).as_ref(), Some(&base));
        assert_ne!(BatchKey::of(&job("a", 128)).as_ref(), Some(&base));
        let mut other = job("a", 64);
        other.request.steps = 3;
        assert_ne!(BatchKey::of(&other).as_ref(), Some(&base));
        let mut unguided = job("a", 64);
        unguided.request.guidance_scale = 1.0;
        assert_ne!(BatchKey::of(&unguided).as_ref(), Some(&base));
        // Prompts, seeds and guidance scale may differ.
        let mut differs = job("a", 64);
        differs.request.prompt = "a lighthouse".to_owned();
        differs.request.seed = 9;
        differs.request.guidance_scale = 9.0;
        assert_eq!(BatchKey::of(&differs).as_ref(), Some(&base));
        let mut latents = job("a", 64);
        latents.request.initial_latents = Some(vec![0.0; 16]);
        assert!(BatchKey::of(&latents).is_none());
    }

    #[test]
    fn gathers_compatible_jobs_up_to_the_limit_and_keeps_the_rest_in_order() {
        let (sender, receiver) = mpsc::channel();
        let mut backlog = VecDeque::from([run(job("a", 128)), run(job("a", 64))]);
        for width in [64, 96, 64, 64, 64] {
            sender.send(run(job("a", width))).unwrap();
        }
        let first = job("a", 64);
        let key = BatchKey::of(&first).unwrap();
        let mut batch = vec![(first, oneshot::channel().0)];
        gather(
            &receiver,
            &mut backlog,
            &mut batch,
            &key,
            &batching(4, 1000),
        );
        assert_eq!(widths(&batch), [64, 64, 64, 64]);
        // Nothing was on its way, so it did not wait; the others keep their order.
        assert_eq!(backlog_widths(&backlog), [128, 96]);
        assert!(matches!(receiver.try_recv(), Ok(Command::Run { .. })));
    }

    #[test]
    fn waits_for_an_admitted_job_but_not_for_jobs_that_cannot_get_a_permit() {
        let (sender, receiver) = mpsc::channel::<Command>();
        let batching = batching(4, 5_000);
        let first = job("a", 64);
        let key = BatchKey::of(&first).unwrap();

        // A job holding an engine permit is on its way: the batch waits for it.
        let mut claim = batching.claim();
        claim.admit();
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            sender.send(run(job("a", 64))).unwrap();
            drop(claim);
            sender
        });
        let mut batch = vec![(first, oneshot::channel().0)];
        let mut backlog = VecDeque::new();
        let started = Instant::now();
        gather(&receiver, &mut backlog, &mut batch, &key, &batching);
        assert_eq!(batch.len(), 2, "the admitted job joined");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "stopped waiting once it came"
        );
        let _sender = late.join().unwrap();

        // A pulled job with every permit taken cannot come before the batch ends: no wait.
        let held = batching.slots.clone().try_acquire_many_owned(4).unwrap();
        let _pulled = batching.claim();
        let mut batch = vec![(job("a", 64), oneshot::channel().0)];
        let started = Instant::now();
        gather(&receiver, &mut backlog, &mut batch, &key, &batching);
        assert_eq!(batch.len(), 1);
        assert!(started.elapsed() < Duration::from_secs(1));
        drop(held);
    }
}
