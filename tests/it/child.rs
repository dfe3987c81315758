//! One test of this binary run again in a child process, with an environment of its own:
//! for what is process-wide (the kubeconfig, the TLS trust store) and so must not change for
//! the other tests running in this process.

use std::process::Command;

/// What the child printed, and whether its one test passed.
pub struct ChildRun {
    /// The test ran and passed.
    pub passed: bool,
    /// stdout then stderr.
    pub output: String,
}

/// Runs test `name` of `module` (the caller's `module_path!()`) in a child of this binary,
/// with the environment `configure` sets on the command.
pub fn run_test(module: &str, name: &str, configure: impl FnOnce(&mut Command)) -> ChildRun {
    // Test names are module paths below the crate root: `it::storage` runs as `storage::<name>`.
    let module = module.split_once("::").map_or("", |(_crate, module)| module);
    let path = format!("{module}::{name}");
    let mut command = Command::new(std::env::current_exe().unwrap());
    command.args(["--exact", path.as_str(), "--nocapture", "--test-threads=1"]);
    configure(&mut command);
    let output = command.output().unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    ChildRun { passed: output.status.success() && text.contains("1 passed"), output: text }
}
