//! docker-compose.yml agrees with the code: Docker cannot run here, so the file is parsed and
//! checked against the configuration it feeds (service names, ports, every `SDXL_*` variable
//! is a real configuration key and loads, the bucket the workers write to is the one created).

use std::collections::BTreeMap;
use std::path::Path;

use sdxl_worker::config::{Config, DevicesSetting, StorageConfig, KEYS};
use serde_yaml::Value;

fn compose() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docker-compose.yml");
    let text = std::fs::read_to_string(&path).expect("docker-compose.yml");
    serde_yaml::from_str(&text).expect("docker-compose.yml is valid YAML")
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    compose
        .get("services")
        .and_then(|s| s.get(name))
        .unwrap_or_else(|| panic!("service {name} is missing"))
}

fn strings(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(Value::as_sequence)
        .map(|items| {
            items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn environment(service: &Value) -> BTreeMap<String, String> {
    let env = service
        .get("environment")
        .and_then(Value::as_mapping)
        .expect("worker services list their environment as a mapping");
    env.iter()
        .map(|(k, v)| {
            let key = k.as_str().expect("variable name").to_owned();
            let value = match v {
                Value::String(s) => s.clone(),
                Value::Bool(b) => b.to_string(),
                Value::Number(n) => n.to_string(),
                other => panic!("{key} has a non-scalar value {other:?}"),
            };
            (key, value)
        })
        .collect()
}

fn load_config(env: &BTreeMap<String, String>) -> Config {
    Config::load_from(None, &|name| env.get(name).cloned())
        .unwrap_or_else(|e| panic!("the compose environment does not load: {e}"))
}

fn healthcheck(service: &Value) -> Vec<String> {
    strings(service.get("healthcheck").and_then(|h| h.get("test")))
}

fn host_of(url: &str) -> String {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = after_scheme.split('/').next().unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    host_port.to_owned()
}

#[test]
fn infrastructure_services_have_ports_and_health_checks() {
    let compose = compose();
    let rabbitmq = service(&compose, "rabbitmq");
    let image = rabbitmq.get("image").and_then(Value::as_str).unwrap();
    assert!(
        image.contains("management"),
        "RabbitMQ needs the management image: {image}"
    );
    let ports = strings(rabbitmq.get("ports"));
    assert!(ports.contains(&"5672:5672".to_owned()), "{ports:?}");
    assert!(
        ports.contains(&"15672:15672".to_owned()),
        "management UI: {ports:?}"
    );
    assert!(!healthcheck(rabbitmq).is_empty());

    let postgres = service(&compose, "postgres");
    assert!(strings(postgres.get("ports")).contains(&"5432:5432".to_owned()));
    assert!(healthcheck(postgres).iter().any(|t| t == "pg_isready"));

    let minio = service(&compose, "minio");
    assert!(strings(minio.get("ports")).contains(&"9000:9000".to_owned()));
    assert!(!healthcheck(minio).is_empty());
}

#[test]
fn every_sdxl_variable_is_a_configuration_key_and_loads() {
    let compose = compose();
    let known: Vec<&str> = KEYS.iter().map(|k| k.env).collect();
    for name in ["worker-cpu", "worker-gpu"] {
        let env = environment(service(&compose, name));
        for key in env.keys().filter(|k| k.starts_with("SDXL_")) {
            assert!(
                known.contains(&key.as_str()),
                "{name}: {key} is not a configuration variable"
            );
        }
        let config = load_config(&env);
        assert_eq!(host_of(&config.broker.url), "rabbitmq:5672", "{name}");
        assert_eq!(host_of(&config.database.url), "postgres:5432", "{name}");
        let model = config
            .models
            .get(&config.models.default)
            .unwrap_or_else(|| panic!("{name}: default model is not available"));
        assert!(
            model.path.starts_with("/opt/sdxl-worker/models"),
            "{name}: the model path must be inside the image: {}",
            model.path.display()
        );
    }
    let cpu = load_config(&environment(service(&compose, "worker-cpu")));
    assert_eq!(
        cpu.worker.devices,
        DevicesSetting::List(vec![sdxl_worker::engine::Device::Cpu])
    );
    let gpu = load_config(&environment(service(&compose, "worker-gpu")));
    assert_eq!(gpu.worker.devices, DevicesSetting::Auto);
    assert_eq!(
        gpu.worker.prefetch, 2,
        "GPU workers overlap encoding with the next job"
    );
}

#[test]
fn workers_write_to_the_bucket_that_is_created_with_minios_credentials() {
    let compose = compose();
    let minio = service(&compose, "minio");
    let minio_env = environment(minio);
    let init = service(&compose, "minio-init");
    let command = strings(init.get("command")).join(" ");
    let created = command
        .split_whitespace()
        .filter_map(|word| word.strip_prefix("local/"))
        .next()
        .expect("minio-init creates a bucket with `mc mb local/<bucket>`");
    assert!(command.contains("mc mb"), "{command}");

    for name in ["worker-cpu", "worker-gpu"] {
        let env = environment(service(&compose, name));
        let config = load_config(&env);
        let StorageConfig::S3 {
            endpoint, bucket, ..
        } = &config.storage
        else {
            panic!("{name}: the compose workers use S3 storage");
        };
        assert_eq!(bucket, created, "{name} writes to a bucket nobody creates");
        assert_eq!(
            endpoint.as_deref().map(host_of).as_deref(),
            Some("minio:9000")
        );
        assert_eq!(
            env.get("AWS_ACCESS_KEY_ID"),
            minio_env.get("MINIO_ROOT_USER"),
            "{name}"
        );
        assert_eq!(
            env.get("AWS_SECRET_ACCESS_KEY"),
            minio_env.get("MINIO_ROOT_PASSWORD"),
            "{name}"
        );
        // The alias the init job uses carries the same credentials.
        assert!(command.contains(&format!(
            "{} {}",
            minio_env["MINIO_ROOT_USER"], minio_env["MINIO_ROOT_PASSWORD"]
        )));
    }
}

#[test]
fn workers_build_from_the_dockerfiles_and_wait_for_healthy_dependencies() {
    let compose = compose();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (name, dockerfile) in [
        ("worker-cpu", "docker/Dockerfile.cpu"),
        ("worker-gpu", "docker/Dockerfile.gpu"),
    ] {
        let worker = service(&compose, name);
        let build = worker.get("build").expect("build section");
        assert_eq!(
            build.get("dockerfile").and_then(Value::as_str),
            Some(dockerfile)
        );
        assert!(root.join(dockerfile).is_file(), "{dockerfile} is missing");
        let depends = worker.get("depends_on").expect("depends_on");
        for (dependency, condition) in [
            ("rabbitmq", "service_healthy"),
            ("postgres", "service_healthy"),
            ("minio-init", "service_completed_successfully"),
        ] {
            let found = depends
                .get(dependency)
                .and_then(|d| d.get("condition"))
                .and_then(Value::as_str);
            assert_eq!(found, Some(condition), "{name} -> {dependency}");
        }
    }
}

#[test]
fn the_gpu_worker_reserves_nvidia_gpus_under_a_profile() {
    let compose = compose();
    let gpu = service(&compose, "worker-gpu");
    assert_eq!(strings(gpu.get("profiles")), ["gpu"]);
    let devices = gpu
        .get("deploy")
        .and_then(|d| d.get("resources"))
        .and_then(|r| r.get("reservations"))
        .and_then(|r| r.get("devices"))
        .and_then(Value::as_sequence)
        .expect("deploy.resources.reservations.devices");
    assert!(devices.iter().any(|d| {
        d.get("driver").and_then(Value::as_str) == Some("nvidia")
            && strings(d.get("capabilities")).contains(&"gpu".to_owned())
    }));
    let cpu = service(&compose, "worker-cpu");
    assert!(
        cpu.get("profiles").is_none(),
        "the CPU worker starts by default"
    );
    assert!(cpu.get("deploy").is_none());
}
