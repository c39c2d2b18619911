//! Certificates for terminate mode: parsing, SAN indexing and selection by SNI.
//!
//! Design: an uploaded PEM chain and key are parsed with `rustls-pki-types`, the key is loaded by
//! the ring provider and checked against the end-entity certificate (`CertifiedKey::from_der`),
//! and the DNS SANs are read with `x509-parser`. The set of certificates is an immutable
//! [`CertIndex`] in an `ArcSwap`: the TLS path calls [`CertStore::certified_key`] (or uses the
//! store as a rustls `ResolvesServerCert`) without locking. Selection: exact SAN first, then a
//! wildcard SAN `*.rest` covering exactly one leftmost label; among several, the certificate that
//! expires last. Key material is never logged and never returned by the API.
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ErrorCode};
use crate::model::Certificate;
use crate::pattern::{MAX_HOST_BYTES, lower_ascii};

/// Why an uploaded certificate cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// `cert_pem` holds no certificate or is not PEM.
    #[error("cert_pem: {0}")]
    Chain(String),
    /// `key_pem` holds no usable private key.
    #[error("key_pem: {0}")]
    Key(String),
    /// The key does not belong to the end-entity certificate, or the certificate is unusable.
    #[error("key_pem: {0}")]
    Mismatch(String),
}

impl From<CertError> for ApiError {
    fn from(e: CertError) -> Self {
        ApiError::new(ErrorCode::InvalidCertificate, e.to_string())
    }
}

/// A certificate record as stored on disk (the file is mode 0600).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredCertificate {
    /// Unique name.
    pub name: String,
    /// PEM chain.
    pub cert_pem: String,
    /// PEM private key.
    pub key_pem: String,
    /// Upload time, RFC 3339.
    pub created_at: String,
}

/// A parsed, usable certificate.
#[derive(Clone)]
pub struct LoadedCert {
    /// What the API shows.
    pub info: Certificate,
    /// The chain and signing key for rustls.
    pub key: Arc<CertifiedKey>,
    not_after_unix: i64,
}

impl std::fmt::Debug for LoadedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedCert")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// Parses and checks a stored or uploaded certificate.
pub fn load(rec: &StoredCertificate) -> Result<LoadedCert, CertError> {
    let chain = CertificateDer::pem_slice_iter(rec.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Chain(format!("not a PEM certificate chain ({e})")))?;
    let Some(leaf) = chain.first() else {
        return Err(CertError::Chain("no CERTIFICATE block".to_owned()));
    };
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| CertError::Chain(format!("end-entity certificate does not parse ({e})")))?;
    let mut sans: Vec<String> = Vec::new();
    if let Ok(Some(ext)) = parsed.subject_alternative_name() {
        for name in &ext.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                sans.push(dns.to_ascii_lowercase());
            }
        }
    }
    if sans.is_empty() {
        return Err(CertError::Chain(
            "end-entity certificate has no DNS subject alternative name".to_owned(),
        ));
    }
    let validity = parsed.validity();
    let (not_before, not_after) = (
        validity.not_before.to_datetime(),
        validity.not_after.to_datetime(),
    );
    let key = PrivateKeyDer::from_pem_slice(rec.key_pem.as_bytes())
        .map_err(|e| CertError::Key(format!("no PEM private key ({e})")))?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain.clone(), key, &provider)
        .map_err(|e| CertError::Mismatch(format!("unusable with cert_pem ({e})")))?;
    Ok(LoadedCert {
        info: Certificate {
            name: rec.name.clone(),
            sans,
            not_before: rfc3339(not_before),
            not_after: rfc3339(not_after),
            chain_len: chain.len(),
            created_at: rec.created_at.clone(),
        },
        key: Arc::new(certified),
        not_after_unix: not_after.unix_timestamp(),
    })
}

/// Whether certificate name `cert_name` (a SAN, maybe `*.domain`) covers lower-case `host`.
pub fn name_covers(cert_name: &str, host: &str) -> bool {
    match cert_name.strip_prefix("*.") {
        Some(rest) => host
            .split_once('.')
            .is_some_and(|(first, tail)| crate::pattern::is_dns_label(first) && tail == rest),
        None => cert_name == host,
    }
}

/// An immutable snapshot of every certificate, indexed by SAN.
#[derive(Debug, Default)]
pub struct CertIndex {
    by_name: BTreeMap<String, Arc<LoadedCert>>,
    exact: HashMap<String, Arc<LoadedCert>>,
    wildcard: HashMap<String, Arc<LoadedCert>>,
}

impl CertIndex {
    fn build(by_name: BTreeMap<String, Arc<LoadedCert>>) -> Self {
        let mut exact: HashMap<String, Arc<LoadedCert>> = HashMap::new();
        let mut wildcard: HashMap<String, Arc<LoadedCert>> = HashMap::new();
        for cert in by_name.values() {
            for san in &cert.info.sans {
                let (map, key) = match san.strip_prefix("*.") {
                    Some(rest) => (&mut wildcard, rest),
                    None => (&mut exact, san.as_str()),
                };
                let slot = map.entry(key.to_owned()).or_insert_with(|| cert.clone());
                if cert.not_after_unix > slot.not_after_unix {
                    *slot = cert.clone();
                }
            }
        }
        Self {
            by_name,
            exact,
            wildcard,
        }
    }

