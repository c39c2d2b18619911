//! ALPN per terminate rule with `openssl s_client`: the daemon offers the rule's list in its
//! order, refuses a client whose offer matches none of it (`no_application_protocol`, counted
//! as `tls_handshake_failed`), and negotiates nothing for a rule without a list.

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::Duration,
};

use ingress_tests::{pki::Pki, ports::next_loopback, tools, workdir::WorkDir};
use serde_json::json;

use crate::common::{
    certificate, create_ingress, http_backend, instance, kernel_daemon, refused_count, rule,
    wait_for_count,
};

const INGRESS: &str = "alpn";

/// Runs a handshake offering `alpn` (if any) and closes; returns whether `s_client` succeeded
/// and everything it printed.
fn s_client(
    ingress: SocketAddr,
    sni: &str,
    ca: &std::path::Path,
    alpn: Option<&str>,
) -> (bool, String) {
    let mut cmd = Command::new(tools::find("openssl").unwrap());
    cmd.args(["s_client", "-verify_return_error", "-connect"])
        .arg(ingress.to_string())
        .args(["-servername", sni, "-verify_hostname", sni, "-CAfile"])
        .arg(ca);
    if let Some(alpn) = alpn {
        cmd.args(["-alpn", alpn]);
    }
    // Stdin at end of file: the client closes right after the handshake.
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn terminate_rule_negotiates_alpn_as_configured() {
    let Some(daemon) = kernel_daemon(&[]) else {
        return;
    };
    let api = daemon.api().unwrap();
    let work = WorkDir::new("ingt-alpn-").unwrap();
    let pki = Pki::new().unwrap();
    let ca = pki.write_ca(work.path()).unwrap();
    certificate(&api, &pki, "wildcard", &["*.example.test"]);
    let ip = next_loopback();
    let backend = http_backend(ip, "hello");
    instance(&api, "web", ip);
    let mut web = rule("web.example.test", "web", backend.port(), "terminate");
    web["alpn"] = json!(["h2", "http/1.1"]);
    let plain = rule("plain.example.test", "web", backend.port(), "terminate");
    let ingress = create_ingress(&api, INGRESS, json!([web, plain]), None);
    let addr = ingress.addr();
    let negotiated = |sni: &str, alpn: Option<&str>| {
        let (ok, out) = s_client(addr, sni, &ca, alpn);
        assert!(ok, "s_client -alpn {alpn:?} to {sni} failed:\n{out}");
        out
    };

    let out = negotiated("web.example.test", Some("http/1.1"));
    assert!(out.contains("ALPN protocol: http/1.1"), "{out}");
    // Server preference decides: h2 although the client lists it first anyway, and also
    // when it lists it last.
    let out = negotiated("web.example.test", Some("h2,http/1.1"));
    assert!(out.contains("ALPN protocol: h2"), "{out}");
    let out = negotiated("web.example.test", Some("http/1.1,h2"));
    assert!(out.contains("ALPN protocol: h2"), "{out}");
    // A client that offers no ALPN is served without.
    let out = negotiated("web.example.test", None);
    assert!(out.contains("No ALPN negotiated"), "{out}");
    // A rule without a list negotiates nothing, whatever the client offers.
    let out = negotiated("plain.example.test", Some("h2,http/1.1"));
    assert!(out.contains("No ALPN negotiated"), "{out}");

    let before = refused_count(&api, INGRESS, "tls_handshake_failed");
    let (ok, out) = s_client(addr, "web.example.test", &ca, Some("foo"));
    assert!(!ok, "a handshake offering only foo succeeded:\n{out}");
    assert!(out.contains("no application protocol"), "{out}");
    wait_for_count(
        "refusals for tls_handshake_failed",
        Duration::from_secs(5),
        before + 1,
        || refused_count(&api, INGRESS, "tls_handshake_failed"),
    );
}
