//! Kernel TLS for terminated flows: the kernel's TLS layer goes on the client socket before
//! the handshake (`TCP_ULP "tls"`: the kernel takes it only on an established socket, and a
//! client may send its FIN right behind its `Finished`), after the rustls handshake the session
//! keys go into the kernel (`TLS_TX`, `TLS_RX`), and the plaintext moves between the client's
//! kTLS socket and the backend with `splice(2)` through a pipe, never copied to userspace. A
//! socket that does not take the layer keeps the rustls relay.
//!
//! Where it applies: kernels with `CONFIG_TLS` and the AEAD's crypto modules (Debian's stock
//! 6.1, 6.12 and 6.17: the `tls` module plus `gcm`/`aesni`/`ghash`; `tls` alone fails `TLS_TX` with
//! `ENOENT`). [`Support::probe`] runs once at start-up and installs a throw-away key for each
//! version and cipher on a loopback pair, so a flow only takes this path with a combination the
//! kernel has accepted; the server configurations then offer only those cipher suites, so
//! every handshake ends in a suite the kernel can take. Without any (this host: no
//! `CONFIG_TLS`), terminated flows keep the rustls relay.
//!
//! kTLS sockets never enter the sockhash: patched kernels refuse the combination (Debian
//! 6.1.190+, 6.12), older ones leaked kTLS contexts.
//!
//! # Layout
//! - `crypto`: the kernel's crypto-info structures from rustls's extracted secrets.
//! - `handshake`: the rustls handshake fed one record at a time, so no ciphertext beyond the
//!   client's `Finished` is consumed, then key extraction and installation.
//! - `relay`: `splice` through a pipe per direction; alerts, `close_notify` and `KeyUpdate`.

mod crypto;
mod handshake;
mod relay;

use std::{io, os::fd::AsFd as _, sync::Arc};

use rustls::{CipherSuite, SupportedCipherSuite, crypto::CryptoProvider};
use tracing::debug;

pub use crypto::{Cipher, CryptoInfo, CryptoInfoError, Version};
pub(super) use handshake::{Handshaken, handshake, install};
pub(super) use relay::relay;

use crate::sys::{self, TlsDirection};

/// The version and cipher of a rustls cipher suite, when kTLS has an equivalent.
pub fn suite_params(suite: CipherSuite) -> Option<(Version, Cipher)> {
    use CipherSuite as S;
    Some(match suite {
        S::TLS13_AES_128_GCM_SHA256 => (Version::Tls13, Cipher::Aes128Gcm),
        S::TLS13_AES_256_GCM_SHA384 => (Version::Tls13, Cipher::Aes256Gcm),
        S::TLS13_CHACHA20_POLY1305_SHA256 => (Version::Tls13, Cipher::Chacha20Poly1305),
        S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => {
            (Version::Tls12, Cipher::Aes128Gcm)
        }
        S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 | S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => {
            (Version::Tls12, Cipher::Aes256Gcm)
        }
        S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        | S::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => {
            (Version::Tls12, Cipher::Chacha20Poly1305)
        }
        _ => return None,
    })
}

/// What the kernel's TLS offers, probed once at start-up.
#[derive(Clone, Debug, Default)]
pub struct Support {
    /// Version and cipher pairs whose keys the kernel accepted in both directions.
    pairs: Vec<(Version, Cipher)>,
    /// Whether the kernel replaces a TLS 1.3 key on a live socket (Linux 6.14+).
    rekey: bool,
}

impl Support {
    /// No kernel TLS (the rustls relay for every terminated flow).
    pub fn none() -> Self {
        Self::default()
    }

    /// Probes the kernel: the `tls` upper layer, then a throw-away key for every version and
    /// cipher, transmit and receive, each on a fresh loopback pair (a key can be set once per
    /// socket). An error is a failure of the probe itself (no loopback), not a missing kTLS.
    pub fn probe() -> io::Result<Self> {
        if !sys::probe_ktls()? {
            return Ok(Self::none());
        }
        let mut pairs = Vec::new();
        for version in Version::ALL {
            for cipher in Cipher::ALL {
                match probe_pair(version, cipher) {
                    Ok(()) => pairs.push((version, cipher)),
                    Err(err) => debug!(
                        version = version.as_str(),
                        cipher = cipher.as_str(),
                        error = %err,
                        "kernel tls refuses a cipher"
                    ),
                }
            }
        }
        let rekey = pairs
            .iter()
            .find(|(v, _)| *v == Version::Tls13)
            .is_some_and(|(_, cipher)| match probe_rekey(*cipher) {
                Ok(()) => true,
                Err(err) => {
                    debug!(error = %err, "kernel tls keeps its first key (no rekeying)");
                    false
                }
            });
        Ok(Self { pairs, rekey })
    }

