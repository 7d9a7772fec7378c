//! UniPC: Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
//! Diffusion Models" — the multistep UniP predictor with the UniC corrector applied to each new
//! model output, B(h) variant `bh2` (or `bh1`), data prediction by default. Mirrors diffusers'
//! `UniPCMultistepScheduler` (orders 1–3, `lower_order_final`, `disable_corrector`, Karras
//! sigmas, `final_sigmas_type`); scalar coefficients are computed in float32 as diffusers does.

use super::common::{self, TrainParams, TrainSchedule};
use super::config::{FinalSigmasType, SchedulerConfig};
use super::dpm_multistep::Point;
use super::{PredictionType, Scheduler, SchedulerError, TimestepSpacing};
use crate::engine::noise::BatchNoise;

const CLASS: &str = "UniPCMultistepScheduler";

/// diffusers' `UniPCMultistepScheduler` after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct UniPc {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    prediction: PredictionType,
    predict_x0: bool,
    bh2: bool,
    solver_order: usize,
    lower_order_final: bool,
    disable_corrector: Vec<u32>,
    /// Converted model outputs of the latest evaluations, oldest first.
    outputs: Vec<Vec<f32>>,
    last_sample: Option<Vec<f32>>,
    lower_order_nums: usize,
    this_order: usize,
}

