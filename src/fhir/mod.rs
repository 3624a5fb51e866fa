//! FHIR knowledge the gateway needs: request classification, the shape of Bundles, and
//! tables generated from the official definitions. Nothing about SMART here.

pub mod bundle;
/// Tables generated from the official FHIR R4 definitions in `data/fhir-r4/`.
#[rustfmt::skip]
pub mod generated;
pub mod reference;
pub mod request;
pub mod search;

/// A FHIR id: `[A-Za-z0-9\-\.]{1,64}` (FHIR R4 datatypes.html#id).
pub fn is_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}
