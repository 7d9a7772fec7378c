//! Estimates: how long a job will run (p50 and p90), how much GPU memory it needs, and how long
//! it will wait in the queue, for this deployment (`POST /v1/estimate`).
//!
//! # The run-time model
//!
//! Run time is `total_ms − model_load_ms` of the `job_metrics` row (the job's time on its
//! consumer with the model already loaded: text encoding, denoising, VAE, PNG, upload). With
//! `P` the megapixels of one image (width × height / 10⁶), `S` the steps that run (for
//! image-to-image `⌊steps · strength⌋`, as diffusers, in requests and in history), `N` the images,
//! `C` = 2 with classifier-free guidance (guidance scale above 1) else 1, and `K` the
//! ControlNets, it is modelled as
//!
//! ```text
//! T = a + b·U + c·U·P + d·U·K + e·N·P + f·S      with U = S·N·C·P (UNet work)
//! ```
//!
//! `a` is the fixed cost (text encoders, setup), `f·S` the fixed cost of each denoising step
//! whatever its size (the runtime's per-call overhead, the scheduler, progress updates),
//! `b·U` the UNet cost that grows with pixels,
//! `c·U·P` the part of attention that grows with the square of the pixels, `d·U·K` the extra
//! of ControlNets and `e·N·P` the VAE decode, PNG encoding and upload. The coefficients are
//! fitted per (model, GPU kind) to the most recent metrics rows by least absolute relative
//! error (iteratively reweighted least squares, so small and large jobs count alike and a few
//! rows slowed by a busy host pull the fit little), with every coefficient kept non-negative (a feature whose coefficient comes out negative is dropped
//! and the rest refitted). The GPU kind is the GPU's name as its worker reported it, else the
//! device kind (`cpu`).
//!
//! p50 and p90 are the fitted value times the median and the 90th percentile of
//! `actual / fitted` over the rows of the fit, so they carry the spread this deployment
//! actually shows. A group needs at least [`MIN_SAMPLES`] rows; with fewer, the rows of the
//! same model on any GPU are used, and with none the documented priors ([`PRIORS`]), which
//! describe SDXL base in fp16 on an H200-class GPU (design notes §5: 35.6 ms per UNet step at
//! batch 2 at 1024², 86 ms of VAE decode per 1024² image, 0.5 ms of per-step overhead), with
//! p90 = 1.5 × p50.
//!
//! # Memory
//!
//! Peak GPU memory is fitted the same way from `peak_gpu_mem_bytes` as `m0 + m1·N·C·P` (the
//! weights, and activations that grow with the UNet batch and the pixels). Rows without a
//! peak (CPU consumers) are skipped; with no rows the prior is 7.0 GB of weights plus
//! 1.2 GB per megapixel of UNet batch. On a CPU-only deployment memory is `null`.
//!
//! # Wait
//!
//! The expected wait is `(ahead + running / 2) / consumers × mean`, where `ahead` is the
//! number of messages ready in the work queues the job would wait behind (only the
//! high-priority queue for priority 5 and above; both otherwise, plus the intake queue),
//! `running` the jobs running now (each half done on average), `consumers` the devices of
//! the live workers and `mean` the mean run time of the recent metrics rows (or this job's own
//! p50 without history). It is 0 when a consumer is idle and nothing is queued, and `null`
//! when no worker is alive.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::authenticate;
use super::error::{ApiError, ErrorBody};
use super::jobs::{read_body, validate_body};
use super::ApiState;
use crate::broker::Lane;
use crate::db::MetricsSample;
use crate::job::{ValidJob, DEFAULT_GUIDANCE_SCALE, HIGH_PRIORITY_THRESHOLD};

mod fit;

use fit::{dot, nonnegative_fit, quantile};

/// Terms of the run-time model (see the module documentation).
const TIME_FEATURES: usize = 6;

/// Fewest metrics rows a fitted group needs.
pub const MIN_SAMPLES: usize = 8;
/// Metrics rows read for a fit.
pub const HISTORY_ROWS: u32 = 2000;

