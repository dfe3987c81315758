//! The aggregator and the simulator run one engine: the same sequence of queue readings and
//! worker counts, fed to the aggregator's real hub state (through the registry, as the cold
//! probe and the sampling loop feed it) and to the simulator's `durable-scaler`, gives the
//! same recommendation, the same IsActive and the same metric value at every step, for every
//! algorithm.

use std::sync::Arc;

use durable_scaler::aggregator::hub::HubKey;
use durable_scaler::aggregator::metrics::Metrics;
use durable_scaler::aggregator::registry::Registry;
use durable_scaler::aggregator::settings::HubSettings;
use durable_scaler::clock::UnixMs;
use durable_scaler::heuristic::Algorithm;
use durable_scaler::reading::{HubReading, QueueReading};
use durable_scaler::simulate::scalers::{self, QueueSource, ScalerConfig, ScalerKind};

const PARTITIONS: usize = 4;
/// The sampling interval of both sides: the aggregator's loop, the simulator's reports.
const STEP_MS: i64 = 5_000;
/// Short, so that the sequence crosses it.
const WORK_GRACE_MS: u64 = 60_000;

/// One queue read: (approximate, visible, first visible age ms).
type Read = (u64, u64, u64);

/// One moment of the sequence: what every queue shows and how many workers run.
#[derive(Debug, Clone)]
struct Moment {
    at: UnixMs,
    work_item: Read,
    control: [Read; PARTITIONS],
    workers: u32,
}

/// Ten minutes of a hub's life, every 5 s: idle, a burst of activities (waiting, then in
/// progress), orchestration messages, timers that sleep past the grace period and then fire,
/// a large fan-out at 12 workers (where the HPA's tolerance matters), a drain and a scale to
/// zero. Counts wobble by a fixed pseudo-random sequence so that no two steps are alike.
fn sequence() -> Vec<Moment> {
    let start = UnixMs(1_700_000_000_000);
    let mut wobble = 7u64;
    let mut next = move |n: u64| {
        wobble = wobble.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (wobble >> 33) % n
    };
    (0..120)
        .map(|i| {
            let w = next(4);
            let (work_item, control, workers): (Read, [Read; PARTITIONS], u32) = match i {
                0..=5 => ((0, 0, 0), [(0, 0, 0); 4], 0),
                6..=11 => {
                    ((30 + w, 30 + w, 800 * (i - 5)), [(2, 2, 300), (0, 0, 0), (1, 1, 50), (0, 0, 0)], 1)
                }
                12..=20 => ((25 - w, 0, 0), [(1, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0)], 3),
                // Sleeping timers: invisible, the count never moves, nothing else to do.
                21..=40 => ((0, 0, 0), [(3, 0, 0), (0, 0, 0), (2, 0, 0), (0, 0, 0)], 3 - u32::from(i > 30)),
                41..=44 => ((0, 0, 0), [(3, 0, 0), (0, 0, 0), (2, 0, 0), (0, 0, 0)], 0),
                // The timers fire: their messages turn visible.
                45..=49 => ((0, 0, 0), [(3, 3, 100 * i), (0, 0, 0), (2, 2, 100), (0, 0, 0)], 1),
                // A large fan-out at 12 workers, then falling.
                50..=70 => {
                    let backlog = 400u64.saturating_sub(15 * (i - 50)) + w;
                    let visible = backlog.min(32);
                    (
                        (backlog, visible, 1_500),
                        [(4 + w, 4, 900), (3, 3, 700), (5, 5, 1_200), (2, 2, 400)],
                        12,
                    )
                }
                71..=90 => {
                    let left = (90 - i) * 3 + w;
                    ((left, left.min(32) / 2, 200), [(1, 0, 0), (0, 0, 0), (1, 1, 30), (0, 0, 0)], 11)
                }
                91..=100 => ((0, 0, 0), [(0, 0, 0); 4], 9),
                _ => ((0, 0, 0), [(0, 0, 0); 4], if i < 110 { 2 } else { 0 }),
            };
            Moment { at: start.plus_ms(i64::try_from(i).unwrap_or(0) * STEP_MS), work_item, control, workers }
        })
        .collect()
}

fn signals((approximate_count, visible, first_visible_age_ms): Read, at: UnixMs) -> QueueReading {
    QueueReading {
        approximate_count,
        visible_count: u32::try_from(visible).expect("test counts fit"),
        first_visible_age_ms,
        redelivered_count: 0,
        sampled_at: at,
    }
}

fn sample(read: Read, at: UnixMs) -> QueueReading {
    signals(read, at)
}

/// The simulator's view of the app: the current moment's readings.
struct Replay<'a>(&'a Moment);

impl QueueSource for Replay<'_> {
    fn observe(&self, now: UnixMs) -> (QueueReading, Vec<QueueReading>) {
        (sample(self.0.work_item, now), self.0.control.iter().map(|r| sample(*r, now)).collect())
    }

    fn ready_pods(&self, _now: UnixMs) -> u32 {
        self.0.workers
    }
}

