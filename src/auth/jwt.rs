//! JWT access tokens: header checks, key selection, signature and claims.

use std::sync::Arc;

use base64::Engine;
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};

use super::TokenError;
use super::jwks::{KeySet, KeySource, NoKeys};
use super::jws::{Compact, numeric_date};
use crate::config::JwtConfig;

/// Verifies tokens from one issuer for one audience.
pub struct JwtVerifier {
    issuer: String,
    audience: String,
    algorithms: Vec<Algorithm>,
    leeway: u64,
    keys: Arc<KeySource>,
}

/// The parts of a JOSE header we act on. `jku`, `x5u`, `jwk` and `x5c` are ignored: keys
/// come only from the configured JWKS.
struct JoseHeader {
    alg: Algorithm,
    kid: Option<String>,
}

impl JwtVerifier {
    /// A verifier over `keys`.
    pub fn new(cfg: &JwtConfig, leeway: std::time::Duration, keys: Arc<KeySource>) -> JwtVerifier {
        JwtVerifier {
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            algorithms: cfg
                .algorithms
                .iter()
                .filter_map(|a| a.as_str().parse().ok())
                .collect(),
            leeway: leeway.as_secs(),
            keys,
        }
    }

    /// The key source (for readiness and the refresh task).
    pub fn keys(&self) -> &Arc<KeySource> {
        &self.keys
    }

    /// Verifies `token`; the outer error means no keys could be had (503), the inner one
    /// that the token is refused (401).
    pub async fn verify(
        &self,
        token: &str,
    ) -> Result<Result<Map<String, Value>, TokenError>, NoKeys> {
        let (compact, header) = match Compact::parse(token).and_then(|c| {
            let h = self.header(&c.header)?;
            Ok((c, h))
        }) {
            Ok(parsed) => parsed,
            Err(e) => return Ok(Err(e)),
        };
        let keys = self.keys.keys().await?;
        let result = match self.verify_with(&compact, &header, &keys) {
            Err(TokenError::UnknownKey) => match self.keys.refetch_for_unknown_kid(&keys).await {
                Some(newer) => self.verify_with(&compact, &header, &newer),
                None => Err(TokenError::UnknownKey),
            },
            other => other,
        };
        Ok(result)
    }

    /// Checks the JOSE header before any cryptography: an allowed asymmetric `alg` (never
    /// `none`, never HS*), a token `typ`, a string `kid` if any.
    fn header(&self, obj: &Map<String, Value>) -> Result<JoseHeader, TokenError> {
        let alg = obj
            .get("alg")
            .and_then(Value::as_str)
            .ok_or(TokenError::Malformed)?;
        let alg: Algorithm = alg.parse().map_err(|_| TokenError::Algorithm)?;
        if !self.algorithms.contains(&alg) {
            return Err(TokenError::Algorithm);
        }
        // RFC 9068 §2.1: at+jwt; plain JWT or none is common. Anything else (id tokens
        // with other typs, logout tokens, DPoP proofs) is not an access token.
        if let Some(typ) = obj.get("typ") {
            let typ = typ.as_str().ok_or(TokenError::Type)?.to_ascii_lowercase();
            if !["jwt", "at+jwt", "application/at+jwt"].contains(&typ.as_str()) {
                return Err(TokenError::Type);
            }
        }
        let kid = match obj.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.clone()),
            Some(_) => return Err(TokenError::Malformed),
        };
        Ok(JoseHeader { alg, kid })
    }

    fn verify_with(
        &self,
        compact: &Compact<'_>,
        header: &JoseHeader,
        keys: &KeySet,
    ) -> Result<Map<String, Value>, TokenError> {
        let key = keys
            .find(header.kid.as_deref(), header.alg)
            .ok_or(TokenError::UnknownKey)?;
        let claims = compact.verify(&key.verifying, header.alg)?;
        self.check_claims(&claims)?;
        Ok(claims)
    }

    /// RFC 7519 §4.1 and RFC 9068 §4: `exp`, `iss` and `aud` present; not expired, not
    /// before `nbf` or `iat` (with the leeway); our issuer; our audience among `aud`; not
    /// bound to a key (`cnf`).
    fn check_claims(&self, claims: &Map<String, Value>) -> Result<(), TokenError> {
        let (Some(exp), Some(iss), Some(aud)) =
            (claims.get("exp"), claims.get("iss"), claims.get("aud"))
        else {
            return Err(TokenError::MissingClaim);
        };
        let now = jsonwebtoken::get_current_timestamp();
        if numeric_date(exp)?.saturating_add(self.leeway) < now {
            return Err(TokenError::Expired);
        }
        for name in ["nbf", "iat"] {
            if let Some(v) = claims.get(name)
                && numeric_date(v)? > now.saturating_add(self.leeway)
            {
                return Err(TokenError::NotYetValid);
            }
        }
        if iss.as_str() != Some(self.issuer.as_str()) {
            return Err(TokenError::Issuer);
        }
        let ours = |v: &Value| v.as_str() == Some(self.audience.as_str());
        let audience_ok = match aud {
            Value::String(_) => ours(aud),
            Value::Array(items) => items.iter().any(ours),
            _ => false,
        };
        if !audience_ok {
            return Err(TokenError::Audience);
        }
        if claims.contains_key("cnf") {
            return Err(TokenError::SenderConstrained);
        }
        Ok(())
    }
}

/// One base64url JSON segment of a compact JWS (header or claims), unverified, parsed
/// strictly (a repeated member name is refused).
pub fn decode_segment<T: serde::de::DeserializeOwned>(segment: &str) -> Option<T> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(segment)
        .ok()?;
    crate::json::parse_as(&raw).ok()
}
