//! JWT access tokens: header checks, key selection, signature and claims.

use std::sync::Arc;

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};

use super::TokenError;
use super::jwks::{KeySet, KeySource, NoKeys};
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
        let header = match self.header(token) {
            Ok(h) => h,
            Err(e) => return Ok(Err(e)),
        };
        let keys = self.keys.keys().await?;
        let result = match self.verify_with(token, &header, &keys) {
            Err(TokenError::UnknownKey) => match self.keys.refetch_for_unknown_kid(&keys).await {
                Some(newer) => self.verify_with(token, &header, &newer),
                None => Err(TokenError::UnknownKey),
            },
            other => other,
        };
        Ok(result)
    }

    /// Checks the JOSE header before any cryptography: three parts, a JSON object, an
    /// allowed asymmetric `alg` (never `none`, never HS*), a token `typ`.
    fn header(&self, token: &str) -> Result<JoseHeader, TokenError> {
        let mut parts = token.split('.');
        let (Some(h), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let v: Value = decode_segment(h).ok_or(TokenError::Malformed)?;
        let obj = v.as_object().ok_or(TokenError::Malformed)?;
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
        token: &str,
        header: &JoseHeader,
        keys: &KeySet,
    ) -> Result<Map<String, Value>, TokenError> {
        let key = keys
            .find(header.kid.as_deref(), header.alg)
            .ok_or(TokenError::UnknownKey)?;
        let mut v = Validation::new(header.alg);
        v.algorithms = vec![header.alg];
        v.leeway = self.leeway;
        v.validate_exp = true;
        v.validate_nbf = true;
        v.set_issuer(&[&self.issuer]);
        v.set_audience(&[&self.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.decoding, &v)
            .map_err(|e| map_error(e.kind()))?;
        let claims = data.claims;
        if claims.contains_key("cnf") {
            return Err(TokenError::SenderConstrained);
        }
        if let Some(iat) = claims.get("iat") {
            let iat = iat.as_u64().ok_or(TokenError::Malformed)?;
            if iat > jsonwebtoken::get_current_timestamp() + self.leeway {
                return Err(TokenError::NotYetValid);
            }
        }
        Ok(claims)
    }
}

/// One base64url JSON segment of a compact JWS (header or claims), unverified.
pub fn decode_segment<T: serde::de::DeserializeOwned>(segment: &str) -> Option<T> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(segment)
        .ok()?;
    serde_json::from_slice(&raw).ok()
}

fn map_error(kind: &ErrorKind) -> TokenError {
    match kind {
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidEddsaKey => TokenError::Signature,
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidIssuer => TokenError::Issuer,
        ErrorKind::InvalidAudience => TokenError::Audience,
        ErrorKind::MissingRequiredClaim(_) => TokenError::MissingClaim,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::InvalidAlgorithmName => TokenError::Algorithm,
        _ => TokenError::Malformed,
    }
}
