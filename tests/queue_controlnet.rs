//! ControlNet jobs through the whole stack: RabbitMQ, Postgres, moto's S3 server. One job uses
//! two ControlNets, a canny edge map computed in the worker from a photograph stored under a
//! storage key and a depth map sent inline as base64; it succeeds and its metrics row shows the
//! ControlNet share of the denoising time. Jobs with an unknown type, a type without a model, a
//! missing key or an undecodable image fail with their field and code.

mod queue_harness;
mod support;

use std::time::Duration;

use base64::Engine as _;
use queue_harness::{small_job, Stack, StorageKind};
use sdxl_worker::db::JobState;
use sdxl_worker::engine::controlnet::ControlType;
use sdxl_worker::storage::Storage;
use sdxl_worker::worker::RunOptions;
use serde_json::{json, Value};
use uuid::Uuid;

fn fixtures() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controlnet_jobs_run_end_to_end_and_bad_ones_fail_clearly() {
    let mut stack = Stack::new("controlnet", StorageKind::S3).await;
    let nets = fixtures().join("tiny-controlnet");
    stack
        .config
        .controlnet
        .models
        .insert(ControlType::Canny, nets.join("canny"));
    stack
        .config
        .controlnet
        .models
        .insert(ControlType::Depth, nets.join("depth"));

    // The photograph goes to the deployment's storage, under its prefix.
    let storage = Storage::from_config(&stack.config.storage).await.unwrap();
    let photo = std::fs::read(fixtures().join("canny/astronaut.png")).unwrap();
    let key = "inputs/astronaut.png";
    storage
        .put(&format!("{}{key}", storage.prefix()), photo.into())
        .await
        .unwrap();
    let depth = std::fs::read(fixtures().join("golden/controlnet/depth_80x48.png")).unwrap();
    let depth_b64 = base64::engine::general_purpose::STANDARD.encode(&depth);

    let worker = stack.start_worker(RunOptions::default());

    let good = Uuid::new_v4();
    let mut job = small_job(good);
    job["steps"] = 4.into();
    job["controlnets"] = json!([
        {"type": "canny", "image_key": key, "preprocess": true, "conditioning_scale": 0.8,
         "canny_low_threshold": 80, "canny_high_threshold": 160},
        {"type": "depth", "image_base64": depth_b64, "control_guidance_end": 0.5},
    ]);
    stack.publish(&job).await;

    let not_an_image = base64::engine::general_purpose::STANDARD.encode(b"definitely not a png");
    let bad: Vec<(Value, &str, &str)> = vec![
        (
            json!([{"type": "scribble", "image_key": key}]),
            "controlnets[0].type",
            "unknown_controlnet_type",
        ),
        (
            json!([{"type": "openpose", "image_key": key}]),
            "controlnets[0].type",
            "controlnet_unavailable",
        ),
        (
            json!([{"type": "canny", "image_key": "inputs/missing.png"}]),
            "controlnets[0]",
            "control_image_unavailable",
        ),
        (
            json!([{"type": "depth", "image_base64": not_an_image}]),
            "controlnets[0]",
            "control_image_unreadable",
        ),
    ];
    let mut bad_ids = Vec::new();
    for (controlnets, field, code) in &bad {
        let id = Uuid::new_v4();
        let mut job = small_job(id);
        job["controlnets"] = controlnets.clone();
        stack.publish(&job).await;
        bad_ids.push((id, *field, *code));
    }

    let row = stack.wait_terminal(good, Duration::from_secs(240)).await;
    assert_eq!(row.state, JobState::Succeeded, "{row:#?}");
    assert_eq!(row.images.len(), 1);
    assert_eq!(
        row.request["controlnets"][0]["canny_low_threshold"],
        json!(80),
        "the normalized request keeps the ControlNet entries"
    );
    let metrics = stack.db.db.get_metrics(good).await.unwrap().unwrap();
    assert!(
        metrics.controlnet_ms > 0.0 && metrics.controlnet_ms < metrics.denoising_ms,
        "ControlNet share {} of denoising {}",
        metrics.controlnet_ms,
        metrics.denoising_ms
    );

    for (id, field, code) in &bad_ids {
        let row = stack.wait_terminal(*id, Duration::from_secs(120)).await;
        assert_eq!(row.state, JobState::Failed, "{field}: {row:#?}");
        assert_eq!(row.error_code.as_deref(), Some("invalid_request"));
        let errors = field_errors(&row.error_details);
        assert!(
            errors.contains(&(field.to_string(), code.to_string())),
            "expected {field}/{code} in {errors:?}"
        );
        assert!(row.images.is_empty());
    }

    worker.stop().await.unwrap();
    stack.teardown().await;
}
