//! The data path: every accepted connection is routed by its ClientHello and handed to the
//! splice engine (passthrough) or terminated with rustls and relayed (terminate).
//!
//! ```text
//!  accept ──▶ [handshake permit] ──▶ Postgres SSLRequest? ──▶ peek ClientHello ──▶ route
//!     ──▶ resolve ──▶ backend policy ──▶ connect (+ PROXY header)
//!     ──▶ passthrough: Engine::splice (kernel or relay)   terminate: rustls ──▶ relay
//! ```
//!
//! The accept loop never does per-connection work itself: it takes a permit (at most
//! `max_handshakes` connections between accept and hand-off, so a flood of slow clients waits
//! in the kernel's backlog instead of holding descriptors), accepts, and spawns the
//! connection's task. `EMFILE`/`ENFILE` back off instead of spinning. Every refusal has a
//! [`Reason`]; peer-caused ones are logged at debug, ours at warn.
//!
//! # Layout
//! - `refusal`: the stable refusal reasons.
//! - `conn`: one connection from accept to hand-off.
//! - `terminate`: the rustls handshake and the relay of terminated flows.

mod conn;
mod refusal;
mod terminate;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{net::TcpListener, sync::Semaphore, task::JoinHandle};
use tracing::{Instrument as _, debug, warn};

pub use refusal::{Reason, Refusal};

use crate::{
    connect::{ConnectOptions, FlowOptions},
    control::Shared,
    listeners::{ConnectionHandler, IngressHandle},
    splice::Engine,
};

/// Counters of the data path (the metrics module reads them).
#[derive(Debug, Default)]
pub struct ProxyStats {
    accepted: AtomicU64,
    routed: AtomicU64,
    refused: [AtomicU64; Reason::ALL.len()],
    active_terminated: AtomicU64,
}

impl ProxyStats {
    /// Connections accepted.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections routed to a backend.
    pub fn routed(&self) -> u64 {
        self.routed.load(Ordering::Relaxed)
    }

    /// Connections refused for `reason`.
    pub fn refused(&self, reason: Reason) -> u64 {
        Reason::ALL
            .iter()
            .position(|r| *r == reason)
            .and_then(|i| self.refused.get(i))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Terminated flows being relayed now.
    pub fn active_terminated(&self) -> u64 {
        self.active_terminated.load(Ordering::Relaxed)
    }

    fn refuse(&self, reason: Reason) {
        if let Some(c) = Reason::ALL
            .iter()
            .position(|r| *r == reason)
            .and_then(|i| self.refused.get(i))
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Data-path settings, from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Time from accept to a complete ClientHello (and TLS handshake when terminating).
    pub handshake_timeout: Duration,
    /// Largest ClientHello accepted.
    pub max_hello_bytes: usize,
    /// Connections between accept and hand-off at once.
    pub max_handshakes: usize,
    /// Flows (passthrough and terminated) at once.
    pub max_flows: usize,
    /// Backend connect timeout.
    pub connect_timeout: Duration,
}

impl Settings {
    /// The settings of a configuration.
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            handshake_timeout: Duration::from_millis(config.handshake_timeout_ms),
            max_hello_bytes: config.max_hello_bytes,
            max_handshakes: config.max_handshakes,
            max_flows: config.max_flows,
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
        }
    }
}

/// The data path; cheap to clone.
#[derive(Clone)]
pub struct DataPlane {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Shared,
    engine: Engine,
    settings: Settings,
    tls: terminate::TlsConfigs,
    handshakes: Arc<Semaphore>,
    flows: AtomicUsize,
    stats: ProxyStats,
    ktls: bool,
}

