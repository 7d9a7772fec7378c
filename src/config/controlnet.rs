//! The `[controlnet]` settings: which ControlNet and preprocessor models the deployment has, by
//! control type, and how control images may reach the worker.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use crate::engine::controlnet::ControlType;

/// ControlNet settings (all optional: with none configured, jobs cannot ask for ControlNets).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ControlNetConfig {
    /// ControlNet export directories (`onnx/export_controlnet.py`), by type.
    pub models: BTreeMap<ControlType, PathBuf>,
    /// ONNX preprocessor directories (`model.onnx` + `preprocessor.json`), by type. Canny needs
    /// none: its edges are computed in-process.
    pub preprocessors: BTreeMap<ControlType, PathBuf>,
    /// Whether `image_url` (https only) may be used in job messages.
    pub allow_image_urls: bool,
    /// Largest control image file (any source), in bytes.
    pub max_image_bytes: usize,
    /// Largest control image, in decoded pixels.
    pub max_image_pixels: u64,
    /// Most ControlNets in one job.
    pub max_units: u32,
    /// Time allowed to fetch one control image.
    pub fetch_timeout_ms: u64,
}

impl Default for ControlNetConfig {
    fn default() -> Self {
        ControlNetConfig {
            models: BTreeMap::new(),
            preprocessors: BTreeMap::new(),
            allow_image_urls: false,
            max_image_bytes: 8 * 1024 * 1024,
            max_image_pixels: 4096 * 4096,
            max_units: 3,
            fetch_timeout_ms: 15_000,
        }
    }
}

impl ControlNetConfig {
    /// Whether a ControlNet model is configured for `kind`.
    pub fn has_model(&self, kind: ControlType) -> bool {
        self.models.contains_key(&kind)
    }

    /// Whether a plain photo can be turned into a `kind` control image here.
    pub fn can_preprocess(&self, kind: ControlType) -> bool {
        kind == ControlType::Canny || self.preprocessors.contains_key(&kind)
    }
}

/// One ControlNet type as capabilities report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ControlNetCapability {
    #[serde(rename = "type")]
    pub kind: ControlType,
    /// A ControlNet model is configured for this type.
    pub model: bool,
    /// How `preprocess: true` is served: `builtin` (canny), `model` (a configured ONNX
    /// preprocessor), or `null` (send an already-processed control image).
    pub preprocessor: Option<&'static str>,
}

/// Every ControlNet type this build knows, with what the deployment has for it.
pub fn capabilities(config: &ControlNetConfig) -> Vec<ControlNetCapability> {
    ControlType::ALL
        .into_iter()
        .map(|kind| ControlNetCapability {
            kind,
            model: config.has_model(kind),
            preprocessor: if kind == ControlType::Canny {
                Some("builtin")
            } else if config.preprocessors.contains_key(&kind) {
                Some("model")
            } else {
                None
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_list_every_type_and_what_is_configured() {
        let mut config = ControlNetConfig::default();
        config
            .models
            .insert(ControlType::Depth, PathBuf::from("/m/depth"));
        let caps = capabilities(&config);
        assert_eq!(caps.len(), 3);
        let json = serde_json::to_value(&caps).unwrap();
        assert_eq!(
            json,
            serde_json::json!([
                {"type": "canny", "model": false, "preprocessor": "builtin"},
                {"type": "depth", "model": true, "preprocessor": null},
                {"type": "openpose", "model": false, "preprocessor": null},
            ])
        );
    }
}
