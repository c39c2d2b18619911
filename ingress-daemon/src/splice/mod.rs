//! The splice engine: carries the bytes of an established client/backend socket pair until
//! both directions end, inside the kernel when it can.
//!
//! ```text
//!   Engine::splice(client, backend)
//!        │  kernel path: cookies, baselines, SOCK_DIR, SOCKS (backend first), nudge
//!        ▼
//!   shard (one tokio task, one epoll)  ◀── EPOLLIN/RDHUP/ERR per socket, edge-triggered
//!        │  flow.rs: relay passed bytes, propagate FIN once covered, RST as RST
//!        ▼
//!   on_end(FlowOutcome)               bytes each way per path, end reason, duration
//! ```
//!
//! The eBPF program is loaded once per engine. Offload `auto` uses the kernel path when the
//! program loads and the userspace relay otherwise (with a logged reason); `off` always
//! relays; `required` refuses to start without the kernel path. Both paths share one state
//! machine ([`flow`]) and the same guarantees: byte-exact, half-close only once in-flight
//! bytes are delivered, RST propagated as RST, bounded bytes in flight per direction (the
//! kernel path through the verdict's gate, the relay through one bounded buffer).
//!
//! # Layout
//! - `btf`: reads `tcp_sock.bytes_acked`'s offset from the kernel's BTF.
//! - `ebpf`: loads the program, owns the maps, inserts and removes flows.
//! - `flow`: one flow's state machine.
//! - `handoff`: freezing, exporting and adopting live flows for a takeover.
//! - `pins`: pins handed-over maps on a bpffs while this daemon's program loads on them.
//! - `shard`: the event loop driving a set of flows.

mod btf;
mod ebpf;
mod flow;
mod handoff;
mod pins;
mod shard;

use std::{
    fmt,
    os::fd::OwnedFd,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

pub use ebpf::{LoadError, PreparedProgram, ServingProgram, TEST_PROGRAM_VERSION_ENV};
pub use handoff::{AdoptError, DirState, ExportedFlow, FlowState, Frozen, KernelState, MapFds};
pub use pins::TEST_BPFFS_ENV;

use crate::sys;

/// Whether flows are spliced in the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Offload {
    /// Kernel path when the eBPF program loads, userspace relay otherwise.
    #[default]
    Auto,
    /// Always the userspace relay.
    Off,
    /// Kernel path or refuse to start.
    Required,
}

impl FromStr for Offload {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "off" => Ok(Self::Off),
            "required" => Ok(Self::Required),
            other => Err(format!(
                "offload must be auto, off or required, not {other:?}"
            )),
        }
    }
}

impl fmt::Display for Offload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Off => "off",
            Self::Required => "required",
        })
    }
}

