//! Job rows in Postgres: life cycle, fencing by attempt, idempotent inserts, unknown ids,
//! cancellation and change notifications. Each test uses its own schema.

mod support;

use sdxl_worker::config::{DatabaseConfig, Limits, ModelsConfig};
use sdxl_worker::db::{
    CancelOutcome, Db, ImageRecord, JobMetrics, JobState, ProgressOutcome, StartOutcome,
    NOTIFY_CHANNEL,
};
use sdxl_worker::job::{parse_and_validate, FieldError, ValidJob};
use serde_json::json;
use support::TestDb;
use uuid::Uuid;

fn valid_job(extra: serde_json::Value) -> ValidJob {
    let mut message = json!({
        "version": 1,
        "id": Uuid::new_v4().to_string(),
        "prompt": "a red fox in the snow",
        "width": 512,
        "height": 512,
        "steps": 4,
    });
    for (k, v) in extra.as_object().unwrap() {
        message[k] = v.clone();
    }
    let body = serde_json::to_vec(&message).unwrap();
    parse_and_validate(&body, &Limits::default(), &ModelsConfig::default()).unwrap()
}

fn metrics() -> JobMetrics {
    JobMetrics {
        queue_wait_ms: 12.5,
        model_load_ms: 800.0,
        text_encoding_ms: 20.25,
        denoising_ms: 400.0,
        step_ms: vec![100.0, 99.5, 100.5, 100.0],
        session_run_ms: 390.0,
        vae_ms: 50.0,
        png_ms: 10.0,
        upload_ms: 5.0,
        total_ms: 1300.0,
        peak_gpu_mem_bytes: Some(3 << 30),
        controlnet_ms: 0.0,
        refiner_ms: 120.5,
        batch_size: 3,
    }
}

fn images(job: &ValidJob) -> Vec<ImageRecord> {
    (0..job.num_images)
        .map(|i| ImageRecord {
            index: i,
            key: format!("images/{}/{i}.png", job.id),
            seed: job.seed + u64::from(i),
            width: job.width,
            height: job.height,
        })
        .collect()
}

async fn start(db: &Db, id: Uuid, worker: &str) -> i32 {
    match db.start_attempt(id, worker, "cuda:0", true).await.unwrap() {
        StartOutcome::Started { attempt, .. } => attempt,
        other => panic!("expected Started, got {other:?}"),
    }
}

#[tokio::test]
async fn job_life_cycle_from_queued_to_succeeded() {
    let t = TestDb::new("life_cycle").await;
    let db = &t.db;
    let job = valid_job(json!({ "num_images": 2, "priority": 6 }));

    assert!(db.insert_queued(&job).await.unwrap());
    let row = db.get(job.id).await.unwrap().expect("row after insert");
    assert_eq!(row.state, JobState::Queued);
    assert_eq!(row.attempt, 0);
    assert_eq!(row.priority, 6);
    assert_eq!(row.model.as_deref(), Some("tiny-sdxl"));
    assert_eq!(
        row.request["seed"],
        json!(job.seed),
        "the drawn seed is recorded"
    );
    assert_eq!(row.request, job.request_json());
    assert!(row.queued_at.is_some() && row.started_at.is_none() && row.finished_at.is_none());

    let StartOutcome::Started { attempt, queued_at } = db
        .start_attempt(job.id, "worker-a", "cuda:0", true)
        .await
        .unwrap()
    else {
        panic!("not started")
    };
    assert_eq!(attempt, 1);
    assert_eq!(Some(queued_at), row.queued_at);
    assert!(db.update_progress(job.id, attempt, 2, 4).await.unwrap());
    let running = db.get(job.id).await.unwrap().unwrap();
    assert_eq!(running.state, JobState::Running);
    assert_eq!(running.worker_id.as_deref(), Some("worker-a"));
    assert_eq!(running.device.as_deref(), Some("cuda:0"));
    assert_eq!(
        (running.progress_step, running.progress_total),
        (Some(2), Some(4))
    );
    assert!(running.started_at.is_some());

    let imgs = images(&job);
    assert!(db
        .succeed(job.id, attempt, &imgs, &metrics())
        .await
        .unwrap());
    let done = db.get(job.id).await.unwrap().unwrap();
    assert_eq!(done.state, JobState::Succeeded);
    assert_eq!(done.images, imgs);
    assert_eq!(done.progress_step, Some(4));
    assert!(done.finished_at.is_some());
    assert!(done.error_code.is_none());
    assert_eq!(db.get_metrics(job.id).await.unwrap(), Some(metrics()));

    // A duplicate delivery of a finished job is recognised and skipped.
    assert_eq!(
        db.start_attempt(job.id, "worker-b", "cuda:1", true)
            .await
            .unwrap(),
        StartOutcome::AlreadyTerminal(JobState::Succeeded)
    );
}

