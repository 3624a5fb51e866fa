//! Every answer that goes to a token that cannot read everything is verified or replaced
//! (issue 21, item 6): error answers carrying another patient's data in `diagnostics`,
//! `contained` or free text; a 200 OperationOutcome in place of a resource; answers to
//! writes; the context patient's own read answered with another Patient. And refusals of
//! reads that cannot be told from absence when so configured.

use crate::support;

use std::sync::Arc;

use http::{Response, StatusCode};
use serde_json::{Value, json};
use support::tokens::*;
use support::*;

const PHI: &str = "John Doe 456";

fn outcome_with_phi() -> Value {
    json!({"resourceType": "OperationOutcome",
           "text": {"status": "generated", "div": format!("<div>{PHI}</div>")},
           "contained": [{"resourceType": "Patient", "id": "456", "name": [{"text": PHI}]}],
           "issue": [{"severity": "error", "code": "conflict",
                      "details": {"coding": [{"system": "http://example.org/codes", "code": "dup", "display": PHI}],
                                  "text": PHI},
                      "diagnostics": format!("conflicts with Patient/456 ({PHI})"),
                      "expression": ["Patient/456"]}]})
}

fn other_patients_observation() -> Value {
    json!({"resourceType": "Observation", "id": "o456", "status": "final", "code": {"text": PHI},
           "subject": {"reference": "Patient/456"}})
}

/// Answers by path, each a way an upstream can put another patient's data in an answer.
fn hostile_answers() -> Responder {
    Arc::new(|seen: &Seen| {
        let path = seen.uri.split('?').next().unwrap_or("").to_owned();
        let path = path.trim_start_matches("/fhir");
        let raw = |status: u16, ty: &str, text: String| {
            Response::builder()
                .status(status)
                .header("content-type", ty)
                .body(smartgate::body::full(text))
                .unwrap()
        };
        let resp = match (seen.method.as_str(), path) {
            ("GET", "/Observation/err400") => {
                json_response(StatusCode::BAD_REQUEST, &outcome_with_phi())
            }
            ("GET", "/Observation/err409") => {
                json_response(StatusCode::CONFLICT, &outcome_with_phi())
            }
            ("GET", "/Observation/err422") => json_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                &other_patients_observation(),
            ),
            ("GET", "/Observation/err500") => raw(500, "text/html", format!("<html>{PHI}</html>")),
            ("GET", "/Observation/err412") => raw(
                412,
                "application/fhir+json",
                format!("{{\"diag\":\"{PHI}\""),
            ),
            ("GET", "/Observation/outcome200") => {
                json_response(StatusCode::OK, &outcome_with_phi())
            }
            ("GET", "/Observation/o456") => {
                json_response(StatusCode::OK, &other_patients_observation())
            }
            ("GET", "/Observation/missing") => json_response(
                StatusCode::NOT_FOUND,
                &json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found",
                        "diagnostics": "Resource Observation/missing is not known"}]}),
            ),
            // The context patient's own record, answered with another patient's.
            ("GET", "/Patient/123") => json_response(
                StatusCode::OK,
                &json!({"resourceType": "Patient", "id": "456", "name": [{"text": PHI}]}),
            ),
            ("GET", "/Observation/o123") => {
                let mut r = json_response(
                    StatusCode::OK,
                    &json!({"resourceType": "Observation", "id": "o123", "meta": {"versionId": "1"},
                            "status": "final", "code": {"text": "x"}, "subject": {"reference": "Patient/123"}}),
                );
                r.headers_mut().insert("etag", "W/\"1\"".parse().unwrap());
                r
            }
            // A create answered with another patient's record.
            ("POST", "/Observation") => {
                json_response(StatusCode::CREATED, &other_patients_observation())
            }
            ("DELETE", "/Observation/o123") => json_response(StatusCode::OK, &outcome_with_phi()),
            ("POST", "") => json_response(
                StatusCode::OK,
                &json!({"resourceType": "Bundle", "type": "transaction-response", "entry": [
                    {"response": {"status": "201 Created", "outcome": outcome_with_phi()},
                     "resource": other_patients_observation()}
                ]}),
            ),
            _ => json_response(
                StatusCode::NOT_FOUND,
                &json!({"resourceType": "OperationOutcome", "issue": []}),
            ),
        };
        Box::pin(std::future::ready(resp))
    })
}

async fn call(
    s: &JwtGateway,
    method: &str,
    path: &str,
    token: &str,
    content: Option<Value>,
) -> (StatusCode, http::HeaderMap, String) {
    let text = content.map(|v| v.to_string());
    let content = text.as_deref().map(|t| ("application/fhir+json", t));
    call_with(s, method, path, token, content).await
}

fn no_phi(what: &str, body: &str) {
    assert!(
        !body.contains("456") && !body.contains("John"),
        "{what}: another patient's data reached the token: {body}"
    );
}

