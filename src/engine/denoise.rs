//! The denoising loop of a run, over a range of its schedule: per step the ControlNets (if
//! any), one UNet evaluation on the batch `[negative; positive]`, classifier-free guidance and
//! the scheduler's update. Guidance and the update run on the host, or, for the Euler update
//! with [`CudaOptions::device_step`](super::cuda::CudaOptions) on and the UNet bound to the
//! device, on the device ([`super::device_step`]), the latents staying there for the loop.

use std::time::Instant;

use super::controlnet::{ControlRun, DeviceControl, GraphUse};
use super::device_step::DeviceStep;
use super::pipeline::{fill_block, update_block, DenoiseState};
use super::scheduler::Scheduler;
use super::text::Conditioning;
use super::unet::UnetRunner;
use super::unet_inputs::UnetConstants;
use super::{Engine, EngineError, Progress, ProgressFn};

const UNET: &str = "UNet";

impl Engine {
    /// The denoising loop, from evaluation `state.start` to `state.end` (exclusive).
    pub(super) fn denoise(
        &self,
        state: &mut DenoiseState<'_>,
        scheduler: &mut dyn Scheduler,
        conditioning: &Conditioning,
        latents: &mut [f32],
        progress: &mut ProgressFn<'_>,
    ) -> Result<(), EngineError> {
        let shape = state.shape;
        let rows = shape.unet_rows();
        let constants = UnetConstants::new(
            &self.model,
            conditioning,
            state.request,
            &shape,
            state.aesthetic,
        )?;
        let control = ControlRun::new(
            &self.model,
            state.control,
            conditioning,
            state.request,
            &shape,
        )?;
        let timesteps = scheduler.timesteps().to_vec();
        let start = state.start;
        let end = state.end.min(timesteps.len());
        let total = (end - start.min(end)) as u32;
        let per_batch = shape.images * shape.per_image();
        let sample_shape = shape.dims(rows);
        let mut model_input = vec![0.0f32; rows * shape.per_image()];
        let mut guided = vec![0.0f32; per_batch];
        let mut runner = UnetRunner::new(self, constants.conditioning(&control), sample_shape)?;
        // With the UNet's inputs on the device, the ControlNets run there too.
        let cuda = self.options.cuda;
        let graphs = (cuda.graph && cuda.controlnet_graph).then_some(GraphUse {
            graphs: &self.control_graphs,
            per_net: cuda.graph_shapes,
        });
        let mut on_device = match runner.device_id() {
            Some(id) if control.has_units() => Some(control.bind_device(
                id,
                &self.mixers,
                &self.zero_graphs,
                graphs,
                self.session_options(),
            )?),
            _ => None,
        };
        if self.steps_on_device(state, scheduler, start, end) {
            if let Some(device_id) = runner.device_id() {
                return self.denoise_in_place(
                    state,
                    scheduler,
                    latents,
                    progress,
                    &mut runner,
                    on_device.as_mut(),
                    device_id,
                    (start, end),
                );
            }
        }
        for (i, &t) in timesteps.iter().enumerate().take(end).skip(start) {
            let step_started = Instant::now();
            fill_block(scheduler, latents, i, shape.guidance, &mut model_input);
            let spent = &mut state.timings.controlnet;
            let residuals = match on_device.as_mut() {
                Some(device) => {
                    let buffers = runner.residual_buffers();
                    device.step(i, timesteps.len(), Some(&model_input), t, buffers, spent)?;
                    Vec::new()
                }
                None => control.step(i, timesteps.len(), &model_input, t, spent)?,
            };
            let result = runner.step(&model_input, t, residuals)?;
            let out = result.out;
            if out.len() != rows * shape.per_image() {
                return Err(EngineError::UnexpectedOutput {
                    stage: UNET,
                    message: format!(
                        "{} values, expected {}",
                        out.len(),
                        rows * shape.per_image()
                    ),
                });
            }
            update_block(
                state.request,
                &shape,
                &out,
                &mut guided,
                i,
                scheduler,
                latents,
                state.noise,
            )?;
            state.timings.per_step.push(step_started.elapsed());
            state.timings.per_step_session_run.push(result.session_time);
            state.timings.per_step_copies.push(result.copy_time);
            state.timings.denoising_session_run += result.session_time;
            if progress(Progress {
                step: (i - start) as u32 + 1,
                total,
            })
            .is_break()
            {
                return Err(EngineError::Cancelled);
            }
        }
        Ok(())
    }

