//! Regenerates `tests/data/hellos/` from real clients on loopback:
//! `cargo test -p ingress-daemon capture_hellos -- --ignored`.
//!
//! Each client connects to a listener on 127.0.0.1:0; the reader under test peeks the hello,
//! then exactly `len` bytes are read and stored. The post-quantum hello needs a Python whose
//! pyOpenSSL runs on OpenSSL >= 3.5 (`INGRESSD_PQ_PYTHON=/path/to/python`); without it that
//! file is left as it is.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::time::Instant;

use crate::hello::{DEFAULT_MAX_HELLO_BYTES, read_client_hello};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/hellos")
}

/// Accepts one connection, stores its ClientHello as `name`, returns the bytes.
async fn capture_one(listener: &TcpListener, name: &str) -> Vec<u8> {
    let (mut stream, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .expect("client connects")
        .expect("accept");
    let deadline = Instant::now() + Duration::from_secs(10);
    let info = read_client_hello(&stream, DEFAULT_MAX_HELLO_BYTES, deadline)
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut bytes = vec![0u8; info.len];
    stream.read_exact(&mut bytes).await.expect("read hello");
    assert!(bytes.len() < 4096, "{name}: {} bytes", bytes.len());
    std::fs::write(data_dir().join(name), &bytes).expect("write capture");
    println!(
        "{name}: {} bytes, sni {:?}, alpn {:?}",
        bytes.len(),
        info.sni,
        info.alpn
    );
    bytes
}

/// Runs `program args` (with `{port}` replaced) against a fresh listener and captures.
async fn capture_command(name: &str, program: &str, args: &[&str]) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port().to_string();
    let args: Vec<String> = args.iter().map(|a| a.replace("{port}", &port)).collect();
    let mut child = Command::new(program)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    capture_one(&listener, name).await;
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        child.start_kill().expect("kill client");
    }
}

async fn capture_rustls(name: &str) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let client = tokio::spawn(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let server_name = rustls_pki_types::ServerName::try_from("rustls.example.test")
            .expect("name")
            .to_owned();
        // The handshake fails when the capture side closes; only the hello matters.
        let _ = connector.connect(server_name, tcp).await;
    });
    capture_one(&listener, name).await;
    client.await.expect("rustls client");
}

#[tokio::test]
#[ignore = "regenerates the captured hellos; needs openssl and curl"]
async fn capture_hellos() {
    let connect = "127.0.0.1:{port}";
    let s_client = |extra: &'static [&'static str]| {
        let mut args = vec!["s_client", "-connect", connect];
        args.extend_from_slice(extra);
        args
    };
    capture_command(
        "openssl-tls12-sni.bin",
        "openssl",
        &s_client(&["-servername", "a.example.test", "-tls1_2"]),
    )
    .await;
    capture_command(
        "openssl-tls13-sni-alpn.bin",
        "openssl",
        &s_client(&[
            "-servername",
            "B.Example.Test",
            "-tls1_3",
            "-alpn",
            "h2,http/1.1",
        ]),
    )
    .await;
    capture_command(
        "openssl-no-sni.bin",
        "openssl",
        &s_client(&["-noservername"]),
    )
    .await;
    capture_command(
        "openssl-pg17-direct.bin",
        "openssl",
        &s_client(&["-servername", "db1.example.test", "-alpn", "postgresql"]),
    )
    .await;
    capture_command(
        "curl.bin",
        "curl",
        &[
            "-sk",
            "--max-time",
            "10",
            "--resolve",
            "web.example.test:{port}:127.0.0.1",
            "https://web.example.test:{port}/",
        ],
    )
    .await;
    capture_rustls("rustls.bin").await;
    match std::env::var("INGRESSD_PQ_PYTHON") {
        Ok(python) => {
            let script = data_dir().join("pq_client.py");
            let script = script.to_str().expect("utf-8 path");
            let name = "openssl4-x25519mlkem768.bin";
            capture_command(name, &python, &[script, "{port}"]).await;
        }
        Err(_) => println!("INGRESSD_PQ_PYTHON unset: keeping the stored post-quantum hello"),
    }
}
