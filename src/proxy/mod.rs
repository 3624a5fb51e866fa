//! Forwarding to the upstream FHIR server: pooled client, header hygiene, credentials,
//! timeouts. Knows HTTP, not SMART: what may be forwarded is decided before this runs.

pub mod h1;
pub mod headers;
mod pool;
pub mod urls;

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::{BoxBody, IdleTimeoutBody};
use crate::config::{BaseUrl, UpstreamConfig};
use crate::error::GatewayError;
use headers::ClientSide;

/// Why building the upstream client failed (at start or reload).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamSetupError {
    /// `upstream.ca_file` could not be read or holds no certificate.
    #[error("upstream.ca_file: {0}")]
    CaFile(String),
}

/// How an upstream exchange failed; a metric label and the client-facing error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// TCP connect refused or reset.
    Connect,
    /// TCP connect did not finish within `upstream.connect_timeout`.
    ConnectTimeout,
    /// No response headers within `upstream.timeout`.
    Timeout,
    /// The request body broke the size limit while streaming.
    RequestBodyTooLarge,
    /// The client's request body failed while streaming (client went away).
    RequestBody,
    /// Protocol error, reset, or anything else from the exchange.
    Protocol,
    /// A body on a request whose method carries none: never sent.
    StrayBody,
}

/// Whether requests with `method` may carry a body to the upstream: the methods FHIR's
/// REST API sends content with (create, update, patch, POST searches and operations).
pub fn carries_content(method: &http::Method) -> bool {
    matches!(
        *method,
        http::Method::POST | http::Method::PUT | http::Method::PATCH
    )
}

impl UpstreamFailure {
    /// Label for `smartgate_upstream_errors_total{kind}`.
    pub fn kind(self) -> &'static str {
        match self {
            UpstreamFailure::Connect => "connect",
            UpstreamFailure::ConnectTimeout => "connect_timeout",
            UpstreamFailure::Timeout => "timeout",
            UpstreamFailure::RequestBodyTooLarge => "request_body_too_large",
            UpstreamFailure::RequestBody => "request_body",
            UpstreamFailure::Protocol => "protocol",
            UpstreamFailure::StrayBody => "stray_body",
        }
    }

    /// What the client is told.
    pub fn to_error(self) -> GatewayError {
        match self {
            UpstreamFailure::Connect | UpstreamFailure::Protocol => {
                GatewayError::UpstreamUnreachable
            }
            UpstreamFailure::RequestBody => GatewayError::BadRequest("request body incomplete"),
            UpstreamFailure::ConnectTimeout | UpstreamFailure::Timeout => {
                GatewayError::UpstreamTimeout
            }
            UpstreamFailure::RequestBodyTooLarge => GatewayError::PayloadTooLarge,
            UpstreamFailure::StrayBody => {
                GatewayError::BadRequest("this interaction has no body in FHIR, and one was sent")
            }
        }
    }
}

/// Caller identity headers: the names clients may never send themselves, and the values
/// the gateway vouches for (empty unless enabled).
pub struct Identity<'a> {
    /// Removed from every client request.
    pub strip: &'a [HeaderName],
    /// Set after the removal.
    pub set: Vec<(HeaderName, HeaderValue)>,
}

type HttpClient = Client<HttpsConnector<HttpConnector>, BoxBody>;

/// How requests reach the upstream, one pool per worker either way.
enum Transport {
    /// `http://`: keep-alive HTTP/1.1 connections (`pool.rs`).
    Plain(Vec<Arc<pool::H1Pool>>),
    /// `https://`: hyper-util's client (TLS, ALPN h2, `upstream.ca_file`).
    Tls(Vec<HttpClient>),
}

/// The protected FHIR server: where it is and how to talk to it.
///
/// Holds one connection pool per worker thread: a worker only uses its own pool, so a
/// request and the upstream connection it rides on are always driven by the same thread
/// (no cross-thread wake-ups, the way an nginx worker owns its connections).
pub struct Upstream {
    base: BaseUrl,
    /// `base`'s scheme and authority, parsed once; `None` only if they do not parse as
    /// URI parts (then each URI is parsed whole, and fails as the client's error).
    origin: Option<(Scheme, Authority)>,
    transport: Transport,
    extra_headers: HeaderMap,
    forward_authorization: bool,
    timeout: Duration,
    idle_timeout: Duration,
}

