//! One connection, from accept to hand-off (or refusal).

use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::{io::AsyncWriteExt as _, net::TcpStream, sync::OwnedSemaphorePermit};
use tracing::{debug, warn};

use super::{
    DataPlane, FlowSlot, Reason, Refusal,
    relay_first::{Phase, RelayFirst},
    terminate,
};
use crate::{
    access_log::{self, Name, Outcome, Record},
    connect, hello,
    listeners::IngressHandle,
    metrics::{FlowPath, IngressMetrics},
    model::{Mode, Protocol, ProxyProtocol},
    postgres::{self, ClientPreamble},
    proxy_protocol,
    splice::{self, FlowOptions, Preamble},
};

/// What the data path knows about a connection, filled in as it learns it; becomes the access
/// log record when the flow ends or the connection is refused. The texts are only filled when
/// the access log is on, and cost no allocation: the server name and ALPN offer move out of
/// the parsed hello, the rule and instance names are the route table's. They stay small here
/// (the connection's task moves this struct several times) and are copied into the record
/// only at the end.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) counters: Arc<IngressMetrics>,
    pub(crate) client: SocketAddr,
    pub(crate) accepted_at: Instant,
    /// When the ClientHello was complete (accept time until then).
    pub(crate) hello_at: Instant,
    pub(crate) sni: Option<String>,
    pub(crate) alpn: Option<Vec<u8>>,
    pub(crate) rule: Option<Arc<str>>,
    pub(crate) instance: Option<InstanceName>,
    pub(crate) backend: Option<SocketAddr>,
    pub(crate) mode: Option<Mode>,
}

impl Conn {
    /// A connection from `client`; an IPv4 client of a dual-stack listener is recorded as
    /// IPv4 (`127.0.0.1:5000`, not `[::ffff:127.0.0.1]:5000`).
    pub(super) fn new(
        counters: Arc<IngressMetrics>,
        client: SocketAddr,
        accepted_at: Instant,
    ) -> Self {
        Self {
            counters,
            client: proxy_protocol::canonical(client),
            accepted_at,
            hello_at: accepted_at,
            sni: None,
            alpn: None,
            rule: None,
            instance: None,
            backend: None,
            mode: None,
        }
    }

    /// Moves what is known into a flow's record-to-be, leaving this one empty.
    pub(super) fn take(&mut self) -> Self {
        Self {
            counters: self.counters.clone(),
            client: self.client,
            accepted_at: self.accepted_at,
            hello_at: self.hello_at,
            sni: self.sni.take(),
            alpn: self.alpn.take(),
            rule: self.rule.take(),
            instance: self.instance.take(),
            backend: self.backend,
            mode: self.mode,
        }
    }

    /// The access log record of a connection that ended at `time_micros` (since the Unix
    /// epoch) after `duration_micros`: a view of what is known, nothing copied.
    #[inline]
    pub(super) fn record(
        &self,
        time_micros: u64,
        duration_micros: u64,
        outcome: Outcome,
    ) -> Record<'_> {
        Record {
            time_micros,
            ingress: self.counters.name(),
            rule: self.rule.as_ref(),
            client: self.client,
            sni: self.sni.as_deref(),
            alpn: self.alpn.as_deref(),
            instance: self.instance.as_ref().map(|name| match name {
                InstanceName::Shared(name) => Name::Shared(name),
                InstanceName::Rendered(name) => Name::Text(name),
            }),
            backend: self.backend,
            mode: self.mode,
            duration_micros,
            outcome,
        }
    }
}

/// The instance name of a record-to-be.
#[derive(Debug)]
pub(crate) enum InstanceName {
    /// The route table's name (a template without captures, or the default target).
    Shared(Arc<str>),
    /// Rendered from a pattern's captures for this connection.
    Rendered(String),
}

impl InstanceName {
    fn as_str(&self) -> &str {
        match self {
            Self::Shared(name) => name,
            Self::Rendered(name) => name,
        }
    }
}

