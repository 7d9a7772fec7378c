//! Accuracy of the run-time estimates (`POST /v1/estimate`, [`sdxl_worker::api::estimate`]):
//! runs real jobs of varied shapes through the real worker (intake, one CPU consumer, the tiny
//! model, local storage, real Postgres and RabbitMQ), so each leaves its `job_metrics` row;
//! then fits the estimator to the first jobs (history) and predicts the rest (held out), in
//! the order they ran.
//!
//!   cargo bench --bench estimate_accuracy       # 96 jobs: 72 history, 24 held out
//!   BENCH_JOBS=200 cargo bench --bench estimate_accuracy
//!   BENCH_CPU_THREADS=0 ...   # ONNX Runtime's default threads instead of 1 (0: auto)
//!
//! Reports the median absolute percentage error of p50 on the held-out jobs, the share of
//! them at or under p90, and writes `bench/estimate-accuracy.json` with the recorded rows in
//! `bench/estimate-samples.json`. `BENCH_SAMPLES=bench/estimate-samples.json` refits and
//! scores recorded rows without running jobs. Under `cargo test` it runs 12 small jobs as a
//! smoke test and writes nothing.

use std::time::{Duration, Instant};

use sdxl_worker::api::estimate::{run_ms, Estimator, Shape};
use sdxl_worker::broker::{Broker, Topology};
use sdxl_worker::config::{Config, DatabaseConfig, DevicesSetting, StorageConfig};
use sdxl_worker::db::{Db, JobState, MetricsSample};
use sdxl_worker::engine::Device;
use sdxl_worker::worker::{self, RunOptions};
use serde_json::json;
use sqlx::Executor;
use uuid::Uuid;

