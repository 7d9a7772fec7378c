//! A fuzz run through the real worker: 1,000 generated bad messages (wrong types, missing and
//! unknown fields, extreme values, broken JSON, random bytes, path-like ids, deep nesting, NUL
//! characters, ...) interleaved with good jobs. The worker never stops; every message with a
//! readable id ends as a `failed` row with field errors, every other one as a dead letter with
//! its reason, and every good job succeeds.

mod queue_harness;
mod support;

use std::collections::HashSet;
use std::time::Duration;

use queue_harness::{small_job, Stack, StorageKind};
use sdxl_worker::broker::HEADER_ERROR_CODE;
use sdxl_worker::db::JobState;
use sdxl_worker::job::{self, JobRejection};
use sdxl_worker::worker::RunOptions;
use serde_json::{json, Value};
use uuid::Uuid;

const BAD_MESSAGES: usize = 1000;
const GOOD_EVERY: usize = 50;

/// A small deterministic generator (xorshift64*), so that a failure can be replayed.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    fn uuid(&mut self) -> Uuid {
        let hi = u128::from(self.next());
        let lo = u128::from(self.next());
        uuid::Builder::from_random_bytes(((hi << 64) | lo).to_le_bytes()).into_uuid()
    }
}

const FIELDS: [&str; 14] = [
    "version",
    "prompt",
    "prompt_2",
    "negative_prompt",
    "width",
    "height",
    "steps",
    "guidance_scale",
    "scheduler",
    "seed",
    "num_images",
    "original_size",
    "priority",
    "scheduler_options",
];

fn odd_value(g: &mut Gen) -> Value {
    match g.below(14) {
        0 => json!(null),
        1 => json!(true),
        2 => json!(-1),
        3 => json!(0),
        4 => json!(1e300),
        5 => json!(-3.5),
        6 => json!(u64::MAX),
        7 => json!("7"),
        8 => json!(""),
        9 => json!([1, 2, 3]),
        10 => json!({"nested": {"deeper": [null]}}),
        11 => json!("x".repeat(5000)),
        12 => json!("\u{0}nul\u{0}"),
        _ => json!("../../etc/passwd"),
    }
}

/// One bad message body, built from a valid job with a fresh id.
fn bad_message(g: &mut Gen) -> Vec<u8> {
    let id = g.uuid();
    let mut job = small_job(id);
    let obj = job.as_object_mut().unwrap();
    match g.below(12) {
        // A field with a value of the wrong type or out of range.
        0..=2 => {
            let field = *g.pick(&FIELDS);
            obj.insert(field.to_owned(), odd_value(g));
        }
        // A required field missing.
        3 => {
            let field = *g.pick(&["version", "prompt"]);
            obj.remove(field);
        }
        // A field the contract does not name.
        4 => {
            let name = format!("field_{}", g.below(1000));
            obj.insert(name, odd_value(g));
        }
        // An id that is not a hyphenated UUID.
        5 => {
            let bad_id = g
                .pick(&[
                    json!("../../etc/passwd"),
                    json!("images/../../secret"),
                    json!(""),
                    json!(42),
                    json!(id.simple().to_string()),
                    json!(null),
                ])
                .clone();
            obj.insert("id".to_owned(), bad_id);
        }
        // Several fields wrong at once.
        6 => {
            for _ in 0..3 {
                let field = *g.pick(&FIELDS);
                obj.insert(field.to_owned(), odd_value(g));
            }
        }
        // Truncated JSON.
        7 => {
            let body = serde_json::to_vec(&job).unwrap();
            let cut = 1 + g.below(body.len() as u64 - 1) as usize;
            return body[..cut].to_vec();
        }
        // Random bytes.
        8 => {
            let len = g.below(64) as usize;
            return (0..len).map(|_| g.next() as u8).collect();
        }
        // Not an object at the top.
        9 => {
            return g
                .pick(&[&b"[]"[..], b"null", b"\"job\"", b"17", b""])
                .to_vec()
        }
        // Nesting deeper than any parser should follow.
        10 => {
            let depth = 200 + g.below(300) as usize;
            let mut body = format!("{{\"version\":1,\"id\":\"{id}\",\"metadata\":");
            body.push_str(&"[".repeat(depth));
            body.push_str(&"]".repeat(depth));
            body.push('}');
            return body.into_bytes();
        }
        // Over the message size limit.
        _ => {
            obj.insert("prompt".to_owned(), json!("a".repeat(70 * 1024)));
        }
    }
    serde_json::to_vec(&job).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_bad_messages_are_each_recorded_and_good_jobs_between_them_succeed() {
    let stack = Stack::new("fuzz", StorageKind::Local).await;
    let worker = stack.start_worker(RunOptions::default());
    let limits = &stack.config.limits;
    let models = &stack.config.models;

    let mut g = Gen(0x5EED_F00D_D15E_A5E5);
    let mut failed_ids = Vec::new();
    let mut good_ids = Vec::new();
    let mut dead_expected = 0usize;
    for i in 0..BAD_MESSAGES {
        if i % GOOD_EVERY == 0 {
            let id = g.uuid();
            stack.publish(&small_job(id)).await;
            good_ids.push(id);
        }
        let body = bad_message(&mut g);
        // What the contract says of this message decides what must be recorded for it.
        match job::parse_and_validate(&body, limits, models) {
            Ok(valid) => good_ids.push(valid.id),
            Err(JobRejection::Invalid { id, .. }) => failed_ids.push(id),
            Err(JobRejection::Unreadable { .. }) => dead_expected += 1,
        }
        stack.publish_raw(&body, None, None).await;
    }
    assert!(
        failed_ids.len() > 300 && dead_expected > 100,
        "the generator covers both outcomes: {} failed rows, {dead_expected} dead letters",
        failed_ids.len()
    );
    let unique: HashSet<_> = failed_ids.iter().chain(&good_ids).collect();
    assert_eq!(
        unique.len(),
        failed_ids.len() + good_ids.len(),
        "ids are unique"
    );

    for id in &failed_ids {
        let row = stack.wait_terminal(*id, Duration::from_secs(120)).await;
        assert_eq!(row.state, JobState::Failed, "{row:#?}");
        assert_eq!(
            row.error_code.as_deref(),
            Some("invalid_request"),
            "{row:#?}"
        );
        let errors = row
            .error_details
            .as_ref()
            .and_then(|d| d.get("errors"))
            .and_then(Value::as_array)
            .map(Vec::len)
            .unwrap_or(0);
        assert!(errors > 0, "field errors recorded: {row:#?}");
    }
    for id in &good_ids {
        let row = stack.wait_terminal(*id, Duration::from_secs(120)).await;
        assert_eq!(row.state, JobState::Succeeded, "{row:#?}");
        assert_eq!(row.images.len(), 1);
    }

    let dead_queue = stack.broker.topology().dead_queue();
    let mut dead = 0usize;
    while let Some(message) = stack
        .next_message(&dead_queue, Duration::from_secs(10))
        .await
    {
        assert!(
            message.header_str(HEADER_ERROR_CODE).is_some(),
            "a dead letter carries its reason"
        );
        message.ack().await.unwrap();
        dead += 1;
        if dead == dead_expected {
            break;
        }
    }
    assert_eq!(
        dead, dead_expected,
        "every unreadable message is dead-lettered"
    );
    assert!(
        stack
            .next_message(&dead_queue, Duration::from_millis(500))
            .await
            .is_none(),
        "no message with a readable id was dead-lettered"
    );
    assert!(!worker.is_finished(), "the worker is still running");

    worker.stop().await.unwrap();
    stack.teardown().await;
}
