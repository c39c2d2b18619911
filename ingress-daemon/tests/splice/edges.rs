//! The edges of a flow's life: data queued before the hand-off, half-close, reset.

use std::{
    io::{ErrorKind, Read, Write},
    net::Shutdown,
    time::Duration,
};

use std::os::fd::OwnedFd;

use ingress_daemon::splice::{
    EndHandler, Engine, FlowEnd, FlowOptions, FlowOutcome, Offload, SpliceError,
};

use crate::support::{
    Pattern, drain, engine, inject_overlapping_retransmission, is_root, outcome, scaled_bytes,
    spliced, spliced_with,
};

fn modes() -> Vec<Offload> {
    vec![Offload::Required, Offload::Off]
}

async fn for_each_mode(test: impl Fn(Engine) -> tokio::task::JoinHandle<()>) {
    for offload in modes() {
        if let Some(engine) = engine(offload, |_| {}) {
            eprintln!("offload {offload}");
            test(engine).await.unwrap();
        }
    }
}

/// A retransmitted segment that repeats bytes already forwarded and carries new ones after
/// them: the new bytes arrive once and the repeated ones are not forwarded again (the kernel
/// hands such a segment to the verdict whole; the program must cut its head).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retransmission_overlapping_forwarded_bytes_arrives_once() {
    if !is_root() {
        eprintln!("skipped: building a retransmission needs a raw socket and TCP_REPAIR (root)");
        return;
    }
    for offload in modes() {
        let Some(engine) = engine(offload, |_| {}) else {
            continue;
        };
        eprintln!("offload {offload}");
        {
            let s = spliced(&engine, |_, _| {});
            let (mut client, mut server) = (s.client, s.server);
            let done = s.done;
            tokio::task::spawn_blocking(move || {
                server
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                let old: Vec<u8> = (0..100u8).collect();
                let new = b"thirty bytes that follow them!";
                client.write_all(&old).unwrap();
                let mut got = vec![0u8; old.len()];
                server.read_exact(&mut got).unwrap();
                assert_eq!(got, old);
                // Let the proxy's socket acknowledge them, so the client's next sequence
                // number is the proxy's next expected one.
                std::thread::sleep(Duration::from_millis(100));
                inject_overlapping_retransmission(&client, &old[50..], new);
                std::thread::sleep(Duration::from_millis(50));
                // The client sends the same new bytes itself: an old duplicate by now.
                client.write_all(new).unwrap();
                client.shutdown(Shutdown::Write).unwrap();
                let mut rest = Vec::new();
                server.read_to_end(&mut rest).unwrap();
                assert_eq!(
                    String::from_utf8_lossy(&rest),
                    String::from_utf8_lossy(new),
                    "after the first 100 bytes the backend must get the new bytes once"
                );
                server.shutdown(Shutdown::Write).unwrap();
                let mut end = [0u8; 1];
                assert_eq!(client.read(&mut end).unwrap(), 0);
            })
            .await
            .unwrap();
            let out = outcome(done).await;
            assert_eq!(out.end, FlowEnd::Closed);
            if offload == Offload::Required {
                assert!(
                    out.overlap_trimmed >= 50,
                    "the program cut the repeated head: {out:?}"
                );
            }
        }
    }
}

