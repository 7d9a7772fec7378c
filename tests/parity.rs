//! Parity with diffusers: every case of tests/fixtures/golden/pipeline/manifest.json (made by
//! diffusers' StableDiffusionXLPipeline on the tiny pipeline, float32 on CPU) is run through the
//! engine on CPU with the golden initial latents. Final latents must agree within 1e-3 (max
//! abs) and decoded images within 1/255 on at least 99.9% of channel values.

mod common;

use std::ops::ControlFlow;
use std::path::Path;

use sdxl_worker::engine::{GenerateRequest, SchedulerKind, SchedulerOverrides};

const LATENT_TOL: f32 = 1e-3;
const PIXEL_SHARE: f64 = 0.999;

#[derive(serde::Deserialize)]
struct Manifest {
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    request: CaseRequest,
    latent_shape: Vec<usize>,
    init_latents: String,
    latents: String,
    images: Vec<String>,
}

#[derive(serde::Deserialize)]
struct CaseRequest {
    prompt: String,
    prompt_2: Option<String>,
    negative_prompt: Option<String>,
    negative_prompt_2: Option<String>,
    width: u32,
    height: u32,
    steps: u32,
    guidance_scale: f32,
    guidance_rescale: f32,
    scheduler: String,
    scheduler_overrides: SchedulerOverrides,
    seed: u64,
    num_images: u32,
    original_size: Option<(u32, u32)>,
    crops_coords_top_left: Option<(u32, u32)>,
    target_size: Option<(u32, u32)>,
}

fn manifest() -> Manifest {
    let path = common::fixtures().join("golden/pipeline/manifest.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("manifest")).expect("parse manifest")
}

fn request_of(case: &Case, dir: &Path) -> GenerateRequest {
    let r = &case.request;
    GenerateRequest {
        prompt: r.prompt.clone(),
        prompt_2: r.prompt_2.clone(),
        negative_prompt: r.negative_prompt.clone(),
        negative_prompt_2: r.negative_prompt_2.clone(),
        width: r.width,
        height: r.height,
        steps: r.steps,
        guidance_scale: r.guidance_scale,
        guidance_rescale: r.guidance_rescale,
        scheduler: SchedulerKind::parse(&r.scheduler).expect("known scheduler"),
        scheduler_overrides: r.scheduler_overrides.clone(),
        seed: r.seed,
        num_images: r.num_images,
        original_size: r.original_size,
        crops_coords_top_left: r.crops_coords_top_left.unwrap_or((0, 0)),
        target_size: r.target_size,
        initial_latents: Some(common::read_f32(&dir.join(&case.init_latents))),
        controls: Default::default(),
    }
}

/// Run one case; `Err` describes how it differs.
fn run_case(case: &Case, dir: &Path) -> Result<String, String> {
    let engine = common::tiny_engine();
    let request = request_of(case, dir);
    let output = engine
        .generate(&request, &mut |_| ControlFlow::Continue(()))
        .map_err(|e| {
            format!(
                "engine error: {e} ({:?})",
                std::error::Error::source(&e).map(|s| s.to_string())
            )
        })?;
    let want = common::read_f32(&dir.join(&case.latents));
    let expected_len: usize = case.latent_shape.iter().product();
    if want.len() != expected_len || output.latents.len() != expected_len {
        return Err(format!(
            "latent length: golden {} engine {} shape {:?}",
            want.len(),
            output.latents.len(),
            case.latent_shape
        ));
    }
    let max_diff = want
        .iter()
        .zip(&output.latents)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    if max_diff.is_nan() || max_diff > LATENT_TOL {
        return Err(format!("latents differ by up to {max_diff:e}"));
    }
    if output.images.len() != case.images.len() {
        return Err(format!(
            "{} images, golden has {}",
            output.images.len(),
            case.images.len()
        ));
    }
    let mut worst_share = 1.0f64;
    for (image, file) in output.images.iter().zip(&case.images) {
        let (w, h, pixels) = common::read_png_rgb(&dir.join(file));
        if (w, h) != (image.width, image.height) {
            return Err(format!(
                "{file}: {w}x{h} golden, {}x{} engine",
                image.width, image.height
            ));
        }
        let close = pixels
            .iter()
            .zip(&image.rgb)
            .filter(|(a, b)| a.abs_diff(**b) <= 1)
            .count();
        let share = close as f64 / pixels.len() as f64;
        worst_share = worst_share.min(share);
        if share < PIXEL_SHARE {
            return Err(format!(
                "{file}: only {:.3}% of values within 1/255",
                share * 100.0
            ));
        }
    }
    Ok(format!(
        "max latent diff {max_diff:.2e}, pixels within 1/255 {:.2}%",
        worst_share * 100.0
    ))
}

#[test]
fn engine_matches_diffusers_on_every_golden_case() {
    let dir = common::fixtures().join("golden/pipeline");
    let manifest = manifest();
    assert!(!manifest.cases.is_empty());
    let mut failures = Vec::new();
    for case in &manifest.cases {
        match run_case(case, &dir) {
            Ok(summary) => eprintln!("ok   {:<40} {summary}", case.name),
            Err(why) => {
                eprintln!("FAIL {:<40} {why}", case.name);
                failures.push(format!("{}: {why}", case.name));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from diffusers:\n{}",
        failures.len(),
        manifest.cases.len(),
        failures.join("\n")
    );
}
