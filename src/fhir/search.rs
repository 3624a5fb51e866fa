//! Evaluating search parameters on a resource, the way a FHIR server would match it:
//! the element paths of the generated SearchParameter table, token values (FHIR R4
//! search.html#token) and references (search.html#reference). Only what the gateway can
//! evaluate exactly; anything else answers `None` ("cannot tell"), never `true`.

use serde_json::Value;

use super::generated::{
    CANONICAL_TYPES, PATIENT_COMPARTMENT_PATHS, ParamKind, SEARCH_PARAMS, SearchParam,
};
use super::reference::{local_target, reference_target};

/// The search parameter `code` of `ty`, if the gateway can evaluate it.
pub fn param(ty: &str, code: &str) -> Option<&'static SearchParam> {
    let i = SEARCH_PARAMS.binary_search_by(|(t, _)| (*t).cmp(ty)).ok()?;
    let params = SEARCH_PARAMS[i].1;
    params
        .binary_search_by(|p| p.code.cmp(code))
        .ok()
        .map(|j| &params[j])
}

/// Whether `ty` is in the Patient compartment, and by which element paths.
///
/// Additions to the R4 CompartmentDefinition, for types outside it that still hold one
/// patient's data (a `patient/` scope reading any instance would read everyone's), all
/// found from the SearchParameter definitions:
/// - a type with a `patient` search parameter (Contract, Device, GuidanceResponse) is in
///   the compartment of the patient it names;
/// - any other record (not a canonical resource) with reference parameters that may
///   point at a Patient (Linkage, MessageHeader, PaymentNotice, VerificationResult: each
///   points at "any" resource) is in the compartment of a patient it references there
///   directly, as FHIR places a resource in a compartment. One that points only at other
///   resources, say another patient's Observation, is in no one's;
/// - a Binary holds documents and images, and ids are often sequential. FHIR R4 names
///   `Binary.securityContext` as the resource whose access rules apply to it: a Binary
///   is in the compartment of the patient its `securityContext` references (with none,
///   or another resource there, in no one's).
pub fn compartment_paths(ty: &str) -> Option<&'static [(&'static str, &'static [&'static str])]> {
    if let Ok(i) = PATIENT_COMPARTMENT_PATHS.binary_search_by(|(t, _)| (*t).cmp(ty)) {
        return Some(PATIENT_COMPARTMENT_PATHS[i].1);
    }
    if ty == "Binary" {
        return Some(BINARY_COMPARTMENT);
    }
    let extra = &*PATIENT_PARAM_COMPARTMENT;
    extra
        .binary_search_by(|(t, _)| (*t).cmp(ty))
        .ok()
        .map(|i| &extra[i].1[..])
}

