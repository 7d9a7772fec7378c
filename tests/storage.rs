//! Object storage against a local directory and a real S3 server (moto) over HTTP.

mod support;

use bytes::Bytes;
use sdxl_worker::config::StorageConfig;
use sdxl_worker::storage::Storage;
use support::MotoServer;
use uuid::Uuid;

fn png_like(seed: u8) -> Bytes {
    let mut data = b"\x89PNG\r\n\x1a\n".to_vec();
    data.extend((0..2048u32).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    Bytes::from(data)
}

#[tokio::test]
async fn local_directory_round_trip_with_keys_from_job_ids() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("not/yet/created");
    let cfg = StorageConfig::Local {
        path: root.clone(),
        prefix: "tenant-a".to_owned(),
    };
    let storage = Storage::from_config(&cfg).await.unwrap();
    assert!(root.is_dir(), "the directory is created");

    let job = Uuid::new_v4();
    let key = storage.image_key(job, 1);
    assert_eq!(key, format!("tenant-a/images/{job}/1.png"));
    let bytes = png_like(7);
    storage.put(&key, bytes.clone()).await.unwrap();

    let on_disk = root
        .join("tenant-a/images")
        .join(job.to_string())
        .join("1.png");
    assert_eq!(std::fs::read(&on_disk).unwrap(), bytes.to_vec());
    assert_eq!(storage.get(&key).await.unwrap(), bytes);
    let canonical = std::fs::canonicalize(&on_disk).unwrap();
    assert_eq!(
        storage.describe_location(&key),
        canonical.display().to_string()
    );

    // Writing the same key again (a retried job) replaces the object.
    let second = png_like(9);
    storage.put(&key, second.clone()).await.unwrap();
    assert_eq!(storage.get(&key).await.unwrap(), second);

    storage.delete(&key).await.unwrap();
    let missing = storage.get(&key).await.unwrap_err();
    assert_eq!(missing.code(), "storage_not_found");
    assert!(!missing.is_retryable());
}

#[tokio::test]
async fn keys_that_could_escape_the_root_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StorageConfig::Local {
        path: dir.path().join("images"),
        prefix: String::new(),
    };
    let storage = Storage::from_config(&cfg).await.unwrap();
    for key in ["../outside.png", "/etc/passwd", "a/../../b", ""] {
        let err = storage
            .put(key, Bytes::from_static(b"x"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "storage_invalid_key", "{key:?}");
    }
    assert!(!dir.path().join("outside.png").exists());
    let job = Uuid::new_v4();
    assert_eq!(storage.image_key(job, 0), format!("images/{job}/0.png"));
}

#[tokio::test]
async fn invalid_prefix_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StorageConfig::Local {
        path: dir.path().to_path_buf(),
        prefix: "../up".to_owned(),
    };
    let err = Storage::from_config(&cfg).await.unwrap_err();
    assert_eq!(err.code(), "storage_invalid_config");
}

#[tokio::test]
async fn s3_round_trip_over_http() {
    let server = MotoServer::start();
    let bucket = support::unique_prefix("bucket");
    server.create_bucket(&bucket);
    let prefix = support::unique_prefix("run");
    let cfg = server.storage_config(&bucket, &prefix);
    let storage = Storage::from_config_with_credentials(&cfg, Some(MotoServer::credentials()))
        .await
        .unwrap();

    let job = Uuid::new_v4();
    let keys: Vec<String> = (0..2).map(|i| storage.image_key(job, i)).collect();
    for (i, key) in keys.iter().enumerate() {
        storage.put(key, png_like(i as u8)).await.unwrap();
    }

    // The server holds exactly the keys derived from the job id.
    let mut listed = server.list_keys(&bucket);
    listed.sort();
    let expected: Vec<String> = (0..2)
        .map(|i| format!("{prefix}/images/{job}/{i}.png"))
        .collect();
    assert_eq!(listed, expected);
    assert_eq!(
        server.get_object(&bucket, &expected[1]).await.unwrap(),
        png_like(1).to_vec()
    );

    assert_eq!(storage.get(&keys[0]).await.unwrap(), png_like(0));
    assert_eq!(
        storage.describe_location(&keys[0]),
        format!("s3://{bucket}/{}", keys[0])
    );
    let missing = storage.get(&storage.image_key(job, 5)).await.unwrap_err();
    assert_eq!(missing.code(), "storage_not_found");
}

#[tokio::test]
async fn s3_outage_is_a_retryable_error() {
    let server = MotoServer::start();
    let bucket = support::unique_prefix("bucket");
    server.create_bucket(&bucket);
    let cfg = server.storage_config(&bucket, "");
    let storage = Storage::from_config_with_credentials(&cfg, Some(MotoServer::credentials()))
        .await
        .unwrap();
    let key = storage.image_key(Uuid::new_v4(), 0);
    storage.put(&key, png_like(3)).await.unwrap();

    drop(server);
    let err = storage.put(&key, png_like(4)).await.unwrap_err();
    assert_eq!(err.code(), "storage_backend");
    assert!(err.is_retryable(), "{err}");
}

#[tokio::test]
async fn s3_missing_bucket_is_reported() {
    let server = MotoServer::start();
    let cfg = server.storage_config("no-such-bucket", "");
    let storage = Storage::from_config_with_credentials(&cfg, Some(MotoServer::credentials()))
        .await
        .unwrap();
    let err = storage
        .put(&storage.image_key(Uuid::new_v4(), 0), png_like(1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "storage_backend");
}

#[tokio::test]
async fn s3_configuration_requires_a_bucket() {
    let cfg = StorageConfig::S3 {
        endpoint: Some("http://127.0.0.1:9".to_owned()),
        region: "us-east-1".to_owned(),
        bucket: String::new(),
        prefix: String::new(),
        allow_http: true,
        path_style: true,
    };
    let err = Storage::from_config_with_credentials(&cfg, Some(MotoServer::credentials()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "storage_invalid_config");
}

#[test]
fn credentials_never_show_their_secrets() {
    let creds = sdxl_worker::storage::S3Credentials {
        access_key_id: "AKIAEXAMPLEKEY".to_owned(),
        secret_access_key: "wJalrXUtnFEMI/K7MDENG".to_owned(),
        session_token: Some("FwoGZXIvYXdzEBYaDH".to_owned()),
    };
    let debug = format!("{creds:?}");
    assert!(
        !debug.contains("wJalrXUtnFEMI") && !debug.contains("FwoGZXIv"),
        "{debug}"
    );
    assert!(!debug.contains("AKIAEXAMPLEKEY"), "{debug}");
    assert!(debug.contains("AKIA****"), "{debug}");
}
