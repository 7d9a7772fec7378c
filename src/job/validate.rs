//! Field-by-field validation of a job message, from raw bytes to a [`ValidJob`].
//!
//! The body is parsed into a `serde_json::Value` first and each field is checked on its own,
//! so a wrong JSON type becomes a field error with a stable code instead of one serde message,
//! and every invalid field is reported at once.

use serde_json::{Map, Value};
use uuid::Uuid;

use super::checker::{as_integer, kind, Checker};
use super::{codes, FieldError, JobMessage, JobRejection, ValidJob};
use crate::config::{ControlNetConfig, Limits, ModelsConfig, FALLBACK_SIDE};
use crate::engine::{SchedulerKind, SchedulerOverrides};
use crate::styles::StyleCatalog;

/// An oversized body is still scanned for its id (to record a `failed` row) up to this many
/// times `limits.max_message_bytes`; beyond that it is unreadable.
const ID_SCAN_FACTOR: usize = 16;

/// Parse and validate a job message body against the deployment's limits and models, for a
/// deployment without ControlNets (see [`parse_and_validate_with`]).
pub fn parse_and_validate(
    body: &[u8],
    limits: &Limits,
    models: &ModelsConfig,
) -> Result<ValidJob, JobRejection> {
    parse_and_validate_with(body, limits, models, &ControlNetConfig::default())
}

/// Parse and validate a job message body against the deployment's limits, models and
/// ControlNets.
pub fn parse_and_validate_with(
    body: &[u8],
    limits: &Limits,
    models: &ModelsConfig,
    controlnet: &ControlNetConfig,
) -> Result<ValidJob, JobRejection> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(unreadable(codes::EMPTY_BODY, "the message body is empty"));
    }
    let too_large = body.len() > limits.max_message_bytes;
    if too_large && body.len() > limits.max_message_bytes.saturating_mul(ID_SCAN_FACTOR) {
        return Err(unreadable(
            codes::TOO_LARGE,
            too_large_text(body.len(), limits),
        ));
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| unreadable(codes::NOT_JSON, format!("the body is not JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(unreadable(
            codes::NOT_OBJECT,
            format!("the message must be a JSON object, found {}", kind(&value)),
        ));
    };
    let id = read_id(&obj)?;
    if too_large {
        let error = FieldError::new(
            super::WHOLE_MESSAGE,
            codes::TOO_LARGE,
            too_large_text(body.len(), limits),
        );
        return Err(invalid(id, vec![error]));
    }
    let mut check = Checker {
        obj: &obj,
        errors: Vec::new(),
        controlnet,
    };
    if !check.version() {
        return Err(invalid(id, check.errors));
    }
    let job = check.fields(id, limits, models);
    check.unknown_fields();
    match job {
        Some(job) if check.errors.is_empty() => Ok(job),
        _ => Err(invalid(id, check.errors)),
    }
}

fn unreadable(code: &'static str, message: impl Into<String>) -> JobRejection {
    JobRejection::Unreadable {
        code,
        message: message.into(),
    }
}

fn invalid(id: Uuid, errors: Vec<FieldError>) -> JobRejection {
    JobRejection::Invalid { id, errors }
}

fn too_large_text(len: usize, limits: &Limits) -> String {
    format!(
        "the message has {len} bytes; at most {} are accepted",
        limits.max_message_bytes
    )
}

fn read_id(obj: &Map<String, Value>) -> Result<Uuid, JobRejection> {
    match obj.get("id") {
        None | Some(Value::Null) => Err(unreadable(codes::MISSING_ID, "the message has no id")),
        Some(Value::String(text)) => parse_uuid(text).ok_or_else(|| {
            unreadable(
                codes::INVALID_UUID,
                format!("id {text:?} is not a hyphenated UUID"),
            )
        }),
        Some(other) => Err(unreadable(
            codes::INVALID_UUID,
            format!("id must be a UUID string, found {}", kind(other)),
        )),
    }
}