/// Error answers keep their status; their bodies keep only severity, code and coded
/// details, or become the gateway's own OperationOutcome.
#[tokio::test]
async fn error_answers_carry_no_record_data() {
    let s = jwt_gateway(FakeUpstream::start(hostile_answers()).await, "", "").await;
    let token = token_with(&s.key, "patient/*.cruds", Some("123"));
    for (path, status) in [
        ("/r4/Observation/err400", 400),
        ("/r4/Observation/err409", 409),
        ("/r4/Observation/err422", 422),
        ("/r4/Observation/err500", 500),
        ("/r4/Observation/err412", 412),
    ] {
        let (got, headers, body) = call(&s, "GET", path, &token, None).await;
        assert_eq!(got.as_u16(), status, "{path}: {body}");
        no_phi(path, &body);
        let doc: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{path}: {body}"));
        assert_eq!(doc["resourceType"], "OperationOutcome", "{path}");
        assert!(
            headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/fhir+json"),
            "{path}"
        );
        assert_eq!(
            headers["content-length"],
            body.len().to_string().as_str(),
            "{path}"
        );
    }
    // What carries no record data stays: the code and coded details.
    let (_, _, body) = call(&s, "GET", "/r4/Observation/err409", &token, None).await;
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["issue"][0]["code"], "conflict");
    assert_eq!(doc["issue"][0]["details"]["coding"][0]["code"], "dup");
}

/// A token that reads everything gets the upstream's error answers as they are.
#[tokio::test]
async fn error_answers_pass_to_a_token_that_reads_everything() {
    let s = jwt_gateway(FakeUpstream::start(hostile_answers()).await, "", "").await;
    let token = token_with(&s.key, "system/*.rs", None);
    let (status, _, body) = call(&s, "GET", "/r4/Observation/err409", &token, None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(body.contains(PHI), "{body}");
}

/// A 200 OperationOutcome in place of a resource is sanitised; the context patient's own
/// read answered with another Patient is refused.
#[tokio::test]
async fn successful_answers_in_place_of_a_resource_are_checked() {
    let s = jwt_gateway(FakeUpstream::start(hostile_answers()).await, "", "").await;
    let token = token_with(&s.key, "patient/*.rs", Some("123"));
    let (status, _, body) = call(&s, "GET", "/r4/Observation/outcome200", &token, None).await;
    assert_eq!(status, StatusCode::OK);
    no_phi("200 OperationOutcome", &body);
    assert!(body.contains("OperationOutcome"), "{body}");
    let (status, _, body) = call(&s, "GET", "/r4/Patient/123", &token, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    no_phi("own read answered with another Patient", &body);
}

/// Answers to writes are verified: a create answered with another patient's record keeps
/// its status (the write happened) and its body is withheld; a delete's outcome is
/// sanitised; a transaction's entries lose what the token may not read, outcomes
/// sanitised, statuses kept.
#[tokio::test]
async fn answers_to_writes_are_verified() {
    let s = jwt_gateway(FakeUpstream::start(hostile_answers()).await, "", "").await;
    let token = token_with(&s.key, "patient/*.cruds", Some("123"));
    let mine = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": "Patient/123"}});
    let (status, _, body) = call(&s, "POST", "/r4/Observation", &token, Some(mine.clone())).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    no_phi("create answer", &body);
    let (status, _, body) = call(&s, "DELETE", "/r4/Observation/o123", &token, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    no_phi("delete answer", &body);
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "POST", "url": "Observation"}, "resource": mine}
    ]});
    let (status, _, body) = call(&s, "POST", "/r4", &token, Some(tx)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    no_phi("transaction answer", &body);
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["entry"][0]["response"]["status"], "201 Created");
}

/// With `denied_read_status = 404`, another patient's resource and a missing one answer
/// alike: status, body and header names. (By default the first is 403: FHIR allows
/// either, and 403 tells an app why.)
#[tokio::test]
async fn refusals_of_reads_cannot_be_told_from_absence() {
    let s = jwt_gateway(
        FakeUpstream::start(hostile_answers()).await,
        "[policy]\ndenied_read_status = 404",
        "",
    )
    .await;
    let token = token_with(&s.key, "patient/*.rs", Some("123"));
    let (s1, h1, b1) = call(&s, "GET", "/r4/Observation/o456", &token, None).await;
    let (s2, h2, b2) = call(&s, "GET", "/r4/Observation/missing", &token, None).await;
    assert_eq!((s1, s2), (StatusCode::NOT_FOUND, StatusCode::NOT_FOUND));
    assert_eq!(b1, b2);
    let names = |h: &http::HeaderMap| {
        let mut n: Vec<String> = h
            .keys()
            .map(|k| k.to_string())
            .filter(|k| k != "x-request-id" && k != "date")
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(&h1), names(&h2));
    let default = jwt_gateway(FakeUpstream::start(hostile_answers()).await, "", "").await;
    let token = token_with(&default.key, "patient/*.rs", Some("123"));
    let (status, _, _) = call(&default, "GET", "/r4/Observation/o456", &token, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}
