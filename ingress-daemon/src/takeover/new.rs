//! The starting daemon's side: connects to the running daemon and receives everything.

use std::{
    os::fd::{AsFd, OwnedFd},
    path::Path,
    time::{Duration, Instant},
};

use tracing::info;

use super::{Compat, Message, SOCKET_FILE, TEST_HOOK_ENV, TakeoverError, wire};
use crate::{
    listeners::BoundListener,
    splice::{ExportedFlow, LoadError, MapFds, PreparedProgram},
    sys,
};

/// How long the new daemon waits for each message of the old one.
const RECV_TIMEOUT: Duration = Duration::from_secs(10);

/// What the running daemon handed over.
pub struct Inherited {
    conn: OwnedFd,
    /// The old daemon's PID.
    pub old_pid: u32,
    /// When the hand-off proper started: once this daemon was ready (after the maps came and
    /// its program was loaded on them), before the old daemon paused.
    pub started: Instant,
    /// The API's listening socket (taken by the caller).
    pub api: Option<std::net::TcpListener>,
    /// The ingress listeners.
    pub listeners: Vec<BoundListener>,
    /// The kernel path's maps, when the old daemon had it.
    pub maps: Option<MapFds>,
    /// Version of the program serving the old daemon's new flows (0: none).
    pub program_version: u32,
    /// This daemon's program, loaded on the maps (taken by the caller).
    pub program: Option<Result<PreparedProgram, LoadError>>,
    /// Every spliced flow, with the ingress it counts for.
    pub flows: Vec<(ExportedFlow, Option<String>)>,
}

impl std::fmt::Debug for Inherited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inherited")
            .field("old_pid", &self.old_pid)
            .field("flows", &self.flows.len())
            .field("listeners", &self.listeners.len())
            .finish_non_exhaustive()
    }
}

impl Inherited {
    /// The direction slots of the kernel flows.
    pub fn used_dirs(&self) -> Vec<u32> {
        self.flows
            .iter()
            .filter_map(|(f, _)| f.state.kernel)
            .flat_map(|k| k.dirs)
            .collect()
    }

    /// Tells the old daemon to exit: this daemon serves now. Consumes the connection.
    pub fn finish(&self) -> Result<(), TakeoverError> {
        wire::send(self.conn.as_fd(), &Message::Exit, &[], &[])
    }
}

fn refuse(conn: &OwnedFd, reason: String) -> TakeoverError {
    let _ = wire::send_refuse(conn.as_fd(), &reason);
    TakeoverError::Protocol(reason)
}

