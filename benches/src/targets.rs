//! The targets a benchmark measures, and starting each: a direct connection, the standalone
//! splice relay, HAProxy, nginx and ingressd.
use std::{
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use ingress_daemon::splice::Offload;
use ingress_tests::{
    ports::PortLease,
    process::{ChildGuard, wait_until},
};

use crate::{
    ingressd::{IngressdMode, IngressdTarget},
    peers::{self, CertPaths, PeerSpec, TlsHandling},
    tls::BenchPki,
};

/// What a target is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The client talks to the backend itself: the physical limit.
    Direct,
    /// The `splice-relay` binary around the splice engine.
    Relay(Offload),
    /// HAProxy in `mode tcp`.
    Haproxy {
        /// `option splice-request/splice-response`.
        splice: bool,
        /// Passthrough on `req.ssl_sni`, or terminate.
        tls: TlsHandling,
    },
    /// nginx `stream`.
    Nginx {
        /// `ssl_preread` passthrough, or terminate.
        tls: TlsHandling,
    },
    /// The ingressd daemon, configured through its API.
    Ingressd(IngressdMode),
}

impl Kind {
    /// Whether the target terminates TLS (its backend is the plaintext one).
    pub fn terminates(self) -> bool {
        matches!(
            self,
            Self::Haproxy {
                tls: TlsHandling::Terminate,
                ..
            } | Self::Nginx {
                tls: TlsHandling::Terminate
            } | Self::Ingressd(IngressdMode::Terminate)
        )
    }
}

/// A named target.
#[derive(Clone, Copy, Debug)]
pub struct TargetSpec {
    /// Short name used by `--only` and in the tables.
    pub name: &'static str,
    /// What it is.
    pub kind: Kind,
    /// One line for the report.
    pub about: &'static str,
}

const fn target(name: &'static str, kind: Kind, about: &'static str) -> TargetSpec {
    TargetSpec { name, kind, about }
}

/// Every target of the peer comparison, in report order.
pub const PEER_TARGETS: &[TargetSpec] = &[
    target("direct", Kind::Direct, "client to backend, no proxy"),
    target(
        "ingressd-kernel",
        Kind::Ingressd(IngressdMode::Kernel),
        "ingressd passthrough, sockmap splice (offload required)",
    ),
    target(
        "ingressd-userspace",
        Kind::Ingressd(IngressdMode::Userspace),
        "ingressd passthrough, userspace relay (offload off)",
    ),
    target(
        "ingressd-adaptive",
        Kind::Ingressd(IngressdMode::Adaptive),
        "ingressd passthrough, sockmap splice, bulk flows on the userspace relay (bulk_flows = userspace)",
    ),
    target(
        "ingressd-terminate",
        Kind::Ingressd(IngressdMode::Terminate),
        "ingressd terminates TLS, plaintext to the backend",
    ),
    target(
        "splice-kernel",
        Kind::Relay(Offload::Required),
        "standalone splice engine, sockmap (no hello, no routing)",
    ),
    target(
        "splice-userspace",
        Kind::Relay(Offload::Off),
        "standalone splice engine, userspace relay (no hello, no routing)",
    ),
    target(
        "haproxy",
        Kind::Haproxy {
            splice: false,
            tls: TlsHandling::Passthrough,
        },
        "HAProxy mode tcp, req.ssl_sni",
    ),
    target(
        "haproxy-splice",
        Kind::Haproxy {
            splice: true,
            tls: TlsHandling::Passthrough,
        },
        "HAProxy mode tcp, req.ssl_sni, splice-request/response",
    ),
    target(
        "haproxy-terminate",
        Kind::Haproxy {
            splice: false,
            tls: TlsHandling::Terminate,
        },
        "HAProxy terminates TLS (OpenSSL), plaintext to the backend",
    ),
    target(
        "nginx",
        Kind::Nginx {
            tls: TlsHandling::Passthrough,
        },
        "nginx stream, ssl_preread",
    ),
    target(
        "nginx-terminate",
        Kind::Nginx {
            tls: TlsHandling::Terminate,
        },
        "nginx stream terminates TLS (OpenSSL), plaintext to the backend",
    ),
];

/// The targets of `--quick`.
pub const QUICK_PEER_TARGETS: &[&str] = &[
    "direct",
    "ingressd-kernel",
    "splice-kernel",
    "haproxy-splice",
    "nginx",
];

/// The targets of the splice bench (plaintext end to end, so the engine is all that differs).
pub const SPLICE_TARGETS: &[TargetSpec] = &[
    target("direct", Kind::Direct, "client to backend, no proxy"),
    target(
        "userspace-relay",
        Kind::Relay(Offload::Off),
        "splice engine, userspace relay (offload off)",
    ),
    target(
        "kernel-splice",
        Kind::Relay(Offload::Required),
        "splice engine, sockmap (offload required)",
    ),
];

