//! Dynamic batching through a running worker (CPU consumer, real RabbitMQ and Postgres): a
//! backlog of compatible jobs runs in batches of up to `worker.max_batch`, each job's images
//! are the ones it gets when every job runs alone, jobs that cannot be batched still run, and
//! a job cancelled inside a batch ends `cancelled` while the rest of the batch succeeds.

mod queue_harness;
mod support;

use std::collections::HashMap;
use std::time::Duration;

use queue_harness::{consumers_only, intake_only, is_queued, small_job, Stack, StorageKind};
use sdxl_worker::config::Config;
use sdxl_worker::db::{JobRow, JobState};
use serde_json::Value;
use uuid::Uuid;

/// Jobs that differ in prompt, seed, guidance and image count; jobs 6 and 7 have another size
/// and a ControlNet-free but unbatchable shape of their own (a second size), job 8 has no
/// guidance.
fn backlog() -> Vec<Value> {
    let mut jobs = Vec::new();
    for n in 0..9u64 {
        let mut job = small_job(Uuid::new_v4());
        job["steps"] = 3.into();
        job["seed"] = (100 + n).into();
        job["prompt"] = format!("a watercolour of harbour number {n}").into();
        if n % 3 == 1 {
            job["negative_prompt"] = "blurry, low quality".into();
            job["guidance_scale"] = 9.0.into();
        }
        if n == 2 {
            job["num_images"] = 2.into();
        }
        if n == 6 || n == 7 {
            job["width"] = 128.into();
        }
        if n == 8 {
            job["guidance_scale"] = 1.0.into();
        }
        jobs.push(job);
    }
    jobs
}

fn with_new_id(job: &Value) -> Value {
    let mut job = job.clone();
    job["id"] = Uuid::new_v4().to_string().into();
    job
}

fn id_of(job: &Value) -> Uuid {
    Uuid::parse_str(job["id"].as_str().unwrap()).unwrap()
}

/// Queues every job through an intake-only worker, so that the consumer finds a backlog.
async fn queue_all(stack: &Stack, jobs: &[Value]) {
    let intake = stack.start_worker(intake_only());
    for job in jobs {
        stack.publish(job).await;
    }
    for job in jobs {
        stack
            .wait_row(id_of(job), Duration::from_secs(60), is_queued)
            .await;
    }
    intake.stop().await.unwrap();
}

fn batching(stack: &Stack, max_batch: u32) -> Config {
    let mut config = stack.config.clone();
    config.worker.max_batch = max_batch;
    config.worker.prefetch = 2 * max_batch;
    config.worker.batch_window_ms = 200;
    config
}

/// Decoded pixels of every image of a row, in image order.
fn pixels(stack: &Stack, row: &JobRow) -> Vec<Vec<u8>> {
    let root = stack.local_dir.as_ref().unwrap().path();
    row.images
        .iter()
        .map(|image| {
            let path = root.join(&image.key);
            let file = std::fs::File::open(&path).unwrap();
            let mut reader = png::Decoder::new(std::io::BufReader::new(file))
                .read_info()
                .unwrap();
            let mut buf = vec![0; reader.output_buffer_size().unwrap()];
            let info = reader.next_frame(&mut buf).unwrap();
            buf.truncate(info.buffer_size());
            buf
        })
        .collect()
}

async fn run_backlog(stack: &Stack, jobs: &[Value], max_batch: u32) -> Vec<(JobRow, u32)> {
    queue_all(stack, jobs).await;
    let worker = stack.start_worker_with(batching(stack, max_batch), consumers_only());
    let mut rows = Vec::new();
    for job in jobs {
        let id = id_of(job);
        let row = stack.wait_terminal(id, Duration::from_secs(180)).await;
        assert_eq!(row.state, JobState::Succeeded, "{row:#?}");
        let metrics = stack.db.db.get_metrics(id).await.unwrap().unwrap();
        assert_eq!(metrics.step_ms.len(), 3);
        rows.push((row, metrics.batch_size));
    }
    worker.stop().await.unwrap();
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_runs_in_batches_with_the_images_each_job_gets_alone() {
    let stack = Stack::new("batch", StorageKind::Local).await;
    let jobs = backlog();
    let batched = run_backlog(&stack, &jobs, 4).await;
    let sizes: Vec<u32> = batched.iter().map(|(_, size)| *size).collect();
    assert!(sizes.iter().all(|&s| (1..=4).contains(&s)), "{sizes:?}");
    assert!(
        sizes.iter().filter(|&&s| s == 4).count() >= 4,
        "a backlog of compatible jobs fills batches of max_batch: {sizes:?}"
    );
    // Jobs of one batch started together: their attempts share one engine turn.
    let mut by_size: HashMap<u32, usize> = HashMap::new();
    for size in &sizes {
        *by_size.entry(*size).or_default() += 1;
    }
    for (size, count) in by_size {
        assert_eq!(count % size as usize, 0, "{size}-job batches: {count} jobs");
    }

    let alone_jobs: Vec<Value> = jobs.iter().map(with_new_id).collect();
    let alone = run_backlog(&stack, &alone_jobs, 1).await;
    assert!(alone.iter().all(|(_, size)| *size == 1));
    for (n, ((batched_row, _), (alone_row, _))) in batched.iter().zip(&alone).enumerate() {
        assert_eq!(batched_row.images.len(), alone_row.images.len());
        assert_eq!(
            pixels(&stack, batched_row),
            pixels(&stack, alone_row),
            "job {n}: batched images differ from the solo run"
        );
    }
    stack.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cancelled_inside_a_batch_ends_cancelled_and_the_others_succeed() {
    let stack = Stack::new("batchcancel", StorageKind::Local).await;
    let jobs: Vec<Value> = (0..3u64)
        .map(|n| {
            let mut job = small_job(Uuid::new_v4());
            job["steps"] = 150.into();
            job["width"] = 128.into();
            job["height"] = 128.into();
            job["seed"] = n.into();
            job
        })
        .collect();
    queue_all(&stack, &jobs).await;
    let worker = stack.start_worker_with(batching(&stack, 3), consumers_only());
    let victim = id_of(&jobs[1]);
    stack
        .wait_row(victim, Duration::from_secs(60), |row| {
            row.state == JobState::Running && row.progress_step.unwrap_or(0) >= 2
        })
        .await;
    stack.db.db.cancel(victim).await.unwrap();

    let row = stack.wait_terminal(victim, Duration::from_secs(120)).await;
    assert_eq!(row.state, JobState::Cancelled, "{row:#?}");
    assert!(row.images.is_empty());
    for job in [&jobs[0], &jobs[2]] {
        let id = id_of(job);
        let row = stack.wait_terminal(id, Duration::from_secs(180)).await;
        assert_eq!(row.state, JobState::Succeeded, "{row:#?}");
        let metrics = stack.db.db.get_metrics(id).await.unwrap().unwrap();
        assert_eq!(metrics.batch_size, 3, "the three jobs shared a batch");
        assert_eq!(metrics.step_ms.len(), 150);
    }
    worker.stop().await.unwrap();
    stack.teardown().await;
}
