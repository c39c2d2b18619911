//! Moves a kTLS flow's plaintext with `splice(2)`: client socket → pipe → backend, and
//! backend → pipe → client socket, one non-blocking pipe per direction, driven by tokio's
//! readiness on the two sockets. The bytes stay in the kernel (the pipe holds page
//! references); userspace only learns how many moved.
//!
//! Records that are not application data stop `splice` (`EINVAL`; Linux 6.1, 6.12 and 6.17) and are
//! read with `recvmsg` and their `TLS_GET_RECORD_TYPE`:
//! - `close_notify` ends the client's direction: the backend gets a FIN once everything
//!   before it is delivered.
//! - a TLS 1.3 `KeyUpdate`: rustls's key schedule (the session's [`KernelConnection`])
//!   derives the client's next keys and they go in with a second `TLS_RX` (Linux 6.14+: the
//!   kernel stops decrypting at a `KeyUpdate` until new keys come). When the client asked for
//!   ours too (`update_requested`), a `KeyUpdate` record goes out under the old keys and the
//!   next keys follow at once with a second `TLS_TX`, in one step that the other direction
//!   cannot interleave with (both directions run in one task). The daemon updates its own keys
//!   the same way after half the suite's usage limit of records (the kernel counts none).
//!   Each is counted in `ingressd_tls_key_updates_total`. Kernels before 6.14 refuse a second key (`EBUSY`) and
//!   the `tls` layer cannot be removed, so there the flow ends: what came before it is
//!   delivered, the backend gets a FIN, the client a `close_notify` and a FIN, and the end is
//!   counted as `tls_key_update`. Nothing read after it is ever passed on.
//! - any other alert or handshake message is the client's error: the backend is reset.
//!
//! The backend's FIN becomes a `close_notify` alert (`TLS_SET_RECORD_TYPE` 21) and a FIN to
//! the client once everything before it is delivered. A reset or error on one side resets the
//! other, as the rustls relay does.

use std::{
    io,
    os::fd::{AsFd as _, OwnedFd},
    sync::{
        Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncWriteExt as _, Interest},
    net::TcpStream,
};

use rustls::{kernel::KernelConnection, server::ServerConnectionData};
use tracing::{debug, info};

use super::{CryptoInfo, Version, handshake::Installed};
use crate::{
    proxy::terminate::{IdleClock, Sides, idle_ticker},
    splice::FlowEnd,
    sys::{self, TlsDirection},
};

/// Pipe size asked for per direction by a daemon that may exceed the per-user pipe limit.
const PIPE_BYTES: usize = 1 << 20;

/// The pipe size to ask for, decided once. Without `CAP_SYS_RESOURCE` (the systemd unit's
/// dynamic user) the kernel charges pipe pages to the user: past `fs.pipe-user-pages-soft`
/// (16,384 pages by default) it refuses to grow pipes and makes new ones 2 pages. 1 MiB pipes
/// would reach that after 32 flows and leave every later flow 8 KiB pipes; the default 64 KiB
/// serves 512 flows at full size first.
fn pipe_bytes() -> Option<usize> {
    static SIZE: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *SIZE.get_or_init(|| {
        if sys::may_exceed_pipe_limits() {
            info!(bytes = PIPE_BYTES, "kernel tls relay pipes grown");
            Some(PIPE_BYTES)
        } else {
            info!(
                "kernel tls relay pipes kept at the kernel's default (no CAP_SYS_RESOURCE: \
                 grown pipes would exhaust fs.pipe-user-pages-soft)"
            );
            None
        }
    })
}

/// Plaintext bytes a TLS record holds at most.
const MAX_RECORD_PLAINTEXT: u64 = 1 << 14;

/// Room for one record read with `recvmsg`: 2^14 plaintext bytes and some slack.
const RECORD_BUFFER_BYTES: usize = (1 << 14) + 256;

