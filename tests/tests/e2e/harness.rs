//! Self-tests of the harness: its servers, launchers and transfer checks work without a daemon.
use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt as _,
    process::Command,
    time::Duration,
};

use ingress_tests::{
    Daemon,
    bulk::{self, BulkServer, BulkSpec, Preamble},
    echo::{ConnEnd, EchoServer},
    netns::Netns,
    pki::Pki,
    ports::next_loopback,
    process::run_checked,
    require, require_ok,
    servers::{ServerOptions, postgres::Postgres, redis::Redis, sshd::Sshd},
    tls::{OpensslServer, RustlsServer, client_hello, tls_connect},
    tools,
    workdir::WorkDir,
};

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn echo_server_echoes_and_answers_fin_with_fin() {
    let server = EchoServer::start(next_loopback()).unwrap();
    let mut client = TcpStream::connect(server.addr()).unwrap();
    client.write_all(b"hello, ingress").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    client.read_to_end(&mut back).unwrap();
    assert_eq!(back, b"hello, ingress");
    let (_, end) = server.next_end(WAIT).unwrap();
    assert_eq!(end, ConnEnd::Eof { bytes: 14 });
}

#[test]
fn bulk_exchange_is_byte_exact_both_ways() {
    let server = BulkServer::start(next_loopback(), Preamble::None).unwrap();
    let spec = BulkSpec::both_ways(64 << 20, 11);
    let client = bulk::exchange_with(server.addr(), &spec).unwrap();
    client.check(spec.up_bytes).unwrap();
    let report = server.next_report(WAIT).unwrap();
    assert_eq!(report.error, None);
    let side = report.side.unwrap();
    side.check(spec.down_bytes).unwrap();
    // Each side's digest of what it sent matches the other's digest of what it received.
    assert_eq!(client.sent_sha256, side.received.sha256);
    assert_eq!(side.sent_sha256, client.received.sha256);
}

#[test]
fn bulk_server_skips_a_client_hello_preamble() {
    let hello = client_hello("bulk.example.com", &[b"h2"]).unwrap();
    assert_eq!(hello[0], 0x16, "a TLS handshake record");
    assert!(
        hello.windows(16).any(|w| w == b"bulk.example.com"),
        "the SNI is in the hello"
    );
    let server = BulkServer::start(next_loopback(), Preamble::TlsRecord).unwrap();
    let spec = BulkSpec::both_ways(1 << 20, 12);
    let stream = TcpStream::connect(server.addr()).unwrap();
    bulk::exchange(stream, &hello, &spec)
        .unwrap()
        .check(spec.up_bytes)
        .unwrap();
    let report = server.next_report(WAIT).unwrap();
    report.side.unwrap().check(spec.down_bytes).unwrap();
}

#[test]
fn a_slow_server_reader_is_paced() {
    let server = BulkServer::start(next_loopback(), Preamble::None).unwrap();
    let mut spec = BulkSpec::upload(2 << 20, 13);
    spec.server_read_rate = Some(4 << 20);
    bulk::exchange_with(server.addr(), &spec)
        .unwrap()
        .check(spec.up_bytes)
        .unwrap();
    let side = server.next_report(WAIT).unwrap().side.unwrap();
    side.check(0).unwrap();
    // 2 MiB at 4 MiB/s: about half a second, minus what the socket buffers absorbed at once.
    assert!(
        side.elapsed >= Duration::from_millis(300),
        "took {:?}",
        side.elapsed
    );
}

#[test]
fn ping_pong_measures_round_trips() {
    let server = EchoServer::start(next_loopback()).unwrap();
    let mut client = TcpStream::connect(server.addr()).unwrap();
    let stats = bulk::ping_pong(&mut client, 200, 64).unwrap();
    assert_eq!(stats.samples, 200);
    assert!(stats.p50 <= stats.p99 && stats.p99 <= stats.max);
    assert!(stats.p50 < Duration::from_millis(50), "{stats:?}");
}

#[test]
fn rustls_server_reports_sni_and_alpn_and_echoes() {
    let pki = Pki::new().unwrap();
    let leaf = pki.issue(&["echo.example.com"]).unwrap();
    let server =
        RustlsServer::start(next_loopback(), leaf.server_config(&[b"echo/1"]).unwrap()).unwrap();
    let mut tls = tls_connect(
        server.addr(),
        "echo.example.com",
        pki.client_config(&[b"echo/1"]).unwrap(),
    )
    .unwrap();
    tls.write_all(b"ping").unwrap();
    let mut back = [0_u8; 4];
    tls.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ping");
    let session = server.next_session(WAIT).unwrap();
    assert_eq!(session.sni.as_deref(), Some("echo.example.com"));
    assert_eq!(session.alpn.as_deref(), Some(&b"echo/1"[..]));
    assert_eq!(session.error, None);
}

