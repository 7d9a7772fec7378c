//! Models added, replaced and removed while the worker binary runs (real RabbitMQ and
//! Postgres, local storage): the worker starts with model `a` only, a job for `b` fails with
//! `unknown_model`; `b` is added to the configuration file and `sdxl-worker models reload`
//! (SIGHUP through the pid file) makes the same process run it; `a` moved to a copy with other
//! scheduler settings runs from the new files (the engine's own output for them), an invalid
//! file or a key that needs a restart changes nothing, and once `a` is removed its jobs fail.

mod queue_harness;
mod support;

use std::io::{BufRead, BufReader};
use std::ops::ControlFlow;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use queue_harness::{small_job, Stack, StorageKind};
use sdxl_worker::config::{ControlNetConfig, Limits, StorageConfig};
use sdxl_worker::db::{JobRow, JobState};
use sdxl_worker::engine::{Device, Engine, EngineOptions};
use sdxl_worker::job;
use sdxl_worker::storage::Storage;
use serde_json::Value;
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

/// The worker binary with its stderr collected line by line.
struct WorkerProcess {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl WorkerProcess {
    fn start(stack: &Stack, config_file: &Path) -> WorkerProcess {
        let StorageConfig::Local { path, prefix } = &stack.config.storage else {
            panic!("local storage expected");
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_sdxl-worker"))
            .args(["--config", config_file.to_str().unwrap(), "worker"])
            .env_remove("SDXL_CONFIG")
            .env_remove("SDXL_MODELS_AVAILABLE")
            .env_remove("SDXL_MODELS_DEFAULT")
            .env_remove("RUST_LOG")
            .env("SDXL_BROKER_URL", &stack.config.broker.url)
            .env("SDXL_BROKER_PREFIX", &stack.config.broker.prefix)
            .env("SDXL_DATABASE_URL", &stack.config.database.url)
            .env("SDXL_DATABASE_SCHEMA", &stack.config.database.schema)
            .env("SDXL_STORAGE_BACKEND", "local")
            .env("SDXL_STORAGE_PATH", path)
            .env("SDXL_STORAGE_PREFIX", prefix)
            .env("SDXL_WORKER_DEVICES", "cpu")
            .env("SDXL_WORKER_POLL_INTERVAL_MS", "20")
            .env("SDXL_LOG_LEVEL", "info")
            .envs(support::ort_env())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the worker");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("worker: {line}");
                sink.lock().unwrap().push(line);
            }
        });
        WorkerProcess { child, log }
    }

    fn count(&self, text: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(text))
            .count()
    }

    /// Waits until the log has `n` lines containing `text`.
    async fn wait_log(&self, text: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.count(text) < n {
            assert!(Instant::now() < deadline, "no {n} log lines with {text:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// `models reload` as an operator runs it: it signals the pid in `worker.pid_file`.
fn reload(config_file: &Path) {
    let output = Command::new(env!("CARGO_BIN_EXE_sdxl-worker"))
        .args([
            "--config",
            config_file.to_str().unwrap(),
            "models",
            "reload",
        ])
        .env_remove("SDXL_CONFIG")
        .env("SDXL_LOG_LEVEL", "warn")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn write_config(
    file: &Path,
    pid_file: &Path,
    default: &str,
    models: &[(&str, &Path)],
    extra: &str,
) {
    let mut text = format!(
        "[worker]\npid_file = {:?}\n\n{extra}\n[models]\ndefault = {default:?}\n\n[models.available]\n",
        pid_file.display().to_string()
    );
    for (name, path) in models {
        text.push_str(&format!(
            "{name} = {{ path = {:?}, default_width = 64, default_height = 64 }}\n",
            path.display().to_string()
        ));
    }
    std::fs::write(file, text).unwrap();
}

fn job_for(model: &str) -> (Uuid, Value) {
    let id = Uuid::new_v4();
    let mut job = small_job(id);
    job["model"] = model.into();
    (id, job)
}

async fn run_job(stack: &Stack, model: &str) -> JobRow {
    let (id, job) = job_for(model);
    stack.publish(&job).await;
    stack.wait_terminal(id, Duration::from_secs(120)).await
}

fn field_errors(row: &JobRow) -> Vec<(String, String)> {
    row.error_details
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

fn assert_unknown_model(row: &JobRow) {
    assert_eq!(row.state, JobState::Failed, "{row:#?}");
    assert_eq!(row.error_code.as_deref(), Some("invalid_request"));
    assert!(
        field_errors(row).contains(&("model".to_owned(), "unknown_model".to_owned())),
        "{row:#?}"
    );
}

async fn pixels(storage: &Storage, row: &JobRow) -> Vec<u8> {
    let png = storage.get(&row.images[0].key).await.unwrap();
    let mut reader = png::Decoder::new(std::io::Cursor::new(png))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    buf
}

/// What the engine makes directly from `model_dir` for the request recorded in `row`.
fn direct(row: &JobRow, model_dir: &Path, stack: &Stack) -> Vec<u8> {
    let mut models = stack.config.models.clone();
    models.models[0].name = row.model.clone().unwrap();
    models.default = models.models[0].name.clone();
    let valid = job::parse_and_validate_with(
        &serde_json::to_vec(&row.request).unwrap(),
        &Limits::default(),
        &models,
        &ControlNetConfig::default(),
    )
    .unwrap();
    let options = EngineOptions {
        device: Device::Cpu,
        ..EngineOptions::default()
    };
    let engine = Engine::load(model_dir, &options).unwrap();
    let output = engine
        .generate(
            &valid.generate_request(),
            &mut |_| ControlFlow::Continue(()),
        )
        .unwrap();
    output.images[0].rgb.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_added_replaced_and_removed_by_a_reload_of_the_same_worker() {
    let stack = Stack::new("reload", StorageKind::Local).await;
    let storage = Storage::from_config(&stack.config.storage).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (a, b, a2) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("a2"),
    );
    copy_dir(&support::tiny_model_dir(), &a);
    copy_dir(&support::tiny_model_dir(), &b);
    copy_dir(&support::tiny_model_dir(), &a2);
    // The replacement of `a`: trailing timestep spacing gives other timesteps, other pixels.
    let scheduler = a2.join("scheduler/scheduler_config.json");
    let mut settings: Value =
        serde_json::from_str(&std::fs::read_to_string(&scheduler).unwrap()).unwrap();
    settings["timestep_spacing"] = "trailing".into();
    std::fs::write(&scheduler, serde_json::to_vec_pretty(&settings).unwrap()).unwrap();

    let config = dir.path().join("worker.toml");
    let pid_file = dir.path().join("worker.pid");
    write_config(&config, &pid_file, "a", &[("a", &a)], "");
    let mut worker = WorkerProcess::start(&stack, &config);
    let pid = worker.child.id();

    // Model `a` runs; `b` is unknown.
    let first_a = run_job(&stack, "a").await;
    assert_eq!(first_a.state, JobState::Succeeded, "{first_a:#?}");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        pid.to_string()
    );
    assert_unknown_model(&run_job(&stack, "b").await);

    // Add `b`, reload: the same process runs it, loading it for that job.
    write_config(&config, &pid_file, "a", &[("a", &a), ("b", &b)], "");
    reload(&config);
    worker.wait_log("models reloaded", 1).await;
    let first_b = run_job(&stack, "b").await;
    assert_eq!(first_b.state, JobState::Succeeded, "{first_b:#?}");
    let metrics = stack.db.db.get_metrics(first_b.id).await.unwrap().unwrap();
    assert!(metrics.model_load_ms > 0.0, "b was loaded for its job");
    assert!(worker.alive());
    assert_eq!(worker.child.id(), pid);

    // An invalid file changes nothing (`models reload` refuses to load it, so the signal is
    // sent by hand); a key that needs a restart is only reported.
    std::fs::write(&config, "[models\ndefault = ").unwrap();
    signal(pid, "HUP");
    worker.wait_log("the new configuration is invalid", 1).await;
    assert_eq!(run_job(&stack, "b").await.state, JobState::Succeeded);
    write_config(
        &config,
        &pid_file,
        "a",
        &[("a", &a), ("b", &b)],
        "[limits]\nmax_steps = 20\n",
    );
    reload(&config);
    worker.wait_log("models reloaded", 2).await;
    assert!(
        worker.count("limits.max_steps") >= 1,
        "the ignored key is logged"
    );
    let (id, mut job) = job_for("b");
    job["steps"] = 30.into();
    stack.publish(&job).await;
    let row = stack.wait_terminal(id, Duration::from_secs(120)).await;
    assert_eq!(
        row.state,
        JobState::Succeeded,
        "max_steps stays as at start"
    );

    // Move `a` to the replacement files: its next job loads them and matches the engine.
    write_config(&config, &pid_file, "a", &[("a", &a2), ("b", &b)], "");
    reload(&config);
    worker.wait_log("models reloaded", 3).await;
    let second_a = run_job(&stack, "a").await;
    assert_eq!(second_a.state, JobState::Succeeded, "{second_a:#?}");
    let metrics = stack.db.db.get_metrics(second_a.id).await.unwrap().unwrap();
    assert!(
        metrics.model_load_ms > 0.0,
        "a was loaded again from its new path"
    );
    let before = pixels(&storage, &first_a).await;
    let after = pixels(&storage, &second_a).await;
    assert_ne!(before, after, "the new scheduler settings are in use");
    assert!(after == direct(&second_a, &a2, &stack));
    assert!(before == direct(&first_a, &a, &stack));

    // Remove `a`: its jobs fail clearly, its loaded engine is dropped, `b` still runs.
    write_config(&config, &pid_file, "b", &[("b", &b)], "");
    reload(&config);
    worker.wait_log("models reloaded", 4).await;
    worker
        .wait_log("model no longer configured: evicted", 1)
        .await;
    assert_unknown_model(&run_job(&stack, "a").await);
    assert_eq!(run_job(&stack, "b").await.state, JobState::Succeeded);
    assert_eq!(worker.child.id(), pid);
    assert!(worker.alive());

    // SIGTERM stops it and removes the pid file.
    signal(pid, "TERM");
    let deadline = Instant::now() + Duration::from_secs(60);
    while worker.alive() {
        assert!(Instant::now() < deadline, "the worker did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!pid_file.exists());
    stack.teardown().await;
}
