//! The gateway's own access tokens: JWTs (RFC 9068 `at+jwt`) signed with its ECDSA key,
//! and their in-process verification (no HTTP hop). aws-lc-rs does the ECDSA:
//! constant-time, and for P-384 three times as fast as ring or OpenSSL 3 here.

use std::path::Path;
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value, json};

use super::TokenError;
use super::jws::{Compact, VerifyingKey};
use super::jwt::decode_segment;

/// Signs and verifies the gateway's access tokens.
pub struct Issuer {
    key: EcdsaKeyPair,
    /// The public half, parsed once.
    verifying: VerifyingKey,
    alg: &'static str,
    jws_alg: Algorithm,
    kid: String,
    jwk: Value,
    /// `iss` of every token; also the `aud` (the public FHIR base URL).
    issuer: String,
    lifetime: Duration,
    rng: SystemRandom,
}

/// A token as issued.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The compact JWT.
    pub token: String,
    /// Seconds until it expires.
    pub expires_in: u64,
}

impl Issuer {
    /// The embedded authorization server's issuer as `config` sets it up, or `None` when
    /// the server is off. Errors name their key.
    pub fn from_config(config: &crate::config::Config) -> Result<Option<Issuer>, String> {
        let a = &config.authorization_server;
        if !a.enabled {
            return Ok(None);
        }
        let base = config.server.public_base_url.as_string();
        let base = base.trim_end_matches('/');
        let alg = a.signing_alg.as_str();
        let issuer = match &a.signing_key {
            Some(key) => Issuer::load(key, alg, base, a.token_lifetime.0),
            None => Issuer::from_pem(&ephemeral_pem(alg)?, alg, base, a.token_lifetime.0),
        };
        issuer
            .map(Some)
            .map_err(|e| format!("authorization_server.signing_key: {e}"))
    }

    /// Loads the PKCS#8 PEM key at `path` for `alg` (`ES384` or `ES256`); `issuer` is the
    /// public base URL.
    pub fn load(
        path: &Path,
        alg: &str,
        issuer: &str,
        lifetime: Duration,
    ) -> Result<Issuer, String> {
        let pem = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Issuer::from_pem(&pem, alg, issuer, lifetime)
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// As [`Issuer::load`], from the PEM text.
    pub fn from_pem(
        pem: &str,
        alg: &str,
        issuer: &str,
        lifetime: Duration,
    ) -> Result<Issuer, String> {
        let der = pem_decode(pem).ok_or("not a PEM \"PRIVATE KEY\" (PKCS#8)")?;
        let (signing, jws_alg, alg, crv, coord) = match alg {
            "ES384" => (
                &ECDSA_P384_SHA384_FIXED_SIGNING,
                Algorithm::ES384,
                "ES384",
                "P-384",
                48,
            ),
            "ES256" => (
                &ECDSA_P256_SHA256_FIXED_SIGNING,
                Algorithm::ES256,
                "ES256",
                "P-256",
                32,
            ),
            other => return Err(format!("{other:?} is not ES384 or ES256")),
        };
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(signing, &der)
            .map_err(|_| format!("not an {alg} ({crv}) PKCS#8 private key"))?;
        // Uncompressed point: 0x04 || x || y.
        let public = key.public_key().as_ref();
        if public.len() != 1 + 2 * coord {
            return Err("unexpected public key encoding".into());
        }
        let x = URL_SAFE_NO_PAD.encode(&public[1..=coord]);
        let y = URL_SAFE_NO_PAD.encode(&public[1 + coord..]);
        // RFC 7638 thumbprint: the required members in lexicographic order.
        let canonical = format!(r#"{{"crv":"{crv}","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let kid = URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            canonical.as_bytes(),
        ));
        let verifying =
            VerifyingKey::from_public(jws_alg, public).ok_or("the public key does not parse")?;
        let jwk =
            json!({"kty": "EC", "crv": crv, "x": x, "y": y, "kid": kid, "alg": alg, "use": "sig"});
        Ok(Issuer {
            key,
            verifying,
            alg,
            jws_alg,
            kid,
            jwk,
            issuer: issuer.trim_end_matches('/').to_owned(),
            lifetime,
            rng,
        })
    }

    /// `iss` of the tokens (and their `aud`).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The public JWKS (`/auth/jwks`).
    pub fn jwks(&self) -> Value {
        json!({"keys": [self.jwk]})
    }

    /// A new access token for `client_id` (acting for itself) with `scope`.
    pub fn issue(&self, client_id: &str, scope: &str) -> Result<Issued, String> {
        self.issue_for(client_id, client_id, scope, Map::new())
    }

