//! ControlNet parity with diffusers: every case of tests/fixtures/golden/controlnet/manifest.json
//! (diffusers' StableDiffusionXLControlNetPipeline on the tiny pipeline and the tiny ControlNets,
//! float32 on CPU) runs through the engine with the golden initial latents: final latents within
//! 1e-3 (max abs), images within 1/255 on at least 99.9% of channel values. Single and multiple
//! ControlNets, guidance windows, guess mode, resized control images and no-CFG runs are covered.
//! The cases also run through the device-binding path (ControlNet residuals combined by the
//! residual mixer straight into the UNet's bound inputs) and the static-shape sessions CUDA graphs
//! use, on the CPU through `bind_io_on_cpu`. Also: a model exported without the residual UNet
//! variant still generates, and the variant fed zero residuals gives the same latents.

mod common;

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::OnceLock;

use sdxl_worker::engine::capture_gate;
use sdxl_worker::engine::control_image::ControlImage;
use sdxl_worker::engine::controlnet::{
    ControlNetPaths, ControlNets, ControlRequest, ControlType, ControlUnit,
};
use sdxl_worker::engine::cuda::CudaOptions;
use sdxl_worker::engine::{
    Device, Engine, EngineOptions, GenerateOutput, GenerateRequest, SchedulerKind,
};

const LATENT_TOL: f32 = 1e-3;
const PIXEL_SHARE: f64 = 0.999;

#[derive(serde::Deserialize)]
struct Manifest {
    cases: Vec<Case>,
    resizes: Vec<Resize>,
}

#[derive(serde::Deserialize)]
struct Resize {
    source: String,
    size: (u32, u32),
    file: String,
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
    negative_prompt: Option<String>,
    width: u32,
    height: u32,
    steps: u32,
    guidance_scale: f32,
    scheduler: String,
    seed: u64,
    num_images: u32,
    guess_mode: bool,
    controlnets: Vec<CaseControlNet>,
}

#[derive(serde::Deserialize)]
struct CaseControlNet {
    #[serde(rename = "type")]
    kind: String,
    image: String,
    conditioning_scale: f32,
    control_guidance_start: f64,
    control_guidance_end: f64,
}

fn golden_dir() -> std::path::PathBuf {
    common::fixtures().join("golden/controlnet")
}

fn controlnets() -> &'static ControlNets {
    static NETS: OnceLock<ControlNets> = OnceLock::new();
    NETS.get_or_init(|| {
        let mut paths = ControlNetPaths::default();
        for kind in [ControlType::Canny, ControlType::Depth] {
            paths.models.insert(
                kind,
                common::fixtures().join("tiny-controlnet").join(kind.id()),
            );
        }
        let options = EngineOptions {
            device: common::test_device(),
            intra_threads: Some(1),
            ..EngineOptions::default()
        };
        ControlNets::load(&paths, common::tiny_engine().model(), &options)
            .expect("load the tiny ControlNets")
    })
}

fn image(path: &Path) -> ControlImage {
    let (w, h, rgb) = common::read_png_rgb(path);
    ControlImage::new(w, h, rgb).expect("control image")
}

fn request_of(case: &Case, dir: &Path) -> GenerateRequest {
    let r = &case.request;
    GenerateRequest {
        prompt: r.prompt.clone(),
        negative_prompt: r.negative_prompt.clone(),
        width: r.width,
        height: r.height,
        steps: r.steps,
        guidance_scale: r.guidance_scale,
        scheduler: SchedulerKind::parse(&r.scheduler).expect("known scheduler"),
        seed: r.seed,
        num_images: r.num_images,
        initial_latents: Some(common::read_f32(&dir.join(&case.init_latents))),
        ..common::basic_request()
    }
}

