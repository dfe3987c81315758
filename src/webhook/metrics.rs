//! The webhook's Prometheus metrics, served on `/metrics` (prometheus-client, as in every
//! other role).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::inject::SkipReason;
use crate::tls::{ReloadCounters, ReloadOutcome};

/// Labels of the certificate reloads.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReloadLabels {
    /// Taken into use or refused.
    pub outcome: ReloadOutcome,
}

/// Labels of the skipped injections.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SkipLabels {
    /// Why the opted-in pod got no sidecar.
    pub reason: SkipReason,
}

/// Everything the webhook counts. Dry-run reviews count in `reviews` only.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Reviews answered with 200 (allowed), including dry runs.
    pub reviews: Counter,
    /// Sidecars injected (dry runs excluded: they create no pod).
    pub injections: Counter,
    /// Requests refused (400, 413, 415).
    pub refused: Counter,
    /// Changed certificate files taken into use or refused.
    pub(crate) certificate_reloads: Family<ReloadLabels, Counter>,
    /// When the served certificate expires (notAfter, Unix seconds).
    pub(crate) certificate_expiry: Gauge,
    /// Opted-in pods admitted without a sidecar, by reason (dry runs excluded).
    pub skipped: Family<SkipLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set, registered under the `durable_scaler_webhook` prefix.
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("durable_scaler_webhook");
        let (reviews, injections, refused) = (Counter::default(), Counter::default(), Counter::default());
        let certificate_reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "reviews",
            "AdmissionReviews answered with 200, dry runs included",
            reviews.clone(),
        );
        registry.register("injections", "Sidecars injected (dry runs excluded)", injections.clone());
        registry.register("refused", "Requests refused (400, 413, 415)", refused.clone());
        registry.register(
            "certificate_reloads",
            "Changed certificate files taken into use (reloaded) or refused (the previous ones kept)",
            certificate_reloads.clone(),
        );
        let certificate_expiry = Gauge::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When the certificate served now expires (notAfter, Unix seconds)",
            certificate_expiry.clone(),
        );
        let skipped = Family::<SkipLabels, Counter>::default();
        registry.register(
            "skipped",
            "Opted-in pods admitted without a sidecar, by reason (dry runs excluded)",
            skipped.clone(),
        );
        Self { registry, reviews, injections, refused, certificate_reloads, certificate_expiry, skipped }
    }

    /// The metrics the serving certificate's reloads and expiry go to.
    pub(crate) fn certificate_reload_counters(&self) -> ReloadCounters {
        let counter = |outcome| self.certificate_reloads.get_or_create_owned(&ReloadLabels { outcome });
        ReloadCounters {
            reloaded: counter(ReloadOutcome::Reloaded),
            refused: counter(ReloadOutcome::Refused),
            expires_at: self.certificate_expiry.clone(),
        }
    }

    /// Counts one skipped injection.
    pub fn skip(&self, reason: SkipReason) {
        self.skipped.get_or_create(&SkipLabels { reason }).inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        crate::metrics::encode(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_named_under_the_webhook_prefix() {
        let metrics = Metrics::new();
        metrics.injections.inc();
        metrics.certificate_reload_counters().refused.inc();
        metrics.certificate_reload_counters().expires_at.set(1_900_000_000);
        metrics.skip(SkipReason::HostNetwork);
        let text = metrics.encode();
        for line in [
            "durable_scaler_webhook_reviews_total 0\n",
            "durable_scaler_webhook_injections_total 1\n",
            "durable_scaler_webhook_refused_total 0\n",
            "durable_scaler_webhook_certificate_reloads_total{outcome=\"refused\"} 1\n",
            "durable_scaler_webhook_certificate_reloads_total{outcome=\"reloaded\"} 0\n",
            "durable_scaler_webhook_certificate_expiry_timestamp_seconds 1900000000\n",
            "durable_scaler_webhook_skipped_total{reason=\"host_network\"} 1\n",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}
