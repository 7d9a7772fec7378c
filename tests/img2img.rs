//! Image-to-image parity with diffusers: every case of tests/fixtures/golden/img2img/manifest.json
//! (diffusers' StableDiffusionXLImg2ImgPipeline on the tiny pipeline, float32 on CPU, with the
//! project's noise streams; made by onnx/golden_img2img.py) is run through the engine on CPU.
//! Final latents must agree within 1e-3 (max abs) and decoded images within 1/255 on at least
//! 99.9% of channel values, as in tests/parity.rs.

mod common;

use std::ops::ControlFlow;
use std::path::Path;

use sdxl_worker::engine::img2img::{Img2Img, RgbImage};
use sdxl_worker::engine::{GenerateRequest, SchedulerKind};

const LATENT_TOL: f32 = 1e-3;
const PIXEL_SHARE: f64 = 0.999;

#[derive(serde::Deserialize)]
struct Manifest {
    init_image: String,
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    scheduler: String,
    steps: u32,
    strength: f64,
    seed: u64,
    prompt: String,
    negative_prompt: String,
    guidance_scale: f32,
    width: u32,
    height: u32,
    latents: String,
    images: Vec<String>,
}

fn dir() -> std::path::PathBuf {
    common::fixtures().join("golden/img2img")
}

fn manifest() -> Manifest {
    let text = std::fs::read_to_string(dir().join("manifest.json")).expect("manifest");
    serde_json::from_str(&text).expect("parse manifest")
}

fn init_image(path: &Path) -> RgbImage {
    let (width, height, rgb) = common::read_png_rgb(path);
    RgbImage { width, height, rgb }
}

fn request_of(case: &Case, image: &RgbImage) -> GenerateRequest {
    let mut r = common::basic_request();
    r.prompt = case.prompt.clone();
    r.negative_prompt = Some(case.negative_prompt.clone());
    r.width = case.width;
    r.height = case.height;
    r.steps = case.steps;
    r.guidance_scale = case.guidance_scale;
    r.scheduler = SchedulerKind::parse(&case.scheduler).expect("known scheduler");
    r.seed = case.seed;
    r.controls.img2img = Some(Img2Img {
        image: image.clone(),
        strength: case.strength,
    });
    r
}

fn run_case(case: &Case, image: &RgbImage) -> Result<String, String> {
    let engine = common::tiny_engine();
    let request = request_of(case, image);
    let mut evaluations = 0;
    let output = engine
        .generate(&request, &mut |p| {
            evaluations = p.total;
            ControlFlow::Continue(())
        })
        .map_err(|e| format!("engine error: {e}"))?;
    let want = common::read_f32(&dir().join(&case.latents));
    if want.len() != output.latents.len() {
        return Err(format!(
            "{} latents, golden {}",
            output.latents.len(),
            want.len()
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
    let (_, _, pixels) = common::read_png_rgb(&dir().join(&case.images[0]));
    let close = pixels
        .iter()
        .zip(&output.images[0].rgb)
        .filter(|(a, b)| a.abs_diff(**b) <= 1)
        .count();
    let share = close as f64 / pixels.len() as f64;
    if share < PIXEL_SHARE {
        return Err(format!("only {:.3}% of values within 1/255", share * 100.0));
    }
    Ok(format!(
        "{evaluations} evaluations, max latent diff {max_diff:.2e}, pixels within 1/255 {:.2}%",
        share * 100.0
    ))
}

#[test]
fn img2img_matches_diffusers_on_every_golden_case() {
    let manifest = manifest();
    let image = init_image(&dir().join(&manifest.init_image));
    assert!(manifest.cases.len() >= 5);
    let mut failures = Vec::new();
    for case in &manifest.cases {
        match run_case(case, &image) {
            Ok(summary) => eprintln!("ok   {:<34} {summary}", case.name),
            Err(why) => {
                eprintln!("FAIL {:<34} {why}", case.name);
                failures.push(format!("{}: {why}", case.name));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn strength_runs_the_tail_of_the_schedule_and_each_image_has_its_own_stream() {
    let manifest = manifest();
    let image = init_image(&dir().join(&manifest.init_image));
    let case = &manifest.cases[0];
    let engine = common::tiny_engine();
    let mut request = request_of(case, &image);
    request.steps = 4;
    request.controls.img2img.as_mut().unwrap().strength = 0.5;
    let mut seen = Vec::new();
    let one = engine
        .generate(&request, &mut |p| {
            seen.push((p.step, p.total));
            ControlFlow::Continue(())
        })
        .expect("img2img");
    assert_eq!(seen, [(1, 2), (2, 2)], "half of 4 steps run");

    // Image 1 of a two-image job is image 0 of the job seeded one higher.
    let mut two = request.clone();
    two.num_images = 2;
    let both = engine
        .generate(&two, &mut |_| ControlFlow::Continue(()))
        .expect("two images");
    let mut next = request.clone();
    next.seed += 1;
    let single = engine
        .generate(&next, &mut |_| ControlFlow::Continue(()))
        .expect("next seed");
    assert_eq!(both.images[0].rgb, one.images[0].rgb);
    assert_eq!(both.images[1].rgb, single.images[0].rgb);
    assert_ne!(both.images[0].rgb, both.images[1].rgb);
}

#[test]
fn bad_img2img_requests_are_invalid() {
    let manifest = manifest();
    let image = init_image(&dir().join(&manifest.init_image));
    let engine = common::tiny_engine();
    let base = request_of(&manifest.cases[0], &image);
    let run = |r: &GenerateRequest| {
        engine
            .generate(r, &mut |_| ControlFlow::Continue(()))
            .expect_err("invalid")
    };
    let mut wrong_size = base.clone();
    wrong_size.width = 128;
    let err = run(&wrong_size);
    assert_eq!(err.code(), "invalid_request");
    assert!(err.to_string().contains("init_image"), "{err}");

    let mut too_weak = base.clone();
    too_weak.steps = 2;
    too_weak.controls.img2img.as_mut().unwrap().strength = 0.2;
    assert!(run(&too_weak).to_string().contains("strength"));

    let mut ddim = base.clone();
    ddim.scheduler = SchedulerKind::Ddim;
    assert!(run(&ddim).to_string().contains("ddim"));
}
