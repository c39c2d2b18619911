//! The handshake cap (`max_handshakes`): at most that many connections between accept and
//! hand-off. The accept loop takes a permit before it accepts, so a client beyond the cap is
//! neither accepted nor refused: its connection waits, hello and all, in the kernel's backlog
//! until a handshake ends (routed, refused, timed out or closed by its client) and gives its
//! permit back. A flow past its handshake holds no permit and is not slowed.

use std::{
    net::TcpStream,
    sync::Arc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use ingress_tests::{
    pki::Pki,
    ports::next_loopback,
    tls::{RustlsServer, tls_connect},
};
use rustls::ClientConfig;
use serde_json::json;

use crate::common::{
    accepted_count, create_ingress, instance, kernel_daemon, refused_count, refused_total, rule,
    wait_closed, wait_for_count,
};

const INGRESS: &str = "capped";
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(4);

fn round_trip(stream: &mut (impl std::io::Read + std::io::Write), what: &[u8]) {
    stream.write_all(what).unwrap();
    stream.flush().unwrap();
    let mut back = vec![0u8; what.len()];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(back, what);
}

/// A client that connects now and completes a handshake and a round trip whenever the daemon
/// gets to it; its thread returns when that was.
fn waiting_client(addr: std::net::SocketAddr, config: Arc<ClientConfig>) -> JoinHandle<Instant> {
    std::thread::spawn(move || {
        let mut tls = tls_connect(addr, "ok.example.test", config).unwrap();
        let served = Instant::now();
        round_trip(&mut tls, b"served at last");
        served
    })
}

#[test]
fn clients_beyond_max_handshakes_wait_until_a_handshake_ends() {
    let timeout_ms = HANDSHAKE_TIMEOUT.as_millis().to_string();
    let Some(daemon) = kernel_daemon(&[
        ("INGRESSD_MAX_HANDSHAKES", "2"),
        ("INGRESSD_HANDSHAKE_TIMEOUT_MS", &timeout_ms),
    ]) else {
        return;
    };
    let api = daemon.api().unwrap();
    let pki = Pki::new().unwrap();
    let ip = next_loopback();
    let server = RustlsServer::start(
        ip,
        pki.issue(&["ok.example.test"])
            .unwrap()
            .server_config(&[])
            .unwrap(),
    )
    .unwrap();
    instance(&api, "ok", ip);
    let ingress = create_ingress(
        &api,
        INGRESS,
        json!([rule(
            "ok.example.test",
            "ok",
            server.addr().port(),
            "passthrough"
        )]),
        None,
    );
    let addr = ingress.addr();
    let config = pki.client_config(&[]).unwrap();
    let accepted = |n| {
        wait_for_count("connections accepted", Duration::from_secs(5), n, || {
            accepted_count(&api, INGRESS)
        });
    };

    // A flow past its handshake, then two silent clients holding both permits.
    let mut flow = tls_connect(addr, "ok.example.test", config.clone()).unwrap();
    round_trip(&mut flow, b"established");
    let first_silent = TcpStream::connect(addr).unwrap();
    let second_silent = TcpStream::connect(addr).unwrap();
    let second_connected = Instant::now();
    accepted(3);
    let refused_before = refused_total(&api, INGRESS);

    // A client beyond the cap: not accepted, not refused, not served; the flow is unaffected.
    let waiting = waiting_client(addr, config.clone());
    let watch_until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < watch_until {
        round_trip(&mut flow, b"the established flow still echoes");
        assert!(!waiting.is_finished(), "served beyond max_handshakes");
        assert_eq!(accepted_count(&api, INGRESS), 3, "accepted beyond the cap");
    }
    assert_eq!(
        refused_total(&api, INGRESS),
        refused_before,
        "a waiting client is not refused"
    );

    // The first silent client leaves: its permit goes to the waiting client.
    let closed_at = Instant::now();
    drop(first_silent);
    let served = waiting.join().expect("the waiting client is served");
    assert!(served > closed_at);
    assert!(
        served.duration_since(closed_at) < Duration::from_secs(2),
        "served {:?} after a permit was freed",
        served.duration_since(closed_at)
    );
    wait_for_count(
        "refusals for client_closed",
        Duration::from_secs(5),
        1,
        || refused_count(&api, INGRESS, "client_closed"),
    );
    accepted(4);

    // A third silent client takes the permit the served client gave back; the next client
    // waits until the second silent one meets its handshake timeout.
    let third_silent = TcpStream::connect(addr).unwrap();
    accepted(5);
    let waiting = waiting_client(addr, config.clone());
    round_trip(&mut flow, b"still echoing");
    let (_, _, got) = wait_closed(second_silent, HANDSHAKE_TIMEOUT * 3);
    assert!(got.is_empty());
    let served = waiting.join().expect("the waiting client is served");
    let after = served.duration_since(second_connected);
    assert!(
        after >= HANDSHAKE_TIMEOUT - Duration::from_millis(100),
        "served {after:?} after the second silent client connected, before its handshake \
         timeout freed a permit"
    );
    wait_for_count(
        "refusals for hello_timeout",
        Duration::from_secs(5),
        1,
        || refused_count(&api, INGRESS, "hello_timeout"),
    );
    round_trip(&mut flow, b"and after");
    drop(third_silent);
}
