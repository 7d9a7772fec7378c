//! Reads and writes of the HTTP API: job owners, counts for metrics and the status page, the
//! metrics history that estimates are fitted to, and recent throughput.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use uuid::Uuid;

use super::{query_error, Db, DbError, JobState};

/// One finished job with its request parameters and timings: a sample for estimates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsSample {
    pub job_id: Uuid,
    pub model: String,
    /// The GPU's name when its worker reported one, else the device kind (`cpu`, `cuda`).
    pub gpu_kind: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub num_images: u32,
    /// Whether classifier-free guidance doubled the UNet batch (guidance scale above 1).
    pub cfg: bool,
    /// ControlNets applied (0 for plain text-to-image).
    pub controlnets: u32,
    pub model_load_ms: f64,
    pub total_ms: f64,
    pub peak_gpu_mem_bytes: Option<u64>,
    pub recorded_at: DateTime<Utc>,
}

/// Finished jobs of one minute.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MinuteCount {
    pub minute: DateTime<Utc>,
    pub succeeded: i64,
    pub failed: i64,
    pub cancelled: i64,
    /// Images written by the jobs that succeeded.
    pub images: i64,
}

/// Cumulative histogram of a duration, in seconds: `(upper bound, count at or below)`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Histogram {
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum: f64,
}

