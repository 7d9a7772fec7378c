//! A whole worker stack for end-to-end tests: a Postgres schema, a queue prefix and a storage
//! prefix of its own (local directory or a moto S3 server), the real worker running in this
//! process, and functions to publish messages and read rows back.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Once;
use std::time::{Duration, Instant};

use lapin::types::ShortString;
use lapin::BasicProperties;
use sdxl_worker::broker::{Broker, Incoming, Topology};
use sdxl_worker::config::{Config, DevicesSetting, StorageConfig};
use sdxl_worker::db::{JobRow, JobState};
use sdxl_worker::engine::Device;
use sdxl_worker::worker::{self, RunOptions, WorkerError};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::{self, MotoServer, TestDb};

/// Where a stack writes images.
pub enum StorageKind {
    Local,
    S3,
}

pub struct Stack {
    pub db: TestDb,
    pub config: Config,
    /// The test's own broker connection (publishing, inspecting queues).
    pub broker: Broker,
    pub moto: Option<MotoServer>,
    pub bucket: Option<String>,
    /// Root of the local storage backend.
    pub local_dir: Option<tempfile::TempDir>,
}

/// A worker running in a task of this test.
pub struct RunningWorker {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<Result<(), WorkerError>>,
}

impl RunningWorker {
    /// Asks for a graceful stop and waits for it.
    pub async fn stop(mut self) -> Result<(), WorkerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(120), &mut self.handle)
            .await
            .expect("the worker stops within 120 s")
            .expect("the worker task does not panic")
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

fn s3_credentials_in_env() {
    static ONCE: Once = Once::new();
    // The worker reads S3 credentials from the environment, as in production. Every test
    // uses the same moto credentials, and this runs before any worker starts.
    ONCE.call_once(|| {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    });
}

