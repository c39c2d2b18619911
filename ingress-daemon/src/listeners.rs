//! Ingress listeners: binding, ownership, and the hand-off to the connection handler.
//!
//! Design: binding is separate from serving so the control plane can bind first (a port taken
//! by another process fails the API call with `port_in_use`), persist, then start. A bound
//! listener is handed to the [`ConnectionHandler`] together with an [`IngressHandle`] holding the
//! ingress's [`SharedRoutes`]; the handler owns the accept loop. Stopping an ingress signals
//! [`IngressHandle::closed`], waits briefly for the accept loop to return, then aborts it: either
//! way the listening socket is closed. Established connections must live in tasks of their own,
//! so they outlive the accept loop and finish normally. No `SO_REUSEPORT`: with it, a second
//! listener could silently bind beside a foreign one and hide `port_in_use`.
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::route::SharedRoutes;

/// How long a stopping accept loop may take before it is aborted.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Listen backlog for ingress sockets.
const BACKLOG: i32 = 1024;

/// Why a listener could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Another socket (usually another process) already listens on the address.
    #[error("{addr} is already in use by {owner}")]
    InUse {
        /// The address we tried to bind.
        addr: SocketAddr,
        /// Who holds it: `name (pid N)` when `/proc` tells, else "another process".
        owner: String,
    },
    /// Any other socket error (e.g. permission denied for a port below 1024).
    #[error("binding {addr}: {source}")]
    Io {
        /// The address we tried to bind.
        addr: SocketAddr,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// What a connection handler knows about the ingress whose listener it serves.
#[derive(Debug)]
pub struct IngressHandle {
    /// The ingress's ID.
    pub id: String,
    /// The ingress's name.
    pub name: String,
    /// The bound address.
    pub local_addr: SocketAddr,
    /// The routing table, replaced atomically on every rule change; `load()` per connection.
    pub routes: SharedRoutes,
    closed: watch::Receiver<bool>,
}

impl IngressHandle {
    /// Resolves when the listener must stop accepting (the ingress was deleted or moved).
    pub async fn closed(&self) {
        let mut rx = self.closed.clone();
        // An error means the sender is gone, which also means: stop.
        let _ = rx.wait_for(|closed| *closed).await;
    }

    /// Whether the listener has been told to stop.
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }
}

/// Serves one ingress listener: accept → ClientHello → route → connect → splice.
///
/// The returned task owns `listener` and runs the accept loop until [`IngressHandle::closed`]
/// resolves; it may be aborted at any point after that. Each accepted connection must run in a
/// task of its own (`tokio::spawn`) so that stopping the listener never cuts established flows.
pub trait ConnectionHandler: Send + Sync + 'static {
    /// Starts the accept loop for `listener`.
    fn serve(&self, ingress: Arc<IngressHandle>, listener: TcpListener) -> JoinHandle<()>;
}

/// A handler for builds without a data path: accepts and closes every connection.
#[derive(Debug, Default)]
pub struct ClosingHandler;

impl ConnectionHandler for ClosingHandler {
    fn serve(&self, ingress: Arc<IngressHandle>, listener: TcpListener) -> JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = ingress.closed() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((_, peer)) => tracing::debug!(ingress = %ingress.name, %peer, "no connection handler installed; closing"),
                        Err(e) => {
                            tracing::warn!(ingress = %ingress.name, error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    },
                }
            }
        })
    }
}

/// A bound listening socket not yet handed to the handler.
#[derive(Debug)]
pub struct BoundListener {
    listener: std::net::TcpListener,
    addr: SocketAddr,
}

impl BoundListener {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl BoundListener {
    /// A listening socket handed over by the previous daemon in a takeover.
    pub fn inherited(listener: std::net::TcpListener) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        Ok(Self { listener, addr })
    }
}

