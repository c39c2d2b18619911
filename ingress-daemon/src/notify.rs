//! Readiness notifications to a service manager (the `sd_notify(3)` protocol, spoken directly).
//!
//! Design: when `NOTIFY_SOCKET` names a socket (a path, or `@name` for the abstract namespace),
//! the daemon sends one datagram per state change: `READY=1` with its `MAINPID` and a
//! `STATUS` line once the store is loaded, the ingress listeners are bound and the API
//! accepts connections, and `STOPPING=1` when a shutdown begins. Without `NOTIFY_SOCKET`
//! nothing is sent. A notification that cannot be delivered is logged and otherwise ignored:
//! a supervisor that never hears `READY=1` reports the start as failed on its own timeout,
//! which is the right outcome, and the daemon keeps serving meanwhile.
//!
//! `MAINPID` is sent with `READY=1` so that a supervisor configured with `NotifyAccess=all`
//! follows the process that reported readiness: after `ingressd upgrade`, the new daemon.
//! `INGRESSD_READY_SOCKET` names one more socket (an absolute path) that gets `READY=1` only:
//! `ingressd upgrade` waits on it for the daemon it started.

use std::{
    ffi::OsStr,
    io,
    os::unix::{
        ffi::OsStrExt as _,
        net::{SocketAddr, UnixDatagram},
    },
};

/// The environment variable a service manager sets to its notification socket.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

/// The environment variable naming one more notification socket (see the module docs).
pub const READY_SOCKET_ENV: &str = "INGRESSD_READY_SOCKET";

/// Why `NOTIFY_SOCKET` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The variable names neither an absolute path nor an abstract socket (`@name`).
    #[error("{variable}={value:?} is neither an absolute path nor @abstract")]
    BadAddress {
        /// The variable.
        variable: &'static str,
        /// The variable's value.
        value: String,
    },
    /// The socket address or the sending socket could not be made.
    #[error("{variable}: {source}")]
    Socket {
        /// The variable.
        variable: &'static str,
        /// The underlying error.
        source: io::Error,
    },
}

/// A connection to the service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    /// `NOTIFY_SOCKET`: every notification.
    manager: Option<SocketAddr>,
    /// `INGRESSD_READY_SOCKET`: `READY=1` only (its listener is gone after that).
    ready_only: Option<SocketAddr>,
}

impl Notifier {
    /// The notifier `NOTIFY_SOCKET` and `INGRESSD_READY_SOCKET` ask for, or `None` when both
    /// are unset or empty.
    pub fn from_env() -> Result<Option<Self>, NotifyError> {
        let named = |variable| match std::env::var_os(variable) {
            Some(value) if !value.is_empty() => target(variable, &value).map(Some),
            _ => Ok(None),
        };
        let (manager, ready_only) = (named(NOTIFY_SOCKET_ENV)?, named(READY_SOCKET_ENV)?);
        if manager.is_none() && ready_only.is_none() {
            return Ok(None);
        }
        Self::to(manager, ready_only).map(Some)
    }

    /// A notifier sending to `address` (an absolute path, or `@name` for an abstract socket).
    pub fn new(address: &OsStr) -> Result<Self, NotifyError> {
        Self::to(Some(target(NOTIFY_SOCKET_ENV, address)?), None)
    }

    fn to(
        manager: Option<SocketAddr>,
        ready_only: Option<SocketAddr>,
    ) -> Result<Self, NotifyError> {
        let socket = UnixDatagram::unbound().map_err(|source| NotifyError::Socket {
            variable: NOTIFY_SOCKET_ENV,
            source,
        })?;
        Ok(Self {
            socket,
            manager,
            ready_only,
        })
    }

    /// Sends one notification (newline-separated `KEY=value` assignments) to the service
    /// manager.
    pub fn send(&self, state: &str) -> io::Result<()> {
        match &self.manager {
            Some(addr) => self.socket.send_to_addr(state.as_bytes(), addr),
            None => Ok(0),
        }
        .map(drop)
    }