impl Db {
    /// Record the API token that created job `id` (kept if already recorded).
    pub async fn set_owner(&self, id: Uuid, owner: &str) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO job_owners (job_id, owner) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .bind(owner)
        .execute(self.pool())
        .await
        .map_err(query_error("set_owner"))?;
        Ok(())
    }

    /// The token name that created job `id`, if an API token did.
    pub async fn owner_of(&self, id: Uuid) -> Result<Option<String>, DbError> {
        sqlx::query_scalar("SELECT owner FROM job_owners WHERE job_id = $1")
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .map_err(query_error("owner_of"))
    }

    /// Number of jobs in each state (every state present, zero when none).
    pub async fn count_by_state(&self) -> Result<BTreeMap<&'static str, i64>, DbError> {
        let rows = sqlx::query("SELECT state, count(*) AS n FROM jobs GROUP BY state")
            .fetch_all(self.pool())
            .await
            .map_err(query_error("count_by_state"))?;
        let mut counts: BTreeMap<&'static str, i64> =
            JobState::ALL.iter().map(|s| (s.as_str(), 0)).collect();
        for row in rows {
            let state: String = row
                .try_get("state")
                .map_err(query_error("count_by_state"))?;
            let n: i64 = row.try_get("n").map_err(query_error("count_by_state"))?;
            if let Some(state) = JobState::parse(&state) {
                counts.insert(state.as_str(), n);
            }
        }
        Ok(counts)
    }

    /// Failed jobs by error code.
    pub async fn errors_by_code(&self) -> Result<Vec<(String, i64)>, DbError> {
        let rows = sqlx::query(
            "SELECT error_code, count(*) AS n FROM jobs WHERE state = 'failed' \
             GROUP BY error_code ORDER BY error_code",
        )
        .fetch_all(self.pool())
        .await
        .map_err(query_error("errors_by_code"))?;
        rows.iter()
            .map(|r| Ok((r.try_get("error_code")?, r.try_get("n")?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(query_error("errors_by_code"))
    }

    /// The most recent `limit` metrics rows of succeeded jobs with their request parameters,
    /// oldest first. `steps` counts the steps that ran: `⌊steps · strength⌋` for
    /// image-to-image jobs.
    pub async fn metrics_history(&self, limit: u32) -> Result<Vec<MetricsSample>, DbError> {
        let rows = sqlx::query(
            "SELECT * FROM ( \
               SELECT m.job_id, coalesce(j.model, '') AS model, \
                 coalesce((SELECT d->>'name' FROM workers w, jsonb_array_elements(w.devices) d \
                           WHERE w.worker_id = j.worker_id AND d->>'device' = j.device \
                             AND d->>'name' IS NOT NULL LIMIT 1), \
                          split_part(coalesce(j.device, 'cpu'), ':', 1)) AS gpu_kind, \
                 (j.request->>'width')::bigint AS width, (j.request->>'height')::bigint AS height, \
                 (CASE WHEN jsonb_typeof(j.request->'init_image') = 'object' \
                  THEN least(floor((j.request->>'steps')::float8 \
                                   * coalesce((j.request->>'strength')::float8, 0.8)), \
                             (j.request->>'steps')::float8)::bigint \
                  ELSE (j.request->>'steps')::bigint END) AS steps, \
                 coalesce((j.request->>'num_images')::bigint, 1) AS num_images, \
                 coalesce((j.request->>'guidance_scale')::float8, 5.0) AS guidance_scale, \
                 coalesce(jsonb_array_length(CASE WHEN jsonb_typeof(j.request->'controlnets') \
                          = 'array' THEN j.request->'controlnets' END), 0)::bigint AS controlnets, \
                 m.model_load_ms, m.total_ms, m.peak_gpu_mem_bytes, m.recorded_at \
               FROM job_metrics m JOIN jobs j ON j.id = m.job_id \
               WHERE j.state = 'succeeded' AND j.request ? 'width' AND j.request ? 'steps' \
               ORDER BY m.recorded_at DESC LIMIT $1) recent \
             ORDER BY recorded_at",
        )
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await
        .map_err(query_error("metrics_history"))?;
        let op = query_error("metrics_history");
        let count = |v: i64| u32::try_from(v).unwrap_or(0);
        rows.iter()
            .map(|r| {
                let peak: Option<i64> = r.try_get("peak_gpu_mem_bytes").map_err(op)?;
                let guidance: f64 = r.try_get("guidance_scale").map_err(op)?;
                Ok(MetricsSample {
                    job_id: r.try_get("job_id").map_err(op)?,
                    model: r.try_get("model").map_err(op)?,
                    gpu_kind: r.try_get("gpu_kind").map_err(op)?,
                    width: count(r.try_get("width").map_err(op)?),
                    height: count(r.try_get("height").map_err(op)?),
                    steps: count(r.try_get("steps").map_err(op)?),
                    num_images: count(r.try_get("num_images").map_err(op)?),
                    cfg: guidance > 1.0,
                    controlnets: count(r.try_get("controlnets").map_err(op)?),
                    model_load_ms: r.try_get("model_load_ms").map_err(op)?,
                    total_ms: r.try_get("total_ms").map_err(op)?,
                    peak_gpu_mem_bytes: peak.and_then(|p| u64::try_from(p).ok()),
                    recorded_at: r.try_get("recorded_at").map_err(op)?,
                })
            })
            .collect()
    }

    /// Jobs finished in each of the last `minutes` minutes (minutes without any are absent).
    pub async fn throughput(&self, minutes: u32) -> Result<Vec<MinuteCount>, DbError> {
        let rows = sqlx::query(
            "SELECT date_trunc('minute', finished_at) AS minute, \
               count(*) FILTER (WHERE state = 'succeeded') AS succeeded, \
               count(*) FILTER (WHERE state = 'failed') AS failed, \
               count(*) FILTER (WHERE state = 'cancelled') AS cancelled, \
               coalesce(sum(jsonb_array_length(images)) FILTER (WHERE state = 'succeeded'), 0) \
                 AS images \
             FROM jobs WHERE finished_at > now() - make_interval(mins => $1) \
             GROUP BY 1 ORDER BY 1",
        )
        .bind(i32::try_from(minutes).unwrap_or(i32::MAX))
        .fetch_all(self.pool())
        .await
        .map_err(query_error("throughput"))?;
        let op = query_error("throughput");
        rows.iter()
            .map(|r| {
                Ok(MinuteCount {
                    minute: r.try_get("minute").map_err(op)?,
                    succeeded: r.try_get("succeeded").map_err(op)?,
                    failed: r.try_get("failed").map_err(op)?,
                    cancelled: r.try_get("cancelled").map_err(op)?,
                    images: r.try_get("images").map_err(op)?,
                })
            })
            .collect()
    }

    /// Histograms (in seconds) of job run time (`total_ms`) and of denoising step time over
    /// every metrics row, with the given upper bounds.
    pub async fn duration_histograms(
        &self,
        bounds: &[f64],
    ) -> Result<(Histogram, Histogram), DbError> {
        let op = query_error("duration_histograms");
        let query = |values: &str| {
            format!(
                "WITH s AS ({values}) \
                 SELECT array(SELECT (SELECT count(*) FROM s WHERE s.v <= t.b) \
                              FROM unnest($1::float8[]) WITH ORDINALITY AS t(b, i) \
                              ORDER BY t.i) AS buckets, \
                        (SELECT count(*) FROM s) AS n, \
                        (SELECT coalesce(sum(v), 0)::float8 FROM s) AS total"
            )
        };
        let job = sqlx::query(&query("SELECT total_ms / 1000.0 AS v FROM job_metrics"))
            .bind(bounds)
            .fetch_one(self.pool())
            .await
            .map_err(op)?;
        let step = sqlx::query(&query(
            "SELECT unnest(step_ms) / 1000.0 AS v FROM job_metrics",
        ))
        .bind(bounds)
        .fetch_one(self.pool())
        .await
        .map_err(op)?;
        let read = |r: &sqlx::postgres::PgRow| -> Result<Histogram, DbError> {
            let counts: Vec<i64> = r.try_get("buckets").map_err(op)?;
            let n: i64 = r.try_get("n").map_err(op)?;
            Ok(Histogram {
                buckets: bounds
                    .iter()
                    .zip(counts)
                    .map(|(b, c)| (*b, u64::try_from(c).unwrap_or(0)))
                    .collect(),
                count: u64::try_from(n).unwrap_or(0),
                sum: r.try_get("total").map_err(op)?,
            })
        };
        Ok((read(&job)?, read(&step)?))
    }
}
