//! A takeover by a build whose verdict program differs (its version counter is raised through
//! the daemon's test hook): flows live during the hand-off keep running, byte-exact, on the
//! program they were spliced with, and flows opened afterwards run the new daemon's program
//! on the kernel path. When the new daemon cannot pin the handed-over maps (no bpffs), it
//! keeps the old program for new flows too, and says so.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use ingress_tests::ApiClient;
use serde_json::Value;

use super::{Bulk, open_flow, passthrough_setup, ping_pong, round_trip_and_close};
use crate::common::metric;

/// The daemon's test hook for the loaded program version.
const VERSION_ENV: &str = "INGRESSD_TEST_PROGRAM_VERSION";
/// The daemon's test hook for the directory it pins maps in.
const BPFFS_ENV: &str = "INGRESSD_TEST_BPFFS";
/// Bytes each flow opened after the hand-off echoes (its first 64 KiB are relayed in
/// userspace before the flow is handed to the kernel path).
const NEW_FLOW_BYTES: usize = 16 << 20;

/// The live flows, by ID.
fn flows(api: &ApiClient) -> Vec<Value> {
    api.get("/flows?limit=1000").unwrap().assert_status(200)["flows"]
        .as_array()
        .unwrap()
        .clone()
}

fn field(flow: &Value, direction: &str, path: &str) -> u64 {
    flow[direction][path].as_u64().unwrap()
}

/// Kernel bytes of a flow, both directions.
fn kernel_bytes(flow: &Value) -> u64 {
    field(flow, "client_to_backend", "kernel") + field(flow, "backend_to_client", "kernel")
}

fn version(flow: &Value) -> u64 {
    flow["program_version"].as_u64().unwrap()
}

/// The flow with `id`.
fn flow(api: &ApiClient, id: u64) -> Value {
    flows(api)
        .into_iter()
        .find(|f| f["id"].as_u64() == Some(id))
        .unwrap_or_else(|| panic!("flow {id} is listed"))
}

/// Writes `NEW_FLOW_BYTES` in chunks, reading each echo back before the next.
fn echo_through(stream: &mut TcpStream, seed: u8) {
    let chunk: Vec<u8> = (0..64usize << 10)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed))
        .collect();
    let mut back = vec![0u8; chunk.len()];
    for _ in 0..NEW_FLOW_BYTES / chunk.len() {
        stream.write_all(&chunk).unwrap();
        stream.read_exact(&mut back).unwrap();
        assert_eq!(back, chunk, "the echo came back byte-exact");
    }
}

/// A flow opened now, after `NEW_FLOW_BYTES` echoed through it: its listing.
fn fresh_flow(api: &ApiClient, addr: SocketAddr, known: &[u64], seed: u8) -> (TcpStream, Value) {
    let mut stream = open_flow(addr).unwrap();
    echo_through(&mut stream, seed);
    let listed = flows(api)
        .into_iter()
        .filter(|f| !known.contains(&f["id"].as_u64().unwrap()))
        .max_by_key(|f| f["id"].as_u64())
        .expect("the new flow is listed");
    (stream, listed)
}

fn program_metric(api: &ApiClient, name: &str) -> u64 {
    metric(api, name, &[]) as u64
}

