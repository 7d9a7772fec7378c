//! The engine thread on the tiny CPU models: failed loads, cancellation, the model cache and
//! panic messages.

use super::*;
use crate::engine::Device;

/// A small text-to-image request (64x64, 2 steps) for the engine thread's tests.
pub(in crate::worker) fn request() -> GenerateRequest {
    GenerateRequest {
        prompt: "a red fox".to_owned(),
        prompt_2: None,
        negative_prompt: None,
        negative_prompt_2: None,
        width: 64,
        height: 64,
        steps: 2,
        guidance_scale: 5.0,
        guidance_rescale: 0.0,
        scheduler: crate::engine::SchedulerKind::Euler,
        scheduler_overrides: Default::default(),
        seed: 1,
        num_images: 1,
        original_size: None,
        crops_coords_top_left: (0, 0),
        target_size: None,
        initial_latents: None,
        controls: Default::default(),
    }
}

fn job(path: &str, cancel: bool) -> EngineJob {
    EngineJob {
        model: ModelRef {
            name: "m".to_owned(),
            path: PathBuf::from(path),
        },
        request: request(),
        progress: tokio_mpsc::unbounded_channel().0,
        cancel: Arc::new(AtomicBool::new(cancel)),
        control: None,
        refiner: None,
    }
}

#[tokio::test]
async fn a_model_that_cannot_load_fails_the_job_and_the_thread_carries_on() {
    let options = EngineOptions {
        device: Device::Cpu,
        ..EngineOptions::default()
    };
    let thread =
        EngineThread::spawn(options, 0, ControlNetPaths::default(), Batching::default()).unwrap();
    for _ in 0..2 {
        let failure = thread
            .submit(job("/nonexistent/model", false))
            .await
            .err()
            .expect("no model there");
        assert_eq!(failure.code(), "model_load_failed");
        assert!(matches!(failure, EngineFailure::Load { .. }));
    }
    thread.shutdown().await;
}

#[tokio::test]
async fn a_job_cancelled_before_it_starts_is_not_run() {
    let thread = EngineThread::spawn(
        EngineOptions::default(),
        0,
        ControlNetPaths::default(),
        Batching::default(),
    )
    .unwrap();
    let failure = thread
        .submit(job("/nonexistent/model", true))
        .await
        .err()
        .expect("cancelled");
    assert!(matches!(failure, EngineFailure::Cancelled));
    thread.shutdown().await;
}

fn tiny_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sdxl")
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
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

fn model_job(name: &str, path: &std::path::Path) -> EngineJob {
    EngineJob {
        model: ModelRef {
            name: name.to_owned(),
            path: path.to_path_buf(),
        },
        request: request(),
        progress: tokio_mpsc::unbounded_channel().0,
        cancel: Arc::new(AtomicBool::new(false)),
        control: None,
        refiner: None,
    }
}

/// An engine thread with the tests' options and a model memory budget of `budget` bytes.
fn spawn_with_budget(budget: u64) -> EngineThread {
    EngineThread::spawn(
        options(),
        budget,
        ControlNetPaths::default(),
        Batching::default(),
    )
    .unwrap()
}

fn options() -> EngineOptions {
    EngineOptions {
        intra_threads: Some(1),
        ..EngineOptions::default()
    }
}

#[tokio::test]
async fn two_models_alternate_on_one_thread_and_stay_loaded_within_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let second = dir.path().join("tiny-b");
    copy_dir(&tiny_model(), &second);
    let plan = [
        ("a", tiny_model()),
        ("b", second.clone()),
        ("a", tiny_model()),
        ("b", second),
    ];

    // Room for both: each is loaded once.
    let thread = spawn_with_budget(1 << 30);
    let mut loads = Vec::new();
    let mut images = Vec::new();
    for (name, path) in &plan {
        let run = thread.submit(model_job(name, path)).await.expect("runs");
        loads.push(run.model_load.is_some());
        images.push(run.output.images[0].rgb.clone());
    }
    assert_eq!(loads, [true, true, false, false]);
    assert_eq!(images[0], images[2]);
    assert_eq!(images[0], images[1], "the same weights under two names");
    thread.shutdown().await;

    // A budget of one model: every switch loads again.
    let thread = spawn_with_budget(0);
    let mut loads = Vec::new();
    for (name, path) in &plan {
        let run = thread.submit(model_job(name, path)).await.expect("runs");
        loads.push(run.model_load.is_some());
    }
    assert_eq!(loads, [true; 4]);
    thread.shutdown().await;
}

#[tokio::test]
async fn replaced_model_files_take_effect_with_the_next_job() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    copy_dir(&tiny_model(), &model);
    let thread = spawn_with_budget(1 << 30);
    let first = thread.submit(model_job("m", &model)).await.expect("runs");
    let again = thread.submit(model_job("m", &model)).await.expect("runs");
    assert!(first.model_load.is_some());
    assert!(again.model_load.is_none());
    assert_eq!(first.output.images[0].rgb, again.output.images[0].rgb);

    // Replace the scheduler configuration: trailing spacing gives other timesteps.
    let config_path = model.join("scheduler/scheduler_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["timestep_spacing"] = serde_json::json!("trailing");
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();

    let replaced = thread.submit(model_job("m", &model)).await.expect("runs");
    assert!(replaced.model_load.is_some(), "reloaded after the change");
    assert_ne!(replaced.output.images[0].rgb, first.output.images[0].rgb);
    let fresh = Engine::load(&model, &options())
        .unwrap()
        .generate(&request(), &mut |_| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(replaced.output.images[0].rgb, fresh.images[0].rgb);
    thread.shutdown().await;
}

#[test]
fn panic_payloads_become_messages() {
    let text: Box<dyn std::any::Any + Send> = Box::new("boom");
    assert_eq!(panic_message(text.as_ref()), "boom");
    let owned: Box<dyn std::any::Any + Send> = Box::new(String::from("bang"));
    assert_eq!(panic_message(owned.as_ref()), "bang");
    let other: Box<dyn std::any::Any + Send> = Box::new(7_u8);
    assert_eq!(panic_message(other.as_ref()), "unknown panic payload");
}
