//! [`SchedulerConfig`]: the keys of a diffusers `scheduler_config.json` that change results.
//!
//! Every key is optional. A key absent from the file (and from the request's overrides) takes the
//! default of the scheduler class being built, exactly as diffusers' `Cls.from_config(config)`:
//! DDIM built from an Euler config clips samples, because `clip_sample` is not an Euler key and
//! DDIM's default is `true`. Unknown keys (`_class_name`, `skip_prk_steps`, ...) are ignored; a
//! JSON `null` counts as absent. Keys listed in `_use_default_values` (diffusers records there
//! which values were defaults of the class that wrote the file) are treated as absent too.

use serde_json::{Map, Value};

use super::{PredictionType, SchedulerError, SchedulerOverrides, TimestepSpacing};

/// How betas are laid over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredcosCapV2,
    /// Exponential ᾱ(t) (HeunDiscreteScheduler only).
    Exp,
}

/// How Euler interpolates sigmas between training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterpolationType {
    Linear,
    LogLinear,
}

/// The sigma after the last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalSigmasType {
    Zero,
    SigmaMin,
}

/// Whether Euler feeds the UNet discrete timesteps or `¼ ln σ` (EDM-style v-prediction models).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepType {
    Discrete,
    Continuous,
}

/// A scheduler configuration as read from a model, before class defaults are applied.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SchedulerConfig {
    pub num_train_timesteps: Option<u32>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<BetaSchedule>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Option<PredictionType>,
    pub timestep_spacing: Option<TimestepSpacing>,
    pub steps_offset: Option<u32>,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    pub use_dynamic_shifting: Option<bool>,
    pub interpolation_type: Option<InterpolationType>,
    pub timestep_type: Option<TimestepType>,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f64>,
    pub set_alpha_to_one: Option<bool>,
    pub thresholding: Option<bool>,
    pub rescale_betas_zero_snr: Option<bool>,
    pub final_sigmas_type: Option<FinalSigmasType>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    pub solver_order: Option<u32>,
    /// DPM-Solver's `algorithm_type`, kept as written (validated by the class that reads it).
    pub algorithm_type: Option<String>,
    /// `midpoint`/`heun` (DPM-Solver) or `bh1`/`bh2` (UniPC); each class maps the other's values.
    pub solver_type: Option<String>,
    pub lambda_min_clipped: Option<f64>,
    pub variance_type: Option<String>,
    pub predict_x0: Option<bool>,
    pub disable_corrector: Option<Vec<u32>>,
    /// Whether the file names a separate predictor scheduler (`solver_p`), which is not supported.
    pub solver_p: Option<bool>,
    pub shift_terminal: Option<f64>,
}

impl SchedulerConfig {
    /// Parse a `scheduler_config.json` object.
    pub fn from_json(value: &Value) -> Result<Self, SchedulerError> {
        let obj = value
            .as_object()
            .ok_or_else(|| SchedulerError::InvalidConfig {
                key: "scheduler_config",
                reason: "must be a JSON object".into(),
            })?;
        let defaults: Vec<&str> = obj
            .get("_use_default_values")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let r = Reader { obj, defaults };
        Ok(Self {
            num_train_timesteps: r.u32("num_train_timesteps")?,
            beta_start: r.f64("beta_start")?,
            beta_end: r.f64("beta_end")?,
            beta_schedule: r.choice(
                "beta_schedule",
                &[
                    ("linear", BetaSchedule::Linear),
                    ("scaled_linear", BetaSchedule::ScaledLinear),
                    ("squaredcos_cap_v2", BetaSchedule::SquaredcosCapV2),
                    ("exp", BetaSchedule::Exp),
                ],
            )?,
            trained_betas: r.f64_list("trained_betas")?,
            prediction_type: r.prediction_type()?,
            timestep_spacing: r.choice(
                "timestep_spacing",
                &[
                    ("leading", TimestepSpacing::Leading),
                    ("trailing", TimestepSpacing::Trailing),
                    ("linspace", TimestepSpacing::Linspace),
                ],
            )?,
            steps_offset: r.u32("steps_offset")?,
            use_karras_sigmas: r.bool("use_karras_sigmas")?,
            use_exponential_sigmas: r.bool("use_exponential_sigmas")?,
            use_beta_sigmas: r.bool("use_beta_sigmas")?,
            use_lu_lambdas: r.bool("use_lu_lambdas")?,
            use_flow_sigmas: r.bool("use_flow_sigmas")?,
            use_dynamic_shifting: r.bool("use_dynamic_shifting")?,
            interpolation_type: r.choice(
                "interpolation_type",
                &[
                    ("linear", InterpolationType::Linear),
                    ("log_linear", InterpolationType::LogLinear),
                ],
            )?,
            timestep_type: r.choice(
                "timestep_type",
                &[
                    ("discrete", TimestepType::Discrete),
                    ("continuous", TimestepType::Continuous),
                ],
            )?,
            sigma_min: r.f64("sigma_min")?,
            sigma_max: r.f64("sigma_max")?,
            clip_sample: r.bool("clip_sample")?,
            clip_sample_range: r.f64("clip_sample_range")?,
            set_alpha_to_one: r.bool("set_alpha_to_one")?,
            thresholding: r.bool("thresholding")?,
            rescale_betas_zero_snr: r.bool("rescale_betas_zero_snr")?,
            final_sigmas_type: r.choice(
                "final_sigmas_type",
                &[
                    ("zero", FinalSigmasType::Zero),
                    ("sigma_min", FinalSigmasType::SigmaMin),
                ],
            )?,
            lower_order_final: r.bool("lower_order_final")?,
            euler_at_final: r.bool("euler_at_final")?,
            solver_order: r.u32("solver_order")?,
            algorithm_type: r.string("algorithm_type")?,
            solver_type: r.string("solver_type")?,
            lambda_min_clipped: r.f64_or_inf("lambda_min_clipped")?,
            variance_type: r.string("variance_type")?,
            predict_x0: r.bool("predict_x0")?,
            disable_corrector: r.u32_list("disable_corrector")?,
            solver_p: r.get("solver_p").map(|_| true),
            shift_terminal: r.f64("shift_terminal")?,
        })
    }

