//! FHIR knowledge the gateway needs: the shape of Bundles (and, with the authorization
//! engine, request classification and generated definition tables).

pub mod bundle;
