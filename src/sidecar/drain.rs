//! The preStop drain: `GET /drain` on the sidecar's HTTP port, which the webhook makes the app
//! container's preStop hook, drains the Functions host and answers once it has drained.
//!
//! Why (docs/scale-in.md): on SIGTERM the host stops within about 10 s whatever still runs
//! (azure-functions-host `src/WebJobs.Script.WebHost/WebJobsScriptHostService.cs` `StopAsync`),
//! and with the official images SIGTERM does not even reach it (azure-functions-docker
//! `host/4/*/start_nonappservice.sh` runs the host without `exec`). The kubelet runs a
//! container's preStop hook *before* it sends SIGTERM and waits for it, within the pod's grace
//! period (kubernetes `pkg/kubelet/kuberuntime/kuberuntime_container.go` `executePreStopHook`;
//! an `httpGet` hook is a GET to the pod's IP with the hook's `httpHeaders`,
//! `pkg/kubelet/lifecycle/handlers.go` `runHTTPHandler`), so a hook that answers only when the
//! host has nothing left running lets every running invocation finish.
//!
//! What the host offers (azure-functions-host
//! `src/WebJobs.Script.WebHost/Controllers/HostController.cs`):
//! - `POST /admin/host/drain` starts `IDrainModeManager.EnableDrainModeAsync` (every listener
//!   stopped: no new work; running invocations are not cancelled, azure-webjobs-sdk
//!   `Hosting/DrainModeManager.cs`) and answers 202 at once;
//! - `GET /admin/host/drain/status` answers `{"state": "Disabled" | "InProgress" | "Completed",
//!   "outstandingInvocations": n, "outstandingRetries": n}` (`Models/DrainModeStatus.cs`),
//!   `Completed` once drain mode is on and no invocation or retry is outstanding;
//! - both need admin level outside App Service: the master key in `x-functions-key`
//!   (`Security/Authentication/Keys/AuthenticationLevelHandler.cs`); the webhook mounts
//!   `host.master` from the Secret or ConfigMap the app's `KubernetesSecretsRepository` keeps.
//!
//! So `/drain`: checks the pod's token (constant time), reads the key file, posts the drain,
//! then polls the status every [`STATUS_EVERY`] until `Completed` or `--drain-wait` ran out,
//! and answers 200 with the last status either way (the kubelet ignores the status code;
//! the body is for the Event and the log). A host that cannot be reached or refuses the key
//! gets 502 at once: the hook then ends and the pod stops as it would have without it.
//! Calls at once share nothing but the host (its own drain is idempotent: a second POST
//! waits on the first, `_drainSemaphore`).

use std::path::Path;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::config::DrainConfig;
use crate::contract::DRAIN_TOKEN_HEADER;

/// How often the host's drain status is asked for.
pub(crate) const STATUS_EVERY: Duration = Duration::from_secs(1);
/// How long one call to the host may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// The most of a host answer read (a status is under 100 bytes).
const ANSWER_MAX_BYTES: usize = 16 * 1024;
/// The host's header for a function or admin key (azure-functions-host
/// `src/WebJobs.Script.WebHost/Security/Authentication/Keys/AuthenticationLevelHandler.cs`
/// `FunctionsKeyHeaderName`).
const KEY_HEADER: &str = "x-functions-key";

/// The host's drain status (azure-functions-host `Models/DrainModeStatus.cs`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DrainStatus {
    /// `Disabled`, `InProgress` or `Completed`.
    pub(crate) state: String,
    /// Invocations still running.
    #[serde(default)]
    pub(crate) outstanding_invocations: i64,
    /// Retries still waiting.
    #[serde(default)]
    pub(crate) outstanding_retries: i64,
}

/// What `/drain` answers.
#[derive(Debug, Serialize)]
struct Outcome {
    /// `completed`, `wait ran out`, or the error.
    result: String,
    /// The host's last status, if one came.
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<DrainStatus>,
    /// How long the drain took, in milliseconds.
    waited_ms: u64,
}

/// Why the host could not be drained.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DrainError {
    /// The key file could not be read or is empty.
    #[error("cannot read the host's master key from {path}: {problem}")]
    Key {
        /// The file.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// The host did not answer.
    #[error("the host at {url} did not answer: {problem}")]
    Unreachable {
        /// The URL called.
        url: String,
        /// What happened.
        problem: String,
    },
    /// The host answered with an error status.
    #[error("the host answered {status} to {what}")]
    Refused {
        /// The call.
        what: String,
        /// The status.
        status: u16,
    },
    /// The status was not the JSON the host writes.
    #[error("the host's drain status is not what azure-functions-host writes: {0}")]
    Status(String),
}

/// The `/drain` handler's state.
#[derive(Debug, Clone)]
pub(crate) struct Drainer {
    config: Option<DrainConfig>,
    metrics: std::sync::Arc<super::Metrics>,
}

impl Drainer {
    /// A drainer for `config` (none: `/drain` answers 404).
    pub(crate) fn new(config: Option<DrainConfig>, metrics: std::sync::Arc<super::Metrics>) -> Self {
        Self { config, metrics }
    }

