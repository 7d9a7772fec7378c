//! Benchmark of one `generate` on the tiny test pipeline (CPU): the time of each stage and the
//! share of every denoising step spent outside ONNX Runtime's `Session::run` (the engine's own
//! overhead: tensor conversion, guidance, the scheduler step).
//!
//! Run with `cargo bench --bench generate`; `BENCH_RUNS` sets the number of measured runs
//! (default 10) and `BENCH_STEPS` the steps per run (default 20).

use std::ops::ControlFlow;
use std::path::Path;
use std::time::Duration;

use sdxl_worker::engine::{
    Device, Engine, EngineOptions, GenerateRequest, SchedulerKind, SchedulerOverrides, StageTimings,
};

fn env_or(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let runs = env_or("BENCH_RUNS", 10).max(1);
    let steps = env_or("BENCH_STEPS", 20).max(1);
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sdxl");
    let engine = Engine::load(
        &model,
        &EngineOptions {
            device: Device::Cpu,
            intra_threads: Some(1),
            ..EngineOptions::default()
        },
    )
    .expect("load the tiny pipeline");
    let request = GenerateRequest {
        prompt: "a photograph of an astronaut riding a horse".into(),
        prompt_2: None,
        negative_prompt: Some("blurry, low quality".into()),
        negative_prompt_2: None,
        width: 64,
        height: 64,
        steps,
        guidance_scale: 5.0,
        guidance_rescale: 0.0,
        scheduler: SchedulerKind::EulerA,
        scheduler_overrides: SchedulerOverrides::default(),
        seed: 7,
        num_images: 1,
        original_size: None,
        crops_coords_top_left: (0, 0),
        target_size: None,
        initial_latents: None,
        controls: Default::default(),
    };
    let go = || -> StageTimings {
        engine
            .generate(&request, &mut |_| ControlFlow::Continue(()))
            .expect("generate")
            .timings
    };
    go(); // warm-up: first-run allocations inside ONNX Runtime
    let all: Vec<StageTimings> = (0..runs).map(|_| go()).collect();

    let stage = |f: fn(&StageTimings) -> Duration| median(all.iter().map(f).collect());
    let steps_wall: Vec<Duration> = all
        .iter()
        .flat_map(|t| t.per_step.iter().copied())
        .collect();
    let steps_run: Vec<Duration> = all
        .iter()
        .flat_map(|t| t.per_step_session_run.iter().copied())
        .collect();
    let outside: Vec<f64> = steps_wall
        .iter()
        .zip(&steps_run)
        .map(|(w, r)| (w.saturating_sub(*r)).as_secs_f64() / w.as_secs_f64().max(1e-12))
        .collect();
    let mean_outside = outside.iter().sum::<f64>() / outside.len() as f64;
    let max_outside = outside.iter().copied().fold(0.0, f64::max);

    println!("tiny-sdxl on CPU, 64x64, {steps} steps (Euler a, CFG), median of {runs} runs");
    println!(
        "{:<28} {:>12} {:>18}",
        "stage", "wall ms", "Session::run ms"
    );
    println!(
        "{:<28} {:>12.3} {:>18.3}",
        "text encoding",
        ms(stage(|t| t.text_encoding)),
        ms(stage(|t| t.text_encoding_session_run))
    );
    println!(
        "{:<28} {:>12.3} {:>18.3}",
        "denoising (all steps)",
        ms(stage(|t| t.denoising)),
        ms(stage(|t| t.denoising_session_run))
    );
    println!(
        "{:<28} {:>12.3} {:>18.3}",
        "one step",
        ms(median(steps_wall.clone())),
        ms(median(steps_run.clone()))
    );
    println!(
        "{:<28} {:>12.3} {:>18.3}",
        "VAE decode",
        ms(stage(|t| t.vae_decode)),
        ms(stage(|t| t.vae_decode_session_run))
    );
    println!(
        "share of a step outside Session::run: mean {:.1}%, max {:.1}%",
        mean_outside * 100.0,
        max_outside * 100.0
    );
}
