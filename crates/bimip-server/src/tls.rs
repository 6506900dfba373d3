//! TLS (`--tls-cert`/`--tls-key`): a rustls server configuration from PEM files, with the
//! `ring` crypto provider (no C/cmake build of aws-lc) and HTTP/1.1 only (WebSockets upgrade
//! over HTTP/1.1).

use crate::config::ConfigError;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use std::{path::Path, sync::Arc};

pub fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, ConfigError> {
    let invalid = |what: &str, path: &Path, e: &dyn std::fmt::Display| {
        ConfigError::Invalid(format!("{what} {}: {e}", path.display()))
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| invalid("--tls-cert", cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("--tls-cert", cert, &e))?;
    if certs.is_empty() {
        return Err(invalid("--tls-cert", cert, &"no certificate in the file"));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| invalid("--tls-key", key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::Invalid(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| ConfigError::Invalid(format!("TLS certificate and key: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
