//! One ONNX graph of the pipeline (a text encoder, the UNet, the VAE decoder): its session, the
//! inputs and outputs it declares, and evaluation with the time spent inside `Session::run`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ort::session::{OutputSelector, RunOptions, Session, SessionInputValue};
use ort::value::{TensorElementType, ValueType};

use super::runtime::{self, SessionOptions};
use super::tensor::{self, FloatTensor};
use super::EngineError;

/// Element type and shape of a declared input or output (`-1` for a dynamic dimension).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub elem: TensorElementType,
    pub shape: Vec<i64>,
}

impl TensorInfo {
    /// The dimension at `axis` if the graph fixes it.
    pub fn fixed_dim(&self, axis: usize) -> Option<usize> {
        self.shape
            .get(axis)
            .and_then(|&d| usize::try_from(d).ok())
            .filter(|&d| d > 0)
    }
}

/// A loaded graph.
#[derive(Debug)]
pub struct Component {
    path: PathBuf,
    session: Mutex<Session>,
    inputs: BTreeMap<String, TensorInfo>,
    outputs: BTreeMap<String, TensorInfo>,
}

/// The named outputs of one evaluation, as `f32`, plus the time spent inside ONNX Runtime.
#[derive(Debug)]
pub struct RunResult {
    pub outputs: Vec<FloatTensor>,
    pub session_time: Duration,
}

fn collect(outlets: &[ort::value::Outlet]) -> BTreeMap<String, TensorInfo> {
    outlets
        .iter()
        .filter_map(|o| match o.dtype() {
            ValueType::Tensor { ty, shape, .. } => Some((
                o.name().to_owned(),
                TensorInfo {
                    elem: *ty,
                    shape: shape.to_vec(),
                },
            )),
            _ => None,
        })
        .collect()
}

fn names<'a>(map: &'a BTreeMap<String, TensorInfo>) -> String {
    map.keys()
        .map(String::as_str)
        .collect::<Vec<&'a str>>()
        .join(", ")
}

impl Component {
    /// Load `dir/model.onnx` (its external weights, if any, sit next to it).
    pub fn load(dir: &Path, options: &SessionOptions) -> Result<Self, EngineError> {
        Self::load_file(&dir.join("model.onnx"), options)
    }

    /// Load the graph at `path` (its external weights, if any, sit next to it).
    pub fn load_file(path: &Path, options: &SessionOptions) -> Result<Self, EngineError> {
        Self::load_file_with_dims(path, options, &[])
    }

    /// [`Component::load_file`] with named dynamic dimensions fixed (see
    /// [`runtime::load_session_with_dims`]).
    pub fn load_file_with_dims(
        path: &Path,
        options: &SessionOptions,
        dims: &[(&str, i64)],
    ) -> Result<Self, EngineError> {
        let path = path.to_path_buf();
        if !path.is_file() {
            return Err(EngineError::ModelFileMissing { path });
        }
        // ONNX Runtime's `use_tf32 = 0` also slows float16 graphs about fourfold (measured on
        // an H200: 132 ms against 35 ms per UNet step), so TF32 stays on for graphs without
        // float32 inputs or outputs; `tf32` decides for float32 graphs (see `CudaOptions::tf32`).
        let mut first = *options;
        first.tf32 = true;
        let mut session = runtime::load_session_with_dims(&path, &first, dims)?;
        let mut inputs = collect(session.inputs());
        let mut outputs = collect(session.outputs());
        let float32 = inputs
            .values()
            .chain(outputs.values())
            .any(|i| i.elem == TensorElementType::Float32);
        if matches!(options.device, super::Device::Cuda { .. }) && !options.tf32 && float32 {
            drop(session);
            session = runtime::load_session_with_dims(&path, options, dims)?;
            inputs = collect(session.inputs());
            outputs = collect(session.outputs());
        }
        Ok(Self {
            path,
            session: Mutex::new(session),
            inputs,
            outputs,
        })
    }

    /// Wrap a session built elsewhere (a graph made in memory); `label` stands in for its path
    /// in errors.
    pub fn from_session(label: PathBuf, session: Session) -> Self {
        let inputs = collect(session.inputs());
        let outputs = collect(session.outputs());
        Self {
            path: label,
            session: Mutex::new(session),
            inputs,
            outputs,
        }
    }