#[tokio::test]
async fn a_stale_attempt_cannot_overwrite_a_newer_one() {
    let t = TestDb::new("fencing").await;
    let db = &t.db;
    let job = valid_job(json!({}));
    db.insert_queued(&job).await.unwrap();

    let old = start(db, job.id, "worker-a").await;
    // A second copy of the message (not a redelivery) leaves the running attempt alone.
    assert_eq!(
        db.start_attempt(job.id, "worker-c", "cpu", false)
            .await
            .unwrap(),
        StartOutcome::InHand
    );
    assert_eq!(db.get(job.id).await.unwrap().unwrap().attempt, 1);
    // The message is redelivered to another worker (the first looked dead).
    let new = start(db, job.id, "worker-b").await;
    assert_eq!((old, new), (1, 2));

    assert!(!db.update_progress(job.id, old, 3, 4).await.unwrap());
    assert_eq!(
        db.record_progress(job.id, old, 3, 4).await.unwrap(),
        ProgressOutcome::Lost
    );
    assert!(!db
        .succeed(job.id, old, &images(&job), &metrics())
        .await
        .unwrap());
    assert_eq!(
        db.get_metrics(job.id).await.unwrap(),
        None,
        "nothing written"
    );
    assert!(!db
        .fail(job.id, Some(old), "engine_error", "boom", None)
        .await
        .unwrap());
    assert!(!db.requeue(job.id, old).await.unwrap());
    assert!(!db.finish_cancelled(job.id, old).await.unwrap());

    let row = db.get(job.id).await.unwrap().unwrap();
    assert_eq!(row.state, JobState::Running);
    assert_eq!(row.worker_id.as_deref(), Some("worker-b"));

    assert!(db
        .succeed(job.id, new, &images(&job), &metrics())
        .await
        .unwrap());
    // Once terminal, even the owning attempt cannot change the row again.
    assert!(!db
        .fail(job.id, Some(new), "late", "late", None)
        .await
        .unwrap());
    assert!(!db.fail(job.id, None, "late", "late", None).await.unwrap());
    assert_eq!(
        db.get(job.id).await.unwrap().unwrap().state,
        JobState::Succeeded
    );
}

#[tokio::test]
async fn inserting_the_same_job_twice_keeps_the_first_row() {
    let t = TestDb::new("idempotent").await;
    let db = &t.db;
    let job = valid_job(json!({ "seed": 7 }));
    assert!(db.insert_queued(&job).await.unwrap());
    let first = db.get(job.id).await.unwrap().unwrap();

    let mut again = job.clone();
    again.message.prompt = "something else".to_owned();
    assert!(!db.insert_queued(&again).await.unwrap());
    // An invalid message reusing the id does not replace the job either.
    let errors = vec![FieldError::new(
        "steps",
        "out_of_range",
        "0 is outside 1..=150",
    )];
    db.insert_invalid(job.id, &json!({"id": job.id.to_string()}), &errors)
        .await
        .unwrap();
    assert_eq!(db.get(job.id).await.unwrap().unwrap(), first);

    // A running job stays running when its message is published again.
    let attempt = start(db, job.id, "w").await;
    assert!(!db.insert_queued(&job).await.unwrap());
    let row = db.get(job.id).await.unwrap().unwrap();
    assert_eq!((row.state, row.attempt), (JobState::Running, attempt));
}

