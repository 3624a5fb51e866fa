//! From token claims (or an introspection response) to a [`Principal`].
//!
//! A principal is kept for every cached token, so it holds only what the decision, the
//! audit line and the identity headers read, compactly: the parsed scopes are shared by
//! every token with the same scope claim ([`Interner`]), issuer and client id likewise,
//! and subject, patient and fhirUser share one allocation. About 180 bytes a token
//! (`tests/memory.rs` measures it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde::ser::SerializeMap;
use serde_json::{Map, Value};

use crate::config::ClaimsConfig;
use crate::smart::scope::Grants;

/// Who is calling and with what SMART context: what the authorization stage decides on.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    /// Unique per verification, never reused: keys per-token caches (decisions) so that
    /// nothing cached for one verification is seen by another.
    pub id: u64,
    /// `exp`, seconds since the epoch.
    pub expires_at: Option<u64>,
    /// The granted scopes, parsed once per distinct scope claim and shared.
    pub grants: Arc<Grants>,
    issuer: Option<Arc<str>>,
    client_id: Option<Arc<str>>,
    /// `sub`, the patient id and `fhirUser`, back to back; `ends` marks where each ends,
    /// `present` which exist.
    text: Box<str>,
    ends: [u16; 3],
    present: u8,
    /// Whether a request has used this verification since the one that made it.
    used: Used,
}

/// A flag that clones by value and never tells two principals apart.
#[derive(Debug, Default)]
struct Used(std::sync::atomic::AtomicBool);

impl Clone for Used {
    fn clone(&self) -> Used {
        Used(std::sync::atomic::AtomicBool::new(
            self.0.load(std::sync::atomic::Ordering::Relaxed),
        ))
    }
}

impl PartialEq for Used {
    fn eq(&self, _: &Used) -> bool {
        true
    }
}

/// The parts of a [`Principal`] that are text of its own.
#[derive(Debug, Default, Clone, Copy)]
pub struct Identity<'a> {
    /// `sub`
    pub subject: Option<&'a str>,
    /// The patient in context, as a bare id (`123`).
    pub patient: Option<&'a str>,
    /// `fhirUser`: the user as a FHIR resource URL.
    pub fhir_user: Option<&'a str>,
}

impl Principal {
    /// A principal for `who`. Its own text (subject, patient id, fhirUser) is at most
    /// [`TEXT_MAX`] bytes: a part that would pass it is left out, which fails closed (no
    /// patient, no patient context). Real claims are a small fraction of that.
    pub fn new(
        id: u64,
        expires_at: Option<u64>,
        grants: Arc<Grants>,
        issuer: Option<Arc<str>>,
        client_id: Option<Arc<str>>,
        who: Identity<'_>,
    ) -> Principal {
        let mut text = String::new();
        let mut ends = [0u16; 3];
        let mut present = 0u8;
        for (i, part) in [who.subject, who.patient, who.fhir_user].iter().enumerate() {
            if let Some(part) = part
                && text.len() + part.len() <= TEXT_MAX
            {
                text.push_str(part);
                present |= 1 << i;
            }
            ends[i] = text.len() as u16;
        }
        Principal {
            id,
            expires_at,
            grants,
            issuer,
            client_id,
            text: text.into_boxed_str(),
            ends,
            present,
            used: Used::default(),
        }
    }

