//! The image-to-image part of the job contract (`init_image`, `strength`): normalization with
//! diffusers' default strength, the engine request, a code for each invalid combination, the
//! image source rules shared with ControlNet entries, and the steps an estimate counts.

use std::path::PathBuf;

use base64::Engine as _;
use sdxl_worker::config::{ControlNetConfig, Limits, ModelsConfig};
use sdxl_worker::engine::controlnet::ControlType;
use sdxl_worker::job::{self, JobRejection, ValidJob};
use serde_json::{json, Value};

const ID: &str = "0b7e4c1a-6d2f-4f8e-9a51-3c2d7e9f1a00";

fn message(patch: Value) -> Value {
    let mut message = json!({ "version": 1, "id": ID, "prompt": "a castle, watercolor" });
    for (k, v) in patch.as_object().unwrap() {
        message[k] = v.clone();
    }
    message
}

fn config() -> ControlNetConfig {
    let mut config = ControlNetConfig::default();
    config
        .models
        .insert(ControlType::Canny, PathBuf::from("/m/canny"));
    config.max_image_bytes = 64;
    config
}

fn validate(patch: Value, config: &ControlNetConfig) -> Result<ValidJob, JobRejection> {
    let body = serde_json::to_vec(&message(patch)).unwrap();
    job::parse_and_validate_with(&body, &Limits::default(), &ModelsConfig::default(), config)
}

fn errors(patch: Value, config: &ControlNetConfig) -> Vec<(String, String)> {
    match validate(patch.clone(), config) {
        Ok(_) => panic!("{patch} was accepted"),
        Err(JobRejection::Invalid { errors, .. }) => {
            errors.into_iter().map(|e| (e.field, e.code)).collect()
        }
        Err(other) => panic!("unreadable: {other}"),
    }
}

fn pair(field: &str, code: &str) -> (String, String) {
    (field.to_owned(), code.to_owned())
}

#[test]
fn an_init_image_gets_the_default_strength_and_reaches_the_steps_count() {
    let job = validate(
        json!({ "init_image": { "image_key": "uploads/a.png" }, "steps": 10 }),
        &config(),
    )
    .unwrap();
    assert_eq!(job.message.strength, Some(0.8));
    assert_eq!(job.img2img_strength(), Some(0.8));
    assert_eq!(job.steps, 10);
    assert_eq!(job.steps_run(), 8, "diffusers runs int(10 * 0.8) steps");
    // The normalized message validates to the same job (what the worker sees).
    let again = job::parse_and_validate_with(
        &job.to_body(),
        &Limits::default(),
        &ModelsConfig::default(),
        &config(),
    )
    .unwrap();
    assert_eq!(again, job);
    assert_eq!(
        job.request_json()["init_image"],
        json!({ "image_key": "uploads/a.png" })
    );

    // int(10 * 0.7) is 7 in float64 although 10 * 0.7 prints as 7.000000000000001.
    let job = validate(
        json!({ "init_image": { "image_base64": "aGVsbG8=" }, "strength": 0.7, "steps": 10 }),
        &config(),
    )
    .unwrap();
    assert_eq!(job.steps_run(), 7);
    let job = validate(
        json!({ "init_image": { "image_key": "k.png" }, "strength": 1 }),
        &config(),
    )
    .unwrap();
    assert_eq!(job.steps_run(), job.steps);

    // Text-to-image jobs have no strength and run all their steps.
    let plain = validate(json!({ "steps": 12 }), &config()).unwrap();
    assert_eq!(plain.message.strength, None);
    assert_eq!(plain.img2img_strength(), None);
    assert_eq!(plain.steps_run(), 12);
    assert!(plain.request_json().get("strength").is_none());
}

