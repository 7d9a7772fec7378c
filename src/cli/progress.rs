//! Step progress on stderr for `generate` and `submit --wait`: a live bar (step i/N, elapsed,
//! ETA) when stderr is a terminal, one plain line per step otherwise (logs, pipes, CI).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Progress of one run's denoising steps.
pub struct StepProgress {
    bar: Option<ProgressBar>,
    started: Option<Instant>,
    last_step: Option<(u32, u32)>,
}

impl StepProgress {
    /// A bar on a terminal, plain lines otherwise.
    pub fn new() -> StepProgress {
        StepProgress::with_bar(std::io::stderr().is_terminal())
    }

    /// Force the bar on or off.
    pub fn with_bar(bar: bool) -> StepProgress {
        let bar = bar.then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{bar:32}] step {pos}/{len}  {elapsed_precise}  ETA {eta}  {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        StepProgress {
            bar,
            started: None,
            last_step: None,
        }
    }

    /// Step `step` of `total` is done.
    pub fn step(&mut self, step: u32, total: u32) {
        if self.last_step == Some((step, total)) {
            return;
        }
        self.last_step = Some((step, total));
        let started = *self.started.get_or_insert_with(Instant::now);
        match &self.bar {
            Some(bar) => {
                bar.set_length(u64::from(total));
                bar.set_position(u64::from(step));
            }
            None => eprintln!("{}", plain_line(step, total, started.elapsed())),
        }
    }

    /// A note next to the bar (or its own line): a state change.
    pub fn note(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(text.to_owned()),
            None => eprintln!("{text}"),
        }
    }

    /// Remove the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Default for StepProgress {
    fn default() -> Self {
        StepProgress::new()
    }
}

/// `step 3/30 (0.6 s, ETA 5.4 s)`: the ETA assumes the remaining steps take as long as the
/// ones done so far.
pub fn plain_line(step: u32, total: u32, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    if step == 0 {
        return format!("step 0/{total} ({secs:.1} s)");
    }
    let eta = secs / f64::from(step) * f64::from(total.saturating_sub(step));
    format!("step {step}/{total} ({secs:.1} s, ETA {eta:.1} s)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_show_step_elapsed_and_eta() {
        assert_eq!(
            plain_line(3, 30, Duration::from_millis(600)),
            "step 3/30 (0.6 s, ETA 5.4 s)"
        );
        assert_eq!(
            plain_line(30, 30, Duration::from_secs(6)),
            "step 30/30 (6.0 s, ETA 0.0 s)"
        );
        assert_eq!(plain_line(0, 4, Duration::ZERO), "step 0/4 (0.0 s)");
    }
}