/// TLS record content types (RFC 8446 §5.1).
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;
/// Handshake message type of a `KeyUpdate` (RFC 8446 §4).
const KEY_UPDATE: u8 = 24;
/// A warning-level `close_notify` alert.
const CLOSE_NOTIFY: [u8; 2] = [1, 0];
/// Our `KeyUpdate`: type, 24-bit length 1, `update_not_requested` (RFC 8446 §4.6.3).
const KEY_UPDATE_NOT_REQUESTED: [u8; 5] = [KEY_UPDATE, 0, 0, 1, 0];
/// `KeyUpdate`s a client may send with no application data between them; more is a flood
/// (each costs a key derivation and two system calls), and ends the flow.
const MAX_KEY_UPDATES_IN_A_ROW: u32 = 32;

/// Whether a `KeyUpdate` message asks for ours too, if it is exactly one well-formed message.
fn key_update_requested(message: &[u8]) -> Option<bool> {
    match message {
        [KEY_UPDATE, 0, 0, 1, 0] => Some(false),
        [KEY_UPDATE, 0, 0, 1, 1] => Some(true),
        _ => None,
    }
}

/// The session's key schedule, shared by both directions (one task drives both, so the lock
/// is never contended; it is never held across an `await`).
struct Keys {
    schedule: KernelConnection<ServerConnectionData>,
    version: Version,
}

fn lock(keys: &Mutex<Keys>) -> MutexGuard<'_, Keys> {
    keys.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why new keys did not go in.
enum Rekey {
    /// The kernel takes one key per direction (before Linux 6.14: `EBUSY`).
    Unsupported,
    /// The client must not send this `KeyUpdate`: outside TLS 1.3, or one of a flood.
    Refused(io::Error),
    /// The kernel failed to take keys it takes.
    Failed(io::Error),
}

impl From<Rekey> for Failed {
    fn from(r: Rekey) -> Self {
        match r {
            Rekey::Refused(e) => Self::Read(e),
            Rekey::Failed(e) => Self::Rekey(e),
            // Only a first new key can meet a kernel that takes none.
            Rekey::Unsupported => Self::Rekey(io::Error::other("the kernel takes no new keys")),
        }
    }
}

impl Keys {
    /// The next keys of one direction, from rustls's key schedule.
    fn next(&mut self, direction: TlsDirection) -> Result<CryptoInfo, Rekey> {
        let next = match direction {
            TlsDirection::Receive => self.schedule.update_rx_secret(),
            TlsDirection::Transmit => self.schedule.update_tx_secret(),
        };
        let (seq, secrets) = next.map_err(|e| {
            Rekey::Refused(io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
        })?;
        CryptoInfo::from_secrets(self.version, &secrets, seq)
            .map_err(|e| Rekey::Failed(io::Error::other(e.to_string())))
    }

    /// Takes the client's `KeyUpdate` (the record just read): its next keys go into the
    /// kernel's receive side.
    fn receive(&mut self, client: &TcpStream) -> Result<(), Rekey> {
        let info = self.next(TlsDirection::Receive)?;
        sys::set_tls_crypto_info(client.as_fd(), TlsDirection::Receive, info.as_bytes()).map_err(
            |e| match e.raw_os_error() {
                Some(libc::EBUSY) => Rekey::Unsupported,
                _ => Rekey::Failed(e),
            },
        )
    }
}

/// Updates the daemon's own keys: a `KeyUpdate` record under the old keys, then the next keys
/// on the kernel's transmit side, both in one synchronous step of the task that drives both
/// directions, so no record goes out between the two. The next keys are derived only once the
/// record is out (a `WouldBlock` before it retries the whole step).
async fn update_own_keys(client: &TcpStream, keys: &Mutex<Keys>) -> Result<(), Failed> {
    client
        .async_io(Interest::WRITABLE, || {
            let sent = sys::send_tls_record(client.as_fd(), HANDSHAKE, &KEY_UPDATE_NOT_REQUESTED)?;
            if sent != KEY_UPDATE_NOT_REQUESTED.len() {
                return Err(io::Error::other("KeyUpdate record sent in part"));
            }
            // Never `WouldBlock` from here on: a retry would send the record twice.
            let info = lock(keys)
                .next(TlsDirection::Transmit)
                .map_err(|e| match e {
                    Rekey::Refused(e) | Rekey::Failed(e) => io::Error::other(e.to_string()),
                    Rekey::Unsupported => io::Error::other("no new transmit keys"),
                })?;
            sys::set_tls_crypto_info(client.as_fd(), TlsDirection::Transmit, info.as_bytes())
                .map_err(|e| io::Error::other(format!("new transmit keys: {e}")))
        })
        .await
        .map_err(Failed::Rekey)
}

struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    capacity: usize,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (r, w, capacity) = sys::pipe(pipe_bytes())?;
        Ok(Self {
            r,
            w,
            capacity: capacity.max(4096),
        })
    }
}

