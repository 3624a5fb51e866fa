//! Request smuggling and response-queue poisoning (issue 21, items 1 and 2), against an
//! upstream that reads no body on GET, HEAD or DELETE, as some servers and the components
//! in front of them do (the CL.0 class): any body the gateway forwarded there would be run
//! as the next request on the connection, unchecked. The gateway must refuse a body on an
//! interaction that has none in FHIR, however it is framed (HTTP/1.1 `Content-Length`,
//! chunked, HTTP/2 DATA frames), and must never reuse a connection whose exchange is not
//! known complete on both sides.

use crate::support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An upstream that takes a body only on POST, PUT and PATCH (by `Content-Length`), and
/// answers every request head it reads with a small JSON resource naming its target. A
/// target containing `early` is answered before its body is read.
struct Naive {
    base: String,
    heads: Arc<Mutex<Vec<String>>>,
    connections: Arc<AtomicUsize>,
}

impl Naive {
    async fn start() -> Naive {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/fhir", listener.local_addr().unwrap());
        let heads = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (seen, count) = (heads.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    while let Some(head) = read_head(&mut stream, &mut buf).await {
                        seen.lock().unwrap().push(head.clone());
                        let lower = head.to_ascii_lowercase();
                        let method = head.split(' ').next().unwrap_or("").to_owned();
                        let target = head.split(' ').nth(1).unwrap_or("").to_owned();
                        let length: usize = lower
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        let reads_body = matches!(method.as_str(), "POST" | "PUT" | "PATCH");
                        let early = target.contains("early");
                        if reads_body && !early && !read_body(&mut stream, &mut buf, length).await {
                            return;
                        }
                        let body = format!(
                            r#"{{"resourceType":"Basic","id":"x","note":"{method} {target}"}}"#
                        );
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\n\
                             content-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if stream.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                        if reads_body && early && !read_body(&mut stream, &mut buf, length).await {
                            return;
                        }
                    }
                });
            }
        });
        Naive {
            base,
            heads,
            connections,
        }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

/// Reads `n` body bytes (some may be in `buf` already); false when the connection ends.
async fn read_body(stream: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> bool {
    while buf.len() < n {
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
        }
    }
    buf.drain(..n);
    true
}

fn one_worker(base: &str) -> String {
    config(base, "").replace(
        "shutdown_grace = \"5s\"",
        "shutdown_grace = \"5s\"\nworkers = 1",
    )
}

/// What the smuggled body asks for: a delete of another patient's record, then a read of
/// that patient.
const SMUGGLED: &str = "DELETE /fhir/Observation/o456 HTTP/1.1\r\nHost: up\r\n\r\n\
                        GET /fhir/Patient/456 HTTP/1.1\r\nHost: up\r\n\r\n";

/// Sends raw bytes to the gateway and returns the first answer's status line and the
/// whole answer text (read until the connection closes or goes quiet).
async fn raw(gw: &TestGateway, bytes: &[u8]) -> (String, String) {
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    loop {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(k)) => out.extend_from_slice(&chunk[..k]),
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    (text.lines().next().unwrap_or("").to_owned(), text)
}

/// No upstream request head names what only the smuggled body asked for.
fn nothing_smuggled(up: &Naive) {
    for head in up.heads() {
        assert!(
            !head.contains("o456") && !head.contains("Patient/456"),
            "a smuggled request reached the upstream: {head}"
        );
    }
}

/// HTTP/1.1: a body on GET, HEAD, DELETE or OPTIONS, by `Content-Length` or chunked, is
/// refused with 400 and never reaches the upstream; the connection is not read on as if
/// the body were the next request either.
#[tokio::test]
async fn bodies_on_bodiless_methods_are_refused_over_http1() {
    let up = Naive::start().await;
    let gw = TestGateway::boot(&one_worker(&up.base)).await;
    for method in ["GET", "HEAD", "DELETE", "OPTIONS"] {
        let by_length = format!(
            "{method} /r4/Patient/123 HTTP/1.1\r\nHost: gw\r\nContent-Length: {}\r\n\r\n{SMUGGLED}",
            SMUGGLED.len()
        );
        let chunked = format!(
            "{method} /r4/Patient/123 HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n\
             {:x}\r\n{SMUGGLED}\r\n0\r\n\r\n",
            SMUGGLED.len()
        );
        for request in [by_length, chunked] {
            let (status, text) = raw(&gw, request.as_bytes()).await;
            assert!(status.contains(" 400 "), "{method}: {status}\n{text}");
            assert!(!text.contains("o456"), "{method}: {text}");
        }
    }
    assert!(
        up.heads().is_empty(),
        "nothing reaches the upstream: {:?}",
        up.heads()
    );
    gw.stop().await;
}

