//! Connections: accepting, bounding and closing them.
//!
//! Each connection costs memory for as long as it is open, so none may stay
//! open on a client's whim:
//!
//! - at most `--max-connections` are served at once; one more is answered
//!   `503` (`Connection: close`) and closed;
//! - a request header not complete within `--header-read-timeout` of its
//!   first byte closes the connection (nothing of it reached a handler);
//! - a connection with no request for `--idle-timeout` is closed, after
//!   finishing any response it is still sending (a live stream keeps its
//!   connection for as long as it runs);
//! - a connection whose client has not taken a byte of its response for
//!   `--idle-timeout` (a stalled live stream, say) is closed: a browser's
//!   `EventSource` reconnects with `Last-Event-ID` and misses nothing.
//!
//! - a client that stops reading holds at most [`SEND_BUFFER`] of the
//!   kernel's memory for what it has not read (the kernel would otherwise
//!   grow a connection's send buffer to megabytes, and a few hundred
//!   stalled live streams would put every connection under memory
//!   pressure).
//!
//! When shutdown starts, the listener closes and every connection finishes
//! its request in progress and closes, or is closed after `grace`;
//! [`serve`] returns once all have.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Map, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use super::problem::problem_json;

/// How many connections may be open and for how long they may wait.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// How long a connection may take to finish once shutdown starts.
    pub grace: Duration,
}

/// Connections over the limit being answered at once; more than this are
/// closed without an answer, so that a flood costs nothing either.
const REFUSALS: usize = 64;

/// The send buffer of every connection (the kernel doubles it for its own
/// bookkeeping). Enough for a full page of `/events` in a few round trips.
pub const SEND_BUFFER: usize = 64 * 1024;

/// How long a refused connection is given to take its answer.
const REFUSAL_TIME: Duration = Duration::from_secs(1);

/// Serves `router` on `listener` until `stopping` is cancelled, then waits
/// for open connections to finish their requests.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    tls: Option<TlsAcceptor>,
    stopping: CancellationToken,
) {
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(REFUSALS));
    let connections = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            biased;
            () = stopping.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors, most likely: give connections
                    // in progress a moment to close rather than spin.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if let Ok(permit) = open.clone().try_acquire_owned() {
            let (router, stopping, tls) = (router.clone(), stopping.clone(), tls.clone());
            connections.spawn(async move {
                connection(stream, router, limits, tls, stopping).await;
                drop(permit);
            });
        } else if let Ok(permit) = refusing.clone().try_acquire_owned() {
            connections.spawn(async move {
                refuse(stream, limits.max_connections).await;
                drop(permit);
            });
        }
        // Else the stream is dropped here: closed at once.
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Serves one connection's requests (inside TLS, with an acceptor) until
/// it closes, times out or shutdown asks it to.
async fn connection(
    stream: TcpStream,
    router: Router,
    limits: Limits,
    tls: Option<TlsAcceptor>,
    stopping: CancellationToken,
) {
    // Responses are written whole; waiting to coalesce them only adds latency.
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER);
    let activity = Arc::new(Activity::new());
    let watched = Watched {
        inner: stream,
        activity: activity.clone(),
    };
    let Some(tls) = tls else {
        return drive(watched, activity, router, limits, stopping).await;
    };
    // The handshake is bounded like a request header: a client that opens
    // a connection and says nothing holds it no longer.
    let handshake = tokio::select! {
        () = stopping.cancelled() => return,
        done = tokio::time::timeout(limits.header_read_timeout, tls.accept(watched)) => done,
    };
    match handshake {
        Ok(Ok(stream)) => drive(stream, activity, router, limits, stopping).await,
        Ok(Err(error)) => tracing::debug!(%error, "TLS handshake failed: connection closed"),
        Err(_) => tracing::debug!("TLS handshake not done in time: connection closed"),
    }
}

/// Serves HTTP/1.1 on `io`, whose bytes `activity` watches.
async fn drive<I>(
    io: I,
    activity: Arc<Activity>,
    router: Router,
    limits: Limits,
    stopping: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    let requests = activity.clone();
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let busy = requests.request_started();
        let router = router.clone();
        async move {
            let response = router.oneshot(request.map(Body::new)).await;
            drop(busy);
            response
        }
    });
    let mut builder = http1::Builder::new();
    // The header timeout is ours (below): hyper's would also close a
    // connection that is merely idle.
    builder.timer(TokioTimer::new()).header_read_timeout(None);
    let conn = builder.serve_connection(io, service);
    let mut conn = std::pin::pin!(conn);
    // Set once hyper is asked to close after the response in progress.
    let mut closing = false;
    // When a shutdown stops waiting for that.
    let mut deadline = None;
    loop {
        let grace = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "connection ended with an error");
                }
                return;
            }
            () = stopping.cancelled(), if deadline.is_none() => {
                if !closing {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                deadline = Some(Instant::now() + limits.grace);
            }
            () = grace => {
                tracing::debug!("connection not finished within the shutdown grace: closed");
                return;
            }
            expired = activity.expired(limits, closing) => match expired {
                Expired::Header => {
                    tracing::debug!("request header not received in time: connection closed");
                    return;
                }
                Expired::Stalled => {
                    tracing::debug!("client took none of its response in time: connection closed");
                    return;
                }
                Expired::Idle => {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            },
        }
    }
}

