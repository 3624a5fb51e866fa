//! FHIR knowledge the gateway needs: the shape of Bundles (and, with the authorization
//! engine, request classification and generated definition tables).

pub mod bundle;
/// Tables generated from the official FHIR R4 definitions in `data/fhir-r4/`.
#[rustfmt::skip]
pub mod generated;
