//! Instance resolution: the instance name a rule picked → the address to connect to.
//!
//! Two sources. `static` reads the instance registry the control plane owns, through the
//! [`Registry`] trait (implemented for `ArcSwap<HashMap<String, IpAddr>>`, swapped atomically
//! and read without locks). `dns` asks a configured DNS server for `{instance}.<suffix>` with
//! `hickory-resolver` and caches the answer for the record's TTL; a name that does not exist
//! (NXDOMAIN or no address) is cached for a short, configured `negative_ttl`, so a flood of
//! connections for a missing instance does not become a flood of queries, while a new instance
//! is found soon. Timeouts and server failures are not cached. Names are matched
//! case-insensitively; an instance must be a single DNS label, so `a.b` can never reach
//! `a.b.<suffix>`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfigGroup, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::ProtoErrorKind;

/// Default time a DNS lookup may take.
pub const DEFAULT_RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);
/// Default time an NXDOMAIN is remembered.
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// Default bound on cached DNS answers.
pub const DEFAULT_MAX_CACHED: usize = 4096;

/// The control plane's instance registry, as the data plane sees it.
pub trait Registry: Send + Sync {
    /// The address of `instance` (a lower-case name), if it is registered.
    fn address(&self, instance: &str) -> Option<IpAddr>;
}

impl Registry for ArcSwap<HashMap<String, IpAddr>> {
    fn address(&self, instance: &str) -> Option<IpAddr> {
        self.load().get(instance).copied()
    }
}

impl Registry for HashMap<String, IpAddr> {
    fn address(&self, instance: &str) -> Option<IpAddr> {
        self.get(instance).copied()
    }
}

/// Why an instance has no address; each variant has a stable [`ResolveError::reason`].
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// Not registered, NXDOMAIN, or no address record.
    #[error("instance {instance:?} not found")]
    NotFound {
        /// The instance asked for.
        instance: String,
    },
    /// The name is not a single DNS label.
    #[error("instance name {instance:?} is not a dns label")]
    InvalidName {
        /// The instance asked for.
        instance: String,
    },
    /// The DNS server failed (SERVFAIL, REFUSED, unreachable).
    #[error("resolving instance {instance:?} failed")]
    Failed {
        /// The instance asked for.
        instance: String,
        /// What the resolver reported.
        #[source]
        source: Box<hickory_resolver::ResolveError>,
    },
    /// The DNS server did not answer within the resolve timeout.
    #[error("resolving instance {instance:?} timed out")]
    Timeout {
        /// The instance asked for.
        instance: String,
    },
}

impl ResolveError {
    /// Stable snake_case reason for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            ResolveError::Timeout { .. } => "resolve_timeout",
            _ => "resolve_failed",
        }
    }
}

/// Settings of the `dns` resolver.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// The DNS server to ask (e.g. `127.0.0.53:53`).
    pub server: SocketAddr,
    /// The zone instances live in: `vm.test` makes instance `a` resolve as `a.vm.test.`.
    pub suffix: String,
    /// How long one lookup may take.
    pub resolve_timeout: Duration,
    /// How long a name that does not exist is remembered.
    pub negative_ttl: Duration,
    /// Bound on cached answers.
    pub max_cached: usize,
}

impl DnsConfig {
    /// Settings with the default timeout, negative TTL and cache bound.
    pub fn new(server: SocketAddr, suffix: impl Into<String>) -> Self {
        DnsConfig {
            server,
            suffix: suffix.into(),
            resolve_timeout: DEFAULT_RESOLVE_TIMEOUT,
            negative_ttl: DEFAULT_NEGATIVE_TTL,
            max_cached: DEFAULT_MAX_CACHED,
        }
    }
}

/// Resolves instance names to addresses.
#[derive(Clone)]
pub enum Resolver {
    /// Look the name up in the control plane's registry.
    Static(Arc<dyn Registry>),
    /// Ask DNS for `{instance}.<suffix>`.
    Dns(Arc<DnsResolver>),
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resolver::Static(_) => f.write_str("Resolver::Static"),
            Resolver::Dns(d) => write!(f, "Resolver::Dns({}, {})", d.server, d.suffix),
        }
    }
}

impl Resolver {
    /// A resolver over the control plane's registry.
    pub fn registry(registry: Arc<dyn Registry>) -> Self {
        Resolver::Static(registry)
    }

    /// A DNS resolver; no query is sent until the first [`Resolver::resolve`].
    pub fn dns(config: DnsConfig) -> Self {
        Resolver::Dns(Arc::new(DnsResolver::new(config)))
    }

