//! The engine on a GPU: one SDXL text-to-image run (30 Euler steps at 1024x1024 by default)
//! under several CUDA execution provider settings, measured one after the other in one process.
//!
//! ```text
//! BENCH_MODEL=/path/to/export cargo bench --bench gpu_engine
//! ```
//!
//! Environment:
//! - `BENCH_MODEL`: the model directory (Optimum layout; the fused float16 UNet from
//!   `onnx/export_sdxl.py --optimize` or `bench/gpu/optimize_unet.py`). Required.
//! - `BENCH_DEVICE`: `cuda:N` (default `cuda:0`).
//! - `BENCH_VARIANTS`: comma-separated settings to compare, each a `+`-joined list of changes
//!   from the defaults of [`CudaOptions`]: `default`, `host_io` (no device binding), `nhwc`,
//!   `graph` (CUDA graphs: the UNet's, and each ControlNet's unless `cn_nograph`), `host_step` (guidance and the Euler update on the host;
//!   `device_step`, the default, runs them on the device),
//!   `flash`, `efficient`, `cudnn_flash`, `math` (attention kernel),
//!   `heuristic` (convolution search), `pow2_arena`, and `tf32` (TF32 math in the float32
//!   graphs: text encoders and VAE). Default: `host_io,default,nhwc,graph`.
//! - `BENCH_IMAGES`: images per request (default 1).
//! - `BENCH_JOBS`: requests per run (default 1). Above 1 they differ in prompt and seed and run
//!   as one dynamic batch ([`Engine::generate_batch`]), as the worker runs compatible jobs.
//! - `BENCH_STEPS` (default 30), `BENCH_SIZE` (default 1024), `BENCH_RUNS` (default 3).
//! - `BENCH_OUT`: where to write the JSON report (default: stdout only).
//! - `BENCH_CONTROLNET`: a ControlNet export directory (`onnx/export_controlnet.py`); each run
//!   then applies it (as a canny ControlNet, conditioning scale 1, on a synthetic edge image)
//!   to its one request. The model needs `unet/model_controlnet.onnx`. A step's host time
//!   (`unet_step_host_ms`) then includes the ControlNet evaluations (`controlnet_ms` per run).
//!
//! Under `cargo test` it runs, on the tiny model on the CPU for each of `host_io`, `default`,
//! `host_step` and `graph` (all but the first through device-bound buffers on the CPU), two jobs of 2 steps as one batch, one job alone, and one with the tiny canny
//! ControlNet, and fails if any of them fails.
//!
//! For each variant: load time, the first run (cuDNN's algorithm search, graph capture), then
//! `BENCH_RUNS` runs: wall time of the run, median time of one denoising step (wall, inside
//! ONNX Runtime, copying between host and device, and on the host), text encoding, VAE decoding, GPU busy ratio (NVML utilization sampled every
//! 20 ms during the runs) and GPU memory in use after the runs.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvml_wrapper::Nvml;
use sdxl_worker::engine::control_image::ControlImage;
use sdxl_worker::engine::controlnet::{
    ControlNetPaths, ControlNets, ControlRequest, ControlType, ControlUnit,
};
use sdxl_worker::engine::cuda::{AttentionKernel, ConvSearch, CudaOptions};
use sdxl_worker::engine::{
    Device, Engine, EngineOptions, GenerateRequest, SchedulerKind, SchedulerOverrides, StageTimings,
};
use serde_json::{json, Value};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn variant(spec: &str) -> Result<CudaOptions, String> {
    let mut o = CudaOptions::default();
    for part in spec.split('+').map(str::trim) {
        match part {
            "default" => {}
            "tf32" => o.tf32 = true,
            "host_io" => o.io_binding = false,
            "nhwc" => o.prefer_nhwc = true,
            "graph" => o.graph = true,
            "cn_nograph" => o.controlnet_graph = false,
            "device_step" => o.device_step = true,
            "host_step" => o.device_step = false,
            "heuristic" => o.conv_search = ConvSearch::Heuristic,
            "pow2_arena" => o.arena_same_as_requested = false,
            other => o.attention = other.parse::<AttentionKernel>()?,
        }
    }
    Ok(o)
}

/// Samples the GPU's utilization while a run goes on.
struct BusySampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Vec<u32>>,
}

