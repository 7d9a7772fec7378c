//! The ControlNet part of one run: each unit's inputs prepared once, then at every step the
//! ControlNet evaluations and the scaled, summed residuals the UNet takes (zeros for the
//! negative rows in guess mode; at steps where no ControlNet is active the UNet runner supplies
//! the zeros itself, see [`crate::engine::unet`]).

use std::time::{Duration, Instant};

use ort::session::SessionInputValue;
use ort::value::DynValue;

use super::{
    guess_scales, keeps, ControlNet, ControlRequest, ResidualSlot, SdxlModel, UnetResiduals,
    CONTROLNET, NET_MID,
};
use crate::engine::pipeline::RunShape;
use crate::engine::text::{Conditioning, Embedding};
use crate::engine::unet::ResidualInput;
use crate::engine::unet_inputs::{time_ids, timestep_value};
use crate::engine::{tensor, EngineError, GenerateRequest};

/// One ControlNet's inputs for a run, prepared on the host.
pub(super) struct PreparedUnit<'a> {
    pub(super) net: &'a ControlNet,
    pub(super) cond: DynValue,
    pub(super) hidden: Option<DynValue>,
    pub(super) pooled: Option<DynValue>,
    pub(super) time_ids: Option<DynValue>,
    pub(super) scale: f32,
    pub(super) start: f64,
    pub(super) end: f64,
}

impl PreparedUnit<'_> {
    /// The inputs prepared once per run, by name (those a ControlNet graph lacks are `None`).
    pub(super) const INPUTS: [&'static str; 4] = [
        "controlnet_cond",
        "encoder_hidden_states",
        "text_embeds",
        "time_ids",
    ];

    /// The prepared value of input `name`, if this ControlNet takes it.
    pub(super) fn input(&self, name: &str) -> Option<&DynValue> {
        match name {
            "controlnet_cond" => Some(&self.cond),
            "encoder_hidden_states" => self.hidden.as_ref(),
            "text_embeds" => self.pooled.as_ref(),
            "time_ids" => self.time_ids.as_ref(),
            _ => None,
        }
    }
}

/// The ControlNet part of one run: prepared inputs and the residuals fed to the UNet each step.
pub(crate) struct ControlRun<'a> {
    slots: Option<&'a UnetResiduals>,
    pub(super) units: Vec<PreparedUnit<'a>>,
    pub(super) guess: bool,
    pub(super) guidance: bool,
    pub(super) shape: RunShape,
}

impl<'a> ControlRun<'a> {
    pub(crate) fn new(
        model: &'a SdxlModel,
        control: Option<&ControlRequest<'a>>,
        conditioning: &Conditioning,
        request: &GenerateRequest,
        shape: &RunShape,
    ) -> Result<Self, EngineError> {
        let slots = model.unet.residuals.as_ref();
        let guess = control.is_some_and(|c| c.guess_mode);
        let rows = shape.unet_rows();
        let cn_rows = if guess && shape.guidance {
            shape.images
        } else {
            rows
        };
        let mut units = Vec::new();
        for unit in control.map(|c| c.units.as_slice()).unwrap_or_default() {
            let net = unit.net;
            let err = |source| EngineError::Inference {
                stage: CONTROLNET,
                source,
            };
            let image = unit.image.resized(request.width, request.height);
            let planar = image.to_planar();
            let cond_data: Vec<f32> = (0..cn_rows).flat_map(|_| planar.iter().copied()).collect();
            let (w, h) = (i64::from(request.width), i64::from(request.height));
            let cond = tensor::float_value(
                net.controlnet_cond.elem,
                &[cn_rows as i64, 3, h, w],
                &cond_data,
            )
            .map_err(err)?;
            let parts: Vec<&Embedding> = match (&conditioning.negative, guess) {
                (Some(neg), false) => vec![neg, &conditioning.positive],
                _ => vec![&conditioning.positive],
            };
            let mut hidden = Vec::new();
            let mut pooled = Vec::new();
            for part in &parts {
                for _ in 0..shape.images {
                    hidden.extend_from_slice(&part.hidden);
                    pooled.extend_from_slice(&part.pooled);
                }
            }
            let pos = &conditioning.positive;
            let r = cn_rows as i64;
            let hidden = net
                .encoder_hidden_states
                .as_ref()
                .map(|i| {
                    tensor::float_value(i.elem, &[r, pos.seq as i64, pos.width as i64], &hidden)
                })
                .transpose()
                .map_err(err)?;
            let pooled = net
                .text_embeds
                .as_ref()
                .map(|i| tensor::float_value(i.elem, &[r, pos.pooled.len() as i64], &pooled))
                .transpose()
                .map_err(err)?;
            let ids = time_ids(request);
            let ids: Vec<f32> = (0..cn_rows).flat_map(|_| ids).collect();
            let time_ids = net
                .time_ids
                .as_ref()
                .map(|i| tensor::float_value(i.elem, &[r, 6], &ids))
                .transpose()
                .map_err(err)?;
            units.push(PreparedUnit {
                net,
                cond,
                hidden,
                pooled,
                time_ids,
                scale: unit.conditioning_scale,
                start: unit.guidance_start,
                end: unit.guidance_end,
            });
        }
        Ok(Self {
            slots,
            units,
            guess,
            guidance: shape.guidance,
            shape: *shape,
        })
    }

