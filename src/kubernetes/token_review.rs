//! Who sent a report: the sidecar's bearer token is a projected service-account token with
//! audience [`TOKEN_AUDIENCE`] (the webhook asks for it); the API server checks it (TokenReview,
//! authentication.k8s.io/v1) and names the service account's namespace and, for a token bound
//! to a pod, the pod. Results are cached until the token expires, never beyond.
//!
//! Any doubt rejects: an API error, a review without the audience, a token that is not a
//! pod-bound service-account token. The aggregator's `sources::authorize` then checks that
//! the report speaks for the pod the token names.
//!
//! A pod's name can come back (a StatefulSet's pod is re-created under its name), and the API
//! server stops accepting a deleted pod's tokens at once, while this cache would not. So each
//! cached answer keeps the pod's uid (the review's `authentication.kubernetes.io/pod-uid`
//! extra, kubernetes `pkg/serviceaccount/util.go` `PodUIDKey`), and a review naming the same
//! namespace and pod with another uid drops every cached answer for the older pod: only one
//! pod holds a name at a time, so the older one is gone and its tokens must not speak for the
//! new one.
//!
//! The cache decides on the `now` it is given ([`TokenReviewAuthenticator::authenticate_at`]),
//! so its expiry rules are tested without waiting.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};
use prometheus_client::registry::Registry;
use sha2::{Digest, Sha256};

use super::metrics::{OutcomeCounter, outcome_labels};
use crate::aggregator::sources::{AuthError, BoxFuture, ReportAuthenticator, ReportIdentity};
use crate::clock::UnixMs;
use crate::contract::TOKEN_AUDIENCE;
/// The extra claim in which the API server names the pod a service-account token is bound to
/// (kubernetes `pkg/serviceaccount/util.go`, `PodNameKey`).
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// The extra claim with that pod's uid (`PodUIDKey`).
const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";
const DEFAULT_CACHE_MAX_AGE: Duration = Duration::from_secs(300);
const DEFAULT_CACHE_SIZE: usize = 10_000;

/// What one authentication ended in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Accepted from the cache, without asking the API server.
    CacheHit,
    /// Accepted after a TokenReview.
    Accepted,
    /// The call carried no token.
    MissingToken,
    /// The API server refused the token, or it is not a pod-bound token for our audience.
    Rejected,
    /// The TokenReview call itself failed; the report is rejected.
    ApiError,
}

outcome_labels!(Outcome { CacheHit => "cache_hit", Accepted => "accepted", MissingToken => "missing_token", Rejected => "rejected", ApiError => "api_error" });

/// A checked token: whose it is and until when that may be trusted.
#[derive(Debug, Clone)]
struct CachedIdentity {
    identity: ReportIdentity,
    /// The uid of the pod the token is bound to.
    pod_uid: String,
    valid_until: UnixMs,
}

/// [`ReportAuthenticator`] over the TokenReview API; see the module docs.
///
/// Plug it in as `Arc::new(TokenReviewAuthenticator::new(client)) as Arc<dyn
/// ReportAuthenticator>` (or [`super::KubeContext::authenticator`]).
pub struct TokenReviewAuthenticator {
    client: kube::Client,
    cache_max_age: Duration,
    cache_size: usize,
    /// Keyed by the token's SHA-256, so the cache holds no usable credentials.
    cache: Mutex<HashMap<[u8; 32], CachedIdentity>>,
    outcomes: OutcomeCounter<Outcome>,
}

