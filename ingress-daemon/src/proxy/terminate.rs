//! Terminated flows: the rustls handshake with the client (certificate chosen by SNI from the
//! store), then plaintext to the backend through a userspace relay.
//!
//! Terminated flows never enter the sockhash: kTLS and sockmap exclude each other on patched
//! kernels, and this host has no kTLS. The relay copies each direction through one bounded
//! buffer; end of stream becomes a `close_notify` + FIN toward the client or a FIN toward the
//! backend, and a reset or error on one side resets the other (`SO_LINGER {1, 0}`).

use std::{
    net::SocketAddr,
    os::fd::{AsFd as _, OwnedFd},
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use rustls::ServerConfig;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
    sync::OwnedSemaphorePermit,
};
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use super::{DataPlane, FlowSlot, Reason, Refusal, conn::FlowMeta};
use crate::{certs::CertStore, connect, proxy_protocol::ProxyHeader, sys};

/// Relay buffer per direction.
const RELAY_BUFFER_BYTES: usize = 16 << 10;

/// Server configurations: plain TLS (no ALPN: the backend speaks whatever the client would
/// have spoken in cleartext) and Postgres (ALPN `postgresql`, which PG17 direct-TLS clients
/// require).
pub(super) struct TlsConfigs {
    plain: Arc<ServerConfig>,
    postgres: Arc<ServerConfig>,
}

impl TlsConfigs {
    pub(super) fn new(certs: Arc<CertStore>) -> Self {
        let build = |alpn: Vec<Vec<u8>>| {
            let mut config = ServerConfig::builder()
                .with_no_client_auth()
                .with_cert_resolver(certs.clone());
            config.alpn_protocols = alpn;
            Arc::new(config)
        };
        Self {
            plain: build(Vec::new()),
            postgres: build(vec![b"postgresql".to_vec()]),
        }
    }
}

/// A connection to terminate.
pub(super) struct Terminated {
    pub(super) client: TcpStream,
    pub(super) addr: SocketAddr,
    pub(super) postgres: bool,
    pub(super) proxy_header: Option<ProxyHeader>,
    pub(super) deadline: Instant,
    pub(super) meta: FlowMeta,
    pub(super) slot: FlowSlot,
    pub(super) permit: OwnedSemaphorePermit,
}

/// Handshakes with the client and connects the backend at once, then relays until both
/// directions end.
pub(super) async fn run(dp: &DataPlane, t: Terminated) -> Result<(), Refusal> {
    let Terminated {
        client,
        addr,
        postgres,
        proxy_header,
        deadline,
        meta,
        slot,
        permit,
    } = t;
    let config = if postgres {
        dp.inner.tls.postgres.clone()
    } else {
        dp.inner.tls.plain.clone()
    };
    let handshake = async {
        tokio::time::timeout_at(deadline.into(), TlsAcceptor::from(config).accept(client))
            .await
            .map_err(|_| Refusal::new(Reason::HelloTimeout, "tls handshake not done in time"))?
            .map_err(|e| Refusal::new(Reason::TlsHandshakeFailed, e))
    };
    let backend = async {
        let mut backend = connect::connect(addr, &dp.connect_options(true))
            .await
            .map_err(|e| Refusal::new(Reason::from_block(e.reason()), &e))?;
        if let Some(header) = &proxy_header {
            super::conn::write_header(&mut backend, header).await?;
        }
        Ok::<_, Refusal>(backend)
    };
    let (tls, backend) = tokio::join!(handshake, backend);
    let (tls, backend) = (tls?, backend?);
    drop(permit);
    let stats = &dp.inner.stats;
    stats.active_terminated.fetch_add(1, Ordering::Relaxed);
    let client_fd = tls.get_ref().0.as_fd().try_clone_to_owned().ok();
    let backend_fd = backend.as_fd().try_clone_to_owned().ok();
    let started = Instant::now();
    let (up, down, end) = relay(tls, backend, client_fd, backend_fd).await;
    stats.active_terminated.fetch_sub(1, Ordering::Relaxed);
    drop(slot);
    debug!(
        ingress = %meta.ingress,
        client = %meta.client,
        sni = meta.sni.as_deref().unwrap_or(""),
        alpn = meta.alpn.as_deref().unwrap_or(""),
        rule = meta.sni_pattern.as_deref().unwrap_or("default"),
        instance = %meta.instance,
        backend = %meta.backend,
        mode = ?meta.mode,
        path = "userspace",
        end,
        up,
        down,
        duration_ms = started.elapsed().as_millis() as u64,
        "terminated flow ended"
    );
    Ok(())
}

/// Copies both directions; returns bytes client → backend, backend → client, and how it ended.
async fn relay<C>(
    client: C,
    backend: TcpStream,
    client_fd: Option<OwnedFd>,
    backend_fd: Option<OwnedFd>,
) -> (u64, u64, &'static str)
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_r, mut client_w) = tokio::io::split(client);
    let (mut backend_r, mut backend_w) = backend.into_split();
    let up = copy(&mut client_r, &mut backend_w);
    let down = copy(&mut backend_r, &mut client_w);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (None, None);
    while up_done.is_none() || down_done.is_none() {
        tokio::select! {
            r = &mut up, if up_done.is_none() => {
                if let Err((n, e)) = r {
                    // Whose fault: a read error is the client's, a write error the backend's.
                    let (end, victim) = match e {
                        Side::Read => ("client_reset", &backend_fd),
                        Side::Write => ("backend_reset", &client_fd),
                    };
                    reset(victim);
                    return (n, 0, end);
                }
                up_done = r.ok();
            }
            r = &mut down, if down_done.is_none() => {
                if let Err((n, e)) = r {
                    let (end, victim) = match e {
                        Side::Read => ("backend_reset", &client_fd),
                        Side::Write => ("client_reset", &backend_fd),
                    };
                    reset(victim);
                    return (0, n, end);
                }
                down_done = r.ok();
            }
        }
    }
    (up_done.unwrap_or(0), down_done.unwrap_or(0), "closed")
}

fn reset(fd: &Option<OwnedFd>) {
    if let Some(fd) = fd {
        let _ = sys::set_reset_on_close(fd.as_fd());
    }
}

enum Side {
    Read,
    Write,
}

/// Copies `from` to `to` until end of stream, then shuts `to` down (a FIN, or `close_notify` +
/// FIN for TLS). Returns the bytes copied, or on error the bytes so far and which side failed.
async fn copy<R, W>(from: &mut R, to: &mut W) -> Result<u64, (u64, Side)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; RELAY_BUFFER_BYTES];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            // A TLS peer that closes without `close_notify`: its stream ended all the same.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(_) => return Err((total, Side::Read)),
        };
        if to
            .write_all(buf.get(..n).unwrap_or_default())
            .await
            .is_err()
        {
            return Err((total, Side::Write));
        }
        total += n as u64;
    }
    to.shutdown().await.map_err(|_| (total, Side::Write))?;
    Ok(total)
}
