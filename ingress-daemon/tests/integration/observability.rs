//! Observability through the real `ingressd` binary: `/metrics` counters move by exactly what
//! real flows and refusals cause, the exposition passes `promtool check metrics`, the access log
//! has one line per flow and refusal, and `/flows` lists live flows.
//!
//! The kernel path runs with `INGRESSD_OFFLOAD=required` (root with BPF; CI always is, so the
//! test never skips there).
use std::collections::BTreeMap;
use std::io::{BufRead as _, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use ingress_daemon::ctl::ApiClient;
use serde_json::{Value, json};

use crate::common::{TempDir, client_hello, echo_server, free_port, wait_for};

const BIN: &str = env!("CARGO_BIN_EXE_ingressd");
const WAIT: Duration = Duration::from_secs(20);

/// Whether the kernel path can be tested here; under `CI=true` it must be.
fn kernel_path_available(test: &str) -> bool {
    // SAFETY-free check: root is uid 0 in /proc/self/status.
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .is_some_and(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    if root {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: CI must run as root with BPF"
    );
    eprintln!("skipping {test}: needs root for the eBPF kernel path");
    false
}

/// A running `ingressd`, killed (through its handle) on drop.
struct Ingressd {
    child: Child,
    api: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Ingressd {
    fn start(data_dir: &Path, env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(BIN)
            .env_clear()
            .env("INGRESSD_DATA_DIR", data_dir)
            .env("INGRESSD_API_LISTEN", "127.0.0.1:0")
            .env("INGRESSD_LISTEN_ADDR", "127.0.0.1")
            .env("INGRESSD_OFFLOAD", "required")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<String>();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                lines.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let api = wait_for("the api listening line", WAIT, || {
            let line = rx.recv_timeout(Duration::from_millis(100)).ok()?;
            let addr = line.split("addr=").nth(1)?.split_whitespace().next()?;
            line.contains("api listening").then(|| addr.to_owned())
        });
        Self { child, api, log }
    }

    fn client(&self) -> ApiClient {
        ApiClient::new(self.api.clone(), None)
    }

    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let bytes = body.to_string();
        let resp = self
            .client()
            .send(
                method,
                path,
                &[("Content-Type", "application/json")],
                Some(bytes.as_bytes()),
            )
            .unwrap();
        assert!(
            resp.status < 300,
            "{method} {path}: {} {}",
            resp.status,
            resp.text()
        );
        resp.json()
    }

    fn get(&self, path: &str, headers: &[(&str, &str)]) -> String {
        let resp = self.client().send("GET", path, headers, None).unwrap();
        assert_eq!(resp.status, 200, "GET {path}: {}", resp.text());
        resp.text()
    }

    fn metrics(&self) -> Metrics {
        Metrics::parse(&self.get("/metrics", &[]))
    }
}

impl Drop for Ingressd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            for line in self.log.lock().unwrap().iter().rev().take(60).rev() {
                eprintln!("[ingressd] {line}");
            }
        }
    }
}

/// A parsed exposition: series name + sorted labels → value.
#[derive(Debug, Default, Clone)]
struct Metrics(BTreeMap<String, f64>);

fn series(name: &str, labels: &[(&str, &str)]) -> String {
    let mut labels: Vec<_> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    format!("{name}{{{}}}", labels.join(","))
}

impl Metrics {
    fn parse(text: &str) -> Self {
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
        let mut all = BTreeMap::new();
        for s in scrape.samples {
            let labels: Vec<(&str, &str)> = s
                .labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let value = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                // Buckets are checked through `_count`.
                _ => continue,
            };
            all.insert(series(&s.metric, &labels), value);
        }
        assert!(!all.is_empty(), "no samples in:\n{text}");
        Self(all)
    }

    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let key = series(name, labels);
        *self
            .0
            .get(&key)
            .unwrap_or_else(|| panic!("no series {key} in {:#?}", self.0.keys()))
    }

    /// Series starting with `prefix` that changed between `self` and `later`.
    fn changes(&self, later: &Metrics, prefix: &str) -> BTreeMap<String, f64> {
        later
            .0
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v - self.0.get(k).copied().unwrap_or(0.0)))
            .filter(|(_, d)| *d != 0.0)
            .collect()
    }
}

/// A self-signed certificate for `name`: PEM (for the API) and DER (for the client).
struct Cert {
    cert_pem: String,
    key_pem: String,
    der: rustls_pki_types::CertificateDer<'static>,
}