impl Stack {
    /// The next message on `queue`, polling until `timeout`; `None` if none arrived.
    pub async fn next_message(&self, queue: &str, timeout: Duration) -> Option<Incoming> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(message) = self.broker.get(queue).await.unwrap() {
                return Some(message);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn new(label: &str, storage: StorageKind) -> Stack {
        Stack::new_on(
            label,
            storage,
            &support::broker_url(),
            &support::database_url(),
        )
        .await
    }

    /// A stack on the RabbitMQ at `broker_url` and the Postgres at `database_url` (private
    /// servers of a fault test).
    pub async fn new_on(
        label: &str,
        storage: StorageKind,
        broker_url: &str,
        database_url: &str,
    ) -> Stack {
        s3_credentials_in_env();
        let db = TestDb::new_at(label, database_url).await;
        let prefix = support::unique_prefix(label);
        let mut config = Config::default();
        config.broker.url = broker_url.to_owned();
        config.broker.prefix = prefix.clone();
        config.database = db.config.clone();
        config.worker.devices = DevicesSetting::List(vec![Device::Cpu]);
        config.worker.poll_interval_ms = 20;
        config.worker.progress_interval_ms = 0;
        config.worker.id = Some(format!("{prefix}-worker"));
        for model in &mut config.models.models {
            if model.name == "tiny-sdxl" {
                model.path = support::tiny_model_dir();
            }
        }
        let (moto, bucket, local_dir) = match storage {
            StorageKind::Local => {
                let dir = tempfile::tempdir().expect("temporary directory");
                config.storage = StorageConfig::Local {
                    path: dir.path().to_path_buf(),
                    prefix: format!("{prefix}/"),
                };
                (None, None, Some(dir))
            }
            StorageKind::S3 => {
                let moto = MotoServer::start();
                let bucket = support::unique_prefix("bucket");
                moto.create_bucket(&bucket);
                config.storage = moto.storage_config(&bucket, &format!("{prefix}/"));
                (Some(moto), Some(bucket), None)
            }
        };
        let topology = Topology::new(prefix, config.broker.delivery_limit);
        let broker = Broker::connect(&config.broker.url, topology)
            .await
            .expect("RabbitMQ must be running (scripts/test.sh starts it)");
        broker.declare_topology().await.expect("declare topology");
        Stack {
            db,
            config,
            broker,
            moto,
            bucket,
            local_dir,
        }
    }

    /// Starts a worker with this stack's configuration and `options`.
    pub fn start_worker(&self, options: RunOptions) -> RunningWorker {
        self.start_worker_with(self.config.clone(), options)
    }

    pub fn start_worker_with(&self, config: Config, options: RunOptions) -> RunningWorker {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            worker::run_with(config, options, async {
                let _ = stopped.await;
            })
            .await
        });
        RunningWorker {
            stop: Some(stop),
            handle,
        }
    }

    /// Publishes raw bytes to `{p}.jobs`, as a producer does.
    pub async fn publish_raw(&self, body: &[u8], message_id: Option<Uuid>, priority: Option<u8>) {
        let mut properties = BasicProperties::default();
        if let Some(id) = message_id {
            properties = properties.with_message_id(ShortString::from(id.to_string()));
        }
        if let Some(priority) = priority {
            properties = properties.with_priority(priority);
        }
        self.broker
            .publish_job(body, properties)
            .await
            .expect("publish a job message");
    }

    /// Publishes `message` as JSON.
    pub async fn publish(&self, message: &Value) {
        let id = message
            .get("id")
            .and_then(Value::as_str)
            .and_then(|s| Uuid::parse_str(s).ok());
        self.publish_raw(&serde_json::to_vec(message).unwrap(), id, None)
            .await;
    }

    /// Waits until the row of `id` satisfies `done`.
    pub async fn wait_row(
        &self,
        id: Uuid,
        timeout: Duration,
        done: impl Fn(&JobRow) -> bool,
    ) -> JobRow {
        let deadline = Instant::now() + timeout;
        loop {
            let row = self.db.db.get(id).await.expect("read job row");
            if let Some(row) = row {
                if done(&row) {
                    return row;
                }
                if Instant::now() >= deadline {
                    panic!("job {id} did not reach the expected state in {timeout:?}: {row:#?}");
                }
            } else if Instant::now() >= deadline {
                panic!("job {id} has no row after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the job is terminal.
    pub async fn wait_terminal(&self, id: Uuid, timeout: Duration) -> JobRow {
        self.wait_row(id, timeout, |row| row.state.is_terminal())
            .await
    }

    /// The state column read with plain SQL (not through the crate's data layer).
    pub async fn state_sql(&self, id: Uuid) -> Option<String> {
        sqlx::query_scalar::<_, String>("SELECT state FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(self.db.db.pool())
            .await
            .expect("plain SQL query")
    }

    /// Every file under the local storage root, relative to it.
    pub fn local_files(&self) -> Vec<PathBuf> {
        let root = self.local_dir.as_ref().expect("local storage").path();
        let mut files = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).expect("read storage dir") {
                let path = entry.expect("dir entry").path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    files.push(path.strip_prefix(root).unwrap().to_path_buf());
                }
            }
        }
        files.sort();
        files
    }

    /// Removes the queues and exchanges of this stack.
    pub async fn teardown(self) {
        let _ = self.broker.delete_topology().await;
        self.broker.close().await;
    }
}

/// A small valid job for the tiny model.
pub fn small_job(id: Uuid) -> Value {
    json!({
        "version": 1,
        "id": id,
        "prompt": "a red fox in the snow",
        "width": 64,
        "height": 64,
        "steps": 2,
        "seed": 7,
    })
}

/// Whether a job is still `queued`.
pub fn is_queued(row: &JobRow) -> bool {
    row.state == JobState::Queued
}

/// `RunOptions` of an intake-only worker.
pub fn intake_only() -> RunOptions {
    RunOptions {
        intake: true,
        consumers: false,
    }
}

/// `RunOptions` of a worker without intake (GPU consumers only).
pub fn consumers_only() -> RunOptions {
    RunOptions {
        intake: false,
        consumers: true,
    }
}
