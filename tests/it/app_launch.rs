//! SMART App Launch through the embedded authorization server: a standalone patient launch
//! end to end (authorize → sign-in at the provider → consent → code → token → FHIR), and
//! every refusal: wrong redirect, PKCE, code reuse, refresh reuse, wrong aud, scopes beyond
//! the registration, a consent form from elsewhere.
//!
//! The sign-in provider is a fake written here (its authorization step is driven by the
//! test, as a browser would follow it); the browser test with the real npm oidc-provider
//! is separate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http::{Request, StatusCode};
use jsonwebtoken::{Algorithm, Header};
use serde_json::{Value, json};

use crate::support::tokens::*;
use crate::support::*;

const APP: &str = "patient-app";
const REDIRECT: &str = "https://app.test/callback";
const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";

/// The provider's codes: code → (sub, fhirUser, nonce, PKCE challenge).
type Codes = Arc<Mutex<HashMap<String, (String, String, String, String)>>>;

/// A sign-in provider: discovery, JWKS, and a token endpoint that trades the codes the
/// test registered for id_tokens of the users they name.
struct Provider {
    server: FakeUpstream,
    /// code → (sub, fhirUser, nonce, PKCE challenge)
    codes: Codes,
}

impl Provider {
    async fn start() -> Provider {
        let key = TestKey::rsa("idp-1", Algorithm::RS256);
        let codes: Codes = Default::default();
        let issuer = Arc::new(std::sync::OnceLock::<String>::new());
        let (c, i) = (codes.clone(), issuer.clone());
        let server = FakeUpstream::start(Arc::new(move |seen: &Seen| {
            let issuer = i.get().cloned().unwrap_or_default();
            let resp = if seen.uri.starts_with("/.well-known/openid-configuration") {
                json_response(StatusCode::OK, &json!({
                    "issuer": issuer,
                    "authorization_endpoint": format!("{issuer}/authorize"),
                    "token_endpoint": format!("{issuer}/token"),
                    "jwks_uri": format!("{issuer}/jwks"),
                }))
            } else if seen.uri.starts_with("/jwks") {
                json_response(StatusCode::OK, &jwks(&[&key]))
            } else if seen.uri.starts_with("/token") {
                let form: HashMap<String, String> = form_urlencoded::parse(&seen.body).into_owned().collect();
                let basic = seen.headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
                let entry = c.lock().unwrap().remove(form.get("code").map(String::as_str).unwrap_or(""));
                match entry {
                    Some((sub, fhir_user, nonce, challenge))
                        if basic == basic_auth("smartgate", "idp-secret")
                            && smartgate::authz::launch::pkce_challenge(&form["code_verifier"]) == challenge =>
                    {
                        let now = now();
                        let claims = json!({
                            "iss": issuer, "aud": "smartgate", "sub": sub, "fhirUser": fhir_user,
                            "nonce": nonce, "iat": now, "exp": now + 300,
                        });
                        let mut header = Header::new(Algorithm::RS256);
                        header.kid = Some("idp-1".into());
                        let id_token = jsonwebtoken::encode(&header, &claims, &key.encoding).unwrap();
                        json_response(StatusCode::OK, &json!({"id_token": id_token, "access_token": "x", "token_type": "Bearer"}))
                    }
                    _ => json_response(StatusCode::BAD_REQUEST, &json!({"error": "invalid_grant"})),
                }
            } else {
                json_response(StatusCode::NOT_FOUND, &json!({}))
            };
            Box::pin(std::future::ready(resp))
        }))
        .await;
        issuer.set(format!("http://{}", server.addr)).unwrap();
        Provider { server, codes }
    }

    fn issuer(&self) -> String {
        format!("http://{}", self.server.addr)
    }
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn basic_auth(id: &str, secret: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
    )
}

/// A FHIR server with patients 123 (Ann Smith) and 456 (Bo Lee).
async fn fhir() -> FakeUpstream {
    FakeUpstream::start(Arc::new(|seen: &Seen| {
        let body = if seen.uri.contains("/Patient?") {
            let patient = |id: &str, given: &str, family: &str| {
                json!({"resource": {"resourceType": "Patient", "id": id,
                    "name": [{"given": [given], "family": family}]}})
            };
            // `name=` matches the start of a given or family name, as FHIR's string search.
            let query = seen.uri.split_once('?').map_or("", |(_, q)| q);
            let name = form_urlencoded::parse(query.as_bytes())
                .find(|(k, _)| k == "name")
                .map(|(_, v)| v.to_lowercase());
            let entry: Vec<Value> = [("123", "Ann", "Smith"), ("456", "Bo", "Lee")]
                .iter()
                .filter(|(_, g, f)| {
                    name.as_ref().is_none_or(|n| {
                        g.to_lowercase().starts_with(n) || f.to_lowercase().starts_with(n)
                    })
                })
                .map(|(id, g, f)| patient(id, g, f))
                .collect();
            json!({"resourceType": "Bundle", "type": "searchset", "entry": entry})
        } else {
            let id = seen.uri.rsplit('/').next().unwrap_or("").to_owned();
            json!({"resourceType": "Patient", "id": id})
        };
        Box::pin(std::future::ready(json_response(StatusCode::OK, &body)))
    }))
    .await
}

/// A gateway the flows can be run against: in this process, or a `smartgate` process.
trait Gw {
    fn url(&self, path: &str) -> String;
}

impl Gw for TestGateway {
    fn url(&self, path: &str) -> String {
        TestGateway::url(self, path)
    }
}

struct Env<G: Gw = TestGateway> {
    gw: G,
    idp: Provider,
    _fhir: FakeUpstream,
}

async fn env() -> Env {
    let idp = Provider::start().await;
    let fhir = fhir().await;
    let gw = TestGateway::boot(&env_config(&idp, &fhir, "")).await;
    Env {
        gw,
        idp,
        _fhir: fhir,
    }
}

