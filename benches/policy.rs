//! The decision engine's hot functions: parsing a 20-scope token, and classify + decide
//! for a search with 6 parameters.
//!
//!   cargo bench --bench policy

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, Method};
use smartgate::fhir::request::classify;
use smartgate::policy::{Context, Policy, authorize};
use smartgate::smart::scope::Grants;

const SCOPES: &str = "openid fhirUser launch/patient offline_access \
    patient/Patient.r patient/Observation.rs patient/Condition.rs patient/MedicationRequest.rs \
    patient/AllergyIntolerance.rs patient/Procedure.rs patient/Immunization.rs \
    patient/DiagnosticReport.rs patient/DocumentReference.rs patient/Encounter.rs \
    user/Practitioner.rs user/Organization.rs user/Location.rs user/Medication.rs \
    patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory \
    system/Group.r";

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy");
    assert_eq!(SCOPES.split_whitespace().count(), 20);
    g.bench_function("parse_20_scopes", |b| {
        b.iter(|| black_box(Grants::parse(black_box(SCOPES).split_whitespace())))
    });

    let grants = Grants::parse(SCOPES.split_whitespace().chain(["user/Observation.rs"]));
    let ctx = Context {
        patient: Some("123".into()),
        user_is_patient: false,
    };
    let policy = Policy::default();
    let headers = HeaderMap::new();
    let query = "code=http://loinc.org|8867-4&date=ge2024-01-01&_count=50&_sort=-date&status=final&category=vital-signs";
    g.bench_function("classify_decide_6_params", |b| {
        b.iter(|| {
            let req = classify(
                &Method::GET,
                "/Observation",
                Some(black_box(query)),
                &headers,
                None,
                None,
            )
            .unwrap();
            black_box(authorize(&grants, &ctx, &req, &policy))
        })
    });
    let req = classify(
        &Method::GET,
        "/Observation",
        Some(query),
        &headers,
        None,
        None,
    )
    .unwrap();
    g.bench_function("decide_only", |b| {
        b.iter(|| black_box(authorize(&grants, &ctx, black_box(&req), &policy)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
