//! Handing live flows from one daemon to the next (see [`crate::takeover`]).
//!
//! The old daemon [freezes](Engine::freeze) its engine: every shard stops reading its epoll
//! and its timers (events that arrive meanwhile stay queued in the epoll instance, so a FIN
//! seen while frozen is handled on [resume](Engine::resume)), and the congestion task stops
//! consuming the ring. Each flow is exported as a [`FlowState`] with duplicates of its two
//! sockets and copies of the bytes its relay holds. The new daemon
//! [starts](Engine::start_adopting) its engine on the same maps and [adopts](Engine::adopt)
//! each flow. Once the new daemon owns everything, the old one [releases](Engine::release)
//! its flows: it forgets them without touching a socket option or a map entry.

use std::{
    os::fd::{AsFd, OwnedFd},
    sync::{Arc, atomic::Ordering},
};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::{Engine, OnEnd, SpliceError, ebpf, shard};

pub use ebpf::MapFds;

/// The kernel part of a flow: socket cookies and direction slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelState {
    /// Cookies of the client and backend sockets.
    pub cookies: [u64; 2],
    /// Direction slots, `[client → backend, backend → client]`.
    pub dirs: [u32; 2],
}

/// One direction of a flow, as the daemon tracks it (the program's counters stay in the
/// shared direction array).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirState {
    /// Bytes userspace read from the source before the flow was spliced.
    pub consumed_pre: u64,
    /// Bytes the relay read from the source.
    pub read: u64,
    /// Bytes the relay wrote to the destination.
    pub relayed: u64,
    /// The source sent a FIN.
    pub fin_seen: bool,
    /// `recv` returned 0.
    pub eof: bool,
    /// The FIN was propagated to the destination.
    pub shut: bool,
    /// A held window: the clamp to restore, the clamp set for the hold, and the reverse
    /// direction's byte count when a one-segment hold began (`u64::MAX` for a zero window).
    pub hold: Option<(u32, u32, u64)>,
}

/// A flow's state in a hand-off; its sockets travel beside it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowState {
    /// Flow ID (kept across the hand-off).
    pub id: u64,
    /// The caller's tag.
    pub tag: u32,
    /// The kernel part, on the kernel path.
    pub kernel: Option<KernelState>,
    /// Client → backend, backend → client.
    pub dirs: [DirState; 2],
    /// Milliseconds since the flow was spliced.
    pub age_ms: u64,
    /// The flow's idle timeout.
    pub idle_timeout_ms: Option<u64>,
    /// The caller's description of the flow ([`super::EndHandler::describe`]); absent from
    /// daemons that did not describe their flows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<serde_json::Value>,
}

/// A flow taken out of a frozen engine: its state, duplicates of its sockets
/// (`[client, backend]`) and the bytes its relay held per direction.
#[derive(Debug)]
pub struct ExportedFlow {
    /// The flow's state.
    pub state: FlowState,
    /// The client and backend sockets.
    pub socks: [OwnedFd; 2],
    /// Bytes read from each direction's source, not yet written to its destination.
    pub pending: [Vec<u8>; 2],
}

/// What a frozen engine hands over (the maps go earlier, see [`Engine::export_maps`]).
#[derive(Debug)]
pub struct Frozen {
    /// Every live flow.
    pub flows: Vec<ExportedFlow>,
}

/// Why a flow could not be adopted.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    /// A socket's cookie is not the one the state names: the descriptors and the states are
    /// out of step.
    #[error("flow {id}: socket cookie {found} where {expected} was expected")]
    CookieMismatch {
        /// The flow.
        id: u64,
        /// The cookie in the state.
        expected: u64,
        /// The socket's cookie.
        found: u64,
    },
    /// A kernel flow arrived without the maps, or the reverse.
    #[error("flow {id}: its path does not match the engine's")]
    PathMismatch {
        /// The flow.
        id: u64,
    },
    /// Reading a socket cookie failed, or the engine is shutting down.
    #[error(transparent)]
    Splice(#[from] SpliceError),
}

impl Engine {
    /// Stops every shard and the congestion task, and exports every live flow. The engine
    /// keeps owning its flows until [`Self::release`] (or [`Self::resume`] if the hand-off
    /// fails).
    pub async fn freeze(&self) -> std::io::Result<Frozen> {
        let _ = self.inner.frozen.send(true);
        let mut flows = Vec::new();
        for tx in &self.inner.shards {
            let (reply, rx) = oneshot::channel();
            if tx.send(shard::Command::Freeze(reply)).is_ok()
                && let Ok(part) = rx.await
            {
                flows.extend(part?);
            }
        }
        Ok(Frozen { flows })
    }

    /// Duplicates of the kernel path's map descriptors, when it is in use: the next daemon
    /// loads its program on them before anything here is frozen.
    pub fn export_maps(&self) -> std::io::Result<Option<MapFds>> {
        match &self.inner.kernel {
            Some(path) => Ok(Some(path.export_maps()?)),
            None => Ok(None),
        }
    }

    /// Resumes after a failed hand-off: events that arrived while frozen are handled now, and
    /// this daemon's program is attached again (the next daemon may have attached its own).
    pub fn resume(&self) {
        if let Some(path) = &self.inner.kernel {
            path.reattach();
        }
        for tx in &self.inner.shards {
            let _ = tx.send(shard::Command::Resume);
        }
        let _ = self.inner.frozen.send(false);
    }

    /// Forgets every flow after a hand-off without touching sockets or maps (the next daemon
    /// owns them), and keeps the kernel path loaded for the life of the process: dropping it
    /// would detach the program from the sockhash the next daemon uses.
    pub fn release(&self) {
        for tx in &self.inner.shards {
            let _ = tx.send(shard::Command::Release);
        }
        if let Some(path) = &self.inner.kernel {
            std::mem::forget(Arc::clone(path));
        }
    }

    /// Takes over a flow exported by another daemon's engine; returns its ID.
    pub fn adopt(&self, flow: ExportedFlow, on_end: Option<OnEnd>) -> Result<u64, AdoptError> {
        let inner = &*self.inner;
        let id = flow.state.id;
        if flow.state.kernel.is_some() != inner.kernel.is_some() {
            return Err(AdoptError::PathMismatch { id });
        }
        if let Some(kernel) = &flow.state.kernel {
            for (sock, &expected) in flow.socks.iter().zip(&kernel.cookies) {
                let found =
                    crate::sys::socket_cookie(sock.as_fd()).map_err(|source| SpliceError::Sys {
                        call: "SO_COOKIE",
                        source,
                    })?;
                if found != expected {
                    return Err(AdoptError::CookieMismatch {
                        id,
                        expected,
                        found,
                    });
                }
            }
        }
        inner.next_id.fetch_max(id + 1, Ordering::Relaxed);
        let shard = inner.next_shard.fetch_add(1, Ordering::Relaxed) % inner.shards.len().max(1);
        if let Some(kernel) = &flow.state.kernel {
            for dir in kernel.dirs {
                if let Some(owner) = inner.dir_shard.get(dir as usize) {
                    owner.store(u16::try_from(shard).unwrap_or(0), Ordering::Relaxed);
                }
            }
        }
        inner
            .shards
            .get(shard)
            .ok_or(SpliceError::ShuttingDown)?
            .send(shard::Command::Adopt(Box::new((flow, on_end))))
            .map_err(|_| SpliceError::ShuttingDown)?;
        Ok(id)
    }
}
