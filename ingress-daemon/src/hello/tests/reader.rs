//! The async reader on real loopback sockets.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use super::CAPTURED;
use super::parse::{build_hello, message_of, records, sni_ext};
use crate::hello::reader::{PEEKS, pooled_buffers};
use crate::hello::{DEFAULT_MAX_HELLO_BYTES, HelloError, read_client_hello};

/// A connected (client, server) pair on 127.0.0.1.
pub(crate) async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let client = TcpStream::connect(listener.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (server, _) = listener.accept().await.expect("accept");
    client.set_nodelay(true).expect("nodelay");
    (client, server)
}

fn deadline_in(ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ms)
}

async fn read(server: &TcpStream, ms: u64) -> Result<crate::hello::ClientHelloInfo, HelloError> {
    read_client_hello(server, DEFAULT_MAX_HELLO_BYTES, deadline_in(ms)).await
}

/// Asserts the whole of `expected` is still queued on `server`.
async fn assert_still_queued(server: &mut TcpStream, expected: &[u8]) {
    let mut got = vec![0u8; expected.len()];
    server
        .read_exact(&mut got)
        .await
        .expect("read the peeked bytes");
    assert_eq!(got, expected, "the reader consumed or altered bytes");
}

#[tokio::test]
async fn reader_returns_the_hello_and_leaves_every_byte_in_the_socket() {
    for c in CAPTURED {
        let (mut client, mut server) = pair().await;
        let mut sent = c.bytes.to_vec();
        sent.extend_from_slice(b"\x14\x03\x03\x00\x01\x01 and whatever follows");
        client.write_all(&sent).await.expect("write");
        let info = read(&server, 5000)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
        assert_eq!(info.sni.as_deref(), c.sni, "{}", c.name);
        assert_eq!(info.len, c.bytes.len());
        assert_still_queued(&mut server, &sent).await;
    }
}

