//! The HTTP client every storage call goes through: one per process, and a cap on what one
//! answer may hold.
//!
//! **One client.** The Azure SDK builds a new `reqwest` client wherever it is given none
//! (`Transport::default`, typespec_client_core `src/http/options/transport.rs`), and that
//! build panics when it fails (`new_reqwest_client`, `src/http/clients/reqwest.rs`:
//! `.expect("failed to build reqwest client")`). It fails when the process is out of file
//! descriptors: `rustls-platform-verifier` reads the system's CA files then and loads none
//! ("No CA certificates were loaded from the system",
//! rustls-platform-verifier `src/verification/others.rs`). So the client is built here,
//! once, with its error returned as a [`StorageError`]; every account, pipeline and
//! credential of the process is given it (clones share one connection pool), and no SDK
//! code path is left to build its own.
//!
//! **A cap per answer.** [`CappedTransport`] sends through that client and stops reading an
//! answer beyond the bytes its service can legitimately send (module constants below): the
//! SDK otherwise collects whatever arrives (`AsyncResponseBody::collect`,
//! typespec_client_core `src/http/response.rs`), and a storage endpoint is whatever the
//! connection string names. An answer over the cap fails as a non-transient error, so it
//! is not retried.

use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use azure_core::{
    Bytes,
    error::ErrorKind,
    http::{
        AsyncRawResponse, Body, HttpClient, Method, Request, StatusCode,
        headers::{HeaderName, HeaderValue, Headers},
    },
};
use futures::{Stream, StreamExt, TryStreamExt};

use super::StorageError;

/// The most a Queue service answer may hold: a peek of 32 messages, each at most 64 KiB of
/// message text (the service's limit), with its XML envelope (about 300 bytes a message).
pub(crate) const QUEUE_ANSWER_MAX_BYTES: usize = 2 * 1024 * 1024 + 64 * 1024;
/// The most a Blob service answer may hold: a listing page of at most
/// [`LISTING_PAGE_SIZE`] lease blobs with their properties (about 1 KiB each), or a lease
/// blob or `taskhub.json` (a few hundred bytes).
pub(crate) const BLOB_ANSWER_MAX_BYTES: usize = 256 * 1024;
/// The most a Table service answer may hold: the `{hub}Partitions` table's rows, one per
/// partition (16 at most, under 1 KiB each), or an Entra ID token answer.
pub(crate) const TABLE_ANSWER_MAX_BYTES: usize = 64 * 1024;
/// Entries asked for per listing page (`maxresults`): a hub has at most 16 lease blobs and 17
/// queues.
pub(crate) const LISTING_PAGE_SIZE: i32 = 64;
/// Listing pages followed at most: four pages of [`LISTING_PAGE_SIZE`] are far more than a
/// hub's resources, and an endpoint that answers every page with a continuation marker
/// must not keep a reader asking for ever.
pub(crate) const LISTING_MAX_PAGES: usize = 4;

/// How long a new connection to storage may take (the SDK's own default is 20 s; each
/// attempt is bounded by `StorageOptions::attempt_timeout` anyway).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle connections kept per storage host: a probe round reads up to 17 queues at once.
const POOL_IDLE_PER_HOST: usize = 32;

