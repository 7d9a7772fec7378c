//! The README is part of the contract: the job schema it shows must be the committed one.

use std::path::Path;

#[test]
fn readme_shows_the_committed_job_schema() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let schema = std::fs::read_to_string(root.join("schema/job-v1.json")).expect("schema");
    let begin = "<!-- job-schema:begin -->\n```json\n";
    let end = "\n```\n<!-- job-schema:end -->";
    let start = readme.find(begin).expect("schema begin marker") + begin.len();
    let stop = readme[start..].find(end).expect("schema end marker") + start;
    assert_eq!(
        &readme[start..stop],
        schema.trim_end(),
        "README.md's copy of schema/job-v1.json is out of date"
    );
}

#[test]
fn readme_opens_with_the_demo_and_test_commands() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let head: String = readme.lines().take(12).collect::<Vec<_>>().join("\n");
    assert!(
        head.contains("scripts/setup-ort.sh && cargo run -- demo"),
        "{head}"
    );
    assert!(head.contains("scripts/test.sh"), "{head}");
    let ci = std::fs::read_to_string(root.join(".ci/run")).expect(".ci/run");
    assert!(
        ci.contains("scripts/test.sh"),
        ".ci/run must run the README's test command"
    );
}