/// Types outside the R4 Patient compartment that name a patient (see
/// [`compartment_paths`]), each with the parameters that do and their paths, sorted by
/// type: the `patient` parameter where it points only at Patient, else, for records,
/// every reference parameter that may point at a Patient.
type CompartmentEntry = (&'static str, &'static [&'static str]);
static PATIENT_PARAM_COMPARTMENT: std::sync::LazyLock<Vec<(&'static str, Vec<CompartmentEntry>)>> =
    std::sync::LazyLock::new(|| {
        SEARCH_PARAMS
            .iter()
            .filter(|(ty, _)| {
                PATIENT_COMPARTMENT_PATHS
                    .binary_search_by(|(t, _)| t.cmp(ty))
                    .is_err()
            })
            .filter_map(|(ty, params)| {
                if let Some(p) = params.iter().find(|p| p.code == "patient") {
                    return (p.targets == ["Patient"] && !p.paths.is_empty())
                        .then(|| (*ty, vec![("patient", p.paths)]));
                }
                if CANONICAL_TYPES.binary_search(ty).is_ok() {
                    return None;
                }
                let naming: Vec<CompartmentEntry> = params
                    .iter()
                    .filter(|p| {
                        p.kind == ParamKind::Reference
                            && p.targets.contains(&"Patient")
                            && !p.paths.is_empty()
                    })
                    .map(|p| (p.code, p.paths))
                    .collect();
                (!naming.is_empty()).then_some((*ty, naming))
            })
            .collect()
    });

/// Binary's place in the compartment: its `securityContext` (see [`compartment_paths`]).
static BINARY_COMPARTMENT: &[(&str, &[&str])] = &[("securityContext", &["securityContext"])];

/// The top-level elements a check of a resource of type `ty` reads: the first step of
/// each compartment path (when `compartment`), and of each path of the `constrained`
/// search parameters. Sorted, without repeats.
pub fn checked_elements<'a>(
    ty: &str,
    compartment: bool,
    constrained: impl IntoIterator<Item = &'a str>,
) -> Vec<&'static str> {
    let first = |p: &'static str| p.split('.').next().unwrap_or(p);
    let mut out = Vec::new();
    // A Bundle is judged by its entries, a Subscription by its criteria
    // (`policy::judged_by_content`).
    match ty {
        _ if !compartment => {}
        "Bundle" => out.push("entry"),
        "Subscription" => out.push("criteria"),
        _ => {}
    }
    if compartment && let Some(params) = compartment_paths(ty) {
        for (_, paths) in params {
            out.extend(paths.iter().copied().map(first));
        }
    }
    for k in constrained {
        if let Some(p) = param(ty, k) {
            out.extend(p.paths.iter().copied().map(first));
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Every value at a dotted element path, arrays flattened at every step, in document
/// order. Depth first, without a list per step: it runs for every path of every checked
/// resource.
pub fn values_at<'a>(resource: &'a Value, path: &str, out: &mut Vec<&'a Value>) {
    let (step, rest) = match path.split_once('.') {
        Some((step, rest)) => (step, Some(rest)),
        None => (path, None),
    };
    let mut take = |v: &'a Value| match rest {
        Some(rest) => values_at(v, rest, out),
        None => out.push(v),
    };
    match resource.get(step) {
        Some(Value::Array(items)) => items.iter().for_each(&mut take),
        Some(Value::Null) | None => {}
        Some(v) => take(v),
    }
}

/// The bare ids of the patients a resource of type `ty` is in the compartment of: the
/// local `Patient/[id]` references at its compartment paths (for a Patient, its own id).
pub fn compartment_patients<'a>(ty: &str, resource: &'a Value, bases: &[String]) -> Vec<&'a str> {
    let mut ids = Vec::new();
    if ty == "Patient" {
        if let Some(id) = resource.get("id").and_then(Value::as_str) {
            ids.push(id);
        }
        return ids;
    }
    for e in compartment_elements(ty, resource) {
        if let Some(("Patient", id)) = reference_target(e, bases)
            && !ids.contains(&id)
        {
            ids.push(id);
        }
    }
    ids
}

/// The elements at the compartment paths of a resource of type `ty` (none for types
/// outside the compartment).
pub fn compartment_elements<'a>(ty: &str, resource: &'a Value) -> Vec<&'a Value> {
    let mut elems = Vec::new();
    for (_, paths) in compartment_paths(ty).unwrap_or_default() {
        for path in *paths {
            values_at(resource, path, &mut elems);
        }
    }
    elems
}

/// Whether a resource of type `ty` is in `patient`'s compartment. Types outside the
/// compartment are never in it.
pub fn in_compartment(ty: &str, resource: &Value, patient: &str, bases: &[String]) -> bool {
    compartment_patients(ty, resource, bases).contains(&patient)
}

/// Whether `resource` (of type `ty`) matches `code=value` — `Some(true/false)` — or the
/// gateway cannot evaluate it (`None`: unknown parameter, modifier, unsupported type).
/// `value` may be a comma list (any of).
pub fn matches(
    ty: &str,
    resource: &Value,
    code: &str,
    value: &str,
    bases: &[String],
) -> Option<bool> {
    if code.contains(':') || code.contains('.') {
        return None;
    }
    let p = param(ty, code)?;
    let mut elems = Vec::new();
    for path in p.paths {
        values_at(resource, path, &mut elems);
    }
    let mut any = false;
    for alt in value.split(',') {
        if alt.is_empty() {
            return None;
        }
        let hit = match p.kind {
            ParamKind::Token => {
                let want = parse_token(alt);
                elems.iter().any(|e| token_matches(e, &want))
            }
            ParamKind::Reference => {
                let want = parse_reference(alt, bases)?;
                elems.iter().any(|e| {
                    reference_target(e, bases)
                        .is_some_and(|(t, id)| id == want.1 && want.0.is_none_or(|w| w == t))
                })
            }
        };
        any |= hit;
    }
    Some(any)
}

