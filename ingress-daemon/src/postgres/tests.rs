//! Postgres preamble on real loopback sockets, with captured hellos after it.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use super::*;
use crate::hello::{DEFAULT_MAX_HELLO_BYTES, read_client_hello};

const PG17_HELLO: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/hellos/openssl-pg17-direct.bin"
));
const GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
const CANCEL_REQUEST: [u8; 16] = [0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e, 0, 0, 0, 7, 1, 2, 3, 4];

async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let client = TcpStream::connect(listener.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (server, _) = listener.accept().await.expect("accept");
    (client, server)
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

#[test]
fn requests_are_classified_by_length_and_code() {
    assert_eq!(classify(&SSL_REQUEST), Request::Ssl);
    assert_eq!(classify(&GSSENC_REQUEST), Request::GssEnc);
    assert_eq!(
        classify(&CANCEL_REQUEST[..8].try_into().unwrap()),
        Request::Cancel
    );
    // A StartupMessage for protocol 3.0.
    assert_eq!(classify(&[0, 0, 0, 0x54, 0, 3, 0, 0]), Request::Other);
    // SSLRequest's code with a wrong length.
    assert_eq!(
        classify(&[0, 0, 0, 9, 0x04, 0xd2, 0x16, 0x2f]),
        Request::Other
    );
}

#[tokio::test]
async fn ssl_request_is_answered_and_the_hello_after_it_is_routed() {
    let (mut client, mut server) = pair().await;
    let client_side = tokio::spawn(async move {
        client.write_all(&SSL_REQUEST).await.unwrap();
        let mut answer = [0u8; 1];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"S");
        client.write_all(PG17_HELLO).await.unwrap();
        client
    });
    let preamble = read_client_preamble(&mut server, soon()).await.unwrap();
    assert_eq!(preamble, ClientPreamble::SslRequest { pipelined: false });
    accept_ssl_request(&mut server).await.unwrap();
    let info = read_client_hello(&server, DEFAULT_MAX_HELLO_BYTES, soon())
        .await
        .unwrap();
    assert_eq!(info.sni.as_deref(), Some("db1.example.test"));
    // Exactly the 8 request bytes were consumed: the hello is whole in the socket.
    let mut rest = vec![0u8; PG17_HELLO.len()];
    server.read_exact(&mut rest).await.unwrap();
    assert_eq!(rest, PG17_HELLO);
    let _client = client_side.await.unwrap();
}

#[tokio::test]
async fn direct_tls_consumes_nothing_and_offers_the_postgresql_alpn() {
    let (mut client, mut server) = pair().await;
    client.write_all(PG17_HELLO).await.unwrap();
    assert_eq!(
        read_client_preamble(&mut server, soon()).await.unwrap(),
        ClientPreamble::DirectTls
    );
    let info = read_client_hello(&server, DEFAULT_MAX_HELLO_BYTES, soon())
        .await
        .unwrap();
    assert!(info.offers_alpn(ALPN_POSTGRESQL));
    let mut rest = vec![0u8; PG17_HELLO.len()];
    server.read_exact(&mut rest).await.unwrap();
    assert_eq!(rest, PG17_HELLO);
}

#[tokio::test]
async fn gssenc_request_is_declined_then_ssl_request_accepted() {
    let (mut client, mut server) = pair().await;
    let client_side = tokio::spawn(async move {
        let mut answer = [0u8; 1];
        client.write_all(&GSSENC_REQUEST).await.unwrap();
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"N");
        client.write_all(&SSL_REQUEST).await.unwrap();
        client
    });
    let preamble = read_client_preamble(&mut server, soon()).await.unwrap();
    assert_eq!(preamble, ClientPreamble::SslRequest { pipelined: false });
    let _client = client_side.await.unwrap();
}