impl Upstream {
    /// Builds `workers` connection pools from `[upstream]`; plain-HTTP pools count their
    /// connections on `counters`.
    pub fn new(
        cfg: &UpstreamConfig,
        workers: usize,
        counters: &crate::metrics::PoolCounters,
    ) -> Result<Upstream, UpstreamSetupError> {
        let workers = workers.max(1);
        let (host, port) = host_port(&cfg.url);
        let plain = (cfg.url.scheme == "http")
            .then(|| {
                (0..workers)
                    .map(|_| {
                        pool::H1Pool::new(
                            host.clone(),
                            port,
                            &cfg.url.authority,
                            cfg.connect_timeout.0,
                            cfg.pool_idle_timeout.0,
                            cfg.pool_max_idle_per_host,
                            counters.clone(),
                        )
                        .map(Arc::new)
                    })
                    .collect::<Option<Vec<_>>>()
            })
            .flatten();
        let transport = match plain {
            Some(pools) => {
                // An unusable upstream.ca_file is an error whatever the scheme: a typo must
                // not wait to surface until the URL turns to https.
                if cfg.ca_file.is_some() {
                    crate::outbound::https_connector(cfg.ca_file.as_deref(), cfg.connect_timeout.0)
                        .map_err(UpstreamSetupError::CaFile)?;
                }
                Transport::Plain(pools)
            }
            None => {
                let connector =
                    crate::outbound::https_connector(cfg.ca_file.as_deref(), cfg.connect_timeout.0)
                        .map_err(UpstreamSetupError::CaFile)?;
                Transport::Tls(
                    (0..workers)
                        .map(|_| {
                            Client::builder(TokioExecutor::new())
                                .pool_idle_timeout(cfg.pool_idle_timeout.0)
                                .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
                                .pool_timer(TokioTimer::new())
                                .timer(TokioTimer::new())
                                .build(connector.clone())
                        })
                        .collect(),
                )
            }
        };

        let mut extra_headers = HeaderMap::new();
        for (name, value) in &cfg.headers {
            // Validated with the configuration; a failure here would be a bug, so skip
            // rather than panic.
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                let mut v = v;
                v.set_sensitive(true);
                extra_headers.insert(n, v);
            }
        }

        Ok(Upstream {
            base: cfg.url.clone(),
            origin: Scheme::try_from(cfg.url.scheme.as_str())
                .ok()
                .zip(Authority::try_from(cfg.url.authority.as_str()).ok()),
            transport,
            extra_headers,
            forward_authorization: cfg.forward_authorization,
            timeout: cfg.timeout.0,
            idle_timeout: cfg.idle_timeout.0,
        })
    }

    /// The upstream URL for `rel` (the request's path-and-query after the public base).
    pub fn uri_for(&self, rel: &str) -> Result<Uri, GatewayError> {
        let bad = || GatewayError::BadRequest("unparseable request target");
        if let Some((scheme, authority)) = &self.origin {
            // From parts: no formatting and re-parsing of the base on every request.
            let mut pq = String::with_capacity(1 + self.base.path.len() + rel.len());
            pq.push_str(&self.base.path);
            pq.push_str(rel);
            if !pq.starts_with('/') {
                pq.insert(0, '/');
            }
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(scheme.clone());
            parts.authority = Some(authority.clone());
            parts.path_and_query = Some(PathAndQuery::try_from(pq).map_err(|_| bad())?);
            return Uri::from_parts(parts).map_err(|_| bad());
        }
        format!(
            "{}://{}{}{}",
            self.base.scheme, self.base.authority, self.base.path, rel
        )
        .parse()
        .map_err(|_| bad())
    }

    /// Idle keep-alive connections in the plain-HTTP pools (hyper-util's https client
    /// does not say).
    pub fn idle_connections(&self) -> usize {
        match &self.transport {
            Transport::Plain(pools) => pools.iter().map(|p| p.idle_connections()).sum(),
            Transport::Tls(_) => 0,
        }
    }

    /// `(host, port)` of the upstream, for readiness probes.
    pub fn host_port(&self) -> (String, u16) {
        host_port(&self.base)
    }

    /// Sends `req` (whose URI is already the upstream URI) with cleaned headers, and
    /// returns the response with hop-by-hop headers removed and an idle-guarded body, plus
    /// the time to response headers. `worker` is the calling worker: its own pool, its
    /// timer.
    pub async fn send(
        &self,
        worker: &WorkerSide,
        mut req: Request<BoxBody>,
        client: &ClientSide,
        request_id: &HeaderValue,
        identity: &Identity<'_>,
    ) -> Result<(Response<BoxBody>, Duration), UpstreamFailure> {
        let strip_authorization = !self.forward_authorization;
        let also = |name: &HeaderName| {
            // The gateway must see plain bodies to rewrite and verify them; the client's
            // token stays here unless configured otherwise; identity headers come from
            // the gateway only.
            *name == header::ACCEPT_ENCODING
                || (strip_authorization && *name == header::AUTHORIZATION)
                || identity.strip.contains(name)
        };
        let mut edits = headers::Edits::new(req.headers(), &also);
        headers::forwarded(&mut edits, req.headers(), client);
        edits.set(&headers::X_REQUEST_ID, request_id.clone());
        for (name, value) in &self.extra_headers {
            edits.set(name, value.clone());
        }
        for (name, value) in &identity.set {
            edits.set(name, value.clone());
        }

        // A method that carries no content goes without a body, whatever came with it (the
        // pipeline refuses one before this): an upstream that does not read bodies there
        // would take the body for the next request on the connection.
        if !http_body::Body::is_end_stream(req.body()) && !carries_content(req.method()) {
            return Err(UpstreamFailure::StrayBody);
        }
        let started = Instant::now();
        // From the instant already read: one clock read fewer per request.
        let deadline = tokio::time::Instant::from_std(started) + self.timeout;
        let idle = self.idle_timeout;
        let result = match &self.transport {
            Transport::Plain(pools) => {
                let pool = &pools[worker.index % pools.len()];
                match worker
                    .deadlines
                    .timeout_at(deadline, pool.send(req, edits, started))
                    .await
                {
                    Err(_) => Err(UpstreamFailure::Timeout),
                    Ok(r) => r.map(|resp| resp.map(|b| IdleTimeoutBody::new(b, idle).boxed())),
                }
            }
            Transport::Tls(clients) => {
                edits.apply(req.headers_mut());
                // hyper-util's client sets Host from the URI when there is none. (The
                // plain pool replaces it, which costs less than a removal.)
                req.headers_mut().remove(header::HOST);
                let client = &clients[worker.index % clients.len()];
                match worker
                    .deadlines
                    .timeout_at(deadline, client.request(req))
                    .await
                {
                    Err(_) => Err(UpstreamFailure::Timeout),
                    Ok(Err(e)) => Err(classify(&e)),
                    Ok(Ok(resp)) => Ok(resp.map(|b| IdleTimeoutBody::new(b, idle).boxed())),
                }
            }
        };
        let elapsed = started.elapsed();
        let mut resp = result?;
        headers::remove_hop_by_hop(resp.headers_mut());
        Ok((resp, elapsed))
    }
}

