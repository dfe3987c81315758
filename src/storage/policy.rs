//! azure_core pipeline policies the official storage crates lack: Shared Key signing (Blob and
//! Queue variant, and the Table service's variant), SAS tokens, a per-attempt timeout, and a
//! request counter (how many HTTP calls one poll costs).
//!
//! All are per-try policies (`ClientOptions::per_try_policies`): a retried request is signed
//! again with a fresh `x-ms-date`, and each attempt has its own deadline.

// azure_core's `Policy::send` (an async_trait) is declared with `&Context`; writing
// `Context<'_>` here makes the lifetimes differ from the trait's.
#![allow(elided_lifetimes_in_paths)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use azure_core::{
    error::ErrorKind,
    http::{Context, Request, Url, headers::HeaderName, policies::Policy, policies::PolicyResult},
};
use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Which canonical string Shared Key signs: Blob and Queue share one, the Table service
/// has its own shorter one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SharedKeyService {
    /// Blob and Queue services.
    BlobOrQueue,
    /// Table service.
    Table,
}

/// Signs every attempt with the account key (`Authorization: SharedKey account:signature`).
pub(crate) struct SharedKeyPolicy {
    account: String,
    key: Vec<u8>,
    service: SharedKeyService,
}

impl std::fmt::Debug for SharedKeyPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("SharedKeyPolicy")
            .field("account", &self.account)
            .field("service", &self.service)
            .finish()
    }
}

impl SharedKeyPolicy {
    pub(crate) fn new(account: &str, key: &[u8], service: SharedKeyService) -> Self {
        Self { account: account.to_string(), key: key.to_vec(), service }
    }

    fn sign(&self, string_to_sign: &str) -> String {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(string_to_sign.as_bytes());
        BASE64.encode(mac.finalize().into_bytes())
    }
}

#[async_trait::async_trait]
impl Policy for SharedKeyPolicy {
    async fn send(&self, ctx: &Context, request: &mut Request, next: &[Arc<dyn Policy>]) -> PolicyResult {
        request.insert_header("x-ms-date", rfc1123_now());
        let content_length = request.body().len().unwrap_or(0);
        let to_sign = match self.service {
            SharedKeyService::BlobOrQueue => {
                blob_queue_string_to_sign(&self.account, request, content_length)
            }
            SharedKeyService::Table => table_string_to_sign(&self.account, request),
        };
        request.insert_header("authorization", format!("SharedKey {}:{}", self.account, self.sign(&to_sign)));
        next[0].send(ctx, request, &next[1..]).await
    }
}

fn header<'a>(request: &'a Request, name: &'static str) -> &'a str {
    request.headers().get_optional_str(&HeaderName::from_static(name)).unwrap_or("")
}

/// The Blob/Queue Shared Key string (service version 2015-02-21 and later: a zero
/// Content-Length is signed as the empty string).
pub(crate) fn blob_queue_string_to_sign(account: &str, request: &Request, content_length: u64) -> String {
    let length = if content_length == 0 { String::new() } else { content_length.to_string() };
    let mut s = format!(
        "{}\n{}\n{}\n{}\n{}\n{}\n\n{}\n{}\n{}\n{}\n{}\n",
        request.method().as_ref(),
        header(request, "content-encoding"),
        header(request, "content-language"),
        length,
        header(request, "content-md5"),
        header(request, "content-type"),
        header(request, "if-modified-since"),
        header(request, "if-match"),
        header(request, "if-none-match"),
        header(request, "if-unmodified-since"),
        header(request, "range"),
    );
    let mut ms_headers: Vec<(String, String)> = request
        .headers()
        .iter()
        .filter(|(name, _)| name.as_str().to_ascii_lowercase().starts_with("x-ms-"))
        .map(|(name, value)| (name.as_str().to_ascii_lowercase(), value.as_str().trim().to_string()))
        .collect();
    ms_headers.sort();
    for (name, value) in ms_headers {
        s.push_str(&format!("{name}:{value}\n"));
    }
    s.push_str(&format!("/{account}{}", request.url().path()));
    let mut params: Vec<(String, String)> =
        request.url().query_pairs().map(|(k, v)| (k.to_ascii_lowercase(), v.into_owned())).collect();
    params.sort();
    let mut i = 0;
    while i < params.len() {
        let name = params[i].0.clone();
        let values: Vec<&str> =
            params[i..].iter().take_while(|(k, _)| *k == name).map(|(_, v)| v.as_str()).collect();
        i += values.len();
        s.push_str(&format!("\n{name}:{}", values.join(",")));
    }
    s
}

