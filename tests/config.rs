//! Configuration layering (defaults → file → environment), the documented example file,
//! redaction of secrets, and errors that name the key and where its value came from.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use sdxl_worker::config::{
    Config, ConfigError, DevicesSetting, LogFormat, Origin, StorageConfig, KEYS,
};
use sdxl_worker::engine::{Device, SchedulerKind};

fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    move |name| map.get(name).cloned()
}

fn no_env() -> impl Fn(&str) -> Option<String> {
    env_of(&[])
}

fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.toml")
}

#[test]
fn embedded_defaults_run_the_local_demo() {
    let dir = tempfile::tempdir().unwrap();
    let empty = write_file(dir.path(), "empty.toml", "");
    let cfg = Config::load_from(Some(&empty), &no_env()).unwrap();
    assert_eq!(cfg, Config::default());
    assert_eq!(
        cfg.database.url,
        "postgres://postgres@127.0.0.1:5432/postgres"
    );
    assert_eq!(cfg.database.schema, "public");
    assert_eq!(cfg.broker.url, "amqp://guest:guest@127.0.0.1:5672/%2f");
    assert_eq!(cfg.broker.prefix, "sdxl");
    assert_eq!(
        cfg.storage,
        StorageConfig::Local {
            path: PathBuf::from("out"),
            prefix: String::new()
        }
    );
    assert_eq!(cfg.worker.devices, DevicesSetting::List(vec![Device::Cpu]));
    assert_eq!(cfg.models.default, "tiny-sdxl");
    let model = cfg.models.default_entry().unwrap();
    assert!(model.path.is_absolute(), "{}", model.path.display());
    assert!(model.path.ends_with("tests/fixtures/tiny-sdxl"));
    assert_eq!(cfg.limits.schedulers, SchedulerKind::ALL.to_vec());
}

#[test]
fn example_file_documents_every_key_with_its_variable_and_default() {
    let text = std::fs::read_to_string(example_path()).unwrap();
    let table: toml::Table = text.parse().unwrap();
    for spec in KEYS {
        let mut node = toml::Value::Table(table.clone());
        for part in spec.name.split('.') {
            node = node
                .get(part)
                .unwrap_or_else(|| panic!("config/example.toml lacks `{}`", spec.name))
                .clone();
        }
        assert!(
            text.contains(&format!("# env: {}", spec.env)),
            "config/example.toml does not name {} for `{}`",
            spec.env,
            spec.name
        );
    }
    // Every value written there is the default. (Model paths are resolved from the file's
    // directory first, so only their written form is compared.)
    let mut loaded = Config::load_from(Some(&example_path()), &no_env()).unwrap();
    let mut defaults = Config::default();
    for models in [&mut loaded.models, &mut defaults.models] {
        for model in &mut models.models {
            assert!(model.path.ends_with("tests/fixtures/tiny-sdxl"));
            model.path = PathBuf::from("tests/fixtures/tiny-sdxl");
            let refiner = model.refiner.as_mut().expect("the example names a refiner");
            assert!(refiner.ends_with("tests/fixtures/tiny-refiner"));
            *refiner = PathBuf::from("tests/fixtures/tiny-refiner");
        }
    }
    assert_eq!(loaded, defaults);
}

#[test]
fn every_key_has_one_distinct_variable() {
    let mut vars: Vec<&str> = KEYS.iter().map(|k| k.env).collect();
    vars.sort();
    vars.dedup();
    assert_eq!(vars.len(), KEYS.len());
    assert!(vars.iter().all(|v| v.starts_with("SDXL_")));
}

#[test]
fn environment_overrides_file_which_overrides_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(
        dir.path(),
        "layers.toml",
        "[broker]\nprefix = \"from-file\"\n\n[database]\nmax_connections = 3\n",
    );
    let env = env_of(&[("SDXL_BROKER_PREFIX", "from-env")]);
    let cfg = Config::load_from(Some(&file), &env).unwrap();
    assert_eq!(cfg.broker.prefix, "from-env");
    assert_eq!(cfg.database.max_connections, 3);
    assert_eq!(cfg.broker.delivery_limit, 5, "untouched keys keep defaults");
}

#[test]
fn sdxl_config_names_the_file_unless_one_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let by_env = write_file(dir.path(), "a.toml", "[log]\nformat = \"json\"\n");
    let explicit = write_file(dir.path(), "b.toml", "[log]\nlevel = \"debug\"\n");
    let env = env_of(&[("SDXL_CONFIG", by_env.to_str().unwrap())]);

    let cfg = Config::load_from(None, &env).unwrap();
    assert_eq!(cfg.log.format, LogFormat::Json);
    let cfg = Config::load_from(Some(&explicit), &env).unwrap();
    assert_eq!(
        (cfg.log.format, cfg.log.level.as_str()),
        (LogFormat::Text, "debug")
    );
}