/// Settings of the splice engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Offload mode.
    pub offload: Offload,
    /// Bytes in flight per direction (redirected or relayed, not yet acknowledged by the
    /// destination's receiver) above which the source's receive window is closed; the bytes
    /// stay on the kernel path.
    pub soft_water_bytes: u64,
    /// Bytes in flight per direction above which the kernel path stops redirecting and passes
    /// bytes to the relay (the bound when closing the window is not enough).
    pub high_water_bytes: u64,
    /// Once stopped, the in-flight bytes must fall to this mark before redirecting resumes.
    pub low_water_bytes: u64,
    /// Send buffer of each socket on the kernel path (0 leaves the kernel's autotuning, at most
    /// `net.ipv4.tcp_wmem`'s maximum). The kernel's worker that sends redirected bytes backs
    /// off for a clock tick whenever the destination's send buffer is full, and space coming
    /// back does not wake it; a buffer that holds as much as the gate lets be in flight keeps
    /// it from stopping before the gate does. The gate bounds the bytes in flight either way:
    /// they wait in the send buffer instead of the worker's queue.
    pub send_buffer_bytes: u64,
    /// Receive buffer of each socket on the kernel path, raised to twice the window cap where
    /// the marks make that larger; 0 leaves the kernel's autotuning. An autotuned buffer can
    /// be small when a congestion hold ends (the reopened window is computed from it); a fixed
    /// one keeps the reopened window whole. It is a bound, not an allocation: the window cap
    /// and the gate bound what it holds.
    ///
    /// It is fixed at the first hold of the direction the socket receives (a congestion hold,
    /// or the way back from the relay), not at the hand-off. The two sockets enter the
    /// sockhash one after the other; a segment that reaches the first between the two has no
    /// peer to be redirected to, so the verdict passes it, and every byte behind it goes
    /// through the relay until the relay has caught up and the window is held. That is as
    /// much as the window offered at the time: with the buffer fixed at the hand-off, the
    /// whole window cap (an 8 MiB echo flow fell back for up to 6.9 MB in 2 of 16 runs), with
    /// an autotuned one only what autotuning has grown it to.
    pub receive_buffer_bytes: u64,
    /// Size of a relay buffer for a direction moving bulk data (one per direction while
    /// bytes are held; other directions read 64 KiB at a time, see `flow::BufferPool`).
    pub relay_buffer_bytes: usize,
    /// Keepalive and user timeout for spliced sockets; `None` leaves the sockets as they are.
    pub liveness: Option<sys::Liveness>,
    /// Number of event loops.
    pub shards: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            offload: Offload::Auto,
            soft_water_bytes: 16 << 20,
            high_water_bytes: 48 << 20,
            low_water_bytes: 4 << 20,
            send_buffer_bytes: 48 << 20,
            receive_buffer_bytes: 32 << 20,
            relay_buffer_bytes: 1 << 20,
            liveness: Some(sys::Liveness {
                keepalive_idle: Duration::from_secs(60),
                keepalive_interval: Duration::from_secs(10),
                keepalive_probes: 6,
                user_timeout: Duration::from_secs(300),
            }),
            shards: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// Which path carried a flow's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum Path {
    /// The sk_skb verdict on the sockhash (plus the relay for bytes it passed while gated).
    Sockmap = 0,
    /// The userspace relay only.
    Userspace = 1,
}

impl Path {
    /// Stable lower-case name, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sockmap => "sockmap",
            Self::Userspace => "userspace",
        }
    }
}

/// Bytes of one direction, by who moved them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectionBytes {
    /// Redirected by the verdict program.
    pub kernel: u64,
    /// Relayed by the daemon.
    pub relayed: u64,
}

impl DirectionBytes {
    /// All bytes of the direction.
    pub fn total(&self) -> u64 {
        self.kernel + self.relayed
    }
}

/// How a flow ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowEnd {
    /// Both directions ended with a FIN, delivered.
    Closed,
    /// The client reset its connection; the backend was reset.
    ClientReset,
    /// The backend reset its connection; the client was reset.
    BackendReset,
    /// The client stopped answering (keepalive or user timeout).
    ClientTimeout,
    /// The backend stopped answering.
    BackendTimeout,
    /// Another error on the client socket.
    ClientError,
    /// Another error on the backend socket.
    BackendError,
    /// The daemon stopped before the flow ended; both sides were reset.
    Shutdown,
    /// No byte moved either way for the flow's idle timeout; both sides were closed.
    IdleTimeout,
    /// The kernel path could not keep the stream exact (it failed, out of memory, to cut the
    /// repeated head of a retransmitted segment); both sides were reset rather than given a
    /// corrupted stream. Also a flow the kernel path could not take after its userspace first
    /// phase (its maps full, a failed system call); both sides were closed.
    KernelError,
    /// A terminated flow on kTLS: the client sent a TLS 1.3 `KeyUpdate`, which the kernel
    /// cannot take (before Linux 6.14); what came before it was delivered, then both sides
    /// were closed (`close_notify` and FIN to the client, FIN to the backend).
    TlsKeyUpdate,
    /// A terminated flow on kTLS: the kernel refused the session's keys after they were
    /// extracted; both sides were reset before a byte of data moved.
    KtlsInstallFailed,
}

impl FlowEnd {
    /// How a flow ends after `err` on socket `side` (0 = client, 1 = backend).
    pub fn for_error(side: usize, err: &std::io::Error) -> Self {
        use std::io::ErrorKind;
        let timed_out = err.kind() == ErrorKind::TimedOut;
        let reset = matches!(
            err.kind(),
            ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::BrokenPipe
                | ErrorKind::NotConnected
        );
        match (side, timed_out, reset) {
            (0, true, _) => Self::ClientTimeout,
            (_, true, _) => Self::BackendTimeout,
            (0, _, true) => Self::ClientReset,
            (_, _, true) => Self::BackendReset,
            (0, _, _) => Self::ClientError,
            _ => Self::BackendError,
        }
    }

