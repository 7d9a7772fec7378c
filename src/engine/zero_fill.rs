//! Zeroing bound buffers where they live. A residual UNet run without ControlNets (and any step
//! outside every ControlNet's window) reads zero residuals; at 1024² with guidance those are
//! about 54 million values. Making them on the host and copying them to the device took 0.18 s
//! per run on an H200, with the GPU idle (`bench/gpu/zero_fill_probe.py`). Instead, a small
//! graph built with ONNX Runtime's model editor (a one-element zero `Expand`ed to each buffer's
//! shape) writes the zeros straight into the bound buffers, on the device.

use ort::editor::Model;
use ort::memory::Allocator;
use ort::value::{DynTensor, Outlet, Tensor, TensorElementType};

use super::built_graph::{add, model, onnx_code, tensor_type, BuiltGraphs};
use super::runtime::SessionOptions;
use super::unet::upload;
use super::{tensor, EngineError};

/// What a zero graph is built for: the element type and rank of each buffer it fills.
pub(crate) type ZeroSpec = Vec<(TensorElementType, usize)>;

/// The zero graphs an engine has built, by spec.
pub(crate) type ZeroGraphs = BuiltGraphs<ZeroSpec>;

fn shape_input(k: usize) -> String {
    format!("shape{k}")
}

fn output(k: usize) -> String {
    format!("zeros{k}")
}

/// The graph for `spec`: input `shape{k}` (int64, the dimensions of buffer `k`), output
/// `zeros{k}`: a one-element zero of the buffer's element type (an initializer) expanded to
/// that shape, written straight into the bound buffer with no intermediate tensor.
fn build(spec: &ZeroSpec) -> ort::Result<Model> {
    let mut graph = ort::editor::Graph::new()?;
    graph.set_inputs(
        (0..spec.len())
            .map(|k| Outlet::new(shape_input(k), tensor_type(TensorElementType::Int64, 1))),
    )?;
    graph.set_outputs(
        spec.iter()
            .enumerate()
            .map(|(k, &(elem, rank))| Outlet::new(output(k), tensor_type(elem, rank))),
    )?;
    let mut zeros: Vec<TensorElementType> = Vec::new();
    for (k, &(elem, _)) in spec.iter().enumerate() {
        let zero = format!("zero_{}", onnx_code(elem)?);
        if !zeros.contains(&elem) {
            // Initializers must live in memory ONNX Runtime allocated.
            let mut value = DynTensor::new(&Allocator::default(), elem, vec![1i64])?;
            upload(&tensor::float_value(elem, &[1], &[0.0])?, &mut value)?;
            graph.add_initializer(&zero, value, false)?;
            zeros.push(elem);
        }
        add(&mut graph, "Expand", &[&zero, &shape_input(k)], &output(k))?;
    }
    model(graph)
}

/// Set every element of every buffer in `buffers` to zero, where the buffers live, with one
/// run of the zero graph for their types (built on first use and kept in `graphs`). `stage`
/// names the caller in errors.
pub(crate) fn fill(
    graphs: &ZeroGraphs,
    options: &SessionOptions,
    buffers: &mut [DynTensor],
    stage: &'static str,
) -> Result<(), EngineError> {
    if buffers.is_empty() {
        return Ok(());
    }
    let spec: ZeroSpec = buffers
        .iter()
        .map(|b| (*b.data_type(), b.shape().len()))
        .collect();
    let label = || format!("zero fill of {} buffer(s)", spec.len());
    let graph = graphs.get(&spec, options, label, build)?;
    let err = |source| EngineError::Inference { stage, source };
    let shapes = buffers
        .iter()
        .map(|b| {
            let dims = b.shape().to_vec();
            Tensor::from_array(([dims.len()], dims))
        })
        .collect::<ort::Result<Vec<_>>>()
        .map_err(err)?;
    graph
        .with_session(|session| -> ort::Result<()> {
            let mut binding = session.create_binding()?;
            for (k, shape) in shapes.iter().enumerate() {
                binding.bind_input(shape_input(k), shape)?;
            }
            for (k, buffer) in buffers.iter_mut().enumerate() {
                binding.bind_output(output(k), buffer)?;
            }
            session.run_binding(&binding).map(drop)
        })
        .map_err(err)
}

#[cfg(test)]
mod tests {
    use ort::memory::AllocationDevice;

    use super::*;

    #[test]
    fn fills_buffers_of_several_types_and_shapes_with_zeros() {
        crate::engine::runtime::environment().expect("ONNX Runtime");
        let options = SessionOptions::cpu_one_thread();
        let graphs = ZeroGraphs::default();
        let allocator = Allocator::default();
        let shapes: [(TensorElementType, Vec<i64>); 3] = [
            (TensorElementType::Float16, vec![2, 3, 4, 5]),
            (TensorElementType::Float32, vec![2, 7, 1, 3]),
            (TensorElementType::Float16, vec![1, 2]),
        ];
        let mut buffers = Vec::new();
        for (elem, dims) in &shapes {
            let mut buffer = DynTensor::new(&allocator, *elem, dims.clone()).unwrap();
            // Start from something other than zero, as a buffer a ControlNet wrote into.
            let n: i64 = dims.iter().product();
            let ones = vec![1.5f32; n as usize];
            let host = tensor::float_value(*elem, dims, &ones).unwrap();
            upload(&host, &mut buffer).unwrap();
            buffers.push(buffer);
        }
        fill(&graphs, &options, &mut buffers, "test").unwrap();
        for ((elem, dims), buffer) in shapes.iter().zip(&buffers) {
            assert_eq!(buffer.data_type(), elem);
            assert_eq!(buffer.shape().to_vec(), *dims);
            let host = buffer.to(AllocationDevice::CPU, 0).unwrap().into_dyn();
            let values = tensor::to_f32(&host).unwrap().data;
            assert_eq!(values.len() as i64, dims.iter().product::<i64>());
            assert!(values.iter().all(|&v| v == 0.0), "{values:?}");
        }
        // The same types and ranks reuse the graph built for them.
        fill(&graphs, &options, &mut buffers[..2], "test").unwrap();
        fill(&graphs, &options, &mut buffers[..2], "test").unwrap();
        assert_eq!(graphs.len(), 2);
        fill(&graphs, &options, &mut [], "test").unwrap();
        assert_eq!(graphs.len(), 2);
    }
}
