//! The UNet inputs that stay the same for every step of a run: the text conditioning stacked
//! in `[negative; positive]` row order (for one run or for a dynamic batch of runs), the
//! micro-conditioning `time_ids`, and timestep values in the element type the graph declares.

use std::path::Path;

use ort::value::DynValue;

use super::controlnet::ControlRun;
use super::model::{SdxlModel, TimestepInput};
use super::pipeline::RunShape;
use super::refiner::AestheticScores;
use super::session::TensorInfo;
use super::text::Conditioning;
use super::unet::UnetConditioning;
use super::{tensor, EngineError, GenerateRequest};

fn unet_err(source: ort::Error) -> EngineError {
    EngineError::Inference {
        stage: "UNet",
        source,
    }
}

/// The UNet inputs that stay the same for every step.
pub(super) struct UnetConstants {
    encoder_hidden_states: DynValue,
    text_embeds: DynValue,
    time_ids: DynValue,
}

/// One run's conditioning rows on the host, in the batch order `[negative; positive]` (only
/// positive without guidance), each repeated once per image.
pub(super) struct ConditioningRows {
    rows: usize,
    seq: usize,
    width: usize,
    hidden: Vec<f32>,
    pooled: Vec<f32>,
    pooled_width: usize,
    time_ids: Vec<f32>,
    time_ids_width: usize,
}

impl ConditioningRows {
    pub(super) fn new(
        model: &SdxlModel,
        conditioning: &Conditioning,
        request: &GenerateRequest,
        shape: &RunShape,
        aesthetic: AestheticScores,
    ) -> Result<Self, EngineError> {
        let unet = &model.unet;
        let pos = &conditioning.positive;
        let mut parts = Vec::new();
        if let Some(neg) = &conditioning.negative {
            parts.push(neg);
        }
        parts.push(pos);
        let rows = shape.unet_rows();
        let mut hidden = Vec::with_capacity(rows * pos.hidden.len());
        let mut pooled = Vec::with_capacity(rows * pos.pooled.len());
        for part in &parts {
            for _ in 0..shape.images {
                hidden.extend_from_slice(&part.hidden);
                pooled.extend_from_slice(&part.pooled);
            }
        }
        check_width(
            unet.component.path(),
            "encoder_hidden_states",
            &unet.encoder_hidden_states,
            2,
            pos.width,
        )?;
        check_width(
            unet.component.path(),
            "text_embeds",
            &unet.text_embeds,
            1,
            pos.pooled.len(),
        )?;
        let width = unet.time_ids_width;
        let (negative_ids, positive_ids) = if width == 5 {
            let [oh, ow, top, left, _, _] = time_ids(request);
            (
                vec![oh, ow, top, left, aesthetic.negative],
                vec![oh, ow, top, left, aesthetic.positive],
            )
        } else {
            (time_ids(request).to_vec(), time_ids(request).to_vec())
        };
        let mut time_ids = Vec::with_capacity(rows * width);
        for row in 0..rows {
            let negative = shape.guidance && row < shape.images;
            time_ids.extend_from_slice(if negative {
                &negative_ids
            } else {
                &positive_ids
            });
        }
        Ok(Self {
            rows,
            seq: pos.seq,
            width: pos.width,
            hidden,
            pooled,
            pooled_width: pos.pooled.len(),
            time_ids,
            time_ids_width: width,
        })
    }
}

