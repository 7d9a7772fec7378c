//! Worker overhead per job: runs jobs through the real worker (intake, one CPU consumer, the
//! tiny model, local storage, real Postgres and RabbitMQ) and reports, per job, where the time
//! outside ONNX Runtime's `Session::run` goes.
//!
//!   cargo bench --bench worker_overhead                  # 50 jobs, 64x64, 4 steps
//!   BENCH_JOBS=200 BENCH_STEPS=8 BENCH_SIZE=128 BENCH_PREFETCH=2 cargo bench --bench worker_overhead
//!
//! Under `cargo test` it runs 3 jobs as a smoke test. Postgres and RabbitMQ come from
//! `SDXL_TEST_DATABASE_URL` / `SDXL_TEST_BROKER_URL` (default: the local servers); the run
//! uses its own schema and queue prefix and removes them afterwards.
//!
//! Columns (milliseconds, per job):
//! - `total`: from the job getting the engine (its attempt starts) to the result being written;
//! - `session_run`: inside `Session::run` while denoising;
//! - `engine_other`: the rest of the engine (text encoding, VAE, scheduler, tensors);
//! - `overhead`: `total − (text encoding + denoising + VAE)`, the worker's own cost, split into
//!   `png`, `upload` and `db+broker` (parse, start, progress, everything else);
//! - `queue`: time from `queued` to the start of the job (not part of `total`).

use std::time::{Duration, Instant};

use sdxl_worker::broker::{Broker, Topology};
use sdxl_worker::config::{Config, DatabaseConfig, DevicesSetting, StorageConfig};
use sdxl_worker::db::{Db, JobMetrics, JobState};
use sdxl_worker::engine::Device;
use sdxl_worker::worker::{self, RunOptions};
use serde_json::json;
use sqlx::Executor;
use uuid::Uuid;

