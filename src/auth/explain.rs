//! `smartgate explain-token`: what the gateway makes of one token, for operators.

use serde_json::{Value, json};

use super::{AuthFailure, Authenticator, bearer};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::outbound::Outbound;

/// Verifies `token` as the gateway configured by `config` would, and describes the result
/// as JSON: the verdict, the principal or the refusal, and the token's header and claims
/// as sent (unverified, for reading only). With inline keys nothing touches the network.
pub async fn explain_token(config: &Config, token: &str) -> Result<Value, String> {
    let outbound = Outbound::new(config.upstream.ca_file.as_deref())?;
    let metrics = Metrics::new();
    let embedded = super::issuer::Issuer::from_config(config)?.map(std::sync::Arc::new);
    let auth = Authenticator::new(config, &outbound, &metrics, embedded)?
        .ok_or("auth.mode is \"none\": tokens are not checked")?;
    let token = token.trim();
    let mut out = json!({ "mode": auth.mode() });
    if let Some((header, claims)) = unverified_parts(token) {
        out["header"] = header;
        out["claims_as_sent"] = claims;
    }
    let header_map = {
        let mut h = http::HeaderMap::new();
        if let Ok(v) = http::HeaderValue::from_str(&format!("Bearer {token}")) {
            h.insert(http::header::AUTHORIZATION, v);
        }
        h
    };
    let verdict = match bearer::extract(&header_map, None) {
        Ok(t) => auth.authenticate(t).await,
        Err(e) => Err(AuthFailure::from(e)),
    };
    match verdict {
        Ok(p) => {
            out["verdict"] = json!("valid");
            out["principal"] = serde_json::to_value(&*p).map_err(|e| e.to_string())?;
        }
        Err(AuthFailure::Invalid(e)) => {
            out["verdict"] = json!("refused");
            out["reason"] = json!(e.code());
            out["http"] = json!(format!(
                "401 WWW-Authenticate: Bearer error=\"invalid_token\", error_description=\"{}\"",
                e.description()
            ));
        }
        Err(AuthFailure::InvalidRequest(why)) => {
            out["verdict"] = json!("refused");
            out["reason"] = json!(why);
        }
        Err(AuthFailure::Missing) => {
            out["verdict"] = json!("refused");
            out["reason"] = json!("empty token");
        }
        Err(AuthFailure::Unavailable) => {
            out["verdict"] = json!("undecided");
            out["reason"] = json!("signing keys or introspection endpoint unreachable (503)");
        }
    }
    Ok(out)
}

fn unverified_parts(token: &str) -> Option<(Value, Value)> {
    let mut parts = token.split('.');
    let header = super::jwt::decode_segment(parts.next()?)?;
    let claims = super::jwt::decode_segment(parts.next()?)?;
    Some((header, claims))
}
