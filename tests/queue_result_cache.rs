//! The result cache through a running worker: a job that asks for caching and repeats an
//! earlier succeeded request (same model, parameters and seed) is served from the stored images,
//! byte for byte, in a small fraction of the first run's time, and the row names its source;
//! a different seed or `"cache": false` runs again.

mod queue_harness;
mod support;

use std::time::Duration;

use queue_harness::{Stack, StorageKind};
use sdxl_worker::db::{JobRow, JobState};
use sdxl_worker::storage::Storage;
use sdxl_worker::worker::RunOptions;
use serde_json::{json, Value};
use uuid::Uuid;

fn job(id: Uuid, seed: u64, cache: Option<bool>) -> Value {
    let mut job = json!({
        "version": 1,
        "id": id,
        "prompt": "a (lighthouse:1.2) on a cliff at dawn",
        "style": "watercolor",
        "width": 64,
        "height": 64,
        "steps": 30,
        "seed": seed,
        "priority": 1,
        "metadata": { "run": id.to_string() }
    });
    if let Some(cache) = cache {
        job["cache"] = cache.into();
    }
    job
}

async fn run(stack: &Stack, message: &Value) -> (JobRow, f64) {
    stack.publish(message).await;
    let id: Uuid = message["id"].as_str().unwrap().parse().unwrap();
    let row = stack.wait_terminal(id, Duration::from_secs(300)).await;
    assert_eq!(row.state, JobState::Succeeded, "{row:#?}");
    let metrics = stack.db.db.get_metrics(id).await.unwrap().unwrap();
    (row, metrics.total_ms)
}

async fn pngs(storage: &Storage, row: &JobRow) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for image in &row.images {
        out.push(storage.get(&image.key).await.unwrap().to_vec());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identical_request_is_served_from_the_stored_images() {
    let stack = Stack::new("rcache", StorageKind::Local).await;
    let storage = Storage::from_config(&stack.config.storage).await.unwrap();
    let worker = stack.start_worker(RunOptions::default());

    let first_id = Uuid::new_v4();
    let (first, first_ms) = run(&stack, &job(first_id, 11, Some(true))).await;
    assert_eq!(stack.db.db.cached_from(first_id).await.unwrap(), None);

    // Same request under another id, priority and metadata: served from the cache.
    let second_id = Uuid::new_v4();
    let mut repeat = job(second_id, 11, Some(true));
    repeat["priority"] = 3.into();
    let (second, second_ms) = run(&stack, &repeat).await;
    assert_eq!(
        stack.db.db.cached_from(second_id).await.unwrap(),
        Some(first_id)
    );
    assert_eq!(pngs(&storage, &second).await, pngs(&storage, &first).await);
    assert_eq!(second.images.len(), 1);
    for image in &second.images {
        assert!(
            image.key.contains(&second_id.to_string()),
            "own keys: {image:?}"
        );
    }
    let metrics = stack.db.db.get_metrics(second_id).await.unwrap().unwrap();
    assert_eq!(metrics.denoising_ms, 0.0);
    eprintln!("first run {first_ms:.1} ms, from the cache {second_ms:.1} ms");
    assert!(
        second_ms < 0.05 * first_ms,
        "cached {second_ms} ms is not under 5% of {first_ms} ms"
    );

    // Another seed, or caching turned off, runs the engine.
    let other_seed = Uuid::new_v4();
    let mut other = job(other_seed, 12, Some(true));
    other["steps"] = 2.into();
    run(&stack, &other).await;
    assert_eq!(stack.db.db.cached_from(other_seed).await.unwrap(), None);
    let opted_out = Uuid::new_v4();
    let (row, _) = run(&stack, &job(opted_out, 11, None)).await;
    assert_eq!(stack.db.db.cached_from(opted_out).await.unwrap(), None);
    // The engine is deterministic: running again gives the same bytes.
    assert_eq!(pngs(&storage, &row).await, pngs(&storage, &first).await);

    worker.stop().await.unwrap();
    stack.teardown().await;
}
