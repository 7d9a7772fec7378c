//! The engine's error type: every way loading a model or generating an image can fail, each with
//! a stable machine-readable code and a retry classification.

use std::path::PathBuf;

/// An error from the inference engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No ONNX Runtime shared library was found.
    #[error(
        "ONNX Runtime library not found (looked in: {}); install it with `scripts/setup-ort.sh` \
         (CPU) or `scripts/setup-ort.sh gpu` (CUDA), or set ORT_DYLIB_PATH to \
         libonnxruntime.so",
        display_paths(searched)
    )]
    RuntimeNotFound { searched: Vec<PathBuf> },

    /// The ONNX Runtime shared library exists but could not be loaded.
    #[error("cannot load ONNX Runtime from {}", path.display())]
    RuntimeLoad {
        path: PathBuf,
        #[source]
        source: ort::LoadDynamicError,
    },

    /// ONNX Runtime failed outside of a model evaluation (environment, session options).
    #[error("ONNX Runtime failed while {context}")]
    Runtime {
        context: String,
        #[source]
        source: ort::Error,
    },

    /// CUDA was requested but cannot be used.
    #[error("CUDA device {index} is not usable: {reason}")]
    CudaUnavailable { index: u32, reason: String },

    /// A file or directory the model layout requires does not exist.
    #[error("model file missing: {}", path.display())]
    ModelFileMissing { path: PathBuf },

    /// A model file exists but could not be read.
    #[error("cannot read {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A JSON configuration file of the model is not valid JSON.
    #[error("invalid JSON in {}", path.display())]
    ModelJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A configuration file or ONNX graph holds values the engine cannot use.
    #[error("invalid model ({}): {message}", path.display())]
    ModelInvalid { path: PathBuf, message: String },

    /// ONNX Runtime refused to load an ONNX graph.
    #[error("cannot load ONNX model {}", path.display())]
    SessionLoad {
        path: PathBuf,
        #[source]
        source: ort::Error,
    },

    /// An ONNX graph lacks an input the engine must feed.
    #[error("{}: required input `{input}` is missing (inputs: {available})", path.display())]
    ModelInputMissing {
        path: PathBuf,
        input: String,
        available: String,
    },

    /// An ONNX graph lacks an output the engine must read.
    #[error("{}: required output `{output}` is missing (outputs: {available})", path.display())]
    ModelOutputMissing {
        path: PathBuf,
        output: String,
        available: String,
    },

    /// An input or output of an ONNX graph has a type or shape the engine cannot use.
    #[error("{}: `{name}` {message}", path.display())]
    ModelSignature {
        path: PathBuf,
        name: String,
        message: String,
    },

    /// The CLIP tokenizer files could not be turned into a tokenizer.
    #[error("tokenizer in {} is invalid: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },

    /// Tokenizing a prompt failed.
    #[error("cannot tokenize the prompt")]
    Tokenize {
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The request does not fit this model.
    #[error("invalid request: {field}: {message}")]
    InvalidRequest {
        field: &'static str,
        message: String,
    },

    /// The scheduler could not be configured for this run.
    #[error("scheduler `{scheduler}` cannot be configured")]
    Scheduler {
        scheduler: String,
        #[source]
        source: super::scheduler::SchedulerError,
    },

    /// The progress callback asked to stop.
    #[error("generation cancelled")]
    Cancelled,

    /// A model evaluation failed inside ONNX Runtime.
    #[error("{stage} failed in ONNX Runtime")]
    Inference {
        stage: &'static str,
        #[source]
        source: ort::Error,
    },

    /// A model produced output of an unexpected shape.
    #[error("{stage} returned {message}")]
    UnexpectedOutput {
        stage: &'static str,
        message: String,
    },

    /// A model produced NaN or infinite values.
    #[error("{stage} produced non-finite values{hint}")]
    NonFinite { stage: &'static str, hint: String },

    /// Writing a PNG failed.
    #[error("cannot encode PNG")]
    PngEncode {
        #[source]
        source: png::EncodingError,
    },
}

fn display_paths(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "nowhere".to_owned();
    }
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl EngineError {
    /// A stable, machine-readable code for this error (snake_case).
    pub fn code(&self) -> &'static str {
        match self {
            EngineError::RuntimeNotFound { .. } => "runtime_not_found",
            EngineError::RuntimeLoad { .. } => "runtime_load_failed",
            EngineError::Runtime { .. } => "runtime_error",
            EngineError::CudaUnavailable { .. } => "cuda_unavailable",
            EngineError::ModelFileMissing { .. } => "model_file_missing",
            EngineError::Io { .. } => "model_io_error",
            EngineError::ModelJson { .. } => "model_config_invalid_json",
            EngineError::ModelInvalid { .. } => "model_invalid",
            EngineError::SessionLoad { .. } => "model_load_failed",
            EngineError::ModelInputMissing { .. } => "model_input_missing",
            EngineError::ModelOutputMissing { .. } => "model_output_missing",
            EngineError::ModelSignature { .. } => "model_signature_mismatch",
            EngineError::Tokenizer { .. } => "tokenizer_invalid",
            EngineError::Tokenize { .. } => "tokenize_failed",
            EngineError::InvalidRequest { .. } => "invalid_request",
            EngineError::Scheduler { source, .. } => source.code(),
            EngineError::Cancelled => "cancelled",
            EngineError::Inference { .. } => "inference_failed",
            EngineError::UnexpectedOutput { .. } => "unexpected_model_output",
            EngineError::NonFinite { .. } => "non_finite_output",
            EngineError::PngEncode { .. } => "png_encode_failed",
        }
    }

    /// Whether running the same request again (possibly elsewhere) may succeed.
    ///
    /// Only failures inside ONNX Runtime during evaluation (out of device memory, a device
    /// fault) and transient file-system errors are retryable; bad requests, bad models, a
    /// missing runtime and cancellation are not.
    pub fn is_retryable(&self) -> bool {
        match self {
            EngineError::Inference { .. } => true,
            EngineError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::WouldBlock
            ),
            _ => false,
        }
    }

    /// Whether this error is about the request rather than the model or the machine.
    pub fn is_invalid_request(&self) -> bool {
        matches!(self, EngineError::InvalidRequest { .. })
    }

    pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        EngineError::InvalidRequest {
            field,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_snake_case_and_classified() {
        let missing = EngineError::ModelFileMissing {
            path: PathBuf::from("/m/unet/model.onnx"),
        };
        assert_eq!(missing.code(), "model_file_missing");
        assert!(missing.to_string().contains("/m/unet/model.onnx"));
        assert!(!missing.is_retryable());
        assert!(!EngineError::Cancelled.is_retryable());
        let not_found = EngineError::RuntimeNotFound {
            searched: vec![PathBuf::from("/x/.ort/lib")],
        };
        let text = not_found.to_string();
        assert!(text.contains("scripts/setup-ort.sh gpu"), "{text}");
        assert!(text.contains("ORT_DYLIB_PATH"), "{text}");
        assert!(EngineError::invalid("steps", "must be at least 1").is_invalid_request());
    }
}
