//! The committed JSON Schema of job messages: generated from the types, naming every message
//! field, its examples valid, and agreeing with the validator on what it can express.

use std::io::Write;
use std::process::{Command, Stdio};

use sdxl_worker::config::{Limits, ModelsConfig};
use sdxl_worker::job::schema::{committed_text, examples, json_schema, SCHEMA_PATH};
use sdxl_worker::job::{parse_and_validate, JobMessage, FIELDS, SCHEDULER_OPTION_FIELDS};
use serde_json::{json, Value};

use super::{base, check, with};

#[test]
fn committed_schema_matches_the_generated_one() {
    let generated = json_schema(&Limits::default(), None);
    let pretty = serde_json::to_string_pretty(&generated).unwrap() + "\n";
    if std::env::var_os("SDXL_UPDATE_SCHEMA").is_some() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(SCHEMA_PATH);
        std::fs::write(path, &pretty).unwrap();
        return;
    }
    let committed: Value = serde_json::from_str(committed_text()).expect("schema is not JSON");
    assert_eq!(
        committed, generated,
        "schema/job-v1.json differs from the generated schema; rewrite it with \
         SDXL_UPDATE_SCHEMA=1 cargo test --test job_contract"
    );
}

#[test]
fn schema_fields_are_the_message_fields() {
    let schema: Value = serde_json::from_str(committed_text()).unwrap();
    let mut properties: Vec<&str> = schema["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    properties.sort();
    let mut fields = FIELDS.to_vec();
    fields.sort();
    assert_eq!(properties, fields);
    assert_eq!(schema["required"], json!(["version", "id", "prompt"]));
    assert_eq!(schema["additionalProperties"], json!(false));
    let mut options: Vec<&str> = schema["properties"]["scheduler_options"]["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    options.sort();
    let mut expected = SCHEDULER_OPTION_FIELDS.to_vec();
    expected.sort();
    assert_eq!(options, expected);

    // The serde type has exactly these fields: the examples use every one of them between them
    // (some cannot be combined, such as `init_image` and `refiner`), and each round-trips.
    let mut used = std::collections::BTreeSet::new();
    for example in examples() {
        let typed: JobMessage = serde_json::from_value(example.clone()).unwrap();
        // `null` means absent, and absent fields are not written back.
        let mut present = example.as_object().unwrap().clone();
        present.retain(|_, v| !v.is_null());
        assert_eq!(
            serde_json::to_value(&typed).unwrap(),
            Value::Object(present)
        );
        used.extend(example.as_object().unwrap().keys().cloned());
    }
    let all: std::collections::BTreeSet<String> = FIELDS.iter().map(|f| f.to_string()).collect();
    assert_eq!(used, all);
    assert!(serde_json::from_value::<JobMessage>(with(json!({ "extra": 1 }))).is_err());
}

#[test]
fn schema_examples_are_valid_messages() {
    let schema: Value = serde_json::from_str(committed_text()).unwrap();
    let listed = schema["examples"].as_array().unwrap();
    assert_eq!(listed, &examples());
    for example in listed {
        let job = parse_and_validate(
            &serde_json::to_vec(example).unwrap(),
            &Limits::default(),
            &ModelsConfig::default(),
        );
        assert!(job.is_ok(), "{example}: {job:?}");
    }
}

#[test]
fn a_deployment_schema_names_its_models() {
    let schema = json_schema(&Limits::default(), Some(&ModelsConfig::default()));
    assert_eq!(
        schema["properties"]["model"]["enum"],
        json!(["tiny-sdxl", null])
    );
}

/// Messages on which the JSON Schema and the validator must agree (everything the schema can
/// express), each with the validator's expected verdict.
fn agreement_corpus() -> Vec<(Value, bool)> {
    let mut corpus: Vec<(Value, bool)> = examples().into_iter().map(|e| (e, true)).collect();
    let valid = [
        json!({ "width": 64, "height": 2048 }),
        json!({ "seed": 18446744073709551615u64 }),
        json!({ "scheduler": "DPM++ 2M SDE Karras", "priority": 0 }),
        json!({ "negative_prompt": null, "original_size": [1, 16384] }),
        json!({ "scheduler_options": { "steps_offset": 999, "use_karras_sigmas": false } }),
        json!({ "metadata": { "nested": { "deep": [1, 2, 3] } } }),
        json!({ "style": "watercolor" }),
        json!({ "prompt_weighting": false }),
        json!({ "cache": true }),
        json!({ "init_image": { "image_key": "uploads/a.png" }, "strength": 0.35 }),
        json!({ "init_image": { "image_base64": "aGVsbG8=" }, "strength": 1 }),
    ];
    let invalid = [
        json!({ "version": 2 }),
        json!({ "prompt": 5 }),
        json!({ "prompt": "" }),
        json!({ "prompt": "p".repeat(2001) }),
        json!({ "width": 1020 }),
        json!({ "width": 2056 }),
        json!({ "height": 56 }),
        json!({ "steps": 0 }),
        json!({ "steps": 151 }),
        json!({ "guidance_scale": 30.5 }),
        json!({ "guidance_rescale": -0.1 }),
        json!({ "scheduler": "warp" }),
        json!({ "scheduler_options": { "timestep_spacing": "sideways" } }),
        json!({ "scheduler_options": { "steps_offset": 1000 } }),
        json!({ "scheduler_options": { "other": 1 } }),
        json!({ "seed": -1 }),
        json!({ "num_images": 9 }),
        json!({ "original_size": [1024] }),
        json!({ "original_size": [1024, 1024, 1] }),
        json!({ "crops_coords_top_left": [0, 16385] }),
        json!({ "priority": 10 }),
        json!({ "metadata": [] }),
        json!({ "unknown": true }),
        json!({ "style": "cubism" }),
        json!({ "style": 3 }),
        json!({ "prompt_weighting": "yes" }),
        json!({ "cache": 1 }),
        json!({ "init_image": { "image_key": "a.png" }, "strength": 0 }),
        json!({ "init_image": { "image_key": "a.png" }, "strength": 1.5 }),
        json!({ "init_image": { "image_key": "a.png", "mask_key": "m.png" } }),
        json!({ "init_image": "a.png" }),
        json!({ "id": "7d4448409dc011d1b2455ffdce74fad2" }),
    ];
    corpus.extend(valid.into_iter().map(|p| (with(p), true)));
    corpus.extend(invalid.into_iter().map(|p| (with(p), false)));
    let mut no_prompt = base();
    no_prompt.as_object_mut().unwrap().remove("prompt");
    corpus.push((no_prompt, false));
    corpus
}

const PY_CHECK: &str = r#"
import json, sys
from jsonschema import Draft202012Validator
schema = json.load(open(sys.argv[1]))
Draft202012Validator.check_schema(schema)
validator = Draft202012Validator(schema)
corpus = json.load(sys.stdin)
print(json.dumps([validator.is_valid(m) for m in corpus]))
"#;

#[test]
fn the_schema_and_the_validator_agree() {
    let corpus = agreement_corpus();
    for (message, expected) in &corpus {
        assert_eq!(check(message).is_ok(), *expected, "validator on {message}");
    }
    let schema_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(SCHEMA_PATH);
    let mut child = Command::new("python3")
        .args(["-c", PY_CHECK, schema_path.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is needed to check the schema");
    let messages: Vec<&Value> = corpus.iter().map(|(m, _)| m).collect();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&serde_json::to_vec(&messages).unwrap())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python jsonschema check failed (pip install jsonschema): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verdicts: Vec<bool> = serde_json::from_slice(&out.stdout).unwrap();
    for ((message, expected), verdict) in corpus.iter().zip(verdicts) {
        assert_eq!(verdict, *expected, "JSON Schema on {message}");
    }
}
