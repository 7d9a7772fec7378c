//! Image-to-image: start the denoising from an encoded init image instead of pure noise, as
//! diffusers' `StableDiffusionXLImg2ImgPipeline` does (without `denoising_start`).
//!
//! 1. The init image (8-bit RGB, exactly the request's width × height) becomes
//!    `x / 255 · 2 − 1` in float32 (as diffusers' image processor computes it) and goes through
//!    `vae_encoder`, whose `latent_parameters` are the mean and log-variance of the latent
//!    distribution stacked on the channel axis.
//! 2. Each image `i` draws from its own noise stream ([`super::noise`]), in this order: one
//!    standard normal value per latent element `ε`, then the noise `n` that is added, then any
//!    step noise of the scheduler. The latent is a sample of the distribution, as diffusers 0.42.1
//!    takes it (`retrieve_latents` with `sample_mode="sample"`): `x0 = mean + exp(0.5 ·
//!    clamp(logvar, −30, 20)) · ε`, times the VAE's `scaling_factor` (or, for VAEs that declare
//!    per-channel statistics, `(x0 − latents_mean) · scaling_factor / latents_std`).
//! 3. `strength` picks where denoising starts: of `steps` scheduler steps the last
//!    `⌊steps · strength⌋` run (at least one is required), starting at step index
//!    `t_start = steps − ⌊steps · strength⌋` (times the scheduler's order: 2 for Heun).
//! 4. `n` is added at that first timestep as the scheduler's `add_noise` does: `x0 + σ·n` for the
//!    sigma-based schedulers (Euler, Euler a, Heun, LMS), `α·x0 + σ_t·n` with
//!    `α = 1/√(σ² + 1)`, `σ_t = σ·α` for the DPM-Solver family and UniPC. DDIM is not offered for
//!    image-to-image.
//! 5. The denoising loop and the VAE decoding are those of text-to-image, from `t_start` on
//!    (the set-up is shared with text-to-image in [`Engine::prepare`](super::Engine)).
//!
//! With one noise stream per image, image `i` of a job is the same as image 0 of the same job
//! with seed `seed + i` (diffusers, with one generator for a batch, shares one `ε` draw).

use std::sync::{Arc, Mutex};

use super::model::{SdxlModel, VaeConfig};
use super::noise::BatchNoise;
use super::runtime::SessionOptions;
use super::scheduler::SchedulerKind;
use super::session::{Component, TensorInfo};
use super::{tensor, Engine, EngineError, GenerateRequest, RunShape};

const STAGE: &str = "VAE encoder";

/// An 8-bit RGB image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    /// Row-major RGB, 3 bytes per pixel.
    pub rgb: Vec<u8>,
}

/// An image-to-image request's init image and strength.
#[derive(Debug, Clone, PartialEq)]
pub struct Img2Img {
    pub image: RgbImage,
    /// How much of the schedule runs, in (0, 1]: 1 ignores the image's content but not its
    /// noise draw, small values keep it close to the image.
    pub strength: f64,
}

/// The VAE encoder graph.
#[derive(Debug)]
pub struct VaeEncoder {
    pub component: Component,
    pub sample: TensorInfo,
}

impl VaeEncoder {
    /// Load `vae_encoder/` of a model.
    pub fn load(model: &SdxlModel, options: &SessionOptions) -> Result<Self, EngineError> {
        let Some(path) = &model.vae_encoder_path else {
            return Err(EngineError::ModelFileMissing {
                path: model.root.join("vae_encoder").join("model.onnx"),
            });
        };
        let dir = path.parent().unwrap_or(&model.root);
        let component = Component::load(dir, options)?;
        let sample = component.float_input("sample", &[4])?.clone();
        component.float_output("latent_parameters", &[4])?;
        Ok(Self { component, sample })
    }
}

/// The encoder of an engine, loaded on first use.
#[derive(Debug, Default)]
pub struct LazyVaeEncoder {
    slot: Mutex<Option<Arc<VaeEncoder>>>,
}

impl LazyVaeEncoder {
    fn get(
        &self,
        model: &SdxlModel,
        options: &SessionOptions,
    ) -> Result<Arc<VaeEncoder>, EngineError> {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(encoder) = slot.as_ref() {
            return Ok(Arc::clone(encoder));
        }
        let encoder = Arc::new(VaeEncoder::load(model, options)?);
        *slot = Some(Arc::clone(&encoder));
        Ok(encoder)
    }
}

