//! The integration suite, one binary: every module boots the real gateway in-process on
//! port 0 against real parts (recording and hostile fake upstreams, token and introspection
//! servers, and the npm FHIR engine and OAuth server of the end-to-end modules).
//!
//! One binary rather than one per file: each would link the whole dependency tree again,
//! which cost CI minutes and gigabytes of disk. The exception is tests/streaming.rs, whose
//! counting allocator needs a process of its own.

#[path = "../../tools/gen_fhir_tables.rs"]
mod generator;
#[path = "../support/mod.rs"]
mod support;

mod answers;
mod app_launch;
mod audit;
mod auth_introspection;
mod auth_jwt;
mod authz;
mod authz_server;
mod binary;
mod compartment;
mod discovery;
mod e2e_browser;
mod e2e_fhir;
mod e2e_oidc;
mod generated_tables;
mod h2_raw;
mod lenient;
mod lifecycle;
mod operations;
mod properties;
mod provenance;
mod proxy;
mod smuggling;
mod stale_state;
mod two_readings;
mod upstream_framing;
mod upstream_pool;
