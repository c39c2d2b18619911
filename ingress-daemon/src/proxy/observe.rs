//! What the data path shows: metrics at scrape time, live flows for `/flows`, and the
//! `/readyz` component.
//!
//! Terminated flows are not in the splice engine, so they are listed here: a map from flow ID
//! to the flow's live counters, touched once when a terminated flow starts and once when it
//! ends (a terminated flow already costs a TLS handshake and a task; spliced flows never
//! touch it).

use std::{
    collections::BTreeMap,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use super::{DataPlane, conn::Conn};
use crate::{
    api::{ByteCounts, FlowEntry, Observe, ProbeReport, ReadinessProbe},
    metrics::{self, DataPathView, FlowPath},
    model::Mode,
    splice,
};

/// A live terminated flow's counters.
#[derive(Debug)]
pub(super) struct LiveTerminated {
    tag: u32,
    client: SocketAddr,
    backend: Option<SocketAddr>,
    started: Instant,
    path: FlowPath,
    /// Bytes that crossed userspace, by direction.
    relayed: [AtomicU64; 2],
    /// Bytes `splice(2)` moved between a kTLS socket and the backend, by direction.
    spliced: [AtomicU64; 2],
}

fn read(counts: &[AtomicU64; 2]) -> [u64; 2] {
    [0, 1].map(|d| counts.get(d).map_or(0, |c| c.load(Ordering::Relaxed)))
}

impl LiveTerminated {
    /// Counts `bytes` relayed through userspace in `direction` (0 = client → backend).
    pub(super) fn add(&self, direction: usize, bytes: u64) {
        if let Some(c) = self.relayed.get(direction) {
            c.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Counts `bytes` spliced in the kernel in `direction`.
    pub(super) fn add_spliced(&self, direction: usize, bytes: u64) {
        if let Some(c) = self.spliced.get(direction) {
            c.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Bytes moved so far on any path, `[client → backend, backend → client]`.
    pub(super) fn bytes(&self) -> [u64; 2] {
        let (r, s) = (read(&self.relayed), read(&self.spliced));
        [r[0] + s[0], r[1] + s[1]]
    }

    /// Bytes that crossed userspace so far.
    pub(super) fn relayed(&self) -> [u64; 2] {
        read(&self.relayed)
    }

    /// Bytes spliced in the kernel so far.
    pub(super) fn spliced(&self) -> [u64; 2] {
        read(&self.spliced)
    }
}

/// The live terminated flows, by ID.
#[derive(Debug, Default)]
pub(super) struct TerminatedFlows {
    flows: Mutex<BTreeMap<u64, Arc<LiveTerminated>>>,
}

/// A listed terminated flow; unlisted when dropped.
pub(super) struct LiveGuard<'a> {
    registry: &'a TerminatedFlows,
    id: u64,
    pub(super) flow: Arc<LiveTerminated>,
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.registry
            .flows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

impl TerminatedFlows {
    /// Terminated flows live now.
    pub(super) fn len(&self) -> usize {
        self.flows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub(super) fn insert(&self, id: u64, conn: &Conn, path: FlowPath) -> LiveGuard<'_> {
        let flow = Arc::new(LiveTerminated {
            tag: conn.counters.tag(),
            client: conn.client,
            backend: conn.backend,
            started: Instant::now(),
            path,
            relayed: [AtomicU64::new(0), AtomicU64::new(0)],
            spliced: [AtomicU64::new(0), AtomicU64::new(0)],
        });
        self.flows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, flow.clone());
        LiveGuard {
            registry: self,
            id,
            flow,
        }
    }

    fn page(&self, after: u64, limit: usize) -> Vec<(u64, Arc<LiveTerminated>)> {
        self.flows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .range(after.saturating_add(1)..)
            .take(limit)
            .map(|(id, f)| (*id, f.clone()))
            .collect()
    }
}

impl DataPlane {
    /// The scrape-time state of the data path.
    pub async fn view(&self) -> DataPathView {
        let engine = &self.inner.engine;
        DataPathView {
            usage: engine.usage().await,
            program_loaded: engine.path() == splice::Path::Sockmap,
            program_version: engine.serving_program().map_or(0, |p| p.version),
            program_inherited: engine.serving_program().is_some_and(|p| !p.own),
            ktls_available: self.inner.ktls.available(),
            sockhash_entries: engine.kernel_dirs_in_use().unwrap_or(0),
            sockhash_capacity: engine.kernel_capacity().unwrap_or(0),
        }
    }

    /// The metrics exposition (OpenMetrics text).
    pub async fn render_metrics(&self) -> String {
        let view = self.view().await;
        self.inner.metrics.render(Some(view))
    }

    /// At most `limit` live flows (spliced and terminated) with an ID above `after`, in ID
    /// order.
    pub async fn list_flows(&self, after: u64, limit: usize) -> Vec<FlowEntry> {
        let metrics = &self.inner.metrics;
        let name = |tag: u32| {
            metrics
                .name_of(tag)
                .map_or_else(String::new, |n| n.to_string())
        };
        let mut entries: Vec<FlowEntry> = self
            .inner
            .engine
            .flows_page(after, limit)
            .await
            .into_iter()
            .map(|f| FlowEntry {
                id: f.id,
                ingress: name(f.tag),
                mode: metrics::mode_str(Mode::Passthrough).to_owned(),
                path: FlowPath::from(f.path).as_str().to_owned(),
                // As the access log shows it: IPv4 clients of dual-stack listeners as IPv4.
                client: f
                    .client
                    .map(|a| crate::proxy_protocol::canonical(a).to_string()),
                backend: f.backend.map(|a| a.to_string()),
                age_ms: u64::try_from(f.age.as_millis()).unwrap_or(u64::MAX),
                client_to_backend: ByteCounts {
                    kernel: f.client_to_backend.kernel,
                    relayed: f.client_to_backend.relayed,
                },
                backend_to_client: ByteCounts {
                    kernel: f.backend_to_client.kernel,
                    relayed: f.backend_to_client.relayed,
                },
                gated: f.gated,
                gate_closures: f.gate_closures,
                program_version: f.program_version,
            })
            .collect();
        for (id, f) in self.inner.terminated.page(after, limit) {
            let ([up, down], [up_k, down_k]) = (f.relayed(), f.spliced());
            entries.push(FlowEntry {
                id,
                ingress: name(f.tag),
                mode: metrics::mode_str(Mode::Terminate).to_owned(),
                path: f.path.as_str().to_owned(),
                client: Some(f.client.to_string()),
                backend: f.backend.map(|a| a.to_string()),
                age_ms: u64::try_from(f.started.elapsed().as_millis()).unwrap_or(u64::MAX),
                client_to_backend: ByteCounts {
                    kernel: up_k,
                    relayed: up,
                },
                backend_to_client: ByteCounts {
                    kernel: down_k,
                    relayed: down,
                },
                gated: false,
                gate_closures: 0,
                program_version: 0,
            });
        }
        entries.sort_by_key(|e| e.id);
        entries.truncate(limit);
        entries
    }
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

impl Observe for DataPlane {
    fn metrics(&self) -> BoxFuture<'_, String> {
        Box::pin(self.render_metrics())
    }

    fn flows(&self, after: u64, limit: usize) -> BoxFuture<'_, Vec<FlowEntry>> {
        Box::pin(self.list_flows(after, limit))
    }
}

impl ReadinessProbe for DataPlane {
    fn name(&self) -> &'static str {
        "data_path"
    }

    fn report(&self) -> ProbeReport {
        let engine = &self.inner.engine;
        let loaded = engine.path() == splice::Path::Sockmap;
        let program = engine.serving_program();
        let active = self.inner.metrics.ingresses();
        let live = |mode, path| active.iter().map(|m| m.active(mode, path)).sum::<u64>();
        ProbeReport {
            ready: true,
            detail: serde_json::json!({
                "splice_path": engine.path().as_str(),
                "ebpf": {
                    "loaded": loaded,
                    "attached": loaded,
                    "unavailable_reason": engine.kernel_unavailable_reason(),
                    "sockhash_entries": engine.kernel_dirs_in_use().unwrap_or(0),
                    "sockhash_capacity": engine.kernel_capacity().unwrap_or(0),
                    "program_version": program.map_or(0, |p| p.version),
                    "program": program.map(|p| if p.own { "own" } else { "inherited" }),
                    "program_fallback_reason": program.and_then(|p| p.fallback_reason.as_deref()),
                },
                "ebpf_loaded": loaded,
                "ebpf_unavailable_reason": engine.kernel_unavailable_reason(),
                "ktls_available": self.inner.ktls.available(),
                "ktls_ciphers": self.inner.ktls.names(),
                "ktls_rekey": self.inner.ktls.rekeys(),
                "terminated_flows_path": if self.inner.ktls.available() {
                    FlowPath::KtlsSplice.as_str()
                } else {
                    FlowPath::Userspace.as_str()
                },
                "flows": self.active_flows(),
                "kernel_flows": engine.kernel_dirs_in_use().unwrap_or(0) / 2,
                "flows_by_path": {
                    "sockmap": live(Mode::Passthrough, FlowPath::Sockmap),
                    "ktls_splice": live(Mode::Terminate, FlowPath::KtlsSplice),
                    "userspace": live(Mode::Passthrough, FlowPath::Userspace)
                        + live(Mode::Terminate, FlowPath::Userspace),
                },
                "access_log": self.inner.access_log.enabled(),
            }),
        }
    }
}
