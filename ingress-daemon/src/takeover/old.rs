//! The running daemon's side: serves the control socket and hands everything over.

use std::{
    net::SocketAddr,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::watch;
use tracing::{info, warn};

use super::{Compat, FlowEntry, Message, TakeoverError, wire};
use crate::{control::ControlPlane, proxy::DataPlane, sys};

/// How long the old daemon waits for connections between accept and hand-off to finish.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long it waits for each answer of the new daemon (`Exit` comes once the new daemon has
/// loaded the records and serves the API).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Flows per `Flows` message: two descriptors each, within the kernel's 253.
const FLOWS_PER_MESSAGE: usize = 126;

/// Relay bytes per `Flows` message.
const TAIL_BYTES_PER_MESSAGE: usize = 128 << 10;

/// JSON bytes of the flows of one `Flows` message: with the tail, within
/// [`wire::MAX_MESSAGE_BYTES`] and room for the message's own keys.
const JSON_BYTES_PER_MESSAGE: usize = wire::MAX_MESSAGE_BYTES - TAIL_BYTES_PER_MESSAGE - 1024;

/// Whether this daemon has handed over; the API stops serving once it has.
#[derive(Debug)]
pub struct Handover {
    done: watch::Sender<bool>,
}

impl Handover {
    /// Not handed over yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            done: watch::channel(false).0,
        })
    }

    /// Whether the hand-off happened.
    pub fn is_handed_over(&self) -> bool {
        *self.done.borrow()
    }

    /// Resolves once the hand-off happened.
    pub async fn handed_over(&self) {
        let mut rx = self.done.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }
}

/// What the running daemon hands over, and how.
pub struct OldSide {
    /// The daemon's runtime (the control socket is served from a thread of its own).
    pub runtime: tokio::runtime::Handle,
    /// The data path (accept loops, splice engine, terminated flows).
    pub data_plane: DataPlane,
    /// The control plane (ingress listeners).
    pub control: Arc<ControlPlane>,
    /// A duplicate of the API's listening socket.
    pub api: OwnedFd,
    /// The API's bound address.
    pub api_addr: SocketAddr,
    /// How long terminated flows may run on after a hand-off.
    pub drain: Duration,
    /// Set once handed over.
    pub handover: Arc<Handover>,
}

/// Listens on the control socket at `path` and serves takeovers from a thread of its own.
pub fn serve(path: &Path, side: OldSide) -> std::io::Result<()> {
    let listener = sys::seqpacket_listen(path)?;
    std::thread::Builder::new()
        .name("takeover".to_owned())
        .spawn(move || {
            loop {
                let conn = match sys::seqpacket_accept(listener.as_fd()) {
                    Ok(conn) => conn,
                    Err(e) => {
                        warn!(error = %e, "takeover control socket failed; takeovers disabled");
                        return;
                    }
                };
                match hand_off(&side, &conn) {
                    Ok(()) => {}
                    Err(e) => warn!(error = %e, "takeover failed; serving on"),
                }
            }
        })?;
    Ok(())
}

