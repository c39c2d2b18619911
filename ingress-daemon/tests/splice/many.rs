//! Many concurrent flows of mixed sizes; afterwards nothing is left behind.

use std::{net::TcpListener, os::fd::OwnedFd, time::Duration};

use ingress_daemon::splice::{Engine, FlowEnd, FlowOptions, Offload};
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::support::{engine, open_fds, scaled_count, serial};

fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn size(i: u64) -> usize {
    // Mostly small, some empty, a few of several MiB.
    match i % 10 {
        0 => 0,
        1..=6 => (i as usize * 7919) % (64 << 10),
        7 | 8 => (i as usize * 104_729) % (512 << 10),
        _ => (2 << 20) + (i as usize % 3) * (1 << 20),
    }
}

/// Writes `data` and reads the peer's bytes to end of stream, concurrently; returns the
/// digest of what was read.
async fn exchange(stream: TcpStream, data: Vec<u8>) -> (usize, [u8; 32]) {
    let (mut r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    r.read_to_end(&mut got).await.unwrap();
    writer.await.unwrap();
    (got.len(), Sha256::digest(&got).into())
}

async fn thousand_flows(engine: Engine) {
    let flows = scaled_count(1000);
    let front = TcpListener::bind("127.0.0.1:0").unwrap();
    let back = TcpListener::bind("127.0.0.1:0").unwrap();
    let baseline = open_fds();
    let mut tasks = Vec::new();
    for i in 0..flows {
        let client = std::net::TcpStream::connect(front.local_addr().unwrap()).unwrap();
        let (proxy_client, _) = front.accept().unwrap();
        let proxy_backend = std::net::TcpStream::connect(back.local_addr().unwrap()).unwrap();
        let (server, _) = back.accept().unwrap();
        let (tx, done) = tokio::sync::oneshot::channel();
        engine
            .splice(
                OwnedFd::from(proxy_client),
                OwnedFd::from(proxy_backend),
                FlowOptions::default(),
                Some(Box::new(move |o: ingress_daemon::splice::FlowOutcome| {
                    let _ = tx.send(o);
                })),
            )
            .unwrap();
        client.set_nonblocking(true).unwrap();
        server.set_nonblocking(true).unwrap();
        let client = TcpStream::from_std(client).unwrap();
        let server = TcpStream::from_std(server).unwrap();
        let (up, down) = (payload(i, size(i)), payload(i + flows, size(i * 3 + 1)));
        let (up_digest, down_digest): ([u8; 32], [u8; 32]) =
            (Sha256::digest(&up).into(), Sha256::digest(&down).into());
        let (up_len, down_len) = (up.len(), down.len());
        tasks.push(tokio::spawn(async move {
            let (at_server, at_client) = tokio::join!(exchange(server, down), exchange(client, up));
            assert_eq!(
                at_server,
                (up_len, up_digest),
                "flow {i}: client → backend differs"
            );
            assert_eq!(
                at_client,
                (down_len, down_digest),
                "flow {i}: backend → client differs"
            );
            let out = tokio::time::timeout(Duration::from_secs(60), done)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(out.end, FlowEnd::Closed, "flow {i}");
            (up_len + down_len) as u64
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    eprintln!("{flows} flows, {} MiB in all", total >> 20);
    assert_eq!(
        engine.map_occupancy().unwrap_or((0, 0)),
        (0, 0),
        "maps are empty"
    );
    assert_eq!(engine.kernel_dirs_in_use().unwrap_or(0), 0);
    assert_eq!(engine.stats().active(engine.path()), 0);
    // Every socket the flows used is closed.
    assert_eq!(open_fds(), baseline, "descriptors leaked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_thousand_concurrent_flows_kernel_path() {
    let _serial = serial();
    if let Some(engine) = engine(Offload::Required, |_| {}) {
        thousand_flows(engine).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_thousand_concurrent_flows_userspace_relay() {
    let _serial = serial();
    if let Some(engine) = engine(Offload::Off, |_| {}) {
        thousand_flows(engine).await;
    }
}
