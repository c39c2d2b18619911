//! Certificates and TLS settings shared by every target, so each negotiates the same session:
//! TLS 1.3, `TLS_AES_128_GCM_SHA256`, X25519, an ECDSA P-256 certificate, no resumption.
use std::{path::Path, sync::Arc};

use anyhow::{Context as _, Result};
use ingress_tests::pki::{Leaf, Pki};
use rustls::{ClientConfig, ServerConfig, client::Resumption, crypto::ring};

/// The server name the clients ask for; every proxy routes it to the backend.
pub const SNI: &str = "bench.example.com";

/// Names a rule near the end of the 10,000-rule table matches (exact and pattern).
pub const SNI_LAST_EXACT: &str = "db4999.example.com";
/// See [`SNI_LAST_EXACT`].
pub const SNI_LAST_PATTERN: &str = "bench.r4999.example.com";

/// The benchmark's CA and the one leaf certificate the backend and the terminating proxies
/// present.
pub struct BenchPki {
    pki: Pki,
    /// Certificate and key for every name the clients use.
    pub leaf: Leaf,
}

impl BenchPki {
    /// A fresh CA and leaf.
    pub fn new() -> Result<Self> {
        let pki = Pki::new().context("creating the benchmark CA")?;
        let leaf = pki
            .issue(&[SNI, "*.example.com", "*.r4999.example.com"])
            .context("issuing the benchmark certificate")?;
        Ok(Self { pki, leaf })
    }

    /// The client configuration: only the suite and group every target negotiates, and no
    /// session resumption (each connection is a full handshake).
    pub fn client_config(&self) -> Result<Arc<ClientConfig>> {
        let mut provider = ring::default_provider();
        provider.cipher_suites = vec![ring::cipher_suite::TLS13_AES_128_GCM_SHA256];
        provider.kx_groups = vec![ring::kx_group::X25519];
        let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.pki.roots()?)
            .with_no_client_auth();
        config.resumption = Resumption::disabled();
        Ok(Arc::new(config))
    }

    /// The backend's server configuration.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>> {
        Ok(self.leaf.server_config(&[])?)
    }

    /// Writes `dir/bench.crt`, `dir/bench.key` and `dir/bench.pem` (both, as HAProxy reads
    /// them); returns the paths of the three.
    pub fn write(
        &self,
        dir: &Path,
    ) -> Result<(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf)> {
        let files = self.leaf.write(dir, "bench")?;
        let pem = dir.join("bench.pem");
        std::fs::write(&pem, format!("{}{}", self.leaf.cert_pem, self.leaf.key_pem))
            .with_context(|| format!("writing {}", pem.display()))?;
        Ok((files.cert, files.key, pem))
    }
}
