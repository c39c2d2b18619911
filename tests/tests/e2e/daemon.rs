//! The daemon's side of the harness contract: it reports its API address and answers health
//! checks, and comes back with the same data directory after a crash. And what it reports at
//! start-up about the host.
use std::net::{TcpListener, TcpStream};

use ingress_tests::Daemon;
use nix::{
    errno::Errno,
    sys::socket::{setsockopt, sockopt::TcpUlp},
};

#[test]
fn daemon_reports_its_api_address_and_answers_healthz() {
    let mut daemon = Daemon::start().unwrap();
    let api = daemon.api().unwrap();
    api.healthz().unwrap().assert_status(200);
    assert!(
        daemon.log().contains("ingressd api listening on"),
        "{}",
        daemon.log()
    );
    daemon.kill9().unwrap();
    daemon.restart().unwrap();
    daemon.api().unwrap().healthz().unwrap().assert_status(200);
    assert!(daemon.stop().unwrap().success(), "SIGTERM is a clean exit");
}

/// Whether this host offers kernel TLS, asked of the kernel directly: a connected TCP socket
/// accepts the `tls` upper layer protocol (the kernel loads the module on demand where it is
/// one; without CONFIG_TLS the name is unknown).
fn host_offers_ktls() -> bool {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let _server = listener.accept().unwrap();
    let offered = match setsockopt(&client, TcpUlp::default(), &b"tls".to_vec()) {
        Ok(()) => true,
        Err(Errno::ENOENT | Errno::EOPNOTSUPP | Errno::ENOPROTOOPT) => false,
        Err(e) => panic!("setsockopt(TCP_ULP, \"tls\"): {e}"),
    };
    // Once the module is in, the kernel lists it among the available upper layer protocols.
    let listed = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp").unwrap();
    assert_eq!(
        listed.split_whitespace().any(|ulp| ulp == "tls"),
        offered,
        "tcp_available_ulp ({}) disagrees with TCP_ULP",
        listed.trim()
    );
    offered
}

#[test]
fn daemon_reports_whether_the_host_offers_kernel_tls() {
    let offered = host_offers_ktls();
    let daemon = Daemon::start().unwrap();
    let api = daemon.api().unwrap();
    let metrics = api.metrics().unwrap().text;
    let gauge = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ingressd_ktls_available "))
        .unwrap_or_else(|| panic!("no ingressd_ktls_available in\n{metrics}"));
    assert_eq!(gauge.trim(), if offered { "1" } else { "0" });
    let ready = api.readyz().unwrap();
    assert_eq!(
        ready.body["components"]["data_path"]["detail"]["ktls_available"], offered,
        "{}",
        ready.text
    );
    let log = daemon.log();
    assert!(
        log.contains(&format!("ktls_available={offered}")),
        "the start-up log states ktls_available={offered}:\n{log}"
    );
}