    /// The graph file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Declared input names.
    pub fn input_names(&self) -> impl Iterator<Item = &str> {
        self.inputs.keys().map(String::as_str)
    }

    /// Declared output names.
    pub fn output_names(&self) -> impl Iterator<Item = &str> {
        self.outputs.keys().map(String::as_str)
    }

    /// A declared input, or an error naming the file and the input.
    pub fn input(&self, name: &str) -> Result<&TensorInfo, EngineError> {
        self.inputs
            .get(name)
            .ok_or_else(|| EngineError::ModelInputMissing {
                path: self.path.clone(),
                input: name.to_owned(),
                available: names(&self.inputs),
            })
    }

    /// A declared output, or an error naming the file and the output.
    pub fn output(&self, name: &str) -> Result<&TensorInfo, EngineError> {
        self.outputs
            .get(name)
            .ok_or_else(|| EngineError::ModelOutputMissing {
                path: self.path.clone(),
                output: name.to_owned(),
                available: names(&self.outputs),
            })
    }

    fn signature_error(&self, name: &str, message: String) -> EngineError {
        EngineError::ModelSignature {
            path: self.path.clone(),
            name: name.to_owned(),
            message,
        }
    }

    fn check(
        &self,
        name: &str,
        info: &TensorInfo,
        ranks: &[usize],
        accept: fn(TensorElementType) -> bool,
        kind: &str,
    ) -> Result<(), EngineError> {
        if !accept(info.elem) {
            return Err(self.signature_error(
                name,
                format!("has element type {}, expected {kind}", info.elem),
            ));
        }
        if !ranks.contains(&info.shape.len()) {
            return Err(self.signature_error(
                name,
                format!("has rank {}, expected rank {ranks:?}", info.shape.len()),
            ));
        }
        Ok(())
    }

    /// A required float16/float32 input of one of the given ranks.
    pub fn float_input(&self, name: &str, ranks: &[usize]) -> Result<&TensorInfo, EngineError> {
        let info = self.input(name)?;
        self.check(name, info, ranks, tensor::is_float, "float32 or float16")?;
        Ok(info)
    }

    /// A required int64/int32 input of one of the given ranks.
    pub fn int_input(&self, name: &str, ranks: &[usize]) -> Result<&TensorInfo, EngineError> {
        let info = self.input(name)?;
        self.check(name, info, ranks, tensor::is_int, "int64 or int32")?;
        Ok(info)
    }

    /// A required float16/float32 output of one of the given ranks.
    pub fn float_output(&self, name: &str, ranks: &[usize]) -> Result<&TensorInfo, EngineError> {
        let info = self.output(name)?;
        self.check(name, info, ranks, tensor::is_float, "float32 or float16")?;
        Ok(info)
    }

    /// An error about a declared dimension of this graph.
    pub fn dimension_error(&self, name: &str, message: impl Into<String>) -> EngineError {
        self.signature_error(name, message.into())
    }

    /// Run `f` with exclusive use of the session (device buffers, bound runs).
    pub fn with_session<T>(&self, f: impl FnOnce(&mut Session) -> T) -> T {
        let mut session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut session)
    }

    /// Evaluate the graph and read the `wanted` outputs back as `f32`, in that order. Only those
    /// outputs leave the session: a text encoder that declares every layer's hidden state
    /// copies two of them to the host, not all.
    pub fn run(
        &self,
        stage: &'static str,
        inputs: Vec<(&str, SessionInputValue<'_>)>,
        wanted: &[&str],
    ) -> Result<RunResult, EngineError> {
        let inference = |source| EngineError::Inference { stage, source };
        let selected = wanted
            .iter()
            .fold(OutputSelector::no_default(), |s, name| s.with(*name));
        let options = RunOptions::new().map_err(inference)?.with_outputs(selected);
        let mut session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        let started = Instant::now();
        let outputs = session
            .run_with_options(inputs, &options)
            .map_err(inference)?;
        let session_time = started.elapsed();
        let mut out = Vec::with_capacity(wanted.len());
        for name in wanted {
            let value = outputs
                .get(name)
                .ok_or_else(|| EngineError::UnexpectedOutput {
                    stage,
                    message: format!("no output `{name}`"),
                })?;
            out.push(tensor::to_f32(value).map_err(inference)?);
        }
        Ok(RunResult {
            outputs: out,
            session_time,
        })
    }
}
