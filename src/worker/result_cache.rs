//! The result cache: a job that asks for it (`"cache": true`, or `worker.result_cache` on and no
//! `"cache": false`) first looks for a succeeded job with the same cache key and, if there is
//! one, copies that job's stored PNGs to its own keys instead of running the engine.
//!
//! The key is the normalized request without what does not change the images (`id`,
//! `priority`, `metadata`, `cache`), with the model's name, a digest of the model directory's
//! files (paths, sizes, modification times: replaced weights make new keys) and this build's
//! version; for a refined job also a digest of the refiner's directory. The seed is part of the
//! request, so only a job with a recorded seed can hit. The
//! copied PNGs are byte for byte those of the earlier job, whose `parameters` text is the same
//! for the same request.
//!
//! Jobs with ControlNets or an init image never use the cache: their input images (behind
//! storage keys or URLs) and the ControlNet files can change without changing the request, and
//! hashing an image would mean fetching it before every lookup.

use std::path::Path;

use bytes::Bytes;
use uuid::Uuid;

use super::consumer::ConsumerContext;
use super::model_cache::Fingerprint;
use crate::db::{CachedResult, ImageRecord};
use crate::job::ValidJob;
use crate::storage::StorageError;

/// Whether this job uses the result cache.
pub fn enabled(job: &ValidJob, deployment_default: bool) -> bool {
    let controlled = job
        .message
        .controlnets
        .as_ref()
        .is_some_and(|nets| !nets.is_empty());
    let img2img = job.message.init_image.is_some();
    !controlled && !img2img && job.message.cache.unwrap_or(deployment_default)
}

/// The cache key of a job run with the model at `model_path` (and, for a refined job, the
/// refiner at `refiner_path`).
pub fn cache_key(job: &ValidJob, model_path: &Path, refiner_path: Option<&Path>) -> String {
    let mut message = job.message.clone();
    message.id = Uuid::nil();
    message.priority = None;
    message.metadata = None;
    message.cache = None;
    let request = serde_json::to_string(&message).unwrap_or_default();
    let refiner = match (&message.refiner, refiner_path) {
        (Some(_), Some(path)) => format!(" | refiner {:016x}", Fingerprint::of(path).digest()),
        _ => String::new(),
    };
    format!(
        "sdxl-worker {} | model {} {:016x}{refiner} | {request}",
        env!("CARGO_PKG_VERSION"),
        job.model,
        Fingerprint::of(model_path).digest()
    )
}

/// Copy the images of `hit` to the keys of job `id`, in image order.
pub(crate) async fn copy_images(
    ctx: &ConsumerContext,
    id: Uuid,
    hit: &CachedResult,
) -> Result<Vec<ImageRecord>, StorageError> {
    let storage = &ctx.shared.storage;
    let mut records = Vec::with_capacity(hit.images.len());
    for image in &hit.images {
        let bytes: Bytes = storage.get(&image.key).await?;
        let key = storage.image_key(id, image.index);
        storage.put(&key, bytes).await?;
        records.push(ImageRecord {
            key,
            ..image.clone()
        });
    }
    Ok(records)
}
