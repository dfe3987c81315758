//! The `durable-scaler` binary: parses the command line and hands over to the library.

fn main() -> std::process::ExitCode {
    durable_scaler::cli::run()
}
