//! Routing by SNI with real clients: `curl` and `openssl s_client` through passthrough and
//! terminate rules to servers on loopback addresses.

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use ingress_tests::{
    pki::Pki,
    ports::{PortLease, next_loopback},
    tls::OpensslServer,
    tools,
    workdir::WorkDir,
};

use crate::common::{
    backend_to_client_by_path, certificate, create_ingress, http_backend, instance, kernel_daemon,
    rule, run,
};

fn curl(ingress: SocketAddr, host: &str, ca: &std::path::Path) -> String {
    let mut cmd = Command::new(tools::find("curl").unwrap());
    cmd.args(["-sS", "--fail", "--max-time", "20", "--resolve"])
        .arg(format!("{host}:{}:{}", ingress.port(), ingress.ip()))
        .arg("--cacert")
        .arg(ca)
        .arg(format!("https://{host}:{}/", ingress.port()));
    run(&mut cmd)
}

/// `openssl s_client` to `ingress` with `sni`, verifying the chain against `ca`; returns the
/// subject line of the certificate the server presented.
fn s_client_subject(ingress: SocketAddr, sni: &str, ca: &std::path::Path) -> String {
    let mut cmd = Command::new(tools::find("openssl").unwrap());
    cmd.args(["s_client", "-brief", "-verify_return_error", "-connect"])
        .arg(ingress.to_string())
        .args(["-servername", sni, "-verify_hostname", sni, "-CAfile"])
        .arg(ca)
        .stdin(std::process::Stdio::null());
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "s_client to {sni} failed: {text}");
    assert!(text.contains("Verification: OK"), "{text}");
    text.lines()
        .find(|l| l.starts_with("Peer certificate:"))
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn passthrough_pattern_routes_each_server_name_to_its_instance() {
    let Some(daemon) = kernel_daemon(&[]) else {
        return;
    };
    let api = daemon.api().unwrap();
    let work = WorkDir::new("ingt-routing-").unwrap();
    let pki = Pki::new().unwrap();
    let ca = pki.write_ca(work.path()).unwrap();
    // Two servers on one port of two addresses: one pattern rule reaches both.
    let port = PortLease::new().unwrap();
    let mut servers = Vec::new();
    for name in ["a", "b"] {
        let ip = next_loopback();
        let host = format!("{name}.example.test");
        let files = pki
            .issue(&[host.as_str()])
            .unwrap()
            .write(work.path(), name)
            .unwrap();
        let log = work.join(&format!("{name}.log"));
        let addr = SocketAddr::from((ip, port.port()));
        servers.push(OpensslServer::start_at(addr, &files, &["-www"], &log).unwrap());
        instance(&api, name, ip);
    }
    let ingress = create_ingress(
        &api,
        "web",
        serde_json::json!([rule(
            "{instance}.example.test",
            "{instance}",
            port.port(),
            "passthrough"
        )]),
        None,
    );
    for name in ["a", "b"] {
        let host = format!("{name}.example.test");
        // curl verifies the certificate for `host`: only that instance's server has it.
        let page = curl(ingress.addr(), &host, &ca);
        assert!(page.contains("s_server"), "{page}");
        let subject = s_client_subject(ingress.addr(), &host, &ca);
        assert!(
            subject.contains(&format!("CN={host}")) || subject.contains(&format!("CN = {host}")),
            "{subject}"
        );
    }
}

#[test]
fn terminate_rule_serves_a_plaintext_backend_to_curl() {
    let Some(daemon) = kernel_daemon(&[]) else {
        return;
    };
    let api = daemon.api().unwrap();
    let work = WorkDir::new("ingt-terminate-").unwrap();
    let pki = Pki::new().unwrap();
    let ca = pki.write_ca(work.path()).unwrap();
    certificate(&api, &pki, "wildcard", &["*.example.test"]);
    let ip = next_loopback();
    let backend = http_backend(ip, "hello from the plaintext backend");
    instance(&api, "web1", ip);
    let ingress = create_ingress(
        &api,
        "term",
        serde_json::json!([rule(
            "web1.example.test",
            "web1",
            backend.port(),
            "terminate"
        )]),
        None,
    );
    let page = curl(ingress.addr(), "web1.example.test", &ca);
    assert_eq!(page, "hello from the plaintext backend");
}

