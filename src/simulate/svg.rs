//! One chart per scenario, written by hand as SVG text: pods over time for every scaler in
//! the upper panel, each scaler's backlog (visible messages) beneath, a legend with each
//! scaler's pod-seconds and p95, and labelled axes. Readable without the table.

use std::fmt::Write;

use super::metrics::{Point, RunResult};

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 600.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 250.0;
const TOP: f64 = 50.0;
const PODS_HEIGHT: f64 = 300.0;
const GAP: f64 = 50.0;
const BACKLOG_HEIGHT: f64 = 140.0;
/// Dash patterns, so scalers whose lines coincide stay distinguishable.
const DASHES: [&str; 8] = ["none", "6,3", "2,2", "9,3,2,3", "none", "4,4", "1,3", "12,4"];
const COLOURS: [&str; 8] =
    ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

/// A "nice" tick step (1, 2 or 5 x 10^k) giving about `ticks` ticks up to `max`.
fn nice_step(max: f64, ticks: f64) -> f64 {
    let raw = (max / ticks).max(f64::MIN_POSITIVE);
    let magnitude = 10f64.powf(raw.log10().floor());
    let residual = raw / magnitude;
    let nice = if residual <= 1.0 {
        1.0
    } else if residual <= 2.0 {
        2.0
    } else if residual <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The series reduced to at most `buckets` points, keeping each bucket's maximum so short
/// spikes stay visible.
fn downsample(series: &[Point], buckets: usize, value: impl Fn(&Point) -> f64) -> Vec<(u64, f64)> {
    if series.len() <= buckets {
        return series.iter().map(|p| (p.at_ms, value(p))).collect();
    }
    let per = series.len().div_ceil(buckets);
    series.chunks(per).map(|chunk| (chunk[0].at_ms, chunk.iter().map(&value).fold(0.0, f64::max))).collect()
}

/// A step line through `points` in the panel whose top is `top` and height `height`.
fn step_path(points: &[(u64, f64)], x: impl Fn(u64) -> f64, top: f64, height: f64, max: f64) -> String {
    let y = |v: f64| top + height - v / max * height;
    let mut d = String::new();
    let mut last_y = None;
    for &(t, v) in points {
        let (px, py) = (x(t), y(v));
        match last_y {
            None => {
                let _ = write!(d, "M{px:.1},{py:.1}");
            }
            Some(ly) => {
                let _ = write!(d, " L{px:.1},{ly:.1} L{px:.1},{py:.1}");
            }
        }
        last_y = Some(py);
    }
    d
}

/// Axis lines, horizontal grid and y labels for one panel.
fn y_axis(svg: &mut String, top: f64, height: f64, max: f64, label: &str) {
    // Pods and messages are whole numbers.
    let step = nice_step(max, 5.0).max(1.0);
    let mut v = 0.0;
    while v <= max + 1e-9 {
        let y = top + height - v / max * height;
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="11">{}</text>"##,
            WIDTH - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            format_number(v)
        );
        v += step;
    }
    let _ = writeln!(
        svg,
        r##"<line x1="{LEFT}" y1="{top}" x2="{LEFT}" y2="{:.1}" stroke="#333"/><text x="16" y="{:.1}" transform="rotate(-90 16 {:.1})" text-anchor="middle" font-size="12">{}</text>"##,
        top + height,
        top + height / 2.0,
        top + height / 2.0,
        escape(label)
    );
}

fn format_number(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1_000.0)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// One line pair on a chart: a run's pods above, its backlog beneath.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Series<'a> {
    /// Legend name.
    pub name: &'a str,
    /// The run's points.
    pub points: &'a [Point],
    /// Its length (ms): the time axis spans the longest series.
    pub duration_ms: u64,
    /// The legend's second line (e.g. "1234 pod-s, p95 12 s").
    pub detail: &'a str,
    /// Drawn last and thicker, so it stays on top.
    pub emphasised: bool,
}

/// The chart for one scenario's results (one [`RunResult`] per scaler).
pub fn chart(title: &str, description: &str, results: &[RunResult]) -> String {
    let details: Vec<String> =
        results.iter().map(|r| format!("{:.0} pod-s, p95 {:.0} s", r.pod_seconds, r.latency_p95_s)).collect();
    let series: Vec<Series<'_>> = results
        .iter()
        .zip(&details)
        .map(|(r, detail)| Series {
            name: &r.scaler,
            points: &r.series,
            duration_ms: (r.duration_s * 1_000.0) as u64,
            detail,
            emphasised: r.scaler == "durable-scaler",
        })
        .collect();
    chart_series(
        &format!("Scenario {title}: pods per scaler, backlog beneath"),
        description,
        "scaler: pod-s, p95",
        &series,
    )
}