    /// Every end, in declaration order (`end as usize` indexes it).
    pub const ALL: [FlowEnd; 12] = [
        Self::Closed,
        Self::ClientReset,
        Self::BackendReset,
        Self::ClientTimeout,
        Self::BackendTimeout,
        Self::ClientError,
        Self::BackendError,
        Self::Shutdown,
        Self::IdleTimeout,
        Self::KernelError,
        Self::TlsKeyUpdate,
        Self::KtlsInstallFailed,
    ];

    /// Stable lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::ClientReset => "client_reset",
            Self::BackendReset => "backend_reset",
            Self::ClientTimeout => "client_timeout",
            Self::BackendTimeout => "backend_timeout",
            Self::ClientError => "client_error",
            Self::BackendError => "backend_error",
            Self::Shutdown => "shutdown",
            Self::IdleTimeout => "idle_timeout",
            Self::KernelError => "kernel_error",
            Self::TlsKeyUpdate => "tls_key_update",
            Self::KtlsInstallFailed => "ktls_install_failed",
        }
    }
}

/// The report of a finished flow.
#[derive(Clone, Debug)]
pub struct FlowOutcome {
    /// Engine-assigned flow ID.
    pub id: u64,
    /// Path that carried it.
    pub path: Path,
    /// Client → backend bytes.
    pub client_to_backend: DirectionBytes,
    /// Backend → client bytes.
    pub backend_to_client: DirectionBytes,
    /// How it ended.
    pub end: FlowEnd,
    /// Time from hand-off to end.
    pub duration: Duration,
    /// Times the kernel path's gate closed (bytes passed to the relay).
    pub gate_closures: u64,
    /// Times the source's window was held closed for congestion (bytes stayed in the kernel).
    pub window_holds: u64,
    /// Bytes the kernel path cut from the head of retransmitted segments because they repeated
    /// bytes already forwarded (both directions).
    pub overlap_trimmed: u64,
    /// The tag given to [`Engine::splice`].
    pub tag: u32,
}

/// A live flow, for listings.
#[derive(Clone, Debug)]
pub struct FlowInfo {
    /// Engine-assigned flow ID.
    pub id: u64,
    /// The tag given to [`Engine::splice`].
    pub tag: u32,
    /// The client's address (the client socket's peer), when the socket still knows it.
    pub client: Option<std::net::SocketAddr>,
    /// The backend's address (the backend socket's peer), when the socket still knows it.
    pub backend: Option<std::net::SocketAddr>,
    /// Path carrying it.
    pub path: Path,
    /// Time since hand-off.
    pub age: Duration,
    /// Client → backend bytes so far.
    pub client_to_backend: DirectionBytes,
    /// Backend → client bytes so far.
    pub backend_to_client: DirectionBytes,
    /// Whether a direction is gated (backpressure) now.
    pub gated: bool,
    /// Times the gate closed.
    pub gate_closures: u64,
    /// Version of the program that judged the flow's bytes last (0: none yet, or not on the
    /// kernel path).
    pub program_version: u32,
}

/// Bytes userspace consumed from each socket before the hand-off (e.g. a Postgres
/// SSLRequest it answered). Bytes it only peeked are not consumed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Preamble {
    /// Bytes read from the client socket.
    pub client_consumed: u64,
    /// Bytes read from the backend socket.
    pub backend_consumed: u64,
    /// Directions that already ended (0 = client → backend): the source's FIN was read and
    /// propagated to the destination before the hand-off.
    pub shut: [bool; 2],
}

/// The smallest window cap a kernel flow gets (see [`Engine::splice`]).
const MIN_WINDOW_CAP: u64 = 256 << 10;

/// The receive window cap of a kernel flow's sockets: a third of the distance from the soft
/// mark to the high one (see [`Engine::splice`]).
pub(crate) fn window_cap(soft_water: u64, high_water: u64) -> u32 {
    let cap =
        (high_water.saturating_sub(soft_water) / 3).clamp(MIN_WINDOW_CAP, u64::from(u32::MAX >> 1));
    u32::try_from(cap).unwrap_or(u32::MAX >> 1)
}

