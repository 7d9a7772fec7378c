//! ControlNets on the device, for runs whose UNet inputs are bound to device buffers: each
//! ControlNet's inputs are copied to the device once per run and its residuals land in device
//! buffers; the residual mixer ([`super::mixer`]) then writes the UNet's residual inputs in
//! place, into the very buffers the UNet session (or its CUDA graph) reads. Per step only the
//! latent batch and the timestep cross to the device, or only the timestep when guidance and
//! the scheduler's update run there ([`crate::engine::device_step`] then writes each
//! ControlNet's next input); nothing comes back.
//!
//! At steps where no ControlNet is active the UNet's residual buffers must hold zeros again:
//! they are zeroed on the device ([`crate::engine::zero_fill`]) once, when the last ControlNet
//! switches off.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ort::memory::Allocator;
use ort::session::IoBinding;
use ort::value::{DynTensor, DynValue, TensorElementType};

use super::graph::{ControlGraphs, LockedGraphs};
use super::mixer::{self, MixerSpec, Mixers};
use super::run::{ControlRun, PreparedUnit};
use super::{keeps, ControlNet, CONTROLNET, NET_MID};
use crate::engine::device_step::ControlInput;
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
pub(super) struct BoundUnit {
    binding: IoBinding,
    sample: DynTensor,
    timestep: DynTensor,
    outputs: Vec<DynTensor>,
    /// The per-run inputs (control image, text conditioning), by input name.
    inputs: Vec<(&'static str, DynTensor)>,
    // Dropped after the tensors it allocated.
    _allocator: Allocator,
}

impl BoundUnit {
    /// Copy a run's control image and text conditioning into the bound buffers.
    fn prepare_run(&mut self, unit: &PreparedUnit<'_>) -> ort::Result<()> {
        for (name, device) in &mut self.inputs {
            if let Some(host) = unit.input(name) {
                upload(host, device)?;
            }
        }
        Ok(())
    }
}

/// Where a unit's bound session lives.
enum UnitRef {
    /// Bound for this run only, on the ControlNet's own session.
    Own(Box<BoundUnit>),
    /// A static-shape session of the engine's (see [`super::graph`]), by index.
    Graph(usize),
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
    units: Vec<UnitRef>,
    graphs: Option<LockedGraphs<'r>>,
    mixes: Vec<Mix>,
    mixers: &'r Mixers,
    zeros: &'r ZeroGraphs,
    options: SessionOptions,
    /// Whether the UNet's residual buffers hold something other than zeros.
    dirty: bool,
}

/// A ControlNet residual output: its name, element type and shape for a run.
pub(super) type ResidualOutput<'a> = (&'a str, TensorElementType, Vec<i64>);

/// The engine's static ControlNet sessions and how many shapes each ControlNet may have.
pub(crate) struct GraphUse<'r> {
    pub graphs: &'r ControlGraphs,
    pub per_net: usize,
}