/// A flow on the kernel path gets the configured send buffer on both sockets at the hand-off
/// (the kernel's worker that sends redirected bytes backs off for a clock tick whenever it
/// finds the send buffer full) and the configured receive buffer on a source at its first hold
/// (an autotuned one can be small when a hold ends), not before: at the hand-off a fixed
/// buffer would offer the whole window cap to bytes that may have to go through the relay.
/// The window clamp is the cap after the hand-off and again once the hold ends (fixing the
/// buffer resets the clamp). A relayed flow keeps the kernel's autotuning. The sizes are above
/// the autotuning maximum, so autotuning alone cannot reach them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_path_sockets_get_the_send_buffer_and_relayed_ones_keep_autotuning() {
    let autotune_max = |sysctl: &str| -> u64 {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/{sysctl}"))
            .unwrap()
            .split_whitespace()
            .nth(2)
            .unwrap()
            .parse()
            .unwrap()
    };
    let (wmem_max, rmem_max) = (autotune_max("tcp_wmem"), autotune_max("tcp_rmem"));
    let want = (wmem_max * 4).max(32 << 20);
    let want_rcv = (rmem_max * 2).max(64 << 20);
    // A low soft mark, so that a stalled receiver brings a hold soon; and a high mark raised
    // so far that twice the window cap exceeds the configured receive buffer: the buffer then
    // grows with the cap.
    let low_marks = (1u64 << 20, 4u64 << 20);
    let raised_marks = (1u64 << 20, (1u64 << 20) + 3 * want_rcv);
    for (offload, userspace, kernel, (soft, high)) in [
        (Offload::Required, false, true, low_marks),
        (Offload::Required, false, true, raised_marks),
        (Offload::Required, true, false, low_marks),
        (Offload::Off, false, false, low_marks),
    ] {
        let cap = (high - soft) / 3;
        let Some(engine) = engine(offload, |c| {
            c.send_buffer_bytes = want;
            c.receive_buffer_bytes = want_rcv;
            c.soft_water_bytes = soft;
            c.high_water_bytes = high;
            c.low_water_bytes = soft / 2;
        }) else {
            continue;
        };
        let front = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let back = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(front.local_addr().unwrap()).unwrap();
        let (proxy_client, _) = front.accept().unwrap();
        let proxy_backend = std::net::TcpStream::connect(back.local_addr().unwrap()).unwrap();
        let (mut server, _) = back.accept().unwrap();
        let watched = [
            proxy_client.try_clone().unwrap(),
            proxy_backend.try_clone().unwrap(),
        ];
        let spliced = engine
            .splice(
                OwnedFd::from(proxy_client),
                OwnedFd::from(proxy_backend),
                FlowOptions {
                    userspace,
                    ..FlowOptions::default()
                },
                None,
            )
            .unwrap();
        assert_eq!(
            spliced.path == ingress_daemon::splice::Path::Sockmap,
            kernel,
            "{offload}, userspace {userspace}"
        );
        client.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        let buffers = |sock: &std::net::TcpStream| {
            let fd = std::os::fd::AsFd::as_fd(sock);
            (
                u64::try_from(ingress_daemon::sys::sndbuf(fd).unwrap()).unwrap(),
                u64::try_from(ingress_daemon::sys::rcvbuf(fd).unwrap()).unwrap(),
                u64::from(ingress_daemon::sys::window_clamp(fd).unwrap()),
            )
        };
        for sock in &watched {
            let (sndbuf, rcvbuf, clamp) = buffers(sock);
            if kernel {
                assert_eq!(sndbuf, want, "{offload}: kernel-path send buffer");
                assert!(
                    rcvbuf <= rmem_max,
                    "{offload}: receive buffer {rcvbuf} fixed before any hold"
                );
                assert_eq!(clamp, cap, "{offload}: window clamp is not the cap");
            } else {
                assert!(
                    sndbuf <= wmem_max && rcvbuf <= rmem_max,
                    "{offload}, userspace {userspace}: buffers {sndbuf} / {rcvbuf} set on a \
                     relayed flow"
                );
            }
        }
        if kernel {
            // The server stops reading: bytes in flight pass the soft mark and the engine
            // holds the client's window, fixing its receive buffer first.
            client
                .set_write_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let chunk = vec![7u8; 1 << 20];
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            let expected = want_rcv.max(2 * cap);
            let mut written = 0u64;
            loop {
                let (_, rcvbuf, _) = buffers(&watched[0]);
                if rcvbuf == expected {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{offload}, cap {cap}: receive buffer {rcvbuf}, not {expected}, after \
                     {written} bytes written to a stalled receiver"
                );
                match client.write(&chunk) {
                    Ok(n) => written += n as u64,
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            // The backend side received nothing yet: its buffer is still the kernel's.
            let (_, rcvbuf, _) = buffers(&watched[1]);
            assert!(rcvbuf <= rmem_max, "{offload}: backend buffer {rcvbuf}");
            // The server reads everything: the hold ends and the clamp is the cap again.
            let reader = std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 20];
                let mut total = 0u64;
                while total < written {
                    match server.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n as u64,
                    }
                }
                (server, total)
            });
            let (_, total) = reader.join().unwrap();
            assert_eq!(total, written, "{offload}: every byte arrived");
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let (_, _, clamp) = buffers(&watched[0]);
                if clamp == cap {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{offload}: window clamp {clamp} after the hold, not the cap {cap}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        engine.shutdown(Duration::ZERO).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_bytes_before_handoff_arrive_once_without_more_input() {
    for_each_mode(|engine| {
        tokio::spawn(async move {
            let s = spliced(&engine, |client, server| {
                // Two messages queued on each proxy socket before the hand-off.
                client.write_all(b"hello ").unwrap();
                client.write_all(b"world").unwrap();
                server.write_all(b"banner").unwrap();
                std::thread::sleep(Duration::from_millis(50));
            });
            let (mut client, mut server) = (s.client, s.server);
            tokio::task::spawn_blocking(move || {
                server
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                client
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                let mut got = [0u8; 11];
                server
                    .read_exact(&mut got)
                    .expect("queued bytes arrive without more input");
                assert_eq!(&got, b"hello world");
                let mut got = [0u8; 6];
                client.read_exact(&mut got).unwrap();
                assert_eq!(&got, b"banner");
                // Nothing duplicated: the next bytes are the next message.
                client.write_all(b"!").unwrap();
                let mut one = [0u8; 1];
                server.read_exact(&mut one).unwrap();
                assert_eq!(&one, b"!");
                client.shutdown(Shutdown::Write).unwrap();
                assert_eq!(server.read(&mut one).unwrap(), 0);
                server.shutdown(Shutdown::Write).unwrap();
                assert_eq!(client.read(&mut one).unwrap(), 0);
            })
            .await
            .unwrap();
            assert_eq!(outcome(s.done).await.end, FlowEnd::Closed);
        })
    })
    .await;
}

/// `from_client`: the client half-closes first while the backend keeps sending; otherwise the
/// reverse.
async fn half_close(engine: Engine, from_client: bool) {
    let s = spliced(&engine, |_, _| {});
    let (closer, mut talker) = if from_client {
        (s.client, s.server)
    } else {
        (s.server, s.client)
    };
    tokio::task::spawn_blocking(move || {
        let total = scaled_bytes(64 << 20);
        let mut closer_r = closer.try_clone().unwrap();
        let closer_reader = std::thread::spawn(move || drain(&mut closer_r).unwrap());
        let mut closer_w = closer;
        let sent = Pattern::new(7).send(&mut closer_w, 3 << 20).unwrap();
        closer_w.shutdown(Shutdown::Write).unwrap();
        // The talker sees everything, then end of stream, and only then sends its bytes.
        let mut talker_r = talker.try_clone().unwrap();
        assert_eq!(drain(&mut talker_r).unwrap(), (3 << 20, sent));
        let sent_back = Pattern::new(8).send(&mut talker, total).unwrap();
        talker.shutdown(Shutdown::Write).unwrap();
        assert_eq!(closer_reader.join().unwrap(), (total, sent_back));
    })
    .await
    .unwrap();
    assert_eq!(outcome(s.done).await.end, FlowEnd::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_fin_while_backend_sends_loses_nothing() {
    for_each_mode(|engine| tokio::spawn(half_close(engine, true))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_fin_while_client_sends_loses_nothing() {
    for_each_mode(|engine| tokio::spawn(half_close(engine, false))).await;
}

async fn reset(engine: Engine, from_client: bool) {
    let s = spliced(&engine, |_, _| {});
    let (resetter, mut victim) = if from_client {
        (s.client, s.server)
    } else {
        (s.server, s.client)
    };
    tokio::task::spawn_blocking(move || {
        let mut r = resetter;
        r.write_all(b"last words").unwrap();
        let mut got = [0u8; 10];
        victim
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        victim.read_exact(&mut got).unwrap();
        socket2::SockRef::from(&r)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(r);
        let mut buf = [0u8; 16];
        let err = victim
            .read(&mut buf)
            .expect_err("a reset, not end of stream");
        assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    })
    .await
    .unwrap();
    let expected = if from_client {
        FlowEnd::ClientReset
    } else {
        FlowEnd::BackendReset
    };
    assert_eq!(outcome(s.done).await.end, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_reaches_backend_as_reset() {
    for_each_mode(|engine| tokio::spawn(reset(engine, true))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_reset_reaches_client_as_reset() {
    for_each_mode(|engine| tokio::spawn(reset(engine, false))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_resets_live_flows_and_empties_the_maps() {
    for_each_mode(|engine| {
        tokio::spawn(async move {
            let s = spliced(&engine, |_, _| {});
            let (mut client, mut server) = (s.client, s.server);
            let (client, server) = tokio::task::spawn_blocking(move || {
                client.write_all(b"ping").unwrap();
                let mut got = [0u8; 4];
                server
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                server.read_exact(&mut got).unwrap();
                (client, server)
            })
            .await
            .unwrap();
            engine.shutdown(Duration::from_millis(100)).await;
            assert_eq!(outcome(s.done).await.end, FlowEnd::Shutdown);
            tokio::task::spawn_blocking(move || {
                for mut peer in [client, server] {
                    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let err = peer.read(&mut [0u8; 4]).expect_err("reset on shutdown");
                    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
                }
            })
            .await
            .unwrap();
            assert_eq!(engine.map_occupancy().unwrap_or((0, 0)), (0, 0));
            assert_eq!(engine.kernel_dirs_in_use().unwrap_or(0), 0);
        })
    })
    .await;
}

/// Records how the engine reported a flow to its handler.
struct Told(std::sync::mpsc::Sender<&'static str>);

impl EndHandler for Told {
    fn end(self: Box<Self>, _: FlowOutcome) {
        let _ = self.0.send("end");
    }

    fn refused(self: Box<Self>, error: &SpliceError) {
        assert!(matches!(error, SpliceError::ShuttingDown), "{error}");
        let _ = self.0.send("refused");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_refused_after_shutdown_is_reported_to_its_handler_and_leaves_nothing() {
    for_each_mode(|engine| {
        tokio::spawn(async move {
            engine.shutdown(Duration::from_millis(10)).await;
            let front = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let back = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let mut client = std::net::TcpStream::connect(front.local_addr().unwrap()).unwrap();
            let (proxy_client, _) = front.accept().unwrap();
            let proxy_backend = std::net::TcpStream::connect(back.local_addr().unwrap()).unwrap();
            let (_server, _) = back.accept().unwrap();
            let (tx, told) = std::sync::mpsc::channel();
            let spliced = engine.splice(
                OwnedFd::from(proxy_client),
                OwnedFd::from(proxy_backend),
                FlowOptions::default(),
                Some(Box::new(Told(tx))),
            );
            assert!(matches!(spliced, Err(SpliceError::ShuttingDown)));
            // Told once, as refused; the handler is gone afterwards.
            assert_eq!(told.try_iter().collect::<Vec<_>>(), ["refused"]);
            assert_eq!(engine.map_occupancy().unwrap_or((0, 0)), (0, 0));
            assert_eq!(engine.kernel_dirs_in_use().unwrap_or(0), 0);
            // The engine closed the pair: the client sees the end of the stream.
            client
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            assert!(matches!(client.read(&mut [0u8; 1]), Ok(0) | Err(_)));
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_a_silent_flow_and_spares_a_busy_one() {
    for_each_mode(|engine| {
        tokio::spawn(async move {
            let timeout = Duration::from_millis(400);
            let options = FlowOptions {
                idle_timeout: Some(timeout),
                ..FlowOptions::default()
            };
            let idle = spliced_with(&engine, options, |_, _| {});
            let busy = spliced_with(&engine, options, |_, _| {});
            let (mut ic, mut is) = (idle.client, idle.server);
            let (mut bc, mut bs) = (busy.client, busy.server);
            let talk = tokio::task::spawn_blocking(move || {
                for s in [&ic, &is, &bc, &bs] {
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                }
                let mut one = [0u8; 1];
                ic.write_all(b"i").unwrap();
                is.read_exact(&mut one).unwrap();
                // The busy flow trades a byte each way every 100 ms for three timeouts.
                for _ in 0..12 {
                    bc.write_all(b"p").unwrap();
                    bs.read_exact(&mut one).unwrap();
                    bs.write_all(b"q").unwrap();
                    bc.read_exact(&mut one).unwrap();
                    std::thread::sleep(Duration::from_millis(100));
                }
                // By now the silent flow is closed: both ends see end of stream.
                assert_eq!(ic.read(&mut one).unwrap(), 0, "client sees the close");
                assert_eq!(is.read(&mut one).unwrap(), 0, "server sees the close");
                // The busy one still carries bytes, then ends normally.
                bc.write_all(b"!").unwrap();
                bs.read_exact(&mut one).unwrap();
                assert_eq!(&one, b"!");
                bc.shutdown(Shutdown::Write).unwrap();
                assert_eq!(bs.read(&mut one).unwrap(), 0);
                bs.shutdown(Shutdown::Write).unwrap();
                assert_eq!(bc.read(&mut one).unwrap(), 0);
            });
            let idle_end = outcome(idle.done).await;
            assert_eq!(idle_end.end, FlowEnd::IdleTimeout);
            assert!(
                idle_end.duration >= timeout,
                "closed after {:?}, before its {timeout:?} timeout",
                idle_end.duration
            );
            assert!(
                idle_end.duration < Duration::from_millis(1200),
                "closed after {:?}",
                idle_end.duration
            );
            assert_eq!(idle_end.client_to_backend.total(), 1);
            talk.await.unwrap();
            let busy_end = outcome(busy.done).await;
            assert_eq!(busy_end.end, FlowEnd::Closed);
            assert_eq!(busy_end.client_to_backend.total(), 13);
            assert_eq!(busy_end.backend_to_client.total(), 12);
        })
    })
    .await;
}