impl UniPc {
    /// Configure for `steps` inference steps.
    pub fn new(config: &SchedulerConfig, steps: u32) -> Result<Self, SchedulerError> {
        common::reject_flag(config.thresholding, "thresholding", CLASS)?;
        common::reject_flag(
            config.use_exponential_sigmas,
            "use_exponential_sigmas",
            CLASS,
        )?;
        common::reject_flag(config.use_beta_sigmas, "use_beta_sigmas", CLASS)?;
        common::reject_flag(config.use_flow_sigmas, "use_flow_sigmas", CLASS)?;
        common::reject_flag(config.use_dynamic_shifting, "use_dynamic_shifting", CLASS)?;
        common::reject_flag(config.solver_p, "solver_p", CLASS)?;
        if let Some(v) = config.shift_terminal {
            return Err(SchedulerError::Unsupported {
                key: "shift_terminal",
                value: v.to_string(),
                reason: "only meaningful with flow sigmas, which are not supported".into(),
            });
        }
        let bh2 = match config.solver_type.as_deref().unwrap_or("bh2") {
            "bh2" | "midpoint" | "heun" | "logrho" => true,
            "bh1" => false,
            other => {
                return Err(SchedulerError::InvalidConfig {
                    key: "solver_type",
                    reason: format!("unknown value {other:?}; expected \"bh1\" or \"bh2\""),
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
        let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
        let mut timesteps = common::spaced_timesteps_multistep(
            spacing,
            num_train,
            num_train,
            n,
            config.steps_offset.unwrap_or(0),
        );
        let final_sigmas = config.final_sigmas_type.unwrap_or(FinalSigmasType::Zero);
        let mut sigmas: Vec<f64>;
        let sigma_last;
        if config.use_karras_sigmas.unwrap_or(false) {
            let table = &train.sigmas;
            let sigma_min = config.sigma_min.unwrap_or(table[0] as f64);
            let sigma_max = config.sigma_max.unwrap_or(table[table.len() - 1] as f64);
            sigmas = common::karras_sigmas(sigma_min, sigma_max, n);
            let log_sigmas = train.log_sigmas();
            timesteps = sigmas
                .iter()
                .map(|&s| common::sigma_to_t(s, &log_sigmas).round_ties_even())
                .collect();
            sigma_last = sigmas[sigmas.len() - 1];
        } else {
            sigmas = timesteps.iter().map(|&t| train.interp_sigma(t)).collect();
            sigma_last = train.sigmas[0] as f64;
        }
        sigmas.push(match final_sigmas {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => sigma_last,
        });
        let sigmas = sigmas.into_iter().map(|s| s as f32 as f64).collect();
        Ok(Self {
            timesteps,
            sigmas,
            prediction: config.prediction_type.unwrap_or(PredictionType::Epsilon),
            predict_x0: config.predict_x0.unwrap_or(true),
            bh2,
            solver_order,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            disable_corrector: config.disable_corrector.clone().unwrap_or_default(),
            outputs: Vec::new(),
            last_sample: None,
            lower_order_nums: 0,
            this_order: 0,
        })
    }

    fn point(&self, index: usize) -> Point {
        Point::new(self.sigmas[index] as f32)
    }

    /// The model output as the solver uses it: x0 (data prediction) or ε.
    fn convert(&self, model_output: &[f32], sample: &[f32], index: usize) -> Vec<f32> {
        let p = self.point(index);
        let pairs = sample.iter().zip(model_output);
        match (self.predict_x0, self.prediction) {
            (true, PredictionType::Epsilon) => {
                pairs.map(|(&x, &m)| (x - p.sigma * m) / p.alpha).collect()
            }
            (true, PredictionType::VPrediction) => {
                pairs.map(|(&x, &m)| p.alpha * x - p.sigma * m).collect()
            }
            (false, PredictionType::Epsilon) => model_output.to_vec(),
            (false, PredictionType::VPrediction) => {
                pairs.map(|(&x, &m)| p.alpha * m + p.sigma * x).collect()
            }
        }
    }

    /// Shared scalars of one UniP/UniC update from `s0` to `t`, with earlier points `earlier`
    /// (nearest first): the ratios r_k, and B(h), h·φ₁ and the right-hand side b.
    fn coefficients(&self, t: Point, s0: Point, earlier: &[Point], order: usize) -> Coeffs {
        let h = t.lambda - s0.lambda;
        let mut rks: Vec<f32> = earlier.iter().map(|p| (p.lambda - s0.lambda) / h).collect();
        rks.push(1.0);
        let hh = if self.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let b_h = if self.bh2 { hh.exp_m1() } else { hh };
        let mut factorial = 1.0f32;
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            b.push(h_phi_k * factorial / b_h);
            factorial *= (i + 1) as f32;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        let (lead, lead_s) = if self.predict_x0 {
            (t.sigma / s0.sigma, t.alpha)
        } else {
            (t.alpha / s0.alpha, t.sigma)
        };
        Coeffs {
            rks,
            b,
            b_h,
            h_phi_1,
            lead,
            lead_s,
        }
    }

    /// UniP: predict the sample at `index + 1` from `sample` at `index`.
    fn predict(&self, index: usize, sample: &mut [f32], order: usize) {
        let earlier: Vec<Point> = (1..order).map(|k| self.point(index - k)).collect();
        let c = self.coefficients(self.point(index + 1), self.point(index), &earlier, order);
        let n = self.outputs.len();
        let m0 = &self.outputs[n - 1];
        let rhos: Vec<f32> = match order {
            1 => Vec::new(),
            2 => vec![0.5],
            _ => solve(&c.matrix(order - 1), &c.b[..order - 1]),
        };
        let scale = c.lead_s * c.b_h;
        for (i, x) in sample.iter_mut().enumerate() {
            let base = c.lead * *x - c.lead_s * c.h_phi_1 * m0[i];
            let mut res = 0.0f32;
            for (k, rho) in rhos.iter().enumerate() {
                let mk = self.outputs[n - 2 - k][i];
                res += rho * ((mk - m0[i]) / c.rks[k]);
            }
            *x = if rhos.is_empty() {
                base
            } else {
                base - scale * res
            };
        }
    }

    /// UniC: correct the sample at `index` from the previous sample, given the new output.
    fn correct(&self, index: usize, new_output: &[f32], sample: &mut [f32], order: usize) {
        let Some(last) = &self.last_sample else {
            return;
        };
        let earlier: Vec<Point> = (1..order).map(|k| self.point(index - k - 1)).collect();
        let c = self.coefficients(self.point(index), self.point(index - 1), &earlier, order);
        let n = self.outputs.len();
        let m0 = &self.outputs[n - 1];
        let rhos: Vec<f32> = if order == 1 {
            vec![0.5]
        } else {
            solve(&c.matrix(order), &c.b)
        };
        let scale = c.lead_s * c.b_h;
        let rho_t = rhos[rhos.len() - 1];
        for (i, x) in sample.iter_mut().enumerate() {
            let base = c.lead * last[i] - c.lead_s * c.h_phi_1 * m0[i];
            let mut res = 0.0f32;
            for (k, rho) in rhos[..rhos.len() - 1].iter().enumerate() {
                let mk = self.outputs[n - 2 - k][i];
                res += rho * ((mk - m0[i]) / c.rks[k]);
            }
            let d1_t = new_output[i] - m0[i];
            *x = base - scale * (res + rho_t * d1_t);
        }
    }
}

struct Coeffs {
    rks: Vec<f32>,
    b: Vec<f32>,
    b_h: f32,
    h_phi_1: f32,
    /// σ_t/σ_s (data prediction) or α_t/α_s (noise prediction).
    lead: f32,
    /// α_t (data prediction) or σ_t (noise prediction).
    lead_s: f32,
}

impl Coeffs {
    /// The top-left `size × size` block of R, where `R[p][k] = r_k^p`.
    fn matrix(&self, size: usize) -> Vec<Vec<f64>> {
        (0..size)
            .map(|p| {
                (0..size)
                    .map(|k| (self.rks[k] as f64).powi(p as i32))
                    .collect()
            })
            .collect()
    }
}

/// Solve `a · x = b` by Gaussian elimination with partial pivoting (systems of at most 3).
fn solve(a: &[Vec<f64>], b: &[f32]) -> Vec<f32> {
    let n = b.len();
    let mut m: Vec<Vec<f64>> = a
        .iter()
        .zip(b)
        .map(|(row, &bi)| {
            let mut r = row.clone();
            r.push(bi as f64);
            r
        })
        .collect();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| m[i][col].abs().total_cmp(&m[j][col].abs()))
            .unwrap_or(col);
        m.swap(col, pivot);
        let (top, rest) = m.split_at_mut(col + 1);
        let pivot_row = &top[col];
        for row in rest.iter_mut() {
            let f = row[col] / pivot_row[col];
            for (v, p) in row.iter_mut().zip(pivot_row).skip(col) {
                *v -= f * p;
            }
        }
    }
    let mut x = vec![0.0f64; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| m[row][k] * x[k]).sum();
        x[row] = (m[row][n] - s) / m[row][row];
    }
    x.into_iter().map(|v| v as f32).collect()
}

impl Scheduler for UniPc {
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