/// A token query value: `code`, `system|code`, `|code` (no system), `system|`.
struct Token<'a> {
    /// `None`: any system; `Some("")`: no system.
    system: Option<&'a str>,
    /// `None`: any code (`system|`).
    code: Option<&'a str>,
}

fn parse_token(v: &str) -> Token<'_> {
    match v.split_once('|') {
        None => Token {
            system: None,
            code: Some(v),
        },
        Some((s, "")) => Token {
            system: Some(s),
            code: None,
        },
        Some((s, c)) => Token {
            system: Some(s),
            code: Some(c),
        },
    }
}

/// Whether an element (code, boolean, Coding, CodeableConcept, Identifier, ContactPoint)
/// matches a token.
fn token_matches(e: &Value, want: &Token<'_>) -> bool {
    let pair = |system: Option<&str>, code: Option<&str>| -> bool {
        let system_ok = match want.system {
            None => true,
            Some("") => system.is_none(),
            Some(s) => system == Some(s),
        };
        let code_ok = match want.code {
            None => true,
            Some(c) => code == Some(c),
        };
        system_ok && code_ok && (want.code.is_none() || code.is_some())
    };
    match e {
        Value::String(s) => pair(None, Some(s)),
        Value::Bool(b) => pair(None, Some(if *b { "true" } else { "false" })),
        Value::Object(o) => {
            if let Some(Value::Array(codings)) = o.get("coding") {
                return codings.iter().any(|c| token_matches(c, want));
            }
            let system = o.get("system").and_then(Value::as_str);
            // Coding.code; Identifier.value and ContactPoint.value.
            let code = o
                .get("code")
                .or_else(|| o.get("value"))
                .and_then(Value::as_str);
            pair(system, code)
        }
        _ => false,
    }
}

/// A reference query value: `Type/id`, an absolute URL under a local base, or a bare id.
fn parse_reference<'a>(v: &'a str, bases: &[String]) -> Option<(Option<&'a str>, &'a str)> {
    if v.contains('/') {
        let (t, id) = local_target(v, bases)?;
        Some((Some(t), id))
    } else {
        super::is_id(v).then_some((None, v))
    }
}

#[cfg(test)]
mod tests {

    /// Every value at a path, arrays flattened at every step, in document order; a
    /// null, a missing step or a step into a scalar gives nothing.
    #[test]
    fn values_at_flattens_in_document_order() {
        let r = serde_json::json!({
            "a": [{"b": [1, 2]}, {"b": 3}, {"c": 9}, {"b": null}, {"b": [[4], 5]}],
            "d": {"e": [6, 7]},
            "s": "x"
        });
        let at = |path: &str| {
            let mut out = Vec::new();
            super::values_at(&r, path, &mut out);
            serde_json::Value::from(out.into_iter().cloned().collect::<Vec<_>>())
        };
        assert_eq!(at("a.b"), serde_json::json!([1, 2, 3, [4], 5]));
        assert_eq!(at("d.e"), serde_json::json!([6, 7]));
        assert_eq!(at("a"), r["a"]);
        assert_eq!(at("s.t"), serde_json::json!([]));
        assert_eq!(at("missing.b"), serde_json::json!([]));
    }