fn cert(name: &str) -> Cert {
    let ck = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
    Cert {
        cert_pem: ck.cert.pem(),
        key_pem: ck.key_pair.serialize_pem(),
        der: ck.cert.der().clone(),
    }
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

/// Sends `bytes` (then FIN when `fin`) and reads until the daemon closes; the connection must
/// be refused, so nothing comes back.
fn refused(port: u16, bytes: &[u8], fin: bool) {
    let mut s = connect(port);
    s.write_all(bytes).unwrap();
    if fin {
        s.shutdown(Shutdown::Write).unwrap();
    }
    // Until the daemon closes (a reset is a close too); a failed TLS handshake may have
    // answered with a ServerHello first.
    let _ = s.read_to_end(&mut Vec::new());
}

/// Opens a passthrough flow through the echo backend: sends the hello and `payload`, reads
/// them back. Returns the stream and the bytes moved each way.
fn echo_flow(port: u16, sni: &str, payload: usize) -> (TcpStream, u64) {
    let mut s = connect(port);
    let mut sent = client_hello(sni, &[b"h2", b"http/1.1"]);
    sent.extend((0..payload).map(|i| (i % 251) as u8));
    s.write_all(&sent).unwrap();
    let mut back = vec![0u8; sent.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, sent, "the echo came back intact");
    (s, sent.len() as u64)
}

/// Closes a flow cleanly: FIN, then read until the backend's FIN.
fn finish(mut s: TcpStream) {
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

/// A terminated flow: TLS to the daemon, `payload` bytes echoed in plaintext by the backend.
fn terminated_flow(port: u16, sni: &str, cert: &Cert, payload: usize) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name = rustls_pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, connect(port));
    let data: Vec<u8> = (0..payload).map(|i| (i % 253) as u8).collect();
    tls.write_all(&data).unwrap();
    let mut back = vec![0u8; payload];
    tls.read_exact(&mut back).unwrap();
    assert_eq!(back, data);
    tls.conn.send_close_notify();
    tls.flush().unwrap();
    tls.sock.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = tls.read_to_end(&mut rest);
    assert!(rest.is_empty());
}

/// Closes with a reset (`SO_LINGER {1, 0}`).
fn reset(s: TcpStream) {
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
}

struct Setup {
    _dir: TempDir,
    daemon: Ingressd,
    port: u16,
    cert: Cert,
    access_log: PathBuf,
}

/// A daemon with one ingress `obs` whose rules reach an echo backend in both modes, plus
/// rules that fail at resolve, policy and connect time.
fn setup(extra_env: &[(&str, &str)]) -> Setup {
    let dir = TempDir::new("obs");
    let access_log = dir.path().join("access.log");
    let mut env = vec![
        ("INGRESSD_ACCESS_LOG", access_log.to_str().unwrap()),
        ("INGRESSD_HANDSHAKE_TIMEOUT_MS", "3000"),
    ];
    env.extend_from_slice(extra_env);
    let daemon = Ingressd::start(&dir.path().join("data"), &env);
    let echo = echo_server();
    let dead = free_port();
    let api_port = daemon.api.parse::<SocketAddr>().unwrap().port();
    let cert = cert("tls.obs.test");
    daemon.call("PUT", "/instances/echo", json!({"address": "127.0.0.1"}));
    daemon.call("PUT", "/instances/api", json!({"address": "127.0.0.1"}));
    daemon.call(
        "POST",
        "/certificates",
        json!({"name": "obs", "cert_pem": cert.cert_pem, "key_pem": cert.key_pem}),
    );
    let port = free_port();
    let rule = |sni: &str, instance: &str, port: u16, mode: &str| json!({"match": {"sni": sni}, "target": {"instance": instance, "port": port}, "mode": mode});
    daemon.call(
        "POST",
        "/tcp-ingresses",
        json!({"name": "obs", "listen_port": port, "rules": [
            rule("pass.obs.test", "echo", echo, "passthrough"),
            rule("tls.obs.test", "echo", echo, "terminate"),
            rule("{name}.dyn.obs.test", "{name}", echo, "passthrough"),
            rule("{name}.api.obs.test", "{name}", api_port, "passthrough"),
            rule("{name}.down.obs.test", "{name}", dead, "passthrough"),
        ]}),
    );
    Setup {
        _dir: dir,
        daemon,
        port,
        cert,
        access_log,
    }
}

fn access_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Waits until `path` holds `n` lines and returns the last one.
fn nth_line(path: &Path, n: usize) -> Value {
    wait_for("the access log line", WAIT, || {
        let lines = access_lines(path);
        (lines.len() == n).then(|| lines[n - 1].clone())
    })
}

/// `ingressd_bytes_total` of ingress `obs` in `direction` on `path`.
fn bytes(m: &Metrics, direction: &str, path: &str) -> f64 {
    m.get(
        "ingressd_bytes_total",
        &[("ingress", "obs"), ("direction", direction), ("path", path)],
    )
}

