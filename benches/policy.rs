//! The decision engine's hot functions: parsing a 20-scope token, classify + decide for a
//! search with 6 parameters, checking one read Observation from its bytes, and verifying a
//! 1 MiB searchset Bundle of 500 Observations (parse, check every entry, re-serialise only
//! when something changed), in MB/s.
//!
//!   cargo bench --bench policy

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::{HeaderMap, Method};
use smartgate::fhir::request::classify;
use smartgate::policy::verify::{Verdict, Viewer};
use smartgate::policy::{Context, Policy, Verify, authorize};
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
    let ctx = Context::new(Some("123"), None, false);
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

    // A 1 MiB searchset of 500 Observations of patient 123, about 2 KiB each; in the
    // second, every other one belongs to patient 456 and is removed.
    let bundle = |mixed: bool| -> Vec<u8> {
        let entries: Vec<serde_json::Value> = (0..500)
            .map(|i| {
                let patient = if mixed && i % 2 == 1 { "456" } else { "123" };
                serde_json::json!({
                    "fullUrl": format!("http://fhir.example.org/r4/Observation/obs-{i}"),
                    "resource": {
                        "resourceType": "Observation", "id": format!("obs-{i}"),
                        "meta": {"versionId": "1", "lastUpdated": "2024-01-01T00:00:00Z"},
                        "status": "final",
                        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory", "display": "Laboratory"}]}],
                        "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0", "display": "Glucose [Mass/volume] in Blood"}], "text": "Glucose"},
                        "subject": {"reference": format!("Patient/{patient}")},
                        "performer": [{"reference": "Practitioner/7"}],
                        "effectiveDateTime": "2024-01-01T08:00:00Z",
                        "valueQuantity": {"value": 95, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"},
                        "note": [{"text": "x".repeat(1370)}]
                    },
                    "search": {"mode": "match"}
                })
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "resourceType": "Bundle", "type": "searchset", "total": 500, "entry": entries
        }))
        .unwrap()
    };
    let grants = Grants::parse(["patient/Observation.rs", "patient/Patient.r"]);
    let viewer = Viewer {
        grants: &grants,
        ctx: &ctx,
        policy: &policy,
        owners: None,
    };
    let verify = |bytes: &[u8]| -> Vec<u8> {
        // The pipeline's reading: strict, a repeated name refused.
        let mut doc = smartgate::json::parse(bytes).unwrap();
        match viewer.verify(Verify::Bundle { narrowed: true }, &mut doc) {
            Verdict::Unchanged => bytes.to_vec(),
            _ => serde_json::to_vec(&doc).unwrap(),
        }
    };
    let mut g = c.benchmark_group("verify");
    // One resource read under a patient/ token, checked from its bytes (the response of
    // `GET Observation/[id]`): the compartment-verified read of benches/load.sh.
    let read = serde_json::to_vec(&serde_json::json!({
        "resourceType": "Observation", "id": "obs-1",
        "meta": {"versionId": "1", "lastUpdated": "2024-01-01T00:00:00Z"},
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0", "display": "Glucose"}]},
        "subject": {"reference": "Patient/123"},
        "effectiveDateTime": "2024-01-01T08:00:00Z",
        "valueQuantity": {"value": 95, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"}
    }))
    .unwrap();
    let rs = smartgate::smart::scope::Perms::R.union(smartgate::smart::scope::Perms::S);
    assert_eq!(viewer.visible_bytes(&read, rs), Some(true));
    g.bench_function("read_observation_from_bytes", |b| {
        b.iter(|| black_box(viewer.visible_bytes(black_box(&read), rs)))
    });
    for (name, mixed) in [
        ("searchset_1mib_all_pass", false),
        ("searchset_1mib_half_removed", true),
    ] {
        let bytes = bundle(mixed);
        assert!(
            (1 << 20..(1 << 20) + (1 << 18)).contains(&bytes.len()),
            "{}",
            bytes.len()
        );
        let out = verify(&bytes);
        assert_eq!(out.len() < bytes.len(), mixed);
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_function(name, |b| b.iter(|| black_box(verify(black_box(&bytes)))));
    }
    // The strict reader alone over the same megabyte: checking it (what a request body
    // or an unverified answer costs) and building its value.
    let bytes = bundle(false);
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    g.bench_function("json_validate_1mib", |b| {
        b.iter(|| black_box(smartgate::json::validate(black_box(&bytes))))
    });
    g.bench_function("json_parse_1mib", |b| {
        b.iter(|| black_box(smartgate::json::parse(black_box(&bytes))))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