/// The process's storage HTTP client, built on first use; the sidecar's preStop drain calls
/// the Functions host's admin API with it too (src/sidecar/drain.rs). A failed build is
/// returned (and tried again on the next call), never a panic.
pub(crate) fn shared_client() -> Result<reqwest::Client, StorageError> {
    static CLIENT: Mutex<Option<reqwest::Client>> = Mutex::new(None);
    let mut client = CLIENT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(client) = client.as_ref() {
        return Ok(client.clone());
    }
    // The settings of the SDK's own client (typespec_client_core
    // `src/http/clients/reqwest.rs` `new_reqwest_client`): no redirects, which the storage
    // REST API does not use, so an endpoint cannot bounce a signed request elsewhere.
    let built = reqwest::ClientBuilder::new()
        .connect_timeout(CONNECT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(POOL_IDLE_PER_HOST)
        .build()
        .map_err(|e| StorageError::Unreachable {
            resource: "the storage HTTP client".into(),
            message: format!("cannot build it: {}", super::brief(&e)),
        })?;
    *client = Some(built.clone());
    Ok(built)
}

/// An azure_core transport over the shared client that reads at most `limit` bytes of an
/// answer.
#[derive(Debug, Clone)]
pub(crate) struct CappedTransport {
    client: reqwest::Client,
    limit: usize,
}

impl CappedTransport {
    pub(crate) fn new(client: reqwest::Client, limit: usize) -> Self {
        Self { client, limit }
    }
}

/// The error an answer over its cap ends with: not transient (the retry policy retries only
/// `Io` and `Connection`, typespec_client_core `src/http/policies/retry/mod.rs`).
fn over_cap(limit: usize) -> azure_core::Error {
    azure_core::Error::with_message(
        ErrorKind::DataConversion,
        format!("the answer is over {limit} bytes, more than this call can return: not read further"),
    )
}

// Mirrors typespec_client_core `src/http/clients/reqwest.rs` (`impl HttpClient for
// reqwest::Client`), with the cap, and with transport errors stripped of their URL: a
// shared access signature travels in the query string.
#[async_trait::async_trait]
impl HttpClient for CappedTransport {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        let method = match request.method() {
            Method::Delete => reqwest::Method::DELETE,
            Method::Get => reqwest::Method::GET,
            Method::Head => reqwest::Method::HEAD,
            Method::Patch => reqwest::Method::PATCH,
            Method::Post => reqwest::Method::POST,
            Method::Put => reqwest::Method::PUT,
            other => {
                return Err(azure_core::Error::with_message(
                    ErrorKind::Other,
                    format!("HTTP method {other:?} is not sent by this client"),
                ));
            }
        };
        let mut builder = self.client.request(method, request.url().clone());
        for (name, value) in request.headers().iter() {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let builder = match request.body() {
            Body::Bytes(bytes) => builder.body(bytes.clone()),
            Body::SeekableStream(_) => {
                return Err(azure_core::Error::with_message(
                    ErrorKind::Other,
                    "streamed request bodies are not sent by this client",
                ));
            }
        };
        let response = builder.send().await.map_err(|e| {
            let kind = if e.is_connect() { ErrorKind::Connection } else { ErrorKind::Io };
            azure_core::Error::with_error(kind, e.without_url(), "the request failed")
        })?;
        let status = StatusCode::from(response.status().as_u16());
        let headers: Headers = response
            .headers()
            .iter()
            .filter_map(|(name, value)| {
                let value = value.to_str().ok()?;
                Some((HeaderName::from(name.as_str().to_owned()), HeaderValue::from(value.to_owned())))
            })
            .collect::<std::collections::HashMap<_, _>>()
            .into();
        // A declared length over the cap is refused before a byte of the body is read.
        if response.content_length().is_some_and(|n| n > self.limit as u64) {
            return Err(over_cap(self.limit));
        }
        let limit = self.limit;
        let body = capped(
            response.bytes_stream().map_err(|e| {
                azure_core::Error::with_error(ErrorKind::Io, e.without_url(), "reading the answer failed")
            }),
            limit,
        );
        Ok(AsyncRawResponse::new(status, headers, Box::pin(body)))
    }
}

/// `body`, ending with [`over_cap`] once more than `limit` bytes came.
fn capped(
    body: impl Stream<Item = azure_core::Result<Bytes>> + Send + 'static,
    limit: usize,
) -> impl Stream<Item = azure_core::Result<Bytes>> + Send + 'static {
    let mut body = Box::pin(body);
    let mut seen = 0usize;
    let mut failed = false;
    futures::stream::poll_fn(move |cx| {
        if failed {
            return Poll::Ready(None);
        }
        match body.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                seen = seen.saturating_add(chunk.len());
                if seen > limit {
                    failed = true;
                    Poll::Ready(Some(Err(over_cap(limit))))
                } else {
                    Poll::Ready(Some(Ok(chunk)))
                }
            }
            other => other,
        }
    })
}

/// The transport for `limit`: the shared client, capped.
pub(crate) fn transport(client: &reqwest::Client, limit: usize) -> azure_core::http::Transport {
    azure_core::http::Transport::new(Arc::new(CappedTransport::new(client.clone(), limit)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_body_is_cut_off_past_its_cap_and_not_read_further() {
        let chunks = (0..10).map(|_| Ok(Bytes::from(vec![b'x'; 1000])));
        let mut body = Box::pin(capped(futures::stream::iter(chunks), 2500));
        let mut read = 0;
        let error = loop {
            match body.next().await {
                Some(Ok(chunk)) => read += chunk.len(),
                Some(Err(e)) => break e,
                None => panic!("ended without the cap"),
            }
        };
        assert_eq!(read, 2000);
        assert!(error.to_string().contains("over 2500 bytes"), "{error}");
        assert!(body.next().await.is_none(), "nothing after the error");
    }

    #[tokio::test]
    async fn a_body_within_its_cap_is_read_whole() {
        let chunks = (0..3).map(|_| Ok(Bytes::from(vec![b'x'; 1000])));
        let body: Vec<Bytes> = capped(futures::stream::iter(chunks), 3000).try_collect().await.unwrap();
        assert_eq!(body.iter().map(Bytes::len).sum::<usize>(), 3000);
    }
}