/// Binds `ip:port` for an ingress: `SO_REUSEADDR`, dual-stack when `ip` is `::`, non-blocking.
pub fn bind(ip: IpAddr, port: u16) -> Result<BoundListener, BindError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let addr = SocketAddr::new(ip, port);
    let err = |source: std::io::Error| {
        if source.kind() == std::io::ErrorKind::AddrInUse {
            let owner = listening_process(port).unwrap_or_else(|| "another process".to_owned());
            BindError::InUse { addr, owner }
        } else {
            BindError::Io { addr, source }
        }
    };
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    if ip == IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
        socket.set_only_v6(false).map_err(err)?;
    }
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    socket.listen(BACKLOG).map_err(err)?;
    let listener = std::net::TcpListener::from(socket);
    let addr = listener.local_addr().map_err(err)?;
    Ok(BoundListener { listener, addr })
}

/// Names the process listening on TCP `port`, from `/proc/net/tcp{,6}` and `/proc/*/fd`.
/// Best effort, for error messages only: `None` when it cannot be told (e.g. another namespace).
fn listening_process(port: u16) -> Option<String> {
    const TCP_LISTEN: &str = "0A";
    let port_hex = format!(":{port:04X}");
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9))
                && local.ends_with(&port_hex)
                && *state == TCP_LISTEN
                && *inode != "0"
            {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = proc_entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|l| inodes.iter().any(|i| l.as_os_str() == i.as_str()))
        });
        if holds {
            let comm = std::fs::read_to_string(proc_entry.path().join("comm")).unwrap_or_default();
            return Some(format!("{} (pid {pid})", comm.trim()));
        }
    }
    None
}

struct Active {
    handle: Arc<IngressHandle>,
    /// A duplicate of the listening socket, to hand to the next daemon in a takeover.
    socket: Option<std::os::fd::OwnedFd>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// One row of the listener status shown by `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct ListenerStatus {
    /// The ingress's ID.
    pub ingress_id: String,
    /// The ingress's name.
    pub name: String,
    /// The bound address.
    #[schema(value_type = String)]
    pub address: SocketAddr,
}

/// The running listeners, by ingress ID.
pub struct Listeners {
    handler: Arc<dyn ConnectionHandler>,
    active: Mutex<HashMap<String, Active>>,
}

impl std::fmt::Debug for Listeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listeners").finish_non_exhaustive()
    }
}

impl Listeners {
    /// A set of listeners served by `handler`.
    pub fn new(handler: Arc<dyn ConnectionHandler>) -> Self {
        Self {
            handler,
            active: Mutex::new(HashMap::new()),
        }
    }

