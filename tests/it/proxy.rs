//! The gateway as a reverse proxy: pass-through, header hygiene, link rewriting, limits,
//! upstream failures. Each test boots the real gateway in-process against a recording
//! fake upstream.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use serde_json::json;
use support::*;

/// Every method passes with its body, and the upstream's status comes back unchanged.
#[tokio::test]
async fn pass_through_methods_bodies_and_statuses() {
    let up = FakeUpstream::start(Arc::new(|seen: &Seen| {
        let status = match seen.method {
            Method::POST => StatusCode::CREATED,
            Method::DELETE => StatusCode::NO_CONTENT,
            Method::PATCH => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::OK,
        };
        let resp = if status == StatusCode::NO_CONTENT {
            Response::builder()
                .status(status)
                .body(smartgate::body::empty())
                .unwrap()
        } else {
            json_response(status, &json!({"got": seen.body_len, "uri": seen.uri}))
        };
        Box::pin(std::future::ready(resp))
    }))
    .await;
    let gw = TestGateway::boot(&config(&up.base(), "")).await;

    let cases = [
        (
            Method::GET,
            "/r4/Patient/1?_format=json",
            "",
            StatusCode::OK,
        ),
        (
            Method::POST,
            "/r4/Patient",
            "{\"resourceType\":\"Patient\"}",
            StatusCode::CREATED,
        ),
        (
            Method::PUT,
            "/r4/Patient/1",
            "{\"resourceType\":\"Patient\",\"id\":\"1\"}",
            StatusCode::OK,
        ),
        (
            Method::PATCH,
            "/r4/Patient/1",
            "[{\"op\":\"remove\",\"path\":\"/x\"}]",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (Method::DELETE, "/r4/Patient/1", "", StatusCode::NO_CONTENT),
    ];
    for (method, path, payload, status) in cases {
        let req = Request::builder()
            .method(method.clone())
            .uri(gw.url(path))
            .header("content-type", "application/fhir+json")
            .body(body(payload))
            .unwrap();
        let (got, _, resp_body) = send(req).await;
        assert_eq!(got, status, "{method} {path}");
        if status != StatusCode::NO_CONTENT {
            assert_eq!(json(&resp_body)["got"], payload.len(), "{method} {path}");
        }
    }
    let seen = up.requests();
    assert_eq!(seen.len(), 5);
    assert_eq!(seen[0].uri, "/fhir/Patient/1?_format=json");
    assert_eq!(seen[1].body, "{\"resourceType\":\"Patient\"}");
    assert_eq!(seen[3].method, Method::PATCH);
    assert_eq!(seen[4].method, Method::DELETE);
    gw.stop().await;
}

/// The public base path maps to the upstream base path; the bare base and its query work.
#[tokio::test]
async fn base_path_mapping() {
    let up = FakeUpstream::echo().await;
    let gw = TestGateway::boot(&config(&up.base(), "")).await;
    for (path, upstream_path) in [
        ("/r4", "/fhir"),
        ("/r4/", "/fhir/"),
        ("/r4?_type=Patient", "/fhir?_type=Patient"),
        ("/r4/Observation?code=a%7Cb", "/fhir/Observation?code=a%7Cb"),
    ] {
        let (status, _, b) = get(&gw.url(path)).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(json(&b)["uri"], upstream_path, "{path}");
    }
    gw.stop().await;
}

/// Paths outside the public base are not forwarded: 404 OperationOutcome.
#[tokio::test]
async fn outside_base_is_404() {
    let up = FakeUpstream::echo().await;
    let gw = TestGateway::boot(&config(&up.base(), "")).await;
    for path in ["/", "/r4x/Patient", "/fhir/Patient", "/Patient/1"] {
        let (status, headers, b) = get(&gw.url(path)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(
            headers["content-type"],
            "application/fhir+json; charset=utf-8"
        );
        assert_eq!(json(&b)["resourceType"], "OperationOutcome");
    }
    assert!(up.requests().is_empty());
    gw.stop().await;
}

/// RFC 9110 §7.6.1: hop-by-hop headers, including those named in Connection, are removed
/// in both directions.
#[tokio::test]
async fn hop_by_hop_headers_removed_both_ways() {
    let up = FakeUpstream::start(Arc::new(|_: &Seen| {
        let resp = Response::builder()
            .header("content-type", "text/plain")
            .header("connection", "x-upstream-hop")
            .header("x-upstream-hop", "secret")
            .header("keep-alive", "timeout=5")
            .header("proxy-authenticate", "Basic")
            .header("x-kept", "yes")
            .body(smartgate::body::full("ok"))
            .unwrap();
        Box::pin(std::future::ready(resp))
    }))
    .await;
    let gw = TestGateway::boot(&config(&up.base(), "")).await;
    let req = Request::get(gw.url("/r4/Patient"))
        .header("connection", "x-client-hop, keep-alive")
        .header("x-client-hop", "1")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("trailer", "x-t")
        .header("upgrade", "websocket")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("proxy-connection", "keep-alive")
        .header("accept-encoding", "gzip, br")
        .header("x-end-to-end", "kept")
        .body(smartgate::body::empty())
        .unwrap();
    let (status, headers, _) = send(req).await;
    assert_eq!(status, StatusCode::OK);
    let seen = &up.requests()[0].headers;
    for gone in [
        "x-client-hop",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        // Not hop-by-hop, but the gateway must read plain bodies to rewrite and verify.
        "accept-encoding",
    ] {
        assert!(!seen.contains_key(gone), "{gone} reached the upstream");
    }
    // The gateway's own upstream connection may say keep-alive; the client's does not pass.
    assert!(
        seen.get("connection")
            .is_none_or(|v| !v.to_str().unwrap().contains("x-client-hop")),
        "{seen:?}"
    );
    assert_eq!(seen["x-end-to-end"], "kept");
    for gone in ["x-upstream-hop", "keep-alive", "proxy-authenticate"] {
        assert!(!headers.contains_key(gone), "{gone} reached the client");
    }
    assert_eq!(headers["x-kept"], "yes");
    gw.stop().await;
}

/// X-Forwarded-For appends, -Proto and -Host are set, Forwarded is RFC 7239; the
/// upstream gets its own Host.
#[tokio::test]
async fn forwarded_headers() {
    let up = FakeUpstream::echo().await;
    let gw = TestGateway::boot(&config(&up.base(), "")).await;
    let req = Request::get(gw.url("/r4/Patient"))
        .header("host", "fhir.example.org")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-forwarded-proto", "https")
        .body(smartgate::body::empty())
        .unwrap();
    send(req).await;
    let seen = &up.requests()[0].headers;
    assert_eq!(seen["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "fhir.example.org");
    assert_eq!(
        seen["forwarded"],
        "for=127.0.0.1;proto=http;host=\"fhir.example.org\""
    );
    assert_eq!(seen["host"], up.addr.to_string());
    gw.stop().await;
}

/// The client's token never reaches the upstream unless configured; configured upstream
/// credentials replace any client-supplied header of the same name.
#[tokio::test]
async fn authorization_and_upstream_credentials() {
    let up = FakeUpstream::echo().await;
    let gw = TestGateway::boot(&config(
        &up.base(),
        "[upstream.headers]\nX-Api-Key = \"upstream-secret\"\n",
    ))
    .await;
    let req = Request::get(gw.url("/r4/Patient"))
        .header("authorization", "Bearer client-token")
        .header("x-api-key", "client-forged")
        .body(smartgate::body::empty())
        .unwrap();
    send(req).await;
    let seen = &up.requests()[0].headers;
    assert!(!seen.contains_key("authorization"));
    assert_eq!(seen["x-api-key"], "upstream-secret");
    assert_eq!(seen.get_all("x-api-key").iter().count(), 1);
    gw.stop().await;

    let text = config(&up.base(), "").replace(
        "timeout = \"5s\"",
        "timeout = \"5s\"\nforward_authorization = true",
    );
    let gw = TestGateway::boot(&text).await;
    let req = Request::get(gw.url("/r4/Patient"))
        .header("authorization", "Bearer client-token")
        .body(smartgate::body::empty())
        .unwrap();
    send(req).await;
    assert_eq!(
        up.requests()[1].headers["authorization"],
        "Bearer client-token"
    );
    gw.stop().await;
}

/// An upstream asking for credentials refuses the gateway's own (`[upstream.headers]`),
/// not the client's token: 502 naming that, counted, never a 401 or a password prompt
/// that would have the app sign in again. With `forward_authorization` the client's
/// token is what the upstream judged, and its 401 is the client's to see.
#[tokio::test]
async fn upstream_refusing_the_gateways_credentials_is_502() {
    let up = FakeUpstream::start(Arc::new(|_: &Seen| {
        let mut resp = json_response(StatusCode::UNAUTHORIZED, &json!({}));
        resp.headers_mut().insert(
            "www-authenticate",
            http::HeaderValue::from_static("Basic realm=\"fhir\""),
        );
        Box::pin(std::future::ready(resp))
    }))
    .await;
    let gw = TestGateway::boot(&config(&up.base(), "")).await;
    let (status, headers, body) = get(&gw.url("/r4/Patient")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(!headers.contains_key("www-authenticate"));
    let diagnostics = json(&body)["issue"][0]["diagnostics"].to_string();
    assert!(
        diagnostics.contains("refused the gateway's credentials"),
        "{diagnostics}"
    );
    assert!(
        metrics(&gw)
            .await
            .contains("smartgate_upstream_errors_total{kind=\"credentials_refused\"} 1")
    );
    gw.stop().await;

    let text = config(&up.base(), "").replace(
        "timeout = \"5s\"",
        "timeout = \"5s\"\nforward_authorization = true",
    );
    let gw = TestGateway::boot(&text).await;
    let (status, headers, _) = get(&gw.url("/r4/Patient")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["www-authenticate"], "Basic realm=\"fhir\"");
    gw.stop().await;
}

/// Without tokens the gateway signs no export status URLs, so a `_sg` parameter is the
/// client's own and reaches the upstream as sent.
#[tokio::test]
async fn sg_parameter_passes_without_tokens() {
    let up = FakeUpstream::echo().await;
    let gw = TestGateway::boot(&config(&up.base(), "")).await;
    let (status, _, _) = get(&gw.url("/r4/$export-poll-status?_jobId=1&_sg=1.x")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        up.requests()[0].uri.ends_with("?_jobId=1&_sg=1.x"),
        "{}",
        up.requests()[0].uri
    );
    gw.stop().await;
}

/// A sane client request id is kept end to end; others are replaced; every response
/// (errors included) carries one.
#[tokio::test]
async fn request_id() {
    let up = FakeUpstream::echo().await;
    let gw = TestGateway::boot(&config(&up.base(), "")).await;
    let req = Request::get(gw.url("/r4/Patient"))
        .header("x-request-id", "trace-42")
        .body(smartgate::body::empty())
        .unwrap();
    let (_, headers, _) = send(req).await;
    assert_eq!(headers["x-request-id"], "trace-42");
    assert_eq!(up.requests()[0].headers["x-request-id"], "trace-42");

    let req = Request::get(gw.url("/r4/Patient"))
        .header("x-request-id", "bad id\twith junk")
        .body(smartgate::body::empty())
        .unwrap();
    let (_, headers, _) = send(req).await;
    let id = headers["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(id.len(), 36);
    assert_eq!(up.requests()[1].headers["x-request-id"], id.as_str());

    let (_, headers, _) = get(&gw.url("/elsewhere")).await;
    assert!(headers.contains_key("x-request-id"));
    gw.stop().await;
}

/// Location, Content-Location, Bundle.link.url and entry.fullUrl never show the upstream.
#[tokio::test]
async fn links_rewritten_to_public_base() {
    let up_addr = Arc::new(std::sync::OnceLock::<String>::new());
    let base = up_addr.clone();
    let up = FakeUpstream::start(Arc::new(move |seen: &Seen| {
        let b = base.get().unwrap().clone();
        let resp = if seen.method == Method::POST {
            Response::builder()
                .status(StatusCode::CREATED)
                .header("location", format!("{b}/Patient/9/_history/1"))
                .header("content-location", format!("{b}/Patient/9/_history/1"))
                .body(smartgate::body::empty())
                .unwrap()
        } else if seen.uri.contains("export-status") {
            // A Bulk Data export manifest, with a paging Link header.
            let mut resp = json_response(
                StatusCode::OK,
                &json!({
                    "transactionTime": "2024-01-01T00:00:00Z",
                    "request": format!("{b}/$export"),
                    "requiresAccessToken": true,
                    "output": [{"type": "Patient", "url": format!("{b}/Binary/out1")}],
                    "error": []
                }),
            );
            resp.headers_mut().insert(
                "link",
                format!("<{b}/export-status?page=2>; rel=\"next\"")
                    .parse()
                    .unwrap(),
            );
            resp
        } else {
            json_response(
                StatusCode::OK,
                &json!({
                    "resourceType": "Bundle",
                    "type": "searchset",
                    "link": [
                        {"relation": "self", "url": format!("{b}/Patient?name=x")},
                        {"relation": "next", "url": format!("{b}?_getpages=abc&_getpagesoffset=20")}
                    ],
                    "entry": [{
                        "fullUrl": format!("{b}/Patient/1"),
                        "resource": {"resourceType": "Patient", "id": "1"}
                    }]
                }),
            )
        };
        Box::pin(std::future::ready(resp))
    }))
    .await;
    up_addr.set(up.base()).unwrap();
    let gw = TestGateway::boot(&config(&up.base(), "")).await;

    let (status, _, b) = get(&gw.url("/r4/Patient?name=x")).await;
    assert_eq!(status, StatusCode::OK);
    let bundle = json(&b);
    assert_eq!(
        bundle["link"][0]["url"],
        "http://gateway.test/r4/Patient?name=x"
    );
    assert_eq!(
        bundle["link"][1]["url"],
        "http://gateway.test/r4?_getpages=abc&_getpagesoffset=20"
    );
    assert_eq!(
        bundle["entry"][0]["fullUrl"],
        "http://gateway.test/r4/Patient/1"
    );
    let text = String::from_utf8(b.to_vec()).unwrap();
    assert!(!text.contains(&up.addr.to_string()), "{text}");

    // A Bulk Data manifest's file URLs and a Link header point at the gateway too.
    let (status, headers, b) = get(&gw.url("/r4/export-status")).await;
    assert_eq!(status, StatusCode::OK);
    let manifest = json(&b);
    assert_eq!(manifest["request"], "http://gateway.test/r4/$export");
    assert_eq!(
        manifest["output"][0]["url"],
        "http://gateway.test/r4/Binary/out1"
    );
    assert_eq!(
        headers["link"],
        "<http://gateway.test/r4/export-status?page=2>; rel=\"next\""
    );

    let req = Request::post(gw.url("/r4/Patient"))
        .body(body("{}"))
        .unwrap();
    let (status, headers, _) = send(req).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        headers["location"],
        "http://gateway.test/r4/Patient/9/_history/1"
    );
    assert_eq!(
        headers["content-location"],
        "http://gateway.test/r4/Patient/9/_history/1"
    );
    gw.stop().await;
}

/// Non-JSON bodies pass byte for byte.
#[tokio::test]
async fn non_json_untouched() {
    let payload = "<Bundle xmlns=\"http://hl7.org/fhir\"><link><url value=\"http://x/fhir\"/></link></Bundle>";
    let up = FakeUpstream::start(Arc::new(move |_: &Seen| {
        let resp = Response::builder()
            .header("content-type", "application/fhir+xml")
            .body(smartgate::body::full(payload))
            .unwrap();
        Box::pin(std::future::ready(resp))
    }))
    .await;
    let gw = TestGateway::boot(&config(&up.base(), "")).await;
    let (_, _, b) = get(&gw.url("/r4/Patient")).await;
    assert_eq!(b, payload);
    gw.stop().await;
}

/// A declared body over the limit gets 413 and the upstream sees nothing.
#[tokio::test]
async fn body_over_limit_declared() {
    let up = FakeUpstream::echo().await;
    let gw = TestGateway::boot(&config(&up.base(), "").replace(
        "shutdown_grace = \"5s\"",
        "shutdown_grace = \"5s\"\nmax_request_body = \"1KiB\"",
    ))
    .await;
    let req = Request::post(gw.url("/r4/Binary"))
        .body(body(vec![b'x'; 2048]))
        .unwrap();
    let (status, _, b) = send(req).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(json(&b)["resourceType"], "OperationOutcome");
    assert!(up.requests().is_empty());

    // At the limit passes.
    let req = Request::post(gw.url("/r4/Binary"))
        .body(body(vec![b'x'; 1024]))
        .unwrap();
    assert_eq!(send(req).await.0, StatusCode::OK);
    gw.stop().await;
}

/// A chunked body that grows past the limit is cut: 413, and the upstream never receives
/// a complete request.
#[tokio::test]
async fn body_over_limit_chunked() {
    let up = FakeUpstream::echo().await;
    let gw = TestGateway::boot(&config(&up.base(), "").replace(
        "shutdown_grace = \"5s\"",
        "shutdown_grace = \"5s\"\nmax_request_body = \"64KiB\"",
    ))
    .await;
    let chunks: Vec<Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>> = (0..32)
        .map(|_| Ok(http_body::Frame::data(bytes::Bytes::from(vec![b'y'; 8192]))))
        .collect();
    let stream = http_body_util::StreamBody::new(tokio_stream_iter(chunks));
    let req = Request::post(gw.url("/r4/Binary"))
        .body(http_body_util::BodyExt::boxed(
            http_body_util::BodyExt::map_err(stream, |n| match n {}),
        ))
        .unwrap();
    // The gateway answers 413 while the client is still sending; depending on timing the
    // client reads that answer or sees the connection closed under its upload. Either way
    // the gateway must have refused with 413, and the upstream must not have a whole body.
    match client().request(req).await {
        Ok(resp) => assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE),
        Err(e) => eprintln!("client saw the connection close during upload: {e}"),
    }
    let m = metrics(&gw).await;
    assert!(
        m.contains("smartgate_requests_total{route=\"fhir\",status_class=\"4xx\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("smartgate_upstream_errors_total{kind=\"request_body_too_large\"} 1"),
        "{m}"
    );
    // Give the upstream a moment to notice the broken stream, then check it got nothing whole.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        up.requests().iter().all(|s| !s.complete),
        "{:?}",
        up.requests().len()
    );
    gw.stop().await;
}

/// A stream from an iterator, without pulling in a stream crate.
fn tokio_stream_iter<T: Unpin>(items: Vec<T>) -> impl futures_core::Stream<Item = T> {
    struct Iter<T>(std::collections::VecDeque<T>);
    impl<T: Unpin> futures_core::Stream for Iter<T> {
        type Item = T;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<T>> {
            std::task::Poll::Ready(self.0.pop_front())
        }
    }
    Iter(items.into())
}

/// A refused upstream connection is a 502 OperationOutcome without the upstream address.
#[tokio::test]
async fn upstream_refused_is_502() {
    // Bind and drop to get a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}/fhir");
    let gw = TestGateway::boot(&config(&base, "")).await;
    let (status, _, b) = get(&gw.url("/r4/Patient")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let text = String::from_utf8(b.to_vec()).unwrap();
    assert_eq!(json(&b)["resourceType"], "OperationOutcome");
    assert!(!text.contains(&port.to_string()), "{text}");
    assert!(
        metrics(&gw)
            .await
            .contains("smartgate_upstream_errors_total{kind=\"connect\"} 1")
    );
    gw.stop().await;
}

/// An upstream slower than upstream.timeout is a 504 OperationOutcome.
#[tokio::test]
async fn slow_upstream_is_504() {
    let up = FakeUpstream::start(Arc::new(|_: &Seen| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            json_response(StatusCode::OK, &json!({}))
        })
    }))
    .await;
    let text = config(&up.base(), "").replace("timeout = \"5s\"", "timeout = \"300ms\"");
    let gw = TestGateway::boot(&text).await;
    let started = std::time::Instant::now();
    let (status, _, b) = get(&gw.url("/r4/Patient")).await;
    let waited = started.elapsed();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(json(&b)["issue"][0]["code"], "timeout");
    // Never before the limit (it is kept at the worker timer's first tick after it); well
    // before the upstream would have answered.
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
        "504 after {waited:?}"
    );
    assert!(
        metrics(&gw)
            .await
            .contains("smartgate_upstream_errors_total{kind=\"timeout\"} 1")
    );
    gw.stop().await;
}

/// A FHIR JSON response larger than upstream.max_response_buffer is refused, not passed
/// unchecked.
#[tokio::test]
async fn oversized_json_response_refused() {
    let up = FakeUpstream::start(Arc::new(|_: &Seen| {
        let big =
            json!({"resourceType": "Bundle", "entry": vec![json!({"x": "y".repeat(100)}); 100]});
        Box::pin(std::future::ready(json_response(StatusCode::OK, &big)))
    }))
    .await;
    let text = config(&up.base(), "").replace(
        "timeout = \"5s\"",
        "timeout = \"5s\"\nmax_response_buffer = \"4KiB\"",
    );
    let gw = TestGateway::boot(&text).await;
    let (status, _, b) = get(&gw.url("/r4/Observation")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(json(&b)["resourceType"], "OperationOutcome");
    gw.stop().await;
}
