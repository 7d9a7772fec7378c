//! Lease recovery: finding the `running` jobs whose worker is gone.
//!
//! A worker holds a lease on the jobs it runs for as long as its heartbeat (`workers.last_seen`)
//! is younger than the lease. A `running` row is lost when its worker's heartbeat is older,
//! its worker stopped, it has no worker row, or its worker restarted after the attempt began.
//! A [`LeaseSweep`] locks such rows (one sweep at a time per schema, under a transaction-level
//! advisory lock) so that the caller can publish each job again and then requeue it, or fail
//! it, in the same transaction. Every change names the attempt it recovers (the fencing token),
//! so a sweep never touches an attempt that started meanwhile.

use std::time::Duration;

use sqlx::types::Json;
use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use super::{query_error, Db, DbError};

/// A `running` job whose worker lost its lease.
#[derive(Debug, Clone, PartialEq)]
pub struct LostJob {
    pub id: Uuid,
    /// The attempt that was running (the fencing token of the recovery).
    pub attempt: i32,
    pub priority: i16,
    /// The normalized job message, as recorded.
    pub request: serde_json::Value,
    pub worker_id: Option<String>,
}

/// One sweep in progress: the lost jobs, locked until [`LeaseSweep::commit`].
pub struct LeaseSweep {
    tx: Transaction<'static, Postgres>,
    pub jobs: Vec<LostJob>,
}

impl Db {
    /// Starts a sweep for jobs whose worker's heartbeat is older than `lease` (at most `limit`
    /// of them). `None` when another process is sweeping this schema right now.
    pub async fn begin_lease_sweep(
        &self,
        lease: Duration,
        limit: u32,
    ) -> Result<Option<LeaseSweep>, DbError> {
        let op = "lease_sweep";
        let mut tx = self.pool().begin().await.map_err(query_error(op))?;
        let locked: bool = sqlx::query_scalar(
            "SELECT pg_try_advisory_xact_lock(hashtext(current_schema() || '.sdxl_lease_sweep'))",
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(query_error(op))?;
        if !locked {
            tx.rollback().await.map_err(query_error(op))?;
            return Ok(None);
        }
        let rows = sqlx::query(
            "SELECT j.id, j.attempt, j.priority, j.request, j.worker_id FROM jobs j \
             LEFT JOIN workers w ON w.worker_id = j.worker_id \
             WHERE j.state = 'running' \
               AND j.updated_at < now() - make_interval(secs => $1) \
               AND (w.worker_id IS NULL OR w.stopped_at IS NOT NULL \
                    OR w.last_seen < now() - make_interval(secs => $1) \
                    OR w.started_at > j.started_at) \
             ORDER BY j.updated_at LIMIT $2 FOR UPDATE OF j SKIP LOCKED",
        )
        .bind(lease.as_secs_f64())
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(query_error(op))?;
        let jobs = rows
            .iter()
            .map(|row| {
                let Json(request): Json<serde_json::Value> = row.try_get("request")?;
                Ok(LostJob {
                    id: row.try_get("id")?,
                    attempt: row.try_get("attempt")?,
                    priority: row.try_get("priority")?,
                    request,
                    worker_id: row.try_get("worker_id")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(query_error(op))?;
        Ok(Some(LeaseSweep { tx, jobs }))
    }
}

impl LeaseSweep {
    /// Returns a lost attempt's job to `queued` (once its message is published again).
    pub async fn requeue(&mut self, id: Uuid, attempt: i32) -> Result<bool, DbError> {
        let result = sqlx::query(
            "UPDATE jobs SET state = 'queued', queued_at = now(), progress_step = NULL, \
             progress_total = NULL, updated_at = now() \
             WHERE id = $1 AND attempt = $2 AND state = 'running'",
        )
        .bind(id)
        .bind(attempt)
        .execute(&mut *self.tx)
        .await
        .map_err(query_error("lease_requeue"))?;
        Ok(result.rows_affected() == 1)
    }

    /// Fails a lost attempt's job with `code` and `message`.
    pub async fn fail(
        &mut self,
        id: Uuid,
        attempt: i32,
        code: &str,
        message: &str,
    ) -> Result<bool, DbError> {
        let result = sqlx::query(
            "UPDATE jobs SET state = 'failed', error_code = $3, error_message = $4, \
             finished_at = now(), updated_at = now() \
             WHERE id = $1 AND attempt = $2 AND state = 'running'",
        )
        .bind(id)
        .bind(attempt)
        .bind(code)
        .bind(message)
        .execute(&mut *self.tx)
        .await
        .map_err(query_error("lease_fail"))?;
        Ok(result.rows_affected() == 1)
    }

    /// Makes the sweep's changes visible and releases its locks.
    pub async fn commit(self) -> Result<(), DbError> {
        self.tx.commit().await.map_err(query_error("lease_sweep"))
    }
}
