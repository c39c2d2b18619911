//! Backend connects on loopback: success with options set, refused, and a black hole.

use std::time::Duration;

use socket2::{Domain, SockRef, Socket, Type};
use tokio::net::TcpListener;
use tokio::time::Instant;

use super::*;

#[tokio::test]
async fn connected_backend_carries_nodelay_keepalive_and_user_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stream = connect(listener.local_addr().unwrap(), &ConnectOptions::default())
        .await
        .unwrap();
    let sock = SockRef::from(&stream);
    assert!(sock.tcp_nodelay().unwrap());
    assert!(sock.keepalive().unwrap());
    assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(60));
    assert_eq!(
        sock.tcp_keepalive_interval().unwrap(),
        Duration::from_secs(10)
    );
    assert_eq!(sock.tcp_keepalive_retries().unwrap(), 6);
    assert_eq!(
        sock.tcp_user_timeout().unwrap(),
        Some(Duration::from_secs(120))
    );

    let (accepted, _) = listener.accept().await.unwrap();
    let opts = FlowOptions {
        keepalive: None,
        user_timeout: Some(Duration::from_secs(30)),
    };
    apply_flow_options(&accepted, &opts).unwrap();
    let sock = SockRef::from(&accepted);
    assert!(sock.tcp_nodelay().unwrap());
    assert!(!sock.keepalive().unwrap());
    assert_eq!(
        sock.tcp_user_timeout().unwrap(),
        Some(Duration::from_secs(30))
    );
}

#[tokio::test]
async fn refused_backend_fails_promptly_as_unreachable() {
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    // The listener is gone: the port refuses.
    let started = Instant::now();
    let err = connect(addr, &ConnectOptions::default()).await.unwrap_err();
    assert_eq!(err.reason(), "backend_unreachable", "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(1));

    let err = connect("[::1]:1".parse().unwrap(), &ConnectOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ConnectError::Unreachable { .. } | ConnectError::Local { .. }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn backend_that_drops_syns_times_out() {
    // A listener whose accept queue is full drops further SYNs: the connect hangs.
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let opts = ConnectOptions {
        connect_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let mut held = Vec::new();
    for _ in 0..8 {
        let started = Instant::now();
        match connect(addr, &opts).await {
            Ok(stream) => held.push(stream),
            Err(err) => {
                assert_eq!(err.reason(), "backend_timeout", "{err:?}");
                assert!(started.elapsed() < Duration::from_secs(2));
                return;
            }
        }
    }
    panic!(
        "the accept queue never filled ({} connects succeeded)",
        held.len()
    );
}