impl<'a> ControlRun<'a> {
    /// Bind every ControlNet of this run to device `device_id` (negative: the CPU, see
    /// `EngineOptions::bind_io_on_cpu`), on static-shape sessions when `graphs` is given. The
    /// UNet's residual buffers must hold zeros.
    pub(crate) fn bind_device<'r>(
        &'r self,
        device_id: i32,
        mixers: &'r Mixers,
        zeros: &'r ZeroGraphs,
        graphs: Option<GraphUse<'r>>,
        options: SessionOptions,
    ) -> Result<DeviceControl<'r, 'a>, EngineError> {
        let mut locked = graphs.as_ref().map(|g| (g.graphs.lock(), g.per_net));
        let mut units = Vec::with_capacity(self.units.len());
        for unit in &self.units {
            let index = match locked.as_mut() {
                Some((graphs, per_net)) => {
                    self.graph_unit(graphs, unit, device_id, *per_net, &options)?
                }
                None => None,
            };
            let unit_ref = match (index, locked.as_mut()) {
                (Some(index), Some((graphs, _))) => {
                    graphs
                        .get_mut(index)
                        .bound
                        .prepare_run(unit)
                        .map_err(control_err)?;
                    UnitRef::Graph(index)
                }
                _ => {
                    let mut bound = self.bind_unit(&unit.net.component, unit, device_id)?;
                    bound.prepare_run(unit).map_err(control_err)?;
                    UnitRef::Own(Box::new(bound))
                }
            };
            units.push(unit_ref);
        }
        Ok(DeviceControl {
            run: self,
            units,
            graphs: locked.map(|(graphs, _)| graphs),
            mixes: Vec::new(),
            mixers,
            zeros,
            options,
            dirty: false,
        })
    }

    /// The shape of the latent batch a ControlNet of this run takes.
    pub(super) fn control_sample_shape(&self) -> [i64; 4] {
        self.shape.dims(self.control_rows())
    }

    /// Each residual output of `net` for this run: its name, element type and shape.
    pub(super) fn residual_outputs(
        &self,
        net: &'a ControlNet,
    ) -> Result<Vec<ResidualOutput<'a>>, EngineError> {
        let rows = self.control_rows();
        let shape = self.shape;
        net.down_outputs
            .iter()
            .map(String::as_str)
            .chain([NET_MID])
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
            .collect()
    }

    /// Allocate `unit`'s buffers on `component` (its ControlNet's session, or a static-shape
    /// copy of it) and bind them. The per-run inputs are filled by `BoundUnit::prepare_run`.
    pub(super) fn bind_unit(
        &self,
        component: &Component,
        unit: &PreparedUnit<'a>,
        device_id: i32,
    ) -> Result<BoundUnit, EngineError> {
        let net = unit.net;
        let rows = self.control_rows();
        let outputs = self.residual_outputs(net)?;
        let sample_shape = self.control_sample_shape();
        let bound = component.with_session(|session| -> ort::Result<BoundUnit> {
            let allocator = Allocator::new(session, device_info(device_id)?)?;
            let like =
                |v: &DynValue| DynTensor::new(&allocator, *v.data_type(), v.shape().to_vec());
            let mut binding = session.create_binding()?;
            let sample = DynTensor::new(&allocator, net.sample.elem, sample_shape.to_vec())?;
            let timestep = like(&timestep_value(&net.timestep, 0.0, rows)?)?;
            binding.bind_input("sample", &sample)?;
            binding.bind_input("timestep", &timestep)?;
            let mut inputs = Vec::new();
            for name in PreparedUnit::INPUTS {
                if let Some(host) = unit.input(name) {
                    let device = like(host)?;
                    binding.bind_input(name, &device)?;
                    inputs.push((name, device));
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
                inputs,
                _allocator: allocator,
            })
        });
        bound.map_err(control_err)
    }
}

impl DeviceControl<'_, '_> {
    /// The bound buffers of unit `k`.
    fn unit(&self, k: usize) -> &BoundUnit {
        match &self.units[k] {
            UnitRef::Own(bound) => bound,
            UnitRef::Graph(index) => {
                &self
                    .graphs
                    .as_ref()
                    .expect("graph units come with the locked sessions")
                    .get(*index)
                    .bound
            }
        }
    }

    /// The bound buffers of unit `k` and the session they are bound to.
    fn unit_mut(&mut self, k: usize) -> (&mut BoundUnit, &Component) {
        match &mut self.units[k] {
            UnitRef::Own(bound) => (&mut **bound, &self.run.units[k].net.component),
            UnitRef::Graph(index) => {
                let graph = self
                    .graphs
                    .as_mut()
                    .expect("graph units come with the locked sessions")
                    .get_mut(*index);
                (&mut graph.bound, &*graph.component)
            }
        }
    }

    /// The sample input each ControlNet takes, in unit order, for a step graph that writes
    /// them ([`crate::engine::device_step`]).
    pub(crate) fn control_inputs(&self) -> Vec<ControlInput> {
        let positive_only = self.run.guess && self.run.guidance;
        self.run
            .units
            .iter()
            .map(|unit| ControlInput {
                elem: unit.net.sample.elem,
                positive_only,
            })
            .collect()
    }

    /// The bound sample buffer of unit `k`.
    pub(crate) fn sample_buffer(&mut self, k: usize) -> &mut DynTensor {
        &mut self.unit_mut(k).0.sample
    }

    /// Run the ControlNets active at step `i` of `total` and write the UNet's residual inputs
    /// into `residuals` (the UNet's bound buffers, in slot order). `model_input` is the UNet's
    /// scaled batch, copied into the ControlNets' sample buffers; `None` when a step graph
    /// has written them already. ControlNet time is added to `spent`.
    pub(crate) fn step(
        &mut self,
        i: usize,
        total: usize,
        model_input: Option<&[f32]>,
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
        let sample_data = model_input.map(|m| &m[..rows * shape.per_image()]);
        for &k in &active {
            let net = run.units[k].net;
            let (bound, component) = self.unit_mut(k);
            if let Some(sample_data) = sample_data {
                let sample =
                    tensor::float_value(net.sample.elem, bound.sample.shape(), sample_data)
                        .map_err(control_err)?;
                upload(&sample, &mut bound.sample).map_err(control_err)?;
            }
            let timestep = timestep_value(&net.timestep, t, rows).map_err(control_err)?;
            upload(&timestep, &mut bound.timestep).map_err(control_err)?;
            component
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
                    self.unit(k)
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
                    for (slot, out) in self.unit(k).outputs.iter().enumerate() {
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
