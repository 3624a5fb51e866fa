//! Engine II through the real gateway: compartment confinement and granular scopes on
//! reads, searches, includes, paging, writes and bundles, against a hostile fake FHIR
//! store that ignores every search parameter (so only the gateway's own verification
//! stands between the token and the other patient's data).

use crate::support;

use std::sync::Arc;

use http::{Request, StatusCode};
use serde_json::{Value, json};
use support::tokens::token_with as token;
use support::tokens::*;
use support::*;

fn obs(id: &str, patient: &str, category: &str) -> Value {
    json!({
        "resourceType": "Observation", "id": id, "meta": {"versionId": "1"},
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": category}]}],
        "code": {"text": "x"},
        "subject": {"reference": format!("Patient/{patient}")}
    })
}

fn store() -> Vec<Value> {
    vec![
        json!({"resourceType": "Patient", "id": "123", "meta": {"versionId": "1"}}),
        json!({"resourceType": "Patient", "id": "456", "meta": {"versionId": "1"}}),
        json!({"resourceType": "Patient", "id": "1234", "meta": {"versionId": "1"}}),
        obs("o1", "123", "laboratory"),
        obs("o2", "123", "vital-signs"),
        obs("o3", "456", "laboratory"),
        obs("o4", "1234", "laboratory"),
        json!({"resourceType": "Medication", "id": "m1"}),
        document("d123", "123"),
        document("d456", "456"),
    ]
}

/// A stored document Bundle about `patient`: a Composition and the Patient.
fn document(id: &str, patient: &str) -> Value {
    json!({"resourceType": "Bundle", "id": id, "type": "document", "entry": [
        {"resource": {"resourceType": "Composition", "id": format!("c{patient}"),
                      "subject": {"reference": format!("Patient/{patient}")}}},
        {"resource": {"resourceType": "Patient", "id": patient}}
    ]})
}

/// Answers like a FHIR server that ignores every search parameter: reads by id, every
/// search returns every resource of the type (plus another patient as an include),
/// writes succeed.
fn hostile_store() -> Responder {
    Arc::new(|seen: &Seen| {
        let uri: http::Uri = seen.uri.parse().unwrap();
        let path = uri
            .path()
            .trim_start_matches("/fhir")
            .trim_matches('/')
            .to_owned();
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let all = store();
        let find = |t: &str, id: &str| {
            all.iter()
                .find(|r| r["resourceType"] == t && r["id"] == id)
                .cloned()
        };
        let resp = match (seen.method.as_str(), parts.as_slice()) {
            ("GET", [t, id]) => match find(t, id) {
                Some(r) => {
                    let mut resp = json_response(StatusCode::OK, &r);
                    resp.headers_mut()
                        .insert("etag", "W/\"1\"".parse().unwrap());
                    resp
                }
                None => json_response(
                    StatusCode::NOT_FOUND,
                    &json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found"}]}),
                ),
            },
            ("GET", [] | [_] | [_, _, _]) => {
                let t = parts.last().copied().unwrap_or("Observation");
                let mut entries: Vec<Value> = all
                    .iter()
                    .filter(|r| parts.is_empty() || r["resourceType"] == t)
                    .map(|r| json!({"resource": r, "search": {"mode": "match"}}))
                    .collect();
                entries.push(json!({"resource": all[1], "search": {"mode": "include"}}));
                json_response(
                    StatusCode::OK,
                    &json!({"resourceType": "Bundle", "type": "searchset", "total": entries.len(),
                            "link": [{"relation": "next", "url": "http://upstream.invalid/fhir?_getpages=abc"}],
                            "entry": entries}),
                )
            }
            ("POST", []) => json_response(
                StatusCode::OK,
                &json!({"resourceType": "Bundle", "type": "transaction-response", "entry": []}),
            ),
            _ => {
                let body: Value = serde_json::from_slice(&seen.body).unwrap_or(json!({}));
                json_response(StatusCode::OK, &body)
            }
        };
        Box::pin(std::future::ready(resp))
    })
}

type Setup = JwtGateway;

async fn setup(extra: &str) -> Setup {
    setup_with(extra, "").await
}

/// `upstream_extra` goes into `[upstream]`.
async fn setup_with(extra: &str, upstream_extra: &str) -> Setup {
    jwt_gateway(
        FakeUpstream::start(hostile_store()).await,
        extra,
        upstream_extra,
    )
    .await
}

async fn call(
    s: &Setup,
    method: &str,
    path: &str,
    tok: &str,
    content: Option<(&str, Value)>,
    headers: &[(&str, &str)],
) -> (StatusCode, http::HeaderMap, Value) {
    let mut req = Request::builder()
        .method(method)
        .uri(s.gw.url(path))
        .header("authorization", format!("Bearer {tok}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let b = match content {
        Some((ct, v)) => {
            req = req.header("content-type", ct);
            v.to_string()
        }
        None => String::new(),
    };
    let (status, h, bytes) = send(req.body(body(b)).unwrap()).await;
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, h, v)
}

/// Nothing but reads (the gateway's own fetches of stored versions) reached the upstream.
fn assert_only_reads_forwarded(s: &Setup, why: &str) {
    assert!(
        s.up.requests()
            .iter()
            .all(|r| r.method == http::Method::GET),
        "{why}"
    );
}

