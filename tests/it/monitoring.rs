//! manifests/components/monitoring against the real tools: the component rendered onto both
//! installs by the real kustomize, its custom resources validated against the
//! prometheus-operator v0.93.0 CRDs (tests/fixtures), the PrometheusRule checked and
//! unit-tested by promtool (Debian's prometheus 2.42: every alert fires when it should and
//! not when it should not, tests/fixtures/monitoring/alerts.test.yaml), and a real Prometheus
//! scraping `durable-scaler demo` answering every query of the Grafana dashboard. The chart
//! of the dashboard's main panels is drawn from that Prometheus into
//! target/tmp/monitoring/dashboard.svg.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::CommandFactory;
use durable_scaler::azurite::Azurite;
use serde_json::{Value, json};

use crate::manifests::{find, kubernetes_validate, manifests_dir, python_with, render_with_components};
use crate::{crd_schema, tools};

const COMPONENT: &str = "components/monitoring";
const CRDS: [&str; 3] = [
    "tests/fixtures/prometheus-operator-v0.93.0/monitoring.coreos.com_servicemonitors.yaml",
    "tests/fixtures/prometheus-operator-v0.93.0/monitoring.coreos.com_podmonitors.yaml",
    "tests/fixtures/prometheus-operator-v0.93.0/monitoring.coreos.com_prometheusrules.yaml",
];
const PROMETHEUS_PACKAGE: &str = "Debian's `prometheus` package; scripts/test installs it with apt-get";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn is_monitoring(object: &Value) -> bool {
    object["apiVersion"].as_str().is_some_and(|v| v.starts_with("monitoring.coreos.com/"))
}

fn component() -> Vec<Value> {
    render_with_components("default", &[COMPONENT])
}

fn rule_spec() -> Value {
    find(&component(), "PrometheusRule", "durable-scaler")["spec"].clone()
}