/// Runs one takeover. Returns only if this daemon keeps serving (the hand-off was refused or
/// failed, and everything resumed); after a hand-off the process exits.
fn hand_off(side: &OldSide, conn: &OwnedFd) -> Result<(), TakeoverError> {
    sys::set_recv_timeout(conn.as_fd(), Some(ANSWER_TIMEOUT))?;
    let Some(hello) = wire::recv(conn)? else {
        return Ok(());
    };
    let Message::Hello { compat } = hello.message else {
        return Err(TakeoverError::Protocol("expected hello".to_owned()));
    };
    let mine = Compat::current();
    if let Some(reason) = mine.incompatibility(&compat) {
        wire::send_refuse(conn.as_fd(), &reason)?;
        return Err(TakeoverError::Incompatible(reason));
    }
    info!(new_version = %compat.version, new_program = %compat.program, "takeover started");
    let dp = &side.data_plane;
    let engine = dp.engine();
    let maps = match engine.export_maps() {
        Ok(maps) => maps,
        Err(e) => {
            let _ = wire::send_refuse(conn.as_fd(), &e.to_string());
            return Err(e.into());
        }
    };
    wire::send(
        conn.as_fd(),
        &Message::Offer {
            compat: mine,
            pid: std::process::id(),
            program_version: engine.serving_program().map_or(0, |p| p.version),
            maps: maps.is_some(),
        },
        &[],
        &[],
    )?;
    // The maps go first, and the new daemon loads its program on them while this one still
    // serves: nothing is paused until it is ready.
    let mut fds_sent = 0u64;
    if let Some(maps) = &maps {
        let fds = [
            maps.socks.as_fd(),
            maps.sock_dir.as_fd(),
            maps.dirs.as_fd(),
            maps.events.as_fd(),
        ];
        wire::send(conn.as_fd(), &Message::Maps, &[], &fds)?;
        fds_sent += fds.len() as u64;
    }
    match wire::recv(conn)?.map(|r| r.message) {
        Some(Message::Ready) => {}
        Some(Message::Refuse { reason }) => return Err(TakeoverError::Refused(reason)),
        Some(other) => {
            return Err(TakeoverError::Protocol(format!(
                "expected ready, got {other:?}"
            )));
        }
        None => {
            return Err(TakeoverError::Protocol(
                "the new daemon closed the connection".to_owned(),
            ));
        }
    }
    // The hand-off proper (what `took_ms` measures) starts here.
    let started = Instant::now();
    if let Err(e) = side.runtime.block_on(dp.pause_accepting(PAUSE_TIMEOUT)) {
        dp.resume_accepting();
        let reason = e.to_string();
        let _ = wire::send_refuse(conn.as_fd(), &reason);
        return Err(TakeoverError::Refused(reason));
    }
    let frozen = match side.runtime.block_on(engine.freeze()) {
        Ok(frozen) => frozen,
        Err(e) => {
            engine.resume();
            dp.resume_accepting();
            let _ = wire::send_refuse(conn.as_fd(), &e.to_string());
            return Err(e.into());
        }
    };
    info!(
        flows = frozen.flows.len(),
        "accepting paused and flows frozen"
    );
    let handed = send_all(side, conn, &frozen, fds_sent).and_then(|sent| await_exit(conn, sent));
    match handed {
        Ok(()) => {}
        Err(e) => {
            // The new daemon is gone or refused: everything goes on here, including what
            // arrived while frozen. The exported duplicates close with `frozen`.
            engine.resume();
            dp.resume_accepting();
            warn!(error = %e, "takeover failed; resumed");
            return Ok(());
        }
    }
    engine.release();
    let _ = side.handover.done.send(true);
    let terminated = dp.terminated_flows();
    info!(
        took_ms = started.elapsed().as_secs_f64() * 1e3,
        terminated, "handed over"
    );
    // Leaving without destructors: dropping the loaded program would detach it from the
    // sockhash the new daemon runs on.
    if terminated > 0 {
        let deadline = Instant::now() + side.drain;
        while dp.terminated_flows() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        info!(
            left = dp.terminated_flows(),
            "terminated flows drained; exiting"
        );
    }
    std::process::exit(0);
}

