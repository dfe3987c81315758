//! `--native-sidecar auto|true`: inject native sidecars only where the cluster cannot refuse
//! them.
//!
//! A native sidecar is an init container with `restartPolicy: Always` (KEP-753, feature gate
//! `SidecarContainers`: alpha and off in 1.28, beta and on by default in 1.29-1.32, GA and
//! locked on in 1.33; kubernetes/kubernetes `pkg/features/kube_features.go`). Where the gate
//! is off the pod is **refused**: the API server drops the field before validating
//! (`pkg/api/pod/util.go`, `dropDisabledPodFields`: "Drop the RestartPolicy field of init
//! containers"), and then refuses the sidecar's `livenessProbe`, which an ordinary init
//! container may not have (`pkg/apis/core/validation`), so every create of the app's pods
//! fails. A kubelet whose gate is off runs the container as an ordinary init container that
//! never exits, and the app never starts. An admin can turn the beta gate off on 1.29-1.32, and
//! nothing the webhook may read says whether they did.
//!
//! So `auto` chooses native only when the API server (`/version`) **and** every node's kubelet
//! (`status.nodeInfo.kubeletVersion`) are 1.33 or newer, where the gate cannot be turned off;
//! Istio's injector does the same (`pkg/kube/inject/webhook.go`, `DetectNativeSidecar`: "Native
//! sidecars feature graduated to stable in Kubernetes 1.33", every node checked). Elsewhere a
//! plain container, which works on every version.
//!
//! `true` (and a pod's `durable-scaler.io/native-sidecar: "true"`) is the operator saying the
//! gate is on; it is still never applied where native sidecars certainly cannot run: an API
//! server or a kubelet before 1.29, where the gate is off unless an admin turned an alpha
//! feature on. There the pod gets a plain container and a warning, rather than being refused.
//!
//! The versions are read once at start and then again when a review finds them older than
//! the refresh interval (a few minutes), in the background, so a review never waits for the
//! API server. The cache ([`VersionCache`]) decides on the `now` it is given. A failed read
//! keeps the last good answer; with none yet, `auto` gives a plain container and `true` a
//! native one.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};

use super::inject::NativeDefault;
use crate::clock::UnixMs;

/// The first minor of Kubernetes 1.x with native sidecars on by default (beta): below it
/// even a forced native sidecar is not injected.
pub const MIN_NATIVE_MINOR: u32 = 29;
/// The first minor where native sidecars are GA and the gate is locked on: `auto`'s threshold.
pub const LOCKED_NATIVE_MINOR: u32 = 33;
/// How often the versions are read again.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(180);
/// Nodes listed per page (the API server's pagination; a big cluster is read in pages).
const NODE_PAGE: u32 = 500;

/// `--native-sidecar`: `auto`, or forced `true` / `false`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NativeSidecarMode {
    /// Native when the API server and every kubelet are 1.33+ (read from the cluster).
    Auto,
    /// Native (init container with `restartPolicy: Always`) unless the API server or a kubelet
    /// is before 1.29, where it would certainly be refused.
    True,
    /// Always a plain container.
    False,
}

/// A Kubernetes `major.minor`, from a version string such as `v1.29.3`, `v1.30.2-gke.1` or
/// `v1.28.5+k3s1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KubeVersion {
    /// Major (1).
    pub major: u32,
    /// Minor.
    pub minor: u32,
}

impl KubeVersion {
    /// Parses `v<major>.<minor>[.<anything>]`; `None` when it is not that.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.trim().strip_prefix('v').unwrap_or(text.trim()).split('.');
        let number = |part: Option<&str>| -> Option<u32> {
            let digits: String = part?.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        };
        Some(Self { major: number(parts.next())?, minor: number(parts.next())? })
    }

    fn at_least(self, minor: u32) -> bool {
        self.major > 1 || (self.major == 1 && self.minor >= minor)
    }
}

impl std::fmt::Display for KubeVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// What was read from the cluster: the API server's `gitVersion` and each node's kubelet
/// version, as strings (parsed when deciding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterVersions {
    /// `/version` `gitVersion`.
    pub api_server: String,
    /// `(node name, status.nodeInfo.kubeletVersion)` of every node.
    pub kubelets: Vec<(String, String)>,
}

