//! Integration helpers: a recording fake upstream on 127.0.0.1:0, a gateway booted
//! through the library on port 0, and a plain HTTP client.
#![allow(dead_code)]

pub mod node;
pub mod tokens;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use smartgate::body::BoxBody;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: String,
    pub headers: HeaderMap,
    pub body_len: usize,
    pub body: Bytes,
    /// Whether the whole body arrived (false when the stream broke).
    pub complete: bool,
}

/// What the fake upstream answers: a function of the request it saw.
pub type Responder =
    Arc<dyn Fn(&Seen) -> Pin<Box<dyn Future<Output = Response<BoxBody>> + Send>> + Send + Sync>;

/// A recording upstream.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    _stop: oneshot::Sender<()>,
}

impl FakeUpstream {
    /// Starts an upstream that answers every request with `respond`. Bodies up to 1 MiB
    /// are kept; larger ones are only counted (so big streams cost no memory).
    pub async fn start(respond: Responder) -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (stop, mut stopped) = oneshot::channel();
        let rec = seen.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = &mut stopped => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                };
                let rec = rec.clone();
                let respond = respond.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let rec = rec.clone();
                        let respond = respond.clone();
                        async move {
                            let seen = record(req).await;
                            rec.lock().unwrap().push(seen.clone());
                            Ok::<_, Infallible>(respond(&seen).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FakeUpstream {
            addr,
            seen,
            _stop: stop,
        }
    }

    /// An upstream that echoes method, path and body back as JSON with status 200.
    pub async fn echo() -> FakeUpstream {
        FakeUpstream::start(Arc::new(|seen: &Seen| {
            let body = serde_json::json!({
                "method": seen.method.as_str(),
                "uri": seen.uri,
                "len": seen.body_len,
            });
            Box::pin(std::future::ready(json_response(StatusCode::OK, &body)))
        }))
        .await
    }

    /// Base URL of this upstream with the path `/fhir`.
    pub fn base(&self) -> String {
        format!("http://{}/fhir", self.addr)
    }

    /// Requests seen so far.
    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn record(req: Request<Incoming>) -> Seen {
    let (parts, mut body) = req.into_parts();
    let mut kept = Vec::new();
    let mut len = 0usize;
    let mut complete = true;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    len += d.len();
                    if kept.len() < (1 << 20) {
                        kept.extend_from_slice(d);
                    }
                }
            }
            Err(_) => {
                complete = false;
                break;
            }
        }
    }
    Seen {
        method: parts.method,
        uri: parts.uri.to_string(),
        headers: parts.headers,
        body_len: len,
        body: Bytes::from(kept),
        complete,
    }
}

/// A JSON response with `Content-Type: application/fhir+json`.
pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<BoxBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/fhir+json")
        .body(smartgate::body::full(body.to_string()))
        .unwrap()
}

/// A gateway running in this process.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub handle: smartgate::GatewayHandle,
    pub config_path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl TestGateway {
    /// Boots a gateway from configuration text (written to a temporary file, so reload
    /// works). `{upstream}` in the text is replaced by `upstream_base`.
    pub async fn boot(config_text: &str) -> TestGateway {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("smartgate.toml");
        // The audit trail goes to a file of the test's own (`audit_lines`), not stdout.
        let audit = dir.path().join("audit.jsonl");
        let config_text = if config_text.contains("[audit]") {
            config_text.replace("{audit_path}", &audit.display().to_string())
        } else {
            format!(
                "{config_text}\n[audit]\nsink = \"file\"\npath = \"{}\"\n",
                audit.display()
            )
        };
        std::fs::write(&config_path, &config_text).unwrap();
        let config = smartgate::Config::load(&config_path, Vec::new()).unwrap();
        let gw = smartgate::Gateway::bind(config, Some(config_path.clone()), Vec::new())
            .await
            .unwrap();
        let (addr, admin, handle) = (gw.public_addr(), gw.admin_addr(), gw.handle());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(gw.serve(async move {
            let _ = stopped.await;
        }));
        TestGateway {
            addr,
            admin,
            handle,
            config_path,
            stop: Some(stop),
            task: Some(task),
            _dir: dir,
        }
    }

    /// URL on the public listener.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The audit lines written so far, parsed.
    pub fn audit_lines(&self) -> Vec<serde_json::Value> {
        self.handle.flush_audit();
        let path = self._dir.path().join("audit.jsonl");
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Replaces the configuration file (not yet reloaded).
    pub fn rewrite_config(&self, text: &str) {
        std::fs::write(&self.config_path, text).unwrap();
    }

    /// Begins the shutdown (as SIGTERM does) without waiting for it.
    pub fn signal_stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    /// Stops serving and waits for the drain.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// A configuration for tests: public base `http://gateway.test/r4`, ephemeral ports.
pub fn config(upstream_base: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
public_base_url = "http://gateway.test/r4"
shutdown_grace = "5s"

[admin]
listen = "127.0.0.1:0"

[upstream]
url = "{upstream_base}"
timeout = "5s"

[auth]
mode = "none"

[reload]
watch = false

{extra}
"#
    )
}

/// Like [`config`], with `auth` in place of `[auth] mode = "none"`.
pub fn config_auth(upstream_base: &str, auth: &str, extra: &str) -> String {
    config(upstream_base, extra).replace("[auth]\nmode = \"none\"\n", auth)
}

/// `GET url` with `Authorization: Bearer token`.
pub async fn get_with_token(url: &str, token: &str) -> (StatusCode, HeaderMap, Bytes) {
    send(
        Request::get(url)
            .header("authorization", format!("Bearer {token}"))
            .body(smartgate::body::empty())
            .unwrap(),
    )
    .await
}

/// A pooled HTTP/1.1 client.
pub fn client() -> Client<HttpConnector, BoxBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends a request and returns status, headers and the whole body.
pub async fn send(req: Request<BoxBody>) -> (StatusCode, HeaderMap, Bytes) {
    let resp = client().request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, bytes)
}

/// `GET url`.
pub async fn get(url: &str) -> (StatusCode, HeaderMap, Bytes) {
    send(Request::get(url).body(smartgate::body::empty()).unwrap()).await
}

/// A body from bytes.
pub fn body(b: impl Into<Bytes>) -> BoxBody {
    Full::new(b.into()).map_err(|n| match n {}).boxed()
}

/// The body as JSON.
pub fn json(b: &Bytes) -> serde_json::Value {
    serde_json::from_slice(b).unwrap_or_else(|e| panic!("not JSON ({e}): {b:?}"))
}

/// Reads `/metrics` from the admin listener.
pub async fn metrics(gw: &TestGateway) -> String {
    let (_, _, b) = get(&format!("http://{}/metrics", gw.admin)).await;
    String::from_utf8(b.to_vec()).unwrap()
}

/// For raw TCP upstreams: the next request head on `stream` (bytes read past it stay in
/// `buf`), or `None` once the connection ends.
pub async fn read_head(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end);
    Some(head)
}
