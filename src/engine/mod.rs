//! SDXL inference on ONNX Runtime: model loading, tokenization, text encoding (plain, or with
//! A1111 prompt weighting and long prompts in [`prompt_weighting`]), schedulers, the denoising
//! loop, image-to-image ([`img2img`]), the base → refiner hand-off ([`refiner`]), VAE decoding
//! and PNG encoding.
//!
//! This module knows nothing of RabbitMQ, Postgres or object storage: callers hand it a
//! [`GenerateRequest`] and get back images and timings.

pub mod batch;
mod built_graph;
pub mod canny;
pub mod capture_gate;
pub mod control_image;
pub mod controlnet;
pub mod cuda;
mod denoise;
mod device_step;
mod error;
pub mod guidance;
pub mod img2img;
pub mod model;
pub mod noise;
pub mod pipeline;
pub mod png;
pub mod preprocess;
pub mod prompt_weighting;
pub mod refiner;
pub mod runtime;
pub mod scheduler;
pub mod session;
pub mod tensor;
pub mod text;
pub mod tokenizer;
pub mod unet;
pub mod unet_inputs;
pub mod vae;
mod zero_fill;

use std::ops::ControlFlow;
use std::time::Duration;

pub use error::EngineError;
pub use model::SdxlModel;
pub use pipeline::RunShape;
pub use scheduler::{PredictionType, SchedulerKind, SchedulerOverrides, TimestepSpacing};

/// How an [`Engine`] is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineOptions {
    pub device: Device,
    /// Threads inside one operator on CPU (`None`: ONNX Runtime's default, one per core).
    pub intra_threads: Option<usize>,
    /// CUDA execution provider settings (no effect on the CPU), TF32 among them.
    pub cuda: cuda::CudaOptions,
    /// Run the UNet through device-bound buffers on the CPU provider too (and, with
    /// `cuda.graph`, through static-shape sessions). It only adds copies there; it exists to
    /// check that path against the plain one without a GPU.
    pub bind_io_on_cpu: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            intra_threads: None,
            cuda: cuda::CudaOptions::default(),
            bind_io_on_cpu: false,
        }
    }
}

/// A loaded SDXL pipeline, ready to generate. Load it once per device and reuse it; `generate`
/// may be called from several threads (each graph runs one evaluation at a time).
#[derive(Debug)]
pub struct Engine {
    model: SdxlModel,
    options: EngineOptions,
    /// `vae_encoder/`, loaded by the first image-to-image request.
    vae_encoder: img2img::LazyVaeEncoder,
    /// Static-shape UNet sessions for CUDA graphs, loaded on first use of each shape.
    graph_unets: unet::GraphSessions,
    /// Static-shape ControlNet sessions for CUDA graphs, loaded on first use of each shape.
    control_graphs: controlnet::ControlGraphs,
    /// ControlNet residual mixers, by the ControlNets and element types they combine.
    mixers: controlnet::Mixers,
    /// Guidance-and-Euler step graphs ([`CudaOptions::device_step`](cuda::CudaOptions)).
    step_graphs: device_step::StepGraphs,
    /// Graphs that zero bound buffers in place (the residuals of a residual UNet).
    zero_graphs: zero_fill::ZeroGraphs,
}

/// Where an engine runs its ONNX Runtime sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Device {
    /// ONNX Runtime's CPU execution provider.
    Cpu,
    /// The CUDA execution provider on GPU `index` (as CUDA numbers devices).
    Cuda { index: u32 },
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda { index } => write!(f, "cuda:{index}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = String;

    /// `cpu`, `cuda` (GPU 0) or `cuda:N`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("cpu") {
            return Ok(Device::Cpu);
        }
        let lower = s.to_ascii_lowercase();
        match lower.strip_prefix("cuda") {
            Some("") => Ok(Device::Cuda { index: 0 }),
            Some(rest) => rest
                .strip_prefix(':')
                .and_then(|n| n.parse::<u32>().ok())
                .map(|index| Device::Cuda { index })
                .ok_or_else(|| format!("invalid device {s:?}: expected cpu, cuda or cuda:N")),
            None => Err(format!(
                "invalid device {s:?}: expected cpu, cuda or cuda:N"
            )),
        }
    }
}

