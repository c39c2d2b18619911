//! The daemon under a service manager: the unit file in `dist/` is valid, its capability set
//! is enough for the kernel path without root, and readiness is notified only once the daemon
//! serves.
use std::{
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixDatagram,
    path::PathBuf,
    process::Command,
    sync::mpsc,
    time::{Duration, Instant},
};

use ingress_tests::{
    Daemon, Offload,
    binary::ingressd_binary,
    bulk::{self, BulkServer, BulkSpec, Preamble},
    ports::next_loopback,
    skip::skip_test,
    tls::client_hello,
    tools,
    workdir::WorkDir,
};

use crate::common::{Ingress, backend_to_client_by_path, create_ingress, instance, rule};

const WAIT: Duration = Duration::from_secs(30);

/// The unit file shipped in the repository.
fn unit_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("dist")
        .join("ingressd.service")
}

fn unit() -> String {
    std::fs::read_to_string(unit_path()).unwrap()
}

/// The values of `key=` lines in the unit.
fn unit_values(key: &str) -> Vec<String> {
    let prefix = format!("{key}=");
    unit()
        .lines()
        .filter_map(|line| line.strip_prefix(&prefix).map(str::to_owned))
        .collect()
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    let Ok(analyze) = tools::find("systemd-analyze") else {
        skip_test("systemd-analyze is not installed");
        return;
    };
    assert_eq!(unit_values("Type"), ["notify"]);
    let exec = unit_values("ExecStart");
    assert_eq!(
        exec,
        ["/usr/local/bin/ingressd"],
        "the documented install path"
    );
    // `verify` checks that ExecStart is executable: point it at the binary under test.
    let work = WorkDir::new("ingt-unit-").unwrap();
    let copy = work.join("ingressd.service");
    let binary = ingressd_binary().unwrap();
    std::fs::write(&copy, unit().replace(&exec[0], binary.to_str().unwrap())).unwrap();
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {said}");
    assert!(
        !said.contains("ingressd.service"),
        "systemd-analyze had remarks on the unit: {said}"
    );
}