impl ClusterVersions {
    /// The first component (API server, then each kubelet) that is not 1.`minor`+, or whose
    /// version cannot be parsed, in words.
    fn first_before(&self, minor: u32) -> Option<String> {
        let too_old = |what: &str, text: &str| match KubeVersion::parse(text) {
            Some(v) if v.at_least(minor) => None,
            Some(v) => Some(format!("{what} is {v}, before 1.{minor}")),
            None => Some(format!("{what} version {text:?} is not understood")),
        };
        too_old("the API server", &self.api_server).or_else(|| {
            self.kubelets
                .iter()
                .find_map(|(node, version)| too_old(&format!("node {node}'s kubelet"), version))
        })
    }

    /// The mode `mode` gives on this cluster (see the module docs). No nodes yet (a cluster
    /// still coming up) decides on the API server alone: a node that joins later is seen at
    /// the next refresh.
    pub fn decide(&self, mode: NativeSidecarMode) -> NativeDefault {
        let cannot_run = self.first_before(MIN_NATIVE_MINOR);
        match mode {
            NativeSidecarMode::False => NativeDefault::forced(false),
            NativeSidecarMode::True => match cannot_run {
                Some(why) => NativeDefault {
                    native: false,
                    reason: format!("--native-sidecar=true, but {why}: it would be refused"),
                    cannot_run: Some(why),
                },
                None => NativeDefault::forced(true),
            },
            NativeSidecarMode::Auto => match self.first_before(LOCKED_NATIVE_MINOR) {
                Some(why) => NativeDefault { native: false, reason: format!("auto: {why}"), cannot_run },
                None => NativeDefault {
                    native: true,
                    reason: format!(
                        "auto: the API server and all {} kubelets are 1.{LOCKED_NATIVE_MINOR}+",
                        self.kubelets.len()
                    ),
                    cannot_run: None,
                },
            },
        }
    }
}

/// The versions last read and when; decides on the `now` it is given.
#[derive(Debug, Default)]
pub struct VersionCache {
    /// The last good read and when it was made.
    good: Option<(UnixMs, ClusterVersions)>,
    /// When the last read (good or not) was made, and its error if it failed.
    attempt: Option<(UnixMs, Option<String>)>,
    /// A read is under way.
    in_flight: bool,
}

impl VersionCache {
    /// The mode for a pod reviewed at `now`, and whether a new read should start (the last
    /// attempt is older than `refresh` and none is under way; the caller then calls
    /// [`Self::start`] and, with the result, [`Self::store`]).
    pub fn decision(&self, now: UnixMs, refresh: Duration, mode: NativeSidecarMode) -> (NativeDefault, bool) {
        let due = !self.in_flight && self.attempt.as_ref().is_none_or(|(at, _)| now.since(*at) >= refresh);
        let unknown = |why: String| match mode {
            NativeSidecarMode::Auto => NativeDefault {
                native: false,
                reason: format!("auto: cluster versions {why}; a plain container works everywhere"),
                cannot_run: None,
            },
            forced => NativeDefault::forced(forced == NativeSidecarMode::True),
        };
        let decision = match (&self.good, &self.attempt) {
            (Some((_, versions)), _) => versions.decide(mode),
            (None, Some((_, Some(error)))) => unknown(format!("unknown ({error})")),
            (None, _) => unknown("not read yet".to_owned()),
        };
        (decision, due)
    }

    /// Marks a read as under way.
    pub fn start(&mut self) {
        self.in_flight = true;
    }

    /// Records the outcome of the read that ended at `now`; a failure keeps the last good
    /// answer.
    pub fn store(&mut self, now: UnixMs, read: Result<ClusterVersions, String>) {
        self.in_flight = false;
        match read {
            Ok(versions) => {
                self.good = Some((now, versions));
                self.attempt = Some((now, None));
            }
            Err(error) => self.attempt = Some((now, Some(error))),
        }
    }
}

