//! The daemon's lifecycle: bind the API, open and load the store, serve until shutdown.
//!
//! Design: the API socket is bound first so its real address (a test may ask for port 0) is
//! known before the control plane is built: the API's own port is reserved and the backend
//! policy protects the API address. Records are loaded and listeners bound before the API
//! starts answering; requests that arrive meanwhile wait in the backlog.
//!
//! Start-up contract for supervisors and tests: once the API is bound and the store is
//! loaded, the bound address is written to `<data_dir>/api.addr` (one line, e.g.
//! `127.0.0.1:41234`; temp file then rename, replacing any earlier file) and
//! `ingressd api listening on <addr>` is printed to stderr whatever the log filter; under a
//! service manager, `READY=1` is sent at the same point ([`crate::notify`]). A clean shutdown
//! removes the file.
use std::future::Future;
use std::sync::Arc;

use crate::api::{self, AppState, ReadinessProbe};
use crate::config::{ApiToken, Config};
use crate::control::{ControlPlane, Shared};
use crate::listeners::ConnectionHandler;

/// The file in the data directory holding the bound API address.
pub const API_ADDR_FILE: &str = "api.addr";

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The API address could not be bound.
    #[error("binding the API on {addr}: {source}")]
    ApiBind {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The data directory could not be opened.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The DNS resolver could not be set up.
    #[error(transparent)]
    Resolver(crate::resolver::ResolveError),
    /// The signal handlers could not be installed.
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
    /// The data path could not start (e.g. offload `required` without the kernel path).
    #[error("starting the data path: {0}")]
    DataPath(String),
    /// The API server failed.
    #[error("serving the API: {0}")]
    Serve(std::io::Error),
}

/// Binds the API address and returns it with the [`Shared`] tables built for the bound
/// address (so port 0 works, and the real API port is reserved and protected).
pub fn bind_api(mut config: Config) -> Result<(std::net::TcpListener, Shared), DaemonError> {
    let addr = config.api_listen;
    let err = |source| DaemonError::ApiBind { addr, source };
    let listener = std::net::TcpListener::bind(addr).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    config.api_listen = listener.local_addr().map_err(err)?;
    let shared = Shared::new(config).map_err(DaemonError::Resolver)?;
    Ok((listener, shared))
}

/// Like [`bind_api`] for an API socket handed over by the previous daemon (takeover).
pub fn adopt_api(
    mut config: Config,
    listener: std::net::TcpListener,
) -> Result<(std::net::TcpListener, Shared), DaemonError> {
    let addr = config.api_listen;
    let err = |source| DaemonError::ApiBind { addr, source };
    listener.set_nonblocking(true).map_err(err)?;
    config.api_listen = listener.local_addr().map_err(err)?;
    let shared = Shared::new(config).map_err(DaemonError::Resolver)?;
    Ok((listener, shared))
}

/// Called once the records are loaded and the listeners run, just before the API serves.
pub type OnLoaded = Box<dyn FnOnce(Arc<ControlPlane>) + Send>;

/// What the daemon runs with besides its configuration.
pub struct Parts {
    /// Lock-free tables shared with the data path (from [`bind_api`]).
    pub shared: Shared,
    /// The API bearer token, if configured.
    pub token: Option<ApiToken>,
    /// The data path: serves each ingress listener.
    pub handler: Arc<dyn ConnectionHandler>,
    /// Extra `/readyz` components (e.g. the eBPF splice engine).
    pub probes: Vec<Arc<dyn ReadinessProbe>>,
    /// Metrics and live flows of the data path, for `/metrics` and `/flows`.
    pub observe: Option<Arc<dyn crate::api::Observe>>,
    /// The service manager to tell when the daemon is ready and when it stops.
    pub notifier: Option<crate::notify::Notifier>,
    /// Listening sockets handed over by the previous daemon (takeover), used instead of
    /// binding.
    pub inherited_listeners: Vec<crate::listeners::BoundListener>,
    /// Called after loading, before serving (takeover: tell the old daemon to exit, serve the
    /// control socket).
    pub on_loaded: Option<OnLoaded>,
    /// Set when this daemon handed over to a new one: the API stops at once and the address
    /// file, now the new daemon's, is left alone.
    pub handover: Option<Arc<crate::takeover::Handover>>,
}

/// Loads the store, binds the ingress listeners and serves the API on `api` until `shutdown`
/// resolves; then listeners close and established flows are left to their tasks.
pub async fn run(
    api: std::net::TcpListener,
    parts: Parts,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let api_addr = parts.shared.config.api_listen;
    let api = tokio::net::TcpListener::from_std(api).map_err(|source| DaemonError::ApiBind {
        addr: api_addr,
        source,
    })?;
    let control = Arc::new(ControlPlane::new(parts.shared, parts.handler)?);
    control.inherit_listeners(parts.inherited_listeners);
    control.load().await;
    let mut state = AppState::new(control.clone(), parts.token);
    state.probes = Arc::new(parts.probes);
    control
        .store()
        .write_file(API_ADDR_FILE, format!("{api_addr}\n").as_bytes())?;
    state.observe = parts.observe;
    tracing::info!(addr = %api_addr, data_dir = %control.store().root().display(), "api listening");
    // The stable line supervisors wait for, printed even when logging is filtered.
    eprintln!("ingressd api listening on {api_addr}");
    // READY=1 carries MAINPID: after a takeover the service manager must follow this process
    // before the old one is told to exit.
    let notifier = parts.notifier.map(Arc::new);
    if let Some(notifier) = &notifier {
        notifier.ready(api_addr);
    }
    if let Some(on_loaded) = parts.on_loaded {
        on_loaded(control.clone());
    }
    let shutdown = async move {
        shutdown.await;
        if let Some(notifier) = &notifier {
            notifier.stopping();
        }
    };
    let handover = parts.handover;
    let stop = {
        let handover = handover.clone();
        async move {
            match handover {
                // Handed over: the API stops without STOPPING=1 (the service goes on).
                Some(h) => tokio::select! {
                    () = shutdown => {}
                    () = h.handed_over() => {}
                },
                None => shutdown.await,
            }
        }
    };
    let served = api::serve(api, api::app(state), stop).await;
    control.shutdown().await;
    if handover.as_ref().is_some_and(|h| h.is_handed_over()) {
        tracing::info!("api stopped after the hand-off");
        return served.map_err(DaemonError::Serve);
    }
    if let Err(e) = control.store().remove_file(API_ADDR_FILE) {
        tracing::warn!(error = %e, "removing the api address file");
    }
    tracing::info!("stopped");
    served.map_err(DaemonError::Serve)
}

/// Registers SIGINT and SIGTERM handlers now (so a signal during start-up is not lost) and
/// returns a future that resolves on the first of them. Call within a Tokio runtime.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down");
    })
}
