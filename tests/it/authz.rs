//! Authorization through the real gateway with real (test-minted) JWTs: scopes decide,
//! refusals are 403 insufficient_scope naming the missing permission, and nothing refused
//! reaches the upstream.

use crate::support;

use http::{Request, StatusCode};
use serde_json::json;
use support::tokens::token_with as token;
use support::tokens::*;
use support::*;

type Setup = JwtGateway;

async fn setup() -> Setup {
    jwt_gateway(FakeUpstream::echo().await, "", "").await
}

async fn call(
    s: &Setup,
    method: &str,
    path: &str,
    tok: &str,
    body_text: Option<&str>,
) -> (StatusCode, http::HeaderMap, bytes::Bytes) {
    let mut req = Request::builder()
        .method(method)
        .uri(s.gw.url(path))
        .header("authorization", format!("Bearer {tok}"));
    if body_text.is_some() {
        req = req.header("content-type", "application/fhir+json");
    }
    send(req.body(body(body_text.unwrap_or("").to_owned())).unwrap()).await
}

/// Scopes allow exactly their interactions; a refusal names the narrowest missing scope.
#[tokio::test]
async fn scopes_decide() {
    let s = setup().await;
    let reader = token(&s.key, "user/Observation.rs", None);
    assert_eq!(
        call(&s, "GET", "/r4/Observation/1", &reader, None).await.0,
        StatusCode::OK
    );
    assert_eq!(
        call(&s, "GET", "/r4/Observation?code=x", &reader, None)
            .await
            .0,
        StatusCode::OK
    );
    let forwarded = s.up.requests().len();

    for (method, path, needed) in [
        ("PUT", "/r4/Observation/1", "user/Observation.u"),
        ("DELETE", "/r4/Observation/1", "user/Observation.d"),
        ("POST", "/r4/Observation", "user/Observation.c"),
        ("GET", "/r4/Condition/1", "user/Condition.r"),
        ("GET", "/r4?name=x", "user/*.s"),
    ] {
        let body_text =
            (method == "POST" || method == "PUT").then_some("{\"resourceType\":\"Observation\"}");
        let (status, headers, b) = call(&s, method, path, &reader, body_text).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}");
        let www = headers["www-authenticate"].to_str().unwrap();
        assert_eq!(
            www,
            format!("Bearer realm=\"smartgate\", error=\"insufficient_scope\", scope=\"{needed}\""),
            "{method} {path}"
        );
        let oo = json(&b);
        assert_eq!(oo["resourceType"], "OperationOutcome");
        assert_eq!(oo["issue"][0]["code"], "forbidden");
    }
    assert_eq!(
        s.up.requests().len(),
        forwarded,
        "a refused request reached the upstream"
    );
    let m = metrics(&s.gw).await;
    assert!(
        m.contains("smartgate_decisions_total{decision=\"deny\",reason=\"insufficient_scope\"} 5"),
        "{m}"
    );
}

