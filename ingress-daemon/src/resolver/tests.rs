//! The static registry, and the DNS resolver against a real dnsmasq on loopback.

use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::testing::{TempDir, free_udp_port, require_tool, wait_for_tcp};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A DNS resolver for `suffix` at `server`, with the given timeout and negative TTL.
fn dns_resolver(
    server: SocketAddr,
    suffix: &str,
    resolve_timeout: Duration,
    negative_ttl: Duration,
) -> Resolver {
    let config = Config {
        dns_server: Some(server),
        dns_suffix: Some(suffix.to_owned()),
        resolve_timeout_ms: u64::try_from(resolve_timeout.as_millis()).unwrap(),
        dns_negative_ttl_ms: u64::try_from(negative_ttl.as_millis()).unwrap(),
        ..Config::default()
    };
    Resolver::new(Arc::new(Instances::new()), &config).unwrap()
}

#[tokio::test]
async fn static_registry_is_read_live_and_case_insensitively() {
    let instances = Arc::new(Instances::new());
    instances.insert("a", ip("127.0.0.2"));
    let resolver = Resolver::new(instances.clone(), &Config::default()).unwrap();
    assert!(!resolver.uses_dns());
    assert_eq!(resolver.resolve("a").await, Ok(ip("127.0.0.2")));
    assert_eq!(resolver.resolve("A").await, Ok(ip("127.0.0.2")));
    let err = resolver.resolve("b").await.unwrap_err();
    assert_eq!(err.reason(), "resolve_failed");
    assert_eq!(err.to_string(), "instance \"b\" does not exist");
    instances.insert("b", ip("::1"));
    instances.remove("a");
    assert_eq!(resolver.resolve("b").await, Ok(ip("::1")));
    assert!(resolver.resolve("a").await.is_err());
}

#[tokio::test]
async fn the_static_registry_answers_before_dns() {
    // A server that never answers: a registered name must not wait for it.
    let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let instances = Arc::new(Instances::new());
    instances.insert("a", ip("127.0.0.2"));
    let config = Config {
        dns_server: Some(sink.local_addr().unwrap()),
        dns_suffix: Some("vm.test".to_owned()),
        ..Config::default()
    };
    let resolver = Resolver::new(instances, &config).unwrap();
    assert!(resolver.uses_dns());
    assert_eq!(resolver.resolve("a").await, Ok(ip("127.0.0.2")));
}

#[tokio::test]
async fn instance_names_must_be_one_label() {
    let instances = Arc::new(Instances::new());
    instances.insert("a.b", ip("127.0.0.2"));
    let resolver = Resolver::new(instances, &Config::default()).unwrap();
    for bad in ["a.b", "", "-a", "a-", "a_b", "a b", &"x".repeat(64)] {
        let err = resolver.resolve(bad).await.unwrap_err();
        assert!(
            matches!(err, ResolveError::InvalidName { .. }),
            "{bad:?}: {err:?}"
        );
        assert_eq!(err.reason(), "resolve_failed");
    }
}

/// dnsmasq serving the hosts files of a directory for zone `vm.test` only.
struct Dnsmasq {
    child: tokio::process::Child,
    addr: SocketAddr,
    hosts: TempDir,
}

impl Dnsmasq {
    async fn start(local_ttl_secs: u32) -> Option<Dnsmasq> {
        let binary = require_tool("dnsmasq", "resolving instances through a real dns server")?;
        for _attempt in 0..5 {
            let hosts = TempDir::new("dnsmasq");
            std::fs::write(hosts.path().join("instances"), "127.0.0.2 a.vm.test\n").unwrap();
            // A loopback address of its own keeps parallel runs apart.
            let listen = format!("127.0.0.{}", 2 + rand::random::<u8>() % 250);
            let port = free_udp_port(&listen);
            let mut child = tokio::process::Command::new(&binary)
                .arg("--no-daemon")
                .args([
                    "--conf-file=/dev/null",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                ])
                .arg(format!("--listen-address={listen}"))
                .arg(format!("--port={port}"))
                .arg(format!("--hostsdir={}", hosts.path().display()))
                .arg(format!("--local-ttl={local_ttl_secs}"))
                .arg("--local=/vm.test/")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            let addr = SocketAddr::new(ip(&listen), port);
            // dnsmasq serves TCP on the same port: connectable means it is up.
            if wait_for_tcp(addr, Duration::from_secs(10)).await {
                return Some(Dnsmasq { child, addr, hosts });
            }
            let _ = child.kill().await;
        }
        panic!("dnsmasq did not start");
    }

