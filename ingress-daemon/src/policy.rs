//! Backend address policy: which resolved addresses a flow may be connected to.
//!
//! SNI chooses the backend, so a client must never be able to name its way to the daemon's
//! own API or to a cloud metadata service. Checked on the resolved address, after IPv4-mapped
//! IPv6 is unwrapped (`::ffff:169.254.169.254` is 169.254.169.254), in this order:
//! 1. always refused: link-local (169.254.0.0/16, fe80::/10), unspecified (`0.0.0.0`, `::`,
//!    which connect to the local host), multicast and broadcast;
//! 2. refused: the API's own address and port — and when the API listens on a wildcard, any
//!    local address (loopback or one of `local_addrs`) on the API port;
//! 3. allowed only inside the configured CIDR allow-list ([`DEFAULT_ALLOW`] by default:
//!    loopback and the private ranges).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// The default allow-list: loopback, RFC 1918, unique local IPv6 and shared address space.
pub const DEFAULT_ALLOW: &[&str] = &[
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
    "100.64.0.0/10",
];

/// An address prefix such as `10.0.0.0/8` or `fc00::/7`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix_len: u8,
}

/// A CIDR that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid cidr {input:?}: {reason}")]
pub struct CidrError {
    /// The text given.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl Cidr {
    /// The prefix `network/prefix_len`; host bits of `network` are cleared.
    pub fn new(network: IpAddr, prefix_len: u8) -> Option<Self> {
        let network = network.to_canonical();
        let bits = if network.is_ipv4() { 32 } else { 128 };
        (prefix_len <= bits).then(|| Cidr {
            network: mask(network, prefix_len),
            prefix_len,
        })
    }

    /// Whether `addr` (IPv4-mapped IPv6 unwrapped) lies inside the prefix.
    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = addr.to_canonical();
        addr.is_ipv4() == self.network.is_ipv4() && mask(addr, self.prefix_len) == self.network
    }
}

/// Clears all but the first `prefix_len` bits of `addr`.
fn mask(addr: IpAddr, prefix_len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX
                .checked_shl(32 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = u128::MAX
                .checked_shl(128 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// Parses `addr/len`, or a bare address as a single-host prefix.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| CidrError {
            input: s.to_owned(),
            reason,
        };
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| err("bad address"))?;
        let max = if addr.to_canonical().is_ipv4() {
            32
        } else {
            128
        };
        let len = match len {
            Some(l) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) => {
                l.parse::<u8>().map_err(|_| err("bad prefix length"))?
            }
            Some(_) => return Err(err("bad prefix length")),
            None => max,
        };
        // An IPv4-mapped IPv6 prefix counts its length over 128 bits.
        let len = match addr {
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => len
                .checked_sub(96)
                .ok_or_else(|| err("prefix shorter than the mapped range"))?,
            _ => len,
        };
        Cidr::new(addr, len).ok_or_else(|| err("prefix length too long"))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

/// Why a backend address is refused; [`PolicyError::reason`] is always `backend_not_allowed`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// Link-local, unspecified, multicast or broadcast: never a backend.
    #[error("backend {addr} is a link-local, unspecified or multicast address")]
    Forbidden {
        /// The refused address.
        addr: SocketAddr,
    },
    /// The daemon's own API.
    #[error("backend {addr} is the daemon's api")]
    Api {
        /// The refused address.
        addr: SocketAddr,
    },
    /// Outside the allow-list.
    #[error("backend {addr} is outside the allowed networks")]
    NotAllowed {
        /// The refused address.
        addr: SocketAddr,
    },
}

impl PolicyError {
    /// Stable snake_case reason for metrics, logs and API errors.
    pub fn reason(&self) -> &'static str {
        "backend_not_allowed"
    }
}

/// The backend address policy.
#[derive(Debug, Clone)]
pub struct BackendPolicy {
    allow: Vec<Cidr>,
    api: Option<SocketAddr>,
    local_addrs: Vec<IpAddr>,
}

impl Default for BackendPolicy {
    fn default() -> Self {
        let allow = DEFAULT_ALLOW
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect();
        BackendPolicy {
            allow,
            api: None,
            local_addrs: Vec::new(),
        }
    }
}

impl BackendPolicy {
    /// A policy with the given allow-list, protecting the API listening on `api`.
    pub fn new(allow: Vec<Cidr>, api: Option<SocketAddr>) -> Self {
        BackendPolicy {
            allow,
            api,
            local_addrs: Vec::new(),
        }
    }

    /// Protects the API listening on `api` (as bound: a wildcard covers every local address).
    pub fn with_api(mut self, api: SocketAddr) -> Self {
        self.api = Some(api);
        self
    }

    /// Adds this host's interface addresses, which a wildcard-bound API also listens on.
    pub fn with_local_addrs(mut self, addrs: impl IntoIterator<Item = IpAddr>) -> Self {
        self.local_addrs
            .extend(addrs.into_iter().map(|a| a.to_canonical()));
        self
    }

    /// The allow-list.
    pub fn allow_list(&self) -> &[Cidr] {
        &self.allow
    }

    /// Checks that a flow may be connected to `addr`.
    pub fn check(&self, addr: SocketAddr) -> Result<(), PolicyError> {
        let ip = addr.ip().to_canonical();
        let forbidden = match ip {
            IpAddr::V4(v4) => {
                v4.is_link_local() || v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()
            }
            IpAddr::V6(v6) => {
                v6.is_unicast_link_local() || v6.is_unspecified() || v6.is_multicast()
            }
        };
        if forbidden {
            return Err(PolicyError::Forbidden { addr });
        }
        if let Some(api) = self.api
            && api.port() == addr.port()
        {
            let api_ip = api.ip().to_canonical();
            let is_local = ip.is_loopback() || self.local_addrs.contains(&ip);
            if api_ip == ip || (api_ip.is_unspecified() && is_local) {
                return Err(PolicyError::Api { addr });
            }
        }
        if self.allow.iter().any(|c| c.contains(ip)) {
            Ok(())
        } else {
            Err(PolicyError::NotAllowed { addr })
        }
    }
}

#[cfg(test)]
#[allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a failing test panics"
)]
mod tests;
