//! Loading an SDXL pipeline in the Optimum ONNX layout: `model_index.json`, `text_encoder/`,
//! `text_encoder_2/`, `unet/`, `vae_decoder/` (optional `vae_encoder/`), `tokenizer/`,
//! `tokenizer_2/` and `scheduler/scheduler_config.json`.
//!
//! A refiner (SDXL refiner 1.0 and its kind) has no `text_encoder/` and `tokenizer/`: it reads
//! only the second encoder, and its UNet takes five time ids
//! `[orig_h, orig_w, crop_top, crop_left, aesthetic_score]` instead of six
//! (`requires_aesthetics_score` in `model_index.json`).
//!
//! Every graph's declared inputs and outputs are checked at load time, and the sizes the
//! pipeline needs (latent channels, embedding widths, which hidden state is the penultimate
//! one, input element types) are read from the graphs and configuration files, never assumed.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::runtime::SessionOptions;
use super::session::{Component, TensorInfo};
use super::tokenizer::ClipTokenizer;
use super::EngineError;

/// The VAE scaling factor of SDXL, used when `vae_decoder/config.json` does not give one.
pub const DEFAULT_SCALING_FACTOR: f64 = 0.13025;

/// Read and parse a JSON file, naming the file in errors.
pub(crate) fn read_json(path: &Path) -> Result<Value, EngineError> {
    if !path.is_file() {
        return Err(EngineError::ModelFileMissing {
            path: path.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| EngineError::ModelJson {
        path: path.to_path_buf(),
        source,
    })
}

fn read_optional_json(path: &Path) -> Result<Option<Value>, EngineError> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

fn require_dir(root: &Path, name: &str) -> Result<PathBuf, EngineError> {
    let dir = root.join(name);
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(EngineError::ModelFileMissing { path: dir })
    }
}

/// What the VAE's `config.json` says (with diffusers' defaults for absent keys).
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    pub scaling_factor: f64,
    /// Pixels per latent cell: `2^(len(block_out_channels) - 1)`.
    pub scale_factor: u32,
    /// The VAE is known to overflow in float16.
    pub force_upcast: bool,
    /// Per-channel latent statistics (some VAEs); `None` for SDXL's.
    pub latents_mean_std: Option<(Vec<f64>, Vec<f64>)>,
}

impl VaeConfig {
    fn from_json(path: &Path, json: Option<&Value>) -> Result<Self, EngineError> {
        let invalid = |message: String| EngineError::ModelInvalid {
            path: path.to_path_buf(),
            message,
        };
        let get = |key: &str| json.and_then(|j| j.get(key)).filter(|v| !v.is_null());
        let scaling_factor = match get("scaling_factor") {
            Some(v) => v.as_f64().filter(|f| *f > 0.0).ok_or_else(|| {
                invalid(format!("scaling_factor must be a positive number, got {v}"))
            })?,
            None => DEFAULT_SCALING_FACTOR,
        };
        let scale_factor = match get("block_out_channels") {
            Some(v) => {
                let n = v
                    .as_array()
                    .map(Vec::len)
                    .filter(|&n| (1..=8).contains(&n))
                    .ok_or_else(|| {
                        invalid(format!(
                            "block_out_channels must be a list of 1 to 8 entries, got {v}"
                        ))
                    })?;
                1u32 << (n - 1)
            }
            None => 8,
        };
        let force_upcast = get("force_upcast").and_then(Value::as_bool).unwrap_or(true);
        let floats =
            |v: &Value| -> Option<Vec<f64>> { v.as_array()?.iter().map(Value::as_f64).collect() };
        let latents_mean_std = match (get("latents_mean"), get("latents_std")) {
            (Some(m), Some(s)) => {
                let (m, s) = floats(m).zip(floats(s)).ok_or_else(|| {
                    invalid("latents_mean and latents_std must be lists of numbers".to_owned())
                })?;
                Some((m, s))
            }
            _ => None,
        };
        Ok(Self {
            scaling_factor,
            scale_factor,
            force_upcast,
            latents_mean_std,
        })
    }
}

/// A CLIP text encoder graph and what the pipeline reads from it.
#[derive(Debug)]
pub struct TextEncoder {
    pub component: Component,
    pub input_ids: TensorInfo,
    /// Name of the penultimate hidden state output (`hidden_states[-2]` in transformers).
    pub penultimate: String,
    /// `text_embeds` when the encoder has a projection (text_encoder_2).
    pub pooled: Option<String>,
}