    /// Types outside the R4 compartment that name one patient are confined by it; types
    /// that name none stay outside.
    #[test]
    fn compartment_additions() {
        let paths = |t: &str| compartment_paths(t).map(|ps| ps.to_vec());
        assert_eq!(paths("Device"), Some(vec![("patient", &["patient"][..])]));
        assert_eq!(paths("Contract"), Some(vec![("patient", &["subject"][..])]));
        assert_eq!(
            paths("GuidanceResponse"),
            Some(vec![("patient", &["subject"][..])])
        );
        assert_eq!(
            paths("Binary"),
            Some(vec![("securityContext", &["securityContext"][..])])
        );
        // Records that point at "any" resource, a Patient included.
        assert_eq!(
            paths("Linkage"),
            Some(vec![
                ("item", &["item.resource"][..]),
                ("source", &["item.resource"][..])
            ])
        );
        assert_eq!(
            paths("VerificationResult"),
            Some(vec![("target", &["target"][..])])
        );
        assert_eq!(
            paths("MessageHeader"),
            Some(vec![("focus", &["focus"][..])])
        );
        assert_eq!(
            paths("PaymentNotice"),
            Some(vec![
                ("request", &["request"][..]),
                ("response", &["response"][..])
            ])
        );
        // Canonical resources link to "any" artifact: they stay outside, as do types
        // that name no patient.
        for outside in [
            "Medication",
            "Practitioner",
            "Organization",
            "Library",
            "PlanDefinition",
            "ImplementationGuide",
            "Questionnaire",
            "Slot",
            "Subscription",
            "Bundle",
            "Nope",
        ] {
            assert_eq!(paths(outside), None, "{outside}");
        }
        // The R4 compartment itself is unchanged.
        assert!(
            paths("Observation")
                .unwrap()
                .iter()
                .any(|(p, _)| *p == "subject")
        );
        let device = json!({"resourceType": "Device", "patient": {"reference": "Patient/456"}});
        assert_eq!(compartment_patients("Device", &device, &[]), ["456"]);
    }
    use super::*;
    use serde_json::json;

    fn bases() -> Vec<String> {
        vec!["http://up/fhir".into()]
    }

    fn obs() -> Value {
        json!({
            "resourceType": "Observation",
            "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "1234-5"}], "text": "x"},
            "subject": {"reference": "Patient/123"},
            "performer": [{"reference": "Practitioner/7"}, {"reference": "http://up/fhir/Patient/9"}]
        })
    }

    #[test]
    fn token_forms() {
        let o = obs();
        let cat = "http://terminology.hl7.org/CodeSystem/observation-category";
        let b = bases();
        let m = |code: &str, v: &str| matches("Observation", &o, code, v, &b);
        assert_eq!(m("category", "laboratory"), Some(true));
        assert_eq!(m("category", &format!("{cat}|laboratory")), Some(true));
        assert_eq!(m("category", &format!("{cat}|")), Some(true));
        assert_eq!(m("category", "|laboratory"), Some(false), "has a system");
        assert_eq!(m("category", "vital-signs"), Some(false));
        assert_eq!(m("category", "vital-signs,laboratory"), Some(true));
        assert_eq!(m("category", "http://other|laboratory"), Some(false));
        assert_eq!(m("status", "final"), Some(true));
        assert_eq!(m("status", "amended"), Some(false));
        assert_eq!(m("code", "http://loinc.org|1234-5"), Some(true));
        // What cannot be evaluated says so.
        assert_eq!(m("code:in", "http://vs"), None);
        assert_eq!(m("value-quantity", "5"), None);
        assert_eq!(m("nonsense", "5"), None);
        assert_eq!(m("subject.name", "x"), None);
    }

    #[test]
    fn references_and_compartment() {
        let o = obs();
        let b = bases();
        let m = |code: &str, v: &str| matches("Observation", &o, code, v, &b);
        assert_eq!(m("subject", "Patient/123"), Some(true));
        assert_eq!(m("subject", "123"), Some(true));
        assert_eq!(m("subject", "Patient/12"), Some(false));
        assert_eq!(m("patient", "http://up/fhir/Patient/123"), Some(true));
        assert_eq!(m("performer", "Practitioner/7"), Some(true));
        let mut ids = compartment_patients("Observation", &o, &b);
        ids.sort();
        assert_eq!(ids, vec!["123", "9"]);
        assert!(in_compartment("Observation", &o, "9", &b));
        assert!(!in_compartment("Observation", &o, "12", &b));
        let p = json!({"resourceType": "Patient", "id": "123", "link": [{"other": {"reference": "Patient/456"}}]});
        assert!(in_compartment("Patient", &p, "123", &b));
        assert!(
            !in_compartment("Patient", &p, "456", &b),
            "link not followed"
        );
        assert!(!in_compartment(
            "Medication",
            &json!({"id": "123"}),
            "123",
            &b
        ));
    }
}