    /// Records a use by a later request (a cache hit).
    pub fn mark_used(&self) {
        self.used
            .0
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a request other than the first has used this verification: a token seen
    /// once is not worth caching anything more for (the per-worker caches skip it).
    pub fn used_again(&self) -> bool {
        self.used.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn part(&self, i: usize) -> Option<&str> {
        if self.present & (1 << i) == 0 {
            return None;
        }
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        self.text.get(usize::from(start)..usize::from(self.ends[i]))
    }

    /// `sub`
    pub fn subject(&self) -> Option<&str> {
        self.part(0)
    }

    /// The patient in context, as a bare id (`123`).
    pub fn patient(&self) -> Option<&str> {
        self.part(1)
    }

    /// `fhirUser`: the user as a FHIR resource URL.
    pub fn fhir_user(&self) -> Option<&str> {
        self.part(2)
    }

    /// The client the token was issued to.
    pub fn client_id(&self) -> Option<&str> {
        self.client_id.as_deref()
    }

    /// `iss`
    pub fn issuer(&self) -> Option<&str> {
        self.issuer.as_deref()
    }

    /// The granted scope strings, space-separated.
    pub fn scope(&self) -> &str {
        &self.grants.text
    }

    /// Bytes this principal holds on the heap beside what it shares (for the memory
    /// documentation and tests).
    pub fn own_heap_bytes(&self) -> usize {
        std::mem::size_of::<Principal>() + self.text.len()
    }
}

/// What `explain-token` prints.
impl Serialize for Principal {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("subject", &self.subject())?;
        m.serialize_entry("client_id", &self.client_id())?;
        let scopes: Vec<&str> = crate::smart::scope::split(self.scope()).collect();
        m.serialize_entry("scopes", &scopes)?;
        m.serialize_entry("patient", &self.patient())?;
        m.serialize_entry("fhir_user", &self.fhir_user())?;
        m.serialize_entry("expires_at", &self.expires_at)?;
        m.serialize_entry("issuer", &self.issuer())?;
        m.end()
    }
}

/// Most bytes of text a principal holds of its own (subject, patient id, fhirUser).
pub const TEXT_MAX: usize = 1024;

/// Most distinct values an [`Interner`] keeps; past it, it starts over.
pub const INTERN_MAX: usize = 1024;
/// Longest value an [`Interner`] keeps (bytes); longer ones are not shared (still
/// correct, only larger). With [`INTERN_MAX`], an interner holds at most about 2 MiB of
/// text and the grants parsed from it.
pub const INTERN_TEXT_MAX: usize = 2048;

/// Shares one copy of each distinct value (scope claims → parsed grants, issuers, client
/// ids) between the principals of a verifier. Bounded: at most [`INTERN_MAX`] values of
/// at most [`INTERN_TEXT_MAX`] bytes, then it starts over (principals keep what they hold).
#[derive(Default)]
pub struct Interner {
    grants: Mutex<HashMap<Box<str>, Arc<Grants>>>,
    strings: Mutex<HashMap<Box<str>, Arc<str>>>,
}

impl Interner {
    /// The parsed grants of a scope claim (its scope strings joined by spaces).
    pub fn grants(&self, scope: &str) -> Arc<Grants> {
        let mut map = self
            .grants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(g) = map.get(scope) {
            return g.clone();
        }
        let g = Arc::new(Grants::parse(crate::smart::scope::split(scope)));
        if scope.len() > INTERN_TEXT_MAX {
            return g;
        }
        if map.len() >= INTERN_MAX {
            map.clear();
        }
        map.insert(scope.into(), g.clone());
        g
    }

