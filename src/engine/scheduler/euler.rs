//! Euler: the first-order Euler method on the probability-flow ODE in σ, as in Karras et al.
//! 2022, "Elucidating the Design Space of Diffusion-Based Generative Models" (Algorithm 2 without
//! churn). Mirrors diffusers' `EulerDiscreteScheduler`, including its Karras sigmas, log-linear
//! interpolation, `final_sigmas_type` and continuous timesteps for v-prediction.

use super::common::{self, TrainParams, TrainSchedule};
use super::config::{FinalSigmasType, InterpolationType, SchedulerConfig, TimestepType};
use super::{PredictionType, Scheduler, SchedulerError, TimestepSpacing};
use crate::engine::noise::BatchNoise;

const CLASS: &str = "EulerDiscreteScheduler";

/// diffusers' `EulerDiscreteScheduler` after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct Euler {
    timesteps: Vec<f64>,
    /// Float32 values, one more than the evaluations (the last is the final sigma).
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    prediction: PredictionType,
}

impl Euler {
    /// Configure for `steps` inference steps.
    pub fn new(config: &SchedulerConfig, steps: u32) -> Result<Self, SchedulerError> {
        common::reject_flag(
            config.use_exponential_sigmas,
            "use_exponential_sigmas",
            CLASS,
        )?;
        common::reject_flag(config.use_beta_sigmas, "use_beta_sigmas", CLASS)?;
        let params = TrainParams::resolve(config, 0.0001, 0.02, true);
        let train = TrainSchedule::new(&params, false)?;
        let n = common::check_steps(steps, params.num_train_timesteps)?;
        let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
        let prediction = config.prediction_type.unwrap_or(PredictionType::Epsilon);
        let karras = config.use_karras_sigmas.unwrap_or(false);
        let continuous = config.timestep_type == Some(TimestepType::Continuous)
            && prediction == PredictionType::VPrediction;

        let mut timesteps = common::spaced_timesteps_f32(
            spacing,
            params.num_train_timesteps,
            n,
            config.steps_offset.unwrap_or(0),
        );
        let mut sigmas: Vec<f64> = match config.interpolation_type {
            None | Some(InterpolationType::Linear) => {
                timesteps.iter().map(|&t| train.interp_sigma(t)).collect()
            }
            Some(InterpolationType::LogLinear) => {
                // From the largest training sigma down to the smallest, n + 1 values.
                let start = (train.sigmas[train.len() - 1] as f64).ln() as f32;
                let end = (train.sigmas[0] as f64).ln() as f32;
                common::torch_linspace_f32(start, end, n + 1)
                    .into_iter()
                    .map(|v| v.exp() as f64)
                    .collect()
            }
        };
        if karras {
            let sigma_min = config.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let sigma_max = config.sigma_max.unwrap_or(sigmas[0]);
            sigmas = common::karras_sigmas(sigma_min, sigma_max, n);
            let log_sigmas = train.log_sigmas();
            timesteps = sigmas
                .iter()
                .map(|&s| common::sigma_to_t(s, &log_sigmas) as f32 as f64)
                .collect();
        }
        let last = match config.final_sigmas_type.unwrap_or(FinalSigmasType::Zero) {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => train.sigmas[0] as f64,
        };
        sigmas.push(last);
        let sigmas: Vec<f64> = sigmas.into_iter().map(|s| s as f32 as f64).collect();
        if continuous {
            timesteps = sigmas[..sigmas.len() - 1]
                .iter()
                .map(|&s| (0.25 * (s as f32).ln()) as f64)
                .collect();
        }
        Ok(Self {
            init_noise_sigma: common::k_init_noise_sigma(spacing, &sigmas),
            timesteps,
            sigmas,
            prediction,
        })
    }
}

impl Scheduler for Euler {
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
        let sigma = self.sigmas[index] as f32;
        let dt = self.sigmas[index + 1] as f32 - sigma;
        k_euler_update(self.prediction, sigma, dt, model_output, sample);
    }

    fn euler_epsilon(&self, index: usize) -> Option<(f32, f32)> {
        (self.prediction == PredictionType::Epsilon && index + 1 < self.sigmas.len())
            .then(|| (self.sigmas[index] as f32, self.sigmas[index + 1] as f32))
    }
}

/// One Euler step from `sigma` by `dt` given the model output, in float32 as diffusers computes
/// it: x0 from the prediction, derivative `(x − x0)/σ`, then `x + d·dt`.
pub(crate) fn k_euler_update(
    prediction: PredictionType,
    sigma: f32,
    dt: f32,
    model_output: &[f32],
    sample: &mut [f32],
) {
    match prediction {
        PredictionType::Epsilon => {
            for (x, &m) in sample.iter_mut().zip(model_output) {
                let x0 = *x - sigma * m;
                let d = (*x - x0) / sigma;
                *x += d * dt;
            }
        }
        PredictionType::VPrediction => {
            let (c_out, c_skip_div) = v_coefficients(sigma);
            for (x, &m) in sample.iter_mut().zip(model_output) {
                let x0 = m * c_out + *x / c_skip_div;
                let d = (*x - x0) / sigma;
                *x += d * dt;
            }
        }
    }
}

/// For v-prediction, `x0 = v · c_out + x / c_skip_div` with `c_out = −σ/(σ²+1)^½` and
/// `c_skip_div = σ² + 1` (float32).
pub(crate) fn v_coefficients(sigma: f32) -> (f32, f32) {
    let s2 = sigma * sigma + 1.0;
    (-sigma / s2.sqrt(), s2)
}