struct Settings {
    jobs: usize,
    steps: u32,
    size: u32,
    prefetch: u32,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let settings = if benchmarking {
        Settings {
            jobs: env_or("BENCH_JOBS", 50),
            steps: env_or("BENCH_STEPS", 4),
            size: env_or("BENCH_SIZE", 64),
            prefetch: env_or("BENCH_PREFETCH", 1),
        }
    } else {
        Settings {
            jobs: 3,
            steps: 2,
            size: 64,
            prefetch: 1,
        }
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(run(settings))
}

async fn run(settings: Settings) -> Result<(), Box<dyn std::error::Error>> {
    let tag = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let storage_dir = tempfile::tempdir()?;
    let mut config = Config::default();
    config.broker.url = std::env::var("SDXL_TEST_BROKER_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    config.broker.prefix = format!("bench-{tag}");
    config.database = DatabaseConfig {
        url: std::env::var("SDXL_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned()),
        schema: format!("bench_{tag}"),
        max_connections: 8,
        acquire_timeout_ms: 10_000,
    };
    config.storage = StorageConfig::Local {
        path: storage_dir.path().to_path_buf(),
        prefix: String::new(),
    };
    config.worker.devices = DevicesSetting::List(vec![Device::Cpu]);
    config.worker.poll_interval_ms = 10;
    config.worker.prefetch = settings.prefetch;
    for model in &mut config.models.models {
        if model.name == "tiny-sdxl" {
            model.path =
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sdxl");
        }
    }

    let db = Db::connect(&config.database).await?;
    db.migrate().await?;
    let topology = Topology::new(config.broker.prefix.clone(), config.broker.delivery_limit);
    let broker = Broker::connect(&config.broker.url, topology).await?;
    broker.declare_topology().await?;

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker_config = config.clone();
    let worker = tokio::spawn(async move {
        worker::run_with(worker_config, RunOptions::default(), async {
            let _ = stopped.await;
        })
        .await
    });

    // Warm-up job: loads the model, so that the measured jobs see a loaded engine.
    let warmup = Uuid::new_v4();
    submit(&broker, warmup, &settings, 0).await?;
    wait(&db, warmup).await?;

    let started = Instant::now();
    let ids: Vec<Uuid> = (0..settings.jobs).map(|_| Uuid::new_v4()).collect();
    for (n, id) in ids.iter().enumerate() {
        submit(&broker, *id, &settings, n as u64 + 1).await?;
    }
    let mut metrics = Vec::with_capacity(ids.len());
    let mut starts = Vec::with_capacity(ids.len());
    for id in &ids {
        wait(&db, *id).await?;
        metrics.push(db.get_metrics(*id).await?.ok_or("no metrics row")?);
        let row = db.get(*id).await?.ok_or("no job row")?;
        starts.push(row.started_at.ok_or("no start time")?);
    }
    let wall = started.elapsed();

    let _ = stop.send(());
    worker.await??;
    broker.delete_topology().await?;
    broker.close().await;
    db.pool()
        .execute(format!("DROP SCHEMA {} CASCADE", config.database.schema).as_str())
        .await?;
    db.close().await;

    report(&settings, &metrics, wall);
    report_cycle(&metrics, &starts);
    Ok(())
}

/// The consumer's cycle: from one job's start to the next one's, against the engine's stages
/// of the first (text encoding, denoising, VAE). What is left is the time between two jobs'
/// engine work that the engine does not account for: the next job's start (its database
/// write), handing it to the engine thread, and the engine's work outside its stages.
fn report_cycle(metrics: &[JobMetrics], starts: &[chrono::DateTime<chrono::Utc>]) {
    let mut order: Vec<usize> = (0..starts.len()).collect();
    order.sort_by_key(|&i| starts[i]);
    let gaps: Vec<f64> = order
        .windows(2)
        .map(|pair| {
            let cycle = (starts[pair[1]] - starts[pair[0]])
                .num_microseconds()
                .unwrap_or(0);
            let m = &metrics[pair[0]];
            cycle as f64 / 1000.0 - (m.text_encoding_ms + m.denoising_ms + m.vae_ms)
        })
        .collect();
    if gaps.is_empty() {
        return;
    }
    let (mean, p50, p95) = summary(gaps);
    println!(
        "{:<14} {mean:>10.2} {p50:>10.2} {p95:>10.2}   (start to next start, less the engine's stages)",
        "cycle-engine"
    );
}

async fn submit(
    broker: &Broker,
    id: Uuid,
    settings: &Settings,
    seed: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let message = json!({
        "version": 1, "id": id, "prompt": "a lighthouse at dawn",
        "width": settings.size, "height": settings.size, "steps": settings.steps, "seed": seed,
    });
    let properties = lapin::BasicProperties::default().with_message_id(id.to_string().into());
    broker
        .publish_job(&serde_json::to_vec(&message)?, properties)
        .await?;
    Ok(())
}

async fn wait(db: &Db, id: Uuid) -> Result<(), Box<dyn std::error::Error>> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Some(row) = db.get(id).await? {
            match row.state {
                JobState::Succeeded => return Ok(()),
                state if state.is_terminal() => {
                    return Err(format!("job {id} ended {state}: {:?}", row.error_message).into())
                }
                _ => {}
            }
        }
        if Instant::now() > deadline {
            return Err(format!("job {id} did not finish").into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Mean, median and 95th percentile.
fn summary(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let n = values.len().max(1);
    let mean = values.iter().sum::<f64>() / n as f64;
    let at = |q: f64| {
        values
            .get(((n - 1) as f64 * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    (mean, at(0.5), at(0.95))
}

/// One job's time, split as the table shows it.
struct Breakdown {
    total: f64,
    session_run: f64,
    engine_other: f64,
    overhead: f64,
    png: f64,
    upload: f64,
    db_broker: f64,
    queue: f64,
}

impl Breakdown {
    fn of(m: &JobMetrics) -> Breakdown {
        let engine = m.text_encoding_ms + m.denoising_ms + m.vae_ms;
        let overhead = m.total_ms - engine - m.model_load_ms;
        Breakdown {
            total: m.total_ms,
            session_run: m.session_run_ms,
            engine_other: engine - m.session_run_ms,
            overhead,
            png: m.png_ms,
            upload: m.upload_ms,
            db_broker: overhead - m.png_ms - m.upload_ms,
            queue: m.queue_wait_ms,
        }
    }
}

type Column = (&'static str, fn(&Breakdown) -> f64);

const COLUMNS: [Column; 8] = [
    ("total", |b| b.total),
    ("session_run", |b| b.session_run),
    ("engine_other", |b| b.engine_other),
    ("overhead", |b| b.overhead),
    ("  png", |b| b.png),
    ("  upload", |b| b.upload),
    ("  db+broker", |b| b.db_broker),
    ("queue", |b| b.queue),
];

fn report(settings: &Settings, metrics: &[JobMetrics], wall: Duration) {
    let rows: Vec<Breakdown> = metrics.iter().map(Breakdown::of).collect();
    println!(
        "worker overhead: {} jobs, {}x{}, {} steps, 1 CPU consumer (prefetch {}), tiny model",
        metrics.len(),
        settings.size,
        settings.size,
        settings.steps,
        settings.prefetch
    );
    println!(
        "{:<14} {:>10} {:>10} {:>10}",
        "ms per job", "mean", "p50", "p95"
    );
    for (name, column) in COLUMNS {
        let (mean, p50, p95) = summary(rows.iter().map(column).collect());
        println!("{name:<14} {mean:>10.2} {p50:>10.2} {p95:>10.2}");
    }
    let rate = metrics.len() as f64 / wall.as_secs_f64();
    println!(
        "throughput: {rate:.1} jobs/s ({:.1} s for all jobs)",
        wall.as_secs_f64()
    );
}
