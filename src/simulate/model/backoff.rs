//! DTFx's queue polling back-off (DurableTask.AzureStorage `BackoffPollingHelper.cs`, its
//! `RandomizedExponentialBackoffStrategy`, and `Messaging/TaskHubQueue.cs`, which builds one per
//! queue object with a 50 ms minimum and `MaxQueuePollingInterval` as maximum).
//!
//! `WaitAsync` waits the current interval, cut short by `Reset`, then `UpdateDelay(signaled)`:
//! after a signal the interval is the minimum; otherwise min + rand(0.8..1.2) x 2^(k-1) x min
//! and k + 1, until that reaches the maximum, which then stays. The interval starts at 0, so
//! the first empty fetch does not wait. `Reset` comes from a fetch that found messages and from
//! the worker's own enqueue on that queue (`TaskHubQueue.AddMessageAsync`: "Wake up the queue
//! polling thread").

use rand::{Rng, rngs::StdRng};

/// The randomization of the back-off, +-20 % (`RandomizationFactor`).
const RANDOMIZATION: f64 = 0.2;

/// One queue's polling loop on one pod.
#[derive(Debug, Clone, Copy)]
pub(super) struct Poller {
    /// The back-off's minimum and step (ms).
    min_ms: u64,
    /// `MaxQueuePollingInterval` (ms).
    max_ms: u64,
    /// When the loop fetches next.
    next_ms: u64,
    interval_ms: u64,
    exponent: u32,
    /// `Reset` was called and no wait has consumed it yet.
    signaled: bool,
    /// A wait runs until `next_ms`.
    waiting: bool,
}

impl Poller {
    /// A fresh loop (a new queue object) between `min_ms` and `max_ms` that fetches first at
    /// `at_ms`.
    pub(super) fn new(min_ms: u64, max_ms: u64, at_ms: u64) -> Self {
        Self {
            min_ms,
            max_ms: max_ms.max(min_ms),
            next_ms: at_ms,
            interval_ms: 0,
            exponent: 0,
            signaled: false,
            waiting: false,
        }
    }

    /// The loop fetches at `now_ms` (or is already late).
    pub(super) fn due(&self, now_ms: u64) -> bool {
        now_ms >= self.next_ms
    }

    /// The loop pauses until `at_ms` without a back-off step (a full buffer's 1 s retry).
    pub(super) fn pause_until(&mut self, at_ms: u64) {
        self.next_ms = at_ms;
    }

    fn update_delay(&mut self, signaled: bool, rng: &mut StdRng) {
        if signaled {
            self.interval_ms = self.min_ms;
            self.exponent = 1;
        } else if self.interval_ms != self.max_ms {
            let mut interval = self.min_ms as f64;
            if self.exponent > 0 {
                let factor = rng.random_range(1.0 - RANDOMIZATION..1.0 + RANDOMIZATION);
                interval += factor * 2f64.powi((self.exponent - 1).min(62) as i32) * self.min_ms as f64;
            }
            if interval < self.max_ms as f64 {
                self.interval_ms = interval as u64;
                self.exponent += 1;
            } else {
                self.interval_ms = self.max_ms;
            }
        }
    }

    /// A fetch is about to run: a wait that ran out ends unsignaled.
    pub(super) fn begin(&mut self, rng: &mut StdRng) {
        if std::mem::take(&mut self.waiting) {
            self.update_delay(false, rng);
        }
    }

    /// The fetch returned messages: `Reset`, and the loop goes on at once.
    pub(super) fn found(&mut self, now_ms: u64) {
        self.signaled = true;
        self.next_ms = now_ms;
    }

    /// The fetch returned nothing: `WaitAsync`.
    pub(super) fn empty(&mut self, now_ms: u64, rng: &mut StdRng) {
        if std::mem::take(&mut self.signaled) {
            self.update_delay(true, rng);
            self.next_ms = now_ms;
        } else {
            self.waiting = true;
            self.next_ms = now_ms + self.interval_ms;
        }
    }

    /// `Reset` from outside the loop: the pod enqueued a message on this queue.
    pub(super) fn signal(&mut self, now_ms: u64, rng: &mut StdRng) {
        if std::mem::take(&mut self.waiting) {
            self.update_delay(true, rng);
            self.next_ms = self.next_ms.min(now_ms);
        } else {
            self.signaled = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    /// DTFx's defaults: 50 ms, 30 s.
    fn poller() -> Poller {
        Poller::new(50, 30_000, 0)
    }

    #[test]
    fn the_back_off_starts_at_zero_then_doubles_from_fifty_ms_to_the_maximum() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut p = poller();
        let mut waits = Vec::new();
        let mut now = 0;
        for _ in 0..16 {
            p.begin(&mut rng);
            p.empty(now, &mut rng);
            waits.push(p.next_ms - now);
            now = p.next_ms;
        }
        assert_eq!(&waits[..2], &[0, 50]);
        for (k, wait) in waits.iter().enumerate().skip(2).take(8) {
            let step = 50.0 * 2f64.powi(k as i32 - 2);
            let (low, high) = (50.0 + 0.8 * step, 50.0 + 1.2 * step);
            assert!((low..=high).contains(&(*wait as f64)), "wait {k} = {wait}, expected {low}..{high}");
        }
        assert_eq!(waits.last(), Some(&30_000), "capped at maxQueuePollingInterval: {waits:?}");
    }

    #[test]
    fn an_own_enqueue_ends_the_wait_and_restarts_the_back_off() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut p = Poller { interval_ms: 30_000, exponent: 12, ..poller() };
        p.empty(1_000, &mut rng);
        assert_eq!(p.next_ms, 31_000);
        p.signal(5_000, &mut rng);
        assert_eq!((p.next_ms, p.interval_ms, p.exponent), (5_000, 50, 1));
    }

    #[test]
    fn a_fetch_that_found_messages_makes_the_next_empty_fetch_retry_at_once() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut p = Poller { interval_ms: 30_000, exponent: 12, ..poller() };
        p.found(2_000);
        p.empty(2_100, &mut rng);
        assert_eq!((p.next_ms, p.interval_ms), (2_100, 50));
    }
}