#[tokio::test]
async fn unknown_ids_are_not_found() {
    let t = TestDb::new("not_found").await;
    let db = &t.db;
    let id = Uuid::new_v4();
    assert_eq!(db.get(id).await.unwrap(), None);
    assert_eq!(db.get_metrics(id).await.unwrap(), None);
    assert_eq!(
        db.start_attempt(id, "w", "cpu", true).await.unwrap(),
        StartOutcome::NotFound
    );
    assert!(!db.update_progress(id, 1, 1, 2).await.unwrap());
    assert!(!db.fail(id, None, "x", "y", None).await.unwrap());
    assert_eq!(db.cancel(id).await.unwrap(), CancelOutcome::NotFound);
}

#[tokio::test]
async fn invalid_messages_get_a_failed_row_with_field_errors() {
    let t = TestDb::new("invalid").await;
    let db = &t.db;
    let id = Uuid::new_v4();
    let body = json!({ "version": 1, "id": id.to_string(), "prompt": 5, "steps": 0 });
    let errors = vec![
        FieldError::new(
            "prompt",
            "wrong_type",
            "expected a string, found an integer",
        ),
        FieldError::new("steps", "out_of_range", "0 is outside 1..=150"),
    ];
    db.insert_invalid(id, &body, &errors).await.unwrap();
    let row = db.get(id).await.unwrap().unwrap();
    assert_eq!(row.state, JobState::Failed);
    assert_eq!(row.error_code.as_deref(), Some("invalid_request"));
    let message = row.error_message.unwrap();
    assert!(
        message.contains("prompt") && message.contains("steps"),
        "{message}"
    );
    let stored: Vec<FieldError> =
        serde_json::from_value(row.error_details.unwrap()["errors"].clone()).unwrap();
    assert_eq!(stored, errors);
    assert_eq!(row.request, body);
    assert!(row.finished_at.is_some());
    assert_eq!(
        db.start_attempt(id, "w", "cpu", true).await.unwrap(),
        StartOutcome::AlreadyTerminal(JobState::Failed)
    );
}

#[tokio::test]
async fn nul_characters_from_bad_messages_are_stored_replaced() {
    let t = TestDb::new("nul").await;
    let id = Uuid::new_v4();
    let body = json!({ "version": 1, "id": id.to_string(), "bad\u{0}key": "v\u{0}" });
    let errors = vec![FieldError::new(
        "bad\u{0}key",
        "unknown_field",
        "not a field",
    )];
    t.db.insert_invalid(id, &body, &errors).await.unwrap();
    let row = t.db.get(id).await.unwrap().unwrap();
    assert_eq!(row.request["bad\u{fffd}key"], json!("v\u{fffd}"));
    assert_eq!(
        row.error_details.unwrap()["errors"][0]["field"],
        json!("bad\u{fffd}key")
    );
}

#[tokio::test]
async fn listing_recent_jobs_by_state() {
    let t = TestDb::new("list").await;
    let db = &t.db;
    db.ping().await.unwrap();
    let first = valid_job(json!({}));
    let second = valid_job(json!({}));
    db.insert_queued(&first).await.unwrap();
    // Distinct creation times, whatever the clock's resolution.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    db.insert_queued(&second).await.unwrap();
    start(db, second.id, "w").await;

    let all: Vec<Uuid> = db
        .list(None, 10)
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(all, vec![second.id, first.id], "newest first");
    let queued = db.list(Some(JobState::Queued), 10).await.unwrap();
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].id, first.id);
    assert_eq!(db.list(None, 1).await.unwrap().len(), 1);
}

