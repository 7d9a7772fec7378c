//! SDXL ControlNet: the ControlNet graphs, the UNet's residual inputs, and the per-step
//! ControlNet evaluations of a run, as diffusers' `StableDiffusionXLControlNetPipeline` does them.
//!
//! - A ControlNet export (`onnx/export_controlnet.py`) takes `sample`, `timestep`,
//!   `controlnet_cond` and, where the graph uses them, `encoder_hidden_states`, `text_embeds`
//!   and `time_ids`; it returns unscaled `down_block_res_sample_{i}` and `mid_block_res_sample`.
//! - The UNet takes them as `down_block_additional_residual_{i}` and
//!   `mid_block_additional_residual` when the model has `unet/model_controlnet.onnx`; that graph
//!   is then the only UNet session, fed zero residuals for runs without a ControlNet.
//! - Each step, every ControlNet whose `[control_guidance_start, control_guidance_end]` window
//!   covers the step (diffusers' `controlnet_keep`) runs once on the same batch as the UNet
//!   (`[negative; positive]` rows under guidance); its residuals are multiplied by its
//!   `conditioning_scale` and summed over ControlNets.
//! - Guess mode runs the ControlNets on the positive rows only, scales the residuals by
//!   `logspace(-1, 0, N + 1) * conditioning_scale` (shallow to deep) and feeds zeros to the
//!   negative rows.

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::control_image::ControlImage;
use super::model::{read_json, SdxlModel, TimestepInput, Unet};
use super::runtime::SessionOptions;
use super::session::{Component, TensorInfo};
use super::{EngineError, EngineOptions};

mod device;
mod graph;
mod mixer;
mod run;

pub(crate) use device::{DeviceControl, GraphUse};
pub use graph::ControlGraphs;
pub(crate) use mixer::Mixers;
pub(crate) use run::ControlRun;

/// The UNet graph that takes ControlNet residuals, next to `unet/model.onnx`.
pub const UNET_VARIANT_FILE: &str = "model_controlnet.onnx";
const UNET_DOWN: &str = "down_block_additional_residual_";
const UNET_MID: &str = "mid_block_additional_residual";
const NET_DOWN: &str = "down_block_res_sample_";
const NET_MID: &str = "mid_block_res_sample";
const CONTROLNET: &str = "ControlNet";

/// The kinds of control this build knows.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum ControlType {
    /// Edge maps; the edges can be computed in-process (see [`super::canny`]).
    Canny,
    /// Depth maps (near is bright).
    Depth,
    /// OpenPose skeleton renderings.
    Openpose,
}

impl ControlType {
    /// Every type, in documentation order.
    pub const ALL: [ControlType; 3] = [
        ControlType::Canny,
        ControlType::Depth,
        ControlType::Openpose,
    ];

    /// The id used in job messages and configuration.
    pub fn id(self) -> &'static str {
        match self {
            ControlType::Canny => "canny",
            ControlType::Depth => "depth",
            ControlType::Openpose => "openpose",
        }
    }

    /// Parse an id (exact, lower case).
    pub fn parse(id: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.id() == id)
    }
}

impl std::fmt::Display for ControlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.id())
    }
}

/// One residual the UNet takes: its input and how many times the latent is halved before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResidualSlot {
    pub name: String,
    pub info: TensorInfo,
    pub channels: usize,
    pub halvings: u32,
}

impl ResidualSlot {
    /// `[rows, channels, h, w]` for a latent of `latent_h`×`latent_w`.
    pub fn shape(&self, rows: usize, latent_h: usize, latent_w: usize) -> [usize; 4] {
        let (mut h, mut w) = (latent_h, latent_w);
        for _ in 0..self.halvings {
            (h, w) = (h.div_ceil(2), w.div_ceil(2));
        }
        [rows, self.channels, h, w]
    }
}

/// The residual inputs of a ControlNet-ready UNet, read from the graph and `unet/config.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnetResiduals {
    pub down: Vec<ResidualSlot>,
    pub mid: ResidualSlot,
}

