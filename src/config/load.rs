//! Reading the layers (defaults, file, environment) and checking the result.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use toml_edit::{ImDocument, Item, TableLike};

use crate::config::keys::{self, either::TextOrList, Settings};
use crate::config::types::{ModelEntry, ModelsConfig, StorageConfig};
use crate::config::{Config, CONFIG_FILE_ENV, DEFAULT_CONFIG_FILE, KEYS};
use crate::storage::normalize_prefix;

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The embedded default.
    Default,
    /// A line of a configuration file.
    File { path: PathBuf, line: usize },
    /// An environment variable.
    Env { var: String },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("the default"),
            Origin::File { path, line } => write!(f, "{} line {line}", path.display()),
            Origin::Env { var } => write!(f, "environment variable {var}"),
        }
    }
}

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("configuration file {path} line {line}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("unknown configuration key `{key}` ({origin})")]
    UnknownKey { key: String, origin: Origin },
    #[error("invalid value for `{key}` ({origin}): {message}")]
    Invalid {
        key: String,
        origin: Origin,
        message: String,
    },
}

impl ConfigError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ConfigError::Unreadable { .. } => "config_unreadable",
            ConfigError::Syntax { .. } => "config_syntax",
            ConfigError::UnknownKey { .. } => "config_unknown_key",
            ConfigError::Invalid { .. } => "config_invalid_value",
        }
    }

    /// The key the error is about, when there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::UnknownKey { key, .. } | ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::Unreadable { .. } | ConfigError::Syntax { .. } => None,
        }
    }
}

/// A value being applied: an item of a TOML file or the text of an environment variable.
pub(crate) enum Input<'a> {
    File(&'a Item),
    Env(&'a str),
}

impl Input<'_> {
    pub fn text(&self) -> Result<String, String> {
        match self {
            Input::Env(text) => Ok((*text).to_owned()),
            Input::File(item) => item
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("expected a string, found {}", type_name(item))),
        }
    }

    /// Text where an empty string means "not set".
    pub fn optional_text(&self) -> Result<Option<String>, String> {
        let text = self.text()?;
        Ok(if text.trim().is_empty() {
            None
        } else {
            Some(text)
        })
    }

    pub fn int<T>(&self) -> Result<T, String>
    where
        T: TryFrom<i64> + std::str::FromStr,
    {
        match self {
            Input::Env(text) => text
                .trim()
                .parse::<T>()
                .map_err(|_| format!("expected a non-negative integer in range, found {text:?}")),
            Input::File(item) => {
                let n = item
                    .as_integer()
                    .ok_or_else(|| format!("expected an integer, found {}", type_name(item)))?;
                T::try_from(n).map_err(|_| format!("integer {n} is out of range"))
            }
        }
    }

    pub fn float(&self) -> Result<f64, String> {
        let value = match self {
            Input::Env(text) => text
                .trim()
                .parse::<f64>()
                .map_err(|_| format!("expected a number, found {text:?}"))?,
            Input::File(item) => match (item.as_float(), item.as_integer()) {
                (Some(x), _) => x,
                (None, Some(n)) => n as f64,
                _ => return Err(format!("expected a number, found {}", type_name(item))),
            },
        };
        if value.is_finite() {
            Ok(value)
        } else {
            Err(format!("expected a finite number, found {value}"))
        }
    }

    pub fn flag(&self) -> Result<bool, String> {
        match self {
            Input::Env(text) => match text.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => Err(format!("expected true or false, found {text:?}")),
            },
            Input::File(item) => item
                .as_bool()
                .ok_or_else(|| format!("expected true or false, found {}", type_name(item))),
        }
    }

    pub fn text_or_list(&self) -> Result<TextOrList, String> {
        match self {
            Input::Env(text) => Ok(TextOrList::One((*text).to_owned())),
            Input::File(item) => {
                if let Some(text) = item.as_str() {
                    return Ok(TextOrList::One(text.to_owned()));
                }
                let array = item.as_array().ok_or_else(|| {
                    format!(
                        "expected a string or a list of strings, found {}",
                        type_name(item)
                    )
                })?;
                let mut out = Vec::with_capacity(array.len());
                for value in array.iter() {
                    let text = value
                        .as_str()
                        .ok_or_else(|| "expected a list of strings".to_owned())?;
                    out.push(text.to_owned());
                }
                Ok(TextOrList::Many(out))
            }
        }
    }

    /// Models: in a file a table `name = "path"` or `name = { path = .., default_width = ..,
    /// default_height = .., refiner = .. }`; in the environment `name=path,name=path`.
    pub fn models(&self) -> Result<Vec<ModelEntry>, String> {
        let mut models = match self {
            Input::Env(text) => models_from_env(text)?,
            Input::File(item) => models_from_file(item)?,
        };
        models.sort_by(|a, b| a.name.cmp(&b.name));
        if models.is_empty() {
            return Err("at least one model is needed".to_owned());
        }
        for pair in models.windows(2) {
            if pair[0].name == pair[1].name {
                return Err(format!("model {:?} is listed twice", pair[0].name));
            }
        }
        Ok(models)
    }
}

