//! One connection, from accept to hand-off (or refusal).

use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::{io::AsyncWriteExt as _, net::TcpStream, sync::OwnedSemaphorePermit};
use tracing::{debug, warn};

use super::{DataPlane, FlowSlot, Reason, Refusal, terminate};
use crate::{
    connect,
    hello::{self, ClientHelloInfo},
    listeners::IngressHandle,
    model::{Mode, Protocol, ProxyProtocol},
    postgres::{self, ClientPreamble},
    proxy_protocol,
    splice::{self, Preamble},
};

/// What the data path knows about a flow, for its end-of-flow record.
#[derive(Debug)]
pub(crate) struct FlowMeta {
    pub(crate) ingress: String,
    pub(crate) client: SocketAddr,
    pub(crate) sni: Option<String>,
    pub(crate) alpn: Option<String>,
    pub(crate) sni_pattern: Option<String>,
    pub(crate) instance: String,
    pub(crate) backend: SocketAddr,
    pub(crate) mode: Mode,
}

/// Serves one accepted connection; the permit is held until the hand-off.
pub(super) async fn handle(
    dp: DataPlane,
    ingress: Arc<IngressHandle>,
    client: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
) {
    // Without it the small messages of a handshake wait for the peer's delayed ACK (Nagle):
    // 40 ms per TLS handshake through the proxy, whether spliced or terminated.
    if let Err(e) = client.set_nodelay(true) {
        debug!(error = %e, "setting TCP_NODELAY on the client socket");
    }
    if let Err(refusal) = route_and_hand_off(&dp, &ingress, client, peer, permit).await {
        dp.inner.stats.refuse(refusal.reason);
        if refusal.reason.is_internal() {
            warn!(reason = %refusal.reason, detail = %refusal.detail, "connection refused");
        } else {
            debug!(reason = %refusal.reason, detail = %refusal.detail, "connection refused");
        }
    }
}

fn refused(reason: &'static str, detail: impl std::fmt::Display) -> Refusal {
    Refusal::new(Reason::from_block(reason), detail)
}

