//! Prometheus counters of the Kubernetes side, one family per source, each labelled by
//! outcome (`outcome="cache_hit"` ...). The aggregator adds them to its registry with each
//! source's `register`, so they are named `durable_scaler_aggregator_...` like its own.

use std::marker::PhantomData;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::metrics::LabelValue;

/// Spells each variant of an outcome enum as its label value (see [`crate::metrics`]).
pub(crate) use crate::metrics::label_values as outcome_labels;

/// A counter family labelled by the outcomes of one enum `O`, each spelled as its label value.
#[derive(Debug)]
pub(crate) struct OutcomeCounter<O> {
    family: Family<[(&'static str, &'static str); 1], Counter>,
    outcome: PhantomData<fn(O)>,
}

impl<O> Default for OutcomeCounter<O> {
    fn default() -> Self {
        Self { family: Family::default(), outcome: PhantomData }
    }
}

impl<O: LabelValue> OutcomeCounter<O> {
    /// Counts one `outcome`.
    pub(crate) fn inc(&self, outcome: O) {
        self.family.get_or_create(&[("outcome", outcome.label())]).inc();
    }

    /// Registers the family under `name` (prometheus-client appends `_total`).
    pub(crate) fn register(&self, registry: &mut Registry, name: &str, help: &str) {
        registry.register(name, help, self.family.clone());
    }
}
