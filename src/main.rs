//! The `sdxl-worker` binary: parses the command line and hands over to the library.

fn main() -> std::process::ExitCode {
    sdxl_worker::cli::main()
}
