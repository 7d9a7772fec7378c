//! The `controlnets` field of job messages: one entry per ControlNet, with its control image
//! given as a storage key, an https URL (where the deployment allows it) or inline base64.
//!
//! Validation here is what can be decided from the message and the configuration: known type,
//! a ControlNet model configured for it, exactly one image source, URL scheme and permission,
//! the size of an inline image, ranges of scale and guidance window, and a preprocessor when
//! `preprocess` is set. Fetching and decoding the image happen in the worker, whose errors
//! (`control_image_too_large`, `control_image_unreadable`, `control_image_unavailable`) fail
//! the job with the entry's field path.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::image::check_source;
use super::{codes, FieldError};
use crate::config::ControlNetConfig;
use crate::engine::canny;
use crate::engine::controlnet::ControlType;

/// Default `conditioning_scale`.
pub const DEFAULT_CONDITIONING_SCALE: f64 = 1.0;
/// Largest `conditioning_scale`.
pub const MAX_CONDITIONING_SCALE: f64 = 4.0;
pub use super::image::{decode_base64, ImageSource, MAX_REFERENCE_CHARS};

/// Fields of one `controlnets` entry.
pub const FIELDS: [&str; 10] = [
    "type",
    "image_key",
    "image_url",
    "image_base64",
    "conditioning_scale",
    "control_guidance_start",
    "control_guidance_end",
    "preprocess",
    "canny_low_threshold",
    "canny_high_threshold",
];

/// Error codes specific to ControlNet entries.
pub mod codes_cn {
    /// `type` is not a ControlNet type this build knows.
    pub const UNKNOWN_TYPE: &str = "unknown_controlnet_type";
    /// No ControlNet model of this type is configured here.
    pub const UNAVAILABLE: &str = "controlnet_unavailable";
    /// `preprocess` is set but nothing here can compute this type from a photo.
    pub const NO_PREPROCESSOR: &str = "preprocessor_unavailable";
    pub use crate::job::image::codes_image::{IMAGE_SOURCE, URL_NOT_ALLOWED};
    /// The image file is larger than `controlnet.max_image_bytes`, or has too many pixels.
    pub const IMAGE_TOO_LARGE: &str = "control_image_too_large";
    /// The image is not a PNG or JPEG the worker can decode.
    pub const IMAGE_UNREADABLE: &str = "control_image_unreadable";
    /// The image could not be fetched (no such key, HTTP error, timeout).
    pub const IMAGE_UNAVAILABLE: &str = "control_image_unavailable";
}

/// Codes of a control image.
pub const CONTROL_IMAGE_CODES: super::image::ImageCodes = super::image::ImageCodes {
    too_large: codes_cn::IMAGE_TOO_LARGE,
    unreadable: codes_cn::IMAGE_UNREADABLE,
    unavailable: codes_cn::IMAGE_UNAVAILABLE,
};

/// One ControlNet of a job, normalized: defaults filled in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlNetSpec {
    #[serde(rename = "type")]
    pub kind: ControlType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_base64: Option<String>,
    pub conditioning_scale: f64,
    pub control_guidance_start: f64,
    pub control_guidance_end: f64,
    pub preprocess: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canny_low_threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canny_high_threshold: Option<u32>,
}

impl ControlNetSpec {
    /// The image source (validation guarantees exactly one).
    pub fn source(&self) -> Option<ImageSource<'_>> {
        ImageSource::of(&self.image_key, &self.image_url, &self.image_base64)
    }

    /// The canny thresholds to use when preprocessing.
    pub fn canny_thresholds(&self) -> (u32, u32) {
        (
            self.canny_low_threshold.unwrap_or(canny::DEFAULT_LOW),
            self.canny_high_threshold.unwrap_or(canny::DEFAULT_HIGH),
        )
    }
}

struct Entry<'a> {
    path: String,
    obj: &'a Map<String, Value>,
    errors: &'a mut Vec<FieldError>,
}

impl Entry<'_> {
    fn push(&mut self, key: &str, code: &str, message: impl Into<String>) {
        let field = if key.is_empty() {
            self.path.clone()
        } else {
            format!("{}.{key}", self.path)
        };
        self.errors.push(FieldError::new(field, code, message));
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn number(&mut self, key: &str, min: f64, max: f64, default: f64) -> Option<f64> {
        let Some(value) = self.get(key) else {
            return Some(default);
        };
        match value.as_f64() {
            Some(x) if (min..=max).contains(&x) => Some(x),
            Some(x) => {
                self.push(
                    key,
                    codes::OUT_OF_RANGE,
                    format!("{x} is outside {min}..={max}"),
                );
                None
            }
            None => {
                self.push(key, codes::WRONG_TYPE, "expected a number");
                None
            }
        }
    }

    fn threshold(&mut self, key: &str) -> Option<Option<u32>> {
        let Some(value) = self.get(key) else {
            return Some(None);
        };
        match value.as_u64() {
            Some(n) if canny::check_thresholds(n.min(u64::from(u32::MAX)) as u32, 0).is_ok() => {
                Some(Some(n as u32))
            }
            Some(n) => {
                self.push(key, codes::OUT_OF_RANGE, format!("{n} is outside 0..=4080"));
                None
            }
            None => {
                self.push(key, codes::WRONG_TYPE, "expected a non-negative integer");
                None
            }
        }
    }
}