/// Takes over from the daemon serving `data_dir`. Call before any other thread starts: the
/// descriptor table grows here, which is cheap while the process has one thread.
pub fn receive(data_dir: &Path) -> Result<Inherited, TakeoverError> {
    let path = data_dir.join(SOCKET_FILE);
    let conn = sys::seqpacket_connect(&path).map_err(|source| TakeoverError::Connect {
        path: path.display().to_string(),
        source,
    })?;
    sys::set_recv_timeout(conn.as_fd(), Some(RECV_TIMEOUT))?;
    let mine = Compat::current();
    wire::send(
        conn.as_fd(),
        &Message::Hello {
            compat: mine.clone(),
        },
        &[],
        &[],
    )?;
    let closed = || TakeoverError::Protocol("the running daemon closed the connection".to_owned());
    let (old_pid, program_version, maps_follow) = match wire::recv(&conn)?
        .ok_or_else(closed)?
        .message
    {
        Message::Offer {
            compat,
            pid,
            program_version,
            maps,
        } => {
            if let Some(reason) = mine.incompatibility(&compat) {
                let _ = refuse(&conn, reason.clone());
                return Err(TakeoverError::Incompatible(reason));
            }
            if compat.program != mine.program {
                info!(
                    running = %compat.program,
                    embedded = %mine.program,
                    "live flows keep the running daemon's verdict program, new flows get this one"
                );
            }
            (pid, program_version, maps)
        }
        Message::Refuse { reason } => return Err(TakeoverError::Refused(reason)),
        other => return Err(refuse(&conn, format!("expected an offer, got {other:?}"))),
    };
    let mut api = None;
    let mut listeners = Vec::new();
    let mut maps = None;
    let mut program = None;
    let mut adopted = Vec::new();
    let mut fds_received = 0u64;
    if maps_follow {
        let received = wire::recv(&conn)?.ok_or_else(closed)?;
        fds_received += received.fds.len() as u64;
        match received.message {
            Message::Maps => {
                let [socks, sock_dir, dirs, events] = <[OwnedFd; 4]>::try_from(received.fds)
                    .map_err(|fds| {
                        refuse(&conn, format!("maps came with {} descriptors", fds.len()))
                    })?;
                let received = MapFds {
                    socks,
                    sock_dir,
                    dirs,
                    events,
                };
                let loading = Instant::now();
                let prepared = PreparedProgram::load(&received);
                info!(
                    loaded = prepared.is_ok(),
                    took_ms = loading.elapsed().as_secs_f64() * 1e3,
                    "own verdict program loaded on the handed-over maps"
                );
                program = Some(prepared);
                maps = Some(received);
            }
            Message::Refuse { reason } => return Err(TakeoverError::Refused(reason)),
            other => return Err(refuse(&conn, format!("expected maps, got {other:?}"))),
        }
    }
    wire::send(conn.as_fd(), &Message::Ready, &[], &[])?;
    let started = Instant::now();
    loop {
        let received = wire::recv(&conn)?.ok_or_else(closed)?;
        fds_received += received.fds.len() as u64;
        let conn = &conn;
        match received.message {
            Message::Listeners { ingresses, .. } => {
                if received.fds.len() != ingresses.len() + 1 {
                    return Err(refuse(conn, "listener descriptors missing".to_owned()));
                }
                let mut fds = received.fds.into_iter();
                api = fds.next().map(std::net::TcpListener::from);
                for fd in fds {
                    listeners.push(BoundListener::inherited(std::net::TcpListener::from(fd))?);
                }
            }
            Message::Flows { flows } => {
                if received.fds.len() != 2 * flows.len() {
                    return Err(refuse(conn, "flow descriptors missing".to_owned()));
                }
                let mut fds = received.fds.into_iter();
                let mut tail = received.tail.as_slice();
                for entry in flows {
                    let mut take = |n: u32| -> Result<Vec<u8>, TakeoverError> {
                        let n = n as usize;
                        if tail.len() < n {
                            return Err(refuse(conn, "relay bytes missing".to_owned()));
                        }
                        let (head, rest) = tail.split_at(n);
                        tail = rest;
                        Ok(head.to_vec())
                    };
                    let pending = [take(entry.pending[0])?, take(entry.pending[1])?];
                    let (Some(client), Some(backend)) = (fds.next(), fds.next()) else {
                        return Err(refuse(conn, "flow descriptors missing".to_owned()));
                    };
                    adopted.push((
                        ExportedFlow {
                            state: entry.state,
                            socks: [client, backend],
                            pending,
                        },
                        entry.ingress,
                    ));
                }
            }
            Message::End { flows, fds } => {
                let got = adopted.len() as u64;
                if flows != got || fds != fds_received || api.is_none() {
                    return Err(refuse(
                        conn,
                        format!(
                            "received {got} flows and {fds_received} descriptors of {flows} and {fds}"
                        ),
                    ));
                }
                wire::send(
                    conn.as_fd(),
                    &Message::Ack {
                        flows,
                        fds: fds_received,
                    },
                    &[],
                    &[],
                )?;
                break;
            }
            Message::Refuse { reason } => return Err(TakeoverError::Refused(reason)),
            other => return Err(refuse(conn, format!("unexpected {other:?}"))),
        }
    }
    let Some(api) = api else {
        return Err(refuse(&conn, "no api socket".to_owned()));
    };
    let inherited = Inherited {
        conn,
        old_pid,
        started,
        api: Some(api),
        listeners,
        maps,
        program_version,
        program,
        flows: adopted,
    };
    info!(
        flows = inherited.flows.len(),
        listeners = inherited.listeners.len(),
        descriptors = fds_received,
        took_ms = started.elapsed().as_secs_f64() * 1e3,
        "takeover received"
    );
    test_hook();
    Ok(inherited)
}

/// The test-only hook (see [`TEST_HOOK_ENV`]).
fn test_hook() {
    let Ok(hook) = std::env::var(TEST_HOOK_ENV) else {
        return;
    };
    if let Some(ms) = hook
        .strip_prefix("exit-after-ack:")
        .and_then(|ms| ms.parse::<u64>().ok())
    {
        eprintln!("ingressd: takeover test hook: exiting after the acknowledgement");
        std::thread::sleep(Duration::from_millis(ms));
        std::process::exit(3);
    }
}
