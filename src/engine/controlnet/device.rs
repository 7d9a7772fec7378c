//! ControlNets on the device, for runs whose UNet inputs are bound to device buffers: each
//! ControlNet's inputs are copied to the device once per run and its residuals land in device
//! buffers; the residual mixer ([`super::mixer`]) then writes the UNet's residual inputs in
//! place, into the very buffers the UNet session (or its CUDA graph) reads. Per step only the
//! latent batch and the timestep cross to the device; nothing comes back.
//!
//! At steps where no ControlNet is active the UNet's residual buffers must hold zeros again:
//! they are zeroed on the device ([`crate::engine::zero_fill`]) once, when the last ControlNet
//! switches off.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ort::memory::Allocator;
use ort::session::IoBinding;
use ort::value::{DynTensor, DynValue};

use super::mixer::{self, MixerSpec, Mixers};
use super::run::{ControlRun, PreparedUnit};
use super::{keeps, CONTROLNET, NET_MID};
use crate::engine::runtime::SessionOptions;
use crate::engine::session::Component;
use crate::engine::unet::{device_info, upload};
use crate::engine::unet_inputs::timestep_value;
use crate::engine::zero_fill::{self, ZeroGraphs};
use crate::engine::{tensor, EngineError};

fn control_err(source: ort::Error) -> EngineError {
    EngineError::Inference {
        stage: CONTROLNET,
        source,
    }
}

/// One ControlNet's session with its device buffers bound.
struct BoundUnit {
    binding: IoBinding,
    sample: DynTensor,
    timestep: DynTensor,
    outputs: Vec<DynTensor>,
    // Kept for the binding's sake, then dropped before the allocator.
    _inputs: Vec<DynTensor>,
    _allocator: Allocator,
}

/// The mixer binding for one set of active ControlNets.
struct Mix {
    active: Vec<usize>,
    mixer: Arc<Component>,
    binding: IoBinding,
    _scales: DynValue,
}

/// The device side of a [`ControlRun`].
pub(crate) struct DeviceControl<'r, 'a> {
    run: &'r ControlRun<'a>,
    units: Vec<BoundUnit>,
    mixes: Vec<Mix>,
    mixers: &'r Mixers,
    zeros: &'r ZeroGraphs,
    options: SessionOptions,
    /// Whether the UNet's residual buffers hold something other than zeros.
    dirty: bool,
}

