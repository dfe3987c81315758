//! `durable-scaler simulate`: the model's invariants, what a live DTFx worker does to the
//! queues (prefetch, renewal, abandon, back-off), what a scale-in costs, KEDA and HPA
//! arithmetic, each peer scaler pinned to its formula, determinism, and our algorithm's
//! properties end to end. Simulated durations are kept short so the file runs in seconds in
//! debug builds.

use clap::Parser;
use durable_scaler::clock::UnixMs;
use durable_scaler::heuristic::hpa::{self, MetricTargetType, ReplicaBounds, ScaleDownStabilizer};
use durable_scaler::heuristic::{Algorithm, ScaleAction};
use durable_scaler::reading::QueueReading;
use durable_scaler::simulate::{
    Args, DrainPolicy, Settings,
    autoscale::{Autoscaler, KedaConfig, hpa_sync_metrics},
    metrics::percentile,
    model::{App, AppConfig, Arrival, Duration, Script, Step, Workload},
    output, run_one,
    scalers::{self, Metric, ScalerConfig, ScalerKind, sim_time},
    scenario::{self, Scenario},
    svg,
};

const SECOND: u64 = 1_000;
const MINUTE: u64 = 60 * SECOND;

fn workload(count: u32, steps: Vec<Step>) -> Workload {
    Workload { scripts: vec![Script { steps }], arrivals: vec![Arrival { at_ms: 0, count, script: 0 }] }
}

fn fan_out(count: u32, ms: u64) -> Step {
    Step::Activities { count, duration: Duration::fixed(ms) }
}

/// Drives an app by hand from `from_ms` to `until_ms`: `replicas(now)` pods, checking the
/// model's bookkeeping (message conservation and who holds what) every tick.
fn drive_from(app: &mut App, from_ms: u64, until_ms: u64, replicas: impl Fn(u64) -> u32) {
    let mut now = from_ms;
    while now <= until_ms {
        app.tick(now);
        app.set_replicas(replicas(now), now);
        if let Err(e) = app.check_invariants() {
            panic!("bookkeeping broken at {now} ms: {e}; {:?}", app.message_counts());
        }
        now += 100;
    }
}

fn drive(app: &mut App, until_ms: u64, replicas: impl Fn(u64) -> u32) {
    drive_from(app, 0, until_ms, replicas);
}

fn draining() -> AppConfig {
    AppConfig { drain: true, ..AppConfig::default() }
}

#[test]
fn messages_are_conserved_and_every_orchestration_finishes() {
    let mut app =
        App::new(AppConfig::default(), workload(40, vec![fan_out(5, 2 * SECOND), fan_out(1, SECOND)]), 3);
    drive(&mut app, 3 * MINUTE, |_| 3);
    assert_eq!(app.completions().len(), 40);
    let c = app.message_counts();
    assert_eq!((c.present, c.returned), (0, 0));
    assert_eq!(c.enqueued, 40 * (1 + 5 + 5 + 1 + 1), "start, 5+1 activities, 5+1 completions");
}

#[test]
fn a_draining_scale_in_lets_terminating_pods_finish_their_work() {
    let mut app = App::new(draining(), workload(20, vec![fan_out(10, 10 * SECOND)]), 3);
    // Four pods while the activities run, then one: the other three drain within 30 s grace.
    drive(&mut app, 5 * MINUTE, |now| if now < 35 * SECOND { 4 } else { 1 });
    assert_eq!(app.completions().len(), 20);
    assert_eq!(
        app.scale_in_cost().interrupted_work_items,
        0,
        "10 s activities finish within the grace period"
    );
}

#[test]
fn without_drain_a_scale_in_interrupts_the_work_its_pods_run() {
    let mut app = App::new(AppConfig::default(), workload(20, vec![fan_out(10, 10 * SECOND)]), 3);
    drive(&mut app, 8 * MINUTE, |now| if now < 35 * SECOND { 4 } else { 1 });
    let cost = app.scale_in_cost();
    assert!(cost.interrupted_work_items > 0 && cost.lost_work_ms > 0, "{cost:?}");
    assert_eq!(app.completions().len(), 20, "the interrupted activities ran again");
}

#[test]
fn work_that_outlives_the_grace_period_returns_to_its_queue_and_runs_again() {
    let cfg = AppConfig { grace_ms: 5 * SECOND, ..draining() };
    let mut app = App::new(cfg, workload(4, vec![fan_out(5, 60 * SECOND)]), 3);
    // Scale to zero while 60 s activities run, then back to one pod.
    drive(&mut app, 12 * MINUTE, |now| if (40 * SECOND..60 * SECOND).contains(&now) { 0 } else { 2 });
    let c = app.message_counts();
    assert!(c.returned > 0, "the scale-in cut work short: {c:?}");
    assert_eq!(app.scale_in_cost().interrupted_work_items, 20, "every activity ran past the grace period");
    assert_eq!(app.completions().len(), 4, "after the visibility timeout the work ran again");
    assert_eq!(c.present, 0);
}

