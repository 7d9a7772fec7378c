//! Small ONNX graphs the engine builds in memory with ONNX Runtime's model editor (the ControlNet
//! residual mixer, the device step, the zero fill), the helpers that write their nodes, and the
//! per-engine cache of their sessions by what each was built for.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ort::editor::{Graph, Model, Node, Opset, ONNX_DOMAIN};
use ort::operator::Attribute;
use ort::value::{Shape, SymbolicDimensions, TensorElementType, ValueType};

use super::runtime::{self, SessionOptions};
use super::session::Component;
use super::EngineError;

/// A tensor of `elem` and `rank` with every dimension dynamic.
pub(crate) fn tensor_type(elem: TensorElementType, rank: usize) -> ValueType {
    ValueType::Tensor {
        ty: elem,
        shape: Shape::new(vec![-1i64; rank]),
        dimension_symbols: SymbolicDimensions::empty(rank),
    }
}

/// The ONNX `TensorProto` code of a floating-point element type (Cast's `to`).
pub(crate) fn onnx_code(elem: TensorElementType) -> ort::Result<i64> {
    match elem {
        TensorElementType::Float32 => Ok(1),
        TensorElementType::Float16 => Ok(10),
        TensorElementType::Float64 => Ok(11),
        TensorElementType::Bfloat16 => Ok(16),
        other => Err(ort::Error::new(format!(
            "no in-memory graph handles {other} tensors"
        ))),
    }
}

/// Add node `op` without attributes; the node is named after its one output.
pub(crate) fn add(graph: &mut Graph, op: &str, inputs: &[&str], output: &str) -> ort::Result<()> {
    graph.add_node(Node::new(op, ONNX_DOMAIN, output, inputs, [output], [])?)
}

/// Add a Cast of `input` to `to`, named after its output.
pub(crate) fn add_cast(
    graph: &mut Graph,
    input: &str,
    output: &str,
    to: TensorElementType,
) -> ort::Result<()> {
    graph.add_node(Node::new(
        "Cast",
        ONNX_DOMAIN,
        output,
        [input],
        [output],
        [Attribute::new("to", onnx_code(to)?)?],
    )?)
}

/// Add a Concat of `inputs` along the batch axis, named after its output.
pub(crate) fn add_concat_rows(graph: &mut Graph, inputs: &[&str], output: &str) -> ort::Result<()> {
    graph.add_node(Node::new(
        "Concat",
        ONNX_DOMAIN,
        output,
        inputs,
        [output],
        [Attribute::new("axis", 0i64)?],
    )?)
}

/// Add a Split of `input` into `outputs` equal parts along axis 0 (opset 13 to 17 split equally
/// when given no sizes).
pub(crate) fn add_split(
    graph: &mut Graph,
    name: &str,
    input: &str,
    outputs: &[&str],
) -> ort::Result<()> {
    graph.add_node(Node::new("Split", ONNX_DOMAIN, name, [input], outputs, [])?)
}

/// Add a Split of `input` into `outputs` equal parts along `axis`.
pub(crate) fn add_split_axis(
    graph: &mut Graph,
    name: &str,
    input: &str,
    outputs: &[&str],
    axis: i64,
) -> ort::Result<()> {
    graph.add_node(Node::new(
        "Split",
        ONNX_DOMAIN,
        name,
        [input],
        outputs,
        [Attribute::new("axis", axis)?],
    )?)
}

/// The model holding `graph`, at the opset these helpers write for.
pub(crate) fn model(graph: Graph) -> ort::Result<Model> {
    let mut model = Model::new([Opset::new(ONNX_DOMAIN, 17)?])?;
    model.set_graph(graph)?;
    Ok(model)
}

/// Sessions of in-memory graphs, by the spec each was built for.
#[derive(Debug)]
pub(crate) struct BuiltGraphs<S> {
    built: Mutex<Vec<(S, Arc<Component>)>>,
}

impl<S> Default for BuiltGraphs<S> {
    fn default() -> Self {
        Self {
            built: Mutex::new(Vec::new()),
        }
    }
}

impl<S: Clone + PartialEq> BuiltGraphs<S> {
    /// The session for `spec`, built on first use with `build`; `label` names it in errors.
    pub(crate) fn get(
        &self,
        spec: &S,
        options: &SessionOptions,
        label: impl FnOnce() -> String,
        build: impl FnOnce(&S) -> ort::Result<Model>,
    ) -> Result<Arc<Component>, EngineError> {
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, graph)) = built.iter().find(|(s, _)| s == spec) {
            return Ok(Arc::clone(graph));
        }
        let label = PathBuf::from(format!("<{}>", label()));
        let model = build(spec).map_err(|source| EngineError::SessionLoad {
            path: label.clone(),
            source,
        })?;
        let mut options = *options;
        options.graph_capture = false;
        let session = runtime::session_from_model(model, &label, &options)?;
        let graph = Arc::new(Component::from_session(label, session));
        built.push((spec.clone(), Arc::clone(&graph)));
        Ok(graph)
    }

    /// How many graphs have been built.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.built.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}
