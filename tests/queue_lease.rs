//! Lease recovery: a `running` job belongs to its worker while that worker's heartbeat is
//! recent. A redelivered message leaves a job with a live worker in its hands; the job of a
//! worker whose heartbeat stopped (or which stopped, or restarted) is taken over, and the
//! lease sweep publishes it again, or fails and dead-letters it after its last attempt.

mod queue_harness;
mod support;

use std::time::Duration;

use chrono::Utc;
use queue_harness::{small_job, Stack, StorageKind};
use sdxl_worker::broker::{Lane, HEADER_ERROR_CODE};
use sdxl_worker::config::{Limits, ModelsConfig};
use sdxl_worker::db::{Db, Heartbeat, JobState, StartOutcome};
use sdxl_worker::job::{parse_and_validate, ValidJob};
use sdxl_worker::worker::{sweep_lost_jobs, WORKER_LOST_CODE};
use uuid::Uuid;

const LEASE: Duration = Duration::from_secs(30);

fn job(id: Uuid, priority: u8) -> ValidJob {
    let mut message = small_job(id);
    message["priority"] = priority.into();
    let body = serde_json::to_vec(&message).unwrap();
    parse_and_validate(&body, &Limits::default(), &ModelsConfig::default()).unwrap()
}

async fn beat(db: &Db, worker_id: &str) {
    let beat = Heartbeat {
        worker_id: worker_id.to_owned(),
        host: "test".to_owned(),
        pid: 1,
        version: "test".to_owned(),
        intake: false,
        devices: Vec::new(),
        started_at: Utc::now() - chrono::Duration::hours(1),
    };
    db.heartbeat(&beat).await.unwrap();
}

/// Makes a worker's heartbeat, and the job's last update, `age` old.
async fn age(db: &Db, worker_id: &str, job: Uuid, age: Duration) {
    sqlx::query(
        "UPDATE workers SET last_seen = now() - make_interval(secs => $2) WHERE worker_id = $1",
    )
    .bind(worker_id)
    .bind(age.as_secs_f64())
    .execute(db.pool())
    .await
    .unwrap();
    sqlx::query("UPDATE jobs SET updated_at = now() - make_interval(secs => $2) WHERE id = $1")
        .bind(job)
        .bind(age.as_secs_f64())
        .execute(db.pool())
        .await
        .unwrap();
}

