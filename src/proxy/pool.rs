//! Keep-alive HTTP/1.1 connections to a cleartext upstream, one pool per worker thread.
//!
//! The common deployment puts the FHIR server next to the gateway (a sidecar, a private
//! network) over plain HTTP/1.1. For it this pool replaces hyper-util's general client,
//! whose per-request work (a pool map keyed by scheme and authority under SipHash, a
//! formatted `Host` header, a spawned task to return each connection) is most of what a
//! proxied request costs above hyper itself. Here a worker's idle connections are a stack
//! behind an uncontended lock, `Host` is prepared once, and a connection goes back when
//! the response body ends. HTTPS upstreams (TLS, ALPN, h2) keep hyper-util's client.
//!
//! A request without a body (reads, searches, deletes) is exchanged by its own task over
//! a connection of the bodiless stack (`h1.rs`); one with a body goes through hyper's
//! connection-level client, over a stack of its own, which sends the body while it
//! watches for an early answer.
//!
//! Only a connection whose last response was read to its end is reused; one whose
//! response was abandoned, failed or announced `Connection: close` is dropped and closed.
//! A request that could not be written because a pooled connection had been closed by
//! the upstream meanwhile is retried on another: nothing of it reached the upstream. A
//! safe, bodiless request (GET, HEAD, OPTIONS) sent on a connection idle for a second or
//! more, which the upstream then closed without answering (its keep-alive timeout racing
//! the request), is sent once more on a new connection.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Either};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

use super::UpstreamFailure;
use super::h1::{self as bare, HeadError, InlineBody};
use super::headers::Edits;
use crate::body::BoxBody;
use crate::metrics::PoolCounters;

/// The pool of one worker thread.
pub struct H1Pool {
    /// `host` and `port` to connect to.
    host: String,
    port: u16,
    /// The `Host` header every request carries.
    host_header: HeaderValue,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    /// hyper connections, for requests with a body.
    idle: Mutex<Vec<Idle>>,
    /// Connections exchanged by the request's task, for requests without one.
    idle_bare: Mutex<Vec<IdleBare>>,
    counters: PoolCounters,
}

struct Idle {
    sender: SendRequest<BoxBody>,
    since: Instant,
}

struct IdleBare {
    conn: bare::Conn,
    since: Instant,
}

impl H1Pool {
    /// A pool for `host:port`; `authority` is the `Host` header value.
    pub fn new(
        host: String,
        port: u16,
        authority: &str,
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_idle: usize,
        counters: PoolCounters,
    ) -> Option<H1Pool> {
        Some(H1Pool {
            host,
            port,
            host_header: HeaderValue::from_str(authority).ok()?,
            connect_timeout,
            idle_timeout,
            max_idle,
            idle: Mutex::new(Vec::new()),
            idle_bare: Mutex::new(Vec::new()),
            counters,
        })
    }

    /// Idle connections kept now.
    pub fn idle_connections(&self) -> usize {
        let len = |m: &Mutex<Vec<_>>| m.lock().map_or(0, |v| v.len());
        len(&self.idle) + self.idle_bare.lock().map_or(0, |v| v.len())
    }

