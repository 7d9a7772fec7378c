//! One OS thread per GPU consumer that owns the ONNX Runtime engine.
//!
//! The async side sends [`EngineJob`]s over a channel and awaits the reply on a oneshot; it
//! never blocks on inference. Progress flows back over an unbounded channel, and a shared flag
//! lets the async side cancel a run between steps. Loaded models stay in a
//! [`ModelCache`](super::model_cache::ModelCache) (least recently used first out, within the
//! consumer's memory budget, reloaded when their files change); the ControlNets of one model
//! stay loaded beside them after its first ControlNet job. A refined job loads the model's
//! refiner beside its base and keeps both (the cache never evicts one for the other). A panic
//! inside the engine is
//! caught here, that engine is dropped (its state can no longer be trusted) and the job gets an
//! error; the next job for the model loads a fresh engine.
//!
//! With `worker.max_batch` above 1, compatible jobs that reach the thread together run as one
//! batch (see [`super::engine_batch`]); jobs that cannot join wait in the thread's queue.
//!
//! On a GPU, each job, batch and model release holds the process-wide
//! [`capture_gate`](crate::engine::capture_gate) shared, so that a CUDA graph capture on
//! another consumer's GPU never overlaps this thread's CUDA work.

use std::collections::VecDeque;
use std::future::Future;
use std::ops::ControlFlow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc as tokio_mpsc, oneshot};

use super::control::ControlJob;
use super::engine_batch::{self, BatchKey, Batching, Claim};
use super::model_cache::ModelCache;
use crate::engine::controlnet::{ControlNetPaths, ControlNets};
use crate::engine::refiner::Refine;
use crate::engine::{
    capture_gate, Device, Engine, EngineError, EngineOptions, GenerateOutput, GenerateRequest,
    Progress,
};

/// A model to run: the configured name and its directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRef {
    pub name: String,
    pub path: PathBuf,
}

/// One generation for the engine thread.
pub struct EngineJob {
    pub model: ModelRef,
    pub request: GenerateRequest,
    /// Receives every step's progress.
    pub progress: tokio_mpsc::UnboundedSender<Progress>,
    /// Set by the async side to stop the run at the next step.
    pub cancel: Arc<AtomicBool>,
    /// ControlNets and their decoded images; `None` for plain text-to-image.
    pub control: Option<ControlJob>,
    /// The refiner stage, when the job asks for one.
    pub refiner: Option<RefinerJob>,
}

/// A refiner stage: the refiner model and how the base hands over to it.
#[derive(Debug, Clone, PartialEq)]
pub struct RefinerJob {
    pub model: ModelRef,
    pub refine: Refine,
}

/// What a job runs besides its model and request.
#[derive(Default)]
pub struct JobExtras {
    pub control: Option<ControlJob>,
    pub refiner: Option<RefinerJob>,
}

pub(super) enum Command {
    Run {
        job: Box<EngineJob>,
        reply: oneshot::Sender<Result<EngineRun, EngineFailure>>,
    },
    /// Drop every loaded model (and its ControlNets) that is not one of these.
    Retain(Vec<ModelRef>),
}

/// A finished generation.
pub struct EngineRun {
    pub output: GenerateOutput,
    /// Time spent loading the model for this job; `None` when it was already loaded.
    pub model_load: Option<Duration>,
}

/// Why a generation produced no images.
#[derive(Debug, thiserror::Error)]
pub enum EngineFailure {
    #[error("cannot load model `{model}`")]
    Load {
        model: String,
        #[source]
        source: EngineError,
    },
    #[error(transparent)]
    Generate(EngineError),
    #[error("the engine panicked: {0}")]
    Panicked(String),
    #[error("the run was cancelled")]
    Cancelled,
    #[error("the engine thread is gone")]
    ThreadGone,
    /// The batch the job was part of failed as a whole (its model could not load).
    #[error("{message}")]
    Batch { code: &'static str, message: String },
}

impl EngineFailure {
    /// Stable snake_case code, recorded in the job row.
    pub fn code(&self) -> &'static str {
        match self {
            EngineFailure::Load { .. } => "model_load_failed",
            EngineFailure::Generate(err) => err.code(),
            EngineFailure::Panicked(_) => "engine_panic",
            EngineFailure::Cancelled => "cancelled",
            EngineFailure::ThreadGone => "engine_unavailable",
            EngineFailure::Batch { code, .. } => code,
        }
    }
}

