//! Raw socket, epoll and memory-mapping calls: every `unsafe` block of the daemon lives here.
//!
//! Each function takes borrowed file descriptors and returns `io::Result`, so callers never
//! touch raw pointers. Socket options that `socket2` wraps safely are set through it (also from
//! here, so all socket tuning is found in one module).

use std::{
    io,
    mem::{MaybeUninit, size_of},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    ptr::NonNull,
    time::Duration,
};

use socket2::{SockRef, TcpKeepalive};

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    usize::try_from(ret).map_err(|_| io::Error::last_os_error())
}

fn getsockopt<T: Copy>(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int) -> io::Result<T> {
    let mut value = MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is a writable buffer of `len` bytes that outlives the call; the kernel
    // writes at most `len` bytes. `T` is a plain integer type for every caller, so a zeroed or
    // partly written value is valid.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_mut_ptr().cast(),
            &mut len,
        )
    })?;
    // SAFETY: zero-initialised above and `T` is plain data.
    Ok(unsafe { value.assume_init() })
}

fn setsockopt<T: Copy>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: T,
) -> io::Result<()> {
    // SAFETY: `value` is a readable `T` for the duration of the call and its size is passed.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// The socket's cookie (`SO_COOKIE`): a 64-bit ID that is unique for the life of the kernel and
/// is what the eBPF program sees as `bpf_get_socket_cookie`.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    getsockopt::<u64>(fd, libc::SOL_SOCKET, libc::SO_COOKIE)
}

/// The two `TCP_INFO` byte counters the splice engine relies on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpCounters {
    /// `tcpi_bytes_acked`: bytes sent and acknowledged by the peer (an active opener counts its
    /// SYN as one, and a FIN counts as one).
    pub bytes_acked: u64,
    /// `tcpi_bytes_received`: bytes received in order (a FIN counts as one).
    pub bytes_received: u64,
}

/// Offsets of the counters in `struct tcp_info` (stable kernel ABI since 4.1 / 4.2).
const TCPI_BYTES_ACKED: usize = 120;
const TCPI_BYTES_RECEIVED: usize = 128;

/// Reads `bytes_acked` and `bytes_received` from `TCP_INFO`.
pub fn tcp_counters(fd: BorrowedFd<'_>) -> io::Result<TcpCounters> {
    let info = TcpInfo::read(fd)?;
    Ok(TcpCounters {
        bytes_acked: info.u64_at(TCPI_BYTES_ACKED, "bytes_acked")?,
        bytes_received: info.u64_at(TCPI_BYTES_RECEIVED, "bytes_received")?,
    })
}

/// The socket's `struct tcp_info`, as much of it as the kernel wrote.
struct TcpInfo {
    buf: [u8; 256],
    len: usize,
}

impl TcpInfo {
    fn read(fd: BorrowedFd<'_>) -> io::Result<Self> {
        let mut buf = [0u8; 256];
        let mut len = buf.len() as libc::socklen_t;
        // SAFETY: `buf` is writable for `len` bytes; the kernel writes at most `len` bytes and
        // updates `len` with the count.
        cvt(unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                buf.as_mut_ptr().cast(),
                &mut len,
            )
        })?;
        Ok(Self {
            buf,
            len: len as usize,
        })
    }

    fn bytes<const N: usize>(&self, offset: usize, field: &str) -> io::Result<[u8; N]> {
        self.buf
            .get(offset..offset + N)
            .filter(|_| self.len >= offset + N)
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| io::Error::other(format!("kernel tcp_info too short for {field}")))
    }

    fn u64_at(&self, offset: usize, field: &str) -> io::Result<u64> {
        self.bytes(offset, field).map(u64::from_ne_bytes)
    }

    fn u32_at(&self, offset: usize, field: &str) -> io::Result<u32> {
        self.bytes(offset, field).map(u32::from_ne_bytes)
    }
}

fn ioctl_int(fd: BorrowedFd<'_>, request: libc::Ioctl) -> io::Result<u64> {
    let mut value: libc::c_int = 0;
    // SAFETY: both requests write one `int` through the pointer.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), request, &mut value) })?;
    Ok(u64::try_from(value).unwrap_or(0))
}

/// Bytes in the send queue not yet acknowledged (`SIOCOUTQ`).
pub fn outq(fd: BorrowedFd<'_>) -> io::Result<u64> {
    ioctl_int(fd, libc::TIOCOUTQ)
}

