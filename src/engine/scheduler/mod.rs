//! Diffusion schedulers, one file each behind the [`Scheduler`] trait, numerically equal to
//! diffusers 0.42.
//!
//! Every scheduler is built by [`build`] from a [`SchedulerConfig`]: the model's
//! `scheduler/scheduler_config.json` (whatever class wrote it), overlaid with per-request
//! [`SchedulerOverrides`]; a key absent from both takes the diffusers default *of the scheduler
//! being built* (see each file). Timesteps and sigmas follow diffusers' own float32/float64
//! arithmetic (see `common`) and are returned as `f64`; sigmas are float32 values, as diffusers
//! keeps them. Configurations diffusers accepts but this crate does not implement (thresholding,
//! exponential/beta/flow sigmas, `sample` prediction, ...) are refused with
//! [`SchedulerError::Unsupported`].
//!
//! The denoising loop calls, for each `i in 0..timesteps().len()` in order:
//! `scale_model_input(sample, i)`, then the UNet at `timesteps()[i]`, then
//! `step(model_output, i, sample, noise)`. Multi-stage solvers (Heun) list a timestep per model
//! evaluation, as diffusers does. Stochastic schedulers (Euler a, the SDE DPM-Solver) draw one
//! standard normal value per latent element from `noise` at each step, at the point where
//! diffusers calls `randn_tensor`.

mod common;

pub(crate) use common::input_scale;
mod config;
mod ddim;
mod dpm_multistep;
mod euler;
mod euler_ancestral;
mod heun;
mod lms;
mod unipc;

pub use config::{BetaSchedule, FinalSigmasType, InterpolationType, SchedulerConfig, TimestepType};

use crate::engine::noise::BatchNoise;

/// Why a scheduler could not be configured.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SchedulerError {
    /// A configuration value is malformed or out of range.
    #[error("invalid scheduler configuration `{key}`: {reason}")]
    InvalidConfig { key: &'static str, reason: String },
    /// A configuration value is valid for diffusers but not implemented here.
    #[error("unsupported scheduler configuration `{key}` = {value}: {reason}")]
    Unsupported {
        key: &'static str,
        value: String,
        reason: String,
    },
    /// The number of inference steps cannot be laid out with this configuration.
    #[error("invalid number of inference steps {steps}: {reason}")]
    InvalidSteps { steps: u32, reason: String },
}

impl SchedulerError {
    /// A stable, machine-readable error code.
    pub fn code(&self) -> &'static str {
        match self {
            SchedulerError::InvalidConfig { .. } => "invalid_scheduler_config",
            SchedulerError::Unsupported { .. } => "unsupported_scheduler_config",
            SchedulerError::InvalidSteps { .. } => "invalid_steps",
        }
    }
}

/// Build scheduler `kind` from a model's configuration (overrides already applied) for a run of
/// `steps` inference steps, as diffusers' `Cls.from_config(config, **kind_kwargs)` followed by
/// `set_timesteps(steps)`.
///
/// The kinds map to diffusers as follows: `euler` EulerDiscreteScheduler, `euler_a`
/// EulerAncestralDiscreteScheduler, `ddim` DDIMScheduler, `dpmpp_2m` DPMSolverMultistepScheduler,
/// `dpmpp_2m_karras` the same with `use_karras_sigmas=True`, `dpmpp_2m_sde` with
/// `algorithm_type="sde-dpmsolver++"`, `dpmpp_2m_sde_karras` with both, `unipc`
/// UniPCMultistepScheduler, `heun` HeunDiscreteScheduler, `lms` LMSDiscreteScheduler.
pub fn build(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    steps: u32,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    let mut config = config.clone();
    match kind {
        SchedulerKind::Dpmpp2mKarras => config.use_karras_sigmas = Some(true),
        SchedulerKind::Dpmpp2mSde => config.algorithm_type = Some("sde-dpmsolver++".into()),
        SchedulerKind::Dpmpp2mSdeKarras => {
            config.algorithm_type = Some("sde-dpmsolver++".into());
            config.use_karras_sigmas = Some(true);
        }
        _ => {}
    }
    Ok(match kind {
        SchedulerKind::Euler => Box::new(euler::Euler::new(&config, steps)?),
        SchedulerKind::EulerA => Box::new(euler_ancestral::EulerAncestral::new(&config, steps)?),
        SchedulerKind::Ddim => Box::new(ddim::Ddim::new(&config, steps)?),
        SchedulerKind::Dpmpp2m
        | SchedulerKind::Dpmpp2mKarras
        | SchedulerKind::Dpmpp2mSde
        | SchedulerKind::Dpmpp2mSdeKarras => {
            Box::new(dpm_multistep::DpmSolverMultistep::new(&config, steps)?)
        }
        SchedulerKind::Unipc => Box::new(unipc::UniPc::new(&config, steps)?),
        SchedulerKind::Heun => Box::new(heun::Heun::new(&config, steps)?),
        SchedulerKind::Lms => Box::new(lms::Lms::new(&config, steps)?),
    })
}