/// What starting targets needs.
pub struct Env {
    /// The TLS backend.
    pub tls_backend: SocketAddr,
    /// The plaintext backend.
    pub plain_backend: SocketAddr,
    /// Whether clients speak TLS (the peer comparison) or plaintext (the splice bench).
    pub client_tls: bool,
    /// Certificates.
    pub pki: BenchPki,
    /// The certificate files, written into [`Env::dir`].
    pub certs: CertPaths,
    /// The `ingressd` binary.
    pub ingressd: Option<PathBuf>,
    /// The `splice-relay` binary.
    pub relay: PathBuf,
    /// Threads or processes per proxy.
    pub workers: usize,
    /// Temporary directory for configs and logs.
    pub dir: PathBuf,
}

/// A started target; stopped (by PID) when dropped.
pub struct Running {
    /// Where clients connect.
    pub front: SocketAddr,
    /// The proxy's PID (none for `direct`).
    pub pid: Option<u32>,
    /// The daemon, for ingressd targets (routing table changes).
    pub ingressd: Option<IngressdTarget>,
    child: Option<ChildGuard>,
    _lease: Option<PortLease>,
}

impl Running {
    /// The proxy's whole log (empty for ingressd and `direct`).
    pub fn log(&self) -> String {
        self.child
            .as_ref()
            .and_then(|c| c.log_path())
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// The tail of the proxy's log, for error messages.
    pub fn log_tail(&self) -> String {
        match (&self.child, &self.ingressd) {
            (Some(c), _) => c.log_tail(20),
            (_, Some(d)) => d.log_tail(),
            _ => String::new(),
        }
    }
}

impl Env {
    fn backend_for(&self, kind: Kind) -> SocketAddr {
        if kind.terminates() || !self.client_tls {
            self.plain_backend
        } else {
            self.tls_backend
        }
    }

    /// Starts `spec` and waits until it accepts connections.
    pub fn start(&self, spec: &TargetSpec) -> Result<Running> {
        let backend = self.backend_for(spec.kind);
        let lease = PortLease::new()?;
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, lease.port()));
        let dir = self.dir.join(spec.name);
        std::fs::create_dir_all(&dir)?;
        let peer = |tls, splice| PeerSpec {
            listen,
            backend,
            tls,
            splice,
            workers: self.workers,
            certs: self.certs.clone(),
        };
        let mut cmd: Command = match spec.kind {
            Kind::Direct => {
                return Ok(Running {
                    front: backend,
                    pid: None,
                    ingressd: None,
                    child: None,
                    _lease: None,
                });
            }
            Kind::Ingressd(mode) => {
                let Some(binary) = &self.ingressd else {
                    bail!("no ingressd binary given");
                };
                drop(lease);
                let daemon = IngressdTarget::start(
                    binary,
                    mode,
                    self.tls_backend,
                    self.plain_backend,
                    &self.pki,
                )?;
                let front = daemon.listen();
                wait_listening(front, None)?;
                return Ok(Running {
                    front,
                    pid: Some(daemon.pid()),
                    ingressd: Some(daemon),
                    child: None,
                    _lease: None,
                });
            }
            Kind::Relay(offload) => {
                let mut cmd = Command::new(&self.relay);
                cmd.arg("--listen")
                    .arg(listen.to_string())
                    .arg("--backend")
                    .arg(backend.to_string())
                    .arg("--offload")
                    .arg(offload.to_string())
                    .arg("--workers")
                    .arg(self.workers.to_string());
                // The daemon's water marks, so the relay splices as ingressd would.
                let daemon = ingress_daemon::config::Config::default();
                cmd.arg("--soft-water-bytes")
                    .arg(daemon.soft_water_bytes.to_string())
                    .arg("--high-water-bytes")
                    .arg(daemon.high_water_bytes.to_string())
                    .arg("--low-water-bytes")
                    .arg(daemon.low_water_bytes.to_string());
                cmd
            }
            Kind::Haproxy { splice, tls } => peers::haproxy_command(&peer(tls, splice), &dir)?,
            Kind::Nginx { tls } => peers::nginx_command(&peer(tls, false), &dir)?,
        };
        let log = dir.join("output.log");
        let mut child = ChildGuard::spawn(spec.name, &mut cmd, Some(&log))
            .with_context(|| format!("starting {}", spec.name))?;
        if let Err(e) = wait_listening(listen, Some(&mut child)) {
            bail!("{}: {e:#}\n{}", spec.name, child.log_tail(20));
        }
        Ok(Running {
            front: listen,
            pid: Some(child.pid()),
            ingressd: None,
            child: Some(child),
            _lease: Some(lease),
        })
    }
}

/// Polls until `addr` accepts a TCP connection (10 s at most), failing early if `child` exits.
fn wait_listening(addr: SocketAddr, mut child: Option<&mut ChildGuard>) -> Result<()> {
    wait_until(
        &format!("{addr} to accept connections"),
        Duration::from_secs(10),
        || {
            if let Some(c) = child.as_deref_mut() {
                c.ensure_running()?;
            }
            Ok(
                TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                    .ok()
                    .map(drop),
            )
        },
    )?;
    Ok(())
}
