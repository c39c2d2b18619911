//! Terminated flows: the rustls handshake with the client (certificate chosen by SNI from the
//! store), then plaintext to the backend — on kernel TLS with `splice(2)` where the kernel
//! offers it (see [`super::ktls`]), else through a userspace relay.
//!
//! Terminated flows never enter the sockhash: kTLS and sockmap exclude each other on patched
//! kernels. The userspace relay reads each direction into the worker thread's scratch buffer
//! and writes it on at once; a flow holds a buffer of its own only for bytes its destination
//! did not take yet, so an idle flow holds none. End of stream becomes a `close_notify` + FIN
//! toward the client or a FIN toward the backend, and a reset or error on one side resets the
//! other (`SO_LINGER {1, 0}`).

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::{AsFd as _, OwnedFd},
    pin::Pin,
    sync::Arc,
    task::Poll,
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use rustls::{ServerConfig, crypto::CryptoProvider};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::TcpStream,
    sync::OwnedSemaphorePermit,
};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::{
    DataPlane, FlowSlot, Reason, Refusal, conn::Conn, ktls, observe::LiveGuard,
    read_ahead::ReadAhead,
};
use crate::{
    access_log::Outcome,
    certs::CertStore,
    connect,
    metrics::{FlowPath, IngressMetrics},
    model::{Mode, POSTGRES_ALPN},
    proxy_protocol::ProxyHeader,
    route::Alpn,
    splice::FlowEnd,
    sys,
};

/// Most bytes the relay reads before it writes (four TLS records' plaintext).
const RELAY_BUFFER_BYTES: usize = 64 << 10;

thread_local! {
    /// Where the relay's reads land before they are written on.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Server configurations, one per distinct ALPN list, all sharing the certificate resolver.
///
/// Plain TLS (no ALPN: the backend speaks whatever the client would have spoken in cleartext)
/// and Postgres (ALPN `postgresql`, which PG17 direct-TLS clients require) are built up front;
/// a list a rule configures is built on first use and cached. Lookups read the cache without a
/// lock; a miss builds the configuration and swaps in a larger map. Lists are bounded by the
/// rules ever configured, so the cache is never pruned.
pub(super) struct TlsConfigs {
    certs: Arc<CertStore>,
    ktls: Option<Arc<CryptoProvider>>,
    plain: Arc<ServerConfig>,
    by_alpn: ArcSwap<ConfigsByAlpn>,
}

/// Server configurations keyed by the ALPN list they offer.
type ConfigsByAlpn = HashMap<Box<[Vec<u8>]>, Arc<ServerConfig>>;

impl TlsConfigs {
    /// Configurations over `certs`; with `ktls` (the kernel's cipher suites) they offer only
    /// those suites and allow secret extraction, so every session can move to the kernel.
    pub(super) fn new(certs: Arc<CertStore>, ktls: Option<Arc<CryptoProvider>>) -> Self {
        let plain = build(&certs, ktls.as_ref(), &[]);
        let postgres: Box<[Vec<u8>]> = Box::new([POSTGRES_ALPN.as_bytes().to_vec()]);
        let by_alpn = HashMap::from([(postgres.clone(), build(&certs, ktls.as_ref(), &postgres))]);
        Self {
            certs,
            ktls,
            plain,
            by_alpn: ArcSwap::from_pointee(by_alpn),
        }
    }

    /// The configuration offering `alpn` (in preference order; empty: no ALPN).
    pub(super) fn get(&self, alpn: &[Vec<u8>]) -> Arc<ServerConfig> {
        if alpn.is_empty() {
            return self.plain.clone();
        }
        if let Some(config) = self.by_alpn.load().get(alpn) {
            return config.clone();
        }
        let config = build(&self.certs, self.ktls.as_ref(), alpn);
        self.by_alpn.rcu(|map| {
            let mut map = HashMap::clone(map);
            map.entry(alpn.into()).or_insert_with(|| config.clone());
            map
        });
        config
    }
}

fn build(
    certs: &Arc<CertStore>,
    ktls: Option<&Arc<CryptoProvider>>,
    alpn: &[Vec<u8>],
) -> Arc<ServerConfig> {
    let kernel = ktls.and_then(|provider| {
        ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(
                |err| warn!(error = %err, "kernel tls suites unusable; terminating in userspace"),
            )
            .ok()
    });
    let extract = kernel.is_some();
    let mut config = kernel
        .unwrap_or_else(ServerConfig::builder)
        .with_no_client_auth()
        .with_cert_resolver(certs.clone());
    config.alpn_protocols = alpn.to_vec();
    // The keys leave rustls only for the kernel.
    config.enable_secret_extraction = extract;
    Arc::new(config)
}

/// A connection to terminate.
pub(super) struct Terminated {
    pub(super) client: TcpStream,
    pub(super) addr: SocketAddr,
    pub(super) alpn: Alpn,
    pub(super) proxy_header: Option<ProxyHeader>,
    pub(super) deadline: Instant,
    pub(super) slot: FlowSlot,
    pub(super) permit: OwnedSemaphorePermit,
    pub(super) idle_timeout: Option<Duration>,
}

/// A client session after the handshake.
enum Session {
    /// tokio-rustls; the rustls relay carries the flow.
    Rustls(tokio_rustls::server::TlsStream<ReadAhead>),
    /// Handshake fed record by record; the keys go to the kernel next.
    Kernel(ktls::Handshaken),
}

impl Session {
    fn alpn(&self) -> Option<Vec<u8>> {
        match self {
            Self::Rustls(tls) => tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec),
            Self::Kernel(h) => h.conn.alpn_protocol().map(<[u8]>::to_vec),
        }
    }
}

