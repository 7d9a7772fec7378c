//! Classifier-free guidance and the Euler update on the device, for runs whose UNet inputs and
//! outputs are bound to device buffers ([`CudaOptions::device_step`](super::cuda::CudaOptions)):
//! a small graph, built with ONNX Runtime's model editor, reads the UNet's bound prediction and
//! the latents, and writes the next latents and the next step's scaled model input straight into
//! the UNet's bound sample buffer, and the same input into each ControlNet's bound sample buffer
//! (only the positive rows in guess mode). A step then copies nothing but its timesteps and four
//! coefficients to the device, and nothing back; the latents come back once, after the loop.
//!
//! The arithmetic is the host's, in the same order and in float32 (`uncond + g·(cond − uncond)`,
//! then `x0 = x − σ·ε`, `d = (x − x0)/σ`, `x + d·dt`, and the input divided by `(σ_next² + 1)^½`),
//! so on the CPU the two paths give the same bits. Only the plain Euler update of an epsilon
//! prediction runs here (see [`Scheduler::euler_epsilon`](super::scheduler::Scheduler)); a
//! NaN or infinity is found when the latents come back rather than at the step that made it.
//!
//! A dynamic batch ([`super::batch`]) steps all of its runs with one graph run: the UNet's rows
//! are each run's `[negative; positive]` block in turn, so the graph picks each image's two
//! rows and writes each run's input rows by index ([`row_indices`]), and every image carries
//! its own run's guidance scale and σ's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ort::editor::{Graph, Model};
use ort::memory::{AllocationDevice, Allocator};
use ort::session::IoBinding;
use ort::value::{DynTensor, Outlet, Tensor, TensorElementType};

use super::built_graph::{
    add, add_cast, add_concat_rows, add_split, add_split_axis, model, tensor_type, BuiltGraphs,
};
use super::runtime::SessionOptions;
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StepSpec {
    /// The UNet's prediction type.
    pub prediction: TensorElementType,
    /// The UNet's sample input type.
    pub sample: TensorElementType,
    /// Whether the prediction holds negative then positive rows to combine.
    pub guidance: bool,
    /// The ControlNets' sample inputs: each one's type and whether it takes only the positive
    /// rows (guess mode under guidance).
    pub controls: Vec<ControlInput>,
    /// The rows belong to several runs (a dynamic batch): coefficients per image, and under
    /// guidance the prediction's rows and the next input's rows picked by index
    /// ([`row_indices`]).
    pub batched: bool,
}

/// Under guidance, where each image's rows are in a dynamic batch's UNet rows, whose runs
/// (of `images[r]` images each) follow each other as `[negative; positive]` blocks: for each
/// image in order the rows of its negative and of its positive prediction, and for each UNet
/// row the image whose next input it takes.
fn row_indices(images: &[usize]) -> [Vec<i64>; 3] {
    let (mut negative, mut positive, mut input) = (Vec::new(), Vec::new(), Vec::new());
    let (mut row, mut image) = (0i64, 0i64);
    for &k in images {
        let k = k as i64;
        negative.extend(row..row + k);
        positive.extend(row + k..row + 2 * k);
        input.extend((image..image + k).chain(image..image + k));
        row += 2 * k;
        image += k;
    }
    [negative, positive, input]
}

/// The sample input of one ControlNet fed by the step graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ControlInput {
    pub elem: TensorElementType,
    pub positive_only: bool,
}

/// The step graph's output for ControlNet `k`'s sample input.
fn control_output(k: usize) -> String {
    format!("control_input_{k}")
}

/// Cast `from` to `elem` (or copy it when it is float32 already) into `to`.
fn cast_out(graph: &mut Graph, from: &str, to: &str, elem: TensorElementType) -> ort::Result<()> {
    if elem == TensorElementType::Float32 {
        add(graph, "Identity", &[from], to)
    } else {
        add_cast(graph, from, to, elem)
    }
}

