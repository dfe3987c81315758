//! Graceful shutdown: one signal, passed down explicitly to every task that must stop.
//!
//! [`Shutdown`] is cheap to clone; [`Shutdown::on_signal`] trips it on SIGTERM or Ctrl-C, and
//! tests trip it by hand with [`Shutdown::trigger`].

use tokio::sync::watch;

/// A shutdown signal shared by every task of one process (or one test).
#[derive(Debug, Clone)]
pub struct Shutdown {
    sender: std::sync::Arc<watch::Sender<bool>>,
    receiver: watch::Receiver<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A signal that has not fired.
    pub fn new() -> Self {
        let (sender, receiver) = watch::channel(false);
        Self { sender: std::sync::Arc::new(sender), receiver }
    }

    /// A signal that fires on SIGTERM or SIGINT (Ctrl-C). The SIGTERM handler is installed
    /// before this returns, so a SIGTERM that arrives at once is not lost. Call it inside the
    /// tokio runtime.
    pub(crate) fn on_signal() -> Self {
        let shutdown = Self::new();
        let trigger = shutdown.clone();
        let signals = Signals::install();
        tokio::spawn(async move {
            let reason = signals.wait().await;
            tracing::info!(signal = reason, "shutting down");
            trigger.trigger();
        });
        shutdown
    }

    /// Fires the signal; every waiter wakes.
    pub fn trigger(&self) {
        self.sender.send_replace(true);
    }

    /// True once the signal has fired.
    pub(crate) fn is_triggered(&self) -> bool {
        *self.receiver.borrow()
    }

    /// Waits for `ticker`'s next tick; false instead when the signal fires first. The loops
    /// that work on an interval read `while shutdown.tick(&mut ticker).await { ... }`.
    pub(crate) async fn tick(&self, ticker: &mut tokio::time::Interval) -> bool {
        tokio::select! {
            _ = self.wait() => false,
            _ = ticker.tick() => !self.is_triggered(),
        }
    }

    /// Completes when the signal fires (at once if it already has).
    pub(crate) async fn wait(&self) {
        let mut receiver = self.receiver.clone();
        // An error means every sender is gone, which only happens when nothing can fire it.
        let _ = receiver.wait_for(|fired| *fired).await;
    }
}

/// Asks the OS to SIGKILL the child `command` starts when the thread that spawns it ends
/// (Linux; elsewhere nothing), so children of a test or the demo never outlive it even when
/// it is killed. Spawn from a thread that lives as long as the parent should: the signal
/// follows the spawning thread, not the process.
pub(crate) fn kill_child_with_parent(command: &mut std::process::Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = command;
}

/// The process signals that stop a role.
struct Signals {
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Self { terminate: signal(SignalKind::terminate()).ok() }
        }
        #[cfg(not(unix))]
        Self {}
    }

    async fn wait(self) -> &'static str {
        #[cfg(unix)]
        if let Some(mut terminate) = self.terminate {
            return tokio::select! {
                _ = terminate.recv() => "SIGTERM",
                _ = tokio::signal::ctrl_c() => "SIGINT",
            };
        }
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_clone_sees_the_trigger() {
        let shutdown = Shutdown::new();
        let waiter = shutdown.clone();
        let task = tokio::spawn(async move { waiter.wait().await });
        assert!(!shutdown.is_triggered());
        shutdown.trigger();
        task.await.unwrap();
        assert!(shutdown.is_triggered());
        shutdown.wait().await;
    }

    #[tokio::test]
    async fn tick_waits_for_the_ticker_until_the_signal_fires() {
        let shutdown = Shutdown::new();
        let mut ticker = tokio::time::interval(std::time::Duration::from_millis(1));
        assert!(shutdown.tick(&mut ticker).await, "a tick while running");
        shutdown.trigger();
        let mut slow = tokio::time::interval(std::time::Duration::from_secs(3600));
        slow.tick().await;
        assert!(!shutdown.tick(&mut slow).await, "the signal ends the wait, not the hour");
    }
}
