//! `SOCK_SEQPACKET` Unix sockets that carry descriptors (`SCM_RIGHTS`), for the takeover
//! control socket.
//!
//! A message carries at most [`MAX_FDS_PER_MESSAGE`] descriptors (the kernel's `SCM_MAX_FD`
//! is 253). The receive buffer for control data is sized for that many, and a truncated
//! control message (`MSG_CTRUNC`: the kernel closed the descriptors that did not fit) or a
//! truncated payload (`MSG_TRUNC`) is an error, never a silent loss.

use std::{
    io::{self, IoSlice, IoSliceMut},
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
    time::Duration,
};

use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};

/// Most descriptors one message carries (the kernel's `SCM_MAX_FD`).
pub const MAX_FDS_PER_MESSAGE: usize = 253;

fn nix_err(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn seqpacket() -> io::Result<OwnedFd> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(nix_err)
}

/// Binds and listens on a `SOCK_SEQPACKET` socket at `path` (mode 0600), replacing a stale
/// socket file left there.
pub fn seqpacket_listen(path: &Path) -> io::Result<OwnedFd> {
    let fd = seqpacket()?;
    let addr = UnixAddr::new(path).map_err(nix_err)?;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    socket::bind(fd.as_raw_fd(), &addr).map_err(nix_err)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    socket::listen(&fd, Backlog::new(4).map_err(nix_err)?).map_err(nix_err)?;
    Ok(fd)
}

/// Accepts one connection (blocking).
pub fn seqpacket_accept(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    loop {
        match socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            // SAFETY: `accept4` returned a new descriptor that nothing else owns.
            Ok(fd) => return Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(nix_err(e)),
        }
    }
}

/// Connects to the `SOCK_SEQPACKET` socket at `path`.
pub fn seqpacket_connect(path: &Path) -> io::Result<OwnedFd> {
    let fd = seqpacket()?;
    let addr = UnixAddr::new(path).map_err(nix_err)?;
    socket::connect(fd.as_raw_fd(), &addr).map_err(nix_err)?;
    Ok(fd)
}

/// Sets the receive timeout of a socket (`None`: block).
pub fn set_recv_timeout(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<()> {
    socket2::SockRef::from(&fd).set_read_timeout(timeout)
}

/// Sends one message with `fds` attached (at most [`MAX_FDS_PER_MESSAGE`]).
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many descriptors for one message",
        ));
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    let iov = [IoSlice::new(payload)];
    loop {
        match socket::sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) if n == payload.len() => return Ok(()),
            Ok(_) => return Err(io::Error::other("short write on a seqpacket socket")),
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(nix_err(e)),
        }
    }
}

/// Receives one message of at most `max_bytes` and its descriptors. `Ok(None)` when the peer
/// closed the connection.
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    max_bytes: usize,
) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; max_bytes];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS_PER_MESSAGE]);
    loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let received = socket::recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        );
        let msg = match received {
            Ok(msg) => msg,
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(nix_err(e)),
        };
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs().map_err(nix_err)? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: the kernel installed these descriptors in this process for this
                // message; nothing else owns them.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(io::Error::other("descriptors lost: control data truncated"));
        }
        if msg.flags.contains(MsgFlags::MSG_TRUNC) {
            return Err(io::Error::other("message truncated"));
        }
        let n = msg.bytes;
        if n == 0 && fds.is_empty() {
            return Ok(None);
        }
        buf.truncate(n);
        return Ok(Some((buf, fds)));
    }
}

/// Grows this process's descriptor table to hold at least `count` descriptors (capped below
/// the soft `RLIMIT_NOFILE`), by duplicating standard input to the highest number and closing
/// it again. The table never shrinks; growing it while other threads run is slow (the kernel
/// waits for them to leave the old table), so call this before they start.
pub fn reserve_fds(count: usize) -> io::Result<()> {
    let (soft, _) = super::nofile_limit()?;
    let highest = u64::try_from(count)
        .unwrap_or(u64::MAX)
        .min(soft.saturating_sub(1));
    let highest = libc::c_int::try_from(highest).unwrap_or(libc::c_int::MAX);
    if highest < 3 {
        return Ok(());
    }
    // SAFETY: `fcntl(F_DUPFD)` only creates a new descriptor (>= `highest`) for an open one;
    // it touches no memory of ours.
    let fd = super::cvt(unsafe { libc::fcntl(0, libc::F_DUPFD_CLOEXEC, highest) })?;
    // SAFETY: `fd` was just created above and nothing else refers to it.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(())
}