#[test]
fn metrics_and_access_log_account_for_every_flow_and_refusal() {
    if !kernel_path_available("metrics_and_access_log_account_for_every_flow_and_refusal") {
        return;
    }
    // Kernel path from the first byte (no userspace first phase): the accounting below is
    // exact per path. The first phase has its own test.
    let s = setup(&[
        ("INGRESSD_MAX_FLOWS", "1"),
        ("INGRESSD_RELAY_FIRST_MS", "0"),
    ]);
    let (d, port) = (&s.daemon, s.port);
    let before = d.metrics();
    let ing = [("ingress", "obs")];
    assert_eq!(before.get("ingressd_offload_program_loaded", &[]), 1.0);

    // A kernel-path passthrough flow, a terminated flow, and a held passthrough flow that
    // ends with a reset after a connection is refused for the flow limit.
    let (a, a_bytes) = echo_flow(port, "pass.obs.test", 256 << 10);
    finish(a);
    let active = || {
        let m = d.metrics();
        ["passthrough", "terminate"]
            .iter()
            .flat_map(|mode| ["sockmap", "userspace"].map(|p| (*mode, p)))
            .map(|(mode, path)| {
                m.get(
                    "ingressd_flows_active",
                    &[("ingress", "obs"), ("mode", mode), ("path", path)],
                )
            })
            .sum::<f64>()
    };
    wait_for("flow a to end", WAIT, || (active() == 0.0).then_some(()));
    terminated_flow(port, "tls.obs.test", &s.cert, 10_000);
    wait_for("flow b to end", WAIT, || (active() == 0.0).then_some(()));
    let (c, c_bytes) = echo_flow(port, "pass.obs.test", 1000);
    let flows: Value = serde_json::from_str(&d.get("/flows?limit=10", &[])).unwrap();
    assert_eq!(flows["flows"].as_array().unwrap().len(), 1, "{flows}");
    let live = &flows["flows"][0];
    assert_eq!(
        (&live["ingress"], &live["mode"], &live["path"]),
        (&json!("obs"), &json!("passthrough"), &json!("sockmap")),
        "{live}"
    );
    assert_eq!(
        live["client"],
        json!(c.local_addr().unwrap().to_string()),
        "{live}"
    );
    refused(port, &client_hello("pass.obs.test", &[]), false); // flow_limit
    reset(c);
    wait_for("flow c to end", WAIT, || (active() == 0.0).then_some(()));

    // One refusal per reason the test can provoke.
    refused(port, b"GET / HTTP/1.0\r\n\r\n", false); // not_tls
    refused(port, &[0x16, 3, 1, 0, 8, 1, 0, 0, 4, 0, 0, 0, 0], false); // bad_hello
    let mut huge = vec![0x16, 3, 1, 0x40, 0, 1, 0, 0xff, 0xff];
    huge.resize(5 + 16384, 0);
    refused(port, &huge, false); // hello_too_large
    refused(port, &[], false); // hello_timeout (3 s)
    refused(port, &[], true); // client_closed
    refused(port, &client_hello("127.0.0.1", &[]), false); // no_sni
    refused(port, &client_hello("nope.obs.test", &[]), false); // unknown_sni
    refused(port, &client_hello("ghost.dyn.obs.test", &[]), false); // resolve_failed
    refused(port, &client_hello("api.api.obs.test", &[]), false); // backend_not_allowed
    refused(port, &client_hello("echo.down.obs.test", &[]), false); // backend_unreachable
    refused(port, &client_hello("tls.obs.test", &[]), true); // tls_handshake_failed

    let reasons = [
        "flow_limit",
        "not_tls",
        "bad_hello",
        "hello_too_large",
        "hello_timeout",
        "client_closed",
        "no_sni",
        "unknown_sni",
        "resolve_failed",
        "backend_not_allowed",
        "backend_unreachable",
        "tls_handshake_failed",
    ];
    let connections = 3.0 + reasons.len() as f64;
    let after = wait_for("every connection to be accounted for", WAIT, || {
        let m = d.metrics();
        let settled = m.get("ingressd_connections_pending", &ing) == 0.0
            && m.get("ingressd_access_log_lines_total", &[])
                - before.get("ingressd_access_log_lines_total", &[])
                == connections;
        settled.then_some(m)
    });

    let mut expected = BTreeMap::new();
    expected.insert(
        series("ingressd_connections_accepted_total", &ing),
        connections,
    );
    expected.insert(series("ingressd_connections_routed_total", &ing), 3.0);
    for reason in reasons {
        expected.insert(
            series(
                "ingressd_connections_refused_total",
                &[("ingress", "obs"), ("reason", reason)],
            ),
            1.0,
        );
    }
    assert_eq!(
        before.changes(&after, "ingressd_connections_"),
        expected,
        "connection counters"
    );
    let ended = |end| {
        series(
            "ingressd_flows_ended_total",
            &[("ingress", "obs"), ("end", end)],
        )
    };
    assert_eq!(
        before.changes(&after, "ingressd_flows_ended_total"),
        BTreeMap::from([(ended("closed"), 2.0), (ended("client_reset"), 1.0)]),
    );
    assert!(before.changes(&after, "ingressd_flows_active").is_empty());

    // Bytes: exact per direction over both paths; the bulk flow went through the kernel.
    for dir in ["client_to_backend", "backend_to_client"] {
        let moved = |path| bytes(&after, dir, path) - bytes(&before, dir, path);
        assert_eq!(
            moved("sockmap") + moved("userspace"),
            (a_bytes + c_bytes + 10_000) as f64,
            "{dir}"
        );
        assert!(
            moved("sockmap") >= 0.99 * a_bytes as f64,
            "{dir}: kernel path"
        );
    }

    // Histograms: one observation per connection that reached each phase.
    let count = |name: &str, labels: &[(&str, &str)]| {
        after.get(&format!("{name}_count"), labels) - before.get(&format!("{name}_count"), labels)
    };
    // Every refusal after the hello was read, plus the three flows.
    assert_eq!(count("ingressd_client_hello_duration_seconds", &ing), 10.0);
    // a, b, c, and the failed handshake's backend (connected while the handshake ran).
    assert_eq!(count("ingressd_connect_duration_seconds", &ing), 4.0);
    assert_eq!(count("ingressd_tls_handshake_duration_seconds", &ing), 1.0);
    let by_mode = |mode| [("ingress", "obs"), ("mode", mode)];
    assert_eq!(
        count("ingressd_flow_duration_seconds", &by_mode("passthrough")),
        2.0
    );
    assert_eq!(
        count("ingressd_flow_duration_seconds", &by_mode("terminate")),
        1.0
    );
    assert_eq!(after.get("ingressd_access_log_dropped_total", &[]), 0.0);
    assert_eq!(after.get("ingressd_sockhash_entries", &[]), 0.0);
    assert!(after.get("process_open_fds", &[]) > 0.0);
    assert!(after.get("process_resident_memory_bytes", &[]) > 0.0);

    // The access log: one line per flow and per refusal.
    let lines = access_lines(&s.access_log);
    assert_eq!(lines.len(), connections as usize, "{lines:#?}");
    let find = |what: &str, f: &dyn Fn(&Value) -> bool| {
        let found: Vec<&Value> = lines.iter().filter(|l| f(l)).collect();
        assert_eq!(found.len(), 1, "{what}: {lines:#?}");
        found[0].clone()
    };
    let a_line = find("flow a", &|l| {
        l["end"] == "closed" && l["mode"] == "passthrough"
    });
    for (key, want) in [
        ("event", json!("flow")),
        ("ingress", json!("obs")),
        ("rule", json!("pass.obs.test")),
        ("sni", json!("pass.obs.test")),
        ("alpn", json!("h2")),
        ("instance", json!("echo")),
        ("mode", json!("passthrough")),
        ("path", json!("sockmap")),
        ("client_to_backend_bytes", json!(a_bytes)),
        ("backend_to_client_bytes", json!(a_bytes)),
        ("end", json!("closed")),
    ] {
        assert_eq!(a_line[key], want, "{key} in {a_line}");
    }
    assert!(a_line["flow_id"].as_u64().is_some(), "{a_line}");
    assert!(
        time::OffsetDateTime::parse(
            a_line["time"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339
        )
        .is_ok(),
        "{a_line}"
    );
    let b_line = find("flow b", &|l| {
        l["mode"] == "terminate" && l["event"] == "flow"
    });
    assert_eq!(
        (
            &b_line["path"],
            &b_line["alpn"],
            &b_line["client_to_backend_bytes"],
            &b_line["backend_to_client_bytes"],
            &b_line["relayed_bytes"],
            &b_line["end"],
        ),
        (
            &json!("userspace"),
            &Value::Null,
            &json!(10_000),
            &json!(10_000),
            &json!(20_000),
            &json!("closed")
        ),
        "{b_line}"
    );
    let c_line = find("flow c", &|l| l["end"] == "client_reset");
    assert_eq!(
        (
            &c_line["client_to_backend_bytes"],
            &c_line["backend_to_client_bytes"],
            &c_line["client"]
        ),
        (&json!(c_bytes), &json!(c_bytes), &live["client"]),
        "{c_line}"
    );
    let mut logged: Vec<&str> = lines.iter().filter_map(|l| l["reason"].as_str()).collect();
    logged.sort_unstable();
    let mut want = reasons.to_vec();
    want.sort_unstable();
    assert_eq!(logged, want, "one line per refusal");
    let unknown = find("unknown_sni", &|l| l["reason"] == "unknown_sni");
    assert_eq!(
        (
            &unknown["event"],
            &unknown["sni"],
            &unknown["ingress"],
            &unknown["rule"]
        ),
        (
            &json!("refused"),
            &json!("nope.obs.test"),
            &json!("obs"),
            &Value::Null
        ),
        "{unknown}"
    );
    let unreachable = find("backend_unreachable", &|l| {
        l["reason"] == "backend_unreachable"
    });
    assert_eq!(
        (&unreachable["instance"], &unreachable["rule"]),
        (&json!("echo"), &json!("{name}.down.obs.test")),
        "{unreachable}"
    );
}

/// `promtool check metrics` (Debian package `prometheus`), or a skip outside CI.
fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("promtool"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "promtool is missing (Debian package prometheus; cargo xtask setup --for test)"
        );
        eprintln!("skipping: promtool is not installed (Debian package prometheus)");
    }
    found
}