/// Bytes readable in the receive queue (`SIOCINQ`). Unreliable once the socket is in a
/// sockhash (0 on 6.12+, still counted on 6.1): only use it before insertion.
pub fn inq(fd: BorrowedFd<'_>) -> io::Result<u64> {
    ioctl_int(fd, libc::FIONREAD)
}

/// Sets `SO_RCVLOWAT`. Setting it (to 1) after a socket entered the sockhash makes the kernel
/// run the verdict over bytes that were queued before the insertion (kernel ≥ 5.x; without it
/// they wait for the next segment).
pub fn set_rcvlowat(fd: BorrowedFd<'_>, bytes: libc::c_int) -> io::Result<()> {
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, bytes)
}

/// The pending socket error (`SO_ERROR`), cleared by reading it.
pub fn take_socket_error(fd: BorrowedFd<'_>) -> io::Result<Option<io::Error>> {
    let errno = getsockopt::<libc::c_int>(fd, libc::SOL_SOCKET, libc::SO_ERROR)?;
    Ok((errno != 0).then(|| io::Error::from_raw_os_error(errno)))
}

/// Makes the next `close` send a RST instead of a FIN (`SO_LINGER {1, 0}`).
pub fn set_reset_on_close(fd: BorrowedFd<'_>) -> io::Result<()> {
    SockRef::from(&fd).set_linger(Some(Duration::ZERO))
}

/// Liveness settings for a spliced socket, whose traffic userspace never sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Liveness {
    /// Idle time before the first keepalive probe.
    pub keepalive_idle: Duration,
    /// Time between keepalive probes.
    pub keepalive_interval: Duration,
    /// Unanswered probes before the connection is dropped.
    pub keepalive_probes: u32,
    /// Longest time sent data may stay unacknowledged (`TCP_USER_TIMEOUT`).
    pub user_timeout: Duration,
}

/// Applies keepalive and `TCP_USER_TIMEOUT` so that a dead peer ends the flow with
/// `ETIMEDOUT` instead of holding two file descriptors forever.
pub fn set_liveness(fd: BorrowedFd<'_>, liveness: &Liveness) -> io::Result<()> {
    let sock = SockRef::from(&fd);
    let keepalive = TcpKeepalive::new()
        .with_time(liveness.keepalive_idle)
        .with_interval(liveness.keepalive_interval)
        .with_retries(liveness.keepalive_probes);
    // Sets `SO_KEEPALIVE` too.
    sock.set_tcp_keepalive(&keepalive)?;
    sock.set_tcp_user_timeout(Some(liveness.user_timeout))
}

/// Sets `TCP_NODELAY`.
pub fn set_nodelay(fd: BorrowedFd<'_>) -> io::Result<()> {
    SockRef::from(&fd).set_tcp_nodelay(true)
}

/// Shuts down the write half (sends a FIN once queued data is out).
pub fn shutdown_write(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a borrowed descriptor.
    cvt(unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) })?;
    Ok(())
}

/// Non-blocking `recv` into `buf`; `Ok(0)` is end of stream.
pub fn recv_nonblocking(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is writable for `buf.len()` bytes for the duration of the call.
    cvt_size(unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    })
}

