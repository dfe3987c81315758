//! What the demo saw, second by second, and the summary it ends with. Pure: samples in,
//! figures out, so the transitions the test asserts are computed by the same code that
//! prints them.

use serde::Serialize;

/// One sample of the run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Sample {
    /// Seconds since the demo started.
    pub t_s: f64,
    /// Messages in the control queues (approximate count, timers included).
    pub control_messages: u64,
    /// Visible messages in the control queues.
    pub control_visible: u64,
    /// Messages in the work-item queue (approximate count).
    pub work_items: u64,
    /// Orchestrations started and not yet completed.
    pub orchestrations_running: u64,
    /// IsActive's latest answer.
    pub active: bool,
    /// GetMetrics' latest value: the aggregator's desired worker count.
    pub desired: f64,
    /// Worker pods running.
    pub workers: u32,
}

impl Sample {
    /// Work queued or running: orchestrations not completed, or visible messages. Invisible
    /// control messages are durable timers not yet due, which must not keep workers up.
    fn has_work(&self) -> bool {
        self.orchestrations_running > 0 || self.control_visible > 0 || self.work_items > 0
    }
}

/// A burst of orchestrations the demo started.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Burst {
    /// When its messages were enqueued (s).
    pub at_s: f64,
    /// How many orchestrations.
    pub orchestrations: u32,
}

/// The figures the demo ends with, per burst.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct BurstOutcome {
    /// When the burst started (s).
    pub at_s: f64,
    /// From the burst to the first running worker (s), if one ran.
    pub time_to_first_worker_s: Option<f64>,
    /// From the burst to no orchestration running (s), if it drained.
    pub drain_time_s: Option<f64>,
    /// From the burst to zero workers again (s), if it got there before the next burst (or
    /// the end of the run).
    pub back_to_zero_s: Option<f64>,
    /// Times the workers went from some to none while work was still queued or running,
    /// between this burst and the next: a scale-to-zero that strands work. A brief dip to
    /// fewer workers is harmless; this is not.
    pub zero_with_work_queued: u32,
}

/// The whole run's summary.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Summary {
    /// Per burst.
    pub bursts: Vec<BurstOutcome>,
    /// Most workers running at once.
    pub peak_workers: u32,
    /// The worker count with repeats removed: 0, N, 0, N, 0 for a full run.
    pub transitions: Vec<u32>,
    /// Worker-seconds spent.
    pub worker_seconds: f64,
}

/// Summarises `samples` for `bursts`.
pub(crate) fn summarize(samples: &[Sample], bursts: &[Burst]) -> Summary {
    let outcomes = bursts
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let until = bursts.get(i + 1).map_or(f64::INFINITY, |next| next.at_s);
            let window: Vec<&Sample> = samples.iter().filter(|s| s.t_s >= b.at_s && s.t_s < until).collect();
            let first_worker = window.iter().find(|s| s.workers > 0).map(|s| s.t_s);
            let drained = first_worker.and_then(|fw| {
                window.iter().find(|s| s.t_s > fw && s.orchestrations_running == 0).map(|s| s.t_s)
            });
            // Back to zero may coincide with the next burst's first sample.
            let zero = drained.and_then(|d| {
                samples.iter().find(|s| s.t_s >= d && s.t_s <= until && s.workers == 0).map(|s| s.t_s)
            });
            let zero_with_work_queued = window
                .windows(2)
                .filter(|w| w[0].workers > 0 && w[1].workers == 0 && w[1].has_work())
                .count();
            BurstOutcome {
                at_s: b.at_s,
                time_to_first_worker_s: first_worker.map(|t| t - b.at_s),
                drain_time_s: drained.map(|t| t - b.at_s),
                back_to_zero_s: zero.map(|t| t - b.at_s),
                zero_with_work_queued: u32::try_from(zero_with_work_queued).unwrap_or(u32::MAX),
            }
        })
        .collect();
    let mut transitions: Vec<u32> = Vec::new();
    for s in samples {
        let level = if s.workers == 0 { 0 } else { 1 };
        if transitions.last().map(|&l| if l == 0 { 0 } else { 1 }) != Some(level) {
            transitions.push(s.workers);
        } else if let Some(last) = transitions.last_mut() {
            *last = (*last).max(s.workers);
        }
    }
    let worker_seconds = samples.windows(2).map(|w| f64::from(w[0].workers) * (w[1].t_s - w[0].t_s)).sum();
    Summary {
        bursts: outcomes,
        peak_workers: samples.iter().map(|s| s.workers).max().unwrap_or(0),
        transitions,
        worker_seconds,
    }
}

impl Summary {
    /// The one-paragraph summary printed at the end.
    pub(crate) fn paragraph(&self) -> String {
        let fmt = |v: Option<f64>| v.map_or_else(|| "never".to_string(), |s| format!("{s:.1} s"));
        let mut text = String::new();
        for (i, b) in self.bursts.iter().enumerate() {
            text.push_str(&format!(
                "Burst {} (at {:.0} s): first worker after {}, drained after {}, back to zero after {}. ",
                i + 1,
                b.at_s,
                fmt(b.time_to_first_worker_s),
                fmt(b.drain_time_s),
                fmt(b.back_to_zero_s)
            ));
        }
        let path = self.transitions.iter().map(u32::to_string).collect::<Vec<_>>().join(" -> ");
        text.push_str(&format!(
            "Peak {} workers; {:.0} worker-seconds in all; workers went {}.",
            self.peak_workers, self.worker_seconds, path
        ));
        text
    }
}

