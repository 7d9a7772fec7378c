//! DPM-Solver++ multistep: Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
//! Diffusion Probabilistic Models" (data-prediction multistep solver, orders 1–3, midpoint or Heun
//! second-order form), and its SDE variant ("DPM++ 2M SDE", `sde-dpmsolver++`). Mirrors diffusers'
//! `DPMSolverMultistepScheduler`, including Karras sigmas, `lower_order_final`, `euler_at_final`,
//! `final_sigmas_type` and `lambda_min_clipped`. Coefficients are computed in float32 as diffusers
//! computes them from its float32 sigma tensor.

use super::common::{self, TrainParams, TrainSchedule};
use super::config::{BetaSchedule, FinalSigmasType, SchedulerConfig};
use super::{PredictionType, Scheduler, SchedulerError, TimestepSpacing};
use crate::engine::noise::BatchNoise;

const CLASS: &str = "DPMSolverMultistepScheduler";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SolverType {
    Midpoint,
    Heun,
}

/// diffusers' `DPMSolverMultistepScheduler` (dpmsolver++ / sde-dpmsolver++) after
/// `set_timesteps`.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistep {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    prediction: PredictionType,
    sde: bool,
    solver_type: SolverType,
    solver_order: usize,
    lower_order_final: bool,
    euler_at_final: bool,
    final_zero: bool,
    /// Data predictions of the latest evaluations, oldest first (at most `solver_order`).
    x0_history: Vec<Vec<f32>>,
    lower_order_nums: usize,
    noise: Vec<f32>,
}

impl DpmSolverMultistep {
    /// Configure for `steps` inference steps.
    pub fn new(config: &SchedulerConfig, steps: u32) -> Result<Self, SchedulerError> {
        common::reject_flag(config.thresholding, "thresholding", CLASS)?;
        common::reject_flag(
            config.use_exponential_sigmas,
            "use_exponential_sigmas",
            CLASS,
        )?;
        common::reject_flag(config.use_beta_sigmas, "use_beta_sigmas", CLASS)?;
        common::reject_flag(config.use_lu_lambdas, "use_lu_lambdas", CLASS)?;
        common::reject_flag(config.use_flow_sigmas, "use_flow_sigmas", CLASS)?;
        common::reject_flag(config.use_dynamic_shifting, "use_dynamic_shifting", CLASS)?;
        if let Some(v) = &config.variance_type {
            return Err(SchedulerError::Unsupported {
                key: "variance_type",
                value: v.clone(),
                reason: "learned-variance models are not supported".into(),
            });
        }
        let sde = match config.algorithm_type.as_deref().unwrap_or("dpmsolver++") {
            "dpmsolver++" | "deis" => false,
            "sde-dpmsolver++" => true,
            other => {
                return Err(SchedulerError::Unsupported {
                    key: "algorithm_type",
                    value: other.into(),
                    reason: "supported: dpmsolver++, sde-dpmsolver++".into(),
                })
            }
        };
        let solver_type = match config.solver_type.as_deref().unwrap_or("midpoint") {
            "midpoint" | "bh1" | "bh2" | "logrho" => SolverType::Midpoint,
            "heun" => SolverType::Heun,
            other => {
                return Err(SchedulerError::InvalidConfig {
                    key: "solver_type",
                    reason: format!("unknown value {other:?}; expected \"midpoint\" or \"heun\""),
                })
            }
        };
        let solver_order = config.solver_order.unwrap_or(2) as usize;
        if !(1..=3).contains(&solver_order) {
            return Err(SchedulerError::InvalidConfig {
                key: "solver_order",
                reason: format!("must be 1, 2 or 3, got {solver_order}"),
            });
        }

        let params = TrainParams::resolve(config, 0.0001, 0.02, true);
        let train = TrainSchedule::new(&params, false)?;
        let num_train = params.num_train_timesteps;
        let n = common::check_steps(steps, num_train)?;
        let last_timestep = num_train - clipped_count(&train, config.lambda_min_clipped);
        if last_timestep == 0 {
            return Err(SchedulerError::InvalidConfig {
                key: "lambda_min_clipped",
                reason: "clips every training timestep".into(),
            });
        }
        let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
        let mut timesteps = common::spaced_timesteps_multistep(
            spacing,
            num_train,
            last_timestep,
            n,
            config.steps_offset.unwrap_or(0),
        );
        let mut sigmas: Vec<f64>;
        if config.use_karras_sigmas.unwrap_or(false) {
            let table = &train.sigmas;
            sigmas = common::karras_sigmas(table[0] as f64, table[table.len() - 1] as f64, n);
            let log_sigmas = train.log_sigmas();
            let cosine = config.beta_schedule == Some(BetaSchedule::SquaredcosCapV2);
            timesteps = sigmas
                .iter()
                .map(|&s| {
                    let t = common::sigma_to_t(s, &log_sigmas);
                    // diffusers rounds, except for the cosine schedule where the cast to int64
                    // truncates.
                    if cosine {
                        t.trunc()
                    } else {
                        t.round_ties_even()
                    }
                })
                .collect();
        } else {
            sigmas = timesteps.iter().map(|&t| train.interp_sigma(t)).collect();
        }
        let final_sigmas = config.final_sigmas_type.unwrap_or(FinalSigmasType::Zero);
        sigmas.push(match final_sigmas {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => train.sigmas[0] as f64,
        });
        let sigmas = sigmas.into_iter().map(|s| s as f32 as f64).collect();
        Ok(Self {
            timesteps,
            sigmas,
            prediction: config.prediction_type.unwrap_or(PredictionType::Epsilon),
            sde,
            solver_type,
            solver_order,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            euler_at_final: config.euler_at_final.unwrap_or(false),
            final_zero: final_sigmas == FinalSigmasType::Zero,
            x0_history: Vec::new(),
            lower_order_nums: 0,
            noise: Vec::new(),
        })
    }