/// A text-to-image request as the engine sees it (already validated by the caller).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub prompt: String,
    /// Prompt for the second text encoder; `None` uses `prompt`.
    pub prompt_2: Option<String>,
    /// `None` means "no negative prompt" (all-zero embeddings when the model forces zeros).
    pub negative_prompt: Option<String>,
    /// `None` uses `negative_prompt`.
    pub negative_prompt_2: Option<String>,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance_scale: f32,
    /// diffusers' `guidance_rescale` (0 disables it).
    pub guidance_rescale: f32,
    pub scheduler: SchedulerKind,
    pub scheduler_overrides: SchedulerOverrides,
    /// Image `i` uses seed `seed + i` (see [`noise`]).
    pub seed: u64,
    pub num_images: u32,
    /// SDXL micro-conditioning; `None` means (height, width).
    pub original_size: Option<(u32, u32)>,
    /// (top, left).
    pub crops_coords_top_left: (u32, u32),
    /// `None` means (height, width).
    pub target_size: Option<(u32, u32)>,
    /// Standard-normal initial latents, image-major `[num_images, C, H/f, W/f]`, *before* the
    /// scheduler's `init_noise_sigma` is applied (as diffusers' `latents=` argument). `None`
    /// draws them from each image's seeded stream.
    pub initial_latents: Option<Vec<f32>>,
    /// Controls beyond plain text-to-image (all off by default).
    pub controls: GenerationControls,
}

/// Optional generation controls; the default is diffusers' plain text-to-image.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationControls {
    /// Read the prompts with A1111's weighting syntax and encode prompts longer than 75 tokens
    /// in chunks ([`prompt_weighting`]); off: diffusers' encoding, truncated to 77 tokens.
    pub prompt_weighting: bool,
    /// Image-to-image: start from this image ([`img2img`]).
    pub img2img: Option<img2img::Img2Img>,
}

/// Progress reported after every model evaluation of the denoising loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Evaluations done so far (1-based after the first).
    pub step: u32,
    pub total: u32,
}

/// Callback after every step; returning `ControlFlow::Break(())` cancels the run.
pub type ProgressFn<'a> = dyn FnMut(Progress) -> ControlFlow<()> + 'a;

/// Wall-clock time of each stage of one `generate` call.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StageTimings {
    pub text_encoding: Duration,
    /// The prompts were encoded in one run with those of other requests of the batch
    /// ([`Engine::generate_batch`]): `text_encoding` is that shared run's time, the same in
    /// each of them.
    pub text_encoding_shared: bool,
    pub denoising: Duration,
    pub per_step: Vec<Duration>,
    /// Time inside ONNX Runtime's `Session::run` during denoising.
    pub denoising_session_run: Duration,
    pub vae_decode: Duration,
    /// Time inside `Session::run` for each step (same order as `per_step`).
    pub per_step_session_run: Vec<Duration>,
    /// Time each step spent copying its inputs to the device and its prediction back (runs
    /// with device-bound UNet buffers; zero on the host path, where the copies happen inside
    /// `Session::run`). What is left of a step besides this and `per_step_session_run` is host
    /// work: guidance, the scheduler update and float16 conversions.
    pub per_step_copies: Vec<Duration>,
    /// Steps whose guidance and scheduler update ran on the device
    /// ([`CudaOptions::device_step`](cuda::CudaOptions)); the others ran on the host.
    pub device_steps: usize,
    /// Time inside `Session::run` during text encoding.
    pub text_encoding_session_run: Duration,
    /// Time inside `Session::run` during VAE decoding.
    pub vae_decode_session_run: Duration,
    /// Part of `denoising` spent on ControlNet evaluations and residual sums.
    pub controlnet: Duration,
    /// Refined runs ([`refiner`]): the refiner's prompt encoding (zero otherwise).
    pub refiner_text_encoding: Duration,
    /// Time inside `Session::run` during the refiner's prompt encoding.
    pub refiner_text_encoding_session_run: Duration,
    /// Refined runs: the refiner's denoising steps (`denoising` is the base's alone; `per_step`
    /// lists the base's steps then the refiner's).
    pub refiner_denoising: Duration,
    /// Time inside `Session::run` during the refiner's denoising.
    pub refiner_denoising_session_run: Duration,
}

/// One decoded image.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedImage {
    pub index: u32,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    /// Row-major RGB, 3 bytes per pixel.
    pub rgb: Vec<u8>,
}

/// The result of one `generate` call.
#[derive(Debug, Clone)]
pub struct GenerateOutput {
    pub images: Vec<GeneratedImage>,
    /// Final latents before VAE scaling, image-major.
    pub latents: Vec<f32>,
    pub timings: StageTimings,
    /// Runs that shared this run's UNet batch ([`Engine::generate_batch`]); 1 when it ran alone.
    pub batch_size: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_can_be_shared_between_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<Engine>();
    }

    #[test]
    fn devices_parse_and_print() {
        assert_eq!("cpu".parse(), Ok(Device::Cpu));
        assert_eq!("cuda".parse(), Ok(Device::Cuda { index: 0 }));
        assert_eq!("CUDA:3".parse(), Ok(Device::Cuda { index: 3 }));
        assert!("cuda:x".parse::<Device>().is_err());
        assert!("gpu".parse::<Device>().is_err());
        assert_eq!(Device::Cuda { index: 1 }.to_string(), "cuda:1");
    }
}
