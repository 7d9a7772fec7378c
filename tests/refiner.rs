//! Base → refiner parity with diffusers: every case of
//! tests/fixtures/golden/refiner/manifest.json (diffusers' StableDiffusionXLPipeline with
//! `denoising_end` handing its latents to the refiner StableDiffusionXLImg2ImgPipeline with
//! `denoising_start`, float32 on CPU, with the project's noise streams; made by
//! onnx/make_refiner_goldens.py) is run through `Engine::generate_refined` on the tiny base and
//! the tiny refiner. Final latents must agree within 1e-3 (max abs) and decoded images within
//! 1/255 on at least 99.9% of channel values, as in tests/parity.rs.

mod common;

use std::ops::ControlFlow;
use std::sync::OnceLock;

use sdxl_worker::engine::refiner::{AestheticScores, Refine};
use sdxl_worker::engine::{Engine, GenerateRequest, SchedulerKind};

const LATENT_TOL: f32 = 1e-3;
const PIXEL_SHARE: f64 = 0.999;

#[derive(serde::Deserialize)]
struct Manifest {
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    scheduler: String,
    steps: u32,
    handoff: f64,
    seed: u64,
    prompt: String,
    negative_prompt: Option<String>,
    guidance_scale: f32,
    width: u32,
    height: u32,
    num_images: u32,
    aesthetic_score: f32,
    negative_aesthetic_score: f32,
    base_timesteps: Vec<f64>,
    refiner_timesteps: Vec<f64>,
    latents: String,
    images: Vec<String>,
}

fn dir() -> std::path::PathBuf {
    common::fixtures().join("golden/refiner")
}

fn manifest() -> Manifest {
    let text = std::fs::read_to_string(dir().join("manifest.json")).expect("manifest");
    serde_json::from_str(&text).expect("parse manifest")
}

fn refiner() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        common::load(&common::fixtures().join("tiny-refiner")).expect("load the tiny refiner")
    })
}

fn request_of(case: &Case) -> (GenerateRequest, Refine) {
    let mut r = common::basic_request();
    r.prompt = case.prompt.clone();
    r.negative_prompt = case.negative_prompt.clone();
    r.width = case.width;
    r.height = case.height;
    r.steps = case.steps;
    r.guidance_scale = case.guidance_scale;
    r.scheduler = SchedulerKind::parse(&case.scheduler).expect("known scheduler");
    r.seed = case.seed;
    r.num_images = case.num_images;
    let refine = Refine {
        handoff: case.handoff,
        aesthetic: AestheticScores {
            positive: case.aesthetic_score,
            negative: case.negative_aesthetic_score,
        },
    };
    (r, refine)
}

fn run_case(case: &Case) -> Result<(f32, String), String> {
    let (request, refine) = request_of(case);
    let mut seen = Vec::new();
    let output = common::tiny_engine()
        .generate_refined(refiner(), &request, &refine, &mut |p| {
            seen.push((p.step, p.total));
            ControlFlow::Continue(())
        })
        .map_err(|e| format!("engine error: {e}"))?;
    let evaluations = (case.base_timesteps.len() + case.refiner_timesteps.len()) as u32;
    let expected: Vec<(u32, u32)> = (1..=evaluations).map(|s| (s, evaluations)).collect();
    if seen != expected {
        return Err(format!("progress {seen:?}, expected {expected:?}"));
    }
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
    if output.images.len() != case.images.len() {
        return Err(format!(
            "{} images, golden {}",
            output.images.len(),
            case.images.len()
        ));
    }
    let mut worst_share = 1.0f64;
    for (file, image) in case.images.iter().zip(&output.images) {
        let (_, _, pixels) = common::read_png_rgb(&dir().join(file));
        let close = pixels
            .iter()
            .zip(&image.rgb)
            .filter(|(a, b)| a.abs_diff(**b) <= 1)
            .count();
        let share = close as f64 / pixels.len() as f64;
        if share < PIXEL_SHARE {
            return Err(format!(
                "{file}: only {:.3}% of values within 1/255",
                share * 100.0
            ));
        }
        worst_share = worst_share.min(share);
    }
    let t = &output.timings;
    if t.refiner_denoising.is_zero() || t.refiner_text_encoding.is_zero() {
        return Err(format!("refiner stages not timed: {t:?}"));
    }
    if t.per_step.len() != evaluations as usize {
        return Err(format!(
            "{} step timings for {evaluations} steps",
            t.per_step.len()
        ));
    }
    Ok((
        max_diff,
        format!(
            "{} + {} evaluations, max latent diff {max_diff:.2e}, pixels within 1/255 {:.2}%",
            case.base_timesteps.len(),
            case.refiner_timesteps.len(),
            worst_share * 100.0
        ),
    ))
}

