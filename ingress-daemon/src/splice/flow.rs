//! One spliced flow: two sockets, two directions, and the rules for moving each direction's
//! bytes, half-closing it and tearing the pair down.
//!
//! Direction `d` reads socket `d` and writes socket `1 - d` (0 = client, 1 = backend).
//!
//! **Kernel path.** The verdict redirects bytes; the daemon only sees bytes the verdict passed
//! (gate closed, DESIGN.md §3) and relays exactly those: it reads at most `passed − read`
//! bytes, so it never takes a byte the verdict has not judged. Before writing relayed bytes it
//! waits until every redirected byte has entered the destination's send queue (`bytes_acked +
//! SIOCOUTQ` has grown by `redirected + relayed`), so relayed bytes never overtake redirected
//! ones; it publishes `relayed` only after the write, so the verdict redirects again only once
//! nothing is held back. A FIN (`EPOLLRDHUP`) is propagated with `shutdown(SHUT_WR)` only after
//! the destination's write sequence covers everything the source received (`bytes_received`,
//! which counts the FIN as one byte), because redirection is asynchronous.
//!
//! **Userspace path.** The same state machine with every byte relayed: read until `EAGAIN`
//! into one bounded buffer per direction, write it out, stop reading while the destination is
//! full (its window then closes the source's), and propagate end of stream after the buffer
//! drains.
//!
//! **Resets.** An error on one socket (RST, `ETIMEDOUT` from keepalive or `TCP_USER_TIMEOUT`)
//! resets the other: `SO_LINGER {1, 0}` then close.

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    time::{Duration, Instant},
};

use super::{
    DirectionBytes, FlowEnd, FlowOutcome, Path,
    ebpf::{DirView, KernelFlow, KernelPath},
};
use crate::sys::{self, events};

mod snapshot;

/// A relay buffer with pending bytes `data[start..end]`.
pub(super) struct RelayBuf {
    data: Box<[u8]>,
    start: usize,
    end: usize,
}

/// Relay buffers of one shard, reused across flows so idle flows hold none.
///
/// Two sizes. A direction reads into a small buffer ([`SMALL_RELAY_BUFFER`]) until a read
/// brings at least that much: its source is then moving bulk data, and it reads into a large
/// one (the engine's `relay_buffer_bytes`) for as long as reads stay that big. On loopback a
/// 1 MiB read instead of 64 KiB cuts the relay's CPU per byte by two fifths to a half: the
/// per-call work (a wake-up, two system calls) is spread over sixteen times the bytes. A
/// direction whose destination is slow holds its buffer until the destination drains, so at
/// most [`MAX_LARGE_HELD`] large buffers are out of a shard's pool at once; past that, bulk
/// directions read into small ones. The pool keeps at most [`KEEP_SMALL`] and [`KEEP_LARGE`]
/// free buffers.
pub(super) struct BufferPool {
    small: Vec<Box<[u8]>>,
    large: Vec<Box<[u8]>>,
    small_size: usize,
    large_size: usize,
    /// Large buffers handed out and not yet returned.
    large_out: usize,
    /// Large buffers handed out ever.
    #[cfg(test)]
    large_lent: usize,
}

/// Size of a relay buffer for a direction that is not moving bulk data.
pub(super) const SMALL_RELAY_BUFFER: usize = 64 << 10;
/// Large buffers a shard lends at once.
const MAX_LARGE_HELD: usize = 16;
/// Free buffers a shard keeps for reuse, per size.
const KEEP_SMALL: usize = 64;
const KEEP_LARGE: usize = 4;

impl BufferPool {
    /// A pool whose large buffers are `size` bytes (and small ones the smaller of `size` and
    /// [`SMALL_RELAY_BUFFER`]).
    pub(super) fn new(size: usize) -> Self {
        let large_size = size.max(1024);
        Self {
            small: Vec::new(),
            large: Vec::new(),
            small_size: large_size.min(SMALL_RELAY_BUFFER),
            large_size,
            large_out: 0,
            #[cfg(test)]
            large_lent: 0,
        }
    }

    /// A buffer for a read: a large one if `bulk` and the shard may lend one more.
    fn get(&mut self, bulk: bool) -> Box<[u8]> {
        if bulk && self.large_size > self.small_size && self.large_out < MAX_LARGE_HELD {
            self.large_out += 1;
            #[cfg(test)]
            {
                self.large_lent += 1;
            }
            return self
                .large
                .pop()
                .unwrap_or_else(|| vec![0u8; self.large_size].into_boxed_slice());
        }
        self.small
            .pop()
            .unwrap_or_else(|| vec![0u8; self.small_size].into_boxed_slice())
    }

    /// A buffer for `len` bytes handed over by another daemon.
    fn get_for(&mut self, len: usize) -> Box<[u8]> {
        let data = self.get(len > self.small_size);
        if data.len() < len {
            self.put(data);
            return vec![0u8; len].into_boxed_slice();
        }
        data
    }

