//! Plays KEDA and the HPA against a real `externalscaler.ExternalScaler` endpoint.
//!
//! Each poll makes the three calls KEDA makes (GetMetricSpec, GetMetrics, IsActive) over
//! gRPC, then applies the arithmetic in [`crate::heuristic::hpa`]: the HPA's proposal,
//! scale-up limit and scale-down stabilization, and KEDA's own 0 <-> 1 with its cooldown. For
//! `external-push` a background task holds StreamIsActive open and wakes a target at zero at
//! once, as KEDA does.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tonic::transport::{Channel, Endpoint};

use crate::{
    clock::UnixMs,
    heuristic::hpa::{self, MetricTargetType, ReplicaBounds, ScaleDownStabilizer},
    proto::externalscaler::{
        GetMetricsRequest, ScaledObjectRef, external_scaler_client::ExternalScalerClient,
    },
    shutdown::Shutdown,
};

/// How the played KEDA and HPA behave. The demo shortens the real defaults (30 s polling,
/// 300 s cooldown, 300 s stabilization) so that a run fits in minutes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KedaSettings {
    /// ScaledObject `cooldownPeriod`.
    pub(crate) cooldown: Duration,
    /// HPA scale-down stabilization window.
    pub(crate) stabilization: Duration,
    /// `minReplicaCount` / `maxReplicaCount`.
    pub(crate) bounds: ReplicaBounds,
    /// Trigger type `external-push`: hold StreamIsActive open.
    pub(crate) push: bool,
}

/// What one poll saw and decided.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct KedaPoll {
    /// IsActive's answer.
    pub(crate) active: bool,
    /// GetMetrics' value (the aggregator's desired worker count).
    pub(crate) metric: f64,
    /// GetMetricSpec's target.
    pub(crate) target: f64,
    /// The replica count KEDA and the HPA set.
    pub(crate) replicas: u32,
}

/// Why a poll failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KedaError {
    /// The endpoint could not be reached.
    #[error("cannot connect to the external scaler at {endpoint}: {source}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// The transport error.
        source: tonic::transport::Error,
    },
    /// A call failed; KEDA keeps the previous state.
    #[error("{call} failed: {status}")]
    Call {
        /// Which RPC.
        call: &'static str,
        /// The gRPC status.
        status: tonic::Status,
    },
    /// GetMetricSpec or GetMetrics did not return exactly one metric.
    #[error("{0} returned no metric")]
    NoMetric(&'static str),
}

/// KEDA and the HPA for one ScaledObject.
pub(crate) struct KedaPlayer {
    client: ExternalScalerClient<Channel>,
    scaled_object: ScaledObjectRef,
    settings: KedaSettings,
    stabilizer: ScaleDownStabilizer,
    last_active: Option<UnixMs>,
    pushed: Arc<AtomicBool>,
}

impl KedaPlayer {
    /// Connects to `endpoint` (e.g. `http://127.0.0.1:4370`) for a ScaledObject whose trigger
    /// metadata is `metadata`.
    pub(crate) async fn connect(
        endpoint: &str,
        name: &str,
        namespace: &str,
        metadata: HashMap<String, String>,
        settings: KedaSettings,
        shutdown: Shutdown,
    ) -> Result<Self, KedaError> {
        let channel = Endpoint::from_shared(endpoint.to_string())
            .map(|e| e.connect_timeout(Duration::from_secs(5)))
            .map_err(|source| KedaError::Connect { endpoint: endpoint.into(), source })?
            .connect()
            .await
            .map_err(|source| KedaError::Connect { endpoint: endpoint.into(), source })?;
        let client = ExternalScalerClient::new(channel);
        let scaled_object =
            ScaledObjectRef { name: name.into(), namespace: namespace.into(), scaler_metadata: metadata };
        let pushed = Arc::new(AtomicBool::new(false));
        if settings.push {
            tokio::spawn(hold_stream(client.clone(), scaled_object.clone(), pushed.clone(), shutdown));
        }
        Ok(Self {
            client,
            scaled_object,
            stabilizer: ScaleDownStabilizer::new(settings.stabilization),
            settings,
            last_active: None,
            pushed,
        })
    }

    /// True once since the last call when StreamIsActive pushed `true`: KEDA then scales a
    /// target at zero to max(min, 1) at once, without waiting for the next poll.
    pub(crate) fn take_push(&self) -> bool {
        self.pushed.swap(false, Ordering::SeqCst)
    }

    /// Records a pushed activation at `now` (it postpones the cooldown) and returns the
    /// replica count KEDA sets for a target at `current`.
    pub(crate) fn on_push(&mut self, now: UnixMs, current: u32) -> u32 {
        self.last_active = Some(now);
        hpa::keda_replicas(current, true, false, current, self.settings.bounds)
    }

    /// One polling cycle at `now` for a target running `current` replicas.
    pub(crate) async fn poll(&mut self, now: UnixMs, current: u32) -> Result<KedaPoll, KedaError> {
        let spec = self
            .client
            .get_metric_spec(self.scaled_object.clone())
            .await
            .map_err(|status| KedaError::Call { call: "GetMetricSpec", status })?
            .into_inner();
        let spec = spec.metric_specs.first().ok_or(KedaError::NoMetric("GetMetricSpec"))?;
        #[allow(deprecated)]
        let target = hpa::effective_target(spec.target_size, spec.target_size_float);
        let request = GetMetricsRequest {
            scaled_object_ref: Some(self.scaled_object.clone()),
            metric_name: spec.metric_name.clone(),
        };
        let metrics = self
            .client
            .get_metrics(request)
            .await
            .map_err(|status| KedaError::Call { call: "GetMetrics", status })?
            .into_inner();
        let value = metrics.metric_values.first().ok_or(KedaError::NoMetric("GetMetrics"))?;
        #[allow(deprecated)]
        let metric = hpa::effective_value(value.metric_value, value.metric_value_float);
        let active = self
            .client
            .is_active(self.scaled_object.clone())
            .await
            .map_err(|status| KedaError::Call { call: "IsActive", status })?
            .into_inner()
            .result;

        if active {
            self.last_active = Some(now);
        }
        let cooldown_elapsed = self.last_active.is_none_or(|t| now.since(t) >= self.settings.cooldown);
        let hpa_replicas = hpa::hpa_sync(
            current,
            metric,
            target,
            MetricTargetType::AverageValue,
            self.settings.bounds,
            &mut self.stabilizer,
            now,
        );
        let replicas =
            hpa::keda_replicas(current, active, cooldown_elapsed, hpa_replicas, self.settings.bounds);
        Ok(KedaPoll { active, metric, target, replicas })
    }
}

/// Holds StreamIsActive open as KEDA does for `external-push`, reconnecting with backoff
/// (2 s doubling to 1 min), and flags every `true` it receives.
async fn hold_stream(
    mut client: ExternalScalerClient<Channel>,
    scaled_object: ScaledObjectRef,
    pushed: Arc<AtomicBool>,
    shutdown: Shutdown,
) {
    let mut backoff = Duration::from_secs(2);
    while !shutdown.is_triggered() {
        if let Ok(response) = client.stream_is_active(scaled_object.clone()).await {
            backoff = Duration::from_secs(2);
            let mut stream = response.into_inner();
            loop {
                tokio::select! {
                    message = stream.message() => match message {
                        Ok(Some(m)) if m.result => pushed.store(true, Ordering::SeqCst),
                        Ok(Some(_)) => {}
                        _ => break,
                    },
                    _ = shutdown.wait() => return,
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.wait() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
}
