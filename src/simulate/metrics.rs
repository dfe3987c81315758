//! What a run measured: orchestration latency percentiles, backlog drain time, pod-seconds,
//! peak pods, scale changes, time to the first ready worker from zero, time at zero, what
//! scale-ins cost (work interrupted and redone, prefetched messages stranded, the delay they
//! added), and the series the chart draws.

use serde::Serialize;

use super::model::App;

/// One point of a run's time series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Point {
    /// Simulated time (ms).
    pub at_ms: u64,
    /// Pods that exist (starting, ready or draining).
    pub pods: u32,
    /// Visible messages over all queues.
    pub backlog: u64,
}

/// One scaler's results on one scenario.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunResult {
    /// Scenario name.
    pub scenario: String,
    /// Scaler name.
    pub scaler: String,
    /// Orchestrations that arrived.
    pub orchestrations: u64,
    /// Orchestrations finished by the end of the run.
    pub completed: u64,
    /// Completion latency percentiles (s); unfinished orchestrations count with their age at
    /// the end of the run.
    pub latency_p50_s: f64,
    /// 95th percentile (s).
    pub latency_p95_s: f64,
    /// 99th percentile (s).
    pub latency_p99_s: f64,
    /// From the backlog's peak to when it first was empty again (s).
    pub drain_s: f64,
    /// Pods x seconds they existed.
    pub pod_seconds: f64,
    /// Most pods at once.
    pub peak_pods: u32,
    /// Times the replica count changed.
    pub scale_changes: u32,
    /// Wakes from zero: first visible message while no pod exists -> first ready pod.
    pub wakes: u32,
    /// Mean of those waits (s); 0 when there was none.
    pub wake_mean_s: f64,
    /// Longest of those waits (s).
    pub wake_max_s: f64,
    /// Time with no pod at all (s).
    pub zero_s: f64,
    /// Simulated duration (s).
    pub duration_s: f64,
    /// Work items (activities and orchestration episodes) whose pod was stopped while it ran
    /// them.
    pub interrupted_work_items: u64,
    /// Seconds those had run: work done again.
    pub lost_work_s: f64,
    /// Control messages a stopped pod had prefetched, hidden until their visibility timeout.
    pub stranded_messages: u64,
    /// Orchestrations a scale-in delayed (a message of theirs interrupted or stranded).
    pub delayed_orchestrations: u64,
    /// The latency scale-ins added to those, summed (s): per stop and orchestration hit, how
    /// long its message stayed hidden after the stop plus the work lost on it.
    pub scale_in_delay_s: f64,
    /// The app drained on SIGTERM (waited for its running functions within the grace period).
    pub drain: bool,
    /// The scaler kept `controller.kubernetes.io/pod-deletion-cost` on the pods.
    pub deletion_cost: bool,
    /// The chart's series (left out of the JSON).
    #[serde(skip)]
    pub series: Vec<Point>,
}

/// Collects a run's measurements tick by tick.
#[derive(Debug)]
pub(crate) struct Recorder {
    tick_ms: u64,
    series_every_ms: u64,
    pod_ms: u128,
    peak_pods: u32,
    zero_ms: u64,
    wake_started: Option<u64>,
    wakes: Vec<u64>,
    peak_backlog: (u64, u64),
    drained_at: Option<u64>,
    series: Vec<Point>,
    next_point_ms: u64,
}

impl Recorder {
    /// A recorder for a run of `duration_ms` in ticks of `tick_ms`, keeping about 4,000 points.
    pub(crate) fn new(tick_ms: u64, duration_ms: u64) -> Self {
        let series_every_ms = (duration_ms / 4_000).max(1_000).max(tick_ms);
        Self {
            tick_ms,
            series_every_ms,
            pod_ms: 0,
            peak_pods: 0,
            zero_ms: 0,
            wake_started: None,
            wakes: Vec::new(),
            peak_backlog: (0, 0),
            drained_at: None,
            series: Vec::new(),
            next_point_ms: 0,
        }
    }

