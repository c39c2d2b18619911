//! The backend address policy and the CIDR type.

use std::net::SocketAddr;

use super::*;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn cidr(s: &str) -> Cidr {
    s.parse().unwrap()
}

#[test]
fn cidrs_parse_contain_and_print() {
    let c = cidr("10.1.2.3/8");
    assert_eq!(c.to_string(), "10.0.0.0/8");
    assert!(c.contains("10.255.0.1".parse().unwrap()));
    assert!(!c.contains("11.0.0.1".parse().unwrap()));
    assert!(
        c.contains("::ffff:10.0.0.1".parse().unwrap()),
        "mapped addresses are unwrapped"
    );
    assert_eq!(cidr("::1").to_string(), "::1/128");
    assert_eq!(cidr("192.0.2.7").to_string(), "192.0.2.7/32");
    assert_eq!(cidr("::ffff:10.0.0.0/104").to_string(), "10.0.0.0/8");
    assert!(cidr("0.0.0.0/0").contains("203.0.113.9".parse().unwrap()));
    assert!(!cidr("0.0.0.0/0").contains("2001:db8::1".parse().unwrap()));
    assert!(cidr("::/0").contains("2001:db8::1".parse().unwrap()));
    assert!(cidr("fc00::/7").contains("fd12:3456::1".parse().unwrap()));
    assert!(!cidr("fc00::/7").contains("fe00::1".parse().unwrap()));
    for bad in [
        "10.0.0.0/33",
        "::/129",
        "10.0.0.0/",
        "10.0.0/8",
        "10.0.0.0/+8",
        "x",
        "::ffff:1.2.3.4/95",
    ] {
        assert!(bad.parse::<Cidr>().is_err(), "{bad}");
    }
}

#[test]
fn default_allow_list_admits_loopback_and_private_ranges() {
    let policy = BackendPolicy::default();
    assert_eq!(policy.allow_list().len(), DEFAULT_ALLOW.len());
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
        assert_eq!(policy.check(sa(ok)), Ok(()), "{ok}");
    }
    for refused in [
        "8.8.8.8:443",
        "172.32.0.1:443",
        "[2001:db8::1]:443",
        "192.0.2.1:443",
    ] {
        assert!(
            matches!(
                policy.check(sa(refused)),
                Err(PolicyError::NotAllowed { .. })
            ),
            "{refused}"
        );
    }
}

#[test]
fn link_local_and_metadata_addresses_are_always_refused() {
    // Even an allow-list of everything does not admit them.
    let policy = BackendPolicy::new(vec![cidr("0.0.0.0/0"), cidr("::/0")], None);
    for refused in [
        "169.254.169.254:80",
        "[::ffff:169.254.169.254]:80",
        "[fe80::1]:22",
        "[febf::1]:22",
        "0.0.0.0:443",
        "[::]:443",
        "[::ffff:0.0.0.0]:443",
        "224.0.0.1:443",
        "255.255.255.255:443",
        "[ff02::1]:443",
    ] {
        let err = policy.check(sa(refused)).unwrap_err();
        assert!(
            matches!(err, PolicyError::Forbidden { .. }),
            "{refused}: {err:?}"
        );
        assert_eq!(err.reason(), "backend_not_allowed");
    }
    assert_eq!(
        policy.check(sa("[fec0::1]:22")),
        Ok(()),
        "fec0::/10 is not link-local"
    );
}

#[test]
fn the_api_address_is_refused() {
    let policy = BackendPolicy::default().with_api(sa("127.0.0.1:9180"));
    assert!(matches!(
        policy.check(sa("127.0.0.1:9180")),
        Err(PolicyError::Api { .. })
    ));
    assert!(matches!(
        policy.check(sa("[::ffff:127.0.0.1]:9180")),
        Err(PolicyError::Api { .. })
    ));
    assert_eq!(policy.check(sa("127.0.0.1:9181")), Ok(()));
    assert_eq!(
        policy.check(sa("127.0.0.2:9180")),
        Ok(()),
        "another address, another socket"
    );
}

#[test]
fn a_wildcard_api_covers_every_local_address_on_its_port() {
    for api in ["0.0.0.0:9180", "[::]:9180"] {
        let policy = BackendPolicy::default()
            .with_api(sa(api))
            .with_local_addrs(["10.0.0.1".parse().unwrap()]);
        for refused in [
            "127.0.0.1:9180",
            "127.0.0.9:9180",
            "[::1]:9180",
            "10.0.0.1:9180",
            "[::ffff:10.0.0.1]:9180",
        ] {
            assert!(
                matches!(policy.check(sa(refused)), Err(PolicyError::Api { .. })),
                "{api} {refused}"
            );
        }
        assert_eq!(
            policy.check(sa("10.0.0.2:9180")),
            Ok(()),
            "an instance on the same port"
        );
        assert_eq!(policy.check(sa("127.0.0.1:5432")), Ok(()));
    }
}