    /// Whether guidance and the scheduler's updates over `start..end` can run on the device.
    fn steps_on_device(
        &self,
        state: &DenoiseState<'_>,
        scheduler: &dyn Scheduler,
        start: usize,
        end: usize,
    ) -> bool {
        self.options.cuda.device_step
            && state.request.guidance_rescale <= 0.0
            && (start..end).all(|i| scheduler.euler_epsilon(i).is_some())
    }

    /// The loop with the latents on the device: the step graph writes each next model input
    /// into the UNet's bound sample buffer and the ControlNets' (`control`); the latents come
    /// back after the last step.
    #[allow(clippy::too_many_arguments)]
    fn denoise_in_place(
        &self,
        state: &mut DenoiseState<'_>,
        scheduler: &mut dyn Scheduler,
        latents: &mut [f32],
        progress: &mut ProgressFn<'_>,
        runner: &mut UnetRunner<'_>,
        mut control: Option<&mut DeviceControl<'_, '_>>,
        device_id: i32,
        (start, end): (usize, usize),
    ) -> Result<(), EngineError> {
        let shape = state.shape;
        let rows = shape.unet_rows();
        let timesteps = scheduler.timesteps().to_vec();
        let total = (end - start.min(end)) as u32;
        let latent_shape = shape.dims(shape.images);
        let (sample, prediction) = runner.bound_io()?;
        let controls = control
            .as_ref()
            .map(|c| c.control_inputs())
            .unwrap_or_default();
        let mut stepper = DeviceStep::new(
            &self.step_graphs,
            &self.session_options(),
            device_id,
            sample,
            prediction,
            latent_shape,
            shape.guidance,
            controls,
            None,
        )?;
        if let Some(control) = control.as_mut() {
            for k in 0..control.control_inputs().len() {
                stepper.bind_control(k, control.sample_buffer(k))?;
            }
        }
        stepper.upload_latents(latents)?;
        let mut model_input = vec![0.0f32; rows * shape.per_image()];
        fill_block(scheduler, latents, start, shape.guidance, &mut model_input);
        let first_copy = runner.upload_sample(&model_input)?;
        let guidance_scale = state.request.guidance_scale;
        for (i, &t) in timesteps.iter().enumerate().take(end).skip(start) {
            let step_started = Instant::now();
            if let Some(control) = control.as_mut() {
                // The first step's input comes from the host; later ones from the step graph.
                let input = (i == start).then_some(model_input.as_slice());
                let spent = &mut state.timings.controlnet;
                let buffers = runner.residual_buffers();
                control.step(i, timesteps.len(), input, t, buffers, spent)?;
            }
            let (session_time, mut copy_time) = runner.step_in_place(t)?;
            if i == start {
                copy_time += first_copy;
            }
            let (sigma, sigma_next) = scheduler
                .euler_epsilon(i)
                .expect("checked for every step of the range");
            let step_time = stepper.step(guidance_scale, sigma, sigma_next)?;
            state.timings.per_step.push(step_started.elapsed());
            state
                .timings
                .per_step_session_run
                .push(session_time + step_time);
            state.timings.per_step_copies.push(copy_time);
            state.timings.denoising_session_run += session_time + step_time;
            state.timings.device_steps += 1;
            if progress(Progress {
                step: (i - start) as u32 + 1,
                total,
            })
            .is_break()
            {
                return Err(EngineError::Cancelled);
            }
        }
        stepper.download_latents(latents)?;
        if latents.iter().any(|v| !v.is_finite()) {
            return Err(EngineError::NonFinite {
                stage: UNET,
                hint: String::new(),
            });
        }
        Ok(())
    }
}
