//! Classifier-free guidance and the Euler update on the device, for runs whose UNet inputs and
//! outputs are bound to device buffers ([`CudaOptions::device_step`](super::cuda::CudaOptions)):
//! a small graph, built with ONNX Runtime's model editor, reads the UNet's bound prediction and
//! the latents, and writes the next latents and the next step's scaled model input straight into
//! the UNet's bound sample buffer. A step then copies nothing but its timestep and four
//! coefficients to the device, and nothing back; the latents come back once, after the loop.
//!
//! The arithmetic is the host's, in the same order and in float32 (`uncond + g·(cond − uncond)`,
//! then `x0 = x − σ·ε`, `d = (x − x0)/σ`, `x + d·dt`, and the input divided by `(σ_next² + 1)^½`),
//! so on the CPU the two paths give the same bits. Only the plain Euler update of an epsilon
//! prediction runs here (see [`Scheduler::euler_epsilon`](super::scheduler::Scheduler)); a
//! NaN or infinity is found when the latents come back rather than at the step that made it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ort::editor::{Graph, Model, Node, Opset, ONNX_DOMAIN};
use ort::memory::{AllocationDevice, Allocator};
use ort::operator::Attribute;
use ort::session::IoBinding;
use ort::value::{DynTensor, Outlet, Shape, SymbolicDimensions, TensorElementType, ValueType};

use super::runtime::{self, SessionOptions};
use super::session::Component;
use super::unet::{device_info, upload};
use super::{tensor, EngineError};

const STAGE: &str = "scheduler step";

fn step_err(source: ort::Error) -> EngineError {
    EngineError::Inference {
        stage: STAGE,
        source,
    }
}

/// What a step graph is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StepSpec {
    /// The UNet's prediction type.
    pub prediction: TensorElementType,
    /// The UNet's sample input type.
    pub sample: TensorElementType,
    /// Whether the prediction holds negative then positive rows to combine.
    pub guidance: bool,
}

fn tensor_type(elem: TensorElementType, rank: usize) -> ValueType {
    ValueType::Tensor {
        ty: elem,
        shape: Shape::new(vec![-1i64; rank]),
        dimension_symbols: SymbolicDimensions::empty(rank),
    }
}

fn onnx_code(elem: TensorElementType) -> ort::Result<i64> {
    match elem {
        TensorElementType::Float32 => Ok(1),
        TensorElementType::Float16 => Ok(10),
        other => Err(ort::Error::new(format!(
            "the device step does not handle {other} tensors"
        ))),
    }
}

fn op(graph: &mut Graph, op: &str, inputs: &[&str], output: &str) -> ort::Result<()> {
    graph.add_node(Node::new(op, ONNX_DOMAIN, output, inputs, [output], [])?)
}

/// The step graph: inputs `latents` (float32), `noise_pred` (the UNet's output) and `coef`
/// (float32 `[g, σ, dt, (σ_next² + 1)^½]`); outputs `latents_out` and `model_input`.
fn build(spec: StepSpec) -> ort::Result<Model> {
    let f32 = TensorElementType::Float32;
    let mut graph = Graph::new()?;
    graph.set_inputs([
        Outlet::new("latents", tensor_type(f32, 4)),
        Outlet::new("noise_pred", tensor_type(spec.prediction, 4)),
        Outlet::new("coef", tensor_type(f32, 1)),
    ])?;
    graph.set_outputs([
        Outlet::new("latents_out", tensor_type(f32, 4)),
        Outlet::new("model_input", tensor_type(spec.sample, 4)),
    ])?;
    // Without a `split` input, Split (opset 13 to 17) cuts into equal parts.
    graph.add_node(Node::new(
        "Split",
        ONNX_DOMAIN,
        "coefficients",
        ["coef"],
        ["g", "sigma", "dt", "input_div"],
        [],
    )?)?;
    let mut pred = "noise_pred";
    if spec.prediction != f32 {
        graph.add_node(Node::new(
            "Cast",
            ONNX_DOMAIN,
            "pred",
            ["noise_pred"],
            ["pred"],
            [Attribute::new("to", 1i64)?],
        )?)?;
        pred = "pred";
    }
    let eps = if spec.guidance {
        graph.add_node(Node::new(
            "Split",
            ONNX_DOMAIN,
            "halves",
            [pred],
            ["uncond", "cond"],
            [],
        )?)?;
        op(&mut graph, "Sub", &["cond", "uncond"], "diff")?;
        op(&mut graph, "Mul", &["g", "diff"], "pull")?;
        op(&mut graph, "Add", &["uncond", "pull"], "eps")?;
        "eps"
    } else {
        pred
    };
    op(&mut graph, "Mul", &["sigma", eps], "sigma_eps")?;
    op(&mut graph, "Sub", &["latents", "sigma_eps"], "x0")?;
    op(&mut graph, "Sub", &["latents", "x0"], "rise")?;
    op(&mut graph, "Div", &["rise", "sigma"], "derivative")?;
    op(&mut graph, "Mul", &["derivative", "dt"], "delta")?;
    op(&mut graph, "Add", &["latents", "delta"], "latents_out")?;
    op(&mut graph, "Div", &["latents_out", "input_div"], "scaled")?;
    let mut input = "scaled";
    if spec.guidance {
        graph.add_node(Node::new(
            "Concat",
            ONNX_DOMAIN,
            "both",
            ["scaled", "scaled"],
            ["both"],
            [Attribute::new("axis", 0i64)?],
        )?)?;
        input = "both";
    }
    if spec.sample == f32 {
        op(&mut graph, "Identity", &[input], "model_input")?;
    } else {
        graph.add_node(Node::new(
            "Cast",
            ONNX_DOMAIN,
            "model_input",
            [input],
            ["model_input"],
            [Attribute::new("to", onnx_code(spec.sample)?)?],
        )?)?;
    }
    let mut model = Model::new([Opset::new(ONNX_DOMAIN, 17)?])?;
    model.set_graph(graph)?;
    Ok(model)
}