/// The step graph: inputs `latents` (float32), `noise_pred` (the UNet's output) and `coef`
/// (float32 `[g, σ, dt, (σ_next² + 1)^½]`; batched: those four for each image, shape
/// `[images, 4, 1, 1]`, and under guidance the int64 row indices `negative_rows`,
/// `positive_rows` and `input_rows`); outputs `latents_out`, `model_input` and one
/// `control_input_{k}` per ControlNet.
fn build(spec: &StepSpec) -> ort::Result<Model> {
    let f32 = TensorElementType::Float32;
    let mut graph = Graph::new()?;
    let mut inputs = vec![
        Outlet::new("latents", tensor_type(f32, 4)),
        Outlet::new("noise_pred", tensor_type(spec.prediction, 4)),
        Outlet::new("coef", tensor_type(f32, if spec.batched { 4 } else { 1 })),
    ];
    let indexed = spec.batched && spec.guidance;
    if indexed {
        for name in ROW_INPUTS {
            inputs.push(Outlet::new(name, tensor_type(TensorElementType::Int64, 1)));
        }
    }
    graph.set_inputs(inputs)?;
    let mut outputs = vec![
        Outlet::new("latents_out", tensor_type(f32, 4)),
        Outlet::new("model_input", tensor_type(spec.sample, 4)),
    ];
    for (k, control) in spec.controls.iter().enumerate() {
        outputs.push(Outlet::new(control_output(k), tensor_type(control.elem, 4)));
    }
    graph.set_outputs(outputs)?;
    // One coefficient each, or per image `[images, 1, 1, 1]`, which broadcasts over the
    // image's latents.
    let coefficients = ["g", "sigma", "dt", "input_div"];
    if spec.batched {
        add_split_axis(&mut graph, "coefficients", "coef", &coefficients, 1)?;
    } else {
        add_split(&mut graph, "coefficients", "coef", &coefficients)?;
    }
    let mut pred = "noise_pred";
    if spec.prediction != f32 {
        add_cast(&mut graph, "noise_pred", "pred", f32)?;
        pred = "pred";
    }
    let eps = if spec.guidance {
        if indexed {
            add(&mut graph, "Gather", &[pred, ROW_INPUTS[0]], "uncond")?;
            add(&mut graph, "Gather", &[pred, ROW_INPUTS[1]], "cond")?;
        } else {
            add_split(&mut graph, "halves", pred, &["uncond", "cond"])?;
        }
        add(&mut graph, "Sub", &["cond", "uncond"], "diff")?;
        add(&mut graph, "Mul", &["g", "diff"], "pull")?;
        add(&mut graph, "Add", &["uncond", "pull"], "eps")?;
        "eps"
    } else {
        pred
    };
    add(&mut graph, "Mul", &["sigma", eps], "sigma_eps")?;
    add(&mut graph, "Sub", &["latents", "sigma_eps"], "x0")?;
    add(&mut graph, "Sub", &["latents", "x0"], "rise")?;
    add(&mut graph, "Div", &["rise", "sigma"], "derivative")?;
    add(&mut graph, "Mul", &["derivative", "dt"], "delta")?;
    add(&mut graph, "Add", &["latents", "delta"], "latents_out")?;
    add(&mut graph, "Div", &["latents_out", "input_div"], "scaled")?;
    let mut input = "scaled";
    if indexed {
        add(&mut graph, "Gather", &["scaled", ROW_INPUTS[2]], "both")?;
        input = "both";
    } else if spec.guidance {
        add_concat_rows(&mut graph, &["scaled", "scaled"], "both")?;
        input = "both";
    }
    cast_out(&mut graph, input, "model_input", spec.sample)?;
    for (k, control) in spec.controls.iter().enumerate() {
        let rows = if control.positive_only {
            "scaled"
        } else {
            input
        };
        cast_out(&mut graph, rows, &control_output(k), control.elem)?;
    }
    model(graph)
}

/// A batched graph's row-index inputs (see [`row_indices`]).
const ROW_INPUTS: [&str; 3] = ["negative_rows", "positive_rows", "input_rows"];

/// `[g, σ, dt, (σ_next² + 1)^½]`, the order of the graph's `coef`.
fn coefficients(g: f32, sigma: f32, sigma_next: f32) -> [f32; 4] {
    [
        g,
        sigma,
        sigma_next - sigma,
        super::scheduler::input_scale(sigma_next),
    ]
}

/// The step graphs an engine has built, by spec.
pub(crate) type StepGraphs = BuiltGraphs<StepSpec>;

/// The latents of one run on the device, and the step graph bound to them and to the UNet.
pub(crate) struct DeviceStep {
    graph: Arc<Component>,
    /// Binding `k` reads `latents[k]` and writes `latents[1 - k]`.
    bindings: [IoBinding; 2],
    latents: [DynTensor; 2],
    current: usize,
    /// A dynamic batch's images per run (`None`: one run).
    members: Option<Vec<usize>>,
    _allocator: Allocator,
}