fn ids(bundle: &Value) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .map(|es| {
            es.iter()
                .map(|e| {
                    format!(
                        "{}/{}",
                        e["resource"]["resourceType"].as_str().unwrap_or(""),
                        e["resource"]["id"].as_str().unwrap_or("")
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Rule 4: reads are verified; another patient's record is refused, 403 or 404 by config.
#[tokio::test]
async fn confined_reads() {
    let s = setup("").await;
    let app = token(
        &s.key,
        "patient/Observation.r patient/Patient.r patient/Medication.r",
        Some("123"),
    );
    let (st, _, b) = call(&s, "GET", "/r4/Observation/o1", &app, None, &[]).await;
    assert_eq!((st, b["id"].as_str()), (StatusCode::OK, Some("o1")));
    for other in ["/r4/Observation/o3", "/r4/Observation/o4"] {
        let (st, h, b) = call(&s, "GET", other, &app, None, &[]).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{other}");
        assert!(
            h["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("insufficient_scope")
        );
        assert_eq!(
            b["resourceType"], "OperationOutcome",
            "nothing of the resource leaks"
        );
    }
    let before = s.up.requests().len();
    let (st, _, _) = call(&s, "GET", "/r4/Patient/456", &app, None, &[]).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert_eq!(
        s.up.requests().len(),
        before,
        "decided without asking the upstream"
    );
    assert_eq!(
        call(&s, "GET", "/r4/Patient/123", &app, None, &[]).await.0,
        StatusCode::OK
    );
    // Outside the compartment: allowed by default.
    assert_eq!(
        call(&s, "GET", "/r4/Medication/m1", &app, None, &[])
            .await
            .0,
        StatusCode::OK
    );
    // Upstream errors pass as they are.
    assert_eq!(
        call(&s, "GET", "/r4/Observation/nope", &app, None, &[])
            .await
            .0,
        StatusCode::NOT_FOUND
    );

    // HEAD cannot skip the check: asked as GET, verified, answered without a body.
    let (st, _, b) = call(&s, "HEAD", "/r4/Observation/o3", &app, None, &[]).await;
    assert_eq!((st, b), (StatusCode::FORBIDDEN, Value::Null));
    let (st, _, b) = call(&s, "HEAD", "/r4/Observation/o1", &app, None, &[]).await;
    assert_eq!((st, b), (StatusCode::OK, Value::Null));
    assert_eq!(s.up.requests().last().unwrap().method, http::Method::GET);
    // No 304 confirming another patient's version: the validators are not forwarded.
    let (st, _, _) = call(
        &s,
        "GET",
        "/r4/Observation/o3",
        &app,
        None,
        &[("if-none-match", "W/\"1\"")],
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert!(
        !s.up
            .requests()
            .last()
            .unwrap()
            .headers
            .contains_key("if-none-match")
    );
    // No 206 with a part of a resource, which could not be checked: the whole is
    // answered, verified.
    let (st, _, b) = call(
        &s,
        "GET",
        "/r4/Observation/o1",
        &app,
        None,
        &[
            ("range", "bytes=0-9"),
            ("if-range", "W/\"1\""),
            ("prefer", "respond-async, handling=strict"),
        ],
    )
    .await;
    assert_eq!((st, &b["id"]), (StatusCode::OK, &Value::from("o1")));
    let seen = s.up.requests().last().unwrap().headers.clone();
    assert!(!seen.contains_key("range") && !seen.contains_key("if-range"));
    // Nor a 202 with a status URL to poll, unchecked: asked to answer now.
    assert_eq!(seen["prefer"], "handling=strict");

    let hidden =
        setup("[policy]\ndenied_read_status = 404\npatient_scope_non_compartment = \"deny\"\n")
            .await;
    let app = token(
        &hidden.key,
        "patient/Observation.r patient/Medication.r",
        Some("123"),
    );
    assert_eq!(
        call(&hidden, "GET", "/r4/Observation/o3", &app, None, &[])
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        call(&hidden, "GET", "/r4/Medication/m1", &app, None, &[])
            .await
            .0,
        StatusCode::FORBIDDEN
    );
}

/// Rule 5: searches get the patient injected and every entry verified — matches,
/// includes and opaque paging pages alike; total is dropped when entries are removed.
#[tokio::test]
async fn confined_searches() {
    let s = setup("").await;
    let app = token(&s.key, "patient/Observation.rs", Some("123"));
    let (st, _, b) = call(
        &s,
        "GET",
        "/r4/Observation?code=x&_include=Observation:subject",
        &app,
        None,
        &[],
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(ids(&b), vec!["Observation/o1", "Observation/o2"]);
    assert!(b.get("total").is_none());
    let seen = s.up.requests().last().unwrap().uri.clone();
    assert!(seen.contains("patient=Patient%2F123"), "{seen}");
    // The next link is rewritten to the gateway; following it is verified again.
    let next = b["link"][0]["url"].as_str().unwrap().to_owned();
    assert!(next.contains("_getpages=abc"), "{next}");
    let (st, _, b) = call(&s, "GET", "/r4?_getpages=abc", &app, None, &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(ids(&b), vec!["Observation/o1", "Observation/o2"]);
    // Compartment search of the patient; of another patient refused before forwarding.
    let (st, _, b) = call(&s, "GET", "/r4/Patient/123/Observation", &app, None, &[]).await;
    assert_eq!((st, ids(&b).len()), (StatusCode::OK, 2));
    let before = s.up.requests().len();
    for hostile in [
        "/r4/Patient/456/Observation",
        "/r4/Observation?patient=123,456",
        "/r4/Observation?patient=123&subject=Patient/456",
        "/r4/Observation?subject:Patient.name=x",
        "/r4/Observation?_filter=subject%20eq%20Patient/456",
    ] {
        let (st, _, _) = call(&s, "GET", hostile, &app, None, &[]).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{hostile}");
    }
    assert_eq!(s.up.requests().len(), before);
    // _revinclude on Patient: the other patient's resources never come back.
    let both = token(
        &s.key,
        "patient/Patient.rs patient/Observation.rs",
        Some("123"),
    );
    let (_, _, b) = call(
        &s,
        "GET",
        "/r4/Patient?_revinclude=Observation:subject",
        &both,
        None,
        &[],
    )
    .await;
    assert_eq!(ids(&b), vec!["Patient/123"]);
    assert!(s.up.requests().last().unwrap().uri.contains("_id=123"));
    let m = metrics(&s.gw).await;
    assert!(m.contains("smartgate_verify_removed_entries_total"), "{m}");
    assert!(
        !m.contains("smartgate_verify_removed_entries_total 0"),
        "{m}"
    );
}

/// Unconfined tokens: an _include of a type the token cannot read is removed from the
/// response rather than refused.
#[tokio::test]
async fn unconfined_includes_verified() {
    let s = setup("").await;
    let narrow = token(&s.key, "user/Observation.rs", None);
    let (st, _, b) = call(
        &s,
        "GET",
        "/r4/Observation?_include=Observation:subject",
        &narrow,
        None,
        &[],
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(ids(&b).len(), 4, "the Patient include is gone");
    assert!(ids(&b).iter().all(|i| i.starts_with("Observation/")));
}

/// Rule 6: writes are checked before anything is forwarded and pinned to the version
/// checked with If-Match.
#[tokio::test]
async fn confined_writes() {
    let s = setup("").await;
    let app = token(&s.key, "patient/Observation.cruds", Some("123"));
    let fhir = "application/fhir+json";
    let writes = |s: &Setup| {
        s.up.requests()
            .into_iter()
            .filter(|r| r.method != http::Method::GET)
            .count()
    };
    // Update moving o1 from 123 to 456; update taking o3 from 456 to 123.
    let (st, _, _) = call(
        &s,
        "PUT",
        "/r4/Observation/o1",
        &app,
        Some((fhir, obs("o1", "456", "x"))),
        &[],
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, _, _) = call(
        &s,
        "PUT",
        "/r4/Observation/o3",
        &app,
        Some((fhir, obs("o3", "123", "x"))),
        &[],
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    // Create for another patient; create with no patient at all.
    let (st, _, _) = call(
        &s,
        "POST",
        "/r4/Observation",
        &app,
        Some((fhir, obs("n", "456", "x"))),
        &[],
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let mut orphan = obs("n", "123", "x");
    orphan.as_object_mut().unwrap().remove("subject");
    let (st, _, _) = call(
        &s,
        "POST",
        "/r4/Observation",
        &app,
        Some((fhir, orphan)),
        &[],
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    // A JSON Patch that rewrites subject; FHIRPath Patch is not checked: 415.
    let patch = json!([{"op": "replace", "path": "/subject/reference", "value": "Patient/456"}]);
    let (st, _, _) = call(
        &s,
        "PATCH",
        "/r4/Observation/o1",
        &app,
        Some(("application/json-patch+json", patch)),
        &[],
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, _, _) = call(
        &s,
        "PATCH",
        "/r4/Observation/o1",
        &app,
        Some((fhir, json!({"resourceType": "Parameters"}))),
        &[],
    )
    .await;
    assert_eq!(st, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // Delete of another patient's resource.
    let (st, _, _) = call(&s, "DELETE", "/r4/Observation/o3", &app, None, &[]).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    // XML bodies cannot be checked.
    let (st, _, _) = call(
        &s,
        "POST",
        "/r4/Observation",
        &app,
        Some(("application/fhir+xml", json!("<x/>"))),
        &[],
    )
    .await;
    assert_eq!(st, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(writes(&s), 0, "a refused write reached the upstream");

    // The allowed ones, each pinned to the version checked.
    let (st, _, _) = call(
        &s,
        "PUT",
        "/r4/Observation/o1",
        &app,
        Some((fhir, obs("o1", "123", "y"))),
        &[],
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let last = s.up.requests().last().unwrap().clone();
    assert_eq!(
        (
            last.method.as_str(),
            last.headers["if-match"].to_str().unwrap()
        ),
        ("PUT", "W/\"1\"")
    );
    let ok_patch = json!([{"op": "replace", "path": "/status", "value": "amended"}]);
    let (st, _, _) = call(
        &s,
        "PATCH",
        "/r4/Observation/o1",
        &app,
        Some(("application/json-patch+json", ok_patch)),
        &[],
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        s.up.requests().last().unwrap().headers["if-match"],
        "W/\"1\""
    );
    // The patient's own Observation, but by cascade: whatever refers to it would go too,
    // unseen. Refused before the upstream is asked, by parameter or by header.
    let before = s.up.requests().len();
    let (st, _, _) = call(
        &s,
        "DELETE",
        "/r4/Observation/o2?_cascade=delete",
        &app,
        None,
        &[],
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let headers = [("x-cascade", "delete")];
    let (st, _, _) = call(&s, "DELETE", "/r4/Observation/o2", &app, None, &headers).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(s.up.requests().len(), before);
    let (st, _, _) = call(&s, "DELETE", "/r4/Observation/o2", &app, None, &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        s.up.requests().last().unwrap().headers["if-match"],
        "W/\"1\""
    );
    // A client If-Match for another version fails here, as the upstream would.
    let (st, _, _) = call(
        &s,
        "DELETE",
        "/r4/Observation/o2",
        &app,
        None,
        &[("if-match", "W/\"7\"")],
    )
    .await;
    assert_eq!(st, StatusCode::PRECONDITION_FAILED);
    // Update-as-create needs only the body.
    let (st, _, _) = call(
        &s,
        "PUT",
        "/r4/Observation/new1",
        &app,
        Some((fhir, obs("new1", "123", "x"))),
        &[],
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    // Create, and conditional create narrowed to the patient.
    let (st, _, _) = call(
        &s,
        "POST",
        "/r4/Observation",
        &app,
        Some((fhir, obs("n", "123", "x"))),
        &[("if-none-exist", "code=x")],
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let ine = s.up.requests().last().unwrap().headers["if-none-exist"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(ine, "code=x&patient=Patient%2F123");
    // A condition that cannot be read, or two of them, cannot be narrowed: refused, not
    // replaced by the narrowing alone (which would find any of the patient's resources).
    let forwarded = s.up.requests().len();
    for values in [&[&b"code=caf\xc3\xa9"[..]][..], &[b"code=x", b"code=y"]] {
        let mut req = Request::post(s.gw.url("/r4/Observation"))
            .header("authorization", format!("Bearer {app}"))
            .header("content-type", fhir);
        for v in values {
            req = req.header("if-none-exist", http::HeaderValue::from_bytes(v).unwrap());
        }
        let (st, _, b) = send(req.body(body(obs("n", "123", "x").to_string())).unwrap()).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{values:?}");
        assert!(
            String::from_utf8_lossy(&b).contains("If-None-Exist"),
            "{values:?}"
        );
    }
    assert_eq!(
        s.up.requests().len(),
        forwarded,
        "a refused create reached the upstream"
    );
    // A conditional delete is refused by default (policy.confined_conditional_writes);
    // tests/it/lenient.rs has it narrowed.
    let forwarded = s.up.requests().len();
    let (st, _, _) = call(&s, "DELETE", "/r4/Observation?code=x", &app, None, &[]).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert_eq!(s.up.requests().len(), forwarded);
}

/// `_elements` under a confined token: the upstream is asked for the elements the check
/// reads too, so a subsetted answer can still be verified (and is not emptied or refused).
#[tokio::test]
async fn elements_keep_what_the_check_reads() {
    // A server that honours `_elements` (FHIR R4 search.html#elements): each resource
    // with only the listed elements, `resourceType`, `id` and `meta`.
    let subsetting: Responder = Arc::new(|seen: &Seen| {
        let uri: http::Uri = seen.uri.parse().unwrap();
        // Parameters from the query, and from the body of a POST _search.
        let params = format!(
            "{}&{}",
            uri.query().unwrap_or(""),
            String::from_utf8_lossy(&seen.body)
        );
        let mut keep: Vec<String> = form_urlencoded::parse(params.as_bytes())
            .filter(|(k, _)| k == "_elements")
            .flat_map(|(_, v)| v.split(',').map(str::to_owned).collect::<Vec<_>>())
            .collect();
        // And `_summary=text`: the narrative. Either way an Observation's mandatory
        // elements come too ("servers SHOULD always return mandatory elements").
        let summary_text =
            form_urlencoded::parse(params.as_bytes()).any(|(k, v)| k == "_summary" && v == "text");
        if summary_text {
            keep.push("text".to_owned());
        }
        let subsetting = summary_text || !keep.is_empty();
        keep.extend(["status", "code"].map(str::to_owned));
        let subset = |r: &Value| {
            let mut r = r.clone();
            r.as_object_mut().unwrap().retain(|k, _| {
                !subsetting
                    || ["resourceType", "id", "meta"].contains(&k.as_str())
                    || keep.iter().any(|e| e == k)
            });
            r
        };
        let path = uri
            .path()
            .trim_start_matches("/fhir/")
            .trim_end_matches("/_search");
        let all = store();
        let observations = all.iter().filter(|r| r["resourceType"] == "Observation");
        let resp = match path.split_once('/') {
            Some((_, id)) => json_response(
                StatusCode::OK,
                &subset(all.iter().find(|r| r["id"] == id).unwrap()),
            ),
            None => json_response(
                StatusCode::OK,
                &json!({"resourceType": "Bundle", "type": "searchset",
                        "entry": observations.map(|r| json!({"resource": subset(r)})).collect::<Vec<_>>()}),
            ),
        };
        Box::pin(std::future::ready(resp))
    });
    let s = jwt_gateway(FakeUpstream::start(subsetting).await, "", "").await;
    let app = token(&s.key, "patient/Observation.rs", Some("123"));

    let (st, _, b) = call(&s, "GET", "/r4/Observation?_elements=code", &app, None, &[]).await;
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_eq!(ids(&b), ["Observation/o1", "Observation/o2"], "{b}");
    assert_eq!(b["entry"][0]["resource"]["code"]["text"], "x");
    let sent = s.up.requests().last().unwrap().uri.clone();
    assert!(sent.contains("_elements=code,performer,subject"), "{sent}");
    assert!(sent.contains("patient=Patient%2F123"), "{sent}");

    let (st, _, b) = call(
        &s,
        "GET",
        "/r4/Observation/o1?_elements=code",
        &app,
        None,
        &[],
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_eq!(b["code"]["text"], "x");

    // The same through a POST _search form.
    let req = Request::post(s.gw.url("/r4/Observation/_search"))
        .header("authorization", format!("Bearer {app}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body("_elements=code&status=final"))
        .unwrap();
    let (st, _, bytes) = send(req).await;
    let b: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_eq!(ids(&b), ["Observation/o1", "Observation/o2"], "{b}");
    let sent = s.up.requests().last().unwrap().body.clone();
    assert_eq!(&sent[..], b"_elements=code,performer,subject&status=final");
    // `_summary=text` would drop the patient's references too: asked as `_elements=text`
    // with them, in the query and in a form.
    let (st, _, b) = call(&s, "GET", "/r4/Observation?_summary=text", &app, None, &[]).await;
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_eq!(ids(&b), ["Observation/o1", "Observation/o2"], "{b}");
    let sent = s.up.requests().last().unwrap().uri.clone();
    assert!(sent.contains("_elements=text,performer,subject"), "{sent}");
    assert!(!sent.contains("_summary"), "{sent}");
    let (st, _, b) = call(
        &s,
        "GET",
        "/r4/Observation/o1?_summary=text",
        &app,
        None,
        &[],
    )
    .await;
    assert_eq!(
        (st, &b["code"]["text"]),
        (StatusCode::OK, &json!("x")),
        "{b}"
    );
    // Another patient's resource, subsetted the same way, is still refused.
    let (st, _, _) = call(
        &s,
        "GET",
        "/r4/Observation/o3?_elements=code",
        &app,
        None,
        &[],
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
}

/// A request whose answer is checked cannot ask for XML: 406 before the upstream works on
/// it (the gateway checks JSON only). JSON spelled any way passes; unchecked requests
/// keep `_format` as it is.
#[tokio::test]
async fn format_other_than_json_not_acceptable_when_checked() {
    let s = setup("").await;
    let app = token(&s.key, "patient/Observation.rs", Some("123"));
    for path in [
        "/r4/Observation/o1?_format=xml",
        "/r4/Observation?_format=application/fhir%2Bxml",
        "/r4/Observation?code=x&_format=json&_format=xml",
    ] {
        let (st, _, b) = call(&s, "GET", path, &app, None, &[]).await;
        assert_eq!(st, StatusCode::NOT_ACCEPTABLE, "{path}: {b}");
        assert_eq!(b["resourceType"], "OperationOutcome");
    }
    assert!(s.up.requests().is_empty(), "the upstream was asked");
    for path in [
        "/r4/Observation/o1?_format=json",
        "/r4/Observation/o1?_format=application/fhir%2Bjson",
        "/r4/Observation/o1?_format=JSON",
    ] {
        let (st, _, b) = call(&s, "GET", path, &app, None, &[]).await;
        assert_eq!(st, StatusCode::OK, "{path}: {b}");
    }
    let all = token(&s.key, "system/*.rs", None);
    let (st, _, _) = call(&s, "GET", "/r4/Observation/o1?_format=xml", &all, None, &[]).await;
    assert_eq!(st, StatusCode::OK, "an unchecked read keeps its _format");
    assert!(s.up.requests().last().unwrap().uri.ends_with("_format=xml"));
}

/// Binary is outside the R4 compartment but holds patients' documents: under a
/// `patient/` scope one is readable only when its `securityContext` names the patient,
/// and one is written only with it. An unconfined scope reads any.
#[tokio::test]
async fn binaries_confined_by_security_context() {
    let binary = |id: &str, context: Option<&str>| {
        let mut b = json!({"resourceType": "Binary", "id": id, "meta": {"versionId": "1"},
                           "contentType": "text/plain", "data": "aGVsbG8="});
        if let Some(c) = context {
            b["securityContext"] = json!({"reference": c});
        }
        b
    };
    let document = |id: &str, patient: &str| {
        json!({"resourceType": "DocumentReference", "id": id, "status": "current",
               "subject": {"reference": format!("Patient/{patient}")}})
    };
    let binaries = [
        binary("b1", Some("Patient/123")),
        binary("b2", Some("Patient/456")),
        binary("b3", None),
        binary("b4", Some("DocumentReference/d1")),
        binary("b5", Some("DocumentReference/d2")),
        binary("b6", Some("DocumentReference/gone")),
        document("d1", "123"),
        document("d2", "456"),
    ];
    let store: Responder = Arc::new(move |seen: &Seen| {
        let id = seen.uri.rsplit('/').next().unwrap_or("").to_owned();
        let resp = match binaries.iter().find(|b| b["id"] == id.as_str()) {
            Some(b) if seen.method == http::Method::GET => json_response(StatusCode::OK, b),
            None if seen.method == http::Method::GET => json_response(
                StatusCode::NOT_FOUND,
                &json!({"resourceType": "OperationOutcome",
                        "issue": [{"severity": "error", "code": "not-found"}]}),
            ),
            _ => json_response(
                StatusCode::CREATED,
                &json!({"resourceType": "Binary", "id": "new"}),
            ),
        };
        Box::pin(std::future::ready(resp))
    });
    let s = jwt_gateway(FakeUpstream::start(store).await, "", "").await;
    let app = token(&s.key, "patient/Binary.cr", Some("123"));
    let json_accept = [("accept", "application/fhir+json")];
    let (st, _, b) = call(&s, "GET", "/r4/Binary/b1", &app, None, &json_accept).await;
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_eq!(b["data"], "aGVsbG8=");
    // Asked for no FHIR format: checked as JSON, answered in its native form.
    for accept in [None, Some("text/plain"), Some("*/*")] {
        let mut req = Request::get(s.gw.url("/r4/Binary/b1"))
            .header("authorization", format!("Bearer {app}"));
        if let Some(a) = accept {
            req = req.header("accept", a);
        }
        let (st, h, bytes) = send(req.body(body("")).unwrap()).await;
        assert_eq!(st, StatusCode::OK, "{accept:?}");
        assert_eq!(&bytes[..], b"hello", "{accept:?}");
        assert_eq!(h["content-type"], "text/plain");
        assert_eq!(h["content-length"], "5");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["content-security-policy"], "sandbox");
    }
    assert_eq!(
        s.up.requests().last().unwrap().headers["accept"],
        "application/fhir+json",
        "the upstream is asked for JSON"
    );
    // b4's context is a DocumentReference: this token has no scope to read one.
    for other in ["b2", "b3", "b4"] {
        let (st, _, b) = call(
            &s,
            "GET",
            &format!("/r4/Binary/{other}"),
            &app,
            None,
            &json_accept,
        )
        .await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{other}: {b}");
    }
    let all = token(&s.key, "user/Binary.r", None);
    let (st, _, _) = call(&s, "GET", "/r4/Binary/b2", &all, None, &[]).await;
    assert_eq!(st, StatusCode::OK);
    // A Binary whose context is a DocumentReference is as readable as that document,
    // fetched and checked: the patient's own, yes; another's or a missing one, no.
    let docs = token(
        &s.key,
        "patient/Binary.r patient/DocumentReference.r",
        Some("123"),
    );
    for (id, expected) in [
        ("b4", StatusCode::OK),
        ("b5", StatusCode::FORBIDDEN),
        ("b6", StatusCode::FORBIDDEN),
        ("b2", StatusCode::FORBIDDEN),
    ] {
        let path = format!("/r4/Binary/{id}");
        let (st, _, b) = call(&s, "GET", &path, &docs, None, &json_accept).await;
        assert_eq!(st, expected, "{id}: {b}");
    }
    let fetched =
        s.up.requests()
            .iter()
            .filter(|r| r.uri.ends_with("/DocumentReference/d1"))
            .count();
    assert_eq!(
        fetched, 2,
        "the context is fetched once per read of b4 (two tokens)"
    );

    let fhir = "application/fhir+json";
    let reads = s.up.requests().len();
    for (context, allowed) in [
        (Some("Patient/123"), true),
        (Some("Patient/456"), false),
        (None, false),
    ] {
        let (st, _, b) = call(
            &s,
            "POST",
            "/r4/Binary",
            &app,
            Some((fhir, binary("n", context))),
            &[],
        )
        .await;
        let expected = if allowed {
            StatusCode::CREATED
        } else {
            StatusCode::FORBIDDEN
        };
        assert_eq!(st, expected, "{context:?}: {b}");
    }
    assert_eq!(
        s.up.requests().len(),
        reads + 1,
        "only the allowed create was forwarded"
    );
}

/// An upstream holding `resources`: a read answers the one with that id, a DELETE an
/// OperationOutcome, and a search every resource of the type, whatever the filters (a
/// server that ignores the patient parameter, or has none for the type).
fn serving(resources: Vec<Value>) -> Responder {
    Arc::new(move |seen: &Seen| {
        let path = seen.uri.split('?').next().unwrap_or("").to_owned();
        let last = path.rsplit('/').next().unwrap_or("");
        let resp = if seen.method == http::Method::DELETE {
            json_response(
                StatusCode::OK,
                &json!({"resourceType": "OperationOutcome", "issue": [
                    {"severity": "information", "code": "informational"}]}),
            )
        } else if let Some(r) = resources.iter().find(|r| r["id"] == last) {
            json_response(StatusCode::OK, r)
        } else {
            let of_type = resources.iter().filter(|r| r["resourceType"] == last);
            json_response(
                StatusCode::OK,
                &json!({"resourceType": "Bundle", "type": "searchset",
                        "entry": of_type.map(|r| json!({"resource": r})).collect::<Vec<_>>()}),
            )
        };
        Box::pin(std::future::ready(resp))
    })
}

/// Device, Contract and GuidanceResponse are outside the R4 compartment but name one
/// patient through their `patient` parameter: a `patient/` scope sees only that
/// patient's (a US Core implant of another patient is refused, searched or read).
#[tokio::test]
async fn types_naming_a_patient_are_confined() {
    let device = |id: &str, patient: &str| json!({"resourceType": "Device", "id": id, "patient": {"reference": format!("Patient/{patient}")}});
    let devices = vec![device("d1", "123"), device("d2", "456")];
    let s = jwt_gateway(FakeUpstream::start(serving(devices)).await, "", "").await;
    let app = token(&s.key, "patient/Device.rs", Some("123"));
    let (st, _, _) = call(&s, "GET", "/r4/Device/d1", &app, None, &[]).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _, _) = call(&s, "GET", "/r4/Device/d2", &app, None, &[]).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, _, b) = call(&s, "GET", "/r4/Device?type=implant", &app, None, &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(ids(&b), ["Device/d1"]);
    assert!(
        s.up.requests()
            .last()
            .unwrap()
            .uri
            .contains("patient=Patient%2F123")
    );
    let (st, _, _) = call(&s, "GET", "/r4/Device?patient=456", &app, None, &[]).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    // An unconfined scope is unchanged.
    let all = token(&s.key, "user/Device.rs", None);
    let (st, _, _) = call(&s, "GET", "/r4/Device/d2", &all, None, &[]).await;
    assert_eq!(st, StatusCode::OK);
}

/// Linkage, VerificationResult, MessageHeader and PaymentNotice are outside the R4
/// compartment and point at "any" resource. Under the default
/// `patient_scope_non_compartment = "allow"` a `patient/*.rs` token read every patient's:
/// which records are the same person, what was verified about whom. Now one is readable
/// when it references the context patient directly, and not otherwise.
#[tokio::test]
async fn records_pointing_at_any_resource_are_confined() {
    let linkage = |id: &str, a: &str, b: &str| {
        json!({"resourceType": "Linkage", "id": id, "item": [
        {"type": "source", "resource": {"reference": a}},
        {"type": "alternate", "resource": {"reference": b}}]})
    };
    let records = vec![
        linkage("own", "Patient/123", "Patient/900"),
        linkage("theirs", "Patient/456", "Patient/789"),
        json!({"resourceType": "VerificationResult", "id": "v1", "target": [{"reference": "Observation/o456"}]}),
    ];
    let s = jwt_gateway(FakeUpstream::start(serving(records)).await, "", "").await;
    let app = token(&s.key, "patient/*.rs", Some("123"));
    let (st, _, _) = call(&s, "GET", "/r4/Linkage/own", &app, None, &[]).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _, _) = call(&s, "GET", "/r4/Linkage/theirs", &app, None, &[]).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    // Pointing at another patient's Observation is no one's compartment.
    let (st, _, _) = call(&s, "GET", "/r4/VerificationResult/v1", &app, None, &[]).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, _, b) = call(&s, "GET", "/r4/Linkage", &app, None, &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(ids(&b), ["Linkage/own"]);
    assert!(
        s.up.requests()
            .last()
            .unwrap()
            .uri
            .contains("item=Patient%2F123")
    );
    let (st, _, b) = call(&s, "GET", "/r4/VerificationResult", &app, None, &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert!(ids(&b).is_empty(), "{b}");
    let (st, _, _) = call(&s, "GET", "/r4/Linkage?item=Patient/456", &app, None, &[]).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    // A confined create must be for the patient, like any compartment type.
    let writer = token(&s.key, "patient/Linkage.c", Some("123"));
    let body = linkage("new", "Patient/456", "Patient/789");
    let before = s.up.requests().len();
    let (st, _, _) = call(
        &s,
        "POST",
        "/r4/Linkage",
        &writer,
        Some(("application/fhir+json", body)),
        &[],
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert_eq!(s.up.requests().len(), before, "the write was not forwarded");
    // An unconfined scope is unchanged.
    let all = token(&s.key, "user/Linkage.rs", None);
    let (st, _, _) = call(&s, "GET", "/r4/Linkage/theirs", &all, None, &[]).await;
    assert_eq!(st, StatusCode::OK);
}

/// An EnrollmentResponse or PaymentReconciliation is a patient's only through the
/// EnrollmentRequest or Task it references: before, a `patient/*.rs` token read every
/// one on the server. Now no confined scope reaches them, and nothing is forwarded;
/// unconfined scopes still do.
#[tokio::test]
async fn records_of_a_patient_through_another_resource_need_unconfined_scopes() {
    let records = vec![
        json!({"resourceType": "EnrollmentResponse", "id": "er456",
               "request": {"reference": "EnrollmentRequest/req456"}, "status": "active"}),
        json!({"resourceType": "PaymentReconciliation", "id": "pr1",
               "request": {"reference": "Task/t456"}, "status": "active"}),
        json!({"resourceType": "Medication", "id": "m1"}),
    ];
    let s = jwt_gateway(FakeUpstream::start(serving(records)).await, "", "").await;
    let app = token(&s.key, "patient/*.rs", Some("123"));
    let before = s.up.requests().len();
    for path in [
        "/r4/EnrollmentResponse/er456",
        "/r4/EnrollmentResponse",
        "/r4/PaymentReconciliation/pr1",
        "/r4/PaymentReconciliation?status=active",
    ] {
        let (st, _, _) = call(&s, "GET", path, &app, None, &[]).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{path}");
    }
    assert_eq!(s.up.requests().len(), before, "nothing was forwarded");
    // Types that are nobody's record stay readable under "allow".
    let (st, _, _) = call(&s, "GET", "/r4/Medication/m1", &app, None, &[]).await;
    assert_eq!(st, StatusCode::OK);
    let all = token(&s.key, "user/*.rs", None);
    for path in [
        "/r4/EnrollmentResponse/er456",
        "/r4/PaymentReconciliation/pr1",
    ] {
        let (st, _, _) = call(&s, "GET", path, &all, None, &[]).await;
        assert_eq!(st, StatusCode::OK, "{path}");
    }
}

/// A Group is in the compartment of every patient it lists, so under the R4 definition
/// alone patient 123 read a whole cohort it belongs to, and with it who else is in it.
/// Under a patient context a Group is readable only when it names no other patient.
#[tokio::test]
async fn groups_do_not_list_other_patients() {
    let group = |id: &str, members: &[&str]| {
        json!({"resourceType": "Group", "id": id, "type": "person", "actual": true,
               "member": members.iter().map(|m| json!({"entity": {"reference": m}})).collect::<Vec<_>>()})
    };
    let groups = vec![
        group("own", &["Patient/123"]),
        group("cohort", &["Patient/123", "Patient/456", "Patient/789"]),
    ];
    let s = jwt_gateway(FakeUpstream::start(serving(groups)).await, "", "").await;
    let app = token(&s.key, "patient/*.rs", Some("123"));
    let (st, _, _) = call(&s, "GET", "/r4/Group/own", &app, None, &[]).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _, b) = call(&s, "GET", "/r4/Group/cohort", &app, None, &[]).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert!(!b.to_string().contains("Patient/456"));
    let (st, _, b) = call(&s, "GET", "/r4/Group", &app, None, &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(ids(&b), ["Group/own"]);
    assert!(
        s.up.requests()
            .last()
            .unwrap()
            .uri
            .contains("member=Patient%2F123")
    );
    let all = token(&s.key, "user/Group.rs", None);
    let (st, _, _) = call(&s, "GET", "/r4/Group/cohort", &all, None, &[]).await;
    assert_eq!(st, StatusCode::OK);
}

/// A write body the checks cannot read is a 400 naming what is wrong, and no write
/// reaches the upstream.
#[tokio::test]
async fn unreadable_write_bodies_refused() {
    let s = setup("").await;
    let app = token(&s.key, "patient/Observation.cruds", Some("123"));
    let raw = |method: &str, path: &str, ct: &str, body_text: &'static str| {
        Request::builder()
            .method(method)
            .uri(s.gw.url(path))
            .header("authorization", format!("Bearer {app}"))
            .header("content-type", ct)
            .body(body(body_text))
            .unwrap()
    };
    let fhir = "application/fhir+json";
    let patch = "application/json-patch+json";
    for (req, why) in [
        (
            raw("POST", "/r4/Observation", fhir, "{\"resourceType\":"),
            "the body is not JSON",
        ),
        (
            raw("PUT", "/r4/Observation/o1", fhir, "not json"),
            "the body is not JSON",
        ),
        (
            raw("PATCH", "/r4/Observation/o1", patch, "{\"op\": \"remove\"}"),
            "the JSON Patch is malformed",
        ),
        (
            raw(
                "PATCH",
                "/r4/Observation/o1",
                patch,
                "[{\"op\": \"remove\", \"path\": \"/nowhere\"}]",
            ),
            "the JSON Patch does not apply",
        ),
        (
            raw("POST", "/r4", fhir, "[not a bundle"),
            "the posted Bundle is not JSON",
        ),
    ] {
        let (st, _, b) = send(req).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{why}");
        assert!(String::from_utf8_lossy(&b).contains(why), "{why}: {b:?}");
    }
    assert_only_reads_forwarded(&s, "a refused write reached the upstream");
}

/// An upstream answer the checks cannot read is a 502, never passed on: a read to verify,
/// and the stored version an update or patch is checked against.
#[tokio::test]
async fn unreadable_upstream_answers_refused() {
    let garbage: Responder = Arc::new(|seen: &Seen| {
        let resp = if seen.method == http::Method::GET {
            let mut resp =
                http::Response::new(smartgate::body::full("{\"resourceType\": \"Observ"));
            resp.headers_mut()
                .insert("content-type", "application/fhir+json".parse().unwrap());
            resp.headers_mut()
                .insert("etag", "W/\"1\"".parse().unwrap());
            resp
        } else {
            json_response(StatusCode::OK, &json!({}))
        };
        Box::pin(std::future::ready(resp))
    });
    let s = jwt_gateway(FakeUpstream::start(garbage).await, "", "").await;
    let app = token(&s.key, "patient/Observation.cruds", Some("123"));
    let (st, _, b) = call(&s, "GET", "/r4/Observation/o1", &app, None, &[]).await;
    assert_eq!(st, StatusCode::BAD_GATEWAY);
    assert!(b.to_string().contains("not JSON"), "{b}");
    let (st, _, b) = call(
        &s,
        "PUT",
        "/r4/Observation/o1",
        &app,
        Some(("application/fhir+json", obs("o1", "123", "x"))),
        &[],
    )
    .await;
    assert_eq!(st, StatusCode::BAD_GATEWAY);
    assert!(b.to_string().contains("stored version"), "{b}");
    assert_only_reads_forwarded(
        &s,
        "a write checked against an unreadable version reached the upstream",
    );
}

/// Rule 8: transaction entries get the same checks.
#[tokio::test]
async fn transaction_entries() {
    let s = setup("").await;
    let app = token(&s.key, "patient/Observation.cruds", Some("123"));
    let fhir = "application/fhir+json";
    let tx =
        |entries: Value| json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
    let bad = tx(json!([
        {"fullUrl": "urn:uuid:1", "resource": obs("a", "123", "x"), "request": {"method": "POST", "url": "Observation"}},
        {"fullUrl": "urn:uuid:2", "resource": obs("b", "456", "x"), "request": {"method": "POST", "url": "Observation"}}
    ]));
    let (st, _, b) = call(&s, "POST", "/r4", &app, Some((fhir, bad)), &[]).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{b}");
    // An update entry of another patient's stored resource.
    let sneaky = tx(json!([
        {"resource": obs("o3", "123", "x"), "request": {"method": "PUT", "url": "Observation/o3"}}
    ]));
    let (st, _, _) = call(&s, "POST", "/r4", &app, Some((fhir, sneaky)), &[]).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    // An ifNoneExist that is not a string cannot be narrowed (it would become the
    // patient condition alone, matching any of the patient's resources): refused.
    for condition in [Value::Null, json!(5), json!({"code": "x"})] {
        let odd = tx(json!([
            {"resource": obs("n", "123", "x"), "request": {"method": "POST", "url": "Observation", "ifNoneExist": condition}}
        ]));
        let (st, _, b) = call(&s, "POST", "/r4", &app, Some((fhir, odd)), &[]).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{condition}: {b}");
        let why = b["issue"][0]["diagnostics"].as_str().unwrap_or("");
        assert!(why.contains("entry 0"), "{b}");
    }
    assert_only_reads_forwarded(&s, "a refused write reached the upstream");
    // urn:uuid references between entries: to an entry updating the patient's own
    // record it counts; to an entry creating something it never does.
    let linked = tx(json!([
        {"fullUrl": "urn:uuid:0c3a6a52-0000-4000-8000-000000000001", "resource": {"resourceType": "Patient", "id": "123"}, "request": {"method": "PUT", "url": "Patient/123"}},
        {"resource": {"resourceType": "Observation", "code": {"text": "x"}, "subject": {"reference": "urn:uuid:0c3a6a52-0000-4000-8000-000000000001"}}, "request": {"method": "POST", "url": "Observation"}}
    ]));
    let all = token(
        &s.key,
        "patient/Observation.cruds patient/Patient.ru",
        Some("123"),
    );
    let (st, _, b) = call(&s, "POST", "/r4", &all, Some((fhir, linked)), &[]).await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let orphan = tx(json!([
        {"fullUrl": "urn:uuid:0c3a6a52-0000-4000-8000-000000000002", "resource": {"resourceType": "Encounter", "status": "planned", "class": {"code": "x"}, "subject": {"reference": "Patient/123"}}, "request": {"method": "POST", "url": "Encounter"}},
        {"resource": {"resourceType": "Observation", "code": {"text": "x"}, "subject": {"reference": "urn:uuid:0c3a6a52-0000-4000-8000-000000000002"}}, "request": {"method": "POST", "url": "Observation"}}
    ]));
    let with_encounter = token(
        &s.key,
        "patient/Observation.cruds patient/Encounter.c",
        Some("123"),
    );
    let (st, _, b) = call(
        &s,
        "POST",
        "/r4",
        &with_encounter,
        Some((fhir, orphan)),
        &[],
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let why = b["issue"][0]["diagnostics"].as_str().unwrap_or("");
    assert!(why.contains("entry 1") && !why.contains("entry 0"), "{b}");
    let good = tx(json!([
        {"fullUrl": "urn:uuid:1", "resource": obs("a", "123", "x"), "request": {"method": "POST", "url": "Observation"}},
        {"resource": obs("o1", "123", "x"), "request": {"method": "PUT", "url": "Observation/o1"}},
        {"request": {"method": "GET", "url": "Observation?code=x"}}
    ]));
    let (st, _, _) = call(&s, "POST", "/r4", &app, Some((fhir, good)), &[]).await;
    assert_eq!(st, StatusCode::OK);
    let sent: Value = serde_json::from_slice(&s.up.requests().last().unwrap().body).unwrap();
    assert_eq!(sent["entry"][1]["request"]["ifMatch"], "W/\"1\"");
    assert_eq!(
        sent["entry"][2]["request"]["url"],
        "Observation?code=x&patient=Patient%2F123"
    );
}

/// Rule 7: granular scopes on reads and searches.
#[tokio::test]
async fn granular_scopes() {
    let s = setup("").await;
    let lab = token(&s.key, "user/Observation.rs?category=laboratory", None);
    assert_eq!(
        call(&s, "GET", "/r4/Observation/o1", &lab, None, &[])
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        call(&s, "GET", "/r4/Observation/o2", &lab, None, &[])
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    // Another category is not refused: the scope's is added beside it, and what the
    // (hostile, parameter-ignoring) store answers is filtered to what the scope covers.
    let (st, _, b) = call(
        &s,
        "GET",
        "/r4/Observation?category=vital-signs",
        &lab,
        None,
        &[],
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert!(
        s.up.requests()
            .last()
            .unwrap()
            .uri
            .ends_with("category=vital-signs&category=laboratory")
    );
    for e in b["entry"].as_array().unwrap() {
        assert_eq!(
            e["resource"]["category"][0]["coding"][0]["code"], "laboratory",
            "{e}"
        );
    }
    let (st, _, b) = call(&s, "GET", "/r4/Observation?code=x", &lab, None, &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert!(
        s.up.requests()
            .last()
            .unwrap()
            .uri
            .contains("category=laboratory")
    );
    assert_eq!(
        ids(&b),
        vec!["Observation/o1", "Observation/o3", "Observation/o4"]
    );
    // The union of two category scopes: both kinds, nothing else.
    let two = token(
        &s.key,
        "user/Observation.rs?category=laboratory user/Observation.rs?category=vital-signs user/Patient.r",
        None,
    );
    let (_, _, b) = call(&s, "GET", "/r4/Observation", &two, None, &[]).await;
    let observations: Vec<String> = ids(&b)
        .into_iter()
        .filter(|i| i.starts_with("Observation/"))
        .collect();
    assert_eq!(observations.len(), 4);
    // A scope with a modifier grants nothing.
    let vs = token(&s.key, "user/Observation.rs?code:in=http://vs", None);
    assert_eq!(
        call(&s, "GET", "/r4/Observation?code=x", &vs, None, &[])
            .await
            .0,
        StatusCode::FORBIDDEN
    );
}

/// Rule 10: a response too large to verify is refused, not streamed unchecked; one that
/// needs no check still streams.
#[tokio::test]
async fn too_large_to_verify() {
    let s = setup_with("", "max_response_buffer = \"200\"").await;
    let app = token(&s.key, "patient/Observation.rs", Some("123"));
    let (st, _, b) = call(&s, "GET", "/r4/Observation?code=x", &app, None, &[]).await;
    assert_eq!(st, StatusCode::BAD_GATEWAY);
    assert_eq!(b["resourceType"], "OperationOutcome");
}

/// A Subscription is a search the server keeps running and pushes past the gateway: its
/// criteria must be one the token may make with nothing to add. A patient's app may
/// subscribe to its own Observations, not to everyone's; a system client with full
/// access to Subscription but search on one type only may not subscribe to another, in
/// a transaction either. Nothing refused reaches the upstream.
#[tokio::test]
async fn subscriptions_stand_on_searches_the_token_may_make() {
    let s = setup("").await;
    let sub = |criteria: &str| {
        json!({"resourceType": "Subscription", "status": "requested", "reason": "x",
               "criteria": criteria,
               "channel": {"type": "rest-hook", "endpoint": "https://app.example/hook"}})
    };
    let fhir = "application/fhir+json";
    let app = token(
        &s.key,
        "patient/Subscription.c patient/Observation.rs",
        Some("123"),
    );
    let (st, _, _) = call(
        &s,
        "POST",
        "/r4/Subscription",
        &app,
        Some((fhir, sub("Observation?code=x"))),
        &[],
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let own = sub("Observation?patient=Patient/123&code=x");
    let (st, _, _) = call(&s, "POST", "/r4/Subscription", &app, Some((fhir, own)), &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        s.up.requests().len(),
        1,
        "only the allowed one was forwarded"
    );

    let client = token(
        &s.key,
        "system/Subscription.cruds system/Observation.rs",
        None,
    );
    let (st, _, _) = call(
        &s,
        "POST",
        "/r4/Subscription",
        &client,
        Some((fhir, sub("Patient?name=x"))),
        &[],
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": sub("Patient?name=x"), "request": {"method": "POST", "url": "Subscription"}}
    ]});
    let (st, _, _) = call(&s, "POST", "/r4", &client, Some((fhir, tx)), &[]).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, _, _) = call(
        &s,
        "POST",
        "/r4/Subscription",
        &client,
        Some((fhir, sub("Observation?code=x"))),
        &[],
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(s.up.requests().len(), 2);
}

/// A Subscription is outside the R4 compartment, and its channel may carry the
/// subscriber's credentials. Under the default `patient_scope_non_compartment = "allow"`
/// a `patient/*.rs` token read every patient's, secrets and all. It is now the patient's
/// when its criteria is a search of the patient's own data that the token may make: read,
/// searched (filtered, `_elements` keeping the criteria) and deleted only then.
#[tokio::test]
async fn subscriptions_are_read_by_their_criteria() {
    let sub = |id: &str, criteria: &str| {
        json!({"resourceType": "Subscription", "id": id, "meta": {"versionId": "1"},
               "status": "active", "reason": "x",
               "criteria": criteria,
               "channel": {"type": "rest-hook", "endpoint": "https://app.example/hook",
                           "header": ["Authorization: Bearer hook-secret"]}})
    };
    let subs = vec![
        sub("own", "Observation?patient=Patient/123&code=x"),
        sub("theirs", "Observation?patient=Patient/456"),
        sub("everyone", "Observation?code=x"),
    ];
    let s = jwt_gateway(FakeUpstream::start(serving(subs)).await, "", "").await;
    let app = token(&s.key, "patient/*.cruds", Some("123"));
    let (st, _, _) = call(&s, "GET", "/r4/Subscription/own", &app, None, &[]).await;
    assert_eq!(st, StatusCode::OK);
    for other in ["theirs", "everyone"] {
        let path = format!("/r4/Subscription/{other}");
        let (st, _, b) = call(&s, "GET", &path, &app, None, &[]).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{other}");
        assert!(!b.to_string().contains("hook-secret"));
    }
    let (st, _, b) = call(&s, "GET", "/r4/Subscription?status=active", &app, None, &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(ids(&b), ["Subscription/own"]);
    let (st, _, _) = call(
        &s,
        "GET",
        "/r4/Subscription?_elements=status",
        &app,
        None,
        &[],
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let asked = s.up.requests().last().unwrap().uri.clone();
    assert!(asked.contains("criteria"), "{asked}");
    // Deleting another patient's is refused on its stored version; the own one goes.
    let (st, _, _) = call(&s, "DELETE", "/r4/Subscription/theirs", &app, None, &[]).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert!(
        s.up.requests()
            .iter()
            .all(|r| r.method != http::Method::DELETE),
        "the delete was not forwarded"
    );
    let (st, _, _) = call(&s, "DELETE", "/r4/Subscription/own", &app, None, &[]).await;
    assert_eq!(st, StatusCode::OK);
    // A token that may read everything reads every Subscription.
    let all = token(&s.key, "user/*.rs", None);
    let (st, _, _) = call(&s, "GET", "/r4/Subscription/theirs", &all, None, &[]).await;
    assert_eq!(st, StatusCode::OK);
}

/// A stored Bundle (a document, an IPS) is outside the R4 compartment, and reading it
/// reads its entries: with patient/*.rs the patient's own document is readable, by id
/// and in searches, the other patient's is refused; a document about another patient
/// cannot be stored, one about the patient can.
#[tokio::test]
async fn stored_bundles_are_confined_by_their_entries() {
    let s = setup("").await;
    let app = token(&s.key, "patient/*.cruds", Some("123"));
    let (st, _, _) = call(&s, "GET", "/r4/Bundle/d456", &app, None, &[]).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, _, b) = call(&s, "GET", "/r4/Bundle/d123", &app, None, &[]).await;
    assert_eq!((st, &b["id"]), (StatusCode::OK, &json!("d123")));
    let (st, _, b) = call(&s, "GET", "/r4/Bundle?type=document", &app, None, &[]).await;
    assert_eq!(st, StatusCode::OK);
    // The other patient's document and the included other Patient are taken out.
    assert_eq!(ids(&b), ["Bundle/d123"]);
    let before = s.up.requests().len();
    let fhir = "application/fhir+json";
    let theirs = Some((fhir, document("x", "456")));
    let (st, _, _) = call(&s, "POST", "/r4/Bundle", &app, theirs, &[]).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert_eq!(s.up.requests().len(), before);
    let own = Some((fhir, document("x", "123")));
    let (st, _, _) = call(&s, "POST", "/r4/Bundle", &app, own, &[]).await;
    assert_eq!(st, StatusCode::OK);
}

/// `$meta` would answer another patient's resource's versions and security labels in a
/// Parameters that names no patient: refused under a patient context, never forwarded.
#[tokio::test]
async fn meta_is_refused_under_a_patient_context() {
    let s = setup("").await;
    let app = token(&s.key, "patient/*.rs", Some("123"));
    for path in ["/r4/Observation/o3/$meta", "/r4/Observation/$meta"] {
        let (st, _, _) = call(&s, "GET", path, &app, None, &[]).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{path}");
    }
    assert!(s.up.requests().is_empty());
}

/// A conditional create under a patient context is verified, but an answer without a
/// body (`Prefer: return=minimal`) has nothing to verify: the 201 and its Location pass,
/// rather than a 502 for a create that happened. An empty 200 to a read still fails.
#[tokio::test]
async fn minimal_answers_to_checked_writes_pass() {
    let up = FakeUpstream::start(Arc::new(|seen: &Seen| {
        let mut resp = http::Response::new(smartgate::body::empty());
        if seen.method == http::Method::POST {
            *resp.status_mut() = StatusCode::CREATED;
            let location = "http://upstream.invalid/fhir/Observation/n/_history/1";
            resp.headers_mut()
                .insert("location", location.parse().unwrap());
        }
        resp.headers_mut()
            .insert("content-length", "0".parse().unwrap());
        Box::pin(std::future::ready(resp))
    }))
    .await;
    let s = jwt_gateway(up, "", "aliases = [\"http://upstream.invalid/fhir\"]").await;
    let app = token(&s.key, "patient/Observation.crs", Some("123"));
    let (st, h, _) = call(
        &s,
        "POST",
        "/r4/Observation",
        &app,
        Some(("application/fhir+json", obs("n", "123", "x"))),
        &[("if-none-exist", "code=x"), ("prefer", "return=minimal")],
    )
    .await;
    assert_eq!(st, StatusCode::CREATED);
    assert_eq!(
        h["location"],
        "http://gateway.test/r4/Observation/n/_history/1"
    );
    let (st, _, _) = call(&s, "GET", "/r4/Observation/o1", &app, None, &[]).await;
    assert_eq!(st, StatusCode::BAD_GATEWAY);
}