/// One partition, so that one pod owns every control message.
fn one_partition() -> AppConfig {
    AppConfig { partitions: 1, ..AppConfig::default() }
}

#[test]
fn a_pod_prefetches_control_messages_up_to_its_buffer_threshold_whatever_its_free_slots() {
    // Episodes of ten minutes: the ten orchestration slots stay busy all along.
    let cfg = AppConfig { episode_ms: 10 * MINUTE, ..one_partition() };
    let mut app = App::new(cfg, workload(1_000, vec![fan_out(1, SECOND)]), 1);
    drive(&mut app, MINUTE, |_| 1);
    let reports = app.pod_reports();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].held_messages, 256, "ControlQueueBufferThreshold, in batches of 32");
    assert_eq!(app.backlog(), 1_000 - 256, "the rest is still visible");
    let (_, control) = app.observe(MINUTE);
    assert_eq!((control[0].approximate_count, control[0].visible_count), (1_000, 32), "peek limit");
}

#[test]
fn prefetched_messages_are_not_renewed_and_their_owner_dequeues_them_again() {
    // 64 orchestrations, a threshold of 64 and six-minute episodes: the pod prefetches every
    // start message at 20 s and starts ten episodes; the other 54 wait in its buffer.
    let cfg = AppConfig { episode_ms: 6 * MINUTE, control_buffer_threshold: 64, ..one_partition() };
    let mut app = App::new(cfg, workload(64, vec![fan_out(1, SECOND)]), 1);
    drive(&mut app, 5 * MINUTE + 30 * SECOND, |_| 1);
    // Their visibility (5 min) ran out: visible again, though the pod still holds them and,
    // at its threshold, does not dequeue.
    assert_eq!(app.backlog(), 54);
    assert_eq!(app.pod_reports()[0].held_messages, 64);
    // The first episodes end at 6 min 20 s: below its threshold, the pod dequeues them again
    // and keeps one copy of each (the check in `drive`: nothing held twice, nothing lost).
    drive_from(&mut app, 5 * MINUTE + 30 * SECOND + 100, 6 * MINUTE + 30 * SECOND, |_| 1);
    assert_eq!(app.backlog(), 0);
    assert_eq!(app.message_counts().returned, 0, "nothing was abandoned");
}

#[test]
fn a_stopped_pod_leaves_its_prefetched_messages_invisible_until_their_visibility_timeout() {
    // Ten-minute episodes, one pod until 60 s (no drain: it stops at once), another from 70 s.
    let cfg = AppConfig { episode_ms: 10 * MINUTE, ..one_partition() };
    let mut app = App::new(cfg, workload(300, vec![fan_out(1, SECOND)]), 1);
    let replicas = |now: u64| u32::from(!(60 * SECOND..70 * SECOND).contains(&now));
    drive(&mut app, 4 * MINUTE, replicas);
    let cost = app.scale_in_cost();
    assert_eq!(cost.interrupted_work_items, 10, "the ten running episodes");
    assert_eq!(cost.stranded_messages, 246, "256 prefetched, ten of them in episodes");
    // The second pod prefetched what was left visible: 300 - 256 messages.
    assert_eq!(app.backlog(), 0);
    let held: u64 = app.pod_reports().iter().map(|r| r.held_messages).sum();
    assert_eq!(held, 44);
    // Dequeued at 20 s, the stranded messages reappear at 5 min 20 s.
    drive_from(&mut app, 4 * MINUTE + 100, 5 * MINUTE + 21 * SECOND, replicas);
    assert!(app.pod_reports().iter().map(|r| r.held_messages).sum::<u64>() > 44);
}

#[test]
fn a_running_activity_stays_invisible_and_a_dead_pods_reappears_one_timeout_after_its_last_renewal() {
    let mut app = App::new(AppConfig::default(), workload(1, vec![fan_out(1, 20 * MINUTE)]), 1);
    // One pod, gone at 10 min 15 s (no drain), none after.
    let replicas = |now: u64| u32::from(now < 10 * MINUTE + 15 * SECOND);
    drive(&mut app, 10 * MINUTE, replicas);
    let (work_item, _) = app.observe(10 * MINUTE);
    assert_eq!((work_item.approximate_count, work_item.visible_count), (1, 0), "renewed every 30 s");
    // It started at about 20 s and was last renewed 19 x 30 s later, at about 9 min 50 s:
    // hidden until about 14 min 50 s, not 5 min after the pod died.
    drive_from(&mut app, 10 * MINUTE + 100, 14 * MINUTE + 45 * SECOND, replicas);
    assert_eq!(app.observe(14 * MINUTE + 45 * SECOND).0.visible_count, 0);
    drive_from(&mut app, 14 * MINUTE + 45 * SECOND + 100, 14 * MINUTE + 55 * SECOND, replicas);
    assert_eq!(app.observe(14 * MINUTE + 55 * SECOND).0.visible_count, 1);
    let cost = app.scale_in_cost();
    assert_eq!(cost.interrupted_work_items, 1);
    assert!((594_000..=596_000).contains(&cost.lost_work_ms), "{cost:?}");
}