/// Reads the versions from the API server and caches the decision; cheap to clone.
#[derive(Clone)]
pub struct NativeSidecarDetector {
    client: kube::Client,
    mode: NativeSidecarMode,
    refresh: Duration,
    cache: Arc<Mutex<VersionCache>>,
}

impl std::fmt::Debug for NativeSidecarDetector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeSidecarDetector")
            .field("mode", &self.mode)
            .field("refresh", &self.refresh)
            .finish_non_exhaustive()
    }
}

impl NativeSidecarDetector {
    /// A detector for `mode` (`auto` or `true`) reading through `client` every `refresh`.
    pub fn new(client: kube::Client, mode: NativeSidecarMode, refresh: Duration) -> Self {
        Self { client, mode, refresh, cache: Arc::new(Mutex::new(VersionCache::default())) }
    }

    /// Reads the versions now (at start, before serving) and stores the result at `now`.
    pub async fn refresh(&self, now: UnixMs) -> NativeDefault {
        self.lock().start();
        let read = read_versions(&self.client).await;
        if let Err(error) = &read {
            tracing::warn!(%error, "cannot read the cluster's versions for --native-sidecar");
        }
        let mut cache = self.lock();
        cache.store(now, read);
        cache.decision(now, self.refresh, self.mode).0
    }

