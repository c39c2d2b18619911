//! Backpressure: a fast sender behind a slow receiver is slowed down, not buffered without
//! limit, and forced pause/resume of the kernel path loses, duplicates and reorders nothing.

use std::{
    io::Read,
    net::{Shutdown, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ingress_daemon::splice::{FlowEnd, Offload, Path};
use sha2::{Digest, Sha256};

use crate::support::{
    Pattern, StreamCheck, drain, drain_checked, engine, outcome, scaled_bytes, serial, spliced,
};

/// Largest allowed gap between bytes sent and bytes read, socket buffers included.
const LAG_BOUND: u64 = 64 << 20;

/// Reads at `rate` bytes/s while `slow` is set, then as fast as possible, to end of stream.
fn slow_reader(
    input: TcpStream,
    rate: u64,
    slow: Arc<AtomicBool>,
    read: Arc<AtomicU64>,
) -> (u64, [u8; 32]) {
    let (total, hash, _) = paced_read(input, rate, slow, read, None);
    (total, hash)
}

/// `slow_reader` that also checks the stream against pattern `seed` and explains the first
/// difference.
fn slow_reader_checked(
    input: TcpStream,
    rate: u64,
    slow: Arc<AtomicBool>,
    seed: u64,
    others: &[u64],
) -> (u64, [u8; 32], Option<String>) {
    let check = StreamCheck::new(seed, others);
    paced_read(input, rate, slow, Arc::new(AtomicU64::new(0)), Some(check))
}

fn paced_read(
    mut input: TcpStream,
    rate: u64,
    slow: Arc<AtomicBool>,
    read: Arc<AtomicU64>,
    mut check: Option<StreamCheck>,
) -> (u64, [u8; 32], Option<String>) {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    let mut budget_start = Instant::now();
    let mut budget_base = 0u64;
    loop {
        let want = if slow.load(Ordering::Relaxed) {
            let allowed = budget_base + rate * budget_start.elapsed().as_millis() as u64 / 1000;
            if allowed <= total {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            ((allowed - total) as usize).min(64 << 10)
        } else {
            budget_start = Instant::now();
            budget_base = total;
            buf.len()
        };
        let n = input.read(&mut buf[..want]).unwrap();
        if n == 0 {
            let found = check
                .as_ref()
                .and_then(|c| c.first_difference().map(str::to_owned));
            return (total, hash.finalize().into(), found);
        }
        hash.update(&buf[..n]);
        if let Some(check) = check.as_mut() {
            check.feed(&buf[..n]);
        }
        total += n as u64;
        read.store(total, Ordering::Relaxed);
    }
}

struct LagRun {
    max_lag: u64,
    sent: u64,
}

/// Client sends flat out toward a backend reading at 1 MiB/s for `slow_for`; meanwhile the
/// backend sends `reverse` bytes to a fast-reading client. Returns the worst lag seen.
fn run_slow_backend(
    client: TcpStream,
    server: TcpStream,
    slow_for: Duration,
    reverse: u64,
) -> LagRun {
    let sent = Arc::new(AtomicU64::new(0));
    let read = Arc::new(AtomicU64::new(0));
    let slow = Arc::new(AtomicBool::new(true));
    let stop = Arc::new(AtomicBool::new(false));

    let server_r = server.try_clone().unwrap();
    let reader = {
        let (slow, read) = (slow.clone(), read.clone());
        std::thread::spawn(move || slow_reader(server_r, 1 << 20, slow, read))
    };
    let mut client_w = client.try_clone().unwrap();
    let writer = {
        let (sent, stop) = (sent.clone(), stop.clone());
        std::thread::spawn(move || {
            let result = Pattern::new(11)
                .send_until(&mut client_w, &stop, &sent)
                .unwrap();
            client_w.shutdown(Shutdown::Write).unwrap();
            result
        })
    };
    let mut server_w = server;
    let reverse_writer = std::thread::spawn(move || {
        let h = Pattern::new(12).send(&mut server_w, reverse).unwrap();
        server_w.shutdown(Shutdown::Write).unwrap();
        h
    });
    let mut client_r = client;
    let reverse_reader = std::thread::spawn(move || drain(&mut client_r).unwrap());

    let start = Instant::now();
    let mut max_lag = 0;
    while start.elapsed() < slow_for {
        // `sent` counts completed writes and `read` completed reads: the true lag is at most
        // one block more than this.
        let lag = sent
            .load(Ordering::Relaxed)
            .saturating_sub(read.load(Ordering::Relaxed));
        max_lag = max_lag.max(lag);
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    slow.store(false, Ordering::Relaxed);
    let (total_sent, sent_hash) = writer.join().unwrap();
    assert_eq!(
        reader.join().unwrap(),
        (total_sent, sent_hash),
        "client → backend differs"
    );
    let reverse_hash = reverse_writer.join().unwrap();
    assert_eq!(
        reverse_reader.join().unwrap(),
        (reverse, reverse_hash),
        "backend → client differs"
    );
    LagRun {
        max_lag: max_lag + (1 << 20),
        sent: total_sent,
    }
}

async fn slow_backend(offload: Offload, reverse: u64) {
    let _serial = serial();
    // Scaled runs (an emulated guest) move less in the 5 s: the water marks shrink with them,
    // so the gate still has to close.
    let Some(engine) = engine(offload, |c| {
        c.high_water_bytes = scaled_bytes(c.high_water_bytes);
        c.low_water_bytes = scaled_bytes(c.low_water_bytes);
    }) else {
        return;
    };
    let s = spliced(&engine, |_, _| {});
    let (client, server) = (s.client, s.server);
    let run = tokio::task::spawn_blocking(move || {
        run_slow_backend(client, server, Duration::from_secs(5), reverse)
    })
    .await
    .unwrap();
    eprintln!(
        "{offload}: sent {} MiB in 5 s at 1 MiB/s read, worst lag {} MiB",
        run.sent >> 20,
        run.max_lag >> 20
    );
    assert!(
        run.max_lag <= LAG_BOUND,
        "lag {} MiB above the {} MiB bound",
        run.max_lag >> 20,
        LAG_BOUND >> 20
    );
    let out = outcome(s.done).await;
    assert_eq!(out.end, FlowEnd::Closed);
    if offload == Offload::Required {
        assert_eq!(out.path, Path::Sockmap);
        // Backpressure engaged: the window was held (bytes stayed in the kernel) or the gate
        // passed bytes to the relay.
        eprintln!(
            "window holds {}, gate closures {}",
            out.window_holds, out.gate_closures
        );
        assert!(
            out.window_holds + out.gate_closures > 0,
            "no backpressure engaged"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_slow_backend_slows_the_client_kernel_path() {
    slow_backend(Offload::Required, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_slow_backend_slows_the_client_userspace_relay() {
    slow_backend(Offload::Off, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_slow_backend_with_busy_reverse_direction_kernel_path() {
    slow_backend(Offload::Required, scaled_bytes(512 << 20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_slow_backend_with_busy_reverse_direction_userspace_relay() {
    slow_backend(Offload::Off, scaled_bytes(512 << 20)).await;
}

/// Both directions busy, the backend reading slowly, and the gate forced shut and open again
/// every 3 ms: nothing is lost, duplicated or reordered, and both paths really carried bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_forced_pause_resume_cycling_is_exact() {
    let _serial = serial();
    forced_cycling().await;
}

async fn forced_cycling() {
    let Some(engine) = engine(Offload::Required, |_| {}) else {
        return;
    };
    let s = spliced(&engine, |_, _| {});
    // `up` stays whole: the slow reader paces it, so it sets how long the run lasts and how many
    // pause/resume cycles it sees.
    let up = 96u64 << 20;
    let down = scaled_bytes(512 << 20).max(up);
    let stop = Arc::new(AtomicBool::new(false));
    let toggler = {
        let (engine, stop, id) = (engine.clone(), stop.clone(), s.id);
        tokio::spawn(async move {
            let mut cycles = 0u64;
            while !stop.load(Ordering::Relaxed) {
                engine.set_water_marks(id, 0, 0);
                tokio::time::sleep(Duration::from_millis(3)).await;
                engine.set_water_marks(id, 16 << 20, 4 << 20);
                tokio::time::sleep(Duration::from_millis(3)).await;
                cycles += 1;
            }
            cycles
        })
    };
    let (client, server) = (s.client, s.server);
    let exchanged = tokio::task::spawn_blocking(move || {
        let mut client_w = client.try_clone().unwrap();
        let mut server_w = server.try_clone().unwrap();
        let mut client_r = client;
        let server_r = server;
        let a = std::thread::spawn(move || {
            let h = Pattern::new(21).send(&mut client_w, up).unwrap();
            client_w.shutdown(Shutdown::Write).unwrap();
            h
        });
        let b = std::thread::spawn(move || {
            let h = Pattern::new(22).send(&mut server_w, down).unwrap();
            server_w.shutdown(Shutdown::Write).unwrap();
            h
        });
        let slow = Arc::new(AtomicBool::new(true));
        let got_up =
            std::thread::spawn(move || slow_reader_checked(server_r, 48 << 20, slow, 21, &[22]));
        let (down_len, down_hash, down_diff) = drain_checked(&mut client_r, 22, &[21]).unwrap();
        let (up_len, up_hash, up_diff) = got_up.join().unwrap();
        assert_eq!(
            (up_len, up_hash),
            (up, a.join().unwrap()),
            "client → backend differs: {}",
            up_diff.unwrap_or_default()
        );
        assert_eq!(
            (down_len, down_hash),
            (down, b.join().unwrap()),
            "backend → client differs: {}",
            down_diff.unwrap_or_default()
        );
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let cycles = toggler.await.unwrap();
    let out = outcome(s.done).await;
    if let Err(failed) = exchanged {
        panic!("the exchange failed ({failed}); the flow ended {out:?}");
    }
    eprintln!(
        "{cycles} pause/resume cycles; up kernel {} relayed {}, down kernel {} relayed {}, {} gate closures, {} retransmitted bytes cut",
        out.client_to_backend.kernel,
        out.client_to_backend.relayed,
        out.backend_to_client.kernel,
        out.backend_to_client.relayed,
        out.gate_closures,
        out.overlap_trimmed
    );
    assert_eq!(out.end, FlowEnd::Closed);
    assert!(cycles > 50, "only {cycles} cycles");
    for dir in [out.client_to_backend, out.backend_to_client] {
        assert!(
            dir.kernel > 0 && dir.relayed > 0,
            "both paths carry bytes: {dir:?}"
        );
    }
    assert!(out.gate_closures > 10);
}