#[test]
fn a_poison_activity_is_abandoned_with_a_growing_delay_and_retried_for_ever() {
    let poison = Step::Poison { duration: Duration::fixed(SECOND) };
    let mut app = App::new(AppConfig::default(), workload(1, vec![poison]), 1);
    let mut abandoned_at = Vec::new();
    let mut now = 0;
    while now <= 40 * MINUTE {
        app.tick(now);
        app.set_replicas(1, now);
        if app.message_counts().returned > abandoned_at.len() as u64 {
            abandoned_at.push(now);
        }
        now += 100;
    }
    assert!(app.completions().is_empty(), "it never succeeds");
    assert!(abandoned_at.len() >= 10, "attempts failed at {abandoned_at:?}");
    // The k-th failure hides it min(2^k, 600) s; then the next poll (at most 30 s later) takes
    // it and it runs 1 s.
    for (k, pair) in abandoned_at.windows(2).enumerate() {
        let hidden = (1_000u64 << (k + 1).min(20)).min(600 * SECOND);
        let gap = pair[1] - pair[0];
        assert!(
            (hidden + SECOND..=hidden + SECOND + 30 * SECOND + 200).contains(&gap),
            "attempt {} came {gap} ms after the last, hidden {hidden} ms",
            k + 2
        );
    }
}

#[test]
fn an_idle_pod_takes_the_activities_its_own_episode_scheduled_at_once() {
    // One orchestration every ten minutes; between them the pod's polling backs off to 30 s.
    let w = Workload {
        scripts: vec![Script { steps: vec![fan_out(1, SECOND)] }],
        arrivals: (1..=5).map(|i| Arrival { at_ms: i * 10 * MINUTE, count: 1, script: 0 }).collect(),
    };
    let mut app = App::new(AppConfig::default(), w, 1);
    drive(&mut app, 52 * MINUTE, |_| 1);
    let latencies: Vec<u64> = app.completions().iter().map(|c| c.done_ms - c.arrived_ms).collect();
    assert_eq!(latencies.len(), 5);
    // The start message waits for the control queue's poll (at most 30 s); the activity and
    // its result are taken at once: the pod woke its own pollers when it enqueued them.
    assert!(latencies.iter().all(|&l| l <= 30 * SECOND + 1_500), "{latencies:?}");
}

#[test]
fn the_bookkeeping_holds_under_prefetch_renewal_abandon_and_scale_in() {
    let w = Workload {
        scripts: vec![
            Script {
                steps: vec![fan_out(3, SECOND), Step::Timer { delay_ms: 90 * SECOND }, fan_out(2, SECOND)],
            },
            Script {
                steps: vec![Step::Activities {
                    count: 4,
                    duration: Duration { min_ms: MINUTE, max_ms: 8 * MINUTE },
                }],
            },
            Script { steps: vec![Step::Poison { duration: Duration::fixed(2 * SECOND) }] },
        ],
        arrivals: vec![
            Arrival { at_ms: 0, count: 2_000, script: 0 },
            Arrival { at_ms: 30 * SECOND, count: 30, script: 1 },
            Arrival { at_ms: 40 * SECOND, count: 3, script: 2 },
            Arrival { at_ms: 4 * MINUTE, count: 500, script: 0 },
        ],
    };
    for drain in [false, true] {
        let cfg = AppConfig { drain, control_buffer_threshold: 64, ..AppConfig::default() };
        let mut app = App::new(cfg, w.clone(), 5);
        // For 20 minutes up and down every 40 s between 1 and 7 pods, so that leases move and
        // pods stop holding every kind of message; then 7 pods.
        let replicas =
            |now: u64| if now < 20 * MINUTE { 1 + ((now / (40 * SECOND)) * 3 % 7) as u32 } else { 7 };
        drive(&mut app, 50 * MINUTE, replicas);
        let cost = app.scale_in_cost();
        assert!(cost.interrupted_work_items > 0 && cost.stranded_messages > 0, "drain {drain}: {cost:?}");
        assert_eq!(app.completions().len(), 2_530, "drain {drain}: every healthy orchestration finished");
        assert_eq!(app.message_counts().present, 3, "drain {drain}: the three poison activities are left");
    }
}

