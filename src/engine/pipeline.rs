//! The text-to-image run: request validation against the loaded model, prompt encoding, the
//! per-step pieces of the denoising loop shared with batches (the UNet batch `[negative;
//! positive]`, as diffusers orders it, and guidance with the scheduler's update on the host)
//! and VAE decoding.
//!
//! Every kind of run goes through the same three parts: [`Engine::prepare`] (validation, the
//! scheduler, the prompts, the noise streams and the starting latents, from noise or from an
//! init image), `Engine::denoise` over a range of the schedule (`denoise.rs`), and
//! [`Engine::finish`] (VAE decoding). The refined run ([`super::refiner`]) runs the loop twice,
//! on two engines.

use std::path::Path;
use std::time::{Duration, Instant};

use super::controlnet::ControlRequest;
use super::img2img;
use super::model::SdxlModel;
use super::noise::{image_seed, BatchNoise};
use super::refiner::AestheticScores;
use super::runtime::SessionOptions;
use super::scheduler::{self, Scheduler, SchedulerConfig};
use super::text::{self, Conditioning, PromptTexts};
use super::{
    guidance, vae, Engine, EngineError, EngineOptions, GenerateOutput, GenerateRequest,
    GeneratedImage, ProgressFn, StageTimings,
};

const UNET: &str = "UNet";

/// Upper bound on inference steps (diffusers' schedulers train on 1000 timesteps).
pub const MAX_STEPS: u32 = 1000;

/// The sizes of one run, derived from the request and the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunShape {
    pub images: usize,
    pub channels: usize,
    pub latent_h: usize,
    pub latent_w: usize,
    /// Whether classifier-free guidance doubles the UNet batch.
    pub guidance: bool,
}

impl RunShape {
    /// Values per image latent.
    pub fn per_image(&self) -> usize {
        self.channels * self.latent_h * self.latent_w
    }

    /// The shape `[rows, channels, height, width]` of a latent batch of `rows` rows.
    pub fn dims(&self, rows: usize) -> [i64; 4] {
        [
            rows as i64,
            self.channels as i64,
            self.latent_h as i64,
            self.latent_w as i64,
        ]
    }

    /// Rows of the UNet batch.
    pub fn unet_rows(&self) -> usize {
        if self.guidance {
            2 * self.images
        } else {
            self.images
        }
    }
}

impl Engine {
    /// Load the SDXL pipeline under `model_dir` with sessions on `options.device`.
    pub fn load(model_dir: impl AsRef<Path>, options: &EngineOptions) -> Result<Self, EngineError> {
        let session_options = session_options(options);
        let model = SdxlModel::load(model_dir.as_ref(), &session_options)?;
        // Fail at load, not at the first request, if the scheduler configuration is unusable.
        SchedulerConfig::from_json(&model.scheduler_config).map_err(|source| {
            EngineError::Scheduler {
                scheduler: "model default".to_owned(),
                source,
            }
        })?;
        Ok(Self {
            model,
            options: options.clone(),
            vae_encoder: Default::default(),
            graph_unets: Default::default(),
            control_graphs: Default::default(),
            mixers: Default::default(),
            step_graphs: Default::default(),
            zero_graphs: Default::default(),
        })
    }

    /// The ONNX Runtime settings of this engine's sessions.
    pub(super) fn session_options(&self) -> SessionOptions {
        session_options(&self.options)
    }

    /// The loaded model.
    pub fn model(&self) -> &SdxlModel {
        &self.model
    }

    /// The options the engine was loaded with.
    pub fn options(&self) -> &EngineOptions {
        &self.options
    }