    /// Replaces the served records; dnsmasq re-reads the directory through inotify.
    fn set_hosts(&self, content: &str) {
        let tmp = self.hosts.path().with_extension("tmp");
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, self.hosts.path().join("instances")).unwrap();
    }

    fn resolver(&self, negative_ttl: Duration) -> Resolver {
        dns_resolver(self.addr, "vm.test", Duration::from_secs(2), negative_ttl)
    }

    /// Polls a fresh (uncached) resolver until `instance` resolves to `expected`.
    async fn wait_until_served(&self, instance: &str, expected: Option<IpAddr>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let fresh = self.resolver(Duration::ZERO).resolve(instance).await.ok();
            if fresh == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "dnsmasq still serves {fresh:?} for {instance}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test]
async fn dns_answers_are_cached_for_their_ttl() {
    let Some(mut dns) = Dnsmasq::start(2).await else {
        return;
    };
    let resolver = dns.resolver(Duration::from_secs(1));
    let first = Instant::now();
    assert_eq!(resolver.resolve("a").await.unwrap(), ip("127.0.0.2"));
    assert_eq!(
        resolver.resolve("A").await.unwrap(),
        ip("127.0.0.2"),
        "case-insensitive"
    );

    dns.set_hosts("127.0.0.3 a.vm.test\n");
    dns.wait_until_served("a", Some(ip("127.0.0.3"))).await;
    if first.elapsed() < Duration::from_millis(1500) {
        assert_eq!(
            resolver.resolve("a").await.unwrap(),
            ip("127.0.0.2"),
            "served from the cache"
        );
    }
    // After the 2 s TTL the change is seen.
    let deadline = first + Duration::from_secs(6);
    while resolver.resolve("a").await.unwrap() != ip("127.0.0.3") {
        assert!(
            Instant::now() < deadline,
            "the change was not seen after the ttl"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        first.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        first.elapsed()
    );
    dns.child.kill().await.unwrap();
}

#[tokio::test]
async fn nxdomain_is_refused_and_cached_briefly() {
    let Some(mut dns) = Dnsmasq::start(1).await else {
        return;
    };
    let resolver = dns.resolver(Duration::from_secs(1));
    let first = Instant::now();
    let err = resolver.resolve("nope").await.unwrap_err();
    assert!(
        matches!(
            err,
            ResolveError::DnsNotFound {
                detail: "no such name",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with("instance \"nope\" does not exist (DNS nope.vm.test.: "),
        "{err}"
    );
    assert_eq!(err.reason(), "resolve_failed");
    assert!(
        first.elapsed() < Duration::from_secs(1),
        "an nxdomain is prompt"
    );

    dns.set_hosts("127.0.0.2 a.vm.test\n127.0.0.4 nope.vm.test\n");
    dns.wait_until_served("nope", Some(ip("127.0.0.4"))).await;
    if first.elapsed() < Duration::from_millis(700) {
        assert!(
            resolver.resolve("nope").await.is_err(),
            "the nxdomain is remembered"
        );
    }
    let deadline = first + Duration::from_secs(5);
    while resolver.resolve("nope").await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the negative answer outlived its ttl"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    dns.child.kill().await.unwrap();
}

#[tokio::test]
async fn silent_dns_server_times_out() {
    // A UDP socket nobody reads: queries vanish.
    let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let resolver = dns_resolver(
        sink.local_addr().unwrap(),
        "vm.test",
        Duration::from_millis(300),
        Duration::from_secs(1),
    );
    let started = Instant::now();
    let err = resolver.resolve("a").await.unwrap_err();
    assert_eq!(err.reason(), "resolve_timeout", "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
}