/// The step graphs an engine has built, by spec.
#[derive(Debug, Default)]
pub(crate) struct StepGraphs {
    built: Mutex<Vec<(StepSpec, Arc<Component>)>>,
}

impl StepGraphs {
    fn get(&self, spec: StepSpec, options: &SessionOptions) -> Result<Arc<Component>, EngineError> {
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, graph)) = built.iter().find(|(s, _)| *s == spec) {
            return Ok(Arc::clone(graph));
        }
        let label = PathBuf::from(format!(
            "<guidance and Euler step{}>",
            if spec.guidance { "" } else { ", no guidance" }
        ));
        let model = build(spec).map_err(|source| EngineError::SessionLoad {
            path: label.clone(),
            source,
        })?;
        let mut options = *options;
        options.graph_capture = false;
        let session = runtime::session_from_model(model, &label, &options)?;
        let graph = Arc::new(Component::from_session(label, session));
        built.push((spec, Arc::clone(&graph)));
        Ok(graph)
    }
}

/// The latents of one run on the device, and the step graph bound to them and to the UNet.
pub(crate) struct DeviceStep {
    graph: Arc<Component>,
    /// Binding `k` reads `latents[k]` and writes `latents[1 - k]`.
    bindings: [IoBinding; 2],
    latents: [DynTensor; 2],
    current: usize,
    _allocator: Allocator,
}

impl DeviceStep {
    /// Bind a step graph to the UNet's bound `sample` input and `prediction` output, with
    /// latents of `shape` on device `device_id` (negative: the CPU).
    pub(crate) fn new(
        graphs: &StepGraphs,
        options: &SessionOptions,
        device_id: i32,
        sample: &mut DynTensor,
        prediction: &DynTensor,
        shape: [i64; 4],
        guidance: bool,
    ) -> Result<Self, EngineError> {
        let spec = StepSpec {
            prediction: *prediction.data_type(),
            sample: *sample.data_type(),
            guidance,
        };
        let graph = graphs.get(spec, options)?;
        let parts = graph
            .with_session(|session| -> ort::Result<_> {
                let allocator = Allocator::new(session, device_info(device_id)?)?;
                let mut a = DynTensor::new(&allocator, TensorElementType::Float32, shape.to_vec())?;
                let mut b = DynTensor::new(&allocator, TensorElementType::Float32, shape.to_vec())?;
                let mut bind = |from: &DynTensor, to: &mut DynTensor| -> ort::Result<IoBinding> {
                    let mut binding = session.create_binding()?;
                    binding.bind_input("latents", from)?;
                    binding.bind_input("noise_pred", prediction)?;
                    binding.bind_output("latents_out", to)?;
                    binding.bind_output("model_input", &mut *sample)?;
                    Ok(binding)
                };
                let forward = bind(&a, &mut b)?;
                let backward = bind(&b, &mut a)?;
                Ok((allocator, [a, b], [forward, backward]))
            })
            .map_err(step_err)?;
        let (allocator, latents, bindings) = parts;
        Ok(Self {
            graph,
            bindings,
            latents,
            current: 0,
            _allocator: allocator,
        })
    }

    /// Copy the run's latents to the device.
    pub(crate) fn upload_latents(&mut self, latents: &[f32]) -> Result<(), EngineError> {
        let shape = self.latents[self.current].shape().to_vec();
        let host =
            tensor::float_value(TensorElementType::Float32, &shape, latents).map_err(step_err)?;
        upload(&host, &mut self.latents[self.current]).map_err(step_err)
    }

    /// One step: guidance with scale `g`, the Euler update from `sigma` to `sigma_next`, and
    /// the next model input scaled for `sigma_next`. Returns the time it took.
    pub(crate) fn step(
        &mut self,
        g: f32,
        sigma: f32,
        sigma_next: f32,
    ) -> Result<Duration, EngineError> {
        let started = Instant::now();
        let coef = [
            g,
            sigma,
            sigma_next - sigma,
            super::scheduler::input_scale(sigma_next),
        ];
        let coef =
            tensor::float_value(TensorElementType::Float32, &[4], &coef).map_err(step_err)?;
        let binding = &mut self.bindings[self.current];
        binding.bind_input("coef", &coef).map_err(step_err)?;
        self.graph
            .with_session(|session| session.run_binding(binding).map(drop))
            .map_err(step_err)?;
        self.current = 1 - self.current;
        Ok(started.elapsed())
    }

    /// Copy the latents back into `latents`.
    pub(crate) fn download_latents(&self, latents: &mut [f32]) -> Result<(), EngineError> {
        let host = self.latents[self.current]
            .to(AllocationDevice::CPU, 0)
            .map_err(step_err)?;
        let values = tensor::to_f32(&host.into_dyn()).map_err(step_err)?.data;
        if values.len() != latents.len() {
            return Err(EngineError::UnexpectedOutput {
                stage: STAGE,
                message: format!("{} latent values, expected {}", values.len(), latents.len()),
            });
        }
        latents.copy_from_slice(&values);
        Ok(())
    }
}