    /// Sends `req` (absolute URI) with its headers edited by `edits`, and returns the
    /// response, whose body hands the connection back to the pool when it ends. `now`:
    /// the clock as the request set out.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<BoxBody>,
        edits: Edits<'_>,
        now: Instant,
    ) -> Result<Response<PlainBody>, UpstreamFailure> {
        if req.body().is_end_stream() {
            let resp = self.send_bodiless(&req, &edits, now).await?;
            return Ok(resp.map(Either::Left));
        }
        edits.apply(req.headers_mut());
        let sent = Arc::new(AtomicBool::new(false));
        let req = req.map(|inner| {
            SentBody {
                inner,
                sent: sent.clone(),
            }
            .boxed()
        });
        let resp = self.send_with_body(req, sent).await?;
        Ok(resp.map(Either::Right))
    }

    /// A request without a body, over the bodiless stack.
    async fn send_bodiless(
        self: &Arc<Self>,
        req: &Request<BoxBody>,
        edits: &Edits<'_>,
        now: Instant,
    ) -> Result<Response<InlineBody<H1Pool>>, UpstreamFailure> {
        let mut replayed = false;
        loop {
            let pooled = if replayed {
                None
            } else {
                self.checkout_bare(now)
            };
            let (mut conn, idle_for) = match pooled {
                Some((conn, idle_for)) => {
                    self.counters.reused.inc();
                    (conn, Some(idle_for))
                }
                None => {
                    let conn = bare::Conn::new(self.connect_tcp().await?);
                    self.counters.opened.inc();
                    (conn, None)
                }
            };
            if let Err(e) = conn.write_request(req, &self.host_header, edits).await {
                // A pooled connection closed meanwhile: the head did not get through
                // whole, and no server acts on part of one.
                if idle_for.is_some() {
                    self.counters.retries.inc();
                    continue;
                }
                tracing::debug!(error = %e, "writing to the upstream failed");
                return Err(UpstreamFailure::Protocol);
            }
            match conn.read_head(req.method()).await {
                Ok((head, pending)) => {
                    let body = InlineBody::new(conn, &head, pending, self.clone());
                    return Ok(bare::response(head, body));
                }
                // A connection idle for a while, closed by the upstream as the request
                // arrived (its keep-alive timeout): a safe request is sent once more on
                // a new connection, as nginx does. Under load connections are reused
                // within milliseconds and this does not happen.
                Err(HeadError::Closed { nothing_read: true })
                    if !replayed
                        && idle_for.is_some_and(|d| d >= REPLAY_AFTER_IDLE)
                        && matches!(
                            *req.method(),
                            http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
                        ) =>
                {
                    self.counters.retries.inc();
                    replayed = true;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "no answer from the upstream");
                    return Err(UpstreamFailure::Protocol);
                }
            }
        }
    }

    /// A request with a body, through hyper's connection-level client. Sets `Host`.
    async fn send_with_body(
        self: &Arc<Self>,
        mut req: Request<BoxBody>,
        sent: Arc<AtomicBool>,
    ) -> Result<Response<PooledBody>, UpstreamFailure> {
        let origin_form = req
            .uri()
            .path_and_query()
            .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
        *req.uri_mut() = origin_form;
        req.headers_mut()
            .insert(header::HOST, self.host_header.clone());

        loop {
            let (mut sender, reused) = match self.checkout().await {
                Some(sender) => {
                    self.counters.reused.inc();
                    (sender, true)
                }
                None => {
                    let sender = self.connect().await?;
                    self.counters.opened.inc();
                    (sender, false)
                }
            };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let reusable = !closes(resp.headers());
                    let mut resp = resp.map(|inner| PooledBody {
                        inner,
                        back: reusable.then(|| (self.clone(), sender)),
                        sent,
                    });
                    if resp.body().inner.is_end_stream() {
                        resp.body_mut().give_back();
                    }
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    // Not written: the pooled connection was closed meanwhile (the
                    // upstream's keep-alive timeout). Nothing reached the upstream.
                    Some(unsent) if reused => {
                        self.counters.retries.inc();
                        req = unsent;
                    }
                    _ => return Err(failure(&e.into_error())),
                },
            }
        }
    }

    /// The most recently used idle bodiless connection that is still open, and how long
    /// it was idle at `now`.
    fn checkout_bare(&self, now: Instant) -> Option<(bare::Conn, Duration)> {
        loop {
            let IdleBare { conn, since } = {
                let mut idle = self.idle_bare.lock().unwrap_or_else(|p| p.into_inner());
                idle.pop()?
            };
            let idle_for = now.saturating_duration_since(since);
            if idle_for < self.idle_timeout && conn.is_reusable() {
                return Some((conn, idle_for));
            }
        }
    }

    /// The most recently used idle connection that is still open, and how long it was idle.
    async fn checkout(&self) -> Option<SendRequest<BoxBody>> {
        loop {
            let Idle { mut sender, since } = {
                let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                idle.pop()?
            };
            if since.elapsed() >= self.idle_timeout || sender.is_closed() {
                continue;
            }
            // Returned as its response ended; hyper may not have turned back to reading
            // yet. Ready at once, or an error if the connection is closing.
            if sender.is_ready() || sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    fn checkin(&self, sender: SendRequest<BoxBody>) {
        if sender.is_closed() {
            return;
        }
        let since = Instant::now();
        keep_idle(&self.idle, self.max_idle, Idle { sender, since });
    }

    async fn connect(&self) -> Result<SendRequest<BoxBody>, UpstreamFailure> {
        let stream = self.connect_tcp().await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| failure(&e))?;
        // Driven on this worker's event loop, like the request that opened it.
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// A new TCP connection to the upstream, within `upstream.connect_timeout`.
    async fn connect_tcp(&self) -> Result<tokio::net::TcpStream, UpstreamFailure> {
        let connect = async {
            let addrs = tokio::net::lookup_host((self.host.as_str(), self.port))
                .await
                .map_err(|_| UpstreamFailure::Connect)?;
            let mut last = UpstreamFailure::Connect;
            for addr in addrs {
                match tokio::net::TcpStream::connect(addr).await {
                    Ok(stream) => return Ok(stream),
                    Err(_) => last = UpstreamFailure::Connect,
                }
            }
            Err(last)
        };
        let stream = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| UpstreamFailure::ConnectTimeout)??;
        let _ = stream.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        Ok(stream)
    }
}

