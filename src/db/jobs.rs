//! State changes of job rows and their metrics.

use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::Row;
use uuid::Uuid;

use super::types::{
    CancelOutcome, ImageRecord, JobMetrics, JobRow, JobState, ProgressOutcome, StartOutcome,
};
use super::{query_error, Db, DbError, INVALID_REQUEST_CODE};
use crate::job::{summarize, FieldError, ValidJob};

const JOB_COLUMNS: &str = "id, state, model, priority, request, attempt, worker_id, device, \
    progress_step, progress_total, images, error_code, error_message, error_details, \
    cancel_requested, created_at, queued_at, started_at, finished_at, updated_at";

impl Db {
    /// Insert the `queued` row of a valid job. Returns `false` when a row with this id already
    /// exists (a duplicate publish); the existing row is left as it is.
    pub async fn insert_queued(&self, job: &ValidJob) -> Result<bool, DbError> {
        let result = sqlx::query(
            "INSERT INTO jobs (id, state, model, priority, request, queued_at) \
             VALUES ($1, 'queued', $2, $3, $4, now()) ON CONFLICT (id) DO NOTHING",
        )
        .bind(job.id)
        .bind(&job.model)
        .bind(i16::from(job.priority))
        .bind(Json(job.request_json()))
        .execute(self.pool())
        .await
        .map_err(query_error("insert_queued"))?;
        Ok(result.rows_affected() == 1)
    }

