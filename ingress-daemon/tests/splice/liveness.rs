//! A peer that silently disappears does not hold the flow's descriptors forever: keepalive and
//! `TCP_USER_TIMEOUT` end the flow and the other side is reset.

use std::{
    io::{ErrorKind, Read, Write},
    os::fd::OwnedFd,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use ingress_daemon::{
    splice::{FlowEnd, FlowOptions, Offload},
    sys::Liveness,
};

use crate::support::{engine, outcome};

/// A network namespace with a veth pair: `10.213.<n>.1/30` here, `.2` inside.
struct Netns {
    name: String,
    host_if: String,
    ns_if: String,
    server: Option<Child>,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

impl Netns {
    fn create(n: u8) -> Option<Self> {
        let pid = std::process::id();
        let name = format!("ingt-{pid}-{n}");
        let host_if = format!("ih{}{n}", pid % 100_000);
        let ns_if = format!("in{}{n}", pid % 100_000);
        let ns = Self {
            name: name.clone(),
            host_if: host_if.clone(),
            ns_if: ns_if.clone(),
            server: None,
        };
        let host_addr = format!("10.213.{n}.1/30");
        let ns_addr = format!("10.213.{n}.2/30");
        let ok = ip(&["netns", "add", &name])
            && ip(&[
                "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
            ])
            && ip(&["link", "set", &ns_if, "netns", &name])
            && ip(&["addr", "add", &host_addr, "dev", &host_if])
            && ip(&["link", "set", &host_if, "up"])
            && ip(&[
                "netns", "exec", &name, "ip", "addr", "add", &ns_addr, "dev", &ns_if,
            ])
            && ip(&["netns", "exec", &name, "ip", "link", "set", &ns_if, "up"])
            && ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        ok.then_some(ns)
    }

    /// Starts a TCP server inside that accepts one connection and reads it forever.
    fn start_sink(&mut self, addr: &str, port: u16) {
        let script = format!(
            "import socket,time\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
             s.bind(('{addr}',{port}));s.listen()\nc,_=s.accept()\nwhile c.recv(65536): pass\ntime.sleep(60)\n"
        );
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name, "python3", "-c", &script])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        self.server = Some(child);
    }

    fn link_down(&self) {
        assert!(ip(&[
            "netns",
            "exec",
            &self.name,
            "ip",
            "link",
            "set",
            &self.ns_if,
            "down"
        ]));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(mut child) = self.server.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn connect_with_retry(addr: &str) -> std::net::TcpStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match std::net::TcpStream::connect(addr) {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("cannot reach the namespace server: {e}"),
        }
    }
}

async fn dead_backend(n: u8, send_while_dead: bool) {
    let Some(engine) = engine(Offload::Required, |c| {
        c.liveness = Some(Liveness {
            keepalive_idle: Duration::from_secs(1),
            keepalive_interval: Duration::from_secs(1),
            keepalive_probes: 2,
            user_timeout: Duration::from_secs(3),
        });
    }) else {
        return;
    };
    let Some(mut ns) = Netns::create(n) else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "cannot create a network namespace"
        );
        eprintln!("skipped: cannot create a network namespace");
        return;
    };
    let backend_addr = format!("10.213.{n}.2");
    ns.start_sink(&backend_addr, 7000);
    let front = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = std::net::TcpStream::connect(front.local_addr().unwrap()).unwrap();
    let (proxy_client, _) = front.accept().unwrap();
    let proxy_backend = connect_with_retry(&format!("{backend_addr}:7000"));
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
    client.write_all(b"before the link goes down").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    ns.link_down();
    if send_while_dead {
        client.write_all(b"into the void").unwrap();
    }
    let started = Instant::now();
    let mut client_r = client.try_clone().unwrap();
    let err = tokio::task::spawn_blocking(move || {
        client_r
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut buf = [0u8; 16];
        client_r.read(&mut buf).expect_err("the client is reset")
    })
    .await
    .unwrap();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    let out = outcome(done).await;
    eprintln!(
        "dead backend detected after {:?}: {:?}",
        started.elapsed(),
        out.end
    );
    assert_eq!(out.end, FlowEnd::BackendTimeout);
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(engine.map_occupancy().unwrap_or((0, 0)), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_backend_with_unacked_data_ends_by_user_timeout() {
    dead_backend(1, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_idle_backend_ends_by_keepalive() {
    dead_backend(2, false).await;
}
