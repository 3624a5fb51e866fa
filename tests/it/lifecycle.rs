//! Reload, TLS, HTTP/2, admin endpoints and metrics.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use support::*;

/// An upstream that answers with its own name, to tell two apart.
async fn named(name: &'static str) -> FakeUpstream {
    FakeUpstream::start(Arc::new(move |_: &Seen| {
        Box::pin(std::future::ready(json_response(
            StatusCode::OK,
            &json!({"upstream": name}),
        )))
    }))
    .await
}

/// A reload between two requests switches the upstream; in-flight config is one snapshot.
#[tokio::test]
async fn reload_switches_upstream() {
    let (a, b) = (named("a").await, named("b").await);
    let gw = TestGateway::boot(&config(&a.base(), "")).await;
    let (_, _, body) = get(&gw.url("/r4/Patient")).await;
    assert_eq!(json(&body)["upstream"], "a");

    gw.rewrite_config(&config(&b.base(), ""));
    gw.handle.reload().unwrap();
    let (_, _, body) = get(&gw.url("/r4/Patient")).await;
    assert_eq!(json(&body)["upstream"], "b");
    assert!(
        metrics(&gw)
            .await
            .contains("smartgate_config_reloads_total{result=\"success\"} 1")
    );
    gw.stop().await;
}

/// An invalid file is refused, counted, and the previous configuration keeps serving.
#[tokio::test]
async fn invalid_reload_keeps_old_config() {
    let (a, b) = (named("a").await, named("b").await);
    let gw = TestGateway::boot(&config(&a.base(), "")).await;
    for broken in [
        config(&b.base(), "").replace("[upstream]", "[upstream]\ntimout = \"1s\""),
        config("not a url", ""),
        "this is = not [toml".to_owned(),
    ] {
        gw.rewrite_config(&broken);
        let err = gw.handle.reload().unwrap_err().to_string();
        assert!(!err.is_empty());
        let (status, _, body) = get(&gw.url("/r4/Patient")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json(&body)["upstream"], "a", "after {broken}");
    }
    assert!(
        metrics(&gw)
            .await
            .contains("smartgate_config_reloads_total{result=\"failure\"} 3")
    );
    gw.stop().await;
}

/// The file watch picks up a change without a signal.
#[tokio::test]
async fn file_watch_reloads() {
    let (a, b) = (named("a").await, named("b").await);
    let watch = "[reload]\nwatch = true\ninterval = \"100ms\"";
    let gw =
        TestGateway::boot(&config(&a.base(), "").replace("[reload]\nwatch = false", watch)).await;
    // Let the watcher take its first look, and make sure the mtime moves on coarse clocks.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    gw.rewrite_config(&config(&b.base(), "").replace("[reload]\nwatch = false", watch));
    let mut switched = false;
    for _ in 0..100 {
        let (_, _, body) = get(&gw.url("/r4/Patient")).await;
        if json(&body)["upstream"] == "b" {
            switched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(switched, "file change was not picked up");
    gw.stop().await;
}

/// An HTTP/2 (prior knowledge) client is served and forwarded to an HTTP/1.1 upstream.
#[tokio::test]
async fn h2_client_to_h1_upstream() {
    let up = FakeUpstream::echo().await;
    let gw = TestGateway::boot(&config(&up.base(), "")).await;
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<smartgate::body::BoxBody>();
    let req = Request::post(gw.url("/r4/Patient"))
        .body(body("{\"resourceType\":\"Patient\"}"))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(json(&b)["len"], 26);
    assert_eq!(up.requests()[0].method, http::Method::POST);
    gw.stop().await;
}

struct TestCert {
    cert_pem: String,
    key_pem: String,
    der: rustls::pki_types::CertificateDer<'static>,
}

fn make_cert(name: &str) -> TestCert {
    make_cert_until(name, 2031, 3, 4)
}

/// A certificate for `name` that expires at the start of the given day (UTC).
fn make_cert_until(name: &str, year: i32, month: u8, day: u8) -> TestCert {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
    params.not_after = rcgen::date_time_ymd(year, month, day);
    let cert = params.self_signed(&key).unwrap();
    TestCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        der: cert.der().clone(),
    }
}

/// A TLS client that trusts exactly `cert`, offering h2 and http/1.1.
async fn tls_get(
    addr: std::net::SocketAddr,
    cert: &rustls::pki_types::CertificateDer<'static>,
    path: &str,
) -> (http::Version, StatusCode, Bytes) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("gateway.test").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("https://gateway.test{path}"))
        .body(smartgate::body::empty())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let (v, s) = (resp.version(), resp.status());
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    (v, s, b)
}

