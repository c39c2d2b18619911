//! Bad input, each refused promptly, without a byte of answer and counted under its reason,
//! while the daemon keeps serving; and hellos that are unusual but valid (one byte per segment,
//! split across records) still routed, also while hostile clients hold connections open.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{Arc, mpsc},
    time::Duration,
};

use ingress_tests::{
    ApiClient, Daemon,
    pki::{Pki, provider},
    ports::{PortLease, next_loopback},
    tls::{RustlsServer, client_hello},
};
use rustls::{ClientConfig, ClientConnection, pki_types::ServerName};
use serde_json::json;

use crate::common::{
    Ingress, accepted_count, create_ingress, instance, kernel_daemon, metric, refused_count,
    refused_total, routed_count, rule, wait_closed, wait_for_count,
};

/// The ingress with one passthrough rule to a rustls echo server.
const STRICT: &str = "strict";
/// The ingress whose only rule names a port nobody listens on.
const DOWN: &str = "down";
/// How long a refusal may take.
const QUICK: Duration = Duration::from_secs(3);

/// A daemon with the given handshake timeout, the `strict` and `down` ingresses, and the
/// client configuration that trusts the echo server.
struct Setup {
    _daemon: Daemon,
    api: ApiClient,
    server: RustlsServer,
    ingress: Ingress,
    client: Arc<ClientConfig>,
    pki: Pki,
    down: Ingress,
    _dead_port: PortLease,
}

fn setup(handshake_timeout_ms: &str) -> Option<Setup> {
    let daemon = kernel_daemon(&[("INGRESSD_HANDSHAKE_TIMEOUT_MS", handshake_timeout_ms)])?;
    let api = daemon.api().unwrap();
    let pki = Pki::new().unwrap();
    let leaf = pki.issue(&["ok.example.test"]).unwrap();
    let ip = next_loopback();
    let server = RustlsServer::start(ip, leaf.server_config(&[]).unwrap()).unwrap();
    instance(&api, "ok", ip);
    let ingress = create_ingress(
        &api,
        STRICT,
        json!([rule(
            "ok.example.test",
            "ok",
            server.addr().port(),
            "passthrough"
        )]),
        None,
    );
    // A port leased and never bound: the backend is down.
    let dead_port = PortLease::new().unwrap();
    let down = create_ingress(
        &api,
        DOWN,
        json!([rule(
            "down.example.test",
            "ok",
            dead_port.port(),
            "passthrough"
        )]),
        None,
    );
    Some(Setup {
        _daemon: daemon,
        api,
        server,
        ingress,
        client: pki.client_config(&[]).unwrap(),
        pki,
        down,
        _dead_port: dead_port,
    })
}

impl Setup {
    /// A well-behaved client completes its handshake and an echo round trip through `strict`.
    fn serve_good_client(&self) {
        let mut ok = handshake(self.ingress.addr(), self.client.clone(), |tcp, hello| {
            tcp.write_all(&hello).unwrap();
        });
        echo_round_trip(&mut ok);
        let session = self.server.next_session(Duration::from_secs(5)).unwrap();
        assert_eq!(session.sni.as_deref(), Some("ok.example.test"));
    }

    /// Sends `bytes` to `ingress` (at `addr`) and expects the daemon to close within `limit`
    /// without answering, the refusal counted under `reason` and no other, and a good client
    /// served afterwards. Returns how long the close took after the bytes were sent.
    fn refuses(
        &self,
        ingress: &str,
        addr: SocketAddr,
        bytes: &[u8],
        reason: &str,
        limit: Duration,
    ) -> Duration {
        let before = refused_count(&self.api, ingress, reason);
        let before_total = refused_total(&self.api, ingress);
        let mut stream = TcpStream::connect(addr).unwrap();
        match stream.write_all(bytes) {
            Ok(()) => {}
            // The daemon may refuse, and reset, before the last byte is written.
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {}
            Err(e) => panic!("writing {} bytes: {e}", bytes.len()),
        }
        let (_, took, got) = wait_closed(stream, limit);
        assert!(got.is_empty(), "a refused client got {} bytes", got.len());
        wait_for_count(
            &format!("{ingress}: refusals for {reason}"),
            Duration::from_secs(5),
            before + 1,
            || refused_count(&self.api, ingress, reason),
        );
        assert_eq!(
            refused_total(&self.api, ingress),
            before_total + 1,
            "{ingress}: the refusal was counted once, under {reason} only"
        );
        self.serve_good_client();
        took
    }
}

