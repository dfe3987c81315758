//! Every listener of the project (the webhook's HTTPS port, the aggregator's KEDA, report
//! and HTTP ports, the sidecar's HTTP port) serves through [`serve`]: one accept loop, TLS
//! when configured ([`crate::tls`]), HTTP/1 and HTTP/2 or HTTP/2 alone (hyper), and the same
//! bounds on what one peer can hold, whatever it sends or fails to read:
//!
//! - **connections**: at most [`Listener::max_connections`] at once, and never more than the
//!   process's descriptor limit allows ([`connection_limit`]; [`raise_descriptor_limit`]
//!   raises the soft limit to the hard one at start). At the limit the loop stops accepting
//!   (new connections wait in the kernel's backlog, holding none of our descriptors).
//! - **silent connections**: a connection that has not completed its TLS handshake and sent a
//!   first request within [`FIRST_REQUEST_TIMEOUT`] of being accepted is closed. hyper has
//!   no such bound before it knows HTTP/1 from HTTP/2 (hyper-util
//!   `src/server/conn/auto/mod.rs` reads the preface without a timer); HTTP/1 heads after
//!   the first are bounded by hyper's header read timeout.
//! - **requests**: each is read and answered within [`limits::REQUEST_TIMEOUT`] (until its
//!   response head for gRPC, as tonic's own `timeout` does; for the HTTP listeners the
//!   whole exchange, body included: an answer still unread by then closes its connection);
//!   the HTTP listeners' answers not yet taken by their readers share a byte budget
//!   ([`Listener::answer_budget_bytes`]; beyond it, 503).
//! - **HTTP/2 connections**: keepalive pings ([`KEEPALIVE_INTERVAL`], closed when one goes
//!   unanswered for [`KEEPALIVE_TIMEOUT`]), closed after [`IDLE_TIMEOUT`] without a request
//!   in flight, after [`MAX_CONNECTION_AGE`], and after the peer reset
//!   [`MAX_PEER_RESETS_PER_CONNECTION`] streams: each of those asks the peer to go (GOAWAY)
//!   and closes the connection [`CLOSE_GRACE`] later at the latest. The last bound is the one
//!   that holds against a peer that never grants connection-level flow-control window and
//!   resets its streams: h2 keeps a reset stream queued for send capacity until capacity
//!   comes (h2 `src/proto/streams/prioritize.rs`, `assign_connection_capacity` evicts it only
//!   then), about 300 bytes each, and neither h2 nor hyper counts such resets (h2 counts only
//!   those of streams not yet accepted), so [`PeerResets`] counts the RST_STREAM frames the
//!   peer sends. Streams reset before they were accepted and streams reset for protocol
//!   errors are bounded by h2's own limits ([`MAX_RESET_STREAMS`],
//!   [`MAX_LOCAL_ERROR_RESET_STREAMS`]).
//!
//! One path of a listener may be a **long request** ([`Listener::long_request`]): the
//! sidecar's `/drain`, which the kubelet's preStop hook calls and which answers only once the
//! app's host has drained, minutes later. Its answer may take the time given instead of
//! [`limits::REQUEST_TIMEOUT`], and its connection is not asked to go for its age while it
//! is in flight (the kubelet would take the close for the hook's end and stop the app).
//!
//! Requests carry a [`Draining`] extension: it turns true when their connection is asked to
//! go, so that long-lived streams (KEDA's StreamIsActive) can end cleanly before the close.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, Request, Response, StatusCode, Version, header};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::contract::limits::{self, HEADER_READ_TIMEOUT, MAX_HEADER_LIST_BYTES};
use crate::shutdown::Shutdown;
use crate::tls::ReloadingConfig;

