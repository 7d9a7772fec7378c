//! The job message contract, version 1: its serde types, validation against the deployment's
//! [`Limits`] and models, and its JSON Schema (`schema/job-v1.json`).
//!
//! Policies producers rely on:
//! - `version`, `id` (a UUID in the hyphenated form, chosen by the producer) and `prompt` are
//!   required; every other field is optional, and `null` means the same as leaving it out.
//! - Fields the contract does not name are rejected (`unknown_field`), so a typo never passes
//!   silently; a message with another `version` is rejected with `unsupported_version` alone.
//! - Validation reports every invalid field at once, each as a [`FieldError`] with a stable
//!   code from [`codes`].
//! - A message without a readable id cannot get a status row; it is [`JobRejection::Unreadable`].
//! - An absent `seed` is drawn at intake; the normalized message ([`ValidJob::message`]) records
//!   it with every other default, so retries reproduce the same images.
//! - `controlnets` entries are checked against the deployment's ControlNets
//!   ([`parse_and_validate_with`]; see [`controlnet`]); [`parse_and_validate`] is for a
//!   deployment without any.
//! - `init_image` and `strength` make an image-to-image job (see [`image`] for its policies).
//! - `refiner` hands the end of the schedule to the model's configured refiner (see
//!   [`refiner`]).

mod checker;
pub mod controlnet;
pub mod image;
pub mod refiner;
pub mod schema;
mod validate;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::{Limits, ModelsConfig};
use crate::engine::{GenerateRequest, GenerationControls, SchedulerKind, SchedulerOverrides};
use crate::styles::{StyleCatalog, StyledPrompts};

pub use controlnet::ControlNetSpec;
pub use image::InitImage;
pub use refiner::RefinerSpec;
pub use validate::{parse_and_validate, parse_and_validate_with};

/// The only message version this build understands.
pub const VERSION: u64 = 1;

/// Default number of denoising steps.
pub const DEFAULT_STEPS: u32 = 30;
/// Default classifier-free guidance scale.
pub const DEFAULT_GUIDANCE_SCALE: f64 = 5.0;
/// Default guidance rescale (disabled).
pub const DEFAULT_GUIDANCE_RESCALE: f64 = 0.0;
/// Default scheduler.
pub const DEFAULT_SCHEDULER: SchedulerKind = SchedulerKind::Euler;
/// Prompt weighting (A1111 syntax, long prompts in chunks) is on unless a job turns it off.
pub const DEFAULT_PROMPT_WEIGHTING: bool = true;
/// Default number of images.
pub const DEFAULT_NUM_IMAGES: u32 = 1;
/// Default priority (0 lowest, 9 highest).
pub const DEFAULT_PRIORITY: u8 = 0;
/// Highest priority.
pub const MAX_PRIORITY: u8 = 9;
/// Jobs with at least this priority go to the high-priority work queue.
pub const HIGH_PRIORITY_THRESHOLD: u8 = 5;
/// Largest value of either side in `original_size`, `target_size` and `crops_coords_top_left`.
pub const MAX_CONDITIONING_SIDE: u32 = 16384;
/// Largest `scheduler_options.steps_offset`.
pub const MAX_STEPS_OFFSET: u32 = 999;
/// Drawn seeds are below this bound (32-bit, as most tools write seeds).
pub const DRAWN_SEED_BOUND: u64 = 1 << 32;

/// Field name used for errors about the message as a whole.
pub const WHOLE_MESSAGE: &str = "$";

/// Every top-level field of a version 1 message, in documentation order.
pub const FIELDS: [&str; 29] = [
    "version",
    "id",
    "model",
    "prompt",
    "prompt_2",
    "negative_prompt",
    "negative_prompt_2",
    "style",
    "prompt_weighting",
    "width",
    "height",
    "steps",
    "guidance_scale",
    "guidance_rescale",
    "scheduler",
    "scheduler_options",
    "seed",
    "num_images",
    "original_size",
    "crops_coords_top_left",
    "target_size",
    "priority",
    "cache",
    "metadata",
    "controlnets",
    "guess_mode",
    "init_image",
    "strength",
    "refiner",
];

/// Fields of `scheduler_options`.
pub const SCHEDULER_OPTION_FIELDS: [&str; 4] = [
    "timestep_spacing",
    "steps_offset",
    "prediction_type",
    "use_karras_sigmas",
];