    /// Record a message that failed validation as a `failed` row with code `invalid_request`
    /// and the field errors in `error_details.errors`. A row that already exists is kept.
    pub async fn insert_invalid(
        &self,
        id: Uuid,
        body: &serde_json::Value,
        errors: &[FieldError],
    ) -> Result<(), DbError> {
        let details = scrub_json(serde_json::json!({ "errors": errors }));
        let message = scrub_text(&format!("invalid job message: {}", summarize(errors)));
        let body = scrub_json(body.clone());
        sqlx::query(
            "INSERT INTO jobs (id, state, request, error_code, error_message, error_details, \
             finished_at) VALUES ($1, 'failed', $2, $3, $4, $5, now()) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .bind(Json(&body))
        .bind(INVALID_REQUEST_CODE)
        .bind(message)
        .bind(Json(details))
        .execute(self.pool())
        .await
        .map_err(query_error("insert_invalid"))?;
        Ok(())
    }

    /// Start a new attempt of a queued job, or, with `take_over_running`, of a running one
    /// whose worker is gone (its message was redelivered); without it a running job gives
    /// [`StartOutcome::InHand`]. The attempt number grows by one and fences out the previous
    /// attempt. A job whose cancellation was asked for becomes `cancelled`.
    pub async fn start_attempt(
        &self,
        id: Uuid,
        worker_id: &str,
        device: &str,
        take_over_running: bool,
    ) -> Result<StartOutcome, DbError> {
        self.start_attempt_leased(id, worker_id, device, take_over_running, None)
            .await
    }

    /// [`Db::start_attempt`], where a running job is taken over only when its worker has
    /// lost its lease: with `Some(lease)`, a running attempt of another worker whose heartbeat
    /// is younger than `lease` (and which has not restarted since the attempt began) stays in
    /// its hands ([`StartOutcome::InHand`]), even for a redelivered message: the broker
    /// redelivers a job whose worker is alive after a broker restart or a consumer timeout.
    pub async fn start_attempt_leased(
        &self,
        id: Uuid,
        worker_id: &str,
        device: &str,
        take_over_running: bool,
        lease: Option<std::time::Duration>,
    ) -> Result<StartOutcome, DbError> {
        let op = "start_attempt";
        let mut tx = self.pool().begin().await.map_err(query_error(op))?;
        let row = sqlx::query(
            "SELECT j.state, j.cancel_requested, \
                 ($2::float8 IS NOT NULL AND j.worker_id IS DISTINCT FROM $3 AND EXISTS ( \
                     SELECT 1 FROM workers w WHERE w.worker_id = j.worker_id \
                     AND w.stopped_at IS NULL \
                     AND w.last_seen > now() - make_interval(secs => $2) \
                     AND (j.started_at IS NULL OR w.started_at <= j.started_at))) AS owner_live \
             FROM jobs j WHERE j.id = $1 FOR UPDATE OF j",
        )
        .bind(id)
        .bind(lease.map(|l| l.as_secs_f64()))
        .bind(worker_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(query_error(op))?;
        let Some(row) = row else {
            tx.rollback().await.map_err(query_error(op))?;
            return Ok(StartOutcome::NotFound);
        };
        let state = parse_state(id, row.try_get("state").map_err(query_error(op))?)?;
        let cancel_requested: bool = row.try_get("cancel_requested").map_err(query_error(op))?;
        let owner_live: bool = row.try_get("owner_live").map_err(query_error(op))?;
        if state.is_terminal() {
            tx.rollback().await.map_err(query_error(op))?;
            return Ok(StartOutcome::AlreadyTerminal(state));
        }
        if cancel_requested {
            sqlx::query(
                "UPDATE jobs SET state = 'cancelled', finished_at = now(), updated_at = now() \
                 WHERE id = $1",
            )
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(query_error(op))?;
            tx.commit().await.map_err(query_error(op))?;
            return Ok(StartOutcome::AlreadyTerminal(JobState::Cancelled));
        }
        if state == JobState::Running && (!take_over_running || owner_live) {
            tx.rollback().await.map_err(query_error(op))?;
            return Ok(StartOutcome::InHand);
        }
        let row = sqlx::query(
            "UPDATE jobs SET state = 'running', attempt = attempt + 1, worker_id = $2, \
             device = $3, started_at = now(), progress_step = 0, progress_total = NULL, \
             queued_at = COALESCE(queued_at, created_at), updated_at = now() \
             WHERE id = $1 RETURNING attempt, queued_at",
        )
        .bind(id)
        .bind(worker_id)
        .bind(device)
        .fetch_one(&mut *tx)
        .await
        .map_err(query_error(op))?;
        tx.commit().await.map_err(query_error(op))?;
        Ok(StartOutcome::Started {
            attempt: row.try_get("attempt").map_err(query_error(op))?,
            queued_at: row.try_get("queued_at").map_err(query_error(op))?,
        })
    }

    /// Record progress of a running attempt. `false` when the attempt no longer owns the job.
    pub async fn update_progress(
        &self,
        id: Uuid,
        attempt: i32,
        step: i32,
        total: i32,
    ) -> Result<bool, DbError> {
        let outcome = self.record_progress(id, attempt, step, total).await?;
        Ok(outcome != ProgressOutcome::Lost)
    }

    /// Record progress of a running attempt and report whether a cancellation was asked for.
    pub async fn record_progress(
        &self,
        id: Uuid,
        attempt: i32,
        step: i32,
        total: i32,
    ) -> Result<ProgressOutcome, DbError> {
        let row = sqlx::query(
            "UPDATE jobs SET progress_step = $3, progress_total = $4, updated_at = now() \
             WHERE id = $1 AND attempt = $2 AND state = 'running' RETURNING cancel_requested",
        )
        .bind(id)
        .bind(attempt)
        .bind(step)
        .bind(total)
        .fetch_optional(self.pool())
        .await
        .map_err(query_error("update_progress"))?;
        Ok(match row {
            None => ProgressOutcome::Lost,
            Some(row) => {
                let cancel: bool = row
                    .try_get("cancel_requested")
                    .map_err(query_error("update_progress"))?;
                if cancel {
                    ProgressOutcome::CancelRequested
                } else {
                    ProgressOutcome::Recorded
                }
            }
        })
    }

    /// Mark a running attempt `succeeded` with its images and store its metrics, in one
    /// transaction. `false` (and nothing written) when the attempt no longer owns the job.
    pub async fn succeed(
        &self,
        id: Uuid,
        attempt: i32,
        images: &[ImageRecord],
        metrics: &JobMetrics,
    ) -> Result<bool, DbError> {
        let op = "succeed";
        let mut tx = self.pool().begin().await.map_err(query_error(op))?;
        let updated = sqlx::query(
            "UPDATE jobs SET state = 'succeeded', images = $3, finished_at = now(), \
             progress_step = COALESCE(progress_total, progress_step), updated_at = now(), \
             error_code = NULL, error_message = NULL, error_details = NULL \
             WHERE id = $1 AND attempt = $2 AND state = 'running'",
        )
        .bind(id)
        .bind(attempt)
        .bind(Json(images))
        .execute(&mut *tx)
        .await
        .map_err(query_error(op))?;
        if updated.rows_affected() == 0 {
            tx.rollback().await.map_err(query_error(op))?;
            return Ok(false);
        }
        let peak = metrics
            .peak_gpu_mem_bytes
            .map(|b| i64::try_from(b).unwrap_or(i64::MAX));
        sqlx::query(
            "INSERT INTO job_metrics (job_id, queue_wait_ms, model_load_ms, text_encoding_ms, \
             denoising_ms, step_ms, session_run_ms, vae_ms, png_ms, upload_ms, total_ms, \
             peak_gpu_mem_bytes, controlnet_ms, refiner_ms, batch_size) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
             ON CONFLICT (job_id) DO UPDATE SET queue_wait_ms = EXCLUDED.queue_wait_ms, \
             model_load_ms = EXCLUDED.model_load_ms, \
             text_encoding_ms = EXCLUDED.text_encoding_ms, denoising_ms = EXCLUDED.denoising_ms, \
             step_ms = EXCLUDED.step_ms, session_run_ms = EXCLUDED.session_run_ms, \
             vae_ms = EXCLUDED.vae_ms, png_ms = EXCLUDED.png_ms, upload_ms = EXCLUDED.upload_ms, \
             total_ms = EXCLUDED.total_ms, peak_gpu_mem_bytes = EXCLUDED.peak_gpu_mem_bytes, \
             controlnet_ms = EXCLUDED.controlnet_ms, refiner_ms = EXCLUDED.refiner_ms, \
             batch_size = EXCLUDED.batch_size, recorded_at = now()",
        )
        .bind(id)
        .bind(metrics.queue_wait_ms)
        .bind(metrics.model_load_ms)
        .bind(metrics.text_encoding_ms)
        .bind(metrics.denoising_ms)
        .bind(&metrics.step_ms)
        .bind(metrics.session_run_ms)
        .bind(metrics.vae_ms)
        .bind(metrics.png_ms)
        .bind(metrics.upload_ms)
        .bind(metrics.total_ms)
        .bind(peak)
        .bind(metrics.controlnet_ms)
        .bind(metrics.refiner_ms)
        .bind(i32::try_from(metrics.batch_size).unwrap_or(i32::MAX))
        .execute(&mut *tx)
        .await
        .map_err(query_error(op))?;
        tx.commit().await.map_err(query_error(op))?;
        Ok(true)
    }

    /// Mark a job `failed`. With `Some(attempt)` only that running attempt may do it; with
    /// `None` any job that is not yet terminal is failed (for failures outside an attempt).
    /// `false` when nothing changed.
    pub async fn fail(
        &self,
        id: Uuid,
        attempt: Option<i32>,
        code: &str,
        message: &str,
        details: Option<serde_json::Value>,
    ) -> Result<bool, DbError> {
        let condition = match attempt {
            Some(_) => "attempt = $2 AND state = 'running'",
            None => "($2::integer IS NULL) AND state IN ('queued', 'running')",
        };
        let sql = format!(
            "UPDATE jobs SET state = 'failed', error_code = $3, error_message = $4, \
             error_details = $5, finished_at = now(), updated_at = now() \
             WHERE id = $1 AND {condition}"
        );
        let result = sqlx::query(&sql)
            .bind(id)
            .bind(attempt)
            .bind(scrub_text(code))
            .bind(scrub_text(message))
            .bind(details.map(|d| Json(scrub_json(d))))
            .execute(self.pool())
            .await
            .map_err(query_error("fail"))?;
        Ok(result.rows_affected() == 1)
    }

    /// Return a running attempt's job to `queued` (after a retryable failure). `false` when
    /// the attempt no longer owns the job.
    pub async fn requeue(&self, id: Uuid, attempt: i32) -> Result<bool, DbError> {
        let result = sqlx::query(
            "UPDATE jobs SET state = 'queued', queued_at = now(), progress_step = NULL, \
             progress_total = NULL, updated_at = now() \
             WHERE id = $1 AND attempt = $2 AND state = 'running'",
        )
        .bind(id)
        .bind(attempt)
        .execute(self.pool())
        .await
        .map_err(query_error("requeue"))?;
        Ok(result.rows_affected() == 1)
    }

    /// Cancel a job: a queued one at once; a running one is flagged, and its worker stops at
    /// its next progress update ([`ProgressOutcome::CancelRequested`]).
    pub async fn cancel(&self, id: Uuid) -> Result<CancelOutcome, DbError> {
        let op = "cancel";
        let mut tx = self.pool().begin().await.map_err(query_error(op))?;
        let row = sqlx::query("SELECT state, attempt FROM jobs WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(query_error(op))?;
        let Some(row) = row else {
            tx.rollback().await.map_err(query_error(op))?;
            return Ok(CancelOutcome::NotFound);
        };
        let state = parse_state(id, row.try_get("state").map_err(query_error(op))?)?;
        let attempt: i32 = row.try_get("attempt").map_err(query_error(op))?;
        let (sql, outcome) = match state {
            JobState::Queued => (
                "UPDATE jobs SET state = 'cancelled', finished_at = now(), updated_at = now() \
                 WHERE id = $1",
                CancelOutcome::Cancelled,
            ),
            JobState::Running => (
                "UPDATE jobs SET cancel_requested = true, updated_at = now() WHERE id = $1",
                CancelOutcome::Requested { attempt },
            ),
            terminal => {
                tx.rollback().await.map_err(query_error(op))?;
                return Ok(CancelOutcome::AlreadyTerminal(terminal));
            }
        };
        sqlx::query(sql)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(query_error(op))?;
        tx.commit().await.map_err(query_error(op))?;
        Ok(outcome)
    }

    /// Mark a running attempt `cancelled` (after it saw the cancellation). `false` when the
    /// attempt no longer owns the job.
    pub async fn finish_cancelled(&self, id: Uuid, attempt: i32) -> Result<bool, DbError> {
        let result = sqlx::query(
            "UPDATE jobs SET state = 'cancelled', finished_at = now(), updated_at = now() \
             WHERE id = $1 AND attempt = $2 AND state = 'running'",
        )
        .bind(id)
        .bind(attempt)
        .execute(self.pool())
        .await
        .map_err(query_error("finish_cancelled"))?;
        Ok(result.rows_affected() == 1)
    }

    /// The row of job `id`, or `None` when no job has this id.
    pub async fn get(&self, id: Uuid) -> Result<Option<JobRow>, DbError> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .map_err(query_error("get"))?;
        row.map(|r| job_row(id, &r)).transpose()
    }

    /// The most recent jobs (newest first), optionally only those in `state`.
    pub async fn list(&self, state: Option<JobState>, limit: u32) -> Result<Vec<JobRow>, DbError> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE ($1::text IS NULL OR state = $1) \
             ORDER BY created_at DESC, id LIMIT $2"
        );
        let rows = sqlx::query(&sql)
            .bind(state.map(JobState::as_str))
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await
            .map_err(query_error("list"))?;
        rows.iter()
            .map(|r| {
                let id: Uuid = r.try_get("id").map_err(query_error("list"))?;
                job_row(id, r)
            })
            .collect()
    }

