//! Introspection mode through the real gateway against a fake RFC 7662 server that checks
//! the gateway's client authentication and counts calls.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http::StatusCode;
use jsonwebtoken::{DecodingKey, Validation};
use serde_json::json;
use support::tokens::*;
use support::*;

/// Answers by token value: `good…` active for patient 123; `inactive`; `foreign-aud`;
/// `expired`; `boom` → 500; `slow` → answers after 3 s.
async fn fake_introspection() -> FakeUpstream {
    FakeUpstream::start(Arc::new(|seen: &Seen| {
        let form: std::collections::HashMap<String, String> =
            form_urlencoded::parse(&seen.body).into_owned().collect();
        let token = form.get("token").cloned().unwrap_or_default();
        Box::pin(async move {
            let (status, body) = match token.as_str() {
                t if t.starts_with("good") => (
                    StatusCode::OK,
                    json!({"active": true, "scope": "user/*.rs launch/patient", "client_id": "app-9",
                           "sub": "u9", "patient": "123", "exp": now() + 300, "aud": AUDIENCE}),
                ),
                "inactive" => (StatusCode::OK, json!({"active": false})),
                "foreign-aud" => (
                    StatusCode::OK,
                    json!({"active": true, "aud": "https://other.test", "exp": now() + 300}),
                ),
                "expired" => (StatusCode::OK, json!({"active": true, "exp": now() - 10})),
                "bound" => (
                    StatusCode::OK,
                    json!({"active": true, "scope": "user/*.rs", "exp": now() + 300,
                           "cnf": {"x5t#S256": "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"}}),
                ),
                "boom" => (StatusCode::INTERNAL_SERVER_ERROR, json!({})),
                "slow" => {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    (StatusCode::OK, json!({"active": true}))
                }
                _ => (StatusCode::OK, json!({"active": false})),
            };
            json_response(status, &body)
        })
    }))
    .await
}

fn auth_section(endpoint: &str, client_auth: &str) -> String {
    format!(
        "[auth]\nmode = \"introspection\"\n[auth.introspection]\nendpoint = \"{endpoint}\"\ntimeout = \"500ms\"\n{client_auth}\n[auth.identity_headers]\nenabled = true\n"
    )
}

async fn boot(introspect: &FakeUpstream, client_auth: &str) -> (FakeUpstream, TestGateway) {
    let up = FakeUpstream::echo().await;
    let endpoint = format!("http://{}/introspect", introspect.addr);
    let gw = TestGateway::boot(&config_auth(
        &up.base(),
        &auth_section(&endpoint, client_auth),
        "",
    ))
    .await;
    (up, gw)
}