/// `setpriv` arguments giving an unprivileged user exactly the unit's capabilities.
fn unprivileged_with_unit_capabilities() -> Vec<String> {
    let ambient = unit_values("AmbientCapabilities");
    assert_eq!(ambient.len(), 1, "one AmbientCapabilities line");
    assert_eq!(
        unit_values("CapabilityBoundingSet"),
        ambient,
        "the bounding set is the ambient set"
    );
    let caps: Vec<String> = ambient[0]
        .split_whitespace()
        .map(|cap| format!("+{}", cap.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    assert!(!caps.is_empty());
    let caps = caps.join(",");
    vec![
        "--reuid=65534".to_owned(),
        "--regid=65534".to_owned(),
        "--clear-groups".to_owned(),
        "--no-new-privs".to_owned(),
        format!("--inh-caps=-all,{caps}"),
        format!("--ambient-caps=-all,{caps}"),
        format!("--bounding-set=-all,{caps}"),
    ]
}

/// A bulk server behind a passthrough ingress `name` for server name `sni`.
fn bulk_passthrough(
    api: &ingress_tests::ApiClient,
    name: &str,
    sni: &str,
) -> (BulkServer, Ingress) {
    let ip = next_loopback();
    let server = BulkServer::start(ip, Preamble::TlsRecord).unwrap();
    instance(api, "bulk", ip);
    let ingress = create_ingress(
        api,
        name,
        serde_json::json!([rule(sni, "bulk", server.addr().port(), "passthrough")]),
        None,
    );
    (server, ingress)
}

#[test]
fn the_unit_capabilities_carry_a_flow_on_the_kernel_path_without_root() {
    if !ingress_tests::is_root() {
        skip_test("switching to an unprivileged user needs root");
        return;
    }
    let Ok(setpriv) = tools::find("setpriv") else {
        skip_test("setpriv is not installed");
        return;
    };
    // The harness starts `sh`, which hands the data directory to the unprivileged user and
    // execs `setpriv` → `ingressd`: the daemon's PID is the harness's child.
    let script = r#"set -e
chmod 0755 "$(dirname "$INGRESSD_DATA_DIR")"
chown 65534:65534 "$INGRESSD_DATA_DIR"
setpriv="$1"; shift
exec "$setpriv" "$@""#;
    let mut builder = Daemon::builder()
        .binary("/bin/sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .arg(setpriv.to_str().unwrap())
        .offload(Offload::Required);
    for arg in unprivileged_with_unit_capabilities() {
        builder = builder.arg(arg);
    }
    let daemon = builder
        .arg(ingressd_binary().unwrap().to_str().unwrap())
        .start()
        .expect("ingressd starts unprivileged with offload required");
    let pid = daemon.pid().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line
            .split_whitespace()
            .skip(1)
            .all(|uid| uid == "65534"),
        "the daemon runs unprivileged: {uid_line}"
    );

    let api = daemon.api().unwrap();
    let (server, ingress) = bulk_passthrough(&api, "caps", "bulk.caps.test");
    let hello = client_hello("bulk.caps.test", &[]).unwrap();
    let spec = BulkSpec::both_ways(32 << 20, 41);
    let stream = TcpStream::connect(ingress.addr()).unwrap();
    let client = bulk::exchange(stream, &hello, &spec).unwrap();
    client.check(spec.up_bytes).unwrap();
    let report = server.next_report(WAIT).unwrap();
    assert_eq!(report.error, None);
    let side = report.side.unwrap();
    side.check(spec.down_bytes).unwrap();
    assert_eq!(client.sent_sha256, side.received.sha256);
    assert_eq!(side.sent_sha256, client.received.sha256);

    let want = spec.down_bytes as f64;
    let (kernel, relayed) = backend_to_client_by_path(&api, "caps", want);
    assert!(kernel + relayed >= want, "kernel {kernel}, relay {relayed}");
    assert!(
        kernel >= 0.99 * (kernel + relayed),
        "the kernel path carried {kernel} of {} bytes",
        kernel + relayed
    );
}

/// What the notification receiver saw when `READY=1` arrived.
struct AtReady {
    message: String,
    api_answered: bool,
    ingress_accepted: bool,
}

/// The next notification, as text.
fn next_notification(manager: &UnixDatagram) -> String {
    let mut buf = [0u8; 1024];
    let n = manager
        .recv(&mut buf)
        .expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn ready_is_notified_once_serving_and_stopping_on_sigterm() {
    let work = WorkDir::new("ingt-notify-").unwrap();
    let socket_path = work.join("notify.sock");
    let manager = UnixDatagram::bind(&socket_path).unwrap();
    manager.set_read_timeout(Some(WAIT)).unwrap();
    let mut daemon = Daemon::builder()
        .env("NOTIFY_SOCKET", socket_path.to_str().unwrap())
        .start()
        .unwrap();
    let first = next_notification(&manager);
    assert!(first.starts_with("READY=1\n"), "{first:?}");
    assert!(
        first.contains(&format!("\nMAINPID={}\n", daemon.pid().unwrap())),
        "{first:?}"
    );

    // With an ingress stored, restart: when READY=1 arrives, its listener and the API must
    // already accept connections.
    let api = daemon.api().unwrap();
    let (_server, ingress) = bulk_passthrough(&api, "notified", "bulk.notify.test");
    daemon.stop().unwrap();
    let stopping = next_notification(&manager);
    assert!(stopping.starts_with("STOPPING=1\n"), "{stopping:?}");

    let ingress_addr = ingress.addr();
    let addr_file = daemon.data_dir().join("api.addr");
    let (seen, at_ready) = mpsc::channel();
    let receiver = std::thread::spawn(move || {
        let message = next_notification(&manager);
        // The address file is written before READY=1.
        let api_addr = std::fs::read_to_string(&addr_file)
            .ok()
            .and_then(|s| s.trim().parse::<SocketAddr>().ok());
        let api_answered = api_addr.is_some_and(|a| TcpStream::connect_timeout(&a, WAIT).is_ok());
        let ingress_accepted = TcpStream::connect_timeout(&ingress_addr, WAIT).is_ok();
        seen.send(AtReady {
            message,
            api_answered,
            ingress_accepted,
        })
        .unwrap();
        manager
    });
    daemon.restart().unwrap();
    let ready = at_ready.recv_timeout(WAIT).unwrap();
    let manager = receiver.join().unwrap();
    assert!(
        ready.message.starts_with("READY=1\n"),
        "{:?}",
        ready.message
    );
    assert!(
        ready
            .message
            .contains(&format!("\nMAINPID={}\n", daemon.pid().unwrap())),
        "{:?}",
        ready.message
    );
    assert!(
        ready.api_answered,
        "the API accepted a connection at READY=1"
    );
    assert!(
        ready.ingress_accepted,
        "the stored ingress's listener accepted a connection at READY=1"
    );
    daemon.stop().unwrap();
    assert!(next_notification(&manager).starts_with("STOPPING=1\n"));
}

#[test]
fn a_bad_notify_socket_is_reported_and_the_daemon_serves() {
    let daemon = Daemon::builder()
        .env("NOTIFY_SOCKET", "relative/notify.sock")
        .start()
        .unwrap();
    daemon.api().unwrap().healthz().unwrap().assert_status(200);
    assert!(
        daemon.log().contains("not notifying the service manager"),
        "{}",
        daemon.log()
    );
}

/// Stops a process the test started indirectly (SIGTERM by PID) when dropped.
struct Reaped(u32);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.to_string()).status();
        let deadline = Instant::now() + WAIT;
        while process_alive(self.0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether `pid` runs (a zombie counts as gone).
fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or_default()
            .trim_start()
            .starts_with('Z')
    })
}

