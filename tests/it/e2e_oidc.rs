//! End to end against a real OAuth 2 / OIDC server: npm `oidc-provider`, configured by
//! tests/e2e/oidc-provider.mjs for SMART Backend Services (client_credentials with a
//! private_key_jwt assertion, resource indicators, JWT and opaque access tokens,
//! introspection). Real tokens go through the real gateway in both modes.

use crate::support;

use http::{Request, StatusCode};
use jsonwebtoken::{Algorithm, Header};
use serde_json::{Value, json};
use support::node::NodeServer;
use support::tokens::*;
use support::*;

const RESOURCE_JWT: &str = "http://gateway.test/r4";
const RESOURCE_OPAQUE: &str = "http://gateway.test/r4-opaque";
const GATEWAY_SECRET: &str = "e2e-gateway-secret";

/// Gets an access token by client_credentials, authenticating with a signed assertion.
async fn token(issuer: &str, client: &TestKey, resource: &str, scope: &str) -> Value {
    let token_endpoint = format!("{issuer}/token");
    let mut header = Header::new(Algorithm::ES384);
    header.kid = Some(client.kid.clone());
    let assertion = jsonwebtoken::encode(
        &header,
        &json!({
            "iss": "backend-app", "sub": "backend-app", "aud": token_endpoint,
            "jti": uuid::Uuid::new_v4().to_string(), "iat": now(), "exp": now() + 60,
        }),
        &client.encoding,
    )
    .unwrap();
    let form = form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", "client_credentials")
        .append_pair("scope", scope)
        .append_pair("resource", resource)
        .append_pair(
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        )
        .append_pair("client_assertion", &assertion)
        .finish();
    let req = Request::post(&token_endpoint)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body(form))
        .unwrap();
    let (status, _, b) = send(req).await;
    assert_eq!(status, StatusCode::OK, "token endpoint: {b:?}");
    json(&b)
}

#[tokio::test]
async fn real_tokens_through_the_gateway_in_both_modes() {
    let client = TestKey::ec384("backend-key-1");
    let provider = NodeServer::start(
        "oidc-provider.mjs",
        &[],
        &[
            ("CLIENT_JWKS", jwks(&[&client]).to_string()),
            ("GATEWAY_SECRET", GATEWAY_SECRET.to_owned()),
            ("RESOURCE_JWT", RESOURCE_JWT.to_owned()),
            ("RESOURCE_OPAQUE", RESOURCE_OPAQUE.to_owned()),
        ],
    );
    let issuer = provider.address.clone();
    let up = FakeUpstream::echo().await;

    // --- JWT mode: keys found through the issuer's discovery document.
    let jwt = token(&issuer, &client, RESOURCE_JWT, "system/*.rs patient/*.rs").await;
    let access = jwt["access_token"].as_str().unwrap();
    assert_eq!(
        access.split('.').count(),
        3,
        "expected a JWT access token: {jwt}"
    );
    let auth = format!(
        "[auth]\nmode = \"jwt\"\n[auth.jwt]\nissuer = \"{issuer}\"\naudience = \"{RESOURCE_JWT}\"\nalgorithms = [\"ES256\", \"RS256\"]\n[auth.identity_headers]\nenabled = true\n"
    );
    let gw = TestGateway::boot(&config_auth(&up.base(), &auth, "")).await;
    let (status, _, b) = get_with_token(&gw.url("/r4/Patient/123"), access).await;
    assert_eq!(status, StatusCode::OK, "{b:?}");
    let seen = up.requests().pop().unwrap();
    assert_eq!(seen.headers["x-smart-client-id"], "backend-app");
    assert_eq!(seen.headers["x-smart-patient"], "123");
    assert_eq!(seen.headers["x-smart-scopes"], "system/*.rs patient/*.rs");
    // A tampered copy of the real token is refused.
    let mut parts: Vec<String> = access.split('.').map(str::to_owned).collect();
    parts[2] = parts[2].chars().rev().collect();
    let (status, _, _) = get_with_token(&gw.url("/r4/Patient/123"), &parts.join(".")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // --- Introspection mode with the opaque token, the gateway authenticating with
    // client_secret_basic.
    let opaque = token(&issuer, &client, RESOURCE_OPAQUE, "system/*.rs").await;
    let opaque = opaque["access_token"].as_str().unwrap();
    assert_eq!(opaque.split('.').count(), 1, "expected an opaque token");
    let auth = format!(
        "[auth]\nmode = \"introspection\"\n[auth.introspection]\nendpoint = \"{issuer}/token/introspection\"\nclient_id = \"smartgate\"\nclient_secret = \"{GATEWAY_SECRET}\"\naudience = \"{RESOURCE_OPAQUE}\"\n[auth.identity_headers]\nenabled = true\n"
    );
    let gw2 = TestGateway::boot(&config_auth(&up.base(), &auth, "")).await;
    let (status, _, b) = get_with_token(&gw2.url("/r4/Observation"), opaque).await;
    assert_eq!(status, StatusCode::OK, "{b:?}");
    let seen = up.requests().pop().unwrap();
    assert_eq!(seen.headers["x-smart-client-id"], "backend-app");
    assert_eq!(seen.headers["x-smart-scopes"], "system/*.rs");

    // Tokens the server does not know are inactive; the opaque token means nothing in
    // JWT mode.
    let (status, headers, _) =
        get_with_token(&gw2.url("/r4/Observation"), "not-a-real-token").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("inactive")
    );
    assert_eq!(
        get_with_token(&gw.url("/r4/Patient"), opaque).await.0,
        StatusCode::UNAUTHORIZED
    );
}