impl UnetConstants {
    /// These inputs, with the residual inputs of a residual UNet, as the runner's per-run
    /// conditioning.
    pub(super) fn conditioning<'c>(&'c self, control: &'c ControlRun<'_>) -> UnetConditioning<'c> {
        UnetConditioning {
            encoder_hidden_states: &self.encoder_hidden_states,
            text_embeds: &self.text_embeds,
            time_ids: &self.time_ids,
            residuals: control.residual_inputs(),
        }
    }

    pub(super) fn new(
        model: &SdxlModel,
        conditioning: &Conditioning,
        request: &GenerateRequest,
        shape: &RunShape,
        aesthetic: AestheticScores,
    ) -> Result<Self, EngineError> {
        let rows = ConditioningRows::new(model, conditioning, request, shape, aesthetic)?;
        Self::stack(model, &[&rows])
    }

    /// The constants of several runs stacked along the batch axis, in the order given. Every
    /// part must have the same sequence length and widths.
    pub(super) fn stack(
        model: &SdxlModel,
        parts: &[&ConditioningRows],
    ) -> Result<Self, EngineError> {
        let unet = &model.unet;
        let Some(first) = parts.first() else {
            return Err(EngineError::invalid("prompt", "no run to condition"));
        };
        let same = |p: &&&ConditioningRows| {
            (p.seq, p.width, p.pooled_width, p.time_ids_width)
                == (
                    first.seq,
                    first.width,
                    first.pooled_width,
                    first.time_ids_width,
                )
        };
        if !parts.iter().all(|p| same(&p)) {
            return Err(EngineError::UnexpectedOutput {
                stage: "UNet",
                message: "runs with different conditioning shapes cannot share a batch".to_owned(),
            });
        }
        let rows: usize = parts.iter().map(|p| p.rows).sum();
        let concat = |pick: fn(&ConditioningRows) -> &[f32]| -> Vec<f32> {
            parts.iter().flat_map(|p| pick(p).iter().copied()).collect()
        };
        let r = rows as i64;
        let make = |info: &TensorInfo, shape: &[i64], data: &[f32]| {
            tensor::float_value(info.elem, shape, data).map_err(unet_err)
        };
        Ok(Self {
            encoder_hidden_states: make(
                &unet.encoder_hidden_states,
                &[r, first.seq as i64, first.width as i64],
                &concat(|p| &p.hidden),
            )?,
            text_embeds: make(
                &unet.text_embeds,
                &[r, first.pooled_width as i64],
                &concat(|p| &p.pooled),
            )?,
            time_ids: make(
                &unet.time_ids,
                &[r, first.time_ids_width as i64],
                &concat(|p| &p.time_ids),
            )?,
        })
    }
}

fn check_width(
    path: &Path,
    name: &str,
    info: &TensorInfo,
    axis: usize,
    actual: usize,
) -> Result<(), EngineError> {
    match info.fixed_dim(axis) {
        Some(w) if w != actual => Err(EngineError::ModelSignature {
            path: path.to_path_buf(),
            name: name.to_owned(),
            message: format!("is {w} wide but the text encoders give {actual}"),
        }),
        _ => Ok(()),
    }
}

/// SDXL micro-conditioning: `[orig_h, orig_w, crop_top, crop_left, target_h, target_w]`.
pub fn time_ids(request: &GenerateRequest) -> [f32; 6] {
    let (oh, ow) = request
        .original_size
        .unwrap_or((request.height, request.width));
    let (top, left) = request.crops_coords_top_left;
    let (th, tw) = request
        .target_size
        .unwrap_or((request.height, request.width));
    [oh, ow, top, left, th, tw].map(|v| v as f32)
}

/// The timestep input in the form the UNet declares. Integer timesteps are truncated, as a
/// numpy cast does for older exports.
pub(crate) fn timestep_value(input: &TimestepInput, t: f64, rows: usize) -> ort::Result<DynValue> {
    let (info, shape, count) = match input {
        TimestepInput::Scalar(info) => (info, vec![], 1),
        TimestepInput::PerRow(info) => {
            let n = info.fixed_dim(0).unwrap_or(rows);
            (info, vec![n as i64], n)
        }
    };
    if tensor::is_int(info.elem) {
        tensor::int_value(info.elem, &shape, &vec![t as i64; count])
    } else {
        tensor::float_value(info.elem, &shape, &vec![t as f32; count])
    }
}