/// How many of `steps` scheduler steps an image-to-image run takes with `strength` in (0, 1]:
/// diffusers' `init_timestep = min(int(steps * strength), steps)`, in float64.
pub fn steps_run(steps: u32, strength: f64) -> u32 {
    ((f64::from(steps) * strength).floor() as u32).min(steps)
}

/// Where denoising starts: `(start index into the scheduler's timesteps, model evaluations)`.
pub fn start_index(
    kind: SchedulerKind,
    steps: u32,
    strength: f64,
    evaluations: usize,
) -> Result<usize, EngineError> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(EngineError::invalid("strength", "must be in (0, 1]"));
    }
    let init = steps_run(steps, strength);
    if init == 0 {
        return Err(EngineError::invalid(
            "strength",
            format!("{strength} of {steps} steps runs no step; raise strength or steps"),
        ));
    }
    let order = if kind == SchedulerKind::Heun { 2 } else { 1 };
    let start = (steps - init) as usize * order;
    if start >= evaluations {
        return Err(EngineError::invalid("strength", "runs no step"));
    }
    Ok(start)
}

/// How the scheduler adds noise to clean latents.
fn add_noise(
    kind: SchedulerKind,
    sigma: f32,
    x0: &mut [f32],
    noise: &[f32],
) -> Result<(), EngineError> {
    match kind {
        SchedulerKind::Euler | SchedulerKind::EulerA | SchedulerKind::Heun | SchedulerKind::Lms => {
            for (x, n) in x0.iter_mut().zip(noise) {
                *x += n * sigma;
            }
        }
        SchedulerKind::Dpmpp2m
        | SchedulerKind::Dpmpp2mKarras
        | SchedulerKind::Dpmpp2mSde
        | SchedulerKind::Dpmpp2mSdeKarras
        | SchedulerKind::Unipc => {
            let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
            let sigma_t = sigma * alpha;
            for (x, n) in x0.iter_mut().zip(noise) {
                *x = alpha * *x + sigma_t * n;
            }
        }
        SchedulerKind::Ddim => {
            return Err(EngineError::invalid(
                "scheduler",
                "ddim is not offered for image-to-image; choose another scheduler",
            ))
        }
    }
    Ok(())
}

/// Scale a sampled latent as diffusers does before denoising.
fn scale_latents(config: &VaeConfig, latents: &mut [f32], channels: usize) {
    let sf = config.scaling_factor as f32;
    let plane = latents.len() / channels.max(1);
    match &config.latents_mean_std {
        Some((mean, std)) if mean.len() == channels && std.len() == channels => {
            for (c, chunk) in latents.chunks_mut(plane).enumerate() {
                let (m, s) = (mean[c] as f32, std[c] as f32);
                for v in chunk {
                    *v = (*v - m) * sf / s;
                }
            }
        }
        _ => latents.iter_mut().for_each(|v| *v *= sf),
    }
}

/// The image as the VAE encoder's planar `[3, H, W]` input in [-1, 1].
pub fn to_planar(image: &RgbImage) -> Vec<f32> {
    let plane = (image.width * image.height) as usize;
    let mut out = vec![0.0f32; plane * 3];
    for (i, px) in image.rgb.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + i] = f32::from(px[c]) / 255.0 * 2.0 - 1.0;
        }
    }
    out
}

impl Engine {
    pub(super) fn check_img2img(
        &self,
        request: &GenerateRequest,
        init: &Img2Img,
    ) -> Result<(), EngineError> {
        let image = &init.image;
        if (image.width, image.height) != (request.width, request.height) {
            return Err(EngineError::invalid(
                "init_image",
                format!(
                    "is {}x{} but the request is {}x{}; they must be equal",
                    image.width, image.height, request.width, request.height
                ),
            ));
        }
        if image.rgb.len() != (image.width * image.height * 3) as usize {
            return Err(EngineError::invalid(
                "init_image",
                "pixel data does not match its size",
            ));
        }
        if request.initial_latents.is_some() {
            return Err(EngineError::invalid(
                "initial_latents",
                "cannot be combined with an init image",
            ));
        }
        if request.scheduler == SchedulerKind::Ddim {
            return Err(EngineError::invalid(
                "scheduler",
                "ddim is not offered for image-to-image; choose another scheduler",
            ));
        }
        Ok(())
    }