/// A reply larger than every buffer on its way, to a client that reads it only after a pause,
/// while the backend keeps the connection open and sends nothing more: the relay holds what the
/// client's socket cannot take, and the last bytes arrive without waiting for more input.
#[test]
fn terminated_flow_delivers_a_large_reply_to_a_late_reader_while_the_backend_waits() {
    use std::io::{Read as _, Write as _};
    const REPLY: usize = 8 << 20;
    let Some(daemon) = kernel_daemon(&[]) else {
        return;
    };
    let api = daemon.api().unwrap();
    let work = WorkDir::new("ingt-late-reader-").unwrap();
    let pki = Pki::new().unwrap();
    let ca = pki.write_ca(work.path()).unwrap();
    certificate(&api, &pki, "late", &["late.example.test"]);
    let ip = next_loopback();
    let listener = std::net::TcpListener::bind((ip, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let reply: Vec<u8> = (0..REPLY).map(|i| (i % 251) as u8).collect();
    let sent = reply.clone();
    let backend = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.write_all(&sent).unwrap();
        // Hold the connection open, silent, until the client hangs up.
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
    });
    instance(&api, "late", ip);
    let ingress = create_ingress(
        &api,
        "late",
        serde_json::json!([rule("late.example.test", "late", port, "terminate")]),
        None,
    );
    let mut client = Command::new(tools::find("openssl").unwrap())
        .args(["s_client", "-quiet", "-verify_return_error", "-connect"])
        .arg(ingress.addr().to_string())
        .args(["-servername", "late.example.test", "-CAfile"])
        .arg(&ca)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = client.stdout.take().unwrap();
    // Every buffer from the backend to this pipe fills up before anything is read.
    std::thread::sleep(Duration::from_secs(1));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut got = vec![0u8; REPLY];
        let mut n = 0;
        while n < REPLY {
            match out.read(&mut got[n..]) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
        }
        got.truncate(n);
        let _ = tx.send(got);
    });
    let got = rx.recv_timeout(Duration::from_secs(20));
    let _ = client.kill();
    let _ = client.wait();
    let got = got.expect("the reply did not arrive whole within 20 s");
    assert_eq!(got.len(), REPLY, "reply cut short");
    assert!(got == reply, "reply corrupted");
    backend.join().unwrap();
}

