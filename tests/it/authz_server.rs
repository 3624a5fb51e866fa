//! The embedded Backend Services authorization server through the real gateway: tokens
//! for asymmetric (RS384, ES384) and symmetric clients, every refusal the SMART and
//! OAuth specifications call for, introspection, JWKS, discovery, rate limiting, and
//! in-process validation of its tokens beside an external issuer's.

use crate::support;

use http::{Request, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use support::tokens::*;
use support::*;

const TOKEN_URL: &str = "http://gateway.test/r4/auth/token";
const SECRET: &str = "s3cret-for-tests";

struct Env {
    gw: TestGateway,
    up: FakeUpstream,
    rsa: TestKey,
    ec: TestKey,
    _dir: tempfile::TempDir,
    _jwks: Option<FakeJwks>,
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn env(auth: &str, rate_limit: u32, jwks: Option<FakeJwks>) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let (pem, _) = smartgate::keygen::generate("ES384").unwrap();
    let key_path = dir.path().join("gateway.pem");
    std::fs::write(&key_path, pem).unwrap();
    let rsa = TestKey::rsa("rsa-1", Algorithm::RS384);
    let ec = TestKey::ec384("ec-1");
    let client_jwks = jwks_of(&[&rsa, &ec]);
    let up = FakeUpstream::echo().await;
    let extra = format!(
        r#"
[authorization_server]
enabled = true
signing_key = "{}"
rate_limit = {rate_limit}
introspection_scope = "introspect"

[[authorization_server.clients]]
client_id = "app"
jwks = '{client_jwks}'
scope = "system/Patient.rs system/Observation.rs introspect"
jku_allow = ["https://allowed.example/jwks"]

[[authorization_server.clients]]
client_id = "sym"
client_secret_hash = "sha256:{}"
scope = "system/Patient.r"
"#,
        key_path.display(),
        sha256_hex(SECRET)
    );
    let gw = TestGateway::boot(&config_auth(&up.base(), auth, &extra)).await;
    Env {
        gw,
        up,
        rsa,
        ec,
        _dir: dir,
        _jwks: jwks,
    }
}

fn jwks_of(keys: &[&TestKey]) -> String {
    jwks(keys).to_string()
}

fn assertion(key: &TestKey, claims: Value, tweak: impl FnOnce(&mut Header)) -> String {
    let mut header = Header::new(key.alg);
    header.kid = Some(key.kid.clone());
    tweak(&mut header);
    jsonwebtoken::encode(&header, &claims, &key.encoding).unwrap()
}

fn good_claims() -> Value {
    json!({
        "iss": "app", "sub": "app", "aud": TOKEN_URL,
        "jti": uuid::Uuid::new_v4().to_string(), "iat": now(), "exp": now() + 240,
    })
}

fn form(pairs: &[(&str, &str)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

async fn post(
    e: &Env,
    path: &str,
    body_text: String,
    headers: &[(&str, &str)],
) -> (StatusCode, http::HeaderMap, Value) {
    let mut req =
        Request::post(e.gw.url(path)).header("content-type", "application/x-www-form-urlencoded");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let (st, h, b) = send(req.body(body(body_text)).unwrap()).await;
    (st, h, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

async fn token_request(
    e: &Env,
    assertion: &str,
    scope: &str,
) -> (StatusCode, http::HeaderMap, Value) {
    post(
        e,
        "/r4/auth/token",
        form(&[
            ("grant_type", "client_credentials"),
            ("scope", scope),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion),
        ]),
        &[],
    )
    .await
}

/// `POST /auth/introspect` of `token` by client `app`, authenticated by an assertion.
async fn introspect_as_app(e: &Env, token: &str) -> (StatusCode, http::HeaderMap, Value) {
    let a = assertion(&e.ec, good_claims(), |_| {});
    post(
        e,
        "/r4/auth/introspect",
        form(&[
            ("token", token),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", &a),
        ]),
        &[],
    )
    .await
}

fn basic(id: &str, secret: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
    )
}

#[tokio::test]
async fn backend_clients_get_tokens_and_use_them() {
    let e = env("[auth]\nmode = \"embedded\"\n", 100, None).await;
    for key in [&e.rsa, &e.ec] {
        let (st, h, b) = token_request(
            &e,
            &assertion(key, good_claims(), |_| {}),
            "system/Patient.rs system/Encounter.rs",
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{b}");
        assert_eq!(h["cache-control"], "no-store");
        assert_eq!(h["pragma"], "no-cache");
        assert_eq!(b["token_type"], "bearer");
        assert_eq!(b["scope"], "system/Patient.rs", "requested ∩ registered");
        assert!(b["expires_in"].as_u64().unwrap() <= 300);
        let token = b["access_token"].as_str().unwrap();
        // The token's claims.
        let claims: Value = {
            use base64::Engine;
            let p = token.split('.').nth(1).unwrap();
            serde_json::from_slice(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(p)
                    .unwrap(),
            )
            .unwrap()
        };
        assert_eq!(claims["iss"], "http://gateway.test/r4");
        assert_eq!(claims["aud"], "http://gateway.test/r4");
        assert_eq!(
            (claims["sub"].as_str(), claims["client_id"].as_str()),
            (Some("app"), Some("app"))
        );
        assert!(claims["jti"].is_string() && claims["iat"].is_u64());
        // Used at the FHIR endpoint: validated in-process, decided by its scopes.
        let before = e.up.requests().len();
        let (st, _, _) = get_with_token(&e.gw.url("/r4/Patient/1"), token).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(e.up.requests().len(), before + 1);
        let (st, _, _) = get_with_token(&e.gw.url("/r4/Observation/1"), token).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "not granted");
        // Introspection by a client registered with the introspection scope: any token.
        let (st, h, b) = introspect_as_app(&e, token).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(h["cache-control"], "no-store");
        assert_eq!(b["active"], true);
        for k in ["scope", "client_id", "exp", "iat", "sub", "iss", "aud"] {
            assert!(b.get(k).is_some(), "{k} in {b}");
        }
        // Another client without that permission learns nothing of this client's token
        // (RFC 7662 §4): inactive, as an unknown token.
        let (st, _, b) = post(
            &e,
            "/r4/auth/introspect",
            form(&[("token", token)]),
            &[("authorization", &basic("sym", SECRET))],
        )
        .await;
        assert_eq!((st, b), (StatusCode::OK, json!({"active": false})));
    }
    // The symmetric client.
    let (st, _, b) = post(
        &e,
        "/r4/auth/token",
        form(&[
            ("grant_type", "client_credentials"),
            ("scope", "system/Patient.r"),
        ]),
        &[("authorization", &basic("sym", SECRET))],
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let sym_token = b["access_token"].as_str().unwrap().to_owned();
    // A client may introspect its own tokens.
    let (st, _, b) = post(
        &e,
        "/r4/auth/introspect",
        form(&[("token", &sym_token)]),
        &[("authorization", &basic("sym", SECRET))],
    )
    .await;
    assert_eq!((st, &b["active"]), (StatusCode::OK, &json!(true)), "{b}");
    // Introspection: unknown, foreign and garbage tokens are inactive.
    for t in ["garbage", "a.b.c", &TestKey::ec384("x").sign(&claims())] {
        let (_, _, b) = post(
            &e,
            "/r4/auth/introspect",
            form(&[("token", t)]),
            &[("authorization", &basic("sym", SECRET))],
        )
        .await;
        assert_eq!(b, json!({"active": false}), "{t}");
    }
    // Introspection with a bearer token needs the introspection scope.
    let (st, _, _) = post(
        &e,
        "/r4/auth/introspect",
        form(&[("token", &sym_token)]),
        &[("authorization", &format!("Bearer {sym_token}"))],
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (_, _, b) = token_request(&e, &assertion(&e.ec, good_claims(), |_| {}), "introspect").await;
    let introspector = b["access_token"].as_str().unwrap().to_owned();
    let (st, _, b) = post(
        &e,
        "/r4/auth/introspect",
        form(&[("token", &sym_token)]),
        &[("authorization", &format!("Bearer {introspector}"))],
    )
    .await;
    assert_eq!((st, &b["active"]), (StatusCode::OK, &json!(true)));
    assert_eq!(b["client_id"], "sym");
    // Anonymous introspection is refused.
    let (st, _, _) = post(
        &e,
        "/r4/auth/introspect",
        form(&[("token", &sym_token)]),
        &[],
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    // JWKS, and discovery filled in from the embedded server.
    let (st, _, b) = get(&e.gw.url("/r4/auth/jwks")).await;
    assert_eq!(st, StatusCode::OK);
    let jwks = json(&b);
    assert_eq!(jwks["keys"][0]["alg"], "ES384");
    assert!(jwks["keys"][0].get("d").is_none(), "public only");
    let (_, _, b) = get(&e.gw.url("/r4/.well-known/smart-configuration")).await;
    let d = json(&b);
    assert_eq!(d["token_endpoint"], TOKEN_URL);
    assert_eq!(
        d["introspection_endpoint"],
        "http://gateway.test/r4/auth/introspect"
    );
    assert_eq!(d["grant_types_supported"], json!(["client_credentials"]));
    let caps = d["capabilities"].as_array().unwrap();
    assert!(
        caps.contains(&json!("client-confidential-asymmetric"))
            && caps.contains(&json!("client-confidential-symmetric"))
    );
    assert!(
        d["token_endpoint_auth_methods_supported"]
            .as_array()
            .unwrap()
            .contains(&json!("private_key_jwt"))
    );
    // A token the embedded server did not sign is refused at the FHIR endpoint.
    let (st, _, _) = get_with_token(
        &e.gw.url("/r4/Patient/1"),
        &TestKey::ec384("x").sign(&claims()),
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let m = metrics(&e.gw).await;
    assert!(
        m.contains("smartgate_authz_requests_total{result=\"issued\"}"),
        "{m}"
    );
}

#[tokio::test]
async fn refusals() {
    let e = env("[auth]\nmode = \"embedded\"\n", 1000, None).await;
    let ok = |e: &Env| assertion(&e.ec, good_claims(), |_| {});
    // Replayed jti.
    let replayed = ok(&e);
    assert_eq!(
        token_request(&e, &replayed, "system/Patient.rs").await.0,
        StatusCode::OK
    );
    let (st, _, b) = token_request(&e, &replayed, "system/Patient.rs").await;
    assert_eq!(
        (st, b["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_client")),
        "replay"
    );
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = good_claims();
        f(&mut c);
        c
    };
    let cases: Vec<(&str, String)> = vec![
        (
            "exp 10 min ahead",
            assertion(&e.ec, with(&|c| c["exp"] = json!(now() + 600)), |_| {}),
        ),
        (
            "no exp",
            assertion(
                &e.ec,
                with(&|c| {
                    c.as_object_mut().unwrap().remove("exp");
                }),
                |_| {},
            ),
        ),
        (
            "expired",
            assertion(&e.ec, with(&|c| c["exp"] = json!(now() - 120)), |_| {}),
        ),
        (
            "wrong aud",
            assertion(
                &e.ec,
                with(&|c| c["aud"] = json!("http://gateway.test/r4/token")),
                |_| {},
            ),
        ),
        (
            "iss != sub",
            assertion(&e.ec, with(&|c| c["sub"] = json!("other")), |_| {}),
        ),
        (
            "unknown client",
            assertion(
                &e.ec,
                with(&|c| {
                    c["iss"] = json!("nobody");
                    c["sub"] = json!("nobody");
                }),
                |_| {},
            ),
        ),
        (
            "no jti",
            assertion(
                &e.ec,
                with(&|c| {
                    c.as_object_mut().unwrap().remove("jti");
                }),
                |_| {},
            ),
        ),
        (
            "unknown kid",
            assertion(&e.ec, good_claims(), |h| h.kid = Some("nope".into())),
        ),
        ("no kid", assertion(&e.ec, good_claims(), |h| h.kid = None)),
        (
            "kid of the RSA key on an EC signature",
            assertion(&e.ec, good_claims(), |h| h.kid = Some("rsa-1".into())),
        ),
        (
            "foreign key with a known kid",
            assertion(&TestKey::ec384("ec-1"), good_claims(), |_| {}),
        ),
        (
            "jku not allow-listed",
            assertion(&e.ec, good_claims(), |h| {
                h.jku = Some("https://evil.example/jwks".into())
            }),
        ),
        ("HS256", {
            let mut h = Header::new(Algorithm::HS256);
            h.kid = Some("ec-1".into());
            jsonwebtoken::encode(
                &h,
                &good_claims(),
                &EncodingKey::from_secret(b"secret").unwrap(),
            )
            .unwrap()
        }),
        ("alg none", {
            use base64::Engine;
            let b =
                |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
            format!(
                "{}.{}.",
                b(&json!({"alg": "none", "kid": "ec-1"})),
                b(&good_claims())
            )
        }),
        ("not a JWT", "garbage".to_owned()),
    ];
    for (name, a) in &cases {
        let (st, _, b) = token_request(&e, a, "system/Patient.rs").await;
        assert_eq!(
            (st, b["error"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("invalid_client")),
            "{name}: {b}"
        );
        assert!(b["error_description"].is_string(), "{name}");
    }
    // Request-level refusals.
    let at = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
    let rows: Vec<(&str, String, StatusCode, &str)> = vec![
        (
            "wrong client_assertion_type",
            form(&[
                ("grant_type", "client_credentials"),
                ("scope", "system/Patient.rs"),
                ("client_assertion_type", "urn:x"),
                ("client_assertion", &ok(&e)),
            ]),
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        ),
        (
            "grant_type=password",
            form(&[
                ("grant_type", "password"),
                ("username", "u"),
                ("password", "p"),
            ]),
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
        ),
        (
            "no grant_type",
            form(&[("scope", "x")]),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "scope beyond registration",
            form(&[
                ("grant_type", "client_credentials"),
                ("scope", "system/Encounter.rs"),
                ("client_assertion_type", at),
                ("client_assertion", &ok(&e)),
            ]),
            StatusCode::BAD_REQUEST,
            "invalid_scope",
        ),
        (
            "patient/ scope for a backend client",
            form(&[
                ("grant_type", "client_credentials"),
                ("scope", "patient/Patient.rs"),
                ("client_assertion_type", at),
                ("client_assertion", &ok(&e)),
            ]),
            StatusCode::BAD_REQUEST,
            "invalid_scope",
        ),
        (
            "no client authentication",
            form(&[
                ("grant_type", "client_credentials"),
                ("scope", "system/Patient.r"),
            ]),
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        ),
        (
            "repeated parameter",
            form(&[
                ("grant_type", "client_credentials"),
                ("grant_type", "client_credentials"),
            ]),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
    ];
    for (name, f, status, code) in rows {
        let (st, _, b) = post(&e, "/r4/auth/token", f, &[]).await;
        assert_eq!(
            (st, b["error"].as_str()),
            (status, Some(code)),
            "{name}: {b}"
        );
    }
    // A secret wrong by one byte: 401 with a Basic challenge.
    let wrong = format!("{}X", &SECRET[..SECRET.len() - 1]);
    let (st, h, b) = post(
        &e,
        "/r4/auth/token",
        form(&[
            ("grant_type", "client_credentials"),
            ("scope", "system/Patient.r"),
        ]),
        &[("authorization", &basic("sym", &wrong))],
    )
    .await;
    assert_eq!(
        (st, b["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_client"))
    );
    assert!(h["www-authenticate"].to_str().unwrap().starts_with("Basic"));
    // A secret client cannot use an assertion, nor an asymmetric client a secret.
    let (st, _, _) = post(
        &e,
        "/r4/auth/token",
        form(&[
            ("grant_type", "client_credentials"),
            ("scope", "system/Patient.r"),
        ]),
        &[("authorization", &basic("app", SECRET))],
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    // Not a form; GET.
    let (st, _, _) = send(
        Request::post(e.gw.url("/r4/auth/token"))
            .header("content-type", "application/json")
            .body(body("{}"))
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _, _) = get(&e.gw.url("/r4/auth/token")).await;
    assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED);
    assert!(
        e.up.requests().is_empty(),
        "nothing reached the FHIR server"
    );
}

#[tokio::test]
async fn rate_limited_per_client() {
    let e = env("[auth]\nmode = \"embedded\"\n", 3, None).await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(
            token_request(
                &e,
                &assertion(&e.ec, good_claims(), |_| {}),
                "system/Patient.rs",
            )
            .await
            .0,
        );
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == StatusCode::OK).count(),
        3,
        "{statuses:?}"
    );
    assert!(statuses.contains(&StatusCode::TOO_MANY_REQUESTS));
    // Another client has its own budget.
    let (st, _, _) = post(
        &e,
        "/r4/auth/token",
        form(&[
            ("grant_type", "client_credentials"),
            ("scope", "system/Patient.r"),
        ]),
        &[("authorization", &basic("sym", SECRET))],
    )
    .await;
    assert_eq!(st, StatusCode::OK);
}

/// `[auth]` accepts the external issuer's tokens and the embedded server's, each checked
/// by its own verifier.
#[tokio::test]
async fn alongside_an_external_issuer() {
    let external = TestKey::rsa("ext-1", Algorithm::RS256);
    let jwks_server = FakeJwks::start(&[&external]).await;
    let auth = jwt_auth(&jwks_server.uri(), "");
    let e = env(&auth, 100, Some(jwks_server)).await;
    let mut c = claims();
    c["scope"] = json!("system/Patient.r");
    let (st, _, _) = get_with_token(&e.gw.url("/r4/Patient/1"), &external.sign(&c)).await;
    assert_eq!(st, StatusCode::OK, "external token");
    let (_, _, b) = token_request(
        &e,
        &assertion(&e.rsa, good_claims(), |_| {}),
        "system/Patient.r",
    )
    .await;
    let ours = b["access_token"].as_str().unwrap();
    let (st, _, _) = get_with_token(&e.gw.url("/r4/Patient/1"), ours).await;
    assert_eq!(st, StatusCode::OK, "embedded token");
    // A token claiming our issuer but signed by someone else.
    let mut forged = claims();
    forged["iss"] = json!("http://gateway.test/r4");
    forged["aud"] = json!("http://gateway.test/r4");
    let (st, _, _) = get_with_token(&e.gw.url("/r4/Patient/1"), &external.sign(&forged)).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
}

/// Client keys from a `jwks_uri`: fetched, refetched once for a rotated key, and an
/// unknown-kid storm does not become a fetch storm; an allow-listed `jku` is used.
#[tokio::test]
async fn client_keys_from_jwks_uri_and_jku() {
    let old = TestKey::ec384("old");
    let new = TestKey::ec384("new");
    let published = FakeJwks::start(&[&old]).await;
    let jku_key = TestKey::rsa("jku-1", Algorithm::RS384);
    let jku_server = FakeJwks::start(&[&jku_key]).await;
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("gateway.pem");
    std::fs::write(&key_path, smartgate::keygen::generate("ES384").unwrap().0).unwrap();
    let up = FakeUpstream::echo().await;
    let extra = format!(
        r#"
[authorization_server]
enabled = true
signing_key = "{}"
rate_limit = 1000

[[authorization_server.clients]]
client_id = "app"
jwks_uri = "{}"
scope = "system/Patient.rs"
jku_allow = ["{}"]
"#,
        key_path.display(),
        published.uri(),
        jku_server.uri()
    );
    let gw = TestGateway::boot(&config_auth(
        &up.base(),
        "[auth]\nmode = \"embedded\"\n",
        &extra,
    ))
    .await;
    let e = Env {
        gw,
        up,
        rsa: jku_key.clone(),
        ec: old.clone(),
        _dir: dir,
        _jwks: None,
    };
    let (st, _, b) = token_request(
        &e,
        &assertion(&old, good_claims(), |_| {}),
        "system/Patient.rs",
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    // Rotation: the new key is published; its first use refetches once.
    published.set_keys(&[&old, &new]);
    let before = published.fetches();
    let (st, _, b) = token_request(
        &e,
        &assertion(&new, good_claims(), |_| {}),
        "system/Patient.rs",
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_eq!(published.fetches(), before + 1);
    // A storm of unknown kids: refused, and no more fetches within the interval.
    for i in 0..20 {
        let a = assertion(&new, good_claims(), |h| h.kid = Some(format!("storm-{i}")));
        assert_eq!(
            token_request(&e, &a, "system/Patient.rs").await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(published.fetches(), before + 1);
    // jku: the allow-listed URL's keys; the key is not in the client's own JWKS.
    let a = assertion(&jku_key, good_claims(), |h| h.jku = Some(jku_server.uri()));
    let (st, _, b) = token_request(&e, &a, "system/Patient.rs").await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let a = assertion(&jku_key, good_claims(), |_| {});
    assert_eq!(
        token_request(&e, &a, "system/Patient.rs").await.0,
        StatusCode::UNAUTHORIZED
    );
}

/// Reloads `e`'s gateway with `extra` added to `[authorization_server]`.
fn reload_authz(e: &Env, extra: &str) {
    let text = std::fs::read_to_string(&e.gw.config_path).unwrap();
    let text = text.replace(
        "[authorization_server]\n",
        &format!("[authorization_server]\n{extra}\n"),
    );
    e.gw.rewrite_config(&text);
    e.gw.handle.reload().unwrap();
}

/// An assertion used before a reload that changes the authorization server is still
/// refused after it: the ids seen are kept until their assertions expire, whatever
/// reloads.
#[tokio::test]
async fn assertions_cannot_be_replayed_after_a_reload() {
    let e = env("[auth]\nmode = \"embedded\"\n", 1000, None).await;
    let used = assertion(&e.ec, good_claims(), |_| {});
    assert_eq!(
        token_request(&e, &used, "system/Patient.rs").await.0,
        StatusCode::OK
    );
    reload_authz(&e, "token_lifetime = \"2m\"");
    let (st, _, b) = token_request(&e, &used, "system/Patient.rs").await;
    assert_eq!(
        (st, b["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_client")),
        "replayed after a reload"
    );
    // A fresh assertion still works under the new configuration.
    let fresh = assertion(&e.ec, good_claims(), |_| {});
    assert_eq!(
        token_request(&e, &fresh, "system/Patient.rs").await.0,
        StatusCode::OK
    );
}

/// When a client has as many live assertion ids as it may keep, its next assertion is
/// refused (503 temporarily_unavailable) rather than an older id forgotten: every used
/// assertion stays refused.
#[tokio::test]
async fn a_full_replay_guard_refuses_rather_than_forgets() {
    let e = env("[auth]\nmode = \"embedded\"\n", 1000, None).await;
    reload_authz(&e, "replay_cache_max_entries = 3");
    let used: Vec<String> = (0..3)
        .map(|_| assertion(&e.ec, good_claims(), |_| {}))
        .collect();
    for a in &used {
        assert_eq!(
            token_request(&e, a, "system/Patient.rs").await.0,
            StatusCode::OK
        );
    }
    let (st, _, b) = token_request(
        &e,
        &assertion(&e.ec, good_claims(), |_| {}),
        "system/Patient.rs",
    )
    .await;
    assert_eq!(
        (st, b["error"].as_str()),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("temporarily_unavailable")
        )
    );
    for a in &used {
        let (st, _, b) = token_request(&e, a, "system/Patient.rs").await;
        assert_eq!(
            (st, b["error"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("invalid_client"))
        );
    }
}

/// RFC 7523 §3: an assertion with `nbf` or `iat` in the future (beyond 30 s of skew) is
/// refused; within the skew it passes.
#[tokio::test]
async fn assertions_from_the_future_are_refused() {
    let e = env("[auth]\nmode = \"embedded\"\n", 1000, None).await;
    for (claim, ahead, ok) in [
        ("nbf", 120, false),
        ("iat", 120, false),
        ("nbf", 10, true),
        ("iat", 10, true),
    ] {
        let mut c = good_claims();
        c[claim] = json!(now() + ahead);
        let (st, _, b) = token_request(&e, &assertion(&e.ec, c, |_| {}), "system/Patient.rs").await;
        if ok {
            assert_eq!(st, StatusCode::OK, "{claim} +{ahead}: {b}");
        } else {
            assert_eq!(
                (st, b["error"].as_str()),
                (StatusCode::UNAUTHORIZED, Some("invalid_client")),
                "{claim} +{ahead}"
            );
        }
    }
}

/// A burst of introspection requests with garbage bearer tokens is limited: after the
/// rate's worth of failures the rest are 429 without a signature being checked.
#[tokio::test]
async fn garbage_introspection_bursts_are_limited() {
    let e = env("[auth]\nmode = \"embedded\"\n", 3, None).await;
    let mut statuses = Vec::new();
    for i in 0..10 {
        let garbage = TestKey::ec384("x").sign(&json!({"n": i}));
        let (st, _, _) = post(
            &e,
            "/r4/auth/introspect",
            form(&[("token", "whatever")]),
            &[("authorization", &format!("Bearer {garbage}"))],
        )
        .await;
        statuses.push(st);
    }
    let refused = statuses
        .iter()
        .filter(|s| **s == StatusCode::UNAUTHORIZED)
        .count();
    let limited = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert!(refused <= 4 && limited >= 6, "{statuses:?}");
    // Registered clients keep their own budgets.
    let (st, _, _) = post(
        &e,
        "/r4/auth/introspect",
        form(&[("token", "whatever")]),
        &[("authorization", &basic("sym", SECRET))],
    )
    .await;
    assert_eq!(st, StatusCode::OK);
}

/// Token issuance and introspection are audited: the client, the scopes granted, or the
/// refusal; never a client id that did not authenticate, never a token or a secret.
#[tokio::test]
async fn token_requests_are_audited() {
    let e = env("[auth]\nmode = \"embedded\"\n", 100, None).await;
    let (st, _, b) = token_request(
        &e,
        &assertion(&e.ec, good_claims(), |_| {}),
        "system/Patient.rs system/Encounter.rs",
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let token = b["access_token"].as_str().unwrap().to_owned();
    let (st, _, _) = post(
        &e,
        "/r4/auth/token",
        form(&[
            ("grant_type", "client_credentials"),
            ("scope", "system/Patient.r"),
        ]),
        &[("authorization", &basic("sym", "wrong secret"))],
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, _, _) = introspect_as_app(&e, &token).await;
    assert_eq!(st, StatusCode::OK);

    let lines = e.gw.audit_lines();
    let of =
        |event: &str| -> Vec<&Value> { lines.iter().filter(|l| l["event"] == event).collect() };
    let tokens = of("token");
    assert_eq!(tokens.len(), 2, "{lines:#?}");
    assert_eq!(tokens[0]["client_id"], "app");
    assert_eq!(tokens[0]["scope"], "system/Patient.rs");
    assert_eq!(tokens[0]["decision"], "allow");
    assert_eq!(tokens[0]["reason"], "issued");
    assert_eq!(tokens[0]["status"], 200);
    assert_eq!(tokens[0]["route"], "auth");
    // The refused client claimed an id it could not prove: it is not recorded as it.
    assert_eq!(tokens[1]["client_id"], Value::Null);
    assert_eq!(tokens[1]["decision"], "deny");
    assert_eq!(tokens[1]["reason"], "invalid_client");
    assert_eq!(tokens[1]["scope"], Value::Null);
    let introspections = of("introspect");
    assert_eq!(introspections.len(), 1);
    assert_eq!(introspections[0]["client_id"], "app");
    assert_eq!(introspections[0]["reason"], "active");
    let all = serde_json::to_string(&lines).unwrap();
    assert!(!all.contains(&token[token.len() - 20..]) && !all.contains("wrong secret"));
}
