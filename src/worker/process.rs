//! One job on a GPU consumer, from the pulled message to its acknowledgement.
//!
//! 1. parse the message again (this worker's models and limits decide what it can run);
//! 2. `start_attempt`: a terminal row means a duplicate delivery (ack and skip); the attempt
//!    number fences out any older attempt;
//! 3. inference on the engine thread, with progress written to the row (see [`super::run`]);
//! 4. PNG encoding (blocking pool), upload of every image;
//! 5. `succeed` (images and metrics in one transaction), then ack.
//!
//! Failures are classified where they happen: a request this model cannot run, an engine
//! error or panic gives a `failed` row and an ack; a transient failure (database, storage,
//! broker) returns the job to the queue (`requeue` + nack) until `worker.max_attempts`, then
//! fails it and dead-letters the message with its reason.

use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use uuid::Uuid;

use super::consumer::ConsumerContext;
use super::engine_thread::{EngineFailure, ModelRef};
use super::run::{self, RunOutcome, StopReason};
use super::WorkerError;
use crate::broker::{DeadLetterReason, Incoming};
use crate::db::{ImageRecord, JobMetrics, StartOutcome, INVALID_REQUEST_CODE};
use crate::engine::png::{encode_png, PngParameters};
use crate::engine::{EngineError, GenerateOutput, GenerateRequest};
use crate::job::{self, FieldError, JobRejection, ValidJob};

/// Longest pause before a job is returned to the queue after a transient failure.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(5);

/// How a message is settled.
enum Disposition {
    /// Done: the row says what happened (or another attempt owns it).
    Ack,
    /// A transient failure: return the job to the queue, or give up after the last attempt.
    Retry {
        id: Uuid,
        attempt: Option<i32>,
        error: WorkerError,
    },
    /// The job cannot run any more: fail the row (when there is one) and dead-letter the
    /// message with the reason.
    GiveUp {
        id: Option<Uuid>,
        attempt: Option<i32>,
        reason: DeadLetterReason,
    },
}

impl Disposition {
    fn retry(id: Uuid, attempt: Option<i32>, error: impl Into<WorkerError>) -> Disposition {
        Disposition::Retry {
            id,
            attempt,
            error: error.into(),
        }
    }
}

/// Handles one pulled message; never panics and always settles the message.
pub(crate) async fn handle(ctx: &ConsumerContext, message: Incoming) {
    let disposition = process(ctx, &message).await;
    settle(ctx, &message, disposition).await;
}