/// How one flow is handed to [`Engine::splice`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowOptions {
    /// What userspace consumed before the hand-off.
    pub preamble: Preamble,
    /// An opaque label (e.g. the ingress) under which [`Engine::usage`] sums the flow's bytes;
    /// keep tags small and dense, the engine keeps one entry per value up to the largest seen.
    pub tag: u32,
    /// Close both sides once no byte has moved either way for this long; `None`: never.
    pub idle_timeout: Option<Duration>,
    /// Carry the flow on the userspace relay even where the kernel path is loaded.
    pub userspace: bool,
}

/// A flow the engine took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spliced {
    /// Its ID.
    pub id: u64,
    /// The path that carries it.
    pub path: Path,
}

/// What the engine calls once with the outcome when a flow ends.
pub type OnEnd = Box<dyn EndHandler>;

/// The caller's side of a flow's end: told the outcome once, and asked for a description of
/// the flow when the engine hands it to another daemon (see [`handoff`]), which the engine
/// carries without reading. Any `FnOnce(FlowOutcome)` closure is one, describing nothing.
pub trait EndHandler: Send {
    /// Called once with the outcome.
    fn end(self: Box<Self>, outcome: FlowOutcome);

    /// Called instead of [`Self::end`] when the engine refuses the pair (the error is returned
    /// by [`Engine::splice`] too, and both sockets are closed). Does nothing by default.
    fn refused(self: Box<Self>, error: &SpliceError) {
        let _ = error;
    }

    /// What the next daemon needs to report this flow's end as this one would have.
    fn describe(&self) -> Option<serde_json::Value> {
        None
    }
}

impl<F: FnOnce(FlowOutcome) + Send> EndHandler for F {
    fn end(self: Box<Self>, outcome: FlowOutcome) {
        (*self)(outcome);
    }
}

/// Bytes of the flows with one tag: finished flows' totals plus live flows' counters, read
/// together per shard so the sum never goes down between two reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TagBytes {
    /// Client → backend.
    pub client_to_backend: DirectionBytes,
    /// Backend → client.
    pub backend_to_client: DirectionBytes,
}

impl TagBytes {
    pub(crate) fn add(&mut self, other: &TagBytes) {
        for (mine, theirs) in [
            (&mut self.client_to_backend, &other.client_to_backend),
            (&mut self.backend_to_client, &other.backend_to_client),
        ] {
            mine.kernel += theirs.kernel;
            mine.relayed += theirs.relayed;
        }
    }
}

/// What the engine carries now and has carried, for metrics scraped on demand.
#[derive(Clone, Debug, Default)]
pub struct Usage {
    /// Bytes by tag (index = tag), finished and live flows together.
    pub bytes_by_tag: Vec<TagBytes>,
    /// Live flows with a direction gated (backpressure) now.
    pub gated_flows: u64,
    /// Times a gate closed, finished and live flows together.
    pub gate_closures: u64,
    /// Bytes cut from retransmitted segments that repeated forwarded bytes, finished and live
    /// flows together.
    pub overlap_trimmed: u64,
}

