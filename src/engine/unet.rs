//! One UNet evaluation per denoising step, in one of two ways:
//!
//! - **Host**: every step hands ONNX Runtime host tensors (the CPU provider, or CUDA with
//!   [`CudaOptions::io_binding`](super::cuda::CudaOptions) off). A residual UNet's ControlNet
//!   inputs are host zeros at steps where no ControlNet is active, made at the first such step.
//! - **Device**: on CUDA, the step's inputs live in device buffers bound once to the session.
//!   The text conditioning is copied to the device once per run; each step copies only the
//!   latent batch and the timestep in and the prediction out. A residual UNet's ControlNet
//!   inputs are device buffers too, zeroed on the device at the start of each run
//!   ([`super::zero_fill`]) and written in place by the ControlNet side
//!   ([`residual_buffers`](UnetRunner::residual_buffers)). With CUDA graphs on, the buffers
//!   belong to a static-shape UNet session per (batch, height, width, sequence) kept by the
//!   engine, because a captured graph replays against the addresses it was captured with.
//!
//! [`EngineOptions::bind_io_on_cpu`](super::EngineOptions) runs the device path (and, with
//! `cuda.graph`, the static-shape sessions without graph capture) on the CPU provider, so that
//! it can be checked against the host path on machines without a GPU.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, SessionInputValue};
use ort::value::{DynTensor, DynTensorValueType, DynValue, TensorElementType};

use super::capture_gate;
use super::model::{TimestepInput, Unet};
use super::runtime::SessionOptions;
use super::session::Component;
use super::zero_fill::{self, ZeroGraphs};
use super::{tensor, Device, Engine, EngineError};

const UNET: &str = "UNet";

fn unet_err(source: ort::Error) -> EngineError {
    EngineError::Inference {
        stage: UNET,
        source,
    }
}

/// The shape a static UNet session (and its CUDA graph) is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GraphShape {
    pub rows: usize,
    pub latent_h: usize,
    pub latent_w: usize,
    pub seq: usize,
}

/// Device buffers bound to a UNet session.
struct Bound {
    binding: IoBinding,
    sample: DynTensor,
    timestep: DynTensor,
    hidden: DynTensor,
    text_embeds: DynTensor,
    time_ids: DynTensor,
    /// The ControlNet residual inputs of a residual UNet: zeroed for every run, then written in
    /// place by the ControlNet side at the steps where a ControlNet is active.
    residuals: Vec<DynTensor>,
    out: DynTensor,
    // Dropped after the tensors it allocated.
    _allocator: Allocator,
}

/// A static-shape UNet session with its buffers, for CUDA graph replay.
struct GraphUnet {
    shape: GraphShape,
    bound: Bound,
    // Dropped last: the buffers and binding refer to it.
    component: Arc<Component>,
}

/// The engine's static-shape UNet sessions (CUDA graphs), most recently used last.
#[derive(Default)]
pub struct GraphSessions {
    sessions: Mutex<Vec<GraphUnet>>,
}

impl std::fmt::Debug for GraphSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shapes: Vec<GraphShape> = self
            .sessions
            .lock()
            .map(|s| s.iter().map(|g| g.shape).collect())
            .unwrap_or_default();
        f.debug_struct("GraphSessions")
            .field("shapes", &shapes)
            .finish()
    }
}

/// The text conditioning and micro-conditioning of a run, as host values, and the ControlNet
/// residual inputs a residual UNet takes.
pub(super) struct UnetConditioning<'a> {
    pub encoder_hidden_states: &'a DynValue,
    pub text_embeds: &'a DynValue,
    pub time_ids: &'a DynValue,
    pub residuals: Vec<ResidualInput<'a>>,
}

/// One ControlNet residual input of a residual UNet, for this run's batch and size. On the
/// device path it is a bound buffer, zeroed where it lives at the start of every run.
pub(crate) struct ResidualInput<'a> {
    pub name: &'a str,
    pub elem: TensorElementType,
    pub dims: Vec<i64>,
}

/// What one step returns: the prediction as `f32`, the time inside ONNX Runtime and the time
/// spent copying between host and device outside it.
pub(super) struct StepOutput {
    pub out: Vec<f32>,
    pub session_time: Duration,
    pub copy_time: Duration,
}

