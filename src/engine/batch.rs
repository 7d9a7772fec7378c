//! Dynamic batching: several runs on one model denoise together, one UNet call per step over
//! all of their rows.
//!
//! Runs share a batch when they have the same latent size, guidance on or off, prompt sequence
//! length and timestep schedule (from the scheduler, its settings and the step count, and the
//! same start for image-to-image); [`Engine::generate_batch`] groups the requests it is given
//! by that key and runs the groups one after another. Everything else stays per run: prompts,
//! seeds and noise streams, guidance scale and rescale, micro-conditioning and the scheduler's
//! state. Only the model evaluations are shared: the UNet's at each step, and the text
//! encoders' (the prompts of all the requests whose texts prompt weighting leaves as they are
//! go through each encoder in one run). Both treat batch rows independently, so a run's images
//! are the same whether it ran alone or batched (bit for bit on the CPU provider; on CUDA,
//! kernels picked for another batch size may round differently).
//!
//! A run that is cancelled or whose prediction goes non-finite leaves the batch at that step;
//! the others go on with a smaller batch. When a batched UNet call itself fails (running out
//! of device memory, say), each run of the batch carries on alone from that step.
//!
//! With [`CudaOptions::device_step`](super::cuda::CudaOptions) and the UNet bound to the device,
//! a batch whose runs all take the plain Euler update (and no guidance rescale) keeps its
//! latents there: one step graph run per step does every run's guidance and update
//! ([`super::device_step`]), as for a single run. A non-finite value is then found when the
//! latents come back (at the end, or when a run leaves), not at the step that made it.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use super::controlnet::ControlRun;
use super::device_step::DeviceStep;
use super::pipeline::{fill_block, update_block, Prepared, RunShape};
use super::refiner::AestheticScores;
use super::text::{self, Conditioning, PromptTexts};
use super::unet::UnetRunner;
use super::unet_inputs::{ConditioningRows, UnetConstants};
use super::{Engine, EngineError, GenerateOutput, GenerateRequest, Progress};

/// Progress of one run of a batch: the run's index in the request list and its progress.
/// Returning `ControlFlow::Break(())` cancels that run alone.
pub type BatchProgressFn<'a> = dyn FnMut(usize, Progress) -> ControlFlow<()> + 'a;

/// One prepared run of a batch.
struct Member<'r> {
    /// Index in the request list.
    index: usize,
    request: &'r GenerateRequest,
    run: Prepared,
}

/// What runs must share to denoise in one batch.
#[derive(PartialEq)]
struct GroupKey {
    shape: (usize, usize, usize, bool),
    seq: usize,
    start: usize,
    timesteps: Vec<u64>,
}

impl GroupKey {
    fn of(run: &Prepared) -> Self {
        let s = run.shape;
        GroupKey {
            shape: (s.channels, s.latent_h, s.latent_w, s.guidance),
            seq: run.conditioning.positive.seq,
            start: run.start,
            timesteps: run
                .scheduler
                .timesteps()
                .iter()
                .map(|t| t.to_bits())
                .collect(),
        }
    }
}

type Results = Vec<Option<Result<GenerateOutput, EngineError>>>;

/// Runs that left a batch early, by request index, with their results.
type Left = Vec<(usize, Result<GenerateOutput, EngineError>)>;

impl Engine {
    /// Run several requests, batching the UNet calls of those that can share them (see the
    /// module documentation). The results are in request order; one run's failure or
    /// cancellation does not affect the others.
    pub fn generate_batch(
        &self,
        requests: &[&GenerateRequest],
        progress: &mut BatchProgressFn<'_>,
    ) -> Vec<Result<GenerateOutput, EngineError>> {
        let mut results: Results = requests.iter().map(|_| None).collect();
        let mut groups: Vec<(GroupKey, Vec<Member<'_>>)> = Vec::new();
        // A UNet exported for a fixed batch size runs every request alone.
        let fixed_batch = self.model.unet.sample.fixed_dim(0).is_some();
        let mut encoded = self.encode_together(requests);
        for (index, request) in requests.iter().copied().enumerate() {
            let run = match self.prepare_with(request, encoded[index].take()) {
                Ok(run) => run,
                Err(err) => {
                    results[index] = Some(Err(err));
                    continue;
                }
            };
            let key = GroupKey::of(&run);
            let member = Member {
                index,
                request,
                run,
            };
            match groups.iter_mut().find(|(k, _)| !fixed_batch && *k == key) {
                Some((_, members)) => members.push(member),
                None => groups.push((key, vec![member])),
            }
        }
        for (_, members) in groups {
            self.run_group(members, progress, &mut results);
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(EngineError::Cancelled)))
            .collect()
    }

