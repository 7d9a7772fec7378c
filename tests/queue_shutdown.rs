//! Stopping and cancelling: a graceful stop finishes the job in flight; a job still running
//! when the shutdown grace period ends goes back to the queue and a later worker finishes it;
//! a running job that is cancelled stops at its next step and ends `cancelled`.

mod queue_harness;
mod support;

use std::time::Duration;

use queue_harness::{small_job, Stack, StorageKind};
use sdxl_worker::db::{CancelOutcome, JobState};
use sdxl_worker::worker::RunOptions;
use uuid::Uuid;

/// A job long enough to be caught running.
fn slow_job(id: Uuid) -> serde_json::Value {
    let mut job = small_job(id);
    job["steps"] = 60.into();
    job["width"] = 128.into();
    job["height"] = 128.into();
    job
}

async fn wait_running(stack: &Stack, id: Uuid) {
    stack
        .wait_row(id, Duration::from_secs(60), |row| {
            row.state == JobState::Running && row.progress_step.is_some_and(|s| s >= 1)
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_finishes_the_job_in_flight() {
    let stack = Stack::new("stop-finish", StorageKind::Local).await;
    let worker = stack.start_worker(RunOptions::default());
    let id = Uuid::new_v4();
    stack.publish(&slow_job(id)).await;
    wait_running(&stack, id).await;

    worker.stop().await.unwrap();
    let row = stack.db.db.get(id).await.unwrap().unwrap();
    assert_eq!(row.state, JobState::Succeeded, "{row:#?}");
    assert_eq!(row.attempt, 1);
    assert_eq!(row.progress_step, row.progress_total);
    stack.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_running_past_the_grace_period_goes_back_to_the_queue() {
    let stack = Stack::new("stop-grace", StorageKind::Local).await;
    let mut config = stack.config.clone();
    config.worker.shutdown_grace_ms = 0;
    let worker = stack.start_worker_with(config, RunOptions::default());
    let id = Uuid::new_v4();
    stack.publish(&slow_job(id)).await;
    wait_running(&stack, id).await;

    worker.stop().await.unwrap();
    let row = stack.db.db.get(id).await.unwrap().unwrap();
    assert_eq!(row.state, JobState::Queued, "{row:#?}");
    assert!(row.images.is_empty());

    // The message went back to the queue: the next worker finishes the job.
    let worker = stack.start_worker(RunOptions::default());
    let row = stack.wait_terminal(id, Duration::from_secs(120)).await;
    assert_eq!(row.state, JobState::Succeeded, "{row:#?}");
    assert_eq!(row.attempt, 2);
    worker.stop().await.unwrap();
    stack.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_running_job_stops_and_the_worker_takes_the_next() {
    let stack = Stack::new("cancel", StorageKind::Local).await;
    let worker = stack.start_worker(RunOptions::default());
    let id = Uuid::new_v4();
    stack.publish(&slow_job(id)).await;
    wait_running(&stack, id).await;

    let outcome = stack.db.db.cancel(id).await.unwrap();
    assert!(
        matches!(outcome, CancelOutcome::Requested { attempt: 1 }),
        "{outcome:?}"
    );
    let row = stack.wait_terminal(id, Duration::from_secs(60)).await;
    assert_eq!(row.state, JobState::Cancelled, "{row:#?}");
    assert!(row.images.is_empty());
    assert!(
        row.progress_step < row.progress_total,
        "stopped before the last step"
    );

    let next = Uuid::new_v4();
    stack.publish(&small_job(next)).await;
    let row = stack.wait_terminal(next, Duration::from_secs(60)).await;
    assert_eq!(row.state, JobState::Succeeded);
    worker.stop().await.unwrap();
    assert!(stack
        .local_files()
        .iter()
        .all(|f| !f.display().to_string().contains(&id.to_string())));
    stack.teardown().await;
}