/// The run as an SVG chart: workers over time above, the visible backlog beneath, drawn by
/// the simulator's chart code so the demo and the simulator read alike.
pub(crate) fn chart(samples: &[Sample], summary: &Summary, description: &str) -> String {
    use crate::simulate::{metrics::Point, svg};
    let points: Vec<Point> = samples
        .iter()
        .map(|s| Point {
            at_ms: (s.t_s * 1000.0) as u64,
            pods: s.workers,
            backlog: s.control_visible + s.work_items,
        })
        .collect();
    let detail = format!("{:.0} worker-s, peak {}", summary.worker_seconds, summary.peak_workers);
    let series = svg::Series {
        name: "durable-scaler (demo)",
        points: &points,
        duration_ms: points.last().map_or(1, |p| p.at_ms),
        detail: &detail,
        emphasised: true,
    };
    svg::chart_series("durable-scaler demo: worker pods, backlog beneath", description, "run", &[series])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t_s: f64, workers: u32, running: u64) -> Sample {
        Sample {
            t_s,
            control_messages: 0,
            control_visible: 0,
            work_items: 0,
            orchestrations_running: running,
            active: running > 0,
            desired: f64::from(workers),
            workers,
        }
    }

    #[test]
    fn two_bursts_scale_out_and_back_twice() {
        let samples = vec![
            sample(0.0, 0, 0),
            sample(5.0, 0, 10),
            sample(7.0, 1, 10),
            sample(9.0, 3, 6),
            sample(20.0, 3, 0),
            sample(30.0, 0, 0),
            sample(40.0, 0, 5),
            sample(41.0, 2, 5),
            sample(50.0, 2, 0),
            sample(60.0, 0, 0),
        ];
        let bursts = [Burst { at_s: 5.0, orchestrations: 10 }, Burst { at_s: 40.0, orchestrations: 5 }];
        let s = summarize(&samples, &bursts);
        assert_eq!(s.transitions, vec![0, 3, 0, 2, 0]);
        assert!(s.bursts.iter().all(|b| b.zero_with_work_queued == 0));
        assert_eq!(s.peak_workers, 3);
        assert_eq!(s.bursts[0].time_to_first_worker_s, Some(2.0));
        assert_eq!(s.bursts[0].drain_time_s, Some(15.0));
        assert_eq!(s.bursts[0].back_to_zero_s, Some(25.0));
        assert_eq!(s.bursts[1].back_to_zero_s, Some(20.0));
        assert!(s.paragraph().contains("workers went 0 -> 3 -> 0 -> 2 -> 0"));
    }

    #[test]
    fn zero_at_the_instant_of_the_next_burst_counts_for_the_earlier_one() {
        let samples = vec![sample(0.0, 0, 0), sample(2.0, 2, 4), sample(6.0, 2, 0), sample(10.0, 0, 4)];
        let bursts = [Burst { at_s: 1.0, orchestrations: 4 }, Burst { at_s: 10.0, orchestrations: 4 }];
        assert_eq!(summarize(&samples, &bursts).bursts[0].back_to_zero_s, Some(9.0));
    }

    #[test]
    fn a_run_that_never_returns_to_zero_is_reported_as_such() {
        let samples = vec![sample(0.0, 0, 0), sample(5.0, 2, 3), sample(9.0, 2, 0)];
        let s = summarize(&samples, &[Burst { at_s: 1.0, orchestrations: 3 }]);
        assert_eq!(s.bursts[0].back_to_zero_s, None);
        assert!(s.paragraph().contains("back to zero after never"));
    }

    #[test]
    fn a_dip_to_zero_while_orchestrations_run_is_counted_for_its_burst() {
        let samples = vec![
            sample(0.0, 0, 0),
            sample(2.0, 2, 4),
            sample(4.0, 0, 3),
            sample(6.0, 1, 3),
            sample(8.0, 1, 0),
            sample(9.0, 0, 0),
            sample(12.0, 2, 4),
            sample(14.0, 1, 0),
            sample(15.0, 0, 0),
        ];
        let bursts = [Burst { at_s: 1.0, orchestrations: 4 }, Burst { at_s: 11.0, orchestrations: 4 }];
        let s = summarize(&samples, &bursts);
        assert_eq!(s.bursts[0].zero_with_work_queued, 1, "2 -> 0 with 3 running");
        assert_eq!(s.bursts[1].zero_with_work_queued, 0, "1 -> 0 once drained");
        assert_eq!(s.bursts[0].back_to_zero_s, Some(8.0), "the zero after draining, not the dip");
    }

    #[test]
    fn sleeping_timers_alone_are_not_work() {
        let mut timers = sample(4.0, 0, 0);
        timers.control_messages = 4;
        let samples = vec![sample(0.0, 0, 0), sample(2.0, 1, 1), sample(3.0, 1, 0), timers];
        let s = summarize(&samples, &[Burst { at_s: 1.0, orchestrations: 1 }]);
        assert_eq!(s.bursts[0].zero_with_work_queued, 0);
    }

    #[test]
    fn queued_messages_count_as_work_even_with_no_orchestration_running() {
        let mut queued = sample(4.0, 0, 0);
        queued.work_items = 2;
        let samples = vec![sample(0.0, 0, 0), sample(2.0, 1, 1), queued, sample(6.0, 0, 0)];
        let s = summarize(&samples, &[Burst { at_s: 1.0, orchestrations: 1 }]);
        assert_eq!(s.bursts[0].zero_with_work_queued, 1);
    }
}
