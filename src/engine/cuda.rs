//! Settings of ONNX Runtime's CUDA execution provider, as the engine exposes them, and how they
//! become provider options.
//!
//! The defaults are what measured best for the fused float16 SDXL UNet on an H200 (see
//! `bench/README.md`): exhaustive cuDNN convolution search with the largest workspace cuDNN
//! asks for, an arena that grows by what is requested (not by powers of two, which strands
//! gigabytes at 1024² and above), inputs and outputs of the UNet bound on the device
//! ([`CudaOptions::io_binding`]), and ONNX Runtime's own choice of attention kernel.

use std::fmt;
use std::str::FromStr;

use ort::ep::{self, cuda::AttentionBackend, cuda::ConvAlgorithmSearch, ArenaExtendStrategy};

/// How cuDNN picks convolution algorithms (the first run of each shape pays for the search).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConvSearch {
    /// Benchmark every algorithm (ONNX Runtime's default).
    #[default]
    Exhaustive,
    /// cuDNN's heuristics, no benchmarking.
    Heuristic,
    /// The default algorithm, no search.
    Default,
}

impl FromStr for ConvSearch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "exhaustive" => Ok(Self::Exhaustive),
            "heuristic" => Ok(Self::Heuristic),
            "default" => Ok(Self::Default),
            other => Err(format!(
                "invalid convolution search {other:?}: expected exhaustive, heuristic or default"
            )),
        }
    }
}

impl fmt::Display for ConvSearch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Exhaustive => "exhaustive",
            Self::Heuristic => "heuristic",
            Self::Default => "default",
        })
    }
}

/// Which kernel ONNX Runtime's fused attention operators use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionKernel {
    /// ONNX Runtime decides per operator and shape.
    #[default]
    Auto,
    /// Flash attention (ONNX Runtime's own kernels).
    Flash,
    /// Memory-efficient attention (CUTLASS).
    Efficient,
    /// cuDNN's fused flash attention.
    CudnnFlash,
    /// Unfused matrix products and softmax.
    Math,
}

impl FromStr for AttentionKernel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "flash" => Ok(Self::Flash),
            "efficient" => Ok(Self::Efficient),
            "cudnn_flash" => Ok(Self::CudnnFlash),
            "math" => Ok(Self::Math),
            other => Err(format!(
                "invalid attention kernel {other:?}: expected auto, flash, efficient, cudnn_flash or math"
            )),
        }
    }
}

impl fmt::Display for AttentionKernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Flash => "flash",
            Self::Efficient => "efficient",
            Self::CudnnFlash => "cudnn_flash",
            Self::Math => "math",
        })
    }
}

/// CUDA execution provider settings of an engine. No effect on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CudaOptions {
    pub conv_search: ConvSearch,
    /// Let cuDNN use as much workspace as its fastest convolution algorithms want.
    pub conv_max_workspace: bool,
    /// Grow the memory arena by exactly what is requested (`kSameAsRequested`) rather than by
    /// powers of two.
    pub arena_same_as_requested: bool,
    /// Prefer NHWC layouts for convolutions and normalizations where ONNX Runtime has them.
    pub prefer_nhwc: bool,
    pub attention: AttentionKernel,
    /// Keep the UNet's inputs and outputs in device memory bound once per run, instead of
    /// handing ONNX Runtime host tensors at every step.
    pub io_binding: bool,
    /// Capture the UNet in a CUDA graph and replay it at every step (needs `io_binding`). Each
    /// distinct (batch, height, width) gets its own static-shape UNet session, up to
    /// `graph_shapes` of them; further shapes run without a graph.
    pub graph: bool,
    /// Most static-shape UNet sessions kept for CUDA graphs (each holds its own weights), and
    /// most static-shape sessions per ControlNet.
    pub graph_shapes: usize,
    /// With `graph` on, capture each ControlNet's evaluation in a CUDA graph too, on a
    /// static-shape session per ControlNet and shape (each holding its own copy of the
    /// ControlNet's weights, at most `graph_shapes` per ControlNet).
    pub controlnet_graph: bool,
    /// Run classifier-free guidance and the Euler update on the device between UNet steps
    /// (needs `io_binding`; Euler with an epsilon-predicting model, no guidance rescale; other
    /// runs step on the host), so that a step copies nothing but its timesteps; the ControlNets'
    /// next inputs are written there too. See `engine::device_step`. On by default: on an H200
    /// it took a step's copies and host work from 0.95 ms to 0.1 ms (34.6 ms to 34.3 ms a step,
    /// 1.6% of a 30-step image; measured without ControlNets).
    pub device_step: bool,
    /// Let float32 graphs (the text encoders, the VAE, an unfused UNet) use TF32 tensor cores
    /// for matrix products and convolutions: faster (the SDXL VAE decode on an H200: 114 ms
    /// against 312 ms), about 3 decimal digits. Off by default, so that float32 graphs compute
    /// what the CPU and diffusers' float32 reference compute. Graphs with only float16 inputs
    /// and outputs (the fused UNet) always run with TF32 allowed: ONNX Runtime's
    /// `use_tf32 = 0` also takes float16 math off its fast path (measured: 132 ms against
    /// 35 ms per UNet step on an H200).
    pub tf32: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self {
            conv_search: ConvSearch::Exhaustive,
            conv_max_workspace: true,
            arena_same_as_requested: true,
            prefer_nhwc: false,
            attention: AttentionKernel::Auto,
            io_binding: true,
            graph: false,
            graph_shapes: 2,
            controlnet_graph: true,
            device_step: true,
            tf32: false,
        }
    }
}

impl CudaOptions {
    /// The provider for GPU `device_id`, with graph capture on or off for this session.
    pub(crate) fn provider(
        &self,
        device_id: i32,
        tf32: bool,
        graph: bool,
    ) -> ep::ExecutionProviderDispatch {
        let mut cuda = ep::CUDA::default()
            .with_device_id(device_id)
            .with_tf32(tf32)
            .with_conv_algorithm_search(match self.conv_search {
                ConvSearch::Exhaustive => ConvAlgorithmSearch::Exhaustive,
                ConvSearch::Heuristic => ConvAlgorithmSearch::Heuristic,
                ConvSearch::Default => ConvAlgorithmSearch::Default,
            })
            .with_conv_max_workspace(self.conv_max_workspace)
            .with_prefer_nhwc(self.prefer_nhwc)
            .with_cuda_graph(graph);
        if self.arena_same_as_requested {
            cuda = cuda.with_arena_extend_strategy(ArenaExtendStrategy::SameAsRequested);
        }
        let backend = match self.attention {
            AttentionKernel::Auto => None,
            AttentionKernel::Flash => Some(AttentionBackend::FLASH_ATTENTION),
            AttentionKernel::Efficient => Some(AttentionBackend::EFFICIENT_ATTENTION),
            AttentionKernel::CudnnFlash => Some(AttentionBackend::CUDNN_FLASH_ATTENTION),
            AttentionKernel::Math => Some(AttentionBackend::MATH),
        };
        if let Some(backend) = backend {
            cuda = cuda.with_attention_backend(backend);
        }
        cuda.build().error_on_failure()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in ["exhaustive", "heuristic", "default"] {
            assert_eq!(s.parse::<ConvSearch>().unwrap().to_string(), s);
        }
        for s in ["auto", "flash", "efficient", "cudnn_flash", "math"] {
            assert_eq!(s.parse::<AttentionKernel>().unwrap().to_string(), s);
        }
        assert!("fast".parse::<ConvSearch>().is_err());
        assert!("sdpa".parse::<AttentionKernel>().is_err());
    }
}
