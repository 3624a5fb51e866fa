//! FHIR references, read exactly (FHIR R4 references.html): what a `Reference.reference`
//! string points to on *this* server, or nothing.
//!
//! `Patient/123`, `Patient/123/_history/2` and absolute URLs under one of the server's own
//! base URLs (upstream or public) name `("Patient", "123")`. Contained (`#x`), logical
//! (identifier-only), relative-to-elsewhere and foreign absolute references name nothing
//! here, so they can never make a resource a member of a compartment.

use serde_json::Value;

/// The `(type, id)` a reference string points to on this server, if any. `bases` are the
/// server's own base URLs, without trailing slash.
pub fn local_target<'a>(reference: &'a str, bases: &[String]) -> Option<(&'a str, &'a str)> {
    let relative = if reference.contains("://") {
        bases.iter().find_map(|b| {
            reference
                .strip_prefix(b.as_str())
                .and_then(|rest| rest.strip_prefix('/'))
        })?
    } else {
        reference
    };
    let mut parts = relative.split('/');
    let ty = parts.next()?;
    let id = parts.next()?;
    match (parts.next(), parts.next(), parts.next()) {
        (None, None, None) => {}
        (Some("_history"), Some(v), None) if super::is_id(v) => {}
        _ => return None,
    }
    let ty = super::request::resource_type(ty).ok()?;
    super::is_id(id).then_some((ty, id))
}

/// The target of a `Reference` element (`{"reference": "…"}`), if it is local.
pub fn reference_target<'a>(element: &'a Value, bases: &[String]) -> Option<(&'a str, &'a str)> {
    local_target(element.get("reference")?.as_str()?, bases)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Whether the reference points to `Patient/<patient>` on this server — exactly: `12`
    /// never matches `123`.
    pub fn is_patient(element: &Value, patient: &str, bases: &[String]) -> bool {
        reference_target(element, bases) == Some(("Patient", patient))
    }

    fn bases() -> Vec<String> {
        vec![
            "http://upstream:8081/fhir".into(),
            "https://fhir.example.org/r4".into(),
        ]
    }

    /// Every local form names the patient; nothing else does.
    #[test]
    fn exact_local_matching() {
        let b = bases();
        for r in [
            "Patient/123",
            "Patient/123/_history/2",
            "http://upstream:8081/fhir/Patient/123",
            "https://fhir.example.org/r4/Patient/123/_history/7",
        ] {
            assert!(is_patient(&json!({"reference": r}), "123", &b), "{r}");
        }
        for r in [
            "Patient/12",
            "Patient/1234",
            "Patient/123/extra",
            "Patient/123/_history",
            "patient/123",
            "Practitioner/123",
            "#p1",
            "https://elsewhere.org/fhir/Patient/123",
            "http://upstream:8081/fhirX/Patient/123",
            "http://upstream:8081/fhir/../Patient/123",
            "Patient/123?x=1",
            "/Patient/123",
            "Patient/12%33",
            "",
        ] {
            assert!(!is_patient(&json!({"reference": r}), "123", &b), "{r}");
        }
        // Logical (identifier-only) and malformed elements are never members.
        assert!(!is_patient(
            &json!({"identifier": {"value": "123"}}),
            "123",
            &b
        ));
        assert!(!is_patient(&json!({"reference": 123}), "123", &b));
        assert!(!is_patient(&json!("Patient/123"), "123", &b));
    }
}
