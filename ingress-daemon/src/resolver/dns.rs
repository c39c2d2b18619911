//! The DNS half of the resolver: hickory plus a TTL-bounded answer cache.
//!
//! Answers are cached for their record's TTL; a name that does not exist (NXDOMAIN or no
//! address record) is cached for a short `negative_ttl`, so a flood of connections for a
//! missing instance does not become a flood of queries while a new instance is still found
//! soon. Timeouts and server failures are not cached. The cache is a small map behind a mutex
//! held only to read or write one entry; it is bounded by `max_cached` (expired entries are
//! dropped first, then everything).
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfigGroup, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::ProtoErrorKind;

use super::ResolveError;

/// Default bound on cached DNS answers.
pub const DEFAULT_MAX_CACHED: usize = 4096;

/// Settings of the DNS resolver.
#[derive(Debug, Clone)]
pub(super) struct DnsSettings {
    /// The DNS server to ask; `None` reads the system's resolv.conf.
    pub(super) server: Option<SocketAddr>,
    /// The zone instances live in: `vm.test` makes instance `a` resolve as `a.vm.test.`.
    pub(super) suffix: String,
    /// How long one lookup may take.
    pub(super) resolve_timeout: Duration,
    /// How long a name that does not exist is remembered.
    pub(super) negative_ttl: Duration,
    /// Bound on cached answers.
    pub(super) max_cached: usize,
}

/// Why DNS has no address for a name, as cached.
#[derive(Debug, Clone, Copy)]
enum Absent {
    NoSuchName,
    NoAddress,
}

impl Absent {
    fn detail(self) -> &'static str {
        match self {
            Absent::NoSuchName => "no such name",
            Absent::NoAddress => "no address record",
        }
    }
}

/// A cached answer: an address, or why there is none.
#[derive(Debug, Clone, Copy)]
struct Cached {
    answer: Result<IpAddr, Absent>,
    expires: Instant,
}

/// `{instance}.<suffix>.` through hickory, with the answer cache.
pub(super) struct DnsResolver {
    resolver: TokioResolver,
    server: Option<SocketAddr>,
    suffix: String,
    resolve_timeout: Duration,
    negative_ttl: Duration,
    max_cached: usize,
    cache: Mutex<HashMap<String, Cached>>,
}

impl std::fmt::Debug for DnsResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsResolver")
            .field("server", &self.server)
            .field("suffix", &self.suffix)
            .field("resolve_timeout", &self.resolve_timeout)
            .field("negative_ttl", &self.negative_ttl)
            .finish_non_exhaustive()
    }
}

impl DnsResolver {
    /// Builds the resolver; reads resolv.conf when no server is configured.
    pub(super) fn new(settings: DnsSettings) -> Result<Self, ResolveError> {
        let provider = TokioConnectionProvider::default();
        let mut opts = ResolverOpts::default();
        let builder = match settings.server {
            Some(server) => {
                let group =
                    NameServerConfigGroup::from_ips_clear(&[server.ip()], server.port(), true);
                opts.use_hosts_file = ResolveHosts::Never;
                TokioResolver::builder_with_config(
                    ResolverConfig::from_parts(None, Vec::new(), group),
                    provider,
                )
            }
            None => TokioResolver::builder(provider)
                .map_err(|e| ResolveError::SystemConfig(e.to_string()))?,
        };
        opts.timeout = settings.resolve_timeout;
        opts.attempts = 1;
        // Names are sent fully qualified; no search list applies.
        opts.ndots = 0;
        opts.ip_strategy = LookupIpStrategy::Ipv4thenIpv6;
        // hickory caches too: keep its negative entries as short as ours.
        opts.negative_max_ttl = Some(settings.negative_ttl);
        let resolver = builder.with_options(opts).build();
        Ok(DnsResolver {
            resolver,
            server: settings.server,
            suffix: settings.suffix.trim_matches('.').to_ascii_lowercase(),
            resolve_timeout: settings.resolve_timeout,
            negative_ttl: settings.negative_ttl,
            max_cached: settings.max_cached.max(1),
            cache: Mutex::new(HashMap::new()),
        })
    }

    fn cached(&self, instance: &str, now: Instant) -> Option<Result<IpAddr, Absent>> {
        let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache
            .get(instance)
            .filter(|c| c.expires > now)
            .map(|c| c.answer)
    }

    fn remember(&self, instance: &str, answer: Result<IpAddr, Absent>, expires: Instant) {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= self.max_cached && !cache.contains_key(instance) {
            let now = Instant::now();
            cache.retain(|_, c| c.expires > now);
            if cache.len() >= self.max_cached {
                cache.clear();
            }
        }
        cache.insert(instance.to_owned(), Cached { answer, expires });
    }

    /// Resolves a normalised (lower-case, one-label) instance name.
    pub(super) async fn resolve(&self, instance: &str) -> Result<IpAddr, ResolveError> {
        let fqdn = || format!("{instance}.{}.", self.suffix);
        let absent = |why: Absent| ResolveError::DnsNotFound {
            instance: instance.to_owned(),
            name: fqdn(),
            detail: why.detail(),
        };
        let timed_out = || ResolveError::Timeout {
            instance: instance.to_owned(),
            name: fqdn(),
            timeout_ms: u64::try_from(self.resolve_timeout.as_millis()).unwrap_or(u64::MAX),
        };
        let now = Instant::now();
        if let Some(answer) = self.cached(instance, now) {
            return answer.map_err(absent);
        }
        let negative_expiry = now.checked_add(self.negative_ttl).unwrap_or(now);
        let lookup = tokio::time::timeout(self.resolve_timeout, self.resolver.lookup_ip(fqdn()))
            .await
            .map_err(|_| timed_out())?;
        match lookup {
            Ok(ips) => match ips.iter().next() {
                Some(ip) => {
                    self.remember(instance, Ok(ip), ips.valid_until());
                    Ok(ip)
                }
                None => {
                    self.remember(instance, Err(Absent::NoAddress), negative_expiry);
                    Err(absent(Absent::NoAddress))
                }
            },
            Err(e) if e.is_no_records_found() => {
                let why = if e.is_nx_domain() {
                    Absent::NoSuchName
                } else {
                    Absent::NoAddress
                };
                self.remember(instance, Err(why), negative_expiry);
                Err(absent(why))
            }
            Err(e)
                if e.proto()
                    .is_some_and(|p| matches!(p.kind(), ProtoErrorKind::Timeout)) =>
            {
                Err(timed_out())
            }
            Err(e) => Err(ResolveError::Failed {
                instance: instance.to_owned(),
                name: fqdn(),
                message: e.to_string(),
            }),
        }
    }
}
