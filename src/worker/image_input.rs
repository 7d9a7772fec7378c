//! Input images of jobs (control images, init images): fetched from storage, an https URL or
//! the message itself, checked against `controlnet.max_image_bytes` and `max_image_pixels`,
//! and decoded (PNG or JPEG) to RGB; an init image is then resized to the job's size. Errors
//! carry the codes of the field they belong to ([`ImageCodes`]).

use std::time::Duration;

use crate::config::ControlNetConfig;
use crate::engine::control_image::ControlImage;
use crate::engine::img2img::{Img2Img, RgbImage};
use crate::job::image::{
    codes_image, decode_base64, ImageCodes, ImageSource, InitImage, INIT_IMAGE_CODES,
};
use crate::storage::Storage;

/// Why an input image could not be used, with the code for its field.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ImageInputError {
    pub code: &'static str,
    pub message: String,
    /// Whether another attempt may succeed (storage or network trouble).
    pub retryable: bool,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ImageInputError {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        ImageInputError {
            code,
            message: message.into(),
            retryable: false,
            source: None,
        }
    }
}

/// Fetch, check and decode the image of `source`.
pub async fn load(
    source: Option<ImageSource<'_>>,
    storage: &Storage,
    config: &ControlNetConfig,
    codes: ImageCodes,
) -> Result<ControlImage, ImageInputError> {
    let bytes = fetch(source, storage, config, codes).await?;
    if bytes.len() > config.max_image_bytes {
        return Err(ImageInputError::new(
            codes.too_large,
            format!(
                "the image has {} bytes; at most {} are accepted",
                bytes.len(),
                config.max_image_bytes
            ),
        ));
    }
    decode(&bytes, config.max_image_pixels, codes)
        .map_err(|(code, message)| ImageInputError::new(code, message))
}

/// The init image of an image-to-image job, fetched, decoded and resized to the job's size
/// when it has another (Pillow's Lanczos, as for control images).
pub async fn load_init(
    init: &InitImage,
    strength: f64,
    (width, height): (u32, u32),
    storage: &Storage,
    config: &ControlNetConfig,
) -> Result<Img2Img, ImageInputError> {
    let mut image = load(init.source(), storage, config, INIT_IMAGE_CODES).await?;
    if (image.width, image.height) != (width, height) {
        image = image.resized(width, height);
    }
    Ok(Img2Img {
        image: RgbImage {
            width: image.width,
            height: image.height,
            rgb: image.rgb,
        },
        strength,
    })
}

async fn fetch(
    source: Option<ImageSource<'_>>,
    storage: &Storage,
    config: &ControlNetConfig,
    codes: ImageCodes,
) -> Result<Vec<u8>, ImageInputError> {
    let timeout = Duration::from_millis(config.fetch_timeout_ms.max(1));
    let unavailable =
        |message: String,
         retryable: bool,
         source: Option<Box<dyn std::error::Error + Send + Sync>>| ImageInputError {
            code: codes.unavailable,
            message,
            retryable,
            source,
        };
    match source {
        Some(ImageSource::Base64(text)) => decode_base64(text).map_err(|e| {
            ImageInputError::new(
                codes.unreadable,
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
                return Err(ImageInputError::new(
                    codes_image::URL_NOT_ALLOWED,
                    "image URLs are not fetched here",
                ));
            }
            fetch_url(url, timeout, config.max_image_bytes)
                .await
                .map_err(|(message, retryable)| unavailable(message, retryable, None))
        }
        None => Err(ImageInputError::new(
            codes_image::IMAGE_SOURCE,
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
/// `max_pixels`. `Err((code, message))` with the code from `codes`.
pub fn decode(
    bytes: &[u8],
    max_pixels: u64,
    codes: ImageCodes,
) -> Result<ControlImage, (&'static str, String)> {
    let unreadable = |message: String| (codes.unreadable, message);
    let too_many = |w: u32, h: u32| {
        (
            codes.too_large,
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
    use crate::job::controlnet::{codes_cn, CONTROL_IMAGE_CODES as C};

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
        assert_eq!(decode(&rgba, 100, C).unwrap().rgb, vec![1, 2, 3, 4, 5, 6]);
        let gray = png_bytes(2, 1, png::ColorType::Grayscale, &[7, 200]);
        assert_eq!(
            decode(&gray, 100, C).unwrap().rgb,
            vec![7, 7, 7, 200, 200, 200]
        );
    }

    #[test]
    fn too_many_pixels_and_garbage_have_their_codes() {
        let big = png_bytes(4, 4, png::ColorType::Grayscale, &[0; 16]);
        assert_eq!(
            decode(&big, 15, C).unwrap_err().0,
            codes_cn::IMAGE_TOO_LARGE
        );
        assert_eq!(
            decode(b"GIF89a....", 100, C).unwrap_err().0,
            codes_cn::IMAGE_UNREADABLE
        );
        let mut broken = big.clone();
        broken.truncate(30);
        assert_eq!(
            decode(&broken, 100, C).unwrap_err().0,
            codes_cn::IMAGE_UNREADABLE
        );
        assert_eq!(
            decode(&[0xFF, 0xD8, 0xFF, 0x00], 100, C).unwrap_err().0,
            codes_cn::IMAGE_UNREADABLE
        );
    }
}
