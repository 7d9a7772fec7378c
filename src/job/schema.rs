//! The JSON Schema (draft 2020-12) of job messages version 1.
//!
//! The schema is generated from the same constants and [`Limits`] the validator uses;
//! `schema/job-v1.json` is the schema for the default limits, committed so producers can read
//! it, and a test fails when the two differ (`SDXL_UPDATE_SCHEMA=1` rewrites the file). A
//! deployment serves [`json_schema`] with its own limits and model names.
//!
//! A few rules cannot be written in JSON Schema and are checked only by the validator: the
//! pixel budget (`width × height`), the size of `metadata`, `seed + num_images - 1` fitting in
//! 64 bits, a prompt of only white space, NUL characters in text (Postgres cannot store them),
//! scheduler names in another letter case, and for `controlnets`: exactly one image source,
//! `control_guidance_start < control_guidance_end`, and which types this deployment has; for
//! `init_image`: exactly one image source, `strength` only with an init image and running at
//! least one step, no `controlnets` or `ddim` beside it; for `refiner`: whether the job's model
//! has one, and that it is not combined with `controlnets` or `init_image`.

use serde_json::{json, Value};

use super::{
    DEFAULT_GUIDANCE_RESCALE, DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_IMAGES, DEFAULT_PRIORITY,
    DEFAULT_PROMPT_WEIGHTING, DEFAULT_SCHEDULER, DEFAULT_STEPS, MAX_CONDITIONING_SIDE,
    MAX_PRIORITY, MAX_STEPS_OFFSET,
};
use crate::config::{Limits, ModelsConfig, FALLBACK_SIDE};
use crate::engine::refiner::{
    DEFAULT_AESTHETIC_SCORE, DEFAULT_HANDOFF, DEFAULT_NEGATIVE_AESTHETIC_SCORE,
};

/// Path of the committed schema, relative to the crate root.
pub const SCHEMA_PATH: &str = "schema/job-v1.json";

/// The schema's `$id`.
pub const SCHEMA_ID: &str = "urn:sdxl-worker:schema:job-v1";

/// The committed schema file's text.
pub fn committed_text() -> &'static str {
    include_str!("../../schema/job-v1.json")
}

