//! The keep-alive pool to a plain-HTTP upstream: connections are reused while the upstream
//! keeps them, never after it closed or abandoned them, and every request still gets its
//! own complete answer. The upstream here is a raw TCP server, so each test decides
//! exactly what happens on the wire.

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{Method, Request, StatusCode};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

/// What the raw upstream does on each connection.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Answers every request, keeps the connection open.
    KeepAlive,
    /// Answers one request (without `Connection: close`), then closes the socket.
    CloseSilently,
    /// Answers one request with `Connection: close`, then closes.
    AnnounceClose,
    /// First connection: headers and part of the body, then silence. Later ones: keep-alive.
    StallFirst,
    /// Answers a connection's first request; closes on its second without answering (a
    /// keep-alive timeout that fired as the request arrived).
    DropSecond,
}

struct RawUpstream {
    base: String,
    connections: Arc<AtomicUsize>,
}

async fn raw_upstream(behaviour: Behaviour) -> RawUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/fhir", listener.local_addr().unwrap());
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let n = count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut served = 0usize;
                loop {
                    // One request head (the gateway sends these GET/HEAD without a body).
                    let Some(head) = read_head(&mut stream, &mut buf).await else {
                        return;
                    };
                    served += 1;
                    if matches!(behaviour, Behaviour::DropSecond) && served == 2 {
                        return;
                    }
                    let body = format!("{{\"resourceType\":\"Basic\",\"id\":\"c{n}r{served}\"}}");
                    let status = if head.contains("/Empty ") {
                        "204 No Content"
                    } else {
                        "200 OK"
                    };
                    let mut out =
                        format!("HTTP/1.1 {status}\r\ncontent-type: application/fhir+json\r\n");
                    if matches!(behaviour, Behaviour::AnnounceClose) {
                        out.push_str("connection: close\r\n");
                    }
                    if status.starts_with("204") {
                        out.push_str("\r\n");
                    } else if matches!(behaviour, Behaviour::StallFirst) && n == 0 {
                        out.push_str("content-length: 1000\r\n\r\n{\"resourceType\"");
                    } else {
                        out.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
                        if !head.starts_with("HEAD ") {
                            out.push_str(&body);
                        }
                    }
                    if stream.write_all(out.as_bytes()).await.is_err() {
                        return;
                    }
                    match behaviour {
                        Behaviour::KeepAlive => {}
                        Behaviour::CloseSilently | Behaviour::AnnounceClose => return,
                        Behaviour::StallFirst if n == 0 => {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                            return;
                        }
                        Behaviour::StallFirst | Behaviour::DropSecond => {}
                    }
                }
            });
        }
    });
    RawUpstream { base, connections }
}

async fn request(gw: &TestGateway, method: Method, path: &str) -> (StatusCode, String) {
    let (status, _, body) = send(
        Request::builder()
            .method(method)
            .uri(gw.url(path))
            .body(smartgate::body::empty())
            .unwrap(),
    )
    .await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn single_worker(base: &str) -> String {
    config(base, "").replace(
        "shutdown_grace = \"5s\"",
        "shutdown_grace = \"5s\"\nworkers = 1",
    )
}

/// Sequential requests, HEAD and 204 (bodiless answers) included, ride one connection.
#[tokio::test]
async fn sequential_requests_share_one_connection() {
    let up = raw_upstream(Behaviour::KeepAlive).await;
    let gw = TestGateway::boot(&single_worker(&up.base)).await;
    for i in 1..=3 {
        let (status, body) = request(&gw, Method::GET, "/r4/Basic/1").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains(&format!("\"c0r{i}\"")), "{body}");
    }
    let (status, body) = request(&gw, Method::HEAD, "/r4/Basic/1").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, ""));
    let (status, _) = request(&gw, Method::GET, "/r4/Empty").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = request(&gw, Method::GET, "/r4/Basic/1").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("\"c0r6\""), "{body}");
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);
    gw.stop().await;
}

/// `upstream.pool_max_idle_per_host = 0` keeps no connection: every request, with a body
/// or without, gets a new one and its answer. (Handing a connection back used to panic
/// the task serving the client, so every request failed.)
#[tokio::test]
async fn a_pool_of_none_keeps_nothing() {
    let up = raw_upstream(Behaviour::KeepAlive).await;
    let text = single_worker(&up.base).replace(
        "timeout = \"5s\"",
        "timeout = \"5s\"\npool_max_idle_per_host = 0",
    );
    let gw = TestGateway::boot(&text).await;
    for i in 0..3 {
        let (status, body) = request(&gw, Method::GET, "/r4/Basic/1").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains(&format!("\"c{i}r1\"")), "{body}");
    }
    let (status, _, _) = send(
        Request::post(gw.url("/r4/Basic"))
            .header("content-type", "application/fhir+json")
            .body(body_of("{}"))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = request(&gw, Method::GET, "/r4/Basic/1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(up.connections.load(Ordering::SeqCst), 5);
    gw.stop().await;
}

/// An upstream that closed an idle connection (its keep-alive timeout) without saying so:
/// the closed connection is not handed out again; the next request gets a new one.
#[tokio::test]
async fn connection_closed_by_upstream_is_not_reused() {
    let up = raw_upstream(Behaviour::CloseSilently).await;
    let gw = TestGateway::boot(&single_worker(&up.base)).await;
    for i in 0..3 {
        let (status, body) = request(&gw, Method::GET, "/r4/Basic/1").await;
        assert_eq!(status, StatusCode::OK, "request {i}: {body}");
        assert!(body.contains(&format!("\"c{i}r1\"")), "{body}");
        // Time for the close to arrive before the next request.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), 3);
    gw.stop().await;
}

/// `Connection: close` from the upstream: that connection is done.
#[tokio::test]
async fn announced_close_is_honoured() {
    let up = raw_upstream(Behaviour::AnnounceClose).await;
    let gw = TestGateway::boot(&single_worker(&up.base)).await;
    for i in 0..3 {
        let (status, body) = request(&gw, Method::GET, "/r4/Basic/1").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.contains(&format!("\"c{i}r1\"")), "{body}");
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), 3);
    gw.stop().await;
}