/// Sends listeners and flows; returns `(flows, descriptors)` sent, counting the `fds_sent`
/// before (the maps).
fn send_all(
    side: &OldSide,
    conn: &OwnedFd,
    frozen: &crate::splice::Frozen,
    mut fds_sent: u64,
) -> Result<(u64, u64), TakeoverError> {
    let sock = conn.as_fd();
    let listeners = side.control.export_listeners()?;
    let mut fds: Vec<BorrowedFd<'_>> = vec![side.api.as_fd()];
    fds.extend(listeners.iter().map(|(_, fd)| fd.as_fd()));
    wire::send(
        sock,
        &Message::Listeners {
            api: side.api_addr,
            ingresses: listeners.iter().map(|(addr, _)| *addr).collect(),
        },
        &[],
        &fds,
    )?;
    fds_sent += fds.len() as u64;
    let dp = &side.data_plane;
    let mut batch: Vec<FlowEntry> = Vec::new();
    let mut batch_fds: Vec<BorrowedFd<'_>> = Vec::new();
    let mut tail: Vec<u8> = Vec::new();
    // The batch's JSON size: flow descriptions vary (server names, instance names), so the
    // cut counts bytes, not flows alone.
    let mut json_bytes = 0;
    let flush = |batch: &mut Vec<FlowEntry>,
                 batch_fds: &mut Vec<BorrowedFd<'_>>,
                 tail: &mut Vec<u8>|
     -> Result<u64, TakeoverError> {
        if batch.is_empty() {
            return Ok(0);
        }
        let flows = std::mem::take(batch);
        wire::send(sock, &Message::Flows { flows }, tail, batch_fds)?;
        let n = batch_fds.len() as u64;
        batch_fds.clear();
        tail.clear();
        Ok(n)
    };
    for flow in &frozen.flows {
        let pending_bytes = flow.pending[0].len() + flow.pending[1].len();
        let entry = FlowEntry {
            state: flow.state.clone(),
            ingress: dp.ingress_of_tag(flow.state.tag),
            pending: [
                u32::try_from(flow.pending[0].len()).unwrap_or(u32::MAX),
                u32::try_from(flow.pending[1].len()).unwrap_or(u32::MAX),
            ],
        };
        // A separating comma each, and room for the message's own keys.
        let entry_bytes = serde_json::to_vec(&entry).map_or(0, |j| j.len()) + 1;
        if batch.len() == FLOWS_PER_MESSAGE
            || (!batch.is_empty()
                && (tail.len() + pending_bytes > TAIL_BYTES_PER_MESSAGE
                    || json_bytes + entry_bytes > JSON_BYTES_PER_MESSAGE))
        {
            fds_sent += flush(&mut batch, &mut batch_fds, &mut tail)?;
            json_bytes = 0;
        }
        json_bytes += entry_bytes;
        batch.push(entry);
        batch_fds.extend(flow.socks.iter().map(AsFd::as_fd));
        tail.extend_from_slice(&flow.pending[0]);
        tail.extend_from_slice(&flow.pending[1]);
    }
    fds_sent += flush(&mut batch, &mut batch_fds, &mut tail)?;
    let flows = frozen.flows.len() as u64;
    wire::send(
        sock,
        &Message::End {
            flows,
            fds: fds_sent,
        },
        &[],
        &[],
    )?;
    Ok((flows, fds_sent))
}

/// Waits for the new daemon's `Ack` (matching counts) and then its `Exit`.
fn await_exit(conn: &OwnedFd, (flows, fds): (u64, u64)) -> Result<(), TakeoverError> {
    let closed = || TakeoverError::Protocol("the new daemon closed the connection".to_owned());
    match wire::recv(conn)?.ok_or_else(closed)?.message {
        Message::Ack {
            flows: got_flows,
            fds: got_fds,
        } if got_flows == flows && got_fds == fds => {}
        Message::Ack {
            flows: got_flows,
            fds: got_fds,
        } => {
            return Err(TakeoverError::Protocol(format!(
                "the new daemon got {got_flows} flows and {got_fds} descriptors of {flows} and {fds}"
            )));
        }
        Message::Refuse { reason } => return Err(TakeoverError::Refused(reason)),
        other => return Err(TakeoverError::Protocol(format!("unexpected {other:?}"))),
    }
    match wire::recv(conn)?.ok_or_else(closed)?.message {
        Message::Exit => Ok(()),
        Message::Refuse { reason } => Err(TakeoverError::Refused(reason)),
        other => Err(TakeoverError::Protocol(format!("unexpected {other:?}"))),
    }
}
