//! DDIM: Song, Meng & Ermon 2020, "Denoising Diffusion Implicit Models", the deterministic
//! sampler (η = 0, eq. 12). Mirrors diffusers' `DDIMScheduler` as the SDXL pipeline calls it
//! (`eta = 0`), including `clip_sample`, `set_alpha_to_one` and zero-SNR rescaling.

use super::common::{self, TrainParams, TrainSchedule};
use super::config::SchedulerConfig;
use super::{PredictionType, Scheduler, SchedulerError, TimestepSpacing};
use crate::engine::noise::BatchNoise;

const CLASS: &str = "DDIMScheduler";

/// diffusers' `DDIMScheduler` after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct Ddim {
    timesteps: Vec<f64>,
    /// ᾱ at each timestep and at the step after it (float32).
    alphas: Vec<(f32, f32)>,
    prediction: PredictionType,
    /// `Some(range)` when the predicted x0 is clamped to `[-range, range]`.
    clip: Option<f32>,
}

impl Ddim {
    /// Configure for `steps` inference steps.
    pub fn new(config: &SchedulerConfig, steps: u32) -> Result<Self, SchedulerError> {
        common::reject_flag(config.thresholding, "thresholding", CLASS)?;
        let params = TrainParams::resolve(config, 0.0001, 0.02, true);
        let train = TrainSchedule::new(&params, false)?;
        let num_train = params.num_train_timesteps;
        let n = common::check_steps(steps, num_train)?;
        let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Leading);
        let timesteps =
            common::spaced_timesteps_ddim(spacing, num_train, n, config.steps_offset.unwrap_or(0));
        let final_alpha = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            train.alphas_cumprod[0]
        };
        let stride = (num_train / steps) as i64;
        let alphas = timesteps
            .iter()
            .map(|&t| {
                let t = t as i64;
                if t < 0 || t >= num_train as i64 {
                    return Err(SchedulerError::InvalidSteps {
                        steps,
                        reason: format!(
                            "timestep {t} falls outside the {num_train} training timesteps \
                             (check steps_offset and timestep_spacing)"
                        ),
                    });
                }
                let prev = t - stride;
                let a_prev = if prev >= 0 {
                    train.alphas_cumprod[prev as usize]
                } else {
                    final_alpha
                };
                Ok((train.alphas_cumprod[t as usize], a_prev))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let range = config.clip_sample_range.unwrap_or(1.0);
        if range < 0.0 {
            return Err(SchedulerError::InvalidConfig {
                key: "clip_sample_range",
                reason: format!("must not be negative, got {range}"),
            });
        }
        let clip = config.clip_sample.unwrap_or(true).then_some(range as f32);
        Ok(Self {
            timesteps,
            alphas,
            prediction: config.prediction_type.unwrap_or(PredictionType::Epsilon),
            clip,
        })
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f64] {
        &[]
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, _sample: &mut [f32], _index: usize) {}

    fn step(&mut self, model_output: &[f32], index: usize, sample: &mut [f32], _: &mut BatchNoise) {
        let (a_t, a_prev) = self.alphas[index];
        let sqrt_a = a_t.sqrt();
        let sqrt_b = (1.0 - a_t).sqrt();
        let sqrt_a_prev = a_prev.sqrt();
        let dir_coeff = (1.0 - a_prev).sqrt();
        for (x, &m) in sample.iter_mut().zip(model_output) {
            let (mut x0, eps) = match self.prediction {
                PredictionType::Epsilon => ((*x - sqrt_b * m) / sqrt_a, m),
                PredictionType::VPrediction => (sqrt_a * *x - sqrt_b * m, sqrt_a * m + sqrt_b * *x),
            };
            if let Some(r) = self.clip {
                x0 = x0.clamp(-r, r);
            }
            *x = sqrt_a_prev * x0 + dir_coeff * eps;
        }
    }
}