/// The TLS listener serves h2 over rustls, and picks up a new certificate from disk.
#[tokio::test]
async fn tls_listener_and_certificate_reload() {
    let up = FakeUpstream::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let first = make_cert("gateway.test");
    std::fs::write(&cert_path, &first.cert_pem).unwrap();
    std::fs::write(&key_path, &first.key_pem).unwrap();
    let tls = format!(
        "[server.tls]\ncert = \"{}\"\nkey = \"{}\"",
        cert_path.display(),
        key_path.display()
    );
    let text = config(&up.base(), "")
        .replace("[admin]", &format!("{tls}\n\n[admin]"))
        .replace(
            "[reload]\nwatch = false",
            "[reload]\nwatch = true\ninterval = \"100ms\"",
        );
    let gw = TestGateway::boot(&text).await;

    let (version, status, body) = tls_get(gw.addr, &first.der, "/r4/Patient").await;
    assert_eq!(version, http::Version::HTTP_2);
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["uri"], "/fhir/Patient");
    assert_eq!(up.requests()[0].headers["x-forwarded-proto"], "https");
    // Its expiry, for the certificate alert: 2031-03-04T00:00:00Z.
    let expiry = "smartgate_tls_certificate_not_after_timestamp_seconds";
    assert!(
        metrics(&gw)
            .await
            .contains(&format!("{expiry} 1930348800\n")),
        "{}",
        metrics(&gw).await
    );

    // Rotate: the new certificate is served without a restart.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = make_cert_until("gateway.test", 2032, 1, 1);
    std::fs::write(&key_path, &second.key_pem).unwrap();
    std::fs::write(&cert_path, &second.cert_pem).unwrap();
    let mut rotated = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if metrics(&gw)
            .await
            .contains("smartgate_tls_reloads_total{result=\"success\"} 1")
        {
            rotated = true;
            break;
        }
    }
    assert!(rotated, "certificate change not picked up");
    assert!(
        metrics(&gw)
            .await
            .contains(&format!("{expiry} 1956528000\n"))
    );
    let (_, status, _) = tls_get(gw.addr, &second.der, "/r4/Patient").await;
    assert_eq!(status, StatusCode::OK);
    gw.stop().await;
}

/// /healthz answers; /readyz follows the upstream; /metrics has every documented family.
#[tokio::test]
async fn admin_endpoints() {
    let up = FakeUpstream::echo().await;
    let gw = TestGateway::boot(&config(&up.base(), "")).await;
    let admin = |p: &str| format!("http://{}{}", gw.admin, p);
    assert_eq!(get(&admin("/healthz")).await.0, StatusCode::OK);
    assert_eq!(get(&admin("/readyz")).await.0, StatusCode::OK);
    get(&gw.url("/r4/Patient")).await;
    get(&gw.url("/nowhere")).await;
    let m = metrics(&gw).await;
    for family in [
        "smartgate_requests_total{route=\"fhir\",status_class=\"2xx\"} 1",
        "smartgate_requests_total{route=\"not_found\",status_class=\"4xx\"} 1",
        "smartgate_request_duration_seconds_bucket",
        "smartgate_upstream_duration_seconds_bucket",
        "smartgate_inflight_requests 0",
        "smartgate_config_reloads_total",
        "smartgate_build_info{revision=",
    ] {
        assert!(m.contains(family), "missing {family} in\n{m}");
    }
    // Bounded labels: no path or id ever becomes a label value.
    assert!(!m.contains("Patient"), "{m}");
    assert_eq!(get(&admin("/other")).await.0, StatusCode::NOT_FOUND);
    gw.stop().await;

    // Upstream gone → not ready.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gw = TestGateway::boot(&config(&format!("http://127.0.0.1:{port}/fhir"), "")).await;
    let (status, _, body) = get(&format!("http://{}/readyz", gw.admin)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(String::from_utf8_lossy(&body).contains("upstream"));
    assert_eq!(
        get(&format!("http://{}/healthz", gw.admin)).await.0,
        StatusCode::OK
    );
    gw.stop().await;
}

/// An https upstream with a private CA (upstream.ca_file): the gateway verifies it, speaks
/// h2 when the upstream offers it by ALPN, and refuses an upstream it cannot verify.
#[tokio::test]
async fn https_upstream_with_private_ca_and_h2() {
    use hyper_util::server::conn::auto;
    let cert = make_cert("localhost");
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca_path, &cert.cert_pem).unwrap();

    let key: rustls::pki_types::PrivateKeyDer<'static> =
        rustls::pki_types::pem::PemObject::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
    let mut server_cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.der.clone()], key)
    .unwrap();
    server_cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let versions = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = versions.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        seen.lock().unwrap().push(req.version());
                        async move {
                            Ok::<_, std::convert::Infallible>(json_response(
                                StatusCode::OK,
                                &json!({"tls": true}),
                            ))
                        }
                    });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });

    let base = format!("https://localhost:{port}/fhir");
    let with_ca = config(&base, "").replace(
        "timeout = \"5s\"",
        &format!("timeout = \"5s\"\nca_file = \"{}\"", ca_path.display()),
    );
    let gw = TestGateway::boot(&with_ca).await;
    let (status, _, body) = get(&gw.url("/r4/Patient/1")).await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    assert_eq!(json(&body)["tls"], true);
    assert_eq!(versions.lock().unwrap()[0], http::Version::HTTP_2);
    gw.stop().await;

    // Without the CA the upstream cannot be verified: 502, nothing served.
    let gw = TestGateway::boot(&config(&base, "")).await;
    assert_eq!(
        get(&gw.url("/r4/Patient/1")).await.0,
        StatusCode::BAD_GATEWAY
    );
    assert_eq!(versions.lock().unwrap().len(), 1);
    gw.stop().await;
}

