//! Bulk transfers, byte-exact, and proof that the kernel path carried them.

use ingress_daemon::splice::{FlowEnd, Offload, Path};

use crate::support::{
    bulk_both_ways, bulk_one_way_then_other, engine, outcome, scaled_bytes, serial, spliced,
};

const GIB: u64 = 1 << 30;

async fn bulk(offload: Offload, total: u64, concurrent: bool) {
    let _serial = serial();
    let Some(engine) = engine(offload, |_| {}) else {
        return;
    };
    let mut s = spliced(&engine, |_, _| {});
    let moved = tokio::task::spawn_blocking(move || {
        if concurrent {
            bulk_both_ways(&mut s, total);
        } else {
            bulk_one_way_then_other(&mut s, total);
        }
        s
    })
    .await
    .unwrap();
    let out = outcome(moved.done).await;
    assert_eq!(out.end, FlowEnd::Closed);
    assert_eq!(out.client_to_backend.total(), total);
    assert_eq!(out.backend_to_client.total(), total);
    match offload {
        Offload::Off => {
            assert_eq!(out.path, Path::Userspace);
            assert_eq!(
                out.client_to_backend.kernel + out.backend_to_client.kernel,
                0
            );
        }
        _ => {
            assert_eq!(out.path, Path::Sockmap);
            // One direction at a time, the eBPF counters carry at least 99 % of each. With both
            // directions at once on two cores, the test's own readers stall long enough for the
            // gate to close now and then; the bound there is looser (figures are printed).
            let share = if concurrent { 90 } else { 99 };
            for (name, dir) in [
                ("up", out.client_to_backend),
                ("down", out.backend_to_client),
            ] {
                assert!(
                    dir.kernel * 100 >= dir.total() * share,
                    "{name}: kernel carried {} of {} bytes ({} relayed, {} gate closures)",
                    dir.kernel,
                    dir.total(),
                    dir.relayed,
                    out.gate_closures
                );
            }
        }
    }
    eprintln!(
        "bulk {offload}: {:?}, kernel {}/{} relayed {}/{} gates {}",
        out.duration,
        out.client_to_backend.kernel,
        out.backend_to_client.kernel,
        out.client_to_backend.relayed,
        out.backend_to_client.relayed,
        out.gate_closures
    );
    assert_eq!(engine.map_occupancy().unwrap_or((0, 0)), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_one_gib_each_way_kernel_path() {
    bulk(Offload::Required, scaled_bytes(GIB), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_one_gib_both_ways_at_once_kernel_path() {
    bulk(Offload::Required, scaled_bytes(GIB), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_one_gib_each_way_userspace_relay() {
    bulk(Offload::Off, scaled_bytes(GIB), true).await;
}
