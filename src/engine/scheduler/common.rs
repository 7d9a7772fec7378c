//! Pieces shared by the schedulers: the training noise schedule (betas, cumulative alphas and
//! the sigma table), inference timestep spacing, sigma interpolation and Karras sigmas.
//!
//! diffusers builds its schedules with float32 PyTorch tensors and float64 NumPy arrays in a
//! particular order; the functions here follow the same order and precision (noted on each) so
//! that timesteps and sigmas agree with diffusers to well below one part in a million.

use super::config::{BetaSchedule, SchedulerConfig};
use super::{SchedulerError, TimestepSpacing};

/// Training-schedule parameters after applying a scheduler class's defaults.
#[derive(Debug, Clone)]
pub(crate) struct TrainParams {
    pub num_train_timesteps: u32,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub rescale_betas_zero_snr: bool,
}

impl TrainParams {
    /// Resolve from `config`, using the class defaults for absent keys. `has_rescale` says
    /// whether the class knows `rescale_betas_zero_snr` (Heun and LMS do not).
    pub fn resolve(
        config: &SchedulerConfig,
        default_beta_start: f64,
        default_beta_end: f64,
        has_rescale: bool,
    ) -> Self {
        Self {
            num_train_timesteps: config.num_train_timesteps.unwrap_or(1000),
            beta_start: config.beta_start.unwrap_or(default_beta_start),
            beta_end: config.beta_end.unwrap_or(default_beta_end),
            beta_schedule: config.beta_schedule.unwrap_or(BetaSchedule::Linear),
            trained_betas: config.trained_betas.clone(),
            rescale_betas_zero_snr: has_rescale && config.rescale_betas_zero_snr.unwrap_or(false),
        }
    }
}

/// The discrete training schedule: cumulative alphas and sigmas, both float32 as in diffusers.
#[derive(Debug, Clone)]
pub(crate) struct TrainSchedule {
    pub alphas_cumprod: Vec<f32>,
    /// `sqrt((1 - ᾱ_t) / ᾱ_t)` for `t = 0..num_train_timesteps`, increasing with `t`.
    pub sigmas: Vec<f32>,
}

impl TrainSchedule {
    /// Build the schedule; `allow_exp` admits the `exp` beta schedule (Heun only).
    pub fn new(params: &TrainParams, allow_exp: bool) -> Result<Self, SchedulerError> {
        let n = params.num_train_timesteps as usize;
        let mut betas: Vec<f32> = match (&params.trained_betas, params.beta_schedule) {
            (Some(trained), _) => trained.iter().map(|&b| b as f32).collect(),
            (None, BetaSchedule::Linear) => {
                torch_linspace_f32(params.beta_start as f32, params.beta_end as f32, n)
            }
            (None, BetaSchedule::ScaledLinear) => torch_linspace_f32(
                params.beta_start.sqrt() as f32,
                params.beta_end.sqrt() as f32,
                n,
            )
            .into_iter()
            .map(|b| b * b)
            .collect(),
            (None, BetaSchedule::SquaredcosCapV2) => betas_for_alpha_bar(n, AlphaBar::Cosine),
            (None, BetaSchedule::Exp) if allow_exp => betas_for_alpha_bar(n, AlphaBar::Exp),
            (None, BetaSchedule::Exp) => {
                return Err(SchedulerError::Unsupported {
                    key: "beta_schedule",
                    value: "exp".into(),
                    reason: "only HeunDiscreteScheduler implements it".into(),
                })
            }
        };
        if betas.len() < 2 {
            return Err(SchedulerError::InvalidConfig {
                key: "num_train_timesteps",
                reason: format!("needs at least 2 training timesteps, got {}", betas.len()),
            });
        }
        if betas
            .iter()
            .any(|b| !b.is_finite() || *b < 0.0 || *b >= 1.0)
        {
            return Err(SchedulerError::InvalidConfig {
                key: "beta_schedule",
                reason: "betas must lie in [0, 1)".into(),
            });
        }
        if params.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let mut alphas_cumprod = cumprod_f32(betas.iter().map(|b| 1.0 - b));
        if params.rescale_betas_zero_snr {
            // diffusers keeps the last value just above zero so that the first sigma is finite.
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        let sigmas = alphas_cumprod
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt())
            .collect();
        Ok(Self {
            alphas_cumprod,
            sigmas,
        })
    }

