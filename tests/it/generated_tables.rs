//! The committed generated tables match what the generator makes of the committed data.

use crate::generator;

use std::path::Path;

#[test]
fn generated_tables_are_fresh() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let expected = generator::render(&root.join("data/fhir-r4")).unwrap();
    let committed = std::fs::read_to_string(root.join("src/fhir/generated.rs")).unwrap();
    assert!(
        committed == expected,
        "src/fhir/generated.rs is stale: run `cargo run --bin gen-fhir-tables`"
    );
}

/// Sanity of the generated data against facts of FHIR R4.
#[test]
fn generated_tables_make_sense() {
    use smartgate::fhir::generated::{PATIENT_COMPARTMENT, RESOURCE_TYPES};
    assert_eq!(RESOURCE_TYPES.len(), 145);
    assert!(
        RESOURCE_TYPES.windows(2).all(|w| w[0] < w[1]),
        "sorted and unique"
    );
    for t in ["Patient", "Observation", "Medication", "Bundle", "Binary"] {
        assert!(RESOURCE_TYPES.binary_search(&t).is_ok(), "{t}");
    }
    let obs = PATIENT_COMPARTMENT
        .iter()
        .find(|(t, _)| *t == "Observation")
        .unwrap();
    assert!(obs.1.contains(&"subject") && obs.1.contains(&"performer"));
    assert!(PATIENT_COMPARTMENT.iter().all(|(t, _)| *t != "Medication"));
    // Canonical resources: definitions and conformance resources, not records that
    // merely have a `url` (a Device's network address, a Subscription's endpoint).
    use smartgate::fhir::generated::CANONICAL_TYPES;
    assert!(CANONICAL_TYPES.windows(2).all(|w| w[0] < w[1]));
    for t in [
        "Library",
        "PlanDefinition",
        "Questionnaire",
        "ValueSet",
        "ImplementationGuide",
    ] {
        assert!(CANONICAL_TYPES.binary_search(&t).is_ok(), "{t}");
    }
    for t in [
        "Device",
        "Subscription",
        "Contract",
        "Linkage",
        "Observation",
    ] {
        assert!(CANONICAL_TYPES.binary_search(&t).is_err(), "{t}");
    }
}

/// The element paths behind the compartment parameters, checked against the issue's
/// examples and FHIR R4.
#[test]
fn compartment_paths() {
    use smartgate::fhir::generated::{PATIENT_COMPARTMENT, PATIENT_COMPARTMENT_PATHS};
    let paths = |t: &str, p: &str| -> Vec<&str> {
        PATIENT_COMPARTMENT_PATHS
            .iter()
            .find(|(ty, _)| *ty == t)
            .and_then(|(_, ps)| ps.iter().find(|(name, _)| *name == p))
            .map(|(_, paths)| paths.to_vec())
            .unwrap_or_default()
    };
    assert_eq!(paths("Observation", "subject"), ["subject"]);
    assert_eq!(paths("Observation", "performer"), ["performer"]);
    assert_eq!(paths("AllergyIntolerance", "patient"), ["patient"]);
    assert_eq!(paths("Appointment", "actor"), ["participant.actor"]);
    assert_eq!(paths("Patient", "link"), ["link.other"]);
    // Every compartment parameter has at least one path.
    assert_eq!(PATIENT_COMPARTMENT_PATHS.len(), PATIENT_COMPARTMENT.len());
    for ((t, params), (t2, with_paths)) in PATIENT_COMPARTMENT.iter().zip(PATIENT_COMPARTMENT_PATHS)
    {
        assert_eq!(t, t2);
        assert_eq!(params.len(), with_paths.len(), "{t}");
        assert!(with_paths.iter().all(|(_, p)| !p.is_empty()), "{t}");
    }
}
