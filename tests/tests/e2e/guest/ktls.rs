//! Terminated flows on kernel TLS (the kernel matrix runs these in its Debian 6.1, 6.12 and 6.17
//! guests, which load the `tls` and crypto modules and set `INGRESSD_EXPECT_KTLS=1`): after the
//! rustls handshake the daemon installs the session keys in the kernel and splices the
//! plaintext, so the userspace relay carries no byte of the flow. A rustls client moves
//! checksummed streams both ways at once. Where the kernel has no TLS (this host) the same
//! tests show the fallback: the flows run on the rustls relay and are reported as `userspace`.

use std::{
    io::{Read as _, Write as _},
    net::Ipv4Addr,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use ingress_tests::{
    api::ApiClient,
    bulk::{BulkServer, BulkSpec, Preamble, ServerReport},
    daemon::Daemon,
    echo::EchoServer,
    pki::Pki,
    tls::tls_connect,
    tls_bulk::{TlsSideReport, tls_exchange},
};
use rustls::CipherSuite;
use serde_json::{Value, json};

use crate::common::{Ingress, bytes_metric, certificate, create_ingress, instance, metric, rule};

/// MiB each way of the bulk flows (the guest gets `INGRESSD_TEST_SCALE_MIB`; this host runs a
/// smaller transfer on the relay).
fn scale_mib() -> u64 {
    std::env::var("INGRESSD_TEST_SCALE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32)
}

/// Whether the run requires kTLS (the guests of the kernel matrix).
fn ktls_expected() -> bool {
    std::env::var("INGRESSD_EXPECT_KTLS").is_ok_and(|v| v == "1")
}

/// A daemon with one terminate ingress (`name`) to a bulk server, and whether it has kTLS.
struct Setup {
    daemon: Daemon,
    api: ApiClient,
    pki: Pki,
    backend: BulkServer,
    ingress: Ingress,
    name: &'static str,
    ktls: bool,
}

const SNI: &str = "bulk.ktls.test";

fn setup(name: &'static str) -> Setup {
    setup_on(name, Daemon::start().expect("ingressd starts"))
}

fn setup_on(name: &'static str, daemon: Daemon) -> Setup {
    let api = daemon.api().unwrap();
    let ready = api.readyz().unwrap();
    let detail = &ready.body["components"]["data_path"]["detail"];
    let ktls = detail["ktls_available"] == json!(true);
    assert_eq!(
        detail["ktls_rekey"],
        json!(ktls && kernel_rekeys()),
        "the start-up probe finds rekeying where the kernel has it: {}",
        ready.text
    );
    let gauge = metric(&api, "ingressd_ktls_available", &[]);
    assert_eq!(gauge, if ktls { 1.0 } else { 0.0 }, "{}", ready.text);
    if ktls_expected() {
        assert!(ktls, "this kernel must offer kTLS: {}", ready.text);
    }
    assert_eq!(
        detail["terminated_flows_path"],
        json!(if ktls { "ktls_splice" } else { "userspace" }),
        "{}",
        ready.text
    );
    let pki = Pki::new().unwrap();
    let backend = BulkServer::start(Ipv4Addr::LOCALHOST, Preamble::None).unwrap();
    instance(&api, "vm", Ipv4Addr::LOCALHOST);
    certificate(&api, &pki, name, &[SNI]);
    let ingress = create_ingress(
        &api,
        name,
        json!([rule(SNI, "vm", backend.addr().port(), "terminate")]),
        None,
    );
    Setup {
        daemon,
        api,
        pki,
        backend,
        ingress,
        name,
        ktls,
    }
}

impl Setup {
    /// The path the daemon reports terminated flows on.
    fn path(&self) -> &'static str {
        if self.ktls {
            "ktls_splice"
        } else {
            "userspace"
        }
    }

    fn bytes(&self, path: &str, direction: &str) -> f64 {
        bytes_metric(
            &self.api,
            &[
                &format!("ingress=\"{}\"", self.name),
                &format!("direction=\"{direction}\""),
                &format!("path=\"{path}\""),
            ],
        )
    }

    fn ended(&self, end: &str) -> f64 {
        metric(
            &self.api,
            "ingressd_flows_ended_total",
            &[
                &format!("ingress=\"{}\"", self.name),
                &format!("end=\"{end}\""),
            ],
        )
    }

    /// Key updates whose keys went into the kernel, in `direction`.
    fn key_updates(&self, direction: &str) -> f64 {
        metric(
            &self.api,
            "ingressd_tls_key_updates_total",
            &[
                &format!("ingress=\"{}\"", self.name),
                &format!("direction=\"{direction}\""),
            ],
        )
    }

    /// The live terminated flows of this ingress in `/flows`.
    fn live_flows(&self) -> Vec<Value> {
        let flows = self.api.get("/flows?limit=1000").unwrap();
        flows.assert_status(200)["flows"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["ingress"] == json!(self.name) && f["mode"] == json!("terminate"))
            .cloned()
            .collect()
    }

    /// Runs `spec` through the ingress with a client offering only `suite`, watching `/flows`
    /// while it runs; returns both sides' reports and the `/flows` entry seen (`None` when the
    /// flow ended before a look caught it live).
    fn exchange(
        &self,
        suite: CipherSuite,
        spec: &BulkSpec,
        key_update_after: Option<u64>,
    ) -> (TlsSideReport, ServerReport, Option<Value>) {
        let config = self.pki.client_config_suite(suite).unwrap();
        let (addr, spec_c) = (self.ingress.addr(), spec.clone());
        let client = thread::spawn(move || {
            tls_exchange(addr, SNI, Arc::clone(&config), &spec_c, key_update_after)
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let entry = loop {
            if let Some(f) = self.live_flows().into_iter().next() {
                break Some(f);
            }
            if client.is_finished() {
                break None;
            }
            assert!(
                Instant::now() < deadline,
                "no live terminated flow in /flows"
            );
            thread::sleep(Duration::from_millis(5));
        };
        let client = client.join().unwrap().unwrap();
        let server = self.backend.next_report(Duration::from_secs(120)).unwrap();
        (client, server, entry)
    }

    /// Waits until no terminated flow of this ingress is live (flows are counted when they
    /// end).
    fn wait_flows_ended(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.live_flows().is_empty() {
            assert!(Instant::now() < deadline, "terminated flows did not end");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

fn tls13_and_tls12() -> [(CipherSuite, &'static str); 2] {
    [
        (CipherSuite::TLS13_AES_128_GCM_SHA256, "tls1.3 aes-128-gcm"),
        (
            CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            "tls1.2 aes-256-gcm",
        ),
    ]
}

#[test]
fn terminated_bulk_flows_move_byte_exact_on_kernel_tls_with_tls12_and_tls13() {
    let s = setup("ktls-bulk");
    let bytes = scale_mib() << 20;
    for (i, (suite, label)) in tls13_and_tls12().into_iter().enumerate() {
        let before = [
            s.bytes(s.path(), "client_to_backend"),
            s.bytes(s.path(), "backend_to_client"),
        ];
        let relayed_before = [
            s.bytes("userspace", "client_to_backend"),
            s.bytes("userspace", "backend_to_client"),
        ];
        let started = Instant::now();
        let spec = BulkSpec::both_ways(bytes, 0x6b74_6c73 + i as u64);
        let (client, server, entry) = s.exchange(suite, &spec, None);
        let took = started.elapsed();
        // In the guests the flow runs for minutes: `/flows` must have shown it; on this host
        // the relay may finish between two looks, and the byte counters below show the path.
        match &entry {
            Some(entry) => assert_eq!(entry["path"], json!(s.path()), "{label}: {entry}"),
            None => assert!(!s.ktls, "{label}: the kTLS flow never showed in /flows"),
        }
        assert!(
            client.write_error.is_none() && client.read_error.is_none(),
            "{label}: {client:?}"
        );
        assert_eq!(client.sent, bytes, "{label}");
        assert!(
            client.received.is_exact(),
            "{label}: {:?}",
            client.received.problem()
        );
        assert!(
            client.close_notify,
            "{label}: the daemon ended with close_notify"
        );
        let side = server
            .side
            .as_ref()
            .unwrap_or_else(|| panic!("{label}: {server:?}"));
        side.check(bytes)
            .unwrap_or_else(|e| panic!("{label}: server side {e:?}"));
        assert_eq!(side.received.sha256, client.sent_sha256, "{label}");
        s.wait_flows_ended();
        let moved = [
            s.bytes(s.path(), "client_to_backend") - before[0],
            s.bytes(s.path(), "backend_to_client") - before[1],
        ];
        let header = 48.0;
        assert_eq!(
            moved,
            [bytes as f64 + header, bytes as f64],
            "{label}: bytes by path"
        );
        if s.ktls {
            // The userspace relay carried nothing: the handshake is all it saw.
            let relayed = [
                s.bytes("userspace", "client_to_backend") - relayed_before[0],
                s.bytes("userspace", "backend_to_client") - relayed_before[1],
            ];
            assert_eq!(relayed, [0.0, 0.0], "{label}: relayed bytes");
        }
        println!(
            "{label}: {} MiB each way on {} in {took:.1?}",
            bytes >> 20,
            s.path()
        );
    }
    assert_eq!(s.ended("closed"), 2.0);
    drop(s.daemon);
}

#[test]
fn every_cipher_suite_the_kernel_takes_carries_a_flow() {
    let s = setup("ktls-suites");
    let bytes = 1 << 20;
    for (i, suite) in [
        CipherSuite::TLS13_AES_128_GCM_SHA256,
        CipherSuite::TLS13_AES_256_GCM_SHA384,
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ]
    .into_iter()
    .enumerate()
    {
        let spec = BulkSpec::both_ways(bytes, 0x5u64 << 32 | i as u64);
        let on_path = s.bytes(s.path(), "backend_to_client");
        // Where the kernel rekeys, each TLS 1.3 suite takes a KeyUpdate halfway: the next keys
        // of every AEAD go in as the first did.
        let rekey = i < 3 && s.ktls && kernel_rekeys();
        let updates = [
            s.key_updates("client_to_backend"),
            s.key_updates("backend_to_client"),
        ];
        let (client, server, entry) = s.exchange(suite, &spec, rekey.then_some(bytes / 2));
        if let Some(entry) = entry {
            assert_eq!(entry["path"], json!(s.path()), "{suite:?}: {entry}");
        }
        assert!(client.received.is_exact(), "{suite:?}: {client:?}");
        let side = server
            .side
            .unwrap_or_else(|| panic!("{suite:?}: no server side"));
        side.check(bytes)
            .unwrap_or_else(|e| panic!("{suite:?}: {e:?}"));
        s.wait_flows_ended();
        assert_eq!(
            s.bytes(s.path(), "backend_to_client") - on_path,
            bytes as f64,
            "{suite:?}: carried on {}",
            s.path()
        );
        if rekey {
            assert_eq!(client.key_update_at, Some(bytes / 2), "{suite:?}");
            let moved = [
                s.key_updates("client_to_backend") - updates[0],
                s.key_updates("backend_to_client") - updates[1],
            ];
            assert_eq!(moved, [1.0, 1.0], "{suite:?}: new keys each way");
        }
    }
    drop(s.daemon);
}

/// A client that sends its request, `close_notify` and FIN right behind its `Finished` (one
/// write, before the daemon has read past the handshake): by the time the session keys could
/// go in, the socket is no longer established, and the kernel takes its TLS layer only on an
/// established one. Every such flow still gets its whole reply and a clean close.
#[test]
fn a_client_that_closes_right_after_the_handshake_gets_its_whole_reply() {
    let daemon = Daemon::start().expect("ingressd starts");
    let api = daemon.api().unwrap();
    let ready = api.readyz().unwrap();
    let ktls = ready.body["components"]["data_path"]["detail"]["ktls_available"] == json!(true);
    assert!(ktls || !ktls_expected(), "{}", ready.text);
    let path = if ktls { "ktls_splice" } else { "userspace" };
    let pki = Pki::new().unwrap();
    let echo = EchoServer::start(Ipv4Addr::LOCALHOST).unwrap();
    instance(&api, "vm", Ipv4Addr::LOCALHOST);
    certificate(&api, &pki, "ktls-early-fin", &[SNI]);
    let ingress = create_ingress(
        &api,
        "ktls-early-fin",
        json!([rule(SNI, "vm", echo.addr().port(), "terminate")]),
        None,
    );
    let ended = |end: &str| {
        metric(
            &api,
            "ingressd_flows_ended_total",
            &["ingress=\"ktls-early-fin\"", &format!("end=\"{end}\"")],
        )
    };
    let carried = || {
        bytes_metric(
            &api,
            &[
                "ingress=\"ktls-early-fin\"",
                "direction=\"backend_to_client\"",
                &format!("path=\"{path}\""),
            ],
        )
    };
    const FLOWS: u32 = 10;
    const REQUEST: usize = 3000;
    for i in 0..FLOWS {
        let request: Vec<u8> = (0..REQUEST).map(|b| (b as u32 * 7 + i) as u8).collect();
        // The handshake ends on the client's side before its `Finished` is written; the
        // write below sends `Finished`, the request and `close_notify` together.
        let mut tls = tls_connect(
            ingress.addr(),
            SNI,
            pki.client_config_suite(CipherSuite::TLS13_AES_128_GCM_SHA256)
                .unwrap(),
        )
        .unwrap();
        tls.conn.writer().write_all(&request).unwrap();
        tls.conn.send_close_notify();
        while tls.conn.wants_write() {
            tls.conn.write_tls(&mut tls.sock).unwrap();
        }
        tls.sock.shutdown(std::net::Shutdown::Write).unwrap();
        let mut reply = Vec::new();
        tls.read_to_end(&mut reply)
            .unwrap_or_else(|e| panic!("flow {i}: {e} after {} bytes", reply.len()));
        assert!(reply == request, "flow {i}: {} bytes back", reply.len());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while ended("closed") < f64::from(FLOWS) {
        assert!(
            Instant::now() < deadline,
            "closed {}, kernel tls refused {}",
            ended("closed"),
            ended("ktls_install_failed")
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(ended("ktls_install_failed"), 0.0);
    assert_eq!(
        carried(),
        f64::from(FLOWS) * REQUEST as f64,
        "carried on {path}"
    );
    drop(daemon);
}

/// Whether the running kernel takes new kTLS keys on a live socket (TLS 1.3 rekeying came
/// with Linux 6.14; the Debian 6.17 guest has it, the 6.1 and 6.12 guests do not).
fn kernel_rekeys() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u32>().ok());
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0)) >= (6, 14)
}

#[test]
fn a_client_key_update_takes_new_kernel_keys_or_ends_the_flow_cleanly_where_it_cannot() {
    let s = setup("ktls-keyupdate");
    let rekeys = s.ktls && kernel_rekeys();
    let prefix = 4u64 << 20;
    let total = prefix + (4 << 20);
    // Where the flow survives the KeyUpdate, data flows both ways across it: the daemon's
    // answering KeyUpdate and new transmit keys land in the middle of the down stream, which is
    // four times the up stream so that it is still running then (with both streams the same
    // size, the down stream could end before the KeyUpdate and a wrong transmit key go
    // unnoticed). Where the flow ends, only the client sends (the backend would see its writes
    // cut off).
    let spec = if s.ktls && !rekeys {
        BulkSpec::upload(total, 0x6b75)
    } else {
        BulkSpec {
            down_bytes: 4 * total,
            ..BulkSpec::both_ways(total, 0x6b75)
        }
    };
    let key_update = |direction: &str| s.key_updates(direction);
    let relayed_before = [
        s.bytes("userspace", "client_to_backend"),
        s.bytes("userspace", "backend_to_client"),
    ];
    let (client, server, entry) =
        s.exchange(CipherSuite::TLS13_AES_128_GCM_SHA256, &spec, Some(prefix));
    if let Some(entry) = entry {
        assert_eq!(entry["path"], json!(s.path()), "{entry}");
    }
    // rustls's client asks for the daemon's keys too (`update_requested`).
    assert_eq!(client.key_update_at, Some(prefix), "{client:?}");
    let side = server.side.unwrap_or_else(|| panic!("{:?}", server.error));
    s.wait_flows_ended();
    if rekeys {
        // Both streams whole and exact: the client's records after its KeyUpdate were
        // decrypted with its new keys, and it decrypted ours after the daemon's KeyUpdate.
        assert!(
            client.write_error.is_none() && client.read_error.is_none(),
            "{client:?}"
        );
        assert!(
            client.received.is_exact(),
            "{:?}",
            client.received.problem()
        );
        assert!(client.close_notify, "{client:?}");
        side.check(spec.down_bytes).unwrap();
        assert_eq!(side.received.sha256, client.sent_sha256);
        assert_eq!(key_update("client_to_backend"), 1.0);
        assert_eq!(key_update("backend_to_client"), 1.0);
        assert_eq!(s.ended("closed"), 1.0);
        assert_eq!(s.ended("tls_key_update"), 0.0);
        let relayed = [
            s.bytes("userspace", "client_to_backend") - relayed_before[0],
            s.bytes("userspace", "backend_to_client") - relayed_before[1],
        ];
        assert_eq!(relayed, [0.0, 0.0], "the userspace relay carried nothing");
    } else if s.ktls {
        // Everything before the KeyUpdate, nothing after it, no wrong byte.
        assert_eq!(side.received.first_mismatch, None, "{:?}", side.received);
        assert_eq!(side.received.received, prefix, "{:?}", side.received);
        assert!(
            side.error.is_none(),
            "the backend saw a FIN: {:?}",
            side.error
        );
        assert!(
            client.close_notify,
            "the client got close_notify: {client:?}"
        );
        assert_eq!(s.ended("tls_key_update"), 1.0);
        assert_eq!(s.ended("closed"), 0.0);
        assert_eq!(key_update("client_to_backend"), 0.0);
    } else {
        // The rustls relay takes the new keys: the whole streams arrive.
        side.check(spec.down_bytes).unwrap();
        assert!(
            client.received.is_exact(),
            "{:?}",
            client.received.problem()
        );
        assert_eq!(s.ended("tls_key_update"), 0.0);
        assert_eq!(s.ended("closed"), 1.0);
        assert_eq!(
            key_update("client_to_backend"),
            0.0,
            "only kernel keys are counted"
        );
    }
    drop(s.daemon);
}

#[test]
fn the_daemon_updates_its_own_keys_after_so_many_records_where_the_kernel_rekeys() {
    // Every 64 records instead of every 2^23: a 4 MiB down stream (at least 256 records)
    // crosses several updates.
    let daemon = Daemon::builder()
        .env("INGRESSD_TEST_KTLS_RECORDS_PER_KEY", "64")
        .start()
        .expect("ingressd starts");
    let s = setup_on("ktls-own-update", daemon);
    let rekeys = s.ktls && kernel_rekeys();
    let bytes = 4u64 << 20;
    for (suite, label) in tls13_and_tls12() {
        let before = [
            s.key_updates("client_to_backend"),
            s.key_updates("backend_to_client"),
        ];
        let spec = BulkSpec::both_ways(bytes, 0x6f77_6e00);
        let (client, server, _) = s.exchange(suite, &spec, None);
        assert!(
            client.write_error.is_none() && client.read_error.is_none(),
            "{label}: {client:?}"
        );
        assert!(
            client.received.is_exact(),
            "{label}: {:?}",
            client.received.problem()
        );
        assert!(client.close_notify, "{label}: {client:?}");
        let side = server
            .side
            .unwrap_or_else(|| panic!("{label}: {:?}", server.error));
        side.check(bytes).unwrap();
        s.wait_flows_ended();
        let moved = [
            s.key_updates("client_to_backend") - before[0],
            s.key_updates("backend_to_client") - before[1],
        ];
        assert_eq!(moved[0], 0.0, "{label}: the client never asked");
        if rekeys && label.starts_with("tls1.3") {
            // The client decrypted every record after each of the daemon's KeyUpdates. The
            // count is checked after each splice through the pipe (1 MiB, 64 records at most),
            // so an update comes with fewer than 128 records counted: 256 make at least two.
            assert!(moved[1] >= 2.0, "{label}: {moved:?}");
        } else {
            // TLS 1.2 has no KeyUpdate; kernels before 6.14 keep their first key.
            assert_eq!(moved[1], 0.0, "{label}");
        }
    }
    assert_eq!(s.ended("closed"), 2.0);
    drop(s.daemon);
}