/// Serves one accepted connection; the permit is held until the hand-off.
pub(super) async fn handle(
    dp: DataPlane,
    ingress: Arc<IngressHandle>,
    client: TcpStream,
    mut conn: Conn,
    permit: OwnedSemaphorePermit,
) {
    // Without it the small messages of a handshake wait for the peer's delayed ACK (Nagle):
    // 40 ms per TLS handshake through the proxy, whether spliced or terminated.
    if let Err(e) = client.set_nodelay(true) {
        debug!(error = %e, "setting TCP_NODELAY on the client socket");
    }
    if let Err(refusal) = route_and_hand_off(&dp, &ingress, client, &mut conn, permit).await {
        report_refusal(&dp, conn, &refusal);
    }
}

/// Counts, traces and logs a refused connection with what was known of it.
fn report_refusal(dp: &DataPlane, conn: Conn, refusal: &Refusal) {
    conn.counters.on_refuse(refusal.reason);
    if refusal.reason.is_internal() {
        warn!(reason = %refusal.reason, detail = %refusal.detail, sni = ?conn.sni, "connection refused");
    } else {
        debug!(reason = %refusal.reason, detail = %refusal.detail, sni = ?conn.sni, "connection refused");
    }
    let log = &dp.inner.access_log;
    if log.enabled() {
        let (now, took) = log.now_since(conn.accepted_at);
        log.log(&conn.record(
            now,
            took,
            Outcome::Refused {
                reason: refusal.reason,
            },
        ));
    }
}

fn refused(reason: &'static str, detail: impl std::fmt::Display) -> Refusal {
    Refusal::new(Reason::from_block(reason), detail)
}

