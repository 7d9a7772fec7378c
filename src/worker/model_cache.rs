//! The loaded models of one engine thread: a least-recently-used cache within a memory budget,
//! that notices when a model's files change on disk.
//!
//! - A model is identified by its configured name and directory. Its size is estimated as the
//!   bytes of its ONNX graphs and external weights (`*.onnx`, `*.onnx_data`, `*.data`, `*.pb`),
//!   which is what its sessions hold in device memory, give or take the runtime's own buffers.
//! - Before a model is loaded, the least recently used models are evicted until the new one fits
//!   in the budget with those that stay. A model larger than the whole budget is still loaded,
//!   alone. A budget of 0 keeps one model at a time. A model loaded for another's sake (a
//!   refiner beside its base) may name one to keep: that one is never evicted for it, so a
//!   base and its refiner are loaded together whatever the budget.
//! - Each use compares the directory's fingerprint (every file's relative path, length and
//!   modification time) with the one taken at load time; when the files were replaced the stale
//!   engine is dropped and the model loaded again, so new weights take effect with the next job
//!   without restarting the worker.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::config::ModelsConfig;
use crate::engine::{Engine, EngineError};

/// A configured model as a capabilities listing shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ModelInfo {
    pub name: String,
    /// Jobs that name no model get this one.
    pub default: bool,
    pub default_width: u32,
    pub default_height: u32,
    /// `model_index.json` is present in the model's directory.
    pub available: bool,
    /// Estimated memory of the loaded model: the bytes of its graphs and weights.
    pub estimated_bytes: u64,
    /// A refiner is configured and its `model_index.json` is present: jobs may ask for
    /// `refiner`.
    pub refiner: bool,
}

/// Every configured model, in configuration order, for a capabilities listing.
pub fn list_models(models: &ModelsConfig) -> Vec<ModelInfo> {
    models
        .models
        .iter()
        .map(|m| {
            let (default_width, default_height) = m.default_size();
            ModelInfo {
                name: m.name.clone(),
                default: m.name == models.default,
                default_width,
                default_height,
                available: m.path.join("model_index.json").is_file(),
                estimated_bytes: Fingerprint::of(&m.path).weight_bytes(),
                refiner: m
                    .refiner
                    .as_ref()
                    .is_some_and(|r| r.join("model_index.json").is_file()),
            }
        })
        .collect()
}

/// The files of a model directory: relative path → (length, modification time).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fingerprint {
    files: BTreeMap<PathBuf, (u64, Option<SystemTime>)>,
}