enum Mode<'e> {
    /// Host tensors; the zero residuals of a residual UNet once a step has needed them.
    Host(Option<Vec<DynValue>>),
    Device(Box<Bound>),
    Graph(MutexGuard<'e, Vec<GraphUnet>>),
}

/// Runs the UNet for the steps of one denoising loop.
pub(super) struct UnetRunner<'e> {
    unet: &'e Unet,
    conditioning: UnetConditioning<'e>,
    sample_shape: [i64; 4],
    rows: usize,
    mode: Mode<'e>,
    /// The device the bound buffers live on (negative: the CPU); `None` on the host path.
    device_id: Option<i32>,
}

pub(crate) fn device_info(device_id: i32) -> ort::Result<MemoryInfo<'static>> {
    // A negative id stands for the CPU (see `EngineOptions::bind_io_on_cpu`).
    if device_id < 0 {
        return MemoryInfo::new(
            AllocationDevice::CPU,
            0,
            AllocatorType::Device,
            MemoryType::Default,
        );
    }
    MemoryInfo::new(
        AllocationDevice::CUDA,
        device_id,
        AllocatorType::Device,
        MemoryType::Default,
    )
}

/// Copy a host value into a device buffer of the same type and shape.
pub(crate) fn upload(host: &DynValue, device: &mut DynTensor) -> ort::Result<()> {
    let host = host.view().downcast::<DynTensorValueType>()?;
    host.copy_into(device)
}