#[test]
fn the_exposition_passes_promtool_and_speaks_openmetrics_when_asked() {
    if !kernel_path_available("the_exposition_passes_promtool_and_speaks_openmetrics_when_asked") {
        return;
    }
    let Some(promtool) = promtool() else { return };
    let s = setup(&[]);
    let (a, _) = echo_flow(s.port, "pass.obs.test", 4096);
    refused(s.port, &client_hello("nope.obs.test", &[]), false);
    // Scraped while a kernel flow is live (after its userspace first phase), so its counters
    // come from the eBPF map.
    let text = wait_for("the flow on the kernel path", WAIT, || {
        let text = s.daemon.get("/metrics", &[]);
        (Metrics::parse(&text).get("ingressd_sockhash_entries", &[]) == 2.0).then_some(text)
    });
    finish(a);
    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let live = Metrics::parse(&text);
    assert_eq!(
        live.get(
            "ingressd_flows_active",
            &[
                ("ingress", "obs"),
                ("mode", "passthrough"),
                ("path", "sockmap")
            ]
        ),
        1.0
    );
    assert_eq!(live.get("ingressd_sockhash_entries", &[]), 2.0);
    assert!(live.get("ingressd_sockhash_capacity", &[]) >= 2.0);
    let openmetrics = s.daemon.get(
        "/metrics",
        &[("Accept", "application/openmetrics-text; version=1.0.0")],
    );
    assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
    assert!(
        openmetrics.contains("# TYPE ingressd_connections_refused counter"),
        "{openmetrics}"
    );
}

