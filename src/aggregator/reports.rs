//! The report port: `durablescaler.report.v1.ReportService`, where sidecars submit what they
//! read. Each report is authenticated (unless `--report-auth none`), validated, and merged
//! into its hub; a refused report gets a status that says why and is counted.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::clock::UnixMs;
use crate::contract::limits::REPORT_TEXT_MAX_LEN;
use crate::contract::{
    MAX_PARTITIONS, NameRule, SIDECAR_DEFAULT_INTERVAL, SIDECAR_INTERVAL_RANGE as INTERVAL_RANGE, TaskHub,
    check_len, check_name,
};
use crate::proto::report::{self, report_service_server::ReportService};
use crate::reading::{HubReading, QueueReading};

use super::hub::{HubKey, SidecarNotes, ValidReport};
use super::metrics::RejectionReason as Reason;
use super::registry::Registry;
use super::settings::{ReportedLimits, ReportedQueueSettings, WorkerLimits};
use super::sources::{AuthError, ReportAuthenticator};

/// How far in the future a report's timestamps may be (clock skew between nodes).
pub(crate) const MAX_CLOCK_SKEW_MS: i64 = 5_000;

/// How the report service checks who sent a report.
#[derive(Clone)]
pub enum ReportCheck {
    /// Accept every report (`--report-auth none`): anyone who reaches the report port can
    /// steer the scaling. A warning is logged at start.
    AcceptAny,
    /// Check the bearer token with this authenticator (the Kubernetes TokenReview one, in
    /// production) and require it to name the reporting pod.
    Token(Arc<dyn ReportAuthenticator>),
}

impl std::fmt::Debug for ReportCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::AcceptAny => "AcceptAny",
            Self::Token(_) => "Token",
        })
    }
}

/// Why a report was refused: a metric label and a message for the sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rejection {
    /// Why (the metric label).
    pub reason: Reason,
    /// What is wrong, naming the field.
    pub message: String,
}

impl Rejection {
    fn new(reason: Reason, message: String) -> Self {
        Self { reason, message }
    }

    fn status(&self) -> Status {
        match self.reason {
            Reason::Unauthenticated => Status::unauthenticated(&self.message),
            Reason::PermissionDenied => Status::permission_denied(&self.message),
            Reason::TooMany => Status::resource_exhausted(&self.message),
            _ => Status::invalid_argument(&self.message),
        }
    }
}

fn signals(
    proto: Option<&report::QueueSignals>,
    field: &str,
    now: UnixMs,
) -> Result<QueueReading, Rejection> {
    let s = proto.cloned().unwrap_or_default();
    if s.sampled_at_unix_ms > now.plus_ms(MAX_CLOCK_SKEW_MS).as_millis() {
        return Err(Rejection::new(
            Reason::FutureTimestamp,
            format!("{field}.sampled_at_unix_ms {} is in the future", s.sampled_at_unix_ms),
        ));
    }
    // The wire's edge: from here on a reading is the one type the engine takes.
    Ok(QueueReading {
        approximate_count: s.approximate_count,
        visible_count: s.visible_count,
        first_visible_age_ms: s.first_visible_age_ms,
        redelivered_count: s.redelivered_count.min(s.visible_count),
        sampled_at: UnixMs(s.sampled_at_unix_ms),
    })
}