/// A response the gateway gave up on (the body stalled past `upstream.idle_timeout`) leaves
/// its connection unusable: the next request must not read the rest of that body.
#[tokio::test]
async fn abandoned_response_connection_is_dropped() {
    let up = raw_upstream(Behaviour::StallFirst).await;
    let text = single_worker(&up.base).replace(
        "timeout = \"5s\"",
        "timeout = \"5s\"\nidle_timeout = \"300ms\"",
    );
    let gw = TestGateway::boot(&text).await;
    let (status, _) = request(&gw, Method::GET, "/r4/Basic/1").await;
    assert_ne!(
        status,
        StatusCode::OK,
        "a stalled body cannot be answered whole"
    );
    for i in 1..=2 {
        let (status, body) = request(&gw, Method::GET, "/r4/Basic/1").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.contains(&format!("\"c1r{i}\"")), "{body}");
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), 2);
    gw.stop().await;
}

/// Concurrent requests each get their own connection and their own answer; afterwards
/// the connections stay pooled and carry the next round without new ones.
#[tokio::test]
async fn concurrent_requests_then_reuse() {
    let up = raw_upstream(Behaviour::KeepAlive).await;
    let gw = Arc::new(TestGateway::boot(&single_worker(&up.base)).await);
    for _round in 0..3 {
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let gw = gw.clone();
                tokio::spawn(async move { request(&gw, Method::GET, "/r4/Basic/1").await })
            })
            .collect();
        for t in tasks {
            let (status, body) = t.await.unwrap();
            assert_eq!(status, StatusCode::OK, "{body}");
            assert!(body.contains("\"resourceType\":\"Basic\""), "{body}");
        }
    }
    let opened = up.connections.load(Ordering::SeqCst);
    assert!(
        (1..=4).contains(&opened),
        "{opened} connections for 4 at a time"
    );
    if let Ok(gw) = Arc::try_unwrap(gw) {
        gw.stop().await;
    }
}

/// The upstream closes an idle pooled connection just as a GET arrives on it: the GET is
/// sent again on a new connection and answered. A DELETE in the same place is not
/// replayed (it may have been acted on): the client gets the 502.
#[tokio::test]
async fn safe_request_on_a_connection_closed_under_it_is_replayed_once() {
    let up = raw_upstream(Behaviour::DropSecond).await;
    let gw = TestGateway::boot(&single_worker(&up.base)).await;
    let (status, body) = request(&gw, Method::GET, "/r4/Basic/1").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("\"c0r1\""), "{body}");
    // Idle long enough for the gateway to send the next safe request again.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, body) = request(&gw, Method::GET, "/r4/Basic/1").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.contains("\"c1r1\""),
        "answered on a new connection: {body}"
    );
    assert_eq!(up.connections.load(Ordering::SeqCst), 2);

    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, _) = request(&gw, Method::DELETE, "/r4/Basic/1").await;
    assert_eq!(
        status,
        StatusCode::BAD_GATEWAY,
        "a DELETE is never sent twice"
    );
    assert_eq!(up.connections.load(Ordering::SeqCst), 2);
    gw.stop().await;
}

/// A request with a body rides hyper's connections, pooled apart from the bodiless ones:
/// reused while the upstream keeps them, and never sent twice when the upstream closes
/// one under it.
#[tokio::test]
async fn request_with_a_body_is_pooled_and_never_sent_twice() {
    let up = raw_upstream(Behaviour::DropSecond).await;
    let gw = TestGateway::boot(&single_worker(&up.base)).await;
    let post = || {
        send(
            Request::post(gw.url("/r4/Basic"))
                .header("content-type", "application/fhir+json")
                .header("content-length", "2")
                .body(body_of("{}"))
                .unwrap(),
        )
    };
    let (status, _, body) = post().await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    assert!(String::from_utf8_lossy(&body).contains("\"c0r1\""));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, _, _) = post().await;
    assert_eq!(
        status,
        StatusCode::BAD_GATEWAY,
        "a POST is never sent twice"
    );
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);
    gw.stop().await;
}

fn body_of(text: &'static str) -> smartgate::body::BoxBody {
    smartgate::body::full(text)
}
