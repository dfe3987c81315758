//! The Durable Task Framework's latency vote, as `DisconnectedPerformanceMonitor` in
//! DurableTask.AzureStorage 2.x casts it (durabletask-facts.md, "Heuristic 1").
//!
//! Each queue keeps its last [`SAMPLE_SIZE`] latencies in a ring initialised with zeros; the
//! vote walks a fixed list of rules and the first that matches decides. The reason strings
//! are upstream's, including their `>` where the test is `>=`.

use rand::{Rng, SeedableRng, rngs::StdRng};

use super::{Recommendation, ScaleAction};

/// Samples kept per queue.
pub(crate) const SAMPLE_SIZE: usize = 5;
/// Latency (ms) at or under which a queue counts as not busy.
pub(crate) const LOW_LATENCY_MS: u64 = 200;
/// Upstream's default maximum polling interval (ms).
pub(crate) const DEFAULT_MAX_POLLING_INTERVAL_MS: u64 = 30_000;

/// The seed of a hub's random scale-in: FNV-1a of its lowercased name, so each hub draws its
/// own sequence, the same after every restart.
pub fn seed_for(task_hub: &str) -> u64 {
    task_hub.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(b.to_ascii_lowercase())).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The last [`SAMPLE_SIZE`] latency samples of one queue, a ring initialised with zeros.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LatencyHistory {
    slots: [u64; SAMPLE_SIZE],
    /// Samples added so far (saturating); the ring is full once this reaches SAMPLE_SIZE.
    added: usize,
}

impl LatencyHistory {
    /// An empty history: all slots zero, not yet full.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// A history that has seen `samples` in order (oldest first).
    #[cfg(test)]
    pub(crate) fn from_samples(samples: impl IntoIterator<Item = u64>) -> Self {
        let mut history = Self::new();
        for sample in samples {
            history.add(sample);
        }
        history
    }

    /// Records one sample, pushing the oldest out once the ring is full.
    pub(crate) fn add(&mut self, latency_ms: u64) {
        self.slots[self.added % SAMPLE_SIZE] = latency_ms;
        // Keep the index's residue while never overflowing.
        self.added =
            if self.added >= 2 * SAMPLE_SIZE { self.added - SAMPLE_SIZE + 1 } else { self.added + 1 };
    }

    /// True once [`SAMPLE_SIZE`] samples have been added.
    pub(crate) fn is_full(&self) -> bool {
        self.added >= SAMPLE_SIZE
    }

    /// The most recent sample (0 before any).
    pub(crate) fn latest(&self) -> u64 {
        self.slots[(self.added + SAMPLE_SIZE - 1) % SAMPLE_SIZE]
    }

    /// The sample before the latest (0 before two samples).
    pub(crate) fn previous(&self) -> u64 {
        self.slots[(self.added + SAMPLE_SIZE - 2) % SAMPLE_SIZE]
    }

    /// The ring's slots, oldest first.
    pub fn samples(&self) -> [u64; SAMPLE_SIZE] {
        std::array::from_fn(|i| self.slots[(self.added + i) % SAMPLE_SIZE])
    }

    /// All slots are zero.
    pub(crate) fn is_idle(&self) -> bool {
        self.slots.iter().all(|&s| s == 0)
    }

    /// Upstream's `IsHighLatency`: right after an idle sample only a latency at the maximum
    /// polling interval counts, otherwise anything at or over `high_ms`.
    fn is_high(&self, high_ms: u64, max_polling_interval_ms: u64) -> bool {
        if self.previous() == 0 { self.latest() >= max_polling_interval_ms } else { self.latest() >= high_ms }
    }

    /// Upstream's `IsLowLatency` for control queues: the last two samples are low.
    fn is_low(&self) -> bool {
        self.latest() <= LOW_LATENCY_MS && self.previous() <= LOW_LATENCY_MS
    }
}

/// The latency histories of one task hub: the work-item queue and one per partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TaskHubLatencies {
    /// The work-item (activity) queue.
    pub work_item: LatencyHistory,
    /// Control queue `i` of partition `i`; the partition count is this vector's length.
    pub control: Vec<LatencyHistory>,
}