    /// The mode for a pod reviewed at `now`; starts a background read when the last one is
    /// older than the refresh interval (the review does not wait for it).
    pub fn decision(&self, now: UnixMs) -> NativeDefault {
        let (decision, due) = {
            let mut cache = self.lock();
            let (decision, due) = cache.decision(now, self.refresh, self.mode);
            if due {
                cache.start();
            }
            (decision, due)
        };
        if due {
            let this = self.clone();
            tokio::spawn(async move {
                let read = read_versions(&this.client).await;
                if let Err(error) = &read {
                    tracing::warn!(%error, "cannot read the cluster's versions for --native-sidecar");
                }
                this.lock().store(UnixMs::now(), read);
            });
        }
        decision
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VersionCache> {
        self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// `GET /version` and `GET /api/v1/nodes` (in pages): needs RBAC `list` on `nodes`.
async fn read_versions(client: &kube::Client) -> Result<ClusterVersions, String> {
    let info = client.apiserver_version().await.map_err(|e| format!("GET /version: {e}"))?;
    let nodes: Api<Node> = Api::all(client.clone());
    let mut kubelets = Vec::new();
    let mut params = ListParams::default().limit(NODE_PAGE);
    loop {
        let page = nodes.list(&params).await.map_err(|e| format!("list nodes: {e}"))?;
        for node in &page.items {
            let name = node.metadata.name.clone().unwrap_or_default();
            let version =
                node.status.as_ref().and_then(|s| s.node_info.as_ref()).map(|i| i.kubelet_version.clone());
            kubelets.push((name, version.unwrap_or_default()));
        }
        match page.metadata.continue_.filter(|token| !token.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => break,
        }
    }
    Ok(ClusterVersions { api_server: info.git_version, kubelets })
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: UnixMs = UnixMs(1_700_000_000_000);

    fn versions(api: &str, kubelets: &[&str]) -> ClusterVersions {
        ClusterVersions {
            api_server: api.to_owned(),
            kubelets: kubelets
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("node-{i}"), (*v).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn versions_parse_with_vendor_suffixes() {
        assert_eq!(KubeVersion::parse("v1.29.3"), Some(KubeVersion { major: 1, minor: 29 }));
        assert_eq!(KubeVersion::parse("v1.30.2-gke.1076000"), Some(KubeVersion { major: 1, minor: 30 }));
        assert_eq!(KubeVersion::parse("v1.28.5+k3s1"), Some(KubeVersion { major: 1, minor: 28 }));
        assert_eq!(KubeVersion::parse("1.31"), Some(KubeVersion { major: 1, minor: 31 }));
        assert_eq!(KubeVersion::parse("garbage"), None);
        assert_eq!(KubeVersion::parse(""), None);
    }

    const AUTO: NativeSidecarMode = NativeSidecarMode::Auto;
    const TRUE: NativeSidecarMode = NativeSidecarMode::True;

    #[test]
    fn auto_is_native_only_where_the_gate_is_locked_on_in_the_api_server_and_every_kubelet() {
        assert!(versions("v1.33.1", &["v1.33.0", "v1.35.1"]).decide(AUTO).native);
        // 1.29-1.32: on by default, but an admin may have turned the beta gate off.
        let beta = versions("v1.32.4", &["v1.32.4"]).decide(AUTO);
        assert!(!beta.native && beta.reason.contains("before 1.33"), "{}", beta.reason);
        assert_eq!(beta.cannot_run, None, "a forced native sidecar may still run there");
        let old_node = versions("v1.34.1", &["v1.34.1", "v1.32.9"]).decide(AUTO);
        assert!(!old_node.native);
        assert!(
            old_node.reason.contains("node-1") && old_node.reason.contains("1.32"),
            "{}",
            old_node.reason
        );
        let old_api = versions("v1.28.2", &["v1.28.2"]).decide(AUTO);
        assert!(!old_api.native && old_api.reason.contains("API server"), "{}", old_api.reason);
        assert!(old_api.cannot_run.is_some());
    }

    #[test]
    fn forced_native_is_kept_from_1_29_and_turned_plain_where_it_would_be_refused() {
        assert!(versions("v1.30.1", &["v1.29.0", "v1.30.1"]).decide(TRUE).native);
        let old = versions("v1.28.9", &["v1.28.9"]).decide(TRUE);
        assert!(!old.native && old.reason.contains("refused"), "{}", old.reason);
        assert!(old.cannot_run.as_deref().is_some_and(|why| why.contains("API server is 1.28")));
        let old_node = versions("v1.30.1", &["v1.30.1", "v1.28.3"]).decide(TRUE);
        assert!(!old_node.native && old_node.reason.contains("node-1"), "{}", old_node.reason);
    }

    #[test]
    fn an_unparsable_kubelet_version_means_a_plain_container() {
        let decided = versions("v1.33.1", &["weird"]).decide(AUTO);
        assert!(!decided.native && decided.reason.contains("weird"), "{}", decided.reason);
    }

    #[test]
    fn before_the_first_read_pods_get_a_plain_container_and_a_read_is_due() {
        let cache = VersionCache::default();
        let (decided, due) = cache.decision(T0, REFRESH_INTERVAL, AUTO);
        assert!(!decided.native && due);
        assert!(cache.decision(T0, REFRESH_INTERVAL, TRUE).0.native, "true trusts the operator until read");
    }

    #[test]
    fn a_read_is_due_again_only_after_the_refresh_interval() {
        let mut cache = VersionCache::default();
        cache.start();
        assert!(!cache.decision(T0, REFRESH_INTERVAL, AUTO).1, "not while a read is under way");
        cache.store(T0, Ok(versions("v1.33.0", &["v1.33.0"])));
        assert!(!cache.decision(T0.plus_ms(179_999), REFRESH_INTERVAL, AUTO).1);
        assert!(cache.decision(T0.plus(REFRESH_INTERVAL), REFRESH_INTERVAL, AUTO).1);
    }

    #[test]
    fn a_failed_read_keeps_the_last_good_answer() {
        let mut cache = VersionCache::default();
        cache.store(T0, Ok(versions("v1.33.0", &["v1.33.0"])));
        cache.store(T0.plus(REFRESH_INTERVAL), Err("connection refused".to_owned()));
        assert!(cache.decision(T0.plus(REFRESH_INTERVAL), REFRESH_INTERVAL, AUTO).0.native);
    }

    #[test]
    fn a_failed_first_read_says_why_in_the_reason() {
        let mut cache = VersionCache::default();
        cache.store(T0, Err("nodes is forbidden".to_owned()));
        let (decided, _) = cache.decision(T0, REFRESH_INTERVAL, AUTO);
        assert!(!decided.native && decided.reason.contains("nodes is forbidden"), "{}", decided.reason);
    }
}