    /// Records the app after the tick at `now_ms`; `pods_before` is how many pods existed
    /// before this tick's scaling decision (a wake starts only from zero pods).
    pub(crate) fn record(&mut self, now_ms: u64, app: &App, pods_before: u32) {
        let pods = app.pods();
        let backlog = app.backlog();
        self.pod_ms += u128::from(pods) * u128::from(self.tick_ms);
        self.peak_pods = self.peak_pods.max(pods);
        if pods == 0 {
            self.zero_ms += self.tick_ms;
        }
        let ready = app.ready_pods(now_ms) > 0;
        match (self.wake_started, ready) {
            // A wake starts only from zero: work visible and not a single pod, even starting.
            (None, false) if backlog > 0 && pods_before == 0 => self.wake_started = Some(now_ms),
            (Some(start), true) => {
                self.wakes.push(now_ms - start);
                self.wake_started = None;
            }
            _ => {}
        }
        if backlog > self.peak_backlog.1 {
            self.peak_backlog = (now_ms, backlog);
            self.drained_at = None;
        } else if backlog == 0 && self.drained_at.is_none() && self.peak_backlog.1 > 0 {
            self.drained_at = Some(now_ms);
        }
        if now_ms >= self.next_point_ms {
            self.series.push(Point { at_ms: now_ms, pods, backlog });
            self.next_point_ms = now_ms + self.series_every_ms;
        }
    }

    /// The results at the end of a run of `duration_ms`; `deletion_cost` says whether the
    /// scaler ranked the pods.
    pub(crate) fn finish(
        self,
        scenario: &str,
        scaler: &str,
        app: &App,
        duration_ms: u64,
        scale_changes: u32,
        deletion_cost: bool,
    ) -> RunResult {
        let mut latencies: Vec<u64> = app.completions().iter().map(|c| c.done_ms - c.arrived_ms).collect();
        let completed = latencies.len() as u64;
        latencies.extend(app.unfinished_arrivals().map(|a| duration_ms.saturating_sub(a)));
        latencies.sort_unstable();
        let pct = |p: f64| percentile(&latencies, p) as f64 / 1_000.0;
        let drain_ms = match self.drained_at {
            Some(t) => t.saturating_sub(self.peak_backlog.0),
            None if self.peak_backlog.1 > 0 => duration_ms.saturating_sub(self.peak_backlog.0),
            None => 0,
        };
        let cost = app.scale_in_cost();
        let wake_mean_s = if self.wakes.is_empty() {
            0.0
        } else {
            self.wakes.iter().sum::<u64>() as f64 / self.wakes.len() as f64 / 1_000.0
        };
        RunResult {
            scenario: scenario.to_string(),
            scaler: scaler.to_string(),
            orchestrations: app.started(),
            completed,
            latency_p50_s: pct(0.50),
            latency_p95_s: pct(0.95),
            latency_p99_s: pct(0.99),
            drain_s: drain_ms as f64 / 1_000.0,
            pod_seconds: self.pod_ms as f64 / 1_000.0,
            peak_pods: self.peak_pods,
            scale_changes,
            wakes: self.wakes.len() as u32,
            wake_mean_s,
            wake_max_s: self.wakes.iter().max().copied().unwrap_or(0) as f64 / 1_000.0,
            zero_s: self.zero_ms as f64 / 1_000.0,
            duration_s: duration_ms as f64 / 1_000.0,
            interrupted_work_items: cost.interrupted_work_items,
            lost_work_s: cost.lost_work_ms as f64 / 1_000.0,
            stranded_messages: cost.stranded_messages,
            delayed_orchestrations: cost.delayed_orchestrations,
            scale_in_delay_s: cost.delay_ms as f64 / 1_000.0,
            drain: app.config().drain,
            deletion_cost,
            series: self.series,
        }
    }
}

/// The nearest-rank percentile of sorted `values` (0 for none).
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