const SIZES: [u32; 4] = [64, 96, 128, 160];
const STEPS: [u32; 5] = [2, 4, 8, 12, 16];
const IMAGES: [u32; 2] = [1, 2];
/// Share of the jobs used as history.
const HISTORY_SHARE: f64 = 0.75;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let jobs = if benchmarking {
        std::env::var("BENCH_JOBS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(96)
    } else {
        12
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(run(jobs, benchmarking))
}

/// ONNX Runtime threads of the CPU consumer: `BENCH_CPU_THREADS`, 1 by default, so that the
/// engine does not compete for the cores with Postgres, RabbitMQ and the worker's own tasks
/// (which makes run times jump from one run of a shape to the next on a small host).
fn cpu_threads() -> u32 {
    std::env::var("BENCH_CPU_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// A small deterministic generator, so every run measures the same shapes in the same order.
struct Lcg(u64);

impl Lcg {
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        items[((self.0 >> 33) % items.len() as u64) as usize]
    }
}

async fn run(jobs: usize, benchmarking: bool) -> Result<(), Box<dyn std::error::Error>> {
    let (samples, wall) = match std::env::var("BENCH_SAMPLES") {
        Ok(path) if benchmarking => {
            let samples: Vec<MetricsSample> = serde_json::from_slice(&std::fs::read(&path)?)?;
            (samples, Duration::ZERO)
        }
        _ => record(jobs, benchmarking).await?,
    };
    score(&samples, wall, benchmarking)
}

/// Runs `jobs` jobs through a worker and returns their metrics rows, oldest first.
async fn record(
    jobs: usize,
    benchmarking: bool,
) -> Result<(Vec<MetricsSample>, Duration), Box<dyn std::error::Error>> {
    let tag = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let storage_dir = tempfile::tempdir()?;
    let mut config = Config::default();
    config.broker.url = std::env::var("SDXL_TEST_BROKER_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    config.broker.prefix = format!("bench-est-{tag}");
    config.database = DatabaseConfig {
        url: std::env::var("SDXL_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned()),
        schema: format!("bench_est_{tag}"),
        max_connections: 8,
        acquire_timeout_ms: 10_000,
    };
    config.storage = StorageConfig::Local {
        path: storage_dir.path().to_path_buf(),
        prefix: String::new(),
    };
    config.worker.devices = DevicesSetting::List(vec![Device::Cpu]);
    config.worker.poll_interval_ms = 10;
    config.worker.cpu_threads = cpu_threads();
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

    // One job at a time, as a deployment with one consumer runs them.
    let mut rng = Lcg(2026);
    let started = Instant::now();
    for n in 0..jobs {
        let (size, steps, images) = if benchmarking {
            (rng.pick(&SIZES), rng.pick(&STEPS), rng.pick(&IMAGES))
        } else {
            (rng.pick(&SIZES[..2]), rng.pick(&STEPS[..2]), 1)
        };
        let id = Uuid::new_v4();
        let message = json!({
            "version": 1, "id": id, "prompt": "a lighthouse at dawn", "width": size,
            "height": size, "steps": steps, "num_images": images, "seed": n,
        });
        let properties = lapin::BasicProperties::default().with_message_id(id.to_string().into());
        broker
            .publish_job(&serde_json::to_vec(&message)?, properties)
            .await?;
        wait(&db, id).await?;
    }
    let wall = started.elapsed();
    let samples = db.metrics_history(10_000).await?;

    let _ = stop.send(());
    worker.await??;
    broker.delete_topology().await?;
    broker.close().await;
    db.pool()
        .execute(format!("DROP SCHEMA {} CASCADE", config.database.schema).as_str())
        .await?;
    db.close().await;
    Ok((samples, wall))
}

fn score(
    samples: &[MetricsSample],
    wall: Duration,
    benchmarking: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    // The first job loads the model; its run time without the load is still a fair sample.
    let split = ((samples.len() as f64) * HISTORY_SHARE).round() as usize;
    let (history, held_out) = samples.split_at(split);
    let estimator = Estimator::fit(history);
    let mut errors = Vec::new();
    let mut under_p90 = 0;
    println!(
        "{:>5} {:>5} {:>3} {:>9} {:>9} {:>9} {:>7}",
        "size", "steps", "n", "actual", "p50", "p90", "error"
    );
    for s in held_out {
        let e = estimator.estimate(&s.model, &s.gpu_kind, &Shape::of_sample(s));
        let actual = run_ms(s) / 1000.0;
        let error = (e.p50_seconds - actual).abs() / actual;
        if actual <= e.p90_seconds {
            under_p90 += 1;
        }
        errors.push(error);
        println!(
            "{:>5} {:>5} {:>3} {:>8.3}s {:>8.3}s {:>8.3}s {:>6.1}%",
            s.width,
            s.steps,
            s.num_images,
            actual,
            e.p50_seconds,
            e.p90_seconds,
            error * 100.0
        );
    }
    errors.sort_by(f64::total_cmp);
    let mdape = errors.get(errors.len() / 2).copied().unwrap_or(f64::NAN);
    let coverage = under_p90 as f64 / held_out.len().max(1) as f64;
    let basis = held_out.first().map(|s| {
        estimator
            .estimate(&s.model, &s.gpu_kind, &Shape::of_sample(s))
            .basis
    });
    println!(
        "\n{} jobs in {:.1} s: {} history, {} held out; basis {:?}",
        samples.len(),
        wall.as_secs_f64(),
        history.len(),
        held_out.len(),
        basis
    );
    println!(
        "median absolute percentage error (p50): {:.1}%   held-out jobs at or under p90: {:.0}%",
        mdape * 100.0,
        coverage * 100.0
    );
    let noise = repeat_noise(samples);
    println!(
        "noise floor: repeats of one shape differ from their median by {:.1}% (median)",
        noise * 100.0
    );
    if !mdape.is_finite() {
        return Err("no held-out job could be estimated".into());
    }
    if benchmarking {
        let mut result = json!({
            "jobs": samples.len(),
            "history": history.len(),
            "held_out": held_out.len(),
            "device": "cpu",
            "model": "tiny-sdxl",
            "sizes": SIZES, "steps": STEPS, "num_images": IMAGES,
            "median_absolute_percentage_error": (mdape * 1000.0).round() / 10.0,
            "held_out_at_or_under_p90_percent": (coverage * 1000.0).round() / 10.0,
            "repeat_noise_percent": (noise * 1000.0).round() / 10.0,
        });
        if wall > Duration::ZERO {
            result["wall_seconds"] = json!((wall.as_secs_f64() * 10.0).round() / 10.0);
            result["cpu_threads"] = json!(cpu_threads());
        } else if let Ok(file) = std::env::var("BENCH_SAMPLES") {
            result["scored_from"] = json!(file);
        }
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/estimate-accuracy.json");
        std::fs::create_dir_all(path.parent().unwrap())?;
        std::fs::write(&path, serde_json::to_string_pretty(&result)? + "\n")?;
        println!("wrote {}", path.display());
        if wall > Duration::ZERO {
            let recorded = path.with_file_name("estimate-samples.json");
            std::fs::write(&recorded, serde_json::to_string_pretty(samples)? + "\n")?;
            println!("wrote {}", recorded.display());
        }
    }
    Ok(())
}

/// The median relative deviation of each job's run time from the median of the jobs with the
/// same shape: how far run time varies on this host with nothing else changing, a floor under
/// any estimator's error.
fn repeat_noise(samples: &[MetricsSample]) -> f64 {
    let mut groups: std::collections::BTreeMap<(u32, u32, u32), Vec<f64>> = Default::default();
    for s in samples {
        groups
            .entry((s.width, s.steps, s.num_images))
            .or_default()
            .push(run_ms(s));
    }
    let mut deviations = Vec::new();
    for times in groups.values_mut().filter(|t| t.len() > 1) {
        times.sort_by(f64::total_cmp);
        let median = (times[(times.len() - 1) / 2] + times[times.len() / 2]) / 2.0;
        deviations.extend(times.iter().map(|t| (t - median).abs() / median));
    }
    deviations.sort_by(f64::total_cmp);
    deviations
        .get(deviations.len() / 2)
        .copied()
        .unwrap_or(f64::NAN)
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