/// An empty body on a bodiless method (`Content-Length: 0`, a chunked body of no chunk)
/// passes, and the upstream sees a plain GET with no framing of the client's.
#[tokio::test]
async fn empty_bodies_on_bodiless_methods_pass_without_framing() {
    let up = Naive::start().await;
    let gw = TestGateway::boot(&one_worker(&up.base)).await;
    for request in [
        "GET /r4/Patient/123 HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        "GET /r4/Patient/123 HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
    ] {
        let (status, text) = raw(&gw, request.as_bytes()).await;
        assert!(status.contains(" 200 "), "{status}\n{text}");
    }
    let heads = up.heads();
    assert_eq!(heads.len(), 2, "{heads:?}");
    for head in heads {
        let lower = head.to_ascii_lowercase();
        assert!(lower.starts_with("get /fhir/patient/123 "), "{head}");
        assert!(
            !lower.contains("content-length") && !lower.contains("transfer-encoding"),
            "{head}"
        );
    }
    gw.stop().await;
}

/// A pipelined second request after a refused one is never read as the refused
/// request's body: the smuggled requests never reach the upstream.
#[tokio::test]
async fn a_refused_body_is_not_read_as_pipelined_requests() {
    let up = Naive::start().await;
    let gw = TestGateway::boot(&one_worker(&up.base)).await;
    // The body is declared (and sent) in full; the gateway refuses and closes or skips it.
    let request = format!(
        "GET /r4/Patient/123 HTTP/1.1\r\nHost: gw\r\nContent-Length: {}\r\n\r\n{SMUGGLED}\
         GET /r4/Patient/123 HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
        SMUGGLED.len()
    );
    let (status, _) = raw(&gw, request.as_bytes()).await;
    assert!(status.contains(" 400 "), "{status}");
    nothing_smuggled(&up);
    gw.stop().await;
}

/// HTTP/2 (prior knowledge): DATA frames on GET, HEAD or DELETE are refused with 400 and
/// never reach the upstream; an empty DATA frame that ends the stream passes.
#[tokio::test]
async fn data_frames_on_bodiless_methods_are_refused_over_http2() {
    let up = Naive::start().await;
    let gw = TestGateway::boot(&one_worker(&up.base)).await;
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    for method in [Method::GET, Method::HEAD, Method::DELETE] {
        for with_length in [true, false] {
            let mut req = Request::builder()
                .method(method.clone())
                .uri(format!("http://{}/r4/Patient/123", gw.addr));
            if with_length {
                req = req.header("content-length", SMUGGLED.len());
            }
            // A streamed body: no length hyper could frame it by, DATA frames only.
            let body: smartgate::body::BoxBody = if with_length {
                body(SMUGGLED)
            } else {
                http_body_util::StreamBody::new(futures_stream(SMUGGLED)).boxed()
            };
            let resp = sender.send_request(req.body(body).unwrap()).await.unwrap();
            assert_eq!(
                resp.status(),
                StatusCode::BAD_REQUEST,
                "{method} {with_length}"
            );
        }
    }
    // An empty body that ends the stream is no body.
    let req = Request::get(format!("http://{}/r4/Patient/123", gw.addr))
        .body(http_body_util::StreamBody::new(futures_stream("")).boxed())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let heads = up.heads();
    assert_eq!(heads.len(), 1, "{heads:?}");
    nothing_smuggled(&up);
    gw.stop().await;
}

/// A body of one DATA frame with `text`, of unknown length.
fn futures_stream(
    text: &'static str,
) -> impl futures_core::Stream<Item = Result<http_body::Frame<Bytes>, smartgate::body::BoxError>>
+ Send
+ Sync
+ 'static {
    struct Once(Option<&'static str>);
    impl futures_core::Stream for Once {
        type Item = Result<http_body::Frame<Bytes>, smartgate::body::BoxError>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            std::task::Poll::Ready(
                self.0
                    .take()
                    .map(|t| Ok(http_body::Frame::data(Bytes::from_static(t.as_bytes())))),
            )
        }
    }
    Once(Some(text))
}

/// An upstream that answers a POST before it has read the body: the connection is not
/// used again, though the body is sent to its end afterwards (the upstream may read what
/// follows as another request, and its answer would wait there for the next request).
#[tokio::test]
async fn a_connection_answered_before_its_request_was_sent_is_not_reused() {
    let up = Naive::start().await;
    let gw = TestGateway::boot(&one_worker(&up.base)).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let half = "{\"resourceType\":";
    let rest = "\"Basic\"}";
    let head = format!(
        "POST /r4/early HTTP/1.1\r\nHost: gw\r\nContent-Type: application/fhir+json\r\n\
         Content-Length: {}\r\n\r\n{half}",
        half.len() + rest.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // The answer comes before the body is complete.
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("POST /fhir/early") {
        let mut chunk = [0u8; 4096];
        let k = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("the early answer comes")
            .unwrap();
        assert!(k > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..k]);
    }
    s.write_all(rest.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, _, _) = send(
        Request::post(gw.url("/r4/Basic"))
            .header("content-type", "application/fhir+json")
            .body(body("{\"resourceType\":\"Basic\"}"))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        2,
        "the early-answered connection was not reused: {:?}",
        up.heads()
    );
    gw.stop().await;
}

