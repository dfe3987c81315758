//! KEDA and the Kubernetes HPA, playing their parts on the simulated clock with the
//! arithmetic of [`crate::heuristic::hpa`]: KEDA polls IsActive every pollingInterval and
//! owns 0 <-> 1 (activation, and scale to zero after cooldownPeriod without activity); a
//! StreamIsActive push activates at once; the HPA syncs every 15 s while replicas > 0.

use super::scalers::{Metric, QueueSource, Scaler, sim_time};
use crate::clock::UnixMs;
use crate::heuristic::hpa::{self, MetricTargetType, ReplicaBounds, ScaleDownStabilizer};

/// KEDA's and the HPA's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KedaConfig {
    /// ScaledObject `pollingInterval`.
    pub polling_interval_ms: u64,
    /// ScaledObject `cooldownPeriod`.
    pub cooldown_ms: u64,
    /// `minReplicaCount` / `maxReplicaCount`.
    pub bounds: ReplicaBounds,
    /// The HPA controller's sync period.
    pub hpa_sync_ms: u64,
    /// The HPA's scale-down stabilization window.
    pub stabilization: std::time::Duration,
}

impl Default for KedaConfig {
    fn default() -> Self {
        Self {
            polling_interval_ms: 30_000,
            cooldown_ms: 300_000,
            bounds: ReplicaBounds::default(),
            hpa_sync_ms: 15_000,
            stabilization: hpa::SCALE_DOWN_STABILIZATION,
        }
    }
}

/// One HPA sync over several metrics: each metric's proposal (tolerance included), the
/// highest wins, then bounds, scale-down stabilization and the scale-up limit. Running
/// [`hpa::hpa_sync`] on the metric with the highest proposal is exactly that.
pub fn hpa_sync_metrics(
    current: u32,
    metrics: &[Metric],
    bounds: ReplicaBounds,
    stabilizer: &mut ScaleDownStabilizer,
    now: UnixMs,
) -> u32 {
    let kind = MetricTargetType::AverageValue;
    let Some(best) = metrics.iter().max_by_key(|m| hpa::desired_replicas(current, m.value, m.target, kind))
    else {
        return current;
    };
    hpa::hpa_sync(current, best.value, best.target, kind, bounds, stabilizer, now)
}

/// KEDA's and the HPA's state for one ScaledObject.
#[derive(Debug)]
pub struct Autoscaler {
    cfg: KedaConfig,
    replicas: u32,
    last_active_ms: Option<u64>,
    stabilizer: ScaleDownStabilizer,
    next_poll_ms: u64,
    next_sync_ms: u64,
    changes: u32,
}

impl Autoscaler {
    /// A ScaledObject whose target starts at `minReplicaCount`.
    pub fn new(cfg: KedaConfig) -> Self {
        Self {
            cfg,
            replicas: cfg.bounds.min,
            last_active_ms: None,
            stabilizer: ScaleDownStabilizer::new(cfg.stabilization),
            next_poll_ms: 0,
            next_sync_ms: cfg.hpa_sync_ms,
            changes: 0,
        }
    }

    /// Times the replica count changed.
    pub(crate) fn changes(&self) -> u32 {
        self.changes
    }

    /// The Deployment's replica count after everything due at `now_ms` has run.
    pub fn tick(&mut self, now_ms: u64, scaler: &mut dyn Scaler, app: &dyn QueueSource) -> u32 {
        let before = self.replicas;
        if scaler.tick(sim_time(now_ms), app, self.replicas) {
            // StreamIsActive: true activates a target at zero at once and postpones cooldown.
            self.last_active_ms = Some(now_ms);
            self.replicas = hpa::keda_replicas(self.replicas, true, false, self.replicas, self.cfg.bounds);
        }
        if now_ms >= self.next_poll_ms {
            self.next_poll_ms = now_ms + self.cfg.polling_interval_ms;
            let active = scaler.is_active(sim_time(now_ms), app, self.replicas);
            if active {
                self.last_active_ms = Some(now_ms);
            }
            let cooldown_elapsed =
                self.last_active_ms.is_none_or(|t| now_ms.saturating_sub(t) >= self.cfg.cooldown_ms);
            self.replicas =
                hpa::keda_replicas(self.replicas, active, cooldown_elapsed, self.replicas, self.cfg.bounds);
        }
        if now_ms >= self.next_sync_ms {
            self.next_sync_ms = now_ms + self.cfg.hpa_sync_ms;
            if self.replicas > 0 {
                let metrics = scaler.metrics(sim_time(now_ms), app, self.replicas);
                self.replicas = hpa_sync_metrics(
                    self.replicas,
                    &metrics,
                    self.cfg.bounds,
                    &mut self.stabilizer,
                    sim_time(now_ms),
                );
            }
        }
        if self.replicas != before {
            self.changes += 1;
        }
        self.replicas
    }
}