/// Completes a TLS handshake for `ok.example.test` whose first flight `send_hello` writes (in
/// whatever segments it likes); returns the established stream.
fn handshake(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    send_hello: impl FnOnce(&mut TcpStream, Vec<u8>),
) -> rustls::StreamOwned<ClientConnection, TcpStream> {
    let sni = ServerName::try_from("ok.example.test").unwrap();
    let mut conn = ClientConnection::new(config, sni).unwrap();
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).unwrap();
    }
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    send_hello(&mut tcp, hello);
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).unwrap();
    }
    rustls::StreamOwned::new(conn, tcp)
}

/// Writes `bytes` one per TCP segment (`TCP_NODELAY`, a short pause between writes).
fn one_byte_per_segment(tcp: &mut TcpStream, bytes: &[u8]) {
    for byte in bytes {
        tcp.write_all(std::slice::from_ref(byte)).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn echo_round_trip(stream: &mut rustls::StreamOwned<ClientConnection, TcpStream>) {
    stream.write_all(b"ping through the ingress").unwrap();
    let mut got = [0u8; 24];
    stream.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping through the ingress");
}

/// Re-frames a single-record hello as two records split in the middle of the handshake message.
fn split_into_two_records(hello: &[u8]) -> Vec<u8> {
    assert_eq!(hello[0], 0x16);
    let body = &hello[5..];
    let (first, second) = body.split_at(body.len() / 2);
    let record = |part: &[u8]| {
        let mut r = vec![0x16, hello[1], hello[2]];
        r.extend_from_slice(&u16::try_from(part.len()).unwrap().to_be_bytes());
        r.extend_from_slice(part);
        r
    };
    [record(first), record(second)].concat()
}

#[test]
fn a_hello_without_sni_is_refused_as_no_sni() {
    let Some(s) = setup("5000") else { return };
    // A ClientHello for an IP address carries no SNI; there is no default target.
    let hello = client_hello("127.0.0.1", &[]).unwrap();
    s.refuses(STRICT, s.ingress.addr(), &hello, "no_sni", QUICK);
}

#[test]
fn an_unknown_sni_is_refused_as_unknown_sni() {
    let Some(s) = setup("5000") else { return };
    let hello = client_hello("other.example.test", &[]).unwrap();
    s.refuses(STRICT, s.ingress.addr(), &hello, "unknown_sni", QUICK);
}

#[test]
fn plain_http_is_refused_as_not_tls() {
    let Some(s) = setup("5000") else { return };
    let request = b"GET / HTTP/1.1\r\nHost: ok.example.test\r\n\r\n";
    s.refuses(STRICT, s.ingress.addr(), request, "not_tls", QUICK);
}

#[test]
fn a_64_kib_garbage_record_is_refused_as_bad_hello() {
    let Some(s) = setup("5000") else { return };
    // A handshake record header announcing 65535 bytes (above the 2^14 limit), and the garbage.
    let mut garbage = vec![0x16, 0x03, 0x01, 0xff, 0xff];
    garbage.extend((0..65_535u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    s.refuses(STRICT, s.ingress.addr(), &garbage, "bad_hello", QUICK);
}

#[test]
fn a_silent_client_is_closed_at_the_handshake_timeout() {
    let Some(s) = setup("1500") else { return };
    let took = s.refuses(
        STRICT,
        s.ingress.addr(),
        b"",
        "hello_timeout",
        Duration::from_secs(10),
    );
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(5),
        "closed after {took:?} with a 1.5 s handshake timeout"
    );
}

#[test]
fn a_backend_that_is_down_closes_the_client_promptly() {
    let Some(s) = setup("5000") else { return };
    let hello = client_hello("down.example.test", &[]).unwrap();
    s.refuses(DOWN, s.down.addr(), &hello, "backend_unreachable", QUICK);
}

#[test]
fn a_hello_one_byte_per_segment_is_still_routed() {
    let Some(s) = setup("10000") else { return };
    let routed = routed_count(&s.api, STRICT);
    let mut stream = handshake(s.ingress.addr(), s.client.clone(), |tcp, hello| {
        one_byte_per_segment(tcp, &hello);
    });
    echo_round_trip(&mut stream);
    assert_eq!(routed_count(&s.api, STRICT), routed + 1);
}

#[test]
fn a_two_kilobyte_hello_split_across_two_records_is_routed() {
    let Some(s) = setup("5000") else { return };
    // Enough ALPN names to make the hello post-quantum sized (~2 KB).
    let names: Vec<Vec<u8>> = (0..120)
        .map(|i| format!("proto-{i:08}").into_bytes())
        .collect();
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(s.pki.roots().unwrap())
        .with_no_client_auth();
    config.alpn_protocols = names;
    let routed = routed_count(&s.api, STRICT);
    let mut stream = handshake(s.ingress.addr(), Arc::new(config), |tcp, hello| {
        assert!(hello.len() > 1900, "hello is {} bytes", hello.len());
        tcp.write_all(&split_into_two_records(&hello)).unwrap();
    });
    echo_round_trip(&mut stream);
    assert_eq!(routed_count(&s.api, STRICT), routed + 1);
}

/// Whether the daemon still holds `stream` open: nothing to read, no FIN, no reset.
fn still_open(stream: &TcpStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let open = matches!(stream.peek(&mut byte), Err(e) if e.kind() == ErrorKind::WouldBlock);
    stream.set_nonblocking(false).unwrap();
    open
}

#[test]
fn good_clients_are_served_while_a_silent_and_a_slow_client_are_connected() {
    let Some(s) = setup("10000") else { return };
    let addr = s.ingress.addr();
    let accepted = accepted_count(&s.api, STRICT);
    let timeouts = refused_count(&s.api, STRICT, "hello_timeout");
    let silent = TcpStream::connect(addr).unwrap();
    // The slow client sends half its hello one byte per segment, then waits for the good
    // client to be done before it sends the rest.
    let (halfway_tx, halfway) = mpsc::channel();
    let (resume, resume_rx) = mpsc::channel::<()>();
    let client = s.client.clone();
    let slow = std::thread::spawn(move || {
        let mut stream = handshake(addr, client, |tcp, hello| {
            let (first, rest) = hello.split_at(hello.len() / 2);
            one_byte_per_segment(tcp, first);
            halfway_tx.send(()).unwrap();
            resume_rx.recv().unwrap();
            one_byte_per_segment(tcp, rest);
        });
        echo_round_trip(&mut stream);
    });
    halfway.recv_timeout(Duration::from_secs(20)).unwrap();
    // Both are accepted and in the daemon's hands, neither routed nor refused.
    let pending = || {
        metric(
            &s.api,
            "ingressd_connections_pending",
            &[&format!("ingress=\"{STRICT}\"")],
        ) as u64
    };
    wait_for_count(
        "connections accepted",
        Duration::from_secs(5),
        accepted + 2,
        || accepted_count(&s.api, STRICT),
    );
    assert_eq!(pending(), 2, "the silent and the slow client are pending");

    s.serve_good_client();

    assert!(still_open(&silent), "the silent client is still connected");
    // The good client's flow is counted as routed just after its bytes start to flow.
    ingress_tests::process::wait_until("two pending connections", QUICK, || {
        Ok((pending() == 2).then_some(()))
    })
    .expect("both hostile clients are still pending");
    assert!(!slow.is_finished(), "the slow client is still mid-hello");
    resume.send(()).unwrap();
    slow.join()
        .expect("the slow client is routed once its hello is whole");
    assert_eq!(
        s.server
            .next_session(Duration::from_secs(5))
            .unwrap()
            .sni
            .as_deref(),
        Some("ok.example.test")
    );
    // The silent client meets its handshake timeout.
    let (_, _, got) = wait_closed(silent, Duration::from_secs(15));
    assert!(got.is_empty());
    wait_for_count(
        "refusals for hello_timeout",
        Duration::from_secs(5),
        timeouts + 1,
        || refused_count(&s.api, STRICT, "hello_timeout"),
    );
}
