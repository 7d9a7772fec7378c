//! Control images of a job: fetched from storage, an https URL or the message itself, checked
//! against `controlnet.max_image_bytes` and `max_image_pixels`, and decoded (PNG or JPEG) to
//! RGB for the engine, which knows nothing of where they came from.

use std::time::Duration;

use crate::config::ControlNetConfig;
use crate::engine::canny;
use crate::engine::control_image::ControlImage;
use crate::engine::controlnet::{
    ControlNetPaths, ControlNets, ControlRequest, ControlType, ControlUnit,
};
use crate::engine::EngineError;
use crate::job::controlnet::{codes_cn, decode_base64, ImageSource};
use crate::job::ControlNetSpec;
use crate::storage::Storage;

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
    fn new(index: usize, code: &'static str, message: impl Into<String>) -> Self {
        ControlImageError {
            index,
            code,
            message: message.into(),
            retryable: false,
            source: None,
        }
    }

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
        let bytes = fetch(index, spec, storage, config).await?;
        if bytes.len() > config.max_image_bytes {
            return Err(ControlImageError::new(
                index,
                codes_cn::IMAGE_TOO_LARGE,
                format!(
                    "the image has {} bytes; at most {} are accepted",
                    bytes.len(),
                    config.max_image_bytes
                ),
            ));
        }
        let image = decode(&bytes, config.max_image_pixels)
            .map_err(|(code, message)| ControlImageError::new(index, code, message))?;
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

async fn fetch(
    index: usize,
    spec: &ControlNetSpec,
    storage: &Storage,
    config: &ControlNetConfig,
) -> Result<Vec<u8>, ControlImageError> {
    let timeout = Duration::from_millis(config.fetch_timeout_ms.max(1));
    let unavailable =
        |message: String,
         retryable: bool,
         source: Option<Box<dyn std::error::Error + Send + Sync>>| ControlImageError {
            index,
            code: codes_cn::IMAGE_UNAVAILABLE,
            message,
            retryable,
            source,
        };
    match spec.source() {
        Some(ImageSource::Base64(text)) => decode_base64(text).map_err(|e| {
            ControlImageError::new(
                index,
                codes_cn::IMAGE_UNREADABLE,
                format!("image_base64 is not valid base64: {e}"),
            )
        }),
        Some(ImageSource::Key(key)) => {
            match tokio::time::timeout(timeout, storage.get(&format!("{}{key}", storage.prefix())))
                .await
            {
                Ok(Ok(bytes)) => Ok(bytes.to_vec()),
                Ok(Err(err)) => {
                    let retryable = err.is_retryable();
                    Err(unavailable(
                        format!("cannot read image_key {key:?}: {err}"),
                        retryable,
                        Some(Box::new(err)),
                    ))
                }
                Err(_) => Err(unavailable(
                    format!(
                        "reading image_key {key:?} took longer than {} ms",
                        timeout.as_millis()
                    ),
                    true,
                    None,
                )),
            }
        }
        Some(ImageSource::Url(url)) => {
            if !config.allow_image_urls || !url.starts_with("https://") {
                return Err(ControlImageError::new(
                    index,
                    codes_cn::URL_NOT_ALLOWED,
                    "control image URLs are not fetched here",
                ));
            }
            fetch_url(url, timeout, config.max_image_bytes)
                .await
                .map_err(|(message, retryable)| unavailable(message, retryable, None))
        }
        None => Err(ControlImageError::new(
            index,
            codes_cn::IMAGE_SOURCE,
            "give exactly one of image_key, image_url, image_base64",
        )),
    }
}

/// GET `url` over https, reading at most `limit + 1` bytes; `Err((message, retryable))`.
async fn fetch_url(url: &str, timeout: Duration, limit: usize) -> Result<Vec<u8>, (String, bool)> {
    let client = reqwest::Client::builder()
        .https_only(true)
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::limited(3))
        .build()
        .map_err(|e| (format!("cannot build an HTTP client: {e}"), false))?;
    let mut response = client.get(url).send().await.map_err(|e| {
        (
            format!("cannot fetch image_url: {e}"),
            e.is_timeout() || e.is_connect(),
        )
    })?;
    let status = response.status();
    if !status.is_success() {
        return Err((
            format!("image_url answered HTTP {status}"),
            status.is_server_error(),
        ));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| (format!("reading image_url failed: {e}"), true))?
    {
        body.extend_from_slice(&chunk);
        if body.len() > limit {
            break;
        }
    }
    Ok(body)
}

