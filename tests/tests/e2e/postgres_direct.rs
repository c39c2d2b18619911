//! PG17 direct TLS through the daemon: a client that opens TLS at once, offering ALPN
//! `postgresql`, with no SSLRequest first. The Postgres here is 15, which accepts TLS only
//! after an SSLRequest (direct TLS came in 17), and psql 15 cannot send it; so the client is
//! written here (rustls, then the Postgres wire protocol by hand), and the daemon's part is
//! what makes it work with a pre-17 server:
//! - terminate: the daemon negotiates ALPN `postgresql` and sends the startup message to
//!   Postgres in plaintext;
//! - passthrough: the daemon routes the hello by SNI and replays an SSLRequest to Postgres, so
//!   the client's TLS session reaches Postgres itself.

use std::{
    io::{Read, Write},
    process::Command,
    sync::Arc,
    time::Duration,
};

use ingress_tests::{
    pki::{Pki, provider},
    ports::next_loopback,
    require_ok,
    servers::{ServerOptions, postgres::Postgres},
    tls::{TlsStream, client_hello, tls_connect},
    tools,
    workdir::WorkDir,
};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, pem::PemObject as _};
use serde_json::json;

use crate::common::{
    certificate, create_ingress, instance, kernel_daemon, postgres_rule, refused_count, run,
    wait_closed, wait_for_count,
};

/// A rustls client configuration trusting the CA in `ca_pem`, offering ALPN `postgresql`.
fn direct_tls_config(ca_pem: &std::path::Path) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Arc::new(config)
}

/// Reads one backend message: its type byte and body.
fn read_message(stream: &mut impl Read) -> (u8, Vec<u8>) {
    let mut head = [0u8; 5];
    stream.read_exact(&mut head).unwrap();
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len - 4];
    stream.read_exact(&mut body).unwrap();
    if head[0] == b'E' {
        panic!("postgres error: {}", String::from_utf8_lossy(&body));
    }
    (head[0], body)
}

/// Sends a protocol 3.0 startup message for user and database `postgres` (trust
/// authentication) and reads until the server is ready for a query.
fn start_session(stream: &mut (impl Read + Write)) {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for part in ["user", "postgres", "database", "postgres", ""] {
        body.extend_from_slice(part.as_bytes());
        body.push(0);
    }
    let len = u32::try_from(body.len() + 4).unwrap();
    stream.write_all(&len.to_be_bytes()).unwrap();
    stream.write_all(&body).unwrap();
    stream.flush().unwrap();
    loop {
        match read_message(stream) {
            (b'R', auth) => assert_eq!(auth, [0, 0, 0, 0], "authentication ok (trust)"),
            (b'Z', _) => return,
            _ => {}
        }
    }
}

/// Runs `sql` (one row, one column) with the simple query protocol; returns the value.
fn query(stream: &mut (impl Read + Write), sql: &str) -> String {
    let len = u32::try_from(sql.len() + 5).unwrap();
    stream.write_all(b"Q").unwrap();
    stream.write_all(&len.to_be_bytes()).unwrap();
    stream.write_all(sql.as_bytes()).unwrap();
    stream.write_all(&[0]).unwrap();
    stream.flush().unwrap();
    let mut value = None;
    loop {
        match read_message(stream) {
            (b'D', row) => {
                assert_eq!(&row[..2], [0, 1], "one column");
                let n = u32::from_be_bytes([row[2], row[3], row[4], row[5]]) as usize;
                value = Some(String::from_utf8(row[6..6 + n].to_vec()).unwrap());
            }
            (b'Z', _) => return value.expect("a row"),
            _ => {}
        }
    }
}

/// Starts a session over a direct-TLS stream and asks whether Postgres itself saw TLS.
fn postgres_saw_tls(tls: &mut TlsStream) -> String {
    start_session(tls);
    assert_eq!(query(tls, "SELECT 1"), "1");
    query(
        tls,
        "SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
}

#[test]
fn a_direct_tls_client_reaches_postgres_through_a_terminate_rule() {
    let Some(daemon) = kernel_daemon(&[]) else {
        return;
    };
    let pg = require_ok!(Postgres::start(&ServerOptions::new(
        next_loopback(),
        &["db1.example.test"]
    )));
    let api = daemon.api().unwrap();
    let work = WorkDir::new("ingt-pg-direct-").unwrap();
    let pki = Pki::new().unwrap();
    let ca = pki.write_ca(work.path()).unwrap();
    certificate(&api, &pki, "db1", &["db1.example.test"]);
    instance(&api, "db1", pg.addr().ip());
    let ingress = create_ingress(
        &api,
        "pg-direct-term",
        json!([postgres_rule(
            "db1.example.test",
            "db1",
            pg.addr().port(),
            "terminate"
        )]),
        None,
    );

    let mut tls = tls_connect(ingress.addr(), "db1.example.test", direct_tls_config(&ca)).unwrap();
    assert_eq!(
        tls.conn.alpn_protocol(),
        Some(&b"postgresql"[..]),
        "the daemon negotiates ALPN postgresql"
    );
    assert_eq!(
        postgres_saw_tls(&mut tls),
        "false",
        "TLS ended at the daemon; postgres got the startup message in plaintext"
    );

    // openssl s_client offering only `postgresql` gets it too.
    let mut cmd = Command::new(tools::find("openssl").unwrap());
    cmd.args(["s_client", "-verify_return_error", "-connect"])
        .arg(ingress.addr().to_string())
        .args(["-servername", "db1.example.test", "-alpn", "postgresql"])
        .arg("-CAfile")
        .arg(&ca)
        .stdin(std::process::Stdio::null());
    let out = run(&mut cmd);
    assert!(out.contains("ALPN protocol: postgresql"), "{out}");
}

#[test]
fn a_direct_tls_hello_is_routed_by_sni_through_a_postgres_passthrough_rule() {
    let Some(daemon) = kernel_daemon(&[]) else {
        return;
    };
    let pg = require_ok!(Postgres::start(&ServerOptions::new(
        next_loopback(),
        &["db1.example.test"]
    )));
    let api = daemon.api().unwrap();
    instance(&api, "db1", pg.addr().ip());
    let name = "pg-direct-pass";
    let ingress = create_ingress(
        &api,
        name,
        json!([postgres_rule(
            "db1.example.test",
            "db1",
            pg.addr().port(),
            "passthrough"
        )]),
        None,
    );

    // The TLS session is with postgres 15 itself (its own CA verifies it), although the client
    // never sent an SSLRequest.
    let mut tls = tls_connect(
        ingress.addr(),
        "db1.example.test",
        direct_tls_config(pg.ca_path()),
    )
    .unwrap();
    assert_eq!(postgres_saw_tls(&mut tls), "true", "TLS end to end");

    // The server name decided: a direct hello for another name is refused.
    let before = refused_count(&api, name, "unknown_sni");
    let mut stream = std::net::TcpStream::connect(ingress.addr()).unwrap();
    stream
        .write_all(&client_hello("db2.example.test", &[b"postgresql"]).unwrap())
        .unwrap();
    let (_, _, got) = wait_closed(stream, Duration::from_secs(5));
    assert!(got.is_empty());
    wait_for_count(
        "refusals for unknown_sni",
        Duration::from_secs(5),
        before + 1,
        || refused_count(&api, name, "unknown_sni"),
    );
}