#[test]
fn openssl_s_server_answers_curl() {
    let openssl = require_ok!(tools::find("openssl"));
    let curl = require_ok!(tools::find("curl"));
    let _ = openssl;
    let dir = WorkDir::new("ingt-s_server-").unwrap();
    let pki = Pki::new().unwrap();
    let ca = pki.write_ca(dir.path()).unwrap();
    let cert = pki
        .issue(&["www.example.com"])
        .unwrap()
        .write(dir.path(), "server")
        .unwrap();
    let server = OpensslServer::start(
        next_loopback().into(),
        &cert,
        &["-www"],
        &dir.join("s_server.log"),
    )
    .unwrap();
    let SocketAddr::V4(addr) = server.addr() else {
        panic!("an IPv4 address")
    };
    let mut cmd = Command::new(curl);
    cmd.args(["--silent", "--show-error", "--max-time", "20", "--cacert"])
        .arg(&ca)
        .arg("--resolve")
        .arg(format!("www.example.com:{}:{}", addr.port(), addr.ip()))
        .arg(format!("https://www.example.com:{}/", addr.port()));
    let page = run_checked("curl", &mut cmd, WAIT).unwrap();
    assert!(page.contains("s_server"), "{page}");
}

#[test]
fn postgres_starts_and_answers_over_tls() {
    let pg = require_ok!(Postgres::start(&ServerOptions::new(
        next_loopback(),
        &["pg.example.com"]
    )));
    let ssl = pg
        .query("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        .unwrap();
    assert_eq!(ssl, "t");
    assert_eq!(pg.query("select 1").unwrap(), "1");
}

#[test]
fn redis_starts_and_answers_ping_over_tls() {
    let redis = require_ok!(Redis::start(&ServerOptions::new(
        next_loopback(),
        &["redis.example.com"]
    )));
    assert_eq!(
        redis
            .tls_command(redis.tls_addr(), None, &["PING"])
            .unwrap(),
        "PONG"
    );
    assert_eq!(
        redis
            .tls_command(redis.tls_addr(), None, &["SET", "k", "v"])
            .unwrap(),
        "OK"
    );
    assert_eq!(
        redis
            .tls_command(redis.tls_addr(), None, &["GET", "k"])
            .unwrap(),
        "v"
    );
}

#[test]
fn sshd_starts_and_accepts_the_client_key() {
    let sshd = require_ok!(Sshd::start(&ServerOptions::default()));
    assert_eq!(
        sshd.run("echo hello from sshd").unwrap().trim(),
        "hello from sshd"
    );
}

#[test]
fn netns_link_carries_traffic_until_taken_down() {
    let ns = require_ok!(Netns::new());
    let listener = ns.listen(SocketAddr::new(ns.ns_ip().into(), 0)).unwrap();
    let server = EchoServer::on(listener).unwrap();
    let mut client = TcpStream::connect_timeout(&server.addr(), Duration::from_secs(5)).unwrap();
    client.write_all(b"across").unwrap();
    let mut back = [0_u8; 6];
    client.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"across");

    // From inside the namespace, this side's end of the link is reachable too.
    let host_side = EchoServer::start(ns.host_ip()).unwrap();
    let mut inner = ns
        .connect(host_side.addr(), Duration::from_secs(5))
        .unwrap();
    inner.write_all(b"x").unwrap();
    let mut one = [0_u8; 1];
    inner.read_exact(&mut one).unwrap();

    ns.set_link(false).unwrap();
    assert!(TcpStream::connect_timeout(&server.addr(), Duration::from_millis(300)).is_err());
    ns.set_link(true).unwrap();
    let out = run_checked(
        "ip netns exec ip addr",
        ns.command("ip").args(["-brief", "addr"]),
        WAIT,
    )
    .unwrap();
    assert!(out.contains(&ns.ns_ip().to_string()), "{out}");
}

/// A stand-in for ingressd that keeps the harness's side of the contract: API on
/// `INGRESSD_API_LISTEN`, its address in `<INGRESSD_DATA_DIR>/api.addr`, `GET /healthz`.
const FAKE_DAEMON: &str = r#"#!/usr/bin/env python3
import http.server, json, os, sys
data = os.environ["INGRESSD_DATA_DIR"]
host, port = os.environ["INGRESSD_API_LISTEN"].rsplit(":", 1)
class Api(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"path": self.path, "pid": os.getpid(),
                           "offload": os.environ.get("INGRESSD_OFFLOAD")}).encode()
        self.send_response(200 if self.path in ("/healthz", "/info") else 404)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer((host, int(port)), Api)
