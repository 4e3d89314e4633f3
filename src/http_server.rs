//! The accept loop of every Shoal HTTP server, with its limits against slow and hostile
//! clients: a cap on open connections, a deadline for each request head, and a body that
//! must keep arriving. `axum::serve` offers none of these (it sets no timer, so hyper's
//! header timeout is off), so connections are served with hyper's HTTP/1 builder directly.
//!
//! One client address may hold only part of the connections (`max_connections_per_address`).
//!
//! Together with uploads that never wait for the network on a blocking thread, these keep a
//! server answering while clients trickle bytes: a trickling body fails after one window
//! (its upload session stays resumable), a half-sent head is dropped after
//! `header_read_timeout`, a response the client stops reading is dropped after
//! `send_idle_timeout` (with what it held: an agent's blob stays pinned against eviction while
//! it is served), and a connection flood queues in the kernel's backlog instead of
//! exhausting file descriptors.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::body::{Body, Bytes};
use axum::Router;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use shoal_p2p::inbound::AddressSlots;
use shoal_registry::identity::TransportIdentity;
use shoal_tls::TlsAcceptor;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;

/// Default cap on open connections per listener. Far above the requests served at once
/// (`max_concurrent_requests`, 1024) so idle keep-alive connections do not count against
/// them; at the cap the server stops accepting until a connection closes.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default cap on open connections from one client address (an IPv4 address, an IPv6 /64)
/// per listener: a quarter of [`DEFAULT_MAX_CONNECTIONS`], so one host that opens idle
/// connections (each may hold a half-sent head of up to hyper's 400 KiB buffer for
/// `header_read_timeout`) cannot take them all, while a load balancer or a node's containerd,
/// which bring many clients from one address, still get plenty.
pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 1024;
/// Default time a client has to send a whole request head, also how long an idle
/// keep-alive connection stays open (hyper's own default).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default window over which a request body's progress is judged.
pub const DEFAULT_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default slowest accepted request body, in bytes per second averaged over a window: far
/// below any real link, far above a byte a second.
pub const DEFAULT_BODY_MIN_RATE: u64 = 1024;
/// Default time a response may wait for the client to take another byte (as nginx's
/// `send_timeout`): a client whose receive window stays shut this long has stopped reading.
pub const DEFAULT_SEND_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Default time `/readyz` answers 503 before the listener closes. Zero: a process outside
/// Kubernetes stops at once; the Helm chart sets a few seconds.
pub const DEFAULT_DRAIN_DELAY: Duration = Duration::ZERO;
/// Default time requests in flight get to finish once the listener is closed: below
/// Kubernetes' default 30 s grace period, so the process exits before it is killed.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a TLS handshake may take when requests heads have no deadline.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Fewest seconds between two log lines about connections refused for their address.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// How long the accept loop pauses after an error that is not one connection's (out of file
/// descriptors, say), so it does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Limits of one HTTP server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections open at once; at the cap, accepting waits for one to close.
    pub max_connections: usize,
    /// Connections open at once from one client address; more are closed as soon as they
    /// are accepted.
    pub max_connections_per_address: usize,
    /// A request head not complete this long after its first byte (or after the previous
    /// response, on a keep-alive connection) closes the connection. Zero: no limit.
    pub header_read_timeout: Duration,
    /// A request body must bring at least `body_min_rate` bytes per second, and at least one
    /// byte, in every window of this length while the server waits for it; otherwise the
    /// request fails with a `TimedOut` error. Zero: no limit.
    pub body_idle_timeout: Duration,
    /// Bytes per second; see `body_idle_timeout`.
    pub body_min_rate: u64,
    /// A write to the client that makes no progress this long closes the connection, and with
    /// it the response and whatever it held. Zero: no limit.
    pub send_idle_timeout: Duration,
    /// After the process is asked to stop, `/readyz` answers 503 this long before the listener
    /// closes (time for load balancers and Kubernetes endpoints to stop sending).
    pub drain_delay: Duration,
    /// Then requests in flight get this long to finish; connections still open after it are
    /// dropped.
    pub shutdown_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_address: DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            body_idle_timeout: DEFAULT_BODY_IDLE_TIMEOUT,
            body_min_rate: DEFAULT_BODY_MIN_RATE,
            send_idle_timeout: DEFAULT_SEND_IDLE_TIMEOUT,
            drain_delay: DEFAULT_DRAIN_DELAY,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
        }
    }
}