    /// Check a request against this model without running it.
    pub fn validate(&self, request: &GenerateRequest) -> Result<RunShape, EngineError> {
        let config = &self.model.config;
        let multiple = config.size_multiple;
        for (field, value) in [("width", request.width), ("height", request.height)] {
            if value == 0 || value % multiple != 0 {
                return Err(EngineError::invalid(
                    field,
                    format!("{value} is not a positive multiple of {multiple}, which this model requires"),
                ));
            }
        }
        let unet = &self.model.unet;
        let latent_h = self.model.latent_side(request.height);
        let latent_w = self.model.latent_side(request.width);
        for (field, axis, side) in [("height", 2, latent_h), ("width", 3, latent_w)] {
            if let Some(fixed) = unet.sample.fixed_dim(axis) {
                if fixed != side {
                    let pixels = fixed as u32 * self.model.vae_decoder.config.scale_factor;
                    return Err(EngineError::invalid(
                        field,
                        format!("this model is exported for {pixels} only"),
                    ));
                }
            }
        }
        if request.steps == 0 || request.steps > MAX_STEPS {
            return Err(EngineError::invalid(
                "steps",
                format!("{} is not in 1..={MAX_STEPS}", request.steps),
            ));
        }
        if request.num_images == 0 {
            return Err(EngineError::invalid("num_images", "must be at least 1"));
        }
        if !request.guidance_scale.is_finite() || request.guidance_scale < 0.0 {
            return Err(EngineError::invalid(
                "guidance_scale",
                "must be a finite number ≥ 0",
            ));
        }
        if !(0.0..=1.0).contains(&request.guidance_rescale) {
            return Err(EngineError::invalid(
                "guidance_rescale",
                "must be between 0 and 1",
            ));
        }
        let shape = RunShape {
            images: request.num_images as usize,
            channels: unet.latent_channels,
            latent_h,
            latent_w,
            guidance: request.guidance_scale > 1.0,
        };
        if let Some(batch) = unet.sample.fixed_dim(0) {
            if batch != shape.unet_rows() {
                return Err(EngineError::invalid(
                    "num_images",
                    format!(
                        "this UNet is exported for a batch of {batch} rows, the request needs {}",
                        shape.unet_rows()
                    ),
                ));
            }
        }
        if let Some(latents) = &request.initial_latents {
            let expected = shape.images * shape.per_image();
            if latents.len() != expected {
                return Err(EngineError::invalid(
                    "initial_latents",
                    format!(
                        "has {} values; {} image(s) of [{}, {}, {}] need {expected}",
                        latents.len(),
                        shape.images,
                        shape.channels,
                        latent_h,
                        latent_w
                    ),
                ));
            }
            if latents.iter().any(|v| !v.is_finite()) {
                return Err(EngineError::invalid(
                    "initial_latents",
                    "contains NaN or infinite values",
                ));
            }
        }
        Ok(shape)
    }

    /// Build the request's scheduler from the model's configuration and the request overrides.
    pub fn scheduler_for(
        &self,
        request: &GenerateRequest,
    ) -> Result<Box<dyn Scheduler>, EngineError> {
        let wrap = |source| EngineError::Scheduler {
            scheduler: request.scheduler.id().to_owned(),
            source,
        };
        let config = SchedulerConfig::from_json(&self.model.scheduler_config)
            .map_err(wrap)?
            .with_overrides(&request.scheduler_overrides);
        scheduler::build(request.scheduler, &config, request.steps).map_err(wrap)
    }

    /// Run a request: encode the prompts, denoise, decode. `progress` is called after every
    /// UNet evaluation; returning `ControlFlow::Break(())` stops with [`EngineError::Cancelled`].
    pub fn generate(
        &self,
        request: &GenerateRequest,
        progress: &mut ProgressFn<'_>,
    ) -> Result<GenerateOutput, EngineError> {
        self.generate_inner(request, None, progress)
    }

    /// [`Engine::generate`] with ControlNets (see [`super::controlnet`]).
    pub fn generate_with_control(
        &self,
        request: &GenerateRequest,
        control: &ControlRequest<'_>,
        progress: &mut ProgressFn<'_>,
    ) -> Result<GenerateOutput, EngineError> {
        if request.controls.img2img.is_some() {
            return Err(EngineError::invalid(
                "controlnets",
                "ControlNets cannot be combined with an init image",
            ));
        }
        control.validate(&self.model.unet)?;
        self.generate_inner(request, Some(control), progress)
    }

    fn generate_inner(
        &self,
        request: &GenerateRequest,
        control: Option<&ControlRequest<'_>>,
        progress: &mut ProgressFn<'_>,
    ) -> Result<GenerateOutput, EngineError> {
        let mut run = self.prepare(request)?;
        let end = run.scheduler.timesteps().len();
        self.denoise_run(&mut run, request, end, control, progress)?;
        self.finish(request, run)
    }

    /// Everything before the first denoising step: validation, the scheduler, the prompts,
    /// the noise streams and the starting latents (seeded noise, the request's
    /// `initial_latents`, or an encoded init image with noise added for image-to-image).
    pub(super) fn prepare(&self, request: &GenerateRequest) -> Result<Prepared, EngineError> {
        self.prepare_with(request, None)
    }

