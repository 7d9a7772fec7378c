//! PNG encoding of generated images, with the generation parameters in a `parameters` text
//! chunk written the way AUTOMATIC1111's web UI writes it, so that other tools read them back:
//!
//! ```text
//! a photo of a cat
//! Negative prompt: blurry
//! Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 7, Size: 1024x1024, Model: sdxl-base
//! ```
//!
//! The chunk is `tEXt` when the text is Latin-1 and `iTXt` (UTF-8) otherwise, as Pillow does
//! for A1111. A value containing `,`, `:` or a newline is written as a JSON string.

use super::{EngineError, GenerateRequest};

/// The keyword of the text chunk A1111 reads.
pub const PARAMETERS_KEYWORD: &str = "parameters";

/// The generation parameters of one image, as written into its PNG.
#[derive(Debug, Clone, PartialEq)]
pub struct PngParameters {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub steps: u32,
    /// A1111's sampler name (`Euler a`, `DPM++ 2M`, ...).
    pub sampler: String,
    /// A1111's schedule type (`Karras`), when not the sampler's default.
    pub schedule_type: Option<String>,
    pub cfg_scale: f32,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    pub model: Option<String>,
    /// Further `key: value` pairs, written after the standard ones.
    pub extra: Vec<(String, String)>,
}

impl PngParameters {
    /// The parameters of image `index` of `request`.
    pub fn from_request(request: &GenerateRequest, index: u32, model: Option<&str>) -> Self {
        let karras = request
            .scheduler_overrides
            .use_karras_sigmas
            .unwrap_or_else(|| request.scheduler.a1111_name().ends_with(" Karras"));
        let name = request.scheduler.a1111_name();
        let sampler = name.strip_suffix(" Karras").unwrap_or(name).to_owned();
        let mut extra = Vec::new();
        if request.guidance_rescale > 0.0 {
            extra.push((
                "CFG Rescale phi".to_owned(),
                request.guidance_rescale.to_string(),
            ));
        }
        if let Some(p2) = request.prompt_2.as_deref().filter(|p| !p.is_empty()) {
            extra.push(("Prompt 2".to_owned(), p2.to_owned()));
        }
        if let Some(n2) = request
            .negative_prompt_2
            .as_deref()
            .filter(|p| !p.is_empty())
        {
            extra.push(("Negative prompt 2".to_owned(), n2.to_owned()));
        }
        extra.push((
            "Version".to_owned(),
            format!("sdxl-worker {}", env!("CARGO_PKG_VERSION")),
        ));
        Self {
            prompt: request.prompt.clone(),
            negative_prompt: request.negative_prompt.clone().filter(|n| !n.is_empty()),
            steps: request.steps,
            sampler,
            schedule_type: karras.then(|| "Karras".to_owned()),
            cfg_scale: request.guidance_scale,
            seed: super::noise::image_seed(request.seed, index as usize),
            width: request.width,
            height: request.height,
            model: model.map(str::to_owned),
            extra,
        }
    }

    /// The text of the `parameters` chunk.
    pub fn to_a1111(&self) -> String {
        let mut out = self.prompt.clone();
        if let Some(n) = &self.negative_prompt {
            out.push_str("\nNegative prompt: ");
            out.push_str(n);
        }
        let mut fields: Vec<(String, String)> = vec![
            ("Steps".into(), self.steps.to_string()),
            ("Sampler".into(), self.sampler.clone()),
        ];
        if let Some(s) = &self.schedule_type {
            fields.push(("Schedule type".into(), s.clone()));
        }
        fields.push(("CFG scale".into(), self.cfg_scale.to_string()));
        fields.push(("Seed".into(), self.seed.to_string()));
        fields.push(("Size".into(), format!("{}x{}", self.width, self.height)));
        if let Some(m) = &self.model {
            fields.push(("Model".into(), m.clone()));
        }
        fields.extend(self.extra.iter().cloned());
        let line = fields
            .iter()
            .map(|(k, v)| format!("{k}: {}", quote(v)))
            .collect::<Vec<_>>()
            .join(", ");
        out.push('\n');
        out.push_str(&line);
        out
    }
}