async fn route_and_hand_off(
    dp: &DataPlane,
    ingress: &IngressHandle,
    mut client: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
) -> Result<(), Refusal> {
    let settings = &dp.inner.settings;
    let deadline = Instant::now() + settings.handshake_timeout;
    let table = ingress.routes.load_full();

    // A Postgres client opens with an 8-byte SSLRequest and waits for `S`; answer it, then the
    // ClientHello follows. Exactly those 8 bytes are consumed.
    let mut pg_request = false;
    if table.has_postgres() {
        match postgres::read_client_preamble(&mut client, deadline.into()).await {
            Ok(ClientPreamble::DirectTls) => {}
            Ok(ClientPreamble::SslRequest { pipelined }) => {
                if pipelined {
                    // The next bytes share a segment with the request: a partly read segment
                    // cannot be handed to the kernel, and a compliant client waits for `S`.
                    return Err(Refusal::new(
                        Reason::BadHello,
                        "bytes sent before the SSLRequest was answered",
                    ));
                }
                postgres::accept_ssl_request(&mut client)
                    .await
                    .map_err(|e| refused(e.reason(), &e))?;
                pg_request = true;
            }
            Err(e) => return Err(refused(e.reason(), &e)),
        }
    }

    let hello = hello::read_client_hello(&client, settings.max_hello_bytes, deadline.into())
        .await
        .map_err(|e| refused(e.reason(), &e))?;
    let route = table
        .lookup(hello.sni.as_deref())
        .ok_or_else(|| match &hello.sni {
            None => Refusal::new(Reason::NoSni, "no server name and no default target"),
            Some(sni) => Refusal::new(Reason::UnknownSni, format_args!("no rule for {sni}")),
        })?;
    if pg_request && route.protocol != Protocol::Postgres {
        return Err(Refusal::new(
            Reason::ProtocolMismatch,
            "a Postgres SSLRequest for a rule that is not postgres",
        ));
    }

    let ip = dp
        .inner
        .shared
        .resolver
        .resolve(&route.instance)
        .await
        .map_err(|e| refused(e.reason(), &e))?;
    let addr = SocketAddr::new(ip, route.port);
    dp.inner
        .shared
        .policy
        .check(addr)
        .map_err(|e| refused(e.reason(), &e))?;
    let slot = dp
        .take_flow_slot()
        .ok_or_else(|| Refusal::new(Reason::FlowLimit, "max_flows reached"))?;
    dp.inner
        .stats
        .routed
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);

    let meta = FlowMeta {
        ingress: ingress.name.clone(),
        client: peer,
        sni: hello.sni.clone(),
        alpn: first_alpn(&hello),
        sni_pattern: route.sni_pattern.map(str::to_owned),
        instance: route.instance.clone().into_owned(),
        backend: addr,
        mode: route.mode,
    };
    let proxy_header = route
        .proxy_protocol
        .map(|v| header(v, peer, client.local_addr().unwrap_or(ingress.local_addr)));
    let postgres = route.protocol == Protocol::Postgres;
    match route.mode {
        Mode::Passthrough => {
            drop(route);
            let mut backend = connect::connect(addr, &dp.connect_options(false))
                .await
                .map_err(|e| refused(e.reason(), &e))?;
            if let Some(header) = &proxy_header {
                write_header(&mut backend, header).await?;
            }
            let mut backend_consumed = 0;
            if postgres {
                // The backend sees a standard SSLRequest whatever the client sent (a direct
                // TLS client reaches a pre-17 server too); its `S` is consumed here.
                postgres::start_backend_tls(&mut backend, deadline.into())
                    .await
                    .map_err(|e| refused(e.reason(), &e))?;
                backend_consumed = 1;
            }
            drop(permit);
            splice_flow(
                dp,
                client,
                backend,
                pg_request,
                backend_consumed,
                meta,
                slot,
            )
        }
        Mode::Terminate => {
            drop(route);
            terminate::run(
                dp,
                terminate::Terminated {
                    client,
                    addr,
                    postgres,
                    proxy_header,
                    deadline,
                    meta,
                    slot,
                    permit,
                },
            )
            .await
        }
    }
}

fn first_alpn(hello: &ClientHelloInfo) -> Option<String> {
    hello
        .alpn
        .first()
        .map(|p| String::from_utf8_lossy(p).into_owned())
}

fn header(
    version: ProxyProtocol,
    peer: SocketAddr,
    local: SocketAddr,
) -> proxy_protocol::ProxyHeader {
    let version = match version {
        ProxyProtocol::V1 => proxy_protocol::Version::V1,
        ProxyProtocol::V2 => proxy_protocol::Version::V2,
    };
    proxy_protocol::encode(version, peer, local)
}

pub(super) async fn write_header(
    backend: &mut TcpStream,
    header: &proxy_protocol::ProxyHeader,
) -> Result<(), Refusal> {
    backend.write_all(header.as_bytes()).await.map_err(|e| {
        Refusal::new(
            Reason::BackendUnreachable,
            format_args!("writing the PROXY header: {e}"),
        )
    })
}

fn splice_flow(
    dp: &DataPlane,
    client: TcpStream,
    backend: TcpStream,
    pg_request: bool,
    backend_consumed: u64,
    meta: FlowMeta,
    slot: FlowSlot,
) -> Result<(), Refusal> {
    let internal = |e: std::io::Error| Refusal::new(Reason::Internal, e);
    let client = splice::into_owned_fd(client).map_err(internal)?;
    let backend = splice::into_owned_fd(backend).map_err(internal)?;
    let preamble = Preamble {
        client_consumed: if pg_request { 8 } else { 0 },
        backend_consumed,
    };
    let on_end: splice::OnEnd = Box::new(move |outcome| {
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
            path = outcome.path.as_str(),
            end = outcome.end.as_str(),
            up = outcome.client_to_backend.total(),
            down = outcome.backend_to_client.total(),
            "flow ended"
        );
    });
    dp.inner
        .engine
        .splice(client, backend, preamble, Some(on_end))
        .map(|_| ())
        .map_err(|e| Refusal::new(Reason::Internal, e))
}