impl DataPlane {
    /// The data path over the control plane's tables and a started splice engine.
    pub fn new(shared: Shared, engine: Engine, settings: Settings) -> Self {
        let ktls = match crate::sys::probe_ktls() {
            Ok(available) => available,
            Err(err) => {
                warn!(error = %err, "cannot probe for kernel tls");
                false
            }
        };
        tracing::info!(
            ktls_available = ktls,
            splice_path = engine.path().as_str(),
            "data path ready; terminated flows use the rustls relay"
        );
        let tls = terminate::TlsConfigs::new(shared.certs.clone());
        Self {
            inner: Arc::new(Inner {
                handshakes: Arc::new(Semaphore::new(settings.max_handshakes.max(1))),
                shared,
                engine,
                settings,
                tls,
                flows: AtomicUsize::new(0),
                stats: ProxyStats::default(),
                ktls,
            }),
        }
    }

    /// Data-path counters.
    pub fn stats(&self) -> &ProxyStats {
        &self.inner.stats
    }

    /// The splice engine.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// Whether the kernel offers kernel TLS (probed at start-up).
    pub fn ktls_available(&self) -> bool {
        self.inner.ktls
    }

    /// Flows (passthrough and terminated) now.
    pub fn active_flows(&self) -> usize {
        self.inner.flows.load(Ordering::Relaxed)
    }

    fn connect_options(&self, liveness: bool) -> ConnectOptions {
        ConnectOptions {
            connect_timeout: self.inner.settings.connect_timeout,
            // Spliced sockets get their liveness settings from the engine.
            flow: if liveness {
                FlowOptions::default()
            } else {
                FlowOptions {
                    keepalive: None,
                    user_timeout: None,
                }
            },
        }
    }

    /// Takes a flow slot, or `None` at `max_flows`.
    fn take_flow_slot(&self) -> Option<FlowSlot> {
        let flows = &self.inner.flows;
        let max = self.inner.settings.max_flows;
        flows
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| FlowSlot { dp: self.clone() })
    }
}

/// One of the `max_flows` slots, given back on drop.
struct FlowSlot {
    dp: DataPlane,
}

impl Drop for FlowSlot {
    fn drop(&mut self) {
        self.dp.inner.flows.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnectionHandler for DataPlane {
    fn serve(&self, ingress: Arc<IngressHandle>, listener: TcpListener) -> JoinHandle<()> {
        let dp = self.clone();
        let span =
            tracing::info_span!("listener", ingress = %ingress.name, addr = %ingress.local_addr);
        tokio::spawn(
            async move {
                loop {
                    let permit = tokio::select! {
                        () = ingress.closed() => return,
                        permit = dp.inner.handshakes.clone().acquire_owned() => match permit {
                            Ok(permit) => permit,
                            Err(_) => return,
                        },
                    };
                    let accepted = tokio::select! {
                        () = ingress.closed() => return,
                        accepted = listener.accept() => accepted,
                    };
                    match accepted {
                        Ok((stream, peer)) => {
                            dp.inner.stats.accepted.fetch_add(1, Ordering::Relaxed);
                            let span = tracing::debug_span!("conn", %peer);
                            tokio::spawn(
                                conn::handle(dp.clone(), ingress.clone(), stream, peer, permit)
                                    .instrument(span),
                            );
                        }
                        Err(err) => {
                            let pause = match err.raw_os_error() {
                                Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                                    warn!(error = %err, "out of descriptors or memory; pausing accept");
                                    Duration::from_millis(100)
                                }
                                _ => {
                                    debug!(error = %err, "accept failed");
                                    Duration::from_millis(5)
                                }
                            };
                            tokio::time::sleep(pause).await;
                        }
                    }
                }
            }
            .instrument(span),
        )
    }
}

impl crate::api::ReadinessProbe for DataPlane {
    fn name(&self) -> &'static str {
        "data_path"
    }

    fn report(&self) -> crate::api::ProbeReport {
        let engine = &self.inner.engine;
        crate::api::ProbeReport {
            ready: true,
            detail: serde_json::json!({
                "splice_path": engine.path().as_str(),
                "ebpf_loaded": engine.path() == crate::splice::Path::Sockmap,
                "ebpf_unavailable_reason": engine.kernel_unavailable_reason(),
                "ktls_available": self.inner.ktls,
                "terminated_flows_path": "userspace",
                "flows": self.active_flows(),
                "kernel_flows": engine.kernel_dirs_in_use().unwrap_or(0) / 2,
            }),
        }
    }
}