    fn put(&mut self, buf: Box<[u8]>) {
        if buf.len() == self.large_size && self.large_size > self.small_size {
            self.large_out = self.large_out.saturating_sub(1);
            if self.large.len() < KEEP_LARGE {
                self.large.push(buf);
            }
        } else if buf.len() == self.small_size && self.small.len() < KEEP_SMALL {
            self.small.push(buf);
        }
    }

    /// Whether a read of `n` bytes shows a bulk source.
    fn is_bulk(&self, n: usize) -> bool {
        n >= self.small_size
    }
}

/// What the shard lends a flow while it handles an event.
pub(super) struct Cx<'a> {
    pub(super) kernel: Option<&'a KernelPath>,
    pub(super) pool: &'a mut BufferPool,
    /// The receive buffer a kernel-path socket gets at its first hold (0: autotuning).
    pub(super) receive_buffer: u64,
}

#[derive(Default)]
struct Dir {
    /// Bytes userspace read from the source before the flow was handed over.
    consumed_pre: u64,
    /// Bytes read from the source by the relay.
    read: u64,
    /// Bytes written to the destination by the relay.
    relayed: u64,
    /// Read but not yet written.
    buf: Option<RelayBuf>,
    /// The last read brought a whole small buffer's worth: read into a large one.
    bulk: bool,
    /// The source sent a FIN (kernel path: `EPOLLRDHUP`; userspace: `recv` returned 0).
    fin_seen: bool,
    /// `recv` returned 0.
    eof: bool,
    /// The FIN was propagated to the destination.
    shut: bool,
    /// `redirected` value for which the destination was seen to hold every redirected byte.
    flushed_for: Option<u64>,
    /// Progress of the way back from the relay to the kernel path.
    handback: Handback,
    /// The source's receive buffer was fixed (at the first hold).
    receive_buffer_fixed: bool,
}

/// Backpressure by the source's receive window, and the way back from the relay to the kernel
/// path after the gate closed.
///
/// When the verdict reports congestion (more than `soft_water` in flight, one ring-buffer
/// event), the daemon holds the source's receive window down to one segment
/// (`TCP_WINDOW_CLAMP` at the socket's advertised MSS) and delays its acknowledgements
/// (`TCP_QUICKACK` off). Once the sender has used the window it was already offered, it may
/// send one segment per round trip: the kernel acknowledges each segment as the verdict takes
/// it. That brakes a sender on a real path (1,448 bytes per round trip) and hardly one on
/// loopback, where the gate at the high mark is what bounds the bytes in flight. Every byte
/// stays on the kernel path. The window opens again once the destination has drained to the
/// low-water mark: the clamp is restored and an acknowledgement that is due goes out at once
/// (`TCP_QUICKACK` on), carrying the open window.
///
/// The window is held at one segment, not at zero, so that the sender learns at once that it
/// reopened. A sender offered less than one segment sends nothing (silly-window avoidance),
/// so nothing arrives for the receiver to acknowledge, the kernel sends no window update by
/// itself, and the sender learns of the open window from its own persist timer: 200 ms at
/// least, doubling while the window stays shut. The receiver cannot send the update sooner:
/// the kernel's window probe (`TCP_REPAIR` on then off, which this engine used to toggle) goes
/// out one byte before the peer's window and the peer discards it, and `TCP_QUICKACK` sends
/// only an acknowledgement that is due. On loopback, where the kernel path's kworker lags a
/// fast sender by 16 MiB every 40 MB or so, each zero-window hold cost the flow 200 ms, and
/// the kernel path moved 1.2 Gbit/s where it now moves 3 to 4.
///
/// Delaying the acknowledgements is what makes the hold a brake on loopback: the sender waits
/// for the delayed acknowledgement of its one segment. Without it (tried), TLS bulk flows,
/// whose receivers decrypt slower than their senders encrypt, ran into the gate 9 to 16 times
/// per 6 GiB (each a zero window, 200 ms) where they now close it none. The one risk of the
/// delay is a window that reopens short: with the receive buffer left to autotuning (often
/// 1 to 5 MB when a hold began), 4 of 10 plaintext 2 GiB transfers were left offered less
/// than a segment after the reopening and stalled 200 ms. So a direction's first hold fixes
/// its source's receive buffer (`EngineConfig::receive_buffer_bytes`, 32 MiB, see there for
/// why not at the hand-off): then none of 6 stalled.
///
/// A one-segment window holds nothing while the reverse direction moves (every segment this
/// socket sends carries the window) or while the gate passes bytes (each read of them is
/// acknowledged at once), so the hold then becomes a zero window: the reverse direction's
/// segments, or the relay's reads, carry the news when it reopens.
///
/// The verdict redirects again only once the daemon holds no passed byte (`passed ==
/// relayed`); while the sender keeps sending, passed bytes keep arriving and that moment never
/// comes. So as soon as the relay sees the gate closed, or passed bytes it has not relayed, it
/// shuts the source's window: the sender may still fill the window it was already offered, but
/// no more. The relay empties what was passed; once the destination has drained to the
/// low-water mark and nothing is held back, it restores the clamp. The next skb finds nothing
/// held back and is redirected. A gate still marked closed once the relay has caught up and the
/// destination has drained is left alone: it opens on the verdict's next skb, and holding the
/// window again would only keep that skb from coming.
///
/// While the window is held the relay is paced: it reads passed bytes only while the
/// destination holds at most half the low-water mark. Relaying at the destination's full pace
/// would keep its send queue full, so the bytes in flight would never fall to the low mark the
/// gate reopens at, and the flow would stay on the relay for as long as its sender outpaces its
/// receiver; paced, the destination drains and the verdict finds room to redirect again.
///
/// The receive buffer must not be shrunk instead: passed skbs are charged to it, and when the
/// charge fails the kernel parks them on the psock backlog, out of the relay's reach until
/// memory frees up (a deadlock while the relay waits for them; duplicated bytes were seen on
/// 6.18 when they were retried).
#[derive(Clone, Copy, Debug, Default)]
enum Handback {
    /// The gate is open (or the relay has not noticed it closing).
    #[default]
    Idle,
    /// The source's window is held; the window clamp to restore, the clamp the kernel set for
    /// the hold, and, while the hold is one segment, the reverse direction's byte count (kernel
    /// and relay) when it began (`None` once the hold is a zero window).
    Holding {
        clamp: u32,
        held: u32,
        reverse_seen: Option<u64>,
    },
}

