//! Refined jobs through the whole stack (RabbitMQ, Postgres, local storage): a job with
//! `"refiner": {}` on a model with a refiner configured succeeds, its stored image is the
//! engine's own `generate_refined` output pixel for pixel, its normalized request records the
//! hand-off, its progress counts both stages and its metrics row has the refiner's time. Jobs
//! asking for a refiner on a model without one, with an out-of-range hand-off, or with a
//! hand-off that leaves the refiner no step fail with their field and code; the worker keeps
//! base and refiner loaded together on one consumer with the smallest model cache.

mod queue_harness;
mod support;

use std::ops::ControlFlow;
use std::time::Duration;

use queue_harness::{small_job, Stack, StorageKind};
use sdxl_worker::config::ModelEntry;
use sdxl_worker::db::JobState;
use sdxl_worker::engine::{Engine, EngineOptions};
use sdxl_worker::job::parse_and_validate;
use sdxl_worker::storage::Storage;
use sdxl_worker::worker::RunOptions;
use serde_json::{json, Value};
use uuid::Uuid;

fn refiner_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-refiner")
}

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

fn decode_png(bytes: &[u8]) -> Vec<u8> {
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .expect("png header");
    let mut buf = vec![0; reader.output_buffer_size().expect("buffer size")];
    let info = reader.next_frame(&mut buf).expect("png frame");
    buf.truncate(info.buffer_size());
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refined_jobs_run_end_to_end_and_bad_ones_fail_clearly() {
    let mut stack = Stack::new("refiner", StorageKind::Local).await;
    let base = stack.config.models.get("tiny-sdxl").unwrap().clone();
    for model in &mut stack.config.models.models {
        model.refiner = Some(refiner_dir());
    }
    stack.config.models.models.push(ModelEntry {
        name: "plain".to_owned(),
        refiner: None,
        ..base.clone()
    });
    // One model at a time: base and refiner must still be loaded together.
    stack.config.worker.model_cache_mb = 0;
    let worker = stack.start_worker(RunOptions::default());

    let good = Uuid::new_v4();
    let mut job = small_job(good);
    job["steps"] = 10.into();
    job["negative_prompt"] = "blurry".into();
    job["refiner"] = json!({});
    stack.publish(&job).await;

    let bad: Vec<(Value, &str, &str, &str)> = vec![
        (
            json!({"model": "plain", "refiner": {}}),
            "refiner",
            "no_refiner",
            "invalid_request",
        ),
        (
            json!({"refiner": {"handoff": 1.0}}),
            "refiner.handoff",
            "out_of_range",
            "invalid_request",
        ),
        (
            json!({"refiner": {"handoff": 0.8, "strength": 1}}),
            "refiner.strength",
            "unknown_field",
            "invalid_request",
        ),
    ];
    let mut bad_ids = Vec::new();
    for (fields, field, code, error) in &bad {
        let id = Uuid::new_v4();
        let mut job = small_job(id);
        for (k, v) in fields.as_object().unwrap() {
            job[k] = v.clone();
        }
        stack.publish(&job).await;
        bad_ids.push((id, *field, *code, *error));
    }
    // Valid at intake, but 2 leading steps (501, 1) and the refiner's trailing ones
    // (999, 499) leave the refiner nothing below the cut-off of a 0.9 hand-off (100).
    let empty_stage = Uuid::new_v4();
    let mut job = small_job(empty_stage);
    job["refiner"] = json!({"handoff": 0.9});
    stack.publish(&job).await;

    let row = stack.wait_terminal(good, Duration::from_secs(240)).await;
    assert_eq!(row.state, JobState::Succeeded, "{row:#?}");
    assert_eq!(
        row.request["refiner"],
        json!({"handoff": 0.8, "aesthetic_score": 6.0, "negative_aesthetic_score": 2.5}),
        "the normalized request records the hand-off"
    );
    // Euler, 10 steps: 8 base steps (901..201) then 2 refiner steps (199, 99).
    assert_eq!(
        (row.progress_step, row.progress_total),
        (Some(10), Some(10))
    );
    let metrics = stack.db.db.get_metrics(good).await.unwrap().unwrap();
    assert!(metrics.refiner_ms > 0.0, "{metrics:?}");
    assert_eq!(metrics.step_ms.len(), 10);

    // The stored image is the engine's own output for the normalized request.
    let valid = parse_and_validate(
        &serde_json::to_vec(&row.request).unwrap(),
        &stack.config.limits,
        &stack.config.models,
    )
    .expect("the normalized request validates");
    let options = EngineOptions::default();
    let base_engine = Engine::load(&base.path, &options).unwrap();
    let refiner = Engine::load(refiner_dir(), &options).unwrap();
    let direct = base_engine
        .generate_refined(
            &refiner,
            &valid.generate_request(),
            &valid.refine().expect("a refined job"),
            &mut |_| ControlFlow::Continue(()),
        )
        .unwrap();
    let storage = Storage::from_config(&stack.config.storage).await.unwrap();
    let stored = storage.get(&row.images[0].key).await.unwrap();
    assert_eq!(decode_png(&stored), direct.images[0].rgb);

    for (id, field, code, error) in &bad_ids {
        let row = stack.wait_terminal(*id, Duration::from_secs(120)).await;
        assert_eq!(row.state, JobState::Failed, "{field}: {row:#?}");
        assert_eq!(row.error_code.as_deref(), Some(*error));
        let errors = field_errors(&row.error_details);
        assert!(
            errors.contains(&(field.to_string(), code.to_string())),
            "expected {field}/{code} in {errors:?}"
        );
    }
    let row = stack
        .wait_terminal(empty_stage, Duration::from_secs(120))
        .await;
    assert_eq!(row.state, JobState::Failed, "{row:#?}");
    assert_eq!(row.error_code.as_deref(), Some("invalid_request"));
    let message = row.error_message.unwrap_or_default();
    assert!(message.contains("refiner runs no step"), "{message}");

    worker.stop().await.unwrap();
    stack.teardown().await;
}