#[test]
fn the_replica_set_removes_the_pods_with_the_lowest_deletion_cost_first() {
    let mut app = App::new(AppConfig::default(), workload(1, vec![fan_out(1, SECOND)]), 1);
    drive(&mut app, MINUTE, |_| 4);
    let pods: Vec<u64> = app.pod_reports().iter().map(|r| r.pod).collect();
    assert_eq!(pods.len(), 4);
    // Ranked as the aggregator would rank them (kubernetes ActivePodsWithRanks.Less: the
    // lower pod-deletion-cost goes first, before any other criterion).
    app.set_deletion_costs(&[(pods[0], 40), (pods[1], 0), (pods[2], 17), (pods[3], 1)]);
    drive_from(&mut app, MINUTE + 100, 2 * MINUTE, |_| 2);
    let mut left: Vec<u64> = app.pod_reports().iter().map(|r| r.pod).collect();
    left.sort_unstable();
    let mut expected = vec![pods[0], pods[2]];
    expected.sort_unstable();
    assert_eq!(left, expected, "the two costliest pods stay");
}

#[test]
fn without_deletion_costs_the_replica_set_picks_among_equal_pods_at_random() {
    // Two pods ready at the same time, one running a long activity; scale to one.
    let mut kept_holder = 0;
    for seed in 1..=40 {
        let mut app = App::new(AppConfig::default(), workload(1, vec![fan_out(1, 10 * MINUTE)]), seed);
        drive(&mut app, MINUTE, |now| if now < MINUTE { 2 } else { 1 });
        kept_holder += u32::from(app.scale_in_cost().interrupted_work_items == 0);
    }
    assert!((5..=35).contains(&kept_holder), "the holder survived {kept_holder} times of 40");
}

#[test]
fn a_held_message_outweighs_every_lease_in_the_deletion_cost() {
    let report = |owned_partitions, held_messages| scalers::PodReport {
        pod: 1,
        owned_partitions,
        held_messages,
        terminating: false,
    };
    assert!(scalers::deletion_cost(&report(16, 0)) < scalers::deletion_cost(&report(0, 1)));
    assert!(scalers::deletion_cost(&report(0, 0)) < scalers::deletion_cost(&report(1, 0)));
    assert_eq!(scalers::deletion_cost(&report(0, u64::MAX)), i32::MAX);
}

#[test]
fn in_long_activities_renewed_activities_run_to_their_end_on_live_pods() {
    let s = scenario::builtin("long-activities", 1).expect("built in");
    let mut app = App::new(AppConfig::default(), s.workload.clone(), 1);
    let mut longest_hidden_run = 0;
    let mut now = 0;
    while now <= s.duration_ms {
        app.tick(now);
        app.set_replicas(10, now);
        let (work_item, _) = app.observe(now);
        if work_item.visible_count == 0 && work_item.approximate_count > 0 {
            longest_hidden_run += 100;
        }
        now += 100;
    }
    assert_eq!(app.completions().len(), 24);
    assert_eq!(app.message_counts().returned, 0, "no activity reappeared while its pod lived");
    assert!(
        longest_hidden_run > 60 * MINUTE,
        "activities in flight, nothing visible, for {longest_hidden_run} ms"
    );
}

#[test]
fn in_deep_backlog_the_partition_owners_prefetch_up_to_their_threshold_and_drain_it() {
    let s = scenario::builtin("deep-backlog", 1).expect("built in");
    let mut app = App::new(AppConfig::default(), s.workload.clone(), 1);
    let mut most_held = 0;
    let mut now = 0;
    while now <= 20 * MINUTE {
        app.tick(now);
        app.set_replicas(8, now);
        most_held = app.pod_reports().iter().map(|r| r.held_messages).fold(most_held, u64::max);
        if now == 21 * SECOND {
            // The first pods are ready since 20 s: thousands of start messages per partition,
            // a peek shows 32.
            let (_, control) = app.observe(now);
            assert!(
                control.iter().all(|q| q.approximate_count > 2_000 && q.visible_count == 32),
                "{control:?}"
            );
        }
        now += 100;
    }
    // At most the threshold plus what one dequeue of 32 added below it, plus ten activities.
    assert!((256..256 + 32 + 10).contains(&most_held), "most held {most_held}");
    assert_eq!(app.completions().len(), 10_000);
}

#[test]
fn in_scale_in_our_drain_for_the_function_timeout_interrupts_no_work_and_no_drain_does() {
    let s = scenario::builtin("scale-in", 1).expect("built in");
    let ours = ScalerKind::DurableScaler(Algorithm::Durable);
    let drained = run_one(&s, ours, &Settings::default(), &mut |_| {});
    let undrained =
        run_one(&s, ours, &Settings { drain: DrainPolicy::None, ..Settings::default() }, &mut |_| {});
    assert!(drained.drain && drained.deletion_cost && !undrained.drain);
    // The 15-minute activities outlive any default grace period; the drain waits for them.
    assert_eq!(drained.interrupted_work_items, 0, "{drained:?}");
    assert!(undrained.interrupted_work_items > 0 && undrained.lost_work_s > 0.0, "{undrained:?}");
}