/// A chart of any runs: pods over time above, backlog (visible messages) beneath, a legend
/// headed `legend` on the right.
pub(crate) fn chart_series(heading: &str, description: &str, legend: &str, series: &[Series<'_>]) -> String {
    let duration_ms = series.iter().map(|r| r.duration_ms).max().unwrap_or(1).max(1);
    let plot_width = WIDTH - LEFT - RIGHT;
    let x = |t: u64| LEFT + t as f64 / duration_ms as f64 * plot_width;
    let max_pods =
        series.iter().flat_map(|r| r.points.iter().map(|p| p.pods)).max().unwrap_or(1).max(1) as f64;
    let max_pods = (max_pods / nice_step(max_pods, 5.0)).ceil() * nice_step(max_pods, 5.0);
    let max_backlog =
        series.iter().flat_map(|r| r.points.iter().map(|p| p.backlog)).max().unwrap_or(1).max(1) as f64;
    let max_backlog = (max_backlog / nice_step(max_backlog, 3.0)).ceil() * nice_step(max_backlog, 3.0);
    let backlog_top = TOP + PODS_HEIGHT + GAP;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif">"##
    );
    let _ = writeln!(svg, r##"<rect width="100%" height="100%" fill="white"/>"##);
    let _ = writeln!(
        svg,
        r##"<text x="{LEFT}" y="22" font-size="16" font-weight="bold">{}</text><text x="{LEFT}" y="40" font-size="12" fill="#555">{}</text>"##,
        escape(heading),
        escape(description)
    );
    y_axis(&mut svg, TOP, PODS_HEIGHT, max_pods, "pods");
    y_axis(&mut svg, backlog_top, BACKLOG_HEIGHT, max_backlog, "backlog (visible msgs)");

    // Time axis under both panels.
    let hours = duration_ms >= 3 * 3_600_000;
    let unit_ms = if hours { 3_600_000.0 } else { 60_000.0 };
    let step = nice_step(duration_ms as f64 / unit_ms, 8.0);
    let bottom = backlog_top + BACKLOG_HEIGHT;
    let mut t = 0.0;
    while t * unit_ms <= duration_ms as f64 + 1e-6 {
        let px = x((t * unit_ms) as u64);
        let _ = writeln!(
            svg,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{bottom:.1}" stroke="#f0f0f0"/><text x="{px:.1}" y="{:.1}" text-anchor="middle" font-size="11">{}</text><text x="{px:.1}" y="{:.1}" text-anchor="middle" font-size="11">{}</text>"##,
            TOP + PODS_HEIGHT + 15.0,
            format_number(t),
            bottom + 15.0,
            format_number(t)
        );
        t += step;
    }
    let _ = writeln!(
        svg,
        r##"<line x1="{LEFT}" y1="{0:.1}" x2="{1:.1}" y2="{0:.1}" stroke="#333"/><line x1="{LEFT}" y1="{2:.1}" x2="{1:.1}" y2="{2:.1}" stroke="#333"/><text x="{3:.1}" y="{4:.1}" text-anchor="middle" font-size="12">time ({5})</text>"##,
        TOP + PODS_HEIGHT,
        WIDTH - RIGHT,
        bottom,
        LEFT + plot_width / 2.0,
        bottom + 34.0,
        if hours { "hours" } else { "minutes" }
    );

    // Lines, ours drawn last and thicker so it stays on top.
    let mut order: Vec<usize> = (0..series.len()).collect();
    order.sort_by_key(|&i| series[i].emphasised);
    for &i in &order {
        let r = &series[i];
        let colour = COLOURS[i % COLOURS.len()];
        let dash = DASHES[i % DASHES.len()];
        let width = if r.emphasised { 2.6 } else { 1.5 };
        let pods = downsample(r.points, 700, |p| f64::from(p.pods));
        let backlog = downsample(r.points, 700, |p| p.backlog as f64);
        let _ = writeln!(
            svg,
            r##"<path d="{}" fill="none" stroke="{colour}" stroke-width="{width}" stroke-dasharray="{dash}" stroke-opacity="0.9"/>"##,
            step_path(&pods, x, TOP, PODS_HEIGHT, max_pods)
        );
        let _ = writeln!(
            svg,
            r##"<path d="{}" fill="none" stroke="{colour}" stroke-width="{:.1}" stroke-dasharray="{dash}" stroke-opacity="0.8"/>"##,
            step_path(&backlog, x, backlog_top, BACKLOG_HEIGHT, max_backlog),
            width * 0.7
        );
    }

    // Legend.
    let lx = WIDTH - RIGHT + 16.0;
    let _ = writeln!(
        svg,
        r##"<text x="{lx}" y="{}" font-size="12" font-weight="bold">{}</text>"##,
        TOP + 4.0,
        escape(legend)
    );
    for (i, r) in series.iter().enumerate() {
        let y = TOP + 24.0 + i as f64 * 34.0;
        let colour = COLOURS[i % COLOURS.len()];
        let dash = DASHES[i % DASHES.len()];
        let _ = writeln!(
            svg,
            r##"<line x1="{lx}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{colour}" stroke-width="3" stroke-dasharray="{dash}"/><text x="{:.1}" y="{:.1}" font-size="12">{}</text><text x="{:.1}" y="{:.1}" font-size="11" fill="#555">{}</text>"##,
            lx + 22.0,
            lx + 28.0,
            y + 4.0,
            escape(r.name),
            lx + 28.0,
            y + 18.0,
            escape(r.detail)
        );
    }
    svg.push_str("</svg>\n");
    svg
}
