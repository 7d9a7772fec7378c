//! Priorities: with a backlog of normal jobs, a high-priority job published later starts
//! before every job of the backlog that had not started yet (priority from the message's
//! `priority` field or from the AMQP property).

mod queue_harness;
mod support;

use std::time::Duration;

use queue_harness::{small_job, Stack, StorageKind};
use sdxl_worker::db::JobState;
use sdxl_worker::worker::RunOptions;
use uuid::Uuid;

async fn high_job_overtakes_the_backlog(label: &str, by_amqp_property: bool) {
    let stack = Stack::new(label, StorageKind::Local).await;
    let worker = stack.start_worker(RunOptions::default());

    let mut backlog = Vec::new();
    for _ in 0..6 {
        let id = Uuid::new_v4();
        let mut job = small_job(id);
        job["steps"] = 12.into();
        stack.publish(&job).await;
        backlog.push(id);
    }
    // The consumer is busy with the backlog.
    stack
        .wait_row(backlog[0], Duration::from_secs(60), |row| {
            row.state != JobState::Queued
        })
        .await;

    let high = Uuid::new_v4();
    let mut job = small_job(high);
    job["steps"] = 12.into();
    if by_amqp_property {
        let body = serde_json::to_vec(&job).unwrap();
        stack.publish_raw(&body, Some(high), Some(8)).await;
    } else {
        job["priority"] = 9.into();
        stack.publish(&job).await;
    }
    stack
        .wait_row(high, Duration::from_secs(30), |_| true)
        .await;
    // Give the intake a moment to route it after writing the row.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut still_queued = Vec::new();
    for id in &backlog {
        let row = stack.db.db.get(*id).await.unwrap().unwrap();
        if row.state == JobState::Queued {
            still_queued.push(*id);
        }
    }
    assert!(
        still_queued.len() >= 2,
        "the backlog drained too fast for the test to mean anything"
    );

    let high_row = stack.wait_terminal(high, Duration::from_secs(120)).await;
    assert_eq!(high_row.state, JobState::Succeeded);
    let high_started = high_row.started_at.expect("started_at");
    for id in &still_queued {
        let row = stack.wait_terminal(*id, Duration::from_secs(120)).await;
        assert_eq!(row.state, JobState::Succeeded);
        let started = row.started_at.expect("started_at");
        assert!(
            high_started < started,
            "backlog job {id} started at {started}, before the high-priority job ({high_started})"
        );
    }

    worker.stop().await.unwrap();
    stack.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_high_priority_field_overtakes_the_backlog() {
    high_job_overtakes_the_backlog("prio-field", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_high_amqp_priority_overtakes_the_backlog() {
    high_job_overtakes_the_backlog("prio-amqp", true).await;
}
