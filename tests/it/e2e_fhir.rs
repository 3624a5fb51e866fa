//! End to end against a real FHIR engine: npm @medplum/fhir-router over its in-memory
//! repository (tests/e2e/fhir-server.mjs), seeded with patients p1 (5 Observations) and
//! p2 (3). Through the gateway each patient sees exactly their own data for every
//! interaction the engine implements, and the counts equal a direct, correctly narrowed
//! query. (The engine has no _include, compartment search or $everything; those are
//! covered against a hostile fake upstream in tests/it/compartment.rs.)

use crate::support;

use http::{Request, StatusCode};
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};
use support::node::NodeServer;
use support::tokens::*;
use support::*;

struct Env {
    fhir: String,
    gw: TestGateway,
    key: TestKey,
    _server: NodeServer,
    _jwks: FakeJwks,
}

async fn env() -> Env {
    let server = NodeServer::start("fhir-server.mjs", &[], &[]);
    let fhir = server.address.clone();
    let key = TestKey::rsa("rsa-1", Algorithm::RS256);
    let jwks = FakeJwks::start(&[&key]).await;
    let smart = r#"
[smart]
token_endpoint = "http://gateway.test/auth/token"
capabilities = ["client-confidential-asymmetric", "permission-v2"]
"#;
    let gw = TestGateway::boot(&config_auth(&fhir, &jwt_auth(&jwks.uri(), ""), smart)).await;
    Env {
        fhir,
        gw,
        key,
        _server: server,
        _jwks: jwks,
    }
}

fn token(e: &Env, scope: &str, patient: &str) -> String {
    let mut c = claims();
    c["scope"] = json!(scope);
    c["patient"] = json!(patient);
    e.key.sign(&c)
}