async fn process(ctx: &ConsumerContext, message: &Incoming) -> Disposition {
    let received = Instant::now();
    let shared = &ctx.shared;
    let job = match job::parse_and_validate(
        &message.body,
        &shared.config.limits,
        &shared.config.models,
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

    let (attempt, queued_at) = match start(ctx, &job).await {
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
    let queue_wait = (Utc::now() - queued_at).to_std().unwrap_or_default();
    tracing::info!(job_id = %id, attempt, device = %ctx.device, "job started");

    let Some(model) = shared.config.models.get(&job.model) else {
        let errors = [FieldError::new(
            "model",
            job::codes::UNKNOWN_MODEL,
            format!("model {:?} is not available on this worker", job.model),
        )];
        return fail_invalid(ctx, id, Some(attempt), &errors).await;
    };
    let request = job.generate_request();
    let model_ref = ModelRef {
        name: model.name.clone(),
        path: model.path.clone(),
    };
    let outcome = run::run_engine(ctx, id, attempt, model_ref, request.clone()).await;
    let RunOutcome {
        result,
        stop,
        peak_gpu_mem_bytes,
    } = outcome;

    let engine_run = match (result, stop) {
        (_, Some(StopReason::Lost)) => {
            tracing::info!(job_id = %id, attempt, "a newer attempt owns the job: dropping this one");
            return Disposition::Ack;
        }
        (_, Some(StopReason::CancelRequested)) => {
            return match shared.db.finish_cancelled(id, attempt).await {
                Ok(_) => {
                    tracing::info!(job_id = %id, "job cancelled");
                    Disposition::Ack
                }
                Err(err) => Disposition::retry(id, Some(attempt), err),
            };
        }
        (_, Some(StopReason::Timeout)) => {
            let timeout = shared.config.worker.job_timeout_ms;
            let text = format!("the job ran longer than {timeout} ms");
            return fail(ctx, id, attempt, "timeout", &text, None).await;
        }
        (_, Some(StopReason::Shutdown)) => {
            return Disposition::retry(id, Some(attempt), WorkerError::ShuttingDown);
        }
        (Ok(run), None) => run,
        (Err(failure), None) => return engine_failure(ctx, id, attempt, failure).await,
    };

    let png_started = Instant::now();
    let encoded = encode_images(&request, &job.model, engine_run.output).await;
    let png_time = png_started.elapsed();
    let (output_timings, pngs) = match encoded {
        Ok(encoded) => encoded,
        Err(err) => return fail(ctx, id, attempt, err.code(), &err.to_string(), None).await,
    };

    let upload_started = Instant::now();
    let images = match upload(ctx, id, pngs).await {
        Ok(images) => images,
        Err(err) if err.is_retryable() => return Disposition::retry(id, Some(attempt), err),
        Err(err) => return fail(ctx, id, attempt, err.code(), &err.to_string(), None).await,
    };
    let upload_time = upload_started.elapsed();

    let timings = &output_timings;
    let metrics = JobMetrics {
        queue_wait_ms: ms(queue_wait),
        model_load_ms: engine_run.model_load.map(ms).unwrap_or(0.0),
        text_encoding_ms: ms(timings.text_encoding),
        denoising_ms: ms(timings.denoising),
        step_ms: timings.per_step.iter().copied().map(ms).collect(),
        session_run_ms: ms(timings.denoising_session_run),
        vae_ms: ms(timings.vae_decode),
        png_ms: ms(png_time),
        upload_ms: ms(upload_time),
        total_ms: ms(received.elapsed()),
        peak_gpu_mem_bytes,
    };
    match shared.db.succeed(id, attempt, &images, &metrics).await {
        Ok(true) => {
            tracing::info!(job_id = %id, attempt, images = images.len(), total_ms = metrics.total_ms, "job succeeded");
            Disposition::Ack
        }
        Ok(false) => {
            tracing::info!(job_id = %id, attempt, "the job changed hands before its result was stored");
            Disposition::Ack
        }
        Err(err) if err.is_retryable() => Disposition::retry(id, Some(attempt), err),
        Err(err) => fail(ctx, id, attempt, err.code(), &err.to_string(), None).await,
    }
}

/// Starts an attempt. `None`: the job is already terminal (a duplicate delivery).
async fn start(
    ctx: &ConsumerContext,
    job: &ValidJob,
) -> Result<Option<(i32, chrono::DateTime<Utc>)>, WorkerError> {
    let db = &ctx.shared.db;
    let worker_id = &ctx.shared.worker_id;
    let mut outcome = db.start_attempt(job.id, worker_id, &ctx.device).await?;
    if outcome == StartOutcome::NotFound {
        // Published straight to a work queue, past the intake: record it now.
        db.insert_queued(job).await?;
        outcome = db.start_attempt(job.id, worker_id, &ctx.device).await?;
    }
    match outcome {
        StartOutcome::Started { attempt, queued_at } => Ok(Some((attempt, queued_at))),
        StartOutcome::AlreadyTerminal(state) => {
            tracing::info!(job_id = %job.id, %state, "job already finished: skipping the duplicate");
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
async fn fail(
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

/// Encodes every image as PNG with A1111 parameters, on the blocking pool.
async fn encode_images(
    request: &GenerateRequest,
    model: &str,
    output: GenerateOutput,
) -> Result<(crate::engine::StageTimings, Vec<EncodedImage>), EngineError> {
    let request = request.clone();
    let model = model.to_owned();
    let joined = tokio::task::spawn_blocking(move || {
        let mut encoded = Vec::with_capacity(output.images.len());
        for image in &output.images {
            let parameters = PngParameters::from_request(&request, image.index, Some(&model));
            let text = parameters.to_a1111();
            let png = encode_png(&image.rgb, image.width, image.height, Some(&text))?;
            encoded.push(EncodedImage {
                index: image.index,
                seed: image.seed,
                width: image.width,
                height: image.height,
                png: Bytes::from(png),
            });
        }
        Ok((output.timings, encoded))
    })
    .await;
    match joined {
        Ok(result) => result,
        Err(join) => Err(EngineError::InvalidRequest {
            field: "image",
            message: format!("PNG encoding stopped: {join}"),
        }),
    }
}

struct EncodedImage {
    index: u32,
    seed: u64,
    width: u32,
    height: u32,
    png: Bytes,
}

/// Uploads every image (concurrently); the records are in image order.
async fn upload(
    ctx: &ConsumerContext,
    id: Uuid,
    images: Vec<EncodedImage>,
) -> Result<Vec<ImageRecord>, crate::storage::StorageError> {
    let storage = &ctx.shared.storage;
    let uploads = images.into_iter().map(|image| async move {
        let key = storage.image_key(id, image.index);
        storage.put(&key, image.png).await?;
        Ok(ImageRecord {
            index: image.index,
            key,
            seed: image.seed,
            width: image.width,
            height: image.height,
        })
    });
    futures::future::try_join_all(uploads).await
}

async fn settle(ctx: &ConsumerContext, message: &Incoming, disposition: Disposition) {
    let shared = &ctx.shared;
    match disposition {
        Disposition::Ack => ack(message).await,
        Disposition::GiveUp {
            id,
            attempt,
            reason,
        } => give_up(ctx, message, id, attempt, reason).await,
        Disposition::Retry { id, attempt, error } => {
            let max_attempts = i64::from(shared.config.worker.max_attempts);
            if let Some(attempt) = attempt.filter(|a| i64::from(*a) >= max_attempts) {
                let reason = DeadLetterReason {
                    code: error.code().to_owned(),
                    message: format!("gave up after {attempt} attempts: {error}"),
                };
                give_up(ctx, message, Some(id), Some(attempt), reason).await;
                return;
            }
            tracing::warn!(job_id = %id, ?attempt, code = error.code(), error = %error, "job goes back to the queue");
            if let Some(attempt) = attempt {
                if let Err(err) = shared.db.requeue(id, attempt).await {
                    tracing::warn!(job_id = %id, error = %err, "cannot mark the job queued again");
                }
            }
            match error {
                WorkerError::ShuttingDown => {}
                WorkerError::Db(_) => super::wait_for_database(&shared.db).await,
                _ => tokio::time::sleep(retry_pause(attempt)).await,
            }
            nack(message).await;
        }
    }
}

/// Fails the row (when there is one), dead-letters the message with the reason, then acks.
/// Anything that cannot be written sends the message back for another try.
async fn give_up(
    ctx: &ConsumerContext,
    message: &Incoming,
    id: Option<Uuid>,
    attempt: Option<i32>,
    reason: DeadLetterReason,
) {
    let shared = &ctx.shared;
    if let Some(id) = id {
        if let Err(err) = shared
            .db
            .fail(id, attempt, &reason.code, &reason.message, None)
            .await
        {
            tracing::warn!(job_id = %id, error = %err, "cannot record the failure; retrying later");
            super::wait_for_database(&shared.db).await;
            nack(message).await;
            return;
        }
    }
    let properties = message.properties.clone();
    match shared
        .broker
        .publish_dead_letter(&message.body, properties, &reason)
        .await
    {
        Ok(()) => {
            tracing::warn!(job_id = ?id, code = %reason.code, "message dead-lettered");
            ack(message).await;
        }
        Err(err) => {
            tracing::warn!(error = %err, "cannot dead-letter the message; retrying later");
            tokio::time::sleep(MAX_RETRY_PAUSE).await;
            nack(message).await;
        }
    }
}

async fn ack(message: &Incoming) {
    if let Err(err) = message.ack().await {
        tracing::warn!(error = %err, "cannot ack a job message; its redelivery will be skipped");
    }
}

async fn nack(message: &Incoming) {
    if let Err(err) = message.nack_requeue().await {
        tracing::warn!(error = %err, "cannot return a job message; the broker will redeliver it");
    }
}

/// Exponential pause before a job goes back to the queue: 0.5 s, 1 s, 2 s, ... up to 5 s.
fn retry_pause(attempt: Option<i32>) -> Duration {
    let exponent = attempt.unwrap_or(1).clamp(1, 5) as u32;
    Duration::from_millis(250 * 2u64.pow(exponent)).min(MAX_RETRY_PAUSE)
}

fn ms(duration: Duration) -> f64 {
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
