//! What a finished job leaves behind: its images PNG-encoded (with their A1111 `parameters`
//! text, on the blocking pool) and uploaded to storage, then its `succeeded` row with images
//! and metrics in one transaction. A job served from the result cache gets the same ending
//! from copies of an earlier job's PNGs.
//!
//! Storage or database trouble returns the job to the queue; an image that cannot be encoded
//! fails it.

use std::time::Instant;

use bytes::Bytes;
use uuid::Uuid;

use super::consumer::ConsumerContext;
use super::engine_thread::EngineRun;
use super::process::{fail, ms, Started};
use super::result_cache;
use super::settle::Disposition;
use crate::db::{ImageRecord, JobMetrics};
use crate::engine::png::{encode_png, PngParameters};
use crate::engine::{EngineError, GenerateRequest, GeneratedImage};
use crate::job::ValidJob;

/// What the engine produced for a job.
pub(super) struct Output {
    pub(super) request: GenerateRequest,
    pub(super) run: EngineRun,
    pub(super) peak_gpu_mem_bytes: Option<u64>,
    /// Set when the job runs with the result cache: recorded so later jobs can reuse it.
    pub(super) cache_key: Option<String>,
}

/// Serve a job from the result cache: `None` when there is no usable earlier result (the job
/// then runs; a cache that cannot be read never fails a job).
pub(super) async fn serve_cached(
    ctx: &ConsumerContext,
    job: &ValidJob,
    started: &Started,
    key: &str,
) -> Option<Disposition> {
    let db = &ctx.shared.db;
    let (id, attempt) = (job.id, started.attempt);
    let hit = match db.find_cached(key, id).await {
        Ok(hit) => hit?,
        Err(err) => {
            tracing::warn!(job_id = %id, error = %err, "result cache lookup failed: running the job");
            return None;
        }
    };
    let copy_started = Instant::now();
    let images = match result_cache::copy_images(ctx, id, &hit).await {
        Ok(images) => images,
        Err(err) => {
            tracing::warn!(job_id = %id, from = %hit.job, error = %err, "cached images unreadable: running the job");
            return None;
        }
    };
    let metrics = JobMetrics {
        queue_wait_ms: ms(started.queue_wait),
        model_load_ms: 0.0,
        text_encoding_ms: 0.0,
        denoising_ms: 0.0,
        step_ms: Vec::new(),
        session_run_ms: 0.0,
        vae_ms: 0.0,
        png_ms: 0.0,
        upload_ms: ms(copy_started.elapsed()),
        total_ms: ms(started.began.elapsed()),
        peak_gpu_mem_bytes: None,
        controlnet_ms: 0.0,
        refiner_ms: 0.0,
        batch_size: 1,
    };
    let recorded = async {
        db.set_cache_key(id, attempt, key).await?;
        let done = db.succeed(id, attempt, &images, &metrics).await?;
        if done {
            db.set_cached_from(id, hit.job).await?;
        }
        Ok::<bool, crate::db::DbError>(done)
    };
    Some(match recorded.await {
        Ok(true) => {
            tracing::info!(job_id = %id, attempt, from = %hit.job, total_ms = metrics.total_ms, "job served from the result cache");
            Disposition::Ack
        }
        Ok(false) => Disposition::Ack,
        Err(err) if err.is_retryable() => Disposition::retry(id, Some(attempt), err),
        Err(err) => fail(ctx, id, attempt, err.code(), &err.to_string(), None).await,
    })
}

/// Encodes and uploads the images, then records the result with its metrics.
pub(super) async fn store(
    ctx: &ConsumerContext,
    job: &ValidJob,
    started: &Started,
    output: Output,
) -> Disposition {
    let shared = &ctx.shared;
    let (id, attempt) = (job.id, started.attempt);
    let Output {
        request,
        run,
        peak_gpu_mem_bytes,
        cache_key,
    } = output;
    let timings = run.output.timings.clone();
    let batch_size = run.output.batch_size;

    let png_started = Instant::now();
    let refiner = job
        .refine()
        .map(|r| (format!("{}/refiner", job.model), r.handoff));
    let pngs = match encode_images(&request, &job.model, refiner, run.output.images).await {
        Ok(pngs) => pngs,
        Err(err) => return fail(ctx, id, attempt, err.code(), &err.to_string(), None).await,
    };
    let png_time = png_started.elapsed();

    let upload_started = Instant::now();
    let images = match upload(ctx, id, pngs).await {
        Ok(images) => images,
        Err(err) if err.is_retryable() => return Disposition::retry(id, Some(attempt), err),
        Err(err) => return fail(ctx, id, attempt, err.code(), &err.to_string(), None).await,
    };
    let upload_time = upload_started.elapsed();

    let metrics = JobMetrics {
        queue_wait_ms: ms(started.queue_wait),
        model_load_ms: run.model_load.map(ms).unwrap_or(0.0),
        text_encoding_ms: ms(timings.text_encoding),
        denoising_ms: ms(timings.denoising),
        step_ms: timings.per_step.iter().copied().map(ms).collect(),
        session_run_ms: ms(timings.denoising_session_run),
        controlnet_ms: ms(timings.controlnet),
        refiner_ms: ms(timings.refiner_text_encoding + timings.refiner_denoising),
        vae_ms: ms(timings.vae_decode),
        png_ms: ms(png_time),
        upload_ms: ms(upload_time),
        total_ms: ms(started.began.elapsed()),
        peak_gpu_mem_bytes,
        batch_size: u32::try_from(batch_size).unwrap_or(u32::MAX),
    };
    if let Some(key) = &cache_key {
        if let Err(err) = shared.db.set_cache_key(id, attempt, key).await {
            tracing::warn!(job_id = %id, error = %err, "cannot record the result cache key");
        }
    }
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

/// Why the images could not be encoded.
#[derive(Debug, thiserror::Error)]
enum PngFailure {
    #[error(transparent)]
    Encode(EngineError),
    #[error("PNG encoding stopped: {0}")]
    Aborted(String),
}

impl PngFailure {
    fn code(&self) -> &'static str {
        match self {
            PngFailure::Encode(err) => err.code(),
            PngFailure::Aborted(_) => "png_encode_failed",
        }
    }
}

/// Encodes every image as PNG with its A1111 `parameters` text, on the blocking pool
/// (`refiner`: the refiner's name and hand-off, written as A1111's "Refiner" and "Refiner switch
/// at").
async fn encode_images(
    request: &GenerateRequest,
    model: &str,
    refiner: Option<(String, f64)>,
    images: Vec<GeneratedImage>,
) -> Result<Vec<EncodedImage>, PngFailure> {
    let request = request.clone();
    let model = model.to_owned();
    let joined = tokio::task::spawn_blocking(move || {
        images
            .into_iter()
            .map(|image| {
                let mut parameters =
                    PngParameters::from_request(&request, image.index, Some(&model));
                if let Some((name, handoff)) = &refiner {
                    parameters.extra.push(("Refiner".to_owned(), name.clone()));
                    parameters
                        .extra
                        .push(("Refiner switch at".to_owned(), handoff.to_string()));
                }
                let text = parameters.to_a1111();
                let png = encode_png(&image.rgb, image.width, image.height, Some(&text))?;
                Ok(EncodedImage {
                    index: image.index,
                    seed: image.seed,
                    width: image.width,
                    height: image.height,
                    png: Bytes::from(png),
                })
            })
            .collect::<Result<Vec<_>, EngineError>>()
    })
    .await;
    match joined {
        Ok(result) => result.map_err(PngFailure::Encode),
        Err(join) => Err(PngFailure::Aborted(join.to_string())),
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
