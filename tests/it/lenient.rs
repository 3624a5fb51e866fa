//! Conditional writes and narrowed searches against a server in FHIR's default lenient
//! handling (issue 21, item 5): it ignores a search parameter it does not support unless
//! asked `Prefer: handling=strict`, when it fails instead (R4 search.html#errors). A
//! patient the gateway added to a condition would be dropped there, and the write would
//! reach other patients' records.

use crate::support;

use std::sync::{Arc, Mutex};

use http::{Request, StatusCode};
use serde_json::json;
use support::tokens::*;
use support::*;

/// A store of Observations for patients 123 and 456 that supports only `code` on
/// Observation. Conditional deletes delete every match, recorded in `deleted`.
fn lenient_store(deleted: Arc<Mutex<Vec<String>>>) -> Responder {
    Arc::new(move |seen: &Seen| {
        let strict = seen
            .headers
            .get_all("prefer")
            .iter()
            .any(|v| v.to_str().unwrap_or("").contains("handling=strict"));
        let uri: http::Uri = seen.uri.parse().unwrap();
        let params: Vec<(String, String)> =
            form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
                .into_owned()
                .collect();
        let unsupported = params.iter().any(|(k, _)| k != "code");
        let resp = if unsupported && strict {
            json_response(
                StatusCode::BAD_REQUEST,
                &json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-supported"}]}),
            )
        } else {
            let all = [("o123", "123"), ("o456", "456")];
            match seen.method.as_str() {
                "DELETE" => {
                    deleted
                        .lock()
                        .unwrap()
                        .extend(all.iter().map(|(id, _)| id.to_string()));
                    json_response(
                        StatusCode::OK,
                        &json!({"resourceType": "OperationOutcome", "issue": []}),
                    )
                }
                _ => json_response(
                    StatusCode::OK,
                    &json!({"resourceType": "Bundle", "type": "searchset", "entry": all.iter().map(|(id, p)| json!({
                        "resource": {"resourceType": "Observation", "id": id, "status": "final", "code": {"text": "x"},
                                     "subject": {"reference": format!("Patient/{p}")}}
                    })).collect::<Vec<_>>()}),
                ),
            }
        };
        Box::pin(std::future::ready(resp))
    })
}

async fn delete(s: &JwtGateway, token: &str, prefer: Option<&str>) -> StatusCode {
    let mut req = Request::delete(s.gw.url("/r4/Observation?code=x"))
        .header("authorization", format!("Bearer {token}"));
    if let Some(p) = prefer {
        req = req.header("prefer", p);
    }
    send(req.body(smartgate::body::empty()).unwrap()).await.0
}

/// By default a confined conditional delete is refused and reaches nothing.
#[tokio::test]
async fn confined_conditional_writes_are_refused_by_default() {
    let deleted = Arc::new(Mutex::new(Vec::new()));
    let s = jwt_gateway(
        FakeUpstream::start(lenient_store(deleted.clone())).await,
        "",
        "",
    )
    .await;
    let token = token_with(&s.key, "patient/Observation.cruds", Some("123"));
    assert_eq!(delete(&s, &token, None).await, StatusCode::FORBIDDEN);
    let put = Request::put(s.gw.url("/r4/Observation?code=x"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/fhir+json")
        .body(body(
            json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                   "subject": {"reference": "Patient/123"}})
            .to_string(),
        ))
        .unwrap();
    assert_eq!(send(put).await.0, StatusCode::FORBIDDEN);
    assert!(s.up.requests().is_empty());
    assert!(deleted.lock().unwrap().is_empty());
}

/// With `confined_conditional_writes = "narrow"` the condition gets the patient and goes
/// with `Prefer: handling=strict`, replacing the client's own `handling`: the lenient
/// server fails instead of deleting patient 456's record.
#[tokio::test]
async fn narrowed_conditional_writes_go_strict() {
    let deleted = Arc::new(Mutex::new(Vec::new()));
    let s = jwt_gateway(
        FakeUpstream::start(lenient_store(deleted.clone())).await,
        "[policy]\nconfined_conditional_writes = \"narrow\"",
        "",
    )
    .await;
    let token = token_with(&s.key, "patient/Observation.cruds", Some("123"));
    for prefer in [
        None,
        Some("handling=lenient"),
        Some("return=minimal, handling=lenient"),
    ] {
        assert_eq!(
            delete(&s, &token, prefer).await,
            StatusCode::BAD_REQUEST,
            "{prefer:?}"
        );
        let seen = s.up.requests().pop().unwrap();
        assert!(
            seen.uri.ends_with("code=x&patient=Patient%2F123"),
            "{}",
            seen.uri
        );
        let sent: Vec<_> = seen.headers.get_all("prefer").iter().collect();
        assert_eq!(sent.len(), 1, "{sent:?}");
        let sent = sent[0].to_str().unwrap();
        assert!(
            sent.contains("handling=strict") && !sent.contains("lenient"),
            "{sent}"
        );
        if prefer.is_some_and(|p| p.contains("minimal")) {
            assert!(
                sent.contains("return=minimal"),
                "other preferences kept: {sent}"
            );
        }
    }
    assert!(
        deleted.lock().unwrap().is_empty(),
        "{:?}",
        deleted.lock().unwrap()
    );
    // An unconfined token's conditional delete goes as the client sent it.
    let admin = token_with(&s.key, "user/Observation.cruds", None);
    assert_eq!(delete(&s, &admin, None).await, StatusCode::OK);
    let seen = s.up.requests().pop().unwrap();
    assert!(seen.headers.get("prefer").is_none());
}

/// A narrowed search goes strict as well; a search the client confined itself and one by
/// an unconfined token do not need to.
#[tokio::test]
async fn narrowed_searches_go_strict() {
    let deleted = Arc::new(Mutex::new(Vec::new()));
    let s = jwt_gateway(FakeUpstream::start(lenient_store(deleted)).await, "", "").await;
    let token = token_with(&s.key, "patient/Observation.rs", Some("123"));
    let (status, _, _) = get_with_token(&s.gw.url("/r4/Observation?code=x"), &token).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let seen = s.up.requests().pop().unwrap();
    assert_eq!(seen.headers["prefer"], "handling=strict");
    let admin = token_with(&s.key, "user/Observation.rs", None);
    let (status, _, _) = get_with_token(&s.gw.url("/r4/Observation?code=x"), &admin).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        s.up.requests()
            .pop()
            .unwrap()
            .headers
            .get("prefer")
            .is_none()
    );
}