/// An HTTP/2 connection to the gateway (prior knowledge).
async fn h2(gw: &TestGateway) -> hyper::client::conn::http2::SendRequest<smartgate::body::BoxBody> {
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

/// HTTP/2 heads the upstream could read another way are refused: a `host` naming another
/// authority than `:authority`, white space around a value. Cookie crumbs reach the
/// HTTP/1.1 upstream as one `Cookie` joined by "; ", and `X-Forwarded-Host` names
/// `:authority`.
#[tokio::test]
async fn http2_heads_have_one_reading() {
    let up = Naive::start().await;
    let gw = TestGateway::boot(&one_worker(&up.base)).await;
    let mut sender = h2(&gw).await;
    let target = "http://gw.example/r4/Patient/123";
    for (name, value) in [
        ("host", "other.example"),
        ("x-padded", " value"),
        ("x-padded", "value\t"),
        ("cookie", " a=1"),
    ] {
        let req = Request::get(target)
            .header(name, http::HeaderValue::from_str(value).unwrap())
            .body(smartgate::body::empty())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{name}: {value:?}");
    }
    assert!(up.heads().is_empty(), "{:?}", up.heads());
    let req = Request::get(target)
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("host", "GW.example")
        .body(smartgate::body::empty())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let head = up.heads().pop().unwrap().to_ascii_lowercase();
    assert_eq!(head.matches("\r\ncookie:").count(), 1, "{head}");
    assert!(head.contains("\r\ncookie: a=1; b=2\r\n"), "{head}");
    assert!(
        head.contains("\r\nx-forwarded-host: gw.example\r\n"),
        "{head}"
    );
    gw.stop().await;
}

/// HTTP/1.1: userinfo in an absolute-form target or in `Host`, two `Host` fields, and a
/// `Host` that disagrees with the absolute-form target are refused.
#[tokio::test]
async fn http1_authorities_have_one_reading() {
    let up = Naive::start().await;
    let gw = TestGateway::boot(&one_worker(&up.base)).await;
    for request in [
        "GET http://user:pw@gw/r4/Patient/123 HTTP/1.1\r\nHost: user:pw@gw\r\nConnection: close\r\n\r\n",
        "GET /r4/Patient/123 HTTP/1.1\r\nHost: evil@gw\r\nConnection: close\r\n\r\n",
        "GET /r4/Patient/123 HTTP/1.1\r\nHost: gw\r\nHost: other\r\nConnection: close\r\n\r\n",
        "GET http://gw/r4/Patient/123 HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n",
    ] {
        let (status, text) = raw(&gw, request.as_bytes()).await;
        assert!(status.contains(" 400 "), "{request:?}: {text}");
    }
    assert!(up.heads().is_empty(), "{:?}", up.heads());
    gw.stop().await;
}

/// HTTP/2 rapid reset, paced: each stream is cancelled (RST_STREAM) a few milliseconds
/// after it was sent, once it has been forwarded. The gateway closes the connection once
/// most of its requests are cancelled, so one client cannot keep the upstream busy with
/// work nobody waits for; what reached the upstream stays bounded.
#[tokio::test]
async fn paced_rapid_reset_closes_the_connection() {
    let up = FakeUpstream::start(Arc::new(|_: &Seen| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            json_response(
                StatusCode::OK,
                &serde_json::json!({"resourceType": "Basic"}),
            )
        })
    }))
    .await;
    let gw = TestGateway::boot(&one_worker(&up.base())).await;
    let mut sender = h2(&gw).await;
    let mut sent = 0;
    for _ in 0..1000 {
        if sender.ready().await.is_err() {
            break;
        }
        let req = Request::get("http://gw/r4/Patient/123")
            .body(smartgate::body::empty())
            .unwrap();
        let pending = sender.send_request(req);
        sent += 1;
        // Sent and forwarded, then cancelled.
        let _ = tokio::time::timeout(Duration::from_millis(3), pending).await;
    }
    assert!(
        sent < 1000,
        "the connection stayed open through {sent} cancelled requests"
    );
    let reached = up.requests().len();
    assert!(
        reached <= 200,
        "{reached} cancelled requests reached the upstream"
    );
    // A well-behaved connection is unaffected.
    let (status, _, _) = get(&gw.url("/r4/Patient/123")).await;
    assert_eq!(status, StatusCode::OK);
    // Every abandoned request left the in-flight gauge as it found it.
    let mut m = String::new();
    for _ in 0..50 {
        m = metrics(&gw).await;
        if m.contains("smartgate_inflight_requests 0\n") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(m.contains("smartgate_inflight_requests 0\n"), "{m}");
    gw.stop().await;
}
