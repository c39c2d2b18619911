//! Prometheus metrics: per-ingress counters the data path bumps with relaxed atomic adds, and
//! the values read at scrape time (engine byte counters, offload state, process).
//!
//! Design: each listener resolves its ingress's [`IngressMetrics`] once
//! ([`Metrics::ingress`]), so a connection costs a handful of `fetch_add`s on memory no other
//! ingress shares, never a label lookup, a lock or an allocation. Bytes of spliced flows are
//! not counted on the data path at all: at scrape time the engine sums, per ingress tag, its
//! finished flows' totals and its live flows' eBPF counters (read from the shared mapping).
//! Every label set is fixed when an ingress is first seen and zero-initialised (every refusal
//! reason, every path and mode), so series never appear out of nowhere. Labels are bounded: the
//! ingress name and small enums, never a rule, an SNI or a client address.
//!
//! Encoding goes through `prometheus-client` (OpenMetrics); [`exposition`] also offers the
//! Prometheus text format 0.0.4 for clients that do not ask for OpenMetrics.
//!
//! # Layout
//! - `histogram`: lock-free duration histograms.
//! - `exposition`: content negotiation and the 0.0.4 rewrite.
//! - `process`: descriptors, memory and CPU of the process.
//! - `scrape`: the families, written at scrape time.

pub mod exposition;
mod histogram;
mod process;
mod scrape;

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

pub use histogram::{DurationHistogram, FLOW_BOUNDS, PHASE_BOUNDS};
pub use process::ProcessSample;

use crate::{model::Mode, proxy::Reason, splice};

/// The path label values, in index order ([`FlowPath`] as `usize`).
pub const PATHS: [&str; 3] = ["sockmap", "ktls_splice", "userspace"];

/// The mode label values, in index order ([`mode_index`]).
pub const MODES: [&str; 2] = ["passthrough", "terminate"];

/// The direction label values: index 0 is client → backend.
pub const DIRECTIONS: [&str; 2] = ["client_to_backend", "backend_to_client"];

/// Which path carried a flow's bytes, as the metrics name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowPath {
    /// The eBPF sockhash splice.
    Sockmap = 0,
    /// A terminated flow whose keys are in the kernel (kTLS), moved with `splice(2)`.
    KtlsSplice = 1,
    /// A userspace relay.
    Userspace = 2,
}

impl From<splice::Path> for FlowPath {
    fn from(path: splice::Path) -> Self {
        match path {
            splice::Path::Sockmap => Self::Sockmap,
            splice::Path::Userspace => Self::Userspace,
        }
    }
}

impl FlowPath {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        PATHS[self as usize]
    }
}

/// Index of a mode in [`MODES`].
pub fn mode_index(mode: Mode) -> usize {
    match mode {
        Mode::Passthrough => 0,
        Mode::Terminate => 1,
    }
}

/// The label value of a mode.
pub fn mode_str(mode: Mode) -> &'static str {
    MODES[mode_index(mode)]
}

/// The counters and histograms of one ingress.
#[derive(Debug)]
pub struct IngressMetrics {
    name: Arc<str>,
    tag: u32,
    accepted: AtomicU64,
    routed: AtomicU64,
    refused: [AtomicU64; Reason::ALL.len()],
    /// Flows started, by mode and path.
    started: [[AtomicU64; PATHS.len()]; MODES.len()],
    /// Flows ended, by mode and path.
    ended: [[AtomicU64; PATHS.len()]; MODES.len()],
    /// Flows ended, by end reason.
    ends: [AtomicU64; splice::FlowEnd::ALL.len()],
    /// Bytes moved by the terminate relay (spliced flows are summed by the engine).
    relayed: [AtomicU64; 2],
    /// Bytes of terminated flows moved by `splice(2)` between a kTLS socket and the backend.
    ktls_spliced: [AtomicU64; 2],
    /// TLS 1.3 `KeyUpdate`s whose new keys went into the kernel, by direction (0: the
    /// client's keys, 1: ours).
    key_updates: [AtomicU64; 2],
    /// Accept → complete ClientHello.
    pub hello: DurationHistogram,
    /// Complete ClientHello → backend connected (route, resolve, policy, connect).
    pub connect: DurationHistogram,
    /// Complete ClientHello → TLS handshake done (terminate mode).
    pub tls_handshake: DurationHistogram,
    /// Hand-off → end, by mode.
    flow_duration: [DurationHistogram; MODES.len()],
}

fn zeros<const N: usize>() -> [AtomicU64; N] {
    std::array::from_fn(|_| AtomicU64::new(0))
}

impl IngressMetrics {
    fn new(name: &str, tag: u32) -> Self {
        Self {
            name: Arc::from(name),
            tag,
            accepted: AtomicU64::new(0),
            routed: AtomicU64::new(0),
            refused: zeros(),
            started: std::array::from_fn(|_| zeros()),
            ended: std::array::from_fn(|_| zeros()),
            ends: zeros(),
            relayed: zeros(),
            ktls_spliced: zeros(),
            key_updates: zeros(),
            hello: DurationHistogram::new(PHASE_BOUNDS),
            connect: DurationHistogram::new(PHASE_BOUNDS),
            tls_handshake: DurationHistogram::new(PHASE_BOUNDS),
            flow_duration: std::array::from_fn(|_| DurationHistogram::new(FLOW_BOUNDS)),
        }
    }

    /// The ingress name.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The tag its flows carry through the splice engine.
    pub fn tag(&self) -> u32 {
        self.tag
    }