/// The async side's handle on an engine thread.
pub struct EngineThread {
    sender: Option<mpsc::Sender<Command>>,
    thread: Option<JoinHandle<()>>,
    /// Names of the models in the thread's cache, updated after every job.
    loaded: Arc<Mutex<Vec<String>>>,
    batching: Batching,
}

impl EngineThread {
    /// Starts the thread with a model cache of `cache_budget_bytes` (0: one model at a time) and
    /// the deployment's ControlNets. Models are loaded on first use, ControlNets with the first
    /// job of a model that uses one.
    pub fn spawn(
        options: EngineOptions,
        cache_budget_bytes: u64,
        controlnets: ControlNetPaths,
        batching: Batching,
    ) -> std::io::Result<EngineThread> {
        let (sender, receiver) = mpsc::channel::<Command>();
        let loaded = Arc::new(Mutex::new(Vec::new()));
        let report = loaded.clone();
        let thread_batching = batching.clone();
        let thread = std::thread::Builder::new()
            .name(format!("engine-{}", options.device))
            .spawn(move || {
                let context = LoopContext {
                    options,
                    budget: cache_budget_bytes,
                    controlnet_paths: controlnets,
                    batching: thread_batching,
                };
                engine_loop(context, receiver, &report)
            })?;
        Ok(EngineThread {
            sender: Some(sender),
            thread: Some(thread),
            loaded,
            batching,
        })
    }

    /// Marks a job as on its way to this thread: a batch that is forming waits for it (within
    /// `worker.batch_window_ms`) until the claim is dropped.
    pub fn claim(&self) -> Claim {
        self.batching.claim()
    }

