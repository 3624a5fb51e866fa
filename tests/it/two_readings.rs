//! Two readings of one document (issue 21, item 3): JSON with a repeated member name is
//! one thing to serde_json (last wins) and another to a first-wins reader. The gateway
//! refuses such a client body with 400 before anything is forwarded, and such an upstream
//! answer to a checked request with 502, at any depth.

use crate::support;

use std::sync::Arc;

use http::{Response, StatusCode};
use support::tokens::*;
use support::*;

/// The stored resources, as raw text (some with repeated names).
fn stored(path: &str) -> Option<&'static str> {
    Some(match path {
        // Patient 456 first, 123 last: last-wins reads 123, first-wins 456.
        "/fhir/Observation/two-subjects" => {
            r#"{"resourceType":"Observation","id":"two-subjects","meta":{"versionId":"1"},"subject":{"reference":"Patient/456"},"subject":{"reference":"Patient/123"}}"#
        }
        "/fhir/Observation/two-references" => {
            r#"{"resourceType":"Observation","id":"two-references","meta":{"versionId":"1"},"subject":{"reference":"Patient/456","reference":"Patient/123"}}"#
        }
        "/fhir/Observation/deep" => {
            r#"{"resourceType":"Observation","id":"deep","meta":{"versionId":"1"},"subject":{"reference":"Patient/123"},"note":[{"text":"a","text":"b"}]}"#
        }
        "/fhir/Observation/escaped" => {
            r#"{"resourceType":"Observation","id":"escaped","meta":{"versionId":"1"},"subject":{"reference":"Patient/456"},"subj\u0065ct":{"reference":"Patient/123"}}"#
        }
        "/fhir/Observation/mine" => {
            r#"{"resourceType":"Observation","id":"mine","meta":{"versionId":"1"},"subject":{"reference":"Patient/123"}}"#
        }
        "/fhir/Observation" => {
            r#"{"resourceType":"Bundle","type":"searchset","entry":[{"resource":{"resourceType":"Observation","id":"mine","subject":{"reference":"Patient/123"}},"resource":{"resourceType":"Observation","id":"other","subject":{"reference":"Patient/456"}}}]}"#
        }
        _ => return None,
    })
}

fn raw_store() -> Responder {
    Arc::new(|seen: &Seen| {
        let path = seen.uri.split('?').next().unwrap_or("").to_owned();
        let resp = match (seen.method.as_str(), stored(&path)) {
            ("GET", Some(text)) => Response::builder()
                .status(200)
                .header("content-type", "application/fhir+json")
                .header("etag", "W/\"1\"")
                .body(smartgate::body::full(text))
                .unwrap(),
            ("GET", None) => json_response(
                StatusCode::NOT_FOUND,
                &serde_json::json!({"resourceType": "OperationOutcome", "issue": []}),
            ),
            _ => Response::builder()
                .status(201)
                .header("content-type", "application/fhir+json")
                .body(smartgate::body::full(seen.body.clone()))
                .unwrap(),
        };
        Box::pin(std::future::ready(resp))
    })
}

async fn call(
    s: &JwtGateway,
    method: &str,
    path: &str,
    token: &str,
    content: Option<(&str, &str)>,
) -> (StatusCode, String) {
    let (status, _, body) = call_with(s, method, path, token, content).await;
    (status, body)
}