fn models_from_env(text: &str) -> Result<Vec<ModelEntry>, String> {
    let mut models = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, path) = part
            .split_once('=')
            .ok_or_else(|| format!("expected name=path, found {part:?}"))?;
        models.push(model_entry(name.trim(), path.trim(), None, None, None)?);
    }
    Ok(models)
}

fn models_from_file(item: &Item) -> Result<Vec<ModelEntry>, String> {
    let table = item
        .as_table_like()
        .ok_or_else(|| format!("expected a table of models, found {}", type_name(item)))?;
    let mut models = Vec::new();
    for (name, entry) in table.iter() {
        if let Some(path) = entry.as_str() {
            models.push(model_entry(name, path, None, None, None)?);
            continue;
        }
        let fields = entry
            .as_table_like()
            .ok_or_else(|| format!("model {name:?}: expected a path or a table with `path`"))?;
        let mut path = None;
        let mut width = None;
        let mut height = None;
        let mut refiner = None;
        for (field, value) in fields.iter() {
            match field {
                "path" => path = value.as_str(),
                "refiner" => {
                    refiner = Some(value.as_str().filter(|p| !p.is_empty()).ok_or_else(|| {
                        format!("model {name:?}: `refiner` must be a directory (a string)")
                    })?)
                }
                "default_width" => width = Some(side(name, field, value)?),
                "default_height" => height = Some(side(name, field, value)?),
                other => return Err(format!("model {name:?}: unknown field `{other}`")),
            }
        }
        let path = path.ok_or_else(|| format!("model {name:?}: `path` (a string) is required"))?;
        models.push(model_entry(name, path, width, height, refiner)?);
    }
    Ok(models)
}

fn side(model: &str, field: &str, value: &Item) -> Result<u32, String> {
    value
        .as_integer()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| format!("model {model:?}: `{field}` must be a positive integer"))
}

fn model_entry(
    name: &str,
    path: &str,
    default_width: Option<u32>,
    default_height: Option<u32>,
    refiner: Option<&str>,
) -> Result<ModelEntry, String> {
    if name.is_empty() || path.is_empty() {
        return Err("model names and paths must not be empty".to_owned());
    }
    Ok(ModelEntry {
        name: name.to_owned(),
        path: PathBuf::from(path),
        default_width,
        default_height,
        refiner: refiner.map(PathBuf::from),
    })
}

fn type_name(item: &Item) -> &'static str {
    match item {
        Item::None => "nothing",
        Item::Table(_) | Item::ArrayOfTables(_) => "a table",
        Item::Value(v) => v.type_name(),
    }
}

/// Settings plus the origin of every key that did not keep its default.
struct Layers {
    settings: Settings,
    origins: BTreeMap<&'static str, Origin>,
    config_dir: Option<PathBuf>,
}

impl Layers {
    fn origin(&self, key: &str) -> Origin {
        self.origins.get(key).cloned().unwrap_or(Origin::Default)
    }

    fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            key: key.to_owned(),
            origin: self.origin(key),
            message: message.into(),
        }
    }
}

