//! One job on a GPU consumer, from the pulled message to its acknowledgement.
//!
//! 1. parse the message again (this worker's models and limits decide what it can run);
//! 2. `start_attempt`: a terminal row means a duplicate delivery (ack and skip); the attempt
//!    number fences out any older attempt;
//! 3. for ControlNet and image-to-image jobs, fetching and decoding the input images (see
//!    [`super::image_input`]: an unusable image fails the job with its field, storage or
//!    network trouble retries it);
//!    then inference on the engine thread, with progress written to the row (see
//!    [`super::run`]);
//! 4. PNG encoding (blocking pool), upload of every image, then `succeed` (images and
//!    metrics in one transaction; see [`super::output`]), then ack.
//!
//! Failures are classified where they happen: a request this model cannot run, an engine
//! error or panic gives a `failed` row and an ack; a transient failure (database, storage,
//! broker) returns the job to the queue (`requeue` + nack) until `worker.max_attempts`, then
//! fails it and dead-letters the message with its reason.

use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::SemaphorePermit;
use uuid::Uuid;

use super::consumer::ConsumerContext;
use super::control;
use super::engine_batch::Claim;
use super::engine_thread::{EngineFailure, JobExtras, ModelRef, RefinerJob};
use super::image_input;
use super::output::{serve_cached, store, Output};
use super::result_cache;
use super::run::{self, RunOutcome, StopReason};
use super::settle::{settle, Disposition};
use super::WorkerError;
use crate::broker::{DeadLetterReason, Incoming};
use crate::db::{StartOutcome, INVALID_REQUEST_CODE};
use crate::engine::EngineError;
use crate::job::{self, FieldError, JobRejection, ValidJob};

/// Handles one pulled message; never panics and always settles the message.
/// `claim` marks the job as on its way to the engine until it is submitted (or turns out not
/// to be batchable, or ends early).
pub(crate) async fn handle(ctx: &ConsumerContext, message: Incoming, claim: Claim) {
    let disposition = process(ctx, &message, claim).await;
    settle(ctx, &message, disposition).await;
}

async fn process(ctx: &ConsumerContext, message: &Incoming, claim: Claim) -> Disposition {
    let shared = &ctx.shared;
    let job = match job::parse_and_validate_with(
        &message.body,
        &shared.config.limits,
        &shared.models.current(),
        &shared.config.controlnet,
    ) {
        Ok(job) => job,
        Err(JobRejection::Invalid { id, errors }) => return reject(ctx, id, &errors).await,
        Err(JobRejection::Unreadable { code, message }) => {
            return Disposition::GiveUp {
                id: None,
                attempt: None,
                reason: DeadLetterReason {
                    code: code.to_owned(),
                    message,
                },
            }
        }
    };
    let id = job.id;

    // One job at a time uses the engine, or up to `worker.max_batch` batchable jobs together.
    // A job held beside them (`worker.prefetch` above that) waits here, still `queued`, so
    // that its attempt and its queue wait start when the engine is free, while the jobs before
    // it encode and uploads their images.
    let mut abort = ctx.abort.clone();
    let (permits, claim) = if batchable(&job) {
        (1, Some(claim))
    } else {
        // It will never join a batch: a forming batch need not wait for it.
        drop(claim);
        (ctx.max_batch, None)
    };
    let slot = tokio::select! {
        slot = ctx.engine_slot.acquire_many(permits) => slot.ok(),
        () = super::signalled(&mut abort) => None,
    };
    let Some(slot) = slot else {
        return Disposition::retry(id, None, WorkerError::ShuttingDown);
    };
    let mut claim = claim;
    if let Some(claim) = &mut claim {
        claim.admit();
    }
    // `total_ms` starts here: time spent waiting for the engine is queue wait.
    let began = Instant::now();

    let (attempt, queued_at) = match start(ctx, &job, message.redelivered).await {
        Ok(Some(started)) => started,
        Ok(None) => return Disposition::Ack,
        Err(err) => return Disposition::retry(id, None, err),
    };
    let max_attempts = i64::from(shared.config.worker.max_attempts);
    if i64::from(attempt) > max_attempts {
        // Earlier attempts ended without a result (the process died while running them).
        return Disposition::GiveUp {
            id: Some(id),
            attempt: Some(attempt),
            reason: DeadLetterReason {
                code: "attempts_exhausted".to_owned(),
                message: format!("the job was started {attempt} times without finishing"),
            },
        };
    }
    super::fault::after_start(&job.message.prompt);
    let queue_wait = (Utc::now() - queued_at).to_std().unwrap_or_default();
    tracing::info!(job_id = %id, attempt, device = %ctx.device, "job started");
    let started = Started {
        attempt,
        queue_wait,
        began,
    };
    execute(ctx, &job, started, slot, claim).await
}

/// Whether a job may share a batch with others (the engine thread checks the rest of the
/// batch key: model, size, steps, scheduler, guidance).
fn batchable(job: &ValidJob) -> bool {
    let m = &job.message;
    m.controlnets.as_ref().is_none_or(|c| c.is_empty())
        && m.init_image.is_none()
        && job.refine().is_none()
}