/// patient/ scopes: the patient's own record is forwarded and its answer verified (this
/// echoing upstream answers no Patient, so it is refused); what is outside the
/// compartment on its face is refused before forwarding; no patient in the token means no
/// access. (Verified reads and searches: tests/it/compartment.rs.)
#[tokio::test]
async fn patient_scopes_confined() {
    let s = setup().await;
    let app = token(&s.key, "launch/patient patient/*.rs", Some("Patient/123"));
    assert_eq!(
        call(&s, "GET", "/r4/Patient/123", &app, None).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(s.up.requests().len(), 1, "forwarded, then verified");
    let forwarded = s.up.requests().len();
    for path in [
        "/r4/Patient/456",
        "/r4/Patient/456/Observation",
        "/r4/Observation?patient=456",
        "/r4/Observation?patient=123,456",
        "/r4/Patient/456/$everything",
        "/r4/$export",
    ] {
        let (status, headers, _) = call(&s, "GET", path, &app, None).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
        assert!(
            headers["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("insufficient_scope")
        );
    }
    let no_patient = token(&s.key, "patient/*.rs", None);
    assert_eq!(
        call(&s, "GET", "/r4/Patient/123", &no_patient, None)
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(s.up.requests().len(), forwarded);
}

/// Batch and transaction: one denied entry refuses the whole bundle before anything is
/// forwarded; an allowed bundle passes whole.
#[tokio::test]
async fn bundles_decided_entry_by_entry() {
    let s = setup().await;
    let tok = token(&s.key, "user/Patient.r user/Observation.c", None);
    let bundle = |entries: serde_json::Value| {
        json!({"resourceType": "Bundle", "type": "transaction", "entry": entries}).to_string()
    };
    let good = bundle(json!([
        {"request": {"method": "GET", "url": "Patient/1"}},
        {"resource": {"resourceType": "Observation"}, "request": {"method": "POST", "url": "Observation"}}
    ]));
    assert_eq!(
        call(&s, "POST", "/r4", &tok, Some(&good)).await.0,
        StatusCode::OK
    );
    assert_eq!(s.up.requests().len(), 1);

    let bad = bundle(json!([
        {"request": {"method": "GET", "url": "Patient/1"}},
        {"request": {"method": "DELETE", "url": "Patient/1"}},
        {"resource": {"resourceType": "Observation"}, "request": {"method": "PUT", "url": "Observation/2"}}
    ]));
    let (status, headers, b) = call(&s, "POST", "/r4", &tok, Some(&bad)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("scope=\"user/Patient.d user/Observation.u\"")
    );
    let text = json(&b)["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        text.contains("entry 1") && text.contains("entry 2") && !text.contains("entry 0"),
        "{text}"
    );

    let nested = bundle(json!([
        {"resource": {"resourceType": "Bundle", "type": "batch", "entry": []}, "request": {"method": "POST", "url": ""}}
    ]));
    assert_eq!(
        call(&s, "POST", "/r4", &tok, Some(&nested)).await.0,
        StatusCode::FORBIDDEN
    );
    let foreign = bundle(
        json!([{"request": {"method": "GET", "url": "https://elsewhere.org/fhir/Patient/1"}}]),
    );
    assert_eq!(
        call(&s, "POST", "/r4", &tok, Some(&foreign)).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        call(&s, "POST", "/r4", &tok, Some("not json")).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        s.up.requests().len(),
        1,
        "a refused bundle reached the upstream"
    );
}

/// Ambiguous paths are 400 and unknown types 404, even with a token that could read
/// everything; none is forwarded.
#[tokio::test]
async fn hostile_paths_refused() {
    let s = setup().await;
    let all = token(&s.key, "system/*.cruds", None);
    for (path, status) in [
        ("/r4/Patient%2F123", StatusCode::BAD_REQUEST),
        ("/r4/Patient/123/..%2F456", StatusCode::BAD_REQUEST),
        ("/r4/Patient/123;x=y", StatusCode::BAD_REQUEST),
        ("/r4/Patient//123", StatusCode::BAD_REQUEST),
        ("/r4/Patient%252F123", StatusCode::BAD_REQUEST),
        ("/r4/patient/123", StatusCode::NOT_FOUND),
        ("/r4/Nonsense", StatusCode::NOT_FOUND),
    ] {
        assert_eq!(call(&s, "GET", path, &all, None).await.0, status, "{path}");
    }
    let req = Request::get(s.gw.url("/r4/Patient/1"))
        .header("authorization", format!("Bearer {all}"))
        .header("x-http-method-override", "DELETE")
        .body(smartgate::body::empty())
        .unwrap();
    assert_eq!(send(req).await.0, StatusCode::BAD_REQUEST);
    // Two Content-Types: the gateway would judge the body by one, the server may read it
    // by the other.
    let req = Request::post(s.gw.url("/r4/Observation/_search"))
        .header("authorization", format!("Bearer {all}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("content-type", "application/fhir+json")
        .body(smartgate::body::full("code=x"))
        .unwrap();
    let (status, _, b) = send(req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        String::from_utf8_lossy(&b).contains("Content-Type"),
        "{b:?}"
    );
    assert!(s.up.requests().is_empty());
}

/// Operations outside the table are denied even with every scope.
#[tokio::test]
async fn unknown_operations_denied() {
    let s = setup().await;
    let all = token(&s.key, "system/*.cruds", None);
    assert_eq!(
        call(&s, "GET", "/r4/$export", &all, None).await.0,
        StatusCode::OK
    );
    for path in ["/r4/$reindex", "/r4/Patient/1/$purge-everything"] {
        let (status, headers, _) = call(&s, "POST", path, &all, Some("{}")).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
        assert_eq!(
            headers["www-authenticate"],
            "Bearer realm=\"smartgate\", error=\"insufficient_scope\""
        );
    }
    assert_eq!(s.up.requests().len(), 1);
}

/// Paths that only look like public ones need a token. Malformed scopes are counted.
#[tokio::test]
async fn lookalikes_need_tokens_and_ignored_scopes_counted() {
    let s = setup().await;
    for path in [
        "/r4/metadata/x",
        "/r4/Patient/metadata",
        "/r4/.well-known/x",
    ] {
        assert_eq!(
            get(&s.gw.url(path)).await.0,
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
    }
    let tok = token(
        &s.key,
        "user/Observation.rs user/Observation.sr user/Foo.r",
        None,
    );
    assert_eq!(
        call(&s, "GET", "/r4/Observation/1", &tok, None).await.0,
        StatusCode::OK
    );
    let m = metrics(&s.gw).await;
    assert!(m.contains("smartgate_scopes_ignored_total 2"), "{m}");
}

/// Repeated identical requests with one token hit the decision cache; the cached answer is
/// the same (allow stays allow, deny stays deny), and another token does not share it.
#[tokio::test]
async fn decision_cache() {
    let s = setup().await;
    let reader = token(&s.key, "user/Observation.rs", None);
    for _ in 0..3 {
        assert_eq!(
            call(&s, "GET", "/r4/Observation?code=x", &reader, None)
                .await
                .0,
            StatusCode::OK
        );
        assert_eq!(
            call(&s, "GET", "/r4/Condition?code=x", &reader, None)
                .await
                .0,
            StatusCode::FORBIDDEN
        );
    }
    let other = token(&s.key, "user/Condition.rs", None);
    assert_eq!(
        call(&s, "GET", "/r4/Condition?code=x", &other, None)
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        call(&s, "GET", "/r4/Observation?code=x", &other, None)
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    let m = metrics(&s.gw).await;
    let count = |event: &str| {
        m.lines()
            .find(|l| {
                l.starts_with(&format!(
                    "smartgate_decision_cache_total{{event=\"{event}\"}}"
                ))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Workers keep their own caches, so hits depend on which worker served a request;
    // every request is either a hit or a miss, and misses are at least the distinct keys.
    assert_eq!(count("hit") + count("miss"), 8, "{m}");
    assert!(count("miss") >= 4, "{m}");
    assert_eq!(s.up.requests().len(), 4);
}

/// Regression: a method-override header on a request whose method and target match a
/// cached allowed decision is still refused; the cache never skips the header checks.
#[tokio::test]
async fn decision_cache_does_not_skip_header_checks() {
    let s = setup().await;
    let reader = token(&s.key, "user/Observation.rs", None);
    for _ in 0..4 {
        assert_eq!(
            call(&s, "GET", "/r4/Observation/1", &reader, None).await.0,
            StatusCode::OK
        );
    }
    for _ in 0..4 {
        let req = Request::get(s.gw.url("/r4/Observation/1"))
            .header("authorization", format!("Bearer {reader}"))
            .header("x-http-method-override", "DELETE")
            .body(smartgate::body::empty())
            .unwrap();
        assert_eq!(send(req).await.0, StatusCode::BAD_REQUEST);
    }
    assert_eq!(s.up.requests().len(), 4);
}

/// A chain or `_has` that filters by a type the token cannot search is refused before
/// forwarding (no oracle), naming the scope it needs.
#[tokio::test]
async fn chains_refused_without_search_on_targets() {
    let s = setup().await;
    let narrow = token(&s.key, "user/Observation.rs", None);
    for (path, needed) in [
        (
            "/r4/Observation?subject:Patient.name=Smith",
            "user/Patient.s",
        ),
        (
            "/r4/Patient?_has:Observation:patient:code=x",
            "user/Patient.s",
        ),
    ] {
        let (status, headers, _) = call(&s, "GET", path, &narrow, None).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
        let www = headers["www-authenticate"].to_str().unwrap();
        assert!(
            www.contains(&format!("scope=\"{needed}\"")),
            "{path}: {www}"
        );
    }
    assert!(s.up.requests().is_empty());
    let wide = token(&s.key, "user/*.rs", None);
    assert_eq!(
        call(
            &s,
            "GET",
            "/r4/Observation?subject:Patient.name=Smith&_include=Observation:subject",
            &wide,
            None
        )
        .await
        .0,
        StatusCode::OK
    );
}

/// Browser apps: a CORS preflight (no token) is answered by the gateway and never
/// forwarded; every answer to a cross-origin request, refusals included, carries CORS
/// headers so the app can read it; same-origin answers carry none.
#[tokio::test]
async fn cors_for_browser_apps() {
    let s = setup().await;
    let preflight = Request::builder()
        .method("OPTIONS")
        .uri(s.gw.url("/r4/Observation?code=x"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "GET")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .body(body(""))
        .unwrap();
    let (status, h, _) = send(preflight).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(h["access-control-allow-origin"], "*");
    assert_eq!(
        h["access-control-allow-headers"],
        "authorization, content-type"
    );
    assert!(
        h["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("DELETE")
    );
    // A header list that does not read as one is not echoed.
    let odd = Request::builder()
        .method("OPTIONS")
        .uri(s.gw.url("/r4/Patient/1"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "PUT")
        .header("access-control-request-headers", "x\"; evil=1")
        .body(body(""))
        .unwrap();
    let (status, h, _) = send(odd).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(
        h["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .starts_with("Authorization")
    );
    assert!(s.up.requests().is_empty(), "a preflight was forwarded");

    // A refusal and an answer, each readable cross-origin.
    let no_token = Request::get(s.gw.url("/r4/Observation"))
        .header("origin", "https://app.example")
        .body(body(""))
        .unwrap();
    let (status, h, _) = send(no_token).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(h["access-control-allow-origin"], "*");
    assert!(
        h["access-control-expose-headers"]
            .to_str()
            .unwrap()
            .contains("WWW-Authenticate")
    );
    let reader = token(&s.key, "user/Observation.rs", None);
    let ok = Request::get(s.gw.url("/r4/Observation/1"))
        .header("origin", "https://app.example")
        .header("authorization", format!("Bearer {reader}"))
        .body(body(""))
        .unwrap();
    let (status, h, _) = send(ok).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h["access-control-allow-origin"], "*");
    // Without Origin, no CORS headers; an OPTIONS without the preflight headers is not
    // answered as one (it needs a token like any request).
    let (status, h, _) = call(&s, "GET", "/r4/Observation/1", &reader, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!h.contains_key("access-control-allow-origin"));
    let plain = Request::builder()
        .method("OPTIONS")
        .uri(s.gw.url("/r4/Observation"))
        .body(body(""))
        .unwrap();
    assert_eq!(send(plain).await.0, StatusCode::UNAUTHORIZED);
}

/// The upstream for the export tests: `$export` kick-offs answered 202 with a status URL
/// (an ordinary path for Group g1's), the status answered with a manifest, a DELETE 202.
fn export_upstream() -> Responder {
    std::sync::Arc::new(|seen: &Seen| {
        let base = "http://upstream.test/fhir";
        let resp = if seen.uri.contains("/Group/g1/$export") {
            // A server answering with an ordinary path: never signed.
            let mut r = json_response(StatusCode::ACCEPTED, &json!({}));
            r.headers_mut().insert(
                "content-location",
                format!("{base}/Patient").parse().unwrap(),
            );
            r
        } else if seen.uri.contains("/$export?") || seen.uri.ends_with("/$export") {
            let mut r = json_response(StatusCode::ACCEPTED, &json!({}));
            let status = format!("{base}/$export-poll-status?_jobId=abc");
            r.headers_mut()
                .insert("content-location", status.parse().unwrap());
            r
        } else if seen.method == http::Method::DELETE {
            json_response(StatusCode::ACCEPTED, &json!({}))
        } else {
            json_response(
                StatusCode::OK,
                &json!({"transactionTime": "2026-11-29T00:00:00Z",
                        "request": format!("{base}/$export"), "requiresAccessToken": true,
                        "output": [{"type": "Observation", "url": format!("{base}/Binary/b1")}],
                        "error": []}),
            )
        };
        Box::pin(std::future::ready(resp))
    })
}

const STATUS_KEY: &str = "[bulk_data]\nstatus_key = \"0123456789abcdef0123456789abcdef\"\n";
const ALIAS: &str = "aliases = [\"http://upstream.test/fhir\"]";

/// A token of client `client` (issuer as in every test) for `system/*.rs`.
fn exporter_token(s: &Setup, client: &str) -> String {
    let mut c = claims();
    c["scope"] = json!("system/*.rs");
    c["client_id"] = json!(client);
    s.key.sign(&c)
}

/// Kicks an export off at `path`; the status URL handed out, as a target on the gateway.
async fn kick_off(s: &Setup, path: &str, token: &str) -> String {
    let (st, h, _) = call(s, "GET", path, token, None).await;
    assert_eq!(st, StatusCode::ACCEPTED);
    let location = h["content-location"].to_str().unwrap();
    location
        .strip_prefix("http://gateway.test")
        .unwrap()
        .to_owned()
}

/// A Bulk Data export's status URL (HAPI's `$export-poll-status?_jobId=…`) is no
/// operation the rules know. The gateway hands it out signed for the client that kicked
/// the export off: that client may poll it, read the manifest (its file URLs rewritten to
/// the gateway) and cancel it; another client with the same scopes may not, and is not
/// forwarded; the signature never reaches the upstream. Unsigned, nobody may.
#[tokio::test]
async fn export_status_belongs_to_the_client_that_started_it() {
    let s = jwt_gateway(FakeUpstream::start(export_upstream()).await, "", ALIAS).await;
    let (exporter, other) = (exporter_token(&s, "exporter"), exporter_token(&s, "other"));
    let unsigned = "/r4/$export-poll-status?_jobId=abc";

    assert_eq!(
        call(&s, "GET", unsigned, &exporter, None).await.0,
        StatusCode::FORBIDDEN
    );
    let status = kick_off(&s, "/r4/$export?_type=Observation", &exporter).await;
    assert!(status.starts_with(&format!("{unsigned}&_sg=")), "{status}");

    let (st, _, manifest) = call(&s, "GET", &status, &exporter, None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        json(&manifest)["output"][0]["url"],
        "http://gateway.test/r4/Binary/b1"
    );
    assert!(
        s.up.requests()
            .last()
            .unwrap()
            .uri
            .ends_with("/$export-poll-status?_jobId=abc")
    );
    let forwarded = s.up.requests().len();
    for method in ["GET", "DELETE"] {
        assert_eq!(
            call(&s, method, &status, &other, None).await.0,
            StatusCode::FORBIDDEN
        );
    }
    // A signature for another job, or altered, is refused too.
    let other_job = status.replace("_jobId=abc", "_jobId=abd");
    // One character of the MAC changed. Not the last: it carries only four bits of the
    // MAC, and one in sixteen signatures already ends in the letter put there.
    let at = status.len() - 10;
    let changed = if &status[at..=at] == "A" { "B" } else { "A" };
    let altered = format!("{}{changed}{}", &status[..at], &status[at + 1..]);
    assert_ne!(altered, status);
    for target in [&other_job, &altered] {
        assert_eq!(
            call(&s, "GET", target, &exporter, None).await.0,
            StatusCode::FORBIDDEN
        );
    }
    assert_eq!(s.up.requests().len(), forwarded);
    assert_eq!(
        call(&s, "DELETE", &status, &exporter, None).await.0,
        StatusCode::ACCEPTED
    );

    // A kick-off answered with an ordinary FHIR path is not signed: /Patient stays the
    // rules' to decide, for every client.
    let (st, h, _) = call(&s, "GET", "/r4/Group/g1/$export", &exporter, None).await;
    assert_eq!(st, StatusCode::ACCEPTED);
    assert_eq!(h["content-location"], "http://gateway.test/r4/Patient");
    assert_eq!(
        call(&s, "GET", "/r4/Patient", &other, None).await.0,
        StatusCode::OK
    );
}

/// With `bulk_data.status_key`, a status URL signed by one gateway is accepted by
/// another with the same key (a replica, or the same one after a restart); one without
/// it, or with another key, refuses it.
#[tokio::test]
async fn export_status_signed_with_a_shared_key_works_on_every_replica() {
    let one = jwt_gateway(
        FakeUpstream::start(export_upstream()).await,
        STATUS_KEY,
        ALIAS,
    )
    .await;
    let status = kick_off(&one, "/r4/$export", &exporter_token(&one, "exporter")).await;

    let replica = jwt_gateway(
        FakeUpstream::start(export_upstream()).await,
        STATUS_KEY,
        ALIAS,
    )
    .await;
    let exporter = exporter_token(&replica, "exporter");
    assert_eq!(
        call(&replica, "GET", &status, &exporter, None).await.0,
        StatusCode::OK
    );
    let other_key = STATUS_KEY.replace("0123", "3210");
    for extra in ["", other_key.as_str()] {
        let stranger =
            jwt_gateway(FakeUpstream::start(export_upstream()).await, extra, ALIAS).await;
        let exporter = exporter_token(&stranger, "exporter");
        let (st, _, _) = call(&stranger, "GET", &status, &exporter, None).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{extra:?}");
    }
}

/// An export's status URL is bound to the client id alone: a token without a client id
/// whose `sub` equals the exporter's client id cannot poll it, and gets no signed status
/// URL of its own.
#[tokio::test]
async fn export_status_is_bound_to_the_client_id_only() {
    let s = jwt_gateway(FakeUpstream::start(export_upstream()).await, "", ALIAS).await;
    let exporter = exporter_token(&s, "exporter");
    let status = kick_off(&s, "/r4/$export?_type=Observation", &exporter).await;
    let mut c = claims();
    c["scope"] = json!("system/*.rs");
    c["sub"] = json!("exporter");
    c.as_object_mut().unwrap().remove("client_id");
    let impostor = s.key.sign(&c);
    let forwarded = s.up.requests().len();
    assert_eq!(
        call(&s, "GET", &status, &impostor, None).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(s.up.requests().len(), forwarded);
    let (st, h, _) = call(&s, "GET", "/r4/$export?_type=Observation", &impostor, None).await;
    assert_eq!(st, StatusCode::ACCEPTED);
    let location = h["content-location"].to_str().unwrap();
    assert!(
        !location.contains("_sg="),
        "signed for no client: {location}"
    );
}

/// A `POST $export` names its types in a Parameters body: read for the decision like
/// `_type` in the query. Types beyond the scopes are refused before anything is
/// forwarded; a body that cannot be read is refused (400); within the scopes it passes.
#[tokio::test]
async fn post_export_bodies_are_read_for_the_decision() {
    let s = jwt_gateway(FakeUpstream::start(export_upstream()).await, "", ALIAS).await;
    let mut c = claims();
    c["scope"] = json!("system/Observation.rs");
    c["client_id"] = json!("exporter");
    let token = s.key.sign(&c);
    let params = |ty: &str| {
        json!({"resourceType": "Parameters", "parameter": [
            {"name": "_outputFormat", "valueString": "application/fhir+ndjson"},
            {"name": "_type", "valueString": ty}
        ]})
        .to_string()
    };
    for (body_text, want) in [
        (params("Patient"), StatusCode::FORBIDDEN),
        (params("Observation,Patient"), StatusCode::FORBIDDEN),
        (
            json!({"resourceType": "Parameters"}).to_string(),
            StatusCode::FORBIDDEN,
        ),
        (
            r#"{"resourceType":"Parameters","parameter":[{"name":"_type","valueString":"Observation","valueString":"Patient"}]}"#.to_owned(),
            StatusCode::BAD_REQUEST,
        ),
        (
            r#"{"resourceType":"Parameters","parameter":[{"name":"_type","valueInteger":1}]}"#.to_owned(),
            StatusCode::BAD_REQUEST,
        ),
        (r#"{"resourceType":"Patient"}"#.to_owned(), StatusCode::BAD_REQUEST),
    ] {
        let forwarded = s.up.requests().len();
        let (st, _, b) = call(&s, "POST", "/r4/$export", &token, Some(&body_text)).await;
        assert_eq!(st, want, "{body_text}: {}", String::from_utf8_lossy(&b));
        assert_eq!(s.up.requests().len(), forwarded, "{body_text} was forwarded");
    }
    let (st, _, _) = call(
        &s,
        "POST",
        "/r4/$export",
        &token,
        Some(&params("Observation")),
    )
    .await;
    assert_eq!(st, StatusCode::ACCEPTED);
    // The same target with a wider body afterwards is decided again, not from a cache.
    let (st, _, _) = call(&s, "POST", "/r4/$export", &token, Some(&params("Patient"))).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
}