    /// Reports the daemon ready: it serves its ingresses and its API at `api`.
    pub fn ready(&self, api: std::net::SocketAddr) {
        let state = format!(
            "READY=1\nMAINPID={}\nSTATUS=serving; api on {api}",
            std::process::id()
        );
        self.report(&state);
        if let Some(addr) = &self.ready_only
            && let Err(e) = self.socket.send_to_addr(state.as_bytes(), addr)
        {
            tracing::warn!(error = %e, "telling the upgrade command the daemon is ready");
        }
    }

    /// Reports that a shutdown has begun.
    pub fn stopping(&self) {
        self.report("STOPPING=1\nSTATUS=shutting down");
    }

    fn report(&self, state: &str) {
        if let Err(e) = self.send(state) {
            tracing::warn!(error = %e, state, "notifying the service manager");
        }
    }
}

/// The socket address `value` of `variable` names.
fn target(variable: &'static str, value: &OsStr) -> Result<SocketAddr, NotifyError> {
    let bytes = value.as_bytes();
    let socket = |source| NotifyError::Socket { variable, source };
    match bytes.first() {
        Some(b'/') => SocketAddr::from_pathname(value).map_err(socket),
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt as _;
            SocketAddr::from_abstract_name(&bytes[1..]).map_err(socket)
        }
        _ => Err(NotifyError::BadAddress {
            variable,
            value: value.to_string_lossy().into_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        socket
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn ready_and_stopping_reach_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let manager = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::new(path.as_os_str()).unwrap();
        notifier.ready("127.0.0.1:9180".parse().unwrap());
        let ready = received(&manager);
        let lines: Vec<&str> = ready.lines().collect();
        assert_eq!(lines[0], "READY=1");
        assert_eq!(lines[1], format!("MAINPID={}", std::process::id()));
        assert_eq!(lines[2], "STATUS=serving; api on 127.0.0.1:9180");
        notifier.stopping();
        assert!(received(&manager).starts_with("STOPPING=1\n"));
    }

    #[test]
    fn an_abstract_socket_is_named_with_an_at_sign() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("ingressd-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let manager = UnixDatagram::bind_addr(&addr).unwrap();
        let notifier = Notifier::new(OsStr::new(&format!("@{name}"))).unwrap();
        notifier.send("READY=1").unwrap();
        assert_eq!(received(&manager), "READY=1");
    }

    #[test]
    fn the_ready_socket_gets_ready_only_and_a_missing_one_does_not_stop_the_manager() {
        let dir = tempfile::tempdir().unwrap();
        let (m, r) = (dir.path().join("manager"), dir.path().join("ready"));
        let (manager, ready) = (
            UnixDatagram::bind(&m).unwrap(),
            UnixDatagram::bind(&r).unwrap(),
        );
        let addr = |p: &std::path::Path| target(READY_SOCKET_ENV, p.as_os_str()).unwrap();
        let notifier = Notifier::to(Some(addr(&m)), Some(addr(&r))).unwrap();
        notifier.ready("127.0.0.1:1".parse().unwrap());
        assert!(received(&manager).starts_with("READY=1\n"));
        assert!(received(&ready).starts_with("READY=1\n"));
        notifier.stopping();
        assert!(received(&manager).starts_with("STOPPING=1\n"));
        ready.set_nonblocking(true).unwrap();
        assert!(
            ready.recv(&mut [0u8; 64]).is_err(),
            "STOPPING=1 is not sent to the ready socket"
        );

        let gone = Notifier::to(Some(addr(&m)), Some(addr(&dir.path().join("gone")))).unwrap();
        gone.ready("127.0.0.1:1".parse().unwrap());
        assert!(received(&manager).starts_with("READY=1\n"));
    }

    #[test]
    fn a_relative_address_is_refused() {
        let err = Notifier::new(OsStr::new("run/notify")).unwrap_err();
        assert!(matches!(err, NotifyError::BadAddress { .. }), "{err}");
    }

    #[test]
    fn a_missing_listener_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let notifier = Notifier::new(dir.path().join("gone").as_os_str()).unwrap();
        assert!(notifier.send("READY=1").is_err());
        // The reporting methods log and go on.
        notifier.stopping();
    }
}