    /// `ln σ_t` rounded to float32, as NumPy's `np.log` of the float32 sigma table.
    pub fn log_sigmas(&self) -> Vec<f32> {
        self.sigmas
            .iter()
            .map(|&s| (s as f64).ln() as f32)
            .collect()
    }

    /// The sigma at a (possibly fractional) training timestep, as `np.interp` computes it.
    pub fn interp_sigma(&self, t: f64) -> f64 {
        np_interp(t, &self.sigmas)
    }

    /// Largest training timestep index.
    pub fn len(&self) -> usize {
        self.sigmas.len()
    }
}

/// `torch.linspace(start, end, n, dtype=float32)` on the CPU (scalar formula: the first half
/// counts up from `start`, the second half down from `end`).
pub(crate) fn torch_linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    match n {
        0 => return Vec::new(),
        1 => return vec![start],
        _ => {}
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - i - 1) as f32
            }
        })
        .collect()
}

#[derive(Clone, Copy)]
enum AlphaBar {
    Cosine,
    Exp,
}

/// Betas from a continuous ᾱ(t) (the "Glide cosine" schedule or an exponential one), computed in
/// float64 and stored as float32.
fn betas_for_alpha_bar(n: usize, kind: AlphaBar) -> Vec<f32> {
    let alpha_bar = |t: f64| match kind {
        AlphaBar::Cosine => ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2),
        AlphaBar::Exp => (t * -12.0).exp(),
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// Cumulative product stored as float32 but accumulated in float64, as PyTorch's CPU `cumprod`.
fn cumprod_f32(values: impl Iterator<Item = f32>) -> Vec<f32> {
    let mut acc = 1.0f64;
    values
        .map(|v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// Rescale betas to zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and
/// Sample Steps are Flawed", Algorithm 1), in float32.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas_cumprod = cumprod_f32(betas.iter().map(|b| 1.0 - b));
    let mut sqrt_ab: Vec<f32> = alphas_cumprod.iter().map(|a| a.sqrt()).collect();
    let first = sqrt_ab[0];
    let last = sqrt_ab[sqrt_ab.len() - 1];
    let scale = first / (first - last);
    for v in &mut sqrt_ab {
        *v = (*v - last) * scale;
    }
    let ab: Vec<f32> = sqrt_ab.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(ab.len());
    out.push(1.0 - ab[0]);
    for w in ab.windows(2) {
        out.push(1.0 - w[1] / w[0]);
    }
    out
}

/// `np.linspace(start, stop, num)` in float64, value for value.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    if num == 1 {
        return vec![start];
    }
    let delta = stop - start;
    let div = (num - 1) as f64;
    let step = delta / div;
    let mut y: Vec<f64> = if step == 0.0 {
        (0..num).map(|i| i as f64 / div * delta + start).collect()
    } else {
        (0..num).map(|i| i as f64 * step + start).collect()
    };
    y[num - 1] = stop;
    y
}

/// `np.arange(start, 0, -step)` in float64 for `start > 0`, `step > 0`: NumPy sizes the result as
/// `ceil(start / step)` and fills it from its first two values.
fn np_arange_down_to_zero(start: f64, step: f64) -> Vec<f64> {
    let len = ((0.0 - start) / -step).ceil().max(0.0) as usize;
    if len == 0 {
        return Vec::new();
    }
    let delta = (start + -step) - start;
    (0..len)
        .map(|i| {
            if i == 0 {
                start
            } else {
                start + i as f64 * delta
            }
        })
        .collect()
}

