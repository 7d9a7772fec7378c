//! Euler ancestral ("Euler a"): an Euler step down to σ_down followed by fresh noise of size σ_up,
//! the ancestral sampler of Karras et al. 2022 / k-diffusion's `sample_euler_ancestral` (η = 1).
//! Mirrors diffusers' `EulerAncestralDiscreteScheduler`.

use super::common::{self, TrainParams, TrainSchedule};
use super::config::SchedulerConfig;
use super::euler::v_coefficients;
use super::{PredictionType, Scheduler, SchedulerError, TimestepSpacing};
use crate::engine::noise::BatchNoise;

/// diffusers' `EulerAncestralDiscreteScheduler` after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct EulerAncestral {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    prediction: PredictionType,
    noise: Vec<f32>,
}

impl EulerAncestral {
    /// Configure for `steps` inference steps.
    pub fn new(config: &SchedulerConfig, steps: u32) -> Result<Self, SchedulerError> {
        let params = TrainParams::resolve(config, 0.0001, 0.02, true);
        let train = TrainSchedule::new(&params, false)?;
        let n = common::check_steps(steps, params.num_train_timesteps)?;
        let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
        let timesteps = common::spaced_timesteps_f32(
            spacing,
            params.num_train_timesteps,
            n,
            config.steps_offset.unwrap_or(0),
        );
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| train.interp_sigma(t) as f32 as f64)
            .collect();
        sigmas.push(0.0);
        Ok(Self {
            init_noise_sigma: common::k_init_noise_sigma(spacing, &sigmas),
            timesteps,
            sigmas,
            prediction: config.prediction_type.unwrap_or(PredictionType::Epsilon),
            noise: Vec::new(),
        })
    }
}

impl Scheduler for EulerAncestral {
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

    fn step(
        &mut self,
        model_output: &[f32],
        index: usize,
        sample: &mut [f32],
        noise: &mut BatchNoise,
    ) {
        let sigma = self.sigmas[index] as f32;
        let sigma_to = self.sigmas[index + 1] as f32;
        let to2 = sigma_to * sigma_to;
        let from2 = sigma * sigma;
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
        let dt = sigma_down - sigma;
        let (c_out, c_skip_div) = v_coefficients(sigma);

        self.noise.resize(model_output.len(), 0.0);
        noise.fill(&mut self.noise);
        for ((x, &m), &z) in sample.iter_mut().zip(model_output).zip(&self.noise) {
            let x0 = match self.prediction {
                PredictionType::Epsilon => *x - sigma * m,
                PredictionType::VPrediction => m * c_out + *x / c_skip_div,
            };
            let d = (*x - x0) / sigma;
            *x = (*x + d * dt) + z * sigma_up;
        }
    }
}
