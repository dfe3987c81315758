//! What a scaler can read of the simulated app, and the simulated clock: the seam between
//! the app ([`super::model`]) and the scalers ([`super::scalers`]), so that neither module
//! imports the other and a test can drive a scaler with readings of its own
//! (tests/it/engine_equivalence.rs).

use crate::clock::UnixMs;
use crate::reading::QueueReading;

/// The simulated clock (ms since the run started) as the moment scalers and the engine take.
pub fn sim_time(ms: u64) -> UnixMs {
    UnixMs(i64::try_from(ms).unwrap_or(i64::MAX))
}

/// The simulated clock back in ms since the run started (0 before it).
pub fn sim_ms(at: UnixMs) -> u64 {
    u64::try_from(at.as_millis()).unwrap_or(0)
}

/// What one pod's sidecar would report about its own pod: the partitions whose leases it
/// holds and the messages its Durable Task worker holds (running activities, and control
/// messages dequeued and not yet deleted: prefetched, or in an orchestration episode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodReport {
    /// The pod (the simulator's pod id).
    pub pod: u64,
    /// Partitions it holds the lease of.
    pub owned_partitions: u32,
    /// Control messages it holds (prefetched, or in an episode) on the partitions it owns:
    /// what its sidecar's readings tell. Not the activities it runs: the work-item queue is
    /// shared, and no reading says which pod holds which work item.
    pub held_messages: u64,
    /// The pod is terminating (SIGTERM sent): the ReplicaSet no longer counts it.
    pub terminating: bool,
}

/// What a scaler can read of the app: its queues, as Get Queue Metadata and a Peek show
/// them, its ready pods, and what each pod's sidecar would report.
pub trait QueueSource {
    /// The work-item queue, then each control queue, at `now`.
    fn observe(&self, now: UnixMs) -> (QueueReading, Vec<QueueReading>);
    /// Pods ready to take work at `now`.
    fn ready_pods(&self, now: UnixMs) -> u32;
    /// What every pod's sidecar would report at `now` (ours ranks pods for the ReplicaSet
    /// from it, as the aggregator keeps `controller.kubernetes.io/pod-deletion-cost` from its
    /// sidecars' reports). A source that knows no pods reports none.
    fn pod_reports(&self, _now: UnixMs) -> Vec<PodReport> {
        Vec::new()
    }
}
