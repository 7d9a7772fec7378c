//! The job message contract: validation codes for every kind of invalid message; in
//! [`schema`], the committed JSON Schema against the types and the validator, and the schema's
//! examples.

mod schema;

use sdxl_worker::config::{Limits, ModelsConfig};
use sdxl_worker::engine::{SchedulerKind, TimestepSpacing};
use sdxl_worker::job::{parse_and_validate, validate_message, JobRejection, ValidJob};
use serde_json::{json, Value};

const ID: &str = "7d444840-9dc0-11d1-b245-5ffdce74fad2";

pub(crate) fn base() -> Value {
    json!({ "version": 1, "id": ID, "prompt": "a cat wearing a hat" })
}

pub(crate) fn with(patch: Value) -> Value {
    let mut message = base();
    for (k, v) in patch.as_object().unwrap() {
        message[k] = v.clone();
    }
    message
}

pub(crate) fn check(message: &Value) -> Result<ValidJob, JobRejection> {
    check_with(message, &Limits::default())
}

fn check_with(message: &Value, limits: &Limits) -> Result<ValidJob, JobRejection> {
    let body = serde_json::to_vec(message).unwrap();
    parse_and_validate(&body, limits, &ModelsConfig::default())
}

/// The (field, code) pairs of an invalid message.
fn codes(message: &Value) -> Vec<(String, String)> {
    codes_with(message, &Limits::default())
}

fn codes_with(message: &Value, limits: &Limits) -> Vec<(String, String)> {
    codes_with_models(message, limits, &ModelsConfig::default())
}

fn codes_with_models(
    message: &Value,
    limits: &Limits,
    models: &ModelsConfig,
) -> Vec<(String, String)> {
    let body = serde_json::to_vec(message).unwrap();
    match parse_and_validate(&body, limits, models) {
        Err(JobRejection::Invalid { id, errors }) => {
            assert_eq!(id.to_string(), ID);
            errors.into_iter().map(|e| (e.field, e.code)).collect()
        }
        other => panic!("expected Invalid for {message}, got {other:?}"),
    }
}

fn pair(field: &str, code: &str) -> Vec<(String, String)> {
    vec![(field.to_owned(), code.to_owned())]
}

fn unreadable(body: &[u8]) -> &'static str {
    match parse_and_validate(body, &Limits::default(), &ModelsConfig::default()) {
        Err(JobRejection::Unreadable { code, .. }) => code,
        other => panic!(
            "expected Unreadable for {:?}, got {other:?}",
            String::from_utf8_lossy(body)
        ),
    }
}

#[test]
fn a_minimal_message_gets_every_default() {
    let job = check(&base()).unwrap();
    assert_eq!(job.id.to_string(), ID);
    assert_eq!(job.model, "tiny-sdxl");
    // tiny-sdxl's configured default size; models without one get 1024x1024.
    assert_eq!((job.width, job.height, job.steps), (64, 64, 30));
    assert_eq!((job.num_images, job.priority), (1, 0));
    assert_eq!(job.scheduler, SchedulerKind::Euler);
    assert!(job.seed < 1 << 32, "drawn seeds are 32-bit");
    let m = &job.message;
    assert_eq!(m.seed, Some(job.seed), "the drawn seed is recorded");
    assert_eq!(m.guidance_scale, Some(5.0));
    assert_eq!(m.guidance_rescale, Some(0.0));
    assert_eq!(m.scheduler.as_deref(), Some("euler"));
    assert_eq!(m.model.as_deref(), Some("tiny-sdxl"));
    assert_eq!(m.prompt_weighting, Some(true));
    assert!(job.generate_request().controls.prompt_weighting);
    assert!(!job.is_high_priority());

    // The normalized message validates to the same job: retries reuse the seed.
    let again = parse_and_validate(&job.to_body(), &Limits::default(), &ModelsConfig::default());
    assert_eq!(again.unwrap(), job);
    assert_eq!(
        validate_message(&job.message, &Limits::default(), &ModelsConfig::default()).unwrap(),
        job
    );
}

