//! Input images of job messages: the three ways a message names an image (a storage key, an
//! https URL where the deployment allows it, inline base64), shared by ControlNet entries and
//! `init_image`, and the image-to-image fields `init_image` and `strength`.
//!
//! Every input image follows the `controlnet.*` image settings: `allow_image_urls`,
//! `max_image_bytes`, `max_image_pixels` and `fetch_timeout_ms`. What can be decided from the
//! message is checked here; fetching and decoding happen in the worker, with the codes of
//! [`ImageCodes`] for the field the image belongs to.
//!
//! Image-to-image policies (see `engine::img2img` for the computation):
//! - `strength` is in (0, 1], 0.8 when absent (diffusers' default), and only valid with an
//!   init image; `⌊steps · strength⌋` steps run and must be at least one.
//! - The output has the job's `width` × `height` (defaults included), as every job: an init
//!   image of another size is resized to it with Pillow's Lanczos filter, as control images are
//!   (diffusers' `VaeImageProcessor.resize`). An image of the job's size is used as it is,
//!   which is what diffusers' img2img pipeline does with it (that pipeline takes its output
//!   size from the image: give `width` and `height` equal to the image's to get that).
//! - ControlNets and an init image are not combined (the engine refuses it), nor is `ddim`.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{codes, FieldError};
use crate::config::ControlNetConfig;

/// Longest `image_key` or `image_url`.
pub const MAX_REFERENCE_CHARS: usize = 2048;
/// `strength` when an init image is given without one (as diffusers).
pub const DEFAULT_STRENGTH: f64 = 0.8;
/// The keys that name an image, in every image object.
pub const SOURCE_FIELDS: [&str; 3] = ["image_key", "image_url", "image_base64"];

/// Codes shared by every input image.
pub mod codes_image {
    /// `image_url` is given but the deployment does not fetch URLs.
    pub const URL_NOT_ALLOWED: &str = "url_not_allowed";
    /// None or several of `image_key`, `image_url`, `image_base64`.
    pub const IMAGE_SOURCE: &str = "image_source";
}

/// Codes specific to `init_image` and `strength`.
pub mod codes_init {
    /// The init image file is larger than `controlnet.max_image_bytes`, or has too many pixels.
    pub const TOO_LARGE: &str = "init_image_too_large";
    /// The init image is not a PNG or JPEG the worker can decode.
    pub const UNREADABLE: &str = "init_image_unreadable";
    /// The init image could not be fetched (no such key, HTTP error, timeout).
    pub const UNAVAILABLE: &str = "init_image_unavailable";
    /// `strength` is given without `init_image`.
    pub const STRENGTH_WITHOUT_INIT_IMAGE: &str = "strength_without_init_image";
    /// `init_image` is combined with `controlnets`.
    pub const WITH_CONTROLNETS: &str = "init_image_with_controlnets";
}

/// The codes a fetched image's problems get, per kind of input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageCodes {
    pub too_large: &'static str,
    pub unreadable: &'static str,
    pub unavailable: &'static str,
}

/// Codes of an init image.
pub const INIT_IMAGE_CODES: ImageCodes = ImageCodes {
    too_large: codes_init::TOO_LARGE,
    unreadable: codes_init::UNREADABLE,
    unavailable: codes_init::UNAVAILABLE,
};

/// Where an input image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource<'a> {
    Key(&'a str),
    Url(&'a str),
    Base64(&'a str),
}

impl<'a> ImageSource<'a> {
    /// The one source among the three fields, `None` unless exactly one is set.
    pub fn of(
        key: &'a Option<String>,
        url: &'a Option<String>,
        base64: &'a Option<String>,
    ) -> Option<Self> {
        match (key, url, base64) {
            (Some(k), None, None) => Some(ImageSource::Key(k)),
            (None, Some(u), None) => Some(ImageSource::Url(u)),
            (None, None, Some(b)) => Some(ImageSource::Base64(b)),
            _ => None,
        }
    }
}

/// The image source fields of an object, as validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceFields {
    pub image_key: Option<String>,
    pub image_url: Option<String>,
    pub image_base64: Option<String>,
}

/// The `init_image` of an image-to-image job: exactly one source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitImage {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_base64: Option<String>,
}