async fn handshake(config: Arc<ServerConfig>, client: TcpStream) -> Result<Session, Refusal> {
    let failed = |e: &dyn std::fmt::Display| Refusal::new(Reason::TlsHandshakeFailed, e);
    // The kernel takes its TLS layer only on an established socket, and a client that sends
    // its request and FIN right behind its `Finished` leaves none by the time the keys could
    // go in. So the layer goes on first, while the socket is surely established (it passes
    // bytes through unchanged until keys are set); where it cannot, the flow stays on rustls
    // from the start instead of failing after the handshake.
    if config.enable_secret_extraction && ktls_layer(&client) {
        let conn =
            rustls::server::UnbufferedServerConnection::new(config).map_err(|e| failed(&e))?;
        let done = ktls::handshake(client, conn)
            .await
            .map_err(|e| failed(&e))?;
        return Ok(Session::Kernel(done));
    }
    let tls = TlsAcceptor::from(config)
        .accept(ReadAhead::new(client))
        .await
        .map_err(|e| failed(&e))?;
    Ok(Session::Rustls(tls))
}

/// Puts the kernel's TLS layer on `client`; whether it took.
fn ktls_layer(client: &TcpStream) -> bool {
    match sys::set_tls_ulp(client.as_fd()) {
        Ok(()) => true,
        Err(err) => {
            debug!(error = %err, "the kernel tls layer did not take; the flow stays on rustls");
            false
        }
    }
}