#[test]
fn absent_seeds_are_drawn_per_job() {
    let seeds: std::collections::HashSet<u64> =
        (0..16).map(|_| check(&base()).unwrap().seed).collect();
    assert!(seeds.len() > 1, "seeds must not repeat: {seeds:?}");
}

#[test]
fn a_full_message_maps_to_the_engine_request() {
    let message = with(json!({
        "model": "tiny-sdxl",
        "prompt_2": "second",
        "negative_prompt": "blurry",
        "negative_prompt_2": "",
        "width": 832, "height": 1216,
        "steps": 20,
        "guidance_scale": 7.5,
        "guidance_rescale": 0.25,
        "scheduler": "dpm++ 2m karras",
        "scheduler_options": { "timestep_spacing": "trailing", "steps_offset": 0,
                               "prediction_type": "epsilon", "use_karras_sigmas": true },
        "seed": 99,
        "num_images": 3,
        "original_size": [2048, 1024],
        "crops_coords_top_left": [16, 8],
        "target_size": [1216, 832],
        "priority": 5,
        "metadata": { "user": 17 }
    }));
    let job = check(&message).unwrap();
    assert!(job.is_high_priority());
    assert_eq!(job.message.scheduler.as_deref(), Some("dpmpp_2m_karras"));
    assert_eq!(job.message.metadata.as_ref().unwrap()["user"], json!(17));
    let r = job.generate_request();
    assert_eq!(r.prompt, "a cat wearing a hat");
    assert_eq!(r.prompt_2.as_deref(), Some("second"));
    assert_eq!(r.negative_prompt.as_deref(), Some("blurry"));
    assert_eq!(r.negative_prompt_2.as_deref(), Some(""));
    assert_eq!(
        (r.width, r.height, r.steps, r.num_images, r.seed),
        (832, 1216, 20, 3, 99)
    );
    assert_eq!((r.guidance_scale, r.guidance_rescale), (7.5, 0.25));
    assert_eq!(r.scheduler, SchedulerKind::Dpmpp2mKarras);
    assert_eq!(
        r.scheduler_overrides.timestep_spacing,
        Some(TimestepSpacing::Trailing)
    );
    assert_eq!(r.scheduler_overrides.steps_offset, Some(0));
    assert_eq!(r.scheduler_overrides.use_karras_sigmas, Some(true));
    assert_eq!(r.original_size, Some((2048, 1024)));
    assert_eq!(r.crops_coords_top_left, (16, 8));
    assert_eq!(r.target_size, Some((1216, 832)));
    assert_eq!(r.initial_latents, None);

    let plain = check(&base()).unwrap().generate_request();
    assert_eq!(
        (
            plain.original_size,
            plain.crops_coords_top_left,
            plain.target_size
        ),
        (None, (0, 0), None)
    );
    assert_eq!(plain.negative_prompt, None);
}

#[test]
fn a_style_wraps_the_prompts_and_unknown_styles_are_rejected() {
    let job = check(&with(json!({
        "style": "Line Art",
        "negative_prompt": "blurry",
        "prompt_2": "second"
    })))
    .unwrap();
    // The normalized message keeps the preset's own name and the job's own texts.
    assert_eq!(job.message.style.as_deref(), Some("line_art"));
    assert_eq!(job.message.prompt, "a cat wearing a hat");
    let style = sdxl_worker::styles::StyleCatalog::builtin()
        .get("line_art")
        .unwrap();
    let r = job.generate_request();
    assert_eq!(
        r.prompt,
        style.prompt.replace("{prompt}", "a cat wearing a hat")
    );
    assert!(r
        .prompt
        .starts_with("line art drawing of a cat wearing a hat,"));
    assert_eq!(r.prompt_2, Some(style.prompt.replace("{prompt}", "second")));
    assert_eq!(
        r.negative_prompt,
        Some(format!("{}, blurry", style.negative_prompt))
    );
    assert_eq!(r.negative_prompt_2, None);
    // Validating the normalized message again gives the same job.
    let again = validate_message(&job.message, &Limits::default(), &ModelsConfig::default());
    assert_eq!(again.unwrap().generate_request(), r);

    assert_eq!(
        codes(&with(json!({ "style": "cubism" }))),
        pair("style", "unknown_style")
    );
    let Err(JobRejection::Invalid { errors, .. }) = check(&with(json!({ "style": "cubism" })))
    else {
        panic!("unknown style accepted")
    };
    assert!(
        errors[0].message.contains("photographic"),
        "{}",
        errors[0].message
    );
}