/// A connection must have completed its TLS handshake and sent its first request (its
/// HTTP/1 head, or its HTTP/2 preface and first HEADERS) within this of being accepted.
pub(crate) const FIRST_REQUEST_TIMEOUT: Duration = HEADER_READ_TIMEOUT;
/// How often an HTTP/2 connection is pinged.
pub(crate) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// A ping unanswered this long closes the connection.
pub(crate) const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// A connection with no request in flight for this long is asked to go. KEDA calls every
/// polling interval and HPA sync, sidecars report every interval, Prometheus scrapes every
/// minute or more often.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// A connection is asked to go after this long, whatever it does (gRPC's
/// `MAX_CONNECTION_AGE`): clients reconnect, and what any slow leak in the HTTP/2 state of
/// one connection could hold is bounded in time.
pub(crate) const MAX_CONNECTION_AGE: Duration = Duration::from_secs(30 * 60);
/// How long a connection asked to go may finish what is in flight before it is closed.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(10);
/// Streams a peer may reset on one connection (RST_STREAM frames it sends) before the
/// connection is asked to go. Well-behaved clients reset few (a gRPC client cancelling a call
/// past its deadline); a peer that starves the connection's flow-control window and resets
/// its streams resets one per request.
pub(crate) const MAX_PEER_RESETS_PER_CONNECTION: u64 = 512;
/// How much of an HTTP answer is handed to hyper at a time: hyper asks for the next piece
/// only once the stream has send capacity for the last (hyper `src/proto/h2/mod.rs`,
/// `PipeToSendStream`), so an answer its reader does not take stays here, under the
/// listener's budget, and not in h2's send buffer.
const ANSWER_CHUNK_BYTES: usize = 16 * 1024;
/// h2's limit on streams the peer reset before they were accepted
/// (`max_pending_accept_reset_streams`); beyond it the connection is closed with GOAWAY.
pub(crate) const MAX_RESET_STREAMS: usize = 64;
/// h2's limit on streams reset by this side over a connection's life, refusals beyond
/// MAX_CONCURRENT_STREAMS included (h2 `src/proto/streams/streams.rs`,
/// `count_pending_refusal`); beyond it, GOAWAY. hyper's default, stated here: a client that
/// overruns the stream limit now and then must not lose its connection for it.
pub(crate) const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;
/// How long open connections get to finish after the shutdown signal (within the
/// supervisors' 5 s drain, so a listener that closes the stragglers itself still stops in
/// time).
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(4);
/// How long the accept loop pauses after a failed accept (out of descriptors and the like)
/// instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Descriptors kept for everything but accepted connections (storage and Kubernetes
/// clients, files, the listeners themselves), as a share of the limit: a quarter, at least
/// 64.
const RESERVED_DESCRIPTORS_MIN: u64 = 64;

/// What the requests of a listener speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// gRPC: HTTP/2 only; the request deadline runs to the response head (answers may be
    /// long-lived streams).
    Grpc,
    /// HTTP/1.1 and HTTP/2; the request deadline covers the whole exchange.
    Http,
}

/// One listener's settings.
#[derive(Debug, Clone)]
pub(crate) struct Listener {
    /// What logs call it (`KEDA gRPC`, `webhook HTTPS`).
    pub name: &'static str,
    /// What its requests speak.
    pub protocol: Protocol,
    /// HTTP/2 streams open at once on one connection.
    pub max_concurrent_streams: u32,
    /// Connections open at once (lowered by [`connection_limit`] to what the descriptor
    /// limit allows).
    pub max_connections: usize,
    /// [`Protocol::Http`]: bytes of answers their readers have not taken yet, over all
    /// connections.
    pub answer_budget_bytes: usize,
    /// TLS, with the interval its files are looked at; none: plain TCP.
    pub tls: Option<(Arc<ReloadingConfig>, Duration)>,
    /// A path whose answer may take up to the given time (module docs); none for most.
    pub long_request: Option<(&'static str, Duration)>,
}

/// Whether the connection a request came on has been asked to go (request extension).
#[derive(Debug, Clone)]
pub(crate) struct Draining(watch::Receiver<bool>);

impl Draining {
    /// Completes once the connection is asked to go (at once if it already was).
    pub(crate) async fn wait(&self) {
        let mut receiver = self.0.clone();
        let _ = receiver.wait_for(|draining| *draining).await;
    }
}

/// Raises the soft limit on open descriptors to the hard limit (Linux), so that the
/// listeners' connection limits ([`connection_limit`]) have room: container runtimes often
/// start processes with a soft limit of 1,024 under a much higher hard one. Returns the soft
/// limit in force.
pub(crate) fn raise_descriptor_limit() -> u64 {
    #[cfg(target_os = "linux")]
    {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit/setrlimit only read and write the struct given.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return 1024;
            }
            if limit.rlim_cur < limit.rlim_max {
                let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    limit = raised;
                }
            }
        }
        limit.rlim_cur
    }
    #[cfg(not(target_os = "linux"))]
    1024
}