fn quote(value: &str) -> String {
    if value.contains([',', ':', '\n']) {
        serde_json::Value::String(value.to_owned()).to_string()
    } else {
        value.to_owned()
    }
}

/// Encode interleaved 8-bit RGB as PNG, with an optional `parameters` text.
pub fn encode_png(
    rgb: &[u8],
    width: u32,
    height: u32,
    parameters: Option<&str>,
) -> Result<Vec<u8>, EngineError> {
    let expected = width as usize * height as usize * 3;
    if rgb.len() != expected || width == 0 || height == 0 {
        return Err(EngineError::invalid(
            "image",
            format!(
                "{} bytes for a {width}x{height} RGB image (expected {expected})",
                rgb.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(expected / 2 + 1024);
    let wrap = |source: png::EncodingError| EngineError::PngEncode { source };
    {
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        if let Some(text) = parameters {
            if text.chars().all(|c| (c as u32) < 256) {
                encoder
                    .add_text_chunk(PARAMETERS_KEYWORD.to_owned(), text.to_owned())
                    .map_err(wrap)?;
            } else {
                encoder
                    .add_itxt_chunk(PARAMETERS_KEYWORD.to_owned(), text.to_owned())
                    .map_err(wrap)?;
            }
        }
        let mut writer = encoder.write_header().map_err(wrap)?;
        writer.write_image_data(rgb).map_err(wrap)?;
        writer.finish().map_err(wrap)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_back(bytes: &[u8]) -> (png::OutputInfo, Vec<u8>, Option<String>) {
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        reader.finish().unwrap();
        let meta = reader.info();
        let text = meta
            .uncompressed_latin1_text
            .iter()
            .find(|c| c.keyword == PARAMETERS_KEYWORD)
            .map(|c| c.text.clone())
            .or_else(|| {
                meta.utf8_text
                    .iter()
                    .find(|c| c.keyword == PARAMETERS_KEYWORD)
                    .map(|c| c.get_text().unwrap())
            });
        buf.truncate(info.buffer_size());
        (info, buf, text)
    }

    fn params() -> PngParameters {
        PngParameters {
            prompt: "a cat, studio light".into(),
            negative_prompt: Some("blurry".into()),
            steps: 30,
            sampler: "DPM++ 2M".into(),
            schedule_type: Some("Karras".into()),
            cfg_scale: 7.0,
            seed: 7,
            width: 1024,
            height: 768,
            model: Some("sdxl-base".into()),
            extra: vec![("Note".into(), "a: b".into())],
        }
    }

    #[test]
    fn a1111_text_layout() {
        let text = params().to_a1111();
        assert_eq!(
            text,
            "a cat, studio light\nNegative prompt: blurry\nSteps: 30, Sampler: DPM++ 2M, \
             Schedule type: Karras, CFG scale: 7, Seed: 7, Size: 1024x768, Model: sdxl-base, \
             Note: \"a: b\""
        );
    }

    #[test]
    fn png_round_trips_pixels_and_parameters() {
        let (w, h) = (3u32, 2u32);
        let rgb: Vec<u8> = (0..(w * h * 3) as u8).collect();
        let text = params().to_a1111();
        let bytes = encode_png(&rgb, w, h, Some(&text)).unwrap();
        let (info, pixels, got) = read_back(&bytes);
        assert_eq!((info.width, info.height), (w, h));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(pixels, rgb);
        assert_eq!(got.as_deref(), Some(text.as_str()));
    }

    #[test]
    fn non_latin1_parameters_use_itxt() {
        let mut p = params();
        p.prompt = "猫の写真".into();
        let text = p.to_a1111();
        let bytes = encode_png(&[0; 3], 1, 1, Some(&text)).unwrap();
        assert_eq!(read_back(&bytes).2.as_deref(), Some(text.as_str()));
    }

    #[test]
    fn wrong_buffer_size_is_an_error() {
        let err = encode_png(&[0; 5], 1, 1, None).unwrap_err();
        assert_eq!(err.code(), "invalid_request");
    }
}