/// The schema of version 1 messages under `limits`; with `models`, `model` is restricted to
/// their names.
pub fn json_schema(limits: &Limits, models: Option<&ModelsConfig>) -> Value {
    let mut model = json!({
        "type": ["string", "null"],
        "minLength": 1,
        "description": "Model name; absent means the deployment's default model."
    });
    if let Some(models) = models {
        let mut names: Vec<Value> = models.names().into_iter().map(|n| json!(n)).collect();
        names.push(Value::Null);
        model["enum"] = Value::Array(names);
    }
    let mut schedulers: Vec<&str> = Vec::new();
    for kind in &limits.schedulers {
        schedulers.push(kind.id());
        schedulers.push(kind.a1111_name());
    }
    let prompt_max = limits.max_prompt_chars;
    let side = json!({
        "type": ["integer", "null"],
        "minimum": limits.min_side,
        "maximum": limits.max_side,
        "multipleOf": 8,
        "description": format!(
            "Pixels; absent means the model's default ({FALLBACK_SIDE} unless configured). \
             width x height must not exceed {} pixels.",
            limits.max_pixels
        ),
    });
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "sdxl-worker job message, version 1",
        "description": "A text-to-image job. Fields not listed here are rejected \
            (unknown_field); null means the same as leaving a field out. Producers choose the \
            id, so they can poll the job's status row at once and publishing twice is harmless.",
        "type": "object",
        "additionalProperties": false,
        "required": ["version", "id", "prompt"],
        "properties": {
            "version": { "const": 1, "description": "Message version; always 1." },
            "id": {
                "type": "string",
                "pattern": "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
                "description": "Job id chosen by the producer: a UUID in the hyphenated form."
            },
            "model": model,
            "prompt": {
                "type": "string",
                "minLength": 1,
                "maxLength": prompt_max,
                "pattern": "\\S",
                "description": "Prompt (both text encoders unless prompt_2 is given)."
            },
            "prompt_2": text_field(prompt_max, "Prompt of the second text encoder; absent uses prompt."),
            "negative_prompt": text_field(prompt_max, "Negative prompt; absent means none (zero embeddings)."),
            "negative_prompt_2": text_field(prompt_max, "Negative prompt of the second text encoder; absent uses negative_prompt."),
            "style": {
                "type": ["string", "null"],
                "enum": crate::styles::StyleCatalog::builtin().names().into_iter().map(|s| json!(s)).chain([Value::Null]).collect::<Vec<_>>(),
                "description": "Style preset (config/styles.toml): its template wraps the prompt and its negative prompt comes before the job's. Letter case, spaces and hyphens are ignored."
            },
            "prompt_weighting": {
                "type": ["boolean", "null"],
                "default": DEFAULT_PROMPT_WEIGHTING,
                "description": "Read prompts with A1111's weighting syntax ((word), [word], (word:1.3), BREAK) and encode prompts longer than 75 tokens in 75-token chunks; false: plain diffusers encoding, truncated to 77 tokens."
            },
            "width": side.clone(),
            "height": side,
            "steps": int_field(limits.min_steps, limits.max_steps, DEFAULT_STEPS, "Denoising steps."),
            "guidance_scale": {
                "type": ["number", "null"],
                "minimum": limits.min_guidance_scale,
                "maximum": limits.max_guidance_scale,
                "default": DEFAULT_GUIDANCE_SCALE,
                "description": "Classifier-free guidance scale."
            },
            "guidance_rescale": {
                "type": ["number", "null"],
                "minimum": 0.0,
                "maximum": 1.0,
                "default": DEFAULT_GUIDANCE_RESCALE,
                "description": "Guidance rescale (0 disables it)."
            },
            "scheduler": {
                "type": ["string", "null"],
                "enum": schedulers.iter().map(|s| json!(s)).chain([Value::Null]).collect::<Vec<_>>(),
                "default": DEFAULT_SCHEDULER.id(),
                "description": "Scheduler: a project id or its A1111 name (letter case is ignored)."
            },
            "scheduler_options": scheduler_options(),
            "seed": {
                "type": ["integer", "null"],
                "minimum": 0,
                "maximum": u64::MAX,
                "description": "Seed of image 0 (image i uses seed + i); absent means drawn at intake and recorded."
            },
            "num_images": int_field(1, limits.max_images, DEFAULT_NUM_IMAGES, "Images in this job."),
            "original_size": pair_field(1, "[height, width] micro-conditioning; absent means [height, width]."),
            "crops_coords_top_left": pair_field(0, "[top, left] micro-conditioning; absent means [0, 0]."),
            "target_size": pair_field(1, "[height, width] micro-conditioning; absent means [height, width]."),
            "priority": int_field(0, u32::from(MAX_PRIORITY), u32::from(DEFAULT_PRIORITY), "0 (lowest) to 9; 5 and above take the high-priority queue."),
            "cache": {
                "type": ["boolean", "null"],
                "description": "Reuse the stored images of an earlier identical request (same model files, every parameter and the seed) instead of running again; absent means the deployment's worker.result_cache setting. Jobs with ControlNets never use the cache."
            },
            "metadata": {
                "type": ["object", "null"],
                "description": format!(
                    "Free JSON object stored with the job, at most {} bytes as compact JSON.",
                    limits.max_metadata_bytes
                )
            },
            "controlnets": controlnets(),
            "guess_mode": {
                "type": ["boolean", "null"],
                "default": false,
                "description": "ControlNets see only the positive prompt and their residuals are scaled from 0.1 (shallow blocks) to 1 (deep), as diffusers' guess_mode."
            },
            "init_image": init_image(),
            "strength": {
                "type": ["number", "null"],
                "exclusiveMinimum": 0.0,
                "maximum": 1.0,
                "default": super::image::DEFAULT_STRENGTH,
                "description": "Image-to-image only (strength_without_init_image otherwise): the last floor(steps x strength) of the steps run, starting from the init image with noise added; 1 keeps little of the image, small values stay close to it. At least one step must run."
            },
            "refiner": refiner_schema()
        },
        "examples": examples()
    })
}