/// A denoising scheduler configured for one run of `num_inference_steps`.
pub trait Scheduler: Send {
    /// The timestep passed to the UNet at each model evaluation, in order.
    fn timesteps(&self) -> &[f64];
    /// The sigmas (or, for DDIM-style schedulers, an empty slice).
    fn sigmas(&self) -> &[f64];
    /// Factor applied to standard normal noise to build the initial latents.
    fn init_noise_sigma(&self) -> f64;
    /// Scale the model input in place for evaluation `index`.
    fn scale_model_input(&self, sample: &mut [f32], index: usize);
    /// Advance `sample` in place given the model output at evaluation `index`. `noise` supplies
    /// per-image noise for stochastic schedulers (one stream per image, image-major layout).
    ///
    /// Multistep schedulers keep the previous outputs, so `step` must be called once for every
    /// index from the first one run upwards (0, or for image-to-image the start index, as
    /// diffusers' `set_begin_index`), with `model_output` as long as `sample`.
    fn step(
        &mut self,
        model_output: &[f32],
        index: usize,
        sample: &mut [f32],
        noise: &mut BatchNoise,
    );
    /// `(σ, σ_next)` in float32 when the update at `index` is the plain Euler update of an
    /// epsilon prediction (stateless, no noise), which the engine can also run on the device
    /// ([`crate::engine::device_step`]); `None` for every other scheduler.
    fn euler_epsilon(&self, index: usize) -> Option<(f32, f32)> {
        let _ = index;
        None
    }
}

/// The schedulers this engine offers, by the project's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerKind {
    Euler,
    EulerA,
    Ddim,
    Dpmpp2m,
    Dpmpp2mKarras,
    Dpmpp2mSde,
    Dpmpp2mSdeKarras,
    Unipc,
    Heun,
    Lms,
}

impl SchedulerKind {
    /// Every scheduler, in a stable order.
    pub const ALL: [SchedulerKind; 10] = [
        SchedulerKind::Euler,
        SchedulerKind::EulerA,
        SchedulerKind::Ddim,
        SchedulerKind::Dpmpp2m,
        SchedulerKind::Dpmpp2mKarras,
        SchedulerKind::Dpmpp2mSde,
        SchedulerKind::Dpmpp2mSdeKarras,
        SchedulerKind::Unipc,
        SchedulerKind::Heun,
        SchedulerKind::Lms,
    ];

    /// The id used in job messages and on the command line.
    pub fn id(self) -> &'static str {
        match self {
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerA => "euler_a",
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Dpmpp2m => "dpmpp_2m",
            SchedulerKind::Dpmpp2mKarras => "dpmpp_2m_karras",
            SchedulerKind::Dpmpp2mSde => "dpmpp_2m_sde",
            SchedulerKind::Dpmpp2mSdeKarras => "dpmpp_2m_sde_karras",
            SchedulerKind::Unipc => "unipc",
            SchedulerKind::Heun => "heun",
            SchedulerKind::Lms => "lms",
        }
    }

    /// The diffusers class that computes the same thing.
    pub fn diffusers_class(self) -> &'static str {
        match self {
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerA => "EulerAncestralDiscreteScheduler",
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Dpmpp2m
            | SchedulerKind::Dpmpp2mKarras
            | SchedulerKind::Dpmpp2mSde
            | SchedulerKind::Dpmpp2mSdeKarras => "DPMSolverMultistepScheduler",
            SchedulerKind::Unipc => "UniPCMultistepScheduler",
            SchedulerKind::Heun => "HeunDiscreteScheduler",
            SchedulerKind::Lms => "LMSDiscreteScheduler",
        }
    }

    /// The name AUTOMATIC1111's web UI gives it (also written into PNG parameters).
    pub fn a1111_name(self) -> &'static str {
        match self {
            SchedulerKind::Euler => "Euler",
            SchedulerKind::EulerA => "Euler a",
            SchedulerKind::Ddim => "DDIM",
            SchedulerKind::Dpmpp2m => "DPM++ 2M",
            SchedulerKind::Dpmpp2mKarras => "DPM++ 2M Karras",
            SchedulerKind::Dpmpp2mSde => "DPM++ 2M SDE",
            SchedulerKind::Dpmpp2mSdeKarras => "DPM++ 2M SDE Karras",
            SchedulerKind::Unipc => "UniPC",
            SchedulerKind::Heun => "Heun",
            SchedulerKind::Lms => "LMS",
        }
    }

    /// Parse a project id (`euler_a`) or an A1111 name (`Euler a`), case-insensitively.
    pub fn parse(name: &str) -> Option<SchedulerKind> {
        let n = name.trim();
        Self::ALL
            .into_iter()
            .find(|k| k.id().eq_ignore_ascii_case(n) || k.a1111_name().eq_ignore_ascii_case(n))
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.id())
    }
}

/// How inference timesteps are spread over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

/// What the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    Epsilon,
    VPrediction,
}

/// Per-request changes to the model's scheduler configuration; `None` keeps the model's value.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerOverrides {
    pub timestep_spacing: Option<TimestepSpacing>,
    pub steps_offset: Option<u32>,
    pub prediction_type: Option<PredictionType>,
    pub use_karras_sigmas: Option<bool>,
}