addr = "%s:%d" % server.server_address
with open(os.path.join(data, "api.addr.tmp"), "w") as f:
    f.write(addr + "\n")
os.rename(os.path.join(data, "api.addr.tmp"), os.path.join(data, "api.addr"))
print("ingressd api listening on " + addr, file=sys.stderr, flush=True)
server.serve_forever()
"#;

fn fake_daemon(dir: &WorkDir) -> std::path::PathBuf {
    let path = dir.join("fake-ingressd");
    std::fs::write(&path, FAKE_DAEMON).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn daemon_harness_follows_the_api_addr_contract() {
    require!(tools::find("python3").is_ok(), "python3 is not installed");
    let dir = WorkDir::new("ingt-fake-").unwrap();
    let mut daemon = Daemon::builder()
        .binary(fake_daemon(&dir))
        .offload(ingress_tests::Offload::Off)
        .start()
        .unwrap();
    let info = daemon.api().unwrap().get("/info").unwrap();
    assert_eq!(info.assert_status(200)["offload"], "off");
    let first_pid = info.body["pid"].clone();
    assert_eq!(daemon.api().unwrap().get("/nope").unwrap().status, 404);

    assert!(
        daemon.open_fds().unwrap() >= 3,
        "stdin, stdout, stderr at least"
    );
    assert!(daemon.rss_bytes().unwrap() > 1 << 20);

    let data_dir = daemon.data_dir().to_path_buf();
    daemon.kill9().unwrap();
    assert!(!daemon.is_running().unwrap());
    daemon.restart().unwrap();
    assert_eq!(daemon.data_dir(), data_dir);
    let info = daemon.api().unwrap().get("/info").unwrap();
    assert_ne!(info.body["pid"], first_pid);
    daemon
        .wait_for_log("ingressd api listening on", WAIT)
        .unwrap();
    assert_eq!(daemon.log().matches("ingressd api listening on").count(), 2);
    assert!(
        daemon.stop().unwrap().code().is_none(),
        "SIGTERM ends the stand-in by signal"
    );
}

#[test]
fn daemon_harness_reports_a_daemon_that_exits_early() {
    let dir = WorkDir::new("ingt-fake-").unwrap();
    let path = dir.join("failing-ingressd");
    std::fs::write(&path, "#!/bin/sh\necho 'config: bad value' >&2\nexit 64\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = Daemon::builder().binary(&path).start().err().unwrap();
    let message = format!("{err:?}");
    assert!(
        message.contains("exited early") && message.contains("config: bad value"),
        "{message}"
    );
}

/// The harness's own ceiling: 1 GiB each way straight to the bulk server, checksummed. Daemon
/// throughput figures are only meaningful well below this.
#[test]
fn serial_bulk_exchange_moves_1gib_each_way() {
    let server = BulkServer::start(next_loopback(), Preamble::None).unwrap();
    let spec = BulkSpec::both_ways(1 << 30, 21);
    let client = bulk::exchange_with(server.addr(), &spec).unwrap();
    client.check(spec.up_bytes).unwrap();
    let side = server.next_report(WAIT).unwrap().side.unwrap();
    side.check(spec.down_bytes).unwrap();
    let gbit = (spec.up_bytes + spec.down_bytes) as f64 * 8.0 / client.elapsed.as_secs_f64() / 1e9;
    eprintln!(
        "harness direct: 2 GiB in {:?} ({gbit:.1} Gbit/s total)",
        client.elapsed
    );
}

#[test]
fn ingressd_binary_is_located_or_built() {
    let path = ingress_tests::binary::ingressd_binary().unwrap();
    assert!(path.is_file(), "{}", path.display());
    assert_eq!(path.file_name().and_then(|n| n.to_str()), Some("ingressd"));
}

#[test]
fn dnsmasq_answers_the_records_it_was_given() {
    let instance = next_loopback();
    let dns = require_ok!(ingress_tests::servers::dnsmasq::Dnsmasq::start(
        next_loopback(),
        &[("vm-7.vms.internal", instance)]
    ));
    assert_eq!(dns.resolve("vm-7.vms.internal").unwrap(), vec![instance]);
    assert!(dns.resolve("vm-8.vms.internal").unwrap().is_empty());
}

#[test]
fn abort_reaches_the_peer_as_a_reset() {
    let server = EchoServer::start(next_loopback()).unwrap();
    let mut client = TcpStream::connect(server.addr()).unwrap();
    client.write_all(b"abc").unwrap();
    let mut back = [0_u8; 3];
    client.read_exact(&mut back).unwrap();
    ingress_tests::tcp::abort(client).unwrap();
    let (_, end) = server.next_end(WAIT).unwrap();
    assert_eq!(end, ConnEnd::Reset { bytes: 3 });
}
