//! How the gateway reads answers to bodiless requests from a plain-HTTP upstream (its
//! own HTTP/1.1 exchange, `src/proxy/h1.rs`): every framing RFC 9112 allows, delivered in
//! small pieces; interim answers; ambiguous or broken answers refused with a 502; and a
//! connection reused only when its answer ended exactly where its framing said. The
//! upstream is a raw TCP server that writes scripted bytes.

use crate::support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

const JSON: &str = "content-type: application/fhir+json\r\n";
const TEXT: &str = "content-type: text/plain\r\n";

/// The scripted answer to a request whose path ends in `name`: the pieces to write (a
/// short pause between them), and whether to close the connection afterwards.
fn script(name: &str) -> (Vec<Vec<u8>>, bool) {
    let one = |s: String| (vec![s.into_bytes()], false);
    match name {
        "Chunked" => {
            let answer = format!(
                "HTTP/1.1 200 OK\r\n{TEXT}transfer-encoding: chunked\r\n\r\n\
                 5;name=value\r\nhello\r\n6 \r\n world\r\n0\r\nx-trailer: 1\r\n\r\n"
            );
            // Three bytes at a time: every boundary lands somewhere awkward.
            let pieces = answer.as_bytes().chunks(3).map(<[u8]>::to_vec).collect();
            (pieces, false)
        }
        "Both" => one(format!(
            "HTTP/1.1 200 OK\r\n{TEXT}content-length: 999\r\ntransfer-encoding: chunked\r\n\r\n\
             5\r\nhello\r\n0\r\n\r\n"
        )),
        "Interim" => one(format!(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n\
             HTTP/1.1 200 OK\r\n{TEXT}content-length: 2\r\n\r\nok"
        )),
        "UntilClose" => (
            vec![
                format!("HTTP/1.1 200 OK\r\n{TEXT}\r\nuntil ").into_bytes(),
                b"close".to_vec(),
            ],
            true,
        ),
        "Http10" => one(format!(
            "HTTP/1.0 200 OK\r\n{TEXT}content-length: 3\r\n\r\nabc"
        )),
        "Extra" => one(format!(
            "HTTP/1.1 200 OK\r\n{TEXT}content-length: 2\r\n\r\nok\
             HTTP/1.1 200 OK\r\n{TEXT}content-length: 5\r\n\r\nsmugg"
        )),
        "Split" => (
            vec![
                b"HTTP/1.1 200 OK\r\ncontent-le".to_vec(),
                format!("ngth: 4\r\n{TEXT}\r").into_bytes(),
                b"\nab".to_vec(),
                b"cd".to_vec(),
            ],
            false,
        ),
        "Conflict" => one(format!(
            "HTTP/1.1 200 OK\r\n{JSON}content-length: 2\r\ncontent-length: 3\r\n\r\n{{}}"
        )),
        "Garbage" => one("HTTP/1.1 2x0 OK\r\n\r\n".into()),
        "Switch" => one("HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\n\r\n".into()),
        "ManyFields" => {
            let fields: String = (0..101).map(|i| format!("x-f{i}: {i}\r\n")).collect();
            one(format!(
                "HTTP/1.1 200 OK\r\n{fields}content-length: 0\r\n\r\n"
            ))
        }
        "Http10Chunked" => one(format!(
            "HTTP/1.0 200 OK\r\n{JSON}transfer-encoding: chunked\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n"
        )),
        "BadChunk" => one(format!(
            "HTTP/1.1 200 OK\r\n{JSON}transfer-encoding: chunked\r\n\r\n2\r\n{{}}XX0\r\n\r\n"
        )),
        "Truncated" => (
            vec![format!("HTTP/1.1 200 OK\r\n{JSON}content-length: 10\r\n\r\n{{}}").into_bytes()],
            true,
        ),
        "Silent" => (Vec::new(), true),
        "HugeHead" => {
            let field = format!("x-big: {}\r\n", "a".repeat(8000));
            one(format!("HTTP/1.1 200 OK\r\n{}\r\n", field.repeat(60)))
        }
        "TruncatedText" => (
            vec![format!("HTTP/1.1 200 OK\r\n{TEXT}content-length: 10\r\n\r\nhalf").into_bytes()],
            true,
        ),
        "BadChunkText" => one(format!(
            "HTTP/1.1 200 OK\r\n{TEXT}transfer-encoding: chunked\r\n\r\n4\r\nhalfXX0\r\n\r\n"
        )),
        _ => one(format!(
            "HTTP/1.1 200 OK\r\n{TEXT}content-length: 5\r\n\r\nplain"
        )),
    }
}

