//! The command line: `generate`, `migrate`, `worker`, `submit`, `status` and `demo`.

use std::process::ExitCode;

/// Entry point of the binary.
pub fn main() -> ExitCode {
    ExitCode::SUCCESS
}
