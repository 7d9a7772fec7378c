//! Heun: the second-order Heun (improved Euler) method on the probability-flow ODE in σ, Karras et
//! al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models" (Algorithm 1).
//! Mirrors diffusers' `HeunDiscreteScheduler`: the timestep list repeats every timestep after the
//! first, so each step but the first costs two model evaluations (an Euler predictor, then the
//! trapezoidal corrector), and the last step is a plain Euler step to σ = 0.

use super::common::{self, TrainParams, TrainSchedule};
use super::config::SchedulerConfig;
use super::euler::v_coefficients;
use super::{PredictionType, Scheduler, SchedulerError, TimestepSpacing};
use crate::engine::noise::BatchNoise;

const CLASS: &str = "HeunDiscreteScheduler";

/// The predictor's state kept for the corrector evaluation.
#[derive(Debug, Clone)]
struct Pending {
    derivative: Vec<f32>,
    sample: Vec<f32>,
    dt: f32,
}

/// diffusers' `HeunDiscreteScheduler` after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct Heun {
    /// One entry per model evaluation: `[t0, t1, t1, t2, t2, ...]`.
    timesteps: Vec<f64>,
    /// `[σ0, σ1, σ1, σ2, σ2, ..., 0]` (float32).
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    prediction: PredictionType,
    clip: Option<f32>,
    pending: Option<Pending>,
}

impl Heun {
    /// Configure for `steps` inference steps (`2·steps − 1` model evaluations).
    pub fn new(config: &SchedulerConfig, steps: u32) -> Result<Self, SchedulerError> {
        common::reject_flag(
            config.use_exponential_sigmas,
            "use_exponential_sigmas",
            CLASS,
        )?;
        common::reject_flag(config.use_beta_sigmas, "use_beta_sigmas", CLASS)?;
        let params = TrainParams::resolve(config, 0.00085, 0.012, false);
        let train = TrainSchedule::new(&params, true)?;
        let n = common::check_steps(steps, params.num_train_timesteps)?;
        let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
        let (timesteps, sigmas) =
            common::k_sigma_schedule(config, &train, params.num_train_timesteps, n, spacing);

        let mut inter_sigmas = vec![sigmas[0]];
        for &s in &sigmas[1..sigmas.len() - 1] {
            inter_sigmas.extend([s, s]);
        }
        inter_sigmas.push(0.0);
        let mut inter_timesteps = vec![timesteps[0]];
        for &t in &timesteps[1..] {
            inter_timesteps.extend([t, t]);
        }
        let range = config.clip_sample_range.unwrap_or(1.0);
        if range < 0.0 {
            return Err(SchedulerError::InvalidConfig {
                key: "clip_sample_range",
                reason: format!("must not be negative, got {range}"),
            });
        }
        Ok(Self {
            init_noise_sigma: common::k_init_noise_sigma(spacing, &inter_sigmas),
            timesteps: inter_timesteps,
            sigmas: inter_sigmas,
            prediction: config.prediction_type.unwrap_or(PredictionType::Epsilon),
            clip: config.clip_sample.unwrap_or(false).then_some(range as f32),
            pending: None,
        })
    }

    fn x0(&self, x: f32, m: f32, sigma: f32, c: (f32, f32)) -> f32 {
        let x0 = match self.prediction {
            PredictionType::Epsilon => x - sigma * m,
            PredictionType::VPrediction => m * c.0 + x / c.1,
        };
        match self.clip {
            Some(r) => x0.clamp(-r, r),
            None => x0,
        }
    }
}

impl Scheduler for Heun {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &mut [f32], index: usize) {
        common::scale_by_sigma(sample, self.sigmas[index]);
    }

    fn step(&mut self, model_output: &[f32], index: usize, sample: &mut [f32], _: &mut BatchNoise) {
        match self.pending.take() {
            None => {
                // Predictor: an Euler step from σ_i to σ_{i+1}, remembered for the corrector.
                let sigma = self.sigmas[index] as f32;
                let dt = self.sigmas[index + 1] as f32 - sigma;
                let c = v_coefficients(sigma);
                let mut derivative = Vec::with_capacity(sample.len());
                let start = sample.to_vec();
                for (x, &m) in sample.iter_mut().zip(model_output) {
                    let d = (*x - self.x0(*x, m, sigma, c)) / sigma;
                    derivative.push(d);
                    *x += d * dt;
                }
                self.pending = Some(Pending {
                    derivative,
                    sample: start,
                    dt,
                });
            }
            Some(p) => {
                // Corrector: average the slopes at both ends, step again from the start.
                let sigma_next = self.sigmas[index] as f32;
                let c = v_coefficients(sigma_next);
                for (i, (x, &m)) in sample.iter_mut().zip(model_output).enumerate() {
                    let d = (*x - self.x0(*x, m, sigma_next, c)) / sigma_next;
                    let d = (p.derivative[i] + d) / 2.0;
                    *x = p.sample[i] + d * p.dt;
                }
            }
        }
    }
}
