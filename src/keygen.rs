//! `smartgate keygen`: a signing key for the gateway (or a test client), as a PKCS#8 PEM
//! file, and its public JWKS.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair,
};
use base64::Engine;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey};

/// A new key: the PEM private key and the public JWKS (with a `kid` derived from the
/// key's RFC 7638 thumbprint).
pub fn generate(alg: &str) -> Result<(String, JwkSet), String> {
    let (ring_alg, jwt_alg) = match alg {
        "ES384" => (&ECDSA_P384_SHA384_FIXED_SIGNING, Algorithm::ES384),
        "ES256" => (&ECDSA_P256_SHA256_FIXED_SIGNING, Algorithm::ES256),
        other => {
            return Err(format!(
                "--alg {other:?}: supported are ES384 (default) and ES256"
            ));
        }
    };
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(ring_alg, &SystemRandom::new())
        .map_err(|_| "the system random generator failed".to_owned())?;
    let pem = pem_encode("PRIVATE KEY", pkcs8.as_ref());
    let encoding = EncodingKey::from_ec_pem(pem.as_bytes()).map_err(|e| e.to_string())?;
    let mut jwk = Jwk::from_encoding_key(&encoding, jwt_alg).map_err(|e| e.to_string())?;
    let kid = jwk
        .thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256)
        .map_err(|e| e.to_string())?;
    jwk.common.key_id = Some(kid);
    jwk.common.public_key_use = Some(jsonwebtoken::jwk::PublicKeyUse::Signature);
    Ok((pem, JwkSet { keys: vec![jwk] }))
}

/// A client assertion (RFC 7523 §3, SMART Backend Services): `iss` = `sub` = the client
/// id, `aud` = the token endpoint, a fresh `jti`, five minutes of validity. The `kid`
/// defaults to the key's thumbprint, as `keygen` publishes it.
pub fn client_assertion(
    pem: &[u8],
    alg: &str,
    client_id: &str,
    aud: &str,
    kid: Option<&str>,
) -> Result<String, String> {
    let jwt_alg: Algorithm = alg
        .parse()
        .map_err(|_| format!("--alg {alg:?} is not a JWS algorithm"))?;
    let key = match jwt_alg {
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(pem),
        Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => EncodingKey::from_rsa_pem(pem),
        _ => return Err(format!("--alg {alg}: use ES384, ES256, RS384 or RS256")),
    }
    .map_err(|e| format!("the key is not a {alg} private key: {e}"))?;
    let kid = match kid {
        Some(k) => k.to_owned(),
        None => Jwk::from_encoding_key(&key, jwt_alg)
            .and_then(|j| j.thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256))
            .map_err(|e| e.to_string())?,
    };
    let now = jsonwebtoken::get_current_timestamp();
    let mut header = jsonwebtoken::Header::new(jwt_alg);
    header.kid = Some(kid);
    let claims = serde_json::json!({
        "iss": client_id, "sub": client_id, "aud": aud,
        "jti": uuid::Uuid::new_v4().to_string(), "iat": now, "exp": now + 300,
    });
    jsonwebtoken::encode(&header, &claims, &key).map_err(|e| e.to_string())
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A generated key signs tokens that its published JWKS verifies.
    #[test]
    fn key_and_jwks_fit() {
        for alg in ["ES384", "ES256"] {
            let (pem, jwks) = generate(alg).unwrap();
            let jwt_alg: Algorithm = alg.parse().unwrap();
            let key = EncodingKey::from_ec_pem(pem.as_bytes()).unwrap();
            let mut header = jsonwebtoken::Header::new(jwt_alg);
            header.kid = jwks.keys[0].common.key_id.clone();
            let token = jsonwebtoken::encode(
                &header,
                &serde_json::json!({"sub": "x", "exp": jsonwebtoken::get_current_timestamp() + 60}),
                &key,
            )
            .unwrap();
            let decoding = jsonwebtoken::DecodingKey::from_jwk(&jwks.keys[0]).unwrap();
            let mut v = jsonwebtoken::Validation::new(jwt_alg);
            v.required_spec_claims.clear();
            v.validate_aud = false;
            jsonwebtoken::decode::<serde_json::Value>(&token, &decoding, &v).unwrap();
        }
        assert!(generate("RS384").is_err());
    }

    /// An assertion from a generated key verifies against the published JWKS by kid, with
    /// the RFC 7523 claims.
    #[test]
    fn assertion_fits_keygen() {
        let (pem, jwks) = generate("ES384").unwrap();
        let a = client_assertion(
            pem.as_bytes(),
            "ES384",
            "app-1",
            "https://gw/auth/token",
            None,
        )
        .unwrap();
        let header = jsonwebtoken::decode_header(&a).unwrap();
        assert_eq!(header.kid, jwks.keys[0].common.key_id);
        let decoding = jsonwebtoken::DecodingKey::from_jwk(&jwks.keys[0]).unwrap();
        let mut v = jsonwebtoken::Validation::new(Algorithm::ES384);
        v.set_audience(&["https://gw/auth/token"]);
        v.set_issuer(&["app-1"]);
        let c = jsonwebtoken::decode::<serde_json::Value>(&a, &decoding, &v)
            .unwrap()
            .claims;
        assert_eq!(c["sub"], "app-1");
        assert!(c["exp"].as_u64().unwrap() <= jsonwebtoken::get_current_timestamp() + 300);
        assert!(client_assertion(pem.as_bytes(), "RS384", "a", "b", None).is_err());
    }
}
