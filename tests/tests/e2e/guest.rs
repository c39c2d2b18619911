//! The end-to-end test the kernel matrix also runs inside its Debian 6.1, 6.12 and 6.17
//! guests: the real daemon on the kernel path, configured over its API, with Rust peers only
//! (the guests carry no `openssl` or `curl`). Passthrough to a rustls echo server, and
//! terminate to a plain echo server with the certificate held by the daemon; every byte
//! checked, and the passthrough bytes counted on the kernel path. The takeover sequence (a
//! successor taking spliced flows over, one by a build with a different verdict program, and
//! one dying halfway) runs here too. `ktls`: terminated flows on kernel TLS.

mod ktls;

use std::{io::Write as _, net::Ipv4Addr, time::Duration};

use ingress_tests::{echo::EchoServer, pki::Pki, tls::RustlsServer, tls::tls_connect};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::common::{bytes_metric, certificate, create_ingress, instance, kernel_daemon, rule};

/// Bytes each flow echoes.
const ECHOED: usize = 16 << 20;

/// Writes `ECHOED` bytes in chunks, reading each echo back before the next, and checks the
/// digest of what came back.
fn echo_through(stream: &mut (impl std::io::Read + std::io::Write), seed: u8) {
    let chunk: Vec<u8> = (0..64usize << 10)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    let (mut sent, mut got) = (Sha256::new(), Sha256::new());
    let mut back = vec![0u8; chunk.len()];
    for _ in 0..ECHOED / chunk.len() {
        stream.write_all(&chunk).unwrap();
        stream.flush().unwrap();
        sent.update(&chunk);
        stream.read_exact(&mut back).unwrap();
        got.update(&back);
    }
    assert_eq!(
        got.finalize(),
        sent.finalize(),
        "the echo came back byte-exact"
    );
}

#[test]
fn passthrough_and_terminate_through_the_daemon_with_rust_peers() {
    let Some(daemon) = kernel_daemon(&[]) else {
        return;
    };
    let api = daemon.api().unwrap();
    let pki = Pki::new().unwrap();
    let passthrough_backend = RustlsServer::start(
        Ipv4Addr::LOCALHOST,
        pki.issue(&["pt.guest.test"])
            .unwrap()
            .server_config(&[])
            .unwrap(),
    )
    .unwrap();
    let plain_backend = EchoServer::start(Ipv4Addr::LOCALHOST).unwrap();
    instance(&api, "vm", Ipv4Addr::LOCALHOST);
    certificate(&api, &pki, "guest", &["tm.guest.test"]);
    let ingress = create_ingress(
        &api,
        "guest",
        json!([
            rule(
                "pt.guest.test",
                "vm",
                passthrough_backend.addr().port(),
                "passthrough"
            ),
            rule(
                "tm.guest.test",
                "vm",
                plain_backend.addr().port(),
                "terminate"
            ),
        ]),
        None,
    );
    let client = pki.client_config(&[]).unwrap();
    for (seed, sni) in [(1u8, "pt.guest.test"), (2, "tm.guest.test")] {
        let mut tls = tls_connect(ingress.addr(), sni, client.clone()).unwrap();
        echo_through(&mut tls, seed);
        tls.conn.send_close_notify();
        tls.flush().unwrap();
        tls.sock.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let session = passthrough_backend
        .next_session(Duration::from_secs(10))
        .unwrap();
    assert_eq!(session.sni.as_deref(), Some("pt.guest.test"));
    // Flows are counted when they end: wait for both, then check the kernel carried the
    // passthrough bytes.
    let bytes = |path: &str| {
        bytes_metric(
            &api,
            &[
                "ingress=\"guest\"",
                "direction=\"client_to_backend\"",
                &format!("path=\"{path}\""),
            ],
        )
    };
    let want = 2.0 * ECHOED as f64;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    // The terminated flow is counted on `ktls_splice` where the kernel has TLS, else on
    // `userspace`.
    let all = || bytes("sockmap") + bytes("ktls_splice") + bytes("userspace");
    while all() < want && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (kernel, ktls, relayed) = (bytes("sockmap"), bytes("ktls_splice"), bytes("userspace"));
    assert!(
        kernel + ktls + relayed >= want,
        "client → backend bytes counted: kernel {kernel}, ktls {ktls}, relay {relayed}"
    );
    assert!(
        kernel >= 0.99 * ECHOED as f64,
        "the kernel path carried the passthrough flow: {kernel} of {ECHOED} bytes (relay {relayed}, \
         ktls {ktls}: the terminated flow's {ECHOED} among them)"
    );
}

#[test]
fn takeover_hands_spliced_flows_and_new_connections_to_a_successor() {
    // Fewer flows than on the host: the guest's CPU is emulated.
    crate::takeover::upgrade_under_load(200, 200);
}

#[test]
fn takeover_by_a_new_program_serves_only_new_flows_with_it() {
    crate::takeover::upgrade_to_a_new_program(false);
}

#[test]
fn takeover_without_a_bpffs_keeps_the_old_program_for_new_flows() {
    crate::takeover::upgrade_to_a_new_program(true);
}

#[test]
fn takeover_resumes_everything_when_the_successor_dies() {
    crate::takeover::successor_dies_halfway();
}
