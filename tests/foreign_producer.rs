//! A job published by a foreign client (Python, pika) with its own AMQP properties appears as
//! a `queued` row before any GPU consumer runs, and ends `succeeded` with its images in the
//! S3 server once a consumer starts.

mod queue_harness;
mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use queue_harness::{consumers_only, intake_only, small_job, Stack, StorageKind};
use sdxl_worker::db::JobState;
use uuid::Uuid;

fn publish_with_pika(stack: &Stack, body: &[u8], id: Uuid, priority: u8) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("job.json");
    std::fs::write(&file, body).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/producers/publish.py");
    let output = Command::new("python3")
        .arg(script)
        .args(["--url", &stack.config.broker.url])
        .args(["--exchange", &stack.broker.topology().jobs_exchange()])
        .args(["--body-file", file.to_str().unwrap()])
        .args(["--message-id", &id.to_string()])
        .args(["--priority", &priority.to_string()])
        .output()
        .expect("python3 runs (pip install pika)");
    assert!(
        output.status.success(),
        "pika producer failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_job_is_queued_before_any_gpu_consumer_then_succeeds_in_s3() {
    let stack = Stack::new("foreign", StorageKind::S3).await;
    let id = Uuid::new_v4();
    let mut job = small_job(id);
    job["num_images"] = 2.into();
    publish_with_pika(&stack, &serde_json::to_vec(&job).unwrap(), id, 3);

    // Only the intake runs: the row appears as queued, read with plain SQL.
    let intake = stack.start_worker(intake_only());
    let mut state = None;
    for _ in 0..200 {
        state = stack.state_sql(id).await;
        if state.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(state.as_deref(), Some("queued"));
    // And it stays queued while no GPU consumer runs.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(stack.state_sql(id).await.as_deref(), Some("queued"));

    let consumer = stack.start_worker(consumers_only());
    let row = stack.wait_terminal(id, Duration::from_secs(120)).await;
    assert_eq!(row.state, JobState::Succeeded, "{row:#?}");
    assert_eq!(row.attempt, 1);
    assert_eq!(row.device.as_deref(), Some("cpu"));
    assert_eq!(row.images.len(), 2);

    let moto = stack.moto.as_ref().unwrap();
    let bucket = stack.bucket.as_deref().unwrap();
    let keys = moto.list_keys(bucket);
    for image in &row.images {
        assert!(keys.contains(&image.key), "{} not in {keys:?}", image.key);
        assert!(image.key.contains(&id.to_string()));
        let bytes = moto.get_object(bucket, &image.key).await.expect("object");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!((image.width, image.height), (64, 64));
    }
    assert_eq!(row.images[0].seed, 7);
    assert_eq!(row.images[1].seed, 8);

    let metrics = stack
        .db
        .db
        .get_metrics(id)
        .await
        .unwrap()
        .expect("metrics row");
    assert_eq!(metrics.step_ms.len(), 2);
    assert!(metrics.total_ms >= metrics.denoising_ms);
    assert!(
        metrics.model_load_ms > 0.0,
        "the first job on a consumer loads the model"
    );
    assert!(metrics.queue_wait_ms >= 500.0, "{metrics:?}");
    assert_eq!(metrics.peak_gpu_mem_bytes, None);

    consumer.stop().await.unwrap();
    intake.stop().await.unwrap();
    stack.teardown().await;
}
