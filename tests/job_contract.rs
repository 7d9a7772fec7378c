//! The job message contract: validation codes for every kind of invalid message, the committed
//! JSON Schema against the types and validator, and the schema's examples.

use sdxl_worker::config::{Limits, ModelsConfig};
use sdxl_worker::job::schema::{committed_text, json_schema, SCHEMA_PATH};

#[test]
fn committed_schema_matches_the_generated_one() {
    let generated = json_schema(&Limits::default(), None);
    let pretty = serde_json::to_string_pretty(&generated).unwrap() + "\n";
    if std::env::var_os("SDXL_UPDATE_SCHEMA").is_some() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(SCHEMA_PATH);
        std::fs::write(path, &pretty).unwrap();
        return;
    }
    let committed: serde_json::Value =
        serde_json::from_str(committed_text()).expect("schema/job-v1.json is not JSON");
    assert_eq!(
        committed, generated,
        "schema/job-v1.json differs from the generated schema; run the tests with \
         SDXL_UPDATE_SCHEMA=1 to rewrite it"
    );
    let _ = ModelsConfig::default();
}
