//! The `workers` table: one row per worker process, written by its heartbeat.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Row;

use super::{query_error, Db, DbError};

/// One GPU consumer of a worker, as its heartbeat reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceReport {
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// The GPU's name, when NVML reports it.
    pub name: Option<String>,
    pub memory_total_bytes: Option<u64>,
    pub memory_used_bytes: Option<u64>,
    /// Models whose sessions are loaded on this device.
    pub models_loaded: Vec<String>,
    /// The job the consumer is running, if any.
    pub current_job: Option<uuid::Uuid>,
}

/// What a heartbeat writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub worker_id: String,
    pub host: String,
    pub pid: u32,
    pub version: String,
    pub intake: bool,
    pub devices: Vec<DeviceReport>,
    pub started_at: DateTime<Utc>,
}

/// A row of the `workers` table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerRow {
    pub worker_id: String,
    pub host: String,
    pub pid: u32,
    pub version: String,
    pub intake: bool,
    pub devices: Vec<DeviceReport>,
    pub started_at: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub stopped_at: Option<DateTime<Utc>>,
}

impl Db {
    /// Insert or refresh a worker's row (`last_seen` = now, `stopped_at` cleared).
    pub async fn heartbeat(&self, beat: &Heartbeat) -> Result<(), DbError> {
        let devices = serde_json::to_value(&beat.devices).unwrap_or_default();
        sqlx::query(
            "INSERT INTO workers \
                 (worker_id, host, pid, version, intake, devices, started_at, last_seen) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, now()) \
             ON CONFLICT (worker_id) DO UPDATE SET \
                 host = EXCLUDED.host, pid = EXCLUDED.pid, version = EXCLUDED.version, \
                 intake = EXCLUDED.intake, devices = EXCLUDED.devices, \
                 started_at = EXCLUDED.started_at, last_seen = now(), stopped_at = NULL",
        )
        .bind(&beat.worker_id)
        .bind(&beat.host)
        .bind(i32::try_from(beat.pid).unwrap_or(i32::MAX))
        .bind(&beat.version)
        .bind(beat.intake)
        .bind(devices)
        .bind(beat.started_at)
        .execute(self.pool())
        .await
        .map_err(query_error("heartbeat"))?;
        Ok(())
    }

    /// Mark a worker as cleanly stopped.
    pub async fn worker_stopped(&self, worker_id: &str) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE workers SET stopped_at = now(), last_seen = now() WHERE worker_id = $1",
        )
        .bind(worker_id)
        .execute(self.pool())
        .await
        .map_err(query_error("worker_stopped"))?;
        Ok(())
    }

    /// Workers seen within `within` that have not stopped, most recently started first.
    pub async fn live_workers(&self, within: Duration) -> Result<Vec<WorkerRow>, DbError> {
        let rows = sqlx::query(
            "SELECT worker_id, host, pid, version, intake, devices, started_at, last_seen, \
                    stopped_at \
             FROM workers \
             WHERE stopped_at IS NULL AND last_seen > now() - make_interval(secs => $1) \
             ORDER BY started_at DESC, worker_id",
        )
        .bind(within.as_secs_f64())
        .fetch_all(self.pool())
        .await
        .map_err(query_error("live_workers"))?;
        rows.iter().map(worker_row).collect()
    }

    /// Every worker row, most recently seen first (at most `limit`).
    pub async fn list_workers(&self, limit: u32) -> Result<Vec<WorkerRow>, DbError> {
        let rows = sqlx::query(
            "SELECT worker_id, host, pid, version, intake, devices, started_at, last_seen, \
                    stopped_at \
             FROM workers ORDER BY last_seen DESC, worker_id LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await
        .map_err(query_error("list_workers"))?;
        rows.iter().map(worker_row).collect()
    }
}

fn worker_row(row: &sqlx::postgres::PgRow) -> Result<WorkerRow, DbError> {
    let get = |source| DbError::Query {
        op: "read_worker_row",
        source,
    };
    let devices: serde_json::Value = row.try_get("devices").map_err(get)?;
    let pid: i32 = row.try_get("pid").map_err(get)?;
    Ok(WorkerRow {
        worker_id: row.try_get("worker_id").map_err(get)?,
        host: row.try_get("host").map_err(get)?,
        pid: u32::try_from(pid).unwrap_or(0),
        version: row.try_get("version").map_err(get)?,
        intake: row.try_get("intake").map_err(get)?,
        // Rows written by another version may carry other fields: keep what parses.
        devices: serde_json::from_value(devices).unwrap_or_default(),
        started_at: row.try_get("started_at").map_err(get)?,
        last_seen: row.try_get("last_seen").map_err(get)?,
        stopped_at: row.try_get("stopped_at").map_err(get)?,
    })
}
