//! The data path's part in a takeover: pause accepting (the listening sockets stay open and
//! their backlog waits for the next daemon), wait until no connection is between accept and
//! hand-off, and adopt flows handed over by the previous daemon.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    metrics::FlowPath,
    model::Mode,
    splice::{self, ExportedFlow},
};

use super::{
    DataPlane, FlowSlot,
    conn::{Conn, First, FlowMeta, InstanceName, PassthroughEnd},
};

/// Why accepting could not be paused cleanly.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// Connections were still between accept and hand-off when the deadline passed.
    #[error("connections still in their handshake after {waited:?}")]
    Handshakes {
        /// How long it waited.
        waited: Duration,
    },
}

impl DataPlane {
    /// Stops every accept loop from accepting (listeners stay open: connections wait in the
    /// backlog) and waits up to `timeout` until every accepted connection has been handed to
    /// the splice engine, the terminate relay, or refused. On error accepting stays paused;
    /// call [`Self::resume_accepting`].
    pub async fn pause_accepting(&self, timeout: Duration) -> Result<(), PauseError> {
        let started = Instant::now();
        let _ = self.inner.paused.send(true);
        let all = u32::try_from(self.inner.settings.max_handshakes.max(1)).unwrap_or(u32::MAX);
        match tokio::time::timeout(timeout, self.inner.handshakes.acquire_many(all)).await {
            // Released at once: the accept loops are paused and take none.
            Ok(Ok(_permits)) => Ok(()),
            _ => Err(PauseError::Handshakes {
                waited: started.elapsed(),
            }),
        }
    }

    /// Lets the accept loops accept again.
    pub fn resume_accepting(&self) {
        let _ = self.inner.paused.send(false);
    }

    /// Terminated flows live now (relayed by this process; they cannot be handed over).
    /// Exact once the spliced flows have been released.
    pub fn terminated_flows(&self) -> usize {
        self.inner.terminated.len()
    }

    /// The name of the ingress a flow tag counts for.
    pub fn ingress_of_tag(&self, tag: u32) -> Option<String> {
        self.inner.metrics.name_of(tag).map(|n| n.to_string())
    }

    /// Hands a flow exported by the previous daemon to this daemon's engine, counted for
    /// ingress `ingress` (its tag is rewritten to this daemon's tag of that ingress).
    pub fn adopt(
        &self,
        mut flow: ExportedFlow,
        ingress: Option<&str>,
    ) -> Result<u64, splice::AdoptError> {
        let counters = ingress.map(|name| self.inner.metrics.ingress(name));
        if let Some(c) = &counters {
            flow.state.tag = c.tag();
        }
        // Adopted flows count toward `max_flows` like any other, even above it.
        self.inner
            .flows
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let slot = FlowSlot { dp: self.clone() };
        let path = FlowPath::from(if flow.state.kernel.is_some() {
            splice::Path::Sockmap
        } else {
            splice::Path::Userspace
        });
        if let Some(c) = &counters {
            c.on_flow_start(Mode::Passthrough, path);
        }
        let meta = flow
            .state
            .meta
            .take()
            .and_then(|m| serde_json::from_value::<FlowMeta>(m).ok());
        let on_end: splice::OnEnd = match (counters, meta) {
            (Some(counters), Some(meta)) => {
                // Reported as the previous daemon would have: the same access log line.
                let began = meta
                    .age_us
                    .and_then(|us| Instant::now().checked_sub(Duration::from_micros(us)));
                let mut conn = Conn::new(counters, meta.client, began.unwrap_or_else(Instant::now));
                conn.sni = meta.sni;
                conn.alpn = meta.alpn;
                conn.rule = meta.rule.map(Arc::from);
                conn.instance = meta.instance.map(InstanceName::Rendered);
                conn.backend = meta.backend;
                conn.mode = Some(Mode::Passthrough);
                Box::new(PassthroughEnd {
                    flow: conn,
                    slot,
                    first: began.map(|started| First {
                        moved: meta.first_moved,
                        started,
                    }),
                })
            }
            (counters, _) => Box::new(move |outcome: splice::FlowOutcome| {
                if let Some(c) = counters {
                    c.on_flow_end(
                        Mode::Passthrough,
                        FlowPath::from(outcome.path),
                        outcome.end,
                        outcome.duration,
                    );
                }
                drop(slot);
            }),
        };
        self.inner.engine.adopt(flow, Some(on_end))
    }
}
