//! The SMART configuration document, `{base}/.well-known/smart-configuration`
//! (SMART App Launch 2.2, conformance.html), built from `[smart]` and checked against the
//! specification when the configuration is loaded.

use serde_json::{Map, Value, json};

use crate::config::{BaseUrl, SmartConfig};

/// Capabilities defined by SMART App Launch 2.2 §"Capabilities".
const KNOWN_CAPABILITIES: &[&str] = &[
    "launch-ehr",
    "launch-standalone",
    "authorize-post",
    "client-public",
    "client-confidential-symmetric",
    "client-confidential-asymmetric",
    "sso-openid-connect",
    "context-passthrough-banner",
    "context-passthrough-style",
    "context-ehr-patient",
    "context-ehr-encounter",
    "context-standalone-patient",
    "context-standalone-encounter",
    "permission-offline",
    "permission-online",
    "permission-patient",
    "permission-user",
    "permission-v1",
    "permission-v2",
    "smart-app-state",
];

type KeyError = (String, String);

fn url(k: &str, v: &str) -> Result<(), KeyError> {
    BaseUrl::parse(v)
        .map(|_| ())
        .map_err(|m| (format!("smart.{k}"), m))
}

fn err<T>(k: &str, m: impl Into<String>) -> Result<T, KeyError> {
    Err((format!("smart.{k}"), m.into()))
}

/// Builds the document, or says which key breaks the specification.
pub fn document(cfg: &SmartConfig) -> Result<Value, KeyError> {
    let launch = check_endpoints(cfg)?;
    let methods = cfg
        .code_challenge_methods_supported
        .clone()
        .unwrap_or_else(|| vec!["S256".to_owned()]);
    if !methods.iter().any(|m| m == "S256") || methods.iter().any(|m| m == "plain") {
        return err(
            "code_challenge_methods_supported",
            format!("{methods:?} must contain \"S256\" and must not contain \"plain\""),
        );
    }
    let grants = grant_types(cfg, launch)?;
    for c in &cfg.capabilities {
        if !KNOWN_CAPABILITIES.contains(&c.as_str()) {
            tracing::warn!(capability = %c, "smart.capabilities: not a SMART 2.2 capability (typo?)");
        }
    }
    Ok(assemble(cfg, grants, methods))
}

/// The endpoints and what the capabilities require of them (SMART App Launch 2.2
/// conformance): whether a launch capability is listed.
fn check_endpoints(cfg: &SmartConfig) -> Result<bool, KeyError> {
    url("token_endpoint", &cfg.token_endpoint)?;
    if cfg.capabilities.is_empty() {
        return err("capabilities", "must list at least one capability");
    }
    let launch = cfg.capabilities.iter().any(|c| c.starts_with("launch-"));
    match (&cfg.authorization_endpoint, launch) {
        (Some(a), _) => url("authorization_endpoint", a)?,
        (None, true) => {
            return err(
                "authorization_endpoint",
                "is required when a launch-* capability is listed",
            );
        }
        (None, false) => {}
    }
    let sso = cfg.capabilities.iter().any(|c| c == "sso-openid-connect");
    match (&cfg.issuer, &cfg.jwks_uri, sso) {
        (Some(i), Some(j), true) => {
            url("issuer", i)?;
            url("jwks_uri", j)?;
        }
        (_, _, true) => {
            return err(
                "issuer",
                "issuer and jwks_uri are required with sso-openid-connect",
            );
        }
        (None, None, false) => {}
        (_, _, false) => {
            return err(
                "issuer",
                "issuer and jwks_uri belong only with the sso-openid-connect capability",
            );
        }
    }
    for (k, v) in cfg.optional_endpoints() {
        if let Some(v) = v {
            url(k, v)?;
        }
    }
    Ok(launch)
}

/// `grant_types_supported` as configured, or derived from the capabilities.
fn grant_types(cfg: &SmartConfig, launch: bool) -> Result<Vec<String>, KeyError> {
    match &cfg.grant_types_supported {
        Some(g) if g.is_empty() => {
            err("grant_types_supported", "must list at least one grant type")
        }
        Some(g) => Ok(g.clone()),
        None => {
            let mut g = Vec::new();
            if launch {
                g.push("authorization_code".to_owned());
            }
            if cfg.capabilities.iter().any(|c| {
                c == "client-confidential-asymmetric" || c == "client-confidential-symmetric"
            }) && !launch
            {
                g.push("client_credentials".to_owned());
            }
            if g.is_empty() {
                return err(
                    "grant_types_supported",
                    "cannot be derived from the capabilities; list it",
                );
            }
            Ok(g)
        }
    }
}

