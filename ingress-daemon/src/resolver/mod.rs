//! Instance name → address: the static registry first, then DNS (`{instance}.<dns_suffix>`).
//!
//! Design: an instance name is one DNS label, matched case-insensitively, so `a.b` can never
//! reach `a.b.<suffix>`. The static registry ([`Instances`]) answers without I/O or locks.
//! When `dns_suffix` is configured, names it does not know are looked up as the fully
//! qualified `{instance}.{suffix}.` (see `dns.rs`): through `dns_server`, else the system's
//! resolv.conf, with answers cached for their record's TTL and names that do not exist cached
//! for `dns_negative_ttl_ms`, each lookup bounded by `resolve_timeout_ms`. The control plane
//! resolves literal targets at create time; the data path resolves on every connection, then
//! must apply the backend policy to the result ([`crate::backend::BackendPolicy::check`]).
mod dns;

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::Instances;
use crate::config::Config;

pub use dns::DEFAULT_MAX_CACHED;

/// Why an instance has no address; [`ResolveError::reason`] is its stable name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// Not in the static registry, and DNS is not configured.
    #[error("instance {instance:?} does not exist")]
    NotFound {
        /// The instance asked for.
        instance: String,
    },
    /// The name is not a single DNS label, so no instance can have it.
    #[error("instance {instance:?} does not exist (not a single dns label)")]
    InvalidName {
        /// The instance asked for.
        instance: String,
    },
    /// Not in the static registry, and DNS has no address for it (NXDOMAIN or no record).
    #[error("instance {instance:?} does not exist (DNS {name}: {detail})")]
    DnsNotFound {
        /// The instance asked for.
        instance: String,
        /// The fully qualified name looked up.
        name: String,
        /// `no such name` or `no address record`.
        detail: &'static str,
    },
    /// The DNS server failed (SERVFAIL, REFUSED, unreachable, malformed answer).
    #[error("resolving instance {instance:?} (DNS {name}) failed: {message}")]
    Failed {
        /// The instance asked for.
        instance: String,
        /// The fully qualified name looked up.
        name: String,
        /// What the resolver reported.
        message: String,
    },
    /// The DNS server did not answer within `resolve_timeout_ms`.
    #[error("resolving instance {instance:?} (DNS {name}) timed out after {timeout_ms} ms")]
    Timeout {
        /// The instance asked for.
        instance: String,
        /// The fully qualified name looked up.
        name: String,
        /// The configured `resolve_timeout_ms`.
        timeout_ms: u64,
    },
    /// The system resolver configuration could not be read (no `dns_server` configured).
    #[error("reading the system resolver configuration: {0}")]
    SystemConfig(String),
}

impl ResolveError {
    /// Stable snake_case reason for metrics and logs: `resolve_timeout` when the DNS server
    /// did not answer in time, else `resolve_failed`.
    pub fn reason(&self) -> &'static str {
        match self {
            ResolveError::Timeout { .. } => "resolve_timeout",
            ResolveError::NotFound { .. }
            | ResolveError::InvalidName { .. }
            | ResolveError::DnsNotFound { .. }
            | ResolveError::Failed { .. }
            | ResolveError::SystemConfig(_) => "resolve_failed",
        }
    }
}

/// Resolves instance names to addresses: static registry, then DNS.
pub struct Resolver {
    instances: Arc<Instances>,
    dns: Option<dns::DnsResolver>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("dns", &self.dns)
            .finish_non_exhaustive()
    }
}

impl Resolver {
    /// A resolver over `instances`, with DNS when `config.dns_suffix` is set (no query is sent
    /// before the first [`Resolver::resolve`]).
    pub fn new(instances: Arc<Instances>, config: &Config) -> Result<Self, ResolveError> {
        let dns = match &config.dns_suffix {
            Some(suffix) => Some(dns::DnsResolver::new(dns::DnsSettings {
                server: config.dns_server,
                suffix: suffix.clone(),
                resolve_timeout: Duration::from_millis(config.resolve_timeout_ms),
                negative_ttl: Duration::from_millis(config.dns_negative_ttl_ms),
                max_cached: DEFAULT_MAX_CACHED,
            })?),
            None => None,
        };
        Ok(Self { instances, dns })
    }

    /// Whether names outside the static registry are looked up in DNS.
    pub fn uses_dns(&self) -> bool {
        self.dns.is_some()
    }

    /// The address of `instance` (one DNS label, any case): static registry, then DNS.
    pub async fn resolve(&self, instance: &str) -> Result<IpAddr, ResolveError> {
        let name = normalise(instance)?;
        if let Some(ip) = self.instances.address(&name) {
            return Ok(ip);
        }
        match &self.dns {
            // Boxed: the DNS lookup's state is large, and inline it would be part of (and
            // copied with) every connection's task, most of which never ask DNS.
            Some(dns) => Box::pin(dns.resolve(&name)).await,
            None => Err(ResolveError::NotFound {
                instance: name.into_owned(),
            }),
        }
    }
}

/// Lower-cases `instance` (without allocating when it already is) and checks it is one label.
fn normalise(instance: &str) -> Result<Cow<'_, str>, ResolveError> {
    let name = if instance.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(instance.to_ascii_lowercase())
    } else {
        Cow::Borrowed(instance)
    };
    if crate::pattern::is_dns_label(&name) {
        Ok(name)
    } else {
        Err(ResolveError::InvalidName {
            instance: instance.to_owned(),
        })
    }
}

#[cfg(test)]
#[allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a failing test panics"
)]
mod tests;
