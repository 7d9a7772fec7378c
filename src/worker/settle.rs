//! How a GPU consumer settles a message once its job is handled: ack, return it to the queue
//! (after a pause, or once the database answers again), or give up: fail the row and
//! dead-letter the message with its reason.

use std::time::Duration;

use uuid::Uuid;

use super::consumer::ConsumerContext;
use super::WorkerError;
use crate::broker::{DeadLetterReason, Incoming, Lane};

/// Longest pause before a job is returned to the queue after a transient failure.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(5);

/// How a message is settled.
pub(crate) enum Disposition {
    /// Done: the row says what happened (or another attempt owns it).
    Ack,
    /// A transient failure: return the job to the queue, or give up after the last attempt.
    Retry {
        id: Uuid,
        attempt: Option<i32>,
        error: WorkerError,
    },
    /// The job cannot run any more: fail the row (when there is one) and dead-letter the
    /// message with the reason.
    GiveUp {
        id: Option<Uuid>,
        attempt: Option<i32>,
        reason: DeadLetterReason,
    },
}

impl Disposition {
    pub(crate) fn retry(
        id: Uuid,
        attempt: Option<i32>,
        error: impl Into<WorkerError>,
    ) -> Disposition {
        Disposition::Retry {
            id,
            attempt,
            error: error.into(),
        }
    }
}

pub(crate) async fn settle(ctx: &ConsumerContext, message: &Incoming, disposition: Disposition) {
    let shared = &ctx.shared;
    match disposition {
        Disposition::Ack => ack(message).await,
        Disposition::GiveUp {
            id,
            attempt,
            reason,
        } => give_up(ctx, message, id, attempt, reason).await,
        Disposition::Retry { id, attempt, error } => {
            let max_attempts = i64::from(shared.config.worker.max_attempts);
            if let Some(attempt) = attempt.filter(|a| i64::from(*a) >= max_attempts) {
                let reason = DeadLetterReason {
                    code: error.code().to_owned(),
                    message: format!("gave up after {attempt} attempts: {error}"),
                };
                give_up(ctx, message, Some(id), Some(attempt), reason).await;
                return;
            }
            tracing::warn!(job_id = %id, ?attempt, code = error.code(), error = %error, "job goes back to the queue");
            if let Some(attempt) = attempt {
                if let Err(err) = shared.db.requeue(id, attempt).await {
                    tracing::warn!(job_id = %id, error = %err, "cannot mark the job queued again");
                }
            }
            match error {
                WorkerError::ShuttingDown => {}
                WorkerError::Db(_) => super::wait_for_database(&shared.db).await,
                _ => tokio::time::sleep(retry_pause(attempt)).await,
            }
            return_to_queue(ctx, message).await;
        }
    }
}

/// Returns a job's message to its queue. When its channel is gone (the broker restarted or
/// timed the delivery out, and may have handed the message to a worker that acknowledged it
/// as still in this worker's hands), the job is published to its work queue again instead.
async fn return_to_queue(ctx: &ConsumerContext, message: &Incoming) {
    let Err(err) = message.nack_requeue().await else {
        return;
    };
    let lane = if message.queue.ends_with(".work.high") {
        Lane::High
    } else {
        Lane::Normal
    };
    match ctx
        .shared
        .broker
        .publish_work(lane, &message.body, message.properties.clone())
        .await
    {
        Ok(()) => {
            tracing::info!(nack_error = %err, "job message published again: its delivery could not be returned");
        }
        Err(publish) => {
            tracing::warn!(nack_error = %err, error = %publish, "cannot return a job message; the broker will redeliver it");
        }
    }
}

/// Fails the row (when there is one), dead-letters the message with the reason, then acks.
/// Anything that cannot be written sends the message back for another try.
async fn give_up(
    ctx: &ConsumerContext,
    message: &Incoming,
    id: Option<Uuid>,
    attempt: Option<i32>,
    reason: DeadLetterReason,
) {
    let shared = &ctx.shared;
    if let Some(id) = id {
        if let Err(err) = shared
            .db
            .fail(id, attempt, &reason.code, &reason.message, None)
            .await
        {
            tracing::warn!(job_id = %id, error = %err, "cannot record the failure; retrying later");
            super::wait_for_database(&shared.db).await;
            nack(message).await;
            return;
        }
    }
    let properties = message.properties.clone();
    match shared
        .broker
        .publish_dead_letter(&message.body, properties, &reason)
        .await
    {
        Ok(()) => {
            tracing::warn!(job_id = ?id, code = %reason.code, "message dead-lettered");
            ack(message).await;
        }
        Err(err) => {
            tracing::warn!(error = %err, "cannot dead-letter the message; retrying later");
            tokio::time::sleep(MAX_RETRY_PAUSE).await;
            nack(message).await;
        }
    }
}

async fn ack(message: &Incoming) {
    if let Err(err) = message.ack().await {
        tracing::warn!(error = %err, "cannot ack a job message; its redelivery will be skipped");
    }
}

async fn nack(message: &Incoming) {
    if let Err(err) = message.nack_requeue().await {
        tracing::warn!(error = %err, "cannot return a job message; the broker will redeliver it");
    }
}

/// Exponential pause before a job goes back to the queue: 0.5 s, 1 s, 2 s, ... up to 5 s,
/// each shortened by a random part of up to a quarter (jitter), so that jobs failed by one
/// outage do not all come back at the same instant.
fn retry_pause(attempt: Option<i32>) -> Duration {
    let exponent = attempt.unwrap_or(1).clamp(1, 5) as u32;
    let base = Duration::from_millis(250 * 2u64.pow(exponent)).min(MAX_RETRY_PAUSE);
    let jitter_ms = (uuid::Uuid::new_v4().as_u128() % 1000) as u64 * base.as_millis() as u64 / 4000;
    base - Duration::from_millis(jitter_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_pauses_grow_with_jitter_and_stay_bounded() {
        for attempt in 1..=8 {
            let base = Duration::from_millis(250 * 2u64.pow(attempt.clamp(1, 5) as u32))
                .min(MAX_RETRY_PAUSE);
            let pauses: Vec<Duration> = (0..50).map(|_| retry_pause(Some(attempt))).collect();
            assert!(pauses.iter().all(|p| *p <= base && *p >= base * 3 / 4));
            assert!(pauses.iter().any(|p| *p != pauses[0]), "jittered");
        }
    }
}