#[test]
fn every_kind_of_value_can_come_from_the_environment() {
    let env = env_of(&[
        ("SDXL_STORAGE_BACKEND", "s3"),
        ("SDXL_S3_BUCKET", "images"),
        ("SDXL_S3_ENDPOINT", "http://127.0.0.1:9000"),
        ("SDXL_S3_ALLOW_HTTP", "yes"),
        ("SDXL_S3_PATH_STYLE", "false"),
        ("SDXL_STORAGE_PREFIX", "prod"),
        ("SDXL_WORKER_DEVICES", "cuda:0, cuda:1"),
        ("SDXL_WORKER_ID", "gpu-box-1"),
        (
            "SDXL_MODELS_AVAILABLE",
            "base=/models/sdxl-base,turbo=/models/turbo",
        ),
        ("SDXL_MODELS_DEFAULT", "turbo"),
        ("SDXL_LIMITS_SCHEDULERS", "euler, DPM++ 2M Karras"),
        ("SDXL_LIMITS_MAX_GUIDANCE_SCALE", "12.5"),
        ("SDXL_DATABASE_SCHEMA", "tenant_a"),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let empty = write_file(dir.path(), "empty.toml", "");
    let cfg = Config::load_from(Some(&empty), &env).unwrap();
    assert_eq!(
        cfg.storage,
        StorageConfig::S3 {
            endpoint: Some("http://127.0.0.1:9000".to_owned()),
            region: "us-east-1".to_owned(),
            bucket: "images".to_owned(),
            prefix: "prod/".to_owned(),
            allow_http: true,
            path_style: false,
        }
    );
    assert_eq!(
        cfg.worker.devices,
        DevicesSetting::List(vec![Device::Cuda { index: 0 }, Device::Cuda { index: 1 }])
    );
    assert_eq!(cfg.worker.id.as_deref(), Some("gpu-box-1"));
    assert_eq!(cfg.models.names(), vec!["base", "turbo"]);
    assert_eq!(cfg.models.default, "turbo");
    assert_eq!(
        cfg.models.get("base").unwrap().path,
        PathBuf::from("/models/sdxl-base")
    );
    assert_eq!(
        cfg.limits.schedulers,
        vec![SchedulerKind::Euler, SchedulerKind::Dpmpp2mKarras]
    );
    assert_eq!(cfg.limits.max_guidance_scale, 12.5);
    assert_eq!(cfg.database.schema, "tenant_a");

    let auto = Config::load_from(Some(&empty), &env_of(&[("SDXL_WORKER_DEVICES", "auto")]));
    assert_eq!(auto.unwrap().worker.devices, DevicesSetting::Auto);
}

#[test]
fn models_from_a_file_resolve_against_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("models/base")).unwrap();
    let file = write_file(
        dir.path(),
        "models.toml",
        "[models]\ndefault = \"base\"\n\n[models.available]\n\
         base = { path = \"models/base\", default_width = 768, default_height = 512 }\n\
         support = \"tests/support\"\n",
    );
    let cfg = Config::load_from(Some(&file), &no_env()).unwrap();
    let base = cfg.models.get("base").unwrap();
    assert_eq!(
        std::fs::canonicalize(&base.path).unwrap(),
        std::fs::canonicalize(dir.path().join("models/base")).unwrap()
    );
    assert_eq!(base.default_size(), (768, 512));
    // Not beside the file: found relative to the working directory (the crate) instead.
    let support = cfg.models.get("support").unwrap();
    assert_eq!(
        support.path,
        std::env::current_dir().unwrap().join("tests/support")
    );
}

fn load_err(text: &str, env: &[(&str, &str)]) -> (ConfigError, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), "bad.toml", text);
    let err = Config::load_from(Some(&file), &env_of(env)).unwrap_err();
    (err, file, dir)
}

