//! The scope × interaction × context matrix, one named row per rule.

use super::*;
use crate::fhir::request::classify;
use http::{HeaderMap, Method};

fn req(method: &str, path: &str) -> FhirRequest {
    let (p, q) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    let mut h = HeaderMap::new();
    if path == "CREATE_CONDITIONAL" {
        h.insert("if-none-exist", "x=1".parse().unwrap());
    }
    classify(&method.parse::<Method>().unwrap(), p, q, &h, None, None)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn decide(scopes: &str, patient: Option<&str>, method: &str, path: &str) -> Decision {
    let grants = Grants::parse(scopes.split_whitespace());
    let ctx = Context {
        patient: patient.map(str::to_owned),
        user_is_patient: false,
    };
    authorize(&grants, &ctx, &req(method, path), &Policy::default())
}

fn allowed(d: &Decision) -> bool {
    matches!(d, Decision::Allow(_))
}

/// Each interaction needs exactly its letter: the letter allows, every other letter does
/// not (write does not imply read), at system and user level alike.
#[test]
fn letter_per_interaction() {
    let rows: &[(&str, &str, &str, char)] = &[
        ("read needs r", "GET", "/Observation/1", 'r'),
        ("vread needs r", "GET", "/Observation/1/_history/2", 'r'),
        (
            "instance history needs r",
            "GET",
            "/Observation/1/_history",
            'r',
        ),
        ("update needs u", "PUT", "/Observation/1", 'u'),
        ("patch needs u", "PATCH", "/Observation/1", 'u'),
        (
            "conditional update needs u",
            "PUT",
            "/Observation?code=x",
            'u',
        ),
        ("delete needs d", "DELETE", "/Observation/1", 'd'),
        (
            "conditional delete needs d",
            "DELETE",
            "/Observation?code=x",
            'd',
        ),
        ("create needs c", "POST", "/Observation", 'c'),
        ("search needs s", "GET", "/Observation?code=x", 's'),
        ("POST _search needs s", "POST", "/Observation/_search", 's'),
        ("type history needs s", "GET", "/Observation/_history", 's'),
    ];
    for level in ["system", "user"] {
        for (rule, method, path, letter) in rows {
            for l in "cruds".chars() {
                let d = decide(&format!("{level}/Observation.{l}"), None, method, path);
                assert_eq!(
                    allowed(&d),
                    l == *letter,
                    "{rule}: {level}/Observation.{l} on {method} {path}"
                );
            }
        }
    }
}

/// The denial names the narrowest scope that would have allowed the request.
#[test]
fn denial_names_needed_scope() {
    let d = decide("user/Observation.s", None, "GET", "/Observation/1");
    assert_eq!(
        d,
        Decision::Deny {
            reason: DenyReason::InsufficientScope,
            needed: "user/Observation.r".into()
        }
    );
    let d = decide("system/Patient.r", None, "POST", "/Observation");
    assert!(matches!(d, Decision::Deny { ref needed, .. } if needed == "system/Observation.c"));
}

/// v1 scopes mean the same letters as their v2 equivalents.
#[test]
fn v1_equivalents() {
    assert!(allowed(&decide(
        "user/Observation.read",
        None,
        "GET",
        "/Observation/1"
    )));
    assert!(allowed(&decide(
        "user/Observation.read",
        None,
        "GET",
        "/Observation?code=x"
    )));
    assert!(!allowed(&decide(
        "user/Observation.read",
        None,
        "PUT",
        "/Observation/1"
    )));
    assert!(allowed(&decide(
        "user/Observation.write",
        None,
        "DELETE",
        "/Observation/1"
    )));
    assert!(!allowed(&decide(
        "user/Observation.write",
        None,
        "GET",
        "/Observation/1"
    )));
    assert!(allowed(&decide(
        "system/*.*",
        None,
        "PATCH",
        "/Condition/1"
    )));
}

/// Wildcards cover every type; system-level search needs s on every type it can return.
#[test]
fn wildcards_and_system_search() {
    assert!(allowed(&decide("system/*.rs", None, "GET", "/Condition/1")));
    assert!(allowed(&decide("system/*.s", None, "GET", "?name=x")));
    assert!(!allowed(&decide(
        "system/Patient.s system/Observation.s",
        None,
        "GET",
        "?name=x"
    )));
    assert!(allowed(&decide(
        "system/Patient.s system/Observation.s",
        None,
        "GET",
        "?_type=Patient,Observation"
    )));
    assert!(!allowed(&decide(
        "system/Patient.s",
        None,
        "GET",
        "?_type=Patient,Observation"
    )));
    assert!(!allowed(&decide(
        "system/Patient.s",
        None,
        "GET",
        "?_type=Patient,Bogus"
    )));
    assert!(allowed(&decide("system/*.s", None, "GET", "/_history")));
    assert!(!allowed(&decide(
        "system/Patient.s",
        None,
        "GET",
        "/_history"
    )));
}

/// The union of scopes counts; malformed scopes beside good ones change nothing.
#[test]
fn union_and_malformed() {
    assert!(allowed(&decide(
        "user/Observation.r user/Observation.s",
        None,
        "GET",
        "/Observation/1"
    )));
    assert!(allowed(&decide(
        "user/Observation.sr user/Observation.r junk openid",
        None,
        "GET",
        "/Observation/1"
    )));
    assert!(!allowed(&decide(
        "user/Observation.sr",
        None,
        "GET",
        "/Observation/1"
    )));
    assert!(!allowed(&decide(
        "openid fhirUser launch/patient",
        None,
        "GET",
        "/Observation/1"
    )));
    assert!(!allowed(&decide("", None, "GET", "/Observation/1")));
}

/// Capabilities need no scope.
#[test]
fn capabilities_open() {
    assert!(allowed(&decide("", None, "GET", "/metadata")));
}

/// patient/ scopes need a patient in context.
#[test]
fn patient_scope_needs_patient() {
    let d = decide("patient/Patient.r", None, "GET", "/Patient/123");
    assert!(matches!(
        d,
        Decision::Deny {
            reason: DenyReason::NoPatientContext,
            ..
        }
    ));
}

/// Until compartment verification exists, patient/ access is limited to what the upstream
/// confines itself: the patient's own record and its compartment searches.
#[test]
fn patient_scope_confinement_interim() {
    let p = Some("123");
    assert!(allowed(&decide(
        "patient/Patient.r",
        p,
        "GET",
        "/Patient/123"
    )));
    assert!(!allowed(&decide(
        "patient/Patient.r",
        p,
        "GET",
        "/Patient/456"
    )));
    assert!(allowed(&decide(
        "patient/Observation.s",
        p,
        "GET",
        "/Patient/123/Observation?code=x"
    )));
    assert!(!allowed(&decide(
        "patient/Observation.s",
        p,
        "GET",
        "/Patient/456/Observation"
    )));
    for leak in [
        "/Patient/123/Observation?_include=Observation:subject",
        "/Patient/123/Observation?_revinclude=Provenance:target",
        "/Patient/123/Observation?subject:Patient.name=x",
        "/Patient/123/Observation?_has:Observation:patient:code=x",
        "/Observation?patient=123",
        "/Observation/1",
        "/Patient/123/Observation?_INCLUDE=Observation:performer",
        "/Patient/123/Observation?code=x;_include=Observation:performer",
        "/Patient/123/Observation?_filter=performer:Practitioner.name%20eq%20x",
        "/Patient/123/Observation?_query=everything-for-everyone",
        "/Patient/123/Observation?_contained=true",
    ] {
        let d = decide("patient/*.rs", p, "GET", leak);
        assert!(
            matches!(
                d,
                Decision::Deny {
                    reason: DenyReason::CompartmentUnverified,
                    ..
                }
            ),
            "{leak}: {d:?}"
        );
    }
    // Writes and $export under patient/ are refused.
    assert!(!allowed(&decide(
        "patient/*.cruds",
        p,
        "POST",
        "/Observation"
    )));
    assert!(!allowed(&decide("patient/*.cruds", p, "GET", "/$export")));
    // A Patient user's user/ scopes are confined the same way.
    let grants = Grants::parse(["user/*.rs"]);
    let ctx = Context {
        patient: Some("123".into()),
        user_is_patient: true,
    };
    assert!(!allowed(&authorize(
        &grants,
        &ctx,
        &req("GET", "/Observation"),
        &Policy::default()
    )));
    assert!(allowed(&authorize(
        &grants,
        &ctx,
        &req("GET", "/Patient/123"),
        &Policy::default()
    )));
}

/// Granular scopes grant nothing until they can be verified (fail closed).
#[test]
fn granular_scopes_fail_closed() {
    assert!(!allowed(&decide(
        "system/Observation.rs?category=laboratory",
        None,
        "GET",
        "/Observation?category=laboratory"
    )));
}

/// Operations: the table's rules, and anything else denied.
#[test]
fn operations_table() {
    assert!(allowed(&decide("system/*.rs", None, "GET", "/$export")));
    assert!(!allowed(&decide(
        "system/Patient.rs",
        None,
        "GET",
        "/$export"
    )));
    assert!(allowed(&decide(
        "system/Patient.rs system/Observation.rs",
        None,
        "GET",
        "/$export?_type=Patient,Observation"
    )));
    assert!(allowed(&decide(
        "system/*.rs",
        None,
        "GET",
        "/Patient/$export"
    )));
    assert!(allowed(&decide(
        "system/*.rs",
        None,
        "GET",
        "/Group/g1/$export"
    )));
    assert!(allowed(&decide(
        "user/*.rs",
        None,
        "GET",
        "/Patient/123/$everything"
    )));
    assert!(!allowed(&decide(
        "user/Patient.rs",
        None,
        "GET",
        "/Patient/123/$everything"
    )));
    assert!(allowed(&decide(
        "user/Observation.c",
        None,
        "POST",
        "/Observation/$validate"
    )));
    assert!(!allowed(&decide(
        "user/Observation.r",
        None,
        "POST",
        "/Observation/$validate"
    )));
    assert!(allowed(&decide(
        "user/ValueSet.r",
        None,
        "GET",
        "/ValueSet/$expand?url=x"
    )));
    for unknown in [
        "/$reindex",
        "/Patient/$purge",
        "/Patient/1/$erase",
        "/Observation/$lastn",
    ] {
        let d = decide("system/*.cruds", None, "POST", unknown);
        assert!(
            matches!(
                d,
                Decision::Deny {
                    reason: DenyReason::UnknownOperation,
                    ..
                }
            ),
            "{unknown}"
        );
    }
}

/// Batch and transaction: every entry decided; one denied entry refuses the bundle and
/// names it; nested bundles are refused.
#[test]
fn bundles() {
    let grants = Grants::parse(["user/Patient.r", "user/Observation.c"]);
    let ctx = Context::default();
    let ok = vec![
        Ok(req("GET", "/Patient/1")),
        Ok(req("POST", "/Observation")),
    ];
    assert!(allowed(&authorize_bundle(
        &grants,
        &ctx,
        &ok,
        &Policy::default()
    )));
    let mixed = vec![
        Ok(req("GET", "/Patient/1")),
        Ok(req("DELETE", "/Patient/1")),
        Ok(req("POST", "/Observation")),
        Ok(req("PUT", "/Observation/2")),
    ];
    match authorize_bundle(&grants, &ctx, &mixed, &Policy::default()) {
        Decision::Deny {
            reason: DenyReason::Entries(e),
            needed,
        } => {
            assert_eq!(e.iter().map(|(i, _, _)| *i).collect::<Vec<_>>(), vec![1, 3]);
            assert_eq!(needed, "user/Patient.d user/Observation.u");
        }
        d => panic!("{d:?}"),
    }
    let h = HeaderMap::new();
    let nested = vec![Ok(classify(
        &Method::POST,
        "",
        None,
        &h,
        None,
        Some("batch"),
    )
    .unwrap())];
    assert!(matches!(
        authorize_bundle(&grants, &ctx, &nested, &Policy::default()),
        Decision::Deny {
            reason: DenyReason::NestedBundle,
            ..
        }
    ));
    assert!(matches!(
        authorize_bundle(&grants, &ctx, &[Err(())], &Policy::default()),
        Decision::Deny {
            reason: DenyReason::BadEntry(0),
            ..
        }
    ));
}

/// Configured operation rules come before the defaults; unlisted operations stay denied.
#[test]
fn configured_operations() {
    use crate::config::OperationConfig;
    let row = |name: &str, level: &str, ty: Option<&str>, requires: &str| OperationConfig {
        name: name.into(),
        level: level.into(),
        resource_type: ty.map(Into::into),
        requires: requires.into(),
    };
    let policy = Policy {
        operations: Operations::with_config(&[
            row("lastn", "type", Some("Observation"), "s"),
            row("export", "system", None, "deny"),
            row("ping", "system", None, "open"),
        ])
        .unwrap(),
    };
    let grants = Grants::parse(["system/*.cruds"]);
    let ctx = Context::default();
    let d = |method: &str, path: &str| authorize(&grants, &ctx, &req(method, path), &policy);
    assert!(matches!(
        d("GET", "/Observation/$lastn"),
        Decision::Allow(_)
    ));
    assert!(matches!(
        d("GET", "/$export"),
        Decision::Deny {
            reason: DenyReason::UnknownOperation,
            ..
        }
    ));
    assert!(matches!(d("GET", "/$ping"), Decision::Allow(_)));
    assert!(matches!(
        d("GET", "/Condition/$lastn"),
        Decision::Deny { .. }
    ));
    let none = Grants::parse(Vec::<&str>::new());
    assert!(!matches!(
        authorize(&none, &ctx, &req("GET", "/Observation/$lastn"), &policy),
        Decision::Allow(_)
    ));
}

/// Responses are not verified yet, so an unconfined search may carry includes, chains or
/// _has only when the token can read and search every type: otherwise _include would
/// return resources of types it has no scope for.
#[test]
fn includes_need_every_type_unconfined() {
    for leak in [
        "/Observation?_include=Observation:subject",
        "/Observation?_revinclude=Provenance:target",
        "/Observation?_INCLUDE=Observation:subject",
        "/Observation?subject:Patient.name=x",
        "/Observation?_has:Observation:patient:code=x",
        "/Observation?code=x;_include=Observation:subject",
        "/Observation?_filter=subject.name%20eq%20x",
    ] {
        let d = decide("user/Observation.rs", None, "GET", leak);
        assert_eq!(
            d,
            Decision::Deny {
                reason: DenyReason::IncludeUnverified,
                needed: "user/*.rs".into()
            },
            "{leak}"
        );
        assert!(allowed(&decide("user/*.rs", None, "GET", leak)), "{leak}");
        assert!(allowed(&decide("system/*.rs", None, "GET", leak)), "{leak}");
    }
    // Plain searches are unaffected.
    assert!(allowed(&decide(
        "user/Observation.rs",
        None,
        "GET",
        "/Observation?code=x&_count=10"
    )));
}
