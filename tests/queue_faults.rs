//! Faults caused on purpose while jobs flow, each followed by a check of the rows, the objects
//! and the queues: every job ends in exactly one terminal state, every succeeded job has all its
//! images and one metrics row, and nothing is left in the queues but dead letters with reasons.
//!
//! - a broker restart (`rabbitmqctl stop_app` / `start_app` of a private node);
//! - a Postgres restart (a private cluster) mid-job;
//! - a job running longer than the broker's consumer timeout, with two workers;
//! - an S3 outage mid-job (a fault proxy in front of moto), then recovery;
//! - the worker process killed with SIGKILL mid-denoising, and stopped with SIGTERM mid-job;
//! - a poison job that aborts its worker every time;
//! - a job running past its timeout (derived from its cost estimate).

mod queue_harness;
mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use queue_harness::{small_job, Stack, StorageKind};
use sdxl_worker::broker::{Broker, Lane, HEADER_ERROR, HEADER_ERROR_CODE};
use sdxl_worker::config::{Config, StorageConfig};
use sdxl_worker::db::{JobRow, JobState};
use sdxl_worker::worker::{RunOptions, ABORT_ON_PROMPT_ENV};
use serde_json::Value;
use support::{FaultProxy, PrivatePostgres, PrivateRabbit};
use uuid::Uuid;

const LONG: Duration = Duration::from_secs(180);

/// A job of `steps` denoising steps at 128x128 (about 0.1 s a step here).
fn job_of(id: Uuid, steps: u32) -> Value {
    let mut job = small_job(id);
    job["steps"] = steps.into();
    job["width"] = 128.into();
    job["height"] = 128.into();
    job
}

async fn wait_denoising(stack: &Stack, id: Uuid) -> JobRow {
    stack
        .wait_row(id, LONG, |row| {
            row.state == JobState::Running && row.progress_step.is_some_and(|s| s >= 1)
        })
        .await
}

/// The checks every fault test ends with: `ids` all ended `expected`, each succeeded job has
/// its images (local files or objects) and one metrics row, the work and intake queues are
/// empty, and every dead letter carries a reason. Returns the rows.
async fn check_outcome(
    stack: &Stack,
    broker: &Broker,
    ids: &[Uuid],
    expected: JobState,
) -> Vec<JobRow> {
    let db = &stack.db.db;
    let mut rows = Vec::new();
    for id in ids {
        let row = stack.wait_terminal(*id, LONG).await;
        assert_eq!(row.state, expected, "{row:#?}");
        if row.state == JobState::Succeeded {
            assert!(!row.images.is_empty());
            for image in &row.images {
                let present = match (&stack.moto, &stack.bucket, &stack.local_dir) {
                    (Some(moto), Some(bucket), _) => {
                        moto.get_object(bucket, &image.key).await.is_some()
                    }
                    (_, _, Some(dir)) => dir.path().join(&image.key).is_file(),
                    _ => unreachable!(),
                };
                assert!(present, "image {} of job {id} is stored", image.key);
            }
            let metrics: i64 =
                sqlx::query_scalar("SELECT count(*) FROM job_metrics WHERE job_id = $1")
                    .bind(id)
                    .fetch_one(db.pool())
                    .await
                    .unwrap();
            assert_eq!(metrics, 1, "one metrics row for {id}");
        } else {
            assert!(row.error_code.is_some(), "{row:#?}");
        }
        rows.push(row);
    }
    let topology = broker.topology().clone();
    for queue in [
        topology.intake_queue(),
        topology.work_queue(Lane::High),
        topology.work_queue(Lane::Normal),
    ] {
        // A copy whose ack was lost with a connection may still wait to be skipped.
        wait_drained(&stack.config.broker.url, &queue).await;
        assert!(
            broker.get(&queue).await.unwrap().is_none(),
            "{queue} is empty"
        );
    }
    while let Some(dead) = broker.get(&topology.dead_queue()).await.unwrap() {
        assert!(
            dead.header_str(HEADER_ERROR_CODE).is_some(),
            "dead letter has a reason"
        );
        dead.ack().await.unwrap();
    }
    rows
}

/// Waits (up to a minute) until `queue` has no message ready for delivery.
async fn wait_drained(url: &str, queue: &str) {
    use lapin::options::QueueDeclareOptions;
    let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .expect("connect to the broker");
    let channel = connection.create_channel().await.unwrap();
    let options = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let declared = channel
            .queue_declare(queue.into(), options, lapin::types::FieldTable::default())
            .await
            .unwrap();
        if declared.message_count() == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{queue} still holds messages");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = connection.close(200, "done".into()).await;
}