/// Non-blocking `send` of `buf` without `SIGPIPE`.
pub fn send_nonblocking(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is readable for `buf.len()` bytes for the duration of the call.
    cvt_size(unsafe {
        libc::send(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    })
}

/// An epoll instance.
#[derive(Debug)]
pub struct Epoll {
    fd: OwnedFd,
}

/// Events the splice engine asks epoll for.
pub mod events {
    /// Readable: passed or relayed bytes wait in the receive queue.
    pub const IN: u32 = libc::EPOLLIN as u32;
    /// Writable: a blocked relay may continue.
    pub const OUT: u32 = libc::EPOLLOUT as u32;
    /// The peer shut down its write half (FIN).
    pub const RDHUP: u32 = libc::EPOLLRDHUP as u32;
    /// Both halves closed.
    pub const HUP: u32 = libc::EPOLLHUP as u32;
    /// A pending socket error (RST, timeout).
    pub const ERR: u32 = libc::EPOLLERR as u32;
    /// Edge-triggered.
    pub const ET: u32 = libc::EPOLLET as u32;
}

/// One event returned by [`Epoll::wait`].
#[derive(Clone, Copy, Debug, Default)]
pub struct EpollEvent {
    /// The `events` bitmask (see [`events`]).
    pub events: u32,
    /// The token given at registration.
    pub token: u64,
}

impl Epoll {
    /// Creates an epoll instance (close-on-exec).
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; on success we own the returned descriptor.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: token };
        // SAFETY: `event` is valid for the duration of the call.
        cvt(unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut event) })?;
        Ok(())
    }

    /// Registers `fd`. Readiness that already holds is reported at once (no event is lost).
    pub fn add(&self, fd: BorrowedFd<'_>, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd.as_raw_fd(), events, token)
    }

    /// Changes the events of a registered `fd`.
    pub fn modify(&self, fd: BorrowedFd<'_>, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd.as_raw_fd(), events, token)
    }

    /// Removes `fd` (closing it removes it too).
    pub fn delete(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd.as_raw_fd(), 0, 0)
    }

    /// Collects ready events without blocking; returns how many were written to `out`.
    pub fn wait_now(&self, out: &mut [EpollEvent]) -> io::Result<usize> {
        let mut raw = [libc::epoll_event { events: 0, u64: 0 }; 256];
        let max = out.len().min(raw.len());
        // SAFETY: `raw` holds `max` writable events.
        let n = cvt(unsafe {
            libc::epoll_wait(self.fd.as_raw_fd(), raw.as_mut_ptr(), max as libc::c_int, 0)
        })?;
        let n = usize::try_from(n).unwrap_or(0);
        for (dst, src) in out.iter_mut().zip(raw.iter().take(n)) {
            *dst = EpollEvent {
                events: src.events,
                token: src.u64,
            };
        }
        Ok(n)
    }
}

impl AsFd for Epoll {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Epoll {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A shared, read-write memory mapping of a file (an mmapable BPF array map).
#[derive(Debug)]
pub struct SharedMapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; all accesses through it go through atomics.
unsafe impl Send for SharedMapping {}
// SAFETY: as above.
unsafe impl Sync for SharedMapping {}

impl SharedMapping {
    /// Maps `len` bytes of `fd` from offset 0, shared and writable.
    pub fn new(fd: BorrowedFd<'_>, len: usize) -> io::Result<Self> {
        // SAFETY: a fresh mapping chosen by the kernel; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Self { ptr, len })
    }

    /// Start of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never, once created).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region mapped in `new`; nothing borrows it past `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The address of a connected socket's peer.
pub fn peer_addr(fd: BorrowedFd<'_>) -> io::Result<std::net::SocketAddr> {
    SockRef::from(&fd)
        .peer_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("not an IP socket"))
}

/// Number of open file descriptors of this process (entries of `/proc/self/fd`).
pub fn open_fd_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?
        .count()
        .saturating_sub(1))
}

/// User plus system CPU time this process has used.
pub fn cpu_time() -> io::Result<Duration> {
    // SAFETY: all-zero is a valid `rusage` (plain integers).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid out-pointer for the duration of the call.
    cvt(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) })?;
    let micros = |t: libc::timeval| {
        u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000 + u64::try_from(t.tv_usec).unwrap_or(0)
    };
    Ok(Duration::from_micros(
        micros(usage.ru_utime) + micros(usage.ru_stime),
    ))
}

/// Microseconds on `CLOCK_MONOTONIC`, the clock of [`std::time::Instant`] on Linux, read
/// without `Instant`'s checks: about half the instructions of `Instant::now()`.
#[inline]
pub fn monotonic_micros() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid out-pointer for the duration of the call; `CLOCK_MONOTONIC`
    // always exists on Linux, so the call cannot fail (a zero time would only misdate lines).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000
        + u64::try_from(now.tv_nsec).unwrap_or(0) / 1000
}

/// The soft and hard `RLIMIT_NOFILE`.
pub fn nofile_limit() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid out-pointer.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) })?;
    Ok((limit.rlim_cur, limit.rlim_max))
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let (_, hard) = nofile_limit()?;
    let limit = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: `limit` is a valid in-pointer.
    cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) })?;
    Ok(hard)
}

/// Arguments of the `BPF_MAP_*_ELEM` commands (`union bpf_attr`, stable ABI).
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;