/// The soft limit on open descriptors now.
fn descriptor_limit() -> u64 {
    #[cfg(target_os = "linux")]
    {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit only writes the struct given.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            return limit.rlim_cur;
        }
    }
    1024
}

/// `wanted` connections for one of `listeners` listeners of this process, lowered so that
/// all of them together stay below the descriptor limit with a quarter of it (at least
/// [`RESERVED_DESCRIPTORS_MIN`]) left for everything else.
pub(crate) fn connection_limit(wanted: usize, listeners: usize) -> usize {
    let descriptors = descriptor_limit();
    let reserved = (descriptors / 4).max(RESERVED_DESCRIPTORS_MIN);
    let share = descriptors.saturating_sub(reserved) / listeners.max(1) as u64;
    wanted.min(usize::try_from(share).unwrap_or(usize::MAX)).max(1)
}

/// What every connection of one listener shares.
struct Shared {
    name: &'static str,
    protocol: Protocol,
    builder: auto::Builder<TokioExecutor>,
    app: axum::Router,
    answers: Arc<Semaphore>,
    shutdown: Shutdown,
    force_close: watch::Receiver<bool>,
    long_request: Option<(&'static str, Duration)>,
}

/// Serves `app` on `listener` as `settings` say until `shutdown` fires, then lets open
/// connections finish for [`DRAIN_TIMEOUT`] and closes the rest. Returns once every
/// connection is closed.
pub(crate) async fn serve(
    listener: TcpListener,
    settings: Listener,
    app: axum::Router,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let watcher =
        settings.tls.as_ref().map(|(config, interval)| config.spawn_watcher(*interval, shutdown.clone()));
    let connections = Arc::new(Semaphore::new(settings.max_connections));
    let (force, force_close) = watch::channel(false);
    let shared = Arc::new(Shared {
        name: settings.name,
        protocol: settings.protocol,
        builder: builder(&settings),
        app,
        answers: Arc::new(Semaphore::new(settings.answer_budget_bytes)),
        shutdown: shutdown.clone(),
        force_close,
        long_request: settings.long_request,
    });
    loop {
        let permit = tokio::select! {
            _ = shutdown.wait() => break,
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let Some((tcp, peer)) = accept(&listener, &shutdown).await else { break };
        let acceptor = settings.tls.as_ref().map(|(config, _)| TlsAcceptor::from(config.current()));
        tokio::spawn(connection(tcp, peer, acceptor, shared.clone(), permit));
    }
    drop(listener);
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    let all = u32::try_from(settings.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(DRAIN_TIMEOUT, connections.acquire_many(all)).await.is_err() {
        tracing::debug!(
            listener = settings.name,
            "connections still open after the drain timeout; closing them"
        );
        force.send_replace(true);
        let _ = tokio::time::timeout(Duration::from_millis(500), connections.acquire_many(all)).await;
    }
    Ok(())
}

/// The next connection on `listener`, or `None` once `shutdown` fires. A failed accept (out
/// of file descriptors, say) is logged and retried after [`ACCEPT_BACKOFF`], never fatal.
async fn accept(listener: &TcpListener, shutdown: &Shutdown) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = shutdown.wait() => return None,
            accepted = listener.accept() => match accepted {
                Ok(pair) => return Some(pair),
                Err(e) => {
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
}

/// The hyper settings of a listener: HTTP/1 drops a client that has not sent a complete
/// request head within [`HEADER_READ_TIMEOUT`] (hyper enforces it only with a timer);
/// HTTP/2 announces MAX_CONCURRENT_STREAMS and a bounded header list, pings, and bounds
/// reset streams.
fn builder(settings: &Listener) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    if settings.protocol == Protocol::Grpc {
        builder = builder.http2_only();
    }
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.max_concurrent_streams)
        .max_header_list_size(MAX_HEADER_LIST_BYTES)
        .max_pending_accept_reset_streams(MAX_RESET_STREAMS)
        .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESET_STREAMS)
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    builder
}

/// One accepted connection: TLS if configured, then HTTP, within the bounds of the module
/// docs. `_permit` is its place under the listener's connection limit.
async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    _permit: OwnedSemaphorePermit,
) {
    // Answers are small single writes: without this, Nagle's algorithm holds the last
    // segment of a handshake or response until the peer's delayed ACK (~40 ms).
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(%peer, "cannot set TCP_NODELAY: {e}");
    }
    let first_request_by = Instant::now() + FIRST_REQUEST_TIMEOUT;
    match acceptor {
        None => http(tcp, peer, first_request_by, &shared).await,
        Some(acceptor) => match tokio::time::timeout_at(first_request_by, acceptor.accept(tcp)).await {
            Ok(Ok(stream)) => http(stream, peer, first_request_by, &shared).await,
            Ok(Err(e)) => tracing::debug!(%peer, listener = shared.name, "TLS handshake refused: {e}"),
            Err(_) => tracing::debug!(%peer, listener = shared.name, "TLS handshake timed out"),
        },
    }
}

