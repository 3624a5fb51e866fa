//! Test keys and a token minter. RSA keys come from the `openssl` CLI (Debian base image),
//! EC keys from rcgen; public JWKs are derived by jsonwebtoken from the private keys.
#![allow(dead_code)]

use std::process::Command;
use std::sync::{Arc, Mutex};

use base64::Engine;
use http::{Response, StatusCode};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::{FakeUpstream, Seen, TestGateway, config_auth};

/// A signing key with its public JWK.
#[derive(Clone)]
pub struct TestKey {
    pub kid: String,
    pub alg: Algorithm,
    pub pem: String,
    pub encoding: EncodingKey,
    pub jwk: Value,
}

impl TestKey {
    /// A fresh 2048-bit RSA key.
    pub fn rsa(kid: &str, alg: Algorithm) -> TestKey {
        let out = Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ])
            .output()
            .expect("openssl must be installed for the RSA tests");
        assert!(out.status.success(), "openssl genpkey failed");
        let pem = String::from_utf8(out.stdout).unwrap();
        let encoding = EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap();
        TestKey::finish(kid, alg, pem, encoding)
    }

    /// A fresh P-384 key (ES384).
    pub fn ec384(kid: &str) -> TestKey {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let pem = pair.serialize_pem();
        let encoding = EncodingKey::from_ec_pem(pem.as_bytes()).unwrap();
        TestKey::finish(kid, Algorithm::ES384, pem, encoding)
    }

    /// A fresh P-256 key (ES256).
    pub fn ec256(kid: &str) -> TestKey {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let pem = pair.serialize_pem();
        let encoding = EncodingKey::from_ec_pem(pem.as_bytes()).unwrap();
        TestKey::finish(kid, Algorithm::ES256, pem, encoding)
    }

    fn finish(kid: &str, alg: Algorithm, pem: String, encoding: EncodingKey) -> TestKey {
        let mut jwk: Jwk = Jwk::from_encoding_key(&encoding, alg).unwrap();
        jwk.common.key_id = Some(kid.to_owned());
        TestKey {
            kid: kid.to_owned(),
            alg,
            pem,
            encoding,
            jwk: serde_json::to_value(jwk).unwrap(),
        }
    }

    /// The same key material under another kid.
    pub fn with_kid(&self, kid: &str) -> TestKey {
        let mut k = self.clone();
        k.kid = kid.to_owned();
        k.jwk["kid"] = json!(kid);
        k
    }

    /// Signs `claims` with this key, `kid` and `typ: at+jwt` in the header.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        header.typ = Some("at+jwt".to_owned());
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }
}

/// A JWKS document of these keys.
pub fn jwks(keys: &[&TestKey]) -> Value {
    json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() })
}

pub const ISSUER: &str = "https://issuer.test";
pub const AUDIENCE: &str = "http://gateway.test/r4";

pub fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// Claims of a good SMART access token for patient 123.
pub fn claims() -> Value {
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user-1",
        "client_id": "app-1",
        "scope": "launch/patient user/*.cruds openid",
        "patient": "Patient/123",
        "fhirUser": "Practitioner/9",
        "iat": now(),
        "exp": now() + 300,
        "jti": uuid::Uuid::new_v4().to_string(),
    })
}

