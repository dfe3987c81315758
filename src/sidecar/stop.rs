//! When a plain-container sidecar leaves: after its app.
//!
//! A native sidecar (an init container with `restartPolicy: Always`) is stopped by the kubelet
//! only once the app containers have exited (KEP-753), so it leaves at SIGTERM. A sidecar in
//! `containers` gets SIGTERM at the same moment as the app, and the app may go on working for
//! a while: the Functions host drains its listeners and waits for the script host
//! (azure-functions-host `WebJobsScriptHostService.StopAsync`, up to 10 s), a preStop hook may
//! hold its SIGTERM back, and the official images' PID 1 (`start_nonappservice.sh`, bash)
//! does not pass SIGTERM on at all, so the host runs until the kubelet's SIGKILL. Leaving
//! first would tell the aggregator that the pod's partitions are free while the app still
//! holds them. So, with `--app-exit-wait` set (the webhook sets it for plain containers), the
//! sidecar keeps polling and reporting after SIGTERM, each report marked `draining` and still
//! carrying what the pod owns, and sends its `leaving` report only when
//!
//! - the app stopped: it had been listening on `--app-port` (the app container's declared
//!   port, which the webhook passes) and that port now refuses connections on loopback twice
//!   in a row, and a poll made after that finds no partition owned by this pod (Kestrel stops
//!   listening as the host begins to stop, before the script host stops: the partitions tell
//!   the rest); or
//! - the wait ran out (`--app-exit-wait`, the pod's grace period less 3 s, so the `leaving`
//!   report goes out before the kubelet's SIGKILL). With no port known, or one the app was
//!   never seen listening on, this bounded wait is all there is.
//!
//! Connecting to a port of the pod's own network namespace needs no privilege; nothing is
//! sent on the connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::shutdown::Shutdown;

/// How often the app's port is tried once the sidecar drains.
const PORT_CHECK_EVERY: Duration = Duration::from_millis(250);
/// How long one try may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// What the poll loop tells the stop logic after each poll.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PollProgress {
    /// Polls completed so far.
    pub(crate) polls: u64,
    /// Partitions this pod owned at the last one.
    pub(crate) owned: usize,
}

/// What the poll loop and the stop logic share about the app.
#[derive(Debug)]
pub(crate) struct AppWatch {
    /// The app's port.
    pub(crate) port: Option<u16>,
    /// Whether the app was seen listening on it.
    pub(crate) seen_listening: AtomicBool,
    /// Asks the poll loop for a poll now.
    pub(crate) poll_now: Notify,
}

impl AppWatch {
    /// A watch of `port`.
    pub(crate) fn new(port: Option<u16>) -> Arc<Self> {
        Arc::new(Self { port, seen_listening: AtomicBool::new(false), poll_now: Notify::new() })
    }

    /// Called at each poll until the app was seen listening.
    pub(crate) async fn look(&self) {
        if let Some(port) = self.port
            && !self.seen_listening.load(Ordering::Relaxed)
            && accepts(port).await
        {
            tracing::debug!(port, "the app listens on its port");
            self.seen_listening.store(true, Ordering::Relaxed);
        }
    }
}

/// Whether something accepts TCP connections on `port` of this pod (IPv4 or IPv6 loopback).
pub(crate) async fn accepts(port: u16) -> bool {
    for host in
        [std::net::IpAddr::from([127, 0, 0, 1]), std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST)]
    {
        let connect = tokio::net::TcpStream::connect((host, port));
        if matches!(tokio::time::timeout(CONNECT_TIMEOUT, connect).await, Ok(Ok(_))) {
            return true;
        }
    }
    false
}

/// Fires `stop` once the app stopped after `sigterm` fired, or `wait` after it; returns at
/// once if `stop` fires first (a task failed).
pub(crate) async fn stop_after_app(
    sigterm: Shutdown,
    stop: Shutdown,
    app: Arc<AppWatch>,
    polls: watch::Receiver<PollProgress>,
    wait: Duration,
) {
    tokio::select! {
        () = sigterm.wait() => {}
        () = stop.wait() => return,
    }
    tracing::info!(
        port = app.port,
        app_seen_listening = app.seen_listening.load(Ordering::Relaxed),
        wait_s = wait.as_secs_f64(),
        "draining: reporting what the pod holds until the app stops"
    );
    let reason = tokio::select! {
        reason = app_stopped(&app, polls) => reason,
        () = tokio::time::sleep(wait) => "the wait for the app ran out",
        () = stop.wait() => return,
    };
    tracing::info!(reason, "leaving");
    stop.trigger();
}

/// Completes when the app stopped: its port refuses connections (twice in a row) and a poll
/// made afterwards finds no partition owned. Never, when the app was not seen listening.
async fn app_stopped(app: &AppWatch, mut polls: watch::Receiver<PollProgress>) -> &'static str {
    let Some(port) = app.port.filter(|_| app.seen_listening.load(Ordering::Relaxed)) else {
        return std::future::pending().await;
    };
    let mut refused = 0;
    while refused < 2 {
        tokio::time::sleep(PORT_CHECK_EVERY).await;
        refused = if accepts(port).await { 0 } else { refused + 1 };
    }
    tracing::debug!(port, "the app no longer listens; waiting for its partitions to be released");
    let closed_at = polls.borrow_and_update().polls;
    app.poll_now.notify_one();
    loop {
        if polls.changed().await.is_err() {
            // The poll loop ended: nothing more to wait for.
            return "the poll loop ended";
        }
        let progress = *polls.borrow_and_update();
        if progress.polls > closed_at && progress.owned == 0 {
            return "the app stopped listening and released its partitions";
        }
    }
}