/// Why a connection is asked to go.
#[derive(Debug, Clone, Copy)]
enum Close {
    Shutdown,
    Idle,
    Age,
    Resets,
}

/// Serves HTTP on `io` until the peer closes, a bound closes it, or the listener stops.
async fn http<I>(io: I, peer: SocketAddr, first_request_by: Instant, shared: &Shared)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let accepted = Instant::now();
    let state = Arc::new(ConnectionState::new(accepted));
    let service = ConnectionService {
        app: TowerToHyperService::new(shared.app.clone()),
        state: state.clone(),
        shared_answers: shared.answers.clone(),
        protocol: shared.protocol,
        long_request: shared.long_request,
    };
    let io = TokioIo::new(PeerResets::new(io, state.clone()));
    let connection = shared.builder.serve_connection(io, service);
    tokio::pin!(connection);
    let mut force_close = shared.force_close.clone();
    let mut closing_since: Option<Instant> = None;
    loop {
        let idle_check = state.idle_deadline();
        let close = tokio::select! {
            served = connection.as_mut() => {
                if let Err(e) = served {
                    tracing::debug!(%peer, listener = shared.name, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep_until(first_request_by), if !state.seen_request() => {
                if state.seen_request() {
                    continue;
                }
                tracing::debug!(%peer, listener = shared.name, "no request within {FIRST_REQUEST_TIMEOUT:?}: closed");
                return;
            }
            _ = tokio::time::sleep_until(closing_since.map_or(first_request_by, |at| at + CLOSE_GRACE)), if closing_since.is_some() => {
                tracing::debug!(%peer, listener = shared.name, "still open {CLOSE_GRACE:?} after being asked to go: closed");
                return;
            }
            _ = tokio::time::sleep_until(state.overdue_at()), if state.overdue_at_is_set() => {
                tracing::debug!(%peer, listener = shared.name, "an answer not taken within {:?}: closed", limits::REQUEST_TIMEOUT);
                return;
            }
            _ = force_close.wait_for(|force| *force) => return,
            // An exchange with a deadline started: look at the deadlines again.
            _ = state.deadline_added.notified() => continue,
            _ = shared.shutdown.wait(), if closing_since.is_none() => Close::Shutdown,
            _ = tokio::time::sleep_until(accepted + MAX_CONNECTION_AGE), if closing_since.is_none() && !state.long_in_flight() => Close::Age,
            _ = state.resets_too_many.notified(), if closing_since.is_none() => Close::Resets,
            _ = tokio::time::sleep_until(idle_check), if closing_since.is_none() => {
                if !state.is_idle_at(Instant::now()) {
                    continue;
                }
                Close::Idle
            }
        };
        tracing::debug!(%peer, listener = shared.name, reason = ?close, "asking the connection to go");
        connection.as_mut().graceful_shutdown();
        state.draining.send_replace(true);
        closing_since = Some(Instant::now());
    }
}

/// What one connection's requests tell its task.
struct ConnectionState {
    /// Requests received.
    requests: AtomicU64,
    /// Fired when the peer has reset [`MAX_PEER_RESETS_PER_CONNECTION`] streams.
    resets_too_many: Notify,
    /// Exchanges in flight, by id, with the time their answer must be taken by (for
    /// [`Protocol::Http`]; `None` for gRPC, whose streams may last).
    in_flight: Mutex<BTreeMap<u64, Option<Instant>>>,
    /// When the last exchange started or ended.
    last_activity: Mutex<Instant>,
    /// Fired when an exchange with a deadline starts.
    deadline_added: Notify,
    draining: watch::Sender<bool>,
    /// Long requests ([`Listener::long_request`]) in flight.
    long: AtomicU64,
}

impl ConnectionState {
    fn new(now: Instant) -> Self {
        Self {
            requests: AtomicU64::new(0),
            resets_too_many: Notify::new(),
            in_flight: Mutex::new(BTreeMap::new()),
            last_activity: Mutex::new(now),
            deadline_added: Notify::new(),
            draining: watch::Sender::new(false),
            long: AtomicU64::new(0),
        }
    }

    fn long_in_flight(&self) -> bool {
        self.long.load(Ordering::Relaxed) > 0
    }

    fn seen_request(&self) -> bool {
        self.requests.load(Ordering::Relaxed) > 0
    }

    fn touch(&self) {
        *self.last_activity.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }

    /// When to look again whether the connection is idle.
    fn idle_deadline(&self) -> Instant {
        *self.last_activity.lock().unwrap_or_else(PoisonError::into_inner) + IDLE_TIMEOUT
    }

    fn is_idle_at(&self, now: Instant) -> bool {
        self.in_flight.lock().unwrap_or_else(PoisonError::into_inner).is_empty()
            && now >= self.idle_deadline()
    }

    /// The earliest time an exchange in flight must have been answered by.
    fn overdue_at(&self) -> Instant {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .flatten()
            .min()
            .copied()
            .unwrap_or_else(|| Instant::now() + MAX_CONNECTION_AGE)
    }

    fn overdue_at_is_set(&self) -> bool {
        self.in_flight.lock().unwrap_or_else(PoisonError::into_inner).values().any(Option::is_some)
    }
}

/// One exchange in flight, from its request until hyper has taken its whole answer (or
/// dropped it, the stream gone): removed from its connection's state when dropped.
struct Exchange {
    state: Arc<ConnectionState>,
    id: u64,
}

impl Exchange {
    fn start(state: &Arc<ConnectionState>, deadline: Option<Instant>) -> Self {
        let id = state.requests.fetch_add(1, Ordering::Relaxed);
        state.in_flight.lock().unwrap_or_else(PoisonError::into_inner).insert(id, deadline);
        state.touch();
        if deadline.is_some() {
            state.deadline_added.notify_one();
        }
        Self { state: state.clone(), id }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.state.in_flight.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.id);
        self.state.touch();
    }
}

/// Counts the RST_STREAM frames an HTTP/2 peer sends, from the bytes hyper reads (after TLS),
/// and fires `resets_too_many` at [`MAX_PEER_RESETS_PER_CONNECTION`]. It reads frame headers
/// only (RFC 9113 section 4.1: 24 bytes of preface, then frames of a 9-byte header and a
/// payload of the length it gives); an HTTP/1 connection is recognised by its first bytes
/// and not looked at further.
pub(crate) struct PeerResets<I> {
    io: I,
    state: Arc<ConnectionState>,
    parser: FrameHeaders,
}

/// Where [`FrameHeaders`] is in the byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FramePosition {
    /// Matching the connection preface; the bytes matched so far.
    Preface(usize),
    /// Reading a frame header; its bytes read so far.
    Header(usize),
    /// Skipping a frame payload; its bytes left.
    Payload(usize),
    /// Not HTTP/2 (or a stream no longer followed).
    Off,
}

