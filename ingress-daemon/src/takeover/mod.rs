//! Zero-loss upgrades: a new `ingressd` takes the listening sockets, the API socket, the
//! kernel path's maps and every spliced flow over from the running one.
//!
//! # Control socket
//! Every daemon listens on `<data_dir>/takeover.sock` ([`SOCKET_FILE`], mode 0600), a
//! `SOCK_SEQPACKET` Unix socket: one daemon per data directory, so parallel daemons never
//! share one. `ingressd --takeover` connects to it instead of binding anything.
//!
//! # Messages
//! Each message is `u32 length (LE) | JSON | raw tail`, with descriptors attached by
//! `SCM_RIGHTS` (at most 253 per message; a short control buffer would silently close the
//! rest, so the receiver treats `MSG_CTRUNC` as an error and both sides count). The JSON is a
//! [`Message`]; the tail carries relay bytes of the flows in a `Flows` message.
//!
//! # Sequence
//! ```text
//!  new                                    old
//!  Hello {compat}            ──▶          refuses an incompatible state format, map layout
//!                            ◀──          Offer {compat, pid, program_version, maps}
//!                                         | Refuse {reason}
//!                            ◀──          Maps            fds: SOCKS, SOCK_DIR, DIRS, EVENTS
//!                                                         (when it has the kernel path)
//!  loads its own verdict program on the maps (not attached yet; see Program below): the
//!  verifier's time is spent while the old daemon still serves
//!  Ready                     ──▶
//!                                         pauses accepting (listeners stay open, the backlog
//!                                         waits), waits until no connection is between
//!                                         accept and hand-off, freezes the splice engine
//!                            ◀──          Listeners       fds: API, each ingress listener
//!                            ◀──          Flows ×N        ≤ 126 flows (2 fds each) + state
//!                            ◀──          End {flows, fds}
//!  checks the counts; Ack    ──▶          (a count mismatch or Refuse: old resumes)
//!  attaches its own verdict program to the maps (instant), adopts the flows into
//!  its shards (FIN/RST watching starts), loads the records from the data dir onto the
//!  inherited listeners, serves the API
//!  Exit                      ──▶          forgets its flows without touching sockets or maps;
//!                                         exits at once (no destructor runs), or stays for its terminated flows
//! ```
//! Old copies of every descriptor stay open until `Exit`: until then the old daemon can
//! resume as if nothing happened.
//!
//! # Failure
//! If the new daemon dies (the connection closes) or sends `Refuse` before `Exit`, or the
//! counts do not match, the old daemon resumes: its shards handle the events that queued in
//! their epoll instances while frozen (a FIN that arrived meanwhile is propagated then), it
//! re-handles congestion events nobody handled, and its accept loops accept again. The new
//! daemon exits. A new daemon that dies after it started running adopted flows and before
//! `Exit` may leave relay counters the old daemon does not know about; the window is the time
//! between `Ack` and `Exit` (the API start), a few milliseconds.
//!
//! # Terminated flows
//! Terminated flows are relayed in userspace with TLS state that lives in the old process:
//! they are not handed over. The old daemon keeps serving them (and only them) after `Exit`,
//! accepts nothing and answers no API request, and exits when the last one ends or when the
//! drain deadline (`takeover_drain_ms`) passes, without any cleanup.
//!
//! # Program
//! The new daemon runs its own verdict program for the flows it splices, and the flows it
//! adopted keep the program they were spliced with: a socket's psock copies the sockhash's
//! programs when the socket is inserted (kernel 4.20+, `sock_map_link`), so attaching a
//! program to `SOCKS` changes it only for sockets inserted afterwards, and the old program
//! stays loaded for as long as a psock holds it. aya 0.14 cannot load an object onto map
//! descriptors, so the new daemon pins the four received maps into a private directory
//! (mode 0700) on a bpffs, loads its object with `map_pin_path` (which opens the pins instead
//! of creating maps), checks that every map of the loaded object has the kernel id of the map
//! it received (a pin that did not lead to it would have made a fresh, empty map), loads the
//! program (the verifier: ~0.1 s here, ~15 s in an emulated guest, so before the old daemon
//! freezes anything) and removes the pins and the directory on every path. After `Ack` it
//! attaches the verdict to `SOCKS`, replacing the old attachment for future inserts (the map
//! is never without a program). Every run of the
//! program writes its version ([`ingress_common::PROGRAM_VERSION`], or the test hook
//! `INGRESSD_TEST_PROGRAM_VERSION`) into the direction it judges, so `/flows` shows which
//! program serves each flow.
//!
//! If any step fails (no bpffs, no permission to pin, the verifier), the new daemon logs why
//! and keeps the old daemon's program attached for new flows too (the behaviour before this
//! existed); `/readyz` and the metrics say which program serves new flows, with the version
//! the old daemon sent in its `Offer`. If a hand-off fails after the new daemon attached its
//! program, the old daemon attaches its own again when it resumes (an old daemon that runs a
//! program it inherited has none to restore: new flows then run the failed successor's
//! program until the next upgrade).
//!
//! # Compatibility
//! [`Compat`] carries [`STATE_FORMAT_VERSION`] (this module's message and flow-state format),
//! [`ingress_common::MAP_LAYOUT_VERSION`] and the identity of the verdict program (a hash of
//! the object and the version it is loaded with); both sides refuse a hand-off between
//! different state formats or map layouts, with a message naming both versions. A different
//! program is fine (see Program).
//!
//! # Layout
//! - `wire`: message encoding over the seqpacket socket.
//! - `old`: the running daemon's side (serves the control socket).
//! - `new`: the starting daemon's side (receives everything).

