//! What a cached token costs, and that the token cache stays at its bound: heap bytes
//! (as requested from the allocator) counted while an authenticator verifies tens of
//! thousands of distinct tokens.
//!
//! Each batch of tokens is verified on a thread of its own, so the per-worker caches in
//! front of the shared one (`auth::LOCAL`, bounded apart) die with it and are not
//! counted: what remains is the shared cache and what its principals hold.

#[path = "support/counting.rs"]
mod counting;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use smartgate::auth::Authenticator;
use smartgate::config::Config;
use smartgate::metrics::Metrics;
use smartgate::outbound::Outbound;

#[global_allocator]
static ALLOC: counting::Counting = counting::Counting;

/// The cache bound of the test (`auth.cache_max_entries`).
const CAP: usize = 20_000;
/// The target: bytes a cached token may cost.
const MAX_BYTES_PER_TOKEN: usize = 300;

fn b64(v: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(v)
}

/// `n` distinct ES256 tokens for patient tokens of 1,000 users, as an app fleet has.
fn tokens(key: &EcdsaKeyPair, n: usize) -> Vec<String> {
    let rng = SystemRandom::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = b64(br#"{"alg":"ES256","kid":"k","typ":"at+jwt"}"#);
    (0..n)
        .map(|i| {
            let claims = serde_json::json!({
                "iss": "https://issuer.test", "aud": "http://gateway.test/r4",
                "sub": format!("user-{}", i % 1000), "client_id": "app",
                "scope": "launch/patient patient/*.rs openid fhirUser",
                "patient": format!("Patient/p{}", i % 1000),
                "fhirUser": format!("Patient/p{}", i % 1000),
                "jti": format!("t-{i}"), "iat": now, "exp": now + 3600,
            });
            let signed = format!("{header}.{}", b64(claims.to_string().as_bytes()));
            let sig = key.sign(&rng, signed.as_bytes()).unwrap();
            format!("{signed}.{}", b64(sig.as_ref()))
        })
        .collect()
}

fn authenticator(key: &EcdsaKeyPair) -> Arc<Authenticator> {
    let public = key.public_key().as_ref();
    let jwks = serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-256", "kid": "k",
        "x": b64(&public[1..33]), "y": b64(&public[33..]),
    }]})
    .to_string();
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
public_base_url = "http://gateway.test/r4"
[upstream]
url = "http://127.0.0.1:1/fhir"
[auth]
mode = "jwt"
cache_max_entries = {CAP}
[auth.jwt]
issuer = "https://issuer.test"
audience = "http://gateway.test/r4"
jwks = '{jwks}'
algorithms = ["ES256"]
"#
    );
    let config = Config::parse(&text, "memory test", Vec::new()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    Authenticator::new(
        &config,
        &Outbound::new(None).unwrap(),
        &Metrics::new(),
        None,
    )
    .unwrap()
    .unwrap()
}

/// Authenticates `batch` on a thread of its own; every token must be accepted.
fn run(auth: &Arc<Authenticator>, batch: &[String]) {
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                for t in batch {
                    auth.authenticate(t).await.unwrap();
                }
            });
        });
    });
}

fn live() -> usize {
    counting::LIVE.load(Ordering::Relaxed)
}

#[test]
fn cached_tokens_are_small_and_the_cache_stays_at_its_bound() {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
    let all = tokens(&key, 3 * CAP);
    let auth = authenticator(&key);

    // Warm: the first tokens bring the metric series, the interned scopes and the like.
    run(&auth, &all[..1000]);
    let (warm, warm_entries) = (live(), auth.cached_verdicts());
    run(&auth, &all[1000..CAP]);
    let (full, entries) = (live(), auth.cached_verdicts());
    // Sharded: a shard at its share evicts while others still have room.
    let bound = CAP as u64 + 64;
    assert!(entries <= bound && entries >= bound * 95 / 100, "{entries}");
    let per_token = (full - warm) / (entries - warm_entries) as usize;
    eprintln!("bytes per cached token: {per_token}");
    assert!(
        per_token <= MAX_BYTES_PER_TOKEN,
        "{per_token} bytes per cached token"
    );

    // Twice as many new tokens again: the cache recycles its slots; nothing else grows.
    for batch in all[CAP..].chunks(5000) {
        run(&auth, batch);
    }
    let after = live();
    assert!(auth.cached_verdicts() <= bound);
    eprintln!(
        "live heap full: {full}, after {} more tokens: {after}",
        2 * CAP
    );
    assert!(
        after <= full + full / 50,
        "grew from {full} to {after} bytes past the bound"
    );
}