/// A UUID in the 36-character hyphenated form, any case.
pub(crate) fn parse_uuid(text: &str) -> Option<Uuid> {
    if text.len() != 36 {
        return None;
    }
    Uuid::try_parse(text).ok()
}

impl<'a> Checker<'a> {
    /// `false` when the version is absent, mistyped or unsupported (other fields are then not
    /// checked: they belong to a contract this build does not know).
    fn version(&mut self) -> bool {
        let Some(value) = self.get("version") else {
            self.push("version", codes::MISSING, "version is required (1)");
            return false;
        };
        match as_integer(value) {
            Some(v) if v == i128::from(super::VERSION) => true,
            Some(v) => {
                let message = format!("version {v} is not supported; this worker accepts 1");
                self.push("version", codes::UNSUPPORTED_VERSION, message);
                false
            }
            None => {
                self.wrong_type("version", "the integer 1", value);
                false
            }
        }
    }

    fn unknown_fields(&mut self) {
        let unknown: Vec<String> = self
            .obj
            .keys()
            .filter(|k| !super::FIELDS.contains(&k.as_str()))
            .cloned()
            .collect();
        for field in unknown {
            let message = format!("{field:?} is not a field of job messages version 1");
            self.push(&field, codes::UNKNOWN_FIELD, message);
        }
    }

