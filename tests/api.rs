//! The HTTP API against the real stack (RabbitMQ, Postgres, local or moto S3 storage, a worker
//! running the tiny model on the CPU), started in this process on a free port: every route,
//! bad input with its stable 4xx code, token ownership, server-sent events, cancellation of
//! queued and running jobs, presigned S3 URLs, and the OpenAPI document (validated with
//! openapi-spec-validator and compared with the served routes).

mod api_harness;
mod queue_harness;
mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use api_harness::Api;
use queue_harness::{Stack, StorageKind};
use sdxl_worker::config::ApiToken;
use sdxl_worker::worker::RunOptions;
use serde_json::{json, Value};
use uuid::Uuid;

const ALICE: &str = "alice-secret-1";
const BOB: &str = "bob-secret-22";

fn job(id: Uuid, steps: u32) -> Value {
    json!({
        "version": 1,
        "id": id,
        "prompt": "a lighthouse at dusk",
        "width": 64,
        "height": 64,
        "steps": steps,
        "seed": 11,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_validation_auth_events_and_status_over_http() {
    let stack = Stack::new("api-main", StorageKind::Local).await;
    let mut config = stack.config.clone();
    config.api.tokens = vec![
        ApiToken::parse(&format!("alice:{ALICE}")).unwrap(),
        ApiToken::parse(&format!("bob:{BOB}")).unwrap(),
    ];
    config.api.body_limit_bytes = 4096;
    let server = Api::start(config).await;
    let alice = server.with_token(Some(ALICE));
    let bob = server.with_token(Some(BOB));
    let nobody = server.with_token(None);

    // Open routes.
    assert_eq!(nobody.get("/healthz").await.status, 200);
    let ready = nobody.get("/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(ready.json()["ready"], true);
    let page = nobody.get("/").await;
    assert_eq!(page.status, 200);
    assert!(page.content_type.starts_with("text/html"));
    assert!(page.text().contains("/v1/status"));

    // Authentication.
    let refused = nobody.get("/v1/capabilities").await;
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (401, "unauthorized")
    );
    let wrong = server
        .with_token(Some("not-a-token"))
        .get("/v1/schedulers")
        .await;
    assert_eq!(wrong.status, 401);

    // Bad input: every case gets a clear 4xx with a stable code.
    let cases: Vec<(Vec<u8>, &str, u16, &str)> = vec![
        (
            b"{\"version\": 1, \"prompt\": ".to_vec(),
            "application/json",
            400,
            "not_json",
        ),
        (b"[1, 2]".to_vec(), "application/json", 400, "not_object"),
        (b"   ".to_vec(), "application/json", 400, "empty_body"),
        (
            b"{\"prompt\": \"x\"}".to_vec(),
            "text/plain",
            415,
            "unsupported_media_type",
        ),
        (vec![b' '; 5000], "application/json", 413, "body_too_large"),
    ];
    for (body, content_type, status, code) in cases {
        let reply = alice.post_raw("/v1/jobs", body, content_type).await;
        assert_eq!(
            (reply.status, reply.code().as_str()),
            (status, code),
            "{}",
            reply.text()
        );
    }
    let invalid = alice
        .post_json(
            "/v1/jobs",
            &json!({"version": 1, "prompt": "x", "width": "wide", "steps": 0, "colour": "red"}),
        )
        .await;
    assert_eq!(
        (invalid.status, invalid.code().as_str()),
        (422, "invalid_request")
    );
    let errors = invalid.json()["error"]["errors"].clone();
    let fields: BTreeSet<(String, String)> = errors
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["field"].as_str().unwrap().to_owned(),
                e["code"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for expected in [
        ("width", "wrong_type"),
        ("steps", "out_of_range"),
        ("colour", "unknown_field"),
    ] {
        assert!(
            fields.contains(&(expected.0.to_owned(), expected.1.to_owned())),
            "{expected:?} not in {fields:?}"
        );
    }
    let bad_id = alice.get("/v1/jobs/not-a-uuid").await;
    assert_eq!(
        (bad_id.status, bad_id.code().as_str()),
        (400, "bad_parameter")
    );
    let unknown = alice.get(&format!("/v1/jobs/{}", Uuid::new_v4())).await;
    assert_eq!(
        (unknown.status, unknown.code().as_str()),
        (404, "job_not_found")
    );
    let no_route = alice.get("/v1/nothing-here").await;
    assert_eq!(
        (no_route.status, no_route.code().as_str()),
        (404, "no_route")
    );
    let wrong_method = alice.request_method("PUT", "/v1/jobs").await;
    assert_eq!(wrong_method.code(), "no_route");

    // Validate: nothing is written.
    let checked = alice
        .post_json("/v1/validate", &json!({"version": 1, "prompt": "x"}))
        .await;
    assert_eq!(checked.status, 200, "{}", checked.text());
    assert_eq!(checked.json()["valid"], true);
    assert_eq!(checked.json()["normalized"]["steps"], 30);
    let checked = alice
        .post_json(
            "/v1/validate",
            &json!({"version": 1, "prompt": "", "scheduler": "nope"}),
        )
        .await;
    assert_eq!(checked.json()["valid"], false);
    let codes: Vec<String> = checked.json()["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["code"].as_str().unwrap().to_owned())
        .collect();
    assert!(codes.contains(&"empty".to_owned()), "{codes:?}");
    assert!(codes.contains(&"unknown_scheduler".to_owned()), "{codes:?}");

    // Submit before any worker runs: the row is queued at once; a repeat is idempotent.
    let id = Uuid::new_v4();
    let created = alice.post_json("/v1/jobs", &job(id, 3)).await;
    assert_eq!(created.status, 201, "{}", created.text());
    assert_eq!(created.json()["state"], "queued");
    let again = alice.post_json("/v1/jobs", &job(id, 3)).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.json()["id"], id.to_string());
    let foreign = bob.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(
        (foreign.status, foreign.code().as_str()),
        (403, "forbidden")
    );
    assert_eq!(bob.delete(&format!("/v1/jobs/{id}")).await.status, 403);
    assert_eq!(bob.post_json("/v1/jobs", &job(id, 3)).await.status, 403);

    // Estimate without workers: priors or history, and no wait figure.
    let estimate = alice
        .post_json("/v1/estimate", &job(Uuid::new_v4(), 3))
        .await;
    assert_eq!(estimate.status, 200, "{}", estimate.text());
    let e = estimate.json();
    assert!(e["run"]["p50_seconds"].as_f64().unwrap() > 0.0);
    assert!(e["run"]["p90_seconds"].as_f64() >= e["run"]["p50_seconds"].as_f64());
    assert_eq!(e["wait"]["consumers"], 0);
    assert!(e["wait"]["seconds"].is_null());
    assert!(e["wait"]["queued_ahead"].as_u64().unwrap() >= 1, "{e:#}");

    // Follow the job over SSE while a worker runs it.
    let worker = stack.start_worker(RunOptions::default());
    let events = alice
        .events(&format!("/v1/jobs/{id}/events"), Duration::from_secs(120))
        .await;
    let states: Vec<&str> = events
        .iter()
        .filter(|(kind, _)| kind == "state")
        .map(|(_, row)| row["state"].as_str().unwrap())
        .collect();
    assert_eq!(states.first(), Some(&"queued"), "{events:?}");
    assert_eq!(states.last(), Some(&"succeeded"), "{events:?}");
    assert!(states.contains(&"running"), "{events:?}");
    let steps: Vec<i64> = events
        .iter()
        .filter(|(kind, _)| kind == "progress")
        .map(|(_, p)| p["step"].as_i64().unwrap())
        .collect();
    assert!(
        !steps.is_empty() && steps.windows(2).all(|w| w[0] <= w[1]),
        "{events:?}"
    );

    // The row, its image and its metrics.
    let done = alice.get(&format!("/v1/jobs/{id}")).await.json();
    assert_eq!(done["state"], "succeeded");
    assert!(done["metrics"]["total_ms"].as_f64().unwrap() > 0.0);
    let url = done["images"][0]["url"].as_str().unwrap().to_owned();
    assert_eq!(url, format!("/v1/jobs/{id}/images/0"));
    let png = alice.get(&url).await;
    assert_eq!(png.status, 200);
    assert!(png.bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
    assert_eq!(bob.get(&url).await.status, 403);
    assert_eq!(
        alice.get(&format!("/v1/jobs/{id}/images/5")).await.code(),
        "image_not_found"
    );
    let late = alice.delete(&format!("/v1/jobs/{id}")).await;
    assert_eq!(
        (late.status, late.code().as_str()),
        (409, "already_finished")
    );

    // Capabilities see the live worker (its heartbeat) and its device.
    let caps = alice
        .wait_get_until("/v1/capabilities", |c| {
            // The first heartbeat may come before the consumer registered its device.
            c["workers_alive"].as_u64() >= Some(1)
                && c["gpus"].as_array().is_some_and(|g| !g.is_empty())
        })
        .await;
    assert_eq!(caps["auth_required"], true);
    assert_eq!(caps["models"][0]["name"], "tiny-sdxl");
    assert_eq!(caps["models"][0]["default"], true);
    assert_eq!(caps["gpus"][0]["device"], "cpu");
    assert_eq!(caps["limits"]["max_steps"], 150);
    assert_eq!(caps["schedulers"].as_array().unwrap().len(), 10);
    let schedulers = alice.get("/v1/schedulers").await.json();
    let euler_a = schedulers
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "euler_a")
        .unwrap();
    assert_eq!(euler_a["a1111_name"], "Euler a");
    assert_eq!(
        euler_a["diffusers_class"],
        "EulerAncestralDiscreteScheduler"
    );
    let controlnets = alice.get("/v1/controlnet-types").await.json();
    let ids: Vec<&str> = controlnets
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["canny", "depth", "openpose"]);

    // The estimate now counts the consumer.
    let e = alice
        .post_json("/v1/estimate", &job(Uuid::new_v4(), 3))
        .await
        .json();
    assert_eq!(e["wait"]["consumers"], 1);
    assert_eq!(e["run"]["gpu_kind"], "cpu");
    assert!(e["wait"]["seconds"].as_f64().is_some());

    // Metrics and the status page's JSON.
    let metrics = nobody.get("/metrics").await;
    assert_eq!(metrics.status, 200);
    let text = metrics.text();
    for line in [
        "sdxl_jobs{state=\"succeeded\"} 1",
        "sdxl_queue_depth{queue=\"normal\"} 0",
        "sdxl_job_duration_seconds_count 1",
        "sdxl_step_duration_seconds_count 3",
        "sdxl_workers_alive 1",
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
    }
    let status = alice.get("/v1/status").await.json();
    assert_eq!(status["jobs"]["succeeded"], 1);
    assert_eq!(status["recent"][0]["id"], id.to_string());
    assert_eq!(status["recent"][0]["thumbnail"], url);
    assert!(status["workers"][0]["alive"].as_bool().unwrap());
    let others = bob.get("/v1/status").await.json();
    assert!(others["recent"][0]["thumbnail"].is_null());

    worker.stop().await.unwrap();
    server.stop().await;
    stack.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_queued_and_running_jobs_and_presigned_s3_urls() {
    let stack = Stack::new("api-cancel", StorageKind::S3).await;
    let mut config = stack.config.clone();
    config.worker.progress_interval_ms = 0;
    let server = Api::start(config).await;

    // A queued job is cancelled at once and never runs.
    let queued = Uuid::new_v4();
    assert_eq!(
        server.post_json("/v1/jobs", &job(queued, 2)).await.status,
        201
    );
    let cancelled = server.delete(&format!("/v1/jobs/{queued}")).await;
    assert_eq!(cancelled.status, 200, "{}", cancelled.text());
    assert_eq!(cancelled.json()["state"], "cancelled");

    // A job without an id gets one; it runs, and its image has a presigned URL.
    let body = json!({"version": 1, "prompt": "a red kite", "width": 64, "height": 64, "steps": 2});
    let created = server.post_json("/v1/jobs", &body).await;
    assert_eq!(created.status, 201, "{}", created.text());
    let small = created.json()["id"].as_str().unwrap().to_owned();
    let worker = stack.start_worker(RunOptions::default());
    let done = server
        .wait_job(&small, Duration::from_secs(120), |j| {
            j["state"] == "succeeded"
        })
        .await;
    let url = done["images"][0]["url"].as_str().unwrap();
    assert!(
        url.starts_with("http") && url.contains("X-Amz-Signature"),
        "{url}"
    );
    let png = reqwest::get(url).await.unwrap();
    assert_eq!(png.status().as_u16(), 200);
    assert!(png.bytes().await.unwrap().starts_with(b"\x89PNG"));

    // A running job stops at its next step and ends cancelled, with no image.
    let running = Uuid::new_v4();
    let mut long = job(running, 150);
    long["width"] = json!(128);
    long["height"] = json!(128);
    assert_eq!(server.post_json("/v1/jobs", &long).await.status, 201);
    server
        .wait_job(&running.to_string(), Duration::from_secs(120), |j| {
            j["state"] == "running" && j["progress"]["step"].as_i64() >= Some(1)
        })
        .await;
    let asked = server.delete(&format!("/v1/jobs/{running}")).await;
    assert_eq!(asked.status, 202, "{}", asked.text());
    assert_eq!(asked.json()["cancel_requested"], true);
    let end = server
        .wait_job(&running.to_string(), Duration::from_secs(120), |j| {
            j["finished_at"].is_string()
        })
        .await;
    assert_eq!(end["state"], "cancelled", "{end:#}");
    assert_eq!(end["images"], json!([]));
    assert!(end["progress"]["step"].as_i64() < Some(150));
    let moto = stack.moto.as_ref().unwrap();
    let keys = moto.list_keys(stack.bucket.as_ref().unwrap());
    assert!(
        !keys.iter().any(|k| k.contains(&running.to_string())),
        "{keys:?}"
    );
    assert!(
        !keys.iter().any(|k| k.contains(&queued.to_string())),
        "{keys:?}"
    );
    let ready = server.get("/readyz").await.json();
    assert_eq!(ready["storage"]["ok"], true);

    worker.stop().await.unwrap();
    server.stop().await;
    stack.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_validates_and_matches_the_served_routes() {
    let stack = Stack::new("api-openapi", StorageKind::Local).await;
    let server = Api::start(stack.config.clone()).await;
    let reply = server.get("/openapi.json").await;
    assert_eq!(reply.status, 200);
    let doc = reply.json();
    assert_eq!(
        doc["openapi"].as_str().unwrap().split('.').next(),
        Some("3")
    );
    assert!(doc["components"]["schemas"]["JobMessage"]["properties"]["prompt"].is_object());
    assert_eq!(
        doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
            ["$ref"],
        "#/components/schemas/JobMessage"
    );

    // openapi-spec-validator (scripts/test.sh installs it) checks the document.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("openapi.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    let out = std::process::Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(&path)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "openapi-spec-validator: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Documented operations are exactly the served routes...
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    let served: BTreeSet<(String, String)> = sdxl_worker::api::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, served);
    // ...and each one answers from its handler, not the router's fallback.
    let id = Uuid::new_v4();
    for (method, path) in &served {
        let concrete = path
            .replace("{id}", &id.to_string())
            .replace("{index}", "0");
        let reply = server.request_method(method, &concrete).await;
        let fallback = reply.content_type.starts_with("application/json")
            && reply.json()["error"]["code"] == "no_route";
        assert!(!fallback, "{method} {path} is documented but not served");
    }
    server.stop().await;
    stack.teardown().await;
}

/// Headless Chromium (Debian's `chromium`, installed by scripts/test.sh) with a fresh profile.
fn chromium(args: &[String]) -> std::process::Output {
    let profile = tempfile::tempdir().unwrap();
    let mut command = std::process::Command::new("chromium");
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args);
    command
        .output()
        .expect("chromium runs (scripts/test.sh installs Debian's package)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_renders_workers_jobs_and_thumbnails_in_headless_chromium() {
    let stack = Stack::new("api-page", StorageKind::Local).await;
    let server = Api::start(stack.config.clone()).await;
    let worker = stack.start_worker(RunOptions::default());
    let mut ids = Vec::new();
    for (size, steps, prompt) in [
        (64, 2, "a lighthouse at dusk"),
        (96, 3, "a red kite over hills"),
        (64, 4, "a bowl of lemons"),
    ] {
        let id = Uuid::new_v4();
        let mut body = job(id, steps);
        body["width"] = json!(size);
        body["height"] = json!(size);
        body["prompt"] = json!(prompt);
        assert_eq!(server.post_json("/v1/jobs", &body).await.status, 201);
        ids.push(id);
    }
    for id in &ids {
        server
            .wait_job(&id.to_string(), Duration::from_secs(120), |j| {
                j["state"] == "succeeded"
            })
            .await;
    }
    server
        .wait_get_until("/v1/status", |s| {
            s["gpus"].as_array().is_some_and(|g| !g.is_empty())
        })
        .await;

    let url = format!("{}/", server.base);
    let base = server.base.clone();
    let dom = tokio::task::spawn_blocking(move || {
        chromium(&[
            "--virtual-time-budget=8000".to_owned(),
            "--dump-dom".to_owned(),
            url,
        ])
    })
    .await
    .unwrap();
    let html = String::from_utf8_lossy(&dom.stdout).into_owned();
    assert!(
        dom.status.success(),
        "{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    assert!(
        html.contains("data-loaded=\"true\""),
        "the page never rendered /v1/status:\n{html}"
    );
    for id in &ids {
        assert!(
            html.contains(&id.to_string()[..8]),
            "job {id} missing:\n{html}"
        );
        let thumb = format!("src=\"/v1/jobs/{id}/images/0\"");
        assert!(html.contains(&thumb), "thumbnail of {id} missing:\n{html}");
    }
    assert!(html.contains("a red kite over hills"));
    assert!(
        html.contains(&format!("{}-worker", stack.config.broker.prefix)),
        "{html}"
    );
    // The GPU table has a row for the worker's CPU consumer (the page's script, also in the
    // DOM, holds the text shown when there is none).
    assert!(html.contains("<td>cpu</td>"), "{html}");

    // SDXL_STATUS_SCREENSHOT=docs/status-page.png also saves a screenshot (for the README).
    if let Ok(path) = std::env::var("SDXL_STATUS_SCREENSHOT") {
        let shot = tokio::task::spawn_blocking(move || {
            chromium(&[
                "--virtual-time-budget=8000".to_owned(),
                "--window-size=1280,900".to_owned(),
                format!("--screenshot={path}"),
                format!("{base}/"),
            ])
        })
        .await
        .unwrap();
        assert!(
            shot.status.success(),
            "{}",
            String::from_utf8_lossy(&shot.stderr)
        );
    }

    worker.stop().await.unwrap();
    server.stop().await;
    stack.teardown().await;
}