#[tokio::test]
async fn pipelined_hello_is_flagged_and_left_in_the_socket() {
    let (mut client, mut server) = pair().await;
    let mut bytes = SSL_REQUEST.to_vec();
    bytes.extend_from_slice(PG17_HELLO);
    client.write_all(&bytes).await.unwrap();
    let preamble = read_client_preamble(&mut server, soon()).await.unwrap();
    assert_eq!(preamble, ClientPreamble::SslRequest { pipelined: true });
    let info = read_client_hello(&server, DEFAULT_MAX_HELLO_BYTES, soon())
        .await
        .unwrap();
    assert_eq!(info.len, PG17_HELLO.len());
}

#[tokio::test]
async fn unroutable_preambles_are_refused_with_their_reason() {
    let cases: [(&[u8], &str); 4] = [
        (&CANCEL_REQUEST, "pg_cancel_request"),
        (
            &[0, 0, 0, 0x54, 0, 3, 0, 0, b'u', b's', b'e', b'r', 0],
            "not_tls",
        ),
        (b"GET / HTTP/1.1\r\n\r\n", "not_tls"),
        (&[GSSENC_REQUEST, GSSENC_REQUEST].concat(), "not_tls"),
    ];
    for (bytes, reason) in cases {
        let (mut client, mut server) = pair().await;
        client.write_all(bytes).await.unwrap();
        let err = read_client_preamble(&mut server, soon()).await.unwrap_err();
        assert_eq!(err.reason(), reason, "{bytes:?}");
    }
}

#[tokio::test]
async fn silent_or_closing_clients_end_the_preamble() {
    let (_client, mut server) = pair().await;
    let deadline = Instant::now() + Duration::from_millis(200);
    assert_eq!(
        read_client_preamble(&mut server, deadline)
            .await
            .unwrap_err()
            .reason(),
        "hello_timeout"
    );

    let (mut client, mut server) = pair().await;
    client.write_all(&SSL_REQUEST[..5]).await.unwrap();
    drop(client);
    assert_eq!(
        read_client_preamble(&mut server, soon())
            .await
            .unwrap_err()
            .reason(),
        "closed"
    );
}

/// A backend that reads the 8-byte request, checks it, and answers `answer`.
async fn backend(answer: &'static [u8]) -> (TcpStream, tokio::task::JoinHandle<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut req = [0u8; 8];
        s.read_exact(&mut req).await.unwrap();
        assert_eq!(req, SSL_REQUEST);
        s.write_all(answer).await.unwrap();
        s
    });
    (TcpStream::connect(addr).await.unwrap(), server)
}

#[tokio::test]
async fn backend_must_answer_s_to_the_replayed_ssl_request() {
    let (mut conn, server) = backend(b"S").await;
    start_backend_tls(&mut conn, soon()).await.unwrap();
    let _ = server.await.unwrap();

    let (mut conn, server) = backend(b"N").await;
    let err = start_backend_tls(&mut conn, soon()).await.unwrap_err();
    assert!(
        matches!(err, PgError::BackendRefusedTls { reply: b'N' }),
        "{err:?}"
    );
    assert_eq!(err.reason(), "backend_refused_tls");
    let _ = server.await.unwrap();

    // A backend that closes without answering.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut conn = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    drop(listener.accept().await.unwrap());
    assert_eq!(
        start_backend_tls(&mut conn, soon())
            .await
            .unwrap_err()
            .reason(),
        "backend_refused_tls"
    );
}

#[tokio::test]
async fn backend_answer_is_read_exactly_and_silence_times_out() {
    let (mut conn, server) = backend(b"Sextra").await;
    start_backend_tls(&mut conn, soon()).await.unwrap();
    let mut rest = [0u8; 5];
    conn.read_exact(&mut rest).await.unwrap();
    assert_eq!(&rest, b"extra");
    let _ = server.await.unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut conn = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_millis(200);
    assert_eq!(
        start_backend_tls(&mut conn, deadline)
            .await
            .unwrap_err()
            .reason(),
        "backend_timeout"
    );
}
