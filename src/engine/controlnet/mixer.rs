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

use std::sync::Arc;

use ort::editor::{Graph, Model};
use ort::value::{Outlet, TensorElementType};

use crate::engine::built_graph::{
    add, add_cast, add_concat_rows, add_split, model, tensor_type, BuiltGraphs,
};
use crate::engine::runtime::SessionOptions;
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
    let scale_refs: Vec<&str> = scale_names.iter().map(String::as_str).collect();
    add_split(&mut graph, "split_scales", SCALES, &scale_refs)?;
    // The arithmetic is float32 whatever the residuals' types, as on the host path: the
    // inputs are cast up, the result is cast once to what the UNet takes.
    for (k, &out_elem) in spec.outputs.iter().enumerate() {
        let mut terms = Vec::with_capacity(units);
        for (u, elems) in spec.inputs.iter().enumerate() {
            let mut residual = input_name(u, k);
            if elems[k] != TensorElementType::Float32 {
                let cast_name = format!("c{u}_{k}");
                add_cast(
                    &mut graph,
                    &residual,
                    &cast_name,
                    TensorElementType::Float32,
                )?;
                residual = cast_name;
            }
            let term = format!("m{u}_{k}");
            let scale = &scale_names[u * slots + k];
            add(&mut graph, "Mul", &[&residual, scale], &term)?;
            terms.push(term);
        }
        let mut sum = if units == 1 {
            terms.remove(0)
        } else {
            let sum = format!("sum{k}");
            let refs: Vec<&str> = terms.iter().map(String::as_str).collect();
            add(&mut graph, "Sum", &refs, &sum)?;
            sum
        };
        if spec.zero_negative {
            let shape = format!("shape{k}");
            add(&mut graph, "Shape", &[&sum], &shape)?;
            // ConstantOfShape makes float32 zeros unless told otherwise.
            let zeros = format!("zeros{k}");
            add(&mut graph, "ConstantOfShape", &[&shape], &zeros)?;
            let full = format!("full{k}");
            add_concat_rows(&mut graph, &[&zeros, &sum], &full)?;
            sum = full;
        }
        let out = output_name(k);
        if out_elem == TensorElementType::Float32 {
            add(&mut graph, "Identity", &[&sum], &out)?;
        } else {
            add_cast(&mut graph, &sum, &out, out_elem)?;
        }
    }
    model(graph)
}

/// The mixer sessions an engine has built, by spec.
#[derive(Debug, Default)]
pub(crate) struct Mixers {
    built: BuiltGraphs<MixerSpec>,
}

impl Mixers {
    /// The session for `spec`, built on first use.
    pub(crate) fn get(
        &self,
        spec: &MixerSpec,
        options: &SessionOptions,
    ) -> Result<Arc<Component>, EngineError> {
        let label = || {
            format!(
                "ControlNet residual mixer: {} ControlNet(s), {} residuals{}",
                spec.inputs.len(),
                spec.outputs.len(),
                if spec.zero_negative {
                    ", guess mode"
                } else {
                    ""
                }
            )
        };
        self.built.get(spec, options, label, build)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::tensor;
    use half::f16;
    use ort::value::{DynValue, Tensor};

    fn cpu() -> SessionOptions {
        SessionOptions::cpu_one_thread()
    }

    fn half(shape: [i64; 4], data: &[f32]) -> DynValue {
        tensor::float_value(TensorElementType::Float16, &shape, data).unwrap()
    }

    #[test]
    fn mixes_float16_and_float32_residuals_with_zero_negative_rows() {
        crate::engine::runtime::environment().expect("ONNX Runtime");
        // Two ControlNets, two residuals each: the first ControlNet float16, the second
        // float32; the UNet takes residual 0 in float16 and residual 1 in float32.
        let spec = MixerSpec {
            inputs: vec![
                vec![TensorElementType::Float16, TensorElementType::Float16],
                vec![TensorElementType::Float32, TensorElementType::Float32],
            ],
            outputs: vec![TensorElementType::Float16, TensorElementType::Float32],
            zero_negative: true,
        };
        let mixers = Mixers::default();
        let mixer = mixers.get(&spec, &cpu()).expect("mixer session");
        assert!(Arc::ptr_eq(&mixer, &mixers.get(&spec, &cpu()).unwrap()));
        let a0 = [1.0, -2.0, 0.5, 4.0];
        let a1 = [3.0, 1.5];
        let b0 = [0.25, 0.25, -1.0, 2.0];
        let b1 = [-4.0, 8.0];
        let scales = [0.5f32, 2.0, 1.0, 0.1];
        let scales = Tensor::from_array(([4usize], scales.to_vec())).unwrap();
        let r00 = half([1, 1, 2, 2], &a0);
        let r01 = half([1, 2, 1, 1], &a1);
        let r10 = tensor::float_value(TensorElementType::Float32, &[1, 1, 2, 2], &b0).unwrap();
        let r11 = tensor::float_value(TensorElementType::Float32, &[1, 2, 1, 1], &b1).unwrap();
        let outputs = mixer.with_session(|session| {
            let out = session
                .run(ort::inputs![
                    SCALES => scales,
                    input_name(0, 0) => r00,
                    input_name(0, 1) => r01,
                    input_name(1, 0) => r10,
                    input_name(1, 1) => r11,
                ])
                .unwrap();
            let o0 = out[output_name(0).as_str()]
                .try_extract_tensor::<f16>()
                .map(|(shape, data)| (shape.to_vec(), data.to_vec()))
                .unwrap();
            let o1 = out[output_name(1).as_str()]
                .try_extract_tensor::<f32>()
                .map(|(shape, data)| (shape.to_vec(), data.to_vec()))
                .unwrap();
            (o0, o1)
        });
        let ((shape0, data0), (shape1, data1)) = outputs;
        // Zero rows for the negative half, then 0.5·a + 1.0·b (residual 0), 2·a + 0.1·b (1).
        assert_eq!(shape0, vec![2, 1, 2, 2]);
        let want0: Vec<f32> = [0.0; 4]
            .into_iter()
            .chain(a0.iter().zip(&b0).map(|(a, b)| 0.5 * a + b))
            .collect();
        let got0: Vec<f32> = data0.iter().map(|v| v.to_f32()).collect();
        assert_eq!(got0, want0);
        assert_eq!(shape1, vec![2, 2, 1, 1]);
        let want1: Vec<f32> = [0.0; 2]
            .into_iter()
            .chain(a1.iter().zip(&b1).map(|(a, b)| 2.0 * a + 0.1 * b))
            .collect();
        assert_eq!(data1, want1);
    }

    #[test]
    fn refuses_a_spec_without_controlnets_or_with_mismatched_residuals() {
        let empty = MixerSpec {
            inputs: vec![],
            outputs: vec![TensorElementType::Float32],
            zero_negative: false,
        };
        assert!(build(&empty).is_err());
        let short = MixerSpec {
            inputs: vec![vec![TensorElementType::Float32]],
            outputs: vec![TensorElementType::Float32; 2],
            zero_negative: false,
        };
        assert!(build(&short).is_err());
    }
}