#[test]
fn a_pod_takes_work_only_after_its_startup_delay() {
    let mut app = App::new(AppConfig::default(), workload(1, vec![fan_out(1, SECOND)]), 1);
    drive(&mut app, 19_900, |_| 1);
    assert_eq!(app.ready_pods(19_900), 0);
    assert_eq!(app.completions().len(), 0);
    let (_, control) = app.observe(19_900);
    assert_eq!(control.iter().map(|s| s.approximate_count).sum::<u64>(), 1);
}

#[test]
fn durable_timers_are_invisible_but_counted() {
    let mut app = App::new(AppConfig::default(), workload(3, vec![Step::Timer { delay_ms: 10 * MINUTE }]), 1);
    drive(&mut app, MINUTE, |_| 1);
    let (_, control) = app.observe(MINUTE);
    let approximate: u64 = control.iter().map(|s| s.approximate_count).sum();
    let visible: u64 = control.iter().map(|s| u64::from(s.visible_count)).sum();
    assert_eq!((approximate, visible), (3, 0));
}

#[test]
fn several_metrics_follow_the_hpa_arithmetic_of_the_highest() {
    let b = ReplicaBounds::default();
    for current in [1u32, 3, 9, 10, 20, 50] {
        for value in [0.0, 1.0, 4.5, 9.5, 10.5, 11.0, 12.0, 40.0, 300.0] {
            let mut ours = ScaleDownStabilizer::new(hpa::SCALE_DOWN_STABILIZATION);
            let mut theirs = ScaleDownStabilizer::new(hpa::SCALE_DOWN_STABILIZATION);
            let m = [Metric { value, target: 1.0 }];
            assert_eq!(
                hpa_sync_metrics(current, &m, b, &mut ours, UnixMs(0)),
                hpa::hpa_sync(current, value, 1.0, MetricTargetType::AverageValue, b, &mut theirs, UnixMs(0)),
                "one metric is hpa_sync itself ({current}, {value})"
            );
        }
    }
    let mut s = ScaleDownStabilizer::new(hpa::SCALE_DOWN_STABILIZATION);
    let metrics = [
        Metric { value: 10.0, target: 5.0 },
        Metric { value: 30.0, target: 5.0 },
        Metric { value: 0.0, target: 5.0 },
    ];
    assert_eq!(hpa_sync_metrics(4, &metrics, b, &mut s, UnixMs(0)), 6, "the highest proposal (30/5) wins");
}

#[test]
fn keda_activates_at_its_poll_and_scales_to_zero_after_the_cooldown() {
    let cfg =
        KedaConfig { polling_interval_ms: 30 * SECOND, cooldown_ms: 60 * SECOND, ..KedaConfig::default() };
    let mut keda = Autoscaler::new(cfg);
    let mut app = App::new(AppConfig::default(), Workload::default(), 1);
    let mut scaler = scalers::build(ScalerKind::FunctionsTarget, &ScalerConfig::default(), 4);
    app.tick(0);
    assert_eq!(keda.tick(0, scaler.as_mut(), &app), 0, "nothing to do at zero");
    // Work appears at 1 s; KEDA sees it only at its next poll (30 s).
    let mut app = App::new(
        AppConfig::default(),
        Workload {
            arrivals: vec![Arrival { at_ms: 1_000, count: 1, script: 0 }],
            ..workload(0, vec![fan_out(1, SECOND)])
        },
        1,
    );
    let mut keda = Autoscaler::new(cfg);
    let mut first_pod = None;
    let mut zero_again = None;
    let mut now = 0;
    while now <= 10 * MINUTE {
        app.tick(now);
        let r = keda.tick(now, scaler.as_mut(), &app);
        app.set_replicas(r, now);
        if r > 0 && first_pod.is_none() {
            first_pod = Some(now);
        }
        if r == 0 && first_pod.is_some() && zero_again.is_none() {
            zero_again = Some(now);
        }
        now += 100;
    }
    assert_eq!(first_pod, Some(30 * SECOND));
    let zero = zero_again.expect("back to zero");
    assert!(zero >= 90 * SECOND, "cooldown counts from the last active poll, got {zero}");
}

#[test]
fn our_push_activates_within_one_probe_interval() {
    let scenario = Scenario {
        name: "one".into(),
        description: String::new(),
        duration_ms: 2 * MINUTE,
        workload: Workload {
            scripts: vec![Script { steps: vec![fan_out(1, SECOND)] }],
            arrivals: vec![Arrival { at_ms: 10 * SECOND, count: 1, script: 0 }],
        },
        function_timeout_ms: None,
    };
    let settings = Settings::default();
    let ours = run_one(&scenario, ScalerKind::DurableScaler(Algorithm::Durable), &settings, &mut |_| {});
    let peer = run_one(&scenario, ScalerKind::FunctionsTarget, &settings, &mut |_| {});
    assert_eq!(ours.wakes, 1);
    assert!(ours.wake_mean_s <= 20.0 + 2.0, "probe (2 s) + start-up (20 s), got {}", ours.wake_mean_s);
    assert!(peer.wake_mean_s >= 20.0 + 10.0, "KEDA's 30 s poll, got {}", peer.wake_mean_s);
}