async fn route_and_hand_off(
    dp: &DataPlane,
    ingress: &IngressHandle,
    mut client: TcpStream,
    conn: &mut Conn,
    permit: OwnedSemaphorePermit,
) -> Result<(), Refusal> {
    let settings = &dp.inner.settings;
    let logging = dp.inner.access_log.enabled();
    let peer = conn.client;
    let deadline = conn.accepted_at + settings.handshake_timeout;
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
                    return Err(Refusal::fixed(
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

    let mut hello = hello::read_client_hello(&client, settings.max_hello_bytes, deadline.into())
        .await
        .map_err(|e| refused(e.reason(), &e))?;
    conn.hello_at = Instant::now();
    conn.counters
        .hello
        .observe(conn.hello_at.saturating_duration_since(conn.accepted_at));
    let route = table.lookup(hello.sni.as_deref());
    if logging || route.is_none() {
        // Moved, not copied: the record-to-be or the refusal's debug line names it.
        conn.sni = hello.sni.take();
    }
    if logging {
        conn.alpn = hello.alpn.first_mut().map(std::mem::take);
    }
    let Some(mut route) = route else {
        return Err(match conn.sni {
            None => Refusal::fixed(Reason::NoSni, "no server name and no default target"),
            Some(_) => Refusal::fixed(Reason::UnknownSni, "no rule for the server name"),
        });
    };
    conn.mode = Some(route.mode);
    if logging {
        conn.rule = Some(route.rule_name.clone());
        // A rendered name moves into the record-to-be; the resolver reads it from there.
        conn.instance = Some(match route.shared_instance {
            Some(name) => InstanceName::Shared(name.clone()),
            None => InstanceName::Rendered(std::mem::take(&mut route.instance).into_owned()),
        });
    }
    if pg_request && route.protocol != Protocol::Postgres {
        return Err(Refusal::fixed(
            Reason::ProtocolMismatch,
            "a Postgres SSLRequest for a rule that is not postgres",
        ));
    }

    let ip = dp
        .inner
        .shared
        .resolver
        .resolve(
            conn.instance
                .as_ref()
                .map_or(&*route.instance, InstanceName::as_str),
        )
        .await
        .map_err(|e| refused(e.reason(), &e))?;
    let addr = SocketAddr::new(ip, route.port);
    conn.backend = Some(addr);
    dp.inner
        .shared
        .policy
        .check(addr)
        .map_err(|e| refused(e.reason(), &e))?;
    let slot = dp
        .take_flow_slot()
        .ok_or_else(|| Refusal::fixed(Reason::FlowLimit, "max_flows reached"))?;
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
            conn.counters.connect.observe(conn.hello_at.elapsed());
            let mut preamble = Preamble {
                client_consumed: if pg_request { 8 } else { 0 },
                backend_consumed,
                shut: [false; 2],
            };
            let limits = settings.relay_first;
            let mut first = None;
            let mut userspace = false;
            if limits.enabled() && dp.inner.engine.path() == splice::Path::Sockmap {
                let started = Instant::now();
                conn.counters
                    .on_flow_start(Mode::Passthrough, FlowPath::Userspace);
                let mut relay = RelayFirst::new(&client, &backend);
                let phase = relay.run(limits).await;
                let moved = relay.moved();
                let consumed = relay.consumed();
                drop(relay);
                for (d, n) in moved.iter().enumerate() {
                    conn.counters.on_relayed(d, *n);
                }
                match phase {
                    Phase::HandOff { shut, bulk } => {
                        preamble.client_consumed += consumed[0];
                        preamble.backend_consumed += consumed[1];
                        preamble.shut = shut;
                        userspace = bulk && settings.bulk_in_userspace;
                        first = Some(First { moved, started });
                    }
                    Phase::Ended(end) => {
                        drop(permit);
                        ended_first(dp, conn.take(), slot, moved, end, started);
                        return Ok(());
                    }
                }
            }
            let options = FlowOptions {
                preamble,
                tag: conn.counters.tag(),
                idle_timeout: table.idle_timeout(),
                userspace,
            };
            splice_flow(dp, [client, backend], options, conn, slot, first, permit)
        }
        Mode::Terminate => {
            let alpn = route.alpn.clone();
            drop(route);
            Box::pin(terminate::run(
                dp,
                terminate::Terminated {
                    client,
                    addr,
                    alpn,
                    proxy_header,
                    deadline,
                    slot,
                    permit,
                    idle_timeout: table.idle_timeout(),
                },
                conn,
            ))
            .await
        }
    }
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
    [client, backend]: [TcpStream; 2],
    options: FlowOptions,
    conn: &mut Conn,
    slot: FlowSlot,
    first: Option<First>,
    permit: OwnedSemaphorePermit,
) -> Result<(), Refusal> {
    let internal = |e: std::io::Error| Refusal::new(Reason::Internal, e);
    let client = splice::into_owned_fd(client).map_err(internal)?;
    let backend = splice::into_owned_fd(backend).map_err(internal)?;
    let counters = conn.counters.clone();
    let flow = conn.take();
    let on_end: splice::OnEnd = Box::new(PassthroughEnd { flow, slot, first });
    let engine = &dp.inner.engine;
    // A refusal is reported by the handler (`PassthroughEnd::refused`), which holds what is
    // known of the connection.
    let spliced = engine.splice(client, backend, options, Some(on_end));
    // Held until the engine has the flow: a takeover waits for every permit before it
    // freezes the engine, and the freeze reaches the shard after the flow (one queue). The
    // first phase holds it too, so its buffers count against `max_handshakes`.
    drop(permit);
    if let Ok(spliced) = spliced {
        let path = FlowPath::from(spliced.path);
        if first.is_some() {
            counters.on_path_change(Mode::Passthrough, FlowPath::Userspace, path);
        } else {
            counters.on_flow_start(Mode::Passthrough, path);
        }
    }
    Ok(())
}

/// The userspace phase of a flow handed to the engine after it.
#[derive(Clone, Copy)]
pub(super) struct First {
    /// Bytes it moved per direction (0 = client → backend).
    pub(super) moved: [u64; 2],
    /// When it started.
    pub(super) started: Instant,
}

/// Reports a passthrough flow the engine carried: its metrics and its access log line. In a
/// hand-off it describes the flow ([`FlowMeta`]), so the next daemon reports it the same way.
pub(super) struct PassthroughEnd {
    pub(super) flow: Conn,
    pub(super) slot: FlowSlot,
    /// The userspace phase before the engine, if any (for an adopted flow, the time since the
    /// flow began and the bytes the previous daemon's first phase moved).
    pub(super) first: Option<First>,
}

