//! ONNX Runtime set-up: finding and loading the shared library (the crate is built with
//! `load-dynamic`), the one per-process environment, and building sessions for a [`Device`].
//!
//! The library is looked up in this order:
//! 1. `ORT_DYLIB_PATH` (a file);
//! 2. `.ort/lib/libonnxruntime.so.<version>` in the repository the binary was built from;
//! 3. `.ort/lib/libonnxruntime.so.<version>` under the current directory.
//!
//! `scripts/setup-ort.sh` (CPU) or `scripts/setup-ort.sh gpu` (CUDA) installs it in `.ort/lib`.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::environment::Environment;
use ort::ep::{self, ExecutionProvider};
use ort::session::builder::SessionBuilder;
use ort::session::Session;

use super::cuda::CudaOptions;
use super::{Device, EngineError};

/// The ONNX Runtime version the `ort` crate of this build targets.
pub const ORT_VERSION: &str = "1.31.1";

/// Name of the environment variable that points at the ONNX Runtime library.
pub const DYLIB_ENV: &str = "ORT_DYLIB_PATH";

static ENVIRONMENT: OnceLock<Environment> = OnceLock::new();
static INIT_LOCK: Mutex<()> = Mutex::new(());

fn library_file_name() -> String {
    format!("libonnxruntime.so.{ORT_VERSION}")
}

/// The places searched for the library, in order, given the value of `ORT_DYLIB_PATH`.
pub fn candidate_paths(env_value: Option<&Path>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = env_value {
        out.push(p.to_path_buf());
    }
    let rel = Path::new(".ort").join("lib").join(library_file_name());
    out.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(&rel));
    if let Ok(cwd) = std::env::current_dir() {
        let local = cwd.join(&rel);
        if !out.contains(&local) {
            out.push(local);
        }
    }
    out
}

/// The ONNX Runtime library this process would load, or an error that says how to install it.
pub fn find_library() -> Result<PathBuf, EngineError> {
    let from_env = std::env::var_os(DYLIB_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    if let Some(p) = &from_env {
        // An explicit setting that points nowhere is a mistake worth reporting as such.
        if !p.is_file() {
            return Err(EngineError::RuntimeNotFound {
                searched: vec![p.clone()],
            });
        }
        return Ok(p.clone());
    }
    let searched = candidate_paths(None);
    searched
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or(EngineError::RuntimeNotFound { searched })
}

/// Load ONNX Runtime (once per process) and return the shared environment.
pub fn environment() -> Result<&'static Environment, EngineError> {
    if let Some(env) = ENVIRONMENT.get() {
        return Ok(env);
    }
    let _guard = INIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(env) = ENVIRONMENT.get() {
        return Ok(env);
    }
    let path = find_library()?;
    let builder = ort::init_from(&path).map_err(|source| EngineError::RuntimeLoad {
        path: path.clone(),
        source,
    })?;
    let env = builder
        .with_name("sdxl-worker")
        .build()
        .map_err(|source| EngineError::Runtime {
            context: "creating the environment".to_owned(),
            source,
        })?;
    tracing::info!(library = %path.display(), "ONNX Runtime loaded");
    Ok(ENVIRONMENT.get_or_init(|| env))
}

/// Whether the loaded ONNX Runtime library includes the CUDA execution provider.
pub fn cuda_available() -> Result<bool, EngineError> {
    environment()?;
    ep::CUDA::is_available().map_err(|source| EngineError::Runtime {
        context: "listing execution providers".to_owned(),
        source,
    })
}

/// How sessions are built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionOptions {
    pub device: Device,
    /// Threads inside one operator on CPU (`None`: ONNX Runtime's default).
    pub intra_threads: Option<usize>,
    /// CUDA only: allow TF32 for float32 math (see [`crate::engine::cuda::CudaOptions::tf32`]).
    pub tf32: bool,
    /// CUDA only: provider settings.
    pub cuda: CudaOptions,
    /// CUDA only: capture this session's runs in a CUDA graph (static shapes, bound buffers).
    pub graph_capture: bool,
}