fn dashboard() -> Value {
    let text =
        std::fs::read_to_string(manifests_dir().join(COMPONENT).join("dashboards/durable-scaler-hub.json"))
            .unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn the_component_adds_only_monitoring_objects_to_either_install_and_they_validate_against_the_operator_crds()
{
    let crds: Vec<PathBuf> = CRDS.iter().map(|c| repo(c)).collect();
    let crds: Vec<&Path> = crds.iter().map(PathBuf::as_path).collect();
    for install in ["default", "plaintext"] {
        let plain = crate::manifests::render_path(&manifests_dir().join(install));
        let with = render_with_components(install, &[COMPONENT]);
        let added: Vec<&Value> = with.iter().filter(|o| !plain.contains(o)).collect();
        let kinds: BTreeSet<(&str, &str)> = added
            .iter()
            .map(|o| (o["kind"].as_str().unwrap(), o["metadata"]["name"].as_str().unwrap()))
            .collect();
        assert_eq!(
            kinds,
            BTreeSet::from([
                ("ConfigMap", "durable-scaler-dashboard"),
                ("PodMonitor", "durable-scaler-sidecars"),
                ("PrometheusRule", "durable-scaler"),
                ("ServiceMonitor", "durable-scaler-aggregator"),
                ("ServiceMonitor", "durable-scaler-webhook"),
            ]),
            "{install}"
        );
        assert_eq!(
            with.len(),
            plain.len() + added.len(),
            "{install}: the component changes nothing it did not add"
        );
        for object in &added {
            assert_eq!(object["metadata"]["namespace"], "durable-scaler", "{install}");
        }
        let custom: Vec<&Value> = added.iter().copied().filter(|o| is_monitoring(o)).collect();
        if python_with("jsonschema") {
            crd_schema::validate(&custom, &crds).unwrap_or_else(|e| panic!("{install}:\n{e}"));
        }
        if python_with("kubernetes_validate") {
            let builtin: Vec<&Value> = added.iter().copied().filter(|o| !is_monitoring(o)).collect();
            for version in ["1.29.0", "1.37.0"] {
                kubernetes_validate(&builtin, version)
                    .unwrap_or_else(|e| panic!("{install} {version}:\n{e}"));
            }
        }
    }
}

#[test]
fn the_operator_crds_refuse_a_misspelt_field() {
    if !python_with("jsonschema") {
        return;
    }
    let crds: Vec<PathBuf> = CRDS.iter().map(|c| repo(c)).collect();
    let crds: Vec<&Path> = crds.iter().map(PathBuf::as_path).collect();
    let objects = component();
    let mut monitor = find(&objects, "ServiceMonitor", "durable-scaler-aggregator").clone();
    monitor["spec"]["endpoints"][0]["honourLabels"] = json!(true);
    let report = crd_schema::validate(&[&monitor], &crds).unwrap_err();
    assert!(report.contains("honourLabels"), "{report}");
    let mut pods = find(&objects, "PodMonitor", "durable-scaler-sidecars").clone();
    pods["spec"]["podMetricsEndpoints"][0]["relabelings"][0]["action"] = json!("keepall");
    assert!(crd_schema::validate(&[&pods], &crds).unwrap_err().contains("keepall"));
}

#[test]
fn the_monitors_select_the_services_ports_and_pods_the_install_runs() {
    let objects = component();
    for (monitor, service, port_name) in [
        ("durable-scaler-aggregator", "durable-scaler-aggregator", "http"),
        ("durable-scaler-webhook", "durable-scaler-webhook", "https"),
    ] {
        let monitor = find(&objects, "ServiceMonitor", monitor);
        let service = find(&objects, "Service", service);
        let wanted = monitor["spec"]["selector"]["matchLabels"].as_object().unwrap();
        let labels = service["metadata"]["labels"].as_object().unwrap();
        assert!(wanted.iter().all(|(k, v)| labels.get(k) == Some(v)), "{monitor} selects {service}");
        let endpoint = &monitor["spec"]["endpoints"][0];
        assert_eq!(endpoint["port"], port_name);
        assert!(service["spec"]["ports"].as_array().unwrap().iter().any(|p| p["name"] == port_name));
        assert_eq!(endpoint["path"], "/metrics");
    }
    // The per-hub series keep the app's namespace (honorLabels) ...
    let aggregator = find(&objects, "ServiceMonitor", "durable-scaler-aggregator");
    assert_eq!(aggregator["spec"]["endpoints"][0]["honorLabels"], true);
    // ... and the webhook's certificate is checked against the CA of the Secret it serves
    // from, for the name the certificate is made for.
    let webhook = find(&objects, "ServiceMonitor", "durable-scaler-webhook");
    let tls = &webhook["spec"]["endpoints"][0]["tlsConfig"];
    let deployment = find(&objects, "Deployment", "durable-scaler-webhook");
    let volumes = deployment["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
    let served = volumes.iter().find(|v| v["name"] == "tls").unwrap();
    assert_eq!(tls["ca"]["secret"]["name"], served["secret"]["secretName"]);
    assert_eq!(tls["ca"]["secret"]["key"], "ca.crt");
    assert_eq!(tls["serverName"], "durable-scaler-webhook.durable-scaler.svc");

    // The sidecars: pods that opted in, the sidecar container, its metrics port.
    let pods = find(&objects, "PodMonitor", "durable-scaler-sidecars");
    assert_eq!(
        pods["spec"]["selector"]["matchLabels"],
        json!({durable_scaler::contract::INJECT_LABEL: "true"})
    );
    assert_eq!(pods["spec"]["namespaceSelector"], json!({"any": true}));
    let relabelings = pods["spec"]["podMetricsEndpoints"][0]["relabelings"].as_array().unwrap();
    assert_eq!(relabelings[0]["regex"], durable_scaler::contract::SIDECAR_CONTAINER);
    let cli = durable_scaler::cli::Cli::command();
    let sidecar = cli.find_subcommand("sidecar").unwrap();
    let http = sidecar.get_arguments().find(|a| a.get_id() == "http_addr").unwrap();
    let port = http.get_default_values()[0].to_str().unwrap().rsplit(':').next().unwrap().to_owned();
    for relabeling in relabelings.iter().filter(|r| r["targetLabel"] == "__address__") {
        assert!(relabeling["replacement"].as_str().unwrap().ends_with(&format!(":{port}")), "{relabeling}");
    }
}

/// The rule spec written as a Prometheus rule file into `dir`, with the promtool tests.
fn rule_files(dir: &Path) -> PathBuf {
    std::fs::write(dir.join("rules.yaml"), serde_json::to_string_pretty(&rule_spec()).unwrap()).unwrap();
    let tests = dir.join("alerts.test.yaml");
    std::fs::copy(repo("tests/fixtures/monitoring/alerts.test.yaml"), &tests).unwrap();
    tests
}

fn alerts(spec: &Value) -> Vec<&Value> {
    spec["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap()).collect()
}

#[test]
fn promtool_checks_the_rules_and_their_unit_tests_pass() {
    if !tools::available("promtool", &["--version"], PROMETHEUS_PACKAGE) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tests = rule_files(dir.path());
    let check = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(dir.path().join("rules.yaml"))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{report}{}", String::from_utf8_lossy(&check.stderr));
    assert!(report.contains(&format!("SUCCESS: {} rules found", alerts(&rule_spec()).len())), "{report}");
    let run = Command::new("promtool").arg("test").arg("rules").arg(&tests).output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success() && report.contains("SUCCESS"), "{report}");
}

#[test]
fn promtool_fails_a_rule_that_fires_too_early() {
    // The unit tests can fail: the same tests against a rule whose `for` was shortened.
    if !tools::available("promtool", &["--version"], PROMETHEUS_PACKAGE) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tests = rule_files(dir.path());
    let mut spec = rule_spec();
    spec["groups"][0]["rules"][0]["for"] = json!("1m");
    std::fs::write(dir.path().join("rules.yaml"), serde_json::to_string(&spec).unwrap()).unwrap();
    let run = Command::new("promtool").arg("test").arg("rules").arg(&tests).output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(!run.status.success() && report.contains("FAILED"), "{report}");
    assert!(report.contains("alertname: DurableScalerHubUnavailable, time: 4m"), "{report}");
}

#[test]
fn every_alert_has_a_test_where_it_fires_one_where_it_does_not_and_a_runbook() {
    let spec = rule_spec();
    let tests: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(repo("tests/fixtures/monitoring/alerts.test.yaml")).unwrap(),
    )
    .unwrap();
    let cases: Vec<&Value> = tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|group| group["alert_rule_test"].as_array().unwrap())
        .collect();
    let runbooks = std::fs::read_to_string(repo("docs/runbooks.md")).unwrap();
    let anchors: BTreeSet<String> = runbooks
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(|heading| heading.trim().to_lowercase().replace(' ', "-"))
        .collect();
    for alert in alerts(&spec) {
        let name = alert["alert"].as_str().unwrap();
        let of_this: Vec<&&Value> = cases.iter().filter(|c| c["alertname"] == name).collect();
        let fires = |c: &&&Value| !c["exp_alerts"].as_array().unwrap().is_empty();
        assert!(of_this.iter().any(fires), "{name}: no test where it fires");
        assert!(of_this.iter().any(|c| !fires(c)), "{name}: no test where it does not fire");
        let url = alert["annotations"]["runbook_url"].as_str().unwrap();
        let anchor = url.rsplit_once('#').unwrap().1;
        assert_eq!(anchor, name.to_lowercase(), "{url}");
        assert!(
            url.starts_with(&format!("{}/blob/main/docs/runbooks.md#", env!("CARGO_PKG_REPOSITORY"))),
            "{url}"
        );
        assert!(anchors.contains(anchor), "docs/runbooks.md has no section {name}");
        assert!(matches!(alert["labels"]["severity"].as_str(), Some("warning" | "critical")), "{name}");
    }
}