impl splice::EndHandler for PassthroughEnd {
    fn end(self: Box<Self>, outcome: splice::FlowOutcome) {
        let Self { flow, slot, first } = *self;
        let path = FlowPath::from(outcome.path);
        // The userspace phase before the hand-off belongs to the flow too.
        let (pre, duration) = match &first {
            Some(first) => (first.moved, first.started.elapsed()),
            None => ([0; 2], outcome.duration),
        };
        flow.counters
            .on_flow_end(Mode::Passthrough, path, outcome.end, duration);
        let log = &slot.dp.inner.access_log;
        if log.enabled() {
            let (up, down) = (outcome.client_to_backend, outcome.backend_to_client);
            log.log(&flow.record(
                log.unix_micros_now(),
                access_log::micros(duration),
                Outcome::Flow {
                    id: outcome.id,
                    path,
                    client_to_backend_bytes: up.total() + pre[0],
                    backend_to_client_bytes: down.total() + pre[1],
                    relayed_bytes: up.relayed + down.relayed + pre[0] + pre[1],
                    end: outcome.end,
                },
            ));
        }
        drop(slot);
    }

    fn refused(self: Box<Self>, error: &splice::SpliceError) {
        let Self { flow, slot, first } = *self;
        let dp = slot.dp.clone();
        match first {
            Some(First { moved, started }) => {
                // Bytes moved already: a flow that failed, not a refused connection. The
                // sockets are closed; the peers' TLS sees the stream cut short.
                warn!(%error, "the kernel path refused a flow after its first phase");
                ended_first(
                    &dp,
                    flow,
                    slot,
                    moved,
                    splice::FlowEnd::KernelError,
                    started,
                );
            }
            None => {
                let refusal = match error {
                    // The kernel's flow table is full: a limit like `max_flows`, not a fault.
                    e @ splice::SpliceError::MapFull => Refusal::new(Reason::FlowLimit, e),
                    e => Refusal::new(Reason::Internal, e),
                };
                report_refusal(&dp, flow, &refusal);
                drop(slot);
            }
        }
    }

    fn describe(&self) -> Option<serde_json::Value> {
        let flow = &self.flow;
        let meta = FlowMeta {
            client: flow.client,
            sni: flow.sni.clone(),
            alpn: flow.alpn.clone(),
            rule: flow.rule.as_deref().map(str::to_owned),
            instance: flow.instance.as_ref().map(|i| i.as_str().to_owned()),
            backend: flow.backend,
            first_moved: self.first.map_or([0; 2], |f| f.moved),
            age_us: self
                .first
                .map(|f| u64::try_from(f.started.elapsed().as_micros()).unwrap_or(u64::MAX)),
        };
        serde_json::to_value(meta).ok()
    }
}

/// What a passthrough flow's access log line needs, carried to the next daemon in a hand-off.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct FlowMeta {
    pub(super) client: SocketAddr,
    pub(super) sni: Option<String>,
    pub(super) alpn: Option<Vec<u8>>,
    pub(super) rule: Option<String>,
    pub(super) instance: Option<String>,
    pub(super) backend: Option<SocketAddr>,
    /// Bytes the first phase moved per direction.
    pub(super) first_moved: [u64; 2],
    /// Microseconds since the first phase began, when there was one (else the engine's own
    /// age of the flow counts).
    pub(super) age_us: Option<u64>,
}

/// Reports a passthrough flow that ended in its userspace phase, before any hand-off.
fn ended_first(
    dp: &DataPlane,
    flow: Conn,
    slot: FlowSlot,
    moved: [u64; 2],
    end: splice::FlowEnd,
    started: Instant,
) {
    let took = started.elapsed();
    flow.counters
        .on_flow_end(Mode::Passthrough, FlowPath::Userspace, end, took);
    let log = &dp.inner.access_log;
    if log.enabled() {
        log.log(&flow.record(
            log.unix_micros_now(),
            access_log::micros(took),
            Outcome::Flow {
                id: dp.inner.engine.next_flow_id(),
                path: FlowPath::Userspace,
                client_to_backend_bytes: moved[0],
                backend_to_client_bytes: moved[1],
                relayed_bytes: moved[0] + moved[1],
                end,
            },
        ));
    }
    drop(slot);
}