/// A job whose attempt has started.
pub(super) struct Started {
    pub(super) attempt: i32,
    pub(super) queue_wait: Duration,
    /// When the job got the engine (the start of `total_ms`).
    pub(super) began: Instant,
}

/// Runs the engine and turns its outcome into a disposition.
async fn execute(
    ctx: &ConsumerContext,
    job: &ValidJob,
    started: Started,
    engine_slot: SemaphorePermit<'_>,
    claim: Option<Claim>,
) -> Disposition {
    let shared = &ctx.shared;
    let (id, attempt) = (job.id, started.attempt);
    let models = shared.models.current();
    let Some(model) = models.get(&job.model) else {
        let errors = [FieldError::new(
            "model",
            job::codes::UNKNOWN_MODEL,
            format!("model {:?} is not available on this worker", job.model),
        )];
        return fail_invalid(ctx, id, Some(attempt), &errors).await;
    };
    let cache_key = result_cache::enabled(job, shared.config.worker.result_cache)
        .then(|| result_cache::cache_key(job, &model.path, model.refiner.as_deref()));
    if let Some(key) = &cache_key {
        if let Some(disposition) = serve_cached(ctx, job, &started, key).await {
            return disposition;
        }
    }
    let mut request = job.generate_request();
    if let (Some(init), Some(strength)) = (&job.message.init_image, job.img2img_strength()) {
        let size = (request.width, request.height);
        let config = &shared.config.controlnet;
        match image_input::load_init(init, strength, size, &shared.storage, config).await {
            Ok(img2img) => request.controls.img2img = Some(img2img),
            Err(err) if err.retryable => {
                let (code, message) = (err.code, format!("init_image: {err}"));
                return Disposition::retry(
                    id,
                    Some(attempt),
                    WorkerError::Engine { code, message },
                );
            }
            Err(err) => {
                let errors = [FieldError::new("init_image", err.code, err.to_string())];
                return fail_invalid(ctx, id, Some(attempt), &errors).await;
            }
        }
    }
    let model_ref = ModelRef {
        name: model.name.clone(),
        path: model.path.clone(),
    };
    let control = match job.message.controlnets.as_deref() {
        Some(specs) if !specs.is_empty() => {
            match control::load_inputs(specs, &shared.storage, &shared.config.controlnet).await {
                Ok(inputs) => Some(control::ControlJob {
                    inputs,
                    guess_mode: job.message.guess_mode.unwrap_or(false),
                }),
                Err(err) if err.retryable => {
                    let error = WorkerError::Engine {
                        code: err.code,
                        message: err.to_string(),
                    };
                    return Disposition::retry(id, Some(attempt), error);
                }
                Err(err) => {
                    let errors = [FieldError::new(err.field(), err.code, err.to_string())];
                    return fail_invalid(ctx, id, Some(attempt), &errors).await;
                }
            }
        }
        _ => None,
    };
    // Validation made sure the model has a refiner when the job asks for one.
    let refiner = job
        .refine()
        .zip(model.refiner.as_ref())
        .map(|(refine, path)| RefinerJob {
            model: ModelRef {
                name: format!("{}/refiner", model.name),
                path: path.clone(),
            },
            refine,
        });
    let timeout = run::job_timeout(&shared.config.worker, &request);
    let extras = JobExtras { control, refiner };
    let work = run::EngineWork {
        model: model_ref,
        request: request.clone(),
        extras,
        claim,
    };
    let outcome = run::run_engine(ctx, id, attempt, work, timeout).await;
    drop(engine_slot);
    let RunOutcome {
        result,
        stop,
        peak_gpu_mem_bytes,
    } = outcome;
    match (result, stop) {
        (_, Some(reason)) => stopped(ctx, id, attempt, reason, timeout).await,
        (Ok(run), None) => {
            let output = Output {
                request,
                run,
                peak_gpu_mem_bytes,
                cache_key,
            };
            store(ctx, job, &started, output).await
        }
        (Err(failure), None) => engine_failure(ctx, id, attempt, failure).await,
    }
}

/// A run that was asked to stop before it finished.
async fn stopped(
    ctx: &ConsumerContext,
    id: Uuid,
    attempt: i32,
    reason: StopReason,
    timeout: Duration,
) -> Disposition {
    let shared = &ctx.shared;
    match reason {
        StopReason::Lost => {
            tracing::info!(job_id = %id, attempt, "a newer attempt owns the job: dropping this one");
            Disposition::Ack
        }
        StopReason::CancelRequested => match shared.db.finish_cancelled(id, attempt).await {
            Ok(_) => {
                tracing::info!(job_id = %id, "job cancelled");
                Disposition::Ack
            }
            Err(err) => Disposition::retry(id, Some(attempt), err),
        },
        StopReason::Timeout => {
            let text = format!(
                "the job ran longer than its timeout of {} ms (from its cost estimate, at most \
                 worker.job_timeout_ms)",
                timeout.as_millis()
            );
            fail(ctx, id, attempt, "timeout", &text, None).await
        }
        StopReason::Shutdown => Disposition::retry(id, Some(attempt), WorkerError::ShuttingDown),
    }
}