/// base64url without padding.
pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A fake authorization server publishing a JWKS (and an OpenID discovery document
/// pointing at it). `down` makes it answer 503.
pub struct FakeJwks {
    pub server: FakeUpstream,
    pub doc: Arc<Mutex<Value>>,
    pub down: Arc<std::sync::atomic::AtomicBool>,
    /// Milliseconds each answer is delayed.
    pub delay_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl FakeJwks {
    pub async fn start(keys: &[&TestKey]) -> FakeJwks {
        let doc = Arc::new(Mutex::new(jwks(keys)));
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (d, dn, delay) = (doc.clone(), down.clone(), delay_ms.clone());
        let base = Arc::new(std::sync::OnceLock::<String>::new());
        let b = base.clone();
        let server = FakeUpstream::start(Arc::new(move |seen: &Seen| {
            let resp = if dn.load(std::sync::atomic::Ordering::SeqCst) {
                Response::builder()
                    .status(StatusCode::SERVICE_UNAVAILABLE)
                    .body(smartgate::body::empty())
                    .unwrap()
            } else if seen.uri.ends_with("/.well-known/openid-configuration") {
                let body =
                    json!({"issuer": ISSUER, "jwks_uri": format!("{}/jwks", b.get().unwrap())});
                Response::builder()
                    .header("content-type", "application/json")
                    .body(smartgate::body::full(body.to_string()))
                    .unwrap()
            } else {
                Response::builder()
                    .header("content-type", "application/json")
                    .header("cache-control", "public, max-age=3600")
                    .body(smartgate::body::full(d.lock().unwrap().to_string()))
                    .unwrap()
            };
            let wait = delay.load(std::sync::atomic::Ordering::SeqCst);
            Box::pin(async move {
                tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
                resp
            })
        }))
        .await;
        base.set(format!("http://{}", server.addr)).unwrap();
        FakeJwks {
            server,
            doc,
            down,
            delay_ms,
        }
    }

    pub fn uri(&self) -> String {
        format!("http://{}/jwks", self.server.addr)
    }

    /// JWKS fetches so far.
    pub fn fetches(&self) -> usize {
        self.server
            .requests()
            .iter()
            .filter(|s| s.uri.ends_with("/jwks"))
            .count()
    }

    pub fn set_keys(&self, keys: &[&TestKey]) {
        *self.doc.lock().unwrap() = jwks(keys);
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }
}

/// `[auth]` for JWT mode against `jwks_uri`.
pub fn jwt_auth(jwks_uri: &str, extra: &str) -> String {
    format!(
        "[auth]\nmode = \"jwt\"\n{extra}\n[auth.jwt]\nissuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"\njwks_uri = \"{jwks_uri}\"\nalgorithms = [\"RS256\", \"ES384\", \"ES256\"]\n"
    )
}

/// A token from the test issuer with `scope`, and `patient` in context or none.
pub fn token_with(key: &TestKey, scope: &str, patient: Option<&str>) -> String {
    let mut c = claims();
    c["scope"] = json!(scope);
    match patient {
        Some(p) => c["patient"] = json!(p),
        None => {
            c.as_object_mut().unwrap().remove("patient");
        }
    }
    key.sign(&c)
}

/// A gateway in JWT mode (one RS256 test key behind a fake JWKS) in front of `up`.
pub struct JwtGateway {
    pub up: FakeUpstream,
    pub key: TestKey,
    pub gw: TestGateway,
    _jwks: FakeJwks,
}

/// Boots a [`JwtGateway`]; `extra` is appended to the configuration, `upstream_extra`
/// goes into its `[upstream]` section.
pub async fn jwt_gateway(up: FakeUpstream, extra: &str, upstream_extra: &str) -> JwtGateway {
    let key = TestKey::rsa("rsa-1", Algorithm::RS256);
    let jwks = FakeJwks::start(&[&key]).await;
    let text = config_auth(&up.base(), &jwt_auth(&jwks.uri(), ""), extra).replace(
        "timeout = \"5s\"\n\n[",
        &format!("timeout = \"5s\"\n{upstream_extra}\n\n["),
    );
    let gw = TestGateway::boot(&text).await;
    JwtGateway {
        up,
        key,
        gw,
        _jwks: jwks,
    }
}

/// `method path` on `s`'s gateway with `token`, and a body of `(content type, text)`:
/// status, headers and the body as text.
pub async fn call_with(
    s: &JwtGateway,
    method: &str,
    path: &str,
    token: &str,
    content: Option<(&str, &str)>,
) -> (http::StatusCode, http::HeaderMap, String) {
    let mut req = http::Request::builder()
        .method(method)
        .uri(s.gw.url(path))
        .header("authorization", format!("Bearer {token}"));
    let b = match content {
        Some((ty, text)) => {
            req = req.header("content-type", ty);
            super::body(text.to_owned())
        }
        None => smartgate::body::empty(),
    };
    let (status, headers, bytes) = super::send(req.body(b).unwrap()).await;
    (
        status,
        headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}