impl Usage {
    fn merge(&mut self, other: Usage) {
        if self.bytes_by_tag.len() < other.bytes_by_tag.len() {
            self.bytes_by_tag
                .resize(other.bytes_by_tag.len(), TagBytes::default());
        }
        for (mine, theirs) in self.bytes_by_tag.iter_mut().zip(&other.bytes_by_tag) {
            mine.add(theirs);
        }
        self.gated_flows += other.gated_flows;
        self.gate_closures += other.gate_closures;
        self.overlap_trimmed += other.overlap_trimmed;
    }
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Offload is `required` and the kernel path is unavailable.
    #[error("offload is required but the kernel path is unavailable: {0}")]
    OffloadUnavailable(#[source] LoadError),
    /// An event loop could not be created.
    #[error("creating a splice event loop: {0}")]
    Shard(#[source] std::io::Error),
}

/// Why a flow could not be handed over. The sockets are closed.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    /// A system call failed.
    #[error("{call}: {source}")]
    Sys {
        /// The call.
        call: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The kernel maps are full.
    #[error("the kernel flow table is full")]
    MapFull,
    /// The engine is shutting down.
    #[error("the splice engine is shutting down")]
    ShuttingDown,
}

/// Counters kept by the engine (read by metrics).
#[derive(Debug, Default)]
pub struct EngineStats {
    active: [AtomicU64; 2],
    started: [AtomicU64; 2],
    kernel_bytes: AtomicU64,
    relayed_bytes: AtomicU64,
}

impl EngineStats {
    /// Live flows on `path`.
    pub fn active(&self, path: Path) -> u64 {
        self.active[path as usize].load(Ordering::Relaxed)
    }

    /// Flows handed to `path` since start.
    pub fn started(&self, path: Path) -> u64 {
        self.started[path as usize].load(Ordering::Relaxed)
    }

    /// Bytes of finished flows redirected by the kernel.
    pub fn kernel_bytes(&self) -> u64 {
        self.kernel_bytes.load(Ordering::Relaxed)
    }

    /// Bytes of finished flows relayed by the daemon.
    pub fn relayed_bytes(&self) -> u64 {
        self.relayed_bytes.load(Ordering::Relaxed)
    }
}

/// A flow on its way to a shard.
struct NewFlow {
    id: u64,
    tag: u32,
    client: OwnedFd,
    backend: OwnedFd,
    kernel: Option<ebpf::KernelFlow>,
    preamble: Preamble,
    idle_timeout: Option<Duration>,
    on_end: Option<OnEnd>,
}

/// The splice engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    config: EngineConfig,
    kernel: Option<Arc<ebpf::KernelPath>>,
    /// Why the kernel path is not used, when it is not.
    kernel_unavailable: Option<String>,
    shards: Vec<mpsc::UnboundedSender<shard::Command>>,
    next_shard: AtomicUsize,
    next_id: AtomicU64,
    stats: Arc<EngineStats>,
    /// Which shard owns each kernel direction slot (for congestion events).
    dir_shard: Arc<Vec<std::sync::atomic::AtomicU16>>,
    /// True while a hand-off has the engine frozen: the congestion task leaves the ring alone.
    frozen: watch::Sender<bool>,
}

impl Engine {
    /// Loads the eBPF program (unless offload is off) and starts the event loops on the
    /// current tokio runtime.
    pub fn start(config: EngineConfig) -> Result<Self, EngineError> {
        Self::start_adopting(config, None, &[], 0, None)
    }

