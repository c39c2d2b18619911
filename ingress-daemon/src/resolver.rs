//! Instance name → address: the static registry first, then DNS (`{instance}.<dns_suffix>`).
//!
//! Design: the static registry ([`Instances`]) answers without I/O or locks. When `dns_suffix`
//! is configured, names it does not know are looked up as the fully qualified
//! `{instance}.{suffix}.` through hickory (the configured `dns_server`, else the system's
//! resolv.conf), with hickory's cache. The control plane resolves literal targets at create
//! time; the data path resolves on every connection, then must apply the backend policy to the
//! result ([`crate::backend::BackendPolicy::check`]).
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;

use crate::backend::Instances;
use crate::config::Config;

/// Why an instance has no address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// Not in the static registry, and DNS is not configured.
    #[error("instance {instance:?} does not exist")]
    NotFound {
        /// The instance name.
        instance: String,
    },
    /// The DNS lookup failed or returned no address.
    #[error("instance {instance:?} does not exist (DNS {name}: {message})")]
    Dns {
        /// The instance name.
        instance: String,
        /// The name looked up.
        name: String,
        /// The resolver's message.
        message: String,
    },
    /// The system resolver configuration could not be read.
    #[error("reading the system resolver configuration: {0}")]
    SystemConfig(String),
}

struct Dns {
    resolver: TokioResolver,
    suffix: String,
}

/// Resolves instance names to addresses.
pub struct Resolver {
    instances: Arc<Instances>,
    dns: Option<Dns>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("dns_suffix", &self.dns.as_ref().map(|d| &d.suffix))
            .finish_non_exhaustive()
    }
}

impl Resolver {
    /// A resolver over `instances`, with DNS when `config.dns_suffix` is set.
    pub fn new(instances: Arc<Instances>, config: &Config) -> Result<Self, ResolveError> {
        let Some(suffix) = config.dns_suffix.clone() else {
            return Ok(Self {
                instances,
                dns: None,
            });
        };
        let provider = TokioConnectionProvider::default();
        let mut builder = match config.dns_server {
            Some(server) => {
                let group =
                    NameServerConfigGroup::from_ips_clear(&[server.ip()], server.port(), true);
                TokioResolver::builder_with_config(
                    ResolverConfig::from_parts(None, vec![], group),
                    provider,
                )
            }
            None => TokioResolver::builder(provider)
                .map_err(|e| ResolveError::SystemConfig(e.to_string()))?,
        };
        let opts = builder.options_mut();
        opts.timeout = Duration::from_millis(config.connect_timeout_ms.clamp(100, 5_000));
        opts.attempts = 2;
        Ok(Self {
            instances,
            dns: Some(Dns {
                resolver: builder.build(),
                suffix,
            }),
        })
    }

    /// Whether names outside the static registry are looked up in DNS.
    pub fn uses_dns(&self) -> bool {
        self.dns.is_some()
    }

    /// The address of an instance: static registry, then DNS.
    pub async fn resolve(&self, instance: &str) -> Result<IpAddr, ResolveError> {
        if let Some(ip) = self.instances.address(instance) {
            return Ok(ip);
        }
        let Some(dns) = &self.dns else {
            return Err(ResolveError::NotFound {
                instance: instance.to_owned(),
            });
        };
        let name = format!("{instance}.{}.", dns.suffix);
        let fail = |message: String| ResolveError::Dns {
            instance: instance.to_owned(),
            name: name.clone(),
            message,
        };
        let lookup = dns
            .resolver
            .lookup_ip(name.as_str())
            .await
            .map_err(|e| fail(e.to_string()))?;
        lookup
            .iter()
            .next()
            .ok_or_else(|| fail("no address".to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn static_registry_without_dns() {
        let instances = Arc::new(Instances::new());
        instances.insert("db", "127.0.0.2".parse().unwrap());
        let r = Resolver::new(instances, &Config::default()).unwrap();
        assert!(!r.uses_dns());
        assert_eq!(r.resolve("db").await, Ok("127.0.0.2".parse().unwrap()));
        assert_eq!(
            r.resolve("nope").await.unwrap_err().to_string(),
            "instance \"nope\" does not exist"
        );
    }
}