#[test]
fn kedacore_maps_its_vote_to_five_pods_or_one() {
    assert_eq!(scalers::kedacore_metric(ScaleAction::AddWorker), Metric { value: 25.0, target: 5.0 });
    assert_eq!(scalers::kedacore_metric(ScaleAction::RemoveWorker), Metric { value: 1.0, target: 5.0 });
    assert_eq!(scalers::kedacore_metric(ScaleAction::None), Metric { value: 0.0, target: 5.0 });
    let b = ReplicaBounds::default();
    let hpa = |m: Metric, current| {
        hpa::desired_replicas(current, m.value, m.target, MetricTargetType::AverageValue)
    };
    assert_eq!(b.clamp_hpa(hpa(scalers::kedacore_metric(ScaleAction::AddWorker), 1)), 5);
    assert_eq!(b.clamp_hpa(hpa(scalers::kedacore_metric(ScaleAction::None), 5)), 1, "None means one pod");
}

#[test]
fn kedacore_is_always_active() {
    let app = App::new(AppConfig::default(), Workload::default(), 1);
    let mut k = scalers::build(ScalerKind::Kedacore, &ScalerConfig::default(), 4);
    assert!(k.is_active(UnixMs(0), &app, 0));
}

#[test]
fn wsugarman_packs_partitions_into_orchestration_workers() {
    use scalers::wsugarman_orchestration_workers as pack;
    assert_eq!(pack(&[0, 0, 0, 0], 5), 0);
    assert_eq!(pack(&[1, 1, 1, 1], 5), 1);
    assert_eq!(pack(&[2, 2, 1, 0], 5), 1, "2 + 2 + 1 fit in 5");
    assert_eq!(pack(&[3, 3, 3, 0], 5), 3, "no two fit together");
    assert_eq!(pack(&[100, 100, 0, 0], 5), 2, "a partition is capped at the worker's capacity");
    assert_eq!(pack(&[4, 1, 4, 1], 5), 2);
}

#[test]
fn wsugarman_sums_activity_and_orchestration_workers() {
    let m = scalers::wsugarman_metric(25, &[1, 1, 0, 0], 10, 5);
    assert_eq!(m, Metric { value: 25.0 + 10.0, target: 10.0 });
    assert_eq!(
        hpa::desired_replicas(1, m.value, m.target, MetricTargetType::AverageValue),
        4,
        "ceil(2.5) + 1"
    );
    assert_eq!(scalers::wsugarman_metric(0, &[0, 0], 10, 5).value, 0.0);
}

/// An app at 40 s with `count` start messages waiting (no pods) and `timers` sleeping timers.
fn waiting_app(count: u32, timers: u32) -> App {
    let mut w = workload(timers, vec![Step::Timer { delay_ms: 60 * MINUTE }]);
    w.scripts.push(Script { steps: vec![fan_out(1, SECOND)] });
    w.arrivals.push(Arrival { at_ms: 35 * SECOND, count, script: 1 });
    let mut app = App::new(AppConfig::default(), w, 1);
    // One pod runs the timer orchestrations' first episode, then goes.
    let mut now = 0;
    while now <= 40 * SECOND {
        app.tick(now);
        app.set_replicas(u32::from(now < 25 * SECOND && timers > 0), now);
        now += 100;
    }
    app
}

#[test]
fn functions_target_reads_a_queue_with_nothing_visible_as_empty() {
    let app = waiting_app(0, 6);
    let mut f = scalers::build(ScalerKind::FunctionsTarget, &ScalerConfig::default(), 4);
    assert!(!f.is_active(sim_time(40 * SECOND), &app, 1), "sleeping timers are invisible");
    let s = QueueReading { approximate_count: 9, ..QueueReading::default() };
    assert_eq!(scalers::upstream_length(&s), 0);
    let app = waiting_app(30, 0);
    let mut f = scalers::build(ScalerKind::FunctionsTarget, &ScalerConfig::default(), 4);
    let (_, control) = app.observe(40 * SECOND);
    let active = control.iter().filter(|s| s.approximate_count > 0).count() as f64;
    assert_eq!(
        f.metrics(sim_time(40 * SECOND), &app, 1),
        // min(partitions with messages, ceil(30 messages / maxOrchestrations)).
        vec![Metric {
            value: active.min((30.0 / f64::from(ScalerConfig::default().max_orchestrations)).ceil()),
            target: 1.0
        }]
    );
}

#[test]
fn keda_azure_queue_has_one_trigger_per_queue_counting_everything() {
    let app = waiting_app(12, 6);
    let mut q = scalers::build(ScalerKind::KedaAzureQueue, &ScalerConfig::default(), 4);
    let metrics = q.metrics(sim_time(40 * SECOND), &app, 1);
    assert_eq!(metrics.len(), 5, "work-item queue and four control queues");
    assert!(metrics.iter().all(|m| m.target == 5.0));
    assert_eq!(metrics.iter().map(|m| m.value).sum::<f64>(), 18.0, "starts and sleeping timers alike");
    let timers_only = waiting_app(0, 6);
    assert!(q.is_active(sim_time(40 * SECOND), &timers_only, 1), "timers keep it awake");
}