/// Handshakes with the client and connects the backend at once, then relays until both
/// directions end.
pub(super) async fn run(dp: &DataPlane, t: Terminated, conn: &mut Conn) -> Result<(), Refusal> {
    let Terminated {
        client,
        addr,
        alpn,
        proxy_header,
        deadline,
        slot,
        permit,
        idle_timeout,
    } = t;
    let config = dp.inner.tls.get(&alpn);
    drop(alpn);
    let counters = &conn.counters;
    let hello_at = conn.hello_at;
    let handshake = async {
        let session = tokio::time::timeout_at(deadline.into(), handshake(config, client))
            .await
            .map_err(|_| {
                Refusal::fixed(Reason::HelloTimeout, "tls handshake not done in time")
            })??;
        counters.tls_handshake.observe(hello_at.elapsed());
        Ok::<_, Refusal>(session)
    };
    let backend = async {
        let mut backend = connect::connect(addr, &dp.connect_options(true))
            .await
            .map_err(|e| Refusal::new(Reason::from_block(e.reason()), &e))?;
        if let Some(header) = &proxy_header {
            super::conn::write_header(&mut backend, header).await?;
        }
        counters.connect.observe(hello_at.elapsed());
        Ok::<_, Refusal>(backend)
    };
    let (session, backend) = tokio::join!(handshake, backend);
    let (session, backend) = (session?, backend?);
    drop(permit);
    let id = dp.inner.engine.next_flow_id();
    let mut flow = conn.take();
    if dp.inner.access_log.enabled() {
        flow.alpn = session.alpn();
    }
    let path = match session {
        Session::Rustls(_) => FlowPath::Userspace,
        Session::Kernel(_) => FlowPath::KtlsSplice,
    };
    let counters = flow.counters.clone();
    let live = dp.inner.terminated.insert(id, &flow, path);
    counters.on_flow_start(Mode::Terminate, path);
    let started = Instant::now();
    let end = match session {
        Session::Rustls(tls) => {
            let sides = Sides {
                client_fd: tls.get_ref().0.as_fd().try_clone_to_owned().ok(),
                backend_fd: backend.as_fd().try_clone_to_owned().ok(),
                live: &live,
                counters: &counters,
            };
            relay(tls, backend, &sides, idle_timeout).await
        }
        Session::Kernel(done) => {
            let sides = Sides {
                client_fd: None,
                backend_fd: None,
                live: &live,
                counters: &counters,
            };
            match ktls::install(done, &dp.inner.ktls) {
                Ok(installed) => {
                    debug!(
                        flow = id,
                        version = installed.params.0.as_str(),
                        cipher = installed.params.1.as_str(),
                        "session keys in the kernel"
                    );
                    ktls::relay(installed, backend, &sides, idle_timeout).await
                }
                Err(err) => {
                    // The session is gone (or cannot move): nothing sane can be sent.
                    warn!(flow = id, error = %err, "kernel tls refused the session");
                    let _ = sys::set_reset_on_close(backend.as_fd());
                    FlowEnd::KtlsInstallFailed
                }
            }
        }
    };
    let [up, down] = live.flow.bytes();
    let [relayed_up, relayed_down] = live.flow.relayed();
    drop(live);
    let ended_at = Instant::now();
    let took = ended_at.saturating_duration_since(started);
    counters.on_flow_end(Mode::Terminate, path, end, took);
    drop(slot);
    debug!(
        flow = id,
        path = path.as_str(),
        end = end.as_str(),
        up,
        down,
        "terminated flow ended"
    );
    let log = &dp.inner.access_log;
    if log.enabled() {
        log.log(&flow.record(
            log.unix_micros_at(ended_at),
            crate::access_log::micros(took),
            Outcome::Flow {
                id,
                path,
                client_to_backend_bytes: up,
                backend_to_client_bytes: down,
                relayed_bytes: relayed_up + relayed_down,
                end,
            },
        ));
    }
    Ok(())
}

/// What a relay needs besides the streams: descriptors to reset, and where to count.
pub(super) struct Sides<'a> {
    client_fd: Option<OwnedFd>,
    backend_fd: Option<OwnedFd>,
    pub(super) live: &'a LiveGuard<'a>,
    pub(super) counters: &'a IngressMetrics,
}

impl Sides<'_> {
    /// Counts `bytes` that crossed userspace in `direction` (0 = client → backend).
    pub(super) fn count(&self, direction: usize, bytes: u64) {
        self.live.flow.add(direction, bytes);
        self.counters.on_relayed(direction, bytes);
    }

    /// Counts `bytes` spliced in the kernel in `direction`.
    pub(super) fn count_kernel(&self, direction: usize, bytes: u64) {
        self.live.flow.add_spliced(direction, bytes);
        self.counters.on_ktls_spliced(direction, bytes);
    }
}