/// Asserts an access-log line's path and end.
#[track_caller]
fn assert_path_end(line: &Value, path: &str, end: &str) {
    assert_eq!(
        (&line["path"], &line["end"]),
        (&json!(path), &json!(end)),
        "{line}"
    );
}

/// A backend that reads until the client's FIN, waits `delay`, sends `reply` bytes and closes;
/// returns its port and the bytes it read.
fn late_reply_backend(delay: Duration, reply: usize) -> (u16, mpsc::Receiver<Vec<u8>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        std::thread::sleep(delay);
        let data: Vec<u8> = (0..reply).map(|i| (i % 241) as u8).collect();
        s.write_all(&data).unwrap();
        tx.send(got).unwrap();
    });
    (port, rx)
}

#[test]
fn a_flow_starts_in_userspace_and_the_kernel_path_takes_it_after_its_first_phase() {
    if !kernel_path_available(
        "a_flow_starts_in_userspace_and_the_kernel_path_takes_it_after_its_first_phase",
    ) {
        return;
    }
    // The defaults: 64 KiB or 50 ms in userspace, then the kernel path.
    let s = setup(&[]);
    let (d, port) = (&s.daemon, s.port);
    let moved = |before: &Metrics, after: &Metrics, path| {
        ["client_to_backend", "backend_to_client"]
            .map(|dir| bytes(after, dir, path) - bytes(before, dir, path))
    };
    let lines_now = || access_lines(&s.access_log).len();
    let last_line = |n: usize| nth_line(&s.access_log, n);

    // A short flow ends in its first phase: userspace only, never in the kernel's maps.
    let before = d.metrics();
    let (short, short_bytes) = echo_flow(port, "pass.obs.test", 1000);
    finish(short);
    let line = last_line(1);
    assert_eq!(
        (
            &line["path"],
            &line["end"],
            &line["client_to_backend_bytes"],
            &line["backend_to_client_bytes"],
            &line["relayed_bytes"]
        ),
        (
            &json!("userspace"),
            &json!("closed"),
            &json!(short_bytes),
            &json!(short_bytes),
            &json!(2 * short_bytes)
        ),
        "{line}"
    );
    let after = d.metrics();
    assert_eq!(moved(&before, &after, "userspace"), [short_bytes as f64; 2]);
    assert_eq!(moved(&before, &after, "sockmap"), [0.0; 2]);
    assert_eq!(
        before.changes(&after, "ingressd_connections_routed_total"),
        BTreeMap::from([(
            series("ingressd_connections_routed_total", &[("ingress", "obs")]),
            1.0
        )])
    );

    // A bulk flow: the first 64 KiB (or a little more: the drain) in userspace, the rest in
    // the kernel; every byte exact.
    let before = d.metrics();
    let (bulk, bulk_bytes) = echo_flow(port, "pass.obs.test", 8 << 20);
    finish(bulk);
    let line = last_line(2);
    assert_path_end(&line, "sockmap", "closed");
    assert_eq!(line["client_to_backend_bytes"], json!(bulk_bytes), "{line}");
    assert_eq!(line["backend_to_client_bytes"], json!(bulk_bytes), "{line}");
    let relayed = line["relayed_bytes"].as_u64().unwrap();
    assert!(
        (1..=512 << 10).contains(&relayed),
        "relayed {relayed}: {line}"
    );
    let after = d.metrics();
    let (user, kernel) = (
        moved(&before, &after, "userspace"),
        moved(&before, &after, "sockmap"),
    );
    for d in 0..2 {
        assert_eq!(user[d] + kernel[d], bulk_bytes as f64, "direction {d}");
        assert!(
            kernel[d] >= 0.9 * bulk_bytes as f64,
            "direction {d}: kernel {kernel:?}"
        );
    }
    assert_eq!(user[0] + user[1], relayed as f64);

    // A quiet flow moves to the kernel path when its time is up, with what it moved so far
    // counted as relayed; what follows goes through the kernel.
    let (mut quiet, quiet_bytes) = echo_flow(port, "pass.obs.test", 100);
    let listed = wait_for("the quiet flow on the kernel path", WAIT, || {
        let flows: Value = serde_json::from_str(&d.get("/flows?limit=10", &[])).unwrap();
        let flow = flows["flows"].as_array()?.first()?.clone();
        (flow["path"] == "sockmap").then_some(flow)
    });
    for dir in ["client_to_backend", "backend_to_client"] {
        assert_eq!(listed[dir]["kernel"], json!(0), "{listed}");
    }
    let more: Vec<u8> = (0..5000).map(|i| (i % 7) as u8).collect();
    quiet.write_all(&more).unwrap();
    let mut back = vec![0u8; more.len()];
    quiet.read_exact(&mut back).unwrap();
    assert_eq!(back, more);
    finish(quiet);
    let line = last_line(3);
    assert_path_end(&line, "sockmap", "closed");
    assert_eq!(line["relayed_bytes"], json!(2 * quiet_bytes), "{line}");
    assert_eq!(
        line["client_to_backend_bytes"],
        json!(quiet_bytes + 5000),
        "{line}"
    );

    // A reset in the first phase ends the flow there, as a reset.
    let (c, _) = echo_flow(port, "pass.obs.test", 10);
    reset(c);
    let line = last_line(4);
    assert_path_end(&line, "userspace", "client_reset");

    // A client that half-closes in the first phase, with a backend that answers only after
    // the phase is over: the kernel takes no half-closed socket into its sockhash, so the
    // engine relays the pair in userspace; the reply arrives whole, then the flow closes.
    let (late, got) = late_reply_backend(Duration::from_millis(300), 2 << 20);
    d.call(
        "POST",
        "/tcp-ingresses",
        json!({"name": "late", "listen_port": free_port(), "rules": [
            {"match": {"sni": "late.obs.test"}, "target": {"instance": "echo", "port": late}, "mode": "passthrough"}
        ]}),
    );
    let late_port = {
        let ingresses: Value = serde_json::from_str(&d.get("/tcp-ingresses", &[])).unwrap();
        let found = ingresses
            .as_array()
            .or_else(|| ingresses["items"].as_array())
            .unwrap()
            .iter()
            .find(|i| i["name"] == "late")
            .cloned()
            .unwrap();
        u16::try_from(found["listen_port"].as_u64().unwrap()).unwrap()
    };
    let n = lines_now();
    let mut c = connect(late_port);
    let hello = client_hello("late.obs.test", &[]);
    c.write_all(&hello).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    c.read_to_end(&mut reply).unwrap();
    assert_eq!(
        got.recv_timeout(WAIT).unwrap(),
        hello,
        "the backend got the hello, then the FIN"
    );
    assert_eq!(reply.len(), 2 << 20);
    assert!(
        reply.iter().enumerate().all(|(i, b)| *b == (i % 241) as u8),
        "the reply is exact"
    );
    let line = last_line(n + 1);
    assert_eq!(
        (&line["ingress"], &line["path"], &line["end"]),
        (&json!("late"), &json!("userspace"), &json!("closed")),
        "{line}"
    );
    assert_eq!(line["backend_to_client_bytes"], json!(2 << 20), "{line}");
    assert_eq!(d.metrics().get("ingressd_sockhash_entries", &[]), 0.0);
}

