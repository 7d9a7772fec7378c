//! Generation behaviour on the tiny pipeline (CPU): request validation, progress and
//! cancellation, several images per request, reproducibility from seeds and injected latents.

mod common;

use std::ops::ControlFlow;

use sdxl_worker::engine::noise::BatchNoise;
use sdxl_worker::engine::{GenerateOutput, GenerateRequest, Progress, SchedulerKind};

fn run(request: &GenerateRequest) -> GenerateOutput {
    common::tiny_engine()
        .generate(request, &mut |_| ControlFlow::Continue(()))
        .expect("generate")
}

fn invalid_field(request: &GenerateRequest) -> String {
    let err = common::tiny_engine()
        .generate(request, &mut |_| ControlFlow::Continue(()))
        .expect_err("request should be rejected");
    assert_eq!(err.code(), "invalid_request", "{err}");
    match err {
        sdxl_worker::engine::EngineError::InvalidRequest { field, .. } => field.to_owned(),
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn invalid_requests_name_the_field() {
    let engine = common::tiny_engine();
    let multiple = engine.model().config.size_multiple;
    let mut r = common::basic_request();
    r.width = 64 + multiple / 2;
    assert_eq!(invalid_field(&r), "width");
    let mut r = common::basic_request();
    r.height = 0;
    assert_eq!(invalid_field(&r), "height");
    let mut r = common::basic_request();
    r.steps = 0;
    assert_eq!(invalid_field(&r), "steps");
    let mut r = common::basic_request();
    r.num_images = 0;
    assert_eq!(invalid_field(&r), "num_images");
    let mut r = common::basic_request();
    r.guidance_scale = f32::NAN;
    assert_eq!(invalid_field(&r), "guidance_scale");
    let mut r = common::basic_request();
    r.initial_latents = Some(vec![0.0; 10]);
    assert_eq!(invalid_field(&r), "initial_latents");
}

#[test]
fn progress_is_reported_after_every_step_and_timings_cover_them() {
    let request = common::basic_request();
    let mut seen = Vec::new();
    let out = common::tiny_engine()
        .generate(&request, &mut |p: Progress| {
            seen.push(p);
            ControlFlow::Continue(())
        })
        .unwrap();
    let total = request.steps;
    let want: Vec<Progress> = (1..=total).map(|step| Progress { step, total }).collect();
    assert_eq!(seen, want);
    let t = &out.timings;
    assert_eq!(t.per_step.len(), total as usize);
    assert_eq!(t.per_step_session_run.len(), total as usize);
    assert!(t.denoising_session_run <= t.denoising);
    assert!(t.per_step.iter().sum::<std::time::Duration>() <= t.denoising);
    assert!(t.text_encoding_session_run <= t.text_encoding);
    assert!(t.vae_decode_session_run <= t.vae_decode);
}

#[test]
fn the_progress_callback_cancels() {
    let mut request = common::basic_request();
    request.steps = 5;
    let mut calls = 0;
    let err = common::tiny_engine()
        .generate(&request, &mut |p: Progress| {
            calls += 1;
            if p.step == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .expect_err("cancelled");
    assert_eq!(err.code(), "cancelled");
    assert!(!err.is_retryable());
    assert_eq!(calls, 2, "no step runs after cancellation");
}

#[test]
fn the_same_seed_gives_the_same_image_and_another_seed_does_not() {
    let request = common::basic_request();
    let a = run(&request);
    let b = run(&request);
    assert_eq!(a.images, b.images);
    assert_eq!(a.latents, b.latents);
    let mut other = request.clone();
    other.seed += 1;
    assert_ne!(run(&other).latents, a.latents);
}

#[test]
fn injected_latents_equal_to_the_seeded_ones_give_the_same_output() {
    // Euler a draws step noise, so this also checks that the noise streams continue after the
    // initial latents whether or not the latents were injected.
    for scheduler in [SchedulerKind::Euler, SchedulerKind::EulerA] {
        let mut request = common::basic_request();
        request.scheduler = scheduler;
        request.num_images = 2;
        let seeded = run(&request);
        let len = seeded.latents.len();
        let mut noise = BatchNoise::from_seeds(&[request.seed, request.seed + 1]);
        request.initial_latents = Some(noise.sample(len));
        let injected = run(&request);
        assert_eq!(seeded.latents, injected.latents, "{scheduler}");
        assert_eq!(seeded.images, injected.images, "{scheduler}");
    }
}

#[test]
fn several_images_match_their_single_image_runs() {
    let mut request = common::basic_request();
    request.num_images = 2;
    let both = run(&request);
    assert_eq!(both.images.len(), 2);
    assert_eq!((both.images[0].seed, both.images[1].seed), (7, 8));
    assert_ne!(both.images[0].rgb, both.images[1].rgb);
    let per_image = both.latents.len() / 2;
    for (i, seed) in [7u64, 8].into_iter().enumerate() {
        let mut single = common::basic_request();
        single.seed = seed;
        let alone = run(&single);
        let batch_part = &both.latents[i * per_image..(i + 1) * per_image];
        let max_diff = batch_part
            .iter()
            .zip(&alone.latents)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            max_diff < 1e-4,
            "image {i} differs from its own run by {max_diff}"
        );
        let img = &both.images[i];
        assert_eq!((img.width, img.height), (64, 64));
        assert_eq!(img.rgb.len(), 64 * 64 * 3);
        let off = img
            .rgb
            .iter()
            .zip(&alone.images[0].rgb)
            .filter(|(a, b)| a.abs_diff(**b) > 1)
            .count();
        assert_eq!(off, 0, "image {i}: {off} values differ by more than 1/255");
    }
}

#[test]
fn an_absent_negative_prompt_differs_from_an_empty_one() {
    // force_zeros_for_empty_prompt: None gives zero embeddings, "" is encoded.
    let mut none = common::basic_request();
    none.negative_prompt = None;
    let mut empty = none.clone();
    empty.negative_prompt = Some(String::new());
    assert_ne!(run(&none).latents, run(&empty).latents);
}

/// The positive and negative prompts share each text encoder's session run (two batch rows);
/// each row must be what that text gives when encoded alone.
#[test]
fn prompts_encoded_together_equal_prompts_encoded_alone() {
    use sdxl_worker::engine::text::{self, PromptTexts};
    let model = common::tiny_engine().model();
    let texts = |prompt, negative_prompt| PromptTexts {
        prompt,
        prompt_2: None,
        negative_prompt,
        negative_prompt_2: None,
    };
    let prompt = "a red fox in the snow, golden hour";
    let both = text::encode_prompts(model, &texts(prompt, Some("blurry")), true).unwrap();
    let alone = |t| {
        text::encode_prompts(model, &texts(t, None), false)
            .unwrap()
            .positive
    };
    assert_eq!(both.positive, alone(prompt));
    assert_eq!(
        both.negative.expect("guidance gives a negative"),
        alone("blurry")
    );
}