impl DeviceStep {
    /// Bind a step graph to the UNet's bound `sample` input and `prediction` output, with
    /// latents of `shape` on device `device_id` (negative: the CPU). With `controls`, the
    /// graph also writes each step's input for that many ControlNets, whose buffers are bound
    /// with [`Self::bind_control`] before the first step. With `members` (the images of each
    /// run), the rows are a dynamic batch's runs, stepped with [`Self::step_members`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        graphs: &StepGraphs,
        options: &SessionOptions,
        device_id: i32,
        sample: &mut DynTensor,
        prediction: &DynTensor,
        shape: [i64; 4],
        guidance: bool,
        controls: Vec<ControlInput>,
        members: Option<Vec<usize>>,
    ) -> Result<Self, EngineError> {
        let spec = StepSpec {
            prediction: *prediction.data_type(),
            sample: *sample.data_type(),
            guidance,
            controls,
            batched: members.is_some(),
        };
        // The row indices are the same for every step: host tensors bound once.
        let rows = match &members {
            Some(images) if guidance => Some(
                row_indices(images)
                    .map(|v| Tensor::from_array(([v.len()], v)).map_err(step_err))
                    .into_iter()
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            _ => None,
        };
        let label = || {
            let batched = if spec.batched { " for a batch" } else { "" };
            let guidance = if spec.guidance { "" } else { ", no guidance" };
            let controls = match spec.controls.len() {
                0 => String::new(),
                n => format!(", {n} ControlNet input(s)"),
            };
            format!("guidance and Euler step{batched}{guidance}{controls}")
        };
        let graph = graphs.get(&spec, options, label, build)?;
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
                    if let Some(rows) = &rows {
                        for (name, value) in ROW_INPUTS.iter().zip(rows) {
                            binding.bind_input(*name, value)?;
                        }
                    }
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
            members,
            _allocator: allocator,
        })
    }

    /// Bind ControlNet `k`'s sample buffer as the graph's `control_input_{k}`.
    pub(crate) fn bind_control(
        &mut self,
        k: usize,
        buffer: &mut DynTensor,
    ) -> Result<(), EngineError> {
        let name = control_output(k);
        for binding in &mut self.bindings {
            binding
                .bind_output(name.as_str(), &mut *buffer)
                .map_err(step_err)?;
        }
        Ok(())
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
        let coef = coefficients(g, sigma, sigma_next);
        let coef =
            tensor::float_value(TensorElementType::Float32, &[4], &coef).map_err(step_err)?;
        self.run(coef)?;
        Ok(started.elapsed())
    }

    /// One step of a dynamic batch: `(g, σ, σ_next)` for each run, in row order.
    pub(crate) fn step_members(
        &mut self,
        runs: &[(f32, f32, f32)],
    ) -> Result<Duration, EngineError> {
        let started = Instant::now();
        let Some(members) = &self.members else {
            return Err(EngineError::UnexpectedOutput {
                stage: STAGE,
                message: "a batched step on a single run's step graph".to_owned(),
            });
        };
        if runs.len() != members.len() {
            return Err(EngineError::UnexpectedOutput {
                stage: STAGE,
                message: format!(
                    "{} runs' coefficients for {} runs",
                    runs.len(),
                    members.len()
                ),
            });
        }
        let total: usize = members.iter().sum();
        let mut coef = Vec::with_capacity(total * 4);
        for (&(g, sigma, sigma_next), &images) in runs.iter().zip(members) {
            let one = coefficients(g, sigma, sigma_next);
            for _ in 0..images {
                coef.extend_from_slice(&one);
            }
        }
        let shape = [total as i64, 4, 1, 1];
        let coef =
            tensor::float_value(TensorElementType::Float32, &shape, &coef).map_err(step_err)?;
        self.run(coef)?;
        Ok(started.elapsed())
    }

    fn run(&mut self, coef: ort::value::DynValue) -> Result<(), EngineError> {
        let binding = &mut self.bindings[self.current];
        binding.bind_input("coef", &coef).map_err(step_err)?;
        self.graph
            .with_session(|session| session.run_binding(binding).map(drop))
            .map_err(step_err)?;
        self.current = 1 - self.current;
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::row_indices;

    #[test]
    fn a_batch_picks_each_images_rows_from_its_own_runs_block() {
        // Runs of one and two images: rows [n0 | p0 | n1 n2 | p1 p2].
        let [negative, positive, input] = row_indices(&[1, 2]);
        assert_eq!(negative, [0, 2, 3]);
        assert_eq!(positive, [1, 4, 5]);
        assert_eq!(input, [0, 0, 1, 2, 1, 2]);
    }
}