#[cfg(test)]
impl SessionOptions {
    /// The CPU provider on one thread, for unit tests of in-memory graphs.
    pub(crate) fn cpu_one_thread() -> Self {
        Self {
            device: Device::Cpu,
            intra_threads: Some(1),
            tf32: false,
            cuda: CudaOptions::default(),
            graph_capture: false,
        }
    }
}

/// Build a session for the ONNX graph at `path` on `options.device`.
///
/// CUDA is never replaced silently by the CPU: if the CUDA execution provider is missing from
/// the library or fails to register, this returns [`EngineError::CudaUnavailable`].
pub fn load_session(path: &Path, options: &SessionOptions) -> Result<Session, EngineError> {
    load_session_with_dims(path, options, &[])
}

/// [`load_session`] with named dynamic dimensions fixed to sizes (`batch_size` = 2, ...), so that
/// ONNX Runtime folds the shape computations (which CUDA graph capture requires).
pub fn load_session_with_dims(
    path: &Path,
    options: &SessionOptions,
    dims: &[(&str, i64)],
) -> Result<Session, EngineError> {
    session_builder(path, options, dims)?
        .commit_from_file(path)
        .map_err(|source| EngineError::SessionLoad {
            path: path.to_path_buf(),
            source,
        })
}

/// Build a session for a graph made in memory with ONNX Runtime's model editor; `label` names
/// it in errors (it has no file).
pub fn session_from_model(
    model: ort::editor::Model,
    label: &Path,
    options: &SessionOptions,
) -> Result<Session, EngineError> {
    let builder = session_builder(label, options, &[])?;
    model
        .into_session(&builder)
        .map_err(|source| EngineError::SessionLoad {
            path: label.to_path_buf(),
            source,
        })
}

/// Session options with the execution provider of `options.device` registered.
fn session_builder(
    path: &Path,
    options: &SessionOptions,
    dims: &[(&str, i64)],
) -> Result<SessionBuilder, EngineError> {
    let env = environment()?;
    let runtime_err = |context: &str| {
        let context = format!("{context} for {}", path.display());
        move |source: ort::Error| EngineError::Runtime { context, source }
    };
    let mut builder = Session::builder(env).map_err(runtime_err("creating session options"))?;
    if let Some(n) = options.intra_threads {
        builder = builder
            .with_intra_threads(n)
            .map_err(|e| runtime_err("setting the thread count")(e.into()))?;
    }
    for &(name, size) in dims {
        builder = builder
            .with_dimension_override(name, size)
            .map_err(|e| runtime_err("fixing a dimension")(e.into()))?;
    }
    match options.device {
        Device::Cpu => {
            builder = builder
                .with_execution_providers([ep::CPU::default().build()])
                .map_err(|e| runtime_err("registering the CPU provider")(e.into()))?;
        }
        Device::Cuda { index } => {
            if !cuda_available()? {
                return Err(EngineError::CudaUnavailable {
                    index,
                    reason: "the loaded ONNX Runtime library has no CUDA execution provider \
                             (install the GPU build with `scripts/setup-ort.sh gpu`)"
                        .to_owned(),
                });
            }
            let device_id = i32::try_from(index).map_err(|_| EngineError::CudaUnavailable {
                index,
                reason: "device index out of range".to_owned(),
            })?;
            let cuda = options
                .cuda
                .provider(device_id, options.tf32, options.graph_capture);
            builder = builder.with_execution_providers([cuda]).map_err(|e| {
                EngineError::CudaUnavailable {
                    index,
                    reason: e.message().to_owned(),
                }
            })?;
        }
    }
    Ok(builder)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_start_with_the_environment_variable_then_the_repository() {
        let c = candidate_paths(Some(Path::new("/opt/ort/libonnxruntime.so")));
        assert_eq!(c[0], PathBuf::from("/opt/ort/libonnxruntime.so"));
        assert!(c[1].starts_with(env!("CARGO_MANIFEST_DIR")));
        assert!(c[1].ends_with(format!(".ort/lib/libonnxruntime.so.{ORT_VERSION}")));
    }
}
