//! Diffusion schedulers, one file each behind the [`Scheduler`] trait.
//!
//! Every scheduler is built from a [`SchedulerConfig`]: the model's
//! `scheduler/scheduler_config.json` (whatever class wrote it), overlaid with per-request
//! [`SchedulerOverrides`]; a key absent from both takes the diffusers default *of the scheduler
//! being built* (see each file). Timesteps and sigmas are computed in `f64`.
//!
//! The denoising loop calls, for each `i in 0..timesteps().len()`: `scale_model_input(sample, i)`,
//! then the UNet at `timesteps()[i]`, then `step(model_output, i, sample, noise)`. Multi-stage
//! solvers (Heun) list a timestep per model evaluation, as diffusers does.

use crate::engine::noise::BatchNoise;

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
    fn step(&mut self, model_output: &[f32], index: usize, sample: &mut [f32], noise: &mut BatchNoise);
}
