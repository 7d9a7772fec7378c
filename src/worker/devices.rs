//! Which devices get a GPU consumer: `cpu`, `cuda:N`, or `auto` (every NVIDIA GPU that NVML
//! reports, or the CPU when there is none). NVML is loaded at run time, so the binary runs on
//! machines without the NVIDIA driver.

use std::sync::Arc;

use nvml_wrapper::Nvml;

use crate::engine::Device;

/// NVML, when the NVIDIA driver is present.
pub fn nvml() -> Option<Arc<Nvml>> {
    match Nvml::init() {
        Ok(nvml) => Some(Arc::new(nvml)),
        Err(err) => {
            tracing::debug!(error = %err, "NVML is not available");
            None
        }
    }
}

/// Every GPU NVML sees, or the CPU when there is none.
pub fn auto_devices(nvml: Option<&Nvml>) -> Vec<Device> {
    let count = nvml.and_then(|nvml| nvml.device_count().ok()).unwrap_or(0);
    if count == 0 {
        vec![Device::Cpu]
    } else {
        (0..count).map(|index| Device::Cuda { index }).collect()
    }
}

/// Samples the memory in use on one GPU, to report a job's peak.
#[derive(Clone)]
pub struct GpuMemoryProbe {
    nvml: Arc<Nvml>,
    index: u32,
}

impl GpuMemoryProbe {
    pub fn new(nvml: Arc<Nvml>, device: Device) -> Option<GpuMemoryProbe> {
        match device {
            Device::Cuda { index } => Some(GpuMemoryProbe { nvml, index }),
            Device::Cpu => None,
        }
    }

    /// Bytes in use on the device now (all processes), if NVML can tell.
    pub fn used_bytes(&self) -> Option<u64> {
        let device = self.nvml.device_by_index(self.index).ok()?;
        device.memory_info().ok().map(|info| info.used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_nvml_means_cpu() {
        assert_eq!(auto_devices(None), vec![Device::Cpu]);
    }
}