#[test]
fn refined_runs_match_diffusers_on_every_golden_case() {
    let manifest = manifest();
    assert!(manifest.cases.len() >= 4);
    let mut failures = Vec::new();
    let mut worst = 0.0f32;
    for case in &manifest.cases {
        match run_case(case) {
            Ok((diff, summary)) => {
                worst = worst.max(diff);
                eprintln!("ok   {:<34} {summary}", case.name);
            }
            Err(why) => {
                eprintln!("FAIL {:<34} {why}", case.name);
                failures.push(format!("{}: {why}", case.name));
            }
        }
    }
    eprintln!("worst latent difference over all cases: {worst:.2e}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_refiner_loads_without_a_first_encoder() {
    let model = refiner().model();
    assert!(model.text_encoder.is_none());
    assert!(model.tokenizer.is_none());
    assert!(model.config.requires_aesthetics_score);
    assert_eq!(model.unet.time_ids_width, 5);
    assert_eq!(common::tiny_engine().model().unet.time_ids_width, 6);
    // Its cross-attention width is text_encoder_2's hidden size alone.
    assert_eq!(
        model.unet.encoder_hidden_states.fixed_dim(2),
        model.text_encoder_2.hidden_width()
    );
}

#[test]
fn the_refiner_changes_the_base_image_and_each_image_keeps_its_stream() {
    let manifest = manifest();
    let case = &manifest.cases[0];
    let (request, refine) = request_of(case);
    let base = common::tiny_engine();
    let refined = base
        .generate_refined(refiner(), &request, &refine, &mut |_| {
            ControlFlow::Continue(())
        })
        .expect("refined");
    let plain = base
        .generate(&request, &mut |_| ControlFlow::Continue(()))
        .expect("base alone");
    assert_ne!(refined.images[0].rgb, plain.images[0].rgb);

    // Image 1 of a two-image refined job is image 0 of the job seeded one higher.
    let mut two = request.clone();
    two.num_images = 2;
    let both = base
        .generate_refined(refiner(), &two, &refine, &mut |_| ControlFlow::Continue(()))
        .expect("two images");
    let mut next = request.clone();
    next.seed += 1;
    let single = base
        .generate_refined(
            refiner(),
            &next,
            &refine,
            &mut |_| ControlFlow::Continue(()),
        )
        .expect("next seed");
    assert_eq!(both.images[0].rgb, refined.images[0].rgb);
    assert_eq!(both.images[1].rgb, single.images[0].rgb);
}

#[test]
fn bad_handoffs_are_invalid_requests() {
    let manifest = manifest();
    let (request, _) = request_of(&manifest.cases[0]);
    let run = |handoff: f64| {
        let refine = Refine {
            handoff,
            ..Refine::default()
        };
        common::tiny_engine()
            .generate_refined(refiner(), &request, &refine, &mut |_| {
                ControlFlow::Continue(())
            })
            .expect_err("invalid")
    };
    for handoff in [0.0, 1.0, 1.5, -0.2, f64::NAN] {
        let err = run(handoff);
        assert_eq!(err.code(), "invalid_request", "{handoff}");
        assert!(err.to_string().contains("refiner.handoff"), "{err}");
    }
    // 10 leading steps start at timestep 901: a hand-off at 0.05 (cut-off 950) leaves the base
    // nothing; at 0.995 (cut-off 5) the refiner's lowest timestep, 99, is above the cut-off.
    let err = run(0.05);
    assert!(err.to_string().contains("the base runs no step"), "{err}");
    let err = run(0.995);
    assert!(
        err.to_string().contains("the refiner runs no step"),
        "{err}"
    );
}

#[test]
fn cancelling_during_the_refiner_stage_stops_the_run() {
    let manifest = manifest();
    let case = &manifest.cases[0];
    let (request, refine) = request_of(case);
    let base_steps = case.base_timesteps.len() as u32;
    let mut last = 0;
    let err = common::tiny_engine()
        .generate_refined(refiner(), &request, &refine, &mut |p| {
            last = p.step;
            if p.step > base_steps {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .expect_err("cancelled");
    assert_eq!(err.code(), "cancelled");
    assert_eq!(last, base_steps + 1);
}
