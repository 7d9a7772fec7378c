//! Object storage for generated images: an S3-compatible bucket or a local directory.
//!
//! Keys are derived by the server from the job id and the image index
//! (`{prefix}images/{job}/{index}.png`), never from user input, so a message cannot choose where
//! its images go. Writes are whole-object puts (atomic renames on the local backend), so writing
//! the same key again after a failure is harmless.
//!
//! S3 credentials come from `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and
//! `AWS_SESSION_TOKEN`; without them the instance's metadata service is asked.

use std::fmt;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore, PutPayload, RetryConfig};
use uuid::Uuid;

use crate::config::StorageConfig;

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("invalid storage configuration: {reason}")]
    InvalidConfig {
        reason: String,
        #[source]
        source: Option<object_store::Error>,
    },
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey { key: String, reason: String },
    #[error("cannot create storage directory {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("object {key:?} not found")]
    NotFound {
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("storage {op} of {key:?} failed: {source}")]
    Backend {
        op: &'static str,
        key: String,
        #[source]
        source: object_store::Error,
    },
}

impl StorageError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            StorageError::InvalidConfig { .. } => "storage_invalid_config",
            StorageError::InvalidKey { .. } => "storage_invalid_key",
            StorageError::CreateDir { .. } => "storage_create_dir",
            StorageError::NotFound { .. } => "storage_not_found",
            StorageError::Backend { .. } => "storage_backend",
        }
    }

    /// Whether trying again later may succeed (network errors, server errors, throttling).
    pub fn is_retryable(&self) -> bool {
        match self {
            StorageError::Backend { source, .. } => !matches!(
                source,
                object_store::Error::InvalidPath { .. }
                    | object_store::Error::NotSupported { .. }
                    | object_store::Error::NotImplemented
                    | object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
                    | object_store::Error::UnknownConfigurationKey { .. }
            ),
            StorageError::InvalidConfig { .. }
            | StorageError::InvalidKey { .. }
            | StorageError::CreateDir { .. }
            | StorageError::NotFound { .. } => false,
        }
    }
}

/// S3 credentials. `Debug` never shows the secret parts.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl S3Credentials {
    /// From `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and (optional) `AWS_SESSION_TOKEN`;
    /// `None` unless both of the first two are set.
    pub fn from_env() -> Option<S3Credentials> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Some(S3Credentials {
            access_key_id: var("AWS_ACCESS_KEY_ID")?,
            secret_access_key: var("AWS_SECRET_ACCESS_KEY")?,
            session_token: var("AWS_SESSION_TOKEN"),
        })
    }
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: String = self.access_key_id.chars().take(4).collect();
        f.debug_struct("S3Credentials")
            .field("access_key_id", &format!("{shown}****"))
            .field("secret_access_key", &"****")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "****"),
            )
            .finish()
    }
}

#[derive(Debug, Clone)]
enum Location {
    Local { root: PathBuf },
    S3 { bucket: String },
}

/// A connected storage backend with its key prefix.
#[derive(Debug, Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    /// Presigns URLs (S3 only).
    signer: Option<Arc<dyn object_store::signer::Signer>>,
    prefix: String,
    location: Location,
}

impl Storage {
    /// Open the configured backend (S3 credentials from the `AWS_*` environment variables).
    pub async fn from_config(cfg: &StorageConfig) -> Result<Storage, StorageError> {
        Storage::from_config_with_credentials(cfg, S3Credentials::from_env()).await
    }

    /// Open the configured backend with explicit S3 credentials (ignored for local storage;
    /// `None` falls back to the instance's metadata service).
    pub async fn from_config_with_credentials(
        cfg: &StorageConfig,
        credentials: Option<S3Credentials>,
    ) -> Result<Storage, StorageError> {
        let prefix =
            normalize_prefix(cfg.prefix()).map_err(|reason| StorageError::InvalidConfig {
                reason: format!("prefix: {reason}"),
                source: None,
            })?;
        match cfg {
            StorageConfig::Local { path, .. } => open_local(path, prefix).await,
            StorageConfig::S3 {
                endpoint,
                region,
                bucket,
                allow_http,
                path_style,
                ..
            } => {
                if bucket.trim().is_empty() {
                    return Err(StorageError::InvalidConfig {
                        reason: "the S3 bucket name is empty".to_owned(),
                        source: None,
                    });
                }
                // Client options first: they replace any earlier `with_allow_http`.
                let mut builder = AmazonS3Builder::new()
                    .with_client_options(
                        ClientOptions::new()
                            .with_connect_timeout(Duration::from_secs(5))
                            .with_timeout(Duration::from_secs(60)),
                    )
                    .with_bucket_name(bucket)
                    .with_region(region)
                    .with_allow_http(*allow_http)
                    .with_virtual_hosted_style_request(!*path_style)
                    .with_retry(RetryConfig {
                        max_retries: 3,
                        retry_timeout: Duration::from_secs(30),
                        ..RetryConfig::default()
                    });
                if let Some(endpoint) = endpoint {
                    builder = builder.with_endpoint(endpoint);
                }
                if let Some(c) = credentials {
                    builder = builder
                        .with_access_key_id(c.access_key_id)
                        .with_secret_access_key(c.secret_access_key);
                    if let Some(token) = c.session_token {
                        builder = builder.with_token(token);
                    }
                }
                let store = builder
                    .build()
                    .map_err(|source| StorageError::InvalidConfig {
                        reason: format!("S3 bucket {bucket:?}"),
                        source: Some(source),
                    })?;
                let store = Arc::new(store);
                Ok(Storage {
                    signer: Some(store.clone()),
                    store,
                    prefix,
                    location: Location::S3 {
                        bucket: bucket.clone(),
                    },
                })
            }
        }
    }

