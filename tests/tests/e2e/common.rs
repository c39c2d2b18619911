//! What the data-path tests share: a daemon on the kernel path, ingress creation, and a client
//! that sees how the daemon ended its connection.

use std::{
    io::{ErrorKind, Read as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use ingress_tests::{
    ApiClient, Daemon, Offload, is_root, pki::Pki, ports::PortLease, skip::skip_test,
};
use serde_json::{Value, json};

/// A daemon on the kernel path (offload `required`: a broken eBPF load fails instead of
/// falling back), or `None` with the test skipped when not root (a failure under `CI=true`).
pub fn kernel_daemon(extra_env: &[(&str, &str)]) -> Option<Daemon> {
    if !is_root() {
        skip_test("the kernel path needs root (CAP_BPF, CAP_NET_ADMIN)");
        return None;
    }
    let mut builder = Daemon::builder().offload(Offload::Required);
    for (key, value) in extra_env {
        builder = builder.env(*key, *value);
    }
    Some(
        builder
            .start()
            .expect("ingressd starts with offload required"),
    )
}

/// An ingress listening on a leased port (released when dropped).
pub struct Ingress {
    pub port: PortLease,
}

impl Ingress {
    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port.port()))
    }
}

/// Creates an ingress named `name` with `rules` (and an optional default target).
pub fn create_ingress(
    api: &ApiClient,
    name: &str,
    rules: Value,
    default_target: Option<Value>,
) -> Ingress {
    let port = PortLease::new().unwrap();
    let mut body = json!({ "name": name, "listen_port": port.port(), "rules": rules });
    if let Some(default_target) = default_target {
        body["default_target"] = default_target;
    }
    api.create_ingress(&body).unwrap().assert_status(201);
    Ingress { port }
}

/// A rule matching `sni` to `instance:port` in `mode`.
pub fn rule(sni: &str, instance: &str, port: u16, mode: &str) -> Value {
    json!({ "match": { "sni": sni }, "target": { "instance": instance, "port": port }, "mode": mode })
}

/// Registers `name` → `ip`.
/// A [`rule`] whose protocol is `postgres` (the SSLRequest preamble and ALPN `postgresql`).
pub fn postgres_rule(sni: &str, instance: &str, port: u16, mode: &str) -> Value {
    let mut r = rule(sni, instance, port, mode);
    r["protocol"] = serde_json::json!("postgres");
    r
}

pub fn instance(api: &ApiClient, name: &str, ip: impl Into<std::net::IpAddr>) {
    let put = api.put_instance(name, ip.into()).unwrap();
    assert!(put.status == 200 || put.status == 201, "{put:?}");
}

/// Stores a certificate for `names` (terminate mode) issued by `pki`.
pub fn certificate(api: &ApiClient, pki: &Pki, name: &str, names: &[&str]) {
    let leaf = pki.issue(names).unwrap();
    api.add_certificate(name, &leaf.cert_pem, &leaf.key_pem)
        .unwrap()
        .assert_status(201);
}

/// How the daemon ended a client's connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Closed {
    /// A FIN.
    Fin,
    /// A reset.
    Reset,
}

/// Reads until the daemon closes the connection; returns how and how long it took. Any bytes
/// received are returned too (a refusal must send none).
pub fn wait_closed(mut stream: TcpStream, limit: Duration) -> (Closed, Duration, Vec<u8>) {
    stream.set_read_timeout(Some(limit)).unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (Closed::Fin, start.elapsed(), got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                return (Closed::Reset, start.elapsed(), got);
            }
            Err(e) => panic!("the daemon kept the connection open for {limit:?}: {e}"),
        }
    }
}

/// A plaintext HTTP backend answering every request with `body`; stops with the test process.
pub fn http_backend(ip: Ipv4Addr, body: &'static str) -> SocketAddr {
    let listener = std::net::TcpListener::bind((ip, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || serve_http(stream, body));
        }
    });
    addr
}

fn serve_http(mut stream: TcpStream, body: &str) {
    use std::io::{BufRead as _, BufReader, Write as _};
    let Ok(clone) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(clone);
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" => break,
            Ok(_) => {}
        }
    }
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Runs a command, failing the test with its output unless it succeeds; returns stdout.
pub fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The sum of the samples of metric `name` (the full sample name, e.g.
/// `ingressd_bytes_total`) over the series whose labels include every one of `labels` (each
/// written `name="value"`).
pub fn metric(api: &ApiClient, name: &str, labels: &[&str]) -> f64 {
    let scrape = api.get("/metrics").unwrap();
    assert_eq!(scrape.status, 200, "{}", scrape.text);
    sum_samples(&scrape.text, name, labels)
}

fn sum_samples(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The sum of `ingressd_bytes_total` over the series whose labels include every one of `labels`
/// (each written `name="value"`).
pub fn bytes_metric(api: &ApiClient, labels: &[&str]) -> f64 {
    metric(api, "ingressd_bytes_total", labels)
}

/// The backend → client bytes of `ingress` carried by the kernel path and by the relay, once
/// they add up to `want` (flows are counted when they end) or 10 s have passed.
pub fn backend_to_client_by_path(api: &ApiClient, ingress: &str, want: f64) -> (f64, f64) {
    let ingress = format!("ingress=\"{ingress}\"");
    let down = |path: &str| {
        bytes_metric(
            api,
            &[
                &ingress,
                "direction=\"backend_to_client\"",
                &format!("path=\"{path}\""),
            ],
        )
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while down("sockmap") + down("userspace") < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    (down("sockmap"), down("userspace"))
}

/// Connections the daemon refused on `ingress` for `reason` so far.
pub fn refused_count(api: &ApiClient, ingress: &str, reason: &str) -> u64 {
    let ingress = format!("ingress=\"{ingress}\"");
    let reason = format!("reason=\"{reason}\"");
    metric(
        api,
        "ingressd_connections_refused_total",
        &[&ingress, &reason],
    ) as u64
}

/// Connections the daemon refused on `ingress` so far, every reason together.
pub fn refused_total(api: &ApiClient, ingress: &str) -> u64 {
    let ingress = format!("ingress=\"{ingress}\"");
    metric(api, "ingressd_connections_refused_total", &[&ingress]) as u64
}

/// Connections the daemon accepted on `ingress` so far.
pub fn accepted_count(api: &ApiClient, ingress: &str) -> u64 {
    let ingress = format!("ingress=\"{ingress}\"");
    metric(api, "ingressd_connections_accepted_total", &[&ingress]) as u64
}

/// Connections the daemon routed on `ingress` (they became flows) so far.
pub fn routed_count(api: &ApiClient, ingress: &str) -> u64 {
    let ingress = format!("ingress=\"{ingress}\"");
    metric(api, "ingressd_connections_routed_total", &[&ingress]) as u64
}

/// Waits until `count` reaches `want` (a refusal is counted just after the client sees the
/// close); fails the test with `what` and the last value after `limit`.
pub fn wait_for_count(what: &str, limit: Duration, want: u64, mut count: impl FnMut() -> u64) {
    let mut last = 0;
    ingress_tests::process::wait_until(what, limit, || {
        last = count();
        Ok((last >= want).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{what}: {last}, expected {want}: {e}"));
}
