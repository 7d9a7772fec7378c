//! Invalid messages of every kind: those with a readable id give a `failed` row with
//! field-by-field errors, the others are dead-lettered with their reason; the worker keeps
//! running and takes the next valid job. A valid job that cannot reach a work queue is failed
//! and dead-lettered instead of looping.

mod queue_harness;
mod support;

use std::time::Duration;

use queue_harness::{small_job, Stack, StorageKind};
use sdxl_worker::broker::{HEADER_ERROR, HEADER_ERROR_CODE};
use sdxl_worker::db::JobState;
use sdxl_worker::worker::RunOptions;
use serde_json::{json, Value};
use uuid::Uuid;

/// The `(field, code)` pairs of a failed row's `error_details.errors`.
fn field_errors(details: &Option<Value>) -> Vec<(String, String)> {
    details
        .as_ref()
        .and_then(|d| d.get("errors"))
        .and_then(Value::as_array)
        .map(|errors| {
            errors
                .iter()
                .map(|e| {
                    (
                        e["field"].as_str().unwrap_or_default().to_owned(),
                        e["code"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_messages_give_failed_rows_or_dead_letters_and_the_worker_carries_on() {
    let stack = Stack::new("invalid", StorageKind::Local).await;
    let worker = stack.start_worker(RunOptions::default());

    // Messages with a readable id: one failed row each, with the offending fields.
    let with_id: Vec<(Value, &str, &str)> = vec![
        (json!({"version": 1, "width": 64}), "prompt", "missing"),
        (
            json!({"version": 1, "prompt": "x", "width": "wide"}),
            "width",
            "wrong_type",
        ),
        (
            json!({"version": 1, "prompt": "x", "steps": 100000}),
            "steps",
            "out_of_range",
        ),
        (
            json!({"version": 1, "prompt": "x", "width": 65, "height": 64}),
            "width",
            "not_multiple_of_8",
        ),
        (
            json!({"version": 1, "prompt": "x", "model": "no-such-model"}),
            "model",
            "unknown_model",
        ),
        (
            json!({"version": 1, "prompt": "x", "scheduler": "warp"}),
            "scheduler",
            "unknown_scheduler",
        ),
        (
            json!({"version": 1, "prompt": "x", "colour": "red"}),
            "colour",
            "unknown_field",
        ),
    ];
    let mut ids = Vec::new();
    for (mut message, field, code) in with_id {
        let id = Uuid::new_v4();
        message["id"] = json!(id);
        stack.publish(&message).await;
        ids.push((id, field, code));
    }

    // Messages without a usable id: dead letters with a reason.
    let unreadable: Vec<(Vec<u8>, &str)> = vec![
        (b"this is not json".to_vec(), "not_json"),
        (Vec::new(), "empty_body"),
        (b"[1, 2, 3]".to_vec(), "not_object"),
        (
            br#"{"version": 1, "prompt": "no id"}"#.to_vec(),
            "missing_id",
        ),
        (
            br#"{"version": 1, "id": "not-a-uuid", "prompt": "x"}"#.to_vec(),
            "invalid_uuid",
        ),
    ];
    for (body, _) in &unreadable {
        stack.publish_raw(body, None, None).await;
    }

    for (id, field, code) in &ids {
        let row = stack.wait_terminal(*id, Duration::from_secs(30)).await;
        assert_eq!(row.state, JobState::Failed, "{field}: {row:#?}");
        assert_eq!(row.error_code.as_deref(), Some("invalid_request"));
        assert!(row
            .error_message
            .as_deref()
            .unwrap_or_default()
            .contains(field));
        let errors = field_errors(&row.error_details);
        assert!(
            errors.contains(&(field.to_string(), code.to_string())),
            "expected {field}/{code} in {errors:?}"
        );
        assert_eq!(row.attempt, 0, "an invalid job never starts");
        assert!(row.images.is_empty());
    }

    let dead_queue = stack.broker.topology().dead_queue();
    let mut dead_codes = Vec::new();
    for _ in 0..200 {
        if dead_codes.len() == unreadable.len() {
            break;
        }
        match stack.broker.get(&dead_queue).await.unwrap() {
            Some(message) => {
                let code = message
                    .header_str(HEADER_ERROR_CODE)
                    .expect("error code header");
                assert!(message
                    .header_str(HEADER_ERROR)
                    .is_some_and(|t| !t.is_empty()));
                let expected = unreadable
                    .iter()
                    .find(|(body, _)| *body == message.body)
                    .map(|(_, code)| *code)
                    .expect("the dead letter keeps the original body");
                assert_eq!(code, expected);
                dead_codes.push(code);
                message.ack().await.unwrap();
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    dead_codes.sort();
    let mut expected: Vec<String> = unreadable.iter().map(|(_, c)| c.to_string()).collect();
    expected.sort();
    assert_eq!(dead_codes, expected);

    // The worker is still running and takes the next job.
    let id = Uuid::new_v4();
    stack.publish(&small_job(id)).await;
    let row = stack.wait_terminal(id, Duration::from_secs(60)).await;
    assert_eq!(row.state, JobState::Succeeded, "{row:#?}");
    assert!(!worker.is_finished());

    worker.stop().await.unwrap();
    stack.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_cannot_reach_a_work_queue_is_failed_and_dead_lettered() {
    let stack = Stack::new("unroutable", StorageKind::Local).await;
    let worker = stack.start_worker(queue_harness::intake_only());
    // Once the intake runs (it declares the topology when it starts), someone removes the
    // binding of the normal work queue: valid jobs can no longer be routed.
    let first = Uuid::new_v4();
    stack.publish(&small_job(first)).await;
    stack
        .wait_row(first, Duration::from_secs(30), queue_harness::is_queued)
        .await;
    let connection = lapin::Connection::connect(&stack.config.broker.url, Default::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let topology = stack.broker.topology();
    channel
        .queue_unbind(
            topology
                .work_queue(sdxl_worker::broker::Lane::Normal)
                .as_str()
                .into(),
            topology.work_exchange().as_str().into(),
            "normal".into(),
            Default::default(),
        )
        .await
        .unwrap();
    connection.close(200, "done".into()).await.unwrap();

    let id = Uuid::new_v4();
    stack.publish(&small_job(id)).await;
    let row = stack.wait_terminal(id, Duration::from_secs(30)).await;
    assert_eq!(row.state, JobState::Failed, "{row:#?}");
    assert_eq!(row.error_code.as_deref(), Some("broker_unroutable"));

    let dead_queue = stack.broker.topology().dead_queue();
    let dead = stack
        .next_message(&dead_queue, Duration::from_secs(5))
        .await;
    let dead = dead.expect("the message is dead-lettered");
    assert_eq!(
        dead.header_str(HEADER_ERROR_CODE).as_deref(),
        Some("broker_unroutable")
    );
    dead.ack().await.unwrap();
    assert!(!worker.is_finished(), "the intake keeps running");

    worker.stop().await.unwrap();
    stack.teardown().await;
}