    /// Like [`Self::start`], but on the maps another daemon handed over (`used`: the direction
    /// slots of the flows that came with them; adopt those flows next with [`Self::adopt`]).
    /// This daemon's program, `prepared` on them, is attached for new flows; if it could not
    /// be prepared, the other daemon's program (version `inherited_version`, 0 if unknown)
    /// serves new flows too. Without maps, the offload mode decides as in [`Self::start`].
    pub fn start_adopting(
        config: EngineConfig,
        maps: Option<MapFds>,
        used: &[u32],
        inherited_version: u32,
        prepared: Option<Result<PreparedProgram, LoadError>>,
    ) -> Result<Self, EngineError> {
        let prepared = prepared.unwrap_or(Err(LoadError::NotPrepared));
        let (kernel, kernel_unavailable) = match (maps, config.offload) {
            (Some(maps), _) => {
                match ebpf::KernelPath::adopt(maps, used, inherited_version, prepared) {
                    Ok(path) => (Some(Arc::new(path)), None),
                    Err(err) => return Err(EngineError::OffloadUnavailable(err)),
                }
            }
            (None, Offload::Off) => (None, Some("offload is off".to_owned())),
            (None, Offload::Auto) => match ebpf::KernelPath::load() {
                Ok(path) => (Some(Arc::new(path)), None),
                Err(err) => {
                    warn!(error = %err, "kernel splice unavailable, relaying in userspace");
                    (None, Some(err.to_string()))
                }
            },
            (None, Offload::Required) => match ebpf::KernelPath::load() {
                Ok(path) => (Some(Arc::new(path)), None),
                Err(err) => return Err(EngineError::OffloadUnavailable(err)),
            },
        };
        if let Some(path) = &kernel {
            info!(
                bytes_acked_offset = path.bytes_acked_offset,
                program_version = path.serving().version,
                own_program = path.serving().own,
                "kernel splice ready"
            );
        }
        let stats = Arc::new(EngineStats::default());
        let mut shards = Vec::new();
        for _ in 0..config.shards.max(1) {
            let (tx, rx) = mpsc::unbounded_channel();
            let shard = shard::Shard::new(
                kernel.clone(),
                config.relay_buffer_bytes,
                config.receive_buffer_bytes,
                stats.clone(),
            )
            .map_err(EngineError::Shard)?;
            tokio::spawn(shard.run(rx));
            shards.push(tx);
        }
        let dir_shard: Arc<Vec<_>> = Arc::new(
            (0..ingress_common::MAX_DIRS)
                .map(|_| std::sync::atomic::AtomicU16::new(0))
                .collect(),
        );
        let (frozen, _) = watch::channel(false);
        if let Some(events) = kernel.as_ref().and_then(|k| k.take_events()) {
            let events = sys::async_fd(events).map_err(EngineError::Shard)?;
            tokio::spawn(congestion_events(
                events,
                dir_shard.clone(),
                shards.clone(),
                frozen.subscribe(),
            ));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                kernel,
                kernel_unavailable,
                shards,
                next_shard: AtomicUsize::new(0),
                next_id: AtomicU64::new(1),
                stats,
                dir_shard,
                frozen,
            }),
        })
    }

    /// The path new flows take.
    pub fn path(&self) -> Path {
        if self.inner.kernel.is_some() {
            Path::Sockmap
        } else {
            Path::Userspace
        }
    }

    /// The program serving new flows, on the kernel path.
    pub fn serving_program(&self) -> Option<&ServingProgram> {
        self.inner.kernel.as_deref().map(ebpf::KernelPath::serving)
    }

    /// Why the kernel path is not in use, if it is not.
    pub fn kernel_unavailable_reason(&self) -> Option<&str> {
        self.inner.kernel_unavailable.as_deref()
    }

    /// Engine counters.
    pub fn stats(&self) -> &EngineStats {
        &self.inner.stats
    }

    /// Entries in the kernel's cookie map and sockhash, when the kernel path is loaded.
    pub fn map_occupancy(&self) -> Option<(usize, usize)> {
        self.inner.kernel.as_ref().map(|k| k.map_occupancy())
    }

    /// Direction slots in use (two per kernel flow), when the kernel path is loaded.
    pub fn kernel_dirs_in_use(&self) -> Option<u64> {
        self.inner.kernel.as_ref().map(|k| k.dirs_in_use())
    }

    /// Sockhash capacity (sockets), when the kernel path is loaded.
    pub fn kernel_capacity(&self) -> Option<u64> {
        self.inner
            .kernel
            .as_ref()
            .map(|_| u64::from(ingress_common::MAX_SOCKS))
    }

    /// A fresh flow ID from the engine's sequence, for flows carried elsewhere (terminated
    /// flows) so IDs stay unique across the daemon.
    pub fn next_flow_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Hands an established client/backend pair to the engine; returns the flow ID and the
    /// path that carries it. `on_end` is called once: with the outcome when the flow ends, or
    /// with the error ([`EndHandler::refused`]) when the engine refuses the pair, whose
    /// sockets are then closed. The sockets must not have been partly read: only whole
    /// messages accounted for in `options.preamble` may have been consumed.
    pub fn splice(
        &self,
        client: OwnedFd,
        backend: OwnedFd,
        options: FlowOptions,
        on_end: Option<OnEnd>,
    ) -> Result<Spliced, SpliceError> {
        let mut on_end = on_end;
        let spliced = self.try_splice(client, backend, options, &mut on_end);
        if let (Err(e), Some(on_end)) = (&spliced, on_end) {
            on_end.refused(e);
        }
        spliced
    }

    /// [`Self::splice`], leaving `on_end` where it is unless the engine took the flow.
    fn try_splice(
        &self,
        client: OwnedFd,
        backend: OwnedFd,
        options: FlowOptions,
        on_end: &mut Option<OnEnd>,
    ) -> Result<Spliced, SpliceError> {
        let FlowOptions {
            preamble,
            tag,
            idle_timeout,
            userspace,
        } = options;
        let inner = &*self.inner;
        let id = self.next_flow_id();
        if let Some(liveness) = &inner.config.liveness {
            for fd in [&client, &backend] {
                sys::set_liveness(std::os::fd::AsFd::as_fd(fd), liveness).map_err(|source| {
                    SpliceError::Sys {
                        call: "keepalive",
                        source,
                    }
                })?;
            }
        }
        // The kernel takes only established sockets into the sockhash: a pair with a direction
        // that already ended, or a side whose FIN arrived after the caller's last read, is
        // relayed in userspace instead.
        let to_kernel = inner.kernel.is_some() && !preamble.shut.contains(&true) && !userspace;
        let cap = window_cap(inner.config.soft_water_bytes, inner.config.high_water_bytes);
        if to_kernel {
            // The receive buffer is fixed later, at a direction's first hold (see
            // `EngineConfig::receive_buffer_bytes`).
            for fd in [&client, &backend] {
                let fd = std::os::fd::AsFd::as_fd(fd);
                if inner.config.send_buffer_bytes > 0 {
                    sys::set_send_buffer(fd, inner.config.send_buffer_bytes).map_err(|source| {
                        SpliceError::Sys {
                            call: "SO_SNDBUF",
                            source,
                        }
                    })?;
                }
            }
        }
        if inner.kernel.is_some() {
            // A window already offered cannot be taken back: after the daemon closes a window at
            // the soft mark, the sender may still send up to the edge it was offered. Capping
            // the window at a third of the distance to the hard mark leaves the other two
            // thirds for the time the daemon takes to react to the soft mark's event (a loaded
            // machine delays it by milliseconds, at gigabytes per second), so a held flow
            // stays on the kernel path (autotuning alone offers up to `tcp_rmem`'s maximum,
            // 32 MiB here, and the gate then closed in bulk transfers).
            // Receive-buffer autotuning raises the clamp again as it grows the buffer; the
            // cap is put back whenever a hold ends (`flow::Handback`).
            for fd in [&client, &backend] {
                sys::set_window_clamp(std::os::fd::AsFd::as_fd(fd), cap).map_err(|source| {
                    SpliceError::Sys {
                        call: "TCP_WINDOW_CLAMP",
                        source,
                    }
                })?;
            }
        }
        let kernel = match &inner.kernel {
            Some(path) if to_kernel => match path.insert(
                std::os::fd::AsFd::as_fd(&client),
                std::os::fd::AsFd::as_fd(&backend),
                ebpf::Marks {
                    soft_water: inner.config.soft_water_bytes,
                    high_water: inner.config.high_water_bytes,
                    low_water: inner.config.low_water_bytes,
                },
            ) {
                Ok(flow) => Some(flow),
                Err(SpliceError::Sys { source, .. })
                    if source.raw_os_error() == Some(libc::EOPNOTSUPP) =>
                {
                    None
                }
                Err(e) => return Err(e),
            },
            _ => None,
        };
        let path = if kernel.is_some() {
            Path::Sockmap
        } else {
            Path::Userspace
        };
        let shard = inner.next_shard.fetch_add(1, Ordering::Relaxed) % inner.shards.len().max(1);
        if let Some(kflow) = &kernel {
            for dir in kflow.dirs {
                if let Some(owner) = inner.dir_shard.get(dir as usize) {
                    owner.store(u16::try_from(shard).unwrap_or(0), Ordering::Relaxed);
                }
            }
        }
        let new = Box::new(NewFlow {
            id,
            tag,
            client,
            backend,
            kernel,
            preamble,
            idle_timeout,
            on_end: on_end.take(),
        });
        let unsent = match inner.shards.get(shard) {
            Some(tx) => match tx.send(shard::Command::Add(new)) {
                Ok(()) => return Ok(Spliced { id, path }),
                Err(mpsc::error::SendError(shard::Command::Add(new))) => Some(new),
                Err(_) => None,
            },
            None => Some(new),
        };
        // The shard is gone: nothing stays in the maps, and the caller's handler comes back.
        if let Some(mut new) = unsent {
            if let (Some(path), Some(kflow)) = (&inner.kernel, &new.kernel) {
                path.remove(kflow);
            }
            *on_end = new.on_end.take();
        }
        Err(SpliceError::ShuttingDown)
    }

    /// Lists live flows.
    pub async fn flows(&self) -> Vec<FlowInfo> {
        self.flows_page(0, usize::MAX).await
    }

    /// Lists at most `limit` live flows with an ID above `after`, in ID order.
    pub async fn flows_page(&self, after: u64, limit: usize) -> Vec<FlowInfo> {
        let mut all = Vec::new();
        for tx in &self.inner.shards {
            let (reply, rx) = oneshot::channel();
            if tx
                .send(shard::Command::Snapshot {
                    after,
                    limit,
                    reply,
                })
                .is_ok()
                && let Ok(flows) = rx.await
            {
                all.extend(flows);
            }
        }
        all.sort_by_key(|f| f.id);
        all.truncate(limit);
        all
    }

    /// Bytes by tag (finished plus live flows), gated flows and gate closures. Costs one
    /// message per shard and a pass over its live flows, reading their counters from the
    /// shared mapping: no system call.
    pub async fn usage(&self) -> Usage {
        let mut usage = Usage::default();
        for tx in &self.inner.shards {
            let (reply, rx) = oneshot::channel();
            if tx.send(shard::Command::Usage(reply)).is_ok()
                && let Ok(part) = rx.await
            {
                usage.merge(part);
            }
        }
        usage
    }

    /// Changes the water marks of a live kernel flow (both directions). Setting the high mark
    /// to 0 closes the gate at the next skb; used to exercise pause and resume.
    pub fn set_water_marks(&self, id: u64, high_water_bytes: u64, low_water_bytes: u64) {
        for tx in &self.inner.shards {
            let _ = tx.send(shard::Command::SetMarks {
                id,
                high_water: high_water_bytes,
                low_water: low_water_bytes,
            });
        }
    }

    /// Stops taking flows, lets live flows run for up to `drain`, then resets the rest (both
    /// sides, so no peer mistakes the cut for a complete stream) and cleans up their map
    /// entries. Returns when every shard has stopped.
    pub async fn shutdown(&self, drain: Duration) {
        let mut waits = Vec::new();
        for tx in &self.inner.shards {
            let (done, rx) = oneshot::channel();
            if tx.send(shard::Command::Shutdown { drain, done }).is_ok() {
                waits.push(rx);
            }
        }
        for rx in waits {
            let _ = rx.await;
        }
    }
}