impl BusySampler {
    fn start(nvml: Option<Arc<Nvml>>, index: u32) -> Option<Self> {
        let nvml = nvml?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let mut samples = Vec::new();
            let Ok(device) = nvml.device_by_index(index) else {
                return samples;
            };
            while !flag.load(Ordering::Relaxed) {
                if let Ok(u) = device.utilization_rates() {
                    samples.push(u.gpu);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            samples
        });
        Some(Self { stop, handle })
    }

    fn finish(self) -> Option<f64> {
        self.stop.store(true, Ordering::Relaxed);
        let samples = self.handle.join().ok()?;
        (!samples.is_empty())
            .then(|| samples.iter().map(|&s| f64::from(s)).sum::<f64>() / samples.len() as f64)
    }
}

const PROMPTS: [&str; 4] = [
    "a photograph of an astronaut riding a horse on the moon, detailed, sharp focus",
    "a lighthouse on a cliff above a stormy sea at dusk, oil painting",
    "a bowl of ramen with a soft egg, studio lighting, food photography",
    "an isometric drawing of a small wooden cabin in a pine forest",
];

fn request(images: u32, steps: u32, size: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: PROMPTS[0].into(),
        prompt_2: None,
        negative_prompt: Some("blurry, low quality".into()),
        negative_prompt_2: None,
        width: size,
        height: size,
        steps,
        guidance_scale: 5.0,
        guidance_rescale: 0.0,
        scheduler: SchedulerKind::Euler,
        scheduler_overrides: SchedulerOverrides::default(),
        seed: 1,
        num_images: images,
        original_size: None,
        crops_coords_top_left: (0, 0),
        target_size: None,
        initial_latents: None,
        controls: Default::default(),
    }
}

/// `jobs` requests like `base`, each with its own prompt and seed.
fn jobs(base: &GenerateRequest, jobs: usize) -> Vec<GenerateRequest> {
    (0..jobs)
        .map(|j| GenerateRequest {
            prompt: PROMPTS[j % PROMPTS.len()].into(),
            seed: base.seed + j as u64,
            ..base.clone()
        })
        .collect()
}

/// A control image of `size`×`size`: white rings and spokes on black, like an edge map.
fn edge_image(size: u32) -> ControlImage {
    let c = f64::from(size) / 2.0;
    let mut rgb = Vec::with_capacity((size * size * 3) as usize);
    for y in 0..size {
        for x in 0..size {
            let (dx, dy) = (f64::from(x) - c, f64::from(y) - c);
            let ring = (dx.hypot(dy) / (c / 6.0)).fract() < 0.04;
            let spoke = (dy.atan2(dx).to_degrees() / 30.0).fract().abs() < 0.02;
            let v = if ring || spoke { 255 } else { 0 };
            rgb.extend([v, v, v]);
        }
    }
    ControlImage::new(size, size, rgb).expect("a valid control image")
}

