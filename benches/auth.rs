//! Token paths: a cached token (hash + cache hit → Principal), and cold verification of
//! RS256 and ES384 tokens (header checks, key lookup, signature, claims, principal).
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
    let jwks = json!({"keys": [rsa_jwk, ec_jwk]})
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
algorithms = ["RS256", "ES384"]
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
    g.bench_function("cold_es384", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(auth.verify(black_box(&es384)).await.unwrap().unwrap()) })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