/// An active token passes with its context; the call authenticates with
/// client_secret_basic and posts token + token_type_hint.
#[tokio::test]
async fn active_token_passes_with_basic_auth() {
    let is = fake_introspection().await;
    let (up, gw) = boot(
        &is,
        "client_id = \"smart gate\"\nclient_secret = \"s3cr:t\"",
    )
    .await;
    let (status, _, _) = get_with_token(&gw.url("/r4/Patient/123"), "good-1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(up.requests()[0].headers["x-smart-patient"], "123");
    assert_eq!(up.requests()[0].headers["x-smart-client-id"], "app-9");

    let call = &is.requests()[0];
    assert_eq!(call.method, http::Method::POST);
    let basic = call.headers["authorization"].to_str().unwrap();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(basic.strip_prefix("Basic ").unwrap())
        .unwrap();
    // RFC 6749 §2.3.1: id and secret are form-encoded before base64.
    assert_eq!(decoded, b"smart+gate:s3cr%3At");
    let form: Vec<(String, String)> = form_urlencoded::parse(&call.body).into_owned().collect();
    assert!(form.contains(&("token".into(), "good-1".into())));
    assert!(form.contains(&("token_type_hint".into(), "access_token".into())));
}

/// Inactive, foreign-audience, expired and sender-constrained tokens are 401; nothing
/// is forwarded.
#[tokio::test]
async fn refused_tokens() {
    let is = fake_introspection().await;
    let (up, gw) = boot(&is, "bearer_token = \"gw-token\"").await;
    for (token, description) in [
        ("inactive", "inactive"),
        ("foreign-aud", "audience"),
        ("expired", "expired"),
        ("bound", "bound to a key (cnf), which is not checked here"),
        ("unknown", "inactive"),
    ] {
        let (status, headers, _) = get_with_token(&gw.url("/r4/Patient"), token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{token}");
        let www = headers["www-authenticate"].to_str().unwrap();
        assert!(
            www.contains(&format!("error_description=\"{description}\"")),
            "{token}: {www}"
        );
    }
    assert!(up.requests().is_empty());
    // Bearer client authentication was used.
    assert_eq!(is.requests()[0].headers["authorization"], "Bearer gw-token");
}

/// Introspection failures are 503 with Retry-After — never 401, never forwarded.
#[tokio::test]
async fn introspection_unavailable_is_503() {
    let is = fake_introspection().await;
    let (up, gw) = boot(&is, "bearer_token = \"gw-token\"").await;
    for token in ["boom", "slow"] {
        let (status, headers, body) = get_with_token(&gw.url("/r4/Patient"), token).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{token}");
        assert!(headers.contains_key("retry-after"), "{token}");
        assert!(!headers.contains_key("www-authenticate"), "{token}");
        assert_eq!(json(&body)["resourceType"], "OperationOutcome");
    }
    // Endpoint gone entirely.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let up2 = FakeUpstream::echo().await;
    let gw2 = TestGateway::boot(&config_auth(
        &up2.base(),
        &auth_section(
            &format!("http://127.0.0.1:{port}/introspect"),
            "bearer_token = \"x\"",
        ),
        "",
    ))
    .await;
    assert_eq!(
        get_with_token(&gw2.url("/r4/Patient"), "good-2").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(up.requests().is_empty() && up2.requests().is_empty());
    // A transient failure is not cached: the same token works once the server answers.
    assert!(metrics(&gw).await.contains(
        "smartgate_token_validations_total{mode=\"introspection\",result=\"unavailable\"} 2"
    ));
}

/// 100 concurrent requests with one new token cause exactly one introspection call.
#[tokio::test]
async fn concurrent_lookups_coalesce() {
    let is = fake_introspection().await;
    let (up, gw) = boot(&is, "bearer_token = \"gw-token\"").await;
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let url = gw.url("/r4/Patient");
        tasks.push(tokio::spawn(async move {
            get_with_token(&url, "good-burst").await.0
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(is.requests().len(), 1);
    assert_eq!(up.requests().len(), 100);
}

/// private_key_jwt: a fresh RFC 7523 assertion (iss = sub = client_id, aud = endpoint,
/// short exp, jti) signed with the configured key.
#[tokio::test]
async fn private_key_jwt_assertion() {
    let is = fake_introspection().await;
    let key = TestKey::ec384("gw-key");
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("gw.pem");
    std::fs::write(&key_path, &key.pem).unwrap();
    let (_up, gw) = boot(
        &is,
        &format!(
            "client_id = \"smartgate\"\nprivate_key = \"{}\"\nprivate_key_alg = \"ES384\"",
            key_path.display()
        ),
    )
    .await;
    assert_eq!(
        get_with_token(&gw.url("/r4/Patient"), "good-3").await.0,
        StatusCode::OK
    );
    assert_eq!(
        get_with_token(&gw.url("/r4/Patient"), "good-4").await.0,
        StatusCode::OK
    );

    let endpoint = format!("http://{}/introspect", is.addr);
    let mut jtis = Vec::new();
    for call in is.requests() {
        let form: std::collections::HashMap<String, String> =
            form_urlencoded::parse(&call.body).into_owned().collect();
        assert_eq!(
            form["client_assertion_type"],
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        );
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(key.jwk.clone()).unwrap();
        let mut v = Validation::new(jsonwebtoken::Algorithm::ES384);
        v.set_audience(&[&endpoint]);
        v.set_issuer(&["smartgate"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(
            &form["client_assertion"],
            &DecodingKey::from_jwk(&jwk).unwrap(),
            &v,
        )
        .unwrap();
        let c = data.claims;
        assert_eq!(c["sub"], "smartgate");
        assert!(c["exp"].as_u64().unwrap() <= now() + 300);
        jtis.push(c["jti"].as_str().unwrap().to_owned());
    }
    assert_eq!(jtis.len(), 2);
    assert_ne!(jtis[0], jtis[1], "jti must be fresh per assertion");
}