    /// [`prepare`](Self::prepare), with the request's prompts already encoded (with the time
    /// that took) when `encoded` holds them: a dynamic batch encodes its runs' prompts together.
    pub(super) fn prepare_with(
        &self,
        request: &GenerateRequest,
        encoded: Option<(Conditioning, Duration)>,
    ) -> Result<Prepared, EngineError> {
        let shape = self.validate(request)?;
        let scheduler = self.scheduler_for(request)?;
        // Checked before any model runs, so that a bad request costs no encoding.
        let start = match &request.controls.img2img {
            Some(init) => {
                self.check_img2img(request, init)?;
                img2img::start_index(
                    request.scheduler,
                    request.steps,
                    init.strength,
                    scheduler.timesteps().len(),
                )?
            }
            None => 0,
        };
        let mut timings = StageTimings {
            text_encoding_shared: encoded.is_some(),
            ..StageTimings::default()
        };
        let (conditioning, elapsed) = match encoded {
            Some(encoded) => encoded,
            None => {
                let started = Instant::now();
                let conditioning = self.encode_request_prompts(request, shape.guidance)?;
                (conditioning, started.elapsed())
            }
        };
        timings.text_encoding = elapsed;
        timings.text_encoding_session_run = conditioning.session_time;

        let seeds: Vec<u64> = (0..shape.images)
            .map(|i| image_seed(request.seed, i))
            .collect();
        let mut noise = BatchNoise::from_seeds(&seeds);
        let latents = match &request.controls.img2img {
            Some(init) => {
                let sigma = scheduler.sigmas().get(start).copied().unwrap_or(0.0) as f32;
                self.img2img_latents(request, init, &shape, sigma, &mut noise)?
            }
            None => {
                // The initial latents are always drawn, so that injected latents equal to the
                // seeded ones leave every stream at the same place for the schedulers that draw
                // step noise.
                let drawn = noise.sample(shape.images * shape.per_image());
                let mut latents = request.initial_latents.clone().unwrap_or(drawn);
                let sigma = scheduler.init_noise_sigma() as f32;
                latents.iter_mut().for_each(|v| *v *= sigma);
                latents
            }
        };
        Ok(Prepared {
            shape,
            scheduler,
            conditioning,
            noise,
            latents,
            start,
            timings,
        })
    }

    /// Run the denoising loop of a prepared run from its start to evaluation `end`
    /// (exclusive), timed as `denoising`.
    pub(super) fn denoise_run(
        &self,
        run: &mut Prepared,
        request: &GenerateRequest,
        end: usize,
        control: Option<&ControlRequest<'_>>,
        progress: &mut ProgressFn<'_>,
    ) -> Result<(), EngineError> {
        let started = Instant::now();
        let mut state = DenoiseState {
            shape: run.shape,
            request,
            noise: &mut run.noise,
            timings: &mut run.timings,
            start: run.start,
            end,
            control,
            aesthetic: AestheticScores::default(),
        };
        self.denoise(
            &mut state,
            run.scheduler.as_mut(),
            &run.conditioning,
            &mut run.latents,
            progress,
        )?;
        run.timings.denoising += started.elapsed();
        Ok(())
    }

    /// Decode the latents of a run with this engine's VAE, timed as `vae_decode`.
    pub(super) fn finish(
        &self,
        request: &GenerateRequest,
        mut run: Prepared,
    ) -> Result<GenerateOutput, EngineError> {
        let started = Instant::now();
        let images = self.decode_all(request, &run.shape, &run.latents, &mut run.timings)?;
        run.timings.vae_decode = started.elapsed();
        Ok(GenerateOutput {
            images,
            latents: run.latents,
            timings: run.timings,
            batch_size: 1,
        })
    }

    /// Encode the request's prompts (weighted and chunked when the request asks for it).
    pub(super) fn encode_request_prompts(
        &self,
        request: &GenerateRequest,
        guidance: bool,
    ) -> Result<Conditioning, EngineError> {
        let texts = PromptTexts::of(request);
        if self.encodes_plain(request, guidance) {
            text::encode_prompts(&self.model, &texts, guidance)
        } else {
            super::prompt_weighting::encode_prompts(&self.model, &texts, guidance)
        }
    }

    /// Whether the request's prompts take the plain encoding: no prompt weighting, or texts
    /// that weighting leaves as they are (no weighting syntax, one chunk each), which read the
    /// same either way and need one session run per encoder.
    pub(super) fn encodes_plain(&self, request: &GenerateRequest, guidance: bool) -> bool {
        !request.controls.prompt_weighting
            || super::prompt_weighting::reads_as_plain(
                &self.model,
                &PromptTexts::of(request),
                guidance,
            )
    }