fn run_variant(
    model: &PathBuf,
    device: Device,
    spec: &str,
    requests: &[GenerateRequest],
    controlnet: Option<&PathBuf>,
    runs: usize,
    nvml: Option<Arc<Nvml>>,
) -> Result<Value, String> {
    let cuda = variant(spec)?;
    let request = &requests[0];
    let images: u32 = requests.iter().map(|r| r.num_images).sum();
    let index = match device {
        Device::Cuda { index } => index,
        Device::Cpu => 0,
    };
    let used = |nvml: &Option<Arc<Nvml>>| {
        nvml.as_ref()
            .and_then(|n| n.device_by_index(index).ok())
            .and_then(|d| d.memory_info().ok())
            .map(|m| m.used as f64 / f64::from(1u32 << 20))
    };
    let before = used(&nvml);
    let options = EngineOptions {
        device,
        cuda,
        // On the CPU (the smoke run), take the same device-binding path as CUDA does.
        bind_io_on_cpu: device == Device::Cpu && cuda.io_binding,
        ..EngineOptions::default()
    };
    let started = Instant::now();
    let engine = Engine::load(model, &options).map_err(|e| format!("load: {e}"))?;
    let nets = match controlnet {
        Some(dir) => {
            if requests.len() != 1 {
                return Err("BENCH_CONTROLNET runs one request at a time (BENCH_JOBS=1)".into());
            }
            let mut paths = ControlNetPaths::default();
            paths.models.insert(ControlType::Canny, dir.clone());
            Some(
                ControlNets::load(&paths, engine.model(), &options)
                    .map_err(|e| format!("ControlNet: {e}"))?,
            )
        }
        None => None,
    };
    let control = nets.as_ref().map(|nets| ControlRequest {
        units: vec![ControlUnit {
            net: nets.get(ControlType::Canny).expect("loaded above"),
            image: edge_image(request.width.max(request.height)),
            conditioning_scale: 1.0,
            guidance_start: 0.0,
            guidance_end: 1.0,
        }],
        guess_mode: false,
    });
    let load = started.elapsed();
    let go = || -> Result<(Duration, StageTimings), String> {
        let started = Instant::now();
        let timings = if let Some(control) = &control {
            engine
                .generate_with_control(request, control, &mut |_| ControlFlow::Continue(()))
                .map_err(|e| format!("generate_with_control: {e}"))?
                .timings
        } else if requests.len() == 1 {
            engine
                .generate(request, &mut |_| ControlFlow::Continue(()))
                .map_err(|e| format!("generate: {e}"))?
                .timings
        } else {
            let refs: Vec<&GenerateRequest> = requests.iter().collect();
            let mut outputs = engine.generate_batch(&refs, &mut |_, _| ControlFlow::Continue(()));
            let mut total = outputs
                .remove(0)
                .map_err(|e| format!("generate_batch: {e}"))?;
            // Every job of the batch has the batch's step times; decoding is per job, and so
            // is prompt encoding unless the prompts were encoded together (that time counts once).
            let mut shared_counted = total.timings.text_encoding_shared;
            for other in outputs {
                let t = other.map_err(|e| format!("generate_batch: {e}"))?.timings;
                total.timings.vae_decode += t.vae_decode;
                total.timings.vae_decode_session_run += t.vae_decode_session_run;
                if !t.text_encoding_shared || !shared_counted {
                    total.timings.text_encoding += t.text_encoding;
                    total.timings.text_encoding_session_run += t.text_encoding_session_run;
                }
                shared_counted |= t.text_encoding_shared;
            }
            total.timings
        };
        Ok((started.elapsed(), timings))
    };
    let (first, _) = go()?;
    let sampler = BusySampler::start(nvml.clone(), index);
    let mut all = Vec::new();
    for _ in 0..runs {
        all.push(go()?);
    }
    let busy = sampler.and_then(BusySampler::finish);
    let after = used(&nvml);
    let walls: Vec<Duration> = all.iter().map(|(w, _)| *w).collect();
    let steps_wall: Vec<Duration> = all
        .iter()
        .flat_map(|(_, t)| t.per_step.iter().copied())
        .collect();
    let steps_run: Vec<Duration> = all
        .iter()
        .flat_map(|(_, t)| t.per_step_session_run.iter().copied())
        .collect();
    let steps_copy: Vec<Duration> = all
        .iter()
        .flat_map(|(_, t)| t.per_step_copies.iter().copied())
        .collect();
    // What a step spends on the host: its wall time less ONNX Runtime and the copies.
    let steps_host: Vec<Duration> = all
        .iter()
        .flat_map(|(_, t)| {
            t.per_step
                .iter()
                .zip(&t.per_step_session_run)
                .zip(&t.per_step_copies)
                .map(|((w, r), c)| w.saturating_sub(*r + *c))
        })
        .collect();
    let stage = |f: fn(&StageTimings) -> Duration| median(all.iter().map(|(_, t)| f(t)).collect());
    let wall = median(walls.clone());
    let step = median(steps_wall);
    let vae = stage(|t| t.vae_decode);
    let bound = 1.10 * (f64::from(request.steps) * ms(step) + ms(vae));
    Ok(json!({
        "variant": spec,
        "cuda": cuda,
        "jobs": requests.len(),
        "images": images,
        "steps": request.steps,
        "size": request.width,
        "load_s": load.as_secs_f64(),
        "first_run_s": first.as_secs_f64(),
        "run_s": wall.as_secs_f64(),
        "runs_s": walls.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
        "images_per_s": f64::from(images) / wall.as_secs_f64(),
        "unet_step_ms": ms(step),
        "unet_step_session_run_ms": ms(median(steps_run)),
        "unet_step_copy_ms": ms(median(steps_copy)),
        "unet_step_host_ms": ms(median(steps_host)),
        // Steps whose guidance and update ran on the device, over all runs and jobs.
        "device_steps": all.iter().map(|(_, t)| t.device_steps).sum::<usize>(),
        "controlnet": controlnet,
        "controlnet_ms": ms(stage(|t| t.controlnet)),
        "text_encoding_ms": ms(stage(|t| t.text_encoding)),
        "text_encoding_session_run_ms": ms(stage(|t| t.text_encoding_session_run)),
        "text_encoding_shared": all.iter().any(|(_, t)| t.text_encoding_shared),
        "denoising_ms": ms(stage(|t| t.denoising)),
        "vae_decode_ms": ms(vae),
        // The rest of `vae_decode_ms` is host work: the latents' scaling, the conversion to
        // 8-bit RGB and the finite-values check.
        "vae_decode_session_run_ms": ms(stage(|t| t.vae_decode_session_run)),
        "target_1_10_x_parts_ms": bound,
        "within_1_10_x_parts": ms(wall) <= bound,
        "gpu_busy_percent": busy,
        "gpu_memory_used_mib": after,
        "gpu_memory_before_load_mib": before,
    }))
}