/// Create, update, transaction and JSON Patch bodies with a repeated name anywhere are
/// refused with 400, and no write reaches the upstream.
#[tokio::test]
async fn client_bodies_with_repeated_names_are_refused() {
    let s = jwt_gateway(FakeUpstream::start(raw_store()).await, "", "").await;
    let token = token_with(&s.key, "patient/*.cruds", Some("123"));
    let fhir = "application/fhir+json";
    for (method, path, ty, text) in [
        (
            "POST",
            "/r4/Observation",
            fhir,
            r#"{"resourceType":"Observation","subject":{"reference":"Patient/456"},"subject":{"reference":"Patient/123"}}"#,
        ),
        (
            "POST",
            "/r4/Observation",
            fhir,
            r#"{"resourceType":"Observation","resourceType":"Patient","id":"123","subject":{"reference":"Patient/123"}}"#,
        ),
        (
            "POST",
            "/r4/Observation",
            fhir,
            r#"{"resourceType":"Observation","subject":{"reference":"Patient/123"},"code":{"coding":[{"code":"a","code":"b"}]}}"#,
        ),
        (
            "PUT",
            "/r4/Observation/mine",
            fhir,
            r#"{"resourceType":"Observation","id":"mine","subject":{"reference":"Patient/456","reference":"Patient/123"}}"#,
        ),
        (
            "POST",
            "/r4",
            fhir,
            r#"{"resourceType":"Bundle","type":"transaction","entry":[{"request":{"method":"POST","url":"Observation"},"resource":{"resourceType":"Observation","subject":{"reference":"Patient/456"}},"resource":{"resourceType":"Observation","subject":{"reference":"Patient/123"}}}]}"#,
        ),
        (
            "POST",
            "/r4",
            fhir,
            r#"{"resourceType":"Bundle","type":"batch","type":"transaction","entry":[]}"#,
        ),
        (
            "PATCH",
            "/r4/Observation/mine",
            "application/json-patch+json",
            r#"[{"op":"replace","path":"/status","path":"/subject/reference","value":"Patient/456"}]"#,
        ),
    ] {
        let (status, body) = call(&s, method, path, &token, Some((ty, text))).await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "{method} {path} {text}: {body}"
        );
        assert!(body.contains("OperationOutcome"), "{body}");
    }
    let writes: Vec<_> =
        s.up.requests()
            .into_iter()
            .filter(|r| r.method != http::Method::GET)
            .collect();
    assert!(writes.is_empty(), "writes reached the upstream: {writes:?}");
}

/// An upstream answer with a repeated name, at the top, in a reference, deep in a note,
/// escaped, or in a search entry, is 502 to a confined token: neither reading is served.
#[tokio::test]
async fn upstream_answers_with_repeated_names_are_502() {
    let s = jwt_gateway(FakeUpstream::start(raw_store()).await, "", "").await;
    let token = token_with(&s.key, "patient/*.rs", Some("123"));
    for path in [
        "/r4/Observation/two-subjects",
        "/r4/Observation/two-references",
        "/r4/Observation/deep",
        "/r4/Observation/escaped",
        "/r4/Observation?code=x",
    ] {
        let (status, body) = call(&s, "GET", path, &token, None).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{path}: {body}");
        assert!(!body.contains("456"), "{path}: {body}");
    }
    let (status, body) = call(&s, "GET", "/r4/Observation/mine", &token, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// The stored version an update is checked against is read strictly too: a stored
/// resource with two readings is never overwritten on the strength of one of them.
#[tokio::test]
async fn a_stored_version_with_two_readings_is_not_written_over() {
    let s = jwt_gateway(FakeUpstream::start(raw_store()).await, "", "").await;
    let token = token_with(&s.key, "patient/*.cruds", Some("123"));
    let (status, body) = call(
        &s,
        "PUT",
        "/r4/Observation/two-subjects",
        &token,
        Some((
            "application/fhir+json",
            r#"{"resourceType":"Observation","id":"two-subjects","subject":{"reference":"Patient/123"}}"#,
        )),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(
        s.up.requests()
            .iter()
            .all(|r| r.method == http::Method::GET),
        "the update was forwarded"
    );
}

/// Scopes joined by any white space but SP are one malformed scope (RFC 6749 §3.3): a
/// token whose scope is `patient/Patient.rs<NBSP>user/*.rs` reads nothing through
/// `user/*.rs`.
#[tokio::test]
async fn scopes_joined_by_other_white_space_grant_nothing() {
    let s = jwt_gateway(FakeUpstream::start(raw_store()).await, "", "").await;
    for sep in ["\u{a0}", "\u{3000}", "\t", "\u{2003}", "\n"] {
        let token = token_with(
            &s.key,
            &format!("patient/Patient.rs{sep}user/*.rs"),
            Some("123"),
        );
        let (status, body) = call(&s, "GET", "/r4/Observation/mine", &token, None).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{sep:?}: {body}");
    }
    let token = token_with(&s.key, "patient/Patient.rs user/*.rs", Some("123"));
    let (status, body) = call(&s, "GET", "/r4/Observation/mine", &token, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}
