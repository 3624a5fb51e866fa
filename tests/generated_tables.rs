//! The committed generated tables match what the generator makes of the committed data.

#[path = "../tools/gen_fhir_tables.rs"]
mod generator;

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
}