    fn point(&self, index: usize) -> Point {
        Point::new(self.sigmas[index] as f32)
    }
}

/// How many of the lowest-λ training timesteps `lambda_min_clipped` removes (diffusers'
/// `searchsorted` over the increasing, flipped float32 λ table).
fn clipped_count(train: &TrainSchedule, lambda_min_clipped: Option<f64>) -> u32 {
    let Some(clip) = lambda_min_clipped else {
        return 0;
    };
    let clip = clip as f32;
    train
        .alphas_cumprod
        .iter()
        .rev()
        .filter(|&&a| {
            let lambda = a.sqrt().ln() - (1.0 - a).sqrt().ln();
            lambda < clip
        })
        .count() as u32
}

/// α_t, σ_t and λ_t = ln α_t − ln σ_t of one sigma, in float32.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Point {
    pub alpha: f32,
    pub sigma: f32,
    pub lambda: f32,
}

impl Point {
    pub fn new(sigma: f32) -> Self {
        let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
        let sigma_t = sigma * alpha;
        Self {
            alpha,
            sigma: sigma_t,
            lambda: alpha.ln() - sigma_t.ln(),
        }
    }
}

/// Per-element update `a·x + b0·D0 + b1·D1 + b2·D2 + c·z` (float32, terms added left to right).
#[derive(Debug, Clone, Copy, Default)]
struct Update {
    a: f32,
    b0: f32,
    b1: f32,
    b2: f32,
    c: f32,
}

