//! The KEDA port: `externalscaler.ExternalScaler`, answered from memory (keda-contract.md).
//!
//! The first call about a hub never seen starts tracking it (and its cold probe) and waits at
//! most [`FIRST_PROBE_WAIT`] until every queue of the hub was read, by reports or the probe;
//! until then IsActive and GetMetrics fail with UNAVAILABLE and the reason, never `false` or
//! 0, so KEDA keeps its previous state rather than act on a guess. This is what makes a
//! restarted replica, storage out of reach or a hub read only in part safe (kedacore/keda
//! `pkg/scaling/executor/scale_scaledobjects.go` `RequestScale`: a trigger error with
//! `isActive=false` and no fallback leaves the replicas as they are; HPA path:
//! `pkg/metricsservice` returns the error and the HPA holds). Not safe with a ScaledObject
//! `fallback.replicas: 0`, which turns errors into scale-to-zero (docs/high-availability.md).
//!
//! The same answer for a hub read before whose queues nobody reads any more (its sidecars
//! cannot reach storage, so they report no queues, and the cold probe failed too): its last
//! picture is not answered from, because it decays without readings (invisible work in
//! progress counts as sleeping timers once the grace period passes) and could say idle about a
//! hub with work (`HubEntry::stale_reason`).
//!
//! GetMetricSpec answers from the trigger's metadata alone, so it never fails for want of
//! signals: KEDA consults no fallback for it and an empty spec keeps the HPA from being built
//! (`pkg/scaling/cache/scalers_cache.go`, `controllers/keda/hpa.go`).
//!
//! StreamIsActive opens at once, even before the hub was read, and sends its first message
//! once it was; on shutdown, and when its connection is asked to go (`crate::listener`:
//! idle, age, too many streams reset by the client), every stream ends with status OK, because KEDA's push loop
//! (`pkg/scalers/external_scaler.go` `runStreamIsActive`) resets its reconnect back-off to 2 s
//! only when a stream ends cleanly, and otherwise keeps doubling it up to a minute.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::clock::UnixMs;
use crate::contract::limits::METRIC_NAME_MAX_LEN;
use crate::contract::{NameRule, check_len, check_name};
use crate::listener::Draining;
use crate::proto::externalscaler::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec, MetricValue,
    ScaledObjectRef, external_scaler_server::ExternalScaler,
};
use crate::shutdown::Shutdown;

use super::hub::{Answer, HubKey, Unanswerable};
use super::metrics::{KedaCall, KedaCallLabels};
use super::probe::Prober;
use super::registry::{HubEntry, Registry};
use super::settings::{EndpointRule, HubSettings};
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
    /// Which storage endpoints trigger metadata may name.
    endpoints: EndpointRule,
    shutdown: Shutdown,
}

impl KedaScaler {
    /// Answers from `registry`; `prober` starts cold probes for newly tracked hubs; trigger
    /// connections may name the storage endpoints `endpoints` allows.
    pub(crate) fn new(
        registry: Arc<Registry>,
        prober: Prober,
        endpoints: EndpointRule,
        shutdown: Shutdown,
    ) -> Self {
        Self { registry, prober, endpoints, shutdown }
    }

    fn parse(&self, scaled_object: &ScaledObjectRef) -> Result<(HubKey, HubSettings), Status> {
        // The names as Kubernetes allows them, before they become a key, a label or a log
        // field; errors quote a short prefix only.
        check_name("scaledObjectRef.namespace", &scaled_object.namespace, NameRule::Label)
            .map_err(Status::invalid_argument)?;
        check_name("scaledObjectRef.name", &scaled_object.name, NameRule::Subdomain)
            .map_err(Status::invalid_argument)?;
        let settings = HubSettings::from_metadata_with(&scaled_object.scaler_metadata, self.endpoints)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok((HubKey::new(&scaled_object.namespace, &settings.task_hub), settings))
    }

    /// Tracks the hub of `scaled_object` and takes the call's settings and ScaledObject under
    /// the hub's one lock, starting its cold probe the first time; returns the entry and the
    /// answer as of now, from the same lock.
    fn call(
        &self,
        scaled_object: &ScaledObjectRef,
    ) -> Result<(Arc<HubEntry>, Result<Answer, Unanswerable>), Status> {
        let (key, settings) = self.parse(scaled_object)?;
        self.call_parsed(scaled_object, &key, &settings)
    }

