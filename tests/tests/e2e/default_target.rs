//! The ingress's default target: a TLS client without SNI, or with an SNI no rule matches,
//! reaches it (always passthrough); a named SNI still goes to its rule. Without a default
//! target both are refused (see `refusals`).

use std::{io::Read as _, io::Write as _, sync::Arc, time::Duration};

use ingress_tests::{
    pki::Pki,
    ports::next_loopback,
    tls::{RustlsServer, TlsStream, tls_connect},
};
use serde_json::json;

use crate::common::{
    create_ingress, instance, kernel_daemon, refused_count, routed_count, rule, wait_for_count,
};

const INGRESS: &str = "with-default";

fn echo(tls: &mut TlsStream) {
    tls.write_all(b"which backend?").unwrap();
    let mut back = [0u8; 14];
    tls.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"which backend?");
}

#[test]
fn no_sni_and_unknown_sni_reach_the_default_target() {
    let Some(daemon) = kernel_daemon(&[]) else {
        return;
    };
    let api = daemon.api().unwrap();
    let pki = Pki::new().unwrap();
    let server = |names: &[&str]| {
        let config = pki.issue(names).unwrap().server_config(&[]).unwrap();
        RustlsServer::start(next_loopback(), config).unwrap()
    };
    let ruled = server(&["ok.example.test"]);
    let fallback = server(&["default.example.test", "other.example.test"]);
    let std::net::IpAddr::V4(ruled_ip) = ruled.addr().ip() else {
        panic!("IPv4")
    };
    let std::net::IpAddr::V4(fallback_ip) = fallback.addr().ip() else {
        panic!("IPv4")
    };
    instance(&api, "ok", ruled_ip);
    instance(&api, "fallback", fallback_ip);
    let ingress = create_ingress(
        &api,
        INGRESS,
        json!([rule(
            "ok.example.test",
            "ok",
            ruled.addr().port(),
            "passthrough"
        )]),
        Some(json!({ "instance": "fallback", "port": fallback.addr().port() })),
    );
    let config = pki.client_config(&[]).unwrap();
    let wait = Duration::from_secs(5);

    // An SNI no rule matches.
    let mut tls = tls_connect(ingress.addr(), "other.example.test", config.clone()).unwrap();
    echo(&mut tls);
    let session = fallback.next_session(wait).unwrap();
    assert_eq!(session.sni.as_deref(), Some("other.example.test"));

    // No SNI at all (the certificate is still verified for the name).
    let mut no_sni = (*config).clone();
    no_sni.enable_sni = false;
    let mut tls = tls_connect(ingress.addr(), "default.example.test", Arc::new(no_sni)).unwrap();
    echo(&mut tls);
    let session = fallback.next_session(wait).unwrap();
    assert_eq!(session.sni, None, "the client sent no server name");

    // A name a rule matches still goes to that rule's instance.
    let mut tls = tls_connect(ingress.addr(), "ok.example.test", config).unwrap();
    echo(&mut tls);
    assert_eq!(
        ruled.next_session(wait).unwrap().sni.as_deref(),
        Some("ok.example.test")
    );
    assert!(
        fallback.next_session(Duration::from_millis(200)).is_err(),
        "the default target got a third connection"
    );

    wait_for_count("routed connections", wait, 3, || {
        routed_count(&api, INGRESS)
    });
    for reason in ["no_sni", "unknown_sni"] {
        assert_eq!(refused_count(&api, INGRESS, reason), 0, "{reason}");
    }
}