/// The value of `smartgate_worker_connections{worker="N"}`.
fn worker_connections(metrics: &str, worker: usize) -> i64 {
    let prefix = format!("smartgate_worker_connections{{worker=\"{worker}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no connection gauge for worker {worker}:\n{metrics}"))
}

/// Keep-alive connections opened together are spread evenly over the worker threads (and
/// counted per worker), not left on whichever worker woke first.
#[tokio::test]
async fn connections_spread_over_workers() {
    let up = FakeUpstream::echo().await;
    let text = config(&up.base(), "").replace(
        "shutdown_grace = \"5s\"",
        "shutdown_grace = \"5s\"\nworkers = 2",
    );
    let gw = TestGateway::boot(&text).await;
    let mut open = Vec::new();
    for _ in 0..4 {
        let stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        let task = tokio::spawn(conn);
        let req = Request::get(gw.url("/r4/Patient/1"))
            .body(smartgate::body::empty())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.into_body().collect().await.unwrap();
        open.push((sender, task));
    }
    let text = metrics(&gw).await;
    assert_eq!(worker_connections(&text, 0), 2, "{text}");
    assert_eq!(worker_connections(&text, 1), 2, "{text}");

    for (sender, task) in open {
        drop(sender);
        let _ = task.await;
    }
    let mut remaining = (-1, -1);
    for _ in 0..100 {
        let text = metrics(&gw).await;
        remaining = (worker_connections(&text, 0), worker_connections(&text, 1));
        if remaining == (0, 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        remaining,
        (0, 0),
        "closed connections are no longer counted"
    );
    gw.stop().await;
}

/// Reads from `stream` until the gateway closes it (end of stream or reset) and returns
/// what came; panics if it stays open for `limit`.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, limit: Duration) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let closed = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "connection still open after {limit:?}");
    got
}