    pub(super) fn decode_all(
        &self,
        request: &GenerateRequest,
        shape: &RunShape,
        latents: &[f32],
        timings: &mut StageTimings,
    ) -> Result<Vec<GeneratedImage>, EngineError> {
        let vae_decoder = &self.model.vae_decoder;
        let mut images = Vec::with_capacity(shape.images);
        for (index, chunk) in latents.chunks_exact(shape.per_image()).enumerate() {
            let mut scaled = chunk.to_vec();
            vae::unscale_latents(vae_decoder, &mut scaled, shape.channels);
            let decoded = vae::decode(
                vae_decoder,
                &scaled,
                shape.channels,
                shape.latent_h,
                shape.latent_w,
            )?;
            timings.vae_decode_session_run += decoded.session_time;
            if (decoded.width, decoded.height) != (request.width, request.height) {
                return Err(EngineError::UnexpectedOutput {
                    stage: "VAE decoder",
                    message: format!(
                        "a {}x{} image for a {}x{} request",
                        decoded.width, decoded.height, request.width, request.height
                    ),
                });
            }
            images.push(GeneratedImage {
                index: index as u32,
                seed: image_seed(request.seed, index),
                width: decoded.width,
                height: decoded.height,
                rgb: decoded.rgb,
            });
        }
        Ok(images)
    }
}

/// What the denoising loop reads and updates besides the latents.
pub(super) struct DenoiseState<'a> {
    pub shape: RunShape,
    pub request: &'a GenerateRequest,
    pub noise: &'a mut BatchNoise,
    pub timings: &'a mut StageTimings,
    /// The first evaluation to run (image-to-image and the refiner skip the start of the
    /// schedule).
    pub start: usize,
    /// One past the last evaluation to run (a base handing over to a refiner stops early).
    pub end: usize,
    /// ControlNets of the run, if any.
    pub control: Option<&'a ControlRequest<'a>>,
    /// The scores a refiner's UNet is conditioned on (unused by a base UNet).
    pub aesthetic: AestheticScores,
}

/// A run set up to enter the denoising loop (see [`Engine::prepare`]).
pub(super) struct Prepared {
    pub shape: RunShape,
    pub scheduler: Box<dyn Scheduler>,
    pub conditioning: Conditioning,
    pub noise: BatchNoise,
    /// Image-major latents, updated in place by the loop.
    pub latents: Vec<f32>,
    /// The first evaluation to run.
    pub start: usize,
    pub timings: StageTimings,
}

/// Write one run's block of the UNet batch for evaluation `i`: its latents scaled by the
/// scheduler, twice (negative and positive rows) under guidance. `block` holds the run's rows.
pub(super) fn fill_block(
    scheduler: &dyn Scheduler,
    latents: &[f32],
    i: usize,
    guidance: bool,
    block: &mut [f32],
) {
    let n = latents.len();
    block[..n].copy_from_slice(latents);
    scheduler.scale_model_input(&mut block[..n], i);
    if guidance {
        block.copy_within(..n, n);
    }
}

/// Apply classifier-free guidance to one run's block of the UNet output and step its
/// scheduler. `guided` is scratch space of one run's latent size.
#[allow(clippy::too_many_arguments)]
pub(super) fn update_block(
    request: &GenerateRequest,
    shape: &RunShape,
    out: &[f32],
    guided: &mut [f32],
    i: usize,
    scheduler: &mut dyn Scheduler,
    latents: &mut [f32],
    noise: &mut BatchNoise,
) -> Result<(), EngineError> {
    if out.iter().any(|v| !v.is_finite()) {
        return Err(EngineError::NonFinite {
            stage: UNET,
            hint: String::new(),
        });
    }
    let noise_pred: &[f32] = if shape.guidance {
        let (uncond, cond) = out.split_at(latents.len());
        guidance::apply_guidance(uncond, cond, request.guidance_scale, guided);
        if request.guidance_rescale > 0.0 {
            guidance::rescale_guidance(guided, cond, shape.per_image(), request.guidance_rescale);
        }
        guided
    } else {
        out
    };
    scheduler.step(noise_pred, i, latents, noise);
    Ok(())
}

fn session_options(options: &EngineOptions) -> SessionOptions {
    SessionOptions {
        device: options.device,
        intra_threads: options.intra_threads,
        tf32: options.cuda.tf32,
        cuda: options.cuda,
        graph_capture: false,
    }
}
