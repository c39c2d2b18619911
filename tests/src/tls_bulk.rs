//! A checksummed bulk exchange through TLS: a rustls client drives the [`bulk`](crate::bulk)
//! protocol (header, then both streams at once) over a terminated ingress to a plain
//! [`BulkServer`](crate::bulk::BulkServer). Optionally the client updates its traffic keys
//! (a TLS 1.3 `KeyUpdate`) after a given number of stream bytes.
//!
//! One thread writes and one reads; they share the rustls session under a lock that is never
//! held across socket I/O.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{Arc, Mutex, PoisonError},
    thread,
    time::{Duration, Instant},
};

use rustls::{ClientConfig, ClientConnection};

use crate::{
    bulk::BulkSpec,
    error::{Error, IoContext as _, Result},
    pattern::{Digest, Source, Verified, Verifier},
    tls::tls_connect,
};

const CHUNK_BYTES: usize = 64 * 1024;

/// The client's view of a TLS bulk exchange.
#[derive(Clone, Debug)]
pub struct TlsSideReport {
    /// Stream bytes written into the TLS session (after the header).
    pub sent: u64,
    /// SHA-256 of them.
    pub sent_sha256: Digest,
    /// What came back, verified against the down stream.
    pub received: Verified,
    /// Whether the server ended its stream with `close_notify`.
    pub close_notify: bool,
    /// Whether a `KeyUpdate` was sent, after how many stream bytes.
    pub key_update_at: Option<u64>,
    /// First write error, if any.
    pub write_error: Option<String>,
    /// First read or TLS error, if any.
    pub read_error: Option<String>,
    /// Handshake to the end of both directions.
    pub elapsed: Duration,
}

/// Connects through TLS with `config` (SNI `sni`) and runs `spec`; with `key_update_after`,
/// sends a `KeyUpdate` once that many stream bytes are written (and keeps writing).
pub fn tls_exchange(
    addr: SocketAddr,
    sni: &str,
    config: Arc<ClientConfig>,
    spec: &BulkSpec,
    key_update_after: Option<u64>,
) -> Result<TlsSideReport> {
    let started = Instant::now();
    let stream = tls_connect(addr, sni, config)?;
    let sock = stream.sock;
    sock.set_read_timeout(Some(spec.idle_timeout))
        .ctx(|| "setting a read timeout".to_owned())?;
    sock.set_write_timeout(Some(spec.idle_timeout))
        .ctx(|| "setting a write timeout".to_owned())?;
    let conn = Arc::new(Mutex::new(stream.conn));
    let writer = sock.try_clone().ctx(|| "cloning the socket".to_owned())?;
    let head = spec.header();
    let (up_seed, up_bytes) = (spec.up_seed, spec.up_bytes);
    let send_conn = conn.clone();
    let sender = thread::Builder::new()
        .name("tls-bulk-send".to_owned())
        .spawn(move || {
            send(
                writer,
                &send_conn,
                &head,
                up_seed,
                up_bytes,
                key_update_after,
            )
        })
        .ctx(|| "spawning the sender thread".to_owned())?;
    let (received, close_notify, read_error) =
        receive(&sock, &conn, Verifier::new(spec.down_seed, spec.down_bytes));
    let sent = sender.join().map_err(|_| Error::Process {
        what: "tls bulk sender thread".to_owned(),
        detail: "panicked".to_owned(),
    })?;
    Ok(TlsSideReport {
        sent: sent.written,
        sent_sha256: sent.digest,
        received,
        close_notify,
        key_update_at: sent.key_update_at,
        write_error: sent.error,
        read_error,
        elapsed: started.elapsed(),
    })
}

struct Sent {
    written: u64,
    digest: Digest,
    key_update_at: Option<u64>,
    error: Option<String>,
}

fn lock(conn: &Mutex<ClientConnection>) -> std::sync::MutexGuard<'_, ClientConnection> {
    conn.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Encrypts `plain` (all of it) and writes the records; the lock is released before the
