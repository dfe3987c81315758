//! The `certs-gen` binary: parses the command line and hands over to the library.

fn main() -> std::process::ExitCode {
    certs_gen::run()
}