fn refiner_schema() -> Value {
    let max = super::refiner::MAX_AESTHETIC_SCORE;
    json!({
        "type": ["object", "null"],
        "additionalProperties": false,
        "description": "Quality boost: the base model runs the first part of the steps and hands its latents to the model's SDXL refiner, which runs the rest with its own scheduler and decodes the image (diffusers' denoising_end / denoising_start hand-off). {} uses the defaults; absent or null means no refiner. The model must have a refiner configured (no_refiner otherwise); not combined with controlnets or init_image.",
        "properties": {
            "handoff": {
                "type": ["number", "null"],
                "exclusiveMinimum": 0,
                "exclusiveMaximum": 1,
                "default": DEFAULT_HANDOFF,
                "description": "Share of the steps the base runs before the refiner takes over (diffusers' denoising_end of the base and denoising_start of the refiner). A value that leaves either stage no step for the job's scheduler and steps fails the job with invalid_request."
            },
            "aesthetic_score": {
                "type": ["number", "null"],
                "minimum": 0,
                "maximum": max,
                "default": f64::from(DEFAULT_AESTHETIC_SCORE),
                "description": "Aesthetic score the refiner is conditioned on (positive prompt)."
            },
            "negative_aesthetic_score": {
                "type": ["number", "null"],
                "minimum": 0,
                "maximum": max,
                "default": f64::from(DEFAULT_NEGATIVE_AESTHETIC_SCORE),
                "description": "Aesthetic score of the negative conditioning."
            }
        }
    })
}

fn text_field(max: usize, description: &str) -> Value {
    json!({ "type": ["string", "null"], "maxLength": max, "description": description })
}

fn int_field(min: u32, max: u32, default: u32, description: &str) -> Value {
    json!({
        "type": ["integer", "null"],
        "minimum": min,
        "maximum": max,
        "default": default,
        "description": description
    })
}

fn pair_field(min: u32, description: &str) -> Value {
    json!({
        "type": ["array", "null"],
        "items": { "type": "integer", "minimum": min, "maximum": MAX_CONDITIONING_SIDE },
        "minItems": 2,
        "maxItems": 2,
        "description": description
    })
}

fn controlnets() -> Value {
    use super::controlnet::{
        DEFAULT_CONDITIONING_SCALE, MAX_CONDITIONING_SCALE, MAX_REFERENCE_CHARS,
    };
    let types: Vec<Value> = crate::engine::controlnet::ControlType::ALL
        .iter()
        .map(|t| json!(t.id()))
        .collect();
    json!({
        "type": ["array", "null"],
        "description": "ControlNets applied to this job (their residuals are summed). Each type needs a ControlNet configured by the deployment (controlnet_unavailable otherwise); at most controlnet.max_units entries.",
        "items": {
            "type": "object",
            "additionalProperties": false,
            "required": ["type"],
            "properties": {
                "type": { "enum": types, "description": "Control type." },
                "image_key": { "type": ["string", "null"], "minLength": 1, "maxLength": MAX_REFERENCE_CHARS, "description": "Control image (PNG or JPEG) as a key in the deployment's storage, under its prefix. Exactly one of image_key, image_url, image_base64." },
                "image_url": { "type": ["string", "null"], "pattern": "^https://", "maxLength": MAX_REFERENCE_CHARS, "description": "Control image as an https URL; only where controlnet.allow_image_urls is set." },
                "image_base64": { "type": ["string", "null"], "minLength": 1, "description": "Control image file inline, base64 (standard alphabet), at most controlnet.max_image_bytes once decoded." },
                "conditioning_scale": { "type": ["number", "null"], "minimum": 0.0, "maximum": MAX_CONDITIONING_SCALE, "default": DEFAULT_CONDITIONING_SCALE, "description": "Multiplier of this ControlNet's residuals." },
                "control_guidance_start": { "type": ["number", "null"], "minimum": 0.0, "maximum": 1.0, "default": 0.0, "description": "Fraction of the steps before which this ControlNet is off." },
                "control_guidance_end": { "type": ["number", "null"], "minimum": 0.0, "maximum": 1.0, "default": 1.0, "description": "Fraction of the steps after which this ControlNet is off; greater than control_guidance_start." },
                "preprocess": { "type": ["boolean", "null"], "default": false, "description": "The image is a plain photo: compute the control image (canny edges built in; depth and openpose need a configured preprocessor). false: the image is already a control image." },
                "canny_low_threshold": { "type": ["integer", "null"], "minimum": 0, "maximum": 4080, "default": crate::engine::canny::DEFAULT_LOW, "description": "Canny hysteresis low threshold (canny with preprocess only)." },
                "canny_high_threshold": { "type": ["integer", "null"], "minimum": 0, "maximum": 4080, "default": crate::engine::canny::DEFAULT_HIGH, "description": "Canny hysteresis high threshold (canny with preprocess only)." }
            }
        }
    })
}

