//! The result cache's rows: the request key of a job that ran with caching on, the lookup of a
//! succeeded job with the same key, and the link from a job served from the cache to its source.

use sqlx::types::Json;
use sqlx::Row;
use uuid::Uuid;

use super::types::ImageRecord;
use super::{query_error, Db, DbError};

/// A succeeded job whose images a new identical request can reuse.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedResult {
    pub job: Uuid,
    pub images: Vec<ImageRecord>,
}

impl Db {
    /// Record the cache key of a running attempt (before it succeeds).
    pub async fn set_cache_key(&self, id: Uuid, attempt: i32, key: &str) -> Result<(), DbError> {
        sqlx::query("UPDATE jobs SET cache_key = $3 WHERE id = $1 AND attempt = $2")
            .bind(id)
            .bind(attempt)
            .bind(key)
            .execute(self.pool())
            .await
            .map_err(query_error("set_cache_key"))?;
        Ok(())
    }

    /// The most recent succeeded job with this cache key, other than `except`.
    pub async fn find_cached(
        &self,
        key: &str,
        except: Uuid,
    ) -> Result<Option<CachedResult>, DbError> {
        let op = "find_cached";
        let row = sqlx::query(
            "SELECT id, images FROM jobs WHERE md5(cache_key) = md5($1) AND cache_key = $1 \
             AND state = 'succeeded' AND id <> $2 ORDER BY finished_at DESC LIMIT 1",
        )
        .bind(key)
        .bind(except)
        .fetch_optional(self.pool())
        .await
        .map_err(query_error(op))?;
        let Some(row) = row else { return Ok(None) };
        let job: Uuid = row.try_get("id").map_err(query_error(op))?;
        let Json(images): Json<Vec<ImageRecord>> =
            row.try_get("images").map_err(query_error(op))?;
        Ok(Some(CachedResult { job, images }))
    }

    /// Record that a succeeded job's images were copied from job `source`.
    pub async fn set_cached_from(&self, id: Uuid, source: Uuid) -> Result<(), DbError> {
        sqlx::query("UPDATE jobs SET cached_from = $2 WHERE id = $1")
            .bind(id)
            .bind(source)
            .execute(self.pool())
            .await
            .map_err(query_error("set_cached_from"))?;
        Ok(())
    }

    /// The job a succeeded job's images were copied from, if any.
    pub async fn cached_from(&self, id: Uuid) -> Result<Option<Uuid>, DbError> {
        let row = sqlx::query("SELECT cached_from FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .map_err(query_error("cached_from"))?;
        match row {
            Some(row) => row
                .try_get("cached_from")
                .map_err(query_error("cached_from")),
            None => Ok(None),
        }
    }
}
