//! The backend address policy and the static instance registry.

use super::*;
use crate::config::Config;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn cidr(s: &str) -> Cidr {
    s.parse().unwrap()
}

fn policy() -> BackendPolicy {
    let allow = ["127.0.0.0/8", "10.0.0.0/8", "::1/128", "::/0"]
        .iter()
        .map(|s| cidr(s))
        .collect();
    BackendPolicy::new(allow, sa("127.0.0.1:9180"))
}

/// The default `backend_allow`, protecting an API on 127.0.0.1:9180.
fn default_policy() -> BackendPolicy {
    BackendPolicy::new(Config::default().backend_allow, sa("127.0.0.1:9180"))
}

#[test]
fn each_refusal_names_its_cause() {
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
            Err(PolicyError::ApiAddress(sa("127.0.0.1:9180"))),
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
        assert_eq!(p.check(sa(addr)), want, "{addr}");
    }
}

#[test]
fn default_allow_list_admits_loopback_and_private_ranges() {
    let p = default_policy();
    assert_eq!(p.allow_list().len(), 7);
    for ok in [
        "127.0.0.2:443",
        "[::1]:22",
        "10.0.0.5:5432",
        "172.31.255.1:6379",
        "192.168.1.1:80",
        "[fd00::5]:443",
        "100.64.0.1:443",
        "[::ffff:127.0.0.2]:443",
    ] {
        assert_eq!(p.check(sa(ok)), Ok(()), "{ok}");
    }
    for refused in [
        "8.8.8.8:443",
        "172.32.0.1:443",
        "[2001:db8::1]:443",
        "192.0.2.1:443",
    ] {
        let err = p.check(sa(refused)).unwrap_err();
        assert!(matches!(err, PolicyError::NotAllowed(_)), "{refused}");
        assert_eq!(err.reason(), "backend_not_allowed");
    }
}

#[test]
fn link_local_and_metadata_addresses_are_always_refused() {
    // Even an allow-list of everything does not admit them.
    let p = BackendPolicy::new(vec![cidr("0.0.0.0/0"), cidr("::/0")], sa("127.0.0.1:9180"));
    for refused in [
        "169.254.169.254:80",
        "[::ffff:169.254.169.254]:80",
        "[fe80::1]:22",
        "[febf::1]:22",
    ] {
        let err = p.check(sa(refused)).unwrap_err();
        assert!(
            matches!(err, PolicyError::LinkLocal(_)),
            "{refused}: {err:?}"
        );
        assert_eq!(err.reason(), "backend_not_allowed");
        assert_eq!(p.check_ip(sa(refused).ip()), Err(err), "{refused}");
    }
    for refused in [
        "0.0.0.0:443",
        "[::]:443",
        "[::ffff:0.0.0.0]:443",
        "224.0.0.1:443",
        "255.255.255.255:443",
        "[ff02::1]:443",
    ] {
        let err = p.check(sa(refused)).unwrap_err();
        assert!(
            matches!(err, PolicyError::NotUnicast(_)),
            "{refused}: {err:?}"
        );
        assert_eq!(err.reason(), "backend_not_allowed");
    }
    assert_eq!(
        p.check(sa("[fec0::1]:22")),
        Ok(()),
        "fec0::/10 is not link-local"
    );
}

#[test]
fn the_api_address_is_refused() {
    let p = default_policy();
    assert_eq!(
        p.check(sa("127.0.0.1:9180")),
        Err(PolicyError::ApiAddress(sa("127.0.0.1:9180")))
    );
    assert!(matches!(
        p.check(sa("[::ffff:127.0.0.1]:9180")),
        Err(PolicyError::ApiAddress(_))
    ));
    assert_eq!(p.check(sa("127.0.0.1:9181")), Ok(()));
    assert_eq!(
        p.check(sa("127.0.0.2:9180")),
        Ok(()),
        "another address, another socket"
    );
    assert_eq!(
        p.check_ip("127.0.0.1".parse().unwrap()),
        Ok(()),
        "without a port, the API's address is an instance like any other"
    );
}

#[test]
fn the_api_is_refused_even_outside_the_allow_list() {
    let p = BackendPolicy::new(vec![cidr("10.0.0.0/8")], sa("127.0.0.1:9180"));
    assert!(matches!(
        p.check(sa("127.0.0.1:9180")),
        Err(PolicyError::ApiAddress(_))
    ));
}

#[test]
fn a_wildcard_api_covers_every_local_address_on_its_port() {
    for api in ["0.0.0.0:9180", "[::]:9180"] {
        let p = BackendPolicy::new(Config::default().backend_allow, sa(api))
            .with_local_addrs(["10.0.0.1".parse().unwrap()]);
        for refused in [
            "127.0.0.1:9180",
            "127.0.0.9:9180",
            "[::1]:9180",
            "10.0.0.1:9180",
            "[::ffff:10.0.0.1]:9180",
        ] {
            assert!(
                matches!(p.check(sa(refused)), Err(PolicyError::ApiAddress(_))),
                "{api} {refused}"
            );
        }
        assert_eq!(
            p.check(sa("10.0.0.2:9180")),
            Ok(()),
            "an instance on the same port"
        );
        assert_eq!(p.check(sa("127.0.0.1:5432")), Ok(()));
    }
}

#[test]
fn local_addrs_include_loopback() {
    let addrs = local_addrs().unwrap();
    assert!(
        addrs.iter().any(IpAddr::is_loopback),
        "no loopback address in {addrs:?}"
    );
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
