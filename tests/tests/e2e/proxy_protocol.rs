//! PROXY protocol headers through the daemon: a backend that parses the header sees the real
//! client address and port and the address the client connected to, before any other byte —
//! before the plaintext (terminate), the ClientHello (passthrough), or the SSLRequest the
//! daemon replays to a Postgres backend.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    panic::AssertUnwindSafe,
    sync::{Arc, mpsc},
    time::Duration,
};

use ingress_tests::{pki::Pki, ports::next_loopback, tls::client_hello};
use rustls::{ClientConnection, StreamOwned, pki_types::ServerName};
use serde_json::{Value, json};
use socket2::{Domain, Socket, Type};

use crate::common::{certificate, create_ingress, instance, kernel_daemon, postgres_rule, rule};

/// The 12 bytes that start a v2 header.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A Postgres SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// What the backend saw on one connection.
#[derive(Debug)]
struct Seen {
    /// 1 or 2.
    version: u8,
    source: SocketAddr,
    destination: SocketAddr,
    /// Whether an SSLRequest followed the header (answered `S`).
    ssl_request: bool,
    /// The first five bytes after the header (and SSLRequest).
    next: [u8; 5],
}

/// A backend that reads a PROXY header (either version) on every connection, then, if
/// `postgres`, an SSLRequest it answers with `S`; then reports the next five bytes and echoes
/// everything from them on.
/// A failed check on the backend's side reaches the test as an `Err` with its message.
fn header_backend(ip: Ipv4Addr, postgres: bool) -> (SocketAddr, Backend) {
    let listener = TcpListener::bind((ip, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let served = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    serve(stream, postgres, &tx);
                }));
                if let Err(panic) = served {
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                        .unwrap_or_default();
                    let _ = tx.send(Err(message));
                }
            });
        }
    });
    (addr, Backend(rx))
}

/// What the header backend reports, connection by connection.
struct Backend(mpsc::Receiver<Result<Seen, String>>);

impl Backend {
    /// The next connection's report; fails the test if the backend's checks failed.
    fn next(&self) -> Seen {
        self.0
            .recv_timeout(Duration::from_secs(10))
            .expect("the backend saw a connection")
            .unwrap_or_else(|e| panic!("the backend: {e}"))
    }
}

fn serve(mut stream: TcpStream, postgres: bool, tx: &mpsc::Sender<Result<Seen, String>>) {
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let (version, source, destination) = read_header(&mut stream);
    let mut ssl_request = false;
    if postgres {
        let mut request = [0u8; 8];
        stream.read_exact(&mut request).unwrap();
        assert_eq!(request, SSL_REQUEST, "an SSLRequest follows the header");
        stream.write_all(b"S").unwrap();
        ssl_request = true;
    }
    let mut next = [0u8; 5];
    stream.read_exact(&mut next).unwrap();
    let _ = tx.send(Ok(Seen {
        version,
        source,
        destination,
        ssl_request,
        next,
    }));
    if stream.write_all(&next).is_err() {
        return;
    }
    let _ = std::io::copy(&mut stream.try_clone().unwrap(), &mut stream);
}

/// Reads and parses a v1 or v2 header (TCP over IPv4, as the loopback clients here use).
fn read_header(stream: &mut TcpStream) -> (u8, SocketAddr, SocketAddr) {
    let mut start = [0u8; 12];
    stream.read_exact(&mut start).unwrap();
    if start == V2_SIGNATURE {
        let mut rest = [0u8; 4];
        stream.read_exact(&mut rest).unwrap();
        assert_eq!(rest[0], 0x21, "version 2, command PROXY");
        assert_eq!(rest[1], 0x11, "TCP over IPv4");
        let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        assert_eq!(len, 12);
        let mut block = [0u8; 12];
        stream.read_exact(&mut block).unwrap();
        let ip = |at: usize| Ipv4Addr::new(block[at], block[at + 1], block[at + 2], block[at + 3]);
        let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
        return (
            2,
            SocketAddr::from((ip(0), port(8))),
            SocketAddr::from((ip(4), port(10))),
        );
    }
    // v1: a text line ending in CRLF, at most 107 bytes.
    let mut line = start.to_vec();
    while !line.ends_with(b"\r\n") {
        assert!(
            line.len() < 107,
            "v1 line too long: {:?}",
            line.escape_ascii()
        );
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).unwrap();
        line.push(byte[0]);
    }
    let text = String::from_utf8(line).unwrap();
    let fields: Vec<&str> = text.trim_end().split(' ').collect();
    assert_eq!(fields.len(), 6, "{text:?}");
    assert_eq!(&fields[..2], ["PROXY", "TCP4"], "{text:?}");
    let addr = |ip: &str, port: &str| SocketAddr::new(ip.parse().unwrap(), port.parse().unwrap());
    (1, addr(fields[2], fields[4]), addr(fields[3], fields[5]))
}

/// A TCP connection from `source` (port chosen by the kernel) to `destination`.
fn connect_from(source: Ipv4Addr, destination: SocketAddr) -> TcpStream {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(SocketAddrV4::new(source, 0)).into())
        .unwrap();
    socket.connect(&destination.into()).unwrap();
    let stream = TcpStream::from(socket);
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
}

