//! sdxl-worker: SDXL image generation jobs from RabbitMQ, run on GPUs through ONNX Runtime,
//! tracked in Postgres, stored in S3-compatible storage.
//!
//! The crate is a library with a thin binary. Each module owns one concern:
//! - [`api`]: the HTTP API (`serve`): jobs, estimates, capabilities, metrics, status page.
//! - [`engine`]: SDXL inference on ONNX Runtime (knows nothing of brokers, databases or storage).
//! - [`job`]: the job message contract (version 1), its validation and JSON Schema.
//! - [`config`]: layered configuration (defaults, file, environment).
//! - [`db`]: Postgres status and metrics rows, migrations.
//! - [`broker`]: RabbitMQ topology, publishing with confirms, consuming.
//! - [`storage`]: object storage for images (S3-compatible or a local directory).
//! - [`styles`]: named style presets (prompt templates with negative prompts).
//! - [`worker`]: the glue that turns a claimed message into rows and images.
//! - [`cli`]: the command line.

pub mod api;
pub mod broker;
pub mod cli;
pub mod config;
pub mod db;
pub mod engine;
pub mod job;
pub mod storage;
pub mod styles;
pub mod worker;
