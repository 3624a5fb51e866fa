//! JWT mode through the real gateway: good tokens pass with their identity, every hostile
//! token is refused without reaching the upstream, and the JWKS lifecycle holds up.

use crate::support;

use std::time::Duration;

use http::{Request, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use support::tokens::*;
use support::*;

struct Setup {
    up: FakeUpstream,
    jwks: FakeJwks,
    rsa: TestKey,
    ec: TestKey,
    gw: TestGateway,
}

async fn setup(extra_auth: &str, extra: &str) -> Setup {
    let rsa = TestKey::rsa("rsa-1", Algorithm::RS256);
    let ec = TestKey::ec384("ec-1");
    let jwks = FakeJwks::start(&[&rsa, &ec]).await;
    let up = FakeUpstream::echo().await;
    let gw = TestGateway::boot(&config_auth(
        &up.base(),
        &jwt_auth(&jwks.uri(), extra_auth),
        extra,
    ))
    .await;
    Setup {
        up,
        jwks,
        rsa,
        ec,
        gw,
    }
}

fn www(headers: &http::HeaderMap) -> String {
    headers
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// RS256 and ES384 tokens from the JWKS pass; the token itself is not forwarded.
#[tokio::test]
async fn valid_tokens_pass() {
    let s = setup("", "").await;
    for key in [&s.rsa, &s.ec] {
        let (status, _, body) =
            get_with_token(&s.gw.url("/r4/Patient/123"), &key.sign(&claims())).await;
        assert_eq!(status, StatusCode::OK, "{:?} {body:?}", key.alg);
    }
    let seen = s.up.requests();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter()
            .all(|r| !r.headers.contains_key("authorization"))
    );
    let m = metrics(&s.gw).await;
    assert!(
        m.contains("smartgate_token_validations_total{mode=\"jwt\",result=\"valid\"} 2"),
        "{m}"
    );
    assert_eq!(
        get(&format!("http://{}/readyz", s.gw.admin)).await.0,
        StatusCode::OK
    );
}

/// A missing token is a bare challenge; nothing is forwarded.
#[tokio::test]
async fn missing_token_is_401_challenge() {
    let s = setup("", "").await;
    let (status, headers, body) = get(&s.gw.url("/r4/Patient")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(www(&headers), "Bearer realm=\"smartgate\"");
    assert_eq!(json(&body)["resourceType"], "OperationOutcome");
    assert!(s.up.requests().is_empty());
}

/// The hostile-token suite: every one is refused with 401 invalid_token (or 400 for a
/// malformed request), and none reaches the upstream.
#[tokio::test]
async fn hostile_tokens_refused() {
    let s = setup("", "").await;
    let good = s.rsa.sign(&claims());
    let parts: Vec<&str> = good.split('.').collect();
    let foreign = TestKey::rsa("rsa-1", Algorithm::RS256); // same kid, other key

    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = claims();
        f(&mut c);
        s.rsa.sign(&c)
    };
    let hs256_with_public_key = {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("rsa-1".into());
        let public_pem = {
            let out = std::process::Command::new("openssl")
                .args(["pkey", "-pubout"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    use std::io::Write;
                    c.stdin.take().unwrap().write_all(s.rsa.pem.as_bytes())?;
                    c.wait_with_output()
                })
                .unwrap();
            out.stdout
        };
        jsonwebtoken::encode(
            &h,
            &claims(),
            &EncodingKey::from_secret(&public_pem).unwrap(),
        )
        .unwrap()
    };
    let alg_none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims().to_string().as_bytes())
    );
    let tampered = {
        let mut c = claims();
        c["patient"] = json!("Patient/456");
        format!(
            "{}.{}.{}",
            parts[0],
            b64(c.to_string().as_bytes()),
            parts[2]
        )
    };
    let not_object = {
        let header = b64(br#"{"alg":"RS256","kid":"rsa-1"}"#);
        let payload = b64(b"[1,2,3]");
        let msg = format!("{header}.{payload}");
        let sig =
            jsonwebtoken::crypto::sign(msg.as_bytes(), &s.rsa.encoding, Algorithm::RS256).unwrap();
        format!("{msg}.{sig}")
    };
    // Signed as written: header and payload JSON exactly as given.
    let raw = |header: &str, payload: &str| {
        let msg = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
        let sig =
            jsonwebtoken::crypto::sign(msg.as_bytes(), &s.rsa.encoding, Algorithm::RS256).unwrap();
        format!("{msg}.{sig}")
    };
    let good_claims = claims().to_string();
    let rs256 = r#"{"alg":"RS256","kid":"rsa-1"}"#;
    // Read first-wins, it names our issuer's patient 123; read last-wins, patient 456.
    let duplicate_claim = raw(
        rs256,
        &good_claims.replacen('{', r#"{"patient":"Patient/456","#, 1),
    );
    let duplicate_header = raw(
        r#"{"alg":"none","alg":"RS256","kid":"rsa-1"}"#,
        &good_claims,
    );
    let crit_header = raw(
        r#"{"alg":"RS256","kid":"rsa-1","crit":["b64"],"b64":false}"#,
        &good_claims,
    );
    let kid_injection = s.rsa.with_kid("../../../../etc/passwd").sign(&claims());
    let id_token_typ = {
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some("rsa-1".into());
        h.typ = Some("logout+jwt".into());
        jsonwebtoken::encode(&h, &claims(), &s.rsa.encoding).unwrap()
    };

    let cases: Vec<(&str, String, &str)> = vec![
        ("alg none", alg_none, "algorithm"),
        (
            "HS256 with the RSA public key as secret",
            hs256_with_public_key,
            "algorithm",
        ),
        (
            "tampered payload, original signature",
            tampered,
            "signature",
        ),
        (
            "foreign key with a known kid",
            foreign.sign(&claims()),
            "signature",
        ),
        (
            "unknown kid",
            s.rsa.with_kid("nope").sign(&claims()),
            "signature",
        ),
        ("kid path injection", kid_injection, "signature"),
        (
            "expired",
            with(&|c| c["exp"] = json!(now() - 3600)),
            "expired",
        ),
        (
            "nbf in the future",
            with(&|c| c["nbf"] = json!(now() + 3600)),
            "not yet valid",
        ),
        (
            "iat in the future",
            with(&|c| c["iat"] = json!(now() + 3600)),
            "not yet valid",
        ),
        (
            "wrong iss",
            with(&|c| c["iss"] = json!("https://evil.test")),
            "issuer",
        ),
        (
            "wrong aud",
            with(&|c| c["aud"] = json!("https://other.test")),
            "audience",
        ),
        (
            "aud array without ours",
            with(&|c| c["aud"] = json!(["a", "b"])),
            "audience",
        ),
        (
            "missing exp",
            with(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            }),
            "malformed",
        ),
        (
            "missing aud",
            with(&|c| {
                c.as_object_mut().unwrap().remove("aud");
            }),
            "malformed",
        ),
        ("200 KB token", "a".repeat(200 * 1024), "malformed"),
        ("non-base64", "!!!.@@@.###".to_owned(), "malformed"),
        (
            "two segments",
            format!("{}.{}", parts[0], parts[1]),
            "malformed",
        ),
        (
            "JSON payload that is not an object",
            not_object,
            "malformed",
        ),
        ("typ of another token kind", id_token_typ, "token type"),
        ("a claim named twice", duplicate_claim, "malformed"),
        ("a header member named twice", duplicate_header, "malformed"),
        ("a crit extension", crit_header, "malformed"),
        (
            "exp as a string",
            with(&|c| c["exp"] = json!((now() + 300).to_string())),
            "malformed",
        ),
        (
            "missing iss",
            with(&|c| {
                c.as_object_mut().unwrap().remove("iss");
            }),
            "malformed",
        ),
        (
            "DPoP-bound (cnf), presented as a bearer token",
            with(&|c| c["cnf"] = json!({"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"})),
            "bound to a key (cnf), which is not checked here",
        ),
    ];
    for (name, token, description) in &cases {
        let (status, headers, body) = get_with_token(&s.gw.url("/r4/Patient/123"), token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{name}: {body:?}");
        let challenge = www(&headers);
        assert!(
            challenge.contains("error=\"invalid_token\""),
            "{name}: {challenge}"
        );
        assert!(
            challenge.contains(&format!("error_description=\"{description}\"")),
            "{name}: {challenge}"
        );
        assert_eq!(json(&body)["resourceType"], "OperationOutcome", "{name}");
    }

    // Malformed requests: 400 invalid_request.
    let dup = Request::get(s.gw.url("/r4/Patient"))
        .header("authorization", format!("Bearer {good}"))
        .header("authorization", format!("Bearer {good}"))
        .body(smartgate::body::empty())
        .unwrap();
    let query = Request::get(s.gw.url(&format!("/r4/Patient?access_token={good}")))
        .body(smartgate::body::empty())
        .unwrap();
    let form = Request::post(s.gw.url("/r4/Patient/_search"))
        .header("authorization", format!("Bearer {good}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body(format!("name=x&access_token={good}")))
        .unwrap();
    let basic = Request::get(s.gw.url("/r4/Patient"))
        .header("authorization", "Basic dXNlcjpwYXNz")
        .body(smartgate::body::empty())
        .unwrap();
    for (name, req) in [
        ("duplicate Authorization", dup),
        ("query token", query),
        ("form token", form),
        ("Basic", basic),
    ] {
        let (status, headers, _) = send(req).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name}");
        assert!(
            www(&headers).contains("error=\"invalid_request\""),
            "{name}"
        );
    }

    assert!(
        s.up.requests().is_empty(),
        "a refused request reached the upstream"
    );
}

/// A form POST with a good token passes whole (the body was read to look for tokens).
#[tokio::test]
async fn form_search_with_header_token_passes() {
    let s = setup("", "").await;
    let req = Request::post(s.gw.url("/r4/Patient/_search"))
        .header("authorization", format!("Bearer {}", s.rsa.sign(&claims())))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body("name=Chalmers&_count=5"))
        .unwrap();
    let (status, _, _) = send(req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s.up.requests()[0].body, "name=Chalmers&_count=5");
}

/// A storm of forged kids causes at most one JWKS refetch per interval.
#[tokio::test]
async fn unknown_kid_storm_is_rate_limited() {
    let s = setup("", "").await;
    // Warm up: keys loaded by the start-up fetch.
    assert_eq!(
        get_with_token(&s.gw.url("/r4/Observation"), &s.rsa.sign(&claims()))
            .await
            .0,
        StatusCode::OK
    );
    let before = s.jwks.fetches();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let token = s.rsa.with_kid(&format!("forged-{i}")).sign(&claims());
        let url = s.gw.url("/r4/Patient");
        tasks.push(tokio::spawn(
            async move { get_with_token(&url, &token).await.0 },
        ));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::UNAUTHORIZED);
    }
    let refetches = s.jwks.fetches() - before;
    assert!(refetches <= 1, "{refetches} JWKS refetches for a kid storm");
}

