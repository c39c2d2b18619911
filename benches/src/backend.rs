//! The benchmark's backends: one server speaking the [`Op`] protocol, over TLS (rustls) or in
//! plaintext, on a multi-threaded tokio runtime.
//!
//! The protocol is one 9-byte request (`op`, then a little-endian `u64` argument) at the start
//! of a session:
//! - `S n` sink: read `n` bytes, then answer one byte;
//! - `D n` source: write `n` bytes;
//! - `E` echo: write back whatever arrives, until end of stream;
//! - `P` ping: answer one byte at once, then wait for end of stream (connection rate, time to
//!   first byte, idle connections).
//!
//! Buffers are 256 KiB and reused; the data written is a fixed block, so the servers add no
//! per-byte work beyond the TLS record layer.
use std::{net::SocketAddr, sync::Arc};

use anyhow::{Context as _, Result, bail};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpListener,
    runtime::Runtime,
    sync::oneshot,
};
use tokio_rustls::TlsAcceptor;

/// Bytes per read or write of bulk data.
pub const CHUNK_BYTES: usize = 256 << 10;

/// A request of the benchmark protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read this many bytes, then answer one byte.
    Sink(u64),
    /// Write this many bytes.
    Source(u64),
    /// Echo everything until end of stream.
    Echo,
    /// Answer one byte, then wait for end of stream.
    Ping,
}

impl Op {
    /// The 9-byte request.
    pub fn encode(self) -> [u8; 9] {
        let (code, arg) = match self {
            Self::Sink(n) => (b'S', n),
            Self::Source(n) => (b'D', n),
            Self::Echo => (b'E', 0),
            Self::Ping => (b'P', 0),
        };
        let mut out = [0u8; 9];
        out[0] = code;
        out[1..].copy_from_slice(&arg.to_le_bytes());
        out
    }

    /// Parses a request.
    pub fn decode(raw: [u8; 9]) -> Option<Self> {
        let mut arg = [0u8; 8];
        arg.copy_from_slice(&raw[1..]);
        let arg = u64::from_le_bytes(arg);
        match raw[0] {
            b'S' => Some(Self::Sink(arg)),
            b'D' => Some(Self::Source(arg)),
            b'E' => Some(Self::Echo),
            b'P' => Some(Self::Ping),
            _ => None,
        }
    }
}

/// A backend listening on loopback until dropped.
pub struct Backend {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

impl Backend {
    /// Binds `ip:0` and serves on `runtime`; with `tls`, every session is TLS.
    pub fn start(
        runtime: &Runtime,
        ip: std::net::IpAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<Self> {
        let listener = runtime
            .block_on(TcpListener::bind(SocketAddr::new(ip, 0)))
            .context("binding a backend")?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel();
        let acceptor = tls.map(TlsAcceptor::from);
        runtime.spawn(async move {
            tokio::select! {
                _ = stopped => {}
                () = accept_loop(listener, acceptor) => {}
            }
        });
        Ok(Self { addr, _stop: stop })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

async fn accept_loop(listener: TcpListener, acceptor: Option<TlsAcceptor>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // EMFILE and the like: back off rather than spin.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = match acceptor {
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(tls) => serve(tls).await,
                    Err(_) => Ok(()),
                },
                None => serve(stream).await,
            };
        });
    }
}

/// Serves one session of the protocol.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> Result<()> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head).await?;
    let Some(op) = Op::decode(head) else {
        bail!("unknown request {:?}", head[0]);
    };
    let mut buf = vec![0u8; CHUNK_BYTES];
    match op {
        Op::Sink(n) => {
            let mut left = n;
            while left > 0 {
                let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                let got = s.read(&mut buf[..want]).await?;
                if got == 0 {
                    bail!("end of stream with {left} bytes to go");
                }
                left -= got as u64;
            }
            s.write_all(&[1]).await?;
            s.flush().await?;
        }
        Op::Source(n) => {
            fill(&mut buf);
            let mut left = n;
            while left > 0 {
                let len = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                s.write_all(&buf[..len]).await?;
                left -= len as u64;
            }
            s.flush().await?;
        }
        Op::Echo => loop {
            let got = s.read(&mut buf).await?;
            if got == 0 {
                break;
            }
            s.write_all(&buf[..got]).await?;
            s.flush().await?;
        },
        Op::Ping => {
            s.write_all(&[1]).await?;
            s.flush().await?;
        }
    }
    // Wait for the client to finish, so it closes first (its TIME_WAIT, not ours).
    while s.read(&mut buf).await? > 0 {}
    s.shutdown().await?;
    Ok(())
}

/// Fills `buf` with a cheap non-repeating pattern (the bytes only need to be non-trivial).
pub fn fill(buf: &mut [u8]) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in buf.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for op in [Op::Sink(1 << 30), Op::Source(7), Op::Echo, Op::Ping] {
            assert_eq!(Op::decode(op.encode()), Some(op));
        }
        assert_eq!(Op::decode([b'x'; 9]), None);
    }
}