    /// The metrics of job `id`, or `None` when it has none (yet).
    pub async fn get_metrics(&self, id: Uuid) -> Result<Option<JobMetrics>, DbError> {
        let row = sqlx::query(
            "SELECT queue_wait_ms, model_load_ms, text_encoding_ms, denoising_ms, step_ms, \
             session_run_ms, vae_ms, png_ms, upload_ms, total_ms, peak_gpu_mem_bytes, \
             controlnet_ms, refiner_ms, batch_size FROM job_metrics WHERE job_id = $1",
        )
        .bind(id)
        .fetch_optional(self.pool())
        .await
        .map_err(query_error("get_metrics"))?;
        row.map(|r| metrics_row(&r))
            .transpose()
            .map_err(query_error("get_metrics"))
    }
}

/// Postgres `text` and `jsonb` cannot hold NUL characters: replace them (U+FFFD) in text that
/// comes from outside, so recording a bad message can never fail because of them.
fn scrub_text(text: &str) -> String {
    text.replace('\0', "\u{fffd}")
}

fn scrub_json(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::String(text) => Value::String(scrub_text(&text)),
        Value::Array(items) => Value::Array(items.into_iter().map(scrub_json).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (scrub_text(&k), scrub_json(v)))
                .collect(),
        ),
        other => other,
    }
}