/// server.header_read_timeout: a client that connects and sends nothing, one that starts
/// a request head and never ends it (slowloris), an HTTP/2 connection that never asks
/// anything, and keep-alive connections left idle (HTTP/1 and HTTP/2, whose pings would
/// keep it open) are all closed; a head that arrives in pieces within the limit is served.
#[tokio::test]
async fn header_read_timeout_closes_slow_and_idle_connections() {
    use tokio::io::AsyncWriteExt;
    let up = FakeUpstream::echo().await;
    let text = config(&up.base(), "").replace(
        "shutdown_grace = \"5s\"",
        "shutdown_grace = \"5s\"\nheader_read_timeout = \"2s\"",
    );
    let gw = TestGateway::boot(&text).await;
    let generous = Duration::from_secs(20);

    // Never finished: closed, and nothing reached the upstream.
    let mut slow = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    slow.write_all(b"GET /r4/Patient/slow HTTP/1.1\r\nhost: gateway.test\r\n")
        .await
        .unwrap();
    // Connected, and not a byte sent.
    let mut silent = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    // HTTP/2 set up (preface and settings), no request.
    let h2 = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (h2_sender, h2_conn) = hyper::client::conn::http2::handshake::<
        _,
        _,
        smartgate::body::BoxBody,
    >(TokioExecutor::new(), TokioIo::new(h2))
    .await
    .unwrap();
    let h2_conn = tokio::spawn(h2_conn);
    // HTTP/2, one request, then idle.
    let h2_used = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut h2_used_sender, h2_used_conn) = hyper::client::conn::http2::handshake::<
        _,
        _,
        smartgate::body::BoxBody,
    >(TokioExecutor::new(), TokioIo::new(h2_used))
    .await
    .unwrap();
    let h2_used_conn = tokio::spawn(h2_used_conn);
    let resp = h2_used_sender
        .send_request(
            Request::get(gw.url("/r4/Patient/h2"))
                .body(smartgate::body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await.unwrap();
    // Idle after one answer.
    let mut idle = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    idle.write_all(b"GET /r4/Patient/idle HTTP/1.1\r\nhost: gateway.test\r\n\r\n")
        .await
        .unwrap();
    // In pieces, within the limit.
    let mut pieces = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    pieces
        .write_all(b"GET /r4/Patient/pieces HTTP/1.1\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    pieces
        .write_all(b"host: gateway.test\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();

    let answer =
        String::from_utf8_lossy(&read_until_closed(&mut pieces, generous).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let answer =
        String::from_utf8_lossy(&read_until_closed(&mut idle, generous).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{answer}");
    assert!(read_until_closed(&mut silent, generous).await.is_empty());
    assert!(
        tokio::time::timeout(generous, h2_conn).await.is_ok(),
        "an HTTP/2 connection with no request still open after {generous:?}"
    );
    drop(h2_sender);
    assert!(
        tokio::time::timeout(generous, h2_used_conn).await.is_ok(),
        "an idle HTTP/2 connection still open after {generous:?}"
    );
    drop(h2_used_sender);
    let answer = read_until_closed(&mut slow, generous).await;
    assert!(
        !String::from_utf8_lossy(&answer).contains(" 200 "),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(
        up.requests().iter().all(|s| !s.uri.ends_with("/slow")),
        "the unfinished request reached the upstream"
    );
}

/// A reload that shortens server.header_read_timeout applies it to the connections that
/// come after it: both the wait for a first request and hyper's limit on a request head.
#[tokio::test]
async fn reloaded_header_read_timeout_applies_to_new_connections() {
    use tokio::io::AsyncWriteExt;
    let up = FakeUpstream::echo().await;
    // The default limit, 30 s.
    let text = config(&up.base(), "");
    let gw = TestGateway::boot(&text).await;
    // Served: the workers are running with the first limit.
    let (status, _, _) = get(&gw.url("/r4/Patient/1")).await;
    assert_eq!(status, StatusCode::OK);
    gw.rewrite_config(&text.replace(
        "shutdown_grace = \"5s\"",
        "shutdown_grace = \"5s\"\nheader_read_timeout = \"1s\"",
    ));
    gw.handle.reload().unwrap();

    let mut silent = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let mut slow = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    slow.write_all(b"GET /r4/Patient/slow HTTP/1.1\r\nhost: gateway.test\r\n")
        .await
        .unwrap();
    // Kept alive after an answer: hyper's limit on the next head.
    let mut idle = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    idle.write_all(b"GET /r4/Patient/idle HTTP/1.1\r\nhost: gateway.test\r\n\r\n")
        .await
        .unwrap();
    // Well under the 30 s the gateway started with.
    let limit = Duration::from_secs(10);
    assert!(read_until_closed(&mut silent, limit).await.is_empty());
    let answer = String::from_utf8_lossy(&read_until_closed(&mut idle, limit).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let answer = read_until_closed(&mut slow, limit).await;
    assert!(
        !String::from_utf8_lossy(&answer).contains(" 200 "),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(
        up.requests().iter().all(|s| !s.uri.ends_with("/slow")),
        "the unfinished request reached the upstream"
    );
    // A request within the limit is still served.
    let (status, _, _) = get(&gw.url("/r4/Patient/2")).await;
    assert_eq!(status, StatusCode::OK);
    gw.stop().await;
}