/// How one direction stopped without an error.
enum Stopped {
    /// End of stream (FIN or `close_notify`), passed on.
    Ended,
    /// The client sent a `KeyUpdate`; nothing after it was read.
    KeyUpdate,
}

/// Which side of a direction failed.
enum Failed {
    /// Reading the source failed (or it sent something it must not).
    Read(io::Error),
    /// Writing the destination failed.
    Write(io::Error),
    /// New keys after a `KeyUpdate` could not go in.
    Rekey(io::Error),
}

/// Relays an installed kTLS flow until both directions end; returns how it ended.
pub async fn relay(
    installed: Installed,
    mut backend: TcpStream,
    sides: &Sides<'_>,
    idle_timeout: Option<Duration>,
) -> FlowEnd {
    let Installed {
        sock: client,
        early,
        params: (version, _),
        keys,
        records_per_key,
    } = installed;
    let keys = Mutex::new(Keys {
        schedule: keys,
        version,
    });
    if !early.is_empty() {
        // Plaintext rustls decrypted before the keys moved: it goes first.
        if backend.write_all(&early).await.is_err() {
            reset(&client);
            return FlowEnd::BackendReset;
        }
        sides.count(0, early.len() as u64);
    }
    let (Ok(up_pipe), Ok(down_pipe)) = (Pipe::new(), Pipe::new()) else {
        reset(&client);
        reset(&backend);
        return FlowEnd::KernelError;
    };
    let up = client_to_backend(&client, &backend, &up_pipe, sides, &keys);
    let down = backend_to_client(&backend, &client, &down_pipe, sides, &keys, records_per_key);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    let mut ticker = idle_ticker(idle_timeout);
    let total = || sides.live.flow.bytes().iter().sum::<u64>();
    let mut idle = IdleClock::new(total());
    while !up_done || !down_done {
        tokio::select! {
            Some(_) = async { Some(ticker.as_mut()?.tick().await) }, if ticker.is_some() => {
                if idle.expired(total(), idle_timeout) {
                    return FlowEnd::IdleTimeout;
                }
            }
            r = &mut up, if !up_done => match r {
                Ok(Stopped::Ended) => up_done = true,
                Ok(Stopped::KeyUpdate) => {
                    // Everything before the KeyUpdate is in the backend's socket: FIN it, and
                    // close the client's TLS stream with the keys it still expects from us.
                    let _ = sys::shutdown_write(backend.as_fd());
                    let _ = close_notify(&client).await;
                    return FlowEnd::TlsKeyUpdate;
                }
                Err(Failed::Read(e)) => {
                    debug!(error = %e, "reading the kernel tls socket failed");
                    reset(&backend);
                    return client_read_end(&e);
                }
                Err(Failed::Write(e)) => {
                    debug!(error = %e, "writing the backend failed");
                    reset(&client);
                    return FlowEnd::BackendReset;
                }
                Err(Failed::Rekey(e)) => {
                    info!(error = %e, "new kernel tls keys after a KeyUpdate failed");
                    reset(&client);
                    reset(&backend);
                    return FlowEnd::KernelError;
                }
            },
            r = &mut down, if !down_done => match r {
                Ok(_) => down_done = true,
                Err(Failed::Read(e)) => {
                    debug!(error = %e, "reading the backend failed");
                    reset(&client);
                    return FlowEnd::BackendReset;
                }
                // This direction never rekeys: `client_to_backend` answers KeyUpdates.
                Err(Failed::Write(e) | Failed::Rekey(e)) => {
                    debug!(error = %e, "writing the kernel tls socket failed");
                    reset(&backend);
                    return FlowEnd::ClientReset;
                }
            },
        }
    }
    FlowEnd::Closed
}

