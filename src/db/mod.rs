//! Postgres: one status row per job (`jobs`), its timings (`job_metrics`), one row per worker
//! process refreshed by its heartbeat (`workers`), the recovery of jobs whose worker lost its
//! lease ([`LeaseSweep`]), and the migrations that create them.
//!
//! All tables live in the configured schema ([`DatabaseConfig::schema`]), created if absent and
//! set as `search_path` on every pooled connection, so several deployments (or tests) can share
//! one database. Queries are built at run time; no database is needed to compile.
//!
//! Every update of a running job names its attempt (`WHERE id = $1 AND attempt = $2 AND state =
//! 'running'`): the attempt is a fencing token, and a stale worker's write affects no row.
//! Every insert and change of state or progress is announced with `pg_notify` on
//! [`NOTIFY_CHANNEL`].

mod api;
mod cache;
mod jobs;
mod lease;
mod types;
mod workers;

use std::time::Duration;

use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor};

use crate::config::{redact_url, DatabaseConfig};

pub use api::{Histogram, MetricsSample, MinuteCount};
pub use cache::CachedResult;
pub use lease::{LeaseSweep, LostJob};
pub use types::{
    CancelOutcome, ImageRecord, JobMetrics, JobRow, JobState, ProgressOutcome, StartOutcome,
};
pub use workers::{DeviceReport, Heartbeat, WorkerRow};

/// The embedded migrations (`migrations/`).
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// Channel of the change notifications (payload: JSON with `schema`, `id`, `state`,
/// `attempt`, `progress_step`, `progress_total`).
pub const NOTIFY_CHANNEL: &str = "sdxl_job_events";

/// Error code recorded on rows of messages that failed validation.
pub const INVALID_REQUEST_CODE: &str = "invalid_request";

/// Why a database operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database schema name {name:?}: {reason}")]
    InvalidSchema { name: String, reason: String },
    #[error("invalid database URL {url}: {source}")]
    InvalidUrl {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot connect to Postgres at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("timed out connecting to Postgres at {url} after {timeout:?}")]
    ConnectTimeout { url: String, timeout: Duration },
    #[error("database migration failed: {source}")]
    Migrate {
        #[source]
        source: MigrateError,
    },
    #[error("database operation `{op}` failed: {source}")]
    Query {
        op: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("stored row of job {id} is malformed: {reason}")]
    Corrupt { id: uuid::Uuid, reason: String },
}

impl DbError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            DbError::InvalidSchema { .. } => "db_invalid_schema",
            DbError::InvalidUrl { .. } => "db_invalid_url",
            DbError::Connect { .. } => "db_connect",
            DbError::ConnectTimeout { .. } => "db_connect_timeout",
            DbError::Migrate { .. } => "db_migrate",
            DbError::Query { .. } => "db_query",
            DbError::Corrupt { .. } => "db_corrupt_row",
        }
    }

    /// Whether trying again later may succeed (the database was unreachable, restarting,
    /// overloaded, or the transaction lost a race).
    pub fn is_retryable(&self) -> bool {
        match self {
            DbError::Connect { .. } | DbError::ConnectTimeout { .. } => true,
            DbError::Query { source, .. } => is_transient(source),
            DbError::InvalidSchema { .. }
            | DbError::InvalidUrl { .. }
            | DbError::Migrate { .. }
            | DbError::Corrupt { .. } => false,
        }
    }
}

fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08")
                || matches!(
                    code.as_ref(),
                    "57P01" | "57P02" | "57P03" | "40001" | "40P01" | "53300"
                )
        }),
        _ => false,
    }
}

pub(crate) fn query_error(op: &'static str) -> impl Fn(sqlx::Error) -> DbError + Copy {
    move |source| DbError::Query { op, source }
}

/// Check a schema name: lowercase ASCII letters, digits and `_`, not starting with a digit,
/// at most 63 bytes (so it never needs quoting).
pub fn check_schema_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !first_ok || !rest_ok || name.len() > 63 {
        return Err(
            "expected 1 to 63 lowercase ASCII letters, digits or '_', not starting with a digit"
                .to_owned(),
        );
    }
    if name.starts_with("pg_") {
        return Err("names starting with pg_ are reserved by Postgres".to_owned());
    }
    Ok(())
}

/// A pool of connections to the job tables.
#[derive(Debug, Clone)]
pub struct Db {
    pool: PgPool,
    schema: String,
}

impl Db {
    /// Connect, create the schema if absent, and open a pool whose connections all use it.
    pub async fn connect(cfg: &DatabaseConfig) -> Result<Db, DbError> {
        check_schema_name(&cfg.schema).map_err(|reason| DbError::InvalidSchema {
            name: cfg.schema.clone(),
            reason,
        })?;
        let url = redact_url(&cfg.url);
        let options: PgConnectOptions = cfg.url.parse().map_err(|source| DbError::InvalidUrl {
            url: url.clone(),
            source,
        })?;
        let options = options.application_name("sdxl-worker");
        let timeout = Duration::from_millis(cfg.acquire_timeout_ms);
        let mut conn = tokio::time::timeout(timeout, options.connect())
            .await
            .map_err(|_| DbError::ConnectTimeout {
                url: url.clone(),
                timeout,
            })?
            .map_err(|source| DbError::Connect {
                url: url.clone(),
                source,
            })?;
        let created = ensure_schema(&mut conn, &cfg.schema).await;
        let _ = conn.close().await;
        created.map_err(query_error("create_schema"))?;
        let set_path = format!("SET search_path TO {}", cfg.schema);
        let pool = PgPoolOptions::new()
            .max_connections(cfg.max_connections)
            .acquire_timeout(timeout)
            .after_connect(move |conn, _meta| {
                let set_path = set_path.clone();
                Box::pin(async move {
                    conn.execute(set_path.as_str()).await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(|source| DbError::Connect { url, source })?;
        Ok(Db {
            pool,
            schema: cfg.schema.clone(),
        })
    }

    /// Apply the embedded migrations (under sqlx's advisory lock, so concurrent processes
    /// migrate one at a time).
    pub async fn migrate(&self) -> Result<(), DbError> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|source| DbError::Migrate { source })
    }

    /// The connection pool (for health checks and `LISTEN`).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The schema holding the tables.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Round trip to the database.
    pub async fn ping(&self) -> Result<(), DbError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(query_error("ping"))
    }

    /// Close every connection of the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Create `schema` unless it exists (checked first: creating needs the CREATE privilege on the
/// database, which a deployment using an existing schema may not have).
async fn ensure_schema(conn: &mut sqlx::PgConnection, schema: &str) -> Result<(), sqlx::Error> {
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(schema)
            .fetch_one(&mut *conn)
            .await?;
    if exists {
        return Ok(());
    }
    let sql = format!("CREATE SCHEMA IF NOT EXISTS {schema}");
    let result = conn.execute(sql.as_str()).await;
    match result {
        Ok(_) => Ok(()),
        // Two processes creating the same schema at once: the loser sees a unique violation.
        Err(sqlx::Error::Database(db))
            if db.code().is_some_and(|c| c == "23505" || c == "42P06") =>
        {
            Ok(())
        }
        Err(err) => Err(err),
    }
}