#[test]
fn null_means_absent() {
    let job = check(&with(
        json!({ "negative_prompt": null, "seed": null, "width": null }),
    ))
    .unwrap();
    assert_eq!(job.message.negative_prompt, None);
    assert_eq!(job.width, 64);
    assert_eq!(
        codes(&with(json!({ "prompt": null }))),
        pair("prompt", "missing")
    );
}

#[test]
fn unreadable_bodies_have_codes() {
    assert_eq!(unreadable(b""), "empty_body");
    assert_eq!(unreadable(b" \n\t"), "empty_body");
    assert_eq!(unreadable(b"{\"version\": 1,"), "not_json");
    assert_eq!(unreadable(b"\xff\xfe"), "not_json");
    assert_eq!(unreadable(b"[1, 2]"), "not_object");
    assert_eq!(unreadable(b"\"job\""), "not_object");
    assert_eq!(
        unreadable(br#"{"version": 1, "prompt": "x"}"#),
        "missing_id"
    );
    assert_eq!(
        unreadable(br#"{"version": 1, "id": null, "prompt": "x"}"#),
        "missing_id"
    );
    assert_eq!(unreadable(br#"{"version": 1, "id": 42}"#), "invalid_uuid");
    assert_eq!(
        unreadable(br#"{"version": 1, "id": "not-a-uuid"}"#),
        "invalid_uuid"
    );
    assert_eq!(
        unreadable(br#"{"id": "7d4448409dc011d1b2455ffdce74fad2"}"#),
        "invalid_uuid"
    );
    assert_eq!(unreadable(br#"{"id": "../../etc/passwd"}"#), "invalid_uuid");
    let huge = format!(r#"{{"pad": "{}"}}"#, "x".repeat(64 * 1024 * 17));
    assert_eq!(unreadable(huge.as_bytes()), "too_large");
}

#[test]
fn an_oversized_message_with_an_id_is_invalid_as_a_whole() {
    let message = with(json!({ "metadata": { "pad": "x".repeat(70 * 1024) } }));
    assert_eq!(codes(&message), pair("$", "too_large"));
}

#[test]
fn version_errors() {
    let mut no_version = base();
    no_version.as_object_mut().unwrap().remove("version");
    assert_eq!(codes(&no_version), pair("version", "missing"));
    assert_eq!(
        codes(&with(json!({ "version": "1" }))),
        pair("version", "wrong_type")
    );
    // Another version is rejected alone: its fields belong to a contract this build lacks.
    let v2 = with(json!({ "version": 2, "steps": 0, "new_field": true }));
    assert_eq!(codes(&v2), pair("version", "unsupported_version"));
}

#[test]
fn every_field_error_has_its_code() {
    let cases: Vec<(Value, &str, &str)> = vec![
        (json!({ "prompt": 5 }), "prompt", "wrong_type"),
        (json!({ "prompt": "   " }), "prompt", "empty"),
        (json!({ "prompt": "p".repeat(2001) }), "prompt", "too_long"),
        (json!({ "prompt_2": ["a"] }), "prompt_2", "wrong_type"),
        (
            json!({ "negative_prompt": "n".repeat(2001) }),
            "negative_prompt",
            "too_long",
        ),
        (
            json!({ "negative_prompt_2": {} }),
            "negative_prompt_2",
            "wrong_type",
        ),
        (json!({ "model": "sdxl-base" }), "model", "unknown_model"),
        (json!({ "model": 3 }), "model", "wrong_type"),
        (json!({ "width": 1020 }), "width", "not_multiple_of_8"),
        (json!({ "width": 4096 }), "width", "out_of_range"),
        (json!({ "width": 8 }), "width", "out_of_range"),
        (json!({ "height": -512 }), "height", "out_of_range"),
        (json!({ "height": "1024" }), "height", "wrong_type"),
        (json!({ "height": 1024.5 }), "height", "wrong_type"),
        (json!({ "steps": 0 }), "steps", "out_of_range"),
        (json!({ "steps": 151 }), "steps", "out_of_range"),
        (json!({ "steps": true }), "steps", "wrong_type"),
        (
            json!({ "guidance_scale": 31 }),
            "guidance_scale",
            "out_of_range",
        ),
        (
            json!({ "guidance_scale": -0.5 }),
            "guidance_scale",
            "out_of_range",
        ),
        (
            json!({ "guidance_scale": "high" }),
            "guidance_scale",
            "wrong_type",
        ),
        (
            json!({ "guidance_rescale": 1.5 }),
            "guidance_rescale",
            "out_of_range",
        ),
        (
            json!({ "scheduler": "warp drive" }),
            "scheduler",
            "unknown_scheduler",
        ),
        (json!({ "scheduler": 1 }), "scheduler", "wrong_type"),
        (
            json!({ "scheduler_options": "karras" }),
            "scheduler_options",
            "wrong_type",
        ),
        (
            json!({ "scheduler_options": { "timestep_spacing": "sideways" } }),
            "scheduler_options.timestep_spacing",
            "invalid_value",
        ),
        (
            json!({ "scheduler_options": { "prediction_type": 1 } }),
            "scheduler_options.prediction_type",
            "wrong_type",
        ),
        (
            json!({ "scheduler_options": { "steps_offset": -1 } }),
            "scheduler_options.steps_offset",
            "out_of_range",
        ),
        (
            json!({ "scheduler_options": { "use_karras_sigmas": "yes" } }),
            "scheduler_options.use_karras_sigmas",
            "wrong_type",
        ),
        (
            json!({ "scheduler_options": { "beta_schedule": "linear" } }),
            "scheduler_options.beta_schedule",
            "unknown_field",
        ),
        (json!({ "seed": -1 }), "seed", "out_of_range"),
        (json!({ "seed": 1.5 }), "seed", "wrong_type"),
        (json!({ "seed": "42" }), "seed", "wrong_type"),
        (
            json!({ "seed": 18446744073709551615u64, "num_images": 2 }),
            "seed",
            "out_of_range",
        ),
        (json!({ "num_images": 0 }), "num_images", "out_of_range"),
        (json!({ "num_images": 9 }), "num_images", "out_of_range"),
        (
            json!({ "original_size": [1024] }),
            "original_size",
            "wrong_length",
        ),
        (
            json!({ "original_size": "1024x1024" }),
            "original_size",
            "wrong_type",
        ),
        (
            json!({ "original_size": [1024, "x"] }),
            "original_size[1]",
            "wrong_type",
        ),
        (
            json!({ "target_size": [0, 1024] }),
            "target_size[0]",
            "out_of_range",
        ),
        (
            json!({ "crops_coords_top_left": [-1, 0] }),
            "crops_coords_top_left[0]",
            "out_of_range",
        ),
        (json!({ "priority": 10 }), "priority", "out_of_range"),
        (json!({ "priority": "high" }), "priority", "wrong_type"),
        (json!({ "metadata": ["tag"] }), "metadata", "wrong_type"),
        (
            json!({ "metadata": { "pad": "x".repeat(9000) } }),
            "metadata",
            "too_large",
        ),
        (
            json!({ "prompt": "nul\u{0}byte" }),
            "prompt",
            "invalid_value",
        ),
        (
            json!({ "metadata": { "k": ["a\u{0}"] } }),
            "metadata",
            "invalid_value",
        ),
        (json!({ "sampler": "Euler a" }), "sampler", "unknown_field"),
        (
            json!({ "output_key": "../../etc/passwd" }),
            "output_key",
            "unknown_field",
        ),
    ];
    for (patch, field, code) in cases {
        let message = with(patch.clone());
        assert_eq!(codes(&message), pair(field, code), "for {patch}");
    }
}

#[test]
fn edges_that_are_accepted() {
    let ok = [
        json!({ "width": 64, "height": 2048 }),
        json!({ "width": 1024.0 }),
        json!({ "seed": 18446744073709551615u64 }),
        json!({ "seed": 0 }),
        json!({ "prompt": "é".repeat(2000) }),
        json!({ "guidance_scale": 0, "guidance_rescale": 1 }),
        json!({ "scheduler": "Euler a" }),
        json!({ "scheduler": "EULER_A" }),
        json!({ "priority": 9, "num_images": 8 }),
        json!({ "metadata": {} }),
        json!({ "id": ID.to_uppercase() }),
        json!({ "scheduler_options": { "timestep_spacing": null } }),
    ];
    for patch in ok {
        let message = with(patch.clone());
        assert!(
            check(&message).is_ok(),
            "rejected {patch}: {:?}",
            check(&message)
        );
    }
}

#[test]
fn all_field_errors_are_reported_at_once() {
    let message = with(json!({
        "prompt": 12,
        "width": 1001,
        "steps": 0,
        "scheduler": "warp",
        "colour": "red",
        "seed": -3
    }));
    assert_eq!(
        codes(&message),
        vec![
            ("prompt".to_owned(), "wrong_type".to_owned()),
            ("width".to_owned(), "not_multiple_of_8".to_owned()),
            ("steps".to_owned(), "out_of_range".to_owned()),
            ("scheduler".to_owned(), "unknown_scheduler".to_owned()),
            ("seed".to_owned(), "out_of_range".to_owned()),
            ("colour".to_owned(), "unknown_field".to_owned()),
        ]
    );
    let Err(rejection) = check(&message) else {
        panic!()
    };
    assert_eq!(rejection.code(), "invalid_request");
    assert!(rejection.to_string().contains("colour"));
}

#[test]
fn limits_are_configurable() {
    let limits = Limits {
        max_pixels: 1024 * 1024,
        max_prompt_chars: 20,
        max_images: 2,
        schedulers: vec![SchedulerKind::Euler],
        ..Limits::default()
    };
    let message = with(json!({ "width": 2048, "height": 1024 }));
    assert_eq!(
        codes_with(&message, &limits),
        pair("width", "too_many_pixels")
    );
    // Height alone given, with a model whose default width is 1024: height is at fault.
    let mut models = ModelsConfig::default();
    models.models[0].default_width = None;
    let message = with(json!({ "height": 1536 }));
    assert_eq!(
        codes_with_models(&message, &limits, &models),
        pair("height", "too_many_pixels")
    );
    let message = with(json!({ "prompt": "twenty-one characters" }));
    assert_eq!(codes_with(&message, &limits), pair("prompt", "too_long"));
    let message = with(json!({ "num_images": 3 }));
    assert_eq!(
        codes_with(&message, &limits),
        pair("num_images", "out_of_range")
    );
    let message = with(json!({ "scheduler": "ddim" }));
    assert_eq!(
        codes_with(&message, &limits),
        pair("scheduler", "unknown_scheduler")
    );
}

#[test]
fn the_model_default_size_applies() {
    let mut models = ModelsConfig::default();
    models.models[0].default_width = Some(512);
    models.models[0].default_height = Some(768);
    let body = serde_json::to_vec(&base()).unwrap();
    let job = parse_and_validate(&body, &Limits::default(), &models).unwrap();
    assert_eq!((job.width, job.height), (512, 768));
    models.models[0].default_width = None;
    models.models[0].default_height = None;
    let job = parse_and_validate(&body, &Limits::default(), &models).unwrap();
    assert_eq!((job.width, job.height), (1024, 1024));
}
