//! The residual mixer: a small graph, built in memory with ONNX Runtime's model editor, that turns
//! the raw residuals of the ControlNets active at a step into the UNet's residual inputs without
//! leaving the device. Each residual is multiplied by its ControlNet's scale for that depth
//! (`conditioning_scale`, or guess mode's `logspace` ramp), summed over ControlNets, cast to the
//! element type the UNet takes and, in guess mode under guidance, preceded by zero rows for the
//! negative half of the batch.
//!
//! Inputs: `scales` (float32, one value per ControlNet per residual, ControlNet-major) and
//! `r{u}_{k}` (residual `k` of active ControlNet `u`). Outputs: `o{k}`, one per UNet residual.
//! One graph is built per [`MixerSpec`] and kept by the engine.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ort::editor::{Graph, Model, Node, Opset, ONNX_DOMAIN};
use ort::operator::Attribute;
use ort::value::{Outlet, Shape, SymbolicDimensions, TensorElementType, ValueType};

use crate::engine::runtime::{self, SessionOptions};
use crate::engine::session::Component;
use crate::engine::EngineError;

/// The scales input.
pub(crate) const SCALES: &str = "scales";

/// The input for residual `k` of active ControlNet `unit`.
pub(crate) fn input_name(unit: usize, k: usize) -> String {
    format!("r{unit}_{k}")
}

/// The output for UNet residual `k`.
pub(crate) fn output_name(k: usize) -> String {
    format!("o{k}")
}

/// What a mixer graph is built for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MixerSpec {
    /// The element type of each residual of each active ControlNet (`inputs[unit][k]`).
    pub inputs: Vec<Vec<TensorElementType>>,
    /// The element type of each UNet residual input.
    pub outputs: Vec<TensorElementType>,
    /// Whether zero rows come first (guess mode under guidance).
    pub zero_negative: bool,
}

/// The ONNX `TensorProto` code of a floating-point element type.
fn onnx_code(elem: TensorElementType) -> ort::Result<i64> {
    match elem {
        TensorElementType::Float32 => Ok(1),
        TensorElementType::Float16 => Ok(10),
        TensorElementType::Float64 => Ok(11),
        TensorElementType::Bfloat16 => Ok(16),
        other => Err(ort::Error::new(format!(
            "the residual mixer does not handle {other} residuals"
        ))),
    }
}

fn tensor_type(elem: TensorElementType, rank: usize) -> ValueType {
    ValueType::Tensor {
        ty: elem,
        shape: Shape::new(vec![-1i64; rank]),
        dimension_symbols: SymbolicDimensions::empty(rank),
    }
}

fn node(op: &str, name: &str, inputs: &[&str], output: &str) -> ort::Result<Node> {
    Node::new(op, ONNX_DOMAIN, name, inputs, [output], [])
}

fn cast(name: &str, input: &str, output: &str, to: TensorElementType) -> ort::Result<Node> {
    Node::new(
        "Cast",
        ONNX_DOMAIN,
        name,
        [input],
        [output],
        [Attribute::new("to", onnx_code(to)?)?],
    )
}