/// Answers a connection over the limit with a 503 and closes it.
async fn refuse(mut stream: TcpStream, max: usize) {
    let body = problem_json(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("the server has its limit of {max} connections open (--max-connections)"),
        Map::from_iter([("limit".to_string(), json!(max))]),
    );
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let answer = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        // Read what the client sent until it closes, so that closing does
        // not reset the connection before the client has read the answer.
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        io::Result::Ok(())
    };
    let _ = tokio::time::timeout(REFUSAL_TIME, answer).await;
}

/// What a connection's watchdog waits for.
enum Expired {
    /// A request header was begun and not finished in time.
    Header,
    /// No request came in time.
    Idle,
    /// The client took none of what was written to it in time.
    Stalled,
}

/// When a connection last did something, shared by its socket, its
/// requests and its watchdog.
struct Activity {
    state: Mutex<State>,
    changed: Notify,
}

struct State {
    /// Requests being handled (from their header to their response's head).
    handling: usize,
    /// Whether bytes of a request have come since the last request ended.
    reading: bool,
    /// When the connection last became idle, or began reading a header.
    since: Instant,
    /// Since when a write has been waiting for the client to read.
    blocked: Option<Instant>,
}

/// A request in progress; the connection is idle again when it drops.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.handling -= 1;
        if state.handling == 0 {
            state.reading = false;
            state.since = Instant::now();
        }
        drop(state);
        self.0.changed.notify_one();
    }
}

impl Activity {
    fn new() -> Self {
        Self {
            state: Mutex::new(State {
                handling: 0,
                reading: false,
                since: Instant::now(),
                blocked: None,
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn request_started(self: &Arc<Self>) -> Busy {
        let mut state = self.lock();
        state.handling += 1;
        state.reading = false;
        drop(state);
        self.changed.notify_one();
        Busy(self.clone())
    }

    /// Bytes arrived: while no request is being handled, they begin a header.
    fn bytes_read(&self) {
        let mut state = self.lock();
        if state.handling == 0 && !state.reading {
            state.reading = true;
            state.since = Instant::now();
            drop(state);
            self.changed.notify_one();
        }
    }

    /// A write could not go on until the client reads, or went on again.
    fn write_blocked(&self, blocked: bool) {
        let mut state = self.lock();
        if blocked == state.blocked.is_some() {
            return;
        }
        state.blocked = blocked.then(Instant::now);
        drop(state);
        self.changed.notify_one();
    }

    /// Resolves when the connection has been reading one header, idle
    /// (unless `closing`: it closes by itself once idle), or unable to write
    /// for longer than `limits` allow.
    async fn expired(&self, limits: Limits, closing: bool) -> Expired {
        // Far-off limits saturate rather than overflow.
        let after = |at: Instant, limit: Duration| at.checked_add(limit);
        loop {
            let deadline = {
                let state = self.lock();
                let stalled = state
                    .blocked
                    .and_then(|at| after(at, limits.idle_timeout))
                    .map(|at| (at, Expired::Stalled));
                let waiting = (state.handling == 0)
                    .then(|| {
                        if state.reading {
                            after(state.since, limits.header_read_timeout)
                                .map(|at| (at, Expired::Header))
                        } else if !closing {
                            after(state.since, limits.idle_timeout).map(|at| (at, Expired::Idle))
                        } else {
                            None
                        }
                    })
                    .flatten();
                [stalled, waiting]
                    .into_iter()
                    .flatten()
                    .min_by_key(|(at, _)| *at)
            };
            match deadline {
                // `notify_one` keeps a wake-up for a waiter that is not yet
                // waiting, so a change between the check and here is not lost.
                None => self.changed.notified().await,
                Some((at, expired)) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => return expired,
                        () = self.changed.notified() => {}
                    }
                }
            }
        }
    }
}

/// A socket that tells its connection's [`Activity`] when bytes arrive.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_read();
        }
        poll
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.activity.write_blocked(poll.is_pending());
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.activity.write_blocked(poll.is_pending());
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