impl TextEncoder {
    fn load(dir: &Path, options: &SessionOptions, needs_pooled: bool) -> Result<Self, EngineError> {
        let component = Component::load(dir, options)?;
        let input_ids = component.int_input("input_ids", &[2])?.clone();
        let last = component
            .output_names()
            .filter_map(|n| n.strip_prefix("hidden_states.")?.parse::<usize>().ok())
            .max();
        let penultimate = match last {
            Some(k) if k >= 1 => format!("hidden_states.{}", k - 1),
            _ => {
                // Report the missing output by the name diffusers' layout uses.
                component.output("hidden_states.0")?;
                return Err(component.dimension_error(
                    "hidden_states.*",
                    "must list at least two hidden states (export with output_hidden_states)",
                ));
            }
        };
        component.float_output(&penultimate, &[3])?;
        let pooled = if needs_pooled {
            component.float_output("text_embeds", &[2])?;
            Some("text_embeds".to_owned())
        } else {
            None
        };
        Ok(Self {
            component,
            input_ids,
            penultimate,
            pooled,
        })
    }

    /// Width of the penultimate hidden state, when the graph fixes it.
    pub fn hidden_width(&self) -> Option<usize> {
        self.component.output(&self.penultimate).ok()?.fixed_dim(2)
    }

    /// Width of `text_embeds`, when the graph fixes it.
    pub fn pooled_width(&self) -> Option<usize> {
        let name = self.pooled.as_deref()?;
        self.component.output(name).ok()?.fixed_dim(1)
    }
}

/// How the UNet wants its timestep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimestepInput {
    /// A rank-0 float (current Optimum exports).
    Scalar(TensorInfo),
    /// One value per batch row (older exports: int64 `[batch]`).
    PerRow(TensorInfo),
}

/// The UNet graph and its signature.
#[derive(Debug)]
pub struct Unet {
    pub component: Component,
    pub sample: TensorInfo,
    pub timestep: TimestepInput,
    pub encoder_hidden_states: TensorInfo,
    pub text_embeds: TensorInfo,
    pub time_ids: TensorInfo,
    /// Values per row of `time_ids`: 6 for a base UNet, 5 for a refiner's (aesthetic score).
    pub time_ids_width: usize,
    pub latent_channels: usize,
    /// The ControlNet residual inputs, when the UNet loaded is `unet/model_controlnet.onnx`.
    pub residuals: Option<super::controlnet::UnetResiduals>,
}

impl Unet {
    fn load(
        dir: &Path,
        options: &SessionOptions,
        config: Option<&Value>,
        aesthetics: bool,
    ) -> Result<Self, EngineError> {
        // The ControlNet variant computes the same as model.onnx when fed zero residuals, so
        // only one UNet session is kept.
        let variant = dir.join(super::controlnet::UNET_VARIANT_FILE);
        let component = if variant.is_file() {
            Component::load_file(&variant, options)?
        } else {
            Component::load(dir, options)?
        };
        let sample = component.float_input("sample", &[4])?.clone();
        let timestep_info = component.input("timestep")?.clone();
        let timestep = match timestep_info.shape.len() {
            0 => TimestepInput::Scalar(timestep_info),
            1 => TimestepInput::PerRow(timestep_info),
            n => {
                return Err(component.dimension_error(
                    "timestep",
                    format!("has rank {n}, expected a scalar or one value per batch row"),
                ))
            }
        };
        let elem = match &timestep {
            TimestepInput::Scalar(t) | TimestepInput::PerRow(t) => t.elem,
        };
        if !super::tensor::is_float(elem) && !super::tensor::is_int(elem) {
            return Err(component
                .dimension_error("timestep", format!("has unsupported element type {elem}")));
        }
        let encoder_hidden_states = component
            .float_input("encoder_hidden_states", &[3])?
            .clone();
        let text_embeds = component.float_input("text_embeds", &[2])?.clone();
        let time_ids = component.float_input("time_ids", &[2])?.clone();
        component.float_output("out_sample", &[4])?;
        let from_config = config
            .and_then(|c| c.get("in_channels"))
            .and_then(Value::as_u64)
            .and_then(|c| usize::try_from(c).ok());
        let latent_channels = sample.fixed_dim(1).or(from_config).ok_or_else(|| {
            component.dimension_error(
                "sample",
                "has a dynamic channel axis and unet/config.json gives no in_channels",
            )
        })?;
        let expected = if aesthetics { 5 } else { 6 };
        if let Some(n) = time_ids.fixed_dim(1) {
            if n != expected {
                let which = if aesthetics {
                    "a refiner (requires_aesthetics_score in model_index.json)"
                } else {
                    "a base SDXL UNet"
                };
                return Err(component.dimension_error(
                    "time_ids",
                    format!("has {n} values per row; {which} takes {expected}"),
                ));
            }
        }
        let residuals = super::controlnet::UnetResiduals::from_unet(&component, config)?;
        Ok(Self {
            component,
            sample,
            timestep,
            encoder_hidden_states,
            text_embeds,
            time_ids,
            time_ids_width: expected,
            latent_channels,
            residuals,
        })
    }
}

