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

/// Every GPU that CUDA will show this process, or the CPU when there is none: the GPUs NVML
/// sees, limited by `CUDA_VISIBLE_DEVICES` when it is set.
pub fn auto_devices(nvml: Option<&Nvml>) -> Vec<Device> {
    let seen = nvml.and_then(|nvml| nvml.device_count().ok()).unwrap_or(0);
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let count = match visible_indices(visible.as_deref()) {
        Some(list) => (list.len() as u32).min(seen),
        None => seen,
    };
    if count == 0 {
        vec![Device::Cpu]
    } else {
        (0..count).map(|index| Device::Cuda { index }).collect()
    }
}

/// The entries of a `CUDA_VISIBLE_DEVICES` value (`None` when unset: every GPU is visible).
/// CUDA stops at the first invalid entry, so `-1` hides every GPU.
fn visible_indices(value: Option<&str>) -> Option<Vec<String>> {
    let value = value?;
    let mut entries = Vec::new();
    for entry in value.split(',').map(str::trim) {
        if entry.is_empty() || entry.starts_with('-') {
            break;
        }
        entries.push(entry.to_owned());
    }
    Some(entries)
}

/// The NVML index of CUDA device `index`: the same, unless `CUDA_VISIBLE_DEVICES` renumbers
/// the devices (then the entry at `index`, when it is a number).
fn nvml_index(index: u32) -> Option<u32> {
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    match visible_indices(visible.as_deref()) {
        None => Some(index),
        Some(entries) => entries.get(index as usize)?.parse().ok(),
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
            Device::Cuda { index } => nvml_index(index).map(|index| GpuMemoryProbe { nvml, index }),
            Device::Cpu => None,
        }
    }

    /// The GPU's name (e.g. "NVIDIA H200"), if NVML can tell.
    pub fn name(&self) -> Option<String> {
        self.nvml.device_by_index(self.index).ok()?.name().ok()
    }

    /// The device's total memory in bytes, if NVML can tell.
    pub fn total_bytes(&self) -> Option<u64> {
        let device = self.nvml.device_by_index(self.index).ok()?;
        device.memory_info().ok().map(|info| info.total)
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
    fn cuda_visible_devices_limits_and_renumbers() {
        assert_eq!(visible_indices(None), None);
        assert_eq!(visible_indices(Some("")), Some(vec![]));
        assert_eq!(visible_indices(Some("-1")), Some(vec![]));
        assert_eq!(
            visible_indices(Some("2, 0")),
            Some(vec!["2".to_owned(), "0".to_owned()])
        );
        assert_eq!(visible_indices(Some("1,-1,3")), Some(vec!["1".to_owned()]));
    }

    #[test]
    fn no_nvml_means_cpu() {
        assert_eq!(auto_devices(None), vec![Device::Cpu]);
    }
}
