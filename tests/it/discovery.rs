//! `/.well-known/smart-configuration`: public, JSON whatever Accept says, CORS, validated.

use crate::support;

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

/// Why `text` is refused by the compile step start-up, reload and check-config run.
fn refused(text: &str) -> String {
    let config = smartgate::Config::parse(text, "t.toml", Vec::new()).unwrap();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async { smartgate::compile_check(&config) })
        .unwrap_err()
        .to_string()
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
    let e = refused(&text);
    assert!(
        e.contains("smart.authorization_endpoint") && e.contains("launch-*"),
        "{e}"
    );
    let text = config(
        "http://127.0.0.1:1/fhir",
        &format!("{SMART}code_challenge_methods_supported = [\"plain\"]\n"),
    );
    let e = refused(&text);
    assert!(e.contains("smart.code_challenge_methods_supported"), "{e}");
}

/// An upstream that serves a CapabilityStatement naming its own address, counting calls.
async fn fhir_server() -> FakeUpstream {
    let base = std::sync::Arc::new(std::sync::OnceLock::<String>::new());
    let b = base.clone();
    let up = FakeUpstream::start(std::sync::Arc::new(move |seen: &Seen| {
        let resp = if seen.uri.starts_with("/fhir/metadata") {
            json_response(
                StatusCode::OK,
                &serde_json::json!({
                    "resourceType": "CapabilityStatement",
                    "status": "active",
                    "kind": "instance",
                    "fhirVersion": "4.0.1",
                    "implementation": {"description": "legacy", "url": b.get().unwrap()},
                    "rest": [{"mode": "server", "resource": [{"type": "Patient"}]}]
                }),
            )
        } else {
            json_response(
                StatusCode::OK,
                &serde_json::json!({"resourceType": "Patient"}),
            )
        };
        Box::pin(std::future::ready(resp))
    }))
    .await;
    base.set(up.base()).unwrap();
    up
}

/// /metadata: no token, the SMART security section added, the upstream's address
/// rewritten, CORS, cached for a minute.
#[tokio::test]
async fn metadata_augmented() {
    let up = fhir_server().await;
    let key = TestKey::ec384("k");
    let jwks = FakeJwks::start(&[&key]).await;
    let gw = TestGateway::boot(&config_auth(&up.base(), &jwt_auth(&jwks.uri(), ""), SMART)).await;
    let (status, headers, b) = get(&gw.url("/r4/metadata")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["access-control-allow-origin"], "*");
    assert_eq!(
        headers["content-type"],
        "application/fhir+json; charset=utf-8"
    );
    let cs = json(&b);
    let sec = &cs["rest"][0]["security"];
    assert_eq!(sec["cors"], true);
    assert_eq!(sec["service"][0]["coding"][0]["code"], "SMART-on-FHIR");
    assert_eq!(
        sec["service"][0]["coding"][0]["system"],
        "http://terminology.hl7.org/CodeSystem/restful-security-service"
    );
    let uris = sec["extension"][0]["extension"].as_array().unwrap();
    assert!(uris.iter().any(|u| u["url"] == "authorize" && u["valueUri"] == "https://as.example.org/authorize"));
    assert!(
        uris.iter()
            .any(|u| u["url"] == "token" && u["valueUri"] == "https://as.example.org/token")
    );
    assert!(uris.iter().any(|u| u["url"] == "introspect"));
    assert_eq!(cs["implementation"]["url"], "http://gateway.test/r4");
    assert!(!String::from_utf8_lossy(&b).contains(&up.addr.to_string()));

    // Served from memory the second time.
    assert_eq!(get(&gw.url("/r4/metadata")).await.0, StatusCode::OK);
    assert_eq!(up.requests().len(), 1);
}

/// The upstream down, or answering with something else: 503 / 502, never a stale guess.
#[tokio::test]
async fn metadata_upstream_failures() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gw = TestGateway::boot(&config(&format!("http://127.0.0.1:{port}/fhir"), SMART)).await;
    let (status, headers, b) = get(&gw.url("/r4/metadata")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.contains_key("retry-after"));
    assert_eq!(json(&b)["resourceType"], "OperationOutcome");

    let not_cs = FakeUpstream::echo().await;
    let gw = TestGateway::boot(&config(&not_cs.base(), SMART)).await;
    assert_eq!(
        get(&gw.url("/r4/metadata")).await.0,
        StatusCode::BAD_GATEWAY
    );
}