    /// Drains the host: posts the drain and waits until the status says `Completed` or
    /// `config.wait` ran out; returns the last status and whether it completed.
    pub(crate) async fn drain(&self, config: &DrainConfig) -> Result<(DrainStatus, bool), DrainError> {
        let key = read_key(&config.key_file)?;
        let deadline = Instant::now() + config.wait;
        // The process's one HTTP client, built on first use (so not at all where no pod is
        // ever drained): no redirects, which the host's admin API never sends. reqwest needs
        // rustls' provider even for plain http.
        crate::telemetry::install_crypto_provider();
        let client = crate::storage::http::shared_client()
            .map_err(|e| DrainError::Unreachable { url: config.host.to_string(), problem: e.to_string() })?;
        let admin = |method: reqwest::Method, path: &'static str| {
            let url = endpoint(&config.host, path);
            let request =
                client.request(method.clone(), url.clone()).header(KEY_HEADER, &key).timeout(CALL_TIMEOUT);
            async move {
                let answer = request.send().await.map_err(|e| unreachable(&url, &e))?;
                if !answer.status().is_success() {
                    let status = answer.status().as_u16();
                    return Err(DrainError::Refused { what: format!("{method} /{path}"), status });
                }
                capped_body(answer).await.map_err(|e| unreachable(&url, &e))
            }
        };
        admin(reqwest::Method::POST, "admin/host/drain").await?;
        tracing::info!(host = %config.host, "drain started on the host; waiting for its running invocations");
        let mut last_logged: Option<DrainStatus> = None;
        loop {
            let body = admin(reqwest::Method::GET, "admin/host/drain/status").await?;
            let status: DrainStatus =
                serde_json::from_slice(&body).map_err(|e| DrainError::Status(e.to_string()))?;
            if status.state == "Completed" {
                return Ok((status, true));
            }
            if last_logged.as_ref() != Some(&status) {
                tracing::info!(
                    state = status.state,
                    outstanding_invocations = status.outstanding_invocations,
                    outstanding_retries = status.outstanding_retries,
                    "the host drains"
                );
                last_logged = Some(status.clone());
            }
            if Instant::now() + STATUS_EVERY > deadline {
                return Ok((status, false));
            }
            tokio::time::sleep(STATUS_EVERY).await;
        }
    }
}

/// `GET /drain`.
pub(crate) async fn handle(State(drainer): State<Drainer>, headers: HeaderMap) -> Response {
    let Some(config) = drainer.config.as_ref() else {
        return (StatusCode::NOT_FOUND, "no preStop drain is configured on this sidecar\n").into_response();
    };
    let given = headers.get(DRAIN_TOKEN_HEADER).map(|v| v.as_bytes()).unwrap_or_default();
    if !same(given, config.token.as_bytes()) {
        tracing::warn!("a /drain request without the pod's drain token: refused");
        drainer.metrics.count_drain("forbidden");
        return (StatusCode::FORBIDDEN, "the drain token is missing or wrong\n").into_response();
    }
    let started = Instant::now();
    let (status, result, host) = match drainer.drain(config).await {
        Ok((host, true)) => {
            tracing::info!(
                waited_ms = started.elapsed().as_millis() as u64,
                "the host drained: nothing runs"
            );
            drainer.metrics.count_drain("completed");
            (StatusCode::OK, "completed".to_owned(), Some(host))
        }
        Ok((host, false)) => {
            tracing::warn!(
                outstanding_invocations = host.outstanding_invocations,
                wait = ?config.wait,
                "the host still runs invocations and the drain wait ran out: letting the pod stop"
            );
            drainer.metrics.count_drain("wait_ran_out");
            (StatusCode::OK, "wait ran out".to_owned(), Some(host))
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot drain the host: the pod stops without it");
            drainer.metrics.count_drain("failed");
            (StatusCode::BAD_GATEWAY, e.to_string(), None)
        }
    };
    let outcome = Outcome { result, host, waited_ms: started.elapsed().as_millis() as u64 };
    (status, axum::Json(outcome)).into_response()
}

/// Equal byte strings, compared in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn read_key(path: &Path) -> Result<String, DrainError> {
    let problem = |problem: String| DrainError::Key { path: path.display().to_string(), problem };
    let key = std::fs::read_to_string(path).map_err(|e| problem(e.to_string()))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(problem("the file is empty".into()));
    }
    Ok(key.to_owned())
}

fn endpoint(host: &url::Url, path: &str) -> url::Url {
    let mut url = host.clone();
    url.set_path(&format!("{}/{path}", host.path().trim_end_matches('/')));
    url.set_query(None);
    url
}

fn unreachable(url: &url::Url, error: &reqwest::Error) -> DrainError {
    // Without the URL reqwest adds (ours is in the message already).
    let mut problem = error.to_string();
    if let Some(url) = error.url() {
        problem = problem.replace(&format!(" ({url})"), "");
    }
    DrainError::Unreachable { url: url.to_string(), problem }
}

async fn capped_body(mut answer: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = answer.chunk().await? {
        let room = ANSWER_MAX_BYTES.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= ANSWER_MAX_BYTES {
            break;
        }
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
        assert!(!same(b"", b"abc"));
    }

    #[test]
    fn the_host_paths_keep_a_base_path() {
        let base = url::Url::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(endpoint(&base, "admin/host/drain").as_str(), "http://127.0.0.1:8080/admin/host/drain");
        let base = url::Url::parse("http://127.0.0.1:8080/app/").unwrap();
        assert_eq!(
            endpoint(&base, "admin/host/drain/status").as_str(),
            "http://127.0.0.1:8080/app/admin/host/drain/status"
        );
    }

    #[test]
    fn the_hosts_status_json_reads_as_it_writes_it() {
        // As Newtonsoft writes DrainModeStatus (StringEnumConverter, JsonProperty names).
        let status: DrainStatus = serde_json::from_str(
            r#"{"state":"InProgress","outstandingInvocations":3,"outstandingRetries":0}"#,
        )
        .unwrap();
        assert_eq!(status.state, "InProgress");
        assert_eq!(status.outstanding_invocations, 3);
    }
}
