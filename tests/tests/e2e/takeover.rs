//! Zero-loss upgrades on the real binary: a second `ingressd --takeover` takes the listeners,
//! the API and every spliced flow over from the running daemon while flows move bytes
//! (checksummed bulk both ways, ping-pong, idle) and new connections arrive; nothing is lost,
//! duplicated, refused or reset, and the old process is gone. A successor that dies halfway
//! leaves the old daemon running everything, including FINs that arrived meanwhile; terminated
//! flows stay with the old daemon until they end. `program`: a successor with a different
//! verdict program.
mod program;

pub(crate) use program::upgrade_to_a_new_program;

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use ingress_tests::{Daemon, echo::EchoServer, pki::Pki, tls::client_hello, tls::tls_connect};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::common::{Ingress, certificate, create_ingress, instance, kernel_daemon, rule};

const SNI: &str = "pt.takeover.test";
const BULK_FLOWS: usize = 4;
const PING_FLOWS: usize = 8;
/// Live flows during the hand-off, all kinds together.
const LIVE_FLOWS: usize = 1_000;
const CHUNK: usize = 64 << 10;
/// Hand-offs in a row under load.
const HANDOFFS: usize = 2;

/// Block `seq` of bulk flow `tag`: every block differs.
fn block(tag: u64, seq: u64) -> Vec<u8> {
    let mut x = ((tag << 40) | seq).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..CHUNK)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A passthrough connection whose ClientHello came back through the echo backend.
fn open_flow(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let hello = client_hello(SNI, &[]).map_err(|e| std::io::Error::other(e.to_string()))?;
    stream.write_all(&hello)?;
    let mut back = vec![0_u8; hello.len()];
    stream.read_exact(&mut back)?;
    if back != hello {
        return Err(std::io::Error::other("the hello came back altered"));
    }
    Ok(stream)
}

/// Writes 8 bytes, reads them back, half-closes, and expects the echo's FIN.
fn round_trip_and_close(mut stream: TcpStream, tag: u64) -> std::io::Result<()> {
    let sent = tag.to_le_bytes();
    stream.write_all(&sent)?;
    let mut back = [0_u8; 8];
    stream.read_exact(&mut back)?;
    if back != sent {
        return Err(std::io::Error::other("the echo came back altered"));
    }
    stream.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest)?;
    if !rest.is_empty() {
        return Err(std::io::Error::other("bytes after the last echo"));
    }
    Ok(())
}

/// A bulk flow: one thread writes blocks (paced), another reads the echo; both hash.
struct Bulk {
    writer: JoinHandle<(u64, Vec<u8>)>,
    reader: JoinHandle<(u64, Vec<u8>)>,
}

impl Bulk {
    fn start(stream: TcpStream, tag: u64, stop: Arc<AtomicBool>) -> Self {
        let mut write_half = stream.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let (mut bytes, mut hash, mut seq) = (0_u64, Sha256::new(), 0);
            while !stop.load(Ordering::SeqCst) {
                let b = block(tag, seq);
                write_half.write_all(&b).unwrap();
                hash.update(&b);
                bytes += b.len() as u64;
                seq += 1;
                // About 20 MB/s per flow: bulk, without starving the machine.
                std::thread::sleep(Duration::from_millis(3));
            }
            write_half.shutdown(Shutdown::Write).unwrap();
            (bytes, hash.finalize().to_vec())
        });
        let mut read_half = stream;
        let reader = std::thread::spawn(move || {
            let (mut bytes, mut hash) = (0_u64, Sha256::new());
            let mut buf = vec![0_u8; CHUNK];
            loop {
                let n = read_half.read(&mut buf).unwrap();
                if n == 0 {
                    return (bytes, hash.finalize().to_vec());
                }
                hash.update(&buf[..n]);
                bytes += n as u64;
            }
        });
        Self { writer, reader }
    }

    /// Bytes each way, after checking the echo equals what was sent.
    fn finish(self, tag: u64) -> u64 {
        let (sent, sent_hash) = self.writer.join().unwrap();
        let (got, got_hash) = self.reader.join().unwrap();
        assert_eq!(
            got, sent,
            "bulk flow {tag}: bytes back differ from bytes sent"
        );
        assert_eq!(got_hash, sent_hash, "bulk flow {tag}: the echo differs");
        sent
    }
}

