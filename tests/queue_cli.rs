//! The command line against the real services: `worker` (stopped with SIGTERM), `submit`
//! (flags with `--wait`, or `--json FILE`), `status` (including an unknown id) and `demo`, each
//! run as the built binary.

mod support;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::TestDb;
use uuid::Uuid;

/// Environment of one isolated deployment: its own schema, queue prefix and image directory.
struct Deployment {
    db: TestDb,
    prefix: String,
    images: tempfile::TempDir,
    cwd: tempfile::TempDir,
}

impl Deployment {
    async fn new(label: &str) -> Deployment {
        Deployment {
            db: TestDb::new(label).await,
            prefix: support::unique_prefix(label),
            images: tempfile::tempdir().unwrap(),
            cwd: tempfile::tempdir().unwrap(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_sdxl-worker"));
        let model = format!("tiny-sdxl={}", support::tiny_model_dir().display());
        command
            .args(args)
            .current_dir(self.cwd.path())
            .env_remove("SDXL_CONFIG")
            .env_remove("RUST_LOG")
            .env("SDXL_BROKER_URL", support::broker_url())
            .env("SDXL_BROKER_PREFIX", &self.prefix)
            .env("SDXL_DATABASE_URL", &self.db.config.url)
            .env("SDXL_DATABASE_SCHEMA", &self.db.config.schema)
            .env("SDXL_STORAGE_BACKEND", "local")
            .env("SDXL_STORAGE_PATH", self.images.path())
            .env("SDXL_WORKER_DEVICES", "cpu")
            .env("SDXL_WORKER_POLL_INTERVAL_MS", "20")
            .env("SDXL_MODELS_DEFAULT", "tiny-sdxl")
            .env("SDXL_MODELS_AVAILABLE", model)
            .env("SDXL_LOG_LEVEL", "warn")
            .envs(support::ort_env());
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run sdxl-worker")
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the process did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_of_an_unknown_id_is_not_found_with_exit_code_2() {
    let deployment = Deployment::new("cli-status").await;
    let id = Uuid::new_v4().to_string();
    let output = deployment.run(&["status", &id]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("not found"));
    assert!(output.stdout.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_json_gets_an_id_and_status_shows_the_queued_row() {
    let deployment = Deployment::new("cli-json").await;
    // An intake-only worker: the job is recorded but never run.
    let mut worker = deployment
        .command(&["worker", "--intake-only"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the worker");
    let file = deployment.cwd.path().join("job.json");
    std::fs::write(
        &file,
        r#"{"version": 1, "prompt": "a blue heron", "width": 64, "height": 64, "priority": 6}"#,
    )
    .unwrap();
    let output = deployment.run(&["submit", "--json", file.to_str().unwrap()]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let id = text(&output.stdout).trim().to_owned();
    Uuid::parse_str(&id).expect("the generated id is printed");

    let mut row = serde_json::Value::Null;
    for _ in 0..100 {
        let status = deployment.run(&["status", &id]);
        if status.status.success() {
            row = serde_json::from_slice(&status.stdout).expect("JSON");
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(row["state"], "queued", "{row}");
    assert_eq!(row["priority"], 6);
    assert_eq!(row["request"]["prompt"], "a blue heron");

    let killed = Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert!(wait_exit(&mut worker, Duration::from_secs(60)).success());
    let topology = sdxl_worker::broker::Topology::new(deployment.prefix.clone(), 5);
    let broker = sdxl_worker::broker::Broker::connect(&support::broker_url(), topology)
        .await
        .unwrap();
    broker.delete_topology().await.unwrap();
    broker.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_status_against_a_worker_process_that_stops_on_sigterm() {
    let deployment = Deployment::new("cli-worker").await;
    let mut worker = deployment
        .command(&["worker"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the worker");

    let output = deployment.run(&[
        "submit",
        "--prompt",
        "a red fox",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--seed",
        "11",
        "--wait",
        "--timeout",
        "120",
    ]);
    let stdout = text(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        text(&output.stderr)
    );
    let id = stdout
        .lines()
        .next()
        .expect("the id comes first")
        .trim()
        .to_owned();
    Uuid::parse_str(&id).expect("a job id");
    let row_json = &stdout[stdout.find('{').expect("the row as JSON")..];
    let row: serde_json::Value = serde_json::from_str(row_json).expect("valid JSON");
    assert_eq!(row["state"], "succeeded");
    let key = row["images"][0]["key"].as_str().expect("image key");
    assert!(deployment.images.path().join(key).is_file());

    let status = deployment.run(&["status", &id]);
    assert!(status.status.success());
    let row: serde_json::Value = serde_json::from_slice(&status.stdout).expect("JSON");
    assert_eq!(row["id"], id.as_str());
    assert_eq!(row["state"], "succeeded");
    assert_eq!(row["metrics"]["step_ms"].as_array().map(Vec::len), Some(2));

    // An invalid submission is refused before it reaches the broker.
    let refused = deployment.run(&["submit", "--prompt", "x", "--width", "65"]);
    assert!(!refused.status.success());
    assert!(text(&refused.stderr).contains("width"));

    let pid = worker.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    let exit = wait_exit(&mut worker, Duration::from_secs(60));
    assert!(exit.success(), "graceful stop exits 0, got {exit}");

    let topology = sdxl_worker::broker::Topology::new(deployment.prefix.clone(), 5);
    let broker = sdxl_worker::broker::Broker::connect(&support::broker_url(), topology)
        .await
        .unwrap();
    broker.delete_topology().await.unwrap();
    broker.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_one_job_end_to_end_and_prints_the_png_path() {
    let deployment = Deployment::new("cli-demo").await;
    let output = deployment.run(&["demo", "--steps", "2"]);
    let stdout = text(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        text(&output.stderr)
    );
    assert!(stdout.contains("\"state\": \"succeeded\""), "{stdout}");
    let path = stdout
        .lines()
        .find_map(|line| line.strip_prefix("image 0: "))
        .expect("the PNG path is printed");
    let png = std::fs::read(Path::new(path.trim())).expect("the PNG exists");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
}

/// `url` with `password` in its user info (a URL that already has one keeps it): the secret
/// to look for, and the URL that carries it.
fn with_password(url: &str, password: &str) -> (String, String) {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let (userinfo, host) = rest
        .split_once('@')
        .expect("a user in the test database URL");
    match userinfo.split_once(':') {
        Some((_, existing)) => (existing.to_owned(), url.to_owned()),
        None => (
            password.to_owned(),
            format!("{scheme}://{userinfo}:{password}@{host}"),
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_in_service_urls_never_reach_logs_or_rows() {
    let deployment = Deployment::new("cli-secret").await;
    // The local test server trusts its clients, so any password connects.
    let (secret, url) = with_password(&deployment.db.config.url, "Sdxl-s3cret-Pa55");
    let logs = deployment.cwd.path().join("worker.log");

    // A job through a worker logging at debug level, both processes given the secret URL.
    let mut worker = deployment
        .command(&["worker"])
        .env("SDXL_DATABASE_URL", &url)
        .env("SDXL_LOG_LEVEL", "debug")
        .stdout(Stdio::from(std::fs::File::create(&logs).unwrap()))
        .stderr(Stdio::from(
            std::fs::OpenOptions::new()
                .append(true)
                .open(&logs)
                .unwrap(),
        ))
        .spawn()
        .expect("start the worker");
    let submitted = deployment
        .command(&[
            "submit",
            "--prompt",
            "a grey owl",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "2",
            "--wait",
            "--timeout",
            "120",
        ])
        .env("SDXL_DATABASE_URL", &url)
        .env("SDXL_LOG_LEVEL", "debug")
        .output()
        .expect("run submit");
    let submit_out = format!("{}{}", text(&submitted.stdout), text(&submitted.stderr));
    assert!(submitted.status.success(), "{submit_out}");
    assert!(submit_out.contains("succeeded"), "{submit_out}");
    let killed = Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert!(wait_exit(&mut worker, Duration::from_secs(60)).success());
    let worker_out = std::fs::read_to_string(&logs).unwrap();
    assert!(worker_out.contains("worker started"), "{worker_out}");
    assert!(
        !worker_out.contains(&secret),
        "the worker logged the password"
    );
    assert!(!submit_out.contains(&secret), "submit printed the password");

    // A database that cannot be reached: the error names the server, not the password.
    let unreachable = url.replace(":5432/", ":1/");
    assert_ne!(unreachable, url, "the test database URL names port 5432");
    let failed = deployment
        .command(&["worker"])
        .env("SDXL_DATABASE_URL", &unreachable)
        .output()
        .expect("run the worker");
    let failed_out = format!("{}{}", text(&failed.stdout), text(&failed.stderr));
    assert!(!failed.status.success(), "{failed_out}");
    assert!(failed_out.contains("127.0.0.1:1"), "{failed_out}");
    assert!(!failed_out.contains(&secret), "{failed_out}");

    // Nor is it stored in any row.
    let leaked: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM jobs WHERE jobs::text LIKE '%' || $1 || '%') \
              + (SELECT count(*) FROM workers WHERE workers::text LIKE '%' || $1 || '%')",
    )
    .bind(&secret)
    .fetch_one(deployment.db.db.pool())
    .await
    .unwrap();
    assert_eq!(leaked, 0);

    let topology = sdxl_worker::broker::Topology::new(deployment.prefix.clone(), 5);
    let broker = sdxl_worker::broker::Broker::connect(&support::broker_url(), topology)
        .await
        .unwrap();
    broker.delete_topology().await.unwrap();
    broker.close().await;
}