    /// The starting latents of an image-to-image run: the init image's latent sample, scaled,
    /// with the scheduler's noise at `sigma` (the first timestep run) added; draws `ε` then
    /// `n` from the image streams (see the module docs).
    pub(super) fn img2img_latents(
        &self,
        request: &GenerateRequest,
        init: &Img2Img,
        shape: &RunShape,
        sigma: f32,
        noise: &mut BatchNoise,
    ) -> Result<Vec<f32>, EngineError> {
        let (mean, std) = self.encode_image(&init.image, shape.per_image())?;
        let eps = noise.sample(shape.images * shape.per_image());
        let added = noise.sample(shape.images * shape.per_image());
        let mut latents = Vec::with_capacity(eps.len());
        for e in eps.chunks_exact(shape.per_image()) {
            let mut x0: Vec<f32> = mean
                .iter()
                .zip(&std)
                .zip(e)
                .map(|((m, s), e)| m + s * e)
                .collect();
            scale_latents(&self.model.vae_decoder.config, &mut x0, shape.channels);
            latents.extend_from_slice(&x0);
        }
        add_noise(request.scheduler, sigma, &mut latents, &added)?;
        Ok(latents)
    }

    /// The latent distribution of one image: `(mean, std)`, each `[C, h, w]`.
    fn encode_image(
        &self,
        image: &RgbImage,
        per_image: usize,
    ) -> Result<(Vec<f32>, Vec<f32>), EngineError> {
        let encoder = self.vae_encoder.get(&self.model, &self.session_options())?;
        let shape = [1, 3, i64::from(image.height), i64::from(image.width)];
        let value = tensor::float_value(encoder.sample.elem, &shape, &to_planar(image)).map_err(
            |source| EngineError::Inference {
                stage: STAGE,
                source,
            },
        )?;
        let result = encoder.component.run(
            STAGE,
            vec![("sample", value.into())],
            &["latent_parameters"],
        )?;
        let params = result
            .outputs
            .into_iter()
            .next()
            .map(|o| o.data)
            .unwrap_or_default();
        if params.len() != 2 * per_image {
            return Err(EngineError::UnexpectedOutput {
                stage: STAGE,
                message: format!(
                    "{} latent parameters, expected {} (mean and log-variance)",
                    params.len(),
                    2 * per_image
                ),
            });
        }
        if params.iter().any(|v| !v.is_finite()) {
            return Err(EngineError::NonFinite {
                stage: STAGE,
                hint: String::new(),
            });
        }
        let (mean, logvar) = params.split_at(per_image);
        let std = logvar
            .iter()
            .map(|&l| (0.5 * l.clamp(-30.0, 20.0)).exp())
            .collect();
        Ok((mean.to_vec(), std))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strength_picks_the_start_as_diffusers_does() {
        let e = SchedulerKind::Euler;
        assert_eq!(start_index(e, 10, 1.0, 10).unwrap(), 0);
        assert_eq!(start_index(e, 10, 0.5, 10).unwrap(), 5);
        // int(10 * 0.7) is 7 in float64 (7.000000000000001).
        assert_eq!(start_index(e, 10, 0.7, 10).unwrap(), 3);
        assert_eq!(start_index(e, 4, 0.3, 4).unwrap(), 3);
        assert_eq!(start_index(SchedulerKind::Heun, 10, 0.5, 19).unwrap(), 10);
        for bad in [0.0, -0.1, 1.5, f64::NAN] {
            assert!(start_index(e, 10, bad, 10).is_err(), "{bad}");
        }
        let err = start_index(e, 3, 0.2, 3).unwrap_err();
        assert_eq!(err.code(), "invalid_request");
    }

    #[test]
    fn pixels_map_to_minus_one_to_one_planes() {
        let image = RgbImage {
            width: 2,
            height: 1,
            rgb: vec![0, 255, 51, 255, 0, 102],
        };
        let planar = to_planar(&image);
        assert_eq!(planar[0], -1.0);
        assert_eq!(planar[1], 1.0);
        assert_eq!(planar[2], 1.0);
        assert_eq!(planar[3], -1.0);
        assert!((planar[4] - (51.0 / 255.0 * 2.0 - 1.0)).abs() < 1e-7);
    }

    #[test]
    fn noise_is_added_per_scheduler_family() {
        let mut x = vec![1.0f32, 2.0];
        add_noise(SchedulerKind::Euler, 2.0, &mut x, &[0.5, -0.5]).unwrap();
        assert_eq!(x, [2.0, 1.0]);
        let mut x = vec![1.0f32];
        add_noise(SchedulerKind::Dpmpp2m, 1.0, &mut x, &[1.0]).unwrap();
        let a = 1.0 / 2f32.sqrt();
        assert!((x[0] - (a + a)).abs() < 1e-6);
        assert!(add_noise(SchedulerKind::Ddim, 1.0, &mut x, &[1.0]).is_err());
    }
}