/// Coefficients of the run-time and memory models with no history (milliseconds, bytes).
pub const PRIORS: Priors = Priors {
    fixed_ms: 150.0,
    unet_ms_per_unit: 17.0,
    attention_ms_per_unit_mp: 0.0,
    controlnet_ms_per_unit: 8.5,
    decode_ms_per_mp: 180.0,
    step_ms: 0.5,
    p90_factor: 1.5,
    weights_bytes: 7.0e9,
    activation_bytes_per_mp: 1.2e9,
};

/// The documented priors.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Priors {
    pub fixed_ms: f64,
    pub unet_ms_per_unit: f64,
    pub attention_ms_per_unit_mp: f64,
    pub controlnet_ms_per_unit: f64,
    pub decode_ms_per_mp: f64,
    pub step_ms: f64,
    pub p90_factor: f64,
    pub weights_bytes: f64,
    pub activation_bytes_per_mp: f64,
}

/// The shape of a request, as the models see it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub num_images: u32,
    pub cfg: bool,
    pub controlnets: u32,
}

impl Shape {
    pub fn of_job(job: &ValidJob) -> Shape {
        let guidance = job.message.guidance_scale.unwrap_or(DEFAULT_GUIDANCE_SCALE);
        Shape {
            width: job.width,
            height: job.height,
            steps: job.steps_run(),
            num_images: job.num_images,
            cfg: guidance > 1.0,
            controlnets: 0,
        }
    }

    pub fn of_sample(s: &MetricsSample) -> Shape {
        Shape {
            width: s.width,
            height: s.height,
            steps: s.steps,
            num_images: s.num_images,
            cfg: s.cfg,
            controlnets: s.controlnets,
        }
    }

    fn megapixels(&self) -> f64 {
        f64::from(self.width) * f64::from(self.height) / 1e6
    }

    /// Features of the run-time model: 1, U, U·P, U·K, N·P, S.
    fn time_features(&self) -> [f64; TIME_FEATURES] {
        let p = self.megapixels();
        let n = f64::from(self.num_images);
        let c = if self.cfg { 2.0 } else { 1.0 };
        let s = f64::from(self.steps);
        let u = s * n * c * p;
        [1.0, u, u * p, u * f64::from(self.controlnets), n * p, s]
    }

    /// Features of the memory model: 1, N·C·P.
    fn memory_features(&self) -> [f64; 2] {
        let c = if self.cfg { 2.0 } else { 1.0 };
        [1.0, f64::from(self.num_images) * c * self.megapixels()]
    }
}

/// Where an estimate's numbers come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    /// Fitted to this model on this GPU kind.
    History,
    /// Fitted to this model on any GPU kind.
    ModelHistory,
    /// The documented priors.
    Prior,
}

/// A fitted run-time model for one group of rows.
#[derive(Debug, Clone, PartialEq)]
pub struct TimeModel {
    coefficients: [f64; TIME_FEATURES],
    /// Median and 90th percentile of actual / fitted.
    p50_ratio: f64,
    p90_ratio: f64,
    pub samples: usize,
}

impl TimeModel {
    /// Fit to `samples` (run time = `total_ms − model_load_ms`); `None` with fewer than
    /// [`MIN_SAMPLES`].
    pub fn fit(samples: &[&MetricsSample]) -> Option<TimeModel> {
        if samples.len() < MIN_SAMPLES {
            return None;
        }
        let rows: Vec<([f64; TIME_FEATURES], f64)> = samples
            .iter()
            .map(|s| (Shape::of_sample(s).time_features(), run_ms(s)))
            .filter(|(_, t)| *t > 0.0)
            .collect();
        if rows.len() < MIN_SAMPLES {
            return None;
        }
        let coefficients = nonnegative_fit(&rows)?;
        let mut ratios: Vec<f64> = rows
            .iter()
            .map(|(x, t)| t / dot(&coefficients, x).max(1e-9))
            .collect();
        ratios.sort_by(f64::total_cmp);
        Some(TimeModel {
            coefficients,
            p50_ratio: quantile(&ratios, 0.5),
            p90_ratio: quantile(&ratios, 0.9).max(quantile(&ratios, 0.5)),
            samples: rows.len(),
        })
    }

    /// p50 and p90 run time of `shape`, in milliseconds.
    pub fn predict_ms(&self, shape: &Shape) -> (f64, f64) {
        let fitted = dot(&self.coefficients, &shape.time_features());
        (fitted * self.p50_ratio, fitted * self.p90_ratio)
    }
}

