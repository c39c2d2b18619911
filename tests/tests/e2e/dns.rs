//! The `dns` instance resolver against a real DNS server (dnsmasq), and the backend policy
//! applied to what it returns.

use std::{net::SocketAddr, time::Duration};

use ingress_tests::{
    pki::Pki,
    ports::{PortLease, next_loopback},
    process::wait_until,
    require_ok,
    servers::dnsmasq::Dnsmasq,
    tls::{RustlsServer, client_hello, tls_connect},
};
use serde_json::json;

use crate::common::{
    create_ingress, kernel_daemon, refused_count, rule, wait_closed, wait_for_count,
};

/// Completes a TLS handshake through `ingress` for `sni`; returns which of `servers` (all
/// with a certificate for `sni`) the daemon routed it to, or `None` when it was refused.
fn route_once(
    ingress: SocketAddr,
    sni: &str,
    pki: &Pki,
    servers: &[&RustlsServer],
) -> Option<usize> {
    let config = pki.client_config(&[]).unwrap();
    tls_connect(ingress, sni, config).ok()?;
    servers.iter().position(|s| {
        s.next_session(Duration::from_millis(2000))
            .is_ok_and(|t| t.error.is_none())
    })
}

#[test]
fn dns_instances_follow_record_changes_and_nxdomain_closes_promptly() {
    let (ip_a, ip_b) = (next_loopback(), next_loopback());
    let dns = require_ok!(Dnsmasq::start_with_ttl(
        next_loopback(),
        &[("db.vm.test", ip_a)],
        1
    ));
    let server_addr = dns.addr().to_string();
    let Some(daemon) = kernel_daemon(&[
        ("INGRESSD_DNS_SERVER", server_addr.as_str()),
        ("INGRESSD_DNS_SUFFIX", "vm.test"),
    ]) else {
        return;
    };
    let api = daemon.api().unwrap();
    let pki = Pki::new().unwrap();
    let config = pki
        .issue(&["db.example.test", "a.b.example.test"])
        .unwrap()
        .server_config(&[])
        .unwrap();
    // Both candidates listen on one port, so only the DNS answer decides.
    let port = PortLease::new().unwrap();
    let bind =
        |ip| RustlsServer::start_at(SocketAddr::from((ip, port.port())), config.clone()).unwrap();
    let (a, b) = (bind(ip_a), bind(ip_b));
    let ingress = create_ingress(
        &api,
        "dns",
        json!([rule(
            "{vm}.example.test",
            "{vm}",
            port.port(),
            "passthrough"
        )]),
        None,
    );
    assert_eq!(
        route_once(ingress.addr(), "db.example.test", &pki, &[&a, &b]),
        Some(0)
    );
    dns.set_records(&[("db.vm.test", ip_b)]).unwrap();
    // Once the 1 s TTL has run out the daemon follows the new record.
    wait_until(
        "routing to follow the new DNS record",
        Duration::from_secs(20),
        || {
            Ok(
                (route_once(ingress.addr(), "db.example.test", &pki, &[&a, &b]) == Some(1))
                    .then_some(()),
            )
        },
    )
    .unwrap();
    // NXDOMAIN: closed promptly, nothing answered.
    let mut stream = std::net::TcpStream::connect(ingress.addr()).unwrap();
    std::io::Write::write_all(
        &mut stream,
        &client_hello("ghost.example.test", &[]).unwrap(),
    )
    .unwrap();
    let (_, took, got) = wait_closed(stream, Duration::from_secs(10));
    assert!(got.is_empty() && took < Duration::from_secs(3), "{took:?}");
}

#[test]
fn captures_take_one_label_and_metadata_or_api_addresses_are_refused() {
    let metadata = "169.254.169.254".parse().unwrap();
    let dns = require_ok!(Dnsmasq::start_with_ttl(
        next_loopback(),
        &[("meta.vm.test", metadata)],
        1
    ));
    let server_addr = dns.addr().to_string();
    let Some(daemon) = kernel_daemon(&[
        ("INGRESSD_DNS_SERVER", server_addr.as_str()),
        ("INGRESSD_DNS_SUFFIX", "vm.test"),
    ]) else {
        return;
    };
    let api = daemon.api().unwrap();
    let api_addr = daemon.api_addr().unwrap();
    let pki = Pki::new().unwrap();
    let ip = next_loopback();
    let server = RustlsServer::start(
        ip,
        pki.issue(&["a.example.test", "a.b.example.test"])
            .unwrap()
            .server_config(&[])
            .unwrap(),
    )
    .unwrap();
    crate::common::instance(&api, "a", ip);
    // The API's own address as an instance: allowed as an address, refused at its port.
    crate::common::instance(&api, "api", api_addr.ip());
    let ingress = create_ingress(
        &api,
        "policy",
        json!([rule(
            "{vm}.example.test",
            "{vm}",
            server.addr().port(),
            "passthrough"
        )]),
        None,
    );
    let api_ingress = create_ingress(
        &api,
        "to-api",
        json!([rule(
            "{vm}.api.test",
            "{vm}",
            api_addr.port(),
            "passthrough"
        )]),
        None,
    );
    // `a.b.example.test` has one label too many for `{vm}.example.test`: never instance `a`.
    assert_eq!(
        route_once(ingress.addr(), "a.b.example.test", &pki, &[&server]),
        None
    );
    assert_eq!(
        route_once(ingress.addr(), "a.example.test", &pki, &[&server]),
        Some(0)
    );
    // The metadata address (link-local) and the API's own address: refused by the backend
    // policy, and counted as such.
    for (name, addr, sni) in [
        ("policy", ingress.addr(), "meta.example.test"),
        ("to-api", api_ingress.addr(), "api.api.test"),
    ] {
        let before = refused_count(&api, name, "backend_not_allowed");
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        std::io::Write::write_all(&mut stream, &client_hello(sni, &[]).unwrap()).unwrap();
        let (_, took, got) = wait_closed(stream, Duration::from_secs(10));
        assert!(
            got.is_empty() && took < Duration::from_secs(3),
            "{sni}: {took:?}, {} bytes",
            got.len()
        );
        wait_for_count(
            &format!("{sni}: refusals for backend_not_allowed"),
            Duration::from_secs(5),
            before + 1,
            || refused_count(&api, name, "backend_not_allowed"),
        );
    }
}