impl InitImage {
    /// The image source (validation guarantees exactly one).
    pub fn source(&self) -> Option<ImageSource<'_>> {
        ImageSource::of(&self.image_key, &self.image_url, &self.image_base64)
    }
}

/// Decode inline base64 (standard alphabet, padding optional, white space ignored).
pub fn decode_base64(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let trimmed = compact.trim_end_matches('=');
    base64::engine::general_purpose::STANDARD_NO_PAD.decode(trimmed)
}

/// Checks the image source fields of the object at `path` (`controlnets[0]`, `init_image`):
/// exactly one source, a relative key, a permitted https URL, decodable base64 within
/// `max_image_bytes` (else `too_large_code`). Errors go to `errors`; the fields are returned
/// as read (each `None` when absent or invalid).
pub(crate) fn check_source(
    path: &str,
    obj: &Map<String, Value>,
    config: &ControlNetConfig,
    too_large_code: &str,
    errors: &mut Vec<FieldError>,
) -> SourceFields {
    let field = |key: &str| {
        if key.is_empty() {
            path.to_owned()
        } else {
            format!("{path}.{key}")
        }
    };
    let mut push = |key: &str, code: &str, message: String| {
        errors.push(FieldError::new(field(key), code, message));
    };
    let mut text = |key: &str| -> Option<String> {
        match obj.get(key).filter(|v| !v.is_null())? {
            Value::String(s) if s.trim().is_empty() => {
                push(key, codes::EMPTY, "must not be empty".to_owned());
                None
            }
            Value::String(s)
                if s.chars().count() > MAX_REFERENCE_CHARS && key != "image_base64" =>
            {
                push(
                    key,
                    codes::TOO_LONG,
                    format!("at most {MAX_REFERENCE_CHARS} characters"),
                );
                None
            }
            Value::String(s) if s.contains('\0') => {
                push(
                    key,
                    codes::INVALID_VALUE,
                    "must not contain NUL characters".to_owned(),
                );
                None
            }
            Value::String(s) => Some(s.clone()),
            _ => {
                push(key, codes::WRONG_TYPE, "expected a string".to_owned());
                None
            }
        }
    };
    let image_key = text("image_key");
    let image_url = text("image_url");
    let image_base64 = text("image_base64");
    let given = SOURCE_FIELDS
        .into_iter()
        .filter(|k| obj.get(*k).is_some_and(|v| !v.is_null()))
        .count();
    if given != 1 {
        push(
            "",
            codes_image::IMAGE_SOURCE,
            format!("give exactly one of image_key, image_url, image_base64 ({given} given)"),
        );
    }
    if let Some(key) = &image_key {
        if key.starts_with('/') || key.split('/').any(|part| part == "..") {
            push(
                "image_key",
                codes::INVALID_VALUE,
                "a storage key is relative and has no `..` parts".to_owned(),
            );
        }
    }
    if let Some(url) = &image_url {
        if !config.allow_image_urls {
            push(
                "image_url",
                codes_image::URL_NOT_ALLOWED,
                "this deployment does not fetch images by URL; use image_key or image_base64"
                    .to_owned(),
            );
        } else if !url.starts_with("https://") || url.len() <= "https://".len() {
            push(
                "image_url",
                codes::INVALID_VALUE,
                "only https:// URLs are fetched".to_owned(),
            );
        }
    }
    if let Some(data) = &image_base64 {
        match decode_base64(data) {
            Ok(bytes) if bytes.len() > config.max_image_bytes => push(
                "image_base64",
                too_large_code,
                format!(
                    "{} bytes; at most {} are accepted",
                    bytes.len(),
                    config.max_image_bytes
                ),
            ),
            Ok(_) => {}
            Err(err) => push(
                "image_base64",
                codes::INVALID_VALUE,
                format!("not valid base64: {err}"),
            ),
        }
    }
    SourceFields {
        image_key,
        image_url,
        image_base64,
    }
}