impl Scheduler for DpmSolverMultistep {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, _sample: &mut [f32], _index: usize) {}

    fn step(
        &mut self,
        model_output: &[f32],
        index: usize,
        sample: &mut [f32],
        noise: &mut BatchNoise,
    ) {
        let len = self.timesteps.len();
        let lower_order_final = index == len - 1
            && (self.euler_at_final || (self.lower_order_final && len < 15) || self.final_zero);
        let lower_order_second = index + 2 == len && self.lower_order_final && len < 15;

        // Convert the model output to a data (x0) prediction.
        let s = self.point(index);
        let x0: Vec<f32> = match self.prediction {
            PredictionType::Epsilon => sample
                .iter()
                .zip(model_output)
                .map(|(&x, &m)| (x - s.sigma * m) / s.alpha)
                .collect(),
            PredictionType::VPrediction => sample
                .iter()
                .zip(model_output)
                .map(|(&x, &m)| s.alpha * x - s.sigma * m)
                .collect(),
        };
        if self.x0_history.len() == self.solver_order {
            self.x0_history.remove(0);
        }
        self.x0_history.push(x0);

        if self.sde {
            self.noise.resize(model_output.len(), 0.0);
            noise.fill(&mut self.noise);
        }

        let order = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            1
        } else if self.solver_order == 2 || self.lower_order_nums < 2 || lower_order_second {
            2
        } else {
            3
        };
        let t = self.point(index + 1);
        let h = t.lambda - s.lambda;
        let hist = &self.x0_history;
        let k = hist.len();
        match order {
            1 => {
                let u = self.first_order(t, s, h);
                let m0 = &hist[k - 1];
                for (i, x) in sample.iter_mut().enumerate() {
                    *x = self.combine(u, *x, m0[i], 0.0, 0.0, i);
                }
            }
            2 => {
                let s1 = self.point(index - 1);
                let r0 = (s.lambda - s1.lambda) / h;
                let inv_r0 = 1.0 / r0;
                let u = self.second_order(t, s, h);
                let (m0, m1) = (&hist[k - 1], &hist[k - 2]);
                for (i, x) in sample.iter_mut().enumerate() {
                    let d1 = inv_r0 * (m0[i] - m1[i]);
                    *x = self.combine(u, *x, m0[i], d1, 0.0, i);
                }
            }
            _ => {
                let s1 = self.point(index - 1);
                let s2 = self.point(index - 2);
                let r0 = (s.lambda - s1.lambda) / h;
                let r1 = (s1.lambda - s2.lambda) / h;
                let (inv_r0, inv_r1) = (1.0 / r0, 1.0 / r1);
                let mix = r0 / (r0 + r1);
                let inv_sum = 1.0 / (r0 + r1);
                let u = self.third_order(t, s, h);
                let (m0, m1, m2) = (&hist[k - 1], &hist[k - 2], &hist[k - 3]);
                for (i, x) in sample.iter_mut().enumerate() {
                    let d1_0 = inv_r0 * (m0[i] - m1[i]);
                    let d1_1 = inv_r1 * (m1[i] - m2[i]);
                    let d1 = d1_0 + mix * (d1_0 - d1_1);
                    let d2 = inv_sum * (d1_0 - d1_1);
                    *x = self.combine(u, *x, m0[i], d1, d2, i);
                }
            }
        }
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
    }
}

impl DpmSolverMultistep {
    fn combine(&self, u: Update, x: f32, d0: f32, d1: f32, d2: f32, i: usize) -> f32 {
        let mut v = u.a * x + u.b0 * d0;
        if u.b1 != 0.0 {
            v += u.b1 * d1;
        }
        if u.b2 != 0.0 {
            v += u.b2 * d2;
        }
        if self.sde {
            v += u.c * self.noise[i];
        }
        v
    }

    /// The noise coefficient σ_t·(1 − e^{−2h})^½ of the SDE variant.
    fn noise_coeff(t: Point, h: f32) -> f32 {
        t.sigma * (1.0 - (-2.0 * h).exp()).sqrt()
    }

    fn first_order(&self, t: Point, s: Point, h: f32) -> Update {
        if self.sde {
            Update {
                a: t.sigma / s.sigma * (-h).exp(),
                b0: t.alpha * (1.0 - (-2.0 * h).exp()),
                c: Self::noise_coeff(t, h),
                ..Update::default()
            }
        } else {
            Update {
                a: t.sigma / s.sigma,
                b0: -(t.alpha * ((-h).exp() - 1.0)),
                ..Update::default()
            }
        }
    }

    fn second_order(&self, t: Point, s: Point, h: f32) -> Update {
        let mut u = self.first_order(t, s, h);
        u.b1 = match (self.sde, self.solver_type) {
            (false, SolverType::Midpoint) => -(0.5 * (t.alpha * ((-h).exp() - 1.0))),
            (false, SolverType::Heun) => t.alpha * (((-h).exp() - 1.0) / h + 1.0),
            (true, SolverType::Midpoint) => 0.5 * (t.alpha * (1.0 - (-2.0 * h).exp())),
            (true, SolverType::Heun) => t.alpha * ((1.0 - (-2.0 * h).exp()) / (-2.0 * h) + 1.0),
        };
        u
    }

    fn third_order(&self, t: Point, s: Point, h: f32) -> Update {
        let mut u = self.first_order(t, s, h);
        if self.sde {
            let e = (-2.0 * h).exp();
            u.b1 = t.alpha * ((1.0 - e) / (-2.0 * h) + 1.0);
            u.b2 = t.alpha * ((1.0 - e - 2.0 * h) / ((2.0 * h) * (2.0 * h)) - 0.5);
        } else {
            let e = (-h).exp();
            u.b1 = t.alpha * ((e - 1.0) / h + 1.0);
            u.b2 = -(t.alpha * ((e - 1.0 + h) / (h * h) - 0.5));
        }
        u
    }
}
