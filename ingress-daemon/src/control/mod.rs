//! The control plane: every API operation, applied to the store, the listeners and the
//! lock-free tables the data path reads.
//!
//! Design: one async mutex serialises mutations (they are rare and each touches the store,
//! ports and listeners together); reads of the data path never take it, they go through the
//! `ArcSwap`s in [`Shared`] and each listener's routing table. Each mutation validates fully,
//! binds any new listener, writes the record durably, and only then changes memory and swaps
//! tables, so a failure at any step leaves the previous state intact. Startup ([`ControlPlane::load`])
//! applies every record it can and reports the rest (see [`crate::store`]).
mod ingresses;
mod resources;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;
use tokio::sync::Mutex as AsyncMutex;

use crate::backend::{BackendPolicy, Instances};
use crate::certs::CertStore;
use crate::config::Config;
use crate::error::{ApiError, ErrorCode};
use crate::listeners::{ConnectionHandler, ListenerStatus, Listeners};
use crate::model::TcpIngress;
use crate::resolver::{ResolveError, Resolver};
use crate::route::SharedRoutes;
use crate::store::{FailedRecord, Store};

/// The lock-free state the data path reads: instances, certificates, backend policy, settings.
#[derive(Debug, Clone)]
pub struct Shared {
    /// Validated configuration.
    pub config: Arc<Config>,
    /// Static instance registry.
    pub instances: Arc<Instances>,
    /// Certificates for terminate mode (also a rustls `ResolvesServerCert`).
    pub certs: Arc<CertStore>,
    /// Backend address policy; check every resolved backend before connecting.
    pub policy: Arc<BackendPolicy>,
    /// Instance name → address (static registry, then DNS).
    pub resolver: Arc<Resolver>,
}

impl Shared {
    /// Empty registries for a configuration (whose `api_listen` is the bound address).
    pub fn new(config: Config) -> Result<Self, ResolveError> {
        let mut policy = BackendPolicy::new(config.backend_allow.clone(), config.api_listen);
        if config.api_listen.ip().is_unspecified() {
            // A wildcard API answers on every local address: protect them all.
            match crate::backend::local_addrs() {
                Ok(addrs) => policy = policy.with_local_addrs(addrs),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list local addresses for the backend policy")
                }
            }
        }
        let instances = Arc::new(Instances::new());
        let resolver = Resolver::new(instances.clone(), &config)?;
        Ok(Self {
            config: Arc::new(config),
            instances,
            certs: Arc::new(CertStore::new()),
            policy: Arc::new(policy),
            resolver: Arc::new(resolver),
        })
    }
}

/// An ingress in memory: its record, its routing table and whether its listener is bound.
#[derive(Debug)]
struct IngressEntry {
    ingress: TcpIngress,
    routes: SharedRoutes,
    bind_error: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    ingresses: BTreeMap<String, IngressEntry>,
    claims: BTreeMap<u16, String>,
}

/// An ingress whose record loaded but whose listener is not bound.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct UnboundListener {
    /// The ingress's ID.
    pub ingress_id: String,
    /// The ingress's name.
    pub name: String,
    /// The port it should listen on.
    pub listen_port: u16,
    /// Why binding failed.
    pub error: String,
}

/// Readiness detail for `/readyz`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ControlStatus {
    /// Bound listeners.
    pub listeners: Vec<ListenerStatus>,
    /// Ingresses whose listener could not be bound.
    pub unbound: Vec<UnboundListener>,
    /// The data directory.
    pub data_dir: String,
    /// Record files that could not be loaded or applied (kept on disk).
    pub failed_records: Vec<FailedRecord>,
}

/// Every control-plane operation; shared by the API handlers.
pub struct ControlPlane {
    shared: Shared,
    store: Store,
    listeners: Listeners,
    reserved: Vec<u16>,
    state: AsyncMutex<State>,
    failed: Mutex<Vec<FailedRecord>>,
    /// Listening sockets handed over by the previous daemon, by port; used by
    /// [`Self::load`] instead of binding, so no connection in their backlog is lost.
    inherited: Mutex<BTreeMap<u16, crate::listeners::BoundListener>>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("data_dir", &self.store.root())
            .finish_non_exhaustive()
    }
}

