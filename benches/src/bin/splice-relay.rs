//! `splice-relay`: a standalone proxy around the splice engine — accept on loopback, connect to
//! one backend, hand both sockets to [`Engine::splice`]. No ClientHello, no routing: it shows
//! what the engine costs on its own, and stands in for the daemon in the peer comparison.
#![forbid(unsafe_code)]

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result};
use clap::Parser;
use ingress_daemon::splice::{Engine, EngineConfig, FlowOptions, Offload, OnEnd, into_owned_fd};

/// Flows moving at least this many bytes are reported when they end.
const BULK_FLOW_BYTES: u64 = 64 << 20;
use tokio::net::{TcpListener, TcpStream};

/// A splice-engine relay from one loopback port to one backend.
#[derive(Parser)]
struct Args {
    /// Address to accept on.
    #[arg(long)]
    listen: SocketAddr,
    /// Backend every connection goes to.
    #[arg(long)]
    backend: SocketAddr,
    /// `required` (kernel splice), `off` (userspace relay) or `auto`.
    #[arg(long, default_value = "required")]
    offload: Offload,
    /// In-flight bytes per direction above which the sender's window is held closed (default:
    /// the engine's).
    #[arg(long)]
    soft_water_bytes: Option<u64>,
    /// In-flight bytes per direction above which the kernel path's gate closes (default: the
    /// engine's).
    #[arg(long)]
    high_water_bytes: Option<u64>,
    /// In-flight bytes below which a closed gate reopens (default: the engine's).
    #[arg(long)]
    low_water_bytes: Option<u64>,
    /// Send buffer of each socket on the kernel path; 0 leaves the kernel's autotuning
    /// (default: the engine's).
    #[arg(long)]
    send_buffer_bytes: Option<u64>,
    /// Receive buffer of each socket on the kernel path, fixed at its direction's first hold;
    /// 0 leaves the kernel's autotuning (default: the engine's).
    #[arg(long)]
    receive_buffer_bytes: Option<u64>,
    /// Size of a relay buffer (default: the engine's).
    #[arg(long)]
    relay_buffer_bytes: Option<usize>,
    /// Runtime worker threads and engine event loops (default: one per CPU).
    #[arg(long)]
    workers: Option<usize>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("splice-relay")
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(serve(args, workers))
}

async fn serve(args: Args, workers: usize) -> Result<()> {
    let defaults = EngineConfig::default();
    let engine = Engine::start(EngineConfig {
        offload: args.offload,
        shards: workers,
        soft_water_bytes: args.soft_water_bytes.unwrap_or(defaults.soft_water_bytes),
        high_water_bytes: args.high_water_bytes.unwrap_or(defaults.high_water_bytes),
        low_water_bytes: args.low_water_bytes.unwrap_or(defaults.low_water_bytes),
        send_buffer_bytes: args.send_buffer_bytes.unwrap_or(defaults.send_buffer_bytes),
        receive_buffer_bytes: args
            .receive_buffer_bytes
            .unwrap_or(defaults.receive_buffer_bytes),
        relay_buffer_bytes: args
            .relay_buffer_bytes
            .unwrap_or(defaults.relay_buffer_bytes),
        ..defaults
    })
    .context("starting the splice engine")?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    eprintln!(
        "splice-relay listening on {} to {} (path {})",
        listener.local_addr()?,
        args.backend,
        engine.path().as_str()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    let engine = engine.clone();
                    tokio::spawn(relay(engine, client, args.backend));
                }
                // Out of descriptors or similar: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
    }
    engine.shutdown(Duration::ZERO).await;
    Ok(())
}

async fn relay(engine: Engine, client: TcpStream, backend: SocketAddr) {
    let Ok(backend) = TcpStream::connect(backend).await else {
        return;
    };
    if client.set_nodelay(true).is_err() || backend.set_nodelay(true).is_err() {
        return;
    }
    let (Ok(client), Ok(backend)) = (into_owned_fd(client), into_owned_fd(backend)) else {
        return;
    };
    // Bulk flows report which path carried their bytes (in the relay's log), so a slow kernel
    // path can be told from one whose gate handed the flow to the relay.
    let on_end: OnEnd = Box::new(|o: ingress_daemon::splice::FlowOutcome| {
        let total = o.client_to_backend.total() + o.backend_to_client.total();
        if total >= BULK_FLOW_BYTES {
            eprintln!(
                "flow {}: {} {:?}, up kernel {} relayed {}, down kernel {} relayed {}, \
                 gate closures {}, window holds {}, {}",
                o.id,
                o.path.as_str(),
                o.duration,
                o.client_to_backend.kernel,
                o.client_to_backend.relayed,
                o.backend_to_client.kernel,
                o.backend_to_client.relayed,
                o.gate_closures,
                o.window_holds,
                o.end.as_str()
            );
        }
    });
    if let Err(e) = engine.splice(client, backend, FlowOptions::default(), Some(on_end)) {
        eprintln!("splice-relay: {e}");
    }
}