/// The mixer graph for `spec`.
pub(crate) fn build(spec: &MixerSpec) -> ort::Result<Model> {
    let units = spec.inputs.len();
    let slots = spec.outputs.len();
    if units == 0 || slots == 0 || spec.inputs.iter().any(|u| u.len() != slots) {
        return Err(ort::Error::new(
            "a residual mixer needs at least one ControlNet with one residual per UNet input",
        ));
    }
    let mut graph = Graph::new()?;
    let mut inputs = vec![Outlet::new(
        SCALES,
        tensor_type(TensorElementType::Float32, 1),
    )];
    for (u, elems) in spec.inputs.iter().enumerate() {
        for (k, &elem) in elems.iter().enumerate() {
            inputs.push(Outlet::new(input_name(u, k), tensor_type(elem, 4)));
        }
    }
    graph.set_inputs(inputs)?;
    graph.set_outputs(
        spec.outputs
            .iter()
            .enumerate()
            .map(|(k, &elem)| Outlet::new(output_name(k), tensor_type(elem, 4))),
    )?;
    // Without a `split` input, Split (opset 13 to 17) cuts `scales` into one value per output.
    let scale_names: Vec<String> = (0..units * slots).map(|j| format!("s{j}")).collect();
    graph.add_node(Node::new(
        "Split",
        ONNX_DOMAIN,
        "split_scales",
        [SCALES],
        &scale_names,
        [],
    )?)?;
    for (k, &out_elem) in spec.outputs.iter().enumerate() {
        let mut terms = Vec::with_capacity(units);
        for (u, elems) in spec.inputs.iter().enumerate() {
            let mut residual = input_name(u, k);
            if elems[k] != out_elem {
                let cast_name = format!("c{u}_{k}");
                graph.add_node(cast(&cast_name, &residual, &cast_name, out_elem)?)?;
                residual = cast_name;
            }
            let mut scale = scale_names[u * slots + k].clone();
            if out_elem != TensorElementType::Float32 {
                let cast_name = format!("sc{u}_{k}");
                graph.add_node(cast(&cast_name, &scale, &cast_name, out_elem)?)?;
                scale = cast_name;
            }
            let term = format!("m{u}_{k}");
            graph.add_node(node("Mul", &term, &[&residual, &scale], &term)?)?;
            terms.push(term);
        }
        let sum = if units == 1 {
            terms.remove(0)
        } else {
            let sum = format!("sum{k}");
            let refs: Vec<&str> = terms.iter().map(String::as_str).collect();
            graph.add_node(node("Sum", &sum, &refs, &sum)?)?;
            sum
        };
        let out = output_name(k);
        if spec.zero_negative {
            let shape = format!("shape{k}");
            graph.add_node(node("Shape", &shape, &[&sum], &shape)?)?;
            // ConstantOfShape makes float32 zeros unless told otherwise.
            let mut zeros = format!("zf{k}");
            graph.add_node(node("ConstantOfShape", &zeros, &[&shape], &zeros)?)?;
            if out_elem != TensorElementType::Float32 {
                let cast_name = format!("z{k}");
                graph.add_node(cast(&cast_name, &zeros, &cast_name, out_elem)?)?;
                zeros = cast_name;
            }
            graph.add_node(Node::new(
                "Concat",
                ONNX_DOMAIN,
                format!("concat{k}"),
                [zeros.as_str(), sum.as_str()],
                [out.as_str()],
                [Attribute::new("axis", 0i64)?],
            )?)?;
        } else {
            graph.add_node(node("Identity", &out, &[&sum], &out)?)?;
        }
    }
    let mut model = Model::new([Opset::new(ONNX_DOMAIN, 17)?])?;
    model.set_graph(graph)?;
    Ok(model)
}

/// The mixer sessions an engine has built, by spec.
#[derive(Debug, Default)]
pub(crate) struct Mixers {
    built: Mutex<Vec<(MixerSpec, Arc<Component>)>>,
}

impl Mixers {
    /// The session for `spec`, built on first use.
    pub(crate) fn get(
        &self,
        spec: &MixerSpec,
        options: &SessionOptions,
    ) -> Result<Arc<Component>, EngineError> {
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, mixer)) = built.iter().find(|(s, _)| s == spec) {
            return Ok(Arc::clone(mixer));
        }
        let label = PathBuf::from(format!(
            "<ControlNet residual mixer: {} ControlNet(s), {} residuals{}>",
            spec.inputs.len(),
            spec.outputs.len(),
            if spec.zero_negative {
                ", guess mode"
            } else {
                ""
            }
        ));
        let model = build(spec).map_err(|source| EngineError::SessionLoad {
            path: label.clone(),
            source,
        })?;
        let mut options = *options;
        options.graph_capture = false;
        let session = runtime::session_from_model(model, &label, &options)?;
        let mixer = Arc::new(Component::from_session(label, session));
        built.push((spec.clone(), Arc::clone(&mixer)));
        Ok(mixer)
    }
}