    fn step(&mut self, model_output: &[f32], index: usize, sample: &mut [f32], _: &mut BatchNoise) {
        let converted = self.convert(model_output, sample, index);
        let use_corrector = index > 0
            && !self.disable_corrector.contains(&(index as u32 - 1))
            && self.last_sample.is_some();
        if use_corrector {
            self.correct(index, &converted, sample, self.this_order);
        }
        if self.outputs.len() == self.solver_order {
            self.outputs.remove(0);
        }
        self.outputs.push(converted);

        let len = self.timesteps.len();
        let order = if self.lower_order_final {
            self.solver_order.min(len - index)
        } else {
            self.solver_order
        };
        self.this_order = order.min(self.lower_order_nums + 1);
        self.last_sample = Some(sample.to_vec());
        self.predict(index, sample, self.this_order);
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::solve;

    #[test]
    fn solve_needs_pivoting_and_gets_it() {
        // The first pivot is zero: without row exchange this would divide by zero.
        let a = vec![
            vec![0.0, 1.0, 1.0],
            vec![1.0, 0.0, 1.0],
            vec![1.0, 1.0, 0.0],
        ];
        let x = solve(&a, &[5.0, 4.0, 3.0]);
        for (got, want) in x.iter().zip([1.0f32, 2.0, 3.0]) {
            assert!((got - want).abs() < 1e-6, "{x:?}");
        }
    }
}
