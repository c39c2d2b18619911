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

/// Why a backend address is refused; [`PolicyError::reason`] is always `backend_not_allowed`.
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

impl PolicyError {
    /// Stable snake_case reason for metrics, logs and API errors: `backend_not_allowed`.
    pub fn reason(&self) -> &'static str {
        "backend_not_allowed"
    }
}

/// Which backend addresses the daemon may connect to.
#[derive(Debug, Clone)]
pub struct BackendPolicy {
    allow: Vec<Cidr>,
    api: SocketAddr,
    local_addrs: Vec<IpAddr>,
}

impl BackendPolicy {
    /// A policy allowing `allow` and protecting the API listening on `api` (as bound).
    pub fn new(allow: Vec<Cidr>, api: SocketAddr) -> Self {
        Self {
            allow,
            api,
            local_addrs: Vec::new(),
        }
    }

    /// Adds this host's interface addresses, which an API bound to a wildcard also listens on
    /// (loopback addresses are always covered).
    #[must_use]
    pub fn with_local_addrs(mut self, addrs: impl IntoIterator<Item = IpAddr>) -> Self {
        self.local_addrs.extend(addrs.into_iter().map(canonical_ip));
        self.local_addrs.sort_unstable();
        self.local_addrs.dedup();
        self
    }

    /// The networks backends may be in.
    pub fn allow_list(&self) -> &[Cidr] {
        &self.allow
    }

    /// Checks an address without a port (instance registration): never link-local, never
    /// unspecified, multicast or broadcast, and inside `backend_allow`.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), PolicyError> {
        let ip = canonical_ip(ip);
        Self::check_unicast(ip)?;
        self.check_allowed(ip)
    }

    /// Checks a full backend address (call before every connect to a resolved target): as
    /// [`Self::check_ip`], and never the API — when the API listens on a wildcard, no local
    /// address (loopback or [`Self::with_local_addrs`]) on the API's port.
    pub fn check(&self, addr: SocketAddr) -> Result<(), PolicyError> {
        let ip = canonical_ip(addr.ip());
        Self::check_unicast(ip)?;
        if addr.port() == self.api.port() {
            let api_ip = canonical_ip(self.api.ip());
            let local = ip.is_loopback() || self.local_addrs.contains(&ip);
            if ip == api_ip || (api_ip.is_unspecified() && local) {
                return Err(PolicyError::ApiAddress(addr));
            }
        }
        self.check_allowed(ip)
    }

    /// Refuses link-local (cloud metadata), unspecified (the local host), multicast and
    /// broadcast addresses, whatever the allow-list says.
    fn check_unicast(ip: IpAddr) -> Result<(), PolicyError> {
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
        Ok(())
    }

    fn check_allowed(&self, ip: IpAddr) -> Result<(), PolicyError> {
        if self.allow.iter().any(|net| net.contains(ip)) {
            Ok(())
        } else {
            Err(PolicyError::NotAllowed(ip))
        }
    }
}

/// This host's interface addresses, for a policy protecting an API bound to a wildcard.
///
/// Read once at start-up: an address added to an interface later is not covered.
pub fn local_addrs() -> std::io::Result<Vec<IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)?;
    Ok(addrs
        .filter_map(|ifa| {
            let addr = ifa.address?;
            addr.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .collect())
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
#[allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a failing test panics"
)]
mod tests;