/// A minimal HTTP/2 frame-header reader: counts RST_STREAM frames.
#[derive(Debug)]
struct FrameHeaders {
    position: FramePosition,
    header: [u8; 9],
    resets: u64,
}

/// The client connection preface (RFC 9113 section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The RST_STREAM frame type (RFC 9113 section 6.4).
const RST_STREAM: u8 = 0x3;

impl FrameHeaders {
    fn new() -> Self {
        Self { position: FramePosition::Preface(0), header: [0; 9], resets: 0 }
    }

    /// Reads `bytes`, the next bytes from the peer; returns the RST_STREAM frames they end.
    fn feed(&mut self, mut bytes: &[u8]) -> u64 {
        let before = self.resets;
        while !bytes.is_empty() {
            match self.position {
                FramePosition::Off => break,
                FramePosition::Preface(matched) => {
                    let n = bytes.len().min(PREFACE.len() - matched);
                    if bytes[..n] != PREFACE[matched..matched + n] {
                        self.position = FramePosition::Off;
                        break;
                    }
                    bytes = &bytes[n..];
                    self.position = match matched + n {
                        24 => FramePosition::Header(0),
                        partial => FramePosition::Preface(partial),
                    };
                }
                FramePosition::Header(have) => {
                    let n = bytes.len().min(9 - have);
                    self.header[have..have + n].copy_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    if have + n < 9 {
                        self.position = FramePosition::Header(have + n);
                        continue;
                    }
                    if self.header[3] == RST_STREAM {
                        self.resets += 1;
                    }
                    let length = usize::from(self.header[0]) << 16
                        | usize::from(self.header[1]) << 8
                        | usize::from(self.header[2]);
                    self.position =
                        if length == 0 { FramePosition::Header(0) } else { FramePosition::Payload(length) };
                }
                FramePosition::Payload(left) => {
                    let n = bytes.len().min(left);
                    bytes = &bytes[n..];
                    self.position =
                        if left == n { FramePosition::Header(0) } else { FramePosition::Payload(left - n) };
                }
            }
        }
        self.resets - before
    }
}