    /// One shared copy of `s`.
    pub fn string(&self, s: &str) -> Arc<str> {
        let mut map = self
            .strings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(v) = map.get(s) {
            return v.clone();
        }
        let v: Arc<str> = Arc::from(s);
        if s.len() > INTERN_TEXT_MAX {
            return v;
        }
        if map.len() >= INTERN_MAX {
            map.clear();
        }
        map.insert(s.into(), v.clone());
        v
    }
}

/// Maps claims to a principal with the configured claim names.
pub fn principal(
    claims: &Map<String, Value>,
    names: &ClaimsConfig,
    shared: &Interner,
) -> Principal {
    let text = |name: &str| claims.get(name).and_then(Value::as_str);
    let scope = match claims.get(&names.scope).or_else(|| claims.get("scp")) {
        Some(Value::String(s)) => crate::smart::scope::split(s).collect::<Vec<_>>().join(" "),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .flat_map(crate::smart::scope::split)
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    };
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let patient = text(&names.patient).and_then(|p| resource_id(p, "Patient"));
    Principal::new(
        NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        claims.get("exp").and_then(Value::as_u64),
        shared.grants(&scope),
        text("iss").map(|i| shared.string(i)),
        names
            .client_id
            .iter()
            .find_map(|n| text(n))
            .map(|c| shared.string(c)),
        Identity {
            subject: text("sub"),
            patient: patient.as_deref(),
            fhir_user: text(&names.fhir_user),
        },
    )
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
                let p = principal(c.as_object().unwrap(), &names, &Interner::default());
                assert!(p.grants.scopes.is_empty(), "{sep:?}: {:?}", p.grants);
                assert_eq!(p.scope(), joined);
            }
        }
        let c = json!({"scope": "patient/Patient.rs user/*.rs"});
        let p = principal(c.as_object().unwrap(), &names, &Interner::default());
        assert_eq!(p.grants.scopes.len(), 2);
    }

    /// Tokens with the same scope claim share one parsed copy, and one of their client id.
    #[test]
    fn grants_are_shared() {
        let names = ClaimsConfig::default();
        let shared = Interner::default();
        let a = json!({"scope": "patient/*.rs openid", "client_id": "app", "sub": "a"});
        let b = json!({"scope": "patient/*.rs  openid", "client_id": "app", "sub": "b"});
        let (a, b) = (
            principal(a.as_object().unwrap(), &names, &shared),
            principal(b.as_object().unwrap(), &names, &shared),
        );
        assert!(Arc::ptr_eq(&a.grants, &b.grants));
        assert!(std::ptr::eq(a.client_id().unwrap(), b.client_id().unwrap()));
        assert_eq!((a.subject(), b.subject()), (Some("a"), Some("b")));
        // Empty parts are told from absent ones.
        let c = json!({"sub": "", "patient": "Patient/7"});
        let c = principal(c.as_object().unwrap(), &names, &shared);
        assert_eq!(
            (c.subject(), c.patient(), c.fhir_user()),
            (Some(""), Some("7"), None)
        );
    }

    /// A principal's own text is bounded: a part past the bound is left out, so an
    /// oversized patient claim gives no patient context rather than a large entry.
    #[test]
    fn own_text_is_bounded() {
        let names = ClaimsConfig::default();
        let c = json!({"sub": "s".repeat(1000), "patient": format!("Patient/{}", "1".repeat(60))});
        let p = principal(c.as_object().unwrap(), &names, &Interner::default());
        assert_eq!(p.subject().map(str::len), Some(1000));
        assert_eq!(p.patient(), None);
        assert!(p.own_heap_bytes() <= std::mem::size_of::<Principal>() + TEXT_MAX);
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
        let p = principal(c.as_object().unwrap(), &names, &Interner::default());
        assert_eq!(p.client_id(), Some("app"));
        assert_eq!(p.scope(), "patient/*.rs openid");
        assert_eq!(p.patient(), Some("p1"));
        assert_eq!(p.subject(), Some("u1"));
        assert_eq!(p.fhir_user(), Some("Practitioner/x"));
        assert_eq!(p.issuer(), Some("https://as"));
        assert_eq!(p.expires_at, Some(2000000000));

        let c = json!({"scp": ["user/Patient.r", "user/Observation.rs"], "client_id": "c"});
        let p = principal(c.as_object().unwrap(), &names, &Interner::default());
        assert_eq!(p.scope(), "user/Patient.r user/Observation.rs");
        assert_eq!(p.client_id(), Some("c"));
        assert_eq!(
            (p.subject(), p.patient(), p.fhir_user()),
            (None, None, None)
        );

        // Keycloak-style claim names through configuration.
        let names = ClaimsConfig {
            patient: "patient_id".into(),
            ..ClaimsConfig::default()
        };
        let c = json!({"patient_id": "42", "patient": "ignored"});
        assert_eq!(
            principal(c.as_object().unwrap(), &names, &Interner::default()).patient(),
            Some("42")
        );
    }
}