/// How long a connection must have been idle before a safe request the upstream closed it
/// under is sent once more.
const REPLAY_AFTER_IDLE: Duration = Duration::from_secs(1);

/// Whether the upstream said it closes the connection after this response.
fn closes(headers: &http::HeaderMap) -> bool {
    // The usual answers first: no Connection header, or a lone `keep-alive`.
    let mut values = headers.get_all(header::CONNECTION).iter();
    match (values.next(), values.next()) {
        (None, _) => return false,
        (Some(v), None) if v.as_bytes().eq_ignore_ascii_case(b"keep-alive") => return false,
        _ => {}
    }
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("close"))
}

/// Sorts a failed exchange into the failure kinds, walking the cause chain.
fn failure(e: &hyper::Error) -> UpstreamFailure {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return UpstreamFailure::RequestBodyTooLarge;
        }
        source = err.source();
    }
    if e.is_user() {
        // The request body failed while it was being sent: the client went away.
        UpstreamFailure::RequestBody
    } else {
        UpstreamFailure::Protocol
    }
}

/// A response body that returns its connection to the pool once read to its end, and only
/// when the request's body was sent whole: an upstream that answered early, before it had
/// read the request to its end, may still read what follows of it as another request,
/// and its answer would wait on the connection for the next request to take.
pub struct PooledBody {
    inner: Incoming,
    back: Option<(Arc<H1Pool>, SendRequest<BoxBody>)>,
    sent: Arc<AtomicBool>,
}

impl PooledBody {
    fn give_back(&mut self) {
        if let Some((pool, sender)) = self.back.take()
            && self.sent.load(Ordering::Acquire)
        {
            pool.checkin(sender);
        }
    }
}

/// A request body that records when it has been sent to its end.
struct SentBody {
    inner: BoxBody,
    sent: Arc<AtomicBool>,
}

impl Body for SentBody {
    type Data = Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.sent.store(true, Ordering::Release),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => {
                self.sent.store(true, Ordering::Release);
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Err(_))) => self.back = None,
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.give_back(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl bare::Recycle for H1Pool {
    fn recycle(&self, conn: bare::Conn) {
        let since = Instant::now();
        keep_idle(&self.idle_bare, self.max_idle, IdleBare { conn, since });
    }
}

/// Puts `item` on an idle stack of at most `max` (none kept with 0), dropping the
/// oldest beyond it: the most recent are kept, the oldest is the likeliest to have been
/// closed by the upstream.
fn keep_idle<T>(stack: &Mutex<Vec<T>>, max: usize, item: T) {
    if max == 0 {
        return;
    }
    let mut idle = stack.lock().unwrap_or_else(|p| p.into_inner());
    if idle.len() >= max {
        idle.remove(0);
    }
    idle.push(item);
}

/// The body of an answer from a plain-HTTP upstream, by the way it was exchanged.
pub type PlainBody = Either<InlineBody<H1Pool>, PooledBody>;

#[cfg(test)]
mod tests {
    use super::*;

    /// The stack keeps the most recent `max`; with 0 it keeps nothing (and does not
    /// panic, as it did taking the oldest of none).
    #[test]
    fn idle_stack_keeps_the_most_recent() {
        let stack = Mutex::new(Vec::new());
        for i in 0..5 {
            keep_idle(&stack, 3, i);
        }
        assert_eq!(*stack.lock().unwrap(), [2, 3, 4]);
        let none = Mutex::new(Vec::new());
        keep_idle(&none, 0, 1);
        assert!(none.lock().unwrap().is_empty());
    }
}