// ---------------------------------------------------------------------------------------------
// A real Prometheus scraping a demo run
// ---------------------------------------------------------------------------------------------

/// A Prometheus child process; killed when dropped.
struct Prometheus {
    child: std::process::Child,
    url: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts Prometheus on loopback, scraping every second what the demo's discovery files in
/// `targets` list, as the component's monitors scrape a cluster: the aggregator with
/// honor_labels (its ServiceMonitor's honorLabels), the sidecars with the labels its
/// PodMonitor gives them (written by the demo into the files). It also loads the
/// component's rules, so a rule Prometheus would refuse fails here too.
async fn start_prometheus(dir: &Path, targets: &Path) -> Prometheus {
    std::fs::write(dir.join("rules.yaml"), serde_json::to_string(&rule_spec()).unwrap()).unwrap();
    let config = json!({
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
        "rule_files": [dir.join("rules.yaml")],
        "scrape_configs": [
            {"job_name": "durable-scaler-aggregator", "honor_labels": true,
             "file_sd_configs": [{"files": [targets.join("aggregator.json")], "refresh_interval": "1s"}]},
            {"job_name": "durable-scaler-sidecars",
             "file_sd_configs": [{"files": [targets.join("sidecars.json")], "refresh_interval": "1s"}]},
        ],
    });
    // JSON is YAML: Prometheus reads it as its YAML configuration.
    std::fs::write(dir.join("prometheus.yml"), config.to_string()).unwrap();
    let port = free_port();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start prometheus");
    let prometheus = Prometheus { child, url: format!("http://127.0.0.1:{port}") };
    let client = reqwest::Client::new();
    for _ in 0..600 {
        if client
            .get(format!("{}/-/ready", prometheus.url))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return prometheus;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "prometheus not ready:\n{}",
        std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
    );
}

impl Prometheus {
    async fn api(&self, path: &str, params: &[(&str, String)]) -> Value {
        let url = url::Url::parse_with_params(&format!("{}{path}", self.url), params).unwrap();
        let response = reqwest::Client::new().get(url).send().await.unwrap();
        let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
        assert_eq!(body["status"], "success", "{path} {params:?}: {body}");
        body["data"].clone()
    }

