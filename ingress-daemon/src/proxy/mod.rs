//! The data path: every accepted connection is routed by its ClientHello and handed to the
//! splice engine (passthrough) or terminated with rustls and relayed (terminate).
//!
//! ```text
//!  accept ──▶ [handshake permit] ──▶ Postgres SSLRequest? ──▶ peek ClientHello ──▶ route
//!     ──▶ resolve ──▶ backend policy ──▶ connect (+ PROXY header)
//!     ──▶ passthrough: Engine::splice (kernel or relay)
//!     ──▶ terminate: rustls handshake ──▶ kTLS + splice (where the kernel has it) or relay
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
//! - `handoff`: pausing the accept loops and adopting flows for a takeover.
//! - `terminate`: the rustls handshake and the relay of terminated flows.
//! - [`ktls`]: terminated flows on kernel TLS — keys installed after the handshake, bytes
//!   moved with `splice(2)`.
//! - `observe`: what the data path shows — metrics at scrape time, live flows for `/flows`,
//!   the `/readyz` component.

mod conn;
mod handoff;
pub mod ktls;
mod observe;
mod read_ahead;
mod refusal;
pub mod relay_first;
mod terminate;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
    task::JoinHandle,
};
use tracing::{Instrument as _, debug, warn};

pub use handoff::PauseError;
pub use refusal::{Reason, Refusal};

use crate::{
    access_log::AccessLog,
    connect::{ConnectOptions, FlowOptions},
    control::Shared,
    listeners::{ConnectionHandler, IngressHandle},
    metrics::Metrics,
    splice::Engine,
};

/// The most a connection's task may take (checked in debug builds); it is about 2 KiB. With
/// the terminate path inline it was 6.5 KiB, copied whole several times per connection: a
/// quarter of a refused connection's instructions went to `memcpy`.
const CONN_TASK_BYTES: usize = 4096;

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
    /// How long a passthrough flow is relayed in userspace before the kernel path takes it.
    pub relay_first: relay_first::Limits,
    /// Whether a flow that spent the first phase's byte budget in time stays on the userspace
    /// relay.
    pub bulk_in_userspace: bool,
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
            relay_first: relay_first::Limits {
                bytes: config.relay_first_bytes,
                time: Duration::from_millis(config.relay_first_ms),
            },
            bulk_in_userspace: config.bulk_flows == crate::config::BulkFlows::Userspace,
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
    ktls: ktls::Support,
    metrics: Arc<Metrics>,
    access_log: AccessLog,
    terminated: observe::TerminatedFlows,
    /// True while a takeover has the accept loops paused.
    paused: watch::Sender<bool>,
}

impl DataPlane {
    /// The data path over the control plane's tables and a started splice engine, counting
    /// into `metrics` and logging finished flows and refusals to `access_log`.
    pub fn new(
        shared: Shared,
        engine: Engine,
        settings: Settings,
        metrics: Arc<Metrics>,
        access_log: AccessLog,
    ) -> Self {
        let ktls = match ktls::Support::probe() {
            Ok(support) => support,
            Err(err) => {
                warn!(error = %err, "cannot probe for kernel tls");
                ktls::Support::none()
            }
        };
        tracing::info!(
            ktls_available = ktls.available(),
            ktls_ciphers = ?ktls.names(),
            ktls_rekey = ktls.rekeys(),
            splice_path = engine.path().as_str(),
            terminated_path = if ktls.available() { "ktls_splice" } else { "userspace" },
            "data path ready"
        );
        let tls = terminate::TlsConfigs::new(shared.certs.clone(), ktls.provider());
        Self {
            inner: Arc::new(Inner {
                handshakes: Arc::new(Semaphore::new(settings.max_handshakes.max(1))),
                shared,
                engine,
                settings,
                tls,
                flows: AtomicUsize::new(0),
                ktls,
                metrics,
                access_log,
                terminated: observe::TerminatedFlows::default(),
                paused: watch::channel(false).0,
            }),
        }
    }

    /// The metrics the data path counts into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The access log.
    pub fn access_log(&self) -> &AccessLog {
        &self.inner.access_log
    }

    /// The splice engine.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// Whether the kernel offers kernel TLS (probed at start-up).
    pub fn ktls_available(&self) -> bool {
        self.inner.ktls.available()
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
        // Resolved once per listener: a connection only bumps atomics in it.
        let counters = dp.inner.metrics.ingress(&ingress.name);
        let span =
            tracing::info_span!("listener", ingress = %ingress.name, addr = %ingress.local_addr);
        tokio::spawn(
            async move {
                let mut paused = dp.inner.paused.subscribe();
                loop {
                    // Paused for a takeover: connections wait in the backlog for the next
                    // daemon, which gets this listening socket.
                    if *paused.borrow_and_update() {
                        tokio::select! {
                            () = ingress.closed() => return,
                            _ = paused.wait_for(|p| !*p) => {}
                        }
                    }
                    let permit = tokio::select! {
                        () = ingress.closed() => return,
                        permit = dp.inner.handshakes.clone().acquire_owned() => match permit {
                            Ok(permit) => permit,
                            Err(_) => return,
                        },
                    };
                    let accepted = tokio::select! {
                        () = ingress.closed() => return,
                        _ = paused.wait_for(|p| *p) => continue,
                        accepted = listener.accept() => accepted,
                    };
                    match accepted {
                        Ok((stream, peer)) => {
                            let accepted_at = Instant::now();
                            counters.on_accept();
                            let span = tracing::debug_span!("conn", %peer);
                            let conn = conn::Conn::new(counters.clone(), peer, accepted_at);
                            let task =
                                conn::handle(dp.clone(), ingress.clone(), stream, conn, permit)
                                    .instrument(span);
                            // The task is copied a few times on its way into the runtime, and
                            // its state is as large as its largest await: the rare paths
                            // (terminate, DNS) are boxed so that every connection does not
                            // pay for them.
                            debug_assert!(
                                size_of_val(&task) <= CONN_TASK_BYTES,
                                "a connection's task is {} bytes",
                                size_of_val(&task)
                            );
                            tokio::spawn(task);
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