/// Run time of a metrics row: its time on the consumer without loading the model.
pub fn run_ms(s: &MetricsSample) -> f64 {
    s.total_ms - s.model_load_ms
}

fn prior_ms(shape: &Shape) -> f64 {
    let p = PRIORS;
    let coefficients = [
        p.fixed_ms,
        p.unet_ms_per_unit,
        p.attention_ms_per_unit_mp,
        p.controlnet_ms_per_unit,
        p.decode_ms_per_mp,
        p.step_ms,
    ];
    dot(&coefficients, &shape.time_features())
}

/// The fitted models of a deployment, by (model, GPU kind) and by model.
#[derive(Debug, Clone, Default)]
pub struct Estimator {
    by_group: BTreeMap<(String, String), TimeModel>,
    by_model: BTreeMap<String, TimeModel>,
    memory: BTreeMap<(String, String), [f64; 2]>,
    /// Mean run time of all rows, in milliseconds.
    pub mean_run_ms: Option<f64>,
}

/// One run-time and memory estimate.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RunEstimate {
    /// GPU name or device kind this estimate is for.
    pub gpu_kind: String,
    pub p50_seconds: f64,
    pub p90_seconds: f64,
    /// Peak GPU memory, when the GPU kind reports memory.
    pub gpu_memory_bytes: Option<u64>,
    pub basis: Basis,
    /// Metrics rows the fit used (0 for priors).
    pub samples: usize,
}

impl Estimator {
    /// Fit every group of `samples`.
    pub fn fit(samples: &[MetricsSample]) -> Estimator {
        let mut groups: BTreeMap<(String, String), Vec<&MetricsSample>> = BTreeMap::new();
        let mut models: BTreeMap<String, Vec<&MetricsSample>> = BTreeMap::new();
        for s in samples {
            groups
                .entry((s.model.clone(), s.gpu_kind.clone()))
                .or_default()
                .push(s);
            models.entry(s.model.clone()).or_default().push(s);
        }
        let by_group = groups
            .iter()
            .filter_map(|(k, v)| TimeModel::fit(v).map(|m| (k.clone(), m)))
            .collect();
        let by_model = models
            .iter()
            .filter_map(|(k, v)| TimeModel::fit(v).map(|m| (k.clone(), m)))
            .collect();
        let memory = groups
            .iter()
            .filter_map(|(k, v)| {
                let rows: Vec<([f64; 2], f64)> = v
                    .iter()
                    .filter_map(|s| {
                        let peak = s.peak_gpu_mem_bytes? as f64;
                        Some((Shape::of_sample(s).memory_features(), peak))
                    })
                    .collect();
                if rows.len() < MIN_SAMPLES {
                    return None;
                }
                nonnegative_fit(&rows).map(|c| (k.clone(), c))
            })
            .collect();
        let mean_run_ms = (!samples.is_empty())
            .then(|| samples.iter().map(run_ms).sum::<f64>() / samples.len() as f64);
        Estimator {
            by_group,
            by_model,
            memory,
            mean_run_ms,
        }
    }