fn short_steady(seed: u64) -> Scenario {
    let mut s = scenario::builtin("steady", seed).expect("built in");
    s.duration_ms = 3 * MINUTE;
    s
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let settings = Settings::default();
    for kind in scalers::ALL {
        let a = run_one(&short_steady(7), kind, &settings, &mut |_| {});
        let b = run_one(&short_steady(7), kind, &settings, &mut |_| {});
        assert_eq!(a, b, "{kind}");
    }
    let other = run_one(&short_steady(8), scalers::ALL[4], &settings, &mut |_| {});
    assert_ne!(other, run_one(&short_steady(7), scalers::ALL[4], &settings, &mut |_| {}));
}

#[test]
fn sleeping_timers_let_our_scaler_reach_zero_but_not_count_based_ones() {
    let scenario = Scenario {
        name: "sleepers".into(),
        description: String::new(),
        duration_ms: 15 * MINUTE,
        workload: Workload {
            scripts: vec![Script { steps: vec![fan_out(1, SECOND), Step::Timer { delay_ms: 60 * MINUTE }] }],
            arrivals: vec![Arrival { at_ms: 0, count: 20, script: 0 }],
        },
        function_timeout_ms: None,
    };
    let settings = Settings::default();
    let ours = run_one(&scenario, ScalerKind::DurableScaler(Algorithm::Durable), &settings, &mut |_| {});
    let wsugarman = run_one(&scenario, ScalerKind::Wsugarman, &settings, &mut |_| {});
    assert_eq!(ours.series.last().map(|p| p.pods), Some(0), "ours sleeps");
    assert!(ours.zero_s > 60.0, "{}", ours.zero_s);
    assert!(wsugarman.series.last().is_some_and(|p| p.pods >= 1), "counts keep it awake");
    assert_eq!(wsugarman.zero_s, 0.0);
}

#[test]
fn work_in_progress_keeps_our_workers() {
    // One orchestration with a 4-minute activity: nothing visible while it runs.
    let scenario = Scenario {
        name: "long".into(),
        description: String::new(),
        duration_ms: 8 * MINUTE,
        workload: workload(1, vec![fan_out(1, 4 * MINUTE)]),
        function_timeout_ms: None,
    };
    let settings = Settings::default();
    let ours = run_one(&scenario, ScalerKind::DurableScaler(Algorithm::Durable), &settings, &mut |_| {});
    assert_eq!(ours.completed, 1);
    let running = ours.series.iter().filter(|p| (60_000..240_000).contains(&p.at_ms));
    assert!(running.clone().all(|p| p.pods >= 1), "a pod stays while the activity runs");
}

#[test]
fn our_orchestration_workers_stay_within_the_partitions_with_work() {
    // Orchestrations that only run episodes (no activities): all on four partitions.
    let scenario = Scenario {
        name: "episodes".into(),
        description: String::new(),
        duration_ms: 4 * MINUTE,
        workload: workload(400, vec![Step::Timer { delay_ms: 1 }]),
        function_timeout_ms: None,
    };
    let settings = Settings {
        scalers: ScalerConfig {
            durable: durable_scaler::heuristic::durable::DurableSettings {
                activity_lookahead: false,
                ..Default::default()
            },
            ..ScalerConfig::default()
        },
        ..Settings::default()
    };
    let ours = run_one(&scenario, ScalerKind::DurableScaler(Algorithm::Durable), &settings, &mut |_| {});
    assert!(ours.peak_pods <= 4, "peak {}", ours.peak_pods);
    assert_eq!(ours.completed, 400);
}

#[test]
fn defaults_of_the_command_line_are_the_documented_defaults() {
    let args = Args::parse_from(["simulate"]);
    let settings = args.settings().expect("defaults are valid");
    assert_eq!(settings.app, AppConfig::default());
    assert_eq!(settings.drain, DrainPolicy::Ours);
    assert_eq!(settings.keda, KedaConfig::default());
    assert_eq!(settings.scalers, ScalerConfig { seed: 1, ..ScalerConfig::default() });
    assert_eq!(settings.tick_ms, 100);
    assert_eq!(args.scaler_kinds(), scalers::ALL.to_vec());
    assert_eq!(args.scenarios().expect("built in").len(), scenario::BUILTIN.len());
}

