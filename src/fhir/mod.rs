//! FHIR knowledge the gateway needs: request classification, the shape of Bundles, and
//! tables generated from the official definitions. Nothing about SMART here.

pub mod bundle;
/// Tables generated from the official FHIR R4 definitions in `data/fhir-r4/`.
#[rustfmt::skip]
pub mod generated;
pub mod reference;
pub mod request;
