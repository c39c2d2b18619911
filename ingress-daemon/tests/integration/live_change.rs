//! How a replace reaches the data path: the routing table is swapped in place for readers, and
//! a new port gets a new listener while the old one is told to close. (Established flows
//! through the real daemon across such changes: the end-to-end `live_change` tests.)
use std::sync::Arc;

use ingress_daemon::listeners::{ConnectionHandler, IngressHandle};
use serde_json::json;

use crate::common::{ForwardHandler, Server, TempDir, free_port, test_config};

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