/// The configuration of [`env`]; `extra` goes into `[authorization_server]`.
fn env_config(idp: &Provider, fhir: &FakeUpstream, extra: &str) -> String {
    let extra = format!(
        r#"
[authorization_server]
enabled = true
{extra}

[authorization_server.login]
issuer = "{}"
client_id = "smartgate"
client_secret = "idp-secret"

[[authorization_server.clients]]
client_id = "{APP}"
public = true
redirect_uris = ["{REDIRECT}"]
scope = "launch launch/patient openid fhirUser offline_access patient/*.rs"

[[authorization_server.clients]]
client_id = "ehr"
ehr = true
client_secret_hash = "sha256:{}"
scope = "system/Patient.r"
"#,
        idp.issuer(),
        sha256_hex("ehr-secret")
    );
    config_auth(&fhir.base(), "[auth]\nmode = \"embedded\"\n", &extra)
}

/// `GET path` with an optional cookie: status, headers, body.
async fn get_with(url: &str, cookie: Option<&str>) -> (StatusCode, http::HeaderMap, String) {
    let mut req = Request::get(url);
    if let Some(c) = cookie {
        req = req.header("cookie", format!("smartgate_signin={c}"));
    }
    let (s, h, b) = send(req.body(smartgate::body::empty()).unwrap()).await;
    (s, h, String::from_utf8_lossy(&b).into_owned())
}

async fn post_form(
    url: &str,
    pairs: &[(&str, &str)],
    cookie: Option<&str>,
) -> (StatusCode, http::HeaderMap, String) {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    let mut req = Request::post(url).header("content-type", "application/x-www-form-urlencoded");
    if let Some(c) = cookie {
        req = req.header("cookie", format!("smartgate_signin={c}"));
    }
    let (st, h, b) = send(req.body(body(s.finish())).unwrap()).await;
    (st, h, String::from_utf8_lossy(&b).into_owned())
}

fn query_of(location: &str) -> HashMap<String, String> {
    let q = location.split_once('?').map(|(_, q)| q).unwrap_or("");
    form_urlencoded::parse(q.as_bytes()).into_owned().collect()
}

fn location(h: &http::HeaderMap) -> String {
    h.get("location").unwrap().to_str().unwrap().to_owned()
}

/// The app's authorize URL with `overrides` in place of the defaults.
fn authorize_url<G: Gw>(e: &Env<G>, overrides: &[(&str, &str)]) -> String {
    let mut params: Vec<(&str, &str)> = vec![
        ("response_type", "code"),
        ("client_id", APP),
        ("redirect_uri", REDIRECT),
        (
            "scope",
            "launch/patient openid fhirUser offline_access patient/*.rs user/*.rs",
        ),
        ("state", "app-state"),
        ("aud", "http://gateway.test/r4"),
        ("code_challenge", CHALLENGE),
        ("code_challenge_method", "S256"),
    ];
    for (k, v) in overrides {
        params.retain(|(pk, _)| pk != k);
        if !v.is_empty() {
            params.push((k, v));
        }
    }
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        s.append_pair(k, v);
    }
    e.gw.url(&format!("/r4/auth/authorize?{}", s.finish()))
}

/// Sends the browser to the authorize URL `url`, and has the provider sign in `sub` as
/// `fhir_user` for that sign-in (what its pages would do): the sign-in id.
async fn signed_in_at_provider(codes: &Codes, url: &str, sub: &str, fhir_user: &str) -> String {
    let (st, h, _) = get_with(url, None).await;
    assert_eq!(st, StatusCode::FOUND);
    let q = query_of(&location(&h));
    codes.lock().unwrap().insert(
        "idp-code".into(),
        (
            sub.into(),
            fhir_user.into(),
            q["nonce"].clone(),
            q["code_challenge"].clone(),
        ),
    );
    q["state"].clone()
}

/// Authorize, sign in as `fhir_user`: the sign-in id (cookie) and the consent page.
async fn sign_in<G: Gw>(e: &Env<G>, fhir_user: &str) -> (String, String) {
    let (st, h, _) = get_with(&authorize_url(e, &[]), None).await;
    assert_eq!(st, StatusCode::FOUND);
    let to_idp = location(&h);
    assert!(
        to_idp.starts_with(&format!("{}/authorize?", e.idp.issuer())),
        "{to_idp}"
    );
    let q = query_of(&to_idp);
    assert_eq!(q["code_challenge_method"], "S256");
    let cookie = h.get("set-cookie").unwrap().to_str().unwrap();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"),
        "{cookie}"
    );
    let txn = q["state"].clone();
    assert!(cookie.starts_with(&format!("smartgate_signin={txn};")));
    // The provider signs the user in (what its pages would do) and sends the browser back.
    e.idp.codes.lock().unwrap().insert(
        "idp-code".into(),
        (
            "user-1".into(),
            fhir_user.into(),
            q["nonce"].clone(),
            q["code_challenge"].clone(),
        ),
    );
    let callback =
        e.gw.url(&format!("/r4/auth/callback?code=idp-code&state={txn}"));
    let (st, h, page) = get_with(&callback, Some(&txn)).await;
    assert_eq!(st, StatusCode::OK, "{page}");
    assert_eq!(h["x-frame-options"], "DENY");
    assert!(
        h["content-security-policy"]
            .to_str()
            .unwrap()
            .starts_with("default-src 'self'")
    );
    assert_eq!(h["cache-control"], "no-store");
    (txn, page)
}

