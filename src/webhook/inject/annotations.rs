//! Annotation parsing: the pod's `durable-scaler.io/*` settings, each read once into a typed
//! value. An invalid value never rejects the pod: it becomes a warning and the default.

use serde_json::{Map, Value, json};

use super::NativeDefault;
use crate::contract::{
    AGGREGATOR_ANNOTATION, CONNECTION_ENV_ANNOTATION, CPU_LIMIT_ANNOTATION, CPU_REQUEST_ANNOTATION,
    DEFAULT_CONNECTION_ENV, DRAIN_ANNOTATION, GRACE_ANNOTATION, MEMORY_LIMIT_ANNOTATION,
    MEMORY_REQUEST_ANNOTATION, NATIVE_SIDECAR_ANNOTATION, SIDECAR_IMAGE_ANNOTATION,
    SIDECAR_LOG_LEVEL_ANNOTATION,
};

/// The log levels the sidecar's `RUST_LOG` is set to from [`SIDECAR_LOG_LEVEL_ANNOTATION`].
const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];
/// The longest grace period the annotation may ask for: one day. Longer is surely a typo, and
/// a pod that cannot be stopped for days blocks node drains.
pub(super) const MAX_GRACE_SECONDS: u64 = 86_400;

/// kubectl's annotation naming the container `kubectl logs/exec` picks by default.
pub(super) const DEFAULT_CONTAINER_ANNOTATION: &str = "kubectl.kubernetes.io/default-container";

/// Default requests and limits: the sidecar reads a few queues every few seconds.
pub(super) const DEFAULT_CPU_REQUEST: &str = "10m";
pub(super) const DEFAULT_CPU_LIMIT: &str = "200m";
pub(super) const DEFAULT_MEMORY_REQUEST: &str = "32Mi";
pub(super) const DEFAULT_MEMORY_LIMIT: &str = "64Mi";

/// The pod's annotations as they stand (none at all is `None`, which the patch must create).
#[derive(Debug, Clone, Copy)]
pub(super) struct Annotations<'a>(pub(super) Option<&'a Map<String, Value>>);

impl<'a> Annotations<'a> {
    /// The annotations of `pod`.
    pub(super) fn of(pod: &'a Value) -> Self {
        Self(pod.pointer("/metadata/annotations").and_then(Value::as_object))
    }

