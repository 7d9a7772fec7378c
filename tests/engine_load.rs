//! Loading a model: every missing file or mismatched graph signature is reported with the file
//! (and the input) it concerns; graphs with float16 or older timestep conventions are adapted to.

mod common;

use std::ops::ControlFlow;

use common::onnx::{self, io, Dim};
use sdxl_worker::engine::EngineError;

fn load_err(dir: &std::path::Path) -> EngineError {
    match common::load(dir) {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn a_missing_model_directory_is_named() {
    let err = load_err(std::path::Path::new("/nonexistent/sdxl-model"));
    assert_eq!(err.code(), "model_file_missing");
    assert!(err.to_string().contains("/nonexistent/sdxl-model"), "{err}");
    assert!(!err.is_retryable());
}

#[test]
fn a_missing_component_file_is_named() {
    for (component, file) in [
        ("unet", "model.onnx"),
        ("text_encoder_2", "model.onnx"),
        ("vae_decoder", "model.onnx"),
        ("tokenizer_2", "merges.txt"),
    ] {
        let dir = common::model_copy(&[component]);
        std::fs::remove_file(dir.path().join(component).join(file)).unwrap();
        let err = load_err(dir.path());
        assert_eq!(err.code(), "model_file_missing", "{err}");
        let expected = format!("{component}/{file}");
        assert!(
            err.to_string().contains(&expected),
            "{err} should name {expected}"
        );
    }
    let dir = common::model_copy(&[]);
    std::fs::remove_file(dir.path().join("model_index.json")).unwrap();
    let err = load_err(dir.path());
    assert!(err.to_string().contains("model_index.json"), "{err}");
}

#[test]
fn invalid_json_names_the_file() {
    let dir = common::model_copy(&["scheduler"]);
    std::fs::write(
        dir.path().join("scheduler/scheduler_config.json"),
        "{ not json",
    )
    .unwrap();
    let err = load_err(dir.path());
    assert_eq!(err.code(), "model_config_invalid_json");
    assert!(err.to_string().contains("scheduler_config.json"), "{err}");
}

fn scalar_timestep() -> onnx::Io {
    io("timestep", onnx::FLOAT, &[])
}

#[test]
fn a_missing_unet_input_is_named_with_the_file() {
    let dir = common::model_copy(&["unet"]);
    let model = onnx::fake_unet(&["time_ids"], onnx::FLOAT, scalar_timestep());
    std::fs::write(dir.path().join("unet/model.onnx"), model).unwrap();
    let err = load_err(dir.path());
    assert_eq!(err.code(), "model_input_missing");
    let text = err.to_string();
    assert!(text.contains("unet/model.onnx"), "{text}");
    assert!(text.contains("`time_ids`"), "{text}");
}

#[test]
fn an_integer_sample_input_is_rejected() {
    let dir = common::model_copy(&["unet"]);
    let model = onnx::fake_unet(&[], onnx::INT32, scalar_timestep());
    std::fs::write(dir.path().join("unet/model.onnx"), model).unwrap();
    let err = load_err(dir.path());
    assert_eq!(err.code(), "model_signature_mismatch");
    assert!(err.to_string().contains("`sample`"), "{err}");
}

#[test]
fn embedding_widths_that_disagree_with_the_text_encoders_are_rejected() {
    let dir = common::model_copy(&["unet"]);
    let dims = [
        Dim::Dynamic("batch"),
        Dim::Fixed(4),
        Dim::Dynamic("h"),
        Dim::Dynamic("w"),
    ];
    let model = onnx::identity_model(
        &[
            io("sample", onnx::FLOAT, &dims),
            scalar_timestep(),
            io(
                "encoder_hidden_states",
                onnx::FLOAT,
                &[Dim::Dynamic("b"), Dim::Dynamic("s"), Dim::Fixed(99)],
            ),
            io(
                "text_embeds",
                onnx::FLOAT,
                &[Dim::Dynamic("b"), Dim::Fixed(32)],
            ),
            io("time_ids", onnx::FLOAT, &[Dim::Dynamic("b"), Dim::Fixed(6)]),
        ],
        &[io("out_sample", onnx::FLOAT, &dims)],
        &[("sample", "out_sample")],
    );
    std::fs::write(dir.path().join("unet/model.onnx"), model).unwrap();
    let err = load_err(dir.path());
    assert_eq!(err.code(), "model_signature_mismatch");
    assert!(err.to_string().contains("encoder_hidden_states"), "{err}");
}

/// A float16 UNet with an int64 `[batch]` timestep (an older export's convention) loads and
/// runs: inputs are converted to what the graph declares and outputs back to f32.
#[test]
fn float16_unet_with_integer_timesteps_runs() {
    let dir = common::model_copy(&["unet"]);
    let timestep = io("timestep", onnx::INT64, &[Dim::Dynamic("batch")]);
    let model = onnx::fake_unet(&[], onnx::FLOAT16, timestep);
    std::fs::write(dir.path().join("unet/model.onnx"), model).unwrap();
    let engine = common::load(dir.path()).expect("load");
    let mut request = common::basic_request();
    request.steps = 2;
    let out = engine
        .generate(&request, &mut |_| ControlFlow::Continue(()))
        .expect("generate");
    assert_eq!(out.images.len(), 1);
    assert!(out.latents.iter().all(|v| v.is_finite()));
}