fn parse_state(id: Uuid, text: String) -> Result<JobState, DbError> {
    JobState::parse(&text).ok_or_else(|| DbError::Corrupt {
        id,
        reason: format!("unknown state {text:?}"),
    })
}

fn job_row(id: Uuid, r: &PgRow) -> Result<JobRow, DbError> {
    let get = query_error("get");
    let state = parse_state(id, r.try_get("state").map_err(get)?)?;
    let priority: i16 = r.try_get("priority").map_err(get)?;
    let Json(images): Json<Vec<ImageRecord>> = r.try_get("images").map_err(get)?;
    let error_details: Option<Json<serde_json::Value>> = r.try_get("error_details").map_err(get)?;
    let Json(request): Json<serde_json::Value> = r.try_get("request").map_err(get)?;
    Ok(JobRow {
        id,
        state,
        model: r.try_get("model").map_err(get)?,
        priority: u8::try_from(priority).map_err(|_| DbError::Corrupt {
            id,
            reason: format!("priority {priority} out of range"),
        })?,
        request,
        attempt: r.try_get("attempt").map_err(get)?,
        worker_id: r.try_get("worker_id").map_err(get)?,
        device: r.try_get("device").map_err(get)?,
        progress_step: r.try_get("progress_step").map_err(get)?,
        progress_total: r.try_get("progress_total").map_err(get)?,
        images,
        error_code: r.try_get("error_code").map_err(get)?,
        error_message: r.try_get("error_message").map_err(get)?,
        error_details: error_details.map(|Json(v)| v),
        cancel_requested: r.try_get("cancel_requested").map_err(get)?,
        created_at: r.try_get("created_at").map_err(get)?,
        queued_at: r.try_get("queued_at").map_err(get)?,
        started_at: r.try_get("started_at").map_err(get)?,
        finished_at: r.try_get("finished_at").map_err(get)?,
        updated_at: r.try_get("updated_at").map_err(get)?,
    })
}

fn metrics_row(r: &PgRow) -> Result<JobMetrics, sqlx::Error> {
    let peak: Option<i64> = r.try_get("peak_gpu_mem_bytes")?;
    Ok(JobMetrics {
        queue_wait_ms: r.try_get("queue_wait_ms")?,
        model_load_ms: r.try_get("model_load_ms")?,
        text_encoding_ms: r.try_get("text_encoding_ms")?,
        denoising_ms: r.try_get("denoising_ms")?,
        step_ms: r.try_get("step_ms")?,
        session_run_ms: r.try_get("session_run_ms")?,
        vae_ms: r.try_get("vae_ms")?,
        png_ms: r.try_get("png_ms")?,
        upload_ms: r.try_get("upload_ms")?,
        total_ms: r.try_get("total_ms")?,
        peak_gpu_mem_bytes: peak.map(|p| u64::try_from(p).unwrap_or(0)),
        controlnet_ms: r.try_get("controlnet_ms")?,
        refiner_ms: r.try_get("refiner_ms")?,
        batch_size: u32::try_from(r.try_get::<i32, _>("batch_size")?).unwrap_or(1),
    })
}