    /// The string value of annotation `key`.
    pub(super) fn get(&self, key: &str) -> Option<&'a str> {
        self.0.and_then(|a| a.get(key)).and_then(Value::as_str)
    }

    /// The name of the app's connection variable ([`CONNECTION_ENV_ANNOTATION`], default
    /// [`DEFAULT_CONNECTION_ENV`]).
    pub(super) fn connection_env(&self) -> &'a str {
        self.get(CONNECTION_ENV_ANNOTATION).unwrap_or(DEFAULT_CONNECTION_ENV)
    }

    /// kubectl's default container, when the pod names one.
    pub(super) fn default_container(&self) -> Option<&'a str> {
        self.get(DEFAULT_CONTAINER_ANNOTATION)
    }

    /// The aggregator URL: the annotation when it is an http(s) URL, else `default` (with a
    /// warning when the annotation is there but unusable).
    pub(super) fn aggregator(&self, default: &url::Url, warnings: &mut Vec<String>) -> url::Url {
        match self.get(AGGREGATOR_ANNOTATION) {
            Some(url) => crate::config::http_url(url).unwrap_or_else(|| {
                warnings.push(format!(
                    "durable-scaler: annotation {AGGREGATOR_ANNOTATION}={url:?} is not an http(s) URL; using {default}"
                ));
                default.clone()
            }),
            None => default.clone(),
        }
    }

    /// Native sidecar or plain container, and why: the annotation when it is `"true"` or
    /// `"false"`, else `default` (with a warning for any other value). `"true"` on a cluster
    /// that certainly cannot run native sidecars ([`NativeDefault::cannot_run`]) gives a plain
    /// container and a warning: the API server would refuse the pod.
    pub(super) fn native(&self, default: &NativeDefault, warnings: &mut Vec<String>) -> (bool, String) {
        match self.get(NATIVE_SIDECAR_ANNOTATION) {
            Some("true") if default.cannot_run.is_some() => {
                let why = default.cannot_run.as_deref().unwrap_or_default();
                warnings.push(format!(
                    "durable-scaler: annotation {NATIVE_SIDECAR_ANNOTATION}=\"true\", but {why}: the API \
                     server would refuse the pod; the sidecar is a plain container"
                ));
                (false, format!("annotation {NATIVE_SIDECAR_ANNOTATION}=true, but {why}"))
            }
            Some(value @ ("true" | "false")) => {
                (value == "true", format!("annotation {NATIVE_SIDECAR_ANNOTATION}={value}"))
            }
            Some(other) => {
                warnings.push(format!(
                    "durable-scaler: annotation {NATIVE_SIDECAR_ANNOTATION}={other:?} is not \"true\" or \"false\"; using {}",
                    default.native
                ));
                (default.native, default.reason.clone())
            }
            None => (default.native, default.reason.clone()),
        }
    }

    /// The sidecar's image: the annotation when it is a plausible image reference (non-empty,
    /// no whitespace), else `default` (with a warning when the annotation is unusable).
    pub(super) fn image(&self, default: &'a str, warnings: &mut Vec<String>) -> &'a str {
        match self.get(SIDECAR_IMAGE_ANNOTATION) {
            Some(image) if !image.is_empty() && !image.chars().any(char::is_whitespace) => image,
            Some(other) => {
                warnings.push(format!(
                    "durable-scaler: annotation {SIDECAR_IMAGE_ANNOTATION}={other:?} is not an image reference; \
                     using {default}"
                ));
                default
            }
            None => default,
        }
    }

    /// The sidecar's log level (its `RUST_LOG`): one of [`LOG_LEVELS`], any case; `None` (the
    /// sidecar's own default) when absent or unusable (with a warning).
    pub(super) fn log_level(&self, warnings: &mut Vec<String>) -> Option<&'static str> {
        let raw = self.get(SIDECAR_LOG_LEVEL_ANNOTATION)?;
        let level = LOG_LEVELS.into_iter().find(|level| level.eq_ignore_ascii_case(raw.trim()));
        if level.is_none() {
            warnings.push(format!(
                "durable-scaler: annotation {SIDECAR_LOG_LEVEL_ANNOTATION}={raw:?} is not one of {}; \
                 the sidecar logs at its default level",
                LOG_LEVELS.join(", ")
            ));
        }
        level
    }

    /// Whether the webhook turns the app's drain on ([`DRAIN_ANNOTATION`]: `"false"` turns it
    /// off; anything but `"true"`/`"false"` warns and keeps it on).
    pub(super) fn drain(&self, warnings: &mut Vec<String>) -> bool {
        match self.get(DRAIN_ANNOTATION) {
            None | Some("true") => true,
            Some("false") => false,
            Some(other) => {
                warnings.push(format!(
                    "durable-scaler: annotation {DRAIN_ANNOTATION}={other:?} is not \"true\" or \"false\"; \
                     draining on stop"
                ));
                true
            }
        }
    }

    /// The grace period the pod asks for while draining ([`GRACE_ANNOTATION`], whole
    /// seconds, 1 to a day), or `None` (with a warning when unusable).
    pub(super) fn grace_seconds(&self, warnings: &mut Vec<String>) -> Option<u64> {
        let raw = self.get(GRACE_ANNOTATION)?;
        match raw.trim().parse::<u64>() {
            Ok(seconds) if (1..=MAX_GRACE_SECONDS).contains(&seconds) => Some(seconds),
            _ => {
                warnings.push(format!(
                    "durable-scaler: annotation {GRACE_ANNOTATION}={raw:?} is not a number of seconds \
                     from 1 to {MAX_GRACE_SECONDS}; using the drain's default"
                ));
                None
            }
        }
    }

    /// The sidecar's requests and limits from the annotations, each invalid one replaced by
    /// its default with a warning; a request above its limit (which the API server would
    /// reject, failing the pod) falls back to both defaults. In a Guaranteed pod
    /// ([`guaranteed`]) the requests are set to the limits: a container whose requests
    /// differ from its limits would make the pod Burstable (`GetPodQOS`), taking away the QoS
    /// class its owner chose.
    pub(super) fn resources(&self, guaranteed: bool, warnings: &mut Vec<String>) -> Value {
        let mut pick = |key: &str, default: &str| -> (String, f64) {
            let fallback = (default.to_owned(), parse_quantity(default).unwrap_or_default());
            match self.get(key) {
                None => fallback,
                Some(raw) => match parse_quantity(raw) {
                    Some(value) => (raw.to_owned(), value),
                    None => {
                        warnings.push(format!(
                            "durable-scaler: annotation {key}={raw:?} is not a Kubernetes quantity; using {default}"
                        ));
                        fallback
                    }
                },
            }
        };
        let mut cpu = (
            pick(CPU_REQUEST_ANNOTATION, DEFAULT_CPU_REQUEST),
            pick(CPU_LIMIT_ANNOTATION, DEFAULT_CPU_LIMIT),
        );
        let mut memory = (
            pick(MEMORY_REQUEST_ANNOTATION, DEFAULT_MEMORY_REQUEST),
            pick(MEMORY_LIMIT_ANNOTATION, DEFAULT_MEMORY_LIMIT),
        );
        for (what, pair, defaults) in [
            ("cpu", &mut cpu, (DEFAULT_CPU_REQUEST, DEFAULT_CPU_LIMIT)),
            ("memory", &mut memory, (DEFAULT_MEMORY_REQUEST, DEFAULT_MEMORY_LIMIT)),
        ] {
            if pair.0.1 > pair.1.1 {
                warnings.push(format!(
                    "durable-scaler: sidecar {what} request {} is above its limit {}; using {} and {}",
                    pair.0.0, pair.1.0, defaults.0, defaults.1
                ));
                pair.0.0 = defaults.0.to_owned();
                pair.1.0 = defaults.1.to_owned();
            }
            if guaranteed {
                let request_annotation =
                    if what == "cpu" { CPU_REQUEST_ANNOTATION } else { MEMORY_REQUEST_ANNOTATION };
                if self.get(request_annotation).is_some() && pair.0.0 != pair.1.0 {
                    warnings.push(format!(
                        "durable-scaler: the pod's QoS class is Guaranteed; the sidecar's {what} request is \
                         set to its limit {} to keep it so",
                        pair.1.0
                    ));
                }
                pair.0 = pair.1.clone();
            }
        }
        json!({
            "requests": {"cpu": cpu.0.0, "memory": memory.0.0},
            "limits": {"cpu": cpu.1.0, "memory": memory.1.0},
        })
    }
}