/// Key rotation: a token signed by a new key is accepted after one refetch.
#[tokio::test]
async fn key_rotation_picks_up_new_kid() {
    let s = setup("", "").await;
    assert_eq!(
        get_with_token(&s.gw.url("/r4/Observation"), &s.rsa.sign(&claims()))
            .await
            .0,
        StatusCode::OK
    );
    let rotated = TestKey::ec256("ec-2");
    s.jwks.set_keys(&[&s.rsa, &rotated]);
    let before = s.jwks.fetches();
    let (status, _, _) =
        get_with_token(&s.gw.url("/r4/Observation"), &rotated.sign(&claims())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s.jwks.fetches() - before, 1);
}

/// The JWKS endpoint going down after warm-up does not stop validation.
#[tokio::test]
async fn jwks_down_after_warmup_still_validates() {
    let s = setup("", "").await;
    assert_eq!(
        get_with_token(&s.gw.url("/r4/Observation"), &s.rsa.sign(&claims()))
            .await
            .0,
        StatusCode::OK
    );
    s.jwks.set_down(true);
    // A new token (not cached) still verifies with the last good keys.
    let (status, _, _) = get_with_token(&s.gw.url("/r4/Condition"), &s.ec.sign(&claims())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        get(&format!("http://{}/readyz", s.gw.admin)).await.0,
        StatusCode::OK
    );
}