/// Opens a passthrough flow and waits until `/flows` lists it on the kernel path.
fn kernel_flow(d: &Ingressd, port: u16) -> TcpStream {
    let (s, _) = echo_flow(port, "pass.obs.test", 100);
    wait_for("the flow on the kernel path", WAIT, || {
        let flows: Value = serde_json::from_str(&d.get("/flows?limit=10", &[])).unwrap();
        let listed = flows["flows"].as_array()?;
        (listed.len() == 1 && listed[0]["path"] == "sockmap").then_some(())
    });
    s
}

#[test]
fn a_full_kernel_flow_table_is_logged_with_what_was_known_before_and_after_a_first_phase() {
    if !kernel_path_available(
        "a_full_kernel_flow_table_is_logged_with_what_was_known_before_and_after_a_first_phase",
    ) {
        return;
    }
    let routed = |line: &Value| {
        (
            line["ingress"].clone(),
            line["sni"].clone(),
            line["rule"].clone(),
            line["instance"].clone(),
            line["mode"].clone(),
        )
    };
    let expected = (
        json!("obs"),
        json!("pass.obs.test"),
        json!("pass.obs.test"),
        json!("echo"),
        json!("passthrough"),
    );

    // Without a first phase, the engine refuses the pair at once: a `flow_limit` refusal,
    // with the server name, rule, instance and backend the connection had reached.
    let s = setup(&[
        ("INGRESSD_TEST_KERNEL_FLOWS", "1"),
        ("INGRESSD_RELAY_FIRST_MS", "0"),
    ]);
    let (d, port) = (&s.daemon, s.port);
    let held = kernel_flow(d, port);
    let before = d.metrics();
    refused(port, &client_hello("pass.obs.test", &[]), false);
    let line = nth_line(&s.access_log, 1);
    assert_eq!(
        (&line["event"], &line["reason"]),
        (&json!("refused"), &json!("flow_limit")),
        "{line}"
    );
    assert_eq!(routed(&line), expected, "{line}");
    assert!(
        line["backend"]
            .as_str()
            .is_some_and(|b| b.starts_with("127.0.0.1:")),
        "{line}"
    );
    let after = d.metrics();
    assert_eq!(
        before.changes(&after, "ingressd_connections_refused_total"),
        BTreeMap::from([(
            series(
                "ingressd_connections_refused_total",
                &[("ingress", "obs"), ("reason", "flow_limit")]
            ),
            1.0
        )])
    );
    // The refused pair gave its slot back: once the held flow ends, the next one is spliced.
    finish(held);
    assert_path_end(&nth_line(&s.access_log, 2), "sockmap", "closed");
    finish(kernel_flow(d, port));
    assert_path_end(&nth_line(&s.access_log, 3), "sockmap", "closed");
    drop(s);

    // After a first phase the pair has moved bytes: a flow that ended with `kernel_error`,
    // its bytes counted, not a refused connection.
    let s = setup(&[("INGRESSD_TEST_KERNEL_FLOWS", "1")]);
    let (d, port) = (&s.daemon, s.port);
    let held = kernel_flow(d, port);
    let before = d.metrics();
    let (mut cut, sent) = echo_flow(port, "pass.obs.test", 1000);
    // The daemon closes both sockets when the engine refuses the pair.
    let _ = cut.read_to_end(&mut Vec::new());
    let line = nth_line(&s.access_log, 1);
    assert_eq!(line["event"], json!("flow"), "{line}");
    assert_path_end(&line, "userspace", "kernel_error");
    assert_eq!(routed(&line), expected, "{line}");
    assert_eq!(
        (
            &line["client_to_backend_bytes"],
            &line["backend_to_client_bytes"],
            &line["relayed_bytes"]
        ),
        (&json!(sent), &json!(sent), &json!(2 * sent)),
        "{line}"
    );
    let after = wait_for("the flow's end in the metrics", WAIT, || {
        let m = d.metrics();
        (before.changes(&m, "ingressd_flows_ended_total").len() == 1).then_some(m)
    });
    assert_eq!(
        before.changes(&after, "ingressd_flows_ended_total"),
        BTreeMap::from([(
            series(
                "ingressd_flows_ended_total",
                &[("ingress", "obs"), ("end", "kernel_error")]
            ),
            1.0
        )])
    );
    assert!(
        before
            .changes(&after, "ingressd_connections_refused_total")
            .is_empty()
    );
    finish(held);
    assert_path_end(&nth_line(&s.access_log, 2), "sockmap", "closed");
}