impl<I> PeerResets<I> {
    fn new(io: I, state: Arc<ConnectionState>) -> Self {
        Self { io, state, parser: FrameHeaders::new() }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for PeerResets<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let filled = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let before = self.parser.resets;
            let ended = self.parser.feed(&buf.filled()[filled..]);
            if ended > 0
                && before < MAX_PEER_RESETS_PER_CONNECTION
                && self.parser.resets >= MAX_PEER_RESETS_PER_CONNECTION
            {
                self.state.resets_too_many.notify_one();
            }
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for PeerResets<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The per-connection hyper service: the listener's router, with the request deadline, the
/// [`Draining`] extension, the exchange's tracking and (HTTP listeners) the answer budget.
#[derive(Clone)]
struct ConnectionService {
    app: TowerToHyperService<axum::Router>,
    state: Arc<ConnectionState>,
    shared_answers: Arc<Semaphore>,
    protocol: Protocol,
    long_request: Option<(&'static str, Duration)>,
}

/// A long request in flight on its connection, until dropped.
struct LongRequest(Arc<ConnectionState>);

impl LongRequest {
    fn start(state: &Arc<ConnectionState>) -> Self {
        state.long.fetch_add(1, Ordering::Relaxed);
        Self(state.clone())
    }
}

impl Drop for LongRequest {
    fn drop(&mut self) {
        self.0.long.fetch_sub(1, Ordering::Relaxed);
    }
}

type ServiceFuture = Pin<Box<dyn std::future::Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for ConnectionService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ServiceFuture;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        let long = self.long_request.filter(|(path, _)| request.uri().path() == *path);
        let deadline = Instant::now() + long.map_or(limits::REQUEST_TIMEOUT, |(_, timeout)| timeout);
        let long = long.map(|_| LongRequest::start(&self.state));
        let exchange = Exchange::start(&self.state, (self.protocol == Protocol::Http).then_some(deadline));
        request.extensions_mut().insert(Draining(self.state.draining.subscribe()));
        let version = request.version();
        let answer = hyper::service::Service::call(&self.app, request);
        let (protocol, answers, state) = (self.protocol, self.shared_answers.clone(), self.state.clone());
        // A refusal (408, 503) is an answer of its own, tracked like any other: its client
        // has [`limits::REQUEST_TIMEOUT`] again to take it.
        let refusal = move |response: Response<Body>| {
            let (parts, body) = response.into_parts();
            let exchange = Exchange::start(&state, Some(Instant::now() + limits::REQUEST_TIMEOUT));
            Response::from_parts(parts, Body::new(TrackedBody { inner: body, _exchange: exchange }))
        };
        Box::pin(async move {
            let _long = long;
            let response = match tokio::time::timeout_at(deadline, answer).await {
                Ok(Ok(response)) => response,
                Ok(Err(never)) => match never {},
                Err(_) if protocol == Protocol::Grpc => return Ok(timed_out(protocol, version)),
                Err(_) => return Ok(refusal(timed_out(protocol, version))),
            };
            match protocol {
                Protocol::Grpc => {
                    Ok(response.map(|body| Body::new(TrackedBody { inner: body, _exchange: exchange })))
                }
                Protocol::Http => {
                    let (parts, body) = response.into_parts();
                    let bytes = match tokio::time::timeout_at(deadline, body.collect()).await {
                        Ok(Ok(collected)) => collected.to_bytes(),
                        Ok(Err(_)) | Err(_) => return Ok(refusal(timed_out(protocol, version))),
                    };
                    let permits = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
                    let Ok(permit) = answers.try_acquire_many_owned(permits) else {
                        return Ok(refusal(busy(version)));
                    };
                    let body = BudgetedBody { bytes, _permit: permit, _exchange: exchange };
                    Ok(Response::from_parts(parts, Body::new(body)))
                }
            }
        })
    }
}

/// The answer to a request not read and answered within [`limits::REQUEST_TIMEOUT`]: gRPC
/// CANCELLED "Timeout expired" as tonic's own timeout answers (tonic `src/status.rs`,
/// `TimeoutExpired`), else 408 closing an HTTP/1 connection (its request body may be unread).
fn timed_out(protocol: Protocol, version: Version) -> Response<Body> {
    match protocol {
        Protocol::Grpc => tonic::Status::cancelled(tonic::TimeoutExpired(()).to_string()).into_http(),
        Protocol::Http => {
            let mut response = Response::new(Body::from("request not read and answered in time\n"));
            *response.status_mut() = StatusCode::REQUEST_TIMEOUT;
            close_after(&mut response, version);
            response
        }
    }
}

/// The answer when the listener's answers in flight are over their budget.
fn busy(version: Version) -> Response<Body> {
    let mut response =
        Response::new(Body::from("busy: too many answers not yet read by their clients; retry\n"));
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    close_after(&mut response, version);
    response
}

/// Asks hyper to close an HTTP/1 connection after `response`; HTTP/2 ends just the stream.
fn close_after(response: &mut Response<Body>, version: Version) {
    if version < Version::HTTP_2 {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
}

/// An answer's body passed through (gRPC's, a refusal's): its exchange is in flight while
/// hyper holds it.
struct TrackedBody {
    inner: Body,
    _exchange: Exchange,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An HTTP answer held whole, with its share of the listener's answer budget, handed to
/// hyper [`ANSWER_CHUNK_BYTES`] at a time; its exchange is in flight until hyper has taken
/// the last piece (or dropped it, the peer gone).
struct BudgetedBody {
    bytes: Bytes,
    _permit: OwnedSemaphorePermit,
    _exchange: Exchange,
}

impl hyper::body::Body for BudgetedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if self.bytes.is_empty() {
            return Poll::Ready(None);
        }
        let n = self.bytes.len().min(ANSWER_CHUNK_BYTES);
        Poll::Ready(Some(Ok(Frame::data(self.bytes.split_to(n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.bytes.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.bytes.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_limits_stay_below_the_descriptor_limit() {
        let descriptors = descriptor_limit();
        let three = connection_limit(usize::MAX, 3);
        assert!((three as u64) * 3 < descriptors, "{three} x 3 under {descriptors}");
        assert_eq!(connection_limit(5, 3), 5, "a smaller wish is kept");
    }

    /// An HTTP/2 frame header: `length` bytes of payload, `kind`, on stream 1.
    fn frame(kind: u8, length: usize) -> Vec<u8> {
        let mut frame = vec![(length >> 16) as u8, (length >> 8) as u8, length as u8, kind, 0, 0, 0, 0, 1];
        frame.resize(9 + length, 0xff);
        frame
    }

    #[test]
    fn resets_are_counted_frame_by_frame_however_the_bytes_are_split() {
        let mut stream = PREFACE.to_vec();
        for _ in 0..5 {
            stream.extend(frame(0x1, 40)); // HEADERS
            stream.extend(frame(0x0, 70_000)); // DATA
            stream.extend(frame(RST_STREAM, 4));
        }
        stream.extend(frame(0x4, 0)); // an empty SETTINGS
        for piece in [1, 7, 9, 4096, stream.len()] {
            let mut parser = FrameHeaders::new();
            let counted: u64 = stream.chunks(piece).map(|chunk| parser.feed(chunk)).sum();
            assert_eq!(counted, 5, "read {piece} bytes at a time");
            assert_eq!(parser.position, FramePosition::Header(0));
        }
    }

    #[test]
    fn an_http1_connection_is_not_followed() {
        let mut parser = FrameHeaders::new();
        let mut request = b"GET / HTTP/1.1\r\n\r\n".to_vec();
        request.extend(frame(RST_STREAM, 4));
        assert_eq!(parser.feed(&request), 0);
        assert_eq!(parser.position, FramePosition::Off);
    }
}