impl<'a> ControlRun<'a> {
    /// Bind every ControlNet of this run to device `device_id` (negative: the CPU, see
    /// `EngineOptions::bind_io_on_cpu`). The UNet's residual buffers must hold zeros.
    pub(crate) fn bind_device<'r>(
        &'r self,
        device_id: i32,
        mixers: &'r Mixers,
        zeros: &'r ZeroGraphs,
        options: SessionOptions,
    ) -> Result<DeviceControl<'r, 'a>, EngineError> {
        let units = self
            .units
            .iter()
            .map(|unit| self.bind_unit(unit, device_id))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(DeviceControl {
            run: self,
            units,
            mixes: Vec::new(),
            mixers,
            zeros,
            options,
            dirty: false,
        })
    }

    fn bind_unit(&self, unit: &PreparedUnit<'a>, device_id: i32) -> Result<BoundUnit, EngineError> {
        let net = unit.net;
        let rows = self.control_rows();
        let shape = self.shape;
        let names = net.down_outputs.iter().map(String::as_str).chain([NET_MID]);
        // Each residual buffer: the output it is bound to, its element type and its shape.
        let outputs = names
            .zip(self.slot_list())
            .map(|(name, slot)| {
                let elem = net.component.output(name)?.elem;
                let dims: Vec<i64> = slot
                    .shape(rows, shape.latent_h, shape.latent_w)
                    .iter()
                    .map(|&d| d as i64)
                    .collect();
                Ok((name, elem, dims))
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        let bound = net
            .component
            .with_session(|session| -> ort::Result<BoundUnit> {
                let allocator = Allocator::new(session, device_info(device_id)?)?;
                let like =
                    |v: &DynValue| DynTensor::new(&allocator, *v.data_type(), v.shape().to_vec());
                let mut binding = session.create_binding()?;
                let sample_shape = [
                    rows as i64,
                    shape.channels as i64,
                    shape.latent_h as i64,
                    shape.latent_w as i64,
                ];
                let sample = DynTensor::new(&allocator, net.sample.elem, sample_shape.to_vec())?;
                let timestep = like(&timestep_value(&net.timestep, 0.0, rows)?)?;
                binding.bind_input("sample", &sample)?;
                binding.bind_input("timestep", &timestep)?;
                let mut inputs = Vec::new();
                for (name, host) in [
                    ("controlnet_cond", Some(&unit.cond)),
                    ("encoder_hidden_states", unit.hidden.as_ref()),
                    ("text_embeds", unit.pooled.as_ref()),
                    ("time_ids", unit.time_ids.as_ref()),
                ] {
                    if let Some(host) = host {
                        let mut device = like(host)?;
                        upload(host, &mut device)?;
                        binding.bind_input(name, &device)?;
                        inputs.push(device);
                    }
                }
                let mut buffers = Vec::with_capacity(outputs.len());
                for (name, elem, dims) in &outputs {
                    let mut out = DynTensor::new(&allocator, *elem, dims.clone())?;
                    binding.bind_output(*name, &mut out)?;
                    buffers.push(out);
                }
                Ok(BoundUnit {
                    binding,
                    sample,
                    timestep,
                    outputs: buffers,
                    _inputs: inputs,
                    _allocator: allocator,
                })
            });
        bound.map_err(control_err)
    }
}

impl DeviceControl<'_, '_> {
    /// Run the ControlNets active at step `i` of `total` and write the UNet's residual inputs
    /// into `residuals` (the UNet's bound buffers, in slot order). `model_input` is the UNet's
    /// scaled batch. ControlNet time is added to `spent`.
    pub(crate) fn step(
        &mut self,
        i: usize,
        total: usize,
        model_input: &[f32],
        t: f64,
        residuals: &mut [DynTensor],
        spent: &mut Duration,
    ) -> Result<(), EngineError> {
        let run = self.run;
        let active: Vec<usize> = run
            .units
            .iter()
            .enumerate()
            .filter(|(_, u)| u.scale != 0.0 && keeps(i, total, u.start, u.end))
            .map(|(k, _)| k)
            .collect();
        let started = Instant::now();
        if active.is_empty() {
            if self.dirty {
                zero_fill::fill(self.zeros, &self.options, residuals, CONTROLNET)?;
                self.dirty = false;
                *spent += started.elapsed();
            }
            return Ok(());
        }
        let rows = run.control_rows();
        let shape = run.shape;
        let sample_data = &model_input[..rows * shape.per_image()];
        for &k in &active {
            let net = run.units[k].net;
            let bound = &mut self.units[k];
            let sample = tensor::float_value(net.sample.elem, bound.sample.shape(), sample_data)
                .map_err(control_err)?;
            upload(&sample, &mut bound.sample).map_err(control_err)?;
            let timestep = timestep_value(&net.timestep, t, rows).map_err(control_err)?;
            upload(&timestep, &mut bound.timestep).map_err(control_err)?;
            net.component
                .with_session(|session| session.run_binding(&bound.binding).map(drop))
                .map_err(control_err)?;
        }
        let position = match self.mixes.iter().position(|m| m.active == active) {
            Some(p) => p,
            None => {
                let mix = self.mix(&active, residuals)?;
                self.mixes.push(mix);
                self.mixes.len() - 1
            }
        };
        let mix = &self.mixes[position];
        mix.mixer
            .with_session(|session| session.run_binding(&mix.binding).map(drop))
            .map_err(control_err)?;
        self.dirty = true;
        *spent += started.elapsed();
        Ok(())
    }

    /// The mixer and its binding for the ControlNets in `active`, writing into `residuals`.
    fn mix(&self, active: &[usize], residuals: &mut [DynTensor]) -> Result<Mix, EngineError> {
        let run = self.run;
        let spec = MixerSpec {
            inputs: active
                .iter()
                .map(|&k| {
                    self.units[k]
                        .outputs
                        .iter()
                        .map(|o| *o.data_type())
                        .collect()
                })
                .collect(),
            outputs: residuals.iter().map(|r| *r.data_type()).collect(),
            zero_negative: run.guess && run.guidance,
        };
        let mixer = self.mixers.get(&spec, &self.options)?;
        let scales: Vec<f32> = active
            .iter()
            .flat_map(|&k| run.unit_scales(&run.units[k]))
            .collect();
        let scales = tensor::float_value(
            ort::value::TensorElementType::Float32,
            &[scales.len() as i64],
            &scales,
        )
        .map_err(control_err)?;
        let binding = mixer
            .with_session(|session| -> ort::Result<IoBinding> {
                let mut binding = session.create_binding()?;
                binding.bind_input(mixer::SCALES, &scales)?;
                for (u, &k) in active.iter().enumerate() {
                    for (slot, out) in self.units[k].outputs.iter().enumerate() {
                        binding.bind_input(mixer::input_name(u, slot), out)?;
                    }
                }
                for (slot, residual) in residuals.iter_mut().enumerate() {
                    binding.bind_output(mixer::output_name(slot), residual)?;
                }
                Ok(binding)
            })
            .map_err(control_err)?;
        Ok(Mix {
            active: active.to_vec(),
            mixer,
            binding,
            _scales: scales,
        })
    }
}