impl TokenReviewAuthenticator {
    /// An authenticator that trusts a checked token for at most 5 minutes (and never past its
    /// expiry) and remembers at most 10 000 tokens.
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            cache_max_age: DEFAULT_CACHE_MAX_AGE,
            cache_size: DEFAULT_CACHE_SIZE,
            cache: Mutex::new(HashMap::new()),
            outcomes: OutcomeCounter::default(),
        }
    }

    /// Trusts a checked token for at most `max_age` (bounds how long a revoked token, for
    /// example of a deleted pod, keeps working); zero disables the cache.
    pub fn with_cache_max_age(mut self, max_age: Duration) -> Self {
        self.cache_max_age = max_age;
        self
    }

    /// Remembers at most `size` tokens (at least one).
    pub fn with_cache_size(mut self, size: usize) -> Self {
        self.cache_size = size.max(1);
        self
    }

    /// Adds `durable_scaler_aggregator_report_authentications_total{outcome}` to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        self.outcomes.register(
            registry,
            "durable_scaler_aggregator_report_authentications",
            "Report token checks by outcome (cache_hit, accepted, missing_token, rejected, api_error)",
        );
    }

    /// Checks `token` as [`ReportAuthenticator::authenticate`] does, at `now`: a cached answer
    /// is trusted only while `now` is before the token's expiry and the cache's maximum age.
    pub async fn authenticate_at(
        &self,
        token: Option<&str>,
        now: UnixMs,
    ) -> Result<ReportIdentity, AuthError> {
        let Some(token) = token.filter(|token| !token.is_empty()) else {
            self.outcomes.inc(Outcome::MissingToken);
            return Err(AuthError::Unauthenticated(
                "no bearer token: the sidecar must send its projected service-account token".into(),
            ));
        };
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(identity) = self.cached(&key, now) {
            self.outcomes.inc(Outcome::CacheHit);
            return Ok(identity);
        }
        let status = match self.review(token).await {
            Ok(status) => status,
            Err(error) => {
                self.outcomes.inc(Outcome::ApiError);
                tracing::warn!(%error, "TokenReview failed; rejecting the report");
                return Err(AuthError::Unauthenticated(format!("cannot check the token: {error}")));
            }
        };
        let (identity, pod_uid) = match identity_of(&status) {
            Ok(found) => found,
            Err(reason) => {
                self.outcomes.inc(Outcome::Rejected);
                return Err(AuthError::Unauthenticated(reason));
            }
        };
        self.outcomes.inc(Outcome::Accepted);
        self.forget_older_pods(&identity, &pod_uid);
        if let Some(expiry) = jwt_expiry(token) {
            let valid_until = expiry.min(now.plus(self.cache_max_age));
            if valid_until > now {
                self.remember(key, CachedIdentity { identity: identity.clone(), pod_uid, valid_until }, now);
            }
        }
        Ok(identity)
    }

    fn cached(&self, key: &[u8; 32], now: UnixMs) -> Option<ReportIdentity> {
        let mut cache = self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match cache.get(key) {
            Some(cached) if now < cached.valid_until => Some(cached.identity.clone()),
            Some(_) => {
                cache.remove(key);
                None
            }
            None => None,
        }
    }

    /// Drops the cached answers for `identity`'s namespace and pod name whose pod uid is not
    /// `pod_uid`: the pod they were bound to is gone (module docs).
    fn forget_older_pods(&self, identity: &ReportIdentity, pod_uid: &str) {
        let mut cache = self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        cache.retain(|_, cached| cached.identity != *identity || cached.pod_uid == pod_uid);
    }

    fn remember(&self, key: [u8; 32], cached: CachedIdentity, now: UnixMs) {
        let mut cache = self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if cache.len() >= self.cache_size && !cache.contains_key(&key) {
            cache.retain(|_, cached| now < cached.valid_until);
            // Still full of live tokens: give up the one that expires first.
            while cache.len() >= self.cache_size {
                let Some(first) = cache.iter().min_by_key(|(_, cached)| cached.valid_until).map(|(k, _)| *k)
                else {
                    break;
                };
                cache.remove(&first);
            }
        }
        cache.insert(key, cached);
    }

    async fn review(&self, token: &str) -> Result<TokenReviewStatus, kube::Error> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                audiences: Some(vec![TOKEN_AUDIENCE.to_owned()]),
                token: token.to_owned(),
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let reviewed = api.create(&PostParams::default(), &review).await?;
        Ok(reviewed.status.unwrap_or_default())
    }
}

impl ReportAuthenticator for TokenReviewAuthenticator {
    fn authenticate<'a>(
        &'a self,
        bearer_token: Option<&'a str>,
    ) -> BoxFuture<'a, Result<ReportIdentity, AuthError>> {
        Box::pin(self.authenticate_at(bearer_token, UnixMs::now()))
    }
}