impl TaskHubLatencies {
    /// Empty histories for a hub of `partitions` control queues.
    pub(crate) fn new(partitions: usize) -> Self {
        Self { work_item: LatencyHistory::new(), control: vec![LatencyHistory::new(); partitions] }
    }

    fn rings(&self) -> impl Iterator<Item = &LatencyHistory> {
        std::iter::once(&self.work_item).chain(self.control.iter())
    }
}

/// Casts the DTFx latency vote. Holds the settings and, when random scale-in is on, its
/// seeded random source.
#[derive(Debug, Clone)]
pub(crate) struct LatencyVoter {
    max_polling_interval_ms: u64,
    random_scale_in: Option<StdRng>,
}

impl LatencyVoter {
    /// A voter with random scale-in off (deterministic; what the conformance cases use).
    pub(crate) fn new(max_polling_interval_ms: u64) -> Self {
        Self { max_polling_interval_ms, random_scale_in: None }
    }

    /// A voter with upstream's random scale-in ("All queues are not busy", one chance in
    /// ten) on, drawing from a generator seeded with `seed`.
    pub(crate) fn with_random_scale_in(max_polling_interval_ms: u64, seed: u64) -> Self {
        Self { max_polling_interval_ms, random_scale_in: Some(StdRng::seed_from_u64(seed)) }
    }

    /// The latency at or over which a queue is hot: min(maxPoll, 1000).
    pub(crate) fn high_latency_ms(&self) -> u64 {
        self.max_polling_interval_ms.min(1000)
    }

    /// The vote for `hub` with `workers` workers, rules in upstream's order.
    pub(crate) fn vote(&mut self, hub: &TaskHubLatencies, workers: u32) -> Recommendation {
        let (action, keep, reason) = self.rule(hub, workers);
        Recommendation::step(workers, action, keep, reason)
    }