pub(crate) fn load(
    file: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let mut layers = Layers {
        settings: Settings::default(),
        origins: BTreeMap::new(),
        config_dir: None,
    };
    if let Some(path) = choose_file(file, env) {
        apply_file(&mut layers, &path)?;
    }
    apply_env(&mut layers, env)?;
    finish(layers)
}

fn choose_file(file: Option<&Path>, env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(path) = file {
        return Some(path.to_path_buf());
    }
    if let Some(path) = env(CONFIG_FILE_ENV).filter(|p| !p.trim().is_empty()) {
        return Some(PathBuf::from(path));
    }
    let default = PathBuf::from(DEFAULT_CONFIG_FILE);
    default.is_file().then_some(default)
}

fn apply_file(layers: &mut Layers, path: &Path) -> Result<(), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Unreadable {
        path: path.to_path_buf(),
        source,
    })?;
    let doc = ImDocument::parse(text.as_str()).map_err(|err| ConfigError::Syntax {
        path: path.to_path_buf(),
        line: err.span().map(|s| line_of(&text, s.start)).unwrap_or(1),
        message: err.message().to_owned(),
    })?;
    let file = FileCtx { path, text: &text };
    walk(layers, &file, doc.as_table(), "")?;
    layers.config_dir = path
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .map(Path::to_path_buf);
    Ok(())
}

struct FileCtx<'a> {
    path: &'a Path,
    text: &'a str,
}

impl FileCtx<'_> {
    fn origin(&self, table: &dyn TableLike, key: &str) -> Origin {
        let offset = table
            .get_key_value(key)
            .and_then(|(k, item)| k.span().or_else(|| item.span()))
            .map(|s| s.start)
            .unwrap_or(0);
        Origin::File {
            path: self.path.to_path_buf(),
            line: line_of(self.text, offset),
        }
    }
}

fn walk(
    layers: &mut Layers,
    file: &FileCtx<'_>,
    table: &dyn TableLike,
    prefix: &str,
) -> Result<(), ConfigError> {
    for (key, item) in table.iter() {
        let name = if prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{prefix}.{key}")
        };
        let origin = file.origin(table, key);
        if let Some(spec) = keys::spec(&name) {
            keys::apply(&mut layers.settings, spec.name, &Input::File(item)).map_err(
                |message| ConfigError::Invalid {
                    key: name.clone(),
                    origin: origin.clone(),
                    message,
                },
            )?;
            layers.origins.insert(spec.name, origin);
            continue;
        }
        let section = format!("{name}.");
        let is_section = KEYS.iter().any(|k| k.name.starts_with(&section));
        match item.as_table_like() {
            Some(inner) if is_section => walk(layers, file, inner, &name)?,
            _ => return Err(ConfigError::UnknownKey { key: name, origin }),
        }
    }
    Ok(())
}

fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

fn apply_env(layers: &mut Layers, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
    for spec in KEYS {
        let Some(value) = env(spec.env) else { continue };
        let origin = Origin::Env {
            var: spec.env.to_owned(),
        };
        keys::apply(&mut layers.settings, spec.name, &Input::Env(&value)).map_err(|message| {
            ConfigError::Invalid {
                key: spec.name.to_owned(),
                origin: origin.clone(),
                message,
            }
        })?;
        layers.origins.insert(spec.name, origin);
    }
    Ok(())
}

/// The embedded defaults, with the default model path resolved.
pub(crate) fn defaults_resolved() -> Config {
    let settings = Settings::default();
    Config {
        broker: settings.broker,
        database: settings.database,
        storage: StorageConfig::default(),
        worker: settings.worker,
        models: resolve_models(settings.models, None),
        limits: settings.limits,
        controlnet: resolve_controlnet(settings.controlnet, None),
        cuda: settings.cuda,
        log: settings.log,
        api: settings.api,
    }
}