    /// The values of label `name` on the series `matcher` selects within [start, end].
    async fn label_values(&self, name: &str, matcher: &str, start: f64, end: f64) -> Value {
        let params =
            [("match[]", matcher.to_owned()), ("start", format!("{start:.3}")), ("end", format!("{end:.3}"))];
        self.api(&format!("/api/v1/label/{name}/values"), &params).await
    }

    /// `query` over [start, end] at 1 s steps: the series, each as its labels and (t, value)s.
    async fn range(&self, query: &str, start: f64, end: f64) -> Series {
        let params = [
            ("query", query.to_owned()),
            ("start", format!("{start:.3}")),
            ("end", format!("{end:.3}")),
            ("step", "1".to_owned()),
        ];
        let data = self.api("/api/v1/query_range", &params).await;
        data["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|series| {
                let values = series["values"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| (v[0].as_f64().unwrap(), v[1].as_str().unwrap().parse().unwrap()))
                    .collect();
                (series["metric"].clone(), values)
            })
            .collect()
    }
}

/// One query's series over the run: each series' labels and its (time, value) points.
type Series = Vec<(Value, Vec<(f64, f64)>)>;

/// A dashboard panel's query and what it returned: (panel title, legend, series).
type PanelData = (String, String, Series);

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// The dashboard's queries with Grafana's variables filled in: (panel title, legend, query).
fn dashboard_queries(namespace: &str, task_hub: &str) -> Vec<(String, String, String)> {
    let dashboard = dashboard();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let query = target["expr"]
                .as_str()
                .unwrap()
                .replace("$namespace", namespace)
                .replace("$task_hub", task_hub)
                // Grafana's $__rate_interval: at least four scrape intervals (1 s here).
                .replace("$__rate_interval", "5s");
            assert!(!query.contains('$'), "a variable left in {query}");
            queries.push((
                panel["title"].as_str().unwrap().to_owned(),
                target["legendFormat"].as_str().unwrap().to_owned(),
                query,
            ));
        }
    }
    queries
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prometheus_scraping_a_demo_run_has_data_for_every_dashboard_query() {
    if !tools::available("prometheus", &["--version"], PROMETHEUS_PACKAGE) {
        return;
    }
    durable_scaler::telemetry::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let targets = out.join("prometheus");
    std::fs::create_dir_all(&targets).unwrap();
    let prometheus = start_prometheus(dir.path(), &targets).await;
    let azurite = Azurite::shared();
    let start = unix_now();
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_durable-scaler"))
        .args(["demo", "--duration", "60s", "--orchestrations", "16", "--out-dir"])
        .arg(&out)
        .env("AZURITE_CONNECTION_STRING", azurite.connection_string())
        .output()
        .await
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    // The last scrapes of the run are in once one more scrape interval has passed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let end = unix_now();

    // The dashboard's variables, as Grafana asks for them.
    let namespaces =
        prometheus.label_values("namespace", "durable_scaler_aggregator_desired_workers", start, end).await;
    assert_eq!(namespaces, json!(["demo"]), "the demo's namespace");
    let hubs = prometheus
        .label_values("task_hub", "durable_scaler_aggregator_desired_workers{namespace=\"demo\"}", start, end)
        .await;
    let task_hub = hubs.as_array().unwrap().first().and_then(Value::as_str).unwrap().to_owned();
    assert!(task_hub.starts_with("demohub"), "{hubs}");

    let mut panels = Vec::new();
    for (title, legend, query) in dashboard_queries("demo", &task_hub) {
        let series = prometheus.range(&query, start, end).await;
        assert!(
            series.iter().any(|(_, values)| !values.is_empty()),
            "no data for {title} / {legend}: {query}\n{}",
            std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
        );
        panels.push((title, legend, series));
    }
    let extremes = |title: &str, legend: &str| {
        let (_, _, series) = panels.iter().find(|(t, l, _)| t == title && l == legend).unwrap();
        let values = series.iter().flat_map(|(_, v)| v.iter().map(|(_, x)| *x));
        values.fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)))
    };
    // The numbers behind the panels tell the demo's story: the burst asked for several
    // workers, got at least one, was seen waiting, and the hub turned active. (Only peaks:
    // Prometheus takes up new file_sd targets within seconds, not at once, so the run's first
    // moments may be unscraped.) Coverage splits the hub's 4 partitions at every moment once
    // their count is known (both 0 before the first reading); how many sidecars cover depends
    // on how fast they read their leases, which a loaded machine slows.
    assert!(extremes("Workers: desired vs actual", "desired").1 >= 2.0, "{stdout}");
    assert!(extremes("Workers: desired vs actual", "workers").1 >= 1.0, "{stdout}");
    assert_eq!(extremes("Decisions", "active").1, 1.0, "{stdout}");
    let coverage = |legend: &str| {
        let (_, _, series) =
            panels.iter().find(|(t, l, _)| t == "Partition coverage" && l == legend).unwrap();
        series[0]
            .1
            .iter()
            .map(|(t, v)| ((t * 1000.0) as i64, *v))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let (covered, uncovered) = (coverage("covered"), coverage("uncovered"));
    let both: Vec<f64> = covered
        .iter()
        .filter_map(|(t, c)| uncovered.get(t).map(|u| c + u))
        .filter(|sum| *sum > 0.0)
        .collect();
    assert!(!both.is_empty() && both.iter().all(|sum| *sum == 4.0), "{both:?}");
    let (_, _, backlog) = panels.iter().find(|(t, _, _)| t == "Backlog").unwrap();
    let visible_peak = backlog
        .iter()
        .filter(|(labels, _)| labels.get("queue").is_some())
        .flat_map(|(_, v)| v.iter().map(|(_, x)| *x))
        .fold(0.0, f64::max);
    assert!(visible_peak > 0.0, "work was seen waiting:\n{stdout}");

    let chart_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("monitoring");
    std::fs::create_dir_all(&chart_dir).unwrap();
    let chart = chart_dir.join("dashboard.svg");
    std::fs::write(&chart, svg_chart(&panels, start, &task_hub)).unwrap();
    eprintln!("dashboard chart from Prometheus: {}", chart.display());
    drop(prometheus);
}