impl HttpLimits {
    /// Bytes a body must bring in each window.
    fn min_window_bytes(&self) -> u64 {
        let per_window = (self.body_min_rate as f64 * self.body_idle_timeout.as_secs_f64()) as u64;
        per_window.max(1)
    }
}

/// Serve `app` on `listener` until `shutdown` resolves; then stop accepting, let every open
/// connection finish its request in flight (within `shutdown_timeout`), and return.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let per_address = AddressSlots::new(limits.max_connections_per_address);
    let mut refusals_logged: Option<tokio::time::Instant> = None;
    // `true` asks every connection to finish; each holds a `done` receiver until it ends.
    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, done_rx) = watch::channel(());
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit,
            () = &mut shutdown => break,
        };
        // The semaphore is never closed.
        let Ok(permit) = permit else { break };
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(address_slot) = per_address.take_address(remote.ip()) else {
            if refusals_logged.is_none_or(|at| at.elapsed() >= REFUSAL_LOG_EVERY) {
                refusals_logged = Some(tokio::time::Instant::now());
                tracing::warn!(
                    %remote,
                    cap = limits.max_connections_per_address,
                    "connections refused: too many from one address (limits.max_connections_per_address; raise it behind a load balancer that hides client addresses)"
                );
            }
            continue;
        };
        let (app, stop, done, tls) = (app.clone(), stop_rx.clone(), done_rx.clone(), tls.clone());
        tokio::spawn(async move {
            match tls {
                None => serve_connection(stream, remote, false, None, app, limits, stop).await,
                Some(acceptor) => {
                    // The handshake counts against the head's deadline: a client that opens
                    // a connection and says nothing holds a slot no longer than one that
                    // sends half a request head.
                    let deadline = nonzero(limits.header_read_timeout).unwrap_or(TLS_HANDSHAKE_TIMEOUT);
                    match tokio::time::timeout(deadline, acceptor.accept(shoal_tls::buffered(stream))).await {
                        Ok(Ok(mut stream)) => {
                            stream.get_mut().0.grow_when_busy();
                            let identity = shoal_tls::identity_of(stream.get_ref().1)
                                .map(|id| (id, shoal_tls::identity_expires(stream.get_ref().1)));
                            serve_connection(stream, remote, true, identity, app, limits, stop).await;
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
            }
            drop((permit, address_slot, done));
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(done_rx);
    if tokio::time::timeout(limits.shutdown_timeout, done_tx.closed()).await.is_err() {
        tracing::warn!(
            open = done_tx.receiver_count(),
            timeout = ?limits.shutdown_timeout,
            "requests still in flight at the shutdown deadline: dropping their connections"
        );
    }
}

/// An accept error: one connection's (reset before it was accepted) is skipped; anything
/// else (no file descriptors left) pauses the loop.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(e.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset) {
        return;
    }
    tracing::error!(error = %e, "accepting a connection failed; pausing");
    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
}

/// Serve one connection. Every request carries the client's address (axum's
/// `ConnectInfo`) and `identity`, what its TLS client certificate proved, if anything. On a
/// TLS connection `X-Forwarded-Proto` is set to `https`: this server is where TLS ends, and
/// URLs it builds for the client (the token realm) must say so; on a plain one a proxy in
/// front that ended TLS may have set it.
async fn serve_connection<S>(
    stream: S,
    remote: std::net::SocketAddr,
    tls: bool,
    identity: Option<(TransportIdentity, Option<SystemTime>)>,
    app: Router,
    limits: HttpLimits,
    mut stop: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // Whether a node would have shown its certificate here (TLS with a cluster CA).
    let nodes_verified = tls && shoal_tls::current().verifies_nodes();
    let expires_in = identity
        .as_ref()
        .and_then(|(_, until)| *until)
        .map(|until| until.duration_since(SystemTime::now()).unwrap_or_default());
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let mut request = request.map(|body| Body::new(BodyGuard::new(body, &limits)));
        request.extensions_mut().insert(axum::extract::ConnectInfo(remote));
        if tls {
            request.headers_mut().insert("x-forwarded-proto", axum::http::HeaderValue::from_static("https"));
        }
        if nodes_verified {
            request.extensions_mut().insert(shoal_registry::identity::NodesVerified);
        }
        // The role a certificate proved is good while the certificate is: a connection kept
        // busy would otherwise carry it past its expiry (and closes then, below).
        if let Some((id, _)) =
            identity.as_ref().filter(|(_, until)| until.is_none_or(|t| SystemTime::now() < t))
        {
            request.extensions_mut().insert(id.clone());
        }
        app.clone().oneshot(request)
    });

    // tokio sleeps about 30 years for a duration past its clock's range.
    let expired = tokio::time::sleep(expires_in.unwrap_or(Duration::MAX));
    tokio::pin!(expired);
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new());
    builder.header_read_timeout(nonzero(limits.header_read_timeout));
    let stream = SendGuard::new(stream, nonzero(limits.send_idle_timeout));
    let mut conn = std::pin::pin!(builder.serve_connection(TokioIo::new(stream), service));
    let mut stopping = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            _ = stop.wait_for(|stop| *stop), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            // The client's certificate expired: it reconnects with its renewed one.
            _ = &mut expired, if expires_in.is_some() && !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