#[tokio::test]
async fn hello_sent_one_byte_per_segment_is_read_without_spinning() {
    let c = CAPTURED
        .iter()
        .find(|c| c.name.contains("mlkem"))
        .expect("pq capture");
    let (mut client, mut server) = pair().await;
    let bytes = c.bytes;
    let writer = tokio::spawn(async move {
        for b in bytes {
            client
                .write_all(std::slice::from_ref(b))
                .await
                .expect("write");
            // Let each byte leave as its own segment rather than be coalesced.
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        client
    });
    PEEKS.with(|p| p.set(0));
    let info = read(&server, 30_000).await.expect("hello");
    let peeks = PEEKS.with(|p| p.get());
    assert_eq!(info.sni.as_deref(), c.sni);
    // About one wake-up per segment; a segment that lands during a peek costs a second,
    // empty one. A spin would be orders of magnitude more.
    assert!(
        peeks <= 2 * bytes.len() + 16,
        "{peeks} peeks for {} bytes",
        bytes.len()
    );
    let _client = writer.await.expect("writer");
    assert_still_queued(&mut server, bytes).await;
}

#[tokio::test]
async fn slow_client_is_cut_off_at_the_deadline_without_spinning() {
    let c = &CAPTURED[0];
    let (mut client, server) = pair().await;
    let bytes = c.bytes;
    let writer = tokio::spawn(async move {
        for b in bytes {
            if client.write_all(std::slice::from_ref(b)).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    PEEKS.with(|p| p.set(0));
    let started = Instant::now();
    let err = read(&server, 600).await.expect_err("slowloris");
    let elapsed = started.elapsed();
    assert_eq!(err.reason(), "hello_timeout");
    assert!(
        elapsed >= Duration::from_millis(590) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    let peeks = PEEKS.with(|p| p.get());
    assert!(peeks <= 40, "{peeks} peeks in 600 ms at one byte per 50 ms");
    writer.abort();
}

#[tokio::test]
async fn silent_client_times_out() {
    let (_client, server) = pair().await;
    let started = Instant::now();
    let err = read(&server, 300).await.expect_err("silence");
    assert_eq!(err.reason(), "hello_timeout");
    assert!(started.elapsed() >= Duration::from_millis(290));
}

#[tokio::test]
async fn two_kilobyte_hello_in_two_records_and_two_segments_is_read() {
    let msg = build_hello(&[
        sni_ext(&[b"db1.example.test"]),
        (51, vec![0x11; 1222]),
        (21, vec![0; 700]),
    ]);
    let bytes = records(&msg, &[1000]);
    let (mut client, mut server) = pair().await;
    let (head, tail) = bytes.split_at(700);
    client.write_all(head).await.expect("write");
    let tail_owned = tail.to_vec();
    let writer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        client.write_all(&tail_owned).await.expect("write");
        client
    });
    let info = read(&server, 5000).await.expect("hello");
    assert_eq!(info.sni.as_deref(), Some("db1.example.test"));
    assert_eq!(info.len, bytes.len());
    let _client = writer.await.expect("writer");
    assert_still_queued(&mut server, &bytes).await;
}

#[tokio::test]
async fn a_reused_peek_buffer_never_shows_an_earlier_hello() {
    // One thread: each read takes the buffer the one before gave back.
    let first = records(
        &build_hello(&[sni_ext(&[b"first.example.test"]), (21, vec![0; 1500])]),
        &[],
    );
    let (mut client, server) = pair().await;
    client.write_all(&first).await.expect("write");
    let info = read(&server, 5000).await.expect("first hello");
    assert_eq!(info.sni.as_deref(), Some("first.example.test"));
    let pooled = pooled_buffers();
    assert!(pooled >= 1, "the buffer went back to the pool");

    // The head of a shorter hello, then the end of the stream: the earlier hello's bytes
    // still in the buffer must not complete it.
    let second = records(&build_hello(&[sni_ext(&[b"second.example.test"])]), &[]);
    let (mut client, server) = pair().await;
    client.write_all(&second[..40]).await.expect("write");
    client.shutdown().await.expect("shutdown");
    let err = read(&server, 5000).await.expect_err("cut short");
    assert_eq!(err.reason(), "closed", "{err}");

    let third = records(&build_hello(&[sni_ext(&[b"third.example.test"])]), &[]);
    let (mut client, server) = pair().await;
    client.write_all(&third).await.expect("write");
    let info = read(&server, 5000).await.expect("third hello");
    assert_eq!(info.sni.as_deref(), Some("third.example.test"));
    assert_eq!(info.len, third.len());
    assert_eq!(
        pooled_buffers(),
        pooled,
        "reads take and give back the same buffers"
    );
}

#[tokio::test]
async fn sixteen_kib_hello_grows_the_buffer() {
    let msg = build_hello(&[sni_ext(&[b"big.example.test"]), (21, vec![0; 16 * 1024])]);
    let bytes = records(&msg, &[16 * 1024]);
    let (mut client, mut server) = pair().await;
    client.write_all(&bytes).await.expect("write");
    let info = read(&server, 5000).await.expect("hello");
    assert_eq!(info.sni.as_deref(), Some("big.example.test"));
    assert_still_queued(&mut server, &bytes).await;
}

#[tokio::test]
async fn oversize_hello_is_refused() {
    let msg = build_hello(&[sni_ext(&[b"big.example.test"]), (21, vec![0; 8 * 1024])]);
    let (mut client, server) = pair().await;
    client.write_all(&records(&msg, &[])).await.expect("write");
    let err = read_client_hello(&server, 4096, deadline_in(5000))
        .await
        .expect_err("cap");
    assert_eq!(err.reason(), "hello_too_large");
}

#[tokio::test]
async fn plain_http_is_refused_as_not_tls() {
    let (mut client, server) = pair().await;
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: a.example.test\r\n\r\n")
        .await
        .expect("write");
    assert_eq!(
        read(&server, 5000).await.expect_err("http").reason(),
        "not_tls"
    );
}

#[tokio::test]
async fn garbage_record_of_64_kib_is_refused_as_bad_hello() {
    let (mut client, server) = pair().await;
    let mut bytes = vec![0x16, 0x03, 0x01, 0xff, 0xff];
    bytes.resize(5 + 65535, 0xa5);
    let writer = tokio::spawn(async move {
        let _ = client.write_all(&bytes).await;
        client
    });
    assert_eq!(
        read(&server, 5000).await.expect_err("garbage").reason(),
        "bad_hello"
    );
    drop(server);
    let _ = writer.await;
}

#[tokio::test]
async fn client_that_closes_midway_is_closed_not_timed_out() {
    let c = &CAPTURED[1];
    let (mut client, server) = pair().await;
    client.write_all(&c.bytes[..100]).await.expect("write");
    client.shutdown().await.expect("shutdown");
    let started = Instant::now();
    let err = read(&server, 5000).await.expect_err("half a hello");
    assert!(
        matches!(err, HelloError::Closed { received: 100 }),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));

    let (client, server) = pair().await;
    drop(client);
    let err = read(&server, 5000).await.expect_err("nothing");
    assert!(matches!(err, HelloError::Closed { received: 0 }), "{err:?}");
}

#[tokio::test]
async fn client_that_resets_midway_is_closed() {
    let (mut client, server) = pair().await;
    client
        .write_all(&CAPTURED[1].bytes[..50])
        .await
        .expect("write");
    let wait = read(&server, 5000);
    let reset = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        socket2::SockRef::from(&client)
            .set_linger(Some(Duration::ZERO))
            .expect("linger");
        drop(client);
    };
    let (result, ()) = tokio::join!(wait, reset);
    assert_eq!(result.expect_err("reset").reason(), "closed");
}

#[tokio::test]
async fn hello_split_into_two_records_sent_byte_by_byte_is_read() {
    let c = &CAPTURED[4];
    let bytes = records(message_of(c.bytes), &[3]);
    let (mut client, server) = pair().await;
    let sent = bytes.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(7) {
            client.write_all(chunk).await.expect("write");
            tokio::time::sleep(Duration::from_micros(300)).await;
        }
        client
    });
    let info = read(&server, 10_000).await.expect("hello");
    assert_eq!(info.sni.as_deref(), c.sni);
    assert_eq!(info.len, bytes.len());
    let _client = writer.await.expect("writer");
}