impl UnetResiduals {
    /// `None` for a plain UNet; an error when the residual inputs are incomplete or do not
    /// match the block layout in `config`.
    pub fn from_unet(
        unet: &Component,
        config: Option<&Value>,
    ) -> Result<Option<Self>, EngineError> {
        let mut indices: Vec<usize> = unet
            .input_names()
            .filter_map(|n| n.strip_prefix(UNET_DOWN)?.parse().ok())
            .collect();
        let has_mid = unet.input_names().any(|n| n == UNET_MID);
        if indices.is_empty() && !has_mid {
            return Ok(None);
        }
        indices.sort_unstable();
        if indices.iter().enumerate().any(|(i, &k)| i != k) {
            return Err(
                unet.dimension_error(UNET_DOWN, "inputs must be numbered 0, 1, 2, … without gaps")
            );
        }
        let layout = block_layout(config).ok_or_else(|| {
            unet.dimension_error(
                UNET_DOWN,
                "needs unet/config.json with block_out_channels and layers_per_block to size the residuals",
            )
        })?;
        if layout.len() != indices.len() + 1 {
            return Err(unet.dimension_error(
                UNET_DOWN,
                format!(
                    "the graph takes {} down residuals but unet/config.json describes {}",
                    indices.len(),
                    layout.len() - 1
                ),
            ));
        }
        let slot = |name: String,
                    (channels, halvings): (usize, u32)|
         -> Result<ResidualSlot, EngineError> {
            let info = unet.float_input(&name, &[4])?.clone();
            if let Some(c) = info.fixed_dim(1) {
                if c != channels {
                    return Err(unet.dimension_error(
                        &name,
                        format!("has {c} channels, unet/config.json gives {channels}"),
                    ));
                }
            }
            Ok(ResidualSlot {
                name,
                info,
                channels,
                halvings,
            })
        };
        let down = indices
            .iter()
            .map(|&i| slot(format!("{UNET_DOWN}{i}"), layout[i]))
            .collect::<Result<Vec<_>, _>>()?;
        let mid = slot(UNET_MID.to_owned(), layout[indices.len()])?;
        Ok(Some(Self { down, mid }))
    }
}

/// (channels, halvings) of each down residual then of the mid residual, as diffusers' UNet
/// collects them: `conv_in`, each resnet of each block, each block's downsampler but the last.
fn block_layout(config: Option<&Value>) -> Option<Vec<(usize, u32)>> {
    let config = config?;
    let channels: Vec<usize> = config
        .get("block_out_channels")?
        .as_array()?
        .iter()
        .map(|v| v.as_u64().and_then(|c| usize::try_from(c).ok()))
        .collect::<Option<_>>()?;
    let layers = match config.get("layers_per_block")? {
        Value::Array(a) => a
            .iter()
            .map(|v| v.as_u64().map(|n| n as usize))
            .collect::<Option<Vec<_>>>()?,
        v => vec![v.as_u64()? as usize; channels.len()],
    };
    if channels.is_empty() || layers.len() != channels.len() {
        return None;
    }
    let mut out = vec![(channels[0], 0)];
    for (i, (&ch, &n)) in channels.iter().zip(&layers).enumerate() {
        out.extend(std::iter::repeat_n((ch, i as u32), n));
        if i + 1 < channels.len() {
            out.push((ch, i as u32 + 1));
        }
    }
    out.push((*channels.last()?, channels.len() as u32 - 1));
    Some(out)
}

/// A loaded ControlNet graph.
#[derive(Debug)]
pub struct ControlNet {
    pub kind: ControlType,
    component: Component,
    sample: TensorInfo,
    timestep: TimestepInput,
    controlnet_cond: TensorInfo,
    encoder_hidden_states: Option<TensorInfo>,
    text_embeds: Option<TensorInfo>,
    time_ids: Option<TensorInfo>,
    down_outputs: Vec<String>,
}