/// Round half to even, as `np.round`.
fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// Inference timesteps for the k-diffusion style schedulers (Euler, Euler a, Heun, LMS):
/// `num_inference_steps` values, float32, from high to low.
pub(crate) fn spaced_timesteps_f32(
    spacing: TimestepSpacing,
    num_train: u32,
    steps: usize,
    steps_offset: u32,
) -> Vec<f64> {
    let t = num_train as f64;
    match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, t - 1.0, steps)
            .into_iter()
            .rev()
            .map(|v| v as f32 as f64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = (num_train as usize / steps) as f64;
            (0..steps)
                .rev()
                .map(|i| (i as f64 * ratio) as f32 as f64 + steps_offset as f64)
                .collect()
        }
        TimestepSpacing::Trailing => np_arange_down_to_zero(t, t / steps as f64)
            .into_iter()
            .map(|v| np_round(v) as f32 as f64 - 1.0)
            .collect(),
    }
}

/// Integer inference timesteps of the multistep solvers (DPM-Solver, UniPC): `steps + 1` points
/// are laid out and the last (lowest) dropped. `last_timestep` is the training length, or less
/// when DPM-Solver clips low λ values.
pub(crate) fn spaced_timesteps_multistep(
    spacing: TimestepSpacing,
    num_train: u32,
    last_timestep: u32,
    steps: usize,
    steps_offset: u32,
) -> Vec<f64> {
    let last = last_timestep as f64;
    match spacing {
        TimestepSpacing::Linspace => {
            let mut v: Vec<f64> = np_linspace(0.0, last - 1.0, steps + 1)
                .into_iter()
                .map(np_round)
                .rev()
                .collect();
            v.pop();
            v
        }
        TimestepSpacing::Leading => {
            let ratio = (last_timestep as usize / (steps + 1)) as f64;
            (1..=steps)
                .rev()
                .map(|i| i as f64 * ratio + steps_offset as f64)
                .collect()
        }
        TimestepSpacing::Trailing => np_arange_down_to_zero(last, num_train as f64 / steps as f64)
            .into_iter()
            .map(|v| np_round(v) - 1.0)
            .collect(),
    }
}

/// Integer inference timesteps of DDIM.
pub(crate) fn spaced_timesteps_ddim(
    spacing: TimestepSpacing,
    num_train: u32,
    steps: usize,
    steps_offset: u32,
) -> Vec<f64> {
    let t = num_train as f64;
    match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, t - 1.0, steps)
            .into_iter()
            .map(np_round)
            .rev()
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = (num_train as usize / steps) as f64;
            (0..steps)
                .rev()
                .map(|i| i as f64 * ratio + steps_offset as f64)
                .collect()
        }
        TimestepSpacing::Trailing => np_arange_down_to_zero(t, t / steps as f64)
            .into_iter()
            .map(|v| np_round(v) - 1.0)
            .collect(),
    }
}

/// `np.interp(x, arange(len(table)), table)` in float64 (clamped at both ends).
pub(crate) fn np_interp(x: f64, table: &[f32]) -> f64 {
    let n = table.len();
    if x.is_nan() {
        return f64::NAN;
    }
    if x <= 0.0 {
        return table[0] as f64;
    }
    let last = (n - 1) as f64;
    if x >= last {
        return table[n - 1] as f64;
    }
    let j = x.floor() as usize;
    let xj = j as f64;
    if xj == x {
        return table[j] as f64;
    }
    let slope = (table[j + 1] as f64 - table[j] as f64) / ((j + 1) as f64 - xj);
    slope * (x - xj) + table[j] as f64
}

/// Sigmas of Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative
/// Models", eq. 5, ρ = 7) between `sigma_max` and `sigma_min`, in float64.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    const RHO: f64 = 7.0;
    let min_inv = sigma_min.powf(1.0 / RHO);
    let max_inv = sigma_max.powf(1.0 / RHO);
    np_linspace(0.0, 1.0, steps)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(RHO))
        .collect()
}