    /// The address of `instance`, matched case-insensitively.
    pub async fn resolve(&self, instance: &str) -> Result<IpAddr, ResolveError> {
        let name = normalise(instance)?;
        match self {
            Resolver::Static(registry) => {
                registry
                    .address(&name)
                    .ok_or_else(|| ResolveError::NotFound {
                        instance: name.into_owned(),
                    })
            }
            Resolver::Dns(dns) => dns.resolve(&name).await,
        }
    }
}

/// Lower-cases `instance` (without allocating when it already is) and checks it is one label.
fn normalise(instance: &str) -> Result<Cow<'_, str>, ResolveError> {
    let bytes = instance.as_bytes();
    let valid = !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        && bytes.first() != Some(&b'-')
        && bytes.last() != Some(&b'-');
    if !valid {
        return Err(ResolveError::InvalidName {
            instance: instance.to_owned(),
        });
    }
    Ok(if bytes.iter().any(u8::is_ascii_uppercase) {
        Cow::Owned(instance.to_ascii_lowercase())
    } else {
        Cow::Borrowed(instance)
    })
}

/// A cached answer: an address, or `None` for a name that does not exist.
#[derive(Debug, Clone, Copy)]
struct Cached {
    address: Option<IpAddr>,
    expires: Instant,
}

/// The `dns` resolver: hickory plus a TTL-bounded answer cache.
pub struct DnsResolver {
    resolver: TokioResolver,
    server: SocketAddr,
    suffix: String,
    resolve_timeout: Duration,
    negative_ttl: Duration,
    max_cached: usize,
    cache: Mutex<HashMap<String, Cached>>,
}

impl DnsResolver {
    /// Builds the resolver for `config`.
    pub fn new(config: DnsConfig) -> Self {
        let servers = NameServerConfigGroup::from_ips_clear(
            &[config.server.ip()],
            config.server.port(),
            true,
        );
        let mut opts = ResolverOpts::default();
        opts.timeout = config.resolve_timeout;
        opts.attempts = 1;
        opts.ndots = 0;
        opts.use_hosts_file = ResolveHosts::Never;
        opts.ip_strategy = LookupIpStrategy::Ipv4thenIpv6;
        // hickory caches too: keep its negative entries as short as ours.
        opts.negative_max_ttl = Some(config.negative_ttl);
        let resolver = TokioResolver::builder_with_config(
            ResolverConfig::from_parts(None, Vec::new(), servers),
            TokioConnectionProvider::default(),
        )
        .with_options(opts)
        .build();
        let suffix = config.suffix.trim_matches('.').to_ascii_lowercase();
        DnsResolver {
            resolver,
            server: config.server,
            suffix,
            resolve_timeout: config.resolve_timeout,
            negative_ttl: config.negative_ttl,
            max_cached: config.max_cached.max(1),
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, instance: &str, now: Instant) -> Option<Option<IpAddr>> {
        let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache
            .get(instance)
            .filter(|c| c.expires > now)
            .map(|c| c.address)
    }

    fn remember(&self, instance: &str, address: Option<IpAddr>, expires: Instant) {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= self.max_cached && !cache.contains_key(instance) {
            let now = Instant::now();
            cache.retain(|_, c| c.expires > now);
            if cache.len() >= self.max_cached {
                cache.clear();
            }
        }
        cache.insert(instance.to_owned(), Cached { address, expires });
    }

    /// Resolves a normalised instance name.
    async fn resolve(&self, instance: &str) -> Result<IpAddr, ResolveError> {
        let not_found = || ResolveError::NotFound {
            instance: instance.to_owned(),
        };
        let now = Instant::now();
        if let Some(answer) = self.cached(instance, now) {
            return answer.ok_or_else(not_found);
        }
        let fqdn = format!("{instance}.{}.", self.suffix);
        let lookup = tokio::time::timeout(self.resolve_timeout, self.resolver.lookup_ip(fqdn))
            .await
            .map_err(|_| ResolveError::Timeout {
                instance: instance.to_owned(),
            })?;
        match lookup {
            Ok(ips) => {
                let address = ips.iter().next();
                let expires = if address.is_some() {
                    ips.valid_until()
                } else {
                    now + self.negative_ttl
                };
                self.remember(instance, address, expires);
                address.ok_or_else(not_found)
            }
            Err(e) if e.is_no_records_found() => {
                self.remember(instance, None, now + self.negative_ttl);
                Err(not_found())
            }
            Err(e)
                if e.proto()
                    .is_some_and(|p| matches!(p.kind(), ProtoErrorKind::Timeout)) =>
            {
                Err(ResolveError::Timeout {
                    instance: instance.to_owned(),
                })
            }
            Err(e) => Err(ResolveError::Failed {
                instance: instance.to_owned(),
                source: Box::new(e),
            }),
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