/// The Table service's Shared Key string: verb, Content-MD5, Content-Type, date, and the
/// resource with only the `comp` query parameter.
pub(crate) fn table_string_to_sign(account: &str, request: &Request) -> String {
    let mut resource = format!("/{account}{}", request.url().path());
    if let Some((_, comp)) = request.url().query_pairs().find(|(k, _)| k == "comp") {
        resource.push_str(&format!("?comp={comp}"));
    }
    format!(
        "{}\n{}\n{}\n{}\n{}",
        request.method().as_ref(),
        header(request, "content-md5"),
        header(request, "content-type"),
        header(request, "x-ms-date"),
        resource
    )
}

/// The current time as HTTP wants it: `Sun, 29 Nov 2026 09:05:38 GMT`.
fn rfc1123_now() -> String {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    time::OffsetDateTime::now_utc().format(&format).unwrap_or_default()
}

/// Appends a shared access signature's query parameters to every request URL.
pub(crate) struct SasPolicy {
    pairs: Vec<(String, String)>,
}

impl std::fmt::Debug for SasPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SasPolicy { .. }")
    }
}

impl SasPolicy {
    /// `sas` without a leading `?`, e.g. `sv=...&sig=...`.
    pub(crate) fn new(sas: &str) -> Self {
        let pairs =
            url::form_urlencoded::parse(sas.trim_start_matches('?').as_bytes()).into_owned().collect();
        Self { pairs }
    }
}

#[async_trait::async_trait]
impl Policy for SasPolicy {
    async fn send(&self, ctx: &Context, request: &mut Request, next: &[Arc<dyn Policy>]) -> PolicyResult {
        // A retried request already carries the signature.
        if !request.url().query_pairs().any(|(k, _)| k == "sig") {
            append_pairs(request.url_mut(), &self.pairs);
        }
        next[0].send(ctx, request, &next[1..]).await
    }
}

fn append_pairs(url: &mut Url, pairs: &[(String, String)]) {
    let mut query = url.query_pairs_mut();
    for (k, v) in pairs {
        query.append_pair(k, v);
    }
}

/// Bounds one attempt. A timed-out attempt fails as an I/O error, which the retry policy
/// treats as transient.
#[derive(Debug)]
pub(crate) struct AttemptTimeoutPolicy {
    pub(crate) timeout: Duration,
}

#[async_trait::async_trait]
impl Policy for AttemptTimeoutPolicy {
    async fn send(&self, ctx: &Context, request: &mut Request, next: &[Arc<dyn Policy>]) -> PolicyResult {
        match tokio::time::timeout(self.timeout, next[0].send(ctx, request, &next[1..])).await {
            Ok(result) => result,
            Err(_) => Err(azure_core::Error::with_message(
                ErrorKind::Io,
                format!("no answer within {} ms", self.timeout.as_millis()),
            )),
        }
    }
}

/// Counts every HTTP attempt (retries included) made through an account.
#[derive(Debug)]
pub(crate) struct CountingPolicy {
    pub(crate) count: Arc<AtomicU64>,
}

#[async_trait::async_trait]
impl Policy for CountingPolicy {
    async fn send(&self, ctx: &Context, request: &mut Request, next: &[Arc<dyn Policy>]) -> PolicyResult {
        self.count.fetch_add(1, Ordering::Relaxed);
        next[0].send(ctx, request, &next[1..]).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use azure_core::http::Method;

    #[test]
    fn blob_queue_string_signs_ms_headers_sorted_and_query_parameters_grouped() {
        let url = Url::parse(
            "http://127.0.0.1:10001/devstoreaccount1/hub-control-00/messages?peekonly=true&numofmessages=32",
        )
        .unwrap();
        let mut request = Request::new(url, Method::Get);
        request.insert_header("x-ms-version", "2026-04-06");
        request.insert_header("x-ms-date", "Sun, 29 Nov 2026 09:05:38 GMT");
        let s = blob_queue_string_to_sign("devstoreaccount1", &request, 0);
        assert_eq!(
            s,
            "GET\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:Sun, 29 Nov 2026 09:05:38 GMT\nx-ms-version:2026-04-06\n/devstoreaccount1/devstoreaccount1/hub-control-00/messages\nnumofmessages:32\npeekonly:true"
        );
    }

    #[test]
    fn table_string_keeps_only_comp_of_the_query() {
        let url = Url::parse("https://a.table.core.windows.net/HubPartitions()?$top=5").unwrap();
        let mut request = Request::new(url, Method::Get);
        request.insert_header("x-ms-date", "Sun, 29 Nov 2026 09:05:38 GMT");
        assert_eq!(
            table_string_to_sign("a", &request),
            "GET\n\n\nSun, 29 Nov 2026 09:05:38 GMT\n/a/HubPartitions()"
        );
    }

    #[test]
    fn date_is_rfc1123_in_gmt() {
        let d = rfc1123_now();
        assert!(d.ends_with(" GMT") && d.len() == 29, "{d}");
    }
}
