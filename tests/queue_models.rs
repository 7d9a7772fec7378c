//! Several models on one consumer: jobs alternating between two models all succeed on one
//! running worker, each model is loaded once (its load time in the first job's metrics row, 0
//! afterwards) when the model cache has room for both, and a model whose files cannot be
//! loaded fails its job with `model_load_failed` while the worker carries on.

mod queue_harness;
mod support;

use std::path::Path;
use std::time::Duration;

use queue_harness::{small_job, Stack, StorageKind};
use sdxl_worker::config::ModelEntry;
use sdxl_worker::db::JobState;
use sdxl_worker::worker::RunOptions;
use uuid::Uuid;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_models_alternate_on_one_consumer_each_loaded_once() {
    let stack = Stack::new("models", StorageKind::Local).await;
    let dir = tempfile::tempdir().unwrap();
    let second = dir.path().join("tiny-b");
    copy_dir(&support::tiny_model_dir(), &second);
    let mut config = stack.config.clone();
    let base = config.models.get("tiny-sdxl").unwrap().clone();
    config.models.models.push(ModelEntry {
        name: "tiny-b".to_owned(),
        path: second,
        ..base.clone()
    });
    config.models.models.push(ModelEntry {
        name: "broken".to_owned(),
        path: dir.path().join("missing"),
        ..base
    });
    config.worker.model_cache_mb = 1024;
    let worker = stack.start_worker_with(config, RunOptions::default());

    let plan = [
        "tiny-sdxl",
        "tiny-b",
        "tiny-sdxl",
        "tiny-b",
        "broken",
        "tiny-sdxl",
    ];
    let mut ids = Vec::new();
    for model in plan {
        let id = Uuid::new_v4();
        let mut job = small_job(id);
        job["model"] = model.into();
        stack.publish(&job).await;
        // One at a time, so that the order of loads is the order of the plan.
        let row = stack.wait_terminal(id, Duration::from_secs(120)).await;
        ids.push((model, row));
    }
    let mut loads = Vec::new();
    for (model, row) in &ids {
        if *model == "broken" {
            assert_eq!(row.state, JobState::Failed, "{row:#?}");
            assert_eq!(row.error_code.as_deref(), Some("model_load_failed"));
            assert!(row.error_message.as_deref().unwrap().contains("broken"));
            continue;
        }
        assert_eq!(row.state, JobState::Succeeded, "{row:#?}");
        assert_eq!(row.model.as_deref(), Some(*model));
        let metrics = stack.db.db.get_metrics(row.id).await.unwrap().unwrap();
        loads.push(metrics.model_load_ms > 0.0);
    }
    assert_eq!(loads, [true, true, false, false, false]);
    worker.stop().await.unwrap();
    stack.teardown().await;
}
