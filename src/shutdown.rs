//! Graceful shutdown: one signal, passed down explicitly to every task that must stop.
//!
//! [`Shutdown`] is cheap to clone; [`Shutdown::on_signal`] trips it on SIGTERM or Ctrl-C, and
//! tests trip it by hand with [`Shutdown::trigger`].
//!
//! [`Supervisor`] holds the tasks a role serves with (listeners, loops). A task that ends
//! before the signal, fails or panics is a failure of the whole process: the supervisor logs
//! it by name, fires the signal so the others stop, and the role exits non-zero, so that
//! Kubernetes restarts the container instead of leaving a pod that looks alive but no longer
//! serves one of its ports.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

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
    pub fn is_triggered(&self) -> bool {
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

/// A supervised task that stopped when it should not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{task} {message}")]
pub struct TaskFailure {
    /// Which task (e.g. `KEDA gRPC server`).
    pub task: String,
    /// What happened to it, worded to follow the task's name.
    pub message: String,
}

/// Reports failures of tasks spawned outside the [`Supervisor`] (one per tracked hub, say),
/// so that they bring the process down the same way.
#[derive(Debug, Clone)]
pub struct FailureReporter {
    sender: mpsc::UnboundedSender<TaskFailure>,
}

impl FailureReporter {
    /// Spawns `future` as task `name`; its panic is a failure. Ending is not: these tasks
    /// end on their own (a hub dropped), so only the panic is reported.
    pub fn spawn_watched(&self, name: String, future: impl Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(future);
        let sender = self.sender.clone();
        tokio::spawn(async move {
            if let Err(e) = handle.await
                && e.is_panic()
            {
                let _ =
                    sender.send(TaskFailure { task: name, message: format!("panicked: {}", panic_text(e)) });
            }
        });
    }

    /// Reports `failure` as if a supervised task had failed.
    pub fn report(&self, failure: TaskFailure) {
        let _ = self.sender.send(failure);
    }
}

fn panic_text(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into()),
        Err(e) => e.to_string(),
    }
}

/// The tasks of one role that must all run until the shutdown signal.
#[derive(Debug)]
pub struct Supervisor {
    shutdown: Shutdown,
    tasks: JoinSet<Result<(), String>>,
    names: HashMap<tokio::task::Id, String>,
    reporter: FailureReporter,
    reports: mpsc::UnboundedReceiver<TaskFailure>,
}

impl Supervisor {
    /// A supervisor whose tasks stop on `shutdown`; it fires `shutdown` itself on a failure.
    pub fn new(shutdown: Shutdown) -> Self {
        let (sender, reports) = mpsc::unbounded_channel();
        Self {
            shutdown,
            tasks: JoinSet::new(),
            names: HashMap::new(),
            reporter: FailureReporter { sender },
            reports,
        }
    }

    /// Runs `future` as task `name` (inside the tokio runtime). It must run until the shutdown
    /// signal: ending before it, with or without an error, or panicking, is a failure.
    pub fn spawn(
        &mut self,
        name: impl Into<String>,
        future: impl Future<Output = Result<(), String>> + Send + 'static,
    ) {
        let handle = self.tasks.spawn(future);
        self.names.insert(handle.id(), name.into());
    }

    /// Where tasks spawned elsewhere report their failures.
    pub fn reporter(&self) -> FailureReporter {
        self.reporter.clone()
    }