/// With no keys ever loaded, tokens cannot be judged: 503 with Retry-After, not 401, and
/// not ready.
#[tokio::test]
async fn no_keys_is_503_not_401() {
    let rsa = TestKey::rsa("rsa-1", Algorithm::RS256);
    let jwks = FakeJwks::start(&[&rsa]).await;
    jwks.set_down(true);
    let up = FakeUpstream::echo().await;
    let gw = TestGateway::boot(&config_auth(&up.base(), &jwt_auth(&jwks.uri(), ""), "")).await;
    let (status, headers, _) =
        get_with_token(&gw.url("/r4/Observation"), &rsa.sign(&claims())).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.contains_key("retry-after"));
    assert!(up.requests().is_empty());
    assert_eq!(
        get(&format!("http://{}/readyz", gw.admin)).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

/// The JWKS is found through the issuer's OpenID discovery document when no jwks_uri is
/// configured.
#[tokio::test]
async fn jwks_discovered_from_issuer() {
    let rsa = TestKey::rsa("rsa-1", Algorithm::RS256);
    let jwks = FakeJwks::start(&[&rsa]).await;
    let up = FakeUpstream::echo().await;
    let issuer = format!("http://{}", jwks.server.addr);
    let auth = format!(
        "[auth]\nmode = \"jwt\"\n[auth.jwt]\nissuer = \"{issuer}\"\naudience = \"{AUDIENCE}\"\n"
    );
    let gw = TestGateway::boot(&config_auth(&up.base(), &auth, "")).await;
    let mut c = claims();
    c["iss"] = json!(issuer);
    assert_eq!(
        get_with_token(&gw.url("/r4/Observation"), &rsa.sign(&c))
            .await
            .0,
        StatusCode::OK
    );
}

/// Keys given inline validate with no network at all.
#[tokio::test]
async fn inline_keys() {
    let ec = TestKey::ec384("inline-1");
    let up = FakeUpstream::echo().await;
    let doc = jwks(&[&ec]).to_string().replace('"', "\\\"");
    let auth = format!(
        "[auth]\nmode = \"jwt\"\n[auth.jwt]\nissuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"\njwks = \"{doc}\"\nalgorithms = [\"ES384\"]\n"
    );
    let gw = TestGateway::boot(&config_auth(&up.base(), &auth, "")).await;
    assert_eq!(
        get_with_token(&gw.url("/r4/Observation"), &ec.sign(&claims()))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        get(&format!("http://{}/readyz", gw.admin)).await.0,
        StatusCode::OK
    );
}

/// Cached verdicts: the second use of a token is a cache hit; refusals are cached too.
#[tokio::test]
async fn verdicts_are_cached() {
    let s = setup("", "").await;
    let token = s.rsa.sign(&claims());
    for _ in 0..3 {
        assert_eq!(
            get_with_token(&s.gw.url("/r4/Observation"), &token).await.0,
            StatusCode::OK
        );
    }
    let bad = s.rsa.sign(&{
        let mut c = claims();
        c["aud"] = json!("x");
        c
    });
    for _ in 0..2 {
        assert_eq!(
            get_with_token(&s.gw.url("/r4/Observation"), &bad).await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    let m = metrics(&s.gw).await;
    assert!(
        m.contains("smartgate_token_cache_total{event=\"hit\"} 3"),
        "{m}"
    );
    assert!(
        m.contains("smartgate_token_cache_total{event=\"miss\"} 2"),
        "{m}"
    );
}

/// Identity headers: client-supplied copies are always stripped; when enabled the
/// gateway sets them from the token.
#[tokio::test]
async fn identity_headers() {
    let s = setup("", "").await;
    let req = Request::get(s.gw.url("/r4/Observation"))
        .header("authorization", format!("Bearer {}", s.rsa.sign(&claims())))
        .header("x-smart-patient", "456")
        .header("x-smart-scopes", "system/*.cruds")
        .body(smartgate::body::empty())
        .unwrap();
    send(req).await;
    let seen = &s.up.requests()[0].headers;
    assert!(!seen.contains_key("x-smart-patient"));
    assert!(!seen.contains_key("x-smart-scopes"));

    let s = setup("[auth.identity_headers]\nenabled = true\n", "").await;
    let req = Request::get(s.gw.url("/r4/Observation"))
        .header("authorization", format!("Bearer {}", s.rsa.sign(&claims())))
        .header("x-smart-patient", "456")
        .body(smartgate::body::empty())
        .unwrap();
    send(req).await;
    let seen = &s.up.requests()[0].headers;
    assert_eq!(seen["x-smart-patient"], "123");
    assert_eq!(seen["x-smart-client-id"], "app-1");
    assert_eq!(seen["x-smart-subject"], "user-1");
    assert_eq!(seen["x-smart-scopes"], "launch/patient user/*.cruds openid");
}

/// An expired token is refused even while its verdict would still be cached.
#[tokio::test]
async fn cache_never_outlives_exp() {
    let s = setup("leeway = \"0s\"", "").await;
    let mut c = claims();
    c["exp"] = json!(now() + 2);
    let token = s.rsa.sign(&c);
    assert_eq!(
        get_with_token(&s.gw.url("/r4/Observation"), &token).await.0,
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert_eq!(
        get_with_token(&s.gw.url("/r4/Observation"), &token).await.0,
        StatusCode::UNAUTHORIZED
    );
}

/// Regression: a request that arrives while the start-up JWKS fetch is still running waits
/// for it, and must not spend the unknown-kid refetch allowance — a key rotation right
/// after must still be picked up.
#[tokio::test]
async fn waiting_for_startup_fetch_does_not_block_rotation() {
    let rsa = TestKey::rsa("rsa-1", Algorithm::RS256);
    let jwks = FakeJwks::start(&[&rsa]).await;
    jwks.delay_ms
        .store(500, std::sync::atomic::Ordering::SeqCst);
    let up = FakeUpstream::echo().await;
    let gw = TestGateway::boot(&config_auth(&up.base(), &jwt_auth(&jwks.uri(), ""), "")).await;
    // Sent while the start-up fetch is in flight.
    let (status, _, _) = get_with_token(&gw.url("/r4/Observation"), &rsa.sign(&claims())).await;
    assert_eq!(status, StatusCode::OK);
    jwks.delay_ms.store(0, std::sync::atomic::Ordering::SeqCst);
    let rotated = TestKey::ec384("ec-9");
    jwks.set_keys(&[&rsa, &rotated]);
    let (status, _, _) = get_with_token(&gw.url("/r4/Observation"), &rotated.sign(&claims())).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "rotation refused: the allowance was spent by waiting"
    );
}

/// An answer the upstream calls public leaves a request made with a token as private: a
/// shared cache in front of the gateway would otherwise keep it and serve it to anyone
/// asking for the URL, past every check. Without tokens (`auth.mode = "none"`) the
/// gateway is a plain proxy and leaves the header as it is.
#[tokio::test]
async fn answers_to_tokens_are_kept_out_of_shared_caches() {
    let rsa = TestKey::rsa("rsa-1", Algorithm::RS256);
    let jwks = FakeJwks::start(&[&rsa]).await;
    let up = FakeUpstream::start(std::sync::Arc::new(|_: &Seen| {
        let mut resp = json_response(
            StatusCode::OK,
            &json!({"resourceType": "Patient", "id": "123"}),
        );
        resp.headers_mut().insert(
            "cache-control",
            http::HeaderValue::from_static("public, max-age=60"),
        );
        Box::pin(std::future::ready(resp))
    }))
    .await;
    let gw = TestGateway::boot(&config_auth(&up.base(), &jwt_auth(&jwks.uri(), ""), "")).await;
    let (status, headers, _) =
        get_with_token(&gw.url("/r4/Patient/123"), &rsa.sign(&claims())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["cache-control"], "max-age=60, private");

    let open = TestGateway::boot(&config(&up.base(), "")).await;
    let (status, headers, _) = get(&open.url("/r4/Patient/123")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["cache-control"], "public, max-age=60");
}