async fn start(db: &Db, id: Uuid, worker: &str, redelivered: bool) -> StartOutcome {
    db.start_attempt_leased(id, worker, "cpu", redelivered, Some(LEASE))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_takes_over_a_running_job_only_once_its_worker_lost_the_lease() {
    let test_db = support::TestDb::new("lease_takeover").await;
    let db = &test_db.db;
    let job = job(Uuid::new_v4(), 0);
    db.insert_queued(&job).await.unwrap();
    beat(db, "alive").await;
    assert!(matches!(
        start(db, job.id, "alive", false).await,
        StartOutcome::Started { attempt: 1, .. }
    ));

    // The broker redelivers the message (its channel closed) while the worker still runs it.
    assert_eq!(start(db, job.id, "other", true).await, StartOutcome::InHand);
    // The same worker, reconnected, takes its own job back.
    assert!(matches!(
        start(db, job.id, "alive", true).await,
        StartOutcome::Started { attempt: 2, .. }
    ));

    // The worker's heartbeat stops: its job is up for grabs.
    age(db, "alive", job.id, LEASE * 2).await;
    assert!(matches!(
        start(db, job.id, "other", true).await,
        StartOutcome::Started { attempt: 3, .. }
    ));

    // A worker that stopped, or restarted since the attempt began, holds nothing either.
    beat(db, "other").await;
    db.worker_stopped("other").await.unwrap();
    assert!(matches!(
        start(db, job.id, "third", true).await,
        StartOutcome::Started { attempt: 4, .. }
    ));
    beat(db, "third").await;
    sqlx::query(
        "UPDATE workers SET started_at = now() + interval '1 second' WHERE worker_id = 'third'",
    )
    .execute(db.pool())
    .await
    .unwrap();
    assert!(matches!(
        start(db, job.id, "fourth", true).await,
        StartOutcome::Started { attempt: 5, .. }
    ));
    // A copy that is not a redelivery never takes over.
    age(db, "fourth", job.id, LEASE * 2).await;
    assert_eq!(
        start(db, job.id, "fifth", false).await,
        StartOutcome::InHand
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_requeues_jobs_of_lost_workers_and_fails_those_on_their_last_attempt() {
    let stack = Stack::new("lease_sweep", StorageKind::Local).await;
    let db = &stack.db.db;
    let max_attempts = stack.config.worker.max_attempts;

    // A job of a worker that died on its first attempt (high priority).
    let lost = job(Uuid::new_v4(), 7);
    db.insert_queued(&lost).await.unwrap();
    beat(db, "dead").await;
    start(db, lost.id, "dead", false).await;
    age(db, "dead", lost.id, LEASE * 2).await;
    // A job of a worker that died on its last attempt.
    let exhausted = job(Uuid::new_v4(), 0);
    db.insert_queued(&exhausted).await.unwrap();
    for _ in 0..max_attempts {
        db.start_attempt(exhausted.id, "dead", "cpu", true)
            .await
            .unwrap();
    }
    age(db, "dead", exhausted.id, LEASE * 2).await;
    // A job of a live worker, and one that a dead worker's row says nothing about yet.
    let alive = job(Uuid::new_v4(), 0);
    db.insert_queued(&alive).await.unwrap();
    beat(db, "alive").await;
    start(db, alive.id, "alive", false).await;
    let fresh = job(Uuid::new_v4(), 0);
    db.insert_queued(&fresh).await.unwrap();
    start(db, fresh.id, "dead", false).await;

    let report = sweep_lost_jobs(db, &stack.broker, LEASE, max_attempts)
        .await
        .unwrap();
    assert!(!report.skipped);
    assert_eq!(report.requeued, vec![lost.id]);
    assert_eq!(report.failed, vec![exhausted.id]);

    let row = db.get(lost.id).await.unwrap().unwrap();
    assert_eq!(row.state, JobState::Queued);
    assert_eq!(row.attempt, 1);
    let topology = stack.broker.topology().clone();
    let message = stack
        .next_message(&topology.work_queue(Lane::High), Duration::from_secs(5))
        .await
        .expect("the lost job is published to its lane again");
    assert_eq!(message.message_id(), Some(lost.id.to_string().as_str()));
    let body: serde_json::Value = serde_json::from_slice(&message.body).unwrap();
    assert_eq!(body, row.request, "the recorded request, seed included");
    message.ack().await.unwrap();

    let row = db.get(exhausted.id).await.unwrap().unwrap();
    assert_eq!(row.state, JobState::Failed);
    assert_eq!(row.error_code.as_deref(), Some(WORKER_LOST_CODE));
    assert!(row.error_message.unwrap().contains("dead"));
    let dead = stack
        .next_message(&topology.dead_queue(), Duration::from_secs(5))
        .await
        .expect("the failed job is dead-lettered");
    assert_eq!(
        dead.header_str(HEADER_ERROR_CODE).as_deref(),
        Some(WORKER_LOST_CODE)
    );
    assert_eq!(dead.message_id(), Some(exhausted.id.to_string().as_str()));
    dead.ack().await.unwrap();

    for id in [alive.id, fresh.id] {
        assert_eq!(db.get(id).await.unwrap().unwrap().state, JobState::Running);
    }
    // A second sweep finds nothing: recovery is done once.
    let again = sweep_lost_jobs(db, &stack.broker, LEASE, max_attempts)
        .await
        .unwrap();
    assert!(again.requeued.is_empty() && again.failed.is_empty());
    assert!(stack
        .broker
        .get(&topology.work_queue(Lane::Normal))
        .await
        .unwrap()
        .is_none());
    stack.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sweep_at_a_time_recovers_a_job_once() {
    let stack = Stack::new("lease_once", StorageKind::Local).await;
    let db = &stack.db.db;
    let lost = job(Uuid::new_v4(), 0);
    db.insert_queued(&lost).await.unwrap();
    start(db, lost.id, "gone", false).await;
    age(db, "gone", lost.id, LEASE * 2).await;

    let sweeps = (0..4).map(|_| sweep_lost_jobs(db, &stack.broker, LEASE, 3));
    let reports = futures::future::join_all(sweeps).await;
    let requeued: usize = reports
        .iter()
        .map(|r| r.as_ref().unwrap().requeued.len())
        .sum();
    assert_eq!(requeued, 1, "{reports:?}");
    let queue = stack.broker.topology().work_queue(Lane::Normal);
    let first = stack.next_message(&queue, Duration::from_secs(5)).await;
    first.expect("published once").ack().await.unwrap();
    assert!(stack.broker.get(&queue).await.unwrap().is_none());
    stack.teardown().await;
}