/// Check the `controlnets` value; `None` when it has errors (pushed to `errors`).
pub(super) fn check(
    value: &Value,
    config: &ControlNetConfig,
    errors: &mut Vec<FieldError>,
) -> Option<Vec<ControlNetSpec>> {
    let Value::Array(items) = value else {
        errors.push(FieldError::new(
            "controlnets",
            codes::WRONG_TYPE,
            "expected an array of ControlNet entries",
        ));
        return None;
    };
    if items.len() > config.max_units as usize {
        errors.push(FieldError::new(
            "controlnets",
            codes::WRONG_LENGTH,
            format!(
                "{} ControlNets; at most {} are accepted",
                items.len(),
                config.max_units
            ),
        ));
        return None;
    }
    let before = errors.len();
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let path = format!("controlnets[{i}]");
        let Value::Object(obj) = item else {
            errors.push(FieldError::new(
                path,
                codes::WRONG_TYPE,
                "expected an object",
            ));
            continue;
        };
        let mut entry = Entry { path, obj, errors };
        if let Some(spec) = check_entry(&mut entry, config) {
            out.push(spec);
        }
    }
    (errors.len() == before).then_some(out)
}

fn check_entry(e: &mut Entry<'_>, config: &ControlNetConfig) -> Option<ControlNetSpec> {
    for key in e
        .obj
        .keys()
        .filter(|k| !FIELDS.contains(&k.as_str()))
        .cloned()
        .collect::<Vec<_>>()
    {
        e.push(
            &key,
            codes::UNKNOWN_FIELD,
            format!("{key:?} is not a field of ControlNet entries"),
        );
    }
    let known: Vec<&str> = ControlType::ALL.iter().map(|t| t.id()).collect();
    let kind = match e.get("type") {
        None => {
            e.push(
                "type",
                codes::MISSING,
                format!("type is required ({})", known.join(", ")),
            );
            None
        }
        Some(Value::String(s)) => match ControlType::parse(s) {
            Some(kind) if config.has_model(kind) => Some(kind),
            Some(kind) => {
                let loaded: Vec<&str> = config.models.keys().map(|t| t.id()).collect();
                let have = if loaded.is_empty() {
                    "none".to_owned()
                } else {
                    loaded.join(", ")
                };
                e.push(
                    "type",
                    codes_cn::UNAVAILABLE,
                    format!("no {kind} ControlNet is configured here (available: {have})"),
                );
                None
            }
            None => {
                e.push(
                    "type",
                    codes_cn::UNKNOWN_TYPE,
                    format!("unknown ControlNet type {s:?}; known: {}", known.join(", ")),
                );
                None
            }
        },
        Some(_) => {
            e.push("type", codes::WRONG_TYPE, "expected a string");
            None
        }
    };
    let fields = check_source(
        &e.path,
        e.obj,
        config,
        codes_cn::IMAGE_TOO_LARGE,
        &mut *e.errors,
    );
    let (image_key, image_url, image_base64) =
        (fields.image_key, fields.image_url, fields.image_base64);
    let scale = e.number(
        "conditioning_scale",
        0.0,
        MAX_CONDITIONING_SCALE,
        DEFAULT_CONDITIONING_SCALE,
    );
    let start = e.number("control_guidance_start", 0.0, 1.0, 0.0);
    let end = e.number("control_guidance_end", 0.0, 1.0, 1.0);
    if let (Some(s), Some(en)) = (start, end) {
        if s >= en {
            e.push(
                "control_guidance_end",
                codes::OUT_OF_RANGE,
                format!("must be greater than control_guidance_start ({s})"),
            );
        }
    }
    let preprocess = match e.get("preprocess") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            e.push("preprocess", codes::WRONG_TYPE, "expected true or false");
            false
        }
    };
    if let Some(kind) = kind {
        if preprocess && !config.can_preprocess(kind) {
            e.push("preprocess", codes_cn::NO_PREPROCESSOR, format!("no {kind} preprocessor is configured here; send an already-processed control image"));
        }
    }
    let low = e.threshold("canny_low_threshold");
    let high = e.threshold("canny_high_threshold");
    let has_thresholds =
        e.get("canny_low_threshold").is_some() || e.get("canny_high_threshold").is_some();
    if has_thresholds && (kind != Some(ControlType::Canny) || !preprocess) && kind.is_some() {
        e.push(
            "canny_low_threshold",
            codes::INVALID_VALUE,
            "canny thresholds apply only to canny entries with preprocess: true",
        );
    }
    Some(ControlNetSpec {
        kind: kind?,
        image_key,
        image_url,
        image_base64,
        conditioning_scale: scale?,
        control_guidance_start: start?,
        control_guidance_end: end?,
        preprocess,
        canny_low_threshold: low?,
        canny_high_threshold: high?,
    })
}