    /// Waits for the shutdown signal or the first failure. On a failure it logs the task's
    /// name, fires the signal and returns the failure once the other tasks stopped (or
    /// `drain` passed). After the signal it waits up to `drain` for every task; a task that
    /// fails while stopping is returned too.
    pub async fn supervise(mut self, drain: Duration) -> Result<(), TaskFailure> {
        let failure = loop {
            tokio::select! {
                _ = self.shutdown.wait() => break None,
                Some(failure) = self.reports.recv() => break Some(failure),
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    let failure = self.failure(joined, false);
                    if failure.is_some() || self.shutdown.is_triggered() {
                        break failure;
                    }
                }
            }
        };
        if let Some(f) = &failure {
            tracing::error!(task = %f.task, "{f}; stopping the process so that it is restarted");
            self.shutdown.trigger();
        }
        let mut first = failure;
        let rest = async {
            while let Some(joined) = self.tasks.join_next_with_id().await {
                if let Some(f) = self.failure(joined, true) {
                    tracing::error!(task = %f.task, "{f}");
                    first.get_or_insert(f);
                }
            }
        };
        if tokio::time::timeout(drain, rest).await.is_err() {
            let left: Vec<&String> = self.names.values().collect();
            tracing::warn!(?left, "tasks still running {} ms after the shutdown signal", drain.as_millis());
        }
        first.map_or(Ok(()), Err)
    }

    /// The failure, if any, of a task that ended (`stopping`: after the signal, when ending
    /// is expected).
    fn failure(
        &mut self,
        joined: Result<(tokio::task::Id, Result<(), String>), tokio::task::JoinError>,
        stopping: bool,
    ) -> Option<TaskFailure> {
        let (id, message) = match joined {
            Ok((id, Ok(()))) if stopping || self.shutdown.is_triggered() => (id, None),
            Ok((id, Ok(()))) => (id, Some("ended before the shutdown signal".to_string())),
            Ok((id, Err(e))) => (id, Some(format!("failed: {e}"))),
            Err(e) if e.is_panic() => (e.id(), Some(format!("panicked: {}", panic_text(e)))),
            Err(e) => (e.id(), Some("was cancelled".to_string())),
        };
        let task = self.names.remove(&id).unwrap_or_else(|| "a task".into());
        let message = message?;
        Some(TaskFailure { task, message })
    }
}

/// Asks the OS to SIGKILL the child `command` starts when the thread that spawns it ends
/// (Linux; elsewhere nothing), so children of a test or the demo never outlive it even when
/// it is killed. Spawn from a thread that lives as long as the parent should: the signal
/// follows the spawning thread, not the process.
pub fn kill_child_with_parent(command: &mut std::process::Command) {
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
    async fn a_task_that_ends_early_is_a_failure_naming_it_and_stops_the_others() {
        let shutdown = Shutdown::new();
        let mut supervisor = Supervisor::new(shutdown.clone());
        let waiter = shutdown.clone();
        supervisor.spawn("patient loop", async move {
            waiter.wait().await;
            Ok(())
        });
        supervisor.spawn("report port", async { Ok(()) });
        let failure = supervisor.supervise(Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(failure.task, "report port");
        assert_eq!(failure.to_string(), "report port ended before the shutdown signal");
        assert!(shutdown.is_triggered(), "the others are told to stop");
    }

    #[tokio::test]
    async fn a_task_error_or_panic_is_a_failure_with_its_message() {
        let mut supervisor = Supervisor::new(Shutdown::new());
        supervisor.spawn("HTTP", async { Err("accept: too many open files".to_string()) });
        let failure = supervisor.supervise(Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(failure.to_string(), "HTTP failed: accept: too many open files");

        let mut supervisor = Supervisor::new(Shutdown::new());
        supervisor.spawn("sample loop", async { panic!("boom") });
        let failure = supervisor.supervise(Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(failure.to_string(), "sample loop panicked: boom");
    }

    #[tokio::test]
    async fn a_panic_in_a_watched_task_is_reported() {
        let supervisor = Supervisor::new(Shutdown::new());
        supervisor.reporter().spawn_watched("cold probe of apps/hub".into(), async { panic!("bad") });
        supervisor.reporter().spawn_watched("cold probe of apps/other".into(), async {});
        let failure = supervisor.supervise(Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(failure.to_string(), "cold probe of apps/hub panicked: bad");
    }

    #[tokio::test]
    async fn tasks_that_stop_after_the_signal_are_no_failure() {
        let shutdown = Shutdown::new();
        let mut supervisor = Supervisor::new(shutdown.clone());
        for name in ["a", "b"] {
            let waiter = shutdown.clone();
            supervisor.spawn(name, async move {
                waiter.wait().await;
                Ok(())
            });
        }
        shutdown.trigger();
        assert_eq!(supervisor.supervise(Duration::from_secs(5)).await, Ok(()));
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