fn main() {
    // Under `cargo test` (no `--bench`), a smoke run on the tiny model on the CPU, through the
    // device-binding and static-shape paths, that fails if any variant fails.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let model = if smoke {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sdxl")
    } else if let Some(model) = std::env::var_os("BENCH_MODEL") {
        PathBuf::from(model)
    } else {
        eprintln!(
            "BENCH_MODEL (a model directory) is required; see the header of benches/gpu_engine.rs"
        );
        std::process::exit(2);
    };
    let device: Device = if smoke {
        Device::Cpu
    } else {
        std::env::var("BENCH_DEVICE")
            .unwrap_or_else(|_| "cuda:0".into())
            .parse()
            .unwrap_or_else(|e| {
                eprintln!("BENCH_DEVICE: {e}");
                std::process::exit(2)
            })
    };
    let variants = if smoke {
        "host_io,default,host_step,graph".to_owned()
    } else {
        std::env::var("BENCH_VARIANTS").unwrap_or_else(|_| "host_io,default,nhwc,graph".into())
    };
    let requests = if smoke {
        // Two jobs, so that the smoke run goes through the dynamic batch too.
        jobs(&request(1, 2, 64), 2)
    } else {
        let base = request(
            env_or("BENCH_IMAGES", 1),
            env_or("BENCH_STEPS", 30),
            env_or("BENCH_SIZE", 1024),
        );
        jobs(&base, env_or("BENCH_JOBS", 1usize).max(1))
    };
    let runs = if smoke {
        1
    } else {
        env_or("BENCH_RUNS", 3usize).max(1)
    };
    let controlnet = if smoke {
        None
    } else {
        std::env::var_os("BENCH_CONTROLNET").map(PathBuf::from)
    };
    // The smoke run also takes each variant through a ControlNet run.
    let smoke_controlnet =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-controlnet/canny");
    let smoke_request = [request(1, 2, 64)];
    let nvml = sdxl_worker::worker::devices::nvml();
    let mut results = Vec::new();
    for spec in variants.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let mut cases = vec![(&requests[..], controlnet.as_ref())];
        if smoke {
            cases.push((&smoke_request[..], None));
            cases.push((&smoke_request[..], Some(&smoke_controlnet)));
        }
        for (requests, controlnet) in cases {
            let result = match run_variant(
                &model,
                device,
                spec,
                requests,
                controlnet,
                runs,
                nvml.clone(),
            ) {
                Ok(v) => v,
                Err(e) => json!({ "variant": spec, "error": e }),
            };
            println!("{result}");
            if smoke && result.get("error").is_some() {
                eprintln!("variant {spec} failed");
                std::process::exit(1);
            }
            results.push(result);
        }
    }
    let report = json!({
        "model": model,
        "device": device.to_string(),
        "gpu": nvml.as_ref().and_then(|n| n.device_by_index(0).ok()).and_then(|d| d.name().ok()),
        "onnxruntime": sdxl_worker::engine::runtime::ORT_VERSION,
        "results": results,
    });
    if let Ok(path) = std::env::var("BENCH_OUT") {
        if let Err(e) = std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap()) {
            eprintln!("writing {path}: {e}");
            std::process::exit(1);
        }
    }
}