mod new;
mod old;
mod wire;

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub use new::{Inherited, receive};
pub use old::{Handover, OldSide, serve};

/// The control socket's file name in the data directory.
pub const SOCKET_FILE: &str = "takeover.sock";

/// Version of the messages and flow state below; bump it whenever either changes.
pub const STATE_FORMAT_VERSION: u32 = 2;

/// Environment variable of a test-only hook in the new daemon: `exit-after-ack:<ms>` makes it
/// wait `<ms>` milliseconds after acknowledging the descriptors, then exit without adopting
/// anything (to exercise the old daemon's resume).
pub const TEST_HOOK_ENV: &str = "INGRESSD_TAKEOVER_TEST_HOOK";

/// What both daemons must agree on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compat {
    /// [`STATE_FORMAT_VERSION`].
    pub state_format: u32,
    /// [`ingress_common::MAP_LAYOUT_VERSION`].
    pub map_layout: u32,
    /// Identity of the verdict program the daemon embeds (a hash of the object).
    pub program: String,
    /// The daemon's version.
    pub version: String,
}

impl Compat {
    /// This build's values.
    pub fn current() -> Self {
        Self {
            state_format: STATE_FORMAT_VERSION,
            map_layout: ingress_common::MAP_LAYOUT_VERSION,
            program: crate::splice::program_identity(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }

    /// Why a hand-off between `self` and `other` is impossible, if it is.
    pub fn incompatibility(&self, other: &Compat) -> Option<String> {
        if self.state_format != other.state_format {
            return Some(format!(
                "takeover state format {} (ingressd {}) is incompatible with {} (ingressd {})",
                self.state_format, self.version, other.state_format, other.version
            ));
        }
        if self.map_layout != other.map_layout {
            return Some(format!(
                "eBPF map layout {} (ingressd {}) is incompatible with {} (ingressd {})",
                self.map_layout, self.version, other.map_layout, other.version
            ));
        }
        None
    }
}

/// One flow in a `Flows` message.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct FlowEntry {
    state: crate::splice::FlowState,
    /// The ingress the flow counts for.
    ingress: Option<String>,
    /// Relay bytes per direction, in the message's tail.
    pending: [u32; 2],
}

/// A control message.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Message {
    /// New → old: who is asking.
    Hello { compat: Compat },
    /// Old → new: the hand-off starts. `program_version`: the version of the program serving
    /// the old daemon's new flows (0: none); `maps`: whether `Maps` follows at once.
    Offer {
        compat: Compat,
        pid: u32,
        program_version: u32,
        maps: bool,
    },
    /// New → old: this daemon's program is loaded on the maps (or could not be); go on.
    Ready,
    /// Either way: the hand-off is off.
    Refuse { reason: String },
    /// Old → new: the kernel path's maps are attached (four descriptors).
    Maps,
    /// Old → new: the API socket, then each ingress listener, are attached.
    Listeners {
        api: SocketAddr,
        ingresses: Vec<SocketAddr>,
    },
    /// Old → new: flows, two descriptors each (client, backend).
    Flows { flows: Vec<FlowEntry> },
    /// Old → new: everything was sent.
    End { flows: u64, fds: u64 },
    /// New → old: everything arrived.
    Ack { flows: u64, fds: u64 },
    /// New → old: the new daemon serves; exit.
    Exit,
}

/// Why a takeover failed.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    /// No daemon answers on the control socket.
    #[error("no running daemon answers on {path}: {source}")]
    Connect {
        /// The control socket.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The running daemon refused (incompatible versions, busy, ...).
    #[error("the running daemon refused the takeover: {0}")]
    Refused(String),
    /// This daemon refuses the running one.
    #[error("refusing to take over: {0}")]
    Incompatible(String),
    /// The control connection failed.
    #[error("takeover control socket: {0}")]
    Io(#[from] std::io::Error),
    /// A message could not be decoded or came out of order.
    #[error("takeover protocol: {0}")]
    Protocol(String),
}

#[cfg(test)]
mod tests {
    use super::Compat;

    #[test]
    fn different_map_layouts_or_state_formats_are_refused_with_both_versions() {
        let mine = Compat::current();
        assert_eq!(mine.incompatibility(&mine.clone()), None);
        let other_program = Compat {
            program: "0000000000000000".to_owned(),
            ..mine.clone()
        };
        assert_eq!(mine.incompatibility(&other_program), None);
        let layout = Compat {
            map_layout: mine.map_layout + 1,
            version: "9.9.9".to_owned(),
            ..mine.clone()
        };
        let reason = mine.incompatibility(&layout).unwrap();
        assert!(reason.contains("eBPF map layout"), "{reason}");
        assert!(reason.contains("9.9.9"), "{reason}");
        let format = Compat {
            state_format: mine.state_format + 1,
            ..mine.clone()
        };
        let reason = mine.incompatibility(&format).unwrap();
        assert!(reason.contains("state format"), "{reason}");
    }
}