    /// Hands a bound listener to the handler; a previous listener of the ingress is returned
    /// for the caller to [`stop`](Self::stop_task) (call within a Tokio runtime).
    pub fn start(
        &self,
        id: &str,
        name: &str,
        routes: SharedRoutes,
        bound: BoundListener,
    ) -> Result<Option<StopTask>, BindError> {
        let addr = bound.addr;
        let socket = match bound.listener.try_clone() {
            Ok(dup) => Some(std::os::fd::OwnedFd::from(dup)),
            Err(e) => {
                tracing::warn!(ingress = name, error = %e, "cannot keep a copy of the listening socket for a takeover");
                None
            }
        };
        let listener = TcpListener::from_std(bound.listener)
            .map_err(|source| BindError::Io { addr, source })?;
        let (stop, closed) = watch::channel(false);
        let handle = Arc::new(IngressHandle {
            id: id.to_owned(),
            name: name.to_owned(),
            local_addr: addr,
            routes,
            closed,
        });
        tracing::info!(ingress = name, %addr, "listener started");
        let task = self.handler.serve(handle.clone(), listener);
        let previous = self
            .active
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                id.to_owned(),
                Active {
                    handle,
                    socket,
                    stop,
                    task,
                },
            );
        Ok(previous.map(StopTask))
    }

    /// Detaches the listener of an ingress, to be stopped with [`Self::stop_task`].
    pub fn take(&self, id: &str) -> Option<StopTask> {
        self.active
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id)
            .map(StopTask)
    }

    /// Stops an accept loop: signal, wait up to two seconds, then abort. The socket is closed
    /// when this returns; connections already accepted keep running.
    pub async fn stop_task(task: StopTask) {
        let Active {
            handle,
            stop,
            mut task,
            ..
        } = task.0;
        let _ = stop.send(true);
        if tokio::time::timeout(STOP_GRACE, &mut task).await.is_err() {
            tracing::warn!(ingress = %handle.name, "accept loop ignored the stop signal; aborting it");
            task.abort();
            let _ = task.await;
        }
        tracing::info!(ingress = %handle.name, addr = %handle.local_addr, "listener closed");
    }

    /// The address an ingress's listener is bound to.
    pub fn local_addr(&self, id: &str) -> Option<SocketAddr> {
        let active = self.active.lock().unwrap_or_else(PoisonError::into_inner);
        active.get(id).map(|a| a.handle.local_addr)
    }

    /// Every running listener.
    pub fn status(&self) -> Vec<ListenerStatus> {
        let active = self.active.lock().unwrap_or_else(PoisonError::into_inner);
        let mut rows: Vec<_> = active
            .values()
            .map(|a| ListenerStatus {
                ingress_id: a.handle.id.clone(),
                name: a.handle.name.clone(),
                address: a.handle.local_addr,
            })
            .collect();
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        rows
    }

    /// Duplicates of every listening socket with its bound address, for a takeover.
    pub fn export(&self) -> std::io::Result<Vec<(SocketAddr, std::os::fd::OwnedFd)>> {
        let active = self.active.lock().unwrap_or_else(PoisonError::into_inner);
        active
            .values()
            .filter_map(|a| Some((a.handle.local_addr, a.socket.as_ref()?)))
            .map(|(addr, fd)| Ok((addr, fd.try_clone()?)))
            .collect()
    }

    /// Detaches every listener (for shutdown).
    pub fn take_all(&self) -> Vec<StopTask> {
        let mut active = self.active.lock().unwrap_or_else(PoisonError::into_inner);
        active.drain().map(|(_, a)| StopTask(a)).collect()
    }
}

/// A detached listener waiting to be stopped.
pub struct StopTask(Active);

impl std::fmt::Debug for StopTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("StopTask")
            .field(&self.0.handle.name)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn bind_reports_a_foreign_listener_as_in_use() {
        let foreign = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = foreign.local_addr().unwrap().port();
        let err = bind(IpAddr::V4(Ipv4Addr::LOCALHOST), port).unwrap_err();
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        let me = format!("{} (pid {})", comm.trim(), std::process::id());
        assert_eq!(
            err.to_string(),
            format!("127.0.0.1:{port} is already in use by {me}")
        );
        drop(foreign);
        let ok = bind(IpAddr::V4(Ipv4Addr::LOCALHOST), port).unwrap();
        assert_eq!(ok.local_addr().port(), port);
    }

    #[tokio::test]
    async fn stopping_closes_the_socket_even_if_the_handler_ignores_the_signal() {
        struct Stubborn;
        impl ConnectionHandler for Stubborn {
            fn serve(&self, _: Arc<IngressHandle>, listener: TcpListener) -> JoinHandle<()> {
                tokio::spawn(async move {
                    loop {
                        let _ = listener.accept().await;
                    }
                })
            }
        }
        let listeners = Listeners::new(Arc::new(Stubborn));
        let bound = bind(IpAddr::V4(Ipv4Addr::LOCALHOST), 0).unwrap();
        let addr = bound.local_addr();
        let routes = SharedRoutes::default();
        assert!(
            listeners
                .start("id1", "one", routes, bound)
                .unwrap()
                .is_none()
        );
        assert_eq!(listeners.status().len(), 1);
        Listeners::stop_task(listeners.take("id1").unwrap()).await;
        assert!(listeners.status().is_empty());
        // The port is free again.
        bind(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port()).unwrap();
    }
}
