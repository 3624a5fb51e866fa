//! The audit trail: one line per request, allowed, refused, filtered or abandoned by the
//! client, with who, which patient, what was asked and what came of it; no query values
//! unless asked for; token issuance audited too.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode};
use serde_json::{Value, json};

use crate::support::tokens::*;
use crate::support::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// An upstream with patients 123 and 456: a read of Patient/123, a search answering
/// one Observation of each, and a slow answer for `/slow`.
async fn upstream() -> FakeUpstream {
    FakeUpstream::start(Arc::new(|seen: &Seen| {
        let uri = seen.uri.clone();
        Box::pin(async move {
            if uri.contains("Observation/slow") {
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            let obs = |id: &str, patient: &str| {
                json!({"fullUrl": format!("http://up.test/fhir/Observation/{id}"),
                    "resource": {"resourceType": "Observation", "id": id, "status": "final",
                    "code": {"text": "x"}, "subject": {"reference": format!("Patient/{patient}")}}})
            };
            let body = if uri.contains("/Patient/123") {
                json!({"resourceType": "Patient", "id": "123"})
            } else {
                json!({"resourceType": "Bundle", "type": "searchset",
                    "entry": [obs("o1", "123"), obs("o2", "456")]})
            };
            json_response(StatusCode::OK, &body)
        })
    }))
    .await
}

/// `GET path` with the token, a trace context and a forwarded-for, as a client behind a
/// proxy sends it.
async fn get_as(gw: &JwtGateway, path: &str, token: &str) -> StatusCode {
    let req = Request::get(gw.gw.url(path))
        .header("authorization", format!("Bearer {token}"))
        .header("traceparent", format!("00-{TRACE}-00f067aa0ba902b7-01"))
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-request-id", format!("rid-{}", path.len()))
        .body(smartgate::body::empty())
        .unwrap();
    send(req).await.0
}

/// The audit line of the request with `X-Request-Id: rid`.
fn line_of(lines: &[Value], rid: &str) -> Value {
    lines
        .iter()
        .find(|l| l["request_id"] == rid)
        .cloned()
        .unwrap_or_else(|| panic!("no audit line for {rid}: {lines:#?}"))
}

/// Every field of the line, for allowed, refused and filtered requests and a bad token.
#[tokio::test]
async fn lines_carry_who_what_and_the_outcome() {
    let gw = jwt_gateway(upstream().await, "", "").await;
    let token = token_with(
        &gw.key,
        "patient/Patient.r patient/Observation.rs",
        Some("123"),
    );

    let read = "/r4/Patient/123";
    assert_eq!(get_as(&gw, read, &token).await, StatusCode::OK);
    let search = "/r4/Observation?code=http%3A%2F%2Floinc.org%7C1234-5";
    assert_eq!(get_as(&gw, search, &token).await, StatusCode::OK);
    let refused = "/r4/Encounter?patient=Patient/123";
    assert_eq!(get_as(&gw, refused, &token).await, StatusCode::FORBIDDEN);
    let bad = "/r4/Patient/123?_x";
    let forged = token.replace('.', ".x");
    assert_eq!(get_as(&gw, bad, &forged).await, StatusCode::UNAUTHORIZED);

    let lines = gw.gw.audit_lines();
    let allowed = line_of(&lines, &format!("rid-{}", read.len()));
    let fields = [
        "time",
        "event",
        "request_id",
        "trace_id",
        "peer",
        "forwarded_for",
        "issuer",
        "client_id",
        "sub",
        "fhir_user",
        "patient",
        "scope",
        "method",
        "route",
        "interaction",
        "resource_type",
        "id",
        "query",
        "decision",
        "reason",
        "removed",
        "upstream_status",
        "status",
        "aborted",
        "duration_ms",
        "upstream_ms",
    ];
    let keys: Vec<&String> = allowed.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), fields.len(), "{keys:?}");
    for f in fields {
        assert!(allowed.get(f).is_some(), "{f} missing: {allowed}");
    }
    let time = allowed["time"].as_str().unwrap();
    assert!(
        time.len() == 24 && time.ends_with('Z') && time.starts_with("20"),
        "{time}"
    );
    for (field, want) in [
        ("event", json!("request")),
        ("trace_id", json!(TRACE)),
        ("forwarded_for", json!("203.0.113.9")),
        ("issuer", json!(ISSUER)),
        ("client_id", json!("app-1")),
        ("sub", json!("user-1")),
        ("fhir_user", json!("Practitioner/9")),
        ("patient", json!("123")),
        ("scope", Value::Null),
        ("method", json!("GET")),
        ("route", json!("fhir")),
        ("interaction", json!("read")),
        ("resource_type", json!("Patient")),
        ("id", json!("123")),
        ("query", Value::Null),
        ("decision", json!("allow")),
        ("reason", Value::Null),
        ("removed", json!(0)),
        ("upstream_status", json!(200)),
        ("status", json!(200)),
        ("aborted", json!(false)),
    ] {
        assert_eq!(allowed[field], want, "{field}: {allowed}");
    }
    assert!(allowed["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(allowed["duration_ms"].as_f64().unwrap() >= allowed["upstream_ms"].as_f64().unwrap());

    let filtered = line_of(&lines, &format!("rid-{}", search.len()));
    assert_eq!(filtered["decision"], "filtered", "{filtered}");
    assert_eq!(filtered["removed"], 1);
    assert_eq!(filtered["interaction"], "search-type");
    assert_eq!(filtered["resource_type"], "Observation");
    assert_eq!(filtered["id"], Value::Null);
    assert_eq!(filtered["reason"], "filtered");
    // PHI-aware: the search values are not in the line.
    assert_eq!(filtered["query"], Value::Null);
    assert!(!filtered.to_string().contains("1234-5"));

    let denied = line_of(&lines, &format!("rid-{}", refused.len()));
    assert_eq!(denied["decision"], "deny", "{denied}");
    assert_eq!(denied["reason"], "insufficient_scope");
    assert_eq!(denied["status"], 403);
    assert_eq!(denied["upstream_status"], Value::Null);
    assert_eq!(denied["upstream_ms"], Value::Null);
    assert_eq!(denied["resource_type"], "Encounter");
    assert_eq!(denied["client_id"], "app-1");

    let unauthenticated = line_of(&lines, &format!("rid-{}", bad.len()));
    assert_eq!(unauthenticated["decision"], "deny", "{unauthenticated}");
    assert_eq!(unauthenticated["status"], 401);
    assert_eq!(unauthenticated["client_id"], Value::Null);
    assert!(unauthenticated["reason"].is_string());
    // No token, whole or in part, in any line.
    let all = serde_json::to_string(&lines).unwrap();
    let signature = token.rsplit('.').next().unwrap();
    assert!(!all.contains(signature) && !all.contains(&token[..20]));
    // Requests decided from the decision cache are recorded alike.
    assert_eq!(get_as(&gw, read, &token).await, StatusCode::OK);
    let again: Vec<Value> = gw
        .gw
        .audit_lines()
        .into_iter()
        .filter(|l| l["request_id"] == format!("rid-{}", read.len()))
        .collect();
    assert_eq!(again.len(), 2);
    assert_eq!(again[1]["interaction"], "read");
    assert_eq!(again[1]["id"], "123");
}

/// A request the client abandons is recorded when its future is dropped: aborted, no
/// status, with who asked and what.
#[tokio::test]
async fn an_abandoned_request_is_recorded() {
    let gw = jwt_gateway(upstream().await, "", "").await;
    let token = token_with(&gw.key, "patient/Observation.rs", Some("123"));
    let path = "/r4/Observation/slow";
    let pending = tokio::spawn({
        let url = gw.gw.url(path);
        let token = token.clone();
        async move {
            let req = Request::get(url)
                .header("authorization", format!("Bearer {token}"))
                .header("x-request-id", "abandoned")
                .body(smartgate::body::empty())
                .unwrap();
            send(req).await
        }
    });
    // Until the upstream has it, then the client goes away.
    for _ in 0..100 {
        if !gw.up.requests().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(gw.up.requests().len(), 1);
    pending.abort();
    let _ = pending.await;
    let mut line = None;
    for _ in 0..100 {
        line = gw
            .gw
            .audit_lines()
            .into_iter()
            .find(|l| l["request_id"] == "abandoned");
        if line.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let line = line.expect("no audit line for the abandoned request");
    assert_eq!(line["aborted"], true, "{line}");
    assert_eq!(line["status"], Value::Null);
    assert_eq!(line["decision"], "allow");
    assert_eq!(line["interaction"], "read");
    assert_eq!(line["id"], "slow");
    assert_eq!(line["client_id"], "app-1");
    assert_eq!(line["patient"], "123");
    // And the in-flight gauge went back down.
    let text = metrics(&gw.gw).await;
    assert!(text.contains("smartgate_inflight_requests 0"), "{text}");
}

/// `audit.include_query = true` opts in to the query string.
#[tokio::test]
async fn the_query_only_when_asked_for() {
    let up = upstream().await;
    let text = config(
        &up.base(),
        "[audit]\nsink = \"file\"\npath = \"{audit_path}\"\ninclude_query = true\n",
    );
    let gw = TestGateway::boot(&text).await;
    let req = Request::get(gw.url("/r4/Observation?code=1234-5"))
        .header("x-request-id", "q")
        .body(smartgate::body::empty())
        .unwrap();
    assert_eq!(send(req).await.0, StatusCode::OK);
    let lines = gw.audit_lines();
    let line = line_of(&lines, "q");
    assert_eq!(line["query"], "code=1234-5");
    // Without a token check there is no who, and the decision says allow.
    assert_eq!(line["client_id"], Value::Null);
    assert_eq!(line["decision"], "allow");
}