/// Forwards the verdict's congestion events to the shards owning the directions.
async fn congestion_events(
    mut events: tokio::io::unix::AsyncFd<aya::maps::RingBuf<aya::maps::MapData>>,
    dir_shard: Arc<Vec<std::sync::atomic::AtomicU16>>,
    shards: Vec<mpsc::UnboundedSender<shard::Command>>,
    mut frozen: watch::Receiver<bool>,
) {
    loop {
        // While a hand-off is under way the ring is left to whichever daemon ends up with
        // the flows; each recovers unhandled events from the direction counters.
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        let mut guard = tokio::select! {
            guard = events.readable_mut() => match guard {
                Ok(guard) => guard,
                Err(_) => return,
            },
            _ = frozen.wait_for(|f| *f) => continue,
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            let Some(bytes) = item.get(..4).and_then(|b| <[u8; 4]>::try_from(b).ok()) else {
                continue;
            };
            let dir = u32::from_ne_bytes(bytes);
            let Some(owner) = dir_shard.get(dir as usize) else {
                continue;
            };
            let owner = usize::from(owner.load(Ordering::Relaxed));
            if let Some(tx) = shards.get(owner)
                && tx.send(shard::Command::Congested { dir }).is_err()
            {
                return;
            }
        }
        guard.clear_ready();
    }
}

/// Identity of the verdict program this build embeds (FNV-1a of the object, hex), for the
/// takeover's compatibility check.
pub fn program_identity() -> String {
    ebpf::program_identity()
}

/// Takes a tokio stream out of the reactor for [`Engine::splice`].
pub fn into_owned_fd(stream: tokio::net::TcpStream) -> std::io::Result<OwnedFd> {
    Ok(stream.into_std()?.into())
}
