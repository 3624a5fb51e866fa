//! Properties of the parsers and the decision (proptest): no input panics them, and adding
//! parameters never turns a denial into an allow.

use http::{HeaderMap, Method};
use proptest::prelude::*;
use smartgate::fhir::request::classify;
use smartgate::policy::{Context, Decision, Policy, authorize};
use smartgate::smart::scope::{Grants, parse};

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        Just(Method::GET),
        Just(Method::POST),
        Just(Method::PUT),
        Just(Method::PATCH),
        Just(Method::DELETE),
        Just(Method::HEAD),
    ]
}

/// Path-like strings built from the pieces attacks use.
fn path() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("Patient".to_owned()),
        Just("Observation".to_owned()),
        Just("123".to_owned()),
        Just("_history".to_owned()),
        Just("_search".to_owned()),
        Just("$everything".to_owned()),
        Just("..".to_owned()),
        Just("%2F".to_owned()),
        Just("%252F".to_owned()),
        Just(";x".to_owned()),
        Just("".to_owned()),
        "[ -~]{0,8}",
        "\\PC{0,4}",
    ];
    proptest::collection::vec(piece, 0..6).prop_map(|parts| format!("/{}", parts.join("/")))
}

fn params() -> impl Strategy<Value = Vec<(String, String)>> {
    let name = prop_oneof![
        Just("code".to_owned()),
        Just("patient".to_owned()),
        Just("subject".to_owned()),
        Just("_type".to_owned()),
        Just("_include".to_owned()),
        Just("_revinclude".to_owned()),
        Just("subject:Patient.name".to_owned()),
        Just("_has:Observation:patient:code".to_owned()),
        Just("_count".to_owned()),
        "[a-z_:.]{1,12}",
    ];
    let value = prop_oneof![
        Just("123".to_owned()),
        Just("Patient/456".to_owned()),
        Just("Patient,Observation".to_owned()),
        "[ -~]{0,10}",
    ];
    proptest::collection::vec((name, value), 0..4)
}

fn query(params: &[(String, String)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        s.append_pair(k, v);
    }
    s.finish()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// The classifier returns a result for anything; it never panics.
    #[test]
    fn classifier_never_panics(m in method(), p in path(), q in "\\PC{0,40}", body in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = classify(&m, &p, Some(&q), &HeaderMap::new(), Some(&body), Some("batch"));
    }

    /// The scope parser never panics, and a string never parses two ways.
    #[test]
    fn scope_parser_never_panics(s in "\\PC{0,60}") {
        let _ = parse(&s);
        let g = Grants::parse(s.split_whitespace());
        prop_assert_eq!(g.scopes.len() + g.ignored.len() <= s.split_whitespace().count(), true);
    }

    /// Adding query parameters to a denied request never makes it allowed. (`_type` is the
    /// one parameter that may: it narrows the types a system-level search returns, so it
    /// narrows the scopes needed — by design, and tested in the decision table.)
    #[test]
    fn more_parameters_never_allow_more(
        m in method(),
        p in path(),
        base in params(),
        // A paging continuation (`_getpages`) is its own interaction, verified entry by
        // entry, so it is left out of "more parameters".
        extra in params().prop_map(|ps| ps.into_iter().filter(|(k, _)| k != "_type" && !k.starts_with("_getpages") && k != "_cursor" && k != "_page_token").collect::<Vec<_>>()),
        scopes in proptest::sample::subsequence(vec![
            "patient/*.rs", "patient/Observation.rs", "user/Observation.r", "system/Patient.s",
            "user/*.cud", "patient/Patient.r", "system/Observation.rs?category=lab",
        ], 0..4),
        patient in proptest::option::of(Just("123".to_owned())),
    ) {
        let grants = Grants::parse(scopes.iter().copied());
        let ctx = Context::new(patient.as_deref(), None, false);
        let policy = Policy::default();
        let q1 = query(&base);
        let mut all = base.clone();
        all.extend(extra);
        let q2 = query(&all);
        let h = HeaderMap::new();
        if let Ok(r1) = classify(&m, &p, Some(&q1), &h, None, None)
            && let Decision::Deny { .. } = authorize(&grants, &ctx, &r1, &policy)
            && let Ok(r2) = classify(&m, &p, Some(&q2), &h, None, None)
        {
            let d2 = authorize(&grants, &ctx, &r2, &policy);
            prop_assert!(matches!(d2, Decision::Deny { .. }), "{} {}?{} allowed after adding params", m, p, q2);
        }
    }
}