/// Decode a PNG or JPEG file to RGB (alpha dropped, grey repeated), refusing more than
/// `max_pixels`. `Err((code, message))`.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<ControlImage, (&'static str, String)> {
    let unreadable = |message: String| (codes_cn::IMAGE_UNREADABLE, message);
    let too_many = |w: u32, h: u32| {
        (
            codes_cn::IMAGE_TOO_LARGE,
            format!("the image is {w}x{h}; at most {max_pixels} pixels are accepted"),
        )
    };
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
        let mut reader = decoder
            .read_info()
            .map_err(|e| unreadable(format!("invalid PNG: {e}")))?;
        let (w, h) = (reader.info().width, reader.info().height);
        if u64::from(w) * u64::from(h) > max_pixels {
            return Err(too_many(w, h));
        }
        let size = reader
            .output_buffer_size()
            .ok_or_else(|| unreadable("PNG too large to decode".to_owned()))?;
        let mut buf = vec![0u8; size];
        let frame = reader
            .next_frame(&mut buf)
            .map_err(|e| unreadable(format!("invalid PNG: {e}")))?;
        let data = &buf[..frame.buffer_size()];
        let rgb: Vec<u8> = match frame.color_type {
            png::ColorType::Rgb => data.to_vec(),
            png::ColorType::Rgba => data
                .chunks_exact(4)
                .flat_map(|p| [p[0], p[1], p[2]])
                .collect(),
            png::ColorType::Grayscale => data.iter().flat_map(|&g| [g, g, g]).collect(),
            png::ColorType::GrayscaleAlpha => data
                .chunks_exact(2)
                .flat_map(|p| [p[0], p[0], p[0]])
                .collect(),
            png::ColorType::Indexed => return Err(unreadable("unexpanded palette PNG".to_owned())),
        };
        return ControlImage::new(w, h, rgb).map_err(|e| unreadable(e.to_string()));
    }
    if bytes.starts_with(&[0xFF, 0xD8]) {
        let mut decoder = jpeg_decoder::Decoder::new(std::io::Cursor::new(bytes));
        decoder
            .read_info()
            .map_err(|e| unreadable(format!("invalid JPEG: {e}")))?;
        let info = decoder
            .info()
            .ok_or_else(|| unreadable("invalid JPEG header".to_owned()))?;
        let (w, h) = (u32::from(info.width), u32::from(info.height));
        if u64::from(w) * u64::from(h) > max_pixels {
            return Err(too_many(w, h));
        }
        let data = decoder
            .decode()
            .map_err(|e| unreadable(format!("invalid JPEG: {e}")))?;
        let rgb: Vec<u8> = match info.pixel_format {
            jpeg_decoder::PixelFormat::RGB24 => data,
            jpeg_decoder::PixelFormat::L8 => data.iter().flat_map(|&g| [g, g, g]).collect(),
            jpeg_decoder::PixelFormat::L16 => data
                .chunks_exact(2)
                .flat_map(|p| [p[0], p[0], p[0]])
                .collect(),
            jpeg_decoder::PixelFormat::CMYK32 => data
                .chunks_exact(4)
                .flat_map(|p| {
                    let k = u16::from(p[3]);
                    [p[0], p[1], p[2]].map(|c| ((u16::from(c) * k) / 255) as u8)
                })
                .collect(),
        };
        return ControlImage::new(w, h, rgb).map_err(|e| unreadable(e.to_string()));
    }
    Err(unreadable("the image is neither PNG nor JPEG".to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_bytes(w: u32, h: u32, color: png::ColorType, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, w, h);
        encoder.set_color(color);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(data).unwrap();
        writer.finish().unwrap();
        out
    }

    #[test]
    fn png_variants_decode_to_rgb() {
        let rgba = png_bytes(2, 1, png::ColorType::Rgba, &[1, 2, 3, 9, 4, 5, 6, 0]);
        assert_eq!(decode(&rgba, 100).unwrap().rgb, vec![1, 2, 3, 4, 5, 6]);
        let gray = png_bytes(2, 1, png::ColorType::Grayscale, &[7, 200]);
        assert_eq!(
            decode(&gray, 100).unwrap().rgb,
            vec![7, 7, 7, 200, 200, 200]
        );
    }

    #[test]
    fn too_many_pixels_and_garbage_have_their_codes() {
        let big = png_bytes(4, 4, png::ColorType::Grayscale, &[0; 16]);
        assert_eq!(decode(&big, 15).unwrap_err().0, codes_cn::IMAGE_TOO_LARGE);
        assert_eq!(
            decode(b"GIF89a....", 100).unwrap_err().0,
            codes_cn::IMAGE_UNREADABLE
        );
        let mut broken = big.clone();
        broken.truncate(30);
        assert_eq!(
            decode(&broken, 100).unwrap_err().0,
            codes_cn::IMAGE_UNREADABLE
        );
        assert_eq!(
            decode(&[0xFF, 0xD8, 0xFF, 0x00], 100).unwrap_err().0,
            codes_cn::IMAGE_UNREADABLE
        );
    }
}
