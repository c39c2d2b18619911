//! Backends: the static instance registry and the backend address policy.
//!
//! Design: the registry is an immutable map in an `ArcSwap`, so the data path resolves an
//! instance without locking; the control plane replaces the map on every change. The policy is
//! checked at create time for literal targets and must be checked again by the data path after
//! resolving a templated or DNS target: never the API's own address (that would expose the API
//! through an ingress), never link-local (169.254.0.0/16, fe80::/10: cloud metadata), otherwise
//! only the configured `backend_allow` networks.
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::{Cidr, canonical_ip};

/// Why a backend address is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The address is link-local.
    #[error("{0} is link-local, which is never allowed")]
    LinkLocal(IpAddr),
    /// The address is the API's own listening address.
    #[error("{0} is the API's own address")]
    ApiAddress(SocketAddr),
    /// The address is outside every `backend_allow` network.
    #[error("{0} is outside backend_allow")]
    NotAllowed(IpAddr),
    /// The address is unspecified, broadcast or multicast.
    #[error("{0} is not a unicast address")]
    NotUnicast(IpAddr),
}

/// Which backend addresses the daemon may connect to.
#[derive(Debug, Clone)]
pub struct BackendPolicy {
    allow: Vec<Cidr>,
    api: SocketAddr,
}

impl BackendPolicy {
    /// A policy allowing `allow` and protecting the API at `api`.
    pub fn new(allow: Vec<Cidr>, api: SocketAddr) -> Self {
        Self { allow, api }
    }

    /// Checks an address without a port (instance registration).
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), PolicyError> {
        let ip = canonical_ip(ip);
        let link_local = match ip {
            IpAddr::V4(v4) => v4.is_link_local(),
            IpAddr::V6(v6) => v6.is_unicast_link_local(),
        };
        if link_local {
            return Err(PolicyError::LinkLocal(ip));
        }
        let not_unicast = ip.is_unspecified()
            || ip.is_multicast()
            || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
        if not_unicast {
            return Err(PolicyError::NotUnicast(ip));
        }
        if !self.allow.iter().any(|net| net.contains(ip)) {
            return Err(PolicyError::NotAllowed(ip));
        }
        Ok(())
    }

    /// Checks a full backend address (call before every connect to a resolved target).
    pub fn check(&self, addr: SocketAddr) -> Result<(), PolicyError> {
        self.check_ip(addr.ip())?;
        let ip = canonical_ip(addr.ip());
        let api_ip = canonical_ip(self.api.ip());
        // An API bound to a wildcard is reachable on every local address; be conservative.
        let hits_api = addr.port() == self.api.port()
            && (ip == api_ip || api_ip.is_unspecified() || ip.is_loopback());
        if hits_api {
            return Err(PolicyError::ApiAddress(addr));
        }
        Ok(())
    }
}

/// The static instance registry: name → address, read without locks.
#[derive(Debug, Default)]
pub struct Instances {
    map: ArcSwap<BTreeMap<String, IpAddr>>,
}

impl Instances {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The address of an instance.
    pub fn address(&self, name: &str) -> Option<IpAddr> {
        self.map.load().get(name).copied()
    }

    /// Every instance, by name.
    pub fn snapshot(&self) -> Arc<BTreeMap<String, IpAddr>> {
        self.map.load_full()
    }

    /// Sets an instance's address; returns the previous one.
    pub fn insert(&self, name: &str, ip: IpAddr) -> Option<IpAddr> {
        let mut map = (*self.map.load_full()).clone();
        let old = map.insert(name.to_owned(), ip);
        self.map.store(Arc::new(map));
        old
    }

    /// Removes an instance; returns its address.
    pub fn remove(&self, name: &str) -> Option<IpAddr> {
        let mut map = (*self.map.load_full()).clone();
        let old = map.remove(name);
        self.map.store(Arc::new(map));
        old
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> BackendPolicy {
        let allow = ["127.0.0.0/8", "10.0.0.0/8", "::1/128", "::/0"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        BackendPolicy::new(allow, "127.0.0.1:9180".parse().unwrap())
    }

    #[test]
    fn link_local_is_refused_even_when_allowed() {
        let p = policy();
        let cases = [
            (
                "169.254.169.254:80",
                Err(PolicyError::LinkLocal("169.254.169.254".parse().unwrap())),
            ),
            (
                "[fe80::1]:80",
                Err(PolicyError::LinkLocal("fe80::1".parse().unwrap())),
            ),
            (
                "[::ffff:169.254.1.1]:80",
                Err(PolicyError::LinkLocal("169.254.1.1".parse().unwrap())),
            ),
            (
                "127.0.0.1:9180",
                Err(PolicyError::ApiAddress("127.0.0.1:9180".parse().unwrap())),
            ),
            (
                "127.0.0.2:9180",
                Err(PolicyError::ApiAddress("127.0.0.2:9180".parse().unwrap())),
            ),
            (
                "192.168.1.1:80",
                Err(PolicyError::NotAllowed("192.168.1.1".parse().unwrap())),
            ),
            (
                "0.0.0.0:80",
                Err(PolicyError::NotUnicast("0.0.0.0".parse().unwrap())),
            ),
            ("10.1.1.1:9180", Ok(())),
            ("127.0.0.2:5432", Ok(())),
        ];
        for (addr, want) in cases {
            assert_eq!(p.check(addr.parse().unwrap()), want, "{addr}");
        }
    }

    #[test]
    fn registry_swaps_whole_maps() {
        let r = Instances::new();
        let before = r.snapshot();
        assert_eq!(r.insert("a", "127.0.0.2".parse().unwrap()), None);
        assert_eq!(r.address("a"), Some("127.0.0.2".parse().unwrap()));
        assert!(before.is_empty());
        assert_eq!(r.remove("a"), Some("127.0.0.2".parse().unwrap()));
        assert_eq!(r.address("a"), None);
    }
}