impl ControlNet {
    /// Load `dir/model.onnx` (and read `dir/config.json` if present) and check its signature.
    pub fn load(
        kind: ControlType,
        dir: &Path,
        options: &SessionOptions,
    ) -> Result<Self, EngineError> {
        let config_path = dir.join("config.json");
        if config_path.is_file() {
            let config = read_json(&config_path)?;
            if config
                .get("global_pool_conditions")
                .and_then(Value::as_bool)
                == Some(true)
            {
                return Err(EngineError::ModelInvalid {
                    path: config_path,
                    message: "ControlNets with global_pool_conditions are not supported".to_owned(),
                });
            }
        }
        let component = Component::load(dir, options)?;
        let sample = component.float_input("sample", &[4])?.clone();
        let timestep_info = component.input("timestep")?.clone();
        let timestep = match timestep_info.shape.len() {
            0 => TimestepInput::Scalar(timestep_info),
            1 => TimestepInput::PerRow(timestep_info),
            n => return Err(component.dimension_error("timestep", format!("has rank {n}"))),
        };
        let controlnet_cond = component.float_input("controlnet_cond", &[4])?.clone();
        if let Some(c) = controlnet_cond.fixed_dim(1) {
            if c != 3 {
                return Err(component.dimension_error(
                    "controlnet_cond",
                    format!("takes {c} channels; control images are RGB"),
                ));
            }
        }
        let optional = |name: &str, rank: usize| -> Result<Option<TensorInfo>, EngineError> {
            if component.input_names().any(|n| n == name) {
                Ok(Some(component.float_input(name, &[rank])?.clone()))
            } else {
                Ok(None)
            }
        };
        let encoder_hidden_states = optional("encoder_hidden_states", 3)?;
        let text_embeds = optional("text_embeds", 2)?;
        let time_ids = optional("time_ids", 2)?;
        let mut indices: Vec<usize> = component
            .output_names()
            .filter_map(|n| n.strip_prefix(NET_DOWN)?.parse().ok())
            .collect();
        indices.sort_unstable();
        if indices.is_empty() || indices.iter().enumerate().any(|(i, &k)| i != k) {
            return Err(component
                .dimension_error(NET_DOWN, "outputs must be numbered 0, 1, 2, … without gaps"));
        }
        let down_outputs: Vec<String> = indices.iter().map(|i| format!("{NET_DOWN}{i}")).collect();
        for name in &down_outputs {
            component.float_output(name, &[4])?;
        }
        component.float_output(NET_MID, &[4])?;
        Ok(Self {
            kind,
            component,
            sample,
            timestep,
            controlnet_cond,
            encoder_hidden_states,
            text_embeds,
            time_ids,
            down_outputs,
        })
    }

    /// The graph file.
    pub fn path(&self) -> &Path {
        self.component.path()
    }

    /// Number of down residuals the ControlNet returns.
    pub fn down_count(&self) -> usize {
        self.down_outputs.len()
    }

    /// Check that this ControlNet's residuals fit `unet`.
    pub fn check_unet(&self, unet: &Unet) -> Result<(), EngineError> {
        let Some(residuals) = &unet.residuals else {
            return Err(EngineError::ModelInvalid {
                path: unet.component.path().to_path_buf(),
                message: format!(
                    "the UNet takes no ControlNet residuals; export unet/{UNET_VARIANT_FILE} \
                     (onnx/export_controlnet.py --unet-of)"
                ),
            });
        };
        if residuals.down.len() != self.down_count() {
            return Err(self.component.dimension_error(
                NET_DOWN,
                format!(
                    "the ControlNet gives {} down residuals, the UNet takes {}",
                    self.down_count(),
                    residuals.down.len()
                ),
            ));
        }
        Ok(())
    }
}

/// Where ControlNet models and preprocessors come from, by type.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ControlNetPaths {
    /// ControlNet export directories.
    pub models: BTreeMap<ControlType, PathBuf>,
    /// ONNX preprocessor directories (see [`super::preprocess`]).
    pub preprocessors: BTreeMap<ControlType, PathBuf>,
}

/// The ControlNets and preprocessors loaded for one SDXL model.
#[derive(Debug, Default)]
pub struct ControlNets {
    nets: BTreeMap<ControlType, ControlNet>,
    preprocessors: BTreeMap<ControlType, super::preprocess::Preprocessor>,
}

impl ControlNets {
    /// Load every configured ControlNet and preprocessor, checking the ControlNets against the
    /// UNet of `model`.
    pub fn load(
        paths: &ControlNetPaths,
        model: &SdxlModel,
        options: &EngineOptions,
    ) -> Result<Self, EngineError> {
        let session_options = SessionOptions {
            device: options.device,
            intra_threads: options.intra_threads,
            tf32: options.cuda.tf32,
            cuda: options.cuda,
            graph_capture: false,
        };
        let mut nets = BTreeMap::new();
        for (&kind, dir) in &paths.models {
            let net = ControlNet::load(kind, dir, &session_options)?;
            net.check_unet(&model.unet)?;
            nets.insert(kind, net);
        }
        let mut preprocessors = BTreeMap::new();
        for (&kind, dir) in &paths.preprocessors {
            let spec = super::preprocess::PreprocessorSpec::from_dir(dir)?;
            preprocessors.insert(
                kind,
                super::preprocess::Preprocessor::load(&spec, &session_options)?,
            );
        }
        Ok(Self {
            nets,
            preprocessors,
        })
    }

    /// The ControlNet for `kind`, if one is loaded.
    pub fn get(&self, kind: ControlType) -> Option<&ControlNet> {
        self.nets.get(&kind)
    }

