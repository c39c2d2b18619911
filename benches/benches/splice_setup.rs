//! The splice engine's per-flow cost: `Engine::splice` for a connected pair (keepalive options,
//! cookies, map inserts and the nudge on the kernel path; registration on the relay), and the
//! whole life of an empty flow (splice, both sides close, FINs propagated, maps cleaned,
//! `on_end` called). Kernel path (needs root and BPF) vs userspace relay.
#![forbid(unsafe_code)]

use std::{
    net::{TcpListener, TcpStream},
    os::fd::OwnedFd,
    sync::mpsc,
    time::{Duration, Instant},
};

use criterion::{BenchmarkId, Criterion};
use ingress_daemon::splice::{Engine, EngineConfig, FlowOptions, FlowOutcome, Offload};

/// Listeners for the two connected pairs of each flow.
struct Pairs {
    front: TcpListener,
    back: TcpListener,
}

/// A flow's sockets: the two the engine gets, and the test's two ends.
struct Flow {
    proxy_client: OwnedFd,
    proxy_backend: OwnedFd,
    client: TcpStream,
    server: TcpStream,
}

impl Pairs {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            front: TcpListener::bind("127.0.0.1:0")?,
            back: TcpListener::bind("127.0.0.1:0")?,
        })
    }

    fn flow(&self) -> std::io::Result<Flow> {
        let client = TcpStream::connect(self.front.local_addr()?)?;
        let (proxy_client, _) = self.front.accept()?;
        let proxy_backend = TcpStream::connect(self.back.local_addr()?)?;
        let (server, _) = self.back.accept()?;
        Ok(Flow {
            proxy_client: proxy_client.into(),
            proxy_backend: proxy_backend.into(),
            client,
            server,
        })
    }
}

/// Splices `iters` flows; returns the time spent in `Engine::splice` alone and in the whole
/// life of each flow.
fn run(engine: &Engine, pairs: &Pairs, iters: u64) -> (Duration, Duration) {
    let (mut setup, mut life) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..iters {
        let Ok(f) = pairs.flow() else {
            eprintln!("could not connect a pair");
            break;
        };
        let (tx, rx) = mpsc::channel::<FlowOutcome>();
        let started = Instant::now();
        let spliced = engine.splice(
            f.proxy_client,
            f.proxy_backend,
            FlowOptions::default(),
            Some(Box::new(move |o: ingress_daemon::splice::FlowOutcome| {
                let _ = tx.send(o);
            })),
        );
        setup += started.elapsed();
        if let Err(e) = spliced {
            eprintln!("splice failed: {e}");
            break;
        }
        drop(f.client);
        drop(f.server);
        if rx.recv_timeout(Duration::from_secs(5)).is_err() {
            eprintln!("a flow did not end within 5 s");
            break;
        }
        life += started.elapsed();
    }
    (setup, life)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
    })
}

fn main() {
    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("no runtime: {e}");
            return;
        }
    };
    let Ok(pairs) = Pairs::new() else {
        eprintln!("could not bind loopback listeners");
        return;
    };
    let mut group = c.benchmark_group("splice");
    for (name, offload) in [("kernel", Offload::Required), ("relay", Offload::Off)] {
        if offload == Offload::Required && !is_root() {
            eprintln!("skipping the kernel path: it needs root");
            continue;
        }
        let engine = {
            let _guard = runtime.enter();
            Engine::start(EngineConfig {
                offload,
                ..EngineConfig::default()
            })
        };
        let engine = match engine {
            Ok(e) => e,
            Err(e) => {
                eprintln!("skipping {name}: {e}");
                continue;
            }
        };
        group.bench_function(BenchmarkId::new("setup", name), |b| {
            b.iter_custom(|iters| run(&engine, &pairs, iters).0)
        });
        group.bench_function(BenchmarkId::new("setup_to_end", name), |b| {
            b.iter_custom(|iters| run(&engine, &pairs, iters).1)
        });
    }
    group.finish();
    c.final_summary();
}