#[test]
fn file_errors_name_the_key_the_file_and_the_line() {
    let (err, file, _dir) = load_err(
        "[broker]\nprefix = \"ok\"\ndelivery_limit = \"five\"\n",
        &[],
    );
    assert_eq!(err.code(), "config_invalid_value");
    assert_eq!(err.key(), Some("broker.delivery_limit"));
    let ConfigError::Invalid { origin, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(
        origin,
        &Origin::File {
            path: file.clone(),
            line: 3
        }
    );
    let text = err.to_string();
    assert!(
        text.contains("broker.delivery_limit") && text.contains("line 3"),
        "{text}"
    );

    let (err, _, _dir) = load_err("[worker]\nprefetch = 1\nprefetchh = 2\n", &[]);
    assert_eq!(err.code(), "config_unknown_key");
    assert_eq!(err.key(), Some("worker.prefetchh"));
    assert!(err.to_string().contains("line 3"), "{err}");

    let (err, _, _dir) = load_err("[storage.s3]\nbuckett = \"x\"\n", &[]);
    assert_eq!(err.key(), Some("storage.s3.buckett"));

    let (err, _, _dir) = load_err("[limits]\nmax_side = 2048\nmin_side = 60\n", &[]);
    assert_eq!(err.key(), Some("limits.min_side"));
    assert!(err.to_string().contains("line 3"), "{err}");

    let (err, _, _dir) = load_err("[log]\nlevel = \"info\n", &[]);
    assert_eq!(err.code(), "config_syntax");
    assert!(err.to_string().contains("line 2"), "{err}");
}

#[test]
fn environment_errors_name_the_key_and_the_variable() {
    let (err, _, _dir) = load_err("", &[("SDXL_WORKER_PREFETCH", "many")]);
    assert_eq!(err.key(), Some("worker.prefetch"));
    let ConfigError::Invalid { origin, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(
        origin,
        &Origin::Env {
            var: "SDXL_WORKER_PREFETCH".to_owned()
        }
    );
    assert!(err.to_string().contains("SDXL_WORKER_PREFETCH"), "{err}");

    let (err, _, _dir) = load_err("", &[("SDXL_MODELS_DEFAULT", "missing-model")]);
    assert_eq!(err.key(), Some("models.default"));
    assert!(err.to_string().contains("SDXL_MODELS_DEFAULT"), "{err}");

    let (err, _, _dir) = load_err("", &[("SDXL_WORKER_DEVICES", "tpu:0")]);
    assert_eq!(err.key(), Some("worker.devices"));

    let (err, _, _dir) = load_err("", &[("SDXL_LIMITS_SCHEDULERS", "euler,warp")]);
    assert_eq!(err.key(), Some("limits.schedulers"));
}

#[test]
fn keys_that_depend_on_each_other_are_checked() {
    let (err, _, _dir) = load_err("[storage]\nbackend = \"s3\"\n", &[]);
    assert_eq!(err.key(), Some("storage.s3.bucket"));

    let (err, _, _dir) = load_err(
        "[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"b\"\nendpoint = \"http://minio:9000\"\n",
        &[],
    );
    assert_eq!(err.key(), Some("storage.s3.endpoint"));
    assert!(err.to_string().contains("allow_http"), "{err}");

    let (err, _, _dir) = load_err("[storage]\nbackend = \"ftp\"\n", &[]);
    assert_eq!(err.key(), Some("storage.backend"));

    let (err, _, _dir) = load_err("[storage]\nprefix = \"../escape\"\n", &[]);
    assert_eq!(err.key(), Some("storage.prefix"));

    let (err, _, _dir) = load_err("[database]\nschema = \"Public; DROP\"\n", &[]);
    assert_eq!(err.key(), Some("database.schema"));

    // A model's default size must itself be acceptable.
    let (err, _, _dir) = load_err(
        "[models.available]\ntiny-sdxl = { path = \"x\", default_width = 100 }\n",
        &[],
    );
    assert_eq!(err.key(), Some("models.available"));
}

#[test]
fn secrets_are_masked_in_redacted_output_and_debug() {
    let env = env_of(&[
        (
            "SDXL_BROKER_URL",
            "amqps://svc:rabbit-pass@mq.internal:5671/prod",
        ),
        (
            "SDXL_DATABASE_URL",
            "postgres://app:pg-pass@db.internal/jobs?sslmode=require",
        ),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let empty = write_file(dir.path(), "empty.toml", "");
    let cfg = Config::load_from(Some(&empty), &env).unwrap();
    assert_eq!(
        cfg.database.url,
        "postgres://app:pg-pass@db.internal/jobs?sslmode=require"
    );

    let redacted = cfg.redacted();
    let text = redacted.to_string();
    assert!(
        !text.contains("rabbit-pass") && !text.contains("pg-pass"),
        "{text}"
    );
    assert_eq!(
        redacted["broker"]["url"],
        "amqps://svc:****@mq.internal:5671/prod"
    );
    assert_eq!(
        redacted["database"]["url"],
        "postgres://app:****@db.internal/jobs?sslmode=require"
    );
    assert_eq!(redacted["worker"]["devices"], serde_json::json!(["cpu"]));

    let debug = format!("{cfg:?}");
    assert!(
        !debug.contains("rabbit-pass") && !debug.contains("pg-pass"),
        "{debug}"
    );
    assert!(debug.contains("svc:****@mq.internal"), "{debug}");
}

#[test]
fn an_unreadable_file_is_reported() {
    let err = Config::load_from(Some(Path::new("/nonexistent/sdxl.toml")), &no_env()).unwrap_err();
    assert_eq!(err.code(), "config_unreadable");
    assert!(err.to_string().contains("/nonexistent/sdxl.toml"));
}