struct Scripted {
    base: String,
    connections: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
}

async fn scripted_upstream() -> Scripted {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/fhir", listener.local_addr().unwrap());
    let connections = Arc::new(AtomicUsize::new(0));
    let heads = Arc::new(Mutex::new(Vec::new()));
    let (count, seen) = (connections.clone(), heads.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            count.fetch_add(1, Ordering::SeqCst);
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some(head) = read_head(&mut stream, &mut buf).await else {
                        return;
                    };
                    let target = head.split(' ').nth(1).unwrap_or("").to_owned();
                    let name = target.rsplit('/').next().unwrap_or("").to_owned();
                    seen.lock().unwrap().push(head);
                    let (pieces, close) = script(&name);
                    for piece in pieces {
                        if stream.write_all(&piece).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    if close {
                        return;
                    }
                }
            });
        }
    });
    Scripted {
        base,
        connections,
        heads,
    }
}

fn single_worker(base: &str) -> String {
    config(base, "").replace(
        "shutdown_grace = \"5s\"",
        "shutdown_grace = \"5s\"\nworkers = 1",
    )
}

/// GET `path`: status, headers and body, or `Err` if the body broke off.
async fn fetch(
    gw: &TestGateway,
    method: Method,
    path: &str,
) -> (StatusCode, http::HeaderMap, Result<String, String>) {
    let req = Request::builder()
        .method(method)
        .uri(gw.url(path))
        .body(smartgate::body::empty())
        .unwrap();
    let resp = client().request(req).await.expect("the gateway answers");
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .map_err(|e| e.to_string());
    (parts.status, parts.headers, body)
}

/// Every framing, in pieces: chunks with extensions and trailers split three bytes at a
/// time, a head split inside a field name and between CR and LF, interim answers before
/// the final one. Each body arrives whole and exact, and the connection carries the next
/// request, except after an answer read until close or from HTTP/1.0.
#[tokio::test]
async fn every_framing_is_read_exactly() {
    let up = scripted_upstream().await;
    let gw = TestGateway::boot(&single_worker(&up.base)).await;
    let connections = || up.connections.load(Ordering::SeqCst);

    for (path, body, reused) in [
        ("/r4/Chunked", "hello world", true),
        ("/r4/Chunked", "hello world", true),
        ("/r4/Split", "abcd", true),
        ("/r4/Interim", "ok", true),
        ("/r4/Plain", "plain", true),
        ("/r4/UntilClose", "until close", false),
        ("/r4/Http10", "abc", false),
    ] {
        let before = connections();
        let (status, _, got) = fetch(&gw, Method::GET, path).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(got.as_deref(), Ok(body), "{path}");
        // The next request shows whether the connection went back to the pool.
        let (status, _, got) = fetch(&gw, Method::GET, "/r4/Plain").await;
        assert_eq!((status, got.as_deref()), (StatusCode::OK, Ok("plain")));
        // The first request opens a connection; an answer that ends the connection
        // makes the next request open another.
        let expected = usize::from(before == 0) + usize::from(!reused);
        assert_eq!(connections() - before, expected, "{path}");
    }
    gw.stop().await;
}

/// `Transfer-Encoding: chunked` with a `Content-Length`: the chunks frame the body, the
/// length does not travel on, and the connection is not reused (two parties might have
/// read its framing differently).
#[tokio::test]
async fn chunked_wins_over_length_and_the_connection_is_dropped() {
    let up = scripted_upstream().await;
    let gw = TestGateway::boot(&single_worker(&up.base)).await;
    let (status, headers, body) = fetch(&gw, Method::GET, "/r4/Both").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.as_deref(), Ok("hello"));
    assert_ne!(
        headers.get("content-length").map(|v| v.as_bytes()),
        Some(&b"999"[..])
    );
    let (_, _, body) = fetch(&gw, Method::GET, "/r4/Plain").await;
    assert_eq!(body.as_deref(), Ok("plain"));
    assert_eq!(up.connections.load(Ordering::SeqCst), 2);
    gw.stop().await;
}

