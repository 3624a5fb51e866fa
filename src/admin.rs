//! The admin listener: `/healthz` (the process answers), `/readyz` (configuration loaded
//! and upstream reachable), `/metrics` (Prometheus text format).

use std::sync::Arc;
use std::time::Duration;

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};

use crate::body::{BoxBody, full};
use crate::state::Shared;

/// How long a readiness probe waits for the upstream's TCP handshake.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Answers one admin request.
pub async fn handle<B>(shared: Arc<Shared>, req: Request<B>) -> Response<BoxBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match readiness(&shared).await {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("not ready: {why}\n"),
            ),
        },
        "/metrics" => {
            crate::state::refresh_gauges(&shared);
            let mut resp = text(StatusCode::OK, &shared.metrics.render());
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Ready when a snapshot is loaded (always, once started), tokens can be judged (signing
/// keys loaded and fresh enough), and the upstream accepts a TCP connection. The check is a bare connect: cheap for the upstream, and it is what fails
/// when the upstream is down or unroutable.
async fn readiness(shared: &Shared) -> Result<(), String> {
    if shared.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return Err("shutting down".to_owned());
    }
    let snap = shared.snapshot.load_full();
    if let Some(auth) = &snap.auth {
        auth.readiness()?;
    }
    let (host, port) = snap.upstream.host_port();
    match tokio::time::timeout(
        PROBE_TIMEOUT,
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("upstream unreachable ({})", e.kind())),
        Err(_) => Err("upstream connect timed out".to_owned()),
    }
}

fn text(status: StatusCode, body: &str) -> Response<BoxBody> {
    let mut resp = Response::new(full(body.to_owned()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