/// The VAE decoder graph.
#[derive(Debug)]
pub struct VaeDecoder {
    pub component: Component,
    pub latent_sample: TensorInfo,
    pub config: VaeConfig,
}

/// Settings read from `model_index.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineConfig {
    /// An absent negative prompt gives all-zero negative embeddings.
    pub force_zeros_for_empty_prompt: bool,
    /// Default image side in pixels (`unet/config.json` `sample_size` × VAE scale factor).
    pub default_size: u32,
    /// Pixel sizes must be multiples of this.
    pub size_multiple: u32,
    /// The UNet is conditioned on an aesthetic score (a refiner), not on the target size.
    pub requires_aesthetics_score: bool,
}

/// A whole SDXL pipeline, loaded.
#[derive(Debug)]
pub struct SdxlModel {
    pub root: PathBuf,
    pub name: String,
    pub config: PipelineConfig,
    /// `None` for a refiner, which reads the second encoder only.
    pub tokenizer: Option<ClipTokenizer>,
    pub tokenizer_2: ClipTokenizer,
    /// `None` for a refiner (no `text_encoder/`).
    pub text_encoder: Option<TextEncoder>,
    pub text_encoder_2: TextEncoder,
    pub unet: Unet,
    pub vae_decoder: VaeDecoder,
    /// `vae_encoder/model.onnx` when the export has one (not loaded: text-to-image does not use it).
    pub vae_encoder_path: Option<PathBuf>,
    /// `scheduler/scheduler_config.json` as written by the export.
    pub scheduler_config: Value,
}

impl SdxlModel {
    /// Load and check every component under `root`.
    pub fn load(root: &Path, options: &SessionOptions) -> Result<Self, EngineError> {
        if !root.is_dir() {
            return Err(EngineError::ModelFileMissing {
                path: root.to_path_buf(),
            });
        }
        let index_path = root.join("model_index.json");
        let index = read_json(&index_path)?;
        let force_zeros = index
            .get("force_zeros_for_empty_prompt")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let aesthetics = index
            .get("requires_aesthetics_score")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let scheduler_config = read_json(&root.join("scheduler").join("scheduler_config.json"))?;
        // A refiner declares no first encoder (`"text_encoder": [null, null]`) and ships none.
        let first_encoder = !declares_none(&index, "text_encoder");
        let tokenizer = if first_encoder {
            Some(ClipTokenizer::from_dir(&require_dir(root, "tokenizer")?)?)
        } else {
            None
        };
        let tokenizer_2 = ClipTokenizer::from_dir(&require_dir(root, "tokenizer_2")?)?;

        let vae_dir = require_dir(root, "vae_decoder")?;
        let vae_config_path = vae_dir.join("config.json");
        let vae_config = VaeConfig::from_json(
            &vae_config_path,
            read_optional_json(&vae_config_path)?.as_ref(),
        )?;
        let unet_dir = require_dir(root, "unet")?;
        let unet_config = read_optional_json(&unet_dir.join("config.json"))?;

        let text_encoder = if first_encoder {
            Some(TextEncoder::load(
                &require_dir(root, "text_encoder")?,
                options,
                false,
            )?)
        } else {
            None
        };
        let text_encoder_2 =
            TextEncoder::load(&require_dir(root, "text_encoder_2")?, options, true)?;
        let unet = Unet::load(&unet_dir, options, unet_config.as_ref(), aesthetics)?;
        let vae_component = Component::load(&vae_dir, options)?;
        let latent_sample = vae_component.float_input("latent_sample", &[4])?.clone();
        vae_component.float_output("sample", &[4])?;
        let vae_decoder = VaeDecoder {
            component: vae_component,
            latent_sample,
            config: vae_config,
        };
        let vae_encoder_path =
            Some(root.join("vae_encoder").join("model.onnx")).filter(|p| p.is_file());

        let mut config = pipeline_config(force_zeros, &unet, &vae_decoder, unet_config.as_ref());
        config.requires_aesthetics_score = aesthetics;
        let model = Self {
            root: root.to_path_buf(),
            name: model_name(root),
            config,
            tokenizer,
            tokenizer_2,
            text_encoder,
            text_encoder_2,
            unet,
            vae_decoder,
            vae_encoder_path,
            scheduler_config,
        };
        model.check_consistency()?;
        if model.vae_decoder.latent_sample.elem == ort::value::TensorElementType::Float16
            && model.vae_decoder.config.force_upcast
        {
            tracing::warn!(
                path = %model.vae_decoder.component.path().display(),
                "the VAE decoder is float16 but its config sets force_upcast (it may overflow to NaN); \
                 export it in float32 or use an fp16-fixed VAE"
            );
        }
        Ok(model)
    }

