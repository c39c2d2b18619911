//! TLS for tests: ClientHello bytes for routing, a rustls echo server that reports what each
//! client asked for, `openssl s_server` as a child process, and a rustls client.
use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::Command,
    sync::{
        Arc,
        mpsc::{self, Receiver},
    },
    time::Duration,
};

use rustls::{
    ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, StreamOwned,
};
use rustls_pki_types::ServerName;

use crate::{
    acceptor::Acceptor,
    error::{Error, IoContext as _, Result},
    pki::{CertFiles, provider},
    process::{ChildGuard, wait_until},
    tools,
};

/// The bytes of a TLS ClientHello a rustls client sends for `sni` offering `alpn` — the first
/// flight of a real client, for tests that only need the daemon to route a connection.
pub fn client_hello(sni: &str, alpn: &[&[u8]]) -> Result<Vec<u8>> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = server_name(sni)?;
    let mut conn = ClientConnection::new(Arc::new(config), name)?;
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello)
            .ctx(|| "serialising the ClientHello".to_owned())?;
    }
    Ok(hello)
}

fn server_name(name: &str) -> Result<ServerName<'static>> {
    ServerName::try_from(name.to_owned()).map_err(|e| {
        Error::Tls(rustls::Error::General(format!(
            "bad server name {name:?}: {e}"
        )))
    })
}

/// A TLS client stream.
pub type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// Connects to `addr`, sends `sni`, and completes the handshake with `config` (see
/// [`Pki::client_config`](crate::pki::Pki::client_config)).
pub fn tls_connect(addr: SocketAddr, sni: &str, config: Arc<ClientConfig>) -> Result<TlsStream> {
    let mut tcp = TcpStream::connect(addr).ctx(|| format!("connecting to {addr}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(30)))
        .ctx(|| "setting a read timeout".to_owned())?;
    let mut conn = ClientConnection::new(config, server_name(sni)?)?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)
            .ctx(|| format!("TLS handshake with {addr} for {sni}"))?;
    }
    Ok(StreamOwned::new(conn, tcp))
}

/// What a client asked the [`RustlsServer`] for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSession {
    /// The client's address as the server saw it.
    pub peer: SocketAddr,
    /// The server name the client sent.
    pub sni: Option<String>,
    /// The protocol ALPN settled on.
    pub alpn: Option<Vec<u8>>,
    /// Why the handshake failed, if it did.
    pub error: Option<String>,
}

/// A TLS echo server (rustls) on a loopback address; stops when dropped.
pub struct RustlsServer {
    acceptor: Acceptor,
    sessions: Receiver<TlsSession>,
}

impl RustlsServer {
    /// Starts on `ip`, on a port the kernel picks, with `config` (see
    /// [`Leaf::server_config`](crate::pki::Leaf::server_config)).
    pub fn start(ip: impl Into<IpAddr>, config: Arc<ServerConfig>) -> Result<Self> {
        Self::start_at(SocketAddr::new(ip.into(), 0), config)
    }

    /// Like [`RustlsServer::start`], on `addr` (a fixed port puts several servers on one port
    /// of different addresses).
    pub fn start_at(addr: SocketAddr, config: Arc<ServerConfig>) -> Result<Self> {
        let listener = TcpListener::bind(addr).ctx(|| format!("binding a TLS server on {addr}"))?;
        let (tx, sessions) = mpsc::channel();
        let acceptor = Acceptor::spawn("rustls", listener, move |tcp, peer| {
            serve(tcp, peer, Arc::clone(&config), &tx);
        })?;
        Ok(Self { acceptor, sessions })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.acceptor.addr()
    }

    /// The next handshake to finish (or fail), waiting up to `timeout`.
    pub fn next_session(&self, timeout: Duration) -> Result<TlsSession> {
        self.sessions
            .recv_timeout(timeout)
            .map_err(|_| Error::Timeout {
                what: "a TLS handshake on the rustls server".to_owned(),
                waited: timeout,
            })
    }
}

