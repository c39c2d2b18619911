//! Backend connect with a timeout, and the socket options every flow's two sockets carry.
//!
//! A down or refusing instance must give the client a prompt close, never a hang: the connect
//! is bounded by `connect_timeout` and its failures are typed by whose fault they are
//! (`backend_unreachable`, `backend_timeout`, or a local error). Spliced flows are invisible to
//! userspace once in the kernel, so dead peers are found by the kernel itself: TCP keepalive
//! probes an idle peer, and `TCP_USER_TIMEOUT` (Linux ≥ 2.6.37) aborts a connection whose sent
//! data stays unacknowledged — set to cover the whole keepalive schedule, as recommended, so
//! the two agree. `TCP_NODELAY` keeps the small messages of database and SSH protocols from
//! waiting on Nagle. [`apply_flow_options`] applies the same settings to the accepted client
//! socket.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpSocket, TcpStream};

/// Default time a backend connect may take.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// TCP keepalive schedule: first probe after `idle`, then every `interval`, `retries` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time before the first probe.
    pub idle: Duration,
    /// Time between probes.
    pub interval: Duration,
    /// Unanswered probes before the connection is dropped.
    pub retries: u32,
}

impl Keepalive {
    /// The time after which an unresponsive peer is given up: `idle + interval × retries`.
    pub fn give_up_after(&self) -> Duration {
        self.idle
            .saturating_add(self.interval.saturating_mul(self.retries))
    }
}

impl Default for Keepalive {
    /// A dead peer is dropped after about two minutes.
    fn default() -> Self {
        Keepalive {
            idle: Duration::from_secs(60),
            interval: Duration::from_secs(10),
            retries: 6,
        }
    }
}

/// Socket options shared by both sockets of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowOptions {
    /// Keepalive schedule; `None` leaves keepalive off.
    pub keepalive: Option<Keepalive>,
    /// `TCP_USER_TIMEOUT`; `None` with keepalive on uses the keepalive give-up time.
    pub user_timeout: Option<Duration>,
}

impl Default for FlowOptions {
    fn default() -> Self {
        FlowOptions {
            keepalive: Some(Keepalive::default()),
            user_timeout: None,
        }
    }
}

/// Settings of a backend connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Time the connect may take.
    pub connect_timeout: Duration,
    /// Options the connected socket carries.
    pub flow: FlowOptions,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            flow: FlowOptions::default(),
        }
    }
}

/// Why a backend connect failed; each variant has a stable [`ConnectError::reason`].
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Refused, unreachable or reset: the backend's (or the network's) fault.
    #[error("backend {addr} unreachable")]
    Unreachable {
        /// The backend address.
        addr: SocketAddr,
        /// What the kernel reported.
        #[source]
        source: io::Error,
    },
    /// No answer within the connect timeout.
    #[error("backend {addr} did not answer within {connect_timeout:?}")]
    Timeout {
        /// The backend address.
        addr: SocketAddr,
        /// The timeout that passed.
        connect_timeout: Duration,
    },
    /// A local failure: no descriptors, no ephemeral ports, a refused socket option.
    #[error("could not connect to backend {addr}")]
    Local {
        /// The backend address.
        addr: SocketAddr,
        /// What the kernel reported.
        #[source]
        source: io::Error,
    },
}

impl ConnectError {
    /// Stable snake_case reason for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            ConnectError::Unreachable { .. } => "backend_unreachable",
            ConnectError::Timeout { .. } => "backend_timeout",
            ConnectError::Local { .. } => "connect_local_error",
        }
    }
}

/// Connects to `addr` within `opts.connect_timeout`, with `TCP_NODELAY` and the flow options
/// set before the SYN leaves.
pub async fn connect(addr: SocketAddr, opts: &ConnectOptions) -> Result<TcpStream, ConnectError> {
    let local = |source| ConnectError::Local { addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(local)?;
    socket.set_nodelay(true).map_err(local)?;
    set_flow_options(SockRef::from(&socket), &opts.flow).map_err(local)?;
    match tokio::time::timeout(opts.connect_timeout, socket.connect(addr)).await {
        Err(_) => Err(ConnectError::Timeout {
            addr,
            connect_timeout: opts.connect_timeout,
        }),
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(match source.kind() {
            io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::NetworkDown
            | io::ErrorKind::TimedOut => ConnectError::Unreachable { addr, source },
            _ => ConnectError::Local { addr, source },
        }),
    }
}

/// Applies `TCP_NODELAY`, keepalive and `TCP_USER_TIMEOUT` to an accepted client socket.
pub fn apply_flow_options(stream: &TcpStream, opts: &FlowOptions) -> io::Result<()> {
    stream.set_nodelay(true)?;
    set_flow_options(SockRef::from(stream), opts)
}

fn set_flow_options(socket: SockRef<'_>, opts: &FlowOptions) -> io::Result<()> {
    if let Some(k) = opts.keepalive {
        let params = TcpKeepalive::new()
            .with_time(k.idle)
            .with_interval(k.interval)
            .with_retries(k.retries);
        // Sets `SO_KEEPALIVE` too.
        socket.set_tcp_keepalive(&params)?;
    }
    let user_timeout = opts
        .user_timeout
        .or(opts.keepalive.map(|k| k.give_up_after()));
    if let Some(t) = user_timeout {
        socket.set_tcp_user_timeout(Some(t))?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a failing test panics"
)]
mod tests;