/// The worker thread a request is served on: which of the upstream pools it uses, and
/// the worker's coarse timer, which limits the wait for the upstream's answer
/// (`upstream.timeout`).
#[derive(Clone)]
pub struct WorkerSide {
    /// The worker's index.
    pub index: usize,
    /// Deadlines kept at the first tick after them; the tick follows `upstream.timeout`.
    pub deadlines: crate::timer::CoarseTimer,
}

impl std::fmt::Debug for WorkerSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerSide")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

/// `(host, port)` of `base`: brackets off an IPv6 literal, the scheme's default port.
fn host_port(base: &BaseUrl) -> (String, u16) {
    let default = if base.scheme == "https" { 443 } else { 80 };
    match base.authority.parse::<http::uri::Authority>() {
        Ok(a) => (
            a.host().trim_matches(['[', ']']).to_owned(),
            a.port_u16().unwrap_or(default),
        ),
        Err(_) => (base.authority.clone(), default),
    }
}

/// Sorts a client error into the failure kinds, walking its cause chain.
fn classify(e: &hyper_util::client::legacy::Error) -> UpstreamFailure {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut body_error = false;
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return UpstreamFailure::RequestBodyTooLarge;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
            && e.is_connect()
        {
            return UpstreamFailure::ConnectTimeout;
        }
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            body_error |= h.is_user();
        }
        source = err.source();
    }
    if e.is_connect() {
        UpstreamFailure::Connect
    } else if body_error {
        UpstreamFailure::RequestBody
    } else {
        UpstreamFailure::Protocol
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(url: &str) -> Upstream {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\npublic_base_url = \"http://gw.test/r4\"\n\
             [upstream]\nurl = \"{url}\"\n[auth]\nmode = \"none\"\n"
        );
        let config = crate::Config::parse(&text, "test", Vec::new()).unwrap();
        Upstream::new(&config.upstream, 1, &Default::default()).unwrap()
    }

    /// A missing CA file is refused for an http:// upstream too.
    #[test]
    fn unusable_ca_file_is_an_error_for_plain_upstreams() {
        let text = "[server]\nlisten = \"127.0.0.1:0\"\npublic_base_url = \"http://gw.test/r4\"\n\
                    [upstream]\nurl = \"http://127.0.0.1:1/fhir\"\n\
                    ca_file = \"/nonexistent/ca.pem\"\n[auth]\nmode = \"none\"\n";
        let config = crate::Config::parse(text, "test", Vec::new()).unwrap();
        let err = Upstream::new(&config.upstream, 1, &Default::default())
            .err()
            .expect("refused");
        assert!(err.to_string().starts_with("upstream.ca_file"), "{err}");
    }

    /// Building the URI from parts gives exactly what parsing the whole URL gives, and
    /// refuses what it refuses.
    #[test]
    fn uri_from_parts_matches_parsing_the_whole_url() {
        for base in [
            "http://fhir.internal:8080/fhir",
            "https://fhir.example/",
            "http://[::1]:9000/a/b",
        ] {
            let up = upstream(base);
            assert!(up.origin.is_some(), "{base}");
            for rel in [
                "",
                "/",
                "?_count=1",
                "/Patient/1",
                "/Patient?name=a%20b&_include=Observation:subject",
                "/Observation?code=http://loinc.org|1234-5",
                "/Patient/1#fragment",
                "/Patient/1 2",
                "/Patient/\u{e9}",
                "/Patient/\"x\"",
                "/a{b}",
                "/%zz",
            ] {
                let whole = format!(
                    "{}://{}{}{}",
                    up.base.scheme, up.base.authority, up.base.path, rel
                )
                .parse::<Uri>()
                .ok();
                let built = up.uri_for(rel).ok();
                assert_eq!(built, whole, "{base} + {rel:?}");
            }
        }
    }
}
