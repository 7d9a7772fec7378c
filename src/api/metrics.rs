//! `/metrics` in the Prometheus text exposition format (version 0.0.4), read at scrape time
//! from the broker, the `jobs`, `job_metrics` and `workers` tables, so every API replica
//! reports the same numbers and nothing is lost when one restarts:
//!
//! - `sdxl_queue_depth{queue}`: messages ready in the intake and work queues;
//! - `sdxl_jobs{state}`: jobs in each state;
//! - `sdxl_job_errors_total{code}`: failed jobs by error code;
//! - `sdxl_job_duration_seconds`: histogram of job run time (`total_ms`);
//! - `sdxl_step_duration_seconds`: histogram of denoising step time;
//! - `sdxl_workers_alive`, `sdxl_consumers_busy`;
//! - `sdxl_gpu_memory_used_bytes` / `sdxl_gpu_memory_total_bytes{worker, device, gpu}`.

use std::fmt::Write;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::ApiState;
use crate::broker::Lane;
use crate::db::Histogram;

/// Upper bounds of the duration histograms, in seconds.
pub const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Prometheus metrics of the whole deployment.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    let mut out = String::new();
    let broker = state.broker().await?;
    let t = broker.topology().clone();
    header_line(
        &mut out,
        "sdxl_queue_depth",
        "gauge",
        "Messages ready in a queue.",
    );
    for (label, queue) in [
        ("intake", t.intake_queue()),
        ("high", t.work_queue(Lane::High)),
        ("normal", t.work_queue(Lane::Normal)),
        ("dead", t.dead_queue()),
    ] {
        let depth = broker.queue_depth(&queue).await?;
        let _ = writeln!(out, "sdxl_queue_depth{{queue=\"{label}\"}} {depth}");
    }
    header_line(&mut out, "sdxl_jobs", "gauge", "Jobs in each state.");
    for (job_state, n) in state.db.count_by_state().await? {
        let _ = writeln!(out, "sdxl_jobs{{state=\"{job_state}\"}} {n}");
    }
    header_line(
        &mut out,
        "sdxl_job_errors_total",
        "counter",
        "Failed jobs by error code.",
    );
    for (code, n) in state.db.errors_by_code().await? {
        let _ = writeln!(
            out,
            "sdxl_job_errors_total{{code=\"{}\"}} {n}",
            escape(&code)
        );
    }
    let (job, step) = state.db.duration_histograms(&BUCKETS).await?;
    histogram(
        &mut out,
        "sdxl_job_duration_seconds",
        "Run time of finished jobs.",
        &job,
    );
    histogram(
        &mut out,
        "sdxl_step_duration_seconds",
        "Time of one denoising step.",
        &step,
    );
    let workers = state.db.live_workers(state.alive_window()).await?;
    header_line(
        &mut out,
        "sdxl_workers_alive",
        "gauge",
        "Workers with a recent heartbeat.",
    );
    let _ = writeln!(out, "sdxl_workers_alive {}", workers.len());
    let gpus = super::capabilities::gpus(&workers);
    header_line(
        &mut out,
        "sdxl_consumers_busy",
        "gauge",
        "Consumers running a job.",
    );
    let busy = gpus.iter().filter(|g| g.current_job.is_some()).count();
    let _ = writeln!(out, "sdxl_consumers_busy {busy}");
    for (name, help, pick) in [
        (
            "sdxl_gpu_memory_used_bytes",
            "GPU memory in use.",
            (|g: &super::capabilities::GpuView| g.memory_used_bytes) as fn(&_) -> Option<u64>,
        ),
        (
            "sdxl_gpu_memory_total_bytes",
            "GPU memory in all.",
            |g: &super::capabilities::GpuView| g.memory_total_bytes,
        ),
    ] {
        header_line(&mut out, name, "gauge", help);
        for g in &gpus {
            if let Some(v) = pick(g) {
                let _ = writeln!(
                    out,
                    "{name}{{worker=\"{}\",device=\"{}\",gpu=\"{}\"}} {v}",
                    escape(&g.worker_id),
                    escape(&g.device),
                    escape(g.name.as_deref().unwrap_or(""))
                );
            }
        }
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response())
}

fn header_line(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    header_line(out, name, "histogram", help);
    for (bound, count) in &h.buckets {
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum {}", h.sum);
    let _ = writeln!(out, "{name}_count {}", h.count);
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
