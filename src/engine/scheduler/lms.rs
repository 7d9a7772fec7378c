//! LMS: the linear multistep method (order 4) on the probability-flow ODE in σ, as in
//! k-diffusion's `sample_lms` (Karras et al. 2022 cite it as the "LMS" sampler). Mirrors diffusers'
//! `LMSDiscreteScheduler`. diffusers integrates each Lagrange basis polynomial numerically
//! (`scipy.integrate.quad`); the integrands are polynomials of degree at most 3, which a
//! 4-point Gauss–Legendre rule integrates exactly, so this computes the same coefficients.

use super::common::{self, TrainParams, TrainSchedule};
use super::config::SchedulerConfig;
use super::euler::v_coefficients;
use super::{PredictionType, Scheduler, SchedulerError, TimestepSpacing};
use crate::engine::noise::BatchNoise;

const CLASS: &str = "LMSDiscreteScheduler";
const ORDER: usize = 4;

/// diffusers' `LMSDiscreteScheduler` after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct Lms {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    prediction: PredictionType,
    /// Derivatives of the latest evaluations, oldest first (at most [`ORDER`]).
    derivatives: Vec<Vec<f32>>,
}

impl Lms {
    /// Configure for `steps` inference steps.
    pub fn new(config: &SchedulerConfig, steps: u32) -> Result<Self, SchedulerError> {
        common::reject_flag(
            config.use_exponential_sigmas,
            "use_exponential_sigmas",
            CLASS,
        )?;
        common::reject_flag(config.use_beta_sigmas, "use_beta_sigmas", CLASS)?;
        let params = TrainParams::resolve(config, 0.0001, 0.02, false);
        let train = TrainSchedule::new(&params, false)?;
        let n = common::check_steps(steps, params.num_train_timesteps)?;
        let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
        let (timesteps, sigmas) =
            common::k_sigma_schedule(config, &train, params.num_train_timesteps, n, spacing);
        Ok(Self {
            init_noise_sigma: common::k_init_noise_sigma(spacing, &sigmas),
            timesteps,
            sigmas,
            prediction: config.prediction_type.unwrap_or(PredictionType::Epsilon),
            derivatives: Vec::new(),
        })
    }

    /// ∫_{σ_t}^{σ_{t+1}} of the Lagrange basis polynomial through σ_t, σ_{t−1}, …, σ_{t−order+1}
    /// that is one at σ_{t−current}.
    fn coefficient(&self, order: usize, t: usize, current: usize) -> f64 {
        let basis = |tau: f64| {
            (0..order)
                .filter(|&k| k != current)
                .map(|k| {
                    (tau - self.sigmas[t - k]) / (self.sigmas[t - current] - self.sigmas[t - k])
                })
                .product::<f64>()
        };
        gauss_legendre_4(basis, self.sigmas[t], self.sigmas[t + 1])
    }
}

/// 4-point Gauss–Legendre quadrature of `f` over `[a, b]` (exact for degree ≤ 7).
fn gauss_legendre_4(f: impl Fn(f64) -> f64, a: f64, b: f64) -> f64 {
    const NODES: [(f64, f64); 4] = [
        (-0.861_136_311_594_052_6, 0.347_854_845_137_453_8),
        (-0.339_981_043_584_856_3, 0.652_145_154_862_546_2),
        (0.339_981_043_584_856_3, 0.652_145_154_862_546_2),
        (0.861_136_311_594_052_6, 0.347_854_845_137_453_8),
    ];
    let half = (b - a) / 2.0;
    let mid = (a + b) / 2.0;
    NODES
        .iter()
        .map(|&(x, w)| w * f(mid + half * x))
        .sum::<f64>()
        * half
}

impl Scheduler for Lms {
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
        let (c_out, c_skip_div) = v_coefficients(sigma);
        let derivative: Vec<f32> = sample
            .iter()
            .zip(model_output)
            .map(|(&x, &m)| {
                let x0 = match self.prediction {
                    PredictionType::Epsilon => x - sigma * m,
                    PredictionType::VPrediction => m * c_out + x / c_skip_div,
                };
                (x - x0) / sigma
            })
            .collect();
        if self.derivatives.len() == ORDER {
            self.derivatives.remove(0);
        }
        self.derivatives.push(derivative);

        let order = (index + 1).min(ORDER);
        let coeffs: Vec<f32> = (0..order)
            .map(|k| self.coefficient(order, index, k) as f32)
            .collect();
        // Newest derivative pairs with the first coefficient.
        for (i, x) in sample.iter_mut().enumerate() {
            let mut acc = 0.0f32;
            for (c, d) in coeffs.iter().zip(self.derivatives.iter().rev()) {
                acc += c * d[i];
            }
            *x += acc;
        }
    }
}
