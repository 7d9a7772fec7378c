//! `sdxl-worker models reload`, and the SIGHUP handling it relies on.
//!
//! A worker or API server re-reads its configuration on SIGHUP and puts the new `[models]` in
//! force (see [`crate::config::live`]); an invalid configuration is logged and changes
//! nothing, and changed keys outside `[models]` are logged as ignored (they need a restart).
//! `models reload` sends SIGHUP to the worker whose pid is in `worker.pid_file`, or to
//! `--pid`; it is the same as `kill -HUP "$(cat PID_FILE)"`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use rustix::process::{kill_process, Pid, Signal};

use crate::config::{live, Config, LiveModels};

/// Arguments of `models`.
#[derive(Debug, clap::Args)]
pub struct ModelsArgs {
    #[command(subcommand)]
    pub command: ModelsCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum ModelsCommand {
    /// Make a running worker (or API server) re-read `[models]` from its configuration file:
    /// sends it SIGHUP.
    Reload {
        /// The process to signal (default: the pid in `worker.pid_file`).
        #[arg(long)]
        pid: Option<i32>,
    },
}

/// Run `models`.
pub async fn run(config: Config, args: ModelsArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        ModelsCommand::Reload { pid } => {
            let pid = match pid {
                Some(pid) => pid,
                None => {
                    let Some(path) = &config.worker.pid_file else {
                        bail!("worker.pid_file is not set: give --pid or configure the pid file");
                    };
                    read_pid(path)?
                }
            };
            let target =
                Pid::from_raw(pid).with_context(|| format!("{pid} is not a process id"))?;
            kill_process(target, Signal::HUP)
                .with_context(|| format!("cannot signal process {pid}"))?;
            println!("sent SIGHUP to process {pid}: it reloads [models] from its configuration");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn read_pid(path: &Path) -> anyhow::Result<i32> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read the pid file {} (is the worker running?)",
            path.display()
        )
    })?;
    text.trim()
        .parse()
        .with_context(|| format!("{} does not hold a process id", path.display()))
}

/// Reloads the models into `live` on every SIGHUP until the process ends. `file` is the
/// configuration file given at start (`None`: found as at start); `running` the configuration
/// the process started with.
pub async fn reload_on_hangup(file: Option<PathBuf>, running: Config, live: LiveModels) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(err) => {
            tracing::error!(error = %err, "cannot listen for SIGHUP: models cannot be reloaded");
            return;
        }
    };
    while hangups.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the configuration");
        match live::reload(file.as_deref(), &running, &live) {
            Ok(report) => {
                for key in &report.ignored {
                    tracing::warn!(key = %key, "configuration change ignored: it needs a restart");
                }
                let models = live.current();
                for name in report.added.iter().chain(&report.changed) {
                    let path = models.get(name).map(|m| m.path.clone()).unwrap_or_default();
                    if !path.join("model_index.json").is_file() {
                        tracing::warn!(model = %name, path = %path.display(), "no model_index.json in the model's directory: its jobs will fail to load it");
                    }
                }
                tracing::info!(
                    added = ?report.added,
                    removed = ?report.removed,
                    changed = ?report.changed,
                    default = ?report.default,
                    models = ?models.names(),
                    "models reloaded"
                );
            }
            Err(err) => tracing::error!(
                error = %err,
                code = err.code(),
                "the new configuration is invalid: the models stay as they were"
            ),
        }
    }
}

/// Writes this process's id to `path` and removes the file when dropped.
pub struct PidFile {
    path: PathBuf,
}

impl PidFile {
    pub fn create(path: &Path) -> anyhow::Result<PidFile> {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .with_context(|| format!("cannot write the pid file {}", path.display()))?;
        Ok(PidFile {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
