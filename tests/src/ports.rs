//! Addresses for test servers: loopback IPs, and ports for servers that cannot bind port 0 and
//! report what they got (postgres, redis, sshd, the daemon's ingress listeners).
//!
//! Binding port 0, dropping the socket and handing the number on is racy: another test can take
//! the port in between. A [`PortLease`] instead holds an exclusive `flock` on
//! `$TMPDIR/ingress-tests-ports/<port>.lock` for as long as it lives, so concurrent tests (in this
//! process or another) never pick the same port; the lock dies with the process, so a crash leaves
//! nothing stale. Ports come from below the kernel's ephemeral range, where outgoing connections
//! never take them.
use std::{
    fs::{self, File, OpenOptions, TryLockError},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use rand::Rng as _;

use crate::error::{Error, IoContext as _, Result};

/// The lowest port leased.
const FIRST_PORT: u16 = 20_000;

/// A port reserved for one test; released when dropped.
#[derive(Debug)]
pub struct PortLease {
    port: u16,
    _lock: File,
}

impl PortLease {
    /// A port that is free on every address (TCP and UDP, IPv4 and IPv6) and leased to no one
    /// else.
    pub fn new() -> Result<Self> {
        let dir = lock_dir("ingress-tests-ports")?;
        let end = ephemeral_start().unwrap_or(32_768).max(FIRST_PORT + 1_000);
        let span = u32::from(end - FIRST_PORT);
        let offset = rand::rng().random_range(0..span);
        for i in 0..span {
            let port = FIRST_PORT + u16::try_from((offset + i) % span).unwrap_or(0);
            let Some(lock) = try_lock(&dir, &port.to_string())? else {
                continue;
            };
            if is_free(port) {
                return Ok(Self { port, _lock: lock });
            }
        }
        Err(Error::Process {
            what: "leasing a port".to_owned(),
            detail: format!("no free port in {FIRST_PORT}..{end}"),
        })
    }

    /// The port number.
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// Whether nothing listens on or is bound to `port` (TCP and UDP, any address). An address
/// family the host lacks counts as free.
fn is_free(port: u16) -> bool {
    let addrs = [
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
    ];
    addrs.iter().all(|addr| {
        let tcp = match TcpListener::bind(addr) {
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::AddrNotAvailable,
        };
        let udp = match UdpSocket::bind(addr) {
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::AddrNotAvailable,
        };
        tcp && udp
    })
}

/// The first port of the kernel's ephemeral range.
fn ephemeral_start() -> Option<u16> {
    let range = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

/// `$TMPDIR/<name>`, created world-writable (sticky) so root and non-root test runs share it.
pub(crate) fn lock_dir(name: &str) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = std::env::temp_dir().join(name);
    if !dir.exists() {
        fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        // Best effort: another user may own it already.
        let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777));
    }
    Ok(dir)
}

/// An exclusive lock on `<dir>/<key>.lock`, or `None` when someone else holds it.
pub(crate) fn try_lock(dir: &std::path::Path, key: &str) -> Result<Option<File>> {
    let path = dir.join(format!("{key}.lock"));
    let file = match OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
    {
        Ok(file) => file,
        // Left by another user and not writable by us: treat as taken.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return Ok(None),
        Err(e) => return Err(e).ctx(|| format!("opening {}", path.display())),
    };
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(e)) => Err(e).ctx(|| format!("locking {}", path.display())),
    }
}

/// A loopback address `127.0.0.<n>` for an instance; every address in 127.0.0.0/8 reaches this
/// host without configuration.
pub fn loopback(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, n)
}

/// A fresh loopback address in 127.0.1.1–127.0.254.254 on each call (cycling), so tests in one
/// process that run side by side give their instances distinct addresses. Ports, not addresses,
/// keep servers apart; distinct addresses make routing mistakes visible.
pub fn next_loopback() -> Ipv4Addr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) % (254 * 254);
    let (hi, lo) = (n / 254 + 1, n % 254 + 1);
    Ipv4Addr::new(
        127,
        0,
        u8::try_from(hi).unwrap_or(1),
        u8::try_from(lo).unwrap_or(1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_exclusive_while_held() {
        let a = PortLease::new().unwrap();
        let b = PortLease::new().unwrap();
        assert_ne!(a.port(), b.port());
        let dir = lock_dir("ingress-tests-ports").unwrap();
        assert!(try_lock(&dir, &a.port().to_string()).unwrap().is_none());
        let port = a.port();
        drop(a);
        assert!(try_lock(&dir, &port.to_string()).unwrap().is_some());
    }

    #[test]
    fn next_loopback_stays_in_127_and_never_uses_0_or_255() {
        for _ in 0..70_000 {
            let ip = next_loopback();
            let [a, _, c, d] = ip.octets();
            assert_eq!(a, 127);
            assert!((1..=254).contains(&c) && (1..=254).contains(&d), "{ip}");
        }
    }
}