fn bpf_map_elem(
    cmd: libc::c_long,
    map: BorrowedFd<'_>,
    key: &[u8],
    value: u64,
    flags: u64,
) -> io::Result<()> {
    let attr = MapElemAttr {
        map_fd: u32::try_from(map.as_raw_fd()).map_err(|_| io::Error::other("negative map fd"))?,
        _pad: 0,
        key: key.as_ptr() as u64,
        value,
        flags,
    };
    // SAFETY: `attr` is a valid `bpf_attr` prefix for the element commands; `key` (and the
    // value buffer, which callers size to the map's value size) outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &raw const attr,
            size_of::<MapElemAttr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `BPF_MAP_UPDATE_ELEM`: sets `key` to `value` (whose length must be the map's value size).
/// Map updates are safe from any thread, so no lock is needed around them.
pub fn bpf_map_update(map: BorrowedFd<'_>, key: &[u8], value: &[u8], flags: u64) -> io::Result<()> {
    bpf_map_elem(BPF_MAP_UPDATE_ELEM, map, key, value.as_ptr() as u64, flags)
}

/// `BPF_MAP_DELETE_ELEM`.
pub fn bpf_map_delete(map: BorrowedFd<'_>, key: &[u8]) -> io::Result<()> {
    bpf_map_elem(BPF_MAP_DELETE_ELEM, map, key, 0, 0)
}

/// `BPF_MAP_LOOKUP_ELEM` into `value` (sized to the map's value size); `Ok(false)` when absent.
pub fn bpf_map_lookup(map: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
    match bpf_map_elem(BPF_MAP_LOOKUP_ELEM, map, key, value.as_mut_ptr() as u64, 0) {
        Ok(()) => Ok(true),
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(err) => Err(err),
    }
}

impl SharedMapping {
    /// The `AtomicU64` at byte `offset`, or `None` when out of bounds or misaligned.
    pub fn atomic_u64(&self, offset: usize) -> Option<&std::sync::atomic::AtomicU64> {
        if !offset.is_multiple_of(8) || offset.checked_add(8)? > self.len {
            return None;
        }
        // SAFETY: in bounds and 8-byte aligned (the mapping is page-aligned); the memory is
        // shared with the kernel, which only ever accesses these words as whole `u64`s, so
        // treating them as atomics is sound. The reference lives no longer than `self`.
        Some(unsafe {
            &*self
                .ptr
                .as_ptr()
                .add(offset)
                .cast::<std::sync::atomic::AtomicU64>()
        })
    }
}

/// `BPF_FS_MAGIC`, the `f_type` of a bpffs mount.
const BPF_FS_MAGIC: libc::c_long = 0xcafe_4a11;

/// Whether `path` is on a bpffs (where eBPF objects can be pinned).
pub fn is_bpffs(path: &std::path::Path) -> io::Result<bool> {
    use std::os::unix::ffi::OsStrExt as _;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut stat = MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c_path` is a NUL-terminated string and `stat` a writable `statfs`; both outlive
    // the call.
    cvt(unsafe { libc::statfs(c_path.as_ptr(), stat.as_mut_ptr()) })?;
    // SAFETY: `statfs` succeeded and filled the struct (and it was zeroed before).
    let stat = unsafe { stat.assume_init() };
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type's width differs between targets"
    )]
    Ok(stat.f_type as libc::c_long == BPF_FS_MAGIC)
}

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// `BPF_MAP_GET_NEXT_KEY` for maps with `u64` keys: the key after `key` (the first key when
/// `None`), or `None` at the end.
pub fn bpf_map_next_key(map: BorrowedFd<'_>, key: Option<u64>) -> io::Result<Option<u64>> {
    let mut next = 0u64;
    let current = key.unwrap_or(0).to_ne_bytes();
    let attr = MapElemAttr {
        map_fd: u32::try_from(map.as_raw_fd()).map_err(|_| io::Error::other("negative map fd"))?,
        _pad: 0,
        key: if key.is_some() {
            current.as_ptr() as u64
        } else {
            0
        },
        value: (&raw mut next) as u64,
        flags: 0,
    };
    // SAFETY: `attr` is a valid `bpf_attr` prefix; `current` and `next` outlive the call and
    // are eight bytes, the key size of the maps this is used on.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_GET_NEXT_KEY,
            &raw const attr,
            size_of::<MapElemAttr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENOENT) {
            return Ok(None);
        }
        return Err(err);
    }
    Ok(Some(next))
}

impl Epoll {
    /// Creates an epoll instance registered (readable) in the current tokio reactor.
    pub fn new_async() -> io::Result<tokio::io::unix::AsyncFd<Self>> {
        let epoll = Self::new()?;
        // SAFETY: `Epoll` owns its descriptor, never replaces it, and closes it only on drop,
        // after the `AsyncFd` has deregistered it; `as_raw_fd` always returns that descriptor.
        unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(epoll, tokio::io::Interest::READABLE)
        }
        .map_err(|err| io::Error::other(err.to_string()))
    }
}

/// The receive buffer size (`SO_RCVBUF`, as the kernel reports it: twice the requested value).
pub fn rcvbuf(fd: BorrowedFd<'_>) -> io::Result<usize> {
    Ok(usize::try_from(getsockopt::<libc::c_int>(
        fd,
        libc::SOL_SOCKET,
        libc::SO_RCVBUF,
    )?)
    .unwrap_or(0))
}

/// Sets `SO_RCVBUF` (the kernel doubles it and clamps it to its minimum; this also turns off
/// receive-buffer autotuning for the socket).
pub fn set_rcvbuf(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    setsockopt(
        fd,
        libc::SOL_SOCKET,
        libc::SO_RCVBUF,
        libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX),
    )
}

/// Lets the send buffer hold `bytes` (`SO_SNDBUFFORCE`, past `net.core.wmem_max`, with
/// `CAP_NET_ADMIN`; without it `SO_SNDBUF`, which the kernel caps at twice `wmem_max`). Either
/// turns off send-buffer autotuning for the socket.
pub fn set_send_buffer(fd: BorrowedFd<'_>, bytes: u64) -> io::Result<()> {
    set_buffer(fd, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, bytes)
}

/// Lets the receive buffer hold `bytes`, as [`set_send_buffer`] does for the send buffer
/// (`SO_RCVBUFFORCE`, else `SO_RCVBUF`, capped at twice `net.core.rmem_max`). Either turns off
/// receive-buffer autotuning and sets the window clamp to match, so set the clamp after it.
pub fn set_receive_buffer(fd: BorrowedFd<'_>, bytes: u64) -> io::Result<()> {
    set_buffer(fd, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, bytes)
}

fn set_buffer(
    fd: BorrowedFd<'_>,
    forced: libc::c_int,
    capped: libc::c_int,
    bytes: u64,
) -> io::Result<()> {
    // The kernel doubles the value for its bookkeeping overhead; ask for half.
    let half = libc::c_int::try_from(bytes / 2).unwrap_or(libc::c_int::MAX / 2);
    match setsockopt(fd, libc::SOL_SOCKET, forced, half) {
        Err(err) if err.raw_os_error() == Some(libc::EPERM) => {
            setsockopt(fd, libc::SOL_SOCKET, capped, half)
        }
        done => done,
    }
}

/// The send buffer size (`SO_SNDBUF`, as the kernel reports it: twice the requested value).
pub fn sndbuf(fd: BorrowedFd<'_>) -> io::Result<usize> {
    Ok(usize::try_from(getsockopt::<libc::c_int>(
        fd,
        libc::SOL_SOCKET,
        libc::SO_SNDBUF,
    )?)
    .unwrap_or(0))
}

/// Sets `TCP_QUICKACK`: leaves the delayed-ACK mode and sends an acknowledgement that is due
/// at once, carrying the current receive window.
pub fn quickack(fd: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_QUICKACK, 1 as libc::c_int)
}

/// The receive window clamp (`TCP_WINDOW_CLAMP`).
pub fn window_clamp(fd: BorrowedFd<'_>) -> io::Result<u32> {
    Ok(u32::try_from(getsockopt::<libc::c_int>(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_WINDOW_CLAMP,
    )?)
    .unwrap_or(0))
}

/// Sets `TCP_WINDOW_CLAMP`: the receive window offered to the peer never exceeds it (the kernel
/// raises tiny values to half its minimum buffer, which is still below one segment, so the
/// offered window becomes zero). Unlike shrinking `SO_RCVBUF`, it leaves the memory the socket
/// may queue unchanged.
pub fn set_window_clamp(fd: BorrowedFd<'_>, bytes: u32) -> io::Result<()> {
    setsockopt(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_WINDOW_CLAMP,
        libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX),
    )
}

/// Whether the kernel offers kernel TLS: a connected loopback socket accepts the `tls` upper
/// layer protocol (`TCP_ULP`; this also loads the module where it is built as one).
pub fn probe_ktls() -> io::Result<bool> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let client = std::net::TcpStream::connect(listener.local_addr()?)?;
    let _server = listener.accept()?;
    match set_tls_ulp(client.as_fd()) {
        Ok(()) => Ok(true),
        Err(err) => match err.raw_os_error() {
            Some(libc::ENOENT | libc::EOPNOTSUPP | libc::ENOPROTOOPT) => Ok(false),
            _ => Err(err),
        },
    }
}

/// Sets the `tls` upper layer protocol on a connected TCP socket (`TCP_ULP`, Linux 4.13); the
/// layer cannot be removed again.
pub fn set_tls_ulp(fd: BorrowedFd<'_>) -> io::Result<()> {
    let name = b"tls";
    // SAFETY: `name` is readable for its length during the call.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_ULP,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// Which half of a kTLS socket a key belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsDirection {
    /// Records the socket sends (`TLS_TX`).
    Transmit,
    /// Records the socket receives (`TLS_RX`, Linux 4.17).
    Receive,
}

/// Installs one direction's key (`setsockopt(SOL_TLS, TLS_TX | TLS_RX)`) on a socket that has
/// the `tls` upper layer; `info` is a `tls12_crypto_info_*` structure in the kernel's layout.
pub fn set_tls_crypto_info(
    fd: BorrowedFd<'_>,
    direction: TlsDirection,
    info: &[u8],
) -> io::Result<()> {
    let name = match direction {
        TlsDirection::Transmit => libc::TLS_TX,
        TlsDirection::Receive => libc::TLS_RX,
    };
    // SAFETY: `info` is readable for its length during the call; the kernel copies it.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_TLS,
            name,
            info.as_ptr().cast(),
            libc::socklen_t::try_from(info.len()).unwrap_or(libc::socklen_t::MAX),
        )
    })?;
    Ok(())
}

/// Whether this process may size pipes past the per-user soft limit
/// (`fs.pipe-user-pages-soft`): `CAP_SYS_RESOURCE` or `CAP_SYS_ADMIN` in its effective set, as
/// the kernel's `pipe_is_unprivileged_user` checks. `false` when the set cannot be read.
pub fn may_exceed_pipe_limits() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_SYS_RESOURCE: u32 = 24;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| effective_capabilities(&status))
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE | 1 << CAP_SYS_ADMIN) != 0)
}

/// The `CapEff` mask of a `/proc/<pid>/status` text.
fn effective_capabilities(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// A non-blocking pipe, `(read end, write end)`, grown to `bytes` where the kernel allows it
/// (`F_SETPIPE_SZ`; `None`, or a refusal, keeps the default, 64 KiB while the user is under
/// `fs.pipe-user-pages-soft`). Returns the pipe's capacity.
pub fn pipe(bytes: Option<usize>) -> io::Result<(OwnedFd, OwnedFd, usize)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is writable for two descriptors.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) })?;
    // SAFETY: `pipe2` succeeded, so both descriptors are open and owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    if let Some(bytes) = bytes {
        let want = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: plain fcntl on an owned descriptor.
        let _ = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, want) };
    }
    // SAFETY: plain fcntl on an owned descriptor.
    let size = cvt(unsafe { libc::fcntl(w.as_raw_fd(), libc::F_GETPIPE_SZ) })?;
    Ok((r, w, usize::try_from(size).unwrap_or(0)))
}

/// Non-blocking `splice(2)` of at most `len` bytes from `from` to `to` (one of them a pipe),
/// moving pages instead of copying where the kernel can; `Ok(0)` is end of stream on `from`.
pub fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: null offsets are allowed (and required for sockets and pipes); no memory of
    // ours is touched.
    cvt_size(unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    })
}

/// Control-message space for one byte of `SOL_TLS` data, in `u64`s so that it is aligned for
/// `cmsghdr`.
const TLS_CMSG_WORDS: usize = 4;

/// Non-blocking `recvmsg` of one record from a kTLS receive socket: the record type (from the
/// `TLS_GET_RECORD_TYPE` control message; 23 when the kernel attached none) and the bytes
/// read into `buf`. The kernel never merges records of different types in one call.
pub fn recv_tls_record(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(u8, usize)> {
    let mut control = [0u64; TLS_CMSG_WORDS];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero `msghdr` is valid (no name, no iovecs, no control).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: `msg` points at `iov` (covering `buf`) and `control`, all live and writable for
    // the duration of the call.
    let n = cvt_size(unsafe { libc::recvmsg(fd.as_raw_fd(), &raw mut msg, libc::MSG_DONTWAIT) })?;
    let mut record_type = 23;
    // SAFETY: `msg` was filled by the kernel; CMSG_FIRSTHDR/CMSG_NXTHDR stay inside
    // `msg_control`/`msg_controllen`, and CMSG_DATA of a `SOL_TLS` message holds one byte.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_TLS && (*cmsg).cmsg_type == libc::TLS_GET_RECORD_TYPE
            {
                record_type = *libc::CMSG_DATA(cmsg);
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    Ok((record_type, n))
}

/// Non-blocking `sendmsg` of `payload` as one record of `record_type` on a kTLS transmit socket
/// (`TLS_SET_RECORD_TYPE`, e.g. 21 for an alert), without `SIGPIPE`.
pub fn send_tls_record(fd: BorrowedFd<'_>, record_type: u8, payload: &[u8]) -> io::Result<usize> {
    let mut control = [0u64; TLS_CMSG_WORDS];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: an all-zero `msghdr` is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure size computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(1) } as usize;
    // SAFETY: `control` holds at least CMSG_SPACE(1) bytes (checked by the unit tests) and is
    // aligned for `cmsghdr`; the header and its one data byte are written inside it. The
    // kernel only reads from `iov` (the payload), despite the mutable pointer type.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        if cmsg.is_null() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        (*cmsg).cmsg_level = libc::SOL_TLS;
        (*cmsg).cmsg_type = libc::TLS_SET_RECORD_TYPE;
        (*cmsg).cmsg_len = libc::CMSG_LEN(1) as usize;
        *libc::CMSG_DATA(cmsg) = record_type;
    }
    // SAFETY: `msg` points at live `iov` and `control` for the duration of the call.
    cvt_size(unsafe {
        libc::sendmsg(
            fd.as_raw_fd(),
            &raw const msg,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    })
}

/// Registers a descriptor owner (e.g. a BPF ring buffer) in the current tokio reactor.
pub fn async_fd<T: AsRawFd>(inner: T) -> io::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: callers pass types that own their descriptor for their whole life and close it
    // only on drop, after the `AsyncFd` has deregistered it.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE)
    }
    .map_err(|err| io::Error::other(err.to_string()))
}

/// Offset of `tcpi_advmss` in `struct tcp_info` (stable kernel ABI since 2.6).
const TCPI_ADVMSS: usize = 84;

/// The largest segment the socket told its peer to send (`tcpi_advmss`).
pub fn advmss(fd: BorrowedFd<'_>) -> io::Result<u32> {
    TcpInfo::read(fd)?.u32_at(TCPI_ADVMSS, "advmss")
}

/// Delays the socket's acknowledgements where the kernel may (`TCP_QUICKACK` 0, its
/// "pingpong" mode), so that an acknowledgement is more often due for [`quickack`] to send.
pub fn delay_acks(fd: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_QUICKACK, 0 as libc::c_int)
}

mod fdpass;
pub use fdpass::{
    MAX_FDS_PER_MESSAGE, recv_with_fds, reserve_fds, send_with_fds, seqpacket_accept,
    seqpacket_connect, seqpacket_listen, set_recv_timeout,
};

#[cfg(test)]
mod tests {
    #[test]
    fn effective_capabilities_are_read_from_the_status_text() {
        let status = "Name:\tingressd\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
                      CapEff:\t0000000001003000\nCapBnd:\t000001ffffffffff\n";
        assert_eq!(super::effective_capabilities(status), Some(0x0100_3000));
        assert_eq!(super::effective_capabilities("Name:\tx\n"), None);
        assert_eq!(super::effective_capabilities("CapEff:\tzz\n"), None);
    }

    #[test]
    fn pipes_grow_only_when_asked() {
        let (_, _, default) = super::pipe(None).unwrap_or_else(|e| panic!("pipe: {e}"));
        assert_eq!(default, 64 << 10, "the kernel's default pipe");
        if super::may_exceed_pipe_limits() {
            let (_, _, grown) = super::pipe(Some(1 << 20)).unwrap_or_else(|e| panic!("pipe: {e}"));
            assert_eq!(grown, 1 << 20);
        }
    }

    #[test]
    fn tls_record_type_control_message_fits_its_buffer() {
        // SAFETY: pure size computation.
        let space = unsafe { libc::CMSG_SPACE(1) } as usize;
        assert!(
            space <= super::TLS_CMSG_WORDS * 8,
            "CMSG_SPACE(1) = {space}"
        );
    }
}
