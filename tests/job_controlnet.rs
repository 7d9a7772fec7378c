//! The `controlnets` part of the job contract: each invalid entry gets its field path and code,
//! valid entries are normalized with their defaults, and a deployment without ControlNets
//! rejects them all.

use std::path::PathBuf;

use base64::Engine as _;
use sdxl_worker::config::{ControlNetConfig, Limits, ModelsConfig};
use sdxl_worker::engine::controlnet::ControlType;
use sdxl_worker::job::{self, JobRejection};
use serde_json::{json, Value};

fn config() -> ControlNetConfig {
    let mut config = ControlNetConfig::default();
    config
        .models
        .insert(ControlType::Canny, PathBuf::from("/m/canny"));
    config
        .models
        .insert(ControlType::Depth, PathBuf::from("/m/depth"));
    config.max_image_bytes = 64;
    config
}

fn message(controlnets: Value) -> Value {
    json!({
        "version": 1,
        "id": "5f0c2b9e-8a47-4d1b-b3e6-1f9a2c7d4e11",
        "prompt": "a house",
        "controlnets": controlnets,
    })
}

fn errors(controlnets: Value, config: &ControlNetConfig) -> Vec<(String, String)> {
    let body = serde_json::to_vec(&message(controlnets)).unwrap();
    match job::parse_and_validate_with(&body, &Limits::default(), &ModelsConfig::default(), config)
    {
        Ok(_) => Vec::new(),
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
fn each_bad_entry_names_its_field_and_code() {
    let config = config();
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let cases: Vec<(Value, (String, String))> = vec![
        (
            json!([{"type": "scribble", "image_key": "a.png"}]),
            pair("controlnets[0].type", "unknown_controlnet_type"),
        ),
        (
            json!([{"type": "openpose", "image_key": "a.png"}]),
            pair("controlnets[0].type", "controlnet_unavailable"),
        ),
        (
            json!([{"image_key": "a.png"}]),
            pair("controlnets[0].type", "missing"),
        ),
        (
            json!([{"type": "canny"}]),
            pair("controlnets[0]", "image_source"),
        ),
        (
            json!([{"type": "canny", "image_key": "a.png", "image_base64": b64(b"x")}]),
            pair("controlnets[0]", "image_source"),
        ),
        (
            json!([{"type": "canny", "image_url": "https://example.com/a.png"}]),
            pair("controlnets[0].image_url", "url_not_allowed"),
        ),
        (
            json!([{"type": "canny", "image_base64": b64(&[0u8; 65])}]),
            pair("controlnets[0].image_base64", "control_image_too_large"),
        ),
        (
            json!([{"type": "canny", "image_base64": "%%% not base64"}]),
            pair("controlnets[0].image_base64", "invalid_value"),
        ),
        (
            json!([{"type": "canny", "image_key": "../etc/passwd"}]),
            pair("controlnets[0].image_key", "invalid_value"),
        ),
        (
            json!([{"type": "canny", "image_key": "a.png", "conditioning_scale": 9}]),
            pair("controlnets[0].conditioning_scale", "out_of_range"),
        ),
        (
            json!([{"type": "canny", "image_key": "a.png", "control_guidance_start": 0.6, "control_guidance_end": 0.4}]),
            pair("controlnets[0].control_guidance_end", "out_of_range"),
        ),
        (
            json!([{"type": "depth", "image_key": "a.png", "preprocess": true}]),
            pair("controlnets[0].preprocess", "preprocessor_unavailable"),
        ),
        (
            json!([{"type": "canny", "image_key": "a.png", "canny_low_threshold": 50}]),
            pair("controlnets[0].canny_low_threshold", "invalid_value"),
        ),
        (
            json!([{"type": "canny", "image_key": "a.png", "strength": 1}]),
            pair("controlnets[0].strength", "unknown_field"),
        ),
        (
            json!([{"type": "canny", "image_key": "a.png"}, 7]),
            pair("controlnets[1]", "wrong_type"),
        ),
        (json!({"type": "canny"}), pair("controlnets", "wrong_type")),
        (
            json!([
                {"type": "canny", "image_key": "a.png"},
                {"type": "canny", "image_key": "b.png"},
                {"type": "depth", "image_key": "c.png"},
                {"type": "depth", "image_key": "d.png"},
            ]),
            pair("controlnets", "wrong_length"),
        ),
    ];
    for (controlnets, expected) in cases {
        let found = errors(controlnets.clone(), &config);
        assert!(
            found.contains(&expected),
            "{controlnets}: expected {expected:?} in {found:?}"
        );
    }
}

#[test]
fn valid_entries_are_normalized_with_defaults() {
    let mut config = config();
    config.allow_image_urls = true;
    let body = serde_json::to_vec(&message(json!([
        {"type": "canny", "image_key": "in/photo.jpg", "preprocess": true, "canny_low_threshold": 80},
        {"type": "depth", "image_url": "https://example.com/d.png", "conditioning_scale": 0.5,
         "control_guidance_end": 0.8},
    ])))
    .unwrap();
    let valid =
        job::parse_and_validate_with(&body, &Limits::default(), &ModelsConfig::default(), &config)
            .expect("valid");
    let normalized = valid.request_json();
    assert_eq!(normalized["guess_mode"], json!(false));
    assert_eq!(
        normalized["controlnets"],
        json!([
            {"type": "canny", "image_key": "in/photo.jpg", "conditioning_scale": 1.0,
             "control_guidance_start": 0.0, "control_guidance_end": 1.0, "preprocess": true,
             "canny_low_threshold": 80},
            {"type": "depth", "image_url": "https://example.com/d.png", "conditioning_scale": 0.5,
             "control_guidance_start": 0.0, "control_guidance_end": 0.8, "preprocess": false},
        ])
    );
    let specs = valid.message.controlnets.as_ref().unwrap();
    assert_eq!(specs[0].canny_thresholds(), (80, 200));
    // The normalized message validates again to the same job.
    let again = job::parse_and_validate_with(
        &valid.to_body(),
        &Limits::default(),
        &ModelsConfig::default(),
        &config,
    )
    .unwrap();
    assert_eq!(again.message, valid.message);

    // http:// is refused even where URLs are allowed.
    let found = errors(
        json!([{"type": "depth", "image_url": "http://example.com/d.png"}]),
        &config,
    );
    assert!(found.contains(&pair("controlnets[0].image_url", "invalid_value")));
}

#[test]
fn a_deployment_without_controlnets_rejects_them() {
    let found = errors(
        json!([{"type": "canny", "image_key": "a.png"}]),
        &ControlNetConfig::default(),
    );
    assert_eq!(
        found,
        vec![pair("controlnets[0].type", "controlnet_unavailable")]
    );
    let body = serde_json::to_vec(&json!({
        "version": 1, "id": "5f0c2b9e-8a47-4d1b-b3e6-1f9a2c7d4e11", "prompt": "x", "guess_mode": "yes"
    }))
    .unwrap();
    let err =
        job::parse_and_validate(&body, &Limits::default(), &ModelsConfig::default()).unwrap_err();
    assert!(err.to_string().contains("guess_mode"), "{err}");
}
