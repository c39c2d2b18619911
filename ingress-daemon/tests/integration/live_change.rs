//! A long-running flow keeps flowing, byte-exact, while rules are replaced, another ingress is
//! created and deleted, and its own ingress is deleted.
use std::io::{Read as _, Write as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;

use crate::common::{Server, TempDir, accepts, echo_server, free_port, test_config, wait_for};

const CHUNK: usize = 16 * 1024;

fn pattern(seq: u64) -> Vec<u8> {
    (0..CHUNK)
        .map(|i| (seq.wrapping_mul(31).wrapping_add(i as u64) % 251) as u8)
        .collect()
}

#[test]
fn established_flow_survives_every_kind_of_change() {
    let dir = TempDir::new("live");
    let s = Server::start(test_config(dir.path()));
    let echo = echo_server();
    assert_eq!(
        s.req(
            "PUT",
            "/instances/echo",
            Some(json!({"address": "127.0.0.1"}))
        )
        .status,
        201
    );
    let port = free_port();
    let spec = |sni: &str| {
        json!({"name": "x", "listen_port": port,
            "rules": [{"match": {"sni": sni}, "target": {"instance": "echo", "port": echo}, "mode": "passthrough"}],
            "default_target": {"instance": "echo", "port": echo}})
    };
    assert_eq!(
        s.req("POST", "/tcp-ingresses", Some(spec("a.example.com")))
            .status,
        201
    );

    let progress = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicU64::new(0));
    let flow = {
        let (progress, stop) = (progress.clone(), stop.clone());
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        std::thread::spawn(move || {
            let mut seq = 0u64;
            let mut back = vec![0u8; CHUNK];
            while stop.load(Ordering::SeqCst) == 0 {
                let sent = pattern(seq);
                conn.write_all(&sent).unwrap();
                conn.read_exact(&mut back).unwrap();
                assert_eq!(back, sent, "chunk {seq} came back altered");
                seq += 1;
                progress.store(seq, Ordering::SeqCst);
            }
            seq
        })
    };
    let advance = |what: &str| {
        let at = progress.load(Ordering::SeqCst);
        wait_for(what, Duration::from_secs(10), || {
            (progress.load(Ordering::SeqCst) > at + 20).then_some(())
        });
    };
    advance("the flow to start");

    // Replace the rules (same port): the table swaps, the listener and the flow stay.
    assert_eq!(
        s.req("PUT", "/tcp-ingresses/x", Some(spec("b.example.com")))
            .status,
        200
    );
    advance("the flow after a rule change");
    assert!(accepts(port));

    // Another ingress comes and goes.
    let other = free_port();
    let y = json!({"name": "y", "listen_port": other, "default_target": {"instance": "echo", "port": echo}});
    assert_eq!(s.req("POST", "/tcp-ingresses", Some(y)).status, 201);
    advance("the flow after creating another ingress");
    assert_eq!(s.req("DELETE", "/tcp-ingresses/y", None).status, 204);
    advance("the flow after deleting another ingress");

    // The flow's own ingress goes: no new connections, the established one continues.
    assert_eq!(s.req("DELETE", "/tcp-ingresses/x", None).status, 204);
    assert!(!accepts(port));
    advance("the flow after deleting its ingress");

    stop.store(1, Ordering::SeqCst);
    let chunks = flow.join().unwrap();
    assert!(chunks > 100, "only {chunks} chunks went through");
}
