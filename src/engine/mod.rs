//! SDXL inference on ONNX Runtime: model loading, tokenization, text encoding, schedulers,
//! the denoising loop, VAE decoding and PNG encoding.
//!
//! This module knows nothing of RabbitMQ, Postgres or object storage: callers hand it a
//! [`GenerateRequest`] and get back images and timings.

pub mod noise;
pub mod scheduler;