    /// This configuration with the request's overrides applied.
    pub fn with_overrides(&self, overrides: &SchedulerOverrides) -> Self {
        let mut c = self.clone();
        if let Some(v) = overrides.timestep_spacing {
            c.timestep_spacing = Some(v);
        }
        if let Some(v) = overrides.steps_offset {
            c.steps_offset = Some(v);
        }
        if let Some(v) = overrides.prediction_type {
            c.prediction_type = Some(v);
        }
        if let Some(v) = overrides.use_karras_sigmas {
            c.use_karras_sigmas = Some(v);
        }
        c
    }
}

struct Reader<'a> {
    obj: &'a Map<String, Value>,
    defaults: Vec<&'a str>,
}

fn invalid(key: &'static str, reason: impl Into<String>) -> SchedulerError {
    SchedulerError::InvalidConfig {
        key,
        reason: reason.into(),
    }
}

impl<'a> Reader<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        if self.defaults.contains(&key) {
            return None;
        }
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn bool(&self, key: &'static str) -> Result<Option<bool>, SchedulerError> {
        self.get(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| invalid(key, "must be true or false"))
            })
            .transpose()
    }

    fn f64(&self, key: &'static str) -> Result<Option<f64>, SchedulerError> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| invalid(key, "must be a finite number"))
            })
            .transpose()
    }

    /// A number that may also be written as the string "-inf"/"inf" (Python's float infinities
    /// are not valid JSON, so some writers use strings or `-Infinity`).
    fn f64_or_inf(&self, key: &'static str) -> Result<Option<f64>, SchedulerError> {
        self.get(key)
            .map(|v| match v {
                Value::Number(n) => n.as_f64().ok_or_else(|| invalid(key, "must be a number")),
                Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                    "-inf" | "-infinity" => Ok(f64::NEG_INFINITY),
                    "inf" | "infinity" => Ok(f64::INFINITY),
                    _ => Err(invalid(key, "must be a number")),
                },
                _ => Err(invalid(key, "must be a number")),
            })
            .transpose()
    }

    fn u32(&self, key: &'static str) -> Result<Option<u32>, SchedulerError> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .and_then(|x| u32::try_from(x).ok())
                    .ok_or_else(|| invalid(key, "must be a non-negative integer"))
            })
            .transpose()
    }

    fn string(&self, key: &'static str) -> Result<Option<String>, SchedulerError> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| invalid(key, "must be a string"))
            })
            .transpose()
    }

    fn choice<T: Copy>(
        &self,
        key: &'static str,
        options: &[(&str, T)],
    ) -> Result<Option<T>, SchedulerError> {
        let Some(s) = self.string(key)? else {
            return Ok(None);
        };
        options
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, v)| Some(*v))
            .ok_or_else(|| {
                let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
                invalid(
                    key,
                    format!("unknown value {s:?}; expected one of {names:?}"),
                )
            })
    }

    fn prediction_type(&self) -> Result<Option<PredictionType>, SchedulerError> {
        let Some(s) = self.string("prediction_type")? else {
            return Ok(None);
        };
        match s.as_str() {
            "epsilon" => Ok(Some(PredictionType::Epsilon)),
            "v_prediction" => Ok(Some(PredictionType::VPrediction)),
            "sample" | "original_sample" | "flow_prediction" => Err(SchedulerError::Unsupported {
                key: "prediction_type",
                value: s,
                reason: "only epsilon and v_prediction models are supported".into(),
            }),
            _ => Err(invalid(
                "prediction_type",
                format!("unknown value {s:?}; expected \"epsilon\" or \"v_prediction\""),
            )),
        }
    }

    fn f64_list(&self, key: &'static str) -> Result<Option<Vec<f64>>, SchedulerError> {
        self.get(key)
            .map(|v| {
                v.as_array()
                    .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| invalid(key, "must be a list of numbers"))
            })
            .transpose()
    }

    fn u32_list(&self, key: &'static str) -> Result<Option<Vec<u32>>, SchedulerError> {
        self.get(key)
            .map(|v| {
                v.as_array()
                    .and_then(|a| {
                        a.iter()
                            .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
                            .collect::<Option<Vec<_>>>()
                    })
                    .ok_or_else(|| invalid(key, "must be a list of step indices"))
            })
            .transpose()
    }
}