async fn connect(url: &str, stack: &Stack) -> Broker {
    Broker::connect(url, stack.broker.topology().clone())
        .await
        .expect("connect to the broker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_flowing_through_a_broker_restart_all_finish_once() {
    let rabbit = PrivateRabbit::start(None);
    let stack = Stack::new_on(
        "fault-broker",
        StorageKind::Local,
        &rabbit.url(),
        &support::database_url(),
    )
    .await;
    let worker = stack.start_worker(RunOptions::default());
    let ids: Vec<Uuid> = (0..8).map(|_| Uuid::new_v4()).collect();
    for id in &ids {
        stack.publish(&job_of(*id, 8)).await;
    }
    wait_denoising(&stack, ids[1]).await;

    rabbit.stop_app();
    tokio::time::sleep(Duration::from_secs(1)).await;
    rabbit.start_app();

    let broker = connect(&rabbit.url(), &stack).await;
    let rows = check_outcome(&stack, &broker, &ids, JobState::Succeeded).await;
    assert!(rows.iter().all(|r| r.attempt <= 2), "{rows:#?}");
    worker.stop().await.unwrap();
    broker.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_mid_job_loses_and_duplicates_nothing() {
    let postgres = PrivatePostgres::start();
    let stack = Stack::new_on(
        "fault-pg",
        StorageKind::Local,
        &support::broker_url(),
        &postgres.url(),
    )
    .await;
    let worker = stack.start_worker(RunOptions::default());
    let ids: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    for id in &ids {
        stack.publish(&job_of(*id, 10)).await;
    }
    wait_denoising(&stack, ids[0]).await;

    postgres.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    postgres.start_again();

    check_outcome(&stack, &stack.broker, &ids, JobState::Succeeded).await;
    worker.stop().await.unwrap();
    stack.teardown().await;
}

/// The broker's client connections once there are `count` of them.
async fn wait_connections(rabbit: &PrivateRabbit, count: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let connections = rabbit.connections();
        if connections.len() >= count {
            return connections;
        }
        assert!(Instant::now() < deadline, "{connections:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_running_past_the_consumer_timeout_is_neither_lost_nor_run_twice() {
    // The broker takes back any delivery unacknowledged for 2 s: it closes the channel and
    // hands the message to the other worker, which must leave the job to its live owner.
    let rabbit = PrivateRabbit::start(Some(2_000));
    let stack = Stack::new_on(
        "fault-timeout",
        StorageKind::Local,
        &rabbit.url(),
        &support::database_url(),
    )
    .await;
    let mut config = stack.config.clone();
    config.worker.heartbeat_interval_ms = 200;
    config.worker.lease_ms = 5_000;
    let first = stack.start_worker_with(config.clone(), RunOptions::default());
    let id = Uuid::new_v4();
    // Long enough (several seconds even on a fast machine) to outlive the 2 s timeout.
    let mut job = job_of(id, 150);
    job["width"] = 192.into();
    job["height"] = 192.into();
    stack.publish(&job).await;
    let running = wait_denoising(&stack, id).await;
    config.worker.id = Some(format!("{}-second", stack.config.broker.prefix));
    let second = stack.start_worker_with(config, RunOptions::default());
    let connections = wait_connections(&rabbit, 3).await;
    // The broker takes the delivery back while the job still runs. The job's only delivery can
    // time out only while unacknowledged, and a worker acknowledges a job once its row is
    // final; the job's run time below shows it outlived the timeout. (Reading the row when the
    // log line is found would race with the end of the job on a loaded machine: this test's
    // own broker queries take seconds there.)
    let deadline = Instant::now() + Duration::from_secs(30);
    while !rabbit.logged_consumer_timeout() {
        assert!(
            Instant::now() < deadline,
            "the broker never timed out the delivery"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let rows = check_outcome(&stack, &stack.broker, &[id], JobState::Succeeded).await;
    let started = rows[0].started_at.expect("started_at");
    let finished = rows[0].finished_at.expect("finished_at");
    assert!(
        finished - started > chrono::Duration::milliseconds(2_500),
        "the job ran {} ms, not past the broker's 2 s consumer timeout",
        (finished - started).num_milliseconds()
    );
    // The owner reopened the channel the broker closed; no worker reconnected.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(rabbit.connections(), connections);
    assert_eq!(rows[0].attempt, 1, "the job ran once");
    assert_eq!(rows[0].worker_id, running.worker_id);
    second.stop().await.unwrap();
    first.stop().await.unwrap();
    stack.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_outage_mid_job_is_retried_and_no_job_succeeds_without_its_objects() {
    let mut stack = Stack::new("fault-s3", StorageKind::S3).await;
    let moto_port: u16 = stack
        .moto
        .as_ref()
        .unwrap()
        .endpoint()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let proxy = FaultProxy::start(moto_port).await;
    if let StorageConfig::S3 { endpoint, .. } = &mut stack.config.storage {
        *endpoint = Some(format!("http://127.0.0.1:{}", proxy.port));
    }
    let mut config: Config = stack.config.clone();
    config.worker.max_attempts = 5;
    let worker = stack.start_worker_with(config, RunOptions::default());

    let id = Uuid::new_v4();
    stack.publish(&job_of(id, 10)).await;
    wait_denoising(&stack, id).await;
    proxy.go_down();
    // The upload fails (the storage client's own retries give up after 30 s), the job goes
    // back to the queue and its next attempt finds S3 back.
    let requeued = stack
        .wait_row(id, LONG, |row| row.attempt >= 2 || row.state.is_terminal())
        .await;
    assert!(
        proxy.refused() > 0,
        "the worker tried to upload while S3 was down"
    );
    assert_ne!(
        requeued.state,
        JobState::Succeeded,
        "no success without its object"
    );
    proxy.come_up();

    let rows = check_outcome(&stack, &stack.broker, &[id], JobState::Succeeded).await;
    assert!(rows[0].attempt >= 2);
    worker.stop().await.unwrap();
    stack.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_running_past_its_cost_estimated_timeout_fails_with_code_timeout() {
    let stack = Stack::new("fault-job-timeout", StorageKind::Local).await;
    let mut config = stack.config.clone();
    // The quick job's timeout (10 s) also covers loading the model on a cold worker, on a
    // busy machine.
    config.worker.job_timeout_min_ms = 10_000;
    config.worker.job_timeout_per_megapixel_step_ms = 1;
    let worker = stack.start_worker_with(config, RunOptions::default());
    let quick = Uuid::new_v4();
    let slow = Uuid::new_v4();
    stack.publish(&small_job(quick)).await;
    // 512 x 512 x 150 steps = 39.3 megapixel-steps: a timeout of 10,039 ms, far less than the
    // job needs here.
    let mut big = job_of(slow, 150);
    big["width"] = 512.into();
    big["height"] = 512.into();
    stack.publish(&big).await;

    check_outcome(&stack, &stack.broker, &[quick], JobState::Succeeded).await;
    let rows = check_outcome(&stack, &stack.broker, &[slow], JobState::Failed).await;
    assert_eq!(rows[0].error_code.as_deref(), Some("timeout"));
    let message = rows[0].error_message.as_deref().unwrap();
    assert!(message.contains("10039 ms"), "{message}");
    assert_eq!(rows[0].attempt, 1, "a timeout is not retried");
    assert!(rows[0].images.is_empty());
    worker.stop().await.unwrap();
    stack.teardown().await;
}

/// The worker binary on `stack`'s servers, as a child process.
fn worker_process(stack: &Stack, worker_id: &str, env: &[(&str, &str)]) -> Child {
    let config = &stack.config;
    let (path, prefix) = match &config.storage {
        StorageConfig::Local { path, prefix } => (path.clone(), prefix.clone()),
        StorageConfig::S3 { .. } => unreachable!("local storage"),
    };
    let model = format!("tiny-sdxl={}", support::tiny_model_dir().display());
    Command::new(env!("CARGO_BIN_EXE_sdxl-worker"))
        .arg("worker")
        .env_remove("SDXL_CONFIG")
        .env_remove("RUST_LOG")
        .env("SDXL_BROKER_URL", &config.broker.url)
        .env("SDXL_BROKER_PREFIX", &config.broker.prefix)
        .env("SDXL_DATABASE_URL", &config.database.url)
        .env("SDXL_DATABASE_SCHEMA", &config.database.schema)
        .env("SDXL_STORAGE_BACKEND", "local")
        .env("SDXL_STORAGE_PATH", path)
        .env("SDXL_STORAGE_PREFIX", prefix)
        .env("SDXL_WORKER_ID", worker_id)
        .env("SDXL_WORKER_DEVICES", "cpu")
        .env("SDXL_WORKER_POLL_INTERVAL_MS", "20")
        .env("SDXL_WORKER_PROGRESS_INTERVAL_MS", "50")
        .env("SDXL_MODELS_DEFAULT", "tiny-sdxl")
        .env("SDXL_MODELS_AVAILABLE", model)
        .env("SDXL_LOG_LEVEL", "warn")
        .envs(support::ort_env())
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the worker binary")
}

fn signal(child: &Child, name: &str) {
    let sent = Command::new("kill")
        .args([format!("-{name}"), child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not exit in {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_denoising_or_stopped_mid_job_loses_nothing() {
    let stack = Stack::new("fault-kill", StorageKind::Local).await;
    let worker_id = format!("{}-proc", stack.config.broker.prefix);
    let grace = [("SDXL_WORKER_SHUTDOWN_GRACE_MS", "500")];
    let killed = Uuid::new_v4();
    let stopped = Uuid::new_v4();
    let after = Uuid::new_v4();
    stack.publish(&job_of(killed, 40)).await;

    // SIGKILL while denoising: the broker redelivers the job when the connection drops.
    let mut worker = worker_process(&stack, &worker_id, &grace);
    let running = wait_denoising(&stack, killed).await;
    signal(&worker, "KILL");
    wait_exit(&mut worker, Duration::from_secs(10));
    assert_eq!(
        stack.db.db.get(killed).await.unwrap().unwrap().state,
        JobState::Running
    );

    // SIGTERM mid-job: the worker stops taking jobs, returns the job in flight after the
    // grace period, and exits 0 leaving no row running.
    stack.publish(&job_of(stopped, 60)).await;
    let mut worker = worker_process(&stack, &worker_id, &grace);
    let row = stack.wait_terminal(killed, LONG).await;
    assert_eq!(row.state, JobState::Succeeded);
    assert_eq!(row.attempt, running.attempt + 1, "redelivered once");
    wait_denoising(&stack, stopped).await;
    let term_at = Instant::now();
    signal(&worker, "TERM");
    let status = wait_exit(&mut worker, Duration::from_secs(30));
    assert!(status.success(), "a graceful stop exits 0, got {status}");
    assert!(
        term_at.elapsed() < Duration::from_secs(15),
        "within the grace period"
    );
    let row = stack.db.db.get(stopped).await.unwrap().unwrap();
    assert!(
        matches!(row.state, JobState::Queued | JobState::Succeeded),
        "finished or returned, not left running: {row:#?}"
    );

    stack.publish(&small_job(after)).await;
    let mut worker = worker_process(&stack, &worker_id, &grace);
    check_outcome(
        &stack,
        &stack.broker,
        &[killed, stopped, after],
        JobState::Succeeded,
    )
    .await;
    signal(&worker, "TERM");
    assert!(wait_exit(&mut worker, Duration::from_secs(30)).success());
    let running: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'running'")
        .fetch_one(stack.db.db.pool())
        .await
        .unwrap();
    assert_eq!(running, 0);
    stack.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_crashes_its_worker_every_time_is_dead_lettered_with_its_reason() {
    let stack = Stack::new("fault-poison", StorageKind::Local).await;
    let worker_id = format!("{}-proc", stack.config.broker.prefix);
    let poison_prompt = "a prompt that crashes the worker";
    let switch = [(ABORT_ON_PROMPT_ENV, poison_prompt)];
    let poison = Uuid::new_v4();
    let good = Uuid::new_v4();
    let mut job = small_job(poison);
    job["prompt"] = poison_prompt.into();
    stack.publish(&job).await;
    stack.publish(&small_job(good)).await;

    // Restart the worker whenever the poison job kills it, as a supervisor would.
    let deadline = Instant::now() + LONG;
    let mut crashes = 0;
    let mut worker = worker_process(&stack, &worker_id, &switch);
    loop {
        let row = stack.db.db.get(poison).await.unwrap();
        if row.is_some_and(|r| r.state.is_terminal()) {
            break;
        }
        if let Some(status) = worker.try_wait().unwrap() {
            assert!(!status.success(), "the worker crashed");
            crashes += 1;
            worker = worker_process(&stack, &worker_id, &switch);
        }
        assert!(Instant::now() < deadline, "the poison job never ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let max_attempts = stack.config.worker.max_attempts as usize;
    assert_eq!(crashes, max_attempts, "one crash per attempt");

    let row = stack.db.db.get(poison).await.unwrap().unwrap();
    assert_eq!(row.state, JobState::Failed);
    assert_eq!(row.error_code.as_deref(), Some("attempts_exhausted"));
    let dead_queue = stack.broker.topology().dead_queue();
    let dead = stack
        .next_message(&dead_queue, Duration::from_secs(10))
        .await
        .expect("the poison job is dead-lettered");
    assert_eq!(dead.message_id(), Some(poison.to_string().as_str()));
    assert_eq!(
        dead.header_str(HEADER_ERROR_CODE).as_deref(),
        Some("attempts_exhausted")
    );
    assert!(dead.header_str(HEADER_ERROR).is_some());
    dead.ack().await.unwrap();

    check_outcome(&stack, &stack.broker, &[good], JobState::Succeeded).await;
    signal(&worker, "TERM");
    assert!(wait_exit(&mut worker, Duration::from_secs(30)).success());
    stack.teardown().await;
}
