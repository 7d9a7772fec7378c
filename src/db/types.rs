//! The values read from and written to the job tables.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The state of a job. `queued` and `running` are live; the others are terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// The value stored in `jobs.state`.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Whether no further state change can happen.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One stored image of a succeeded job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Position within the job (0-based).
    pub index: u32,
    /// Object-storage key (see [`crate::storage::Storage::image_key`]).
    pub key: String,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
}

/// Timings of one finished job, in milliseconds (stored in `job_metrics`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobMetrics {
    /// From entering the queue to the start of the attempt that finished.
    pub queue_wait_ms: f64,
    /// Loading the model (0 when it was cached).
    pub model_load_ms: f64,
    /// Prompt encoding (for a batch whose prompts were encoded together, that shared time).
    pub text_encoding_ms: f64,
    pub denoising_ms: f64,
    /// Each denoising step.
    pub step_ms: Vec<f64>,
    /// Time inside ONNX Runtime's `Session::run` during denoising.
    pub session_run_ms: f64,
    pub vae_ms: f64,
    pub png_ms: f64,
    pub upload_ms: f64,
    pub total_ms: f64,
    /// Peak device memory during the job, when the device reports it.
    pub peak_gpu_mem_bytes: Option<u64>,
    /// Part of `denoising_ms` spent in ControlNet evaluations (0 without ControlNets).
    pub controlnet_ms: f64,
    /// The refiner stage of a refined job: its prompt encoding and denoising (0 without a
    /// refiner; `denoising_ms` is then the base's part alone).
    #[serde(default)]
    pub refiner_ms: f64,
    /// Jobs that shared this job's UNet batch (dynamic batching; 1 when it ran alone).
    #[serde(default = "one")]
    pub batch_size: u32,
}

fn one() -> u32 {
    1
}

/// The status row of a job.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobRow {
    pub id: Uuid,
    pub state: JobState,
    pub model: Option<String>,
    pub priority: u8,
    /// The normalized request (or the raw message of an invalid job).
    pub request: serde_json::Value,
    /// Number of starts so far; the fencing token of the current one.
    pub attempt: i32,
    pub worker_id: Option<String>,
    pub device: Option<String>,
    pub progress_step: Option<i32>,
    pub progress_total: Option<i32>,
    pub images: Vec<ImageRecord>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub error_details: Option<serde_json::Value>,
    /// A cancellation was asked for while the job was running.
    pub cancel_requested: bool,
    pub created_at: DateTime<Utc>,
    /// When the job last entered the queued state.
    pub queued_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

/// What [`crate::db::Db::start_attempt`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartOutcome {
    /// The job is now running under this attempt number.
    Started {
        attempt: i32,
        queued_at: DateTime<Utc>,
    },
    /// The job has already finished (or was cancelled); the message is a duplicate.
    AlreadyTerminal(JobState),
    /// Another attempt is running the job and this start may not take it over (the message
    /// is a duplicate, not a redelivery).
    InHand,
    /// No row has this id.
    NotFound,
}

/// What [`crate::db::Db::record_progress`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressOutcome {
    /// Progress recorded; carry on.
    Recorded,
    /// Progress recorded, and a cancellation was asked for: stop and call
    /// [`crate::db::Db::finish_cancelled`].
    CancelRequested,
    /// This attempt no longer owns the job (a newer attempt took over, or it is terminal).
    Lost,
}

/// What [`crate::db::Db::cancel`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The job was queued and is now cancelled.
    Cancelled,
    /// The job is running; its worker will stop it at the next progress update.
    Requested {
        attempt: i32,
    },
    /// The job had already finished.
    AlreadyTerminal(JobState),
    NotFound,
}