/// The dashboard's first four panels as one SVG, each a small line chart over the run.
fn svg_chart(panels: &[PanelData], start: f64, task_hub: &str) -> String {
    const COLOURS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];
    let titles: Vec<&str> = {
        let mut seen = Vec::new();
        for (title, _, _) in panels {
            if !seen.contains(&title.as_str()) {
                seen.push(title.as_str());
            }
        }
        seen.into_iter().take(4).collect()
    };
    let (width, height, left, top) = (760.0, 150.0, 60.0, 40.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"20\" font-size=\"14\">durable-scaler: task hub {task_hub} (Grafana dashboard panels, from a Prometheus that scraped `durable-scaler demo`)</text>\n",
        w = width + left + 180.0,
        h = top + titles.len() as f64 * (height + 40.0)
    );
    for (row, title) in titles.iter().enumerate() {
        let y0 = top + row as f64 * (height + 40.0) + 20.0;
        let lines: Vec<(String, &Vec<(f64, f64)>)> = panels
            .iter()
            .filter(|(t, _, _)| t == title)
            .flat_map(|(_, legend, series)| {
                series.iter().map(move |(labels, values)| {
                    let mut name = legend.clone();
                    for key in ["queue"] {
                        if let Some(v) = labels[key].as_str() {
                            name = name.replace(&format!("{{{{{key}}}}}"), v);
                        }
                    }
                    (name, values)
                })
            })
            .collect();
        let t_max = lines.iter().flat_map(|(_, v)| v.iter().map(|(t, _)| t - start)).fold(1.0, f64::max);
        let v_max = lines.iter().flat_map(|(_, v)| v.iter().map(|(_, x)| *x)).fold(1.0, f64::max);
        svg.push_str(&format!(
            "<text x=\"{left}\" y=\"{}\" font-size=\"12\" font-weight=\"bold\">{title}</text>\n\
             <rect x=\"{left}\" y=\"{y0}\" width=\"{width}\" height=\"{height}\" fill=\"none\" stroke=\"#999\"/>\n\
             <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{v_max:.0}</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">0</text>\n\
             <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{t_max:.0} s</text>\n",
            y0 - 4.0,
            left - 4.0,
            y0 + 10.0,
            left - 4.0,
            y0 + height,
            left + width,
            y0 + height + 14.0
        ));
        for (i, (name, values)) in lines.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let points: Vec<String> = values
                .iter()
                .map(|(t, v)| {
                    format!(
                        "{:.1},{:.1}",
                        left + (t - start) / t_max * width,
                        y0 + height - v / v_max * height
                    )
                })
                .collect();
            svg.push_str(&format!(
                "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"/>\n\
                 <text x=\"{}\" y=\"{}\" fill=\"{colour}\">{name}</text>\n",
                points.join(" "),
                left + width + 10.0,
                y0 + 14.0 + i as f64 * 14.0
            ));
        }
    }
    svg.push_str("</svg>\n");
    svg
}