    /// A new access token for `client_id` acting for the user `sub`, with `scope` and
    /// the launch context in `extra` (`patient`, `fhirUser`).
    pub fn issue_for(
        &self,
        client_id: &str,
        sub: &str,
        scope: &str,
        extra: Map<String, Value>,
    ) -> Result<Issued, String> {
        let now = jsonwebtoken::get_current_timestamp();
        let exp = now + self.lifetime.as_secs();
        let header = json!({"alg": self.alg, "typ": "at+jwt", "kid": self.kid});
        let mut claims = json!({
            "iss": self.issuer, "sub": sub, "aud": self.issuer, "client_id": client_id,
            "scope": scope, "jti": uuid::Uuid::new_v4().to_string(), "iat": now, "exp": exp,
        });
        for (k, v) in extra {
            claims[k] = v;
        }
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .key
            .sign(&self.rng, input.as_bytes())
            .map_err(|_| "signing failed".to_owned())?;
        Ok(Issued {
            token: format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref())),
            expires_in: exp - now,
        })
    }

    /// Whether `token` claims to be ours (its unverified `iss`): decides which verifier
    /// judges it. Cheap; no cryptography.
    pub fn claims_to_be_ours(&self, token: &str) -> bool {
        let mut parts = token.split('.');
        let (Some(_), Some(payload)) = (parts.next(), parts.next()) else {
            return false;
        };
        decode_segment::<Value>(payload).is_some_and(|v| v["iss"] == self.issuer.as_str())
    }

    /// Verifies one of our tokens in-process: header, signature, `iss`, `aud`, `exp`,
    /// `iat`. Returns its claims.
    pub fn verify(&self, token: &str, leeway: u64) -> Result<Map<String, Value>, TokenError> {
        let compact = Compact::parse(token)?;
        let header = &compact.header;
        if header.get("alg").and_then(Value::as_str) != Some(self.alg) {
            return Err(TokenError::Algorithm);
        }
        if header.get("kid").and_then(Value::as_str) != Some(self.kid.as_str()) {
            return Err(TokenError::UnknownKey);
        }
        if header.get("typ").and_then(Value::as_str) != Some("at+jwt") {
            return Err(TokenError::Type);
        }
        let claims = compact.verify(&self.verifying, self.jws_alg)?;
        if claims.get("iss").and_then(Value::as_str) != Some(self.issuer.as_str()) {
            return Err(TokenError::Issuer);
        }
        if claims.get("aud").and_then(Value::as_str) != Some(self.issuer.as_str()) {
            return Err(TokenError::Audience);
        }
        let now = jsonwebtoken::get_current_timestamp();
        let exp = claims
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or(TokenError::MissingClaim)?;
        if exp + leeway < now {
            return Err(TokenError::Expired);
        }
        if claims
            .get("iat")
            .and_then(Value::as_u64)
            .is_some_and(|iat| iat > now + leeway)
        {
            return Err(TokenError::NotYetValid);
        }
        Ok(claims)
    }
}

/// The DER inside a `-----BEGIN PRIVATE KEY-----` PEM block.
/// The process's own signing key for `alg`, generated on first use and kept until exit,
/// for an embedded server configured without `signing_key`: a reload keeps it, so the
/// tokens it issued stay valid.
pub fn ephemeral_pem(alg: &str) -> Result<String, String> {
    static KEYS: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());
    let mut keys = KEYS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, pem)) = keys.iter().find(|(a, _)| a == alg) {
        return Ok(pem.clone());
    }
    let (pem, _) = crate::keygen::generate(alg)?;
    tracing::warn!(
        alg,
        "authorization_server.signing_key is not set: signing with a key generated now; \
         its tokens end with this process and no other replica accepts them"
    );
    keys.push((alg.to_owned(), pem.clone()));
    Ok(pem)
}

fn pem_decode(pem: &str) -> Option<Vec<u8>> {
    let start = pem.find("-----BEGIN PRIVATE KEY-----")?;
    let body = &pem[start + "-----BEGIN PRIVATE KEY-----".len()..];
    let end = body.find("-----END PRIVATE KEY-----")?;
    let b64: String = body[..end].chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer(alg: &str) -> Issuer {
        let (pem, _) = crate::keygen::generate(alg).unwrap();
        Issuer::from_pem(
            &pem,
            alg,
            "https://fhir.example.org/r4/",
            Duration::from_secs(300),
        )
        .unwrap()
    }

    #[test]
    fn issue_and_verify() {
        for alg in ["ES384", "ES256"] {
            let i = issuer(alg);
            let t = i.issue("app", "system/*.rs").unwrap();
            assert_eq!(t.expires_in, 300);
            assert!(i.claims_to_be_ours(&t.token));
            let c = i.verify(&t.token, 0).unwrap();
            assert_eq!(c["iss"], "https://fhir.example.org/r4");
            assert_eq!(c["aud"], "https://fhir.example.org/r4");
            assert_eq!(c["sub"], "app");
            assert_eq!(c["client_id"], "app");
            assert_eq!(c["scope"], "system/*.rs");
            // The kid is the keygen thumbprint, so published JWKS and tokens agree.
            let (_, jwks) = crate::keygen::generate(alg).unwrap();
            assert_eq!(jwks.keys[0].common.key_id.as_ref().unwrap().len(), 43);
            // Tampering with any part fails.
            let mut parts: Vec<String> = t.token.split('.').map(str::to_owned).collect();
            let mut claims: Value =
                serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts[1]).unwrap()).unwrap();
            claims["scope"] = json!("system/*.cruds");
            parts[1] = URL_SAFE_NO_PAD.encode(claims.to_string());
            assert_eq!(i.verify(&parts.join("."), 0), Err(TokenError::Signature));
            // Another key's token (same issuer) fails.
            let other = issuer(alg).issue("app", "x").unwrap();
            assert!(i.verify(&other.token, 0).is_err());
            assert!(i.verify("a.b", 0).is_err());
            assert!(i.verify("a.b.c.d", 0).is_err());
        }
    }

    #[test]
    fn jwks_matches_keygen_thumbprint() {
        let (pem, jwks) = crate::keygen::generate("ES384").unwrap();
        let i = Issuer::from_pem(&pem, "ES384", "https://x", Duration::from_secs(60)).unwrap();
        assert_eq!(
            i.jwks()["keys"][0]["kid"],
            jwks.keys[0].common.key_id.clone().unwrap().as_str()
        );
        assert!(Issuer::from_pem(&pem, "ES256", "https://x", Duration::from_secs(60)).is_err());
        assert!(
            Issuer::from_pem("nonsense", "ES384", "https://x", Duration::from_secs(60)).is_err()
        );
    }
}