/// Checks the `init_image` value; `None` when it has errors (pushed to `errors`).
pub(super) fn check_init_image(
    value: &Value,
    config: &ControlNetConfig,
    errors: &mut Vec<FieldError>,
) -> Option<InitImage> {
    let Value::Object(obj) = value else {
        errors.push(FieldError::new(
            "init_image",
            codes::WRONG_TYPE,
            "expected an object with one of image_key, image_url, image_base64",
        ));
        return None;
    };
    let before = errors.len();
    for key in obj.keys().filter(|k| !SOURCE_FIELDS.contains(&k.as_str())) {
        errors.push(FieldError::new(
            format!("init_image.{key}"),
            codes::UNKNOWN_FIELD,
            format!("{key:?} is not a field of init_image"),
        ));
    }
    let fields = check_source("init_image", obj, config, codes_init::TOO_LARGE, errors);
    (errors.len() == before).then_some(InitImage {
        image_key: fields.image_key,
        image_url: fields.image_url,
        image_base64: fields.image_base64,
    })
}

/// The image-to-image part of a message, checked against the rest of it.
pub(super) struct Img2ImgFields<'a> {
    pub init_image: Option<&'a Value>,
    pub strength: Option<&'a Value>,
    pub has_controlnets: bool,
    pub ddim: bool,
    /// The job's steps, when valid.
    pub steps: Option<u32>,
}

/// Checks `init_image` and `strength` together: `(init_image, strength)` normalized (the
/// strength defaulted when an init image is given), `None` on errors.
pub(super) fn check_img2img(
    fields: &Img2ImgFields<'_>,
    config: &ControlNetConfig,
    errors: &mut Vec<FieldError>,
) -> Option<(Option<InitImage>, Option<f64>)> {
    let before = errors.len();
    let init = fields
        .init_image
        .and_then(|v| check_init_image(v, config, errors));
    let strength = match fields.strength {
        None => None,
        Some(value) => match value.as_f64() {
            Some(s) if s > 0.0 && s <= 1.0 => Some(s),
            Some(s) => {
                errors.push(FieldError::new(
                    "strength",
                    codes::OUT_OF_RANGE,
                    format!("{s} is outside (0, 1]"),
                ));
                None
            }
            None => {
                errors.push(FieldError::new(
                    "strength",
                    codes::WRONG_TYPE,
                    "expected a number in (0, 1]",
                ));
                None
            }
        },
    };
    if fields.init_image.is_none() {
        if fields.strength.is_some() {
            errors.push(FieldError::new(
                "strength",
                codes_init::STRENGTH_WITHOUT_INIT_IMAGE,
                "strength applies only to jobs with an init_image",
            ));
        }
        return (errors.len() == before).then_some((None, None));
    }
    if fields.has_controlnets {
        errors.push(FieldError::new(
            "init_image",
            codes_init::WITH_CONTROLNETS,
            "an init image cannot be combined with controlnets",
        ));
    }
    if fields.ddim {
        errors.push(FieldError::new(
            "scheduler",
            codes::UNKNOWN_SCHEDULER,
            "ddim is not offered for image-to-image; choose another scheduler",
        ));
    }
    let resolved = strength.unwrap_or(DEFAULT_STRENGTH);
    if let (Some(steps), true) = (
        fields.steps,
        fields.strength.is_none() || strength.is_some(),
    ) {
        if crate::engine::img2img::steps_run(steps, resolved) == 0 {
            errors.push(FieldError::new(
                "strength",
                codes::OUT_OF_RANGE,
                format!(
                    "{resolved} of {steps} steps runs no step (⌊steps × strength⌋ must be at \
                     least 1); raise strength or steps"
                ),
            ));
        }
    }
    if errors.len() != before {
        return None;
    }
    Some((init, Some(resolved)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decoding_ignores_white_space_and_padding() {
        assert_eq!(decode_base64("aGVs\nbG8=").unwrap(), b"hello");
        assert_eq!(decode_base64("aGVsbG8").unwrap(), b"hello");
        assert!(decode_base64("***").is_err());
    }

    #[test]
    fn one_source_is_required() {
        let config = ControlNetConfig::default();
        let obj: Map<String, Value> =
            serde_json::from_str(r#"{"image_key": "a.png", "image_base64": "aGVsbG8="}"#).unwrap();
        let mut errors = Vec::new();
        check_source("init_image", &obj, &config, "x", &mut errors);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].field, "init_image");
        assert_eq!(errors[0].code, codes_image::IMAGE_SOURCE);
    }
}