#[tokio::test]
async fn retryable_failures_requeue_and_final_failures_record_the_error() {
    let t = TestDb::new("retry").await;
    let db = &t.db;
    let job = valid_job(json!({}));
    db.insert_queued(&job).await.unwrap();
    let queued_at = db.get(job.id).await.unwrap().unwrap().queued_at.unwrap();

    let first = start(db, job.id, "w1").await;
    assert!(db.requeue(job.id, first).await.unwrap());
    let row = db.get(job.id).await.unwrap().unwrap();
    assert_eq!(row.state, JobState::Queued);
    assert!(row.queued_at.unwrap() >= queued_at);
    assert_eq!(row.progress_step, None);

    let second = start(db, job.id, "w2").await;
    assert_eq!(second, 2);
    let details = json!({ "retryable": false, "stage": "denoising" });
    assert!(db
        .fail(
            job.id,
            Some(second),
            "engine_error",
            "NaN in latents",
            Some(details.clone())
        )
        .await
        .unwrap());
    let row = db.get(job.id).await.unwrap().unwrap();
    assert_eq!(row.state, JobState::Failed);
    assert_eq!(row.error_code.as_deref(), Some("engine_error"));
    assert_eq!(row.error_message.as_deref(), Some("NaN in latents"));
    assert_eq!(row.error_details, Some(details));

    // Failing outside an attempt (for example: too many attempts) works on a queued job.
    let other = valid_job(json!({}));
    db.insert_queued(&other).await.unwrap();
    assert!(db
        .fail(other.id, None, "too_many_attempts", "gave up", None)
        .await
        .unwrap());
    assert_eq!(
        db.get(other.id).await.unwrap().unwrap().state,
        JobState::Failed
    );
}

#[tokio::test]
async fn cancelling_queued_and_running_jobs() {
    let t = TestDb::new("cancel").await;
    let db = &t.db;

    let queued = valid_job(json!({}));
    db.insert_queued(&queued).await.unwrap();
    assert_eq!(
        db.cancel(queued.id).await.unwrap(),
        CancelOutcome::Cancelled
    );
    assert_eq!(
        db.start_attempt(queued.id, "w", "cpu", true).await.unwrap(),
        StartOutcome::AlreadyTerminal(JobState::Cancelled)
    );

    let running = valid_job(json!({}));
    db.insert_queued(&running).await.unwrap();
    let attempt = start(db, running.id, "w").await;
    assert_eq!(
        db.cancel(running.id).await.unwrap(),
        CancelOutcome::Requested { attempt }
    );
    assert_eq!(
        db.record_progress(running.id, attempt, 1, 4).await.unwrap(),
        ProgressOutcome::CancelRequested
    );
    assert!(db.finish_cancelled(running.id, attempt).await.unwrap());
    let row = db.get(running.id).await.unwrap().unwrap();
    assert_eq!(row.state, JobState::Cancelled);
    assert!(row.finished_at.is_some());
    assert_eq!(
        db.cancel(running.id).await.unwrap(),
        CancelOutcome::AlreadyTerminal(JobState::Cancelled)
    );

    // A redelivered message of a job whose cancellation was requested is not run again.
    let orphan = valid_job(json!({}));
    db.insert_queued(&orphan).await.unwrap();
    start(db, orphan.id, "w-dead").await;
    db.cancel(orphan.id).await.unwrap();
    assert_eq!(
        db.start_attempt(orphan.id, "w-new", "cpu", true)
            .await
            .unwrap(),
        StartOutcome::AlreadyTerminal(JobState::Cancelled)
    );
}

#[tokio::test]
async fn schemas_isolate_deployments_and_migrations_are_repeatable() {
    let a = TestDb::new("iso_a").await;
    let b = TestDb::new("iso_b").await;
    let job = valid_job(json!({}));
    a.db.insert_queued(&job).await.unwrap();
    assert!(a.db.get(job.id).await.unwrap().is_some());
    assert!(b.db.get(job.id).await.unwrap().is_none());

    // Migrating again, and from two pools at once, is harmless.
    let second = Db::connect(&a.config).await.unwrap();
    let (r1, r2) = tokio::join!(a.db.migrate(), second.migrate());
    r1.unwrap();
    r2.unwrap();
    assert!(second.get(job.id).await.unwrap().is_some());
    second.close().await;
}

