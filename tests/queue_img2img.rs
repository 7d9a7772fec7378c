//! Image-to-image jobs through the whole stack: RabbitMQ, Postgres, moto's S3 server. One job
//! names its init image by storage key, one sends it inline; both succeed and their stored
//! PNGs hold exactly the pixels the engine produces directly for the same request (an image of
//! another size resized to the job's first). Jobs whose init image is missing or not an image,
//! and a strength without an init image, fail with their field and code.

mod queue_harness;
mod support;

use std::ops::ControlFlow;
use std::time::Duration;

use base64::Engine as _;
use queue_harness::{small_job, Stack, StorageKind};
use sdxl_worker::config::{ControlNetConfig, Limits};
use sdxl_worker::db::{JobRow, JobState};
use sdxl_worker::engine::control_image::ControlImage;
use sdxl_worker::engine::img2img::{Img2Img, RgbImage};
use sdxl_worker::engine::{Device, Engine, EngineOptions};
use sdxl_worker::job;
use sdxl_worker::storage::Storage;
use sdxl_worker::worker::RunOptions;
use serde_json::{json, Value};
use uuid::Uuid;

fn fixtures() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn decode_rgb(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .expect("png header");
    let mut buf = vec![0; reader.output_buffer_size().expect("buffer size")];
    let info = reader.next_frame(&mut buf).expect("png frame");
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

fn field_errors(row: &JobRow) -> Vec<(String, String)> {
    row.error_details
        .as_ref()
        .and_then(|d| d.get("errors"))
        .and_then(Value::as_array)
        .map(|errors| {
            errors
                .iter()
                .map(|e| {
                    (
                        e["field"].as_str().unwrap_or_default().to_owned(),
                        e["code"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn img2img_jobs_match_the_engine_and_bad_init_images_fail_clearly() {
    let mut stack = Stack::new("img2img", StorageKind::S3).await;
    // Results are never served from the cache for image-to-image jobs.
    stack.config.worker.result_cache = true;

    let init_png = std::fs::read(fixtures().join("golden/pipeline/euler_basic.0.png")).unwrap();
    let (w, h, init_rgb) = decode_rgb(&init_png);
    assert_eq!((w, h), (64, 64));
    let storage = Storage::from_config(&stack.config.storage).await.unwrap();
    let key = "inputs/init.png";
    storage
        .put(
            &format!("{}{key}", storage.prefix()),
            init_png.clone().into(),
        )
        .await
        .unwrap();
    let inline = base64::engine::general_purpose::STANDARD.encode(&init_png);

    let worker = stack.start_worker(RunOptions::default());

    let by_key = Uuid::new_v4();
    let mut job = small_job(by_key);
    job["steps"] = 5.into();
    job["num_images"] = 2.into();
    job["init_image"] = json!({ "image_key": key });
    job["strength"] = json!(0.6);
    stack.publish(&job).await;

    let inline_id = Uuid::new_v4();
    let mut job = small_job(inline_id);
    job["steps"] = 4.into();
    job["scheduler"] = json!("dpmpp_2m");
    job["init_image"] = json!({ "image_base64": inline });
    stack.publish(&job).await;

    // An init image of another size is resized to the job's.
    let wide = Uuid::new_v4();
    let mut job = small_job(wide);
    job["width"] = 128.into();
    job["steps"] = 3.into();
    job["init_image"] = json!({ "image_key": key });
    job["strength"] = json!(1.0);
    stack.publish(&job).await;

    // The same request again: with the result cache on it still runs (and matches).
    let repeat = Uuid::new_v4();
    let mut job = small_job(repeat);
    job["steps"] = 4.into();
    job["scheduler"] = json!("dpmpp_2m");
    job["init_image"] = json!({ "image_base64": inline });
    stack.publish(&job).await;

    let not_an_image = base64::engine::general_purpose::STANDARD.encode(b"no pixels here");
    let bad: Vec<(Value, &str, &str)> = vec![
        (
            json!({ "init_image": { "image_key": "inputs/missing.png" } }),
            "init_image",
            "init_image_unavailable",
        ),
        (
            json!({ "init_image": { "image_base64": not_an_image } }),
            "init_image",
            "init_image_unreadable",
        ),
        (
            json!({ "strength": 0.5 }),
            "strength",
            "strength_without_init_image",
        ),
    ];
    let mut bad_ids = Vec::new();
    for (patch, field, code) in &bad {
        let id = Uuid::new_v4();
        let mut job = small_job(id);
        for (k, v) in patch.as_object().unwrap() {
            job[k] = v.clone();
        }
        stack.publish(&job).await;
        bad_ids.push((id, *field, *code));
    }

    let options = EngineOptions {
        device: Device::Cpu,
        ..EngineOptions::default()
    };
    let engine = Engine::load(support::tiny_model_dir(), &options).unwrap();
    let init = ControlImage::new(64, 64, init_rgb.clone()).unwrap();
    for (id, strength) in [(by_key, 0.6), (inline_id, 0.8), (repeat, 0.8), (wide, 1.0)] {
        let row = stack.wait_terminal(id, Duration::from_secs(240)).await;
        assert_eq!(row.state, JobState::Succeeded, "{row:#?}");
        assert_eq!(row.request["strength"], json!(strength));
        assert_eq!(
            stack.db.db.cached_from(id).await.unwrap(),
            None,
            "image-to-image skips the result cache"
        );

        // The engine, given the recorded request and the init image, makes the same pixels.
        let valid = job::parse_and_validate_with(
            &serde_json::to_vec(&row.request).unwrap(),
            &Limits::default(),
            &stack.config.models,
            &ControlNetConfig::default(),
        )
        .unwrap();
        let mut request = valid.generate_request();
        let sized = init.resized(request.width, request.height);
        request.controls.img2img = Some(Img2Img {
            image: RgbImage {
                width: sized.width,
                height: sized.height,
                rgb: sized.rgb,
            },
            strength,
        });
        let direct = engine
            .generate(&request, &mut |_| ControlFlow::Continue(()))
            .unwrap();
        assert_eq!(row.images.len(), direct.images.len());
        for (record, image) in row.images.iter().zip(&direct.images) {
            let png = storage.get(&record.key).await.unwrap();
            let (width, height, rgb) = decode_rgb(&png);
            assert_eq!((width, height), (request.width, request.height));
            assert!(rgb == image.rgb, "job {id} image {}", record.index);
        }
        if id == by_key {
            assert_ne!(
                direct.images[0].rgb, direct.images[1].rgb,
                "each image has its own noise"
            );
            let metrics = stack.db.db.get_metrics(id).await.unwrap().unwrap();
            assert!(metrics.denoising_ms > 0.0);
        }
    }

    for (id, field, code) in &bad_ids {
        let row = stack.wait_terminal(*id, Duration::from_secs(120)).await;
        assert_eq!(row.state, JobState::Failed, "{field}: {row:#?}");
        assert_eq!(row.error_code.as_deref(), Some("invalid_request"));
        let errors = field_errors(&row);
        assert!(
            errors.contains(&(field.to_string(), code.to_string())),
            "expected {field}/{code} in {errors:?}"
        );
        assert!(row.images.is_empty());
    }

    worker.stop().await.unwrap();
    stack.teardown().await;
}