fn internal(context: &str, e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "{context}");
    ApiError::internal(format!("{context}: {e}"))
}

impl ControlPlane {
    /// Opens the data directory; call [`Self::load`] next.
    pub fn new(
        shared: Shared,
        handler: Arc<dyn ConnectionHandler>,
    ) -> Result<Self, crate::store::StoreError> {
        let store = Store::open(&shared.config.data_dir)?;
        Ok(Self {
            reserved: shared.config.all_reserved_ports(),
            shared,
            store,
            listeners: Listeners::new(handler),
            state: AsyncMutex::new(State::default()),
            failed: Mutex::new(Vec::new()),
            inherited: Mutex::new(BTreeMap::new()),
        })
    }

    /// Listening sockets handed over by the previous daemon; call before [`Self::load`].
    /// Sockets no record claims are closed after the load.
    pub fn inherit_listeners(&self, bound: Vec<crate::listeners::BoundListener>) {
        let mut inherited = self
            .inherited
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for b in bound {
            inherited.insert(b.local_addr().port(), b);
        }
    }

    fn take_inherited(&self, port: u16) -> Option<crate::listeners::BoundListener> {
        self.inherited
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&port)
    }

    /// Duplicates of every ingress listening socket, for a takeover.
    pub fn export_listeners(&self) -> std::io::Result<Vec<(SocketAddr, std::os::fd::OwnedFd)>> {
        self.listeners.export()
    }

    /// The shared tables for the data path.
    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    /// The record store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The address an ingress's listener is bound to, if it is.
    pub fn listener_addr(&self, id: &str) -> Option<SocketAddr> {
        self.listeners.local_addr(id)
    }

    /// Records a load failure for `/readyz`.
    fn report(&self, rec: FailedRecord) {
        self.failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(rec);
    }

    /// Readiness detail: listeners, unbound ingresses, failed records.
    pub async fn status(&self) -> ControlStatus {
        let state = self.state.lock().await;
        let unbound = state
            .ingresses
            .values()
            .filter_map(|e| {
                e.bind_error.as_ref().map(|error| UnboundListener {
                    ingress_id: e.ingress.id.clone(),
                    name: e.ingress.name.clone(),
                    listen_port: e.ingress.listen_port,
                    error: error.clone(),
                })
            })
            .collect();
        ControlStatus {
            listeners: self.listeners.status(),
            unbound,
            data_dir: self.store.root().display().to_string(),
            failed_records: self
                .failed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }

    /// Closes every listener (established connections are left to finish).
    pub async fn shutdown(&self) {
        for task in self.listeners.take_all() {
            Listeners::stop_task(task).await;
        }
    }

    fn listen_ip(&self) -> IpAddr {
        self.shared.config.listen_addr
    }

    /// Who owns `port`, other than ingress `except`; the error names the owner.
    fn check_port(
        &self,
        state: &State,
        port: u16,
        except: Option<&str>,
        field: &str,
    ) -> Result<(), ApiError> {
        if self.reserved.contains(&port) {
            let what = if port == self.shared.config.api_listen.port() {
                "the API's own port"
            } else {
                "reserved (RESERVED_PORTS)"
            };
            return Err(ApiError::new(
                ErrorCode::PortReserved,
                format!("{field}: port {port} is {what}"),
            ));
        }
        if let Some(owner) = state.claims.get(&port) {
            return Err(ApiError::new(
                ErrorCode::PortInUse,
                format!("{field}: port {port} is claimed by {owner:?}"),
            ));
        }
        if let Some(e) = state
            .ingresses
            .values()
            .find(|e| e.ingress.listen_port == port && Some(e.ingress.id.as_str()) != except)
        {
            return Err(ApiError::new(
                ErrorCode::PortInUse,
                format!(
                    "{field}: port {port} is used by tcp ingress {:?}",
                    e.ingress.name
                ),
            ));
        }
        Ok(())
    }
}
