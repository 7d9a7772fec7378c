//! The lease sweep: every worker, every `worker.lease_sweep_interval_ms`, looks for `running`
//! jobs whose worker stopped writing its heartbeat for `worker.lease_ms` (killed, its machine
//! gone, or stopped without returning them), and recovers them. One process sweeps a schema at
//! a time (an advisory lock); the others skip that round.
//!
//! A lost job that has attempts left is published to its work queue again, then its row is
//! requeued, in the transaction that locked it: a crash in between leaves the row `running`
//! for the next sweep, and a copy published twice is skipped as a duplicate. A lost job on its
//! last attempt is failed with `worker_lost` and dead-lettered with that reason.
//!
//! The broker usually redelivers a dead worker's message on its own (its connection closed);
//! the sweep covers what the broker cannot see: a message acknowledged as a duplicate while
//! its worker was alive, or a delivery limit spent by crashes.

use std::sync::Arc;
use std::time::Duration;

use lapin::types::ShortString;
use lapin::BasicProperties;
use tokio::sync::watch;

use super::{Shared, WorkerError};
use crate::broker::{Broker, DeadLetterReason, Lane};
use crate::db::Db;

/// Error code of a job failed because its worker was lost on its last attempt.
pub const WORKER_LOST_CODE: &str = "worker_lost";

/// Jobs recovered by one sweep at most.
const SWEEP_LIMIT: u32 = 100;

/// What one sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    /// Another process was sweeping: nothing was looked at.
    pub skipped: bool,
    /// Jobs published to their work queue again.
    pub requeued: Vec<uuid::Uuid>,
    /// Jobs failed with `worker_lost`.
    pub failed: Vec<uuid::Uuid>,
}

/// Sweeps every `worker.lease_sweep_interval_ms` until `stop` is set. Failures are logged and
/// the next round tries again.
pub(crate) async fn run(
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), WorkerError> {
    let worker = &shared.config.worker;
    let lease = Duration::from_millis(worker.lease_ms);
    let mut ticker =
        tokio::time::interval(Duration::from_millis(worker.lease_sweep_interval_ms.max(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = super::signalled(&mut stop) => return Ok(()),
            _ = ticker.tick() => {}
        }
        match sweep_lost_jobs(&shared.db, &shared.broker, lease, worker.max_attempts).await {
            Ok(report) if !report.requeued.is_empty() || !report.failed.is_empty() => {
                tracing::warn!(
                    requeued = report.requeued.len(),
                    failed = report.failed.len(),
                    "recovered jobs of lost workers"
                );
            }
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(error = %err, code = err.code(), "lease sweep failed; trying again later");
            }
        }
    }
}

/// Recovers the `running` jobs whose worker's heartbeat is older than `lease`: publishes each
/// to its work queue again and requeues its row, or, when it has used `max_attempts`, fails it
/// with `worker_lost` and dead-letters it.
pub async fn sweep_lost_jobs(
    db: &Db,
    broker: &Broker,
    lease: Duration,
    max_attempts: u32,
) -> Result<SweepReport, WorkerError> {
    let Some(mut sweep) = db.begin_lease_sweep(lease, SWEEP_LIMIT).await? else {
        return Ok(SweepReport {
            skipped: true,
            ..SweepReport::default()
        });
    };
    let mut report = SweepReport::default();
    for job in std::mem::take(&mut sweep.jobs) {
        let body = serde_json::to_vec(&job.request).unwrap_or_default();
        let priority = u8::try_from(job.priority.clamp(0, 9)).unwrap_or(0);
        let properties = BasicProperties::default()
            .with_message_id(ShortString::from(job.id.to_string()))
            .with_content_type(ShortString::from("application/json"))
            .with_priority(priority);
        let owner = job.worker_id.as_deref().unwrap_or("an unknown worker");
        if i64::from(job.attempt) >= i64::from(max_attempts) {
            let reason = DeadLetterReason {
                code: WORKER_LOST_CODE.to_owned(),
                message: format!(
                    "worker {owner} was lost while running attempt {} of {max_attempts}",
                    job.attempt
                ),
            };
            broker
                .publish_dead_letter(&body, properties, &reason)
                .await?;
            if sweep
                .fail(job.id, job.attempt, &reason.code, &reason.message)
                .await?
            {
                tracing::warn!(job_id = %job.id, attempt = job.attempt, worker = owner, "job of a lost worker failed");
                report.failed.push(job.id);
            }
        } else {
            let lane = Lane::for_priority(priority);
            broker.publish_work(lane, &body, properties).await?;
            if sweep.requeue(job.id, job.attempt).await? {
                tracing::warn!(job_id = %job.id, attempt = job.attempt, worker = owner, "job of a lost worker queued again");
                report.requeued.push(job.id);
            }
        }
    }
    sweep.commit().await?;
    Ok(report)
}