/// The document's members, from checked parts.
fn assemble(cfg: &SmartConfig, grants: Vec<String>, methods: Vec<String>) -> Value {
    let mut doc = Map::new();
    let mut put = |k: &str, v: Value| {
        doc.insert(k.to_owned(), v);
    };
    if let Some(i) = &cfg.issuer {
        put("issuer", json!(i));
    }
    if let Some(j) = &cfg.jwks_uri {
        put("jwks_uri", json!(j));
    }
    if let Some(a) = &cfg.authorization_endpoint {
        put("authorization_endpoint", json!(a));
    }
    put("grant_types_supported", json!(grants));
    put("token_endpoint", json!(cfg.token_endpoint));
    put("capabilities", json!(cfg.capabilities));
    put("code_challenge_methods_supported", json!(methods));
    for (k, v) in [
        (
            "token_endpoint_auth_methods_supported",
            &cfg.token_endpoint_auth_methods_supported,
        ),
        (
            "token_endpoint_auth_signing_alg_values_supported",
            &cfg.token_endpoint_auth_signing_alg_values_supported,
        ),
        ("scopes_supported", &cfg.scopes_supported),
        ("response_types_supported", &cfg.response_types_supported),
    ] {
        if let Some(v) = v {
            put(k, json!(v));
        }
    }
    for (k, v) in cfg.optional_endpoints() {
        if let Some(v) = v {
            put(k, json!(v));
        }
    }
    Value::Object(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SmartConfig {
        SmartConfig {
            authorization_endpoint: Some("https://as.example.org/authorize".into()),
            token_endpoint: "https://as.example.org/token".into(),
            capabilities: vec!["launch-standalone".into(), "permission-v2".into()],
            ..SmartConfig::default()
        }
    }

    /// Required fields are present; grant types and PKCE methods are derived.
    #[test]
    fn builds_document() {
        let d = document(&cfg()).unwrap();
        assert_eq!(d["token_endpoint"], "https://as.example.org/token");
        assert_eq!(d["grant_types_supported"], json!(["authorization_code"]));
        assert_eq!(d["code_challenge_methods_supported"], json!(["S256"]));
        assert!(d.get("issuer").is_none());
    }

    /// Each conformance rule names its key.
    #[test]
    fn conformance_rules() {
        let key = |c: SmartConfig| document(&c).unwrap_err().0;
        let mut c = cfg();
        c.authorization_endpoint = None;
        assert_eq!(key(c), "smart.authorization_endpoint");
        let mut c = cfg();
        c.code_challenge_methods_supported = Some(vec!["S256".into(), "plain".into()]);
        assert_eq!(key(c), "smart.code_challenge_methods_supported");
        let mut c = cfg();
        c.code_challenge_methods_supported = Some(vec![]);
        assert_eq!(key(c), "smart.code_challenge_methods_supported");
        let mut c = cfg();
        c.capabilities.push("sso-openid-connect".into());
        assert_eq!(key(c), "smart.issuer");
        let mut c = cfg();
        c.issuer = Some("https://as.example.org".into());
        assert_eq!(key(c), "smart.issuer");
        let mut c = cfg();
        c.token_endpoint = "/token".into();
        assert_eq!(key(c), "smart.token_endpoint");
        let mut c = cfg();
        c.capabilities.clear();
        assert_eq!(key(c), "smart.capabilities");
        let mut c = cfg();
        c.revocation_endpoint = Some("not a url".into());
        assert_eq!(key(c), "smart.revocation_endpoint");
        let mut c = cfg();
        c.grant_types_supported = Some(vec![]);
        assert_eq!(key(c), "smart.grant_types_supported");
    }

    /// Backend-services servers derive client_credentials; OIDC needs issuer and jwks_uri.
    #[test]
    fn backend_and_sso() {
        let c = SmartConfig {
            token_endpoint: "https://as.example.org/token".into(),
            capabilities: vec!["client-confidential-asymmetric".into()],
            ..SmartConfig::default()
        };
        assert_eq!(
            document(&c).unwrap()["grant_types_supported"],
            json!(["client_credentials"])
        );
        let mut c = cfg();
        c.capabilities.push("sso-openid-connect".into());
        c.issuer = Some("https://as.example.org".into());
        c.jwks_uri = Some("https://as.example.org/jwks".into());
        let d = document(&c).unwrap();
        assert_eq!(d["issuer"], "https://as.example.org");
        assert_eq!(d["jwks_uri"], "https://as.example.org/jwks");
    }
}
