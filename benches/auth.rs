//! Token paths: a cached token (hash + cache hit → Principal), and cold verification of
//! RS256 and ES384 tokens (header checks, key lookup, signature, claims, principal); the
//! embedded authorization server: issuing a token (verify an ES384 client assertion,
//! intersect scopes, sign an ES384 access token) and introspecting one of its tokens.
//!
//!   cargo bench --bench auth

use std::hint::black_box;
use std::process::Command;

use criterion::{Criterion, criterion_group, criterion_main};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use smartgate::auth::Authenticator;
use smartgate::config::Config;
use smartgate::metrics::Metrics;
use smartgate::outbound::Outbound;

fn key(alg: Algorithm, kid: &str) -> (EncodingKey, serde_json::Value) {
    let encoding = match alg {
        Algorithm::RS256 => {
            let out = Command::new("openssl")
                .args([
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                ])
                .output()
                .expect("openssl");
            EncodingKey::from_rsa_pem(&out.stdout).unwrap()
        }
        Algorithm::ES256 => {
            let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap()
        }
        _ => {
            let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
            EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap()
        }
    };
    let mut jwk = Jwk::from_encoding_key(&encoding, alg).unwrap();
    jwk.common.key_id = Some(kid.to_owned());
    (encoding, serde_json::to_value(jwk).unwrap())
}

fn token(encoding: &EncodingKey, alg: Algorithm, kid: &str) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    let claims = json!({
        "iss": "https://issuer.test", "aud": "http://gateway.test/r4", "sub": "u",
        "client_id": "app", "patient": "Patient/123", "iat": now, "exp": now + 3600,
        "scope": "launch/patient patient/Observation.rs patient/Patient.r patient/Condition.rs openid fhirUser",
    });
    jsonwebtoken::encode(&header, &claims, encoding).unwrap()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let (rsa, rsa_jwk) = key(Algorithm::RS256, "rsa");
    let (ec, ec_jwk) = key(Algorithm::ES384, "ec");
    let (p256, p256_jwk) = key(Algorithm::ES256, "p256");
    let jwks = json!({"keys": [rsa_jwk, ec_jwk, p256_jwk]})
        .to_string()
        .replace('"', "\\\"");
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
public_base_url = "http://gateway.test/r4"
[upstream]
url = "http://127.0.0.1:1/fhir"
[auth]
mode = "jwt"
[auth.jwt]
issuer = "https://issuer.test"
audience = "http://gateway.test/r4"
jwks = "{jwks}"
algorithms = ["RS256", "ES256", "ES384"]
"#
    );
    let config = Config::parse(&text, "bench", Vec::new()).unwrap();
    let outbound = Outbound::new(None).unwrap();
    let auth: std::sync::Arc<Authenticator> =
        Authenticator::new(&config, &outbound, &Metrics::new(), None)
            .unwrap()
            .unwrap();

    let rs256 = token(&rsa, Algorithm::RS256, "rsa");
    let es384 = token(&ec, Algorithm::ES384, "ec");
    let es256 = token(&p256, Algorithm::ES256, "p256");
    rt.block_on(auth.authenticate(&rs256)).unwrap();

    let mut g = c.benchmark_group("token");
    g.bench_function("cached", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(auth.authenticate(black_box(&rs256)).await.unwrap()) })
    });
    g.bench_function("cold_rs256", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(auth.verify(black_box(&rs256)).await.unwrap().unwrap()) })
    });
    g.bench_function("cold_es256", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(auth.verify(black_box(&es256)).await.unwrap().unwrap()) })
    });
    g.bench_function("cold_es384", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(auth.verify(black_box(&es384)).await.unwrap().unwrap()) })
    });
    g.finish();

    // The embedded authorization server.
    let (client_key, client_jwk) = key(Algorithm::ES384, "client");
    let client_jwks = json!({"keys": [client_jwk]}).to_string();
    let (gateway_pem, _) = smartgate::keygen::generate("ES384").unwrap();
    let issuer = smartgate::auth::issuer::Issuer::from_pem(
        &gateway_pem,
        "ES384",
        "http://gateway.test/r4",
        std::time::Duration::from_secs(300),
    )
    .unwrap();
    let as_text = format!(
        "{text}\n[authorization_server]\nenabled = false\n[[authorization_server.clients]]\nclient_id = \"app\"\nscope = \"system/*.rs\"\njwks = '{client_jwks}'\n"
    );
    let as_config = Config::parse(&as_text, "bench", Vec::new()).unwrap();
    let clients = smartgate::authz::clients::Clients::new(
        &as_config.authorization_server,
        "http://gateway.test/r4/auth/token",
        &outbound,
        &Metrics::new().jwks_fetches,
        Default::default(),
        &std::sync::Arc::new(smartgate::store::Store::Memory(
            smartgate::store::MemoryStore::new(16),
        )),
    )
    .unwrap();
    let client = clients.get("app").unwrap();
    let (clients, issuer_ref) = (&clients, &issuer);
    let assertion = || {
        let now = jsonwebtoken::get_current_timestamp();
        let mut header = Header::new(Algorithm::ES384);
        header.kid = Some("client".into());
        let claims = json!({
            "iss": "app", "sub": "app", "aud": "http://gateway.test/r4/auth/token",
            "jti": uuid::Uuid::new_v4().to_string(), "iat": now, "exp": now + 240,
        });
        jsonwebtoken::encode(&header, &claims, &client_key).unwrap()
    };
    let mut g = c.benchmark_group("authorization_server");
    g.bench_function("issue_token_es384", |b| {
        b.to_async(&rt).iter_batched(
            assertion,
            |a| async move {
                clients.verify_assertion(client, &a).await.unwrap();
                let scope = smartgate::authz::grant::grant("system/Observation.rs", &client.scope);
                black_box(issuer_ref.issue(&client.id, &scope).unwrap())
            },
            criterion::BatchSize::SmallInput,
        )
    });
    g.bench_function("sign_access_token_es384", |b| {
        b.iter(|| black_box(issuer.issue("app", "system/Observation.rs").unwrap()))
    });
    let ours = issuer.issue("app", "system/Observation.rs").unwrap().token;
    g.bench_function("introspect_embedded_token_es384", |b| {
        b.iter(|| black_box(issuer.verify(black_box(&ours), 0).unwrap()))
    });
    // signing_alg = "ES256": P-256 has ring's optimised code.
    let (pem256, _) = smartgate::keygen::generate("ES256").unwrap();
    let issuer256 = smartgate::auth::issuer::Issuer::from_pem(
        &pem256,
        "ES256",
        "http://gateway.test/r4",
        std::time::Duration::from_secs(300),
    )
    .unwrap();
    g.bench_function("sign_access_token_es256", |b| {
        b.iter(|| black_box(issuer256.issue("app", "system/Observation.rs").unwrap()))
    });
    let ours256 = issuer256
        .issue("app", "system/Observation.rs")
        .unwrap()
        .token;
    g.bench_function("introspect_embedded_token_es256", |b| {
        b.iter(|| black_box(issuer256.verify(black_box(&ours256), 0).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