    /// The prompts of the requests that will run (valid, no init image, and either no prompt
    /// weighting or texts that weighting leaves as they are), encoded with one run of each
    /// text encoder for all of them, with the time that took. `None` for the other requests,
    /// and for all of them when fewer than two qualify, when the encoders take a fixed batch
    /// size, or when the shared runs fail (each request then encodes alone, so that an error
    /// belongs to its request).
    fn encode_together(
        &self,
        requests: &[&GenerateRequest],
    ) -> Vec<Option<(Conditioning, Duration)>> {
        let mut out: Vec<Option<(Conditioning, Duration)>> =
            requests.iter().map(|_| None).collect();
        let model = &self.model;
        let fixed = model.text_encoder_2.input_ids.fixed_dim(0).is_some()
            || model
                .text_encoder
                .as_ref()
                .is_some_and(|e| e.input_ids.fixed_dim(0).is_some());
        if fixed || requests.len() < 2 {
            return out;
        }
        let chosen: Vec<(usize, bool)> = requests
            .iter()
            .enumerate()
            .filter(|(_, r)| r.controls.img2img.is_none())
            .filter_map(|(i, r)| {
                let shape = self.validate(r).ok()?;
                self.scheduler_for(r).ok()?;
                self.encodes_plain(r, shape.guidance)
                    .then_some((i, shape.guidance))
            })
            .collect();
        if chosen.len() < 2 {
            return out;
        }
        let texts: Vec<(PromptTexts<'_>, bool)> = chosen
            .iter()
            .map(|&(i, guidance)| (PromptTexts::of(requests[i]), guidance))
            .collect();
        let started = Instant::now();
        let Ok(conditionings) = text::encode_prompts_many(model, &texts) else {
            return out;
        };
        let elapsed = started.elapsed();
        for ((i, _), conditioning) in chosen.into_iter().zip(conditionings) {
            out[i] = Some((conditioning, elapsed));
        }
        out
    }

    /// Denoise one group together, then decode each run.
    fn run_group(
        &self,
        mut active: Vec<Member<'_>>,
        progress: &mut BatchProgressFn<'_>,
        results: &mut Results,
    ) {
        let Some(first) = active.first() else {
            return;
        };
        let start = first.run.start;
        let timesteps = first.run.scheduler.timesteps().to_vec();
        let end = timesteps.len();
        let total = (end - start.min(end)) as u32;
        let size = active.len();
        let started = Instant::now();
        let mut i = start;
        while i < end && !active.is_empty() {
            match self.batch_steps(&mut active, &timesteps, &mut i, start, total, progress) {
                Ok(left) => {
                    for (index, result) in left {
                        results[index] = Some(result);
                    }
                    active.retain(|m| results[m.index].is_none());
                }
                Err(err) => {
                    // The shared call failed before any run's update at step `i`: every run
                    // carries on alone from there.
                    tracing::warn!(error = %err, runs = active.len(), step = i, "batched UNet call failed; running the batch's runs one by one");
                    for mut member in std::mem::take(&mut active) {
                        member.run.timings.denoising += started.elapsed();
                        let done = i - start;
                        member.run.start = i;
                        let index = member.index;
                        let mut solo = |p: Progress| {
                            progress(
                                index,
                                Progress {
                                    step: p.step + done as u32,
                                    total,
                                },
                            )
                        };
                        let outcome = self
                            .denoise_run(&mut member.run, member.request, end, None, &mut solo)
                            .and_then(|()| self.finish(member.request, member.run))
                            .map(|output| GenerateOutput {
                                batch_size: size,
                                ..output
                            });
                        results[index] = Some(outcome);
                    }
                    return;
                }
            }
        }
        let denoising = started.elapsed();
        for mut member in active {
            member.run.timings.denoising += denoising;
            let outcome = self
                .finish(member.request, member.run)
                .map(|output| GenerateOutput {
                    batch_size: size,
                    ..output
                });
            results[member.index] = Some(outcome);
        }
    }

    /// Steps the active runs together from `*i` until the set of runs changes or the schedule
    /// ends. Returns the runs that left the batch (cancelled or failed) with their results; an
    /// error means the shared UNet call (or its set-up) failed and no run was updated at `*i`.
    fn batch_steps(
        &self,
        active: &mut [Member<'_>],
        timesteps: &[f64],
        i: &mut usize,
        start: usize,
        total: u32,
        progress: &mut BatchProgressFn<'_>,
    ) -> Result<Left, EngineError> {
        let first = &active[0];
        let parts = active
            .iter()
            .map(|m| {
                let aesthetic = AestheticScores::default();
                ConditioningRows::new(
                    &self.model,
                    &m.run.conditioning,
                    m.request,
                    &m.run.shape,
                    aesthetic,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let constants = UnetConstants::stack(&self.model, &parts.iter().collect::<Vec<_>>())?;
        let combined = RunShape {
            images: active.iter().map(|m| m.run.shape.images).sum(),
            ..first.run.shape
        };
        let control = ControlRun::new(
            &self.model,
            None,
            &first.run.conditioning,
            first.request,
            &combined,
        )?;
        let per_image = combined.per_image();
        let rows = combined.unet_rows();
        let sample_shape = combined.dims(rows);
        let mut runner = UnetRunner::new(self, constants.conditioning(&control), sample_shape)?;
        if self.batch_steps_on_device(active, *i, timesteps.len()) {
            if let Some(device_id) = runner.device_id() {
                let mut batch = InPlace {
                    runs: active,
                    shape: combined,
                    timesteps,
                    start,
                    total,
                    from: *i,
                };
                return self.batch_steps_in_place(&mut batch, i, progress, &mut runner, device_id);
            }
        }
        let mut model_input = vec![0.0f32; rows * per_image];
        let mut guided = vec![0.0f32; combined.images * per_image];
        let mut left = Vec::new();
        let mut unused = Duration::ZERO;
        while *i < timesteps.len() {
            let step_started = Instant::now();
            let t = timesteps[*i];
            fill_members(active, *i, combined.guidance, &mut model_input);
            let residuals = control.step(*i, timesteps.len(), &model_input, t, &mut unused)?;
            let result = runner.step(&model_input, t, residuals)?;
            if result.out.len() != model_input.len() {
                return Err(EngineError::UnexpectedOutput {
                    stage: "UNet",
                    message: format!(
                        "{} values, expected {}",
                        result.out.len(),
                        model_input.len()
                    ),
                });
            }
            let elapsed = step_started.elapsed();
            let mut offset = 0;
            for m in active.iter_mut() {
                let len = m.run.shape.unet_rows() * per_image;
                let out = &result.out[offset..offset + len];
                offset += len;
                let latent_len = m.run.latents.len();
                let run = &mut m.run;
                let updated = update_block(
                    m.request,
                    &run.shape,
                    out,
                    &mut guided[..latent_len],
                    *i,
                    run.scheduler.as_mut(),
                    &mut run.latents,
                    &mut run.noise,
                );
                run.timings.per_step.push(elapsed);
                run.timings.per_step_session_run.push(result.session_time);
                run.timings.per_step_copies.push(result.copy_time);
                run.timings.denoising_session_run += result.session_time;
                if let Err(err) = updated {
                    left.push((m.index, Err(err)));
                    continue;
                }
                let step = (*i + 1 - start) as u32;
                if progress(m.index, Progress { step, total }).is_break() {
                    left.push((m.index, Err(EngineError::Cancelled)));
                }
            }
            *i += 1;
            if !left.is_empty() {
                break;
            }
        }
        Ok(left)
    }
}

/// Write each run's scaled model input for step `i` into its block of `model_input`.
fn fill_members(runs: &[Member<'_>], i: usize, guidance: bool, model_input: &mut [f32]) {
    let mut offset = 0;
    for m in runs {
        let len = m.run.shape.unet_rows() * m.run.shape.per_image();
        let block = &mut model_input[offset..offset + len];
        fill_block(m.run.scheduler.as_ref(), &m.run.latents, i, guidance, block);
        offset += len;
    }
}

/// A batch stepped on the device: its runs, the schedule, and the step it resumes at.
struct InPlace<'a, 'm> {
    runs: &'a mut [Member<'m>],
    /// The runs' shape with all of their images.
    shape: RunShape,
    timesteps: &'a [f64],
    /// The runs' first step (progress counts from there).
    start: usize,
    total: u32,
    /// The step this stretch of the batch starts at.
    from: usize,
}

impl Engine {
    /// Whether guidance and every run's scheduler update over `from..end` can run on the
    /// device.
    fn batch_steps_on_device(&self, active: &[Member<'_>], from: usize, end: usize) -> bool {
        self.options.cuda.device_step
            && active.iter().all(|m| {
                m.request.guidance_rescale <= 0.0
                    && (from..end).all(|i| m.run.scheduler.euler_epsilon(i).is_some())
            })
    }

    /// [`Self::batch_steps`] with the latents on the device: the step graph writes the next
    /// input into the UNet's bound sample buffer, and the latents come back into the runs when
    /// the batch ends or a run leaves it. On an error, the runs' latents are those before the
    /// failed step when they could be brought back (`*i` is that step), else those at
    /// `batch.from` (`*i` and the runs' timings go back there).
    fn batch_steps_in_place(
        &self,
        batch: &mut InPlace<'_, '_>,
        i: &mut usize,
        progress: &mut BatchProgressFn<'_>,
        runner: &mut UnetRunner<'_>,
        device_id: i32,
    ) -> Result<Left, EngineError> {
        let runs = &mut *batch.runs;
        let shape = batch.shape;
        let per_image = shape.per_image();
        let members: Vec<usize> = runs.iter().map(|m| m.run.shape.images).collect();
        let mut latents: Vec<f32> = runs
            .iter()
            .flat_map(|m| m.run.latents.iter().copied())
            .collect();
        let mut model_input = vec![0.0f32; shape.unet_rows() * per_image];
        fill_members(runs, *i, shape.guidance, &mut model_input);
        let latent_shape = shape.dims(shape.images);
        let (sample, prediction) = runner.bound_io()?;
        let mut stepper = DeviceStep::new(
            &self.step_graphs,
            &self.session_options(),
            device_id,
            sample,
            prediction,
            latent_shape,
            shape.guidance,
            Vec::new(),
            Some(members),
        )?;
        stepper.upload_latents(&latents)?;
        let first_copy = runner.upload_sample(&model_input)?;
        let saved: Vec<_> = runs.iter().map(|m| m.run.timings.clone()).collect();
        let mut left = Vec::new();
        let mut failure = None;
        while *i < batch.timesteps.len() {
            let step_started = Instant::now();
            let (session_time, mut copy_time) = match runner.step_in_place(batch.timesteps[*i]) {
                Ok(times) => times,
                Err(err) => {
                    failure = Some(err);
                    break;
                }
            };
            if *i == batch.from {
                copy_time += first_copy;
            }
            let coefficients: Vec<(f32, f32, f32)> = runs
                .iter()
                .map(|m| {
                    let (sigma, sigma_next) = m
                        .run
                        .scheduler
                        .euler_epsilon(*i)
                        .expect("checked for every step of the range");
                    (m.request.guidance_scale, sigma, sigma_next)
                })
                .collect();
            let step_time = match stepper.step_members(&coefficients) {
                Ok(time) => time,
                Err(err) => {
                    failure = Some(err);
                    break;
                }
            };
            let elapsed = step_started.elapsed();
            for m in runs.iter_mut() {
                let timings = &mut m.run.timings;
                timings.per_step.push(elapsed);
                timings.per_step_session_run.push(session_time + step_time);
                timings.per_step_copies.push(copy_time);
                timings.denoising_session_run += session_time + step_time;
                timings.device_steps += 1;
                let step = (*i + 1 - batch.start) as u32;
                let total = batch.total;
                if progress(m.index, Progress { step, total }).is_break() {
                    left.push((m.index, Err(EngineError::Cancelled)));
                }
            }
            *i += 1;
            if !left.is_empty() {
                break;
            }
        }
        if let Err(err) = stepper.download_latents(&mut latents) {
            // The runs keep their latents from `from`: they go on from there.
            for (m, timings) in runs.iter_mut().zip(saved) {
                m.run.timings = timings;
            }
            *i = batch.from;
            return Err(failure.unwrap_or(err));
        }
        let mut offset = 0;
        for m in runs.iter_mut() {
            let len = m.run.latents.len();
            m.run
                .latents
                .copy_from_slice(&latents[offset..offset + len]);
            offset += len;
        }
        if let Some(err) = failure {
            return Err(err);
        }
        for m in runs.iter() {
            let gone = left.iter().any(|(index, _)| *index == m.index);
            if !gone && m.run.latents.iter().any(|v| !v.is_finite()) {
                let err = EngineError::NonFinite {
                    stage: "UNet",
                    hint: String::new(),
                };
                left.push((m.index, Err(err)));
            }
        }
        Ok(left)
    }
}