/// A failed read of the client: a reset, or a record the kernel could not authenticate (or
/// one the client must not send).
fn client_read_end(err: &io::Error) -> FlowEnd {
    match err.raw_os_error() {
        Some(libc::ECONNRESET | libc::EPIPE) => FlowEnd::ClientReset,
        Some(libc::ETIMEDOUT) => FlowEnd::ClientTimeout,
        _ => FlowEnd::ClientError,
    }
}

fn reset(sock: &TcpStream) {
    let _ = sys::set_reset_on_close(sock.as_fd());
}

/// Client (kTLS receive) → backend.
async fn client_to_backend(
    client: &TcpStream,
    backend: &TcpStream,
    pipe: &Pipe,
    sides: &Sides<'_>,
    keys: &Mutex<Keys>,
) -> Result<Stopped, Failed> {
    let mut record: Vec<u8> = Vec::new();
    // `KeyUpdate`s since the client last sent application data.
    let mut in_a_row = 0u32;
    loop {
        let filled = client
            .async_io(Interest::READABLE, || {
                sys::splice(client.as_fd(), pipe.w.as_fd(), pipe.capacity)
            })
            .await;
        match filled {
            Ok(0) => {
                // FIN without close_notify: the client's stream ended all the same.
                sys::shutdown_write(backend.as_fd()).map_err(Failed::Write)?;
                return Ok(Stopped::Ended);
            }
            Ok(n) => {
                in_a_row = 0;
                drain(pipe, n, backend, |n| sides.count_kernel(0, n))
                    .await
                    .map_err(Failed::Write)?;
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EIO)) => {
                // Not application data next: read that one record.
                if record.is_empty() {
                    record.resize(RECORD_BUFFER_BYTES, 0);
                }
                let (kind, n) = client
                    .async_io(Interest::READABLE, || {
                        sys::recv_tls_record(client.as_fd(), &mut record)
                    })
                    .await
                    .map_err(Failed::Read)?;
                let body = record.get(..n).unwrap_or_default();
                match (kind, body) {
                    (_, []) if n == 0 => {
                        sys::shutdown_write(backend.as_fd()).map_err(Failed::Write)?;
                        return Ok(Stopped::Ended);
                    }
                    (ALERT, b) if b == CLOSE_NOTIFY || b.get(1) == Some(&0) => {
                        sys::shutdown_write(backend.as_fd()).map_err(Failed::Write)?;
                        return Ok(Stopped::Ended);
                    }
                    (HANDSHAKE, message @ [KEY_UPDATE, ..]) => {
                        let requested = key_update_requested(message).ok_or_else(|| {
                            Failed::Read(io::Error::new(
                                io::ErrorKind::InvalidData,
                                "malformed KeyUpdate",
                            ))
                        })?;
                        in_a_row += 1;
                        if in_a_row > MAX_KEY_UPDATES_IN_A_ROW {
                            return Err(Failed::Read(io::Error::new(
                                io::ErrorKind::InvalidData,
                                "a flood of KeyUpdates with no data between them",
                            )));
                        }
                        let taken = lock(keys).receive(client);
                        match taken {
                            Ok(()) => sides.counters.on_key_update(0),
                            Err(Rekey::Unsupported) => return Ok(Stopped::KeyUpdate),
                            Err(other) => return Err(other.into()),
                        }
                        if requested {
                            // The kernel took the client's new keys just before: it takes ours.
                            update_own_keys(client, keys).await?;
                            sides.counters.on_key_update(1);
                        }
                        debug!(requested, "kernel tls keys updated");
                    }
                    (APPLICATION_DATA, data) => {
                        in_a_row = 0;
                        // The kernel handed data to recvmsg after all: pass it on (counted as
                        // relayed, since it crossed userspace).
                        write_all(backend, data).await.map_err(Failed::Write)?;
                        sides.count(0, data.len() as u64);
                    }
                    _ => {
                        return Err(Failed::Read(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("tls record of type {kind} after the handshake"),
                        )));
                    }
                }
            }
            Err(e) => return Err(Failed::Read(e)),
        }
    }
}