fn serve(
    mut tcp: TcpStream,
    peer: SocketAddr,
    config: Arc<ServerConfig>,
    tx: &mpsc::Sender<TlsSession>,
) {
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(60)));
    let mut conn = match ServerConnection::new(config) {
        Ok(conn) => conn,
        Err(e) => {
            let _ = tx.send(TlsSession {
                peer,
                sni: None,
                alpn: None,
                error: Some(e.to_string()),
            });
            return;
        }
    };
    let mut error = None;
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut tcp) {
            error = Some(e.to_string());
            break;
        }
    }
    let _ = tx.send(TlsSession {
        peer,
        sni: conn.server_name().map(str::to_owned),
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        error: error.clone(),
    });
    if error.is_some() {
        return;
    }
    let mut stream = StreamOwned::new(conn, tcp);
    let mut buf = vec![0_u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if stream
                    .write_all(&buf[..n])
                    .and_then(|()| stream.flush())
                    .is_err()
                {
                    return;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
    stream.conn.send_close_notify();
    let _ = stream.flush();
    let _ = stream.sock.shutdown(std::net::Shutdown::Write);
}

/// `openssl s_server` as a backend; stopped when dropped.
pub struct OpensslServer {
    addr: SocketAddr,
    guard: ChildGuard,
}

impl OpensslServer {
    /// Starts `openssl s_server` on `ip` (port picked by the kernel, read back from its
    /// `ACCEPT` line) with the certificate in `cert`, plus `args` (e.g. `["-www"]` to answer HTTP
    /// GETs with a status page, `["-rev"]` to reverse lines). Its output goes to `log`.
    pub fn start(ip: IpAddr, cert: &CertFiles, args: &[&str], log: &Path) -> Result<Self> {
        Self::start_at(SocketAddr::new(ip, 0), cert, args, log)
    }

    /// Like [`OpensslServer::start`], on `accept` (a port of 0 lets the kernel pick; a fixed
    /// port, e.g. from a [`PortLease`](crate::ports::PortLease), puts several servers on one
    /// port of different addresses).
    pub fn start_at(
        accept: SocketAddr,
        cert: &CertFiles,
        args: &[&str],
        log: &Path,
    ) -> Result<Self> {
        let openssl = tools::find("openssl")?;
        let ip = accept.ip();
        let mut cmd = Command::new(openssl);
        cmd.arg("s_server")
            .arg("-accept")
            .arg(accept.to_string())
            .arg("-cert")
            .arg(&cert.cert)
            .arg("-key")
            .arg(&cert.key)
            .args(args);
        // `-WWW` serves files relative to the working directory: the log's directory.
        if let Some(dir) = log.parent().filter(|d| !d.as_os_str().is_empty()) {
            cmd.current_dir(dir);
        }
        let mut guard = ChildGuard::spawn("openssl s_server", &mut cmd, Some(log))?;
        let prefix = format!(
            "ACCEPT {}",
            match ip {
                IpAddr::V4(v4) => v4.to_string(),
                IpAddr::V6(v6) => format!("[{v6}]"),
            }
        );
        // With port 0 it prints `ACCEPT <ip>:<port>`; with a fixed port only `ACCEPT`.
        let fixed = (accept.port() != 0).then_some(accept.port());
        let addr = wait_until(
            "openssl s_server to listen",
            Duration::from_secs(20),
            || {
                guard.ensure_running()?;
                let text = std::fs::read_to_string(log).unwrap_or_default();
                Ok(text.lines().find_map(|l| match fixed {
                    Some(port) => (l.trim() == "ACCEPT").then_some(port),
                    None => l
                        .strip_prefix(&prefix)?
                        .strip_prefix(':')?
                        .trim()
                        .parse::<u16>()
                        .ok(),
                }))
            },
        )
        .map(|port| SocketAddr::new(ip, port))?;
        Ok(Self { addr, guard })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The process guard (PID, log).
    pub fn process(&mut self) -> &mut ChildGuard {
        &mut self.guard
    }
}