    /// The key of image `index` of job `job`: `{prefix}images/{job}/{index}.png`.
    pub fn image_key(&self, job: Uuid, index: u32) -> String {
        format!("{}images/{}/{index}.png", self.prefix, job.hyphenated())
    }

    /// The key prefix (empty, or ending in `/`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Write `bytes` under `key`, replacing any object already there.
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StorageError> {
        let path = object_path(key)?;
        self.store
            .put(&path, PutPayload::from_bytes(bytes))
            .await
            .map(|_| ())
            .map_err(|source| StorageError::Backend {
                op: "put",
                key: key.to_owned(),
                source,
            })
    }

    /// Read the object under `key`.
    pub async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        let path = object_path(key)?;
        let fail = |source: object_store::Error| match source {
            object_store::Error::NotFound { .. } => StorageError::NotFound {
                key: key.to_owned(),
                source,
            },
            source => StorageError::Backend {
                op: "get",
                key: key.to_owned(),
                source,
            },
        };
        let result = self.store.get(&path).await.map_err(fail)?;
        result.bytes().await.map_err(fail)
    }

    /// Delete the object under `key` (absent objects are not an error).
    pub async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let path = object_path(key)?;
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(StorageError::Backend {
                op: "delete",
                key: key.to_owned(),
                source,
            }),
        }
    }

    /// A time-limited URL that reads the object under `key` without credentials, or `None`
    /// when the backend cannot presign (local storage).
    pub async fn presigned_get_url(
        &self,
        key: &str,
        ttl: Duration,
    ) -> Option<Result<String, StorageError>> {
        let signer = self.signer.as_ref()?;
        let path = match object_path(key) {
            Ok(path) => path,
            Err(err) => return Some(Err(err)),
        };
        Some(
            signer
                .signed_url(http::Method::GET, &path, ttl)
                .await
                .map(|url| url.to_string())
                .map_err(|source| StorageError::Backend {
                    op: "presign",
                    key: key.to_owned(),
                    source,
                }),
        )
    }

    /// Round trip to the backend: a metadata read of a key that need not exist.
    pub async fn ping(&self) -> Result<(), StorageError> {
        let key = format!("{}readyz-probe", self.prefix);
        let path = object_path(&key)?;
        match self.store.head(&path).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(StorageError::Backend {
                op: "head",
                key,
                source,
            }),
        }
    }

    /// Where `key` lives, for humans: a file path or `s3://bucket/key`.
    pub fn describe_location(&self, key: &str) -> String {
        match &self.location {
            Location::Local { root } => root.join(key).display().to_string(),
            Location::S3 { bucket } => format!("s3://{bucket}/{key}"),
        }
    }
}

async fn open_local(path: &FsPath, prefix: String) -> Result<Storage, StorageError> {
    let create = |source| StorageError::CreateDir {
        path: path.to_path_buf(),
        source,
    };
    tokio::fs::create_dir_all(path).await.map_err(create)?;
    let root = tokio::fs::canonicalize(path).await.map_err(create)?;
    let store =
        LocalFileSystem::new_with_prefix(&root).map_err(|source| StorageError::InvalidConfig {
            reason: format!("local directory {}", root.display()),
            source: Some(source),
        })?;
    Ok(Storage {
        store: Arc::new(store),
        signer: None,
        prefix,
        location: Location::Local { root },
    })
}

/// Check a key: relative, `/`-separated, no empty, `.` or `..` segments, no `\` or control
/// characters.
fn object_path(key: &str) -> Result<Path, StorageError> {
    let invalid = |reason: &str| StorageError::InvalidKey {
        key: key.to_owned(),
        reason: reason.to_owned(),
    };
    if key.is_empty() {
        return Err(invalid("empty"));
    }
    check_segments(key).map_err(|reason| invalid(&reason))?;
    Path::parse(key).map_err(|e| invalid(&e.to_string()))
}

fn check_segments(text: &str) -> Result<(), String> {
    if text.starts_with('/') {
        return Err("must not start with '/'".to_owned());
    }
    if text.chars().any(|c| c == '\\' || c.is_control()) {
        return Err("must not contain '\\' or control characters".to_owned());
    }
    for segment in text.split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return Err(format!("invalid segment {segment:?}"));
        }
    }
    Ok(())
}

/// Normalize a key prefix: empty stays empty, anything else is checked like a key and ends
/// in exactly one `/`.
pub fn normalize_prefix(prefix: &str) -> Result<String, String> {
    let trimmed = prefix.trim().trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    check_segments(trimmed)?;
    Ok(format!("{trimmed}/"))
}

#[cfg(test)]
mod tests {
    use super::{normalize_prefix, object_path};

    #[test]
    fn prefixes_are_normalized_and_checked() {
        assert_eq!(normalize_prefix("").unwrap(), "");
        assert_eq!(normalize_prefix("/").unwrap(), "");
        assert_eq!(normalize_prefix("tenant-a").unwrap(), "tenant-a/");
        assert_eq!(normalize_prefix("a/b//").unwrap(), "a/b/");
        assert!(normalize_prefix("../escape").is_err());
        assert!(normalize_prefix("/abs").is_err());
        assert!(normalize_prefix("a//b").is_err());
    }

    #[test]
    fn keys_cannot_escape() {
        assert!(object_path("images/x/0.png").is_ok());
        for bad in ["", "/etc/passwd", "../x", "a/../b", "a//b", "a\\b", "a/./b"] {
            assert!(object_path(bad).is_err(), "{bad:?} accepted");
        }
    }
}