    /// Cross-check sizes that several graphs must agree on, where the graphs fix them.
    fn check_consistency(&self) -> Result<(), EngineError> {
        let first = self.text_encoder.as_ref().zip(self.tokenizer.as_ref());
        let second = Some((&self.text_encoder_2, &self.tokenizer_2));
        for (encoder, tokenizer) in first.into_iter().chain(second) {
            if let Some(seq) = encoder.input_ids.fixed_dim(1) {
                if seq != tokenizer.max_length() {
                    return Err(encoder.component.dimension_error(
                        "input_ids",
                        format!(
                            "takes {seq} tokens but the tokenizer makes {}",
                            tokenizer.max_length()
                        ),
                    ));
                }
            }
        }
        let unet = &self.unet;
        let first = match &self.text_encoder {
            Some(encoder) => encoder.hidden_width(),
            None => Some(0),
        };
        let widths = (first, self.text_encoder_2.hidden_width());
        if let ((Some(a), Some(b)), Some(c)) = (widths, unet.encoder_hidden_states.fixed_dim(2)) {
            if a + b != c {
                let given = if self.text_encoder.is_some() {
                    format!("the text encoders give {a} + {b}")
                } else {
                    format!("text_encoder_2 (the only encoder) gives {b}")
                };
                return Err(unet
                    .component
                    .dimension_error("encoder_hidden_states", format!("is {c} wide but {given}")));
            }
        }
        if let (Some(p), Some(u)) = (
            self.text_encoder_2.pooled_width(),
            unet.text_embeds.fixed_dim(1),
        ) {
            if p != u {
                return Err(unet.component.dimension_error(
                    "text_embeds",
                    format!("is {u} wide but text_encoder_2 gives {p}"),
                ));
            }
        }
        if let Some(c) = self.vae_decoder.latent_sample.fixed_dim(1) {
            if c != unet.latent_channels {
                return Err(self.vae_decoder.component.dimension_error(
                    "latent_sample",
                    format!(
                        "has {c} channels but the UNet makes {}",
                        unet.latent_channels
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Latent cells per side for an image side of `pixels`.
    pub fn latent_side(&self, pixels: u32) -> usize {
        (pixels / self.vae_decoder.config.scale_factor) as usize
    }
}

/// Whether `model_index.json` lists `component` as absent (`[null, null]`).
fn declares_none(index: &Value, component: &str) -> bool {
    index
        .get(component)
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().all(Value::is_null))
}

fn model_name(root: &Path) -> String {
    let canonical = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    canonical
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "sdxl".to_owned())
}

fn pipeline_config(
    force_zeros: bool,
    unet: &Unet,
    vae: &VaeDecoder,
    unet_config: Option<&Value>,
) -> PipelineConfig {
    let vae_scale = vae.config.scale_factor;
    let get_u64 = |key: &str| unet_config.and_then(|c| c.get(key)).and_then(Value::as_u64);
    // The UNet halves the latent grid once per down block but the last; the latent side must
    // divide evenly that many times.
    let down_blocks = unet_config
        .and_then(|c| c.get("block_out_channels"))
        .and_then(Value::as_array)
        .map(Vec::len)
        .filter(|&n| (1..=8).contains(&n))
        .unwrap_or(3);
    let unet_multiple = 1u32 << (down_blocks - 1);
    let sample_size = get_u64("sample_size")
        .and_then(|s| u32::try_from(s).ok())
        .or_else(|| unet.sample.fixed_dim(2).and_then(|s| u32::try_from(s).ok()));
    let default_size = sample_size.map(|s| s * vae_scale).unwrap_or(1024);
    PipelineConfig {
        force_zeros_for_empty_prompt: force_zeros,
        default_size,
        size_multiple: vae_scale * unet_multiple,
        requires_aesthetics_score: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vae_config_defaults_and_values() {
        let p = Path::new("vae_decoder/config.json");
        let d = VaeConfig::from_json(p, None).unwrap();
        assert_eq!(d.scaling_factor, DEFAULT_SCALING_FACTOR);
        assert_eq!(d.scale_factor, 8);
        assert!(d.force_upcast);
        let j = serde_json::json!({"scaling_factor": 0.5, "block_out_channels": [32, 64], "force_upcast": false});
        let c = VaeConfig::from_json(p, Some(&j)).unwrap();
        assert_eq!(
            (c.scaling_factor, c.scale_factor, c.force_upcast),
            (0.5, 2, false)
        );
        let bad = serde_json::json!({"scaling_factor": "x"});
        let err = VaeConfig::from_json(p, Some(&bad)).unwrap_err();
        assert_eq!(err.code(), "model_invalid");
        assert!(err.to_string().contains("vae_decoder/config.json"));
    }
}