/// The identity a successful review names and the uid of its pod, or why the review does not
/// make one.
fn identity_of(status: &TokenReviewStatus) -> Result<(ReportIdentity, String), String> {
    if status.authenticated != Some(true) {
        let why = status.error.as_deref().unwrap_or("the API server did not authenticate it");
        return Err(format!("token rejected: {why}"));
    }
    if !status.audiences.iter().flatten().any(|audience| audience == TOKEN_AUDIENCE) {
        return Err(format!("token rejected: it is not issued for the audience {TOKEN_AUDIENCE:?}"));
    }
    let user = status.user.as_ref();
    let username = user.and_then(|user| user.username.as_deref()).unwrap_or_default();
    let namespace = username
        .strip_prefix(SERVICE_ACCOUNT_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .map(|(namespace, _service_account)| namespace)
        .filter(|namespace| !namespace.is_empty())
        .ok_or_else(|| format!("token rejected: {username:?} is not a service account"))?;
    let extra = |key: &str| {
        user.and_then(|user| user.extra.as_ref())
            .and_then(|extra| extra.get(key))
            .and_then(|values| values.first())
            .filter(|value| !value.is_empty())
    };
    let pod_name = extra(POD_NAME_EXTRA)
        .ok_or("token rejected: it is not bound to a pod (use a projected service-account token)")?;
    // The API server names both or neither (`pkg/serviceaccount/claims.go`); a name without
    // its uid is a review this code cannot trust to tell pods apart.
    let pod_uid = extra(POD_UID_EXTRA).ok_or("token rejected: the review names the pod but not its uid")?;
    Ok((ReportIdentity { namespace: namespace.to_owned(), pod_name: pod_name.clone() }, pod_uid.clone()))
}

/// The `exp` claim of a JWT, read without checking the signature: the API server has just
/// verified the token, this only bounds how long its answer may be reused. `None` when the
/// token is not a JWT with a numeric `exp` (its review is then not cached).
fn jwt_expiry(token: &str) -> Option<UnixMs> {
    let payload = token.split('.').nth(1)?;
    let bytes =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = i64::try_from(claims.get("exp")?.as_u64()?).ok()?;
    Some(UnixMs(exp.checked_mul(1000)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;

    fn jwt(claims: &str) -> String {
        let encode = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.signature", encode(r#"{"alg":"RS256"}"#), encode(claims))
    }

    fn reviewed(username: &str, audiences: &[&str], pod: Option<&str>) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            user: Some(UserInfo {
                username: Some(username.into()),
                extra: pod.map(|pod| {
                    [
                        (POD_NAME_EXTRA.to_owned(), vec![pod.to_owned()]),
                        (POD_UID_EXTRA.to_owned(), vec![format!("uid-of-{pod}")]),
                    ]
                    .into()
                }),
                ..UserInfo::default()
            }),
            error: None,
        }
    }

    #[test]
    fn jwt_expiry_reads_the_exp_claim() {
        assert_eq!(jwt_expiry(&jwt(r#"{"exp":1700000000}"#)), Some(UnixMs(1_700_000_000_000)));
    }

    #[test]
    fn jwt_expiry_is_none_without_a_numeric_exp_or_for_garbage() {
        assert_eq!(jwt_expiry(&jwt(r#"{"sub":"x"}"#)), None);
        assert_eq!(jwt_expiry(&jwt(r#"{"exp":"soon"}"#)), None);
        assert_eq!(jwt_expiry("not-a-jwt"), None);
        assert_eq!(jwt_expiry("a.!!!.c"), None);
    }

    #[test]
    fn a_pod_bound_service_account_token_names_namespace_and_pod() {
        let status = reviewed("system:serviceaccount:apps:worker", &["durable-scaler"], Some("worker-1"));
        assert_eq!(
            identity_of(&status).unwrap(),
            (
                ReportIdentity { namespace: "apps".into(), pod_name: "worker-1".into() },
                "uid-of-worker-1".into()
            )
        );
    }

    #[test]
    fn a_review_naming_the_pod_without_its_uid_is_rejected() {
        let mut status = reviewed("system:serviceaccount:apps:worker", &["durable-scaler"], Some("worker-1"));
        if let Some(extra) = status.user.as_mut().and_then(|user| user.extra.as_mut()) {
            extra.remove(POD_UID_EXTRA);
        }
        assert!(identity_of(&status).unwrap_err().contains("uid"));
    }

    #[test]
    fn a_review_without_our_audience_is_rejected() {
        let status =
            reviewed("system:serviceaccount:apps:worker", &["https://kubernetes.default.svc"], Some("w"));
        assert!(identity_of(&status).unwrap_err().contains("audience"));
    }

    #[test]
    fn a_user_that_is_not_a_service_account_is_rejected() {
        let status = reviewed("alice", &["durable-scaler"], Some("w"));
        assert!(identity_of(&status).unwrap_err().contains("not a service account"));
    }

    #[test]
    fn a_token_not_bound_to_a_pod_is_rejected() {
        let status = reviewed("system:serviceaccount:apps:worker", &["durable-scaler"], None);
        assert!(identity_of(&status).unwrap_err().contains("not bound to a pod"));
    }

    #[test]
    fn an_unauthenticated_review_is_rejected_with_the_servers_reason() {
        let status = TokenReviewStatus {
            authenticated: Some(false),
            error: Some("token has expired".into()),
            ..TokenReviewStatus::default()
        };
        assert!(identity_of(&status).unwrap_err().contains("token has expired"));
    }
}