impl Fingerprint {
    /// Read the fingerprint of every file under `root` (missing or unreadable entries are left
    /// out: loading reports those).
    pub fn of(root: &Path) -> Self {
        let mut files = BTreeMap::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let Ok(meta) = std::fs::metadata(&path) else {
                    continue;
                };
                if meta.is_dir() {
                    stack.push(path);
                } else if let Ok(rel) = path.strip_prefix(root) {
                    files.insert(rel.to_path_buf(), (meta.len(), meta.modified().ok()));
                }
            }
        }
        Self { files }
    }

    /// A stable 64-bit digest (FNV-1a) of the fingerprint, for cache keys.
    pub fn digest(&self) -> u64 {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let mut feed = |bytes: &[u8]| {
            for &b in bytes {
                hash ^= u64::from(b);
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
        };
        for (path, (len, modified)) in &self.files {
            feed(path.to_string_lossy().as_bytes());
            feed(&len.to_le_bytes());
            let nanos = modified
                .and_then(|m| m.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            feed(&nanos.to_le_bytes());
        }
        hash
    }

    /// Estimated device memory: the bytes of graphs and weights.
    pub fn weight_bytes(&self) -> u64 {
        self.files
            .iter()
            .filter(|(p, _)| {
                let name = p.to_string_lossy();
                [".onnx", ".onnx_data", ".data", ".pb"]
                    .iter()
                    .any(|ext| name.ends_with(ext))
            })
            .map(|(_, (len, _))| *len)
            .sum()
    }
}

struct Entry {
    name: String,
    path: PathBuf,
    fingerprint: Fingerprint,
    bytes: u64,
    engine: Engine,
}

/// Why the cache returned no engine.
#[derive(Debug, thiserror::Error)]
#[error("cannot load model `{model}`")]
pub struct LoadFailure {
    pub model: String,
    #[source]
    pub source: EngineError,
}

/// The models one engine thread keeps loaded, least recently used first.
pub struct ModelCache {
    budget_bytes: u64,
    entries: Vec<Entry>,
}

impl ModelCache {
    /// An empty cache holding at most `budget_bytes` of models (0: one model at a time).
    pub fn new(budget_bytes: u64) -> Self {
        Self {
            budget_bytes,
            entries: Vec::new(),
        }
    }

    /// Names of the loaded models, least recently used first.
    pub fn loaded(&self) -> Vec<&str> {
        self.entries.iter().map(|e| e.name.as_str()).collect()
    }

    /// Estimated bytes of the loaded models.
    pub fn used_bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.bytes).sum()
    }

    /// Drop a model (after a panic inside it, for instance).
    pub fn remove(&mut self, name: &str, path: &Path) {
        self.entries.retain(|e| !(e.name == name && e.path == path));
    }

    /// Drop every model for which `keep(name, path)` is false.
    pub fn retain(&mut self, keep: impl Fn(&str, &Path) -> bool) {
        self.entries.retain(|e| {
            let kept = keep(&e.name, &e.path);
            if !kept {
                tracing::info!(model = %e.name, bytes = e.bytes, "model no longer configured: evicted");
            }
            kept
        });
    }

    /// The most recently used engine (the one [`ensure_loaded`](Self::ensure_loaded) made ready).
    pub fn current(&self) -> Option<&Engine> {
        self.entries.last().map(|e| &e.engine)
    }

    /// The loaded engine of model `name` at `path`.
    pub fn get(&self, name: &str, path: &Path) -> Option<&Engine> {
        self.entries
            .iter()
            .find(|e| e.name == name && e.path == path)
            .map(|e| &e.engine)
    }

    /// Make model `name` at `path` the current one, loading it with `load` when it is not loaded
    /// or its files changed since it was. Returns the load time, `None` for a cache hit.
    pub fn ensure_loaded(
        &mut self,
        name: &str,
        path: &Path,
        load: impl FnOnce(&Path) -> Result<Engine, EngineError>,
    ) -> Result<Option<Duration>, LoadFailure> {
        self.ensure_loaded_keeping(name, path, None, load)
    }

    /// [`ensure_loaded`](Self::ensure_loaded), never evicting the model `keep` (name, path) to
    /// make room.
    pub fn ensure_loaded_keeping(
        &mut self,
        name: &str,
        path: &Path,
        keep: Option<(&str, &Path)>,
        load: impl FnOnce(&Path) -> Result<Engine, EngineError>,
    ) -> Result<Option<Duration>, LoadFailure> {
        let fingerprint = Fingerprint::of(path);
        let position = self
            .entries
            .iter()
            .position(|e| e.name == name && e.path == path);
        if let Some(i) = position {
            let entry = self.entries.remove(i);
            if entry.fingerprint == fingerprint {
                self.entries.push(entry);
                return Ok(None);
            }
            tracing::info!(model = name, "model files changed on disk: reloading");
        }
        let bytes = fingerprint.weight_bytes();
        self.make_room(bytes, keep);
        let started = Instant::now();
        let engine = load(path).map_err(|source| LoadFailure {
            model: name.to_owned(),
            source,
        })?;
        let load_time = started.elapsed();
        tracing::info!(
            model = name,
            bytes,
            load_ms = load_time.as_millis() as u64,
            "model loaded"
        );
        self.entries.push(Entry {
            name: name.to_owned(),
            path: path.to_path_buf(),
            fingerprint,
            bytes,
            engine,
        });
        Ok(Some(load_time))
    }

    /// Evict least recently used models (but `keep`) until `incoming` more bytes fit the budget.
    fn make_room(&mut self, incoming: u64, keep: Option<(&str, &Path)>) {
        let kept = |e: &Entry| keep.is_some_and(|(name, path)| e.name == name && e.path == path);
        while self.budget_bytes == 0 || self.used_bytes() + incoming > self.budget_bytes {
            let Some(victim) = self.entries.iter().position(|e| !kept(e)) else {
                break;
            };
            let evicted = self.entries.remove(victim);
            tracing::info!(model = %evicted.name, bytes = evicted.bytes, "model evicted");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_see_replaced_files_and_count_weights() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("unet")).unwrap();
        std::fs::write(dir.path().join("unet/model.onnx"), vec![0u8; 100]).unwrap();
        std::fs::write(dir.path().join("unet/model.onnx_data"), vec![0u8; 1000]).unwrap();
        std::fs::write(dir.path().join("model_index.json"), b"{}").unwrap();
        let a = Fingerprint::of(dir.path());
        assert_eq!(a.weight_bytes(), 1100);
        assert_eq!(a, Fingerprint::of(dir.path()));
        std::fs::write(dir.path().join("unet/model.onnx"), vec![1u8; 101]).unwrap();
        assert_ne!(a, Fingerprint::of(dir.path()));
    }

    #[test]
    fn configured_models_are_listed_with_their_size() {
        let mut models = ModelsConfig::default();
        models.models[0].path =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sdxl");
        models.models[0].refiner =
            Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-refiner"));
        let mut missing = models.models[0].clone();
        missing.name = "gone".to_owned();
        missing.path = PathBuf::from("/nonexistent/model");
        models.models.push(missing);
        let list = list_models(&models);
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].name, "tiny-sdxl");
        assert!(list[0].default && list[0].available);
        // The tiny pipeline's graphs weigh some megabytes.
        assert!(list[0].estimated_bytes > 1_000_000, "{:?}", list[0]);
        assert!(list[0].refiner, "the tiny refiner is there");
        assert!(!list[1].default && !list[1].available);
        assert_eq!(list[1].estimated_bytes, 0);
    }

    #[test]
    fn a_model_that_cannot_load_is_not_cached() {
        let mut cache = ModelCache::new(0);
        let failure = cache
            .ensure_loaded("m", Path::new("/nonexistent"), |p| {
                Err(EngineError::ModelFileMissing {
                    path: p.to_path_buf(),
                })
            })
            .expect_err("fails");
        assert_eq!(failure.model, "m");
        assert!(cache.loaded().is_empty());
    }
}