async fn call(
    e: &Env,
    method: &str,
    path: &str,
    tok: &str,
    body_json: Option<(&str, Value)>,
) -> (StatusCode, http::HeaderMap, Value) {
    let mut req = Request::builder()
        .method(method)
        .uri(e.gw.url(&format!("/r4{path}")))
        .header("authorization", format!("Bearer {tok}"));
    let b = match body_json {
        Some((ct, v)) => {
            req = req.header("content-type", ct);
            v.to_string()
        }
        None => String::new(),
    };
    let (st, h, bytes) = send(req.body(body(b)).unwrap()).await;
    (st, h, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// Straight to the engine, no gateway.
async fn direct(e: &Env, path: &str) -> Value {
    let (st, _, b) = get(&format!("{}{path}", e.fhir)).await;
    assert_eq!(st, StatusCode::OK, "{path}");
    json(&b)
}

/// Every resource of a search, following `next` links through the gateway.
async fn search_all(e: &Env, path: &str, tok: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut next = Some(format!("/r4{path}"));
    let mut pages = 0;
    while let Some(p) = next.take() {
        let (st, _, b) = call(e, "GET", p.trim_start_matches("/r4"), tok, None).await;
        assert_eq!(st, StatusCode::OK, "{p}: {b}");
        for entry in b["entry"].as_array().into_iter().flatten() {
            out.push(entry["resource"].clone());
        }
        next = b["link"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["relation"] == "next")
            .map(|l| {
                let url = l["url"].as_str().unwrap();
                // Links come back rewritten to the gateway's public base.
                let rest = url
                    .strip_prefix("http://gateway.test")
                    .unwrap_or_else(|| panic!("not rewritten: {url}"));
                rest.to_owned()
            });
        pages += 1;
        assert!(pages < 50);
    }
    out
}

fn subjects(resources: &[Value]) -> Vec<String> {
    resources
        .iter()
        .map(|r| r["subject"]["reference"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[tokio::test]
async fn each_patient_sees_exactly_their_own_data() {
    let e = env().await;
    for (me, other) in [("p1", "p2"), ("p2", "p1")] {
        let tok = token(&e, "launch/patient patient/*.cruds", me);
        // read
        assert_eq!(
            call(&e, "GET", &format!("/Patient/{me}"), &tok, None)
                .await
                .0,
            StatusCode::OK
        );
        assert_eq!(
            call(&e, "GET", &format!("/Patient/{other}"), &tok, None)
                .await
                .0,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            call(
                &e,
                "GET",
                &format!("/Observation/{other}-obs-0"),
                &tok,
                None
            )
            .await
            .0,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            call(&e, "GET", &format!("/Observation/{me}-obs-0"), &tok, None)
                .await
                .0,
            StatusCode::OK
        );
        // outside the compartment
        assert_eq!(
            call(&e, "GET", "/Medication/med", &tok, None).await.0,
            StatusCode::OK
        );
        // searches, paged two at a time, equal the direct narrowed query
        for ty in ["Observation", "Condition", "MedicationRequest"] {
            let mine = search_all(&e, &format!("/{ty}?_count=2"), &tok).await;
            let expected = direct(&e, &format!("/{ty}?patient=Patient/{me}&_count=100")).await;
            let expected_n = expected["entry"].as_array().map_or(0, |a| a.len());
            assert_eq!(mine.len(), expected_n, "{me} {ty}");
            assert!(expected_n > 0);
            assert!(
                subjects(&mine)
                    .iter()
                    .all(|s| *s == format!("Patient/{me}")),
                "{me} {ty}"
            );
        }
        let direct_all = direct(&e, "/Observation?_count=100").await;
        assert!(
            direct_all["entry"].as_array().unwrap().len() > 5,
            "the engine has both patients' data"
        );
        // naming the other patient is refused
        for hostile in [
            format!("/Observation?patient={other}"),
            format!("/Observation?patient={me},{other}"),
            format!("/Observation?subject=Patient/{other}"),
        ] {
            assert_eq!(
                call(&e, "GET", &hostile, &tok, None).await.0,
                StatusCode::FORBIDDEN,
                "{hostile}"
            );
        }
        // history of one's own resource; of another's refused
        assert_eq!(
            call(
                &e,
                "GET",
                &format!("/Condition/{me}-cond/_history"),
                &tok,
                None
            )
            .await
            .0,
            StatusCode::OK
        );
        let (st, _, b) = call(
            &e,
            "GET",
            &format!("/Condition/{other}-cond/_history"),
            &tok,
            None,
        )
        .await;
        assert!(
            st == StatusCode::OK && b["entry"].as_array().is_none_or(|a| a.is_empty()),
            "{st} {b}"
        );
    }
}

#[tokio::test]
async fn writes_stay_in_the_compartment() {
    let e = env().await;
    let tok = token(&e, "launch/patient patient/*.cruds", "p1");
    let fhir = "application/fhir+json";
    let obs = |p: &str| json!({"resourceType": "Observation", "status": "final", "code": {"text": "new"}, "subject": {"reference": format!("Patient/{p}")}});
    // create
    let (st, h, created) = call(&e, "POST", "/Observation", &tok, Some((fhir, obs("p1")))).await;
    assert_eq!(st, StatusCode::CREATED, "{created}");
    assert!(
        h["location"]
            .to_str()
            .unwrap()
            .starts_with("http://gateway.test/r4/Observation/")
    );
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(
        call(&e, "POST", "/Observation", &tok, Some((fhir, obs("p2"))))
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    let p2_before = direct(&e, "/Observation?patient=Patient/p2&_count=100").await["entry"]
        .as_array()
        .unwrap()
        .len();
    // update: own passes (pinned with If-Match); moving to p2 or taking p2's is refused
    let mut mine = created.clone();
    mine["status"] = json!("amended");
    let (st, _, b) = call(
        &e,
        "PUT",
        &format!("/Observation/{id}"),
        &tok,
        Some((fhir, mine.clone())),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let mut moved = b.clone();
    moved["subject"] = json!({"reference": "Patient/p2"});
    assert_eq!(
        call(
            &e,
            "PUT",
            &format!("/Observation/{id}"),
            &tok,
            Some((fhir, moved))
        )
        .await
        .0,
        StatusCode::FORBIDDEN
    );
    let mut taken = direct(&e, "/Observation/p2-obs-0").await;
    taken["subject"] = json!({"reference": "Patient/p1"});
    assert_eq!(
        call(
            &e,
            "PUT",
            "/Observation/p2-obs-0",
            &tok,
            Some((fhir, taken))
        )
        .await
        .0,
        StatusCode::FORBIDDEN
    );
    // patch
    let ok = json!([{"op": "replace", "path": "/status", "value": "corrected"}]);
    assert_eq!(
        call(
            &e,
            "PATCH",
            &format!("/Observation/{id}"),
            &tok,
            Some(("application/json-patch+json", ok))
        )
        .await
        .0,
        StatusCode::OK
    );
    let bad = json!([{"op": "replace", "path": "/subject/reference", "value": "Patient/p2"}]);
    assert_eq!(
        call(
            &e,
            "PATCH",
            &format!("/Observation/{id}"),
            &tok,
            Some(("application/json-patch+json", bad))
        )
        .await
        .0,
        StatusCode::FORBIDDEN
    );
    // transaction creating data for p2
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:0b8b6c1e-9c3a-4d7e-8f00-000000000001", "resource": obs("p2"), "request": {"method": "POST", "url": "Observation"}}
    ]});
    assert_eq!(
        call(&e, "POST", "", &tok, Some((fhir, tx))).await.0,
        StatusCode::FORBIDDEN
    );
    // delete: another's refused, own passes
    assert_eq!(
        call(&e, "DELETE", "/Observation/p2-obs-1", &tok, None)
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    let (st, _, b) = call(&e, "DELETE", &format!("/Observation/{id}"), &tok, None).await;
    assert!(st.is_success(), "{st} {b}");
    // p2's data is untouched
    let after = direct(&e, "/Observation?patient=Patient/p2&_count=100").await;
    assert_eq!(after["entry"].as_array().unwrap().len(), p2_before);
    assert_eq!(
        direct(&e, "/Observation/p2-obs-0").await["subject"]["reference"],
        "Patient/p2"
    );
}

#[tokio::test]
async fn granular_scopes_against_the_engine() {
    let e = env().await;
    let tok = token(
        &e,
        "launch/patient patient/Observation.rs?category=laboratory",
        "p1",
    );
    let got = search_all(&e, "/Observation?_count=2", &tok).await;
    let expected = direct(
        &e,
        "/Observation?patient=Patient/p1&category=laboratory&_count=100",
    )
    .await;
    assert_eq!(got.len(), expected["entry"].as_array().unwrap().len());
    assert_eq!(got.len(), 3);
    // Another category: the scope's is added beside it (AND), so the engine finds none.
    let (st, _, b) = call(&e, "GET", "/Observation?category=vital-signs", &tok, None).await;
    assert_eq!(st, StatusCode::OK);
    assert!(b["entry"].as_array().is_none_or(|e| e.is_empty()), "{b}");
    assert_eq!(
        call(&e, "GET", "/Observation/p1-obs-1", &tok, None).await.0,
        StatusCode::FORBIDDEN
    );
    // Issue 22: the bare code a US Core app sends, under a system|code scope, finds the
    // patient's laboratory results, and only those.
    let sc = token(
        &e,
        "launch/patient patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory",
        "p1",
    );
    for search in [
        "/Observation?patient=Patient/p1&category=laboratory",
        "/Observation?patient=Patient/p1&category=http://terminology.hl7.org/CodeSystem/observation-category|",
        "/Observation?patient=Patient/p1",
    ] {
        let got = search_all(&e, search, &sc).await;
        assert_eq!(got.len(), 3, "{search}");
        for r in &got {
            assert_eq!(
                r["category"][0]["coding"][0]["code"], "laboratory",
                "{search}"
            );
        }
    }
    assert_eq!(
        call(&e, "GET", "/Observation/p1-obs-0", &tok, None).await.0,
        StatusCode::OK
    );
}

/// #6: /metadata from the real engine, augmented with the SMART security section.
#[tokio::test]
async fn metadata_from_the_real_engine() {
    let e = env().await;
    let (st, h, b) = get(&e.gw.url("/r4/metadata")).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(h["access-control-allow-origin"], "*");
    let cs = json(&b);
    assert_eq!(cs["resourceType"], "CapabilityStatement");
    assert_eq!(cs["fhirVersion"], "4.0.1");
    let security = &cs["rest"][0]["security"];
    assert_eq!(security["cors"], true);
    assert_eq!(security["service"][0]["coding"][0]["code"], "SMART-on-FHIR");
    let uris = security["extension"][0]["extension"].as_array().unwrap();
    assert!(
        uris.iter()
            .any(|x| x["url"] == "token" && x["valueUri"] == "http://gateway.test/auth/token")
    );
    assert_eq!(cs["implementation"]["url"], "http://gateway.test/r4");
}

/// #6: a Backend Services client written independently of the gateway (Node, npm `jose`)
/// registers RS384 and ES384 keys, gets tokens from the embedded authorization server and
/// reads data from the real FHIR engine through the gateway.
#[tokio::test]
async fn independent_backend_client() {
    support::node::ensure_npm_packages();
    let server = NodeServer::start("fhir-server.mjs", &[], &[]);
    let dir = tempfile::tempdir().unwrap();
    let keyfile = dir.path().join("client-keys.json");
    let out = std::process::Command::new("node")
        .args(["backend-client.mjs", "keys", keyfile.to_str().unwrap()])
        .current_dir(support::node::e2e_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let client_jwks = stdout
        .lines()
        .find_map(|l| l.strip_prefix("JWKS "))
        .unwrap()
        .to_owned();
    let (pem, _) = smartgate::keygen::generate("ES384").unwrap();
    let key_path = dir.path().join("gateway.pem");
    std::fs::write(&key_path, pem).unwrap();
    let extra = format!(
        r#"
[authorization_server]
enabled = true
signing_key = "{}"

[[authorization_server.clients]]
client_id = "exporter"
jwks = '{client_jwks}'
scope = "system/Patient.rs system/Observation.rs"
"#,
        key_path.display()
    );
    let gw = TestGateway::boot(&config_auth(
        &server.address,
        "[auth]\nmode = \"embedded\"\n",
        &extra,
    ))
    .await;
    let args: Vec<String> = vec![
        "backend-client.mjs".into(),
        "run".into(),
        keyfile.to_str().unwrap().into(),
        gw.url("/r4/auth/token"),
        "http://gateway.test/r4/auth/token".into(),
        "exporter".into(),
        "system/Observation.rs system/Condition.rs".into(),
        gw.url("/r4/Observation?_count=100"),
    ];
    // The gateway runs on this runtime: the client waits on another thread.
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .args(&args)
            .current_dir(support::node::e2e_dir())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let results: Vec<Value> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("RESULT "))
        .map(|j| serde_json::from_str(j).unwrap())
        .collect();
    assert_eq!(results.len(), 2, "{stdout}");
    // /metadata from the real engine names the embedded server's endpoints.
    let (st, _, b) = get(&gw.url("/r4/metadata")).await;
    assert_eq!(st, StatusCode::OK);
    let uris = json(&b)["rest"][0]["security"]["extension"][0]["extension"].clone();
    for (name, url) in [
        ("token", "http://gateway.test/r4/auth/token"),
        ("introspect", "http://gateway.test/r4/auth/introspect"),
    ] {
        assert!(
            uris.as_array()
                .unwrap()
                .iter()
                .any(|x| x["url"] == name && x["valueUri"] == url),
            "{name}: {uris}"
        );
    }
    for r in &results {
        assert_eq!(r["tokenStatus"], 200, "{r}");
        assert_eq!(r["token"]["scope"], "system/Observation.rs", "{r}");
        assert_eq!(r["fhir"]["status"], 200, "{r}");
        assert_eq!(
            r["fhir"]["body"]["entry"].as_array().unwrap().len(),
            8,
            "both patients' Observations: {r}"
        );
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// #6 item 5: the one-command demo starts the real FHIR engine and the gateway with its
/// embedded authorization server, and its printed commands work (DEMO_SELFTEST runs them).
#[test]
fn demo_commands_work() {
    support::node::ensure_npm_packages();
    let root = env!("CARGO_MANIFEST_DIR");
    let out = std::process::Command::new("bash")
        .arg(format!("{root}/deploy/demo.sh"))
        .env("SMARTGATE_BIN", env!("CARGO_BIN_EXE_smartgate"))
        .env("DEMO_SELFTEST", "1")
        .env("GATEWAY_PORT", free_port().to_string())
        .env("ADMIN_PORT", free_port().to_string())
        .env("FHIR_PORT", free_port().to_string())
        .env("IDP_PORT", free_port().to_string())
        .env("APP_PORT", free_port().to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("selftest: read 200 (3 entries), refusal 403"),
        "{stdout}"
    );
    assert!(stdout.contains("client-assertion --key"), "{stdout}");
    // The patient app's launch, in a headless browser.
    assert!(
        stdout.contains(r#"selftest: patient app {"patient":"p1","own":"Patient/p1","other":403}"#),
        "{stdout}"
    );
}

/// Ctrl-C stops everything the demo started.
#[test]
fn demo_stops_on_ctrl_c() {
    use std::io::{BufRead, BufReader};
    support::node::ensure_npm_packages();
    let root = env!("CARGO_MANIFEST_DIR");
    let (gw, fhir) = (free_port(), free_port());
    let mut child = std::process::Command::new("bash")
        .arg(format!("{root}/deploy/demo.sh"))
        .env("SMARTGATE_BIN", env!("CARGO_BIN_EXE_smartgate"))
        .env("GATEWAY_PORT", gw.to_string())
        .env("ADMIN_PORT", free_port().to_string())
        .env("FHIR_PORT", fhir.to_string())
        .env("IDP_PORT", free_port().to_string())
        .env("APP_PORT", free_port().to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    assert!(
        lines
            .by_ref()
            .map_while(Result::ok)
            .any(|l| l.contains("Ctrl-C stops everything")),
        "the demo did not come up"
    );
    for port in [gw, fhir] {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
            "{port} up"
        );
    }
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let _ = child.wait().unwrap();
    for port in [gw, fhir] {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "{port} still up"
        );
    }
}

/// Stored Bundles and Subscriptions against the real engine: a patient stores its own
/// document and reads it back, the other patient cannot read it, and nobody stores a
/// document about someone else; a Subscription stands only on the patient's own data.
#[tokio::test]
async fn documents_and_subscriptions_against_the_engine() {
    let e = env().await;
    let fhir = "application/fhir+json";
    let p1 = token(&e, "launch/patient patient/*.cruds", "p1");
    let p2 = token(&e, "launch/patient patient/*.cruds", "p2");
    let document = |p: &str| {
        json!({"resourceType": "Bundle", "type": "document", "entry": [
            {"fullUrl": "urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0",
             "resource": {"resourceType": "Composition", "status": "final",
                          "type": {"text": "summary"}, "date": "2026-11-29",
                          "title": "Summary", "author": [{"display": "x"}],
                          "subject": {"reference": format!("Patient/{p}")}}}
        ]})
    };
    let (st, _, stored) = call(&e, "POST", "/Bundle", &p1, Some((fhir, document("p1")))).await;
    assert_eq!(st, StatusCode::CREATED, "{stored}");
    let id = stored["id"].as_str().unwrap().to_owned();
    let (st, _, b) = call(&e, "GET", &format!("/Bundle/{id}"), &p1, None).await;
    assert_eq!((st, &b["id"]), (StatusCode::OK, &json!(id)));
    let (st, _, _) = call(&e, "GET", &format!("/Bundle/{id}"), &p2, None).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, _, _) = call(&e, "POST", "/Bundle", &p2, Some((fhir, document("p1")))).await;
    assert_eq!(st, StatusCode::FORBIDDEN);

    let subscription = |criteria: &str| {
        json!({"resourceType": "Subscription", "status": "requested", "reason": "x",
               "criteria": criteria, "channel": {"type": "rest-hook", "endpoint": "https://app.test/hook"}})
    };
    let everyone = subscription("Observation?code=x");
    let (st, _, _) = call(&e, "POST", "/Subscription", &p1, Some((fhir, everyone))).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let own = subscription("Observation?patient=Patient/p1&code=x");
    let (st, _, b) = call(&e, "POST", "/Subscription", &p1, Some((fhir, own))).await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    // Whose it is follows from the criteria: p1 reads it and finds it, p2 neither.
    let sub = format!("/Subscription/{}", b["id"].as_str().unwrap());
    let (st, _, _) = call(&e, "GET", &sub, &p1, None).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _, _) = call(&e, "GET", &sub, &p2, None).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let found = |tok: String| {
        let e = &e;
        async move {
            let (st, _, b) = call(e, "GET", "/Subscription", &tok, None).await;
            assert_eq!(st, StatusCode::OK, "{b}");
            let entries = b["entry"].as_array().cloned().unwrap_or_default();
            entries
                .iter()
                .map(|x| x["resource"]["id"].clone())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(found(p1.clone()).await, [b["id"].clone()]);
    assert!(found(p2.clone()).await.is_empty());
    let (st, _, _) = call(&e, "DELETE", &sub, &p2, None).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, _, _) = call(&e, "GET", &sub, &p1, None).await;
    assert_eq!(st, StatusCode::OK, "still there");
}

/// A Group lists patients: against the real engine, p1 reads the Group that names only
/// p1, and neither reads nor finds the cohort it shares with p2.
#[tokio::test]
async fn groups_against_the_engine() {
    let e = env().await;
    let fhir = "application/fhir+json";
    let admin = token(&e, "system/Group.cruds", "p1");
    let group = |members: &[&str]| {
        json!({"resourceType": "Group", "type": "person", "actual": true,
               "member": members.iter().map(|m| json!({"entity": {"reference": m}})).collect::<Vec<_>>()})
    };
    let mut ids = Vec::new();
    for members in [&["Patient/p1"][..], &["Patient/p1", "Patient/p2"][..]] {
        let (st, _, b) = call(&e, "POST", "/Group", &admin, Some((fhir, group(members)))).await;
        assert_eq!(st, StatusCode::CREATED, "{b}");
        ids.push(b["id"].as_str().unwrap().to_owned());
    }
    let p1 = token(&e, "launch/patient patient/*.rs", "p1");
    let (st, _, _) = call(&e, "GET", &format!("/Group/{}", ids[0]), &p1, None).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _, b) = call(&e, "GET", &format!("/Group/{}", ids[1]), &p1, None).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{b}");
    let (st, _, b) = call(&e, "GET", "/Group", &p1, None).await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let found: Vec<&str> = b["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x["resource"]["id"].as_str())
        .collect();
    assert_eq!(found, [ids[0].as_str()], "{b}");
}

/// Issue 22 against the real engine: a patient app's `GET Provenance/{id}` of the
/// Provenance of its own Condition is answered (the target looked up at the engine); the
/// other patient's is refused. (The engine's in-memory repository answers no
/// `_revinclude`; tests/it/provenance.rs covers revincluded Provenance.)
#[tokio::test]
async fn provenance_of_the_patients_records_against_the_engine() {
    let e = env().await;
    let tok = token(&e, "launch/patient patient/*.rs", "p1");
    let (st, _, b) = call(&e, "GET", "/Provenance/p1-cond-prov", &tok, None).await;
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_eq!(b["target"][0]["reference"], "Condition/p1-cond");
    assert_eq!(
        call(&e, "GET", "/Provenance/p2-cond-prov", &tok, None)
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    let other = token(&e, "launch/patient patient/*.rs", "p2");
    assert_eq!(
        call(&e, "GET", "/Provenance/p2-cond-prov", &other, None)
            .await
            .0,
        StatusCode::OK
    );
}