/// Copies both directions (counting as it goes); returns how the flow ended. With an idle
/// timeout, the byte total is sampled every quarter of it; once it has not changed for the
/// whole timeout, both sides are closed.
async fn relay<C>(
    client: C,
    backend: TcpStream,
    sides: &Sides<'_>,
    idle_timeout: Option<Duration>,
) -> FlowEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_r, mut client_w) = tokio::io::split(client);
    let (mut backend_r, mut backend_w) = backend.into_split();
    // `return` inside the block ends the relay with a reason, and releases the halves.
    let end = async {
        let up = copy(&mut client_r, &mut backend_w, |n| sides.count(0, n));
        let down = copy(&mut backend_r, &mut client_w, |n| sides.count(1, n));
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (None, None);
        let mut ticker = idle_ticker(idle_timeout);
        let total = || sides.live.flow.bytes().iter().sum::<u64>();
        let mut idle = IdleClock::new(total());
        while up_done.is_none() || down_done.is_none() {
            tokio::select! {
                Some(_) = async { Some(ticker.as_mut()?.tick().await) }, if ticker.is_some() => {
                    if idle.expired(total(), idle_timeout) {
                        return FlowEnd::IdleTimeout;
                    }
                }
                r = &mut up, if up_done.is_none() => {
                    if let Err(e) = r {
                        // Whose fault: a read error is the client's, a write error the backend's.
                        let (end, victim) = match e {
                            Side::Read => (FlowEnd::ClientReset, &sides.backend_fd),
                            Side::Write => (FlowEnd::BackendReset, &sides.client_fd),
                        };
                        reset(victim);
                        return end;
                    }
                    up_done = r.ok();
                }
                r = &mut down, if down_done.is_none() => {
                    if let Err(e) = r {
                        let (end, victim) = match e {
                            Side::Read => (FlowEnd::BackendReset, &sides.client_fd),
                            Side::Write => (FlowEnd::ClientReset, &sides.backend_fd),
                        };
                        reset(victim);
                        return end;
                    }
                    down_done = r.ok();
                }
            }
        }
        FlowEnd::Closed
    }
    .await;
    if matches!(end, FlowEnd::ClientReset) {
        // Dropping the write half would send a FIN ahead of the reset, and the backend would
        // take the cut stream for a whole one.
        backend_w.forget();
    }
    end
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
/// FIN for TLS), passing the size of each write to `count`. On error, says which side failed.
///
/// Each step reads until the buffer is full or `from` has nothing more, then writes. A quiet
/// flow reads into the thread's scratch buffer and writes on in the same poll, so it holds no
/// buffer of its own. Once `to` does not take everything (the flow is busy), what is left
/// goes to a buffer of the flow's own, and reads go straight into that buffer until `from`
/// has nothing more to read: then it is freed. `to` is flushed whenever `from` has
/// nothing to read, so bytes a TLS writer holds back go out once its socket drains.
async fn copy<R, W>(from: &mut R, to: &mut W, count: impl Fn(u64)) -> Result<(), Side>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Empty, or `RELAY_BUFFER_BYTES` long with `own[at..end]` still to write.
    let mut own: Vec<u8> = Vec::new();
    let (mut at, mut end) = (0, 0);
    let mut unflushed = false;
    // The end of `from` (or its failure), met while reading ahead: reported once the bytes
    // read before it are written.
    let mut deferred: Option<Step> = None;
    std::future::poll_fn(|cx| {
        // `from` reported nothing more to read during this poll (its waker is registered).
        let mut drained = false;
        loop {
            while at < end {
                match Pin::new(&mut *to).poll_write(cx, own.get(at..end).unwrap_or_default()) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        at += n;
                        unflushed = true;
                        count(n as u64);
                    }
                    Poll::Ready(_) => return Poll::Ready(Err(Side::Write)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            (at, end) = (0, 0);
            let step = if let Some(step) = deferred.take() {
                step
            } else if drained {
                Step::Idle
            } else if own.is_empty() {
                SCRATCH.with_borrow_mut(|scratch| {
                    if scratch.len() < RELAY_BUFFER_BYTES {
                        scratch.resize(RELAY_BUFFER_BYTES, 0);
                    }
                    let buf = scratch.get_mut(..RELAY_BUFFER_BYTES).unwrap_or_default();
                    let (n, stop) = fill(&mut *from, cx, buf);
                    if n == 0 {
                        return stop.unwrap_or(Step::Idle);
                    }
                    match stop {
                        Some(Step::Idle) => drained = true,
                        Some(step) => deferred = Some(step),
                        None => {}
                    }
                    let read = buf.get(..n).unwrap_or_default();
                    let mut written = 0;
                    while written < n {
                        match Pin::new(&mut *to)
                            .poll_write(cx, read.get(written..).unwrap_or_default())
                        {
                            Poll::Ready(Ok(k)) if k > 0 => written += k,
                            Poll::Ready(_) => return Step::Failed(Side::Write),
                            Poll::Pending => break,
                        }
                    }
                    if written > 0 {
                        unflushed = true;
                        count(written as u64);
                    }
                    if let Some(rest) = read.get(written..).filter(|r| !r.is_empty()) {
                        own = vec![0; RELAY_BUFFER_BYTES];
                        if let Some(dst) = own.get_mut(..rest.len()) {
                            dst.copy_from_slice(rest);
                        }
                        end = rest.len();
                    }
                    Step::Moved
                })
            } else {
                match fill(&mut *from, cx, &mut own) {
                    (0, stop) => stop.unwrap_or(Step::Idle),
                    (n, stop) => {
                        match stop {
                            Some(Step::Idle) => drained = true,
                            Some(step) => deferred = Some(step),
                            None => {}
                        }
                        end = n;
                        Step::Moved
                    }
                }
            };
            match step {
                Step::Moved => continue,
                Step::End => return Poll::Ready(Ok(())),
                Step::Failed(side) => return Poll::Ready(Err(side)),
                Step::Idle => {
                    // Everything read is written: a quiet flow holds no buffer.
                    own = Vec::new();
                    if unflushed {
                        match Pin::new(&mut *to).poll_flush(cx) {
                            Poll::Ready(Ok(())) => unflushed = false,
                            Poll::Ready(Err(_)) => return Poll::Ready(Err(Side::Write)),
                            Poll::Pending => {}
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
    })
    .await?;
    to.shutdown().await.map_err(|_| Side::Write)
}

/// Reads into `buf` until it is full or a read brings nothing: the bytes read, and what ended
/// the reads short of a full buffer. A TLS stream gives one record's plaintext per read, so a
/// write to the backend carries several records instead of one.
fn fill<R: AsyncRead + Unpin>(
    from: &mut R,
    cx: &mut std::task::Context<'_>,
    buf: &mut [u8],
) -> (usize, Option<Step>) {
    let mut n = 0;
    while n < buf.len() {
        match read_step(&mut *from, cx, buf.get_mut(n..).unwrap_or_default()) {
            Ok(k) => n += k,
            Err(step) => return (n, Some(step)),
        }
    }
    (n, None)
}

/// One read of [`copy`] into `buf`: the bytes read, or why there are none.
fn read_step<R: AsyncRead + Unpin>(
    from: &mut R,
    cx: &mut std::task::Context<'_>,
    buf: &mut [u8],
) -> Result<usize, Step> {
    let mut buf = ReadBuf::new(buf);
    match Pin::new(from).poll_read(cx, &mut buf) {
        Poll::Ready(Ok(())) if buf.filled().is_empty() => Err(Step::End),
        Poll::Ready(Ok(())) => Ok(buf.filled().len()),
        // A TLS peer that closes without `close_notify`: its stream ended all the same.
        Poll::Ready(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(Step::End),
        Poll::Ready(Err(_)) => Err(Step::Failed(Side::Read)),
        Poll::Pending => Err(Step::Idle),
    }
}

/// What one read of [`copy`] came to.
enum Step {
    /// Bytes were read (and written on, or held).
    Moved,
    /// Nothing to read now.
    Idle,
    /// End of stream.
    End,
    /// An error on this side.
    Failed(Side),
}

/// When a relayed flow last moved bytes.
pub(super) struct IdleClock {
    seen: u64,
    since: Instant,
}

impl IdleClock {
    /// Starts with the flow's byte total now.
    pub(super) fn new(total: u64) -> Self {
        Self {
            seen: total,
            since: Instant::now(),
        }
    }

    /// Whether the flow, whose byte total is now `total`, has moved nothing for
    /// `idle_timeout`.
    pub(super) fn expired(&mut self, total: u64, idle_timeout: Option<Duration>) -> bool {
        if total != self.seen {
            (self.seen, self.since) = (total, Instant::now());
            return false;
        }
        idle_timeout.is_some_and(|t| self.since.elapsed() >= t)
    }
}

/// The timer that checks a relayed flow for idleness, a quarter of `idle_timeout` apart. A flow
/// without a timeout gets no timer (no allocation on the per-connection path).
pub(super) fn idle_ticker(idle_timeout: Option<Duration>) -> Option<tokio::time::Interval> {
    idle_timeout.map(|t| {
        let period = (t / 4).max(Duration::from_millis(50));
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker
    })
}
