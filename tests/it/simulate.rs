//! `durable-scaler simulate`: the model's invariants, KEDA and HPA arithmetic, each peer
//! scaler pinned to its formula, determinism, and our algorithm's properties end to end.
//! Simulated durations are kept to minutes so the file runs in seconds in debug builds.

use clap::Parser;
use durable_scaler::clock::UnixMs;
use durable_scaler::heuristic::hpa::{self, MetricTargetType, ReplicaBounds, ScaleDownStabilizer};
use durable_scaler::heuristic::{Algorithm, ScaleAction};
use durable_scaler::reading::QueueReading;
use durable_scaler::simulate::{
    Args, Settings,
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

/// Drives an app by hand: `replicas(now)` pods, checking message conservation every tick.
fn drive(app: &mut App, until_ms: u64, replicas: impl Fn(u64) -> u32) {
    let mut now = 0;
    while now <= until_ms {
        app.tick(now);
        app.set_replicas(replicas(now), now);
        let c = app.message_counts();
        assert_eq!(c.enqueued, c.deleted + c.present, "messages conserved at {now} ms: {c:?}");
        now += 100;
    }
}

#[test]
fn messages_are_conserved_and_every_orchestration_finishes() {
    let mut app =
        App::new(AppConfig::default(), workload(40, vec![fan_out(5, 2 * SECOND), fan_out(1, SECOND)]), 3);
    drive(&mut app, 3 * MINUTE, |_| 3);
    assert_eq!(app.completions().len(), 40);
    let c = app.message_counts();
    assert_eq!((c.present, c.abandoned), (0, 0));
    assert_eq!(c.enqueued, 40 * (1 + 5 + 5 + 1 + 1), "start, 5+1 activities, 5+1 completions");
}

#[test]
fn a_graceful_scale_in_lets_draining_pods_finish_their_work() {
    let mut app = App::new(AppConfig::default(), workload(20, vec![fan_out(10, 10 * SECOND)]), 3);
    // Four pods while the activities run, then one: the other three drain within 30 s grace.
    drive(&mut app, 5 * MINUTE, |now| if now < 35 * SECOND { 4 } else { 1 });
    assert_eq!(app.completions().len(), 20);
    assert_eq!(app.message_counts().abandoned, 0, "10 s activities finish within the grace period");
}

#[test]
fn work_that_outlives_the_grace_period_returns_to_its_queue_and_runs_again() {
    let cfg = AppConfig { grace_ms: 5 * SECOND, ..AppConfig::default() };
    let mut app = App::new(cfg, workload(4, vec![fan_out(5, 60 * SECOND)]), 3);
    // Scale to zero while 60 s activities run, then back to one pod.
    drive(&mut app, 12 * MINUTE, |now| if (40 * SECOND..60 * SECOND).contains(&now) { 0 } else { 2 });
    let c = app.message_counts();
    assert!(c.abandoned > 0, "the scale-in cut work short: {c:?}");
    assert_eq!(app.completions().len(), 4, "after the visibility timeout the work ran again");
    assert_eq!(c.present, 0);
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
    assert_eq!(settings.keda, KedaConfig::default());
    assert_eq!(settings.scalers, ScalerConfig { seed: 1, ..ScalerConfig::default() });
    assert_eq!(settings.tick_ms, 100);
    assert_eq!(args.scaler_kinds(), scalers::ALL.to_vec());
    assert_eq!(args.scenarios().expect("built in").len(), 6);
}

#[test]
fn bad_settings_name_their_variable() {
    let err = Args::parse_from(["simulate", "--partitions", "17"]).settings().expect_err("17 > 16");
    assert!(err.to_string().contains("DURABLE_SCALER_SIMULATE_PARTITIONS"), "{err}");
    let err = Args::parse_from(["simulate", "--scenarios", "nope"]).scenarios().expect_err("unknown");
    assert!(
        err.to_string().contains("DURABLE_SCALER_SIMULATE_SCENARIOS") && err.to_string().contains("burst"),
        "{err}"
    );
    assert!(Args::try_parse_from(["simulate", "--scalers", "hpa-cpu"]).is_err());
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
