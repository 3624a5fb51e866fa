//! TLS for the public listener: PEM files loaded at start and again whenever they change,
//! so certificate rotation (cert-manager, ACME) needs no restart.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;

/// The current TLS configuration; each new connection uses the latest.
pub struct TlsState {
    current: ArcSwap<ServerConfig>,
}

impl TlsState {
    /// Loads the certificate and key named in `[server.tls]`.
    pub fn load(cfg: &TlsConfig) -> Result<TlsState, String> {
        Ok(TlsState {
            current: ArcSwap::from_pointee(server_config(cfg)?),
        })
    }

    /// Re-reads the files; on error the current certificate stays.
    pub fn reload(&self, cfg: &TlsConfig) -> Result<(), String> {
        self.current.store(Arc::new(server_config(cfg)?));
        Ok(())
    }

    /// An acceptor for one new connection.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.load_full())
    }
}

/// Builds a rustls server configuration offering h2 and HTTP/1.1.
pub fn server_config(cfg: &TlsConfig) -> Result<ServerConfig, String> {
    let certs = read_certs(&cfg.cert)?;
    let key = PrivateKeyDer::from_pem_file(&cfg.key)
        .map_err(|e| format!("server.tls.key: {}: {e}", cfg.key.display()))?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("server.tls: {e}"))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| format!("server.tls: certificate and key do not fit: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("server.tls.cert: {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("server.tls.cert: {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "server.tls.cert: {}: no PEM certificate found",
            path.display()
        ));
    }
    Ok(certs)
}