/// Backend → client (kTLS transmit). With `records_per_key`, the daemon updates its own keys
/// each time it has sent about that many records under one key (at most 2^14 bytes each; a
/// splice into a kTLS socket closes its last record, so a call of `n` bytes makes
/// ⌈n / 2^14⌉).
async fn backend_to_client(
    backend: &TcpStream,
    client: &TcpStream,
    pipe: &Pipe,
    sides: &Sides<'_>,
    keys: &Mutex<Keys>,
    records_per_key: Option<u64>,
) -> Result<Stopped, Failed> {
    let records = AtomicU64::new(0);
    loop {
        let n = backend
            .async_io(Interest::READABLE, || {
                sys::splice(backend.as_fd(), pipe.w.as_fd(), pipe.capacity)
            })
            .await
            .map_err(Failed::Read)?;
        if n == 0 {
            close_notify(client).await.map_err(Failed::Write)?;
            return Ok(Stopped::Ended);
        }
        drain(pipe, n, client, |n| {
            sides.count_kernel(1, n);
            // Counted only where the daemon will act on the count.
            if records_per_key.is_some() {
                records.fetch_add(n.div_ceil(MAX_RECORD_PLAINTEXT), Ordering::Relaxed);
            }
        })
        .await
        .map_err(Failed::Write)?;
        if records_per_key.is_some_and(|limit| records.load(Ordering::Relaxed) >= limit) {
            update_own_keys(client, keys).await?;
            records.store(0, Ordering::Relaxed);
            sides.counters.on_key_update(1);
        }
    }
}

/// Splices the `n` bytes in `pipe` into `to`, counting as they go.
async fn drain(pipe: &Pipe, mut n: usize, to: &TcpStream, count: impl Fn(u64)) -> io::Result<()> {
    while n > 0 {
        let moved = to
            .async_io(Interest::WRITABLE, || {
                sys::splice(pipe.r.as_fd(), to.as_fd(), n)
            })
            .await?;
        if moved == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        n = n.saturating_sub(moved);
        count(moved as u64);
    }
    Ok(())
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let n = to
            .async_io(Interest::WRITABLE, || {
                sys::send_nonblocking(to.as_fd(), data)
            })
            .await?;
        data = data.get(n..).unwrap_or_default();
    }
    Ok(())
}

/// Sends a `close_notify` alert through the kernel's TLS, then a FIN.
async fn close_notify(client: &TcpStream) -> io::Result<()> {
    client
        .async_io(Interest::WRITABLE, || {
            sys::send_tls_record(client.as_fd(), ALERT, &CLOSE_NOTIFY)
        })
        .await?;
    sys::shutdown_write(client.as_fd())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_whole_key_update_message_is_taken() {
        assert_eq!(key_update_requested(&[KEY_UPDATE, 0, 0, 1, 0]), Some(false));
        assert_eq!(key_update_requested(&[KEY_UPDATE, 0, 0, 1, 1]), Some(true));
        // An unknown request value, a wrong length, a truncated or a trailing message.
        assert_eq!(key_update_requested(&[KEY_UPDATE, 0, 0, 1, 2]), None);
        assert_eq!(key_update_requested(&[KEY_UPDATE, 0, 0, 2, 0, 0]), None);
        assert_eq!(key_update_requested(&[KEY_UPDATE, 0, 0, 1]), None);
        assert_eq!(
            key_update_requested(&[KEY_UPDATE, 0, 0, 1, 0, KEY_UPDATE, 0, 0, 1, 0]),
            None
        );
    }
}
