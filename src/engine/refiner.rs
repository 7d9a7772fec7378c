//! The SDXL refiner as a second stage of a run (the "quality boost"), handed over as diffusers
//! hands a `StableDiffusionXLPipeline` run (`denoising_end=f`, `output_type="latent"`) to a
//! refiner `StableDiffusionXLImg2ImgPipeline` (`image=latents`, `denoising_start=f`, the same
//! number of steps).
//!
//! 1. The base engine prepares the run as usual ([`Engine::prepare`]: text-to-image or
//!    image-to-image) and runs its schedule while the timestep is at least the cut-off
//!    `c = round(T − f·T)` (`T` the base scheduler's `num_train_timesteps`, rounded half to
//!    even as Python's `round`). Its latents are not decoded.
//! 2. The refiner builds the same kind of scheduler from *its own* `scheduler_config.json`
//!    (with the request's overrides) for the same number of steps, and runs its timesteps below
//!    its own cut-off (for Heun one more evaluation when their count is even, so that the
//!    refiner never starts between the two evaluations of a step). No noise is added at the
//!    hand-off: the base latents go in as they are.
//! 3. The refiner has its own conditioning: `text_encoder_2` only, on `prompt` and
//!    `negative_prompt` (see [`super::text`]), and time ids
//!    `[orig_h, orig_w, crop_top, crop_left, aesthetic_score]`, with the negative aesthetic
//!    score on the negative rows of the guidance batch.
//! 4. Stochastic schedulers keep drawing from each image's noise stream where the base left it.
//! 5. The refiner's VAE decodes.
//!
//! Progress counts the evaluations of both stages as one run; timings report the refiner's
//! text encoding and denoising apart from the base's.

use std::time::Instant;

use super::pipeline::DenoiseState;
use super::scheduler::{SchedulerConfig, SchedulerKind};
use super::{Engine, EngineError, GenerateOutput, GenerateRequest, Progress, ProgressFn};

/// diffusers' default `denoising_start` / `high_noise_frac` for the base → refiner hand-off.
pub const DEFAULT_HANDOFF: f64 = 0.8;
/// diffusers' default `aesthetic_score` of the refiner pipeline.
pub const DEFAULT_AESTHETIC_SCORE: f32 = 6.0;
/// diffusers' default `negative_aesthetic_score` of the refiner pipeline.
pub const DEFAULT_NEGATIVE_AESTHETIC_SCORE: f32 = 2.5;
/// diffusers' `num_train_timesteps` default, for a scheduler configuration without one.
const DEFAULT_TRAIN_TIMESTEPS: u32 = 1000;

/// The aesthetic scores a refiner's UNet is conditioned on (positive and negative rows).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AestheticScores {
    pub positive: f32,
    pub negative: f32,
}

impl Default for AestheticScores {
    fn default() -> Self {
        Self {
            positive: DEFAULT_AESTHETIC_SCORE,
            negative: DEFAULT_NEGATIVE_AESTHETIC_SCORE,
        }
    }
}

/// How a run is handed from the base to the refiner.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Refine {
    /// Share of the schedule the base runs, in (0, 1): diffusers' `denoising_end` of the base
    /// and `denoising_start` of the refiner.
    pub handoff: f64,
    pub aesthetic: AestheticScores,
}

impl Default for Refine {
    fn default() -> Self {
        Self {
            handoff: DEFAULT_HANDOFF,
            aesthetic: AestheticScores::default(),
        }
    }
}

impl Refine {
    /// Check the values without a model.
    pub fn validate(&self) -> Result<(), EngineError> {
        if !(self.handoff > 0.0 && self.handoff < 1.0) {
            return Err(EngineError::invalid(
                "refiner.handoff",
                format!("{} is not in (0, 1)", self.handoff),
            ));
        }
        for (field, value) in [
            ("refiner.aesthetic_score", self.aesthetic.positive),
            ("refiner.negative_aesthetic_score", self.aesthetic.negative),
        ] {
            if !value.is_finite() {
                return Err(EngineError::invalid(field, "must be a finite number"));
            }
        }
        Ok(())
    }
}

/// The timestep cut-off of a hand-off at `fraction` of a schedule trained on `train` steps:
/// `int(round(T − fraction·T))` as diffusers computes it (Python rounds half to even).
pub fn timestep_cutoff(train: u32, fraction: f64) -> f64 {
    let t = f64::from(train);
    (t - fraction * t).round_ties_even()
}

/// How many evaluations the base runs: those whose timestep is at least `cutoff`.
pub fn base_end(timesteps: &[f64], cutoff: f64) -> usize {
    timesteps.iter().filter(|&&t| t >= cutoff).count()
}

/// The first evaluation the refiner runs: it runs the timesteps below `cutoff`, plus one for a
/// second-order scheduler when their count is even.
pub fn refiner_start(timesteps: &[f64], cutoff: f64, second_order: bool) -> usize {
    let mut n = timesteps.iter().filter(|&&t| t < cutoff).count();
    if second_order && n % 2 == 0 {
        n += 1;
    }
    timesteps.len().saturating_sub(n)
}

fn train_timesteps(engine: &Engine) -> u32 {
    SchedulerConfig::from_json(&engine.model.scheduler_config)
        .ok()
        .and_then(|c| c.num_train_timesteps)
        .unwrap_or(DEFAULT_TRAIN_TIMESTEPS)
}