/// True when the pod's QoS class is Guaranteed: every container and init container has cpu
/// and memory limits, and requests (when given) equal to them. The rule of
/// kubernetes/kubernetes `pkg/apis/core/v1/helper/qos/qos.go` (`GetPodQOS`; requests left
/// out default to the limits, as the API server's defaulting does before admission). A pod
/// with pod-level `resources` (PodLevelResources) is judged on those instead.
pub(super) fn guaranteed(spec: &Map<String, Value>) -> bool {
    let equal_limits = |resources: Option<&Value>| {
        ["cpu", "memory"].iter().all(|name| {
            let limit = resources.and_then(|r| r.pointer(&format!("/limits/{name}"))).and_then(Value::as_str);
            let request =
                resources.and_then(|r| r.pointer(&format!("/requests/{name}"))).and_then(Value::as_str);
            match (limit.and_then(parse_quantity), request.map(parse_quantity)) {
                (Some(limit), None) => limit > 0.0,
                (Some(limit), Some(Some(request))) => limit > 0.0 && limit == request,
                _ => false,
            }
        })
    };
    if let Some(pod_level) = spec.get("resources").filter(|r| r.get("limits").is_some()) {
        return equal_limits(Some(pod_level));
    }
    let mut all = ["containers", "initContainers"]
        .iter()
        .flat_map(|list| spec.get(*list).and_then(Value::as_array).into_iter().flatten())
        .peekable();
    all.peek().is_some() && all.all(|c| equal_limits(c.get("resources")))
}

/// Parses a non-negative Kubernetes quantity (`100m`, `0.5`, `64Mi`, `1e3`) into its value,
/// or `None` when the API server would reject it.
pub(super) fn parse_quantity(raw: &str) -> Option<f64> {
    let split = raw.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(raw.len());
    let (number, suffix) = raw.split_at(split);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return None;
    }
    let value: f64 = number.parse().ok()?;
    let scale = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exponent => {
            let digits = exponent.strip_prefix(['e', 'E'])?;
            let unsigned = digits.strip_prefix(['+', '-']).unwrap_or(digits);
            if unsigned.is_empty() || unsigned.len() > 3 || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            10f64.powi(digits.parse().ok()?)
        }
    };
    Some(value * scale).filter(|v| v.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_follow_kubernetes_syntax() {
        assert_eq!(parse_quantity("100m"), Some(0.1));
        assert_eq!(parse_quantity("64Mi"), Some(64.0 * 1024.0 * 1024.0));
        assert_eq!(parse_quantity("1e3"), Some(1000.0));
        assert_eq!(parse_quantity("0.5"), Some(0.5));
        for bad in ["", "-1", "lots", "1.2.3", "10 m", "1Mb", ".", "1e", "1e99999"] {
            assert_eq!(parse_quantity(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_guaranteed_rule_looks_at_every_container_and_init_container() {
        let full = json!({"limits": {"cpu": "1", "memory": "1Gi"}});
        let spec = |init: Value| {
            json!({"containers": [{"name": "a", "resources": full}], "initContainers": [init]})
                .as_object()
                .unwrap()
                .clone()
        };
        assert!(guaranteed(&spec(json!({"name": "i", "resources": full}))));
        assert!(!guaranteed(&spec(json!({"name": "i"}))));
        let unequal = json!({"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "500m"}});
        assert!(!guaranteed(&spec(json!({"name": "i", "resources": unequal}))));
    }
}