fn field(page: &str, name: &str) -> String {
    let marker = format!(r#"name="{name}" value=""#);
    let start = page.find(&marker).unwrap() + marker.len();
    page[start..].split('"').next().unwrap().to_owned()
}

/// Approves `scopes` on the consent page: the code sent to the app.
async fn approve<G: Gw>(e: &Env<G>, txn: &str, page: &str, scopes: &[&str]) -> String {
    let csrf = field(page, "csrf");
    let mut pairs = vec![
        ("txn", txn),
        ("csrf", csrf.as_str()),
        ("decision", "approve"),
    ];
    for s in scopes {
        pairs.push(("scope", s));
    }
    let (st, h, _) = post_form(&e.gw.url("/r4/auth/consent"), &pairs, Some(txn)).await;
    assert_eq!(st, StatusCode::FOUND);
    let back = location(&h);
    assert!(back.starts_with(&format!("{REDIRECT}?")), "{back}");
    let q = query_of(&back);
    assert_eq!(q["state"], "app-state");
    assert_eq!(q["iss"], "http://gateway.test/r4");
    q["code"].clone()
}

async fn redeem<G: Gw>(
    e: &Env<G>,
    code: &str,
    verifier: &str,
) -> (StatusCode, http::HeaderMap, Value) {
    let (st, h, b) = post_form(
        &e.gw.url("/r4/auth/token"),
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", verifier),
            ("client_id", APP),
        ],
        None,
    )
    .await;
    (st, h, serde_json::from_str(&b).unwrap_or(Value::Null))
}

async fn refresh<G: Gw>(e: &Env<G>, token: &str) -> (StatusCode, Value) {
    let (st, _, b) = post_form(
        &e.gw.url("/r4/auth/token"),
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", token),
            ("client_id", APP),
        ],
        None,
    )
    .await;
    (st, serde_json::from_str(&b).unwrap_or(Value::Null))
}

/// The whole standalone patient launch, then the token used at the FHIR endpoint, then
/// refresh rotation and revocation.
#[tokio::test]
async fn standalone_patient_launch() {
    let e = env().await;
    let (txn, page) = sign_in(&e, "Patient/123").await;
    // Rendered escaped ('/' as &#x2f;).
    assert!(
        page.contains(APP) && page.contains(r#"value="patient&#x2f;*.rs""#),
        "{page}"
    );
    // user/*.rs was asked for but is not registered: not offered.
    assert!(!page.contains("user&#x2f;"), "{page}");
    // The user unchecks fhirUser.
    let code = approve(
        &e,
        &txn,
        &page,
        &["launch/patient", "openid", "offline_access", "patient/*.rs"],
    )
    .await;
    let (st, h, t) = redeem(&e, &code, VERIFIER).await;
    assert_eq!(st, StatusCode::OK, "{t}");
    assert_eq!(h["cache-control"], "no-store");
    assert_eq!(h["pragma"], "no-cache");
    assert_eq!(t["token_type"], "Bearer");
    assert_eq!(t["patient"], "123");
    assert_eq!(t["need_patient_banner"], true);
    assert_eq!(
        t["scope"],
        "launch/patient openid offline_access patient/*.rs"
    );
    // The style the app may match: served by the gateway, SMART style version 1.0.
    assert_eq!(
        t["smart_style_url"],
        "http://gateway.test/r4/auth/smart-style.json"
    );
    let (st, h, style) = get_with(&e.gw.url("/r4/auth/smart-style.json"), None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(h["content-type"], "application/json");
    let style: Value = serde_json::from_str(&style).unwrap();
    assert_eq!(style["sim_version"], "1.0");
    assert!(style["color_background"].as_str().unwrap().starts_with('#'));
    assert!(t["expires_in"].as_u64().unwrap() > 0);
    // The id_token: RS256, a key of /auth/jwks, for this app.
    let id_token = t["id_token"].as_str().unwrap();
    let header = jsonwebtoken::decode_header(id_token).unwrap();
    assert_eq!(header.alg, Algorithm::RS256);
    let (_, _, keys) = get_with(&e.gw.url("/r4/auth/jwks"), None).await;
    let keys: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&keys).unwrap();
    let jwk = keys
        .find(header.kid.as_deref().unwrap())
        .expect("the id_token's key is published");
    let mut v = jsonwebtoken::Validation::new(Algorithm::RS256);
    v.set_audience(&[APP]);
    v.set_issuer(&["http://gateway.test/r4"]);
    let claims = jsonwebtoken::decode::<Value>(
        id_token,
        &jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap(),
        &v,
    )
    .unwrap()
    .claims;
    assert_eq!(claims["sub"], "user-1");
    assert_eq!(claims["fhirUser"], "http://gateway.test/r4/Patient/123");

    // The token reads its patient, and not another.
    let access = t["access_token"].as_str().unwrap();
    assert_eq!(
        get_with_token(&e.gw.url("/r4/Patient/123"), access).await.0,
        StatusCode::OK
    );
    assert_eq!(
        get_with_token(&e.gw.url("/r4/Patient/456"), access).await.0,
        StatusCode::FORBIDDEN
    );

    // The code works once.
    let (st, _, again) = redeem(&e, &code, VERIFIER).await;
    assert_eq!(
        (st, again["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant"))
    );

    // Refresh rotates; the old one used again revokes the family.
    let first = t["refresh_token"].as_str().unwrap().to_owned();
    let (st, r1) = refresh(&e, &first).await;
    assert_eq!(st, StatusCode::OK, "{r1}");
    assert_eq!(r1["patient"], "123");
    let second = r1["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(first, second);
    let (st, _) = refresh(&e, &first).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "a rotated token is refused");
    let (st, _) = refresh(&e, &second).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "and its family with it");

    // Discovery says what is served.
    let (_, _, doc) = get_with(&e.gw.url("/r4/.well-known/smart-configuration"), None).await;
    let doc: Value = serde_json::from_str(&doc).unwrap();
    for cap in [
        "launch-standalone",
        "client-public",
        "context-standalone-patient",
        "permission-offline",
        "sso-openid-connect",
    ] {
        assert!(
            doc["capabilities"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c == cap),
            "{cap}: {doc}"
        );
    }
    assert_eq!(
        doc["authorization_endpoint"],
        "http://gateway.test/r4/auth/authorize"
    );
    let (st, _, oidc) = get_with(&e.gw.url("/r4/.well-known/openid-configuration"), None).await;
    assert_eq!(st, StatusCode::OK);
    let oidc: Value = serde_json::from_str(&oidc).unwrap();
    assert_eq!(
        oidc["id_token_signing_alg_values_supported"],
        json!(["RS256"])
    );
    assert_eq!(oidc["issuer"], "http://gateway.test/r4");
}

