//! A plain TCP echo server: every byte back, FIN answered with FIN once everything is echoed,
//! and a record of how each connection ended (for FIN/RST propagation tests).
use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::mpsc::{self, Receiver},
    time::Duration,
};

use crate::{
    acceptor::Acceptor,
    error::{Error, IoContext as _, Result},
};

/// How a connection to a harness server ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnEnd {
    /// The peer half-closed (FIN) after `bytes` bytes.
    Eof {
        /// Bytes received before the FIN.
        bytes: u64,
    },
    /// The peer reset the connection after `bytes` bytes.
    Reset {
        /// Bytes received before the reset.
        bytes: u64,
    },
    /// Another error after `bytes` bytes.
    Error {
        /// Bytes received before the error.
        bytes: u64,
        /// The error.
        error: String,
    },
}

/// A running echo server on a loopback address; stops when dropped.
pub struct EchoServer {
    acceptor: Acceptor,
    ends: Receiver<(SocketAddr, ConnEnd)>,
}

impl EchoServer {
    /// Starts an echo server on `ip`, on a port the kernel picks.
    pub fn start(ip: impl Into<IpAddr>) -> Result<Self> {
        let ip = ip.into();
        let listener =
            TcpListener::bind((ip, 0)).ctx(|| format!("binding an echo server on {ip}"))?;
        Self::on(listener)
    }

    /// Starts an echo server on an already bound listener (e.g. one inside a network namespace).
    pub fn on(listener: TcpListener) -> Result<Self> {
        let (tx, ends) = mpsc::channel();
        let acceptor = Acceptor::spawn("echo", listener, move |stream, peer| {
            let end = echo(stream);
            let _ = tx.send((peer, end));
        })?;
        Ok(Self { acceptor, ends })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.acceptor.addr()
    }

    /// How the next connection to finish ended, waiting up to `timeout`.
    pub fn next_end(&self, timeout: Duration) -> Result<(SocketAddr, ConnEnd)> {
        self.ends.recv_timeout(timeout).map_err(|_| Error::Timeout {
            what: "an echo connection to end".to_owned(),
            waited: timeout,
        })
    }
}

fn echo(mut stream: TcpStream) -> ConnEnd {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0_u8; 64 * 1024];
    let mut bytes = 0_u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                let _ = stream.shutdown(Shutdown::Write);
                return ConnEnd::Eof { bytes };
            }
            Ok(n) => {
                bytes += n as u64;
                if let Err(e) = stream.write_all(&buf[..n]) {
                    return end_for(&e, bytes);
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return end_for(&e, bytes),
        }
    }
}

/// Classifies an I/O error that ended a connection.
pub(crate) fn end_for(e: &std::io::Error, bytes: u64) -> ConnEnd {
    match e.kind() {
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => ConnEnd::Reset { bytes },
        _ => ConnEnd::Error {
            bytes,
            error: e.to_string(),
        },
    }
}