/// Stable error codes of [`FieldError`] and [`JobRejection::Unreadable`].
pub mod codes {
    /// A required field is absent (or `null`).
    pub const MISSING: &str = "missing";
    /// A field has the wrong JSON type.
    pub const WRONG_TYPE: &str = "wrong_type";
    /// A number is outside its allowed range.
    pub const OUT_OF_RANGE: &str = "out_of_range";
    /// Width or height is not a multiple of 8.
    pub const NOT_MULTIPLE_OF_8: &str = "not_multiple_of_8";
    /// Width × height is above `limits.max_pixels`.
    pub const TOO_MANY_PIXELS: &str = "too_many_pixels";
    /// The model is not one this deployment has.
    pub const UNKNOWN_MODEL: &str = "unknown_model";
    /// The scheduler is unknown or not enabled here.
    pub const UNKNOWN_SCHEDULER: &str = "unknown_scheduler";
    /// A string is not one of the allowed values.
    pub const INVALID_VALUE: &str = "invalid_value";
    /// A prompt is longer than `limits.max_prompt_chars`.
    pub const TOO_LONG: &str = "too_long";
    /// The prompt is empty or only white space.
    pub const EMPTY: &str = "empty";
    /// An array has the wrong number of items.
    pub const WRONG_LENGTH: &str = "wrong_length";
    /// The style preset is not one this deployment has.
    pub const UNKNOWN_STYLE: &str = "unknown_style";
    /// The field is not part of the contract.
    pub const UNKNOWN_FIELD: &str = "unknown_field";
    /// `version` is not 1.
    pub const UNSUPPORTED_VERSION: &str = "unsupported_version";
    /// The message or its metadata is too large.
    pub const TOO_LARGE: &str = "too_large";
    /// The body is empty.
    pub const EMPTY_BODY: &str = "empty_body";
    /// The body is not JSON (or not UTF-8).
    pub const NOT_JSON: &str = "not_json";
    /// The body is JSON but not an object.
    pub const NOT_OBJECT: &str = "not_object";
    /// The message has no `id`.
    pub const MISSING_ID: &str = "missing_id";
    /// `id` is not a UUID in the hyphenated form.
    pub const INVALID_UUID: &str = "invalid_uuid";
    /// The job asks for a refiner but its model has none configured.
    pub const NO_REFINER: &str = "no_refiner";
}

/// A version 1 job message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobMessage {
    pub version: u64,
    pub id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_2: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt_2: Option<String>,
    /// A style preset of [`crate::styles`], by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub style: Option<String>,
    /// A1111 prompt weighting and chunked long prompts; absent means on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_weighting: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_scale: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_rescale: Option<f64>,
    /// A project id (`euler_a`) or an A1111 name (`Euler a`), case-insensitive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_overrides"
    )]
    pub scheduler_options: Option<SchedulerOverrides>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_images: Option<u32>,
    /// `[height, width]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_size: Option<[u32; 2]>,
    /// `[top, left]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crops_coords_top_left: Option<[u32; 2]>,
    /// `[height, width]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_size: Option<[u32; 2]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    /// Reuse the images of an identical earlier request (`None`: the deployment's setting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// ControlNets and their control images (see [`controlnet`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controlnets: Option<Vec<ControlNetSpec>>,
    /// diffusers' `guess_mode`: ControlNets see only the positive prompt, residuals are scaled
    /// from 0.1 (shallow) to 1 (deep).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guess_mode: Option<bool>,
    /// Image-to-image: denoise from this image instead of pure noise (see [`image`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_image: Option<InitImage>,
    /// How much of the schedule an image-to-image job runs, in (0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    /// Hand the end of the schedule to the model's refiner (see [`refiner`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refiner: Option<RefinerSpec>,
}

/// Scheduler options without the `null` entries of options that were not given.
fn serialize_overrides<S: serde::Serializer>(
    overrides: &Option<SchedulerOverrides>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::{Error, SerializeMap};
    let value = serde_json::to_value(overrides).map_err(S::Error::custom)?;
    let entries: Vec<(String, serde_json::Value)> = match value {
        serde_json::Value::Object(map) => map.into_iter().filter(|(_, v)| !v.is_null()).collect(),
        _ => Vec::new(),
    };
    let mut map = serializer.serialize_map(Some(entries.len()))?;
    for (key, value) in &entries {
        map.serialize_entry(key, value)?;
    }
    map.end()
}

/// One invalid field of a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    /// The field's path (`width`, `scheduler_options.steps_offset`, `original_size[1]`), or
    /// `$` for the message as a whole.
    pub field: String,
    /// A stable code from [`codes`].
    pub code: String,
    /// A sentence for humans.
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, code: &str, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            code: code.to_owned(),
            message: message.into(),
        }
    }
}

/// Why a message was not accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobRejection {
    /// No job id could be read, so no status row can record the rejection.
    #[error("unreadable job message ({code}): {message}")]
    Unreadable { code: &'static str, message: String },
    /// The message has an id but some fields are invalid.
    #[error("invalid job {id}: {}", summarize(.errors))]
    Invalid { id: Uuid, errors: Vec<FieldError> },
}

