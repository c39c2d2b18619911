//! Bad input, each refused promptly and without a byte of answer, while the daemon keeps
//! serving; and hellos that are unusual but valid (one byte per segment, split across
//! records) still routed.

use std::{
    io::Write as _,
    net::{SocketAddr, TcpStream},
    sync::Arc,
    time::Duration,
};

use ingress_tests::{
    Daemon,
    pki::{Pki, provider},
    ports::next_loopback,
    tls::{RustlsServer, client_hello},
};
use rustls::{ClientConfig, ClientConnection, pki_types::ServerName};
use serde_json::json;

use crate::common::{Closed, Ingress, create_ingress, instance, kernel_daemon, rule, wait_closed};

/// A daemon with a short handshake timeout, one passthrough rule to a rustls server, and the
/// client configuration that trusts it.
struct Setup {
    _daemon: Daemon,
    server: RustlsServer,
    ingress: Ingress,
    client: Arc<ClientConfig>,
    pki: Pki,
    down: Ingress,
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
        "strict",
        json!([rule(
            "ok.example.test",
            "ok",
            server.addr().port(),
            "passthrough"
        )]),
        None,
    );
    // An instance whose port nobody listens on: the backend is down.
    let dead_port = ingress_tests::ports::PortLease::new().unwrap();
    let down = create_ingress(
        &api,
        "down",
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
        server,
        ingress,
        client: pki.client_config(&[]).unwrap(),
        pki,
        down,
    })
}

/// Sends `bytes` and expects the daemon to close without answering, within `limit`.
fn refused(addr: SocketAddr, bytes: &[u8], limit: Duration) -> (Closed, Duration) {
    let mut stream = TcpStream::connect(addr).unwrap();
    if !bytes.is_empty() {
        stream.write_all(bytes).unwrap();
    }
    let (how, took, got) = wait_closed(stream, limit);
    assert!(got.is_empty(), "a refused client got {} bytes", got.len());
    (how, took)
}

/// Completes a TLS handshake whose first flight is re-shaped by `reshape` (a list of TCP
/// segments); returns the established stream.
fn handshake_with_first_flight(
    addr: SocketAddr,
    sni: &str,
    config: Arc<ClientConfig>,
    reshape: impl Fn(Vec<u8>) -> Vec<Vec<u8>>,
) -> rustls::StreamOwned<ClientConnection, TcpStream> {
    let mut conn =
        ClientConnection::new(config, ServerName::try_from(sni.to_owned()).unwrap()).unwrap();
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).unwrap();
    }
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    for segment in reshape(hello) {
        tcp.write_all(&segment).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).unwrap();
    }
    rustls::StreamOwned::new(conn, tcp)
}

fn echo_round_trip(stream: &mut rustls::StreamOwned<ClientConnection, TcpStream>) {
    use std::io::Read as _;
    stream.write_all(b"ping through the ingress").unwrap();
    let mut got = [0u8; 24];
    stream.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping through the ingress");
}

/// Re-frames a single-record hello as two records split in the middle of the handshake message.
fn split_into_two_records(hello: Vec<u8>) -> Vec<Vec<u8>> {
    assert_eq!(hello[0], 0x16);
    let body = &hello[5..];
    let (first, second) = body.split_at(body.len() / 2);
    let record = |part: &[u8]| {
        let mut r = vec![0x16, hello[1], hello[2]];
        r.extend_from_slice(&u16::try_from(part.len()).unwrap().to_be_bytes());
        r.extend_from_slice(part);
        r
    };
    vec![[record(first), record(second)].concat()]
}

#[test]
fn bad_input_is_refused_promptly_and_good_clients_still_get_through() {
    let Some(s) = setup("1000") else { return };
    let quick = Duration::from_secs(3);
    let addr = s.ingress.addr();

    // A ClientHello for an IP address carries no SNI; there is no default target.
    let no_sni = client_hello("127.0.0.1", &[]).unwrap();
    refused(addr, &no_sni, quick);
    let unknown = client_hello("other.example.test", &[]).unwrap();
    refused(addr, &unknown, quick);
    refused(
        addr,
        b"GET / HTTP/1.1\r\nHost: ok.example.test\r\n\r\n",
        quick,
    );
    // A record header announcing 64 KiB of garbage.
    let mut garbage = vec![0x16, 0x03, 0x01, 0xff, 0xff];
    garbage.extend((0..65_535u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    refused(addr, &garbage, quick);
    // A client that says nothing is cut at the handshake timeout (1 s here).
    let (_, took) = refused(addr, b"", Duration::from_secs(10));
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // A backend that is down: the client is closed promptly, not left hanging.
    let down_hello = client_hello("down.example.test", &[]).unwrap();
    let (_, took) = refused(s.down.addr(), &down_hello, Duration::from_secs(10));
    assert!(took < Duration::from_secs(4), "{took:?}");

    // Through all of that the daemon kept serving.
    let mut ok =
        handshake_with_first_flight(addr, "ok.example.test", s.client.clone(), |h| vec![h]);
    echo_round_trip(&mut ok);
    assert_eq!(
        s.server
            .next_session(Duration::from_secs(5))
            .unwrap()
            .sni
            .as_deref(),
        Some("ok.example.test")
    );
}

#[test]
fn a_hello_one_byte_per_segment_is_still_routed() {
    let Some(s) = setup("10000") else { return };
    let mut stream =
        handshake_with_first_flight(s.ingress.addr(), "ok.example.test", s.client.clone(), |h| {
            h.into_iter().map(|b| vec![b]).collect()
        });
    echo_round_trip(&mut stream);
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
    let config = Arc::new(config);
    let mut stream =
        handshake_with_first_flight(s.ingress.addr(), "ok.example.test", config, |hello| {
            assert!(hello.len() > 1900, "hello is {} bytes", hello.len());
            split_into_two_records(hello)
        });
    echo_round_trip(&mut stream);
}