    /// The UNet's residual inputs for this run's batch and size (none for a plain UNet).
    pub(crate) fn residual_inputs(&self) -> Vec<ResidualInput<'a>> {
        let shape = self.shape;
        self.slot_list()
            .into_iter()
            .map(|slot| ResidualInput {
                name: slot.name.as_str(),
                elem: slot.info.elem,
                dims: slot
                    .shape(shape.unet_rows(), shape.latent_h, shape.latent_w)
                    .iter()
                    .map(|&d| d as i64)
                    .collect(),
            })
            .collect()
    }

    /// Whether any ControlNet takes part in this run.
    pub(crate) fn has_units(&self) -> bool {
        !self.units.is_empty()
    }

    /// The batch rows a ControlNet runs on: the positive rows only in guess mode under
    /// guidance, otherwise the UNet's rows.
    pub(super) fn control_rows(&self) -> usize {
        if self.guess && self.guidance {
            self.shape.images
        } else {
            self.shape.unet_rows()
        }
    }

    /// The UNet's residual inputs, down residuals first, then the mid one.
    pub(super) fn slot_list(&self) -> Vec<&'a ResidualSlot> {
        self.slots
            .map(|s| s.down.iter().chain(std::iter::once(&s.mid)).collect())
            .unwrap_or_default()
    }

    /// The factor for each of `unit`'s residuals, shallow to deep.
    pub(super) fn unit_scales(&self, unit: &PreparedUnit<'_>) -> Vec<f32> {
        let count = unit.net.down_count();
        if self.guess {
            guess_scales(count, unit.scale)
        } else {
            vec![unit.scale; count + 1]
        }
    }

    /// The residual inputs for step `i` of `total`, for the host path: none for a plain UNet or
    /// at a step where no ControlNet is active (the UNet runner then feeds its zeros).
    /// `model_input` is the UNet's scaled batch. ControlNet time is added to `spent`.
    pub(crate) fn step(
        &self,
        i: usize,
        total: usize,
        model_input: &[f32],
        t: f64,
        spent: &mut Duration,
    ) -> Result<Vec<(&'a str, SessionInputValue<'_>)>, EngineError> {
        if self.slots.is_none() {
            return Ok(Vec::new());
        }
        let active: Vec<&PreparedUnit<'a>> = self
            .units
            .iter()
            .filter(|u| u.scale != 0.0 && keeps(i, total, u.start, u.end))
            .collect();
        if active.is_empty() {
            return Ok(Vec::new());
        }
        let slot_list = self.slot_list();
        let started = Instant::now();
        let shape = self.shape;
        let rows = shape.unet_rows();
        let split = self.guess && self.guidance;
        let cn_rows = self.control_rows();
        let sample_data = &model_input[..cn_rows * shape.per_image()];
        let sample_shape = shape.dims(cn_rows);
        let mut sums: Vec<Vec<f32>> = Vec::new();
        for unit in active {
            let net = unit.net;
            let err = |source| EngineError::Inference {
                stage: CONTROLNET,
                source,
            };
            let sample =
                tensor::float_value(net.sample.elem, &sample_shape, sample_data).map_err(err)?;
            let timestep = timestep_value(&net.timestep, t, cn_rows).map_err(err)?;
            let mut inputs: Vec<(&str, SessionInputValue<'_>)> = vec![
                ("sample", sample.into()),
                ("timestep", timestep.into()),
                ("controlnet_cond", (&unit.cond).into()),
            ];
            for (name, value) in [
                ("encoder_hidden_states", &unit.hidden),
                ("text_embeds", &unit.pooled),
                ("time_ids", &unit.time_ids),
            ] {
                if let Some(v) = value {
                    inputs.push((name, v.into()));
                }
            }
            let wanted: Vec<&str> = net
                .down_outputs
                .iter()
                .map(String::as_str)
                .chain([NET_MID])
                .collect();
            let result = net.component.run(CONTROLNET, inputs, &wanted)?;
            let scales = self.unit_scales(unit);
            for (k, (out, slot)) in result.outputs.into_iter().zip(&slot_list).enumerate() {
                let expected: usize = slot
                    .shape(cn_rows, shape.latent_h, shape.latent_w)
                    .iter()
                    .product();
                if out.data.len() != expected {
                    return Err(EngineError::UnexpectedOutput {
                        stage: CONTROLNET,
                        message: format!(
                            "{} values for `{}`, the UNet's `{}` needs {expected}",
                            out.data.len(),
                            wanted[k],
                            slot.name
                        ),
                    });
                }
                if out.data.iter().any(|v| !v.is_finite()) {
                    return Err(EngineError::NonFinite {
                        stage: CONTROLNET,
                        hint: String::new(),
                    });
                }
                let scaled = out.data.iter().map(|&v| v * scales[k]);
                match sums.get_mut(k) {
                    Some(sum) => sum.iter_mut().zip(scaled).for_each(|(s, v)| *s += v),
                    None => sums.push(scaled.collect()),
                }
            }
        }
        let mut inputs = Vec::with_capacity(slot_list.len());
        for (slot, sum) in slot_list.iter().zip(sums) {
            let dims = slot.shape(rows, shape.latent_h, shape.latent_w);
            let data = if split {
                let mut full = vec![0.0f32; dims.iter().product::<usize>() - sum.len()];
                full.extend(sum);
                full
            } else {
                sum
            };
            let dims: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
            let value = tensor::float_value(slot.info.elem, &dims, &data).map_err(unet_err)?;
            inputs.push((slot.name.as_str(), SessionInputValue::from(value)));
        }
        *spent += started.elapsed();
        Ok(inputs)
    }
}

fn unet_err(source: ort::Error) -> EngineError {
    EngineError::Inference {
        stage: "UNet",
        source,
    }
}