#[tokio::test]
async fn state_changes_are_notified() {
    let t = TestDb::new("notify").await;
    let mut listener = sqlx::postgres::PgListener::connect_with(t.db.pool())
        .await
        .unwrap();
    listener.listen(NOTIFY_CHANNEL).await.unwrap();
    let job = valid_job(json!({}));
    t.db.insert_queued(&job).await.unwrap();
    let attempt = start(&t.db, job.id, "w").await;

    let mut seen = Vec::new();
    while seen.len() < 2 {
        let note = tokio::time::timeout(std::time::Duration::from_secs(10), listener.recv())
            .await
            .expect("no notification within 10 s")
            .unwrap();
        let payload: serde_json::Value = serde_json::from_str(note.payload()).unwrap();
        // Other tests share the channel: keep only this schema's job.
        if payload["schema"] == json!(t.config.schema) && payload["id"] == json!(job.id) {
            seen.push((payload["state"].clone(), payload["attempt"].clone()));
        }
    }
    assert_eq!(
        seen,
        vec![
            (json!("queued"), json!(0)),
            (json!("running"), json!(attempt))
        ]
    );
}

#[tokio::test]
async fn connection_and_schema_errors_have_codes() {
    let mut cfg = TestDb::config("bad_schema");
    cfg.schema = "Robert'); DROP TABLE jobs;--".to_owned();
    let err = Db::connect(&cfg).await.unwrap_err();
    assert_eq!(err.code(), "db_invalid_schema");
    assert!(!err.is_retryable());

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = DatabaseConfig {
        url: format!("postgres://postgres:hunter2@127.0.0.1:{port}/postgres"),
        acquire_timeout_ms: 2_000,
        ..TestDb::config("unreachable")
    };
    let err = Db::connect(&cfg).await.unwrap_err();
    assert!(
        matches!(err.code(), "db_connect" | "db_connect_timeout"),
        "{err}"
    );
    assert!(err.is_retryable());
    assert!(
        !err.to_string().contains("hunter2"),
        "password leaked: {err}"
    );
}

/// A role without the CREATE privilege on the database can use a schema made for it, and
/// gets a permanent error for a schema that does not exist.
#[tokio::test]
async fn an_existing_schema_needs_no_create_privilege() {
    use sqlx::{Connection, Executor};
    let admin_url = support::database_url();
    let mut admin = sqlx::PgConnection::connect(&admin_url).await.unwrap();
    let role = format!("r_{}", support::unique_name("limited"));
    let schema = format!("t_{}", support::unique_name("owned"));
    admin
        .execute(format!("CREATE ROLE {role} LOGIN").as_str())
        .await
        .unwrap();
    admin
        .execute(format!("CREATE SCHEMA {schema} AUTHORIZATION {role}").as_str())
        .await
        .unwrap();

    let limited_url = admin_url.replacen("postgres@", &format!("{role}@"), 1);
    assert_ne!(limited_url, admin_url, "expected a URL with user postgres");
    let cfg = DatabaseConfig {
        url: limited_url.clone(),
        schema: schema.clone(),
        max_connections: 2,
        acquire_timeout_ms: 10_000,
    };
    let outcome = async {
        let db = Db::connect(&cfg).await?;
        db.migrate().await?;
        let job = valid_job(json!({}));
        db.insert_queued(&job).await?;
        let found = db.get(job.id).await?.is_some();
        db.close().await;
        Ok::<bool, sdxl_worker::db::DbError>(found)
    }
    .await;
    let missing = Db::connect(&DatabaseConfig {
        schema: format!("{schema}_absent"),
        ..cfg
    })
    .await;

    admin
        .execute(format!("DROP SCHEMA {schema} CASCADE").as_str())
        .await
        .unwrap();
    admin
        .execute(format!("DROP ROLE {role}").as_str())
        .await
        .unwrap();

    assert!(outcome.unwrap());
    let err = missing.unwrap_err();
    assert_eq!(err.code(), "db_query", "{err}");
    assert!(!err.is_retryable(), "{err}");
}