/// Checks a report received at `now`; returns its hub and the validated content.
pub(crate) fn validate(report: &report::Report, now: UnixMs) -> Result<(HubKey, ValidReport), Rejection> {
    let Some(pod) = report.pod.as_ref() else {
        return Err(Rejection::new(Reason::MissingField, "pod.namespace and pod.name are required".into()));
    };
    if pod.name.is_empty() || pod.namespace.is_empty() {
        return Err(Rejection::new(Reason::MissingField, "pod.namespace and pod.name are required".into()));
    }
    // Every string is checked before it is kept, used as a key or quoted back: the names as
    // Kubernetes allows them, free text by length.
    let invalid = |message| Rejection::new(Reason::InvalidName, message);
    check_name("pod.namespace", &pod.namespace, NameRule::Label).map_err(invalid)?;
    check_name("pod.name", &pod.name, NameRule::Subdomain).map_err(invalid)?;
    check_len("sidecar_version", &report.sidecar_version, REPORT_TEXT_MAX_LEN).map_err(invalid)?;
    check_len("partition_mode", &report.partition_mode, REPORT_TEXT_MAX_LEN).map_err(invalid)?;
    if let Some(error) = &report.error {
        check_len("error.message", &error.message, REPORT_TEXT_MAX_LEN).map_err(invalid)?;
    }
    if let Err(e) = TaskHub::parse(&report.task_hub) {
        return Err(Rejection::new(Reason::UnknownHubShape, format!("task_hub: {e}")));
    }
    let p = report.partition_count;
    if p > MAX_PARTITIONS {
        return Err(Rejection::new(
            Reason::UnknownHubShape,
            format!("partition_count {p} is outside 1..{MAX_PARTITIONS} (0 when unknown)"),
        ));
    }
    if report.sampled_at_unix_ms > now.plus_ms(MAX_CLOCK_SKEW_MS).as_millis() {
        return Err(Rejection::new(
            Reason::FutureTimestamp,
            format!(
                "sampled_at_unix_ms {} is {} ms ahead of the aggregator's clock",
                report.sampled_at_unix_ms,
                report.sampled_at_unix_ms - now.as_millis()
            ),
        ));
    }
    let mut control = Vec::with_capacity(report.control_queues.len());
    for cq in &report.control_queues {
        if cq.partition >= p {
            return Err(Rejection::new(
                Reason::PartitionOutOfRange,
                format!("control_queues partition {} is not below partition_count {p}", cq.partition),
            ));
        }
        if control.iter().any(|(q, _)| *q == cq.partition) {
            return Err(Rejection::new(
                Reason::UnknownHubShape,
                format!("control_queues lists partition {} twice", cq.partition),
            ));
        }
        let field = format!("control_queues[{}].signals", cq.partition);
        control.push((cq.partition, signals(cq.signals.as_ref(), &field, now)?));
    }
    let work_item = report.work_item.as_ref().map(|w| signals(Some(w), "work_item", now)).transpose()?;
    // Capped at the longest interval a sidecar accepts, so a report cannot claim its
    // partitions for days.
    let longest = u64::try_from(INTERVAL_RANGE.end().as_millis()).unwrap_or(u64::MAX);
    let interval_ms = match report.interval_ms {
        0 => u64::try_from(SIDECAR_DEFAULT_INTERVAL.as_millis()).unwrap_or(u64::MAX),
        ms => u64::from(ms).min(longest),
    };
    let limits = report.limits.as_ref().map(reported_limits).transpose()?;
    let queue_settings = report.queue_settings.as_ref().map(reported_queue_settings).transpose()?;
    Ok((
        HubKey::new(&pod.namespace, &report.task_hub),
        ValidReport {
            pod: pod.name.clone(),
            reading: HubReading { partition_count: p, control, work_item },
            interval_ms,
            leaving: report.leaving,
            sampled_at_unix_ms: report.sampled_at_unix_ms,
            limits,
            queue_settings,
            // The report's free text, used now: `/hubs` shows each sidecar's version, where it
            // read ownership, and its storage error, quoted short.
            sidecar: SidecarNotes {
                version: report.sidecar_version.clone(),
                partition_mode: report.partition_mode.clone(),
                error: report.error.as_ref().map(|e| crate::contract::quote(&e.message)),
            },
        },
    ))
}

/// The app's limits of a report; both are at least 1 when the field is set (a sidecar that
/// cannot tell leaves the field unset).
fn reported_limits(limits: &report::WorkerLimits) -> Result<ReportedLimits, Rejection> {
    for (field, value) in [
        ("limits.max_activities", limits.max_activities),
        ("limits.max_orchestrations", limits.max_orchestrations),
    ] {
        if value == 0 {
            return Err(Rejection::new(
                Reason::MissingField,
                format!("{field} is 0: at least 1 when limits is set (leave limits unset when unknown)"),
            ));
        }
    }
    Ok(ReportedLimits {
        limits: WorkerLimits {
            max_activities: limits.max_activities,
            max_orchestrations: limits.max_orchestrations,
        },
        processor_count: limits.processor_count,
    })
}