    /// The estimate for `shape` on `model` and `gpu_kind`.
    pub fn estimate(&self, model: &str, gpu_kind: &str, shape: &Shape) -> RunEstimate {
        let key = (model.to_owned(), gpu_kind.to_owned());
        let fitted = self
            .by_group
            .get(&key)
            .map(|m| (m, Basis::History))
            .or_else(|| self.by_model.get(model).map(|m| (m, Basis::ModelHistory)));
        let ((p50, p90), basis, samples) = match fitted {
            Some((m, basis)) => (m.predict_ms(shape), basis, m.samples),
            None => {
                let p50 = prior_ms(shape);
                ((p50, p50 * PRIORS.p90_factor), Basis::Prior, 0)
            }
        };
        let is_cpu = gpu_kind == "cpu";
        let memory = match self.memory.get(&key) {
            Some(c) => Some(dot(c, &shape.memory_features())),
            None if is_cpu => None,
            None => Some(dot(
                &[PRIORS.weights_bytes, PRIORS.activation_bytes_per_mp],
                &shape.memory_features(),
            )),
        };
        RunEstimate {
            gpu_kind: gpu_kind.to_owned(),
            p50_seconds: round3(p50 / 1000.0),
            p90_seconds: round3(p90 / 1000.0),
            gpu_memory_bytes: memory.map(|m| m.max(0.0) as u64),
            basis,
            samples,
        }
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The expected queue wait.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct WaitEstimate {
    /// Expected seconds before a consumer starts the job; `null` with no live worker.
    pub seconds: Option<f64>,
    /// Messages ready in the queues the job would wait behind.
    pub queued_ahead: u64,
    /// Jobs running now.
    pub running: u64,
    /// Consumers of live workers.
    pub consumers: usize,
}

/// What `POST /v1/estimate` returns.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EstimateView {
    pub model: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub num_images: u32,
    /// Run-time estimate on the GPU kind most consumers have (the first of `per_gpu_kind`).
    pub run: RunEstimate,
    /// One estimate per GPU kind of the live workers (or of the priors with none).
    pub per_gpu_kind: Vec<RunEstimate>,
    pub wait: WaitEstimate,
    /// Expected seconds from submission to the end: wait + run p50.
    pub total_p50_seconds: Option<f64>,
}

/// Predicted run time (p50, p90), GPU memory and queue wait of a job message.
#[utoipa::path(
    post, path = "/v1/estimate", tag = "estimates",
    request_body(content = Object, description = "A version 1 job message (JobMessage); `id` may be left out", content_type = "application/json"),
    responses(
        (status = 200, description = "The estimate", body = EstimateView),
        (status = 400, description = "Unreadable body", body = ErrorBody),
        (status = 422, description = "Invalid fields", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn estimate(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<EstimateView>, ApiError> {
    authenticate(&state.config.api.tokens, &headers)?;
    let body = read_body(&state, &headers, body)?;
    let job = validate_body(&state, &body)?;
    let shape = Shape::of_job(&job);
    let history = state.db.metrics_history(HISTORY_ROWS).await?;
    let estimator = Estimator::fit(&history);
    let workers = state.db.live_workers(state.alive_window()).await?;
    let gpus = super::capabilities::gpus(&workers);
    // GPU kinds of the live consumers, most common first.
    let mut kinds: Vec<(String, usize)> = Vec::new();
    for g in &gpus {
        let kind = g
            .name
            .clone()
            .unwrap_or_else(|| g.device.split(':').next().unwrap_or("cpu").to_owned());
        match kinds.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => kinds.push((kind, 1)),
        }
    }
    kinds.sort_by_key(|k| std::cmp::Reverse(k.1));
    if kinds.is_empty() {
        // No worker: estimate for the kinds the history knows, else the priors' GPU.
        let mut known: Vec<String> = history.iter().map(|s| s.gpu_kind.clone()).collect();
        known.dedup();
        kinds = known.into_iter().map(|k| (k, 0)).collect();
        if kinds.is_empty() {
            kinds.push(("NVIDIA H200".to_owned(), 0));
        }
    }
    let per_gpu_kind: Vec<RunEstimate> = kinds
        .iter()
        .map(|(kind, _)| estimator.estimate(&job.model, kind, &shape))
        .collect();
    let run = per_gpu_kind[0].clone();
    let wait = wait_estimate(&state, &job, gpus.len(), &estimator, run.p50_seconds).await?;
    let total_p50_seconds = wait.seconds.map(|w| round3(w + run.p50_seconds));
    Ok(Json(EstimateView {
        model: job.model.clone(),
        width: job.width,
        height: job.height,
        steps: job.steps,
        num_images: job.num_images,
        run,
        per_gpu_kind,
        wait,
        total_p50_seconds,
    }))
}

async fn wait_estimate(
    state: &ApiState,
    job: &ValidJob,
    consumers: usize,
    estimator: &Estimator,
    own_p50_seconds: f64,
) -> Result<WaitEstimate, ApiError> {
    let broker = state.broker().await?;
    let topology = broker.topology().clone();
    let mut queues = vec![topology.work_queue(Lane::High)];
    if job.priority < HIGH_PRIORITY_THRESHOLD {
        queues.push(topology.work_queue(Lane::Normal));
        queues.push(topology.intake_queue());
    }
    let mut ahead = 0u64;
    for q in &queues {
        ahead += u64::from(broker.queue_depth(q).await?);
    }
    let counts = state.db.count_by_state().await?;
    let running = u64::try_from(counts.get("running").copied().unwrap_or(0)).unwrap_or(0);
    let mean_seconds = estimator
        .mean_run_ms
        .map(|m| m / 1000.0)
        .unwrap_or(own_p50_seconds);
    let seconds = if consumers == 0 {
        None
    } else if ahead == 0 && (running as usize) < consumers {
        Some(0.0)
    } else {
        let work = ahead as f64 + running as f64 / 2.0;
        Some(round3(work / consumers as f64 * mean_seconds))
    };
    Ok(WaitEstimate {
        seconds,
        queued_ahead: ahead,
        running,
        consumers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(width: u32, steps: u32, images: u32, total_ms: f64) -> MetricsSample {
        MetricsSample {
            job_id: uuid::Uuid::new_v4(),
            model: "m".into(),
            gpu_kind: "g".into(),
            width,
            height: width,
            steps,
            num_images: images,
            cfg: true,
            controlnets: 0,
            model_load_ms: 0.0,
            total_ms,
            peak_gpu_mem_bytes: Some(1_000_000 + u64::from(width) * 10),
            recorded_at: chrono::Utc::now(),
        }
    }

    fn truth(width: u32, steps: u32, images: u32) -> f64 {
        let shape = Shape {
            width,
            height: width,
            steps,
            num_images: images,
            cfg: true,
            controlnets: 0,
        };
        let [one, u, uu, _, np, s] = shape.time_features();
        40.0 * one + 300.0 * u + 50.0 * uu + 90.0 * np + 0.7 * s
    }

    #[test]
    fn recovers_a_linear_cost_and_predicts_unseen_shapes() {
        let mut samples = Vec::new();
        for width in [64, 128, 256] {
            for steps in [2, 4, 8] {
                for images in [1, 2] {
                    samples.push(sample(width, steps, images, truth(width, steps, images)));
                }
            }
        }
        let est = Estimator::fit(&samples);
        let shape = Shape {
            width: 192,
            height: 192,
            steps: 6,
            num_images: 3,
            cfg: true,
            controlnets: 0,
        };
        let e = est.estimate("m", "g", &shape);
        let expected = truth(192, 6, 3) / 1000.0;
        assert_eq!(e.basis, Basis::History);
        assert!(
            (e.p50_seconds - expected).abs() / expected < 0.01,
            "{e:?} vs {expected}"
        );
        assert!(e.p90_seconds >= e.p50_seconds);
    }

    #[test]
    fn falls_back_to_model_history_then_priors() {
        let samples: Vec<MetricsSample> = (0..10)
            .map(|i| sample(64, 2 + i, 1, truth(64, 2 + i, 1)))
            .collect();
        let est = Estimator::fit(&samples);
        let shape = Shape::of_sample(&samples[0]);
        assert_eq!(
            est.estimate("m", "other", &shape).basis,
            Basis::ModelHistory
        );
        let prior = est.estimate(
            "unknown",
            "NVIDIA H200",
            &Shape {
                width: 1024,
                height: 1024,
                steps: 30,
                num_images: 1,
                cfg: true,
                controlnets: 0,
            },
        );
        assert_eq!(prior.basis, Basis::Prior);
        // 30 steps of batch 2 at 1024² on an H200: about 1.3 s with decode and overhead.
        assert!(
            prior.p50_seconds > 1.0 && prior.p50_seconds < 2.0,
            "{prior:?}"
        );
        assert!(prior.gpu_memory_bytes.unwrap() > 7_000_000_000);
        assert_eq!(
            est.estimate("unknown", "cpu", &shape).gpu_memory_bytes,
            None
        );
    }

    #[test]
    fn too_few_rows_do_not_fit() {
        let samples: Vec<MetricsSample> = (0..3).map(|i| sample(64, i + 1, 1, 100.0)).collect();
        let refs: Vec<&MetricsSample> = samples.iter().collect();
        assert!(TimeModel::fit(&refs).is_none());
    }
}
