//! Provenance follows the patient of its targets (issue 22): US Core apps read the
//! Provenance of the patient's own records with patient scopes (`_revinclude=
//! Provenance:target`, `GET Provenance/{id}`). The R4 compartment has a Provenance only
//! when it targets the Patient itself, so these were removed or refused; another
//! patient's Provenance must still never be served.

use crate::support;

use std::sync::Arc;

use http::StatusCode;
use serde_json::{Value, json};
use support::tokens::*;
use support::*;

fn condition(id: &str, patient: &str) -> Value {
    json!({"resourceType": "Condition", "id": id, "meta": {"versionId": "1"},
           "subject": {"reference": format!("Patient/{patient}")}})
}

fn provenance(id: &str, targets: &[String]) -> Value {
    json!({"resourceType": "Provenance", "id": id, "recorded": "2026-01-01T00:00:00Z",
           "target": targets.iter().map(|t| json!({"reference": t})).collect::<Vec<_>>(),
           "agent": [{"who": {"reference": "Practitioner/1"}}]})
}

fn store() -> Vec<Value> {
    let many: Vec<String> = (0..20).map(|i| format!("Condition/m{i}")).collect();
    let mut all = vec![
        condition("c1", "123"),
        condition("c2", "456"),
        provenance("pv1", &["Condition/c1".into()]),
        provenance("pv2", &["Condition/c2".into()]),
        provenance("pv3", &["Condition/c1".into(), "Condition/c2".into()]),
        provenance("pv-gone", &["Condition/missing".into()]),
        provenance("pv-many", &many),
    ];
    all.extend((0..20).map(|i| condition(&format!("m{i}"), "123")));
    all
}

/// Reads by id; every search answers the Conditions c1 and c2 with every Provenance
/// included, whatever was asked (so only the gateway decides what is served).
fn ignoring_store() -> Responder {
    Arc::new(|seen: &Seen| {
        let path = seen
            .uri
            .split('?')
            .next()
            .unwrap_or("")
            .trim_start_matches("/fhir/")
            .to_owned();
        let all = store();
        let resp = match path.split_once('/') {
            Some((ty, id)) => match all
                .iter()
                .find(|r| r["resourceType"] == ty && r["id"] == id)
            {
                Some(r) => json_response(StatusCode::OK, r),
                None => json_response(
                    StatusCode::NOT_FOUND,
                    &json!({"resourceType": "OperationOutcome", "issue": []}),
                ),
            },
            None => {
                let entries: Vec<Value> = all
                    .iter()
                    .filter(|r| {
                        ["c1", "c2"].contains(&r["id"].as_str().unwrap())
                            || r["resourceType"] == "Provenance"
                    })
                    .map(|r| json!({"resource": r}))
                    .collect();
                json_response(
                    StatusCode::OK,
                    &json!({"resourceType": "Bundle", "type": "searchset", "entry": entries}),
                )
            }
        };
        Box::pin(std::future::ready(resp))
    })
}

fn ids(bundle: &Value) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["id"].as_str().unwrap().to_owned())
        .collect()
}

/// A search with `_revinclude=Provenance:target` keeps the Provenance of the patient's
/// own Conditions, known from the page itself, and nothing of another patient's.
#[tokio::test]
async fn revincluded_provenance_of_the_patients_records_is_kept() {
    let s = jwt_gateway(FakeUpstream::start(ignoring_store()).await, "", "").await;
    let token = token_with(&s.key, "patient/*.rs", Some("123"));
    let url =
        s.gw.url("/r4/Condition?patient=123&_revinclude=Provenance:target");
    let (status, _, body) = get_with_token(&url, &token).await;
    assert_eq!(status, StatusCode::OK);
    let mut got = ids(&json(&body));
    got.sort();
    // pv-many's targets are not on the page: up to 16 are looked up, so it is not
    // readable (it names 20). pv-gone's target does not exist.
    assert_eq!(got, ["c1", "pv1"], "{}", String::from_utf8_lossy(&body));
}

/// `GET Provenance/{id}`: readable when its targets, looked up at the upstream, are the
/// patient's alone; the lookups are bounded and remembered.
#[tokio::test]
async fn provenance_reads_follow_their_targets() {
    let s = jwt_gateway(FakeUpstream::start(ignoring_store()).await, "", "").await;
    let token = token_with(&s.key, "patient/*.rs", Some("123"));
    let read = |id: &str| s.gw.url(&format!("/r4/Provenance/{id}"));
    assert_eq!(get_with_token(&read("pv1"), &token).await.0, StatusCode::OK);
    for theirs in ["pv2", "pv3", "pv-gone", "pv-many"] {
        let (status, _, body) = get_with_token(&read(theirs), &token).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{theirs}");
        assert!(!String::from_utf8_lossy(&body).contains("Condition/c2"));
    }
    // Remembered: a second read looks nothing up again.
    let lookups = |s: &JwtGateway| {
        s.up.requests()
            .iter()
            .filter(|r| r.uri.starts_with("/fhir/Condition/"))
            .count()
    };
    let before = lookups(&s);
    assert_eq!(get_with_token(&read("pv1"), &token).await.0, StatusCode::OK);
    assert_eq!(lookups(&s), before);
    // Bounded: pv-many's 20 targets cost at most 16 lookups.
    let many =
        s.up.requests()
            .iter()
            .filter(|r| {
                r.uri
                    .strip_prefix("/fhir/Condition/m")
                    .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            })
            .count();
    assert!(many <= 16, "{many}");
    // The other patient reads its own.
    let theirs = token_with(&s.key, "patient/*.rs", Some("456"));
    assert_eq!(
        get_with_token(&read("pv2"), &theirs).await.0,
        StatusCode::OK
    );
    assert_eq!(
        get_with_token(&read("pv1"), &theirs).await.0,
        StatusCode::FORBIDDEN
    );
}