/// The app's queue settings of a report: 0 is "not set"; a set value must be one the
/// Durable extension accepts (`Options/AzureStorageOptions.cs` `Validate`: visibility
/// timeouts of 1 to 60 minutes for the control queues, a buffer threshold of 1 to 1000).
fn reported_queue_settings(q: &report::AppQueueSettings) -> Result<ReportedQueueSettings, Rejection> {
    let set = |v: u64| (v > 0).then_some(v);
    let minutes = 60_000..=3_600_000;
    if q.control_queue_visibility_timeout_ms > 0 && !minutes.contains(&q.control_queue_visibility_timeout_ms)
    {
        return Err(Rejection::new(
            Reason::OutOfRange,
            format!(
                "queue_settings.control_queue_visibility_timeout_ms {} is outside 1 to 60 minutes",
                q.control_queue_visibility_timeout_ms
            ),
        ));
    }
    if q.control_queue_buffer_threshold > 1_000 {
        return Err(Rejection::new(
            Reason::OutOfRange,
            format!(
                "queue_settings.control_queue_buffer_threshold {} is above 1000",
                q.control_queue_buffer_threshold
            ),
        ));
    }
    Ok(ReportedQueueSettings {
        control_queue_visibility_timeout_ms: set(q.control_queue_visibility_timeout_ms),
        work_item_queue_visibility_timeout_ms: set(q.work_item_queue_visibility_timeout_ms),
        control_queue_buffer_threshold: (q.control_queue_buffer_threshold > 0)
            .then_some(q.control_queue_buffer_threshold),
        max_queue_polling_interval_ms: set(q.max_queue_polling_interval_ms),
    })
}

/// The report service.
#[derive(Debug, Clone)]
pub(crate) struct Reports {
    registry: Arc<Registry>,
    check: ReportCheck,
}

impl Reports {
    /// Serves reports into `registry`.
    pub(crate) fn new(registry: Arc<Registry>, check: ReportCheck) -> Self {
        Self { registry, check }
    }

    async fn authenticate(&self, request: &Request<report::Report>) -> Result<(), Rejection> {
        let ReportCheck::Token(authenticator) = &self.check else {
            return Ok(());
        };
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")));
        let rejection = |e| match e {
            AuthError::Unauthenticated(m) => Rejection::new(Reason::Unauthenticated, m),
            AuthError::PermissionDenied(m) => Rejection::new(Reason::PermissionDenied, m),
        };
        let identity = authenticator.authenticate(token).await.map_err(rejection)?;
        // A pod may only report for itself.
        let pod = request.get_ref().pod.clone().unwrap_or_default();
        super::sources::authorize(&identity, &pod).map_err(rejection)?;
        Ok(())
    }

    fn reject(&self, rejection: &Rejection) -> Status {
        // Counted by reason alone: a refused report's namespace and hub are the sender's to
        // choose, and a series per claimed name would let anyone grow /metrics at will.
        self.registry.metrics.count_rejection(rejection.reason);
        tracing::debug!(reason = rejection.reason.label(), "report refused: {}", rejection.message);
        rejection.status()
    }
}