#[test]
fn invalid_values_are_refused_with_the_flags_name() {
    for (flag, value) in [
        ("--partitions", "17"),
        ("--tick-ms", "5"),
        ("--startup-s", "-1"),
        ("--grace-s", "NaN"),
        ("--max-polling-interval-s", "0"),
        ("--control-queue-buffer-threshold", "0"),
        ("--control-queue-batch-size", "33"),
        ("--max-replicas", "0"),
        ("--drain", "sometimes"),
        ("--scenarios", "nope"),
        ("--scalers", "hpa-cpu"),
    ] {
        let arg = format!("{flag}={value}");
        let err = Args::try_parse_from(["simulate", arg.as_str()]).expect_err(flag).to_string();
        assert!(err.contains(flag), "{flag} {value}: {err}");
    }
    let err = Args::try_parse_from(["simulate", "--scenarios", "nope"]).expect_err("unknown").to_string();
    assert!(err.contains("burst"), "lists the scenarios: {err}");
}

#[test]
fn settings_that_contradict_each_other_name_their_variable() {
    let args = Args::parse_from(["simulate", "--min-replicas", "5", "--max-replicas", "3"]);
    let err = args.settings().expect_err("5 > 3").to_string();
    assert!(err.contains("--min-replicas") && err.contains("DURABLE_SCALER_SIMULATE_MIN_REPLICAS"), "{err}");
}

#[test]
fn seconds_flags_take_fractions_and_keep_milliseconds() {
    let args = Args::parse_from(["simulate", "--startup-s", "2.5", "--grace-s", "0"]);
    let settings = args.settings().expect("valid");
    assert_eq!((settings.app.startup_ms, settings.app.grace_ms), (2_500, 0));
}

#[test]
fn traces_load_from_csv_and_json() {
    let rows = scenario::parse_csv(
        "# a comment\nat_s,count,activities,activity_s,timer_s\n0,2,3,1.5,0\n60,1,1,1,120\n",
    )
    .expect("valid csv");
    let s = scenario::from_rows("t", &rows, None).expect("valid rows");
    assert_eq!(s.workload.orchestrations(), 3);
    assert_eq!(s.workload.scripts.len(), 2);
    assert_eq!(s.duration_ms, 60 * SECOND + 30 * MINUTE);
    let rows = scenario::parse_csv("at_s,poison\n0,1\n").expect("valid csv");
    let s = scenario::from_rows("p", &rows, None).expect("valid rows");
    assert_eq!(s.workload.scripts[0].steps.last(), Some(&Step::Poison { duration: Duration::fixed(SECOND) }));
    let rows = scenario::parse_csv("at_s,poison\n0,2\n").expect("valid csv");
    assert!(scenario::from_rows("p", &rows, None).expect_err("0 or 1").contains("poison"));
    let err = scenario::parse_csv("at_s,activities\n0,x\n").expect_err("not a number");
    assert!(err.contains("line 2") && err.contains("activities"), "{err}");
    assert!(scenario::parse_csv("at_s,colour\n0,1\n").is_err());

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("day.json");
    std::fs::write(&path, r#"[{"at_s": 5, "count": 4, "activities": 2}]"#).expect("write");
    let s = scenario::load_trace(&path, Some(MINUTE)).expect("valid json");
    assert_eq!((s.name.as_str(), s.workload.orchestrations(), s.duration_ms), ("day", 4, MINUTE));
    let err = scenario::load_trace(&dir.path().join("missing.csv"), None).expect_err("missing");
    assert!(err.to_string().contains("missing.csv"), "{err}");
}

#[test]
fn the_verdict_picks_the_cheapest_within_ten_percent_of_the_best_p95() {
    let settings = Settings::default();
    let s = short_steady(1);
    let results: Vec<_> = scalers::ALL.iter().map(|&k| run_one(&s, k, &settings, &mut |_| {})).collect();
    let v = output::verdict(&results).expect("results");
    let winner = results.iter().find(|r| r.scaler == v.winner).expect("winner ran");
    assert!(winner.latency_p95_s <= v.best_p95_s * 1.1 + 1e-9);
    for r in &results {
        if r.latency_p95_s <= v.best_p95_s * 1.1 {
            assert!(winner.pod_seconds <= r.pod_seconds, "{} is cheaper", r.scaler);
        }
    }
    let table = output::table(&results, std::slice::from_ref(&v));
    let marked = |l: &str| l.trim_end().ends_with('*') || l.trim_end().ends_with("*w");
    assert!(table.lines().any(|l| l.contains(&v.winner) && marked(l)), "{table}");
    let chart = svg::chart(&s.name, &s.description, &results);
    assert!(chart.starts_with("<svg") && chart.trim_end().ends_with("</svg>"));
    for r in &results {
        assert!(chart.contains(&r.scaler), "legend names {}", r.scaler);
    }
    assert_eq!(chart.matches("<path").count(), 2 * results.len(), "pods and backlog per scaler");
}

#[test]
fn percentiles_use_the_nearest_rank() {
    let v: Vec<u64> = (1..=100).collect();
    assert_eq!(percentile(&v, 0.5), 50);
    assert_eq!(percentile(&v, 0.95), 95);
    assert_eq!(percentile(&[], 0.5), 0);
}