    /// [`Self::call`] with the metadata already parsed into `key` and `settings`.
    fn call_parsed(
        &self,
        scaled_object: &ScaledObjectRef,
        key: &HubKey,
        settings: &HubSettings,
    ) -> Result<(Arc<HubEntry>, Result<Answer, Unanswerable>), Status> {
        let entry = self
            .registry
            .track(key, &settings.task_hub, Some(settings))
            .map_err(|full| Status::resource_exhausted(full.to_string()))?;
        let asker =
            ScaledObjectKey { namespace: scaled_object.namespace.clone(), name: scaled_object.name.clone() };
        let now = UnixMs::now();
        let (start_probe, answer) =
            entry.with_state(|s| (s.keda_call(settings, asker), s.answer(&entry.key, now)));
        if start_probe {
            self.prober.spawn(entry.clone());
        }
        Ok((entry, answer))
    }

    /// The answer once it can be given: a hub not wholly read yet is waited for up to
    /// [`FIRST_PROBE_WAIT`]; one still unread then, or one nobody can read any more, is
    /// UNAVAILABLE with the reason (module docs).
    async fn settled(&self, entry: &HubEntry, first: Result<Answer, Unanswerable>) -> Result<Answer, Status> {
        let unavailable = |u: Unanswerable| match u {
            Unanswerable::NotRead(reason) | Unanswerable::Stale(reason) => Status::unavailable(reason),
        };
        match first {
            Ok(answer) => Ok(answer),
            Err(Unanswerable::NotRead(_)) => {
                entry.wait_answerable(FIRST_PROBE_WAIT).await;
                entry.answer(UnixMs::now()).map_err(unavailable)
            }
            Err(stale) => Err(unavailable(stale)),
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
        let started = Instant::now();
        let answer = async {
            let (entry, first) = self.call(request.get_ref())?;
            let answer = self.settled(&entry, first).await?;
            Ok(Response::new(IsActiveResponse { result: answer.active }))
        }
        .await;
        self.timed(KedaCall::IsActive, started);
        answer
    }

    type StreamIsActiveStream = ActivityStream;

    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamIsActiveStream>, Status> {
        // Only the metadata is checked before the stream opens: a hub not read yet gets its
        // first message once it is (module docs), not an error that grows KEDA's back-off.
        let (entry, _) = self.call(request.get_ref())?;
        let mut activity = entry.subscribe_activity();
        let (tx, rx) = mpsc::channel(4);
        let shutdown = self.shutdown.clone();
        // The connection asked to go (idle, age, shutdown: `crate::listener`): end the stream
        // cleanly before it is closed, so KEDA reconnects at once.
        let draining = request.extensions().get::<Draining>().cloned();
        let connection_closing = async move {
            match draining {
                Some(draining) => draining.wait().await,
                None => std::future::pending().await,
            }
        };
        tokio::spawn(async move {
            tokio::pin!(connection_closing);
            // Returning drops `tx`: the stream ends with status OK.
            loop {
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = &mut connection_closing => return,
                    _ = tx.closed() => return,
                    read = entry.wait_answerable(FIRST_PROBE_WAIT) => if read { break },
                }
            }
            let current = entry.with_state(|s| s.is_active(UnixMs::now()));
            let mut seen = activity.borrow_and_update().activations;
            if tx.send(Ok(IsActiveResponse { result: current })).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = &mut connection_closing => return,
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
        let (entry, _) = self.call(request.get_ref())?;
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
        let started = Instant::now();
        let answer = self.metrics_of(request.get_ref()).await;
        self.timed(KedaCall::GetMetrics, started);
        answer
    }
}

impl KedaScaler {
    /// Records how long a call took, whatever its answer.
    fn timed(&self, call: KedaCall, started: Instant) {
        let labels = KedaCallLabels { method: call };
        self.registry
            .metrics
            .keda_call_durations
            .0
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
    }

    /// GetMetrics' answer.
    async fn metrics_of(&self, request: &GetMetricsRequest) -> Result<Response<GetMetricsResponse>, Status> {
        let scaled_object = request
            .scaled_object_ref
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("scaledObjectRef is required"))?;
        // A wrong metric name is refused before any waiting.
        let (key, settings) = self.parse(scaled_object)?;
        check_len("metricName", &request.metric_name, METRIC_NAME_MAX_LEN)
            .map_err(Status::invalid_argument)?;
        let expected = metric_name(&key.task_hub);
        if !request.metric_name.eq_ignore_ascii_case(&expected) {
            return Err(Status::invalid_argument(format!(
                "metricName {} is not this trigger's metric (expected {expected})",
                crate::contract::quote(&request.metric_name)
            )));
        }
        let (entry, first) = self.call_parsed(scaled_object, &key, &settings)?;
        let value = self.settled(&entry, first).await?.metric_value;
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
