//! `/.well-known/smart-configuration`: public, JSON whatever Accept says, CORS, validated.

mod support;

use http::{Request, StatusCode};
use support::tokens::*;
use support::*;

const SMART: &str = r#"
[smart]
authorization_endpoint = "https://as.example.org/authorize"
token_endpoint = "https://as.example.org/token"
capabilities = ["launch-standalone", "client-confidential-asymmetric", "permission-v2", "context-standalone-patient"]
scopes_supported = ["openid", "launch/patient", "patient/*.rs"]
introspection_endpoint = "https://as.example.org/introspect"
"#;

/// Served without a token (JWT mode on), as JSON even when the client asks for HTML,
/// readable cross-origin, with a preflight answer; nothing reaches the upstream.
#[tokio::test]
async fn served_publicly_with_cors() {
    let key = TestKey::ec384("k");
    let jwks = FakeJwks::start(&[&key]).await;
    let up = FakeUpstream::echo().await;
    let gw = TestGateway::boot(&config_auth(&up.base(), &jwt_auth(&jwks.uri(), ""), SMART)).await;
    let url = gw.url("/r4/.well-known/smart-configuration");

    let (status, headers, doc) = send(
        Request::get(&url)
            .header("accept", "text/html")
            .header("origin", "https://app.example.org")
            .body(smartgate::body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["access-control-allow-origin"], "*");
    let doc = json(&doc);
    assert_eq!(doc["token_endpoint"], "https://as.example.org/token");
    assert_eq!(
        doc["authorization_endpoint"],
        "https://as.example.org/authorize"
    );
    assert_eq!(
        doc["grant_types_supported"],
        serde_json::json!(["authorization_code"])
    );
    assert_eq!(
        doc["code_challenge_methods_supported"],
        serde_json::json!(["S256"])
    );
    assert_eq!(doc["capabilities"][0], "launch-standalone");
    assert_eq!(doc["scopes_supported"][2], "patient/*.rs");
    assert_eq!(
        doc["introspection_endpoint"],
        "https://as.example.org/introspect"
    );

    let (status, headers, _) = send(
        Request::options(&url)
            .header("origin", "https://app.example.org")
            .header("access-control-request-method", "GET")
            .body(smartgate::body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(headers["access-control-allow-origin"], "*");
    assert!(
        headers["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("GET")
    );

    let (status, _, _) = send(Request::post(&url).body(body("{}")).unwrap()).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(up.requests().is_empty());
    assert!(
        metrics(&gw)
            .await
            .contains("smartgate_requests_total{route=\"discovery\",status_class=\"2xx\"} 2")
    );
}

/// Without [smart] there is no document.
#[tokio::test]
async fn absent_without_smart_section() {
    let up = FakeUpstream::echo().await;
    let gw = TestGateway::boot(&config(&up.base(), "")).await;
    assert_eq!(
        get(&gw.url("/r4/.well-known/smart-configuration")).await.0,
        StatusCode::NOT_FOUND
    );
}

/// A document that breaks the specification is refused at start, naming the key.
#[test]
fn invalid_document_refused_at_start() {
    let text = config(
        "http://127.0.0.1:1/fhir",
        &SMART.replace(
            "authorization_endpoint = \"https://as.example.org/authorize\"\n",
            "",
        ),
    );
    let e = smartgate::Config::parse(&text, "t.toml", Vec::new())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("smart.authorization_endpoint") && e.contains("launch-*"),
        "{e}"
    );
    let text = config(
        "http://127.0.0.1:1/fhir",
        &format!("{SMART}code_challenge_methods_supported = [\"plain\"]\n"),
    );
    let e = smartgate::Config::parse(&text, "t.toml", Vec::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("smart.code_challenge_methods_supported"), "{e}");
}
