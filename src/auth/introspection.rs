//! RFC 7662 token introspection, with SMART's response fields
//! (SMART App Launch 2.2, token-introspection).

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::Request;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use http_body_util::Full;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Map, Value};

use super::TokenError;
use crate::config::AssertionKeyAlgorithm;
use crate::config::IntrospectionConfig;
use crate::outbound::Outbound;

/// How the gateway authenticates to the introspection endpoint.
enum ClientAuth {
    /// `client_secret_basic` (RFC 6749 §2.3.1).
    Basic(HeaderValue),
    /// `private_key_jwt` (RFC 7523): a fresh signed assertion per call.
    PrivateKey {
        client_id: String,
        key: Box<EncodingKey>,
        alg: Algorithm,
    },
    /// A bearer token of the gateway's own.
    Bearer(HeaderValue),
}

/// The authorization server could not answer (timeout, 5xx, refused our credentials).
#[derive(Debug, Clone)]
pub struct Unavailable(pub String);

/// Introspects tokens at one endpoint.
pub struct Introspector {
    endpoint: String,
    auth: ClientAuth,
    audience: String,
    timeout: Duration,
    outbound: Outbound,
}

impl Introspector {
    /// Builds the client; `default_audience` is used when the section names none.
    pub fn new(
        cfg: &IntrospectionConfig,
        default_audience: &str,
        outbound: Outbound,
    ) -> Result<Introspector, String> {
        let auth = if let Some(secret) = &cfg.client_secret {
            let id = cfg.client_id.as_deref().unwrap_or_default();
            let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            let creds = base64::engine::general_purpose::STANDARD.encode(format!(
                "{}:{}",
                enc(id),
                enc(secret)
            ));
            let mut v = HeaderValue::from_str(&format!("Basic {creds}"))
                .map_err(|_| "auth.introspection.client_secret: not a valid header value")?;
            v.set_sensitive(true);
            ClientAuth::Basic(v)
        } else if let Some(path) = &cfg.private_key {
            let pem = std::fs::read(path)
                .map_err(|e| format!("auth.introspection.private_key: {}: {e}", path.display()))?;
            let (key, alg) = match cfg.private_key_alg {
                AssertionKeyAlgorithm::RS384 => (EncodingKey::from_rsa_pem(&pem), Algorithm::RS384),
                AssertionKeyAlgorithm::ES384 => (EncodingKey::from_ec_pem(&pem), Algorithm::ES384),
            };
            let key = key.map_err(|e| {
                format!(
                    "auth.introspection.private_key: {}: not a {} key: {e}",
                    path.display(),
                    cfg.private_key_alg.as_str()
                )
            })?;
            ClientAuth::PrivateKey {
                client_id: cfg.client_id.clone().unwrap_or_default(),
                key: Box::new(key),
                alg,
            }
        } else if let Some(token) = &cfg.bearer_token {
            let mut v = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| "auth.introspection.bearer_token: not a valid header value")?;
            v.set_sensitive(true);
            ClientAuth::Bearer(v)
        } else {
            return Err("auth.introspection: no client authentication configured".to_owned());
        };
        Ok(Introspector {
            endpoint: cfg.endpoint.clone(),
            auth,
            audience: cfg
                .audience
                .clone()
                .unwrap_or_else(|| default_audience.to_owned()),
            timeout: cfg.timeout.0,
            outbound,
        })
    }

    /// The endpoint (part of the cache key).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Introspects `token`: the response's fields as claims, or why the token is refused.
    pub async fn introspect(
        &self,
        token: &str,
    ) -> Result<Result<Map<String, Value>, TokenError>, Unavailable> {
        let req = self.request(token)?;
        let answer = self
            .outbound
            .call(req, self.timeout)
            .await
            .map_err(|e| Unavailable(format!("introspection endpoint: {e}")))?;
        if !answer.status.is_success() {
            return Err(Unavailable(format!(
                "introspection endpoint answered HTTP {}",
                answer.status
            )));
        }
        // Strictly: `"active"` or `"scope"` twice would be one answer here and another
        // to a first-name-wins reader.
        let v: Value = crate::json::parse(&answer.body).map_err(|_| {
            Unavailable("introspection response is not JSON, or repeats a member name".to_owned())
        })?;
        let Value::Object(claims) = v else {
            return Err(Unavailable(
                "introspection response is not a JSON object".to_owned(),
            ));
        };
        Ok(self.judge(claims))
    }

    /// The POST request, built whole before any await (the form serialiser is not Send).
    fn request(&self, token: &str) -> Result<Request<Full<Bytes>>, Unavailable> {
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("token", token);
        form.append_pair("token_type_hint", "access_token");
        let mut req = Request::post(&self.endpoint)
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json");
        match &self.auth {
            ClientAuth::Basic(v) | ClientAuth::Bearer(v) => {
                req = req.header(AUTHORIZATION, v.clone());
            }
            ClientAuth::PrivateKey {
                client_id,
                key,
                alg,
            } => {
                let assertion = self.assertion(client_id, key, *alg)?;
                form.append_pair(
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                );
                form.append_pair("client_assertion", &assertion);
                form.append_pair("client_id", client_id);
            }
        }
        req.body(Full::new(Bytes::from(form.finish())))
            .map_err(|e| Unavailable(format!("cannot build request: {e}")))
    }

    /// RFC 7662 §2.2: only `active: true` counts; an `aud`, when present, must include
    /// ours; an `exp`, when present, must not be past.
    fn judge(&self, claims: Map<String, Value>) -> Result<Map<String, Value>, TokenError> {
        if claims.get("active") != Some(&Value::Bool(true)) {
            return Err(TokenError::Inactive);
        }
        // RFC 9449 §6.2, RFC 8705 §3.2: a bound token's introspection carries `cnf`.
        if claims.contains_key("cnf") {
            return Err(TokenError::SenderConstrained);
        }
        match claims.get("aud") {
            None => {}
            Some(Value::String(a)) if *a == self.audience => {}
            Some(Value::Array(items))
                if items.iter().any(|a| a.as_str() == Some(&self.audience)) => {}
            Some(_) => return Err(TokenError::Audience),
        }
        if let Some(exp) = claims.get("exp") {
            let exp = exp.as_u64().ok_or(TokenError::Malformed)?;
            if exp <= jsonwebtoken::get_current_timestamp() {
                return Err(TokenError::Expired);
            }
        }
        Ok(claims)
    }

    /// RFC 7523 §3 client assertion: iss = sub = client_id, aud = the endpoint, short exp,
    /// fresh jti.
    fn assertion(
        &self,
        client_id: &str,
        key: &EncodingKey,
        alg: Algorithm,
    ) -> Result<String, Unavailable> {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = serde_json::json!({
            "iss": client_id,
            "sub": client_id,
            "aud": self.endpoint,
            "iat": now,
            "exp": now + 60,
            "jti": uuid::Uuid::new_v4().to_string(),
        });
        jsonwebtoken::encode(&Header::new(alg), &claims, key)
            .map_err(|e| Unavailable(format!("cannot sign client assertion: {e}")))
    }
}
