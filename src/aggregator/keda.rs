//! The KEDA port: `externalscaler.ExternalScaler`, answered from memory (keda-contract.md).
//!
//! The first call about a hub never seen starts tracking it (and its cold probe) and waits at
//! most [`FIRST_PROBE_WAIT`] for a first report or probe; without one the call fails with
//! UNAVAILABLE and the reason, so KEDA keeps its previous state rather than act on a guess.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::clock::UnixMs;
use crate::proto::externalscaler::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec, MetricValue,
    ScaledObjectRef, external_scaler_server::ExternalScaler,
};
use crate::shutdown::Shutdown;

use super::hub::HubKey;
use super::probe::Prober;
use super::registry::{HubEntry, Registry};
use super::settings::HubSettings;
use super::sources::ScaledObjectKey;

/// How long the first call about a hub waits for its first signals.
pub(crate) const FIRST_PROBE_WAIT: Duration = Duration::from_secs(1);

/// The metric name of a task hub: `durabletask-{hub lowercased}`.
pub(crate) fn metric_name(task_hub: &str) -> String {
    format!("durabletask-{}", task_hub.to_ascii_lowercase())
}

/// The ExternalScaler service.
#[derive(Debug, Clone)]
pub(crate) struct KedaScaler {
    registry: Arc<Registry>,
    prober: Prober,
    shutdown: Shutdown,
}

impl KedaScaler {
    /// Answers from `registry`; `prober` starts cold probes for newly tracked hubs.
    pub(crate) fn new(registry: Arc<Registry>, prober: Prober, shutdown: Shutdown) -> Self {
        Self { registry, prober, shutdown }
    }

    fn parse(scaled_object: &ScaledObjectRef) -> Result<(HubKey, HubSettings), Status> {
        let settings = HubSettings::from_metadata(&scaled_object.scaler_metadata)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok((HubKey::new(&scaled_object.namespace, &settings.task_hub), settings))
    }

    /// Tracks the hub of `scaled_object` (starting its probe) without waiting.
    fn track(&self, scaled_object: &ScaledObjectRef) -> Result<Arc<HubEntry>, Status> {
        let (key, settings) = Self::parse(scaled_object)?;
        let entry = self.registry.track(&key, &settings.task_hub, Some(&settings));
        entry.set_scaled_object(ScaledObjectKey {
            namespace: scaled_object.namespace.clone(),
            name: scaled_object.name.clone(),
        });
        if entry.claim_probe_task() {
            self.prober.spawn(entry.clone());
        }
        Ok(entry)
    }

    /// Tracks the hub and waits for its first signals.
    async fn observed(&self, scaled_object: Option<&ScaledObjectRef>) -> Result<Arc<HubEntry>, Status> {
        let scaled_object =
            scaled_object.ok_or_else(|| Status::invalid_argument("scaledObjectRef is required"))?;
        let entry = self.track(scaled_object)?;
        if entry.with_state(|s| s.is_observed()) {
            return Ok(entry);
        }
        if entry.wait_observed(FIRST_PROBE_WAIT).await {
            Ok(entry)
        } else {
            Err(Status::unavailable(entry.unavailable_reason()))
        }
    }
}

type ActivityStream = Pin<Box<dyn Stream<Item = Result<IsActiveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalScaler for KedaScaler {
    async fn is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<IsActiveResponse>, Status> {
        let entry = self.observed(Some(request.get_ref())).await?;
        let result = entry.with_state(|s| s.is_active(UnixMs::now()));
        Ok(Response::new(IsActiveResponse { result }))
    }

    type StreamIsActiveStream = ActivityStream;

    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamIsActiveStream>, Status> {
        let entry = self.observed(Some(request.get_ref())).await?;
        let mut activity = entry.subscribe_activity();
        let current = entry.with_state(|s| s.is_active(UnixMs::now()));
        let mut seen = activity.borrow_and_update().activations;
        let (tx, rx) = mpsc::channel(4);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            if tx.send(Ok(IsActiveResponse { result: current })).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = tx.closed() => return,
                    changed = activity.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let now = *activity.borrow_and_update();
                        // Only inactive -> active transitions are sent; KEDA ignores false.
                        if now.activations > seen {
                            seen = now.activations;
                            if tx.send(Ok(IsActiveResponse { result: true })).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let entry = self.track(request.get_ref())?;
        let name = metric_name(&entry.key.task_hub);
        // The deprecated integer field is still read by KEDA when the float one is 0.
        #[allow(deprecated)]
        Ok(Response::new(GetMetricSpecResponse {
            metric_specs: vec![MetricSpec { metric_name: name, target_size: 1, target_size_float: 1.0 }],
        }))
    }

    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let request = request.get_ref();
        let scaled_object = request
            .scaled_object_ref
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("scaledObjectRef is required"))?;
        // A wrong metric name is refused before any waiting.
        let (key, _) = Self::parse(scaled_object)?;
        let expected = metric_name(&key.task_hub);
        if !request.metric_name.eq_ignore_ascii_case(&expected) {
            return Err(Status::invalid_argument(format!(
                "metricName {:?} is not this trigger's metric (expected {expected})",
                request.metric_name
            )));
        }
        let entry = self.observed(Some(scaled_object)).await?;
        let value = entry.with_state(|s| s.metric_value());
        // The deprecated integer field is still read by KEDA when the float one is 0.
        #[allow(deprecated)]
        Ok(Response::new(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name: request.metric_name.clone(),
                metric_value: value.ceil() as i64,
                metric_value_float: value,
            }],
        }))
    }
}
