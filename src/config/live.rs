//! Reloading `[models]` while a process runs.
//!
//! A worker or API server keeps its models in [`LiveModels`], which every job validation and
//! model lookup reads anew; [`reload`] reads the configuration again (the same file and
//! environment as at start), and when it loads and passes every check, replaces the models.
//! Everything else in the configuration needs a restart: keys whose value changed are
//! reported in [`Reload::ignored`] and stay as they were. An invalid configuration changes
//! nothing (the error is returned for the caller to log).
//!
//! Environment variables still override the file: with `SDXL_MODELS_AVAILABLE` set, the
//! models come from it at every reload.

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::watch;

use super::{Config, ConfigError, ModelsConfig};

/// The models of a running process, replaced as a whole by a reload.
#[derive(Debug, Clone)]
pub struct LiveModels {
    sender: Arc<watch::Sender<Arc<ModelsConfig>>>,
}

impl LiveModels {
    pub fn new(models: ModelsConfig) -> Self {
        let (sender, _) = watch::channel(Arc::new(models));
        LiveModels {
            sender: Arc::new(sender),
        }
    }

    /// The models in force now.
    pub fn current(&self) -> Arc<ModelsConfig> {
        self.sender.borrow().clone()
    }

    /// Sees every later replacement.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ModelsConfig>> {
        self.sender.subscribe()
    }

    /// Put `models` in force; `false` when they equal the current ones (nothing is sent).
    pub fn replace(&self, models: ModelsConfig) -> bool {
        self.sender.send_if_modified(|current| {
            if **current == models {
                return false;
            }
            *current = Arc::new(models);
            true
        })
    }
}

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reload {
    /// Models that are new.
    pub added: Vec<String>,
    /// Models that are gone.
    pub removed: Vec<String>,
    /// Models whose entry changed (path or default size).
    pub changed: Vec<String>,
    /// The default model, when it changed.
    pub default: Option<String>,
    /// Keys outside `[models]` whose new value needs a restart, so were not applied.
    pub ignored: Vec<String>,
}

impl Reload {
    /// Whether the models changed.
    pub fn models_changed(&self) -> bool {
        !(self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && self.default.is_none())
    }
}

/// Load the configuration again from `file` (as at start: `None` means `SDXL_CONFIG` or the
/// default file) and the process environment, and apply its models (see [`apply`]).
pub fn reload(
    file: Option<&Path>,
    running: &Config,
    live: &LiveModels,
) -> Result<Reload, ConfigError> {
    let new = Config::load(file)?;
    Ok(apply(running, &new, live))
}

/// Put the models of `new` in force and report the difference; `running` is the
/// configuration the process started with (whatever else changed is only reported).
pub fn apply(running: &Config, new: &Config, live: &LiveModels) -> Reload {
    let old = live.current();
    let mut report = Reload {
        ignored: changed_keys(running, new),
        ..Reload::default()
    };
    for entry in &new.models.models {
        match old.get(&entry.name) {
            None => report.added.push(entry.name.clone()),
            Some(before) if before != entry => report.changed.push(entry.name.clone()),
            Some(_) => {}
        }
    }
    for entry in &old.models {
        if new.models.get(&entry.name).is_none() {
            report.removed.push(entry.name.clone());
        }
    }
    if old.default != new.models.default {
        report.default = Some(new.models.default.clone());
    }
    live.replace(new.models.clone());
    report
}

/// Dotted keys outside `models` whose values differ (secrets masked on both sides).
fn changed_keys(running: &Config, new: &Config) -> Vec<String> {
    let mut before = Vec::new();
    let mut after = Vec::new();
    flatten("", &running.redacted(), &mut before);
    flatten("", &new.redacted(), &mut after);
    let mut keys: Vec<String> = after
        .iter()
        .filter(|(key, value)| before.iter().find(|(k, _)| k == key).map(|(_, v)| v) != Some(value))
        .map(|(key, _)| key.clone())
        .chain(
            before
                .iter()
                .filter(|(key, _)| !after.iter().any(|(k, _)| k == key))
                .map(|(key, _)| key.clone()),
        )
        .filter(|key| key.split('.').next() != Some("models"))
        .collect();
    // Table-valued keys (such as `controlnet.models`) are reported once, by their key.
    keys.sort();
    keys.dedup();
    keys
}

/// Leaves of a JSON object as `(dotted key, value)`; arrays and the entries of a few maps are
/// leaves of their own key.
fn flatten(prefix: &str, value: &Value, out: &mut Vec<(String, Value)>) {
    match value {
        Value::Object(map) if !prefix.contains('.') => {
            for (key, item) in map {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&path, item, out);
            }
        }
        _ => out.push((prefix.to_owned(), value.clone())),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::ModelEntry;

    fn entry(name: &str, path: &str) -> ModelEntry {
        ModelEntry {
            name: name.to_owned(),
            path: PathBuf::from(path),
            default_width: None,
            default_height: None,
            refiner: None,
        }
    }

    #[test]
    fn a_reload_reports_models_and_keys_that_need_a_restart() {
        let running = Config {
            models: ModelsConfig {
                default: "a".to_owned(),
                models: vec![entry("a", "/m/a"), entry("b", "/m/b")],
            },
            ..Config::default()
        };
        let live = LiveModels::new(running.models.clone());
        let mut receiver = live.subscribe();

        let mut new = running.clone();
        new.models.models = vec![entry("a", "/m/a2"), entry("c", "/m/c")];
        new.broker.url = "amqp://other:5672/%2f".to_owned();
        new.limits.max_steps = 20;
        let report = apply(&running, &new, &live);
        assert_eq!(report.added, ["c"]);
        assert_eq!(report.removed, ["b"]);
        assert_eq!(report.changed, ["a"]);
        assert_eq!(report.default, None);
        assert_eq!(report.ignored, ["broker.url", "limits.max_steps"]);
        assert!(receiver.has_changed().unwrap());
        assert_eq!(*receiver.borrow_and_update().clone(), new.models);
        assert_eq!(live.current().names(), ["a", "c"]);

        // The same models again: nothing changes, nothing is sent.
        let again = apply(&running, &new, &live);
        assert!(!again.models_changed());
        assert!(!receiver.has_changed().unwrap());
    }
}
