//! The worker's heartbeat: every `worker.heartbeat_interval_ms` it writes the process's row in
//! the `workers` table (host, pid, version, and per GPU consumer the device's name and memory,
//! the models loaded and the job running), and marks the row stopped when the worker stops.
//!
//! Consumers report what they do on a [`StatusBoard`]; the heartbeat only reads it, so a slow
//! or unreachable database never holds up a job.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use uuid::Uuid;

use super::devices::GpuMemoryProbe;
use crate::db::{Db, DeviceReport, Heartbeat};

/// What each GPU consumer of this process is doing, as the heartbeat reports it.
#[derive(Default)]
pub(crate) struct StatusBoard {
    devices: Mutex<Vec<Entry>>,
}

struct Entry {
    report: DeviceReport,
    probe: Option<GpuMemoryProbe>,
}

impl StatusBoard {
    /// Adds (or, after a reconnect, resets) the entry of `device`.
    pub fn register(&self, device: &str, probe: Option<GpuMemoryProbe>) {
        let report = DeviceReport {
            device: device.to_owned(),
            name: probe.as_ref().and_then(GpuMemoryProbe::name),
            memory_total_bytes: probe.as_ref().and_then(GpuMemoryProbe::total_bytes),
            ..DeviceReport::default()
        };
        let mut devices = self.devices.lock().unwrap_or_else(PoisonError::into_inner);
        devices.retain(|entry| entry.report.device != device);
        devices.push(Entry { report, probe });
    }

    /// Records the job `device` is running (`None` when idle).
    pub fn set_job(&self, device: &str, job: Option<Uuid>) {
        self.update(device, |report| report.current_job = job);
    }

    /// Records the models whose sessions are loaded on `device`.
    pub fn set_models(&self, device: &str, models: Vec<String>) {
        self.update(device, |report| report.models_loaded = models);
    }

    fn update(&self, device: &str, change: impl FnOnce(&mut DeviceReport)) {
        let mut devices = self.devices.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = devices.iter_mut().find(|e| e.report.device == device) {
            change(&mut entry.report);
        }
    }

    /// Every device's report, with its memory in use sampled now.
    pub fn snapshot(&self) -> Vec<DeviceReport> {
        let devices = self.devices.lock().unwrap_or_else(PoisonError::into_inner);
        devices
            .iter()
            .map(|entry| {
                let mut report = entry.report.clone();
                report.memory_used_bytes =
                    entry.probe.as_ref().and_then(GpuMemoryProbe::used_bytes);
                report
            })
            .collect()
    }
}

/// What stays the same in every heartbeat of this process.
pub(crate) struct Identity {
    pub worker_id: String,
    pub intake: bool,
    pub started_at: DateTime<Utc>,
}

/// Writes a heartbeat now and then every `interval` until `stop` is set; then writes a last
/// one and marks the worker stopped. A failed write is logged and tried again at the next beat.
pub(crate) async fn run(
    db: Db,
    identity: Identity,
    board: Arc<StatusBoard>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let beat = || async {
        let beat = Heartbeat {
            worker_id: identity.worker_id.clone(),
            host: super::host_name(),
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            intake: identity.intake,
            devices: board.snapshot(),
            started_at: identity.started_at,
        };
        if let Err(err) = db.heartbeat(&beat).await {
            tracing::warn!(error = %err, code = err.code(), "cannot write the heartbeat");
        }
    };
    loop {
        tokio::select! {
            () = super::signalled(&mut stop) => break,
            _ = ticker.tick() => beat().await,
        }
    }
    beat().await;
    if let Err(err) = db.worker_stopped(&identity.worker_id).await {
        tracing::warn!(error = %err, code = err.code(), "cannot mark the worker stopped");
    }
}
