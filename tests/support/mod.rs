//! Support code shared by the integration tests: unique names, a Postgres schema per test, a local
//! S3 server (moto) per test, and where ONNX Runtime's library is.
//!
//! Every test gets its own schema, key prefix and queue prefix, and servers started here bind
//! free ports, so tests run in parallel against the same Postgres and RabbitMQ.
#![allow(dead_code, unused_imports)]

pub mod moto;
pub mod pg;
pub mod proxy;
pub mod servers;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

pub use moto::MotoServer;
pub use pg::TestDb;
pub use proxy::FaultProxy;
pub use servers::{PrivatePostgres, PrivateRabbit};

/// A name no other test (in this or another process) uses: lowercase ASCII letters, digits
/// and `_`, starting with `label`.
pub fn unique_name(label: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let random = uuid::Uuid::new_v4().simple().to_string();
    let label: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(24)
        .collect();
    format!("{label}_{}_{n}_{}", std::process::id(), &random[..8])
}

/// A unique object-key or queue prefix (`t-label-...`, using `-` as separator).
pub fn unique_prefix(label: &str) -> String {
    format!("t-{}", unique_name(label).replace('_', "-"))
}

/// The Postgres URL tests use: `SDXL_TEST_DATABASE_URL`, else the local default.
pub fn database_url() -> String {
    std::env::var("SDXL_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// The RabbitMQ URL tests use: `SDXL_TEST_BROKER_URL`, else the local default.
pub fn broker_url() -> String {
    std::env::var("SDXL_TEST_BROKER_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// The ONNX Runtime shared library: `ORT_DYLIB_PATH` if it names a file, else the one
/// `scripts/setup-ort.sh` installs under `.ort/lib` of the repository.
pub fn ort_dylib_path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from) {
        if path.is_file() {
            return Some(path);
        }
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".ort/lib");
    let mut candidates: Vec<PathBuf> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so"))
        })
        .collect();
    // The most specific name (libonnxruntime.so.1.31.1) sorts last.
    candidates.sort();
    candidates.pop()
}

/// Environment for a child process (or this one) to find ONNX Runtime: `ORT_DYLIB_PATH`
/// when the library was found, nothing otherwise.
pub fn ort_env() -> Vec<(String, String)> {
    ort_dylib_path()
        .map(|p| vec![("ORT_DYLIB_PATH".to_owned(), p.display().to_string())])
        .unwrap_or_default()
}

/// The tiny SDXL pipeline committed for tests.
pub fn tiny_model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sdxl")
}
