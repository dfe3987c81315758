//! What every role's Prometheus metrics share: label values spelled by enums, and the
//! OpenMetrics text every `/metrics` endpoint serves.
//!
//! Naming: `durable_scaler_<role>_<thing>[_<unit>]`, counters ending in `_total` (which
//! prometheus-client appends), the role being the process that serves the series
//! (`aggregator`, `sidecar`, `webhook`); docs/metrics.md lists them all.

use prometheus_client::registry::Registry;

/// The Content-Type of [`encode`]'s output.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The OpenMetrics text exposition of `registry`.
pub(crate) fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    text
}

/// An enum whose values are metric label values (implemented by [`label_values!`]).
pub(crate) trait LabelValue: Copy {
    /// This value as a metric label.
    fn label(self) -> &'static str;
}

/// Spells each variant of a field-less enum as a metric label value: gives it
/// `label(self) -> &'static str` ([`LabelValue`], and the same as an inherent method) and
/// prometheus-client's `EncodeLabelValue`, so the enum itself goes into a label set and no
/// label is ever built from a string at the call site.
macro_rules! label_values {
    ($enum:ty { $($variant:ident => $label:literal),+ $(,)? }) => {
        impl $enum {
            /// This value as a metric label.
            pub(crate) const fn label(self) -> &'static str {
                match self {
                    $(<$enum>::$variant => $label,)+
                }
            }
        }

        impl $crate::metrics::LabelValue for $enum {
            fn label(self) -> &'static str {
                <$enum>::label(self)
            }
        }

        impl prometheus_client::encoding::EncodeLabelValue for $enum {
            fn encode(
                &self,
                encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
            ) -> Result<(), std::fmt::Error> {
                std::fmt::Write::write_str(encoder, self.label())
            }
        }
    };
}
pub(crate) use label_values;

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::EncodeLabelSet;
    use prometheus_client::metrics::{counter::Counter, family::Family};

    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    enum Colour {
        DarkRed,
        Blue,
    }
    label_values!(Colour { DarkRed => "dark_red", Blue => "blue" });

    #[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
    struct Labels {
        colour: Colour,
    }

    #[test]
    fn an_enum_label_is_encoded_as_its_spelling() {
        let mut registry = Registry::with_prefix("durable_scaler_test");
        let family = Family::<Labels, Counter>::default();
        registry.register("paints", "Paints", family.clone());
        family.get_or_create(&Labels { colour: Colour::DarkRed }).inc();
        assert_eq!(Colour::Blue.label(), "blue");
        let text = encode(&registry);
        assert!(text.contains("durable_scaler_test_paints_total{colour=\"dark_red\"} 1\n"), "{text}");
    }

    /// The series names `text` (OpenMetrics) declares: a counter's `_total`, a histogram's
    /// `_bucket`, `_sum` and `_count`, a gauge's own name.
    fn declared_series(text: &str) -> Vec<String> {
        text.lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .flat_map(|declaration| {
                let (name, kind) = declaration.split_once(' ').unwrap_or((declaration, ""));
                let suffixes: &[&str] = match kind {
                    "counter" => &["_total"],
                    "histogram" => &["_bucket", "_sum", "_count"],
                    _ => &[""],
                };
                suffixes.iter().map(move |s| format!("{name}{s}"))
            })
            .collect()
    }

    /// The aggregator's exposition with a series in every family (a family with none is not
    /// declared at all): one hub probed, reported and decided on, a refused report, a TLS port.
    fn every_aggregator_series() -> String {
        use crate::aggregator::{hub, metrics, registry};
        let metrics = std::sync::Arc::new(metrics::Metrics::new());
        let registry = registry::Registry::new(metrics.clone(), 60_000);
        let key = hub::HubKey::new("apps", "Hub");
        let entry = registry.track(&key, "Hub", None).unwrap();
        let now = crate::clock::UnixMs::now();
        let signals = crate::reading::QueueReading {
            approximate_count: 1,
            visible_count: 1,
            first_visible_age_ms: 10,
            redelivered_count: 0,
            sampled_at: now,
        };
        let reading = crate::reading::HubReading {
            partition_count: 1,
            control: vec![(0, signals)],
            work_item: Some(signals),
        };
        registry.apply_probe(&entry, Some(&reading), now);
        let report = hub::ValidReport {
            pod: "app-1".into(),
            reading,
            interval_ms: 1000,
            leaving: false,
            sampled_at_unix_ms: now.as_millis(),
            limits: None,
            queue_settings: None,
            sidecar: hub::SidecarNotes::default(),
        };
        registry.apply_report(&entry, &report, now).unwrap();
        registry.evaluate(&entry, Some(1), now);
        metrics.count_probe(&key, metrics::ProbeOutcome::Ok);
        metrics.count_rejection(metrics::RejectionReason::Unauthenticated);
        metrics.certificate_reloads(metrics::Port::Keda);
        metrics.encode()
    }

    #[test]
    fn every_metric_the_monitoring_component_queries_is_one_a_role_exports() {
        let mut exported = declared_series(&every_aggregator_series());
        let sidecar = crate::sidecar::metrics::Metrics::new();
        let kinds = [crate::storage::StorageErrorKind::Authentication];
        sidecar.record_poll(std::time::Duration::from_millis(5), 1, &kinds, 3);
        sidecar.count_drain("failed");
        exported.extend(declared_series(&sidecar.encode()));
        let webhook = crate::webhook::metrics::Metrics::new();
        webhook.certificate_reload_counters();
        exported.extend(declared_series(&webhook.encode()));
        let component =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/components/monitoring");
        let rules = std::fs::read_to_string(component.join("prometheus-rule.yaml")).unwrap();
        let dashboard =
            std::fs::read_to_string(component.join("dashboards/durable-scaler-hub.json")).unwrap();
        let mut queried = Vec::new();
        for text in [&rules, &dashboard] {
            let mut rest = text.as_str();
            while let Some(at) = rest.find("durable_scaler_") {
                let name: String =
                    rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                rest = &rest[at + name.len()..];
                queried.push(name);
            }
        }
        assert!(queried.len() > 20, "{queried:?}");
        for name in &queried {
            assert!(
                exported.contains(name),
                "{name} is queried but no role exports it; exported: {exported:?}"
            );
        }
    }
}