fn control_of<'a>(case: &Case, dir: &Path, nets: &'a ControlNets) -> ControlRequest<'a> {
    let units = case
        .request
        .controlnets
        .iter()
        .map(|c| ControlUnit {
            net: nets
                .get(ControlType::parse(&c.kind).expect("known type"))
                .expect("loaded ControlNet"),
            image: image(&dir.join(&c.image)),
            conditioning_scale: c.conditioning_scale,
            guidance_start: c.control_guidance_start,
            guidance_end: c.control_guidance_end,
        })
        .collect();
    ControlRequest {
        units,
        guess_mode: case.request.guess_mode,
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

fn run_case(engine: &Engine, case: &Case, dir: &Path) -> Result<String, String> {
    let request = request_of(case, dir);
    let control = control_of(case, dir, controlnets());
    let output = engine
        .generate_with_control(&request, &control, &mut |_| ControlFlow::Continue(()))
        .map_err(|e| format!("engine error: {e}"))?;
    let want = common::read_f32(&dir.join(&case.latents));
    let expected_len: usize = case.latent_shape.iter().product();
    if want.len() != expected_len || output.latents.len() != expected_len {
        return Err(format!(
            "latent length: golden {} engine {}",
            want.len(),
            output.latents.len()
        ));
    }
    let diff = max_diff(&want, &output.latents);
    if diff.is_nan() || diff > LATENT_TOL {
        return Err(format!("latents differ by up to {diff:e}"));
    }
    if output.images.len() != case.images.len() {
        return Err(format!(
            "{} images, golden has {}",
            output.images.len(),
            case.images.len()
        ));
    }
    let mut worst = 1.0f64;
    for (image, file) in output.images.iter().zip(&case.images) {
        let (w, h, pixels) = common::read_png_rgb(&dir.join(file));
        if (w, h) != (image.width, image.height) {
            return Err(format!("{file}: size differs"));
        }
        let close = pixels
            .iter()
            .zip(&image.rgb)
            .filter(|(a, b)| a.abs_diff(**b) <= 1)
            .count();
        let share = close as f64 / pixels.len() as f64;
        worst = worst.min(share);
        if share < PIXEL_SHARE {
            return Err(format!(
                "{file}: only {:.3}% of values within 1/255",
                share * 100.0
            ));
        }
    }
    if output.timings.controlnet.is_zero() {
        return Err("no ControlNet time recorded".to_owned());
    }
    Ok(format!(
        "max latent diff {diff:.2e}, pixels within 1/255 {:.2}%",
        worst * 100.0
    ))
}

#[test]
fn engine_matches_diffusers_controlnet_pipeline() {
    let dir = golden_dir();
    let manifest: Manifest =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    assert!(manifest.cases.len() >= 6);
    let mut failures = Vec::new();
    for case in &manifest.cases {
        match run_case(common::tiny_engine(), case, &dir) {
            Ok(summary) => eprintln!("ok   {:<32} {summary}", case.name),
            Err(why) => {
                eprintln!("FAIL {:<32} {why}", case.name);
                failures.push(format!("{}: {why}", case.name));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The tiny pipeline with its UNet inputs bound to buffers ("device" buffers on the CPU when
/// the tests run there), with or without the static-shape sessions of CUDA graphs.
fn bound_engine(graph: bool) -> Engine {
    let options = EngineOptions {
        device: common::test_device(),
        intra_threads: Some(1),
        bind_io_on_cpu: true,
        cuda: CudaOptions {
            io_binding: true,
            graph,
            graph_shapes: 8,
            ..CudaOptions::default()
        },
    };
    Engine::load(common::tiny_model_dir(), &options).expect("load the tiny pipeline")
}

/// Generate `request` with `control` on `engine`.
fn controlled(
    engine: &Engine,
    request: &GenerateRequest,
    control: &ControlRequest,
) -> GenerateOutput {
    engine
        .generate_with_control(request, control, &mut |_| ControlFlow::Continue(()))
        .expect("generate with ControlNets")
}

/// How a bound engine's run (`what`: "bound" or "static") compares with the host path's: the
/// same session on the CPU computes the same numbers bound or not; static-shape sessions (the
/// UNet's and the ControlNets') are optimized differently, so they agree within `tolerance`.
fn against_host(
    what: &str,
    context: &str,
    expected: &GenerateOutput,
    got: &GenerateOutput,
    tolerance: f32,
) -> Option<String> {
    let diff = max_diff(&expected.latents, &got.latents);
    let exact = what == "bound" && common::test_device() == Device::Cpu;
    ((exact && got.latents != expected.latents) || diff > tolerance)
        .then(|| format!("{what}, {context}: latents differ from the host path by {diff:e}"))
}

/// [`against_host`] for each of `engines` on one request with ControlNets.
fn all_against_host(
    engines: &[(&str, Engine)],
    host: &Engine,
    request: &GenerateRequest,
    control: &ControlRequest,
    context: &str,
) -> Vec<String> {
    let expected = controlled(host, request, control);
    engines
        .iter()
        .filter_map(|(what, engine)| {
            let got = controlled(engine, request, control);
            against_host(what, context, &expected, &got, 2.5e-4)
        })
        .collect()
}

#[test]
fn device_bound_controlnets_match_diffusers_and_the_host_path() {
    let dir = golden_dir();
    let manifest: Manifest =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let host = EngineOptions {
        device: common::test_device(),
        intra_threads: Some(1),
        cuda: CudaOptions {
            io_binding: false,
            ..CudaOptions::default()
        },
        ..EngineOptions::default()
    };
    let host = Engine::load(common::tiny_model_dir(), &host).expect("load the tiny pipeline");
    let engines = [
        ("bound", bound_engine(false)),
        ("static", bound_engine(true)),
    ];
    let mut failures = Vec::new();
    for case in &manifest.cases {
        let request = request_of(case, &dir);
        let control = control_of(case, &dir, controlnets());
        let expected = controlled(&host, &request, &control);
        for (what, engine) in &engines {
            match run_case(engine, case, &dir) {
                Ok(summary) => eprintln!("ok   {what:<7} {:<32} {summary}", case.name),
                Err(why) => failures.push(format!("{what} {}: {why}", case.name)),
            }
            let got = controlled(engine, &request, &control);
            failures.extend(against_host(what, &case.name, &expected, &got, 2.5e-4));
        }
    }
    // Two ControlNets whose guidance windows open and close mid-run, under the Euler scheduler:
    // on bound buffers guidance and the update run on the device and write every ControlNet's
    // input for the next step, active or not.
    let case = manifest
        .cases
        .iter()
        .find(|c| c.request.controlnets.len() > 1 && !c.request.guess_mode)
        .expect("a case with two ControlNets");
    let mut request = request_of(case, &dir);
    request.scheduler = SchedulerKind::parse("euler").expect("known scheduler");
    let control = control_of(case, &dir, controlnets());
    let context = "two ControlNets with windows under Euler";
    failures.extend(all_against_host(
        &engines, &host, &request, &control, context,
    ));
    // Static-shape ControlNet sessions keep their buffers from run to run: a run of an earlier
    // shape with another prompt and an inverted control image computes from its own inputs.
    let case = &manifest.cases[0];
    let mut request = request_of(case, &dir);
    request.prompt = format!("{} at night", request.prompt);
    let mut control = control_of(case, &dir, controlnets());
    for (unit, spec) in control.units.iter_mut().zip(&case.request.controlnets) {
        let (w, h, rgb) = common::read_png_rgb(&dir.join(&spec.image));
        let inverted = rgb.iter().map(|v| 255 - v).collect();
        unit.image = ControlImage::new(w, h, inverted).expect("control image");
    }
    let changed = controlled(&host, &request, &control);
    let original = controlled(
        &host,
        &request_of(case, &dir),
        &control_of(case, &dir, controlnets()),
    );
    assert!(max_diff(&changed.latents, &original.latents) > 1e-3);
    let context = "another control image and prompt at an earlier shape";
    failures.extend(all_against_host(
        &engines, &host, &request, &control, context,
    ));
    // A run without ControlNets after those: the residual buffers the ControlNets wrote into
    // (kept from run to run by the static-shape sessions) read as zeros again.
    let request = request_of(&manifest.cases[0], &dir);
    let plain = |engine: &Engine| {
        engine
            .generate(&request, &mut |_| ControlFlow::Continue(()))
            .expect("generate without ControlNets")
    };
    let expected = plain(&host);
    for (what, engine) in &engines {
        let context = "no ControlNet after ControlNet runs";
        failures.extend(against_host(what, context, &expected, &plain(engine), 1e-4));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Building a static-shape ControlNet session (one that captures a CUDA graph on a GPU) takes
/// the capture gate alone for the rest of the unit of work, as building the UNet's does; runs
/// that build nothing keep it shared (see `sdxl_worker::engine::capture_gate`).
#[test]
fn a_static_controlnet_session_is_built_under_the_capture_gate_alone() {
    let dir = golden_dir();
    let manifest: Manifest =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let case = &manifest.cases[0];
    let request = request_of(case, &dir);
    let control = control_of(case, &dir, controlnets());
    let engine = bound_engine(true);
    let exclusive_after = |run: &dyn Fn()| {
        let _gpu = capture_gate::gpu_work();
        run();
        capture_gate::holds_exclusive()
    };
    let plain = || {
        engine
            .generate(&request, &mut |_| ControlFlow::Continue(()))
            .expect("generate without ControlNets");
    };
    let with_control = || {
        controlled(&engine, &request, &control);
    };
    assert!(
        exclusive_after(&plain),
        "the UNet's static session was built"
    );
    assert!(!exclusive_after(&plain), "nothing new was built");
    // Same UNet shape: only the ControlNets' static sessions are new.
    assert!(
        exclusive_after(&with_control),
        "the ControlNets' static sessions were built"
    );
    assert!(!exclusive_after(&with_control), "nothing new was built");
}

#[test]
fn control_images_resize_as_pillow_lanczos_does() {
    let dir = golden_dir();
    let manifest: Manifest =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    assert!(!manifest.resizes.is_empty());
    for resize in &manifest.resizes {
        let source = image(&dir.join(&resize.source));
        let want = image(&dir.join(&resize.file));
        let (w, h) = resize.size;
        let got = source.resized(w, h);
        assert_eq!((got.width, got.height), (want.width, want.height));
        let off = got
            .rgb
            .iter()
            .zip(&want.rgb)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            off, 0,
            "{} -> {w}x{h}: {off} values differ from Pillow",
            resize.source
        );
    }
}

#[test]
fn control_changes_the_result_and_windows_outside_the_run_change_nothing() {
    let engine = common::tiny_engine();
    let nets = controlnets();
    let dir = golden_dir();
    let request = common::basic_request();
    let plain = engine
        .generate(&request, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    let unit = |scale: f32| ControlUnit {
        net: nets.get(ControlType::Canny).unwrap(),
        image: image(&dir.join("canny_64x64.png")),
        conditioning_scale: scale,
        guidance_start: 0.0,
        guidance_end: 1.0,
    };
    let run = |units| {
        let control = ControlRequest {
            units,
            guess_mode: false,
        };
        engine
            .generate_with_control(&request, &control, &mut |_| ControlFlow::Continue(()))
            .unwrap()
    };
    let zero = run(vec![unit(0.0)]);
    assert_eq!(zero.latents, plain.latents, "scale 0 must be the plain run");
    let controlled = run(vec![unit(1.0)]);
    assert!(max_diff(&controlled.latents, &plain.latents) > 1e-2);

    let bad = ControlRequest {
        units: vec![ControlUnit {
            guidance_start: 0.8,
            guidance_end: 0.2,
            ..unit(1.0)
        }],
        guess_mode: false,
    };
    let err = engine
        .generate_with_control(&request, &bad, &mut |_| ControlFlow::Continue(()))
        .unwrap_err();
    assert_eq!(err.code(), "invalid_request");
    assert!(err.to_string().contains("control_guidance_start"), "{err}");
}

/// A copy of the tiny model without `unet/model_controlnet.onnx` (links to the same files).
fn plain_model_copy() -> tempfile::TempDir {
    let src = common::tiny_model_dir();
    let tmp = tempfile::tempdir().unwrap();
    for entry in walk(&src) {
        let rel = entry.strip_prefix(&src).unwrap();
        if rel.ends_with("model_controlnet.onnx") {
            continue;
        }
        let dest = tmp.path().join(rel);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&entry, &dest).unwrap();
    }
    tmp
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn plain_unet_still_works_and_zero_residuals_are_exact() {
    let copy = plain_model_copy();
    let options = EngineOptions {
        device: common::test_device(),
        intra_threads: Some(1),
        ..EngineOptions::default()
    };
    let plain = Engine::load(copy.path(), &options).expect("plain export loads");
    assert!(plain.model().unet.residuals.is_none());
    let variant = common::tiny_engine();
    let slots = variant.model().unet.residuals.as_ref().expect("variant");
    // The tiny UNet has two down blocks: conv_in, 1 + 1 resnets, one downsampler.
    assert_eq!(slots.down.len(), 4);
    let request = common::basic_request();
    let a = plain
        .generate(&request, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    let b = variant
        .generate(&request, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    let diff = max_diff(&a.latents, &b.latents);
    assert!(diff <= 1e-5, "plain and variant UNets differ by {diff}");

    // A ControlNet cannot be used with a UNet that takes no residuals.
    let paths = ControlNetPaths {
        models: BTreeMap::from([(
            ControlType::Canny,
            common::fixtures().join("tiny-controlnet/canny"),
        )]),
        ..ControlNetPaths::default()
    };
    let err = ControlNets::load(&paths, plain.model(), &options).unwrap_err();
    assert_eq!(err.code(), "model_invalid");
    assert!(err.to_string().contains("model_controlnet.onnx"), "{err}");
}

#[test]
fn an_onnx_preprocessor_turns_a_photo_into_a_control_image() {
    let dir = common::fixtures().join("tiny-preprocessor/depth");
    let mut paths = ControlNetPaths::default();
    paths.preprocessors.insert(ControlType::Depth, dir.clone());
    let options = EngineOptions {
        device: common::test_device(),
        intra_threads: Some(1),
        ..EngineOptions::default()
    };
    let nets = ControlNets::load(&paths, common::tiny_engine().model(), &options)
        .expect("load the preprocessor");
    let preprocessor = nets.preprocessor(ControlType::Depth).expect("loaded");
    assert!(
        nets.get(ControlType::Depth).is_none(),
        "no ControlNet configured"
    );
    let photo = image(&common::fixtures().join("canny/astronaut.png"));
    let got = preprocessor.run(&photo).expect("preprocess");
    let want = image(&dir.join("astronaut.expected.png"));
    assert_eq!((got.width, got.height), (photo.width, photo.height));
    let exact = got
        .rgb
        .iter()
        .zip(&want.rgb)
        .filter(|(a, b)| a == b)
        .count();
    let worst = got
        .rgb
        .iter()
        .zip(&want.rgb)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0);
    assert!(
        worst <= 1 && exact as f64 >= 0.999 * want.rgb.len() as f64,
        "{exact} of {} values equal, worst difference {worst}",
        want.rgb.len()
    );
}
