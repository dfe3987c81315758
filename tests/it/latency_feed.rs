//! The `latency` algorithm fed as upstream feeds it, through the aggregator's registry: one
//! ring sample per fresh reading of a queue. Upstream's `DisconnectedPerformanceMonitor`
//! (Azure/durabletask, src/DurableTask.AzureStorage/Monitoring/DisconnectedPerformanceMonitor.cs,
//! `UpdateQueueMetrics`) adds one sample per `PulseAsync`, each a new storage read; the
//! aggregator evaluates every sampling tick, more often than sidecars report, and a report may
//! arrive twice.

use std::sync::Arc;

use durable_scaler::aggregator::hub::{HubKey, ValidReport};
use durable_scaler::aggregator::metrics::Metrics;
use durable_scaler::aggregator::registry::Registry;
use durable_scaler::aggregator::settings::HubSettings;
use durable_scaler::clock::UnixMs;
use durable_scaler::reading::{HubReading, QueueReading};

const START: i64 = 1_700_000_000_000;

fn signals(approximate_count: u64, first_visible_age_ms: u64, sampled_at: i64) -> QueueReading {
    QueueReading {
        approximate_count,
        visible_count: 1,
        first_visible_age_ms,
        redelivered_count: 0,
        sampled_at: UnixMs(sampled_at),
    }
}

/// A sidecar's report taken at `sampled_at`: it owns every partition and reads the work items.
fn report(sampled_at: i64, work_item_age_ms: u64) -> ValidReport {
    ValidReport {
        pod: "app-0".into(),
        reading: HubReading {
            partition_count: 4,
            control: (0..4).map(|p| (p, signals(1, 50, sampled_at))).collect(),
            work_item: Some(signals(3, work_item_age_ms, sampled_at)),
        },
        interval_ms: 5_000,
        leaving: false,
        sampled_at_unix_ms: sampled_at,
        limits: None,
        queue_settings: None,
        sidecar: Default::default(),
    }
}

#[test]
fn a_reading_repeated_over_several_ticks_adds_one_latency_sample() {
    let registry = Registry::new(Arc::new(Metrics::new()), 300_000);
    let metadata =
        [("taskHubName".to_string(), "LatencyHub".to_string()), ("scaleAlgorithm".into(), "latency".into())];
    let settings = HubSettings::from_metadata(&metadata.into_iter().collect()).expect("valid metadata");
    let entry =
        registry.track(&HubKey::new("apps", "LatencyHub"), "LatencyHub", Some(&settings)).expect("tracked");
    let samples = || entry.with_state(|s| s.work_item_latencies().samples());

    // One report, evaluated on three 2 s ticks before the next, and delivered twice.
    let first = report(START, 400);
    registry.apply_report(&entry, &first, UnixMs(START)).expect("room for the pod");
    for tick in [0, 2_000, 4_000] {
        registry.evaluate(&entry, Some(1), UnixMs(START + tick));
    }
    registry.apply_report(&entry, &first, UnixMs(START + 4_500)).expect("room for the pod");
    registry.evaluate(&entry, Some(1), UnixMs(START + 4_600));
    assert_eq!(samples(), [0, 0, 0, 0, 400], "one reading, one sample");

    // The next report is a new reading: one more sample, however many ticks read it.
    registry
        .apply_report(&entry, &report(START + 5_000, 900), UnixMs(START + 5_000))
        .expect("room for the pod");
    for tick in [6_000, 8_000] {
        registry.evaluate(&entry, Some(1), UnixMs(START + tick));
    }
    assert_eq!(samples(), [0, 0, 0, 400, 900]);
    let reason = entry.with_state(|s| s.recommendation().map(|r| r.reason.clone()));
    assert_eq!(reason.as_deref(), Some("Not enough samples"), "two readings do not fill a ring of five");
}