/// A connection's byte stream whose writes fail with `TimedOut` once one has waited `limit`
/// without the client taking a byte. Hyper has no write timeout of its own: a client that
/// asks for a blob and never reads would hold its connection, the response's task and (on an
/// agent) the blob's pin against eviction for good. Any progress starts the wait anew, so a
/// slow reader is never cut off, only one that stopped.
struct SendGuard<S> {
    inner: S,
    limit: Option<Duration>,
    /// Set while a write is blocked: when it gives up.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> SendGuard<S> {
    fn new(inner: S, limit: Option<Duration>) -> SendGuard<S> {
        SendGuard { inner, limit, stalled: None }
    }

    /// What a write that returned `poll` means: progress clears the stall, a block starts or
    /// checks its deadline.
    fn judge<T>(&mut self, cx: &mut Context<'_>, poll: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let Some(limit) = self.limit else { return Poll::Pending };
        let deadline = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match deadline.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                let message = format!("the client took no byte of the response for {}s", limit.as_secs_f64());
                Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, message)))
            }
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for SendGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for SendGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.judge(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.judge(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.judge(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.judge(cx, poll)
    }
}

/// A request body that fails with `TimedOut` when the client sends it too slowly: fewer than
/// `min_bytes` in a window of `window` during which the server was waiting for it. The first
/// window starts when the server first waits, so a handler that reads the body late is not
/// charged for its own delay.
struct BodyGuard {
    inner: Incoming,
    window: Option<Duration>,
    min_bytes: u64,
    window_bytes: u64,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    failed: bool,
}

impl BodyGuard {
    fn new(inner: Incoming, limits: &HttpLimits) -> BodyGuard {
        BodyGuard {
            inner,
            window: nonzero(limits.body_idle_timeout),
            min_bytes: limits.min_window_bytes(),
            window_bytes: 0,
            deadline: None,
            failed: false,
        }
    }

    fn too_slow(&self, window: Duration) -> std::io::Error {
        let message = if self.window_bytes == 0 {
            format!("no bytes of the request body arrived for {}s", window.as_secs_f64())
        } else {
            format!(
                "the request body brought {} bytes in {}s, fewer than the {} required",
                self.window_bytes,
                window.as_secs_f64(),
                self.min_bytes
            )
        };
        std::io::Error::new(std::io::ErrorKind::TimedOut, message)
    }
}

impl hyper::body::Body for BodyGuard {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        this.window_bytes += data.len() as u64;
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {}
            }
            let Some(window) = this.window else { return Poll::Pending };
            let deadline = this.deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(window)));
            if deadline.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if this.window_bytes < this.min_bytes {
                this.failed = true;
                return Poll::Ready(Some(Err(this.too_slow(window).into())));
            }
            // Enough in this window: judge the next one (polling again registers its timer).
            this.window_bytes = 0;
            deadline.as_mut().reset(tokio::time::Instant::now() + window);
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests;
