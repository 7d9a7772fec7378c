//! At-least-once delivery without double results: a redelivered work message of a succeeded
//! job, and a producer publishing the same job twice, are acknowledged without running again;
//! a job whose storage keeps failing is retried up to `worker.max_attempts`, then failed and
//! dead-lettered with its reason, and so is a job whose earlier attempts never finished.

mod queue_harness;
mod support;

use std::time::Duration;

use lapin::types::ShortString;
use lapin::BasicProperties;
use queue_harness::{consumers_only, small_job, Stack, StorageKind};
use sdxl_worker::broker::{Lane, HEADER_ERROR_CODE};
use sdxl_worker::config::StorageConfig;
use sdxl_worker::db::JobState;
use sdxl_worker::worker::RunOptions;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_message_of_a_succeeded_job_is_acked_without_a_second_result() {
    let stack = Stack::new("redeliver", StorageKind::Local).await;
    let worker = stack.start_worker(RunOptions::default());
    let id = Uuid::new_v4();
    let job = small_job(id);
    stack.publish(&job).await;
    let done = stack.wait_terminal(id, Duration::from_secs(60)).await;
    assert_eq!(done.state, JobState::Succeeded);
    worker.stop().await.unwrap();
    let files_before = stack.local_files();

    // The same work message comes back, marked redelivered (as after a lost ack).
    let body = serde_json::to_vec(&job).unwrap();
    let properties = BasicProperties::default().with_message_id(ShortString::from(id.to_string()));
    stack
        .broker
        .publish_work(Lane::Normal, &body, properties)
        .await
        .unwrap();
    let queue = stack.broker.topology().work_queue(Lane::Normal);
    let taken = stack.next_message(&queue, Duration::from_secs(2)).await;
    taken.expect("work message").nack_requeue().await.unwrap();
    // And the producer publishes the job a second time.
    stack.publish(&job).await;

    let worker = stack.start_worker(RunOptions::default());
    tokio::time::sleep(Duration::from_secs(2)).await;
    worker.stop().await.unwrap();

    let row = stack.db.db.get(id).await.unwrap().unwrap();
    assert_eq!(row.state, JobState::Succeeded);
    assert_eq!(row.attempt, done.attempt, "no second attempt");
    assert_eq!(row.finished_at, done.finished_at);
    assert_eq!(row.images, done.images);
    assert_eq!(stack.local_files(), files_before, "no second upload");
    // Both messages were acknowledged: nothing is left to deliver.
    for queue in [
        stack.broker.topology().work_queue(Lane::Normal),
        stack.broker.topology().work_queue(Lane::High),
        stack.broker.topology().intake_queue(),
    ] {
        assert!(
            stack.broker.get(&queue).await.unwrap().is_none(),
            "{queue} is not empty"
        );
    }
    stack.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_storage_keeps_failing_is_retried_then_dead_lettered() {
    let stack = Stack::new("retry", StorageKind::Local).await;
    let intake = stack.start_worker(queue_harness::intake_only());
    let mut config = stack.config.clone();
    // Nothing listens on port 9 (discard): every upload fails with a connection error.
    config.storage = StorageConfig::S3 {
        endpoint: Some("http://127.0.0.1:9".to_owned()),
        region: "us-east-1".to_owned(),
        bucket: "unreachable".to_owned(),
        prefix: String::new(),
        allow_http: true,
        path_style: true,
    };
    let consumer = stack.start_worker_with(config.clone(), consumers_only());

    let id = Uuid::new_v4();
    stack.publish(&small_job(id)).await;
    let row = stack.wait_terminal(id, Duration::from_secs(180)).await;
    assert_eq!(row.state, JobState::Failed, "{row:#?}");
    assert_eq!(row.error_code.as_deref(), Some("storage_backend"));
    assert_eq!(row.attempt, config.worker.max_attempts as i32);
    assert!(row.images.is_empty());

    let dead_queue = stack.broker.topology().dead_queue();
    let dead = stack
        .next_message(&dead_queue, Duration::from_secs(5))
        .await;
    let dead = dead.expect("the message is dead-lettered");
    assert_eq!(dead.message_id(), Some(id.to_string().as_str()));
    assert_eq!(
        dead.header_str(HEADER_ERROR_CODE).as_deref(),
        Some("storage_backend")
    );
    dead.ack().await.unwrap();

    consumer.stop().await.unwrap();
    intake.stop().await.unwrap();
    stack.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_attempts_never_finished_is_failed_and_dead_lettered() {
    let stack = Stack::new("poison", StorageKind::Local).await;
    let intake = stack.start_worker(queue_harness::intake_only());
    let id = Uuid::new_v4();
    stack.publish(&small_job(id)).await;
    stack
        .wait_row(id, Duration::from_secs(30), queue_harness::is_queued)
        .await;
    // Three workers started the job and died without a result (a poison job that crashes
    // the process): each took the message, so the broker hands it out again marked
    // redelivered, and each start took the job over with a new attempt number.
    let work_queue = stack.broker.topology().work_queue(Lane::Normal);
    let held = stack
        .next_message(&work_queue, Duration::from_secs(5))
        .await;
    held.expect("the job reaches the work queue")
        .nack_requeue()
        .await
        .unwrap();
    let max_attempts = stack.config.worker.max_attempts;
    for _ in 0..max_attempts {
        let outcome = stack
            .db
            .db
            .start_attempt(id, "crashed-worker", "cpu", true)
            .await
            .unwrap();
        assert!(matches!(
            outcome,
            sdxl_worker::db::StartOutcome::Started { .. }
        ));
    }

    let consumer = stack.start_worker(consumers_only());
    let row = stack.wait_terminal(id, Duration::from_secs(60)).await;
    assert_eq!(row.state, JobState::Failed, "{row:#?}");
    assert_eq!(row.error_code.as_deref(), Some("attempts_exhausted"));
    assert!(row.images.is_empty());

    let dead_queue = stack.broker.topology().dead_queue();
    let dead = stack
        .next_message(&dead_queue, Duration::from_secs(5))
        .await;
    let dead = dead.expect("the message is dead-lettered");
    assert_eq!(
        dead.header_str(HEADER_ERROR_CODE).as_deref(),
        Some("attempts_exhausted")
    );
    dead.ack().await.unwrap();

    consumer.stop().await.unwrap();
    intake.stop().await.unwrap();
    stack.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_published_twice_without_a_seed_runs_with_the_seed_recorded_first() {
    let stack = Stack::new("dupseed", StorageKind::Local).await;
    let intake = stack.start_worker(queue_harness::intake_only());
    let id = Uuid::new_v4();
    let mut job = small_job(id);
    job.as_object_mut().unwrap().remove("seed");
    stack.publish(&job).await;
    stack.publish(&job).await;

    // Both copies reach the work queue (the row is still queued), carrying one seed: the
    // one drawn for the first copy and recorded in the row.
    let queue = stack.broker.topology().work_queue(Lane::Normal);
    let mut seeds = Vec::new();
    while let Some(message) = stack.next_message(&queue, Duration::from_secs(5)).await {
        let body: serde_json::Value = serde_json::from_slice(&message.body).unwrap();
        seeds.push(body["seed"].as_u64().expect("routed messages carry a seed"));
        message.ack().await.unwrap();
        if seeds.len() == 2 {
            break;
        }
    }
    assert_eq!(
        seeds.len(),
        2,
        "both copies are routed while the job is queued"
    );
    let row = stack.db.db.get(id).await.unwrap().unwrap();
    let recorded = row.request["seed"]
        .as_u64()
        .expect("the row records the seed");
    assert_eq!(seeds, vec![recorded, recorded]);

    intake.stop().await.unwrap();
    stack.teardown().await;
}
