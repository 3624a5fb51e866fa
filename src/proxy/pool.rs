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
//! Only a connection whose last response was read to its end is reused; one whose
//! response was abandoned, failed or announced `Connection: close` is dropped, and hyper
//! closes it. A request that could not be written because a pooled connection had been
//! closed by the upstream meanwhile is retried on another: nothing of it reached the
//! upstream. A safe, bodiless request (GET, HEAD, OPTIONS) sent on a connection idle for a
//! second or more, which the upstream then closed without answering (its keep-alive
//! timeout racing the request), is sent once more on a new connection.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

use super::UpstreamFailure;
use crate::body::BoxBody;

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
    idle: Mutex<Vec<Idle>>,
}

struct Idle {
    sender: SendRequest<BoxBody>,
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
    ) -> Option<H1Pool> {
        Some(H1Pool {
            host,
            port,
            host_header: HeaderValue::from_str(authority).ok()?,
            connect_timeout,
            idle_timeout,
            max_idle,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Sends `req` (absolute URI; `Host` not set) and returns the response, whose body
    /// hands the connection back to the pool when it ends.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<BoxBody>,
    ) -> Result<Response<PooledBody>, UpstreamFailure> {
        let origin_form = req
            .uri()
            .path_and_query()
            .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
        *req.uri_mut() = origin_form;
        req.headers_mut()
            .insert(header::HOST, self.host_header.clone());

        let mut replayed = false;
        loop {
            let pooled = if replayed {
                None
            } else {
                self.checkout().await
            };
            let (mut sender, reused, idle_for) = match pooled {
                Some((sender, idle_for)) => (sender, true, idle_for),
                None => (self.connect().await?, false, Duration::ZERO),
            };
            // A connection that sat idle may have been closed by the upstream just as the
            // request went out. A safe request without a body is kept to be sent once
            // more on a new connection then, as nginx does; under load connections are
            // reused within milliseconds and this copy is never made.
            let replay = (reused && idle_for >= REPLAY_AFTER_IDLE)
                .then(|| replayable(&req))
                .flatten();
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let reusable = !closes(resp.headers());
                    let mut resp = resp.map(|inner| PooledBody {
                        inner,
                        back: reusable.then(|| (self.clone(), sender)),
                    });
                    if resp.body().inner.is_end_stream() {
                        resp.body_mut().give_back();
                    }
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    // Not written: the pooled connection was closed meanwhile (the
                    // upstream's keep-alive timeout). Nothing reached the upstream.
                    Some(unsent) if reused => req = unsent,
                    _ => {
                        let error = e.into_error();
                        let closed_before_answer = error.is_incomplete_message()
                            || error.is_closed()
                            || error.is_canceled();
                        match replay {
                            Some(copy) if closed_before_answer => {
                                replayed = true;
                                req = copy;
                            }
                            _ => return Err(failure(&error)),
                        }
                    }
                },
            }
        }
    }

    /// The most recently used idle connection that is still open, and how long it was idle.
    async fn checkout(&self) -> Option<(SendRequest<BoxBody>, Duration)> {
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
                return Some((sender, since.elapsed()));
            }
        }
    }

    fn checkin(&self, sender: SendRequest<BoxBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() >= self.max_idle {
            // Keep the most recent; the oldest is the likeliest to be closed upstream.
            idle.remove(0);
        }
        idle.push(Idle {
            sender,
            since: Instant::now(),
        });
    }

    async fn connect(&self) -> Result<SendRequest<BoxBody>, UpstreamFailure> {
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
}

/// How long a connection must have been idle before a safe request sent on it is kept
/// for one replay.
const REPLAY_AFTER_IDLE: Duration = Duration::from_secs(1);

/// A copy of `req` if it can be sent twice without harm: a safe method (RFC 9110 §9.2.1)
/// and no body.
fn replayable(req: &Request<BoxBody>) -> Option<Request<BoxBody>> {
    let safe = matches!(
        *req.method(),
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
    );
    if !safe || !req.body().is_end_stream() {
        return None;
    }
    let mut copy = Request::new(crate::body::empty());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

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

/// A response body that returns its connection to the pool once read to its end.
pub struct PooledBody {
    inner: Incoming,
    back: Option<(Arc<H1Pool>, SendRequest<BoxBody>)>,
}

impl PooledBody {
    fn give_back(&mut self) {
        if let Some((pool, sender)) = self.back.take() {
            pool.checkin(sender);
        }
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