impl Engine {
    /// Run `request` on this engine (the base) up to the hand-off, then on `refiner` to the
    /// end, decoded by the refiner's VAE (see the module docs). `progress` sees the
    /// evaluations of both stages as one count.
    pub fn generate_refined(
        &self,
        refiner: &Engine,
        request: &GenerateRequest,
        refine: &Refine,
        progress: &mut ProgressFn<'_>,
    ) -> Result<GenerateOutput, EngineError> {
        refine.validate()?;
        let shape = self.validate(request)?;
        let refiner_shape = refiner.validate(request)?;
        if (
            refiner_shape.channels,
            refiner_shape.latent_h,
            refiner_shape.latent_w,
        ) != (shape.channels, shape.latent_h, shape.latent_w)
        {
            return Err(EngineError::ModelInvalid {
                path: refiner.model.root.clone(),
                message: format!(
                    "the refiner's latents are [{}, {}, {}] for this size but the base makes [{}, {}, {}]",
                    refiner_shape.channels,
                    refiner_shape.latent_h,
                    refiner_shape.latent_w,
                    shape.channels,
                    shape.latent_h,
                    shape.latent_w
                ),
            });
        }
        let mut refiner_scheduler = refiner.scheduler_for(request)?;
        let mut run = self.prepare(request)?;

        let end = base_end(
            run.scheduler.timesteps(),
            timestep_cutoff(train_timesteps(self), refine.handoff),
        );
        if end <= run.start {
            return Err(EngineError::invalid(
                "refiner.handoff",
                format!(
                    "at {} the base runs no step of {}; raise it or the steps",
                    refine.handoff, request.steps
                ),
            ));
        }
        let refiner_total = refiner_scheduler.timesteps().len();
        let start = refiner_start(
            refiner_scheduler.timesteps(),
            timestep_cutoff(train_timesteps(refiner), refine.handoff),
            request.scheduler == SchedulerKind::Heun,
        );
        if start >= refiner_total {
            return Err(EngineError::invalid(
                "refiner.handoff",
                format!(
                    "at {} the refiner runs no step of {}; lower it or raise the steps",
                    refine.handoff, request.steps
                ),
            ));
        }
        let base_steps = (end - run.start) as u32;
        let total = base_steps + (refiner_total - start) as u32;

        let mut base_progress = |p: Progress| {
            progress(Progress {
                step: p.step,
                total,
            })
        };
        self.denoise_run(&mut run, request, end, None, &mut base_progress)?;

        let started = Instant::now();
        let conditioning = refiner.encode_request_prompts(request, refiner_shape.guidance)?;
        run.timings.refiner_text_encoding = started.elapsed();
        run.timings.refiner_text_encoding_session_run = conditioning.session_time;

        let started = Instant::now();
        let base_session = run.timings.denoising_session_run;
        let mut refiner_progress = |p: Progress| {
            progress(Progress {
                step: base_steps + p.step,
                total,
            })
        };
        let mut state = DenoiseState {
            shape: refiner_shape,
            request,
            noise: &mut run.noise,
            timings: &mut run.timings,
            start,
            end: refiner_total,
            control: None,
            aesthetic: refine.aesthetic,
        };
        refiner.denoise(
            &mut state,
            refiner_scheduler.as_mut(),
            &conditioning,
            &mut run.latents,
            &mut refiner_progress,
        )?;
        run.timings.refiner_denoising = started.elapsed();
        run.timings.refiner_denoising_session_run =
            run.timings.denoising_session_run - base_session;
        run.timings.denoising_session_run = base_session;
        run.shape = refiner_shape;
        refiner.finish(request, run)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutoffs_round_as_python_does() {
        assert_eq!(timestep_cutoff(1000, 0.8), 200.0);
        assert_eq!(timestep_cutoff(1000, 0.7), 300.0);
        // Halves go to the even neighbour: 999.5 → 1000, 7.5 → 8, 8.5 → 8.
        assert_eq!(timestep_cutoff(1000, 0.0005), 1000.0);
        assert_eq!(timestep_cutoff(10, 0.25), 8.0);
        assert_eq!(timestep_cutoff(10, 0.15), 8.0);
    }

    #[test]
    fn stages_split_the_schedule() {
        // Euler, 10 leading steps with offset 1.
        let ts: Vec<f64> = (0..10).rev().map(|i| f64::from(i * 100 + 1)).collect();
        let c = timestep_cutoff(1000, 0.8);
        assert_eq!(base_end(&ts, c), 8);
        assert_eq!(refiner_start(&ts, c, false), 8);
        // Heun lists every timestep but the first twice: 901 801 801 ... 1 1.
        let mut heun = vec![901.0];
        for t in (0..9).rev().map(|i| f64::from(i * 100 + 1)) {
            heun.extend([t, t]);
        }
        let c = timestep_cutoff(1000, 0.5);
        // Below 500: 401..1, 10 evaluations; even, so one more.
        assert_eq!(refiner_start(&heun, c, true), heun.len() - 11);
        assert_eq!(base_end(&heun, c), heun.len() - 10);
    }

    #[test]
    fn handoff_must_leave_both_stages_a_share() {
        for bad in [0.0, 1.0, -0.5, f64::NAN] {
            let refine = Refine {
                handoff: bad,
                ..Refine::default()
            };
            let err = refine.validate().unwrap_err();
            assert_eq!(err.code(), "invalid_request");
            assert!(err.to_string().contains("refiner.handoff"), "{err}");
        }
        let scores = Refine {
            aesthetic: AestheticScores {
                positive: f32::INFINITY,
                negative: 2.5,
            },
            ..Refine::default()
        };
        assert!(scores.validate().is_err());
        assert!(Refine::default().validate().is_ok());
    }
}