/// The ping-pong flows, and RTT samples with the time each ping was sent.
type Pings = (Vec<TcpStream>, Vec<(Instant, Duration)>);

/// Ping-pong over a few flows, round robin.
fn ping_pong(mut flows: Vec<TcpStream>, stop: Arc<AtomicBool>) -> JoinHandle<Pings> {
    std::thread::spawn(move || {
        let mut samples = Vec::new();
        let mut seq = 0_u64;
        while !stop.load(Ordering::SeqCst) {
            for (i, flow) in flows.iter_mut().enumerate() {
                let msg = [seq.to_le_bytes(), (i as u64).to_le_bytes()].concat();
                let at = Instant::now();
                flow.write_all(&msg).unwrap();
                let mut back = [0_u8; 16];
                flow.read_exact(&mut back).unwrap();
                assert_eq!(
                    &back[..],
                    &msg[..],
                    "ping {seq} on flow {i} came back altered"
                );
                samples.push((at, at.elapsed()));
                seq += 1;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        (flows, samples)
    })
}

/// New connections at `per_second`, each routed, echoed and closed; counts successes and
/// keeps the failures.
struct Churn {
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    thread: JoinHandle<()>,
}

impl Churn {
    fn start(addr: SocketAddr, per_second: u64, stop: Arc<AtomicBool>) -> Self {
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (ok, failures) = (ok.clone(), failures.clone());
            std::thread::spawn(move || {
                let interval = Duration::from_micros(1_000_000 / per_second);
                let mut next = Instant::now();
                let mut n = 0_u64;
                while !stop.load(Ordering::SeqCst) {
                    let result = open_flow(addr).and_then(|s| round_trip_and_close(s, n));
                    match result {
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failures
                            .lock()
                            .unwrap()
                            .push(format!("{:?}: {e}", e.kind())),
                    }
                    n += 1;
                    next += interval;
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
            })
        };
        Self {
            ok,
            failures,
            thread,
        }
    }

    fn finish(self) -> (u64, Vec<String>) {
        self.thread.join().unwrap();
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

/// A daemon on the kernel path with one passthrough ingress to an echo server.
fn passthrough_setup() -> Option<(Daemon, EchoServer, Ingress)> {
    let daemon = kernel_daemon(&[])?;
    let api = daemon.api().unwrap();
    let echo = EchoServer::start(Ipv4Addr::LOCALHOST).unwrap();
    instance(&api, "vm", Ipv4Addr::LOCALHOST);
    let ingress = create_ingress(
        &api,
        "upgrade",
        json!([rule(SNI, "vm", echo.addr().port(), "passthrough")]),
        None,
    );
    Some((daemon, echo, ingress))
}

/// The daemons' own figures for their hand-offs (`took_ms` of each "handed over" line).
fn handed_over_ms(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("handed over"))
        .filter_map(|l| {
            let at = l.find("took_ms=")?;
            Some(l[at + 8..].split_whitespace().next()?.to_owned())
        })
        .collect()
}

/// How long each successor took to load its program on the handed-over maps (`took_ms` of
/// each "own verdict program loaded" line): the verifier's time, spent before the old daemon
/// pauses (about 0.1 s on the host, up to ~15 s in an emulated guest).
fn program_load_times(log: &str) -> Vec<Duration> {
    log.lines()
        .filter(|l| l.contains("own verdict program loaded"))
        .filter_map(|l| {
            let at = l.find("took_ms=")?;
            let ms: f64 = l[at + 8..].split_whitespace().next()?.parse().ok()?;
            Some(Duration::from_secs_f64(ms / 1e3))
        })
        .collect()
}

fn listed_flows(daemon: &Daemon) -> usize {
    let flows = daemon.api().unwrap().get("/flows?limit=1000").unwrap();
    flows.assert_status(200)["flows"].as_array().unwrap().len()
}

#[test]
fn serial_takeover_keeps_a_thousand_live_flows_and_every_new_connection() {
    upgrade_under_load(LIVE_FLOWS, 1_000);
}

/// Takes over while `live_flows` flows move bytes (bulk, ping-pong, idle) and new connections
/// arrive at `per_second`; checks every byte and connection and prints the figures.
pub(crate) fn upgrade_under_load(live_flows: usize, per_second: u64) {
    let Some((mut daemon, _echo, ingress)) = passthrough_setup() else {
        return;
    };
    let addr = ingress.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let bulk: Vec<Bulk> = (0..BULK_FLOWS)
        .map(|t| Bulk::start(open_flow(addr).unwrap(), t as u64, stop.clone()))
        .collect();
    let pings = ping_pong(
        (0..PING_FLOWS).map(|_| open_flow(addr).unwrap()).collect(),
        stop.clone(),
    );
    let idle: Vec<TcpStream> = (0..live_flows - BULK_FLOWS - PING_FLOWS)
        .map(|_| open_flow(addr).unwrap())
        .collect();
    // Listed once their first phase (relayed in userspace) has handed them to the kernel.
    ingress_tests::process::wait_until("every flow listed", Duration::from_secs(20), || {
        Ok((listed_flows(&daemon) == live_flows).then_some(()))
    })
    .expect("every flow is live before");
    let churn = Churn::start(addr, per_second, stop.clone());
    std::thread::sleep(Duration::from_millis(500));

    // Two hand-offs in a row: the second daemon hands over what it adopted.
    let mut windows = Vec::new();
    let mut gone = Vec::new();
    for round in 0..HANDOFFS {
        let old_pid = daemon.pid().unwrap();
        let successor = daemon.start_successor(None, &[]).unwrap();
        let handoff_started = Instant::now();
        let (status, gone_after) = daemon
            .complete_takeover(successor, Duration::from_secs(40))
            .unwrap();
        windows.push(handoff_started..Instant::now() + Duration::from_millis(100));
        gone.push(gone_after);
        assert!(
            status.success(),
            "hand-off {round}: the old daemon exited cleanly: {status:?}"
        );
        assert_ne!(daemon.pid(), Some(old_pid));
        assert!(
            !std::path::Path::new(&format!("/proc/{old_pid}")).exists(),
            "hand-off {round}: the old process is gone"
        );
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            listed_flows(&daemon) >= live_flows,
            "hand-off {round}: the new daemon lists every flow"
        );
    }

    stop.store(true, Ordering::SeqCst);
    let (connections, failures) = churn.finish();
    let bulk_bytes: u64 = bulk
        .into_iter()
        .enumerate()
        .map(|(t, b)| b.finish(t as u64))
        .sum();
    let (ping_flows, samples) = pings.join().unwrap();
    for (i, flow) in idle.into_iter().chain(ping_flows).enumerate() {
        round_trip_and_close(flow, i as u64)
            .unwrap_or_else(|e| panic!("live flow {i} after the takeover: {e}"));
    }
    let worst_during = samples
        .iter()
        .filter(|(at, _)| windows.iter().any(|w| w.contains(at)))
        .map(|(_, rtt)| *rtt)
        .max()
        .unwrap_or_default();
    let worst = samples
        .iter()
        .map(|(_, rtt)| *rtt)
        .max()
        .unwrap_or_default();
    let gone_ms: Vec<String> = gone
        .iter()
        .map(|g| format!("{:.1}", g.as_secs_f64() * 1e3))
        .collect();
    eprintln!(
        "takeover: {live_flows} live flows, {HANDOFFS} hand-offs; old process gone {gone_ms:?} ms \
         after the successor started (daemons' hand-off, ready to exit: {:?} ms); worst \
         ping-pong RTT during the hand-offs {:.2} ms (whole run {:.2} ms, {} pings); \
         {connections} new connections, {} failed; {bulk_bytes} bytes each way on \
         {BULK_FLOWS} bulk flows",
        handed_over_ms(&daemon.log()),
        worst_during.as_secs_f64() * 1e3,
        worst.as_secs_f64() * 1e3,
        samples.len(),
        failures.len(),
    );
    assert!(failures.is_empty(), "new connections failed: {failures:?}");
    assert!(connections > 0);
    let loads = program_load_times(&daemon.log());
    assert_eq!(loads.len(), HANDOFFS, "each successor loaded its program");
    for (g, load) in gone.iter().zip(loads) {
        assert!(
            g.saturating_sub(load) < Duration::from_secs(10),
            "an old process lingered {g:?} (the successor's program load took {load:?})"
        );
    }
}

#[test]
fn takeover_whose_successor_dies_leaves_the_old_daemon_running_everything() {
    successor_dies_halfway();
}

/// A successor that exits after receiving everything: the old daemon resumes, FINs that
/// arrived while it was frozen reach the backend, bytes sent meanwhile arrive, and it accepts
/// again.
pub(crate) fn successor_dies_halfway() {
    let Some((mut daemon, echo, ingress)) = passthrough_setup() else {
        return;
    };
    let addr = ingress.addr();
    let mut flows: Vec<TcpStream> = (0..40).map(|_| open_flow(addr).unwrap()).collect();
    let closing: Vec<TcpStream> = flows.drain(..20).collect();
    let old_pid = daemon.pid().unwrap();
    let mut successor = daemon
        .start_successor(
            None,
            &[("INGRESSD_TAKEOVER_TEST_HOOK", "exit-after-ack:1500")],
        )
        .unwrap();
    // The successor loads its program before the old daemon pauses (up to ~15 s in an
    // emulated guest).
    daemon
        .wait_for_log("accepting paused and flows frozen", Duration::from_secs(40))
        .unwrap();
    // While the old daemon is frozen and the successor holds copies of every socket: FINs
    // from clients, and bytes on the others (the kernel still carries those).
    for flow in &closing {
        flow.shutdown(Shutdown::Write).unwrap();
    }
    for (i, flow) in flows.iter_mut().enumerate() {
        flow.write_all(&(i as u64).to_le_bytes()).unwrap();
    }
    let status = successor
        .wait_exit(Duration::from_secs(10))
        .unwrap()
        .expect("the successor exits");
    assert_eq!(status.code(), Some(3), "the test hook ended the successor");
    daemon
        .wait_for_log("takeover failed; resumed", Duration::from_secs(10))
        .unwrap();
    assert_eq!(daemon.pid(), Some(old_pid));
    assert!(daemon.is_running().unwrap(), "the old daemon runs on");
    // The FINs that arrived while frozen reached the backend, which answered with its own.
    for (i, mut flow) in closing.into_iter().enumerate() {
        let mut rest = Vec::new();
        flow.read_to_end(&mut rest)
            .unwrap_or_else(|e| panic!("closing flow {i}: {e}"));
        assert!(rest.is_empty(), "closing flow {i}: unexpected bytes");
    }
    let mut ends = 0;
    while ends < 20 {
        match echo.next_end(Duration::from_secs(10)).unwrap().1 {
            ingress_tests::echo::ConnEnd::Eof { .. } => ends += 1,
            other => panic!("a backend connection ended with {other:?}"),
        }
    }
    for (i, mut flow) in flows.into_iter().enumerate() {
        let mut back = [0_u8; 8];
        flow.read_exact(&mut back).unwrap();
        assert_eq!(
            back,
            (i as u64).to_le_bytes(),
            "flow {i}: bytes sent while frozen"
        );
        round_trip_and_close(flow, i as u64).unwrap();
    }
    // Accepting resumed.
    round_trip_and_close(open_flow(addr).unwrap(), 7).unwrap();
}

#[test]
fn takeover_leaves_terminated_flows_with_the_old_daemon_until_they_end() {
    let Some(mut daemon) = kernel_daemon(&[]) else {
        return;
    };
    let api = daemon.api().unwrap();
    let pki = Pki::new().unwrap();
    let echo = EchoServer::start(Ipv4Addr::LOCALHOST).unwrap();
    instance(&api, "vm", Ipv4Addr::LOCALHOST);
    certificate(&api, &pki, "tm", &["tm.takeover.test"]);
    let ingress = create_ingress(
        &api,
        "mixed",
        json!([
            rule(SNI, "vm", echo.addr().port(), "passthrough"),
            rule("tm.takeover.test", "vm", echo.addr().port(), "terminate"),
        ]),
        None,
    );
    let addr = ingress.addr();
    let client = pki.client_config(&[]).unwrap();
    let mut terminated = tls_connect(addr, "tm.takeover.test", client.clone()).unwrap();
    let echo_once = |tls: &mut ingress_tests::tls::TlsStream, n: u64| {
        tls.write_all(&n.to_le_bytes()).unwrap();
        tls.flush().unwrap();
        let mut back = [0_u8; 8];
        tls.read_exact(&mut back).unwrap();
        assert_eq!(back, n.to_le_bytes());
    };
    echo_once(&mut terminated, 1);
    let spliced = open_flow(addr).unwrap();
    let old_pid = daemon.pid().unwrap();

    let successor = daemon.start_successor(None, &[]).unwrap();
    let new_pid = successor.pid();
    let proc_dir = format!("/proc/{new_pid}");
    ingress_tests::process::wait_until("the successor to serve", Duration::from_secs(40), || {
        Ok(daemon
            .log()
            .contains("takeover complete; serving")
            .then_some(()))
    })
    .unwrap();
    assert!(std::path::Path::new(&proc_dir).exists());
    // The old daemon stays for its terminated flow, which keeps working; new connections,
    // spliced or terminated, go to the new daemon.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        std::path::Path::new(&format!("/proc/{old_pid}")).exists(),
        "the old daemon waits for its terminated flow"
    );
    echo_once(&mut terminated, 2);
    round_trip_and_close(spliced, 3).unwrap();
    let mut fresh = tls_connect(addr, "tm.takeover.test", client).unwrap();
    echo_once(&mut fresh, 4);
    drop(fresh);
    round_trip_and_close(open_flow(addr).unwrap(), 5).unwrap();
    // Once the terminated flow ends, the old daemon exits by itself.
    terminated.conn.send_close_notify();
    terminated.flush().unwrap();
    drop(terminated);
    let (status, _) = daemon
        .complete_takeover(successor, Duration::from_secs(40))
        .unwrap();
    assert_eq!(daemon.pid(), Some(new_pid));
    assert!(status.success(), "{status:?}");
}

/// Flows handed over end in the new daemon, which writes the access log line the old daemon
/// would have: the same flow ID, server name, rule, instance, client and backend, the bytes of
/// the whole flow (first phase and old daemon included) and its whole duration. The old daemon
/// writes none for them.
#[test]
fn adopted_flows_write_the_access_log_line_the_old_daemon_would_have() {
    let work = ingress_tests::workdir::WorkDir::new("ingt-adopted-log-").unwrap();
    let (old_log, new_log) = (work.join("old.log"), work.join("new.log"));
    let Some(mut daemon) = kernel_daemon(&[("INGRESSD_ACCESS_LOG", old_log.to_str().unwrap())])
    else {
        return;
    };
    let api = daemon.api().unwrap();
    let echo = EchoServer::start(Ipv4Addr::LOCALHOST).unwrap();
    instance(&api, "vm", Ipv4Addr::LOCALHOST);
    let ingress = create_ingress(
        &api,
        "adopted",
        json!([rule(SNI, "vm", echo.addr().port(), "passthrough")]),
        None,
    );
    let hello = client_hello(SNI, &[]).unwrap().len() as u64;
    let opened = Instant::now();
    // One flow moves 256 KiB each way before the hand-off (past its first phase), two only
    // their hello.
    let extra = [256_u64 << 10, 0, 0];
    let flows: Vec<TcpStream> = extra
        .iter()
        .map(|&n| {
            let mut flow = open_flow(ingress.addr()).unwrap();
            if n > 0 {
                let sent = block(9, 0).repeat((n as usize).div_ceil(CHUNK));
                let writer = {
                    let mut w = flow.try_clone().unwrap();
                    let sent = sent.clone();
                    std::thread::spawn(move || w.write_all(&sent).unwrap())
                };
                let mut back = vec![0_u8; sent.len()];
                flow.read_exact(&mut back).unwrap();
                writer.join().unwrap();
                assert!(back == sent, "the echo differs");
            }
            flow
        })
        .collect();
    ingress_tests::process::wait_until("every flow listed", Duration::from_secs(20), || {
        Ok((listed_flows(&daemon) == flows.len()).then_some(()))
    })
    .unwrap();
    let listed = api.get("/flows").unwrap();
    let mut ids: Vec<u64> = listed.assert_status(200)["flows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_u64().unwrap())
        .collect();
    ids.sort_unstable();
    let all_open = Instant::now();
    // Old enough that a duration counted from the adoption would be visibly short.
    std::thread::sleep(Duration::from_millis(300));

    let successor = daemon
        .start_successor(None, &[("INGRESSD_ACCESS_LOG", new_log.to_str().unwrap())])
        .unwrap();
    let (status, _) = daemon
        .complete_takeover(successor, Duration::from_secs(40))
        .unwrap();
    assert!(status.success(), "{status:?}");
    let clients: Vec<String> = flows
        .iter()
        .map(|f| f.local_addr().unwrap().to_string())
        .collect();
    let closing = Instant::now();
    for (i, flow) in flows.into_iter().enumerate() {
        round_trip_and_close(flow, i as u64).unwrap();
    }
    let lived = opened.elapsed();
    let at_least = closing.duration_since(all_open);
    let flow_lines = |path: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| l["event"] == "flow")
            .collect()
    };
    let lines = ingress_tests::process::wait_until(
        "a line for each adopted flow",
        Duration::from_secs(10),
        || {
            let lines = flow_lines(&new_log);
            Ok((lines.len() >= clients.len()).then_some(lines))
        },
    )
    .unwrap();
    assert_eq!(lines.len(), clients.len(), "one line per flow: {lines:#?}");
    let mut logged: Vec<u64> = lines
        .iter()
        .map(|l| l["flow_id"].as_u64().unwrap())
        .collect();
    logged.sort_unstable();
    assert_eq!(logged, ids, "the lines carry the flows' IDs");
    for line in &lines {
        let client = line["client"].as_str().unwrap();
        let i = clients
            .iter()
            .position(|c| c == client)
            .unwrap_or_else(|| panic!("a line for an unknown client: {line}"));
        let bytes = hello + extra[i] + 8;
        assert_eq!(line["ingress"], "adopted", "{line}");
        assert_eq!(line["sni"], SNI, "{line}");
        assert_eq!(line["rule"], SNI, "{line}");
        assert_eq!(line["instance"], "vm", "{line}");
        assert_eq!(line["backend"], echo.addr().to_string(), "{line}");
        assert_eq!(line["mode"], "passthrough", "{line}");
        assert_eq!(line["path"], "sockmap", "{line}");
        assert_eq!(line["end"], "closed", "{line}");
        assert_eq!(line["client_to_backend_bytes"], bytes, "{line}");
        assert_eq!(line["backend_to_client_bytes"], bytes, "{line}");
        // The first phase relayed at least the hello each way, and it counts.
        let relayed = line["relayed_bytes"].as_u64().unwrap();
        assert!((2 * hello..=2 * bytes).contains(&relayed), "{line}");
        // The whole flow, from before the hand-off to its end.
        let ms = line["duration_ms"].as_f64().unwrap();
        assert!(
            ms <= lived.as_secs_f64() * 1e3 + 1.0 && ms >= at_least.as_secs_f64() * 1e3 - 1.0,
            "duration {ms} ms of a flow that lived between {at_least:?} and {lived:?}"
        );
    }
    let old_lines = flow_lines(&old_log);
    assert!(
        old_lines
            .iter()
            .all(|l| !ids.contains(&l["flow_id"].as_u64().unwrap_or(u64::MAX))),
        "the old daemon wrote no line for a flow it handed over: {old_lines:#?}"
    );
}
