//! smartgate: a SMART on FHIR policy enforcement gateway.
//!
//! The binary is a thin shell over [`run`]; tests boot the same gateway in-process with
//! [`Gateway::bind`] on port 0. The request flow (DESIGN.md) lives in [`pipeline`], one
//! module per stage.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod admin;
pub mod audit;
pub mod auth;
pub mod authz;
pub mod body;
pub mod config;
pub mod error;
pub mod exports;
pub mod fhir;
pub mod json;
pub mod keygen;
pub mod metrics;
pub mod outbound;
pub mod pipeline;
pub mod policy;
pub mod proxy;
pub mod server;
pub mod smart;
pub mod state;
pub mod store;
pub mod timer;

use std::future::Future;
use std::path::PathBuf;

pub use config::Config;
pub use server::{Gateway, GatewayHandle, StartError};

/// Binds and serves the gateway until `shutdown` completes, then drains and returns.
pub async fn run(
    config: Config,
    config_path: Option<PathBuf>,
    env: Vec<(String, String)>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let gateway = Gateway::bind(config, config_path, env).await?;
    tracing::info!(
        public = %gateway.public_addr(),
        admin = %gateway.admin_addr(),
        "smartgate listening"
    );
    gateway.serve(shutdown).await;
    Ok(())
}

/// Compiles `config` the way start-up and reload do (keys loaded, JWKS parsed, operation
/// rules, compartment parameters and the discovery document built), without binding or
/// serving: what `smartgate check-config` runs. Call it inside a tokio runtime (remote key
/// refreshes are spawned, and end with it).
pub fn compile_check(config: &Config) -> Result<(), state::CompileError> {
    let outbound = outbound::Outbound::new(config.upstream.ca_file.as_deref())
        .map_err(|e| state::CompileError::at("upstream.ca_file", e))?;
    let metrics = metrics::Metrics::new();
    state::Snapshot::compile(config.clone(), None, &outbound, &metrics).map(drop)
}