fn with_proxy(mut rule: Value, version: &str) -> Value {
    rule["proxy_protocol"] = json!(version);
    rule
}

/// Checks the header named the client's address and the address it connected to.
fn check_addresses(seen: &Seen, client: &TcpStream, what: &str) {
    assert_eq!(
        seen.source,
        client.local_addr().unwrap(),
        "{what}: the client's address and port"
    );
    assert_eq!(
        seen.destination,
        client.peer_addr().unwrap(),
        "{what}: the listener address the client connected to"
    );
}

#[test]
fn proxy_headers_carry_the_client_and_listener_addresses_in_both_modes() {
    let Some(daemon) = kernel_daemon(&[]) else {
        return;
    };
    let api = daemon.api().unwrap();
    let pki = Pki::new().unwrap();
    certificate(
        &api,
        &pki,
        "terminated",
        &["t1.example.test", "t2.example.test"],
    );
    let ip = next_loopback();
    let (backend, seen) = header_backend(ip, false);
    instance(&api, "stub", ip);
    let port = backend.port();
    let ingress = create_ingress(
        &api,
        "proxied",
        json!([
            with_proxy(rule("t1.example.test", "stub", port, "terminate"), "v1"),
            with_proxy(rule("t2.example.test", "stub", port, "terminate"), "v2"),
            with_proxy(rule("p1.example.test", "stub", port, "passthrough"), "v1"),
            with_proxy(rule("p2.example.test", "stub", port, "passthrough"), "v2"),
        ]),
        None,
    );
    // Clients connect from, and to, loopback addresses of their own, so neither end of the
    // header can be right by accident.
    let listener = SocketAddr::from((next_loopback(), ingress.addr().port()));
    let config = pki.client_config(&[]).unwrap();
    for version in [1u8, 2] {
        // Terminate: the header, then the plaintext.
        let sni = format!("t{version}.example.test");
        let tcp = connect_from(next_loopback(), listener);
        let name = ServerName::try_from(sni.clone()).unwrap();
        let mut tls = StreamOwned::new(
            ClientConnection::new(Arc::clone(&config), name).unwrap(),
            tcp,
        );
        tls.write_all(b"hello, backend").unwrap();
        let mut back = [0u8; 14];
        tls.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"hello, backend");
        let got = seen.next();
        assert_eq!(got.version, version, "{sni}");
        assert_eq!(
            &got.next, b"hello",
            "{sni}: plaintext right after the header"
        );
        check_addresses(&got, &tls.sock, &sni);

        // Passthrough: the header, then the client's ClientHello.
        let sni = format!("p{version}.example.test");
        let mut tcp = connect_from(next_loopback(), listener);
        tcp.write_all(&client_hello(&sni, &[]).unwrap()).unwrap();
        let got = seen.next();
        assert_eq!(got.version, version, "{sni}");
        assert_eq!(
            got.next[0], 0x16,
            "{sni}: the ClientHello right after the header"
        );
        check_addresses(&got, &tcp, &sni);
    }
}

#[test]
fn a_postgres_passthrough_rule_sends_the_proxy_header_before_the_replayed_ssl_request() {
    let Some(daemon) = kernel_daemon(&[]) else {
        return;
    };
    let api = daemon.api().unwrap();
    let ip = next_loopback();
    let (backend, seen) = header_backend(ip, true);
    instance(&api, "pgstub", ip);
    let pg_rule = |sni: &str, version: &str| {
        with_proxy(
            postgres_rule(sni, "pgstub", backend.port(), "passthrough"),
            version,
        )
    };
    let ingress = create_ingress(
        &api,
        "pg-proxied",
        json!([
            pg_rule("db1.example.test", "v1"),
            pg_rule("db2.example.test", "v2"),
        ]),
        None,
    );
    let listener = SocketAddr::from((next_loopback(), ingress.addr().port()));
    for version in [1u8, 2] {
        let sni = format!("db{version}.example.test");
        // A libpq-style client: SSLRequest, `S` from the daemon, then its ClientHello.
        let mut tcp = connect_from(next_loopback(), listener);
        tcp.write_all(&SSL_REQUEST).unwrap();
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"S");
        tcp.write_all(&client_hello(&sni, &[]).unwrap()).unwrap();
        let got = seen.next();
        assert_eq!(got.version, version, "{sni}");
        assert!(got.ssl_request, "{sni}: header, then SSLRequest");
        assert_eq!(got.next[0], 0x16, "{sni}: then the ClientHello");
        check_addresses(&got, &tcp, &sni);

        // A direct-TLS client (no SSLRequest): the backend still gets header, SSLRequest,
        // ClientHello, in that order.
        let mut tcp = connect_from(next_loopback(), listener);
        tcp.write_all(&client_hello(&sni, &[b"postgresql"]).unwrap())
            .unwrap();
        let got = seen.next();
        assert_eq!(got.version, version, "{sni} direct");
        assert!(got.ssl_request, "{sni} direct: header, then SSLRequest");
        assert_eq!(got.next[0], 0x16, "{sni} direct: then the ClientHello");
        check_addresses(&got, &tcp, &sni);
    }
}
