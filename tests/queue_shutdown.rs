//! Stopping and cancelling: a graceful stop finishes the job in flight; a job still running
//! when the shutdown grace period ends goes back to the queue and a later worker finishes it;
//! a running job that is cancelled stops at its next step and ends `cancelled`. The worker's
//! heartbeat row shows the job it runs, and says it stopped once it has.

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
    let mut config = stack.config.clone();
    config.worker.id = Some("stop-finish-worker".to_owned());
    config.worker.heartbeat_interval_ms = 50;
    let worker = stack.start_worker_with(config, RunOptions::default());
    let id = Uuid::new_v4();
    stack.publish(&slow_job(id)).await;
    wait_running(&stack, id).await;

    // The heartbeat reports the worker alive, running this job on its CPU consumer.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let live = loop {
        let live = stack
            .db
            .db
            .live_workers(Duration::from_secs(5))
            .await
            .unwrap();
        let busy = live.iter().any(|w| {
            w.worker_id == "stop-finish-worker"
                && w.devices.iter().any(|d| d.current_job == Some(id))
        });
        if busy || std::time::Instant::now() > deadline {
            break live;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let me = live
        .iter()
        .find(|w| w.worker_id == "stop-finish-worker")
        .unwrap_or_else(|| panic!("no live worker row: {live:#?}"));
    assert!(me.intake);
    assert_eq!(me.pid, std::process::id());
    assert_eq!(me.devices.len(), 1, "{me:#?}");
    assert_eq!(me.devices[0].device, "cpu");
    assert_eq!(me.devices[0].current_job, Some(id), "{me:#?}");

    worker.stop().await.unwrap();
    let row = stack.db.db.get(id).await.unwrap().unwrap();
    assert_eq!(row.state, JobState::Succeeded, "{row:#?}");
    assert_eq!(row.attempt, 1);
    assert_eq!(row.progress_step, row.progress_total);

    // Stopped: no longer live, and its last report names the model it had loaded.
    let live = stack
        .db
        .db
        .live_workers(Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        live.iter().all(|w| w.worker_id != "stop-finish-worker"),
        "{live:#?}"
    );
    let all = stack.db.db.list_workers(10).await.unwrap();
    let me = all
        .iter()
        .find(|w| w.worker_id == "stop-finish-worker")
        .unwrap();
    assert!(me.stopped_at.is_some());
    assert_eq!(me.devices[0].current_job, None, "{me:#?}");
    assert_eq!(
        me.devices[0].models_loaded,
        vec![stack.config.models.default.clone()],
        "{me:#?}"
    );
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
