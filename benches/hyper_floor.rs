//! The floor of the stack smartgate is built on: the least a reverse proxy made of the same
//! parts can do per request. One current-thread runtime per CPU, one acceptor handing
//! connections out in turn, hyper's HTTP/1 + h2 server, hyper-util's pooled client per
//! worker, and nothing else: no header hygiene, no forwarding headers, no request id, no
//! metrics, no logging, no link rewriting, no limits, no timeouts.
//!
//! Not a product and not a benchmark of smartgate: `benches/load.sh` runs it beside nginx
//! and smartgate (target `floor`) so the report can say how much of the distance to nginx
//! is the stack and how much is smartgate's own work.
//!
//!     cargo bench --bench hyper_floor -- LISTEN UPSTREAM_BASE PUBLIC_PREFIX
//!     e.g. ... -- 127.0.0.1:8090 http://127.0.0.1:8080/fhir /r4

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

    let mut handoffs = Vec::new();
    for _ in 0..workers {
        let (tx, mut rx) = mpsc::unbounded_channel::<std::net::TcpStream>();
        handoffs.push(tx);
        let (upstream, prefix) = (upstream.clone(), prefix.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let client: Client<HttpConnector, BoxBody> =
                    Client::builder(TokioExecutor::new()).build_http();
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

async fn forward(
    client: Client<HttpConnector, BoxBody>,
    upstream: Arc<str>,
    prefix: Arc<str>,
    req: Request<Incoming>,
) -> Result<Response<BoxBody>, Infallible> {
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let rel = pq.strip_prefix(&*prefix).unwrap_or(pq);
    let uri: Uri = match format!("{upstream}{rel}").parse() {
        Ok(u) => u,
        Err(_) => return Ok(status(400)),
    };
    let (mut parts, body) = req.into_parts();
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    parts.headers.remove(http::header::HOST);
    let req = Request::from_parts(parts, body.map_err(Into::into).boxed());
    Ok(match client.request(req).await {
        Ok(resp) => resp.map(|b| b.map_err(Into::into).boxed()),
        Err(_) => status(502),
    })
}

fn status(code: u16) -> Response<BoxBody> {
    let mut resp = Response::new(smartgate::body::empty());
    *resp.status_mut() = http::StatusCode::from_u16(code).unwrap_or_default();
    resp
}