fn init_image() -> Value {
    use super::image::MAX_REFERENCE_CHARS;
    json!({
        "type": ["object", "null"],
        "additionalProperties": false,
        "description": "Image-to-image: denoise from this image (PNG or JPEG) instead of pure noise, as diffusers' StableDiffusionXLImg2ImgPipeline. Exactly one of image_key, image_url, image_base64, under the controlnet.* image settings (allow_image_urls, max_image_bytes, max_image_pixels). The output has the job's width x height (defaults included); an image of another size is resized to it with Pillow's Lanczos filter, as control images are. Not combined with controlnets or the ddim scheduler.",
        "properties": {
            "image_key": { "type": ["string", "null"], "minLength": 1, "maxLength": MAX_REFERENCE_CHARS, "description": "The image as a key in the deployment's storage, under its prefix." },
            "image_url": { "type": ["string", "null"], "pattern": "^https://", "maxLength": MAX_REFERENCE_CHARS, "description": "The image as an https URL; only where controlnet.allow_image_urls is set." },
            "image_base64": { "type": ["string", "null"], "minLength": 1, "description": "The image file inline, base64 (standard alphabet), at most controlnet.max_image_bytes once decoded." }
        }
    })
}

fn scheduler_options() -> Value {
    json!({
        "type": ["object", "null"],
        "additionalProperties": false,
        "description": "Changes to the model's scheduler configuration for this job.",
        "properties": {
            "timestep_spacing": {
                "enum": ["leading", "trailing", "linspace", null],
                "description": "How inference timesteps are spread over the training timesteps."
            },
            "steps_offset": {
                "type": ["integer", "null"],
                "minimum": 0,
                "maximum": MAX_STEPS_OFFSET
            },
            "prediction_type": { "enum": ["epsilon", "v_prediction", null] },
            "use_karras_sigmas": { "type": ["boolean", "null"] }
        }
    })
}

/// Valid example messages (also listed in the schema's `examples`).
pub fn examples() -> Vec<Value> {
    vec![
        json!({
            "version": 1,
            "id": "0b7e4c1a-6d2f-4f8e-9a51-3c2d7e9f1a00",
            "prompt": "a lighthouse on a cliff at dawn, oil painting"
        }),
        json!({
            "version": 1,
            "id": "5f0c2b9e-8a47-4d1b-b3e6-1f9a2c7d4e11",
            "model": "tiny-sdxl",
            "prompt": "portrait of an astronaut, studio lighting",
            "prompt_2": "highly detailed, 85mm",
            "negative_prompt": "blurry, low quality",
            "negative_prompt_2": "text, watermark",
            "style": "cinematic",
            "prompt_weighting": true,
            "width": 832,
            "height": 1216,
            "steps": 25,
            "guidance_scale": 6.5,
            "guidance_rescale": 0.7,
            "scheduler": "DPM++ 2M Karras",
            "scheduler_options": { "timestep_spacing": "trailing", "steps_offset": 0 },
            "seed": 1234567890,
            "num_images": 2,
            "original_size": [1216, 832],
            "crops_coords_top_left": [0, 0],
            "target_size": [1216, 832],
            "priority": 7,
            "cache": true,
            "metadata": { "customer": "acme", "tags": ["space", "portrait"] },
            "controlnets": [],
            "guess_mode": false,
            "init_image": { "image_key": "uploads/sketch-832x1216.png" },
            "strength": 0.6
        }),
        json!({
            "version": 1,
            "id": "5e0c2b8a-91d4-4c6f-b7a3-2f8e1d6c4b90",
            "prompt": "a red fox in fresh snow, golden hour, telephoto",
            "refiner": { "handoff": 0.8, "aesthetic_score": 6.0, "negative_aesthetic_score": 2.5 }
        }),
        json!({
            "version": 1,
            "id": "c3a1e7d2-2b5f-4a9c-8e13-6d4f0b2a9c22",
            "prompt": "a bowl of ramen, photo",
            "negative_prompt": null,
            "scheduler": "euler_a",
            "seed": 42
        }),
    ]
}