/// Revoking a refresh token ends its family.
#[tokio::test]
async fn revocation_ends_refresh() {
    let e = env().await;
    let (txn, page) = sign_in(&e, "Patient/123").await;
    let code = approve(
        &e,
        &txn,
        &page,
        &["launch/patient", "offline_access", "patient/*.rs"],
    )
    .await;
    let (_, _, t) = redeem(&e, &code, VERIFIER).await;
    let rt = t["refresh_token"].as_str().unwrap();
    let (st, _, _) = post_form(
        &e.gw.url("/r4/auth/revoke"),
        &[("token", rt), ("client_id", APP)],
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(refresh(&e, rt).await.0, StatusCode::BAD_REQUEST);
    // Unknown tokens are answered alike (RFC 7009 §2.2).
    let (st, _, _) = post_form(
        &e.gw.url("/r4/auth/revoke"),
        &[("token", "nope"), ("client_id", APP)],
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
}

/// What is refused at /authorize: before the redirect URI is known good, a page; after,
/// an error sent back to the app.
#[tokio::test]
async fn authorize_refusals() {
    let e = env().await;
    // Never redirected to a URI nobody registered.
    for bad in [
        &[("redirect_uri", "https://evil.test/cb")][..],
        &[("client_id", "nobody")],
        &[("redirect_uri", "https://app.test/callback/x")],
    ] {
        let (st, h, page) = get_with(&authorize_url(&e, bad), None).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{bad:?}");
        assert!(h.get("location").is_none());
        assert_eq!(h["x-frame-options"], "DENY");
        assert!(page.contains("Sign-in stopped"));
    }
    for (bad, error) in [
        (&[("code_challenge", "")][..], "invalid_request"),
        (&[("code_challenge_method", "plain")], "invalid_request"),
        (&[("code_challenge_method", "")], "invalid_request"),
        (&[("aud", "http://other.test/r4")], "invalid_request"),
        (&[("response_type", "token")], "unsupported_response_type"),
        (&[("scope", "user/*.rs system/*.rs")], "invalid_scope"),
        (&[("launch", "xyz")], "invalid_request"),
    ] {
        let (st, h, _) = get_with(&authorize_url(&e, bad), None).await;
        assert_eq!(st, StatusCode::FOUND, "{bad:?}");
        let back = location(&h);
        assert!(back.starts_with(REDIRECT), "{back}");
        let q = query_of(&back);
        assert_eq!(q["error"], error, "{bad:?}");
        assert_eq!(q["state"], "app-state");
    }
}

/// A code needs its own PKCE verifier, redirect URI and client.
#[tokio::test]
async fn code_binding() {
    let e = env().await;
    let (txn, page) = sign_in(&e, "Patient/123").await;
    let code = approve(&e, &txn, &page, &["launch/patient", "patient/*.rs"]).await;
    let (st, _, t) = redeem(&e, &code, &"x".repeat(43)).await;
    assert_eq!(
        (st, t["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant"))
    );
    // A failed attempt used the code up.
    assert_eq!(redeem(&e, &code, VERIFIER).await.0, StatusCode::BAD_REQUEST);

    let (txn, page) = sign_in(&e, "Patient/123").await;
    let code = approve(&e, &txn, &page, &["launch/patient", "patient/*.rs"]).await;
    let (st, _, b) = post_form(
        &e.gw.url("/r4/auth/token"),
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", "https://app.test/other"),
            ("code_verifier", VERIFIER),
            ("client_id", APP),
        ],
        None,
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{b}");
}

/// The consent form counts only from the browser that signed in, with its CSRF token;
/// unchecked scopes are not granted; a denial goes back as access_denied.
#[tokio::test]
async fn consent_refusals() {
    let e = env().await;
    let (txn, page) = sign_in(&e, "Patient/123").await;
    let csrf = field(&page, "csrf");
    // A Patient picks no patient: the picker's search is not theirs to use.
    assert!(!page.contains(r#"name="name""#), "{page}");
    let (st, _, body) = get_with(
        &e.gw.url(&format!("/r4/auth/consent?txn={txn}&name=lee")),
        Some(&txn),
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{body}");
    // Another browser (no cookie), then a forged CSRF token.
    let form = [
        ("txn", txn.as_str()),
        ("csrf", csrf.as_str()),
        ("decision", "approve"),
        ("scope", "patient/*.rs"),
    ];
    assert_eq!(
        post_form(&e.gw.url("/r4/auth/consent"), &form, None)
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
    let forged = [
        ("txn", txn.as_str()),
        ("csrf", "forged"),
        ("decision", "approve"),
        ("scope", "patient/*.rs"),
    ];
    assert_eq!(
        post_form(&e.gw.url("/r4/auth/consent"), &forged, Some(&txn))
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    // The forged attempt used the sign-in up.
    assert_eq!(
        post_form(&e.gw.url("/r4/auth/consent"), &form, Some(&txn))
            .await
            .0,
        StatusCode::BAD_REQUEST
    );

    // A scope the app did not ask for cannot be slipped in through the form.
    let (txn, page) = sign_in(&e, "Patient/123").await;
    let code = approve(
        &e,
        &txn,
        &page,
        &[
            "launch/patient",
            "patient/*.rs",
            "user/*.cruds",
            "system/*.rs",
        ],
    )
    .await;
    let (_, _, t) = redeem(&e, &code, VERIFIER).await;
    assert_eq!(t["scope"], "launch/patient patient/*.rs");
    assert!(t.get("refresh_token").is_none() && t.get("id_token").is_none());

    // Deny.
    let (txn, page) = sign_in(&e, "Patient/123").await;
    let csrf = field(&page, "csrf");
    let (st, h, _) = post_form(
        &e.gw.url("/r4/auth/consent"),
        &[("txn", &txn), ("csrf", &csrf), ("decision", "deny")],
        Some(&txn),
    )
    .await;
    assert_eq!(st, StatusCode::FOUND);
    assert_eq!(query_of(&location(&h))["error"], "access_denied");
}

/// A user who is not a Patient gets no patient context for launch/patient (no picker yet):
/// refused, not given a token without the context it asked for.
#[tokio::test]
async fn no_patient_context_for_a_practitioner() {
    let e = env().await;
    let txn = signed_in_at_provider(
        &e.idp.codes,
        &authorize_url(&e, &[]),
        "doc-1",
        "Practitioner/9",
    )
    .await;
    let (st, h, _) = get_with(
        &e.gw
            .url(&format!("/r4/auth/callback?code=idp-code&state={txn}")),
        Some(&txn),
    )
    .await;
    assert_eq!(st, StatusCode::FOUND);
    assert_eq!(query_of(&location(&h))["error"], "access_denied");
}

/// The provider's answer counts only in the browser that started the sign-in, and only
/// with an id_token the provider signed for this sign-in.
#[tokio::test]
async fn callback_refusals() {
    let e = env().await;
    let (_, h, _) = get_with(&authorize_url(&e, &[]), None).await;
    let q = query_of(&location(&h));
    let txn = q["state"].clone();
    let url =
        e.gw.url(&format!("/r4/auth/callback?code=idp-code&state={txn}"));
    // No cookie: another browser.
    assert_eq!(get_with(&url, None).await.0, StatusCode::BAD_REQUEST);
    // A code the provider does not know (or a wrong nonce or PKCE): not verified.
    e.idp.codes.lock().unwrap().insert(
        "idp-code".into(),
        (
            "user-1".into(),
            "Patient/123".into(),
            "another-nonce".into(),
            q["code_challenge"].clone(),
        ),
    );
    let (st, _, page) = get_with(&url, Some(&txn)).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(page.contains("could not be verified"), "{page}");
}

/// A Valkey/Redis server for the test (Debian `redis-server`), on a free port, without
/// persistence; stopped when dropped.
struct Redis {
    child: std::process::Child,
    port: u16,
}

impl Redis {
    fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be installed for the shared-state tests (apt-get install redis-server)");
        let redis = Redis { child, port };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return redis;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("redis-server did not start");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two replicas on one Valkey/Redis: a sign-in begun on one finishes on the other, a code
/// issued by one is redeemed once across both, a client assertion used on one is refused
/// on the other; with the store gone, what needs it is refused (503) while FHIR requests
/// with tokens already issued keep flowing.
#[tokio::test]
async fn replicas_share_state_through_redis() {
    let redis = Redis::start();
    let idp = Provider::start().await;
    let fhir = fhir().await;
    let backend = TestKey::ec384("backend-1");
    let extra = format!(
        "rate_limit = 2\n[authorization_server.store]\nurl = \"{}\"\ntimeout = \"500ms\"\n",
        redis.url()
    );
    let clients = format!(
        "\n[[authorization_server.clients]]\nclient_id = \"backend\"\njwks = '{}'\nscope = \"system/Patient.rs\"\n",
        jwks(&[&backend])
    );
    let text = env_config(&idp, &fhir, &extra) + &clients;
    let a = Env {
        gw: TestGateway::boot(&text).await,
        idp,
        _fhir: fhir,
    };
    let b = TestGateway::boot(&text).await;

    // Signed in on A, the provider's answer arrives at B, the consent posted to B.
    let txn = signed_in_at_provider(
        &a.idp.codes,
        &authorize_url(&a, &[]),
        "user-1",
        "Patient/123",
    )
    .await;
    let (st, _, page) = get_with(
        &b.url(&format!("/r4/auth/callback?code=idp-code&state={txn}")),
        Some(&txn),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{page}");
    let csrf = field(&page, "csrf");
    let (st, h, _) = post_form(
        &b.url("/r4/auth/consent"),
        &[
            ("txn", &txn),
            ("csrf", &csrf),
            ("decision", "approve"),
            ("scope", "launch/patient"),
            ("scope", "patient/*.rs"),
        ],
        Some(&txn),
    )
    .await;
    assert_eq!(st, StatusCode::FOUND);
    let code = query_of(&location(&h))["code"].clone();
    // Redeemed on A (issued by B), once across both.
    let (st, _, t) = redeem(&a, &code, VERIFIER).await;
    assert_eq!(st, StatusCode::OK, "{t}");
    let on_b = Env {
        gw: b,
        idp: Provider::start().await,
        _fhir: fhir_again().await,
    };
    assert_eq!(
        redeem(&on_b, &code, VERIFIER).await.0,
        StatusCode::BAD_REQUEST
    );

    // A client assertion used on A is a replay on B.
    let assertion = backend_assertion(&backend);
    let ask = |gw: &TestGateway| {
        let url = gw.url("/r4/auth/token");
        let assertion = assertion.clone();
        async move { backend_token_request(&url, &assertion).await }
    };
    let (st, _, first) = ask(&a.gw).await;
    assert_eq!(st, StatusCode::OK, "{first}");
    let (st, _, replay) = ask(&on_b.gw).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{replay}");
    assert!(replay.contains("replay"), "{replay}");

    // The rate limit holds across replicas: 2 a second for a client, wherever it asks. (Kept
    // by each replica alone, A and B would each allow 2 in the same second.)
    // Each replica's own bucket would be full again by now.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let local = tokio::task::LocalSet::new();
    let mut tasks = Vec::new();
    for i in 0..10 {
        let fresh = backend_assertion(&backend);
        let url = if i % 2 == 0 { &a.gw } else { &on_b.gw }.url("/r4/auth/token");
        // All at once: in one second, or two at most.
        tasks.push(local.spawn_local(async move {
            let before = now();
            let (st, _, _) = backend_token_request(&url, &fresh).await;
            (before, now(), st.as_u16())
        }));
    }
    let statuses = local
        .run_until(async move {
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        })
        .await;
    assert!(statuses.iter().any(|s| s.2 == 429), "{statuses:?}");
    for second in statuses.iter().map(|s| s.0) {
        let allowed = statuses
            .iter()
            .filter(|(b, a, st)| *b == second && *a == second && *st == 200)
            .count();
        assert!(allowed <= 2, "second {second}: {statuses:?}");
    }

    // The store goes away: token requests are refused (503), FHIR requests with the
    // tokens already issued are not.
    drop(redis);
    let (st, _, body) = refresh_like_token_request(&a.gw).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let access = t["access_token"].as_str().unwrap();
    assert_eq!(
        get_with_token(&a.gw.url("/r4/Patient/123"), access).await.0,
        StatusCode::OK
    );
    let (st, _, _) = get_with(&authorize_url(&a, &[]), None).await;
    assert_eq!(
        st,
        StatusCode::FOUND,
        "the app is sent back with temporarily_unavailable"
    );
}

/// A fresh client assertion of the backend client "backend" (ES384, new jti).
fn backend_assertion(key: &TestKey) -> String {
    let mut header = Header::new(Algorithm::ES384);
    header.kid = Some("backend-1".into());
    let claims = json!({
        "iss": "backend", "sub": "backend", "aud": "http://gateway.test/r4/auth/token",
        "jti": uuid::Uuid::new_v4().to_string(), "iat": now(), "exp": now() + 240,
    });
    jsonwebtoken::encode(&header, &claims, &key.encoding).unwrap()
}

/// `POST url` (a token endpoint): client_credentials for system/Patient.rs with `assertion`.
async fn backend_token_request(
    url: &str,
    assertion: &str,
) -> (StatusCode, http::HeaderMap, String) {
    post_form(
        url,
        &[
            ("grant_type", "client_credentials"),
            ("scope", "system/Patient.rs"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion),
        ],
        None,
    )
    .await
}

async fn fhir_again() -> FakeUpstream {
    fhir().await
}

/// A code redemption that needs the store.
async fn refresh_like_token_request(gw: &TestGateway) -> (StatusCode, http::HeaderMap, String) {
    post_form(
        &gw.url("/r4/auth/token"),
        &[
            ("grant_type", "authorization_code"),
            ("code", "c"),
            ("redirect_uri", REDIRECT),
            ("code_verifier", VERIFIER),
            ("client_id", APP),
        ],
        None,
    )
    .await
}

/// An EHR launch: the EHR mints the context (patient, encounter) at /auth/launch, the app
/// brings it to /authorize with the launch scope, and the token carries that context
/// whoever signs in (a clinician here). The context is used once; only a registered,
/// authenticated EHR may mint one.
#[tokio::test]
async fn ehr_launch() {
    let e = env().await;
    let mint = |auth: Option<String>, pairs: Vec<(&'static str, &'static str)>| {
        let url = e.gw.url("/r4/auth/launch");
        async move {
            let mut s = form_urlencoded::Serializer::new(String::new());
            for (k, v) in pairs {
                s.append_pair(k, v);
            }
            let mut req =
                Request::post(url).header("content-type", "application/x-www-form-urlencoded");
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let (st, h, b) = send(req.body(body(s.finish())).unwrap()).await;
            (
                st,
                h,
                serde_json::from_slice::<Value>(&b).unwrap_or(Value::Null),
            )
        }
    };
    let ehr = Some(basic_auth("ehr", "ehr-secret"));
    let (st, h, minted) = mint(ehr.clone(), vec![("patient", "456"), ("encounter", "e1")]).await;
    assert_eq!(st, StatusCode::OK, "{minted}");
    assert_eq!(h["cache-control"], "no-store");
    let launch = minted["launch"].as_str().unwrap().to_owned();
    // Not an EHR, not authenticated, not an id.
    assert_eq!(
        mint(None, vec![("patient", "456"), ("client_id", APP)])
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        mint(Some(basic_auth("ehr", "wrong")), vec![("patient", "456")])
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        mint(ehr.clone(), vec![("patient", "../456")]).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(mint(ehr.clone(), vec![]).await.0, StatusCode::BAD_REQUEST);

    let scope = "launch openid fhirUser patient/*.rs";
    let url = authorize_url(&e, &[("scope", scope), ("launch", &launch)]);
    let txn = signed_in_at_provider(&e.idp.codes, &url, "doc-1", "Practitioner/9").await;
    let (st, _, page) = get_with(
        &e.gw
            .url(&format!("/r4/auth/callback?code=idp-code&state={txn}")),
        Some(&txn),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{page}");
    let code = approve(
        &e,
        &txn,
        &page,
        &["launch", "openid", "fhirUser", "patient/*.rs"],
    )
    .await;
    let (st, _, t) = redeem(&e, &code, VERIFIER).await;
    assert_eq!(st, StatusCode::OK, "{t}");
    assert_eq!(t["patient"], "456");
    assert_eq!(t["encounter"], "e1");
    let access = t["access_token"].as_str().unwrap();
    assert_eq!(
        get_with_token(&e.gw.url("/r4/Patient/456"), access).await.0,
        StatusCode::OK
    );
    assert_eq!(
        get_with_token(&e.gw.url("/r4/Patient/123"), access).await.0,
        StatusCode::FORBIDDEN
    );

    // Used once; and the launch parameter and scope go together.
    for bad in [
        vec![("scope", scope), ("launch", launch.as_str())],
        vec![("scope", "launch openid patient/*.rs")],
        vec![("scope", "openid patient/*.rs"), ("launch", "x")],
    ] {
        let (st, h, _) = get_with(&authorize_url(&e, &bad), None).await;
        assert_eq!(st, StatusCode::FOUND);
        assert_eq!(
            query_of(&location(&h))["error"],
            "invalid_request",
            "{bad:?}"
        );
    }
}

/// A practitioner standalone launch with launch/patient picks the patient from the ones
/// the FHIR server lists (their scopes read every Patient); a patient not offered is
/// refused (picker tampering).
#[tokio::test]
async fn practitioner_picks_the_patient() {
    let idp = Provider::start().await;
    let fhir = fhir().await;
    let text = env_config(&idp, &fhir, "").replace(
        "scope = \"launch launch/patient openid fhirUser offline_access patient/*.rs\"",
        "scope = \"launch/patient openid user/Patient.rs patient/*.rs\"",
    );
    let e = Env {
        gw: TestGateway::boot(&text).await,
        idp,
        _fhir: fhir,
    };
    let scope = "launch/patient openid user/Patient.rs patient/*.rs";
    let start = |e: &Env| {
        let url = authorize_url(e, &[("scope", scope)]);
        let codes = e.idp.codes.clone();
        let gw = e.gw.url("/r4/auth/callback");
        async move {
            let txn = signed_in_at_provider(&codes, &url, "doc-1", "Practitioner/9").await;
            let (st, _, page) =
                get_with(&format!("{gw}?code=idp-code&state={txn}"), Some(&txn)).await;
            assert_eq!(st, StatusCode::OK, "{page}");
            (txn, page)
        }
    };
    let (txn, page) = start(&e).await;
    assert!(
        page.contains(r#"type="radio" name="patient" value="123""#),
        "{page}"
    );
    assert!(page.contains("Bo Lee"), "{page}");
    let csrf = field(&page, "csrf");
    let form = |patient: &'static str, txn: String, csrf: String| {
        vec![
            ("txn".to_owned(), txn),
            ("csrf".to_owned(), csrf),
            ("decision".to_owned(), "approve".to_owned()),
            ("scope".to_owned(), "launch/patient".to_owned()),
            ("scope".to_owned(), "patient/*.rs".to_owned()),
            ("patient".to_owned(), patient.to_owned()),
        ]
    };
    let post = |pairs: Vec<(String, String)>, cookie: String| {
        let url = e.gw.url("/r4/auth/consent");
        async move {
            let borrowed: Vec<(&str, &str)> = pairs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            post_form(&url, &borrowed, Some(&cookie)).await
        }
    };
    let (st, _, _) = post(form("999", txn.clone(), csrf.clone()), txn.clone()).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "a patient not offered");

    // The search box narrows the list; what it offers is what the form then accepts.
    let (txn, page) = start(&e).await;
    assert!(page.contains(r#"<label for="name">"#), "{page}");
    let search = |txn: &str, cookie: Option<&str>, name: &str| {
        let url = e.gw.url(&format!(
            "/r4/auth/consent?{}",
            form_urlencoded::Serializer::new(String::new())
                .append_pair("txn", txn)
                .append_pair("name", name)
                .finish()
        ));
        let cookie = cookie.map(str::to_owned);
        async move { get_with(&url, cookie.as_deref()).await }
    };
    let (st, h, found) = search(&txn, Some(&txn), "lee").await;
    assert_eq!(st, StatusCode::OK, "{found}");
    assert!(
        h["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'self'")
    );
    assert!(found.contains(r#"value="456""#), "{found}");
    assert!(!found.contains(r#"value="123""#), "{found}");
    assert!(
        found.contains(r#"value="lee""#),
        "the box keeps the search: {found}"
    );
    let csrf = field(&found, "csrf");
    let (st, _, _) = post(form("123", txn.clone(), csrf.clone()), txn.clone()).await;
    assert_eq!(
        st,
        StatusCode::FORBIDDEN,
        "no longer offered after the search"
    );
    // No match: said so, and the first page is offered again.
    let (txn, _) = start(&e).await;
    let (st, _, none) = search(&txn, Some(&txn), "<zed>").await;
    assert_eq!(st, StatusCode::OK, "{none}");
    assert!(
        none.contains("No patient matches &quot;&lt;zed&gt;&quot;"),
        "escaped: {none}"
    );
    assert!(
        none.contains(r#"value="123""#) && none.contains(r#"value="456""#),
        "{none}"
    );
    // Refused: another browser's sign-in, a name too long, a user offered no picker.
    assert_eq!(
        search(&txn, Some("other"), "lee").await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(search(&txn, None, "lee").await.0, StatusCode::BAD_REQUEST);
    assert_eq!(
        search(&txn, Some(&txn), &"a".repeat(101)).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        search("nope", Some("nope"), "lee").await.0,
        StatusCode::BAD_REQUEST
    );

    let (txn, page) = start(&e).await;
    let csrf = field(&page, "csrf");
    let (st, h, _) = post(form("456", txn.clone(), csrf), txn).await;
    assert_eq!(st, StatusCode::FOUND);
    let code = query_of(&location(&h))["code"].clone();
    let (st, _, t) = redeem(&e, &code, VERIFIER).await;
    assert_eq!(st, StatusCode::OK, "{t}");
    assert_eq!(t["patient"], "456");
    assert_eq!(t["scope"], "launch/patient patient/*.rs");
}

/// A confidential app (registered with a secret) must authenticate when it redeems its
/// code; naming itself is not enough.
#[tokio::test]
async fn confidential_apps_authenticate() {
    let idp = Provider::start().await;
    let fhir = fhir().await;
    let text = env_config(&idp, &fhir, "").replace(
        "client_id = \"patient-app\"\npublic = true",
        &format!(
            "client_id = \"patient-app\"\nclient_secret_hash = \"sha256:{}\"",
            sha256_hex("app-secret")
        ),
    );
    let e = Env {
        gw: TestGateway::boot(&text).await,
        idp,
        _fhir: fhir,
    };
    let (txn, page) = sign_in(&e, "Patient/123").await;
    let code = approve(&e, &txn, &page, &["launch/patient", "patient/*.rs"]).await;
    // Named only: refused, and the code is still good for the authenticated client.
    let (st, _, t) = redeem(&e, &code, VERIFIER).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{t}");
    let redeem_as = |secret: &'static str| {
        let url = e.gw.url("/r4/auth/token");
        let code = code.clone();
        async move {
            let mut s = form_urlencoded::Serializer::new(String::new());
            for (k, v) in [
                ("grant_type", "authorization_code"),
                ("code", code.as_str()),
                ("redirect_uri", REDIRECT),
                ("code_verifier", VERIFIER),
            ] {
                s.append_pair(k, v);
            }
            let req = Request::post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .header("authorization", basic_auth(APP, secret))
                .body(body(s.finish()))
                .unwrap();
            send(req).await.0
        }
    };
    assert_eq!(redeem_as("wrong").await, StatusCode::UNAUTHORIZED);
    assert_eq!(redeem_as("app-secret").await, StatusCode::OK);
}

/// A reload that changes the authorization server (a client added) keeps the state in
/// memory: a refresh token issued before it still works after it.
#[tokio::test]
async fn a_reload_forgets_no_refresh_token() {
    let idp = Provider::start().await;
    let fhir = fhir().await;
    let text = env_config(&idp, &fhir, "");
    let e = Env {
        gw: TestGateway::boot(&text).await,
        idp,
        _fhir: fhir,
    };
    let (txn, page) = sign_in(&e, "Patient/123").await;
    let code = approve(
        &e,
        &txn,
        &page,
        &["launch/patient", "offline_access", "patient/*.rs"],
    )
    .await;
    let (_, _, t) = redeem(&e, &code, VERIFIER).await;
    let rt = t["refresh_token"].as_str().unwrap().to_owned();
    e.gw.rewrite_config(&format!(
        "{text}\n[[authorization_server.clients]]\nclient_id = \"late-app\"\npublic = true\nredirect_uris = [\"https://late.test/cb\"]\nscope = \"patient/*.rs\"\n"
    ));
    e.gw.handle.reload().unwrap();
    let (st, r) = refresh(&e, &rt).await;
    assert_eq!(st, StatusCode::OK, "{r}");
}

/// `smartgate serve` processes on one configuration; `url` goes to the one chosen with
/// [`Processes::on`].
struct Processes {
    children: Vec<std::process::Child>,
    public: Vec<String>,
    at: std::cell::Cell<usize>,
}

impl Processes {
    fn start(config: &std::path::Path, n: usize) -> Processes {
        let mut children = Vec::new();
        let mut public = Vec::new();
        for _ in 0..n {
            let (child, _log, addr, _admin) = crate::binary::spawn_gateway(config);
            children.push(child);
            public.push(addr);
        }
        Processes {
            children,
            public,
            at: std::cell::Cell::new(0),
        }
    }

    fn on(&self, i: usize) -> &Processes {
        self.at.set(i);
        self
    }
}

impl Gw for Processes {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.public[self.at.get()])
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Two `smartgate` processes (the binary, as deployed) on one Valkey/Redis and one signing
/// key: a sign-in begun on one is approved on the other; a code is redeemed once across
/// both; a refresh token rotated on one is a reuse on the other, which revokes its family
/// there too; a client assertion used on one is a replay on the other; an access token
/// from one is good on the other.
#[tokio::test]
async fn two_processes_share_state_through_redis() {
    let redis = Redis::start();
    let idp = Provider::start().await;
    let fhir = fhir().await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("gateway.pem");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_smartgate"))
        .args(["keygen", "--alg", "ES384", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success());
    let backend = TestKey::ec384("backend-1");
    let extra = format!(
        "signing_key = \"{}\"\n[authorization_server.store]\nurl = \"{}\"\n",
        key.display(),
        redis.url()
    );
    let clients = format!(
        "\n[[authorization_server.clients]]\nclient_id = \"backend\"\njwks = '{}'\nscope = \"system/Patient.rs\"\n",
        jwks(&[&backend])
    );
    let config = dir.path().join("smartgate.toml");
    std::fs::write(&config, env_config(&idp, &fhir, &extra) + &clients).unwrap();
    let e = Env {
        gw: Processes::start(&config, 2),
        idp,
        _fhir: fhir,
    };
    assert_ne!(e.gw.public[0], e.gw.public[1]);

    e.gw.on(0);
    let (txn, page) = sign_in(&e, "Patient/123").await;
    e.gw.on(1);
    let code = approve(
        &e,
        &txn,
        &page,
        &["launch/patient", "offline_access", "patient/*.rs"],
    )
    .await;
    e.gw.on(0);
    let (st, _, t) = redeem(&e, &code, VERIFIER).await;
    assert_eq!(st, StatusCode::OK, "{t}");
    e.gw.on(1);
    assert_eq!(redeem(&e, &code, VERIFIER).await.0, StatusCode::BAD_REQUEST);

    // The access token minted by one process reads the patient through the other.
    let access = t["access_token"].as_str().unwrap();
    let (st, _, _) = get_with_token(&e.gw.on(1).url("/r4/Patient/123"), access).await;
    assert_eq!(st, StatusCode::OK);

    let first = t["refresh_token"].as_str().unwrap();
    let (st, r1) = refresh(&e, first).await;
    assert_eq!(st, StatusCode::OK, "{r1}");
    e.gw.on(0);
    assert_eq!(
        refresh(&e, first).await.0,
        StatusCode::BAD_REQUEST,
        "rotated on B"
    );
    let second = r1["refresh_token"].as_str().unwrap();
    assert_eq!(
        refresh(&e, second).await.0,
        StatusCode::BAD_REQUEST,
        "the family ended with the reuse"
    );

    let assertion = backend_assertion(&backend);
    let ask = |url: String| {
        let assertion = assertion.clone();
        async move { backend_token_request(&url, &assertion).await }
    };
    let (st, _, body) = ask(e.gw.on(0).url("/r4/auth/token")).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let (st, _, body) = ask(e.gw.on(1).url("/r4/auth/token")).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains("replay"), "{body}");
}