impl JobRejection {
    /// Stable code: the unreadable reason, or `invalid_request`.
    pub fn code(&self) -> &'static str {
        match self {
            JobRejection::Unreadable { code, .. } => code,
            JobRejection::Invalid { .. } => "invalid_request",
        }
    }
}

/// One line listing field errors, for logs and error messages.
pub fn summarize(errors: &[FieldError]) -> String {
    let parts: Vec<String> = errors
        .iter()
        .map(|e| format!("{}: {} ({})", e.field, e.message, e.code))
        .collect();
    parts.join("; ")
}

/// A message that passed validation, with every default resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidJob {
    pub id: Uuid,
    pub model: String,
    pub priority: u8,
    /// The normalized message: defaults filled in, the scheduler as its project id, the seed
    /// drawn if it was absent. Validating it again yields the same job.
    pub message: JobMessage,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub num_images: u32,
    pub scheduler: SchedulerKind,
}

impl ValidJob {
    /// Whether the job belongs on the high-priority work queue.
    pub fn is_high_priority(&self) -> bool {
        self.priority >= HIGH_PRIORITY_THRESHOLD
    }

    /// The normalized message as JSON (what the status row records as `request`).
    pub fn request_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.message).unwrap_or(serde_json::Value::Null)
    }

    /// The normalized message as bytes, to republish so every attempt sees the same seed.
    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(&self.message).unwrap_or_default()
    }

    /// The image-to-image strength, when the job has an init image.
    pub fn img2img_strength(&self) -> Option<f64> {
        self.message
            .init_image
            .as_ref()
            .map(|_| self.message.strength.unwrap_or(image::DEFAULT_STRENGTH))
    }

    /// The denoising steps that actually run: all of `steps`, or for image-to-image
    /// `⌊steps · strength⌋` as diffusers counts them.
    pub fn steps_run(&self) -> u32 {
        match self.img2img_strength() {
            Some(strength) => crate::engine::img2img::steps_run(self.steps, strength),
            None => self.steps,
        }
    }

    /// The job's prompts with its style preset applied (unchanged without one).
    pub fn styled_prompts(&self) -> StyledPrompts {
        let m = &self.message;
        let style = m
            .style
            .as_deref()
            .and_then(|s| StyleCatalog::builtin().get(s));
        match style {
            Some(style) => style.apply(
                &m.prompt,
                m.prompt_2.as_deref(),
                m.negative_prompt.as_deref(),
                m.negative_prompt_2.as_deref(),
            ),
            None => StyledPrompts {
                prompt: m.prompt.clone(),
                prompt_2: m.prompt_2.clone(),
                negative_prompt: m.negative_prompt.clone(),
                negative_prompt_2: m.negative_prompt_2.clone(),
            },
        }
    }

    /// The base → refiner hand-off the job asks for, with defaults filled in.
    pub fn refine(&self) -> Option<crate::engine::refiner::Refine> {
        self.message.refiner.as_ref().map(RefinerSpec::refine)
    }

    /// The engine request for this job (its style, if any, applied to the prompts).
    pub fn generate_request(&self) -> GenerateRequest {
        let m = &self.message;
        let pair = |p: Option<[u32; 2]>| p.map(|[a, b]| (a, b));
        let texts = self.styled_prompts();
        GenerateRequest {
            prompt: texts.prompt,
            prompt_2: texts.prompt_2,
            negative_prompt: texts.negative_prompt,
            negative_prompt_2: texts.negative_prompt_2,
            width: self.width,
            height: self.height,
            steps: self.steps,
            guidance_scale: m.guidance_scale.unwrap_or(DEFAULT_GUIDANCE_SCALE) as f32,
            guidance_rescale: m.guidance_rescale.unwrap_or(DEFAULT_GUIDANCE_RESCALE) as f32,
            scheduler: self.scheduler,
            scheduler_overrides: m.scheduler_options.clone().unwrap_or_default(),
            seed: self.seed,
            num_images: self.num_images,
            original_size: pair(m.original_size),
            crops_coords_top_left: pair(m.crops_coords_top_left).unwrap_or((0, 0)),
            target_size: pair(m.target_size),
            initial_latents: None,
            controls: GenerationControls {
                prompt_weighting: m.prompt_weighting.unwrap_or(DEFAULT_PROMPT_WEIGHTING),
                ..GenerationControls::default()
            },
        }
    }
}

/// Validate an already-built message (for producers in this crate, such as the CLI).
pub fn validate_message(
    message: &JobMessage,
    limits: &Limits,
    models: &ModelsConfig,
) -> Result<ValidJob, JobRejection> {
    let body = serde_json::to_vec(message).map_err(|e| JobRejection::Unreadable {
        code: codes::NOT_JSON,
        message: e.to_string(),
    })?;
    parse_and_validate(&body, limits, models)
}