    /// The certificate covering lower-case `host`, exact SAN first.
    fn select(&self, host: &str) -> Option<&Arc<LoadedCert>> {
        self.exact.get(host).or_else(|| {
            let (first, rest) = host.split_once('.')?;
            crate::pattern::is_dns_label(first)
                .then(|| self.wildcard.get(rest))
                .flatten()
        })
    }
}

/// Every stored certificate, swapped atomically on change.
#[derive(Debug, Default)]
pub struct CertStore {
    index: ArcSwap<CertIndex>,
}

impl CertStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The signing key and chain for an SNI, for the TLS terminate path.
    pub fn certified_key(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        let mut buf = [0u8; MAX_HOST_BYTES];
        let host = lower_ascii(sni, &mut buf)?;
        self.index.load().select(host).map(|c| c.key.clone())
    }

    /// Whether some certificate covers every hostname an SNI pattern can match.
    pub fn covers(&self, pattern: &crate::pattern::SniPattern) -> bool {
        let index = self.index.load();
        index
            .by_name
            .values()
            .any(|c| c.info.sans.iter().any(|san| pattern.covered_by(san)))
    }

    /// What the API shows for one certificate.
    pub fn get(&self, name: &str) -> Option<Certificate> {
        self.index.load().by_name.get(name).map(|c| c.info.clone())
    }

    /// Every certificate, by name.
    pub fn list(&self) -> Vec<Certificate> {
        self.index
            .load()
            .by_name
            .values()
            .map(|c| c.info.clone())
            .collect()
    }

    /// Adds or replaces a certificate.
    pub fn insert(&self, cert: LoadedCert) {
        let mut map = self.index.load().by_name.clone();
        map.insert(cert.info.name.clone(), Arc::new(cert));
        self.index.store(Arc::new(CertIndex::build(map)));
    }

    /// Removes a certificate; returns whether it existed.
    pub fn remove(&self, name: &str) -> bool {
        let mut map = self.index.load().by_name.clone();
        let existed = map.remove(name).is_some();
        self.index.store(Arc::new(CertIndex::build(map)));
        existed
    }

    /// The certificates that would remain after removing `name`, as a throwaway store.
    pub fn without(&self, name: &str) -> Self {
        let mut map = self.index.load().by_name.clone();
        map.remove(name);
        Self {
            index: ArcSwap::from_pointee(CertIndex::build(map)),
        }
    }
}

impl rustls::server::ResolvesServerCert for CertStore {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.certified_key(hello.server_name()?)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A self-signed certificate and key for `sans`, as a stored record.
    pub(crate) fn self_signed(name: &str, sans: &[&str]) -> StoredCertificate {
        let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
        let ck = rcgen::generate_simple_self_signed(sans).unwrap();
        StoredCertificate {
            name: name.to_owned(),
            cert_pem: ck.cert.pem(),
            key_pem: ck.key_pair.serialize_pem(),
            created_at: "2026-01-01T00:00:00Z".to_owned(),
        }
    }

    #[test]
    fn parses_sans_and_selects_exact_then_wildcard() {
        let store = CertStore::new();
        store.insert(load(&self_signed("wild", &["*.example.com"])).unwrap());
        store.insert(load(&self_signed("one", &["DB.example.com", "other.org"])).unwrap());
        assert_eq!(
            store.get("one").unwrap().sans,
            vec!["db.example.com", "other.org"]
        );
        let one = store.certified_key("db.example.com").unwrap();
        let wild = store.certified_key("X.Example.com").unwrap();
        assert!(!Arc::ptr_eq(&one, &wild));
        assert!(Arc::ptr_eq(
            &wild,
            &store.certified_key("y.example.com").unwrap()
        ));
        assert!(store.certified_key("a.b.example.com").is_none());
        assert!(store.certified_key("example.com").is_none());
        assert!(store.remove("wild"));
        assert!(store.certified_key("x.example.com").is_none());
        assert!(!store.remove("wild"));
    }

    #[test]
    fn refuses_bad_chains_keys_and_mismatches() {
        let good = self_signed("a", &["a.example.com"]);
        let other = self_signed("b", &["b.example.com"]);
        let mut rec = good.clone();
        rec.cert_pem = "nonsense".to_owned();
        assert_eq!(
            load(&rec).unwrap_err().to_string(),
            "cert_pem: no CERTIFICATE block"
        );
        let mut rec = good.clone();
        rec.key_pem = "nonsense".to_owned();
        assert!(
            load(&rec)
                .unwrap_err()
                .to_string()
                .starts_with("key_pem: no PEM private key")
        );
        let mut rec = good.clone();
        rec.key_pem = other.key_pem;
        assert!(matches!(load(&rec), Err(CertError::Mismatch(_))));
    }

    #[test]
    fn coverage_of_patterns() {
        let store = CertStore::new();
        store.insert(load(&self_signed("w", &["*.pg.example.com", "api.example.com"])).unwrap());
        let p = |s| crate::pattern::SniPattern::parse(s).unwrap();
        assert!(store.covers(&p("{id}.pg.example.com")));
        assert!(store.covers(&p("x.pg.example.com")));
        assert!(store.covers(&p("api.example.com")));
        assert!(!store.covers(&p("{id}.example.com")));
        assert!(!store.covers(&p("a.b.pg.example.com")));
        assert!(!store.without("w").covers(&p("api.example.com")));
    }
}