fn finish(layers: Layers) -> Result<Config, ConfigError> {
    crate::config::redact::check_urls(&layers.settings)
        .map_err(|(key, message)| layers.invalid(key, message))?;
    crate::config::check::all(&layers.settings)
        .map_err(|(key, message)| layers.invalid(key, message))?;
    let storage = storage_config(&layers)?;
    let models_from_file = matches!(layers.origin("models.available"), Origin::File { .. });
    let config_dir = if models_from_file {
        layers.config_dir.clone()
    } else {
        None
    };
    let s = layers.settings;
    Ok(Config {
        broker: s.broker,
        database: s.database,
        storage,
        worker: s.worker,
        models: resolve_models(s.models, config_dir.as_deref()),
        limits: s.limits,
        controlnet: resolve_controlnet(s.controlnet, layers.config_dir.as_deref()),
        cuda: s.cuda,
        log: s.log,
        api: s.api,
    })
}

fn storage_config(layers: &Layers) -> Result<StorageConfig, ConfigError> {
    let st = &layers.settings.storage;
    let prefix = normalize_prefix(&st.prefix).map_err(|m| layers.invalid("storage.prefix", m))?;
    match st.backend.as_str() {
        "local" => {
            if st.path.as_os_str().is_empty() {
                return Err(layers.invalid("storage.path", "must not be empty"));
            }
            Ok(StorageConfig::Local {
                path: st.path.clone(),
                prefix,
            })
        }
        "s3" => {
            if st.s3_bucket.trim().is_empty() {
                return Err(layers.invalid(
                    "storage.s3.bucket",
                    "a bucket is required when storage.backend is \"s3\"",
                ));
            }
            if let Some(endpoint) = &st.s3_endpoint {
                if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                    return Err(layers
                        .invalid("storage.s3.endpoint", "expected an http:// or https:// URL"));
                }
                if endpoint.starts_with("http://") && !st.s3_allow_http {
                    return Err(layers.invalid(
                        "storage.s3.endpoint",
                        "an http:// endpoint needs storage.s3.allow_http = true",
                    ));
                }
            }
            Ok(StorageConfig::S3 {
                endpoint: st.s3_endpoint.clone(),
                region: st.s3_region.clone(),
                bucket: st.s3_bucket.clone(),
                prefix,
                allow_http: st.s3_allow_http,
                path_style: st.s3_path_style,
            })
        }
        other => Err(layers.invalid(
            "storage.backend",
            format!("unknown backend {other:?}: expected \"local\" or \"s3\""),
        )),
    }
}

/// Resolve relative model paths: against the configuration file's directory (when the models
/// came from a file), else the working directory, else the crate's source directory; the first
/// candidate that exists wins, and when none does the first candidate is kept.
fn resolve_models(mut models: ModelsConfig, config_dir: Option<&Path>) -> ModelsConfig {
    let mut bases: Vec<PathBuf> = Vec::new();
    if let Some(dir) = config_dir {
        bases.push(absolute(dir));
    }
    if let Ok(cwd) = std::env::current_dir() {
        bases.push(cwd);
    }
    bases.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    let resolve = |path: &mut PathBuf| {
        if path.is_absolute() {
            return;
        }
        let candidates: Vec<PathBuf> = bases.iter().map(|b| b.join(&*path)).collect();
        let chosen = candidates
            .iter()
            .find(|c| c.exists())
            .or(candidates.first())
            .cloned();
        if let Some(chosen) = chosen {
            *path = chosen;
        }
    };
    for model in &mut models.models {
        resolve(&mut model.path);
        if let Some(refiner) = &mut model.refiner {
            resolve(refiner);
        }
    }
    models
}

/// Resolve relative ControlNet and preprocessor directories as model paths are resolved.
fn resolve_controlnet(
    mut config: crate::config::ControlNetConfig,
    config_dir: Option<&Path>,
) -> crate::config::ControlNetConfig {
    let mut bases: Vec<PathBuf> = Vec::new();
    if let Some(dir) = config_dir {
        bases.push(absolute(dir));
    }
    if let Ok(cwd) = std::env::current_dir() {
        bases.push(cwd);
    }
    bases.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    for path in config
        .models
        .values_mut()
        .chain(config.preprocessors.values_mut())
    {
        if path.is_absolute() {
            continue;
        }
        let candidates: Vec<PathBuf> = bases.iter().map(|b| b.join(&*path)).collect();
        if let Some(found) = candidates
            .iter()
            .find(|c| c.exists())
            .or(candidates.first())
        {
            *path = found.clone();
        }
    }
    config
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
