//! The floor of the stack smartgate is built on: the least a reverse proxy made of the same
//! parts can do per request. One current-thread runtime per CPU (each pinned to its CPU,
//! as smartgate's workers are by default), one acceptor handing
//! connections out in turn, hyper's HTTP/1 + h2 server, and per worker either hyper-util's
//! pooled client (default) or, with `FLOOR_CLIENT=conn`, a bare stack of hyper
//! connection-level HTTP/1 senders (what smartgate's plain-HTTP pool is built on, minus
//! its checks). Nothing else: no header hygiene, no forwarding headers, no request id, no
//! metrics, no logging, no link rewriting, no limits, no timeouts.
//!
//! With `FLOOR_SPIN=N` it also burns N rounds of arithmetic per request: the same proxy,
//! slower on purpose (load.sh's target `floor_slow`), to show what a slower proxy does to
//! p99 on a saturated machine whose cores it shares with the load generator.
//!
//! Not a product and not a benchmark of smartgate: `benches/load.sh` runs it beside nginx
//! and smartgate (target `floor`) so the report can say how much of the distance to nginx
//! is the stack and how much is smartgate's own work.
//!
//!     cargo bench --bench hyper_floor -- LISTEN UPSTREAM_BASE PUBLIC_PREFIX
//!     e.g. ... -- 127.0.0.1:8090 http://127.0.0.1:8080/fhir /r4

use std::cell::RefCell;
use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use smartgate::body::BoxBody;
use smartgate::config::CpuAffinity;
use smartgate::server::affinity;
use tokio::sync::mpsc;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let [listen, upstream, prefix] = match <[String; 3]>::try_from(args) {
        Ok(a) => a,
        Err(_) => {
            // `cargo bench` without arguments: nothing to measure on its own.
            eprintln!("usage: hyper_floor LISTEN UPSTREAM_BASE PUBLIC_PREFIX");
            return;
        }
    };
    let upstream: Arc<str> = upstream.trim_end_matches('/').into();
    let prefix: Arc<str> = prefix.trim_end_matches('/').into();
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());

    // Pinned as smartgate's workers are by default (server.worker_cpu_affinity = "auto").
    let cpus = affinity::plan(
        CpuAffinity::Auto,
        workers,
        affinity::allowed_cpus().as_deref(),
    );

    let mut handoffs = Vec::new();
    for worker in 0..workers {
        let (tx, mut rx) = mpsc::unbounded_channel::<std::net::TcpStream>();
        handoffs.push(tx);
        let (upstream, prefix) = (upstream.clone(), prefix.clone());
        let cpu = cpus.as_ref().map(|cpus| cpus[worker]);
        std::thread::spawn(move || {
            if let Some(cpu) = cpu {
                affinity::pin_current_thread(cpu).expect("pin the worker");
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let client = if std::env::var("FLOOR_CLIENT").as_deref() == Ok("conn") {
                    Upstream::Conn
                } else {
                    Upstream::Pooled(Box::new(Client::builder(TokioExecutor::new()).build_http()))
                };
                let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
                while let Some(stream) = rx.recv().await {
                    let Ok(stream) = tokio::net::TcpStream::from_std(stream) else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let (client, builder) = (client.clone(), builder.clone());
                    let (upstream, prefix) = (upstream.clone(), prefix.clone());
                    tokio::spawn(async move {
                        let service = service_fn(move |req: Request<Incoming>| {
                            forward(client.clone(), upstream.clone(), prefix.clone(), req)
                        });
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        });
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&listen).await.expect("bind");
        let mut next = 0;
        loop {
            let accepted = tokio::select! {
                _ = tokio::signal::ctrl_c() => std::process::exit(0),
                accepted = listener.accept() => accepted,
            };
            let Ok((stream, _)) = accepted else {
                continue;
            };
            let Ok(stream) = stream.into_std() else {
                continue;
            };
            let _ = handoffs[next].send(stream);
            next = (next + 1) % handoffs.len();
        }
    });
}

#[derive(Clone)]
enum Upstream {
    Pooled(Box<Client<HttpConnector, BoxBody>>),
    Conn,
}

thread_local! {
    /// The worker's idle connection-level senders (`FLOOR_CLIENT=conn`).
    static IDLE: RefCell<Vec<hyper::client::conn::http1::SendRequest<BoxBody>>> =
        const { RefCell::new(Vec::new()) };
}

/// Sends on an idle connection of this worker, or a new one; the connection goes back
/// once the response body has been read to its end (by `Recycle`).
async fn send_conn(
    authority: &str,
    req: Request<BoxBody>,
) -> Result<Response<BoxBody>, Box<dyn std::error::Error + Send + Sync>> {
    let idle = IDLE.with(|i| {
        let mut i = i.borrow_mut();
        while let Some(s) = i.pop() {
            if s.is_ready() {
                return Some(s);
            }
        }
        None
    });
    let mut sender = match idle {
        Some(s) => s,
        None => {
            let stream = tokio::net::TcpStream::connect(authority).await?;
            let _ = stream.set_nodelay(true);
            let (sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            sender
        }
    };
    let resp = sender.send_request(req).await?;
    Ok(resp.map(|body| {
        Recycle {
            body,
            sender: Some(sender),
        }
        .boxed()
    }))
}

/// A response body that hands its connection back at its end.
struct Recycle {
    body: Incoming,
    sender: Option<hyper::client::conn::http1::SendRequest<BoxBody>>,
}

impl http_body::Body for Recycle {
    type Data = bytes::Bytes;
    type Error = smartgate::body::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        if self.body.is_end_stream()
            && let Some(s) = self.sender.take()
        {
            IDLE.with(|i| i.borrow_mut().push(s));
        }
        polled.map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
}

async fn forward(
    client: Upstream,
    upstream: Arc<str>,
    prefix: Arc<str>,
    req: Request<Incoming>,
) -> Result<Response<BoxBody>, Infallible> {
    spin();
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let rel = pq.strip_prefix(&*prefix).unwrap_or(pq);
    let uri: Uri = match format!("{upstream}{rel}").parse() {
        Ok(u) => u,
        Err(_) => return Ok(status(400)),
    };
    let (mut parts, body) = req.into_parts();
    parts.version = http::Version::HTTP_11;
    let body = body.map_err(Into::into).boxed();
    let sent = match client {
        Upstream::Pooled(client) => {
            parts.uri = uri;
            parts.headers.remove(http::header::HOST);
            client
                .request(Request::from_parts(parts, body))
                .await
                .map(|resp| resp.map(|b| b.map_err(Into::into).boxed()))
                .map_err(Into::into)
        }
        Upstream::Conn => {
            let authority = uri.authority().map(|a| a.to_string()).unwrap_or_default();
            if let Ok(host) = http::HeaderValue::from_str(&authority) {
                parts.headers.insert(http::header::HOST, host);
            }
            parts.uri = uri
                .path_and_query()
                .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
            send_conn(&authority, Request::from_parts(parts, body)).await
        }
    };
    Ok(sent.unwrap_or_else(|_| status(502)))
}

fn status(code: u16) -> Response<BoxBody> {
    let mut resp = Response::new(smartgate::body::empty());
    *resp.status_mut() = http::StatusCode::from_u16(code).unwrap_or_default();
    resp
}

/// `FLOOR_SPIN` rounds of arithmetic the optimiser cannot remove.
fn spin() {
    static ROUNDS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let rounds = *ROUNDS.get_or_init(|| {
        std::env::var("FLOOR_SPIN")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    });
    let mut x = 0u64;
    for i in 0..rounds {
        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
    }
    std::hint::black_box(x);
}
