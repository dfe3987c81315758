//! The demo's child processes: the real `durable-scaler` binary in its aggregator and
//! sidecar roles. Each child's output goes to a log file in the demo's output directory
//! (plain text: a child whose stderr is not a terminal logs without colour escapes, see
//! [`crate::telemetry`]);
//! each is stopped with SIGTERM (then SIGKILL after a grace period) and, on Linux, dies with
//! the demo even if the demo itself is killed.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use tokio::process::{Child, Command};

/// A running child process of the demo.
#[derive(Debug)]
pub(crate) struct ChildProcess {
    name: String,
    child: Child,
}

impl ChildProcess {
    /// Starts this very binary with `args` and `envs`, its stdout and stderr appended to
    /// `log`.
    pub(crate) fn spawn(
        name: &str,
        args: &[String],
        envs: &[(&str, String)],
        log: &Path,
    ) -> std::io::Result<Self> {
        let exe = std::env::current_exe()?;
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let err = out.try_clone()?;
        let mut command = Command::new(exe);
        command
            .args(args)
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true);
        // Spawned from a runtime worker thread, which lives as long as the demo.
        crate::shutdown::kill_child_with_parent(command.as_std_mut());
        Ok(Self { name: name.to_string(), child: command.spawn()? })
    }

    /// The name given at spawn.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// True while the process runs.
    pub(crate) fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub(crate) async fn terminate(mut self, grace: Duration) {
        if let Some(pid) = self.child.id() {
            send_sigterm(pid);
        }
        if tokio::time::timeout(grace, self.child.wait()).await.is_err() {
            tracing::warn!(child = %self.name, "did not exit within {grace:?} of SIGTERM; killing it");
            let _ = self.child.kill().await;
        }
    }
}

#[cfg(target_os = "linux")]
fn send_sigterm(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn send_sigterm(_pid: u32) {}

/// A loopback port that was free a moment ago (the OS picks it; a tiny race remains between
/// this call and the child binding it).
pub(crate) fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `dir/name`, creating `dir`.
pub(crate) fn log_path(dir: &Path, name: &str) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    Ok(dir.join(format!("{name}.log")))
}