#[test]
fn with_bulk_flows_in_userspace_only_a_bulk_flow_keeps_the_relay() {
    if !kernel_path_available("with_bulk_flows_in_userspace_only_a_bulk_flow_keeps_the_relay") {
        return;
    }
    // A first phase long enough that both the bulk and the ping-pong flow below spend the
    // 64 KiB budget before it is up, however slow the machine.
    let s = setup(&[
        ("INGRESSD_BULK_FLOWS", "userspace"),
        ("INGRESSD_RELAY_FIRST_MS", "2000"),
    ]);
    let (d, port) = (&s.daemon, s.port);

    // A bulk flow spends the first phase's 64 KiB in time, in large reads: the relay keeps it,
    // every byte exact, none through the kernel.
    let before = d.metrics();
    let (bulk, bulk_bytes) = echo_flow(port, "pass.obs.test", 8 << 20);
    finish(bulk);
    let line = nth_line(&s.access_log, 1);
    assert_path_end(&line, "userspace", "closed");
    assert_eq!(
        (
            &line["client_to_backend_bytes"],
            &line["backend_to_client_bytes"],
            &line["relayed_bytes"]
        ),
        (
            &json!(bulk_bytes),
            &json!(bulk_bytes),
            &json!(2 * bulk_bytes)
        ),
        "{line}"
    );
    let after = d.metrics();
    for dir in ["client_to_backend", "backend_to_client"] {
        assert_eq!(
            bytes(&after, dir, "userspace") - bytes(&before, dir, "userspace"),
            bulk_bytes as f64
        );
        assert_eq!(
            bytes(&after, dir, "sockmap") - bytes(&before, dir, "sockmap"),
            0.0
        );
    }

    // A ping-pong of 512-byte messages spends the budget in time too, one small read at a
    // time: interactive, so the kernel path takes it after the budget, and carries the rest.
    let mut ping = connect(port);
    let hello = client_hello("pass.obs.test", &[]);
    ping.write_all(&hello).unwrap();
    let mut back = vec![0u8; hello.len()];
    ping.read_exact(&mut back).unwrap();
    let rounds = 256;
    for i in 0..rounds {
        let msg = [i as u8; 512];
        ping.write_all(&msg).unwrap();
        let mut got = [0u8; 512];
        ping.read_exact(&mut got).unwrap();
        assert_eq!(got, msg, "round {i}");
    }
    finish(ping);
    let line = nth_line(&s.access_log, 2);
    assert_path_end(&line, "sockmap", "closed");
    let total = hello.len() as u64 + rounds * 512;
    assert_eq!(line["client_to_backend_bytes"], json!(total), "{line}");
    let relayed = line["relayed_bytes"].as_u64().unwrap();
    assert!(
        (64 << 10..=80 << 10).contains(&relayed),
        "relayed {relayed} of {}: {line}",
        2 * total
    );

    // A quiet flow runs out of time first: the kernel path takes it, and carries what follows.
    let quiet = kernel_flow(d, port);
    let mut quiet = quiet;
    let more: Vec<u8> = (0..1 << 20).map(|i| (i % 13) as u8).collect();
    let writer = {
        let mut w = quiet.try_clone().unwrap();
        let more = more.clone();
        std::thread::spawn(move || w.write_all(&more).unwrap())
    };
    let mut back = vec![0u8; more.len()];
    quiet.read_exact(&mut back).unwrap();
    writer.join().unwrap();
    assert!(back == more, "the echo came back intact");
    finish(quiet);
    let line = nth_line(&s.access_log, 3);
    assert_path_end(&line, "sockmap", "closed");
    let relayed = line["relayed_bytes"].as_u64().unwrap();
    assert!(relayed < 1000, "relayed {relayed}: {line}");
    assert_eq!(d.metrics().get("ingressd_sockhash_entries", &[]), 0.0);
}