#[test]
fn upgrade_command_hands_the_daemon_over_and_the_service_manager_follows_it() {
    let work = WorkDir::new("ingt-upgrade-").unwrap();
    let socket_path = work.join("notify.sock");
    let manager = UnixDatagram::bind(&socket_path).unwrap();
    manager.set_read_timeout(Some(WAIT)).unwrap();
    let Some(daemon) =
        crate::common::kernel_daemon(&[("NOTIFY_SOCKET", socket_path.to_str().unwrap())])
    else {
        return;
    };
    let old_pid = daemon.pid().unwrap();
    assert!(next_notification(&manager).starts_with("READY=1\n"));

    // A live spliced flow that must survive the upgrade.
    let api = daemon.api().unwrap();
    let echo = ingress_tests::echo::EchoServer::start(next_loopback()).unwrap();
    instance(&api, "vm", echo.addr().ip());
    let ingress = create_ingress(
        &api,
        "upgraded",
        serde_json::json!([rule(
            "vm.upgrade.test",
            "vm",
            echo.addr().port(),
            "passthrough"
        )]),
        None,
    );
    let mut flow = TcpStream::connect(ingress.addr()).unwrap();
    flow.set_read_timeout(Some(WAIT)).unwrap();
    let hello = client_hello("vm.upgrade.test", &[]).unwrap();
    let round_trip = |flow: &mut TcpStream, payload: &[u8]| {
        use std::io::{Read as _, Write as _};
        flow.write_all(payload).unwrap();
        let mut back = vec![0u8; payload.len()];
        flow.read_exact(&mut back).unwrap();
        assert_eq!(back, payload, "the flow echoes byte-exact");
    };
    round_trip(&mut flow, &hello);

    let log = work.join("upgrade.log");
    let out = std::fs::File::create(&log).unwrap();
    let status = Command::new(ingressd_binary().unwrap())
        .args(["upgrade", "--timeout-secs", "30"])
        .env("INGRESSD_DATA_DIR", daemon.data_dir())
        .env("INGRESSD_API_LISTEN", "127.0.0.1:0")
        .env("INGRESSD_OFFLOAD", "required")
        .env("NOTIFY_SOCKET", &socket_path)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .status()
        .unwrap();
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "ingressd upgrade: {status:?}\n{said}");
    let new_pid: u32 = said
        .lines()
        .find_map(|l| {
            l.strip_prefix("ingressd: pid ")?
                .strip_suffix(" took over")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("upgrade names the new daemon: {said}"));
    let _new = Reaped(new_pid);
    assert_ne!(new_pid, old_pid);
    let ready = next_notification(&manager);
    assert!(ready.starts_with("READY=1\n"), "{ready:?}");
    assert!(
        ready.contains(&format!("\nMAINPID={new_pid}\n")),
        "the service manager is told the new main PID: {ready:?}"
    );

    let deadline = Instant::now() + WAIT;
    while process_alive(old_pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!process_alive(old_pid), "the old daemon exited");
    round_trip(&mut flow, b"still spliced after the upgrade");
    // A new client: the old one's keep-alive connection was to the daemon that just exited.
    daemon.api().unwrap().healthz().unwrap().assert_status(200);
    assert!(
        std::fs::read_dir(daemon.data_dir()).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("upgrade-")),
        "the private notification socket is removed"
    );
    drop(_new);
    assert!(next_notification(&manager).starts_with("STOPPING=1\n"));
}