#[test]
fn the_engine_request_waits_for_the_worker_to_attach_the_image() {
    let job = validate(
        json!({ "init_image": { "image_key": "uploads/a.png" }, "strength": 0.5 }),
        &config(),
    )
    .unwrap();
    // The image is fetched by the worker; validation leaves the engine's slot empty.
    assert!(job.generate_request().controls.img2img.is_none());
}

#[test]
fn each_invalid_combination_has_its_code() {
    let config = config();
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let key = json!({ "image_key": "uploads/a.png" });
    let cases: Vec<(Value, (String, String))> = vec![
        (
            json!({ "strength": 0.5 }),
            pair("strength", "strength_without_init_image"),
        ),
        (
            json!({ "init_image": key, "strength": 0 }),
            pair("strength", "out_of_range"),
        ),
        (
            json!({ "init_image": key, "strength": 1.01 }),
            pair("strength", "out_of_range"),
        ),
        (
            json!({ "init_image": key, "strength": -0.2 }),
            pair("strength", "out_of_range"),
        ),
        (
            json!({ "init_image": key, "strength": "high" }),
            pair("strength", "wrong_type"),
        ),
        // int(3 * 0.2) = 0 steps would run.
        (
            json!({ "init_image": key, "strength": 0.2, "steps": 3 }),
            pair("strength", "out_of_range"),
        ),
        (
            json!({ "init_image": key, "controlnets": [{ "type": "canny", "image_key": "c.png" }] }),
            pair("init_image", "init_image_with_controlnets"),
        ),
        (
            json!({ "init_image": key, "scheduler": "ddim" }),
            pair("scheduler", "unknown_scheduler"),
        ),
        (
            json!({ "init_image": "uploads/a.png" }),
            pair("init_image", "wrong_type"),
        ),
        (
            json!({ "init_image": {} }),
            pair("init_image", "image_source"),
        ),
        (
            json!({ "init_image": { "image_key": "a.png", "image_base64": b64(b"x") } }),
            pair("init_image", "image_source"),
        ),
        (
            json!({ "init_image": { "image_key": "a.png", "mask": "m.png" } }),
            pair("init_image.mask", "unknown_field"),
        ),
        (
            json!({ "init_image": { "image_key": "../secrets.png" } }),
            pair("init_image.image_key", "invalid_value"),
        ),
        (
            json!({ "init_image": { "image_url": "https://example.com/a.png" } }),
            pair("init_image.image_url", "url_not_allowed"),
        ),
        (
            json!({ "init_image": { "image_base64": b64(&[7u8; 65]) } }),
            pair("init_image.image_base64", "init_image_too_large"),
        ),
        (
            json!({ "init_image": { "image_base64": "not base64 !" } }),
            pair("init_image.image_base64", "invalid_value"),
        ),
    ];
    for (patch, expected) in cases {
        let found = errors(patch.clone(), &config);
        assert!(
            found.contains(&expected),
            "{patch}: expected {expected:?} in {found:?}"
        );
    }
}

#[test]
fn urls_follow_the_deployment_setting_as_for_control_images() {
    let mut config = config();
    config.allow_image_urls = true;
    let job = validate(
        json!({ "init_image": { "image_url": "https://example.com/a.png" } }),
        &config,
    )
    .unwrap();
    assert_eq!(
        job.message.init_image.unwrap().image_url.as_deref(),
        Some("https://example.com/a.png")
    );
    assert_eq!(
        errors(
            json!({ "init_image": { "image_url": "http://example.com/a.png" } }),
            &config
        ),
        [pair("init_image.image_url", "invalid_value")]
    );
    // An empty ControlNet list is no ControlNet: it does not conflict with an init image.
    assert!(validate(
        json!({ "init_image": { "image_key": "a.png" }, "controlnets": [] }),
        &config
    )
    .is_ok());
}

#[test]
fn null_means_absent_for_both_fields() {
    let job = validate(json!({ "init_image": null, "strength": null }), &config()).unwrap();
    assert_eq!(job.message.init_image, None);
    assert_eq!(job.message.strength, None);
}
