//! The CLIP tokenizers of the tiny pipeline give exactly the ids transformers gives
//! (tests/fixtures/golden/tokenizer/tokens.json, made with diffusers' call: padding to 77,
//! truncation), for both of SDXL's tokenizers.

use std::path::{Path, PathBuf};

use sdxl_worker::engine::tokenizer::ClipTokenizer;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[derive(serde::Deserialize)]
struct Golden {
    max_length: usize,
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    prompt: String,
    tokenizer: Vec<i64>,
    tokenizer_2: Vec<i64>,
}

fn golden() -> Golden {
    let path = fixtures().join("golden/tokenizer/tokens.json");
    let text = std::fs::read_to_string(&path).expect("read tokens.json");
    serde_json::from_str(&text).expect("parse tokens.json")
}

fn check(which: &str, pick: fn(&Case) -> &Vec<i64>) {
    let golden = golden();
    assert!(
        golden.cases.len() >= 250,
        "only {} golden prompts",
        golden.cases.len()
    );
    let tok =
        ClipTokenizer::from_dir(&fixtures().join("tiny-sdxl").join(which)).expect("load tokenizer");
    assert_eq!(tok.max_length(), golden.max_length);
    let mut failures = Vec::new();
    for case in &golden.cases {
        let got = tok.encode(&case.prompt).expect("encode");
        if &got != pick(case) {
            failures.push(format!(
                "{:?}\n  want {:?}\n  got  {:?}",
                case.prompt,
                pick(case),
                got
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{which}: {} of {} prompts differ:\n{}",
        failures.len(),
        golden.cases.len(),
        failures
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn tokenizer_matches_transformers() {
    check("tokenizer", |c| &c.tokenizer);
}

#[test]
fn tokenizer_2_matches_transformers() {
    check("tokenizer_2", |c| &c.tokenizer_2);
}

#[test]
fn special_ids_and_padding_differ_between_the_two_tokenizers() {
    let root = fixtures().join("tiny-sdxl");
    let a = ClipTokenizer::from_dir(&root.join("tokenizer")).unwrap();
    let b = ClipTokenizer::from_dir(&root.join("tokenizer_2")).unwrap();
    assert_eq!((a.bos_id(), a.eos_id(), a.pad_id()), (49406, 49407, 49407));
    assert_eq!((b.bos_id(), b.eos_id(), b.pad_id()), (49406, 49407, 0));
    let long = "word ".repeat(200);
    let ids = a.encode(&long).unwrap();
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[76], 49407, "EOS survives truncation");
}

#[test]
fn missing_vocab_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\n").unwrap();
    let err = ClipTokenizer::from_dir(dir.path()).unwrap_err();
    assert_eq!(err.code(), "model_file_missing");
    assert!(err.to_string().contains("vocab.json"), "{err}");
}