    /// Names of the models loaded on this thread (least recently used first), as of its last job.
    pub fn loaded_models(&self) -> Vec<String> {
        self.loaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Hands a job to the thread now; the returned future gives its result without blocking
    /// the async runtime.
    pub fn submit(
        &self,
        job: EngineJob,
    ) -> impl Future<Output = Result<EngineRun, EngineFailure>> + use<> {
        let (reply, result) = oneshot::channel();
        let sent = self.sender.as_ref().is_some_and(|sender| {
            sender
                .send(Command::Run {
                    job: Box::new(job),
                    reply,
                })
                .is_ok()
        });
        async move {
            if !sent {
                return Err(EngineFailure::ThreadGone);
            }
            result.await.unwrap_or(Err(EngineFailure::ThreadGone))
        }
    }

    /// Asks the thread to drop, after the job it is running, the loaded models that are not
    /// in `models` (removed from the configuration, or moved to another directory).
    pub fn retain(&self, models: Vec<ModelRef>) {
        if let Some(sender) = &self.sender {
            let _ = sender.send(Command::Retain(models));
        }
    }

    /// Closes the channel and waits (off the async threads) for the thread to finish its job.
    pub async fn shutdown(mut self) {
        self.sender.take();
        if let Some(thread) = self.thread.take() {
            let joined = tokio::task::spawn_blocking(move || thread.join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                tracing::error!("the engine thread ended abnormally");
            }
        }
    }
}

/// ControlNets loaded for one model (they are checked against its UNet when they load).
pub(super) struct LoadedControlNets {
    model: String,
    path: PathBuf,
    nets: ControlNets,
}

impl LoadedControlNets {
    fn belong_to(&self, model: &ModelRef) -> bool {
        self.model == model.name && self.path == model.path
    }
}

/// What the engine thread is started with.
struct LoopContext {
    options: EngineOptions,
    budget: u64,
    controlnet_paths: ControlNetPaths,
    batching: Batching,
}

fn engine_loop(
    context: LoopContext,
    receiver: mpsc::Receiver<Command>,
    loaded: &Mutex<Vec<String>>,
) {
    let LoopContext {
        options,
        budget,
        controlnet_paths,
        batching,
    } = context;
    let mut cache = ModelCache::new(budget);
    let mut controlnets: Option<LoadedControlNets> = None;
    // Commands taken off the channel while a batch formed, in arrival order.
    let mut backlog: VecDeque<Command> = VecDeque::new();
    // When the last run ended: the time from there to the next run's start is the engine's
    // idle gap, which the `engine run` debug line reports.
    let mut last_end: Option<Instant> = None;
    loop {
        let command = match backlog.pop_front() {
            Some(command) => command,
            None => match receiver.recv() {
                Ok(command) => command,
                Err(_) => break,
            },
        };
        let (job, reply) = match command {
            Command::Run { job, reply } => (*job, reply),
            Command::Retain(models) => {
                // Releasing a model frees GPU memory: a unit of GPU work.
                let _gpu = gpu_work(&options);
                let keep = |name: &str, path: &std::path::Path| {
                    models.iter().any(|m| m.name == name && m.path == path)
                };
                cache.retain(keep);
                controlnets.take_if(|loaded| !keep(&loaded.model, &loaded.path));
                *loaded.lock().unwrap_or_else(PoisonError::into_inner) =
                    cache.loaded().into_iter().map(str::to_owned).collect();
                continue;
            }
        };
        if job.cancel.load(Ordering::Relaxed) {
            let _ = reply.send(Err(EngineFailure::Cancelled));
            continue;
        }
        let arrived = Instant::now();
        let mut batch = vec![(job, reply)];
        if let Some(key) = BatchKey::of(&batch[0].0).filter(|_| batching.max > 1) {
            engine_batch::gather(&receiver, &mut backlog, &mut batch, &key, &batching);
            // Jobs cancelled while the batch formed are not run; their tasks see the flag.
            let (cancelled, live): (Vec<_>, Vec<_>) = batch
                .into_iter()
                .partition(|(job, _)| job.cancel.load(Ordering::Relaxed));
            for (_, reply) in cancelled {
                let _ = reply.send(Err(EngineFailure::Cancelled));
            }
            batch = live;
        }
        let gpu = gpu_work(&options);
        let (began, jobs) = (Instant::now(), batch.len());
        let results = if batch.len() > 1 {
            engine_batch::run_batch(&options, &mut cache, &mut controlnets, batch)
        } else if let Some((job, reply)) = batch.pop() {
            let result = run_alone(
                &options,
                &mut cache,
                &mut controlnets,
                &controlnet_paths,
                job,
            );
            vec![(reply, result)]
        } else {
            continue;
        };
        drop(gpu);
        let ended = Instant::now();
        tracing::debug!(
            device = %options.device,
            jobs,
            idle_ms = last_end.map(|end| ms(arrived.saturating_duration_since(end))),
            gather_ms = ms(began - arrived),
            run_ms = ms(ended - began),
            "engine run"
        );
        last_end = Some(ended);
        // Published before the replies, so that a job's status report names the models
        // loaded for it.
        *loaded.lock().unwrap_or_else(PoisonError::into_inner) =
            cache.loaded().into_iter().map(str::to_owned).collect();
        for (reply, result) in results {
            // The receiver may be gone (shutdown); nothing else to do with the result then.
            let _ = reply.send(result);
        }
    }
    // The models' sessions free their GPU memory here.
    let _gpu = gpu_work(&options);
    drop(controlnets);
    drop(cache);
}

/// The engine thread's hold on the process-wide capture gate for one unit of work on a GPU
/// (see [`capture_gate`]): a CPU consumer takes none, so that a long CPU job never delays a
/// GPU consumer's CUDA graph capture.
fn gpu_work(options: &EngineOptions) -> Option<capture_gate::GpuWork> {
    matches!(options.device, Device::Cuda { .. }).then(capture_gate::gpu_work)
}

/// Runs one job alone.
fn run_alone(
    options: &EngineOptions,
    cache: &mut ModelCache,
    controlnets: &mut Option<LoadedControlNets>,
    controlnet_paths: &ControlNetPaths,
    job: EngineJob,
) -> Result<EngineRun, EngineFailure> {
    let EngineJob {
        model,
        request,
        progress,
        cancel,
        control,
        refiner,
    } = job;
    let target = Target {
        model: &model,
        request: &request,
        control: control.as_ref(),
        refiner: refiner.as_ref(),
        controlnet_paths,
    };
    run_one(options, cache, controlnets, &target, &progress, &cancel)
}

/// What one command asks the engine thread to run.
struct Target<'a> {
    model: &'a ModelRef,
    request: &'a GenerateRequest,
    control: Option<&'a ControlJob>,
    refiner: Option<&'a RefinerJob>,
    controlnet_paths: &'a ControlNetPaths,
}

