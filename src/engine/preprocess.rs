//! Turning a plain photograph into a control image: canny edges in-process ([`super::canny`]),
//! or an ONNX preprocessor model the deployment configures (a depth estimator, a pose renderer).
//!
//! An ONNX preprocessor takes one image input `[1, 3, S, S]` (the photo resized to S×S, values
//! `(v / 255 - mean) / std` per channel) and returns one output, read as either
//! - `map`: one channel (`[1, H, W]` or `[1, 1, H, W]`, e.g. a depth estimator's relative depth),
//!   min-max normalized to 0..=255 and repeated on three channels, or
//! - `image`: three channels `[1, 3, H, W]` in [0, 1] (a model that draws the control image, such
//!   as a pose renderer).
//!
//! The result is resized back to the photo's size; the pipeline then resizes it to the request's.

use std::path::{Path, PathBuf};

use super::control_image::ControlImage;
use super::model::read_json;
use super::runtime::SessionOptions;
use super::session::Component;
use super::{tensor, EngineError};

const STAGE: &str = "control image preprocessor";

/// How to read a preprocessor's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PreprocessOutput {
    Map,
    Image,
}

/// A configured ONNX preprocessor.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessorSpec {
    /// The `.onnx` file.
    pub path: PathBuf,
    /// Side of the square input the model takes.
    pub input_size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub output: PreprocessOutput,
}

impl PreprocessorSpec {
    /// Read `dir/preprocessor.json` (`{"input_size": 518, "mean": [..3], "std": [..3],
    /// "output": "map" | "image"}`); the model is `dir/model.onnx`.
    pub fn from_dir(dir: &Path) -> Result<Self, EngineError> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            input_size: u32,
            mean: [f32; 3],
            std: [f32; 3],
            output: PreprocessOutput,
        }
        let path = dir.join("preprocessor.json");
        let json = read_json(&path)?;
        let file: File = serde_json::from_value(json).map_err(|e| EngineError::ModelInvalid {
            path: path.clone(),
            message: e.to_string(),
        })?;
        Ok(Self {
            path: dir.join("model.onnx"),
            input_size: file.input_size,
            mean: file.mean,
            std: file.std,
            output: file.output,
        })
    }
}

/// A loaded ONNX preprocessor.
#[derive(Debug)]
pub struct Preprocessor {
    spec: PreprocessorSpec,
    component: Component,
    input: String,
    output: String,
}

impl Preprocessor {
    /// Load the model and check that it has one float input of rank 4 and a float output.
    pub fn load(spec: &PreprocessorSpec, options: &SessionOptions) -> Result<Self, EngineError> {
        let component = Component::load_file(&spec.path, options)?;
        let input = component
            .input_names()
            .next()
            .unwrap_or_default()
            .to_owned();
        component.float_input(&input, &[4])?;
        let output = component
            .output_names()
            .next()
            .unwrap_or_default()
            .to_owned();
        component.float_output(&output, &[3, 4])?;
        if spec.input_size == 0 || spec.std.iter().any(|&s| s == 0.0 || !s.is_finite()) {
            return Err(EngineError::ModelInvalid {
                path: spec.path.clone(),
                message: "input_size must be positive and std non-zero".to_owned(),
            });
        }
        Ok(Self {
            spec: spec.clone(),
            component,
            input,
            output,
        })
    }

    /// The control image computed from `photo`, at the photo's size.
    pub fn run(&self, photo: &ControlImage) -> Result<ControlImage, EngineError> {
        let side = self.spec.input_size;
        let mut planar = photo.resized(side, side).to_planar();
        let plane = (side * side) as usize;
        for (c, chunk) in planar.chunks_mut(plane).enumerate() {
            let (m, s) = (self.spec.mean[c], self.spec.std[c]);
            chunk.iter_mut().for_each(|v| *v = (*v - m) / s);
        }
        let info = self.component.input(&self.input)?;
        let value = tensor::float_value(
            info.elem,
            &[1, 3, i64::from(side), i64::from(side)],
            &planar,
        )
        .map_err(|source| EngineError::Inference {
            stage: STAGE,
            source,
        })?;
        let result = self.component.run(
            STAGE,
            vec![(self.input.as_str(), value.into())],
            &[&self.output],
        )?;
        let out = result
            .outputs
            .into_iter()
            .next()
            .unwrap_or_else(|| tensor::FloatTensor {
                shape: vec![],
                data: vec![],
            });
        let dims: Vec<usize> = out.shape.iter().map(|&d| d.max(0) as usize).collect();
        let bad = |message: String| EngineError::UnexpectedOutput {
            stage: STAGE,
            message,
        };
        if out.data.iter().any(|v| !v.is_finite()) {
            return Err(EngineError::NonFinite {
                stage: STAGE,
                hint: String::new(),
            });
        }
        let (h, w) = match dims.as_slice() {
            [1, h, w] | [1, 1, h, w] if self.spec.output == PreprocessOutput::Map => (*h, *w),
            [1, 3, h, w] if self.spec.output == PreprocessOutput::Image => (*h, *w),
            other => {
                return Err(bad(format!(
                    "an output of shape {other:?} for a `{:?}` preprocessor",
                    self.spec.output
                )))
            }
        };
        if h == 0 || w == 0 {
            return Err(bad("an empty output".to_owned()));
        }
        let image = match self.spec.output {
            PreprocessOutput::Map => {
                let (lo, hi) = out
                    .data
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                let range = if hi > lo { hi - lo } else { 1.0 };
                let gray: Vec<u8> = out
                    .data
                    .iter()
                    .map(|&v| ((v - lo) / range * 255.0).round().clamp(0.0, 255.0) as u8)
                    .collect();
                ControlImage::from_gray(w as u32, h as u32, &gray)?
            }
            PreprocessOutput::Image => {
                let plane = h * w;
                let mut rgb = vec![0u8; plane * 3];
                for (c, chunk) in out.data.chunks(plane).enumerate().take(3) {
                    for (i, &v) in chunk.iter().enumerate() {
                        rgb[i * 3 + c] = (v * 255.0).round().clamp(0.0, 255.0) as u8;
                    }
                }
                ControlImage::new(w as u32, h as u32, rgb)?
            }
        };
        Ok(image.resized(photo.width, photo.height))
    }
}