    /// The ONNX preprocessor for `kind`, if one is loaded.
    pub fn preprocessor(&self, kind: ControlType) -> Option<&super::preprocess::Preprocessor> {
        self.preprocessors.get(&kind)
    }

    /// Whether no ControlNet is loaded.
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }
}

/// One ControlNet applied to a request.
#[derive(Debug, Clone)]
pub struct ControlUnit<'a> {
    pub net: &'a ControlNet,
    /// The control image, already preprocessed; it is resized to the request's size.
    pub image: ControlImage,
    pub conditioning_scale: f32,
    /// Fraction of the steps before which the ControlNet is off.
    pub guidance_start: f64,
    /// Fraction of the steps after which the ControlNet is off.
    pub guidance_end: f64,
}

/// The ControlNets of one request.
#[derive(Debug, Clone, Default)]
pub struct ControlRequest<'a> {
    pub units: Vec<ControlUnit<'a>>,
    pub guess_mode: bool,
}

impl ControlRequest<'_> {
    /// Check the units against the request's model.
    pub fn validate(&self, unet: &Unet) -> Result<(), EngineError> {
        for unit in &self.units {
            unit.net.check_unet(unet)?;
            if !unit.conditioning_scale.is_finite() {
                return Err(EngineError::invalid(
                    "controlnets",
                    "conditioning_scale must be finite",
                ));
            }
            let (s, e) = (unit.guidance_start, unit.guidance_end);
            if !(0.0..=1.0).contains(&s) || !(0.0..=1.0).contains(&e) || s >= e {
                return Err(EngineError::invalid(
                    "controlnets",
                    format!("control_guidance_start {s} and control_guidance_end {e} must satisfy 0 ≤ start < end ≤ 1"),
                ));
            }
        }
        Ok(())
    }
}

/// diffusers' `controlnet_keep`: whether step `i` of `total` lies in `[start, end]` (in
/// float64, as Python compares them).
pub fn keeps(i: usize, total: usize, start: f64, end: f64) -> bool {
    let (i, n) = (i as f64, total as f64);
    !(i / n < start || (i + 1.0) / n > end)
}

/// Guess mode's per-residual scales: `logspace(-1, 0, count + 1) * scale`.
pub fn guess_scales(count: usize, scale: f32) -> Vec<f32> {
    let steps = count + 1;
    (0..steps)
        .map(|k| {
            let exponent = if steps == 1 {
                -1.0
            } else {
                -1.0 + k as f64 / (steps - 1) as f64
            };
            (10f64.powf(exponent) as f32) * scale
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_windows_follow_diffusers() {
        // 10 steps, start 0.3: 3 / 10 is not below 0.3 in float64, so step 3 is kept.
        assert!(keeps(3, 10, 0.3, 1.0));
        // 8 steps, window [0.3, 1.0]: diffusers keeps steps 3..8 (i / 8 >= 0.3).
        let kept: Vec<usize> = (0..8).filter(|&i| keeps(i, 8, 0.3, 1.0)).collect();
        assert_eq!(kept, vec![3, 4, 5, 6, 7]);
        // window [0, 0.6]: (i + 1) / 8 <= 0.6 keeps steps 0..4.
        let kept: Vec<usize> = (0..8).filter(|&i| keeps(i, 8, 0.0, 0.6)).collect();
        assert_eq!(kept, vec![0, 1, 2, 3]);
    }

    #[test]
    fn guess_scales_run_from_a_tenth_to_the_scale() {
        let s = guess_scales(4, 2.0);
        assert_eq!(s.len(), 5);
        assert!(
            (s[0] - 0.2).abs() < 1e-6 && (s[4] - 2.0).abs() < 1e-6,
            "{s:?}"
        );
        assert!(s.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn block_layout_matches_the_sdxl_unet() {
        let sdxl =
            serde_json::json!({"block_out_channels": [320, 640, 1280], "layers_per_block": 2});
        let layout = block_layout(Some(&sdxl)).unwrap();
        assert_eq!(layout.len(), 10, "9 down residuals and the mid one");
        assert_eq!(layout[0], (320, 0));
        assert_eq!(layout[3], (320, 1));
        assert_eq!(layout[8], (1280, 2));
        assert_eq!(layout[9], (1280, 2));
        assert_eq!(ControlType::parse("depth"), Some(ControlType::Depth));
        assert_eq!(ControlType::parse("Depth"), None);
    }
}
