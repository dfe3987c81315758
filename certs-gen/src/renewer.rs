//! `certs-gen run`: the long-running certificate keeper of the `durable-scaler-certs-gen`
//! Deployment. Every round it makes sure of one TLS Secret and, for the webhook's, of the
//! MutatingWebhookConfiguration's `caBundle` ([`cluster::reconcile`]), then sleeps; a failed
//! round is retried sooner, with back-off. It stops between two API calls on SIGTERM.
//!
//! The time is passed in through [`Clock`] (the current time and the sleeps), so the tests
//! drive whole days of rounds without sleeping.

use std::{future::Future, time::Duration};

use kube::Client;
use time::OffsetDateTime;

use crate::cluster::{self, Outcome, SecretSpec};

/// The current time and sleeping, as the loop sees them.
pub trait Clock {
    /// The wall-clock time now (certificate validity is wall-clock time).
    fn now(&self) -> OffsetDateTime;
    /// Waits for `duration`.
    fn sleep(&mut self, duration: Duration) -> impl Future<Output = ()> + Send;
}

/// The real clock: the system time and tokio's timer.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    fn sleep(&mut self, duration: Duration) -> impl Future<Output = ()> + Send {
        tokio::time::sleep(duration)
    }
}

/// How often the loop runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Between two successful rounds.
    pub interval: Duration,
    /// After the first failed round; doubled after each further failure, up to `interval`.
    pub first_retry: Duration,
}

impl Schedule {
    /// The pause after a round, given how many rounds in a row have failed (0: it succeeded).
    pub fn pause(&self, failures: u32) -> Duration {
        if failures == 0 {
            return self.interval;
        }
        let factor = 2u32.saturating_pow(failures - 1);
        self.first_retry.saturating_mul(factor).min(self.interval)
    }
}

/// Runs rounds of [`cluster::reconcile`] until `shutdown` completes (checked while sleeping,
/// so a round in flight finishes first). Returns how many rounds ran.
pub async fn run(
    client: Client,
    spec: &SecretSpec,
    config: Option<&str>,
    schedule: Schedule,
    clock: &mut impl Clock,
    shutdown: impl Future<Output = ()>,
) -> u64 {
    tokio::pin!(shutdown);
    let mut failures = 0u32;
    let mut rounds = 0u64;
    loop {
        rounds += 1;
        match cluster::reconcile(client.clone(), spec, config, clock.now()).await {
            Ok(done) => {
                failures = 0;
                log(spec, config, &done);
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                tracing::error!(
                    secret = %format!("{}/{}", spec.namespace, spec.secret),
                    retry_in = ?schedule.pause(failures),
                    "{error}"
                );
            }
        }
        tokio::select! {
            () = clock.sleep(schedule.pause(failures)) => {}
            () = &mut shutdown => return rounds,
        }
    }
}

fn log(spec: &SecretSpec, config: Option<&str>, done: &cluster::Reconciled) {
    let secret = format!("{}/{}", spec.namespace, spec.secret);
    match &done.secret {
        Outcome::Created => tracing::info!(%secret, "created the Secret"),
        Outcome::Renewed { reason } => tracing::info!(%secret, "renewed the Secret: {reason}"),
        Outcome::Unchanged => tracing::debug!(%secret, "the Secret is valid"),
    }
    if done.ca_bundles_patched > 0 {
        tracing::info!(
            config = config.unwrap_or_default(),
            "wrote the CA into {} caBundle(s)",
            done.ca_bundles_patched
        );
    }
}

/// Completes on SIGTERM (what the kubelet sends to stop a container) or Ctrl-C.
pub async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(error) => {
                tracing::warn!("cannot listen for SIGTERM ({error}); stopping on Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_rounds_back_off_doubling_up_to_the_interval() {
        let schedule = Schedule { interval: Duration::from_secs(600), first_retry: Duration::from_secs(5) };
        let pauses: Vec<u64> = (0..9).map(|f| schedule.pause(f).as_secs()).collect();
        assert_eq!(pauses, [600, 5, 10, 20, 40, 80, 160, 320, 600]);
        assert_eq!(schedule.pause(u32::MAX), schedule.interval);
    }
}