/// A zero host value for each residual input.
fn host_zeros(residuals: &[ResidualInput<'_>]) -> ort::Result<Vec<DynValue>> {
    residuals
        .iter()
        .map(|r| {
            let count = r.dims.iter().product::<i64>() as usize;
            tensor::float_value(r.elem, &r.dims, &vec![0.0f32; count])
        })
        .collect()
}

fn timestep_host(input: &TimestepInput, t: f64, rows: usize) -> ort::Result<DynValue> {
    super::unet_inputs::timestep_value(input, t, rows)
}

impl Bound {
    /// Allocate device buffers on `component`'s session for `shape` and bind them.
    fn new(
        component: &Component,
        unet: &Unet,
        device_id: i32,
        sample_shape: [i64; 4],
        rows: usize,
        conditioning: &UnetConditioning<'_>,
    ) -> ort::Result<Self> {
        component.with_session(|session| {
            let allocator = Allocator::new(session, device_info(device_id)?)?;
            let like = |v: &DynValue| -> ort::Result<DynTensor> {
                let shape: Vec<i64> = v.shape().to_vec();
                DynTensor::new(&allocator, *v.data_type(), shape)
            };
            let timestep_template = timestep_host(&unet.timestep, 0.0, rows)?;
            let sample = DynTensor::new(&allocator, unet.sample.elem, sample_shape.to_vec())?;
            let timestep = like(&timestep_template)?;
            let hidden = like(conditioning.encoder_hidden_states)?;
            let text_embeds = like(conditioning.text_embeds)?;
            let time_ids = like(conditioning.time_ids)?;
            let residuals = conditioning
                .residuals
                .iter()
                .map(|r| DynTensor::new(&allocator, r.elem, r.dims.clone()))
                .collect::<ort::Result<Vec<_>>>()?;
            let out = DynTensor::new(&allocator, unet.sample.elem, sample_shape.to_vec())?;
            let mut binding = session.create_binding()?;
            binding.bind_input("sample", &sample)?;
            binding.bind_input("timestep", &timestep)?;
            binding.bind_input("encoder_hidden_states", &hidden)?;
            binding.bind_input("text_embeds", &text_embeds)?;
            binding.bind_input("time_ids", &time_ids)?;
            for (input, tensor) in conditioning.residuals.iter().zip(&residuals) {
                binding.bind_input(input.name, tensor)?;
            }
            let mut bound = Self {
                binding,
                sample,
                timestep,
                hidden,
                text_embeds,
                time_ids,
                residuals,
                out,
                _allocator: allocator,
            };
            bound.binding.bind_output("out_sample", &mut bound.out)?;
            Ok(bound)
        })
    }

    /// Copy a run's conditioning to the device and zero the residual inputs there.
    fn prepare_run(
        &mut self,
        conditioning: &UnetConditioning<'_>,
        zeros: &ZeroGraphs,
        options: &SessionOptions,
    ) -> Result<(), EngineError> {
        upload(conditioning.encoder_hidden_states, &mut self.hidden).map_err(unet_err)?;
        upload(conditioning.text_embeds, &mut self.text_embeds).map_err(unet_err)?;
        upload(conditioning.time_ids, &mut self.time_ids).map_err(unet_err)?;
        zero_fill::fill(zeros, options, &mut self.residuals, UNET)
    }

    /// Run the UNet on what the sample buffer holds at timestep `t`; only the timestep is
    /// copied. Returns the time inside ONNX Runtime and the time copying.
    fn run_in_place(
        &mut self,
        component: &Component,
        unet: &Unet,
        t: f64,
        rows: usize,
    ) -> Result<(Duration, Duration), EngineError> {
        let timestep = timestep_host(&unet.timestep, t, rows).map_err(unet_err)?;
        let copy_started = Instant::now();
        upload(&timestep, &mut self.timestep).map_err(unet_err)?;
        let copy_time = copy_started.elapsed();
        let started = Instant::now();
        component
            .with_session(|session| session.run_binding(&self.binding).map(drop))
            .map_err(unet_err)?;
        Ok((started.elapsed(), copy_time))
    }

    fn step(
        &mut self,
        component: &Component,
        unet: &Unet,
        sample: &DynValue,
        t: f64,
        rows: usize,
    ) -> Result<StepOutput, EngineError> {
        let timestep = timestep_host(&unet.timestep, t, rows).map_err(unet_err)?;
        let copy_started = Instant::now();
        upload(sample, &mut self.sample).map_err(unet_err)?;
        upload(&timestep, &mut self.timestep).map_err(unet_err)?;
        let mut copy_time = copy_started.elapsed();
        let started = Instant::now();
        component
            .with_session(|session| session.run_binding(&self.binding).map(drop))
            .map_err(unet_err)?;
        let session_time = started.elapsed();
        let copy_started = Instant::now();
        let host = self.out.to(AllocationDevice::CPU, 0).map_err(unet_err)?;
        copy_time += copy_started.elapsed();
        let out = tensor::to_f32(&host.into_dyn()).map_err(unet_err)?.data;
        Ok(StepOutput {
            out,
            session_time,
            copy_time,
        })
    }
}

impl<'e> UnetRunner<'e> {
    /// Set up the UNet for a run of `rows` batch rows of latents `[channels, h, w]`.
    pub(super) fn new(
        engine: &'e Engine,
        conditioning: UnetConditioning<'e>,
        sample_shape: [i64; 4],
    ) -> Result<Self, EngineError> {
        let unet = &engine.model.unet;
        let rows = sample_shape[0] as usize;
        let cuda = engine.options.cuda;
        let device_id = match engine.options.device {
            Device::Cuda { index } if cuda.io_binding => i32::try_from(index).unwrap_or(0),
            Device::Cpu if engine.options.bind_io_on_cpu => -1,
            _ => {
                return Ok(Self {
                    unet,
                    conditioning,
                    sample_shape,
                    rows,
                    mode: Mode::Host(None),
                    device_id: None,
                })
            }
        };
        let seq = conditioning
            .encoder_hidden_states
            .shape()
            .get(1)
            .copied()
            .unwrap_or(0) as usize;
        let shape = GraphShape {
            rows,
            latent_h: sample_shape[2] as usize,
            latent_w: sample_shape[3] as usize,
            seq,
        };
        let mode = if cuda.graph {
            match engine.graph_unet(shape, &conditioning, sample_shape)? {
                Some(guard) => Mode::Graph(guard),
                None => Mode::Device(Box::new(
                    Bound::new(
                        &unet.component,
                        unet,
                        device_id,
                        sample_shape,
                        rows,
                        &conditioning,
                    )
                    .map_err(unet_err)?,
                )),
            }
        } else {
            Mode::Device(Box::new(
                Bound::new(
                    &unet.component,
                    unet,
                    device_id,
                    sample_shape,
                    rows,
                    &conditioning,
                )
                .map_err(unet_err)?,
            ))
        };
        let mut runner = Self {
            unet,
            conditioning,
            sample_shape,
            rows,
            mode,
            device_id: Some(device_id),
        };
        let bound = match &mut runner.mode {
            Mode::Host(_) => None,
            Mode::Device(bound) => Some(&mut **bound),
            Mode::Graph(guard) => Some(
                &mut guard
                    .last_mut()
                    .expect("the graph session in use is the last one")
                    .bound,
            ),
        };
        if let Some(bound) = bound {
            let options = engine.session_options();
            bound.prepare_run(&runner.conditioning, &engine.zero_graphs, &options)?;
        }
        Ok(runner)
    }

    /// The device the UNet's inputs are bound on (negative: the CPU), or `None` on the host
    /// path.
    pub(super) fn device_id(&self) -> Option<i32> {
        self.device_id
    }

    /// The bound ControlNet residual inputs of a residual UNet, in slot order (down residuals,
    /// then mid); empty on the host path. What is written here is what the next step reads.
    pub(super) fn residual_buffers(&mut self) -> &mut [DynTensor] {
        match &mut self.mode {
            Mode::Host(_) => &mut [],
            Mode::Device(bound) => &mut bound.residuals,
            Mode::Graph(guard) => {
                &mut guard
                    .last_mut()
                    .expect("the graph session in use is the last one")
                    .bound
                    .residuals
            }
        }
    }

    /// The bound buffers and their session (device path only).
    fn bound_mut(&mut self) -> Option<(&mut Bound, &Component)> {
        match &mut self.mode {
            Mode::Host(_) => None,
            Mode::Device(bound) => Some((&mut **bound, &self.unet.component)),
            Mode::Graph(guard) => {
                let graph = guard
                    .last_mut()
                    .expect("the graph session in use is the last one");
                Some((&mut graph.bound, &*graph.component))
            }
        }
    }

    /// The bound sample input and prediction output (device path only), for a step that
    /// stays on the device ([`super::device_step`]).
    pub(super) fn bound_io(&mut self) -> Result<(&mut DynTensor, &DynTensor), EngineError> {
        self.bound_mut()
            .map(|(bound, _)| (&mut bound.sample, &bound.out))
            .ok_or_else(|| EngineError::UnexpectedOutput {
                stage: "UNet",
                message: "the UNet's buffers are not bound".to_owned(),
            })
    }

    /// Copy `model_input` into the bound sample buffer (device path only).
    pub(super) fn upload_sample(&mut self, model_input: &[f32]) -> Result<Duration, EngineError> {
        let sample = tensor::float_value(self.unet.sample.elem, &self.sample_shape, model_input)
            .map_err(unet_err)?;
        let started = Instant::now();
        if let Some((bound, _)) = self.bound_mut() {
            upload(&sample, &mut bound.sample).map_err(unet_err)?;
        }
        Ok(started.elapsed())
    }

    /// Evaluate the UNet on what its bound sample buffer holds, leaving the prediction in its
    /// bound output (device path only; on the host path this does nothing). Returns the time
    /// inside ONNX Runtime and the time copying the timestep.
    pub(super) fn step_in_place(&mut self, t: f64) -> Result<(Duration, Duration), EngineError> {
        let (unet, rows) = (self.unet, self.rows);
        match self.bound_mut() {
            Some((bound, component)) => bound.run_in_place(component, unet, t, rows),
            None => Ok((Duration::ZERO, Duration::ZERO)),
        }
    }

    /// Evaluate the UNet on `model_input` (the scaled latent batch) at timestep `t`, with any
    /// extra host inputs (ControlNet residuals; a residual UNet without them reads zeros). On
    /// the device path, `extra` is ignored: the residual inputs are the bound buffers (see
    /// [`Self::residual_buffers`]), zeroed at the run's start.
    pub(super) fn step(
        &mut self,
        model_input: &[f32],
        t: f64,
        extra: Vec<(&str, SessionInputValue<'_>)>,
    ) -> Result<StepOutput, EngineError> {
        let sample = tensor::float_value(self.unet.sample.elem, &self.sample_shape, model_input)
            .map_err(unet_err)?;
        match &mut self.mode {
            Mode::Host(zeros) => {
                let timestep =
                    timestep_host(&self.unet.timestep, t, self.rows).map_err(unet_err)?;
                let mut inputs: Vec<(&str, SessionInputValue<'_>)> = vec![
                    ("sample", sample.into()),
                    ("timestep", timestep.into()),
                    (
                        "encoder_hidden_states",
                        self.conditioning.encoder_hidden_states.into(),
                    ),
                    ("text_embeds", self.conditioning.text_embeds.into()),
                    ("time_ids", self.conditioning.time_ids.into()),
                ];
                if extra.is_empty() && !self.conditioning.residuals.is_empty() {
                    if zeros.is_none() {
                        *zeros = Some(host_zeros(&self.conditioning.residuals).map_err(unet_err)?);
                    }
                    let names = self.conditioning.residuals.iter().map(|r| r.name);
                    inputs.extend(
                        names
                            .zip(zeros.iter().flatten())
                            .map(|(n, z)| (n, z.into())),
                    );
                } else {
                    inputs.extend(extra);
                }
                let result = self.unet.component.run(UNET, inputs, &["out_sample"])?;
                Ok(StepOutput {
                    out: result
                        .outputs
                        .into_iter()
                        .next()
                        .map(|o| o.data)
                        .unwrap_or_default(),
                    session_time: result.session_time,
                    copy_time: Duration::ZERO,
                })
            }
            Mode::Device(bound) => {
                bound.step(&self.unet.component, self.unet, &sample, t, self.rows)
            }
            Mode::Graph(guard) => {
                let graph = guard
                    .last_mut()
                    .expect("the graph session in use is the last one");
                let component = Arc::clone(&graph.component);
                graph
                    .bound
                    .step(&component, self.unet, &sample, t, self.rows)
            }
        }
    }
}

impl Engine {
    /// The static-shape UNet session for `shape`, loaded (with CUDA graph capture) on first use,
    /// moved to the end of the list and locked for the caller; `None` when the list is full of
    /// other shapes.
    fn graph_unet(
        &self,
        shape: GraphShape,
        conditioning: &UnetConditioning<'_>,
        sample_shape: [i64; 4],
    ) -> Result<Option<MutexGuard<'_, Vec<GraphUnet>>>, EngineError> {
        let mut sessions = self
            .graph_unets
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(pos) = sessions.iter().position(|g| g.shape == shape) {
            let g = sessions.remove(pos);
            sessions.push(g);
            return Ok(Some(sessions));
        }
        if sessions.len() >= self.options.cuda.graph_shapes.max(1) {
            return Ok(None);
        }
        let device_id = match self.options.device {
            Device::Cuda { index } => i32::try_from(index).unwrap_or(0),
            Device::Cpu => -1,
        };
        let unet = &self.model.unet;
        let mut dims: Vec<(String, i64)> = vec![
            ("batch_size".to_owned(), shape.rows as i64),
            ("height".to_owned(), shape.latent_h as i64),
            ("width".to_owned(), shape.latent_w as i64),
            ("sequence_length".to_owned(), shape.seq as i64),
        ];
        // A residual UNet's ControlNet inputs have their own named spatial axes (as
        // onnx/export_controlnet.py exports them).
        if let Some(residuals) = &unet.residuals {
            for slot in residuals.down.iter().chain(std::iter::once(&residuals.mid)) {
                let [_, _, h, w] = slot.shape(shape.rows, shape.latent_h, shape.latent_w);
                dims.push((format!("{}_height", slot.name), h as i64));
                dims.push((format!("{}_width", slot.name), w as i64));
            }
        }
        let dims: Vec<(&str, i64)> = dims.iter().map(|(n, d)| (n.as_str(), *d)).collect();
        let mut options = self.session_options();
        options.graph_capture = device_id >= 0;
        // On a GPU this session captures a CUDA graph in this unit of work: no other GPU thread
        // may run meanwhile (a no-op on a thread that holds no gate, such as a CPU consumer's).
        capture_gate::exclusive_for_capture();
        let started = Instant::now();
        let component = Arc::new(Component::load_file_with_dims(
            unet.component.path(),
            &options,
            &dims,
        )?);
        let bound = Bound::new(
            &component,
            unet,
            device_id,
            sample_shape,
            shape.rows,
            conditioning,
        )
        .map_err(unet_err)?;
        tracing::info!(
            ?shape,
            load_ms = started.elapsed().as_millis() as u64,
            "static-shape UNet session loaded for CUDA graph capture"
        );
        sessions.push(GraphUnet {
            shape,
            bound,
            component,
        });
        Ok(Some(sessions))
    }
}