/// Holds the window of `fd` and returns the clamp to restore (at most `cap`): to one segment
/// with acknowledgements delayed when `reverse_seen` is the byte count of the direction that
/// writes to `fd` (to tell later whether it moved meanwhile), to zero when it is `None`.
fn hold_window(
    fd: std::os::fd::BorrowedFd<'_>,
    cap: u32,
    reverse_seen: Option<u64>,
) -> io::Result<Handback> {
    // Autotuning may have raised the clamp past the flow's cap since the last hold.
    let clamp = sys::window_clamp(fd)?.min(cap);
    let held = if reverse_seen.is_some() {
        sys::set_window_clamp(fd, sys::advmss(fd)?)?;
        sys::delay_acks(fd)?;
        sys::window_clamp(fd)?
    } else {
        shut_window(fd)?
    };
    Ok(Handback::Holding {
        clamp,
        held,
        reverse_seen,
    })
}

/// Turns a one-segment hold into a zero window (the kernel raises 1 to its minimum, below one
/// segment); returns the clamp the kernel set.
fn shut_window(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<u32> {
    sys::set_window_clamp(fd, 1)?;
    sys::window_clamp(fd)
}

/// Ends a hold: restores the clamp and sends the acknowledgement that is due, which carries
/// the reopened window.
fn reopen_window(fd: std::os::fd::BorrowedFd<'_>, clamp: u32) -> io::Result<()> {
    sys::set_window_clamp(fd, clamp)?;
    sys::quickack(fd)
}

/// Result of handling an event.
pub(super) enum Step {
    /// The flow goes on; `recheck` asks for a timer (a condition is polled, not signalled).
    Continue { recheck: bool },
    /// The flow is over; the shard closes the sockets and reports the outcome.
    Done(FlowEnd),
}

/// One flow's state.
pub(super) struct Flow {
    pub(super) id: u64,
    /// The caller's label (e.g. the ingress), reported with the flow.
    pub(super) tag: u32,
    pub(super) socks: [OwnedFd; 2],
    pub(super) kernel: Option<KernelFlow>,
    dirs: [Dir; 2],
    /// Events currently registered per socket.
    pub(super) interest: [u32; 2],
    pub(super) started: Instant,
    pub(super) on_end: Option<super::OnEnd>,
    /// Consecutive timer rechecks without progress (backoff exponent).
    pub(super) backoff: u8,
    /// The idle timeout, when the flow has one.
    idle: Option<Idle>,
}

/// Idle-timeout state: the flow is idle once its byte total has not changed for `timeout`.
/// The total is sampled every quarter of the timeout (counters, no syscall), so a flow is
/// closed after between 1 and 1.25 timeouts without a byte, never earlier.
#[derive(Debug)]
struct Idle {
    timeout: Duration,
    /// Byte total at the last sample, and when that total was first seen.
    seen: u64,
    since: Instant,
    /// The next sample, once its timer is queued.
    due: Option<Instant>,
}

/// Events every flow socket is registered for; `OUT` is added while a relay write is blocked.
pub(super) const BASE_EVENTS: u32 = events::IN | events::RDHUP | events::ET;

type Failure = (usize, io::Error);

impl Flow {
    pub(super) fn new(
        id: u64,
        tag: u32,
        socks: [OwnedFd; 2],
        kernel: Option<KernelFlow>,
        preamble: super::Preamble,
        on_end: Option<super::OnEnd>,
        idle_timeout: Option<Duration>,
    ) -> Self {
        let dir = |consumed_pre, shut| Dir {
            consumed_pre,
            fin_seen: shut,
            eof: shut,
            shut,
            ..Dir::default()
        };
        Self {
            id,
            tag,
            socks,
            kernel,
            dirs: [
                dir(preamble.client_consumed, preamble.shut[0]),
                dir(preamble.backend_consumed, preamble.shut[1]),
            ],
            interest: [BASE_EVENTS; 2],
            started: Instant::now(),
            on_end,
            backoff: 0,
            idle: idle_timeout.map(|timeout| Idle {
                timeout,
                seen: 0,
                since: Instant::now(),
                due: None,
            }),
        }
    }

    /// When the idle check wants a timer that is not queued yet; marks it queued.
    pub(super) fn idle_timer(&mut self) -> Option<Instant> {
        let idle = self.idle.as_mut()?;
        if idle.due.is_some() {
            return None;
        }
        let at = Instant::now() + (idle.timeout / 4).max(Duration::from_millis(50));
        idle.due = Some(at);
        Some(at)
    }

    /// Whether the flow has moved no byte for its idle timeout (samples on the way).
    fn idle_expired(&mut self, kernel: Option<&KernelPath>) -> bool {
        // Every timer of every flow comes here: flows without a timeout read no counter.
        if self.idle.is_none() {
            return false;
        }
        let total: u64 = self
            .bytes(kernel)
            .iter()
            .map(|b| b.kernel + b.relayed)
            .sum();
        let Some(idle) = self.idle.as_mut() else {
            return false;
        };
        let now = Instant::now();
        if idle.due.is_some_and(|due| now >= due) {
            idle.due = None;
        }
        if total != idle.seen {
            idle.seen = total;
            idle.since = now;
            return false;
        }
        now.saturating_duration_since(idle.since) >= idle.timeout
    }

    /// Which path carries this flow.
    pub(super) fn path(&self) -> Path {
        if self.kernel.is_some() {
            Path::Sockmap
        } else {
            Path::Userspace
        }
    }

    /// Events wanted per socket now.
    pub(super) fn wanted_interest(&self) -> [u32; 2] {
        let mut wanted = [BASE_EVENTS; 2];
        for d in 0..2 {
            if self.dirs[d].buf.is_some() {
                wanted[1 - d] |= events::OUT;
            }
        }
        wanted
    }

    /// Handles epoll `events` on socket `side`.
    pub(super) fn on_event(&mut self, side: usize, ev: u32, cx: &mut Cx<'_>) -> Step {
        if ev & (events::ERR | events::HUP) != 0
            && let Ok(Some(err)) = sys::take_socket_error(self.socks[side].as_fd())
        {
            return self.reset(side, &err);
        }
        if ev & (events::RDHUP | events::HUP) != 0 {
            self.dirs[side].fin_seen = true;
        }
        if ev & (events::IN | events::RDHUP | events::HUP) != 0
            && let Err((failed, err)) = self.pump(side, cx)
        {
            return self.reset(failed, &err);
        }
        if ev & events::OUT != 0
            && let Err((failed, err)) = self.pump(1 - side, cx)
        {
            return self.reset(failed, &err);
        }
        self.progress(cx)
    }

    /// The verdict reported congestion on direction slot `dir`: hold the source's window.
    pub(super) fn on_congestion(&mut self, dir: u32, cx: &mut Cx<'_>) -> Step {
        if let (Some(flow), Some(path)) = (self.kernel, cx.kernel)
            && flow.dirs.iter().any(|&i| path.dir(i).broken())
        {
            // The program drops this flow's bytes from now on: end it with a reset on both
            // sides so neither peer takes the cut for a complete stream.
            self.abort();
            return Step::Done(FlowEnd::KernelError);
        }
        if let Some(flow) = self.kernel
            && let Some(d) = flow.dirs.iter().position(|&i| i == dir)
            && matches!(self.dirs[d].handback, Handback::Idle)
            && !self.dirs[d].fin_seen
        {
            let cap = cx
                .kernel
                .map_or(u32::MAX, |path| path.dir(dir).window_cap());
            let reverse_seen = self.moved(1 - d, cx.kernel);
            if let Err(err) = self.fix_receive_buffer(d, cx.receive_buffer, cap) {
                return self.reset(d, &err);
            }
            match hold_window(self.socks[d].as_fd(), cap, Some(reverse_seen)) {
                Ok(held) => self.dirs[d].handback = held,
                Err(err) => return self.reset(d, &err),
            }
        }
        self.progress(cx)
    }

    /// Re-evaluates conditions that are polled (timer expiry).
    pub(super) fn on_timer(&mut self, cx: &mut Cx<'_>) -> Step {
        if self.idle_expired(cx.kernel) {
            // Nothing moved for the whole timeout: close both sides (a FIN each, or an RST
            // where unread bytes wait, as the kernel decides on close).
            return Step::Done(FlowEnd::IdleTimeout);
        }
        for d in 0..2 {
            if let Err((failed, err)) = self.pump(d, cx) {
                return self.reset(failed, &err);
            }
        }
        self.progress(cx)
    }

    fn progress(&mut self, cx: &mut Cx<'_>) -> Step {
        let mut recheck = false;
        for d in 0..2 {
            match self.try_finish(d, cx) {
                Ok(waiting) => recheck |= waiting,
                Err((failed, err)) => return self.reset(failed, &err),
            }
            recheck |= self.dirs[d]
                .buf
                .as_ref()
                .is_some_and(|_| self.kernel.is_some() && self.dirs[d].flushed_for.is_none());
            if matches!(self.dirs[d].handback, Handback::Holding { .. }) {
                // A held window stalls the sender: look again soon, without backing off.
                recheck = true;
                self.backoff = self.backoff.min(1);
            }
        }
        if self.dirs[0].shut && self.dirs[1].shut {
            return Step::Done(FlowEnd::Closed);
        }
        Step::Continue { recheck }
    }

    /// Moves relayed bytes of direction `d` until the source is empty or the destination full.
    fn pump(&mut self, d: usize, cx: &mut Cx<'_>) -> Result<(), Failure> {
        let (src, dst) = (d, 1 - d);
        let kernel = self.kernel.zip(cx.kernel);
        loop {
            if self.dirs[d].buf.is_some()
                && let Some((flow, path)) = kernel
                && !redirects_flushed(&mut self.dirs[d], &flow, path, d, &self.socks[dst])
                    .map_err(|e| (dst, e))?
            {
                return Ok(());
            }
            if let Some(buf) = self.dirs[d].buf.as_mut() {
                let pending = buf.data.get(buf.start..buf.end).unwrap_or(&[]);
                match sys::send_nonblocking(self.socks[dst].as_fd(), pending) {
                    Ok(n) => {
                        buf.start += n;
                        self.dirs[d].relayed += n as u64;
                        if let Some((flow, path)) = kernel {
                            path.dir(flow.dirs[d]).set_relayed(self.dirs[d].relayed);
                        }
                        self.backoff = 0;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) => return Err((dst, e)),
                }
                if buf.start == buf.end
                    && let Some(done) = self.dirs[d].buf.take()
                {
                    cx.pool.put(done.data);
                }
                continue;
            }
            if self.dirs[d].eof {
                return Ok(());
            }
            let limit = match kernel {
                Some((flow, path)) => {
                    self.hand_back(d, &flow, path, cx.receive_buffer)?;
                    let view = path.dir(flow.dirs[d]);
                    let available = view.passed().saturating_sub(self.dirs[d].read);
                    if available == 0 {
                        return Ok(());
                    }
                    if matches!(self.dirs[d].handback, Handback::Holding { .. })
                        && self.in_flight(d, &view)? > view.low_water() / 2
                    {
                        // Paced while held (see `Handback`): the timer looks again.
                        return Ok(());
                    }
                    usize::try_from(available).unwrap_or(usize::MAX)
                }
                None => usize::MAX,
            };
            let mut data = cx.pool.get(self.dirs[d].bulk);
            let want = limit.min(data.len());
            let slice = data.get_mut(..want).unwrap_or(&mut []);
            match sys::recv_nonblocking(self.socks[src].as_fd(), slice) {
                Ok(0) => {
                    cx.pool.put(data);
                    self.dirs[d].eof = true;
                    self.dirs[d].fin_seen = true;
                    return Ok(());
                }
                Ok(n) => {
                    self.dirs[d].read += n as u64;
                    self.dirs[d].bulk = cx.pool.is_bulk(n);
                    self.dirs[d].buf = Some(RelayBuf {
                        data,
                        start: 0,
                        end: n,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    cx.pool.put(data);
                    return Ok(());
                }
                Err(e) => {
                    cx.pool.put(data);
                    return Err((src, e));
                }
            }
        }
    }

    /// Steps the way back to the kernel path (see [`Handback`]); called when the relay of
    /// direction `d` holds no byte.
    fn hand_back(
        &mut self,
        d: usize,
        flow: &KernelFlow,
        path: &KernelPath,
        receive_buffer: u64,
    ) -> Result<(), Failure> {
        let (src, dst) = (d, 1 - d);
        let view = path.dir(flow.dirs[d]);
        match self.dirs[d].handback {
            Handback::Idle => {
                // A gate still marked closed after the relay caught up and the destination
                // drained to the low-water mark opens on the verdict's next skb: holding the
                // window again would only keep that skb from coming.
                if !self.dirs[d].fin_seen
                    && (view.passed() != self.dirs[d].relayed
                        || (view.gated() && self.in_flight(d, &view)? > view.low_water()))
                {
                    // Shut at once: passed bytes must stop arriving for the relay to catch up.
                    self.fix_receive_buffer(src, receive_buffer, view.window_cap())
                        .map_err(|e| (src, e))?;
                    self.dirs[d].handback =
                        hold_window(self.socks[src].as_fd(), view.window_cap(), None)
                            .map_err(|e| (src, e))?;
                }
            }
            Handback::Holding {
                mut clamp,
                mut held,
                mut reverse_seen,
            } => {
                let fd = self.socks[src].as_fd();
                // A window of one segment holds the sender only while nothing else makes this
                // socket acknowledge at once. Every segment it sends carries its window, so
                // while the reverse direction moves the sender gets one segment per reverse
                // segment; and once the gate passes bytes, each read of them acknowledges at
                // once. Either way that is no hold at all (on loopback, a gigabyte a second):
                // shut the window instead. The reverse direction's segments, or the relay's
                // reads, then carry the news when it reopens.
                if reverse_seen.is_some_and(|seen| {
                    self.moved(dst, Some(path)) != seen || view.passed() != self.dirs[d].relayed
                }) {
                    held = shut_window(fd).map_err(|e| (src, e))?;
                    reverse_seen = None;
                }
                // Receive-buffer autotuning sets the clamp again whenever it grows the buffer
                // (`tcp_rcv_space_adjust`, "make the window clamp follow along", on every
                // kernel we support), which silently ends the hold: put it back, and restore
                // the grown value (within the cap) when the hold ends.
                let now = sys::window_clamp(fd).map_err(|e| (src, e))?;
                if now != held {
                    sys::set_window_clamp(fd, held).map_err(|e| (src, e))?;
                    clamp = now.min(view.window_cap());
                }
                self.dirs[d].handback = Handback::Holding {
                    clamp,
                    held,
                    reverse_seen,
                };
                if self.dirs[d].read < view.passed() {
                    return Ok(());
                }
                if self.dirs[d].fin_seen || self.in_flight(d, &view)? <= view.low_water() {
                    reopen_window(fd, clamp).map_err(|e| (src, e))?;
                    self.dirs[d].handback = Handback::Idle;
                    // Events so far are dealt with: the program may report the next one.
                    view.set_congestion_handled(view.congestion_events());
                }
            }
        }
        Ok(())
    }

    /// Fixes the receive buffer of direction `d`'s source before its first hold (see
    /// [`super::EngineConfig::receive_buffer_bytes`]), at least twice the window cap `cap`:
    /// the kernel offers about half a buffer as window, so the cap and not the buffer bounds
    /// the window when the marks are raised. Then the clamp goes back to the cap, for the
    /// hold to restore: autotuning may have lowered it to match a smaller buffer, and with the
    /// buffer fixed it no longer raises it.
    fn fix_receive_buffer(&mut self, d: usize, receive_buffer: u64, cap: u32) -> io::Result<()> {
        if receive_buffer == 0 || self.dirs[d].receive_buffer_fixed {
            return Ok(());
        }
        let fd = self.socks[d].as_fd();
        sys::set_receive_buffer(fd, receive_buffer.max(2 * u64::from(cap)))?;
        sys::set_window_clamp(fd, cap)?;
        self.dirs[d].receive_buffer_fixed = true;
        Ok(())
    }

    /// Bytes of direction `d` written toward the destination (redirected or relayed) that its
    /// receiver has not acknowledged yet.
    fn in_flight(&self, d: usize, view: &DirView<'_>) -> Result<u64, Failure> {
        let dst = 1 - d;
        let delivered = sys::tcp_counters(self.socks[dst].as_fd())
            .map_err(|e| (dst, e))?
            .bytes_acked
            .saturating_sub(view.acked_base());
        Ok((view.redirected() + self.dirs[d].relayed).saturating_sub(delivered))
    }

    /// Bytes direction `d` has moved (kernel and relay).
    fn moved(&self, d: usize, kernel: Option<&KernelPath>) -> u64 {
        let b = self.bytes(kernel)[d];
        b.kernel + b.relayed
    }

    /// Propagates the FIN of direction `d` once it is safe; returns whether it must be polled.
    fn try_finish(&mut self, d: usize, cx: &mut Cx<'_>) -> Result<bool, Failure> {
        let dir = &self.dirs[d];
        if dir.shut || !dir.fin_seen || dir.buf.is_some() {
            return Ok(false);
        }
        let (src, dst) = (d, 1 - d);
        if let (Some(flow), Some(path)) = (self.kernel.as_ref(), cx.kernel) {
            let view = path.dir(flow.dirs[d]);
            if dir.read < view.passed() {
                // Passed bytes still queued: `pump` moves them first.
                return Ok(true);
            }
            let received = sys::tcp_counters(self.socks[src].as_fd())
                .map_err(|e| (src, e))?
                .bytes_received;
            // `bytes_received` counts the FIN as one byte.
            let target = received.saturating_sub(1).saturating_sub(dir.consumed_pre);
            let covered = write_seq(&self.socks[dst])
                .map_err(|e| (dst, e))?
                .saturating_sub(view.acked_base());
            if covered < target {
                return Ok(true);
            }
        } else if !dir.eof {
            return Ok(false);
        }
        match sys::shutdown_write(self.socks[dst].as_fd()) {
            Ok(()) => {}
            // The destination is gone: what it had not acknowledged is lost, so report a reset.
            Err(e) => return Err((dst, e)),
        }
        self.dirs[d].shut = true;
        Ok(false)
    }

    /// Ends the flow after an error on socket `side`: the other side is reset.
    fn reset(&mut self, side: usize, err: &io::Error) -> Step {
        tracing::debug!(
            flow = self.id,
            side = if side == 0 { "client" } else { "backend" },
            error = %err,
            "socket error; resetting the other side"
        );
        let _ = sys::set_reset_on_close(self.socks[1 - side].as_fd());
        Step::Done(FlowEnd::for_error(side, err))
    }

    /// Ends the flow because the daemon stops: both sides are reset, so neither peer mistakes
    /// the cut for a complete stream.
    pub(super) fn abort(&mut self) {
        for sock in &self.socks {
            let _ = sys::set_reset_on_close(sock.as_fd());
        }
    }

    /// Returns the relay buffers still held (bytes a flow that ended could not deliver) to
    /// the pool.
    pub(super) fn release_buffers(&mut self, pool: &mut BufferPool) {
        for dir in &mut self.dirs {
            if let Some(buf) = dir.buf.take() {
                pool.put(buf.data);
            }
        }
    }

    /// Bytes moved so far.
    pub(super) fn bytes(&self, kernel: Option<&KernelPath>) -> [DirectionBytes; 2] {
        let kernel_bytes = |d: usize| match (self.kernel.as_ref(), kernel) {
            (Some(flow), Some(path)) => path.dir(flow.dirs[d]).redirected(),
            _ => 0,
        };
        [0, 1].map(|d| DirectionBytes {
            kernel: kernel_bytes(d),
            relayed: self.dirs[d].relayed,
        })
    }

    /// A per-direction program counter summed over both directions (0 off the kernel path).
    fn sum_dirs(&self, kernel: Option<&KernelPath>, counter: impl Fn(&DirView<'_>) -> u64) -> u64 {
        match (self.kernel.as_ref(), kernel) {
            (Some(flow), Some(path)) => flow.dirs.iter().map(|&i| counter(&path.dir(i))).sum(),
            _ => 0,
        }
    }

    /// Times the gate closed, both directions.
    pub(super) fn gate_closures(&self, kernel: Option<&KernelPath>) -> u64 {
        self.sum_dirs(kernel, |v| v.gate_closures())
    }

    /// Times the window was held for congestion, both directions.
    pub(super) fn window_holds(&self, kernel: Option<&KernelPath>) -> u64 {
        self.sum_dirs(kernel, |v| v.congestion_events())
    }

    /// Bytes cut from retransmitted segments, both directions.
    pub(super) fn overlap_trimmed(&self, kernel: Option<&KernelPath>) -> u64 {
        self.sum_dirs(kernel, |v| v.overlap_trimmed())
    }

    /// Version of the program that judged the flow last (the higher of its directions').
    pub(super) fn program_version(&self, kernel: Option<&KernelPath>) -> u32 {
        match (self.kernel.as_ref(), kernel) {
            (Some(flow), Some(path)) => flow
                .dirs
                .iter()
                .map(|&i| path.dir(i).program_version())
                .max()
                .unwrap_or(0),
            _ => 0,
        }
    }

    /// Whether a direction is gated now.
    pub(super) fn gated(&self, kernel: Option<&KernelPath>) -> bool {
        match (self.kernel.as_ref(), kernel) {
            (Some(flow), Some(path)) => flow.dirs.iter().any(|&i| path.dir(i).gated()),
            _ => false,
        }
    }

    /// The outcome report.
    pub(super) fn outcome(&self, end: FlowEnd, kernel: Option<&KernelPath>) -> FlowOutcome {
        let [client_to_backend, backend_to_client] = self.bytes(kernel);
        FlowOutcome {
            id: self.id,
            path: self.path(),
            client_to_backend,
            backend_to_client,
            end,
            duration: self.started.elapsed(),
            gate_closures: self.gate_closures(kernel),
            window_holds: self.window_holds(kernel),
            overlap_trimmed: self.overlap_trimmed(kernel),
            tag: self.tag,
        }
    }

    /// The peers of the client and backend sockets (for listings; two system calls).
    pub(super) fn peers(&self) -> [Option<std::net::SocketAddr>; 2] {
        [0, 1].map(|side| sys::peer_addr(self.socks[side].as_fd()).ok())
    }
}

/// Whether the destination already holds every byte the verdict redirected toward it, so
/// relayed bytes may follow. Checked once per value of `redirected` (which cannot change while
/// relayed bytes are held back).
fn redirects_flushed(
    dir: &mut Dir,
    flow: &KernelFlow,
    path: &KernelPath,
    d: usize,
    dst: &OwnedFd,
) -> io::Result<bool> {
    let view = path.dir(flow.dirs[d]);
    let redirected = view.redirected();
    if dir.flushed_for == Some(redirected) {
        return Ok(true);
    }
    let covered = write_seq(dst)?.saturating_sub(view.acked_base());
    if covered >= redirected + dir.relayed {
        dir.flushed_for = Some(redirected);
        return Ok(true);
    }
    dir.flushed_for = None;
    Ok(false)
}

/// A lower bound of the socket's write sequence (`bytes_acked` read before `SIOCOUTQ`: an ACK
/// in between can only make it smaller).
fn write_seq(fd: &OwnedFd) -> io::Result<u64> {
    let acked = sys::tcp_counters(fd.as_fd())?.bytes_acked;
    Ok(acked + sys::outq(fd.as_fd())?)
}

/// Delay before the `n`th consecutive recheck of a polled condition.
pub(super) fn recheck_delay(n: u8) -> Duration {
    Duration::from_micros(100u64 << n.min(7))
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::{TcpListener, TcpStream},
        os::fd::OwnedFd,
    };

    use super::{BufferPool, Cx, Flow, KEEP_LARGE, MAX_LARGE_HELD, SMALL_RELAY_BUFFER, Step};
    use crate::{splice::Preamble, sys::events};

    #[test]
    fn bulk_reads_get_large_buffers_and_the_shard_lends_only_so_many() {
        let mut pool = BufferPool::new(1 << 20);
        assert_eq!(pool.get(false).len(), SMALL_RELAY_BUFFER);
        assert!(!pool.is_bulk(SMALL_RELAY_BUFFER - 1));
        assert!(pool.is_bulk(SMALL_RELAY_BUFFER));
        let lent: Vec<_> = (0..MAX_LARGE_HELD).map(|_| pool.get(true)).collect();
        assert!(lent.iter().all(|b| b.len() == 1 << 20));
        // The shard has lent all it may: a bulk read gets a small buffer.
        let extra = pool.get(true);
        assert_eq!(extra.len(), SMALL_RELAY_BUFFER);
        pool.put(extra);
        for buf in lent {
            pool.put(buf);
        }
        assert_eq!(pool.large_out, 0);
        assert_eq!(pool.large.len(), KEEP_LARGE);
        assert_eq!(pool.get(true).len(), 1 << 20);
        // A pool whose buffers are small has one size only.
        let mut small = BufferPool::new(16 << 10);
        assert_eq!(small.get(true).len(), 16 << 10);
        assert_eq!(small.large_out, 0);
    }

    /// Client and backend sockets as the engine holds them, with their peers.
    fn pair() -> ([OwnedFd; 2], [TcpStream; 2]) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut held = Vec::new();
        let mut peers = Vec::new();
        for _ in 0..2 {
            let peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (ours, _) = listener.accept().unwrap();
            ours.set_nonblocking(true).unwrap();
            held.push(OwnedFd::from(ours));
            peers.push(peer);
        }
        let [c, b] = <[OwnedFd; 2]>::try_from(held).unwrap();
        let [pc, pb] = <[TcpStream; 2]>::try_from(peers).unwrap();
        ([c, b], [pc, pb])
    }

    #[test]
    fn a_bulk_direction_relays_exactly_and_a_flow_that_ends_returns_its_buffers() {
        let (socks, [mut client, mut backend]) = pair();
        let mut flow = Flow::new(1, 0, socks, None, Preamble::default(), None, None);
        let mut pool = BufferPool::new(1 << 20);
        let sent: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
        let writer = std::thread::spawn(move || {
            client.write_all(&sent).unwrap();
            client.shutdown(std::net::Shutdown::Write).unwrap();
            (client, sent)
        });
        let mut got = Vec::new();
        let mut chunk = vec![0u8; 4 << 20];
        backend.set_nonblocking(true).unwrap();
        loop {
            let mut cx = Cx {
                kernel: None,
                pool: &mut pool,
                receive_buffer: 0,
            };
            let step = flow.on_event(0, events::IN, &mut cx);
            match backend.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let mut cx = Cx {
                        kernel: None,
                        pool: &mut pool,
                        receive_buffer: 0,
                    };
                    flow.on_event(1, events::OUT, &mut cx);
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
                Err(e) => panic!("{e}"),
            }
            if let Step::Done(_) = step {
                unreachable!("the backend direction is still open");
            }
        }
        let (_client, sent) = writer.join().unwrap();
        assert!(
            got == sent,
            "relayed {} of {} bytes, or not in order",
            got.len(),
            sent.len()
        );
        assert!(
            pool.large_lent > 0,
            "8 MiB at once never took a large buffer"
        );

        // A destination that stops reading: the flow holds what it could not write, and gives
        // it back when it ends.
        let (socks, [mut client, _backend]) = pair();
        let mut flow = Flow::new(2, 0, socks, None, Preamble::default(), None, None);
        let bulk = vec![7u8; 1 << 20];
        client.set_nonblocking(true).unwrap();
        for _ in 0..200 {
            let _ = client.write(&bulk);
            let mut cx = Cx {
                kernel: None,
                pool: &mut pool,
                receive_buffer: 0,
            };
            flow.on_event(0, events::IN, &mut cx);
            if flow.dirs[0].buf.is_some() && pool.large_out > 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(
            pool.large_out > 0,
            "the stalled direction holds no large buffer"
        );
        flow.release_buffers(&mut pool);
        assert_eq!(pool.large_out, 0);
    }
}
