//! Fault injection for the reliability tests: a switch that makes the worker process crash
//! on a chosen job, the way a poison message (a job that kills its worker every time) does.
//!
//! `SDXL_FAULT_ABORT_ON_PROMPT`: when set (non-empty), a job whose prompt is exactly this text
//! aborts the whole process right after its attempt started. It exists for tests only; never
//! set it in a deployment. Unset, it costs one environment lookup per process.

use std::sync::OnceLock;

/// Name of the environment variable of the switch.
pub const ABORT_ON_PROMPT_ENV: &str = "SDXL_FAULT_ABORT_ON_PROMPT";

fn abort_prompt() -> Option<&'static str> {
    static PROMPT: OnceLock<Option<String>> = OnceLock::new();
    PROMPT
        .get_or_init(|| {
            std::env::var(ABORT_ON_PROMPT_ENV)
                .ok()
                .filter(|p| !p.is_empty())
        })
        .as_deref()
}

/// Aborts the process when the fault switch names `prompt`.
pub(crate) fn after_start(prompt: &str) {
    if abort_prompt() == Some(prompt) {
        tracing::error!(
            switch = ABORT_ON_PROMPT_ENV,
            "fault injection: aborting the process"
        );
        std::process::abort();
    }
}