/// Takes over with a successor whose program version is one higher; with `pin_impossible`, the
/// successor is told to pin in a directory that is not on a bpffs (it must keep the old
/// program for new flows). Checks every byte and which program serves which flow.
pub(crate) fn upgrade_to_a_new_program(pin_impossible: bool) {
    let Some((mut daemon, _echo, ingress)) = passthrough_setup() else {
        return;
    };
    let api = daemon.api().unwrap();
    let old_version = program_metric(&api, "ingressd_ebpf_program_version");
    assert!(old_version > 0, "the program version is exposed");
    assert_eq!(program_metric(&api, "ingressd_ebpf_program_inherited"), 0);
    let new_version = old_version + 1;

    let addr = ingress.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let bulk: Vec<Bulk> = (0..2)
        .map(|t| Bulk::start(open_flow(addr).unwrap(), 100 + t, stop.clone()))
        .collect();
    let pings = ping_pong(
        (0..4).map(|_| open_flow(addr).unwrap()).collect(),
        stop.clone(),
    );
    // Listed once their first phase (relayed in userspace) has handed them to the kernel, and
    // stamped once the program has judged their bytes.
    let before = ingress_tests::process::wait_until(
        "every old flow on the kernel path",
        Duration::from_secs(20),
        || {
            let listed = flows(&api);
            Ok((listed.len() == 6 && listed.iter().all(|f| version(f) != 0)).then_some(listed))
        },
    )
    .unwrap();
    for f in &before {
        assert_eq!(version(f), old_version, "old flow before the hand-off: {f}");
    }
    let old_ids: Vec<u64> = before.iter().map(|f| f["id"].as_u64().unwrap()).collect();

    let version_env = new_version.to_string();
    let pin_dir = daemon.data_dir().display().to_string();
    let mut env = vec![(VERSION_ENV, version_env.as_str())];
    if pin_impossible {
        env.push((BPFFS_ENV, pin_dir.as_str()));
    }
    let successor = daemon.start_successor(None, &env).unwrap();
    let (status, _) = daemon
        .complete_takeover(successor, Duration::from_secs(40))
        .unwrap();
    assert!(
        status.success(),
        "the old daemon exited cleanly: {status:?}"
    );
    let api = daemon.api().unwrap();
    let serving = if pin_impossible {
        old_version
    } else {
        new_version
    };
    assert_eq!(
        program_metric(&api, "ingressd_ebpf_program_version"),
        serving,
        "the metric names the program new flows run"
    );
    assert_eq!(
        program_metric(&api, "ingressd_ebpf_program_inherited"),
        u64::from(pin_impossible)
    );
    let ready = api.readyz().unwrap();
    let ebpf = &ready.assert_status(200)["components"]["data_path"]["detail"]["ebpf"];
    assert_eq!(ebpf["program_version"].as_u64(), Some(serving), "{ebpf}");
    if pin_impossible {
        assert_eq!(ebpf["program"], "inherited", "{ebpf}");
        let reason = ebpf["program_fallback_reason"].as_str().unwrap_or_default();
        assert!(reason.contains("not a bpffs"), "{ebpf}");
        assert!(
            daemon
                .log()
                .contains("cannot attach this daemon's verdict program")
        );
    } else {
        assert_eq!(ebpf["program"], "own", "{ebpf}");
    }

    // Old flows keep carrying bytes on the kernel path, under their program.
    let at_handoff: Vec<u64> = old_ids
        .iter()
        .map(|&id| kernel_bytes(&flow(&api, id)))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let grown = old_ids
            .iter()
            .zip(&at_handoff)
            .all(|(&id, &then)| kernel_bytes(&flow(&api, id)) > then);
        if grown {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "every old flow carried kernel bytes after the hand-off"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for &id in &old_ids {
        let f = flow(&api, id);
        assert_eq!(
            version(&f),
            old_version,
            "an old flow keeps its program after the hand-off: {f}"
        );
    }

    // New flows run the program that serves now, on the kernel path.
    let mut fresh = Vec::new();
    for seed in 0..2 {
        let known: Vec<u64> = flows(&api)
            .iter()
            .map(|f| f["id"].as_u64().unwrap())
            .collect();
        let (stream, listed) = fresh_flow(&api, addr, &known, seed);
        assert_eq!(version(&listed), serving, "a new flow's program: {listed}");
        let kernel = field(&listed, "client_to_backend", "kernel");
        assert!(
            kernel as f64 >= 0.99 * NEW_FLOW_BYTES as f64,
            "a new flow's bytes took the kernel path: {listed}"
        );
        fresh.push(stream);
    }

    stop.store(true, Ordering::SeqCst);
    for (t, b) in bulk.into_iter().enumerate() {
        b.finish(100 + t as u64);
    }
    let (ping_flows, samples) = pings.join().unwrap();
    assert!(!samples.is_empty());
    for (i, stream) in ping_flows.into_iter().chain(fresh).enumerate() {
        round_trip_and_close(stream, i as u64)
            .unwrap_or_else(|e| panic!("flow {i} after the hand-off: {e}"));
    }
    eprintln!(
        "takeover to program version {new_version} (pinning {}): old flows stayed on \
         {old_version}, new flows run {serving}",
        if pin_impossible {
            "impossible"
        } else {
            "possible"
        }
    );
}

#[test]
fn takeover_by_a_new_program_keeps_old_flows_on_theirs_and_new_flows_on_the_new_one() {
    upgrade_to_a_new_program(false);
}

#[test]
fn takeover_without_a_bpffs_keeps_the_old_program_for_new_flows() {
    upgrade_to_a_new_program(true);
}
