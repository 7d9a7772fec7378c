//! Static-shape ControlNet sessions for CUDA graph replay (`cuda.graph` with
//! `cuda.controlnet_graph`). A captured graph replays against the device addresses it was
//! captured with, so each ControlNet gets one session per input shape, loaded with every dynamic
//! dimension fixed, and its bound buffers live as long as the session: a run copies its control
//! image and text conditioning into them, a step its latents and timestep.
//!
//! Each such session holds its own copy of the ControlNet's weights. At most
//! `cuda.graph_shapes` are kept per ControlNet; further shapes run bound without a graph, as
//! does a ControlNet whose static session ONNX Runtime refuses to build with graph capture (it
//! is then not tried again). A capture that fails later, at a run, is that run's error.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::device::BoundUnit;
use super::run::{ControlRun, PreparedUnit};
use crate::engine::runtime::SessionOptions;
use crate::engine::session::Component;
use crate::engine::EngineError;

/// What a static ControlNet session is built for: the graph file and the shape of every input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct GraphKey {
    path: PathBuf,
    shapes: Vec<Vec<i64>>,
}

/// A static-shape ControlNet session with its buffers.
pub(super) struct GraphControl {
    key: GraphKey,
    pub(super) bound: BoundUnit,
    // Dropped last: the buffers and the binding refer to it.
    pub(super) component: Arc<Component>,
}

#[derive(Default)]
struct State {
    sessions: Vec<GraphControl>,
    /// ControlNets whose static session failed to load with graph capture.
    refused: Vec<PathBuf>,
}

/// The engine's static-shape ControlNet sessions.
#[derive(Default)]
pub struct ControlGraphs {
    state: Mutex<State>,
}

impl std::fmt::Debug for ControlGraphs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<GraphKey> = self
            .state
            .lock()
            .map(|s| s.sessions.iter().map(|g| g.key.clone()).collect())
            .unwrap_or_default();
        f.debug_struct("ControlGraphs")
            .field("keys", &keys)
            .finish()
    }
}

/// The static sessions of one run, locked for it.
pub(super) struct LockedGraphs<'g> {
    state: MutexGuard<'g, State>,
}

impl LockedGraphs<'_> {
    pub(super) fn get_mut(&mut self, index: usize) -> &mut GraphControl {
        &mut self.state.sessions[index]
    }

    pub(super) fn get(&self, index: usize) -> &GraphControl {
        &self.state.sessions[index]
    }
}

impl ControlGraphs {
    /// Lock the sessions for one run (after the UNet's static session, if any, is locked).
    pub(super) fn lock(&self) -> LockedGraphs<'_> {
        LockedGraphs {
            state: self.state.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }
}

impl<'a> ControlRun<'a> {
    /// The index of `unit`'s static session for this run's shapes in `graphs`, loading it on
    /// first use; `None` when `per_net` sessions of this ControlNet already exist for other
    /// shapes, or when ONNX Runtime refuses to build it with graph capture.
    pub(super) fn graph_unit(
        &self,
        graphs: &mut LockedGraphs<'_>,
        unit: &PreparedUnit<'a>,
        device_id: i32,
        per_net: usize,
        options: &SessionOptions,
    ) -> Result<Option<usize>, EngineError> {
        let net = unit.net;
        let path = net.component.path().to_path_buf();
        let sample = self.control_sample_shape();
        let mut shapes = vec![sample.to_vec(), unit.cond.shape().to_vec()];
        for value in [&unit.hidden, &unit.pooled, &unit.time_ids]
            .into_iter()
            .flatten()
        {
            shapes.push(value.shape().to_vec());
        }
        let key = GraphKey { path, shapes };
        let state = &mut *graphs.state;
        if let Some(index) = state.sessions.iter().position(|g| g.key == key) {
            return Ok(Some(index));
        }
        let built = state
            .sessions
            .iter()
            .filter(|g| g.key.path == key.path)
            .count();
        if built >= per_net.max(1) || state.refused.contains(&key.path) {
            return Ok(None);
        }
        let cond = unit.cond.shape();
        let mut dims: Vec<(String, i64)> = vec![
            ("batch_size".to_owned(), sample[0]),
            ("height".to_owned(), sample[2]),
            ("width".to_owned(), sample[3]),
            ("image_height".to_owned(), cond[2]),
            ("image_width".to_owned(), cond[3]),
        ];
        if let Some(hidden) = &unit.hidden {
            dims.push(("sequence_length".to_owned(), hidden.shape()[1]));
        }
        for (name, _, out) in self.residual_outputs(net)? {
            dims.push((format!("{name}_height"), out[2]));
            dims.push((format!("{name}_width"), out[3]));
        }
        let dims: Vec<(&str, i64)> = dims.iter().map(|(n, d)| (n.as_str(), *d)).collect();
        let mut options = *options;
        options.graph_capture = device_id >= 0;
        // On a GPU this session captures a CUDA graph in this unit of work: no other GPU thread
        // may run meanwhile (a no-op on a thread that holds no gate, such as a CPU consumer's).
        crate::engine::capture_gate::exclusive_for_capture();
        let started = Instant::now();
        let component = match Component::load_file_with_dims(&key.path, &options, &dims) {
            Ok(component) => Arc::new(component),
            Err(error) if options.graph_capture => {
                tracing::warn!(
                    path = %key.path.display(),
                    error = %error,
                    "ControlNet cannot run in a CUDA graph; it runs without one"
                );
                state.refused.push(key.path);
                return Ok(None);
            }
            Err(error) => return Err(error),
        };
        let bound = self.bind_unit(&component, unit, device_id)?;
        tracing::info!(
            path = %key.path.display(),
            shapes = ?key.shapes,
            load_ms = started.elapsed().as_millis() as u64,
            "static-shape ControlNet session loaded for CUDA graph capture"
        );
        state.sessions.push(GraphControl {
            key,
            bound,
            component,
        });
        Ok(Some(state.sessions.len() - 1))
    }
}
