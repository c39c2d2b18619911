//! A long-running flow keeps flowing, byte-exact, while rules are replaced, another ingress is
//! created and deleted, and its own ingress is deleted.
use std::io::{Read as _, Write as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ingress_daemon::listeners::{ConnectionHandler, IngressHandle};
use serde_json::json;

use crate::common::{
    ForwardHandler, Server, TempDir, accepts, echo_server, free_port, test_config, wait_for,
};

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

/// Keeps every handle it is given, so the test can read the tables the data path reads.
type Handles = Arc<std::sync::Mutex<Vec<Arc<IngressHandle>>>>;

struct Capture(Handles, ForwardHandler);

impl ConnectionHandler for Capture {
    fn serve(
        &self,
        ingress: Arc<IngressHandle>,
        listener: tokio::net::TcpListener,
    ) -> tokio::task::JoinHandle<()> {
        self.0.lock().unwrap().push(ingress.clone());
        self.1.serve(ingress, listener)
    }
}

#[test]
fn replacing_rules_swaps_the_table_without_disturbing_readers() {
    let dir = TempDir::new("swap");
    let config = test_config(dir.path());
    let mut capture = None;
    let s = Server::start_with(config, None, |shared| {
        let handles = Handles::default();
        capture = Some(handles.clone());
        Arc::new(Capture(
            handles,
            ForwardHandler {
                instances: shared.instances.clone(),
            },
        ))
    });
    let capture = capture.unwrap();
    s.req(
        "PUT",
        "/instances/db",
        Some(json!({"address": "127.0.0.1"})),
    );
    let port = free_port();
    let spec = |sni: &str, target: u16| {
        json!({"name": "x", "listen_port": port, "rules": [
            {"match": {"sni": sni}, "target": {"instance": "db", "port": target}, "mode": "passthrough"}]})
    };
    assert_eq!(
        s.req("POST", "/tcp-ingresses", Some(spec("a.example.com", 1)))
            .status,
        201
    );
    let handle = capture.lock().unwrap()[0].clone();
    let before = handle.routes.load_full();
    assert_eq!(before.lookup(Some("a.example.com")).unwrap().port, 1);

    assert_eq!(
        s.req("PUT", "/tcp-ingresses/x", Some(spec("{h}.example.com", 2)))
            .status,
        200
    );
    // Same listener (no rebind), new table; a reader holding the old table still sees it whole.
    assert_eq!(capture.lock().unwrap().len(), 1);
    let after = handle.routes.load();
    assert_eq!(after.lookup(Some("a.example.com")).unwrap().port, 2);
    assert_eq!(after.lookup(Some("b.example.com")).unwrap().instance, "db");
    assert_eq!(before.lookup(Some("a.example.com")).unwrap().port, 1);
    assert!(before.lookup(Some("b.example.com")).is_none());
    assert!(!handle.is_closed());

    // A new port rebinds: a second handle, and the first one is told to close.
    let port2 = free_port();
    let mut moved = spec("{h}.example.com", 3);
    moved["listen_port"] = json!(port2);
    assert_eq!(s.req("PUT", "/tcp-ingresses/x", Some(moved)).status, 200);
    let handles = capture.lock().unwrap().clone();
    assert_eq!(handles.len(), 2);
    assert!(handles[0].is_closed());
    assert_eq!(handles[1].local_addr.port(), port2);
    assert_eq!(
        handles[1]
            .routes
            .load()
            .lookup(Some("q.example.com"))
            .unwrap()
            .port,
        3
    );
}
