//! State that outlives what it was decided under (issue 21, item 7): a decision cached
//! before a reload that tightens the policy must not keep serving after it.

use crate::support;

use std::sync::Arc;

use http::StatusCode;
use serde_json::json;
use support::tokens::*;
use support::*;

/// An upstream that answers every read with an Observation of patient 456.
fn other_patients_store() -> Responder {
    Arc::new(|_: &Seen| {
        Box::pin(std::future::ready(json_response(
            StatusCode::OK,
            &json!({"resourceType": "Observation", "id": "o456", "status": "final",
                    "code": {"text": "x"}, "subject": {"reference": "Patient/456"}}),
        )))
    })
}

/// A gateway in front of [`other_patients_store`], a token of a RelatedPerson user with
/// `user/*.rs`, and the URL of patient 456's Observation.
async fn related_person() -> (JwtGateway, String, String) {
    let s = jwt_gateway(FakeUpstream::start(other_patients_store()).await, "", "").await;
    let mut c = claims();
    c["scope"] = json!("user/*.rs");
    c["fhirUser"] = json!("RelatedPerson/9");
    let token = s.key.sign(&c);
    let url = s.gw.url("/r4/Observation/o456");
    (s, token, url)
}

/// Reloads the gateway with `section` appended to its configuration file.
fn reload_with(s: &JwtGateway, section: &str) {
    let text = std::fs::read_to_string(&s.gw.config_path).unwrap();
    s.gw.rewrite_config(&format!("{text}\n{section}\n"));
    s.gw.handle.reload().unwrap();
}

/// A RelatedPerson user reads another patient's Observation under `user/*.rs`; after a
/// reload that confines RelatedPerson users, the same token (same verification, its
/// decision cached) is refused, as a new token is.
#[tokio::test]
async fn a_reload_that_confines_applies_to_cached_decisions() {
    let (s, token, url) = related_person().await;
    for _ in 0..3 {
        let (status, _, _) = get_with_token(&url, &token).await;
        assert_eq!(status, StatusCode::OK, "unconfined before the reload");
    }
    reload_with(&s, "[policy]\nconfine_related_person = true");
    let (status, _, body) = get_with_token(&url, &token).await;
    assert_ne!(
        status,
        StatusCode::OK,
        "a cached decision outlived the reload: {body:?}"
    );
    let mut c = claims();
    c["scope"] = json!("user/*.rs");
    c["fhirUser"] = json!("RelatedPerson/9");
    let fresh = s.key.sign(&c);
    let (status, _, _) = get_with_token(&url, &fresh).await;
    assert_ne!(status, StatusCode::OK);
}

/// The same for `patient_scope_non_compartment = "deny"`: a patient token that read a
/// Medication before the reload is refused after it.
#[tokio::test]
async fn a_reload_that_denies_non_compartment_types_applies_to_cached_decisions() {
    let up = FakeUpstream::start(Arc::new(|_: &Seen| {
        Box::pin(std::future::ready(json_response(
            StatusCode::OK,
            &json!({"resourceType": "Medication", "id": "m1"}),
        )))
    }))
    .await;
    let s = jwt_gateway(up, "", "").await;
    let token = token_with(&s.key, "patient/*.rs", Some("123"));
    let url = s.gw.url("/r4/Medication/m1");
    let (status, _, _) = get_with_token(&url, &token).await;
    assert_eq!(status, StatusCode::OK);
    reload_with(&s, "[policy]\npatient_scope_non_compartment = \"deny\"");
    let (status, _, _) = get_with_token(&url, &token).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

/// Reload during traffic: while requests of one token run concurrently, a reload that
/// confines RelatedPerson users lands; every request sent after the reload returned is
/// refused, whatever was cached or in flight on any connection before it.
#[tokio::test]
async fn a_reload_during_traffic_applies_to_every_later_request() {
    let (s, token, url) = related_person().await;
    let reloaded = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (url, token, reloaded) = (url.clone(), token.clone(), reloaded.clone());
        tasks.push(tokio::spawn(async move {
            let client = client();
            let mut late_allowed = 0;
            for _ in 0..60 {
                let after_reload = reloaded.load(std::sync::atomic::Ordering::SeqCst);
                let req = http::Request::get(&url)
                    .header("authorization", format!("Bearer {token}"))
                    .body(smartgate::body::empty())
                    .unwrap();
                let status = client.request(req).await.unwrap().status();
                if after_reload && status == StatusCode::OK {
                    late_allowed += 1;
                }
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            late_allowed
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(40)).await;
    let text = std::fs::read_to_string(&s.gw.config_path).unwrap();
    s.gw.rewrite_config(&format!(
        "{text}\n[policy]\nconfine_related_person = true\n"
    ));
    s.gw.handle.reload().unwrap();
    reloaded.store(true, std::sync::atomic::Ordering::SeqCst);
    for t in tasks {
        assert_eq!(
            t.await.unwrap(),
            0,
            "a request sent after the reload was allowed"
        );
    }
}