/// Starts an attempt. `None`: the job is already terminal or running elsewhere (a duplicate).
async fn start(
    ctx: &ConsumerContext,
    job: &ValidJob,
    redelivered: bool,
) -> Result<Option<(i32, chrono::DateTime<Utc>)>, WorkerError> {
    let db = &ctx.shared.db;
    let worker_id = &ctx.shared.worker_id;
    // Only a redelivered message may take over a running attempt (its worker is gone); a
    // second copy of a job that is running elsewhere is a duplicate.
    // A redelivery of a job whose worker is alive (after a broker restart or a consumer
    // timeout) leaves it in that worker's hands; the lease sweep recovers it if that worker
    // dies.
    let lease = Some(Duration::from_millis(ctx.shared.config.worker.lease_ms));
    let mut outcome = db
        .start_attempt_leased(job.id, worker_id, &ctx.device, redelivered, lease)
        .await?;
    if outcome == StartOutcome::NotFound {
        // Published straight to a work queue, past the intake: record it now.
        db.insert_queued(job).await?;
        outcome = db
            .start_attempt_leased(job.id, worker_id, &ctx.device, redelivered, lease)
            .await?;
    }
    match outcome {
        StartOutcome::Started { attempt, queued_at } => Ok(Some((attempt, queued_at))),
        StartOutcome::AlreadyTerminal(state) => {
            tracing::info!(job_id = %job.id, %state, "job already finished: skipping the duplicate");
            Ok(None)
        }
        StartOutcome::InHand => {
            tracing::info!(job_id = %job.id, "job is running elsewhere: skipping the duplicate");
            Ok(None)
        }
        StartOutcome::NotFound => {
            tracing::warn!(job_id = %job.id, "job row vanished before its start");
            Ok(None)
        }
    }
}

/// A message this worker cannot run (its limits or models differ from the intake's).
async fn reject(ctx: &ConsumerContext, id: Uuid, errors: &[FieldError]) -> Disposition {
    tracing::info!(job_id = %id, errors = %job::summarize(errors), "job invalid on this worker");
    let db = &ctx.shared.db;
    let details = field_error_details(errors);
    let text = job::summarize(errors);
    match db
        .fail(id, None, INVALID_REQUEST_CODE, &text, Some(details))
        .await
    {
        Ok(true) => Disposition::Ack,
        Ok(false) => match db.get(id).await {
            Ok(Some(_)) => Disposition::Ack,
            Ok(None) => match db
                .insert_invalid(id, &serde_json::Value::Null, errors)
                .await
            {
                Ok(()) => Disposition::Ack,
                Err(err) => Disposition::retry(id, None, err),
            },
            Err(err) => Disposition::retry(id, None, err),
        },
        Err(err) => Disposition::retry(id, None, err),
    }
}

async fn fail_invalid(
    ctx: &ConsumerContext,
    id: Uuid,
    attempt: Option<i32>,
    errors: &[FieldError],
) -> Disposition {
    let details = field_error_details(errors);
    let text = job::summarize(errors);
    match ctx
        .shared
        .db
        .fail(id, attempt, INVALID_REQUEST_CODE, &text, Some(details))
        .await
    {
        Ok(_) => Disposition::Ack,
        Err(err) => Disposition::retry(id, attempt, err),
    }
}

fn field_error_details(errors: &[FieldError]) -> serde_json::Value {
    serde_json::json!({ "errors": errors })
}

async fn engine_failure(
    ctx: &ConsumerContext,
    id: Uuid,
    attempt: i32,
    failure: EngineFailure,
) -> Disposition {
    match &failure {
        EngineFailure::Generate(EngineError::InvalidRequest { field, message }) => {
            let errors = [FieldError::new(
                *field,
                job::codes::INVALID_VALUE,
                message.clone(),
            )];
            fail_invalid(ctx, id, Some(attempt), &errors).await
        }
        EngineFailure::Generate(err) if err.is_retryable() => {
            let error = WorkerError::Engine {
                code: err.code(),
                message: err.to_string(),
            };
            Disposition::retry(id, Some(attempt), error)
        }
        EngineFailure::ThreadGone => Disposition::retry(
            id,
            Some(attempt),
            WorkerError::Engine {
                code: failure.code(),
                message: failure.to_string(),
            },
        ),
        _ => {
            tracing::warn!(job_id = %id, code = failure.code(), error = %failure, "engine failure");
            let text = error_chain(&failure);
            fail(ctx, id, attempt, failure.code(), &text, None).await
        }
    }
}

/// Marks the attempt failed (ack), or retries when the database cannot record it.
pub(super) async fn fail(
    ctx: &ConsumerContext,
    id: Uuid,
    attempt: i32,
    code: &str,
    message: &str,
    details: Option<serde_json::Value>,
) -> Disposition {
    match ctx
        .shared
        .db
        .fail(id, Some(attempt), code, message, details)
        .await
    {
        Ok(_) => {
            tracing::info!(job_id = %id, attempt, code, "job failed");
            Disposition::Ack
        }
        Err(err) => Disposition::retry(id, Some(attempt), err),
    }
}

pub(super) fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// The error and its causes, `: `-separated.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