/// An `openssl s_client` that completes its handshake and then sends nothing; returns how long
/// it lived (it exits when the connection is closed), or `None` if it outlived `limit`.
fn silent_client_lifetime(
    ingress: SocketAddr,
    sni: &str,
    ca: &std::path::Path,
    limit: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    let mut child = Command::new(tools::find("openssl").unwrap())
        .args(["s_client", "-quiet", "-verify_return_error", "-connect"])
        .arg(ingress.to_string())
        .args(["-servername", sni, "-verify_hostname", sni, "-CAfile"])
        .arg(ca)
        // stdin stays open and silent: the connection is idle after the handshake.
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lived = loop {
        if child.try_wait().unwrap().is_some() {
            break Some(started.elapsed());
        }
        if started.elapsed() > limit {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    lived
}

#[test]
fn idle_timeout_closes_silent_connections_in_both_modes() {
    let Some(daemon) = kernel_daemon(&[]) else {
        return;
    };
    let api = daemon.api().unwrap();
    let work = WorkDir::new("ingt-idle-").unwrap();
    let pki = Pki::new().unwrap();
    let ca = pki.write_ca(work.path()).unwrap();
    certificate(&api, &pki, "wildcard", &["term.example.test"]);
    // Passthrough to an openssl server, terminate to a plaintext one.
    let ip = next_loopback();
    let port = PortLease::new().unwrap();
    let files = pki
        .issue(&["pass.example.test"])
        .unwrap()
        .write(work.path(), "pass")
        .unwrap();
    let _server = OpensslServer::start_at(
        SocketAddr::from((ip, port.port())),
        &files,
        &["-www"],
        &work.join("pass.log"),
    )
    .unwrap();
    let plain = http_backend(ip, "unused");
    instance(&api, "vm", ip);
    let listen = PortLease::new().unwrap();
    let body = serde_json::json!({
        "name": "idle",
        "listen_port": listen.port(),
        "idle_timeout_secs": 1,
        "rules": [
            rule("pass.example.test", "vm", port.port(), "passthrough"),
            rule("term.example.test", "vm", plain.port(), "terminate"),
        ],
    });
    let created = api.create_ingress(&body).unwrap();
    assert_eq!(created.assert_status(201)["idle_timeout_secs"], 1);
    let addr = SocketAddr::from(([127, 0, 0, 1], listen.port()));
    for sni in ["pass.example.test", "term.example.test"] {
        let lived = silent_client_lifetime(addr, sni, &ca, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{sni}: an idle connection outlived its 1 s timeout by 9 s"));
        assert!(
            lived >= Duration::from_secs(1),
            "{sni}: closed after {lived:?}, before the timeout"
        );
    }
    // Out-of-range timeouts are refused with the field named.
    let mut bad = body.clone();
    bad["name"] = serde_json::json!("idle2");
    bad["idle_timeout_secs"] = serde_json::json!(0);
    let refused = api.create_ingress(&bad).unwrap();
    refused.assert_status(400);
    assert!(
        refused.text.contains("idle_timeout_secs"),
        "{}",
        refused.text
    );
}

#[test]
fn curl_downloads_a_bulk_file_through_the_kernel_path_byte_exact() {
    use sha2::{Digest, Sha256};
    let Some(daemon) = kernel_daemon(&[]) else {
        return;
    };
    let api = daemon.api().unwrap();
    let work = WorkDir::new("ingt-bulk-").unwrap();
    let pki = Pki::new().unwrap();
    let ca = pki.write_ca(work.path()).unwrap();
    // 64 MiB of a pseudo-random pattern, served by `openssl s_server -WWW` on instance `bulk`.
    let size = 64usize << 20;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let body: Vec<u8> = (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(work.join("big.bin"), &body).unwrap();
    let want: [u8; 32] = Sha256::digest(&body).into();
    drop(body);
    let ip = next_loopback();
    let port = PortLease::new().unwrap();
    let files = pki
        .issue(&["bulk.example.test"])
        .unwrap()
        .write(work.path(), "bulk")
        .unwrap();
    let _server = OpensslServer::start_at(
        SocketAddr::from((ip, port.port())),
        &files,
        &["-WWW"],
        &work.join("bulk.log"),
    )
    .unwrap();
    instance(&api, "bulk", ip);
    let ingress = create_ingress(
        &api,
        "bulk",
        serde_json::json!([rule(
            "bulk.example.test",
            "bulk",
            port.port(),
            "passthrough"
        )]),
        None,
    );
    let out = work.join("got.bin");
    let mut cmd = Command::new(tools::find("curl").unwrap());
    cmd.args(["-sS", "--fail", "--max-time", "120", "--resolve"])
        .arg(format!(
            "bulk.example.test:{}:127.0.0.1",
            ingress.addr().port()
        ))
        .arg("--cacert")
        .arg(&ca)
        .arg("-o")
        .arg(&out)
        .arg(format!(
            "https://bulk.example.test:{}/big.bin",
            ingress.addr().port()
        ));
    run(&mut cmd);
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got.len(), size, "curl got the whole file");
    let digest: [u8; 32] = Sha256::digest(&got).into();
    assert_eq!(digest, want, "the file arrived byte-exact");
    // The flow is counted when it ends: wait for it, then check the kernel carried it.
    let (kernel, relayed) = backend_to_client_by_path(&api, "bulk", size as f64);
    assert!(
        kernel + relayed >= size as f64,
        "backend → client bytes counted: kernel {kernel}, relay {relayed}"
    );
    assert!(
        kernel >= 0.99 * (kernel + relayed),
        "the kernel path carried {kernel} of {} bytes",
        kernel + relayed
    );
}

/// A reset on one side of a terminated flow reaches the other side as a reset, after bytes
/// that were sent before it and in no other form: the relay reads ahead, so the reset often
/// comes in the same read as the last bytes, and must not turn into a clean end once they are
/// written.
#[test]
fn a_reset_on_either_side_of_a_terminated_flow_reaches_the_other_as_a_reset() {
    use ingress_tests::tcp::abort;
    use std::io::{ErrorKind, Read as _, Write as _};
    const BYTES: usize = 512 << 10;
    let Some(daemon) = kernel_daemon(&[]) else {
        return;
    };
    let api = daemon.api().unwrap();
    let pki = Pki::new().unwrap();
    certificate(&api, &pki, "resets", &["resets.example.test"]);
    let ip = next_loopback();
    let listener = std::net::TcpListener::bind((ip, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    instance(&api, "resets", ip);
    let ingress = create_ingress(
        &api,
        "resets",
        serde_json::json!([rule("resets.example.test", "resets", port, "terminate")]),
        None,
    );
    let config = pki.client_config(&[]).unwrap();
    let data: Vec<u8> = (0..BYTES).map(|i| (i % 241) as u8).collect();
    let ended = |end: &str| {
        crate::common::metric(
            &api,
            "ingressd_flows_ended_total",
            &["ingress=\"resets\"", &format!("end=\"{end}\"")],
        )
    };
    /// Reads until the stream ends; the bytes, and whether it ended with a reset.
    fn read_to_end_or_reset(stream: &mut impl std::io::Read) -> (Vec<u8>, bool) {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => return (got, false),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return (got, true),
                Err(e) => panic!("after {} bytes: {e}", got.len()),
            }
        }
    }

    // The backend sends its bytes and resets at once.
    let sent = data.clone();
    let backend = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut hello = [0u8; 5];
        stream.read_exact(&mut hello).unwrap();
        stream.write_all(&sent).unwrap();
        abort(stream).unwrap();
        listener
    });
    let mut tls =
        ingress_tests::tls::tls_connect(ingress.addr(), "resets.example.test", config.clone())
            .unwrap();
    tls.write_all(b"hello").unwrap();
    tls.flush().unwrap();
    let (got, reset) = read_to_end_or_reset(&mut tls);
    let listener = backend.join().unwrap();
    assert!(
        reset,
        "the client saw a clean end after {} bytes, not a reset",
        got.len()
    );
    assert!(
        data.starts_with(&got),
        "the {} bytes before the reset are not the backend's",
        got.len()
    );
    crate::common::wait_for_count("backend_reset flows", Duration::from_secs(10), 1, || {
        ended("backend_reset") as u64
    });
    assert_eq!(ended("backend_reset"), 1.0);

    // The client sends its bytes and resets at once (after one round trip: a reset before the
    // daemon has read the client's `Finished` is a failed handshake instead).
    let backend = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut hello = [0u8; 5];
        stream.read_exact(&mut hello).unwrap();
        stream.write_all(b"ok").unwrap();
        read_to_end_or_reset(&mut stream)
    });
    let mut tls =
        ingress_tests::tls::tls_connect(ingress.addr(), "resets.example.test", config).unwrap();
    tls.write_all(b"hello").unwrap();
    tls.flush().unwrap();
    let mut ok = [0u8; 2];
    tls.read_exact(&mut ok).unwrap();
    tls.write_all(&data).unwrap();
    tls.flush().unwrap();
    abort(tls.sock).unwrap();
    let (got, reset) = backend.join().unwrap();
    assert!(
        reset,
        "the backend saw a clean end after {} bytes, not a reset",
        got.len()
    );
    assert!(
        data.starts_with(&got),
        "the {} bytes before the reset are not the client's",
        got.len()
    );
    crate::common::wait_for_count("client_reset flows", Duration::from_secs(10), 1, || {
        ended("client_reset") as u64
    });
    assert_eq!(ended("client_reset"), 1.0);
    assert_eq!(ended("closed"), 0.0);
}