#[tonic::async_trait]
impl ReportService for Reports {
    async fn submit(&self, request: Request<report::Report>) -> Result<Response<report::ReportAck>, Status> {
        let now = UnixMs::now();
        let report = request.get_ref();
        // Validated before authentication: a TokenReview costs an API call, and the names
        // checked here are what authorization compares with the token's.
        let (key, valid) = validate(report, now).map_err(|r| self.reject(&r))?;
        if let Err(rejection) = self.authenticate(&request).await {
            return Err(self.reject(&rejection));
        }
        let entry = self
            .registry
            .track(&key, &report.task_hub, None)
            .map_err(|full| self.reject(&Rejection::new(Reason::TooMany, full.to_string())))?;
        self.registry
            .apply_report(&entry, &valid, now)
            .map_err(|full| self.reject(&Rejection::new(Reason::TooMany, full.to_string())))?;
        Ok(Response::new(report::ReportAck {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::report::{ControlQueueSignals, PodRef, Report};

    const NOW: i64 = 1_800_000_000_000;

    fn good() -> Report {
        Report {
            pod: Some(PodRef { namespace: "apps".into(), name: "app-1".into() }),
            task_hub: "MyHub".into(),
            partition_count: 4,
            control_queues: vec![ControlQueueSignals {
                partition: 3,
                signals: Some(report::QueueSignals {
                    approximate_count: 2,
                    visible_count: 1,
                    ..Default::default()
                }),
            }],
            sampled_at_unix_ms: NOW,
            interval_ms: 1000,
            ..Default::default()
        }
    }

    #[test]
    fn a_well_formed_report_is_keyed_by_namespace_and_lowercased_hub() {
        let (key, valid) = validate(&good(), UnixMs(NOW)).unwrap();
        assert_eq!(key, HubKey::new("apps", "myhub"));
        assert_eq!(valid.reading.control.len(), 1);
        assert_eq!(valid.reading.control[0].1.visible_count, 1);
    }

    #[test]
    fn a_report_without_limits_is_an_old_sidecars_and_accepted() {
        assert_eq!(validate(&good(), UnixMs(NOW)).unwrap().1.limits, None);
    }

    #[test]
    fn reported_limits_are_taken_and_zero_ones_refused() {
        let limits = |a, o| report::WorkerLimits {
            processor_count: 2,
            max_activities: a,
            max_orchestrations: o,
            ..Default::default()
        };
        let r = Report { limits: Some(limits(20, 20)), ..good() };
        let taken = validate(&r, UnixMs(NOW)).unwrap().1.limits.unwrap();
        assert_eq!(
            (taken.limits.max_activities, taken.limits.max_orchestrations, taken.processor_count),
            (20, 20, 2)
        );
        let r = Report { limits: Some(limits(20, 0)), ..good() };
        let e = validate(&r, UnixMs(NOW)).unwrap_err();
        assert!(e.message.contains("limits.max_orchestrations"), "{}", e.message);
    }

    #[test]
    fn a_partition_index_at_or_beyond_the_count_is_refused() {
        let mut r = good();
        r.control_queues[0].partition = 4;
        let e = validate(&r, UnixMs(NOW)).unwrap_err();
        assert_eq!(e.reason, Reason::PartitionOutOfRange);
        assert!(e.message.contains("partition 4"), "{}", e.message);
    }

    #[test]
    fn a_report_from_the_future_is_refused() {
        let mut r = good();
        r.sampled_at_unix_ms = NOW + MAX_CLOCK_SKEW_MS + 1;
        assert_eq!(validate(&r, UnixMs(NOW)).unwrap_err().reason, Reason::FutureTimestamp);
        let mut r = good();
        r.control_queues[0].signals.as_mut().unwrap().sampled_at_unix_ms = NOW + 60_000;
        assert_eq!(validate(&r, UnixMs(NOW)).unwrap_err().reason, Reason::FutureTimestamp);
    }

    #[test]
    fn a_claimed_interval_is_capped_at_the_longest_a_sidecar_accepts() {
        let mut r = good();
        r.interval_ms = u32::MAX;
        assert_eq!(validate(&r, UnixMs(NOW)).unwrap().1.interval_ms, 600_000);
        r.interval_ms = 0;
        assert_eq!(validate(&r, UnixMs(NOW)).unwrap().1.interval_ms, 5_000, "a sidecar's own default");
    }

    #[test]
    fn impossible_hub_shapes_are_refused() {
        let mut r = good();
        r.partition_count = 17;
        assert_eq!(validate(&r, UnixMs(NOW)).unwrap_err().reason, Reason::UnknownHubShape);
        let mut r = good();
        r.task_hub = "my-hub".into();
        assert_eq!(validate(&r, UnixMs(NOW)).unwrap_err().reason, Reason::UnknownHubShape);
        let mut r = good();
        r.control_queues.push(r.control_queues[0]);
        assert_eq!(validate(&r, UnixMs(NOW)).unwrap_err().reason, Reason::UnknownHubShape);
        let mut r = good();
        r.pod = None;
        assert_eq!(validate(&r, UnixMs(NOW)).unwrap_err().reason, Reason::MissingField);
    }

    #[test]
    fn names_beyond_kubernetes_limits_are_refused_naming_the_field_and_quoting_a_prefix() {
        let huge = "a".repeat(4_000_000);
        for (field, set) in [
            (
                "pod.namespace",
                (|r: &mut Report, v: &str| r.pod.as_mut().unwrap().namespace = v.into())
                    as fn(&mut Report, &str),
            ),
            ("pod.name", |r, v| r.pod.as_mut().unwrap().name = v.into()),
            ("task_hub", |r, v| r.task_hub = v.into()),
            ("sidecar_version", |r, v| r.sidecar_version = v.into()),
            ("partition_mode", |r, v| r.partition_mode = v.into()),
        ] {
            let mut r = good();
            set(&mut r, &huge);
            let e = validate(&r, UnixMs(NOW)).unwrap_err();
            assert!(e.message.starts_with(field), "{field}: {}", e.message);
            assert!(e.message.len() < 200, "{field}: {} bytes", e.message.len());
        }
        let mut r = good();
        r.pod.as_mut().unwrap().namespace = "a".repeat(64);
        assert_eq!(validate(&r, UnixMs(NOW)).unwrap_err().reason, Reason::InvalidName);
        r.pod.as_mut().unwrap().namespace = "a".repeat(63);
        r.pod.as_mut().unwrap().name = "p".repeat(253);
        assert!(validate(&r, UnixMs(NOW)).is_ok());
    }
}