/// socket write.
fn write_plain(
    sock: &mut TcpStream,
    conn: &Mutex<ClientConnection>,
    mut plain: &[u8],
) -> std::io::Result<()> {
    let mut records = Vec::with_capacity(plain.len() + 1024);
    while !plain.is_empty() {
        {
            let mut c = lock(conn);
            let n = c.writer().write(plain)?;
            plain = &plain[n..];
            while c.wants_write() {
                c.write_tls(&mut records)?;
            }
        }
        sock.write_all(&records)?;
        records.clear();
    }
    Ok(())
}

/// Runs `f` on the session, then writes whatever it queued.
fn with_session(
    sock: &mut TcpStream,
    conn: &Mutex<ClientConnection>,
    f: impl FnOnce(&mut ClientConnection) -> std::result::Result<(), rustls::Error>,
) -> std::io::Result<()> {
    let mut records = Vec::new();
    {
        let mut c = lock(conn);
        f(&mut c).map_err(std::io::Error::other)?;
        while c.wants_write() {
            c.write_tls(&mut records)?;
        }
    }
    sock.write_all(&records)
}

fn send(
    mut sock: TcpStream,
    conn: &Mutex<ClientConnection>,
    head: &[u8],
    seed: u64,
    total: u64,
    key_update_after: Option<u64>,
) -> Sent {
    let mut source = Source::new(seed, total);
    let mut buf = vec![0_u8; CHUNK_BYTES];
    let (mut written, mut key_update_at) = (0_u64, None);
    let mut error = write_plain(&mut sock, conn, head)
        .err()
        .map(|e| format!("writing the header: {e}"));
    while error.is_none() {
        if let Some(after) = key_update_after
            && key_update_at.is_none()
            && written >= after
        {
            match with_session(&mut sock, conn, |c| c.refresh_traffic_keys()) {
                Ok(()) => key_update_at = Some(written),
                Err(e) => {
                    error = Some(format!("sending a key update: {e}"));
                    break;
                }
            }
        }
        // Stop exactly at the key update point so the prefix is known to the byte.
        let room = match key_update_after {
            Some(after) if key_update_at.is_none() => usize::try_from(after - written)
                .unwrap_or(usize::MAX)
                .min(buf.len()),
            _ => buf.len(),
        };
        let chunk = source.next_chunk(&mut buf[..room.max(1)]);
        if chunk.is_empty() {
            break;
        }
        match write_plain(&mut sock, conn, chunk) {
            Ok(()) => written += chunk.len() as u64,
            Err(e) => error = Some(format!("writing at offset {written}: {e}")),
        }
    }
    if error.is_none() {
        let _ = with_session(&mut sock, conn, |c| {
            c.send_close_notify();
            Ok(())
        });
        let _ = sock.shutdown(Shutdown::Write);
    }
    Sent {
        written,
        digest: source.digest(),
        key_update_at,
        error,
    }
}

fn receive(
    mut sock: &TcpStream,
    conn: &Mutex<ClientConnection>,
    mut verifier: Verifier,
) -> (Verified, bool, Option<String>) {
    let mut raw = vec![0_u8; CHUNK_BYTES];
    let mut plain = vec![0_u8; CHUNK_BYTES];
    let mut close_notify = false;
    let error = 'outer: loop {
        let n = match sock.read(&mut raw) {
            Ok(0) => break None,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => break Some(format!("reading: {e}")),
        };
        let mut c = lock(conn);
        let mut rest = &raw[..n];
        while !rest.is_empty() {
            if let Err(e) = c.read_tls(&mut rest) {
                break 'outer Some(format!("tls buffer: {e}"));
            }
            if let Err(e) = c.process_new_packets() {
                break 'outer Some(format!("tls: {e}"));
            }
            loop {
                match c.reader().read(&mut plain) {
                    Ok(0) => {
                        close_notify = true;
                        break;
                    }
                    Ok(m) => verifier.update(&plain[..m]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => break 'outer Some(format!("tls read: {e}")),
                }
            }
        }
        if close_notify {
            break None;
        }
    };
    (verifier.finish(), close_notify, error)
}