/// Bytes after the end of an answer (here a second, unrequested answer) reach nobody:
/// the connection is closed rather than reused, so the next request cannot be answered
/// with them.
#[tokio::test]
async fn bytes_after_an_answer_are_never_served() {
    let up = scripted_upstream().await;
    let gw = TestGateway::boot(&single_worker(&up.base)).await;
    let (_, _, body) = fetch(&gw, Method::GET, "/r4/Extra").await;
    assert_eq!(body.as_deref(), Ok("ok"));
    for _ in 0..3 {
        let (_, _, body) = fetch(&gw, Method::GET, "/r4/Plain").await;
        assert_eq!(body.as_deref(), Ok("plain"));
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), 2);
    gw.stop().await;
}

/// Heads that are malformed, ambiguous or not an answer to this request are a 502
/// OperationOutcome, counted as protocol errors, and their connections are not reused.
#[tokio::test]
async fn broken_answers_are_502() {
    let up = scripted_upstream().await;
    let gw = TestGateway::boot(&single_worker(&up.base)).await;
    let broken = [
        "/r4/Conflict",
        "/r4/Garbage",
        "/r4/Switch",
        "/r4/ManyFields",
        "/r4/Http10Chunked",
        "/r4/Silent",
        "/r4/HugeHead",
    ];
    for path in broken {
        let started = std::time::Instant::now();
        let (status, headers, body) = fetch(&gw, Method::GET, path).await;
        assert_eq!(
            status,
            StatusCode::BAD_GATEWAY,
            "{path} after {:?}: {headers:?} {body:?}",
            started.elapsed()
        );
        assert!(
            headers["content-type"]
                .to_str()
                .unwrap()
                .contains("fhir+json")
        );
        let body = body.unwrap();
        assert!(body.contains("OperationOutcome"), "{path}: {body}");
        assert!(!body.contains("127.0.0.1"), "{path}: {body}");
    }
    let m = metrics(&gw).await;
    assert!(
        m.contains(&format!(
            "smartgate_upstream_errors_total{{kind=\"protocol\"}} {}",
            broken.len()
        )),
        "{m}"
    );
    let before = up.connections.load(Ordering::SeqCst);
    let (_, _, body) = fetch(&gw, Method::GET, "/r4/Plain").await;
    assert_eq!(body.as_deref(), Ok("plain"));
    assert_eq!(up.connections.load(Ordering::SeqCst), before + 1);
    gw.stop().await;
}

/// A body that breaks off (a malformed chunk, a length never reached) never passes as
/// complete: a FHIR JSON answer, read whole by the gateway, becomes a 502; a streamed
/// one breaks off for the client too, never ending as if whole.
#[tokio::test]
async fn broken_bodies_never_pass_as_complete() {
    let up = scripted_upstream().await;
    let gw = TestGateway::boot(&single_worker(&up.base)).await;
    for path in ["/r4/BadChunk", "/r4/Truncated"] {
        let (status, _, body) = fetch(&gw, Method::GET, path).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{path}: {body:?}");
    }
    for path in ["/r4/BadChunkText", "/r4/TruncatedText"] {
        let req = Request::get(gw.url(path))
            .body(smartgate::body::empty())
            .unwrap();
        // The connection breaks before the head, or the body breaks after it.
        if let Ok(resp) = client().request(req).await {
            let body = resp.into_body().collect().await;
            assert!(body.is_err(), "{path}: a broken body ended as if whole");
        }
    }
    gw.stop().await;
}

/// The request head the gateway writes: its own `Host`, no `Content-Length` on a GET, and
/// `Content-Length: 0` on a POST without a body, whatever the client said.
#[tokio::test]
async fn bodiless_request_heads() {
    let up = scripted_upstream().await;
    let gw = TestGateway::boot(&single_worker(&up.base)).await;
    let authority = up
        .base
        .trim_start_matches("http://")
        .trim_end_matches("/fhir");
    let (status, _, _) = fetch(&gw, Method::GET, "/r4/Plain?a=1").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = fetch(&gw, Method::POST, "/r4/Plain/_search").await;
    assert_eq!(status, StatusCode::OK);
    let heads = up.heads.lock().unwrap().clone();
    let get = heads[0].to_ascii_lowercase();
    assert!(get.starts_with("get /fhir/plain?a=1 http/1.1\r\n"), "{get}");
    assert!(get.contains(&format!("\r\nhost: {authority}\r\n")), "{get}");
    assert!(!get.contains("content-length"), "{get}");
    let post = heads[1].to_ascii_lowercase();
    assert!(
        post.starts_with("post /fhir/plain/_search http/1.1\r\n"),
        "{post}"
    );
    assert_eq!(post.matches("content-length").count(), 1, "{post}");
    assert!(post.contains("\r\ncontent-length: 0\r\n"), "{post}");
    gw.stop().await;
}