/// The fractional training timestep of `sigma` by linear interpolation in log-sigma, as
/// diffusers' `_sigma_to_t` (float32 log table, float64 arithmetic elsewhere).
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // Index of the last table entry not above log_sigma (the first maximum of the running count).
    let mut count = 0usize;
    let mut best = 0usize;
    let mut best_idx = 0usize;
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - ls as f64 >= 0.0 {
            count += 1;
        }
        if count > best {
            best = count;
            best_idx = i;
        }
    }
    let low_idx = best_idx.min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx];
    let high = log_sigmas[high_idx];
    let w = ((low as f64 - log_sigma) / (low - high) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// `(sigma² + 1)^½` in float32, the input scaling of the k-diffusion schedulers.
pub(crate) fn input_scale(sigma: f32) -> f32 {
    (sigma * sigma + 1.0).sqrt()
}

/// The timesteps and sigmas (with the final 0) of the k-diffusion style schedulers that
/// interpolate sigmas linearly at spaced timesteps, optionally replaced by Karras sigmas (as
/// diffusers' Heun and LMS schedulers do). Sigmas are rounded through `f32` like diffusers'
/// float32 tensors.
pub(crate) fn k_sigma_schedule(
    config: &SchedulerConfig,
    train: &TrainSchedule,
    num_train_timesteps: u32,
    steps: usize,
    spacing: TimestepSpacing,
) -> (Vec<f64>, Vec<f64>) {
    let mut timesteps = spaced_timesteps_f32(
        spacing,
        num_train_timesteps,
        steps,
        config.steps_offset.unwrap_or(0),
    );
    let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| train.interp_sigma(t)).collect();
    if config.use_karras_sigmas.unwrap_or(false) {
        sigmas = karras_sigmas(sigmas[sigmas.len() - 1], sigmas[0], steps);
        let log_sigmas = train.log_sigmas();
        timesteps = sigmas
            .iter()
            .map(|&s| sigma_to_t(s, &log_sigmas) as f32 as f64)
            .collect();
    }
    sigmas.push(0.0);
    let sigmas = sigmas.into_iter().map(|s| s as f32 as f64).collect();
    (timesteps, sigmas)
}

/// diffusers' `init_noise_sigma` of the sigma-based schedulers: the largest sigma for
/// `linspace`/`trailing` spacing, `(σ_max² + 1)^½` for `leading`.
pub(crate) fn k_init_noise_sigma(spacing: TimestepSpacing, sigmas: &[f64]) -> f64 {
    let max = sigmas
        .iter()
        .fold(f32::NEG_INFINITY, |m, &s| m.max(s as f32));
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max as f64,
        TimestepSpacing::Leading => input_scale(max) as f64,
    }
}

/// Divide `sample` in place by the k-diffusion input scale of `sigma`.
pub(crate) fn scale_by_sigma(sample: &mut [f32], sigma: f64) {
    let d = input_scale(sigma as f32);
    for v in sample {
        *v /= d;
    }
}

/// Reject a configuration flag that selects a feature this crate does not implement.
pub(crate) fn reject_flag(
    value: Option<bool>,
    key: &'static str,
    class: &str,
) -> Result<(), SchedulerError> {
    if value == Some(true) {
        return Err(SchedulerError::Unsupported {
            key,
            value: "true".into(),
            reason: format!("not implemented for {class}"),
        });
    }
    Ok(())
}

/// Reject a step count of zero or one the scheduler cannot lay out.
pub(crate) fn check_steps(steps: u32, num_train: u32) -> Result<usize, SchedulerError> {
    if steps == 0 || steps > num_train {
        return Err(SchedulerError::InvalidSteps {
            steps,
            reason: format!("must be between 1 and num_train_timesteps ({num_train})"),
        });
    }
    Ok(steps as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_numpy_endpoints() {
        let v = np_linspace(0.0, 999.0, 4);
        assert_eq!(v, [0.0, 333.0, 666.0, 999.0]);
        assert_eq!(np_linspace(0.0, 1.0, 1), [0.0]);
    }

    #[test]
    fn arange_length_follows_numpy() {
        assert_eq!(
            np_arange_down_to_zero(1000.0, 250.0),
            [1000.0, 750.0, 500.0, 250.0]
        );
        assert_eq!(np_arange_down_to_zero(1000.0, 1000.0 / 3.0).len(), 3);
    }

    #[test]
    fn interp_is_exact_on_integers_and_clamped() {
        let table = [1.0f32, 2.0, 4.0];
        assert_eq!(np_interp(1.0, &table), 2.0);
        assert_eq!(np_interp(1.5, &table), 3.0);
        assert_eq!(np_interp(-1.0, &table), 1.0);
        assert_eq!(np_interp(7.0, &table), 4.0);
    }
}
