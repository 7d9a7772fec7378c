//! 100 jobs through two CPU consumers (two workers, each with one consumer): every job
//! succeeds exactly once, with one stored image each and no duplicate, and both consumers
//! take a share.

mod queue_harness;
mod support;

use std::collections::HashSet;
use std::time::Duration;

use queue_harness::{consumers_only, small_job, Stack, StorageKind};
use sdxl_worker::db::JobState;
use sdxl_worker::worker::RunOptions;
use uuid::Uuid;

const JOBS: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_jobs_through_two_consumers_succeed_once_each() {
    let stack = Stack::new("load", StorageKind::Local).await;
    let first = stack.start_worker(RunOptions::default());
    let mut second_config = stack.config.clone();
    second_config.worker.id = Some(format!("{}-second", stack.config.broker.prefix));
    let second = stack.start_worker_with(second_config, consumers_only());

    let ids: Vec<Uuid> = (0..JOBS).map(|_| Uuid::new_v4()).collect();
    for (n, id) in ids.iter().enumerate() {
        let mut job = small_job(*id);
        job["steps"] = 1.into();
        job["seed"] = (n as u64).into();
        stack.publish(&job).await;
    }

    let mut keys = HashSet::new();
    let mut workers = HashSet::new();
    for (n, id) in ids.iter().enumerate() {
        let row = stack.wait_terminal(*id, Duration::from_secs(300)).await;
        assert_eq!(row.state, JobState::Succeeded, "{row:#?}");
        assert_eq!(row.attempt, 1, "job {id} ran more than once");
        assert_eq!(row.images.len(), 1);
        assert_eq!(row.images[0].seed, n as u64);
        assert!(keys.insert(row.images[0].key.clone()), "duplicate key");
        workers.insert(row.worker_id.clone().unwrap());
    }
    assert_eq!(keys.len(), JOBS);
    assert_eq!(workers.len(), 2, "both consumers took jobs: {workers:?}");

    let files = stack.local_files();
    assert_eq!(files.len(), JOBS, "one object per image, nothing else");
    let file_keys: HashSet<String> = files.iter().map(|f| f.display().to_string()).collect();
    assert_eq!(file_keys, keys);

    second.stop().await.unwrap();
    first.stop().await.unwrap();
    // Nothing is left behind in the work queues.
    for lane in [
        sdxl_worker::broker::Lane::High,
        sdxl_worker::broker::Lane::Normal,
    ] {
        let queue = stack.broker.topology().work_queue(lane);
        assert!(stack.broker.get(&queue).await.unwrap().is_none());
    }
    stack.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_prefetch_two_jobs_overlap_only_outside_the_engine() {
    let stack = Stack::new("prefetch2", StorageKind::Local).await;
    let mut config = stack.config.clone();
    config.worker.prefetch = 2;
    let worker = stack.start_worker_with(config, RunOptions::default());

    let ids: Vec<Uuid> = (0..12).map(|_| Uuid::new_v4()).collect();
    for id in &ids {
        let mut job = small_job(*id);
        job["steps"] = 4.into();
        stack.publish(&job).await;
    }
    let mut runs = Vec::new();
    for id in &ids {
        let row = stack.wait_terminal(*id, Duration::from_secs(120)).await;
        assert_eq!(row.state, JobState::Succeeded, "{row:#?}");
        assert_eq!(row.attempt, 1);
        let metrics = stack.db.db.get_metrics(*id).await.unwrap().unwrap();
        let engine_ms = metrics.model_load_ms
            + metrics.text_encoding_ms
            + metrics.denoising_ms
            + metrics.vae_ms;
        runs.push((row.started_at.unwrap(), engine_ms));
    }
    // One job at a time in the engine: each attempt starts after the previous one's engine
    // work is over (1 ms of slack for the two clocks).
    runs.sort_by_key(|(started, _)| *started);
    for pair in runs.windows(2) {
        let (first_start, first_engine_ms) = pair[0];
        let gap_ms = (pair[1].0 - first_start).num_microseconds().unwrap() as f64 / 1000.0;
        assert!(
            gap_ms + 1.0 >= first_engine_ms,
            "a job started {gap_ms} ms after the previous one, whose engine work took {first_engine_ms} ms"
        );
    }
    assert_eq!(stack.local_files().len(), ids.len());
    worker.stop().await.unwrap();
    stack.teardown().await;
}
