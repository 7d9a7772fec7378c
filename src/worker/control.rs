//! The ControlNet part of a job: its control images (fetched and decoded by
//! [`super::image_input`]), their preprocessing, and the engine's ControlNet request; the
//! engine knows nothing of where the images came from.

use crate::config::ControlNetConfig;
use crate::engine::canny;
use crate::engine::control_image::ControlImage;
use crate::engine::controlnet::{
    ControlNetPaths, ControlNets, ControlRequest, ControlType, ControlUnit,
};
use crate::engine::EngineError;
use crate::job::controlnet::CONTROL_IMAGE_CODES;
use crate::job::ControlNetSpec;
use crate::storage::Storage;

use super::image_input;

/// How the engine should turn a fetched image into a control image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preprocess {
    /// The image already is the control image.
    None,
    /// Canny edges with these thresholds.
    Canny { low: u32, high: u32 },
    /// The configured ONNX preprocessor of the type.
    Model,
}

/// One ControlNet of a job, with its image decoded.
#[derive(Debug, Clone)]
pub struct ControlInput {
    pub kind: ControlType,
    pub image: ControlImage,
    pub preprocess: Preprocess,
    pub conditioning_scale: f32,
    pub guidance_start: f64,
    pub guidance_end: f64,
}

/// The ControlNet part of an engine job.
#[derive(Debug, Clone)]
pub struct ControlJob {
    pub inputs: Vec<ControlInput>,
    pub guess_mode: bool,
}

/// The engine's request for `job`: each input's ControlNet, and its control image after
/// preprocessing (canny in-process, or the type's ONNX preprocessor).
pub fn engine_request<'a>(
    job: &ControlJob,
    nets: &'a ControlNets,
) -> Result<ControlRequest<'a>, EngineError> {
    let mut units = Vec::with_capacity(job.inputs.len());
    for input in &job.inputs {
        let net = nets.get(input.kind).ok_or_else(|| {
            EngineError::invalid(
                "controlnets",
                format!("no {} ControlNet is loaded for this model", input.kind),
            )
        })?;
        let image = match input.preprocess {
            Preprocess::None => input.image.clone(),
            Preprocess::Canny { low, high } => canny::canny(&input.image, low, high),
            Preprocess::Model => nets
                .preprocessor(input.kind)
                .ok_or_else(|| {
                    EngineError::invalid(
                        "controlnets",
                        format!("no {} preprocessor is loaded", input.kind),
                    )
                })?
                .run(&input.image)?,
        };
        units.push(ControlUnit {
            net,
            image,
            conditioning_scale: input.conditioning_scale,
            guidance_start: input.guidance_start,
            guidance_end: input.guidance_end,
        });
    }
    Ok(ControlRequest {
        units,
        guess_mode: job.guess_mode,
    })
}

/// The deployment's ControlNet and preprocessor directories, as the engine loads them.
pub fn paths(config: &ControlNetConfig) -> ControlNetPaths {
    ControlNetPaths {
        models: config.models.clone(),
        preprocessors: config.preprocessors.clone(),
    }
}

/// Why a control image could not be used.
#[derive(Debug, thiserror::Error)]
#[error("controlnets[{index}]: {message}")]
pub struct ControlImageError {
    pub index: usize,
    pub code: &'static str,
    pub message: String,
    /// Whether another attempt may succeed (storage or network trouble).
    pub retryable: bool,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ControlImageError {
    /// The field path of the entry, for the job's error details.
    pub fn field(&self) -> String {
        format!("controlnets[{}]", self.index)
    }
}

/// Fetch and decode every control image of `specs`, in order.
pub async fn load_inputs(
    specs: &[ControlNetSpec],
    storage: &Storage,
    config: &ControlNetConfig,
) -> Result<Vec<ControlInput>, ControlImageError> {
    let mut out = Vec::with_capacity(specs.len());
    for (index, spec) in specs.iter().enumerate() {
        let image = image_input::load(spec.source(), storage, config, CONTROL_IMAGE_CODES)
            .await
            .map_err(|err| ControlImageError {
                index,
                code: err.code,
                message: err.message,
                retryable: err.retryable,
                source: err.source,
            })?;
        let preprocess = match (spec.preprocess, spec.kind) {
            (false, _) => Preprocess::None,
            (true, ControlType::Canny) => {
                let (low, high) = spec.canny_thresholds();
                Preprocess::Canny { low, high }
            }
            (true, _) => Preprocess::Model,
        };
        out.push(ControlInput {
            kind: spec.kind,
            image,
            preprocess,
            conditioning_scale: spec.conditioning_scale as f32,
            guidance_start: spec.control_guidance_start,
            guidance_end: spec.control_guidance_end,
        });
    }
    Ok(out)
}