/// What one side answered at one moment.
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    desired_workers: u32,
    keep_workers_alive: bool,
    reason: String,
    active: bool,
    metric_value: f64,
}

/// The aggregator's answers: each moment is a cold probe reading, then a sampling-loop
/// evaluation with the worker count the source gave.
fn aggregator_answers(algorithm: Algorithm, moments: &[Moment]) -> Vec<Answer> {
    let registry = Registry::new(Arc::new(Metrics::new()), WORK_GRACE_MS);
    let metadata = [
        ("taskHubName".to_string(), "EqualHub".to_string()),
        ("scaleAlgorithm".into(), algorithm.to_string()),
    ];
    let settings = HubSettings::from_metadata(&metadata.into_iter().collect()).expect("valid metadata");
    let entry = registry
        .track(&HubKey::new("apps", "EqualHub"), "EqualHub", Some(&settings))
        .expect("one hub is below the limit");
    moments
        .iter()
        .map(|m| {
            let reading = HubReading {
                partition_count: PARTITIONS as u32,
                control: m.control.iter().enumerate().map(|(p, r)| (p as u32, signals(*r, m.at))).collect(),
                work_item: Some(signals(m.work_item, m.at)),
            };
            registry.apply_probe(&entry, Some(&reading), m.at);
            registry.evaluate(&entry, Some(m.workers), m.at);
            entry.with_state(|s| {
                let r = s.recommendation().expect("a decision after an evaluation");
                Answer {
                    desired_workers: r.desired_workers,
                    keep_workers_alive: r.keep_workers_alive,
                    reason: r.reason.clone(),
                    active: s.is_active(m.at),
                    metric_value: s.metric_value(),
                }
            })
        })
        .collect()
}

/// The simulator's answers: its `durable-scaler` samples at every moment (report and probe
/// intervals equal to the step) and is asked IsActive and GetMetrics right after.
fn simulator_answers(algorithm: Algorithm, moments: &[Moment]) -> Vec<Answer> {
    let cfg = ScalerConfig {
        report_interval_ms: STEP_MS as u64,
        probe_interval_ms: STEP_MS as u64,
        work_grace_ms: WORK_GRACE_MS,
        // The aggregator seeds the latency vote's random scale-in from the hub's name.
        seed: durable_scaler::heuristic::latency::seed_for("EqualHub"),
        ..ScalerConfig::default()
    };
    let mut scaler = scalers::build(ScalerKind::DurableScaler(algorithm), &cfg, PARTITIONS);
    moments
        .iter()
        .map(|m| {
            let app = Replay(m);
            scaler.tick(m.at, &app, m.workers);
            let metrics = scaler.metrics(m.at, &app, m.workers);
            assert_eq!(metrics.len(), 1, "one trigger");
            assert_eq!(metrics[0].target, 1.0, "target 1, as the aggregator's MetricSpec");
            let r = &scaler.decision().expect("ours shows its decision").recommendation;
            Answer {
                desired_workers: r.desired_workers,
                keep_workers_alive: r.keep_workers_alive,
                reason: r.reason.clone(),
                active: scaler.is_active(m.at, &app, m.workers),
                metric_value: metrics[0].value,
            }
        })
        .collect()
}

fn assert_same_answers(algorithm: Algorithm) {
    let moments = sequence();
    let aggregator = aggregator_answers(algorithm, &moments);
    let simulator = simulator_answers(algorithm, &moments);
    for ((m, a), s) in moments.iter().zip(&aggregator).zip(&simulator) {
        let step = (m.at.millis_since(moments[0].at)) / 1000;
        assert_eq!(a, s, "{algorithm} at {step} s, {} workers", m.workers);
    }
    // The sequence must exercise what could differ: several counts, both activities, and
    // metric values that are not the plain desired count.
    let desired: std::collections::BTreeSet<u32> = aggregator.iter().map(|a| a.desired_workers).collect();
    assert!(desired.len() >= 3, "{algorithm}: desired counts {desired:?}");
    assert!(aggregator.iter().any(|a| a.active) && aggregator.iter().any(|a| !a.active), "{algorithm}");
    if algorithm != Algorithm::Durable {
        assert!(
            aggregator.iter().any(|a| a.metric_value != f64::from(a.desired_workers)),
            "{algorithm}: no step where the metric value is not the plain count"
        );
    }
}

#[test]
fn durable_gives_the_same_answers_in_the_aggregator_and_the_simulator() {
    assert_same_answers(Algorithm::Durable);
}

#[test]
fn target_gives_the_same_answers_in_the_aggregator_and_the_simulator() {
    assert_same_answers(Algorithm::Target);
}

#[test]
fn target_inflight_gives_the_same_answers_in_the_aggregator_and_the_simulator() {
    assert_same_answers(Algorithm::TargetInflight);
}

#[test]
fn latency_gives_the_same_answers_in_the_aggregator_and_the_simulator() {
    assert_same_answers(Algorithm::Latency);
}