    /// Whether the kernel takes new TLS 1.3 keys on a live socket, after a `KeyUpdate`.
    pub fn rekeys(&self) -> bool {
        self.rekey
    }

    /// Whether any version and cipher can be installed.
    pub fn available(&self) -> bool {
        !self.pairs.is_empty()
    }

    /// Whether the kernel takes keys of `cipher` at `version`.
    pub fn supports(&self, version: Version, cipher: Cipher) -> bool {
        self.pairs.contains(&(version, cipher))
    }

    /// Whether the kernel takes keys of a negotiated rustls cipher suite.
    pub fn supports_suite(&self, suite: SupportedCipherSuite) -> bool {
        suite_params(suite.suite()).is_some_and(|(v, c)| self.supports(v, c))
    }

    /// The names of what the kernel takes (`tls1.3/aes_128_gcm`, …), for logs and `/readyz`.
    pub fn names(&self) -> Vec<String> {
        self.pairs
            .iter()
            .map(|(v, c)| format!("{}/{}", v.as_str(), c.as_str()))
            .collect()
    }

    /// The crypto provider for terminate-mode server configurations: *ring*'s, offering only
    /// the cipher suites the kernel takes; `None` without kTLS (or if it takes none of them).
    pub fn provider(&self) -> Option<Arc<CryptoProvider>> {
        if !self.available() {
            return None;
        }
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites.retain(|s| self.supports_suite(*s));
        (!provider.cipher_suites.is_empty()).then(|| Arc::new(provider))
    }
}

/// A second TLS 1.3 transmit key on a socket that has one: `EBUSY` before Linux 6.14.
fn probe_rekey(cipher: Cipher) -> io::Result<()> {
    probe_keys(
        Version::Tls13,
        cipher,
        [TlsDirection::Transmit, TlsDirection::Transmit],
    )
}

fn probe_pair(version: Version, cipher: Cipher) -> io::Result<()> {
    probe_keys(
        version,
        cipher,
        [TlsDirection::Transmit, TlsDirection::Receive],
    )
}

/// Puts the `tls` layer on a fresh loopback socket, then a throw-away key of `version` and
/// `cipher` in each of `directions`, in order.
fn probe_keys(version: Version, cipher: Cipher, directions: [TlsDirection; 2]) -> io::Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let client = std::net::TcpStream::connect(listener.local_addr()?)?;
    let _server = listener.accept()?;
    let key = [0u8; 32];
    let key = key
        .get(..if cipher == Cipher::Aes128Gcm { 16 } else { 32 })
        .unwrap_or_default();
    let info = CryptoInfo::new(version, cipher, key, &[0; 12], 0).map_err(io::Error::other)?;
    sys::set_tls_ulp(client.as_fd())?;
    for direction in directions {
        sys::set_tls_crypto_info(client.as_fd(), direction, info.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ring_suite_maps_to_a_kernel_cipher() {
        for suite in rustls::crypto::ring::default_provider().cipher_suites {
            let (version, _) = suite_params(suite.suite())
                .unwrap_or_else(|| panic!("{:?} has no kernel cipher", suite.suite()));
            assert_eq!(
                Version::from_rustls(suite.version().version),
                Some(version),
                "{:?}",
                suite.suite()
            );
        }
    }

    #[test]
    fn a_kernel_without_tls_offers_no_provider() {
        assert!(Support::none().provider().is_none());
        assert!(!Support::none().available());
    }

    #[test]
    fn the_provider_offers_only_what_the_kernel_takes() {
        let support = Support {
            pairs: vec![
                (Version::Tls13, Cipher::Aes128Gcm),
                (Version::Tls12, Cipher::Aes256Gcm),
            ],
            rekey: false,
        };
        let provider = support.provider().unwrap();
        let suites: Vec<_> = provider.cipher_suites.iter().map(|s| s.suite()).collect();
        assert!(
            suites.contains(&CipherSuite::TLS13_AES_128_GCM_SHA256),
            "{suites:?}"
        );
        assert!(suites.contains(&CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384));
        assert!(!suites.contains(&CipherSuite::TLS13_CHACHA20_POLY1305_SHA256));
        assert!(!suites.contains(&CipherSuite::TLS13_AES_256_GCM_SHA384));
    }

    #[test]
    fn the_probe_agrees_with_the_upper_layer_probe() {
        let support = Support::probe().unwrap();
        if !sys::probe_ktls().unwrap() {
            assert!(!support.available(), "no tls upper layer, no cipher");
        }
    }
}