    fn fields(&mut self, id: Uuid, limits: &Limits, models: &ModelsConfig) -> Option<ValidJob> {
        let model = self.model(models);
        let prompt = self.prompt(limits);
        let prompt_2 = self.string("prompt_2", limits.max_prompt_chars);
        let negative_prompt = self.string("negative_prompt", limits.max_prompt_chars);
        let negative_prompt_2 = self.string("negative_prompt_2", limits.max_prompt_chars);
        let style = self.style();
        let prompt_weighting = self.boolean("prompt_weighting");
        let width = self.side("width", limits);
        let height = self.side("height", limits);
        let steps = self.integer("steps", limits.min_steps.into(), limits.max_steps.into());
        let guidance_scale = self.number(
            "guidance_scale",
            limits.min_guidance_scale.into(),
            limits.max_guidance_scale.into(),
        );
        let guidance_rescale = self.number("guidance_rescale", 0.0, 1.0);
        let scheduler = self.scheduler(limits);
        let scheduler_options = self.scheduler_options();
        let seed = self.integer("seed", 0, u64::MAX);
        let num_images = self.integer("num_images", 1, limits.max_images.into());
        let original_size = self.pair("original_size", 1, "[height, width]");
        let crops = self.pair("crops_coords_top_left", 0, "[top, left]");
        let target_size = self.pair("target_size", 1, "[height, width]");
        let priority = self.integer("priority", 0, super::MAX_PRIORITY.into());
        let cache = self.boolean("cache");
        let metadata = self.metadata(limits);
        let controlnets = self
            .get("controlnets")
            .and_then(|v| super::controlnet::check(v, self.controlnet, &mut self.errors));
        let img2img = super::image::check_img2img(
            &super::image::Img2ImgFields {
                init_image: self.get("init_image"),
                strength: self.get("strength"),
                has_controlnets: self
                    .get("controlnets")
                    .is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty())),
                ddim: scheduler == Some(SchedulerKind::Ddim),
                steps: match self.get("steps") {
                    None => Some(super::DEFAULT_STEPS),
                    Some(_) => steps.map(|s| s as u32),
                },
            },
            self.controlnet,
            &mut self.errors,
        );
        let guess_mode = match self.get("guess_mode") {
            None => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(other) => {
                self.wrong_type("guess_mode", "true or false", other);
                None
            }
        };

        let model_entry = model.as_deref().and_then(|m| models.get(m));
        let with_controlnets = controlnets.as_ref().is_some_and(|c| !c.is_empty());
        let refiner = self.get("refiner").and_then(|v| {
            super::refiner::check(v, model_entry, with_controlnets, &mut self.errors)
        });
        let with_init_image = self.get("init_image").is_some();
        if refiner.is_some() && with_init_image {
            self.push(
                "refiner",
                codes::INVALID_VALUE,
                "cannot be combined with init_image (image-to-image jobs have no refiner stage)",
            );
        }
        let (default_w, default_h) = model_entry
            .map(|m| m.default_size())
            .unwrap_or((FALLBACK_SIDE, FALLBACK_SIDE));
        let w = width.unwrap_or(default_w);
        let h = height.unwrap_or(default_h);
        if u64::from(w) * u64::from(h) > limits.max_pixels {
            let field = if self.get("width").is_none() && self.get("height").is_some() {
                "height"
            } else {
                "width"
            };
            let message = format!(
                "{w}x{h} is {} pixels; at most {} are accepted",
                u64::from(w) * u64::from(h),
                limits.max_pixels
            );
            self.push(field, codes::TOO_MANY_PIXELS, message);
        }
        let num_images = num_images.unwrap_or(super::DEFAULT_NUM_IMAGES.into()) as u32;
        if let Some(seed) = seed {
            if seed.checked_add(u64::from(num_images) - 1).is_none() {
                let message = "seed + num_images - 1 must fit in an unsigned 64-bit integer";
                self.push("seed", codes::OUT_OF_RANGE, message);
            }
        }
        if !self.errors.is_empty() {
            return None;
        }
        let model = model?;
        let (init_image, strength) = img2img?;
        let scheduler = scheduler.unwrap_or(super::DEFAULT_SCHEDULER);
        let steps = steps.map_or(super::DEFAULT_STEPS, |s| s as u32);
        let seed = seed.unwrap_or_else(draw_seed);
        let priority = priority.map_or(super::DEFAULT_PRIORITY, |p| p as u8);
        let message = JobMessage {
            version: super::VERSION,
            id,
            model: Some(model.clone()),
            prompt: prompt?,
            prompt_2,
            negative_prompt,
            negative_prompt_2,
            style,
            prompt_weighting: Some(prompt_weighting.unwrap_or(super::DEFAULT_PROMPT_WEIGHTING)),
            width: Some(w),
            height: Some(h),
            steps: Some(steps),
            guidance_scale: Some(guidance_scale.unwrap_or(super::DEFAULT_GUIDANCE_SCALE)),
            guidance_rescale: Some(guidance_rescale.unwrap_or(super::DEFAULT_GUIDANCE_RESCALE)),
            scheduler: Some(scheduler.id().to_owned()),
            scheduler_options,
            seed: Some(seed),
            num_images: Some(num_images),
            original_size,
            crops_coords_top_left: crops,
            target_size,
            priority: Some(priority),
            cache,
            metadata,
            guess_mode: controlnets.as_ref().map(|_| guess_mode.unwrap_or(false)),
            controlnets,
            init_image,
            strength,
            refiner: refiner.map(|r| r.normalized()),
        };
        Some(ValidJob {
            id,
            model,
            priority,
            message,
            seed,
            width: w,
            height: h,
            steps,
            num_images,
            scheduler,
        })
    }

    fn model(&mut self, models: &ModelsConfig) -> Option<String> {
        if self.get("model").is_none() {
            return Some(models.default.clone());
        }
        let name = self.string("model", usize::MAX)?;
        if models.get(&name).is_none() {
            let message = format!(
                "unknown model {name:?}; this deployment has: {}",
                models.names().join(", ")
            );
            self.push("model", codes::UNKNOWN_MODEL, message);
            return None;
        }
        Some(name)
    }

    fn prompt(&mut self, limits: &Limits) -> Option<String> {
        if self.get("prompt").is_none() {
            self.push("prompt", codes::MISSING, "prompt is required");
            return None;
        }
        let text = self.string("prompt", limits.max_prompt_chars)?;
        if text.trim().is_empty() {
            self.push("prompt", codes::EMPTY, "prompt must contain some text");
            return None;
        }
        Some(text)
    }

    /// A style preset name, normalized to the preset's own name.
    fn style(&mut self) -> Option<String> {
        let name = self.string("style", usize::MAX)?;
        let catalog = StyleCatalog::builtin();
        match catalog.get(&name) {
            Some(style) => Some(style.name.clone()),
            None => {
                let message = format!(
                    "unknown style {name:?}; this deployment has: {}",
                    catalog.names().join(", ")
                );
                self.push("style", codes::UNKNOWN_STYLE, message);
                None
            }
        }
    }

    fn scheduler(&mut self, limits: &Limits) -> Option<SchedulerKind> {
        let name = self.string("scheduler", usize::MAX)?;
        let enabled: Vec<&str> = limits.schedulers.iter().map(|k| k.id()).collect();
        match SchedulerKind::parse(&name) {
            Some(kind) if limits.schedulers.contains(&kind) => Some(kind),
            Some(kind) => {
                let message = format!(
                    "scheduler {:?} is not enabled here; enabled: {}",
                    kind.id(),
                    enabled.join(", ")
                );
                self.push("scheduler", codes::UNKNOWN_SCHEDULER, message);
                None
            }
            None => {
                let message = format!(
                    "unknown scheduler {name:?}; enabled: {}",
                    enabled.join(", ")
                );
                self.push("scheduler", codes::UNKNOWN_SCHEDULER, message);
                None
            }
        }
    }

    fn scheduler_options(&mut self) -> Option<SchedulerOverrides> {
        let value = self.get("scheduler_options")?;
        let Value::Object(opts) = value else {
            self.wrong_type("scheduler_options", "an object", value);
            return None;
        };
        let before = self.errors.len();
        let mut out = SchedulerOverrides::default();
        for (key, item) in opts {
            let path = format!("scheduler_options.{key}");
            if item.is_null() {
                continue;
            }
            match key.as_str() {
                "timestep_spacing" => out.timestep_spacing = self.choice(&path, item),
                "prediction_type" => out.prediction_type = self.choice(&path, item),
                "steps_offset" => match as_integer(item) {
                    Some(n) if (0..=i128::from(super::MAX_STEPS_OFFSET)).contains(&n) => {
                        out.steps_offset = Some(n as u32)
                    }
                    Some(n) => {
                        let message = format!("{n} is outside 0..={}", super::MAX_STEPS_OFFSET);
                        self.push(&path, codes::OUT_OF_RANGE, message);
                    }
                    None => self.wrong_type(&path, "an integer", item),
                },
                "use_karras_sigmas" => match item {
                    Value::Bool(b) => out.use_karras_sigmas = Some(*b),
                    other => self.wrong_type(&path, "true or false", other),
                },
                _ => {
                    let message = format!("{key:?} is not a scheduler option");
                    self.push(&path, codes::UNKNOWN_FIELD, message);
                }
            }
        }
        (self.errors.len() == before).then_some(out)
    }

    fn metadata(&mut self, limits: &Limits) -> Option<Map<String, Value>> {
        let value = self.get("metadata")?;
        let Value::Object(map) = value else {
            self.wrong_type("metadata", "an object", value);
            return None;
        };
        if contains_nul(value) {
            let message = "metadata must not contain NUL characters (Postgres cannot store them)";
            self.push("metadata", codes::INVALID_VALUE, message);
            return None;
        }
        let size = serde_json::to_vec(map)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        if size > limits.max_metadata_bytes {
            let message = format!(
                "metadata has {size} bytes as compact JSON; at most {} are accepted",
                limits.max_metadata_bytes
            );
            self.push("metadata", codes::TOO_LARGE, message);
            return None;
        }
        Some(map.clone())
    }
}

/// Whether any string or key inside `value` contains a NUL character.
fn contains_nul(value: &Value) -> bool {
    match value {
        Value::String(text) => text.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

/// A random seed below [`super::DRAWN_SEED_BOUND`].
fn draw_seed() -> u64 {
    let (high, _) = Uuid::new_v4().as_u64_pair();
    high % super::DRAWN_SEED_BOUND
}
