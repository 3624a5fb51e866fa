//! From token claims (or an introspection response) to a [`Principal`].

use std::sync::Arc;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::config::ClaimsConfig;
use crate::smart::scope::Grants;

/// Who is calling and with what SMART context: what the authorization stage decides on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Principal {
    /// `sub`
    pub subject: Option<String>,
    /// The client the token was issued to.
    pub client_id: Option<String>,
    /// The granted scopes, as strings (parsed by the authorization engine).
    pub scopes: Vec<String>,
    /// The patient in context, as a bare id (`123`).
    pub patient: Option<String>,
    /// The encounter in context, as a bare id.
    pub encounter: Option<String>,
    /// `fhirUser`: the user as a FHIR resource URL.
    pub fhir_user: Option<String>,
    /// SMART 2.x `fhirContext`.
    pub fhir_context: Option<Value>,
    /// `exp`, seconds since the epoch.
    pub expires_at: Option<u64>,
    /// `jti`
    pub token_id: Option<String>,
    /// `iss`
    pub issuer: Option<String>,
    /// The scopes parsed once, when the token is first verified.
    #[serde(skip)]
    pub grants: Arc<Grants>,
    /// Unique per verification, never reused: keys per-token caches (decisions) so that
    /// nothing cached for one verification is seen by another.
    #[serde(skip)]
    pub id: u64,
}

/// Maps claims to a principal with the configured claim names.
pub fn principal(claims: &Map<String, Value>, names: &ClaimsConfig) -> Principal {
    let text = |name: &str| claims.get(name).and_then(Value::as_str).map(str::to_owned);
    let scopes = match claims.get(&names.scope).or_else(|| claims.get("scp")) {
        Some(Value::String(s)) => crate::smart::scope::split(s).map(str::to_owned).collect(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .flat_map(crate::smart::scope::split)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    };
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let grants = Arc::new(Grants::parse(scopes.iter().map(String::as_str)));
    Principal {
        id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        grants,
        subject: text("sub"),
        client_id: names.client_id.iter().find_map(|n| text(n)),
        scopes,
        patient: text(&names.patient).and_then(|p| resource_id(&p, "Patient")),
        encounter: text(&names.encounter).and_then(|e| resource_id(&e, "Encounter")),
        fhir_user: text(&names.fhir_user),
        fhir_context: claims.get(&names.fhir_context).cloned(),
        expires_at: claims.get("exp").and_then(Value::as_u64),
        token_id: text("jti"),
        issuer: text("iss"),
    }
}

/// The bare id from `123`, `Patient/123`, `Patient/123/_history/2` or an absolute URL
/// ending in `Patient/123[/_history/n]`. `None` when it is not a valid FHIR id
/// (`[A-Za-z0-9\-\.]{1,64}`) or names another resource type.
pub fn resource_id(reference: &str, resource_type: &str) -> Option<String> {
    let mut segments: Vec<&str> = reference.split('/').collect();
    if segments.len() >= 2 && segments[segments.len() - 2] == "_history" {
        segments.truncate(segments.len() - 2);
    }
    let id = *segments.last()?;
    if segments.len() >= 2 && segments[segments.len() - 2] != resource_type {
        return None;
    }
    crate::fhir::is_id(id).then(|| id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Patient ids are normalised from every form SMART servers use.
    #[test]
    fn patient_ids() {
        for (input, want) in [
            ("123", Some("123")),
            ("Patient/123", Some("123")),
            ("Patient/123/_history/2", Some("123")),
            (
                "https://ehr.example.org/fhir/Patient/abc-1.2",
                Some("abc-1.2"),
            ),
            ("Practitioner/9", None),
            ("Patient/", None),
            ("", None),
            ("Patient/12 3", None),
            ("../../etc/passwd", None),
        ] {
            assert_eq!(resource_id(input, "Patient").as_deref(), want, "{input}");
        }
    }

    /// A scope claim is split on SP only (RFC 6749 §3.3), as a string or as array items:
    /// a scope joined by any other white space grants nothing.
    #[test]
    fn scope_claims_split_on_sp_only() {
        let names = ClaimsConfig::default();
        for sep in ["\u{a0}", "\u{3000}", "\t", "\n", "\u{2003}"] {
            let joined = format!("patient/Patient.rs{sep}user/*.rs");
            for c in [json!({"scope": joined}), json!({"scp": [joined]})] {
                let p = principal(c.as_object().unwrap(), &names);
                assert!(p.grants.scopes.is_empty(), "{sep:?}: {:?}", p.grants);
                assert_eq!(p.scopes, std::slice::from_ref(&joined));
            }
        }
        let c = json!({"scope": "patient/Patient.rs user/*.rs"});
        let p = principal(c.as_object().unwrap(), &names);
        assert_eq!(p.grants.scopes.len(), 2);
    }

    /// Claims map to the principal; scope may be a string or (as `scp`) an array.
    #[test]
    fn maps_claims() {
        let names = ClaimsConfig::default();
        let c = json!({
            "sub": "u1", "azp": "app", "scope": "patient/*.rs  openid",
            "patient": "Patient/p1", "encounter": "e1", "fhirUser": "Practitioner/x",
            "exp": 2000000000u64, "jti": "j", "iss": "https://as",
            "fhirContext": [{"reference": "Observation/1"}]
        });
        let p = principal(c.as_object().unwrap(), &names);
        assert_eq!(p.client_id.as_deref(), Some("app"));
        assert_eq!(p.scopes, ["patient/*.rs", "openid"]);
        assert_eq!(p.patient.as_deref(), Some("p1"));
        assert_eq!(p.encounter.as_deref(), Some("e1"));
        assert_eq!(p.expires_at, Some(2000000000));
        assert!(p.fhir_context.is_some());

        let c = json!({"scp": ["user/Patient.r", "user/Observation.rs"], "client_id": "c"});
        let p = principal(c.as_object().unwrap(), &names);
        assert_eq!(p.scopes, ["user/Patient.r", "user/Observation.rs"]);
        assert_eq!(p.client_id.as_deref(), Some("c"));

        // Keycloak-style claim names through configuration.
        let names = ClaimsConfig {
            patient: "patient_id".into(),
            ..ClaimsConfig::default()
        };
        let c = json!({"patient_id": "42", "patient": "ignored"});
        assert_eq!(
            principal(c.as_object().unwrap(), &names).patient.as_deref(),
            Some("42")
        );
    }
}
