//! Live changes with real flows: long-running flows through the real daemon — a passthrough
//! flow spliced in the kernel and a terminated one relayed through rustls — stay byte-exact in
//! both directions while their ingress's rules are replaced, another ingress comes and goes,
//! and their own ingress is deleted (its listener closes; the flows run on to completion).
use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use ingress_tests::{
    ApiClient,
    echo::EchoServer,
    pki::Pki,
    tls::{client_hello, tls_connect},
};
use serde_json::{Value, json};

use crate::common::{certificate, create_ingress, instance, kernel_daemon, rule};

const CHUNK: usize = 16 * 1024;

/// Chunk `seq` of a flow tagged `tag`: every chunk differs, so a lost, repeated or reordered
/// chunk does not compare equal.
fn chunk(tag: u64, seq: u64) -> Vec<u8> {
    let mut x = ((tag << 32) | seq).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..CHUNK)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A flow that sends chunks and checks each one comes back unchanged, until told to stop.
struct Flow {
    name: &'static str,
    progress: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<u64>,
}

impl Flow {
    /// Runs the ping-pong on `stream`; `finish` ends the flow once stopped.
    fn start<S: Read + Write + Send + 'static>(
        name: &'static str,
        tag: u64,
        mut stream: S,
        finish: impl FnOnce(S) + Send + 'static,
    ) -> Self {
        let progress = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (progress, stop) = (progress.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut back = vec![0_u8; CHUNK];
                let mut seq = 0;
                while !stop.load(Ordering::SeqCst) {
                    let sent = chunk(tag, seq);
                    stream.write_all(&sent).unwrap_or_else(|e| {
                        panic!("{name}: writing chunk {seq}: {e}");
                    });
                    stream.read_exact(&mut back).unwrap_or_else(|e| {
                        panic!("{name}: reading chunk {seq} back: {e}");
                    });
                    assert!(back == sent, "{name}: chunk {seq} came back altered");
                    seq += 1;
                    progress.store(seq, Ordering::SeqCst);
                }
                finish(stream);
                seq
            })
        };
        Self {
            name,
            progress,
            stop,
            thread,
        }
    }

    /// Waits until the flow has moved `chunks` more chunks each way.
    fn advance(&self, chunks: u64, after: &str) {
        let at = self.progress.load(Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.progress.load(Ordering::SeqCst) < at + chunks {
            assert!(
                !self.thread.is_finished(),
                "{}: the flow ended {after}",
                self.name
            );
            assert!(
                Instant::now() < deadline,
                "{}: the flow stalled {after}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Bytes confirmed each way so far.
    fn confirmed_bytes(&self) -> u64 {
        self.progress.load(Ordering::SeqCst) * CHUNK as u64
    }

    /// Stops the flow, lets it finish, and returns the chunks it moved.
    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.join() {
            Ok(chunks) => chunks,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

/// A passthrough flow: a ClientHello for `sni` (echoed back by the backend like any byte),
/// then chunks; it ends with a FIN and waits for the backend's.
fn passthrough_flow(addr: SocketAddr, sni: &str) -> (Flow, SocketAddr) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let local = stream.local_addr().unwrap();
    let hello = client_hello(sni, &[]).unwrap();
    stream.write_all(&hello).unwrap();
    let mut back = vec![0_u8; hello.len()];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(back, hello, "the ClientHello came back through the echo");
    let flow = Flow::start("passthrough", 1, stream, |stream| {
        stream.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        (&stream).read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{} bytes after the last chunk", rest.len());
    });
    (flow, local)
}

/// A terminated flow: TLS with the daemon for `sni`, plaintext chunks echoed by the backend;
/// it ends with close_notify and a FIN.
fn terminated_flow(addr: SocketAddr, sni: &str, pki: &Pki) -> (Flow, SocketAddr) {
    let stream = tls_connect(addr, sni, pki.client_config(&[]).unwrap()).unwrap();
    let local = stream.sock.local_addr().unwrap();
    let flow = Flow::start("terminate", 2, stream, |mut stream| {
        stream.conn.send_close_notify();
        stream.flush().unwrap();
        stream.sock.shutdown(Shutdown::Write).unwrap();
    });
    (flow, local)
}

/// The `/flows` entry of the flow whose client is `client` (an IPv4 client of the dual-stack
/// listener is shown as IPv4, not IPv4-mapped).
fn flow_entry(api: &ApiClient, client: SocketAddr) -> Value {
    let flows = api.get("/flows?limit=1000").unwrap();
    let flows = flows.assert_status(200)["flows"]
        .as_array()
        .unwrap()
        .clone();
    flows
        .iter()
        .find(|f| f["client"] == json!(client.to_string()))
        .cloned()
        .unwrap_or_else(|| panic!("no live flow from {client} in {flows:?}"))
}

/// Whether a connection to `addr` is refused (nothing listens there).
fn refused(addr: SocketAddr) -> bool {
    matches!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused
    )
}

/// Whether a new passthrough connection for `sni` to `addr` is routed to the echo server.
fn routed(addr: SocketAddr, sni: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let hello = client_hello(sni, &[]).unwrap();
    let mut back = vec![0_u8; hello.len()];
    s.write_all(&hello).is_ok() && s.read_exact(&mut back).is_ok() && back == hello
}

#[test]
fn established_flows_survive_rule_changes_other_ingresses_and_their_own_deletion() {
    // Kernel path from the first byte (no userspace first phase), so the kernel/relay split
    // checked below is exact.
    let Some(mut daemon) = kernel_daemon(&[("INGRESSD_RELAY_FIRST_MS", "0")]) else {
        return;
    };
    let api = daemon.api().unwrap();
    let echo = EchoServer::start(Ipv4Addr::LOCALHOST).unwrap();
    let echo_port = echo.addr().port();
    instance(&api, "echo", Ipv4Addr::LOCALHOST);
    let pki = Pki::new().unwrap();
    certificate(&api, &pki, "live", &["*.live.test"]);
    let rules = |pass: &str, term: &str| {
        json!([
            rule(pass, "echo", echo_port, "passthrough"),
            rule(term, "echo", echo_port, "terminate"),
        ])
    };
    let x = create_ingress(&api, "x", rules("p.live.test", "t.live.test"), None);
    let x_port = x.port.port();

    let (pass, pass_client) = passthrough_flow(x.addr(), "p.live.test");
    let (term, term_client) = terminated_flow(x.addr(), "t.live.test", &pki);
    let advance = |after: &str| {
        pass.advance(200, after);
        term.advance(200, after);
    };
    advance("at the start");
    assert_eq!(flow_entry(&api, pass_client)["path"], json!("sockmap"));
    assert_eq!(flow_entry(&api, term_client)["path"], json!("userspace"));

    // New rules on the same port: new connections follow them, established flows go on.
    let replaced = json!({"name": "x", "listen_port": x_port,
        "rules": rules("p2.live.test", "t2.live.test")});
    api.replace_ingress("x", &replaced)
        .unwrap()
        .assert_status(200);
    assert!(
        !routed(x.addr(), "p.live.test"),
        "the old rule still routes"
    );
    assert!(
        routed(x.addr(), "p2.live.test"),
        "the new rule does not route"
    );
    advance("after its rules were replaced");

    // Another ingress comes, carries a connection, and goes.
    let y = create_ingress(
        &api,
        "y",
        json!([rule("y.live.test", "echo", echo_port, "passthrough")]),
        None,
    );
    assert!(routed(y.addr(), "y.live.test"));
    advance("after another ingress was created");
    api.delete_ingress("y").unwrap().assert_status(204);
    assert!(refused(y.addr()), "the other ingress's listener is closed");
    advance("after another ingress was deleted");

    // Their own ingress goes: its listener closes, the flows do not.
    api.delete_ingress("x").unwrap().assert_status(204);
    assert!(
        refused(x.addr()),
        "the deleted ingress's listener is closed"
    );
    advance("after their own ingress was deleted");

    // The passthrough flow's chunks went through the kernel (the relay may at most have moved
    // bytes from before the hand-off, such as the ClientHello).
    let confirmed = pass.confirmed_bytes();
    let entry = flow_entry(&api, pass_client);
    assert_eq!(entry["path"], json!("sockmap"), "{entry}");
    for direction in ["client_to_backend", "backend_to_client"] {
        let kernel = entry[direction]["kernel"].as_u64().unwrap();
        let relayed = entry[direction]["relayed"].as_u64().unwrap();
        assert!(
            kernel >= confirmed && relayed < CHUNK as u64,
            "{direction}: kernel {kernel}, relayed {relayed}, confirmed {confirmed}"
        );
    }

    let (pass_chunks, term_chunks) = (pass.finish(), term.finish());
    assert!(
        pass_chunks >= 1000 && term_chunks >= 1000,
        "{pass_chunks} and {term_chunks} chunks"
    );
    assert!(daemon.stop().unwrap().success());
}