    fn rule(&mut self, hub: &TaskHubLatencies, workers: u32) -> (ScaleAction, bool, String) {
        use ScaleAction::*;
        let high = self.high_latency_ms();
        let max_poll = self.max_polling_interval_ms;
        let wi = &hub.work_item;
        let partitions = hub.control.len() as u64;
        let w = u64::from(workers);
        let idle = wi.is_idle() && hub.control.iter().all(LatencyHistory::is_idle);

        if w == 0 && !idle {
            return (AddWorker, true, "First worker".into());
        }
        if hub.rings().any(|h| !h.is_full()) {
            return (None, !idle, "Not enough samples".into());
        }
        if idle {
            let action = if w > 0 { RemoveWorker } else { None };
            return (action, false, "Task hub is idle".into());
        }
        if wi.is_high(high, max_poll) {
            return (AddWorker, true, format!("Work-item queue latency: {} > {}", wi.latest(), high));
        }
        if w > partitions && wi.is_idle() {
            return (
                RemoveWorker,
                true,
                format!("Work-items idle, #workers > partitions ({w} > {partitions})"),
            );
        }
        let hot: Vec<&LatencyHistory> = hub.control.iter().filter(|h| h.is_high(high, max_poll)).collect();
        if w < hot.len() as u64 {
            return (AddWorker, true, format!("High control queue latency: {} > {}", hot[0].latest(), high));
        }
        let busy = hub.control.iter().filter(|h| !h.is_idle()).count() as u64;
        if w > busy && wi.is_idle() {
            let keep = hub.control.iter().any(LatencyHistory::is_idle);
            return (RemoveWorker, keep, "One or more control queues idle".into());
        }
        // Conditions in upstream order: the random draw happens only when w > 1.
        if w > 1
            && let Some(rng) = self.random_scale_in.as_mut()
            && rng.random_range(0..10) == 0
            && hub.control.iter().all(LatencyHistory::is_low)
            && wi.samples().iter().all(|&s| s < LOW_LATENCY_MS)
        {
            return (RemoveWorker, true, "All queues are not busy".into());
        }
        (None, true, "Queue latencies are healthy".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: usize = 4;

    /// A hub where the named queues saw `samples` and every other queue saw as many zeros.
    fn hub(work_item: &[u64], control: &[(usize, &[u64])]) -> TaskHubLatencies {
        let n =
            std::iter::once(work_item.len()).chain(control.iter().map(|(_, s)| s.len())).max().unwrap_or(0);
        let zeros = vec![0; n];
        let pick = |s: &[u64]| if s.is_empty() { zeros.clone() } else { s.to_vec() };
        TaskHubLatencies {
            work_item: LatencyHistory::from_samples(pick(work_item)),
            control: (0..P)
                .map(|i| {
                    let named = control.iter().find(|(q, _)| *q == i).map(|(_, s)| *s).unwrap_or(&[]);
                    LatencyHistory::from_samples(pick(named))
                })
                .collect(),
        }
    }

    fn vote(hub: &TaskHubLatencies, workers: u32) -> (ScaleAction, bool) {
        let r = LatencyVoter::new(DEFAULT_MAX_POLLING_INTERVAL_MS).vote(hub, workers);
        (r.action, r.keep_workers_alive)
    }

    use ScaleAction::{AddWorker, None as NoAction, RemoveWorker};

    #[test]
    fn a_hubs_seed_ignores_case_and_differs_between_hubs() {
        assert_eq!(seed_for("MyHub"), seed_for("myhub"));
        assert_ne!(seed_for("MyHub"), seed_for("OtherHub"));
    }

    #[test]
    fn ring_drops_the_oldest_of_six_samples() {
        let h = LatencyHistory::from_samples([500, 600, 700, 800, 900, 1000]);
        assert_eq!(h.samples(), [600, 700, 800, 900, 1000]);
        assert_eq!((h.latest(), h.previous()), (1000, 900));
        assert!(h.is_full());
    }

    #[test]
    fn ring_index_survives_many_samples() {
        let h = LatencyHistory::from_samples(1..=1003);
        assert_eq!(h.samples(), [999, 1000, 1001, 1002, 1003]);
    }

    #[test]
    fn rising_work_item_latency_adds_a_worker() {
        assert_eq!(vote(&hub(&[500, 600, 700, 800, 900, 1000], &[]), 1), (AddWorker, true));
    }

    #[test]
    fn work_item_latency_under_high_is_healthy() {
        assert_eq!(vote(&hub(&[500, 600, 700, 800, 900], &[]), 1), (NoAction, true));
    }

    #[test]
    fn a_spike_that_fell_out_of_the_ring_leaves_the_hub_idle() {
        assert_eq!(vote(&hub(&[30000, 0, 0, 0, 0, 0], &[]), 1), (RemoveWorker, false));
    }

    #[test]
    fn one_nonzero_work_item_sample_keeps_workers() {
        assert_eq!(vote(&hub(&[1, 0, 0, 0, 0], &[]), 1), (NoAction, true));
    }

    #[test]
    fn a_low_latest_after_high_samples_is_healthy() {
        assert_eq!(vote(&hub(&[30000, 30000, 30000, 30000, 3], &[]), 1), (NoAction, true));
    }

    #[test]
    fn one_hot_control_queue_needs_one_worker() {
        assert_eq!(vote(&hub(&[], &[(3, &[600, 700, 800, 900, 1000])]), 1), (NoAction, true));
    }

    #[test]
    fn two_hot_control_queues_need_two_workers() {
        let s: &[u64] = &[600, 700, 800, 900, 1000];
        let h = hub(&[], &[(2, s), (3, s)]);
        assert_eq!(vote(&h, 1).0, AddWorker);
        assert_eq!(vote(&h, 2).0, NoAction);
    }

    #[test]
    fn every_hot_control_queue_wants_a_worker_each_and_no_more() {
        let s: &[u64] = &[600, 700, 800, 900, 1000];
        let h = hub(&[], &[(0, s), (1, s), (2, s), (3, s)]);
        assert_eq!(vote(&h, 3).0, AddWorker);
        assert_eq!(vote(&h, 4).0, NoAction);
        assert_eq!(vote(&h, 5), (RemoveWorker, true));
    }

    #[test]
    fn busy_but_not_hot_control_queues_cap_workers_at_partitions() {
        let s: &[u64] = &[500; 5];
        let h = hub(&[], &[(0, s), (1, s), (2, s), (3, s)]);
        for w in 1..=4 {
            assert_eq!(vote(&h, w), (NoAction, true), "workers {w}");
        }
        for w in 5..=9 {
            assert_eq!(vote(&h, w), (RemoveWorker, true), "workers {w}");
        }
    }

    #[test]
    fn an_idle_control_queue_removes_workers_beyond_the_busy_ones() {
        let ones: &[u64] = &[1; 6];
        let h = hub(&[], &[(0, &[1, 0, 0, 0, 0, 0]), (1, ones), (2, ones), (3, ones)]);
        for w in 1..=3 {
            assert_eq!(vote(&h, w), (NoAction, true), "workers {w}");
        }
        for w in 4..=8 {
            assert_eq!(vote(&h, w), (RemoveWorker, true), "workers {w}");
        }
    }

    #[test]
    fn a_control_queue_that_went_quiet_leaves_the_hub_idle() {
        assert_eq!(vote(&hub(&[], &[(3, &[1, 0, 0, 0, 0, 0])]), 1), (RemoveWorker, false));
    }

    #[test]
    fn one_nonzero_control_sample_keeps_workers() {
        assert_eq!(vote(&hub(&[], &[(3, &[1, 0, 0, 0, 0])]), 1), (NoAction, true));
    }

    #[test]
    fn first_worker_is_checked_before_sample_count() {
        let r = LatencyVoter::new(30_000).vote(&hub(&[5], &[]), 0);
        assert_eq!((r.action, r.keep_workers_alive, r.reason.as_str()), (AddWorker, true, "First worker"));
        assert_eq!(r.desired_workers, 1);
    }

    #[test]
    fn too_few_samples_vote_nothing() {
        let r = LatencyVoter::new(30_000).vote(&hub(&[5, 6], &[]), 2);
        assert_eq!((r.action, r.reason.as_str()), (NoAction, "Not enough samples"));
        assert!(r.keep_workers_alive);
        let idle = LatencyVoter::new(30_000).vote(&TaskHubLatencies::new(P), 2);
        assert!(!idle.keep_workers_alive);
    }

    #[test]
    fn idle_hub_at_zero_workers_stays_at_zero() {
        let r = LatencyVoter::new(30_000).vote(&hub(&[0; 5], &[]), 0);
        assert_eq!((r.action, r.keep_workers_alive, r.desired_workers), (NoAction, false, 0));
        assert_eq!(r.reason, "Task hub is idle");
    }

    #[test]
    fn reason_strings_print_upstreams_greater_than() {
        let r = LatencyVoter::new(30_000).vote(&hub(&[500, 600, 700, 800, 900, 1000], &[]), 1);
        assert_eq!(r.reason, "Work-item queue latency: 1000 > 1000");
        let s: &[u64] = &[600, 700, 800, 900, 1000];
        let r = LatencyVoter::new(30_000).vote(&hub(&[], &[(2, s), (3, s)]), 1);
        assert_eq!(r.reason, "High control queue latency: 1000 > 1000");
        let r = LatencyVoter::new(30_000).vote(&hub(&[], &[(0, s), (1, s), (2, s), (3, s)]), 5);
        assert_eq!(r.reason, "Work-items idle, #workers > partitions (5 > 4)");
    }

    #[test]
    fn high_latency_is_capped_by_the_max_polling_interval() {
        let mut voter = LatencyVoter::new(500);
        assert_eq!(voter.high_latency_ms(), 500);
        assert_eq!(voter.vote(&hub(&[100, 200, 300, 400, 500], &[]), 1).action, AddWorker);
    }

    #[test]
    fn random_scale_in_is_seeded_and_only_fires_on_quiet_queues() {
        let quiet: &[u64] = &[100; 5];
        let h = hub(quiet, &[(0, quiet), (1, quiet), (2, quiet), (3, quiet)]);
        let run = |seed| {
            let mut voter = LatencyVoter::with_random_scale_in(30_000, seed);
            (0..200).map(|_| voter.vote(&h, 3).action).collect::<Vec<_>>()
        };
        let first = run(7);
        assert_eq!(first, run(7), "same seed, same votes");
        let removals = first.iter().filter(|a| **a == RemoveWorker).count();
        assert!((5..=50).contains(&removals), "about one in ten, got {removals}");

        let busy: &[u64] = &[300; 5];
        let h = hub(busy, &[(0, quiet), (1, quiet), (2, quiet), (3, quiet)]);
        let mut voter = LatencyVoter::with_random_scale_in(30_000, 7);
        assert!((0..200).all(|_| voter.vote(&h, 3).action == NoAction));
    }
}