    /// A connection was accepted.
    pub fn on_accept(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection was refused.
    pub fn on_refuse(&self, reason: Reason) {
        if let Some(c) = self.refused.get(reason.index()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A connection became a flow (handed to the engine or the terminate relay).
    pub fn on_flow_start(&self, mode: Mode, path: FlowPath) {
        self.routed.fetch_add(1, Ordering::Relaxed);
        if let Some(c) = self
            .started
            .get(mode_index(mode))
            .and_then(|m| m.get(path as usize))
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A live flow moved from path `from` to path `to` (its first phase ended).
    pub fn on_path_change(&self, mode: Mode, from: FlowPath, to: FlowPath) {
        let m = mode_index(mode);
        if let Some(c) = self.ended.get(m).and_then(|m| m.get(from as usize)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(c) = self.started.get(m).and_then(|m| m.get(to as usize)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A flow ended.
    pub fn on_flow_end(&self, mode: Mode, path: FlowPath, end: splice::FlowEnd, took: Duration) {
        if let Some(c) = self
            .ended
            .get(mode_index(mode))
            .and_then(|m| m.get(path as usize))
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(c) = self.ends.get(end as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(h) = self.flow_duration.get(mode_index(mode)) {
            h.observe(took);
        }
    }

    /// The terminate relay moved `bytes` in `direction` (0 = client → backend).
    pub fn on_relayed(&self, direction: usize, bytes: u64) {
        if let Some(c) = self.relayed.get(direction) {
            c.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// A kTLS flow spliced `bytes` in `direction` (0 = client → backend).
    pub fn on_ktls_spliced(&self, direction: usize, bytes: u64) {
        if let Some(c) = self.ktls_spliced.get(direction) {
            c.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// A kTLS flow took new keys in `direction` (0 = the client's, after its `KeyUpdate`).
    pub fn on_key_update(&self, direction: usize) {
        if let Some(c) = self.key_updates.get(direction) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections that became flows so far.
    pub fn routed(&self) -> u64 {
        self.routed.load(Ordering::Relaxed)
    }

    /// Connections refused for `reason` so far.
    pub fn refused(&self, reason: Reason) -> u64 {
        self.refused
            .get(reason.index())
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Live flows in `mode` on `path`.
    pub fn active(&self, mode: Mode, path: FlowPath) -> u64 {
        let read = |counts: &[[AtomicU64; PATHS.len()]; MODES.len()]| {
            counts
                .get(mode_index(mode))
                .and_then(|m| m.get(path as usize))
                .map_or(0, |c| c.load(Ordering::Relaxed))
        };
        // Ended is read first: a flow ending in between is then counted as still live.
        let ended = read(&self.ended);
        read(&self.started).saturating_sub(ended)
    }
}

/// Counters of the access log.
#[derive(Debug, Default)]
pub struct AccessLogCounters {
    /// Lines written.
    pub written: AtomicU64,
    /// Lines dropped because the writer fell behind (or failed).
    pub dropped: AtomicU64,
}

/// Scrape-time state of the data path, gathered by its owner before encoding.
#[derive(Debug, Default, Clone)]
pub struct DataPathView {
    /// Engine bytes by tag, gated flows, gate closures.
    pub usage: splice::Usage,
    /// Whether the eBPF verdict program is loaded and attached.
    pub program_loaded: bool,
    /// Version of the verdict program serving new flows (0 off the kernel path, or a previous
    /// daemon's program of unknown version).
    pub program_version: u32,
    /// Whether new flows run a previous daemon's program because attaching this daemon's own
    /// to the handed-over maps failed.
    pub program_inherited: bool,
    /// Whether the kernel offers kTLS.
    pub ktls_available: bool,
    /// Sockets in the sockhash (two per kernel flow).
    pub sockhash_entries: u64,
    /// Sockets the sockhash can hold (0 when not loaded).
    pub sockhash_capacity: u64,
}

/// The daemon's metrics; shared by the data path, the access log and the API.
#[derive(Debug)]
pub struct Metrics {
    ingresses: Mutex<Vec<Arc<IngressMetrics>>>,
    /// Access log counters.
    pub access_log: AccessLogCounters,
    started: SystemTime,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            ingresses: Mutex::new(Vec::new()),
            access_log: AccessLogCounters::default(),
            started: SystemTime::now(),
        }
    }
}

impl Metrics {
    /// New, empty metrics.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The metrics of ingress `name`, created on first use (call once per listener, not per
    /// connection: it takes a lock). An ingress keeps its counters across listener restarts
    /// and rebinds; a deleted ingress's series stay until the daemon restarts.
    pub fn ingress(&self, name: &str) -> Arc<IngressMetrics> {
        let mut all = self
            .ingresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(found) = all.iter().find(|m| &*m.name == name) {
            return found.clone();
        }
        let tag = u32::try_from(all.len()).unwrap_or(u32::MAX);
        let created = Arc::new(IngressMetrics::new(name, tag));
        all.push(created.clone());
        created
    }

    /// Every ingress seen, in tag order.
    pub fn ingresses(&self) -> Vec<Arc<IngressMetrics>> {
        self.ingresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The ingress name of a tag.
    pub fn name_of(&self, tag: u32) -> Option<Arc<str>> {
        self.ingresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(tag as usize)
            .map(|m| m.name.clone())
    }

    /// Encodes every family as OpenMetrics text; `view` is `None` without a data path.
    pub fn render(self: &Arc<Self>, view: Option<DataPathView>) -> String {
        scrape::render(self.clone(), view, ProcessSample::read(self.started))
    }
}

/// The version and commit this binary was built from.
pub fn build_info() -> (&'static str, &'static str) {
    (
        env!("CARGO_PKG_VERSION"),
        option_env!("INGRESSD_GIT_COMMIT").unwrap_or("unknown"),
    )
}
