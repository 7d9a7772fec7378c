//! The intake consumer: turns every message on `{p}.intake` into a status row before any GPU
//! consumer can see it, and routes valid jobs to the work queue of their priority.
//!
//! - valid: `queued` row (insert-if-absent), then the normalized message (with its resolved
//!   seed) is published to `{p}.work` under `high` or `normal`, then the delivery is acked;
//! - invalid with a readable id: a `failed` row with every field error, then ack;
//! - unreadable (not JSON, no usable id): published to `{p}.dead` with its reason, then ack.
//!
//! When the database or the broker fails, the delivery is returned to the queue after a pause
//! (or once the database answers again) and handled again; a failure that retrying cannot fix
//! dead-letters the message with its reason.

use std::sync::Arc;
use std::time::Duration;

use lapin::types::ShortString;
use lapin::BasicProperties;
use tokio::sync::watch;

use super::{Shared, WorkerError};
use crate::broker::{DeadLetterReason, Incoming, Lane, MessageStream};
use crate::db::JobState;
use crate::job::{self, JobRejection, ValidJob};

/// Pause before a delivery that hit a transient failure is returned to the queue.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Consumes `{p}.intake` until `stop` is set or the subscription ends.
pub(crate) async fn run(
    shared: Arc<Shared>,
    mut stream: MessageStream,
    mut stop: watch::Receiver<bool>,
) -> Result<(), WorkerError> {
    let result = loop {
        let next = tokio::select! {
            biased;
            () = super::signalled(&mut stop) => break Ok(()),
            next = stream.next() => next,
        };
        match next {
            None => break Err(WorkerError::IntakeClosed),
            Some(Err(err)) => break Err(err.into()),
            Some(Ok(message)) => handle(&shared, message).await,
        }
    };
    if let Err(err) = stream.cancel().await {
        tracing::debug!(error = %err, "cancelling the intake subscription");
    }
    // Deliveries received but not handled go back to the queue with the channel.
    stream.close().await;
    result
}

/// What to do with a delivery once it has been handled.
enum Outcome {
    Ack,
    /// A transient failure: return it to the queue after a pause.
    Retry(WorkerError),
}

async fn handle(shared: &Shared, message: Incoming) {
    let outcome = match job::parse_and_validate_with(
        &message.body,
        &shared.config.limits,
        &shared.models.current(),
        &shared.config.controlnet,
    ) {
        Ok(valid) => accept(shared, &message, &valid).await,
        Err(JobRejection::Invalid { id, errors }) => {
            tracing::info!(job_id = %id, errors = %job::summarize(&errors), "invalid job message");
            let body: serde_json::Value =
                serde_json::from_slice(&message.body).unwrap_or(serde_json::Value::Null);
            match shared.db.insert_invalid(id, &body, &errors).await {
                Ok(_) => Outcome::Ack,
                Err(err) => Outcome::Retry(err.into()),
            }
        }
        Err(JobRejection::Unreadable {
            code,
            message: text,
        }) => {
            tracing::info!(code, reason = %text, "unreadable job message: dead-lettering it");
            let reason = DeadLetterReason {
                code: code.to_owned(),
                message: text,
            };
            let properties = message.properties.clone();
            match shared
                .broker
                .publish_dead_letter(&message.body, properties, &reason)
                .await
            {
                Ok(()) => Outcome::Ack,
                Err(err) => Outcome::Retry(err.into()),
            }
        }
    };
    settle(shared, message, outcome).await;
}

async fn accept(shared: &Shared, message: &Incoming, job: &ValidJob) -> Outcome {
    // The body routed to the work queues: the normalized message as first recorded, so that a
    // duplicate publish without a seed cannot run with a different drawn seed.
    let body = match shared.db.insert_queued(job).await {
        Ok(true) => job.to_body(),
        Ok(false) => {
            // A duplicate publish or a redelivery. Route it again only while the job is still
            // queued (its earlier routing may not have happened); otherwise it is in hand.
            match shared.db.get(job.id).await {
                Ok(Some(row)) if row.state == JobState::Queued => {
                    serde_json::to_vec(&row.request).unwrap_or_else(|_| job.to_body())
                }
                Ok(_) => {
                    tracing::info!(job_id = %job.id, "duplicate job message: already in hand");
                    return Outcome::Ack;
                }
                Err(err) => return Outcome::Retry(err.into()),
            }
        }
        Err(err) => return Outcome::Retry(err.into()),
    };
    let priority = job
        .priority
        .max(message.priority().unwrap_or(0).min(job::MAX_PRIORITY));
    let lane = Lane::for_priority(priority);
    let properties = BasicProperties::default()
        .with_message_id(ShortString::from(job.id.to_string()))
        .with_content_type(ShortString::from("application/json"))
        .with_priority(priority);
    match shared.broker.publish_work(lane, &body, properties).await {
        Ok(()) => {
            tracing::debug!(job_id = %job.id, lane = lane.routing_key(), "job queued");
            Outcome::Ack
        }
        Err(err) if !err.is_retryable() => {
            // The job cannot reach a work queue: record why, so that its row does not stay
            // queued; the message is then dead-lettered with the same reason.
            let text = err.to_string();
            match shared.db.fail(job.id, None, err.code(), &text, None).await {
                Ok(_) => Outcome::Retry(err.into()),
                Err(db_err) => Outcome::Retry(db_err.into()),
            }
        }
        Err(err) => Outcome::Retry(err.into()),
    }
}

async fn settle(shared: &Shared, message: Incoming, outcome: Outcome) {
    match outcome {
        Outcome::Ack => {
            if let Err(err) = message.ack().await {
                tracing::warn!(error = %err, "cannot ack an intake delivery; it will be handled again");
            }
        }
        Outcome::Retry(err) if !err.is_retryable() => {
            // Trying again cannot help (a broken row, a work queue that refuses messages):
            // park the message with the reason instead of looping on it.
            tracing::error!(error = %err, code = err.code(), "intake failed for good; dead-lettering the message");
            let reason = DeadLetterReason {
                code: err.code().to_owned(),
                message: err.to_string(),
            };
            let properties = message.properties.clone();
            let parked = shared
                .broker
                .publish_dead_letter(&message.body, properties, &reason)
                .await;
            let settled = match parked {
                Ok(()) => message.ack().await,
                Err(_) => {
                    tokio::time::sleep(RETRY_PAUSE).await;
                    message.nack_requeue().await
                }
            };
            if let Err(err) = settled {
                tracing::warn!(error = %err, "cannot settle an intake delivery; the broker will redeliver it");
            }
        }
        Outcome::Retry(err) => {
            tracing::warn!(error = %err, code = err.code(), "intake failed; the message goes back to the queue");
            tokio::time::sleep(RETRY_PAUSE).await;
            if matches!(err, WorkerError::Db(_)) {
                super::wait_for_database(&shared.db).await;
            }
            if let Err(err) = message.nack_requeue().await {
                tracing::warn!(error = %err, "cannot return an intake delivery; the broker will redeliver it");
            }
        }
    }
}
