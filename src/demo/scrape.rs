//! Where a Prometheus finds the demo's processes: file-based service discovery files
//! (Prometheus' `file_sd_configs`, JSON) in `--out-dir/prometheus/`, rewritten whenever a
//! worker pod starts or stops. `aggregator.json` holds the aggregator's HTTP port,
//! `sidecars.json` one target per running sidecar, labelled as the monitoring component's
//! PodMonitor labels sidecars in a cluster (`namespace`, `pod`, `container`, `task_hub`), so
//! the component's dashboard and alert queries run unchanged against a demo run
//! (docs/monitoring.md; tests/it/monitoring.rs scrapes one).

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::contract::SIDECAR_CONTAINER;

/// The discovery files of one demo run.
pub(crate) struct ScrapeTargets {
    dir: PathBuf,
    namespace: String,
    task_hub: String,
}

impl ScrapeTargets {
    /// Writes `aggregator.json` for the aggregator's HTTP port and an empty `sidecars.json`.
    pub(crate) fn new(
        out_dir: &Path,
        aggregator_http: u16,
        namespace: &str,
        task_hub: &str,
    ) -> std::io::Result<Self> {
        let dir = out_dir.join("prometheus");
        std::fs::create_dir_all(&dir)?;
        let this = Self { dir, namespace: namespace.to_owned(), task_hub: task_hub.to_lowercase() };
        let aggregator = json!([{
            "targets": [format!("127.0.0.1:{aggregator_http}")],
            "labels": {"pod": "durable-scaler-aggregator-0", "container": "aggregator"},
        }]);
        this.write("aggregator.json", &aggregator)?;
        this.sidecars(&[])?;
        Ok(this)
    }

    /// Rewrites `sidecars.json` with `sidecars`: (pod name, metrics port) of each running one.
    pub(crate) fn sidecars(&self, sidecars: &[(String, u16)]) -> std::io::Result<()> {
        let groups: Vec<Value> = sidecars
            .iter()
            .map(|(pod, port)| {
                json!({
                    "targets": [format!("127.0.0.1:{port}")],
                    "labels": {
                        "namespace": self.namespace,
                        "pod": pod,
                        "container": SIDECAR_CONTAINER,
                        "task_hub": self.task_hub,
                    },
                })
            })
            .collect();
        self.write("sidecars.json", &Value::Array(groups))
    }

    /// Replaces `name` at once (write aside, rename over): Prometheus watches the directory
    /// and must never read half a file.
    fn write(&self, name: &str, value: &Value) -> std::io::Result<()> {
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, value.to_string())?;
        std::fs::rename(tmp, self.dir.join(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_files_list_the_aggregator_and_each_running_sidecar_with_cluster_labels() {
        let out = tempfile::tempdir().unwrap();
        let targets = ScrapeTargets::new(out.path(), 8080, "demo", "DemoHub").unwrap();
        let read = |name: &str| -> Value {
            serde_json::from_str(&std::fs::read_to_string(out.path().join("prometheus").join(name)).unwrap())
                .unwrap()
        };
        assert_eq!(read("aggregator.json")[0]["targets"], json!(["127.0.0.1:8080"]));
        assert_eq!(read("sidecars.json"), json!([]));
        targets.sidecars(&[("demo-worker-1".into(), 9101), ("demo-worker-2".into(), 9102)]).unwrap();
        let sidecars = read("sidecars.json");
        assert_eq!(sidecars[1]["targets"], json!(["127.0.0.1:9102"]));
        assert_eq!(
            sidecars[1]["labels"],
            json!({"namespace": "demo", "pod": "demo-worker-2", "container": SIDECAR_CONTAINER, "task_hub": "demohub"})
        );
        targets.sidecars(&[]).unwrap();
        assert_eq!(read("sidecars.json"), json!([]));
    }
}
