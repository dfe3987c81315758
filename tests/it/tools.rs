//! The command-line tools some tests run (promtool and prometheus from Debian's `prometheus`
//! package, actionlint and hadolint from PyPI; scripts/test installs them). Missing: a failure
//! under CI, a loud skip elsewhere, as manifests.rs treats kubernetes-validate.

use std::process::Command;

/// True when `program` runs (`program args...` exits 0); otherwise fails under CI and
/// prints a skip notice naming `installed_by`.
pub fn available(program: &str, args: &[&str], installed_by: &str) -> bool {
    let runs = Command::new(program).args(args).output().is_ok_and(|o| o.status.success());
    if runs {
        return true;
    }
    let message = format!("`{program}` is not on PATH ({installed_by})");
    assert!(std::env::var("CI").is_err(), "{message}");
    eprintln!("\n*** SKIPPED: {message} ***\n");
    false
}