fn run_one(
    options: &EngineOptions,
    cache: &mut ModelCache,
    controlnets: &mut Option<LoadedControlNets>,
    target: &Target<'_>,
    progress: &tokio_mpsc::UnboundedSender<Progress>,
    cancel: &AtomicBool,
) -> Result<EngineRun, EngineFailure> {
    let (model, request) = (target.model, target.request);
    let mut model_load = ensure_model(options, cache, controlnets, model)?;
    if let Some(refiner) = target.refiner {
        let keep = (model.name.as_str(), model.path.as_path());
        let refiner_load = catch_unwind(AssertUnwindSafe(|| {
            cache.ensure_loaded_keeping(
                &refiner.model.name,
                &refiner.model.path,
                Some(keep),
                |path| Engine::load(path, options),
            )
        }))
        .map_err(|panic| EngineFailure::Panicked(panic_message(panic.as_ref())))?
        .map_err(|failure| EngineFailure::Load {
            model: failure.model,
            source: failure.source,
        })?;
        if let Some(time) = refiner_load {
            *model_load.get_or_insert(Duration::ZERO) += time;
        }
    }
    let Some(engine) = cache.get(&model.name, &model.path) else {
        return Err(EngineFailure::ThreadGone);
    };
    let refiner_engine = match target.refiner {
        Some(refiner) => match cache.get(&refiner.model.name, &refiner.model.path) {
            Some(engine) => Some((engine, &refiner.refine)),
            None => return Err(EngineFailure::ThreadGone),
        },
        None => None,
    };
    let mut on_progress = |p: Progress| {
        let _ = progress.send(p);
        if cancel.load(Ordering::Relaxed) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let ready = controlnets
        .as_ref()
        .is_some_and(|loaded| loaded.belong_to(model));
    if target.control.is_some() && !ready {
        // One set of ControlNets at a time: free the other model's before loading.
        *controlnets = None;
        let started = Instant::now();
        let nets = catch_unwind(AssertUnwindSafe(|| {
            ControlNets::load(target.controlnet_paths, engine.model(), options)
        }))
        .map_err(|panic| EngineFailure::Panicked(panic_message(panic.as_ref())))?
        .map_err(|source| EngineFailure::Load {
            model: format!("{} (ControlNets)", model.name),
            source,
        })?;
        *controlnets = Some(LoadedControlNets {
            model: model.name.clone(),
            path: model.path.clone(),
            nets,
        });
        *model_load.get_or_insert(Duration::ZERO) += started.elapsed();
    }
    let nets = controlnets.as_ref().map(|loaded| &loaded.nets);
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        match (target.control, refiner_engine) {
            (None, Some((refiner, refine))) => {
                engine.generate_refined(refiner, request, refine, &mut on_progress)
            }
            (None, None) => engine.generate(request, &mut on_progress),
            (Some(_), Some(_)) => Err(EngineError::invalid(
                "refiner",
                "a refiner cannot be combined with controlnets",
            )),
            (Some(job), None) => {
                let nets = nets.ok_or_else(|| {
                    EngineError::invalid("controlnets", "no ControlNets are loaded")
                })?;
                let control = super::control::engine_request(job, nets)?;
                engine.generate_with_control(request, &control, &mut on_progress)
            }
        }
    }));
    match outcome {
        Ok(Ok(output)) => Ok(EngineRun { output, model_load }),
        Ok(Err(_)) if cancel.load(Ordering::Relaxed) => Err(EngineFailure::Cancelled),
        Ok(Err(err)) => Err(EngineFailure::Generate(err)),
        Err(panic) => {
            cache.remove(&model.name, &model.path);
            if let Some(refiner) = target.refiner {
                cache.remove(&refiner.model.name, &refiner.model.path);
            }
            *controlnets = None;
            Err(EngineFailure::Panicked(panic_message(panic.as_ref())))
        }
    }
}

/// Loads `model` into the cache unless it is there; returns the time it took when it loaded.
pub(super) fn ensure_model(
    options: &EngineOptions,
    cache: &mut ModelCache,
    controlnets: &mut Option<LoadedControlNets>,
    model: &ModelRef,
) -> Result<Option<Duration>, EngineFailure> {
    let model_load = catch_unwind(AssertUnwindSafe(|| {
        cache.ensure_loaded(&model.name, &model.path, |path| Engine::load(path, options))
    }))
    .map_err(|panic| EngineFailure::Panicked(panic_message(panic.as_ref())))?
    .map_err(|failure| EngineFailure::Load {
        model: failure.model,
        source: failure.source,
    })?;
    if model_load.is_some() {
        // The model was (re)loaded: ControlNets checked against its earlier files are stale.
        controlnets.take_if(|loaded| loaded.belong_to(model));
    }
    Ok(model_load)
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_owned()
    }
}

#[cfg(test)]
pub(super) mod tests;
