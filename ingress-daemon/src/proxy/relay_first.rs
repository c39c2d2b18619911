//! The first moments of a passthrough flow, relayed in userspace before the kernel path takes
//! over.
//!
//! Every message a spliced flow carries is sent out by a kworker (the kernel queues a
//! redirected skb on the peer's psock and a work item transmits it), and on a busy machine
//! each of those hops waits for the scheduler. A TLS handshake is a chain of small messages in
//! alternating directions, and many flows are short (a handshake, a request, a reply), so the
//! kernel path made them slower than a plain userspace relay. So a flow starts here: this
//! relay moves its bytes until `relay_first_bytes` have passed (both ways together) or
//! `relay_first_ms` has elapsed, whichever comes first, and then hands the pair to the splice
//! engine. A flow that ends before that never enters the kernel's maps at all.
//!
//! **Hand-off.** The engine must not get a socket whose next skb was partly read (DESIGN.md
//! §3): the kernel path would send the read head a second time. So the phase ends with a
//! drain: each direction reads until a `recv` leaves its receive queue empty (`EAGAIN`, or
//! fewer bytes than asked: every skb it touched was consumed whole) and writes out all it
//! read; only then is the pair handed over. Against a sender faster than its receiver the drain would
//! chase the whole receive buffer (megabytes, at the receiver's pace), so both sockets'
//! receive windows are clamped to [`WINDOW_CLAMP`] for the phase: what can be queued when it
//! ends stays small. Bytes that arrive after that are whole skbs in the receive
//! queue, which the engine nudges into the verdict on insertion. The bytes read from each
//! socket go to the engine as its [`Preamble`](crate::splice::Preamble), so the FIN coverage
//! check counts only what came after; the bytes written to each socket are in its write
//! sequence before the engine takes its baseline.
//!
//! **Ends.** A FIN is propagated here once everything read before it is written (a
//! direction that ended travels to the engine as shut). An error on one socket resets the
//! other (`SO_LINGER {1, 0}`), as the engine does, and the flow ends here.

use std::{io, os::fd::AsFd as _, time::Duration};

use tokio::net::TcpStream;

use crate::{splice::FlowEnd, sys};

/// Size of one read; a TLS record is at most 16 KiB plus its header and tag.
const CHUNK: usize = 17 * 1024;

/// Receive window clamp of both sockets during the phase. It bounds what a fast sender can
/// have queued when the phase ends, and so the drain; the engine sets its own clamp when it
/// takes the pair.
const WINDOW_CLAMP: u32 = 64 << 10;

/// Size of a read in the drain: above what a sender can have queued under [`WINDOW_CLAMP`]
/// (the window offered before the clamp was at most the SYN's), so one read empties the
/// queue even when the sender refills it as fast as it is read.
const DRAIN_CHUNK: usize = 2 * WINDOW_CLAMP as usize;

/// Mean bytes per read above which a flow that spent the byte budget in time is bulk. A bulk
/// transfer's reads fill most of [`CHUNK`]; an interactive flow fast enough to spend the
/// budget in time (a 64-byte ping-pong at 10,000 round trips a second) reads one small record
/// at a time, and keeps its latency on the kernel path.
const BULK_MEAN_READ: u64 = 2048;

/// When the userspace phase ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes moved both ways together.
    pub bytes: u64,
    /// Time since the phase started.
    pub time: Duration,
}

impl Limits {
    /// Whether the phase runs at all (both limits non-zero).
    pub fn enabled(&self) -> bool {
        self.bytes > 0 && !self.time.is_zero()
    }
}

/// How the phase ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// A limit was reached: hand the pair to the engine. `shut[d]`: direction `d` (0 =
    /// client → backend) already ended and its FIN was propagated. `bulk`: the byte budget
    /// ran out before the time did, in large reads ([`BULK_MEAN_READ`]).
    HandOff { shut: [bool; 2], bulk: bool },
    /// The flow ended here.
    Ended(FlowEnd),
}

/// One direction: reads socket `d`, writes socket `1 - d`.
#[derive(Default)]
struct Dir {
    /// Read, not yet written: `buf[start..]` (empty, unallocated, while nothing waits).
    buf: Vec<u8>,
    start: usize,
    /// Bytes read from the source (all of them written once `buf` is empty).
    read: u64,
    /// Reads that returned bytes.
    reads: u64,
    /// The source's last `recv` emptied its receive queue (`EAGAIN`, or fewer bytes than
    /// asked): no skb is partly read.
    drained: bool,
    /// `recv` returned 0.
    eof: bool,
    /// The FIN was propagated.
    shut: bool,
}

thread_local! {
    /// Where reads land before they are written on (grown to [`DRAIN_CHUNK`] at most).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// How much a pump may read.
#[derive(Clone, Copy, Debug)]
enum Reads {
    /// The first phase: up to this many bytes.
    Upto(u64),
    /// The drain: until a read leaves the receive queue empty, then no more.
    Drain,
}

/// What stopped a direction's pump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    /// The source has nothing more now.
    Readable,
    /// The destination's send buffer is full.
    Writable,
    /// The direction ended (FIN propagated).
    Done,
}

/// The relay of one flow's first moments.
pub(super) struct RelayFirst<'a> {
    socks: [&'a TcpStream; 2],
    dirs: [Dir; 2],
}

impl<'a> RelayFirst<'a> {
    pub(super) fn new(client: &'a TcpStream, backend: &'a TcpStream) -> Self {
        Self {
            socks: [client, backend],
            dirs: [Dir::default(), Dir::default()],
        }
    }

    /// Bytes read from the client and from the backend (each written to the other side once
    /// the phase has ended with [`Phase::HandOff`]).
    pub(super) fn consumed(&self) -> [u64; 2] {
        [self.dirs[0].read, self.dirs[1].read]
    }

    /// Bytes written to the other side, per direction (0 = client → backend).
    pub(super) fn moved(&self) -> [u64; 2] {
        [0, 1].map(|d| self.dirs[d].read - (self.dirs[d].buf.len() - self.dirs[d].start) as u64)
    }

    /// Relays until a limit is reached or the flow ends.
    pub(super) async fn run(&mut self, limits: Limits) -> Phase {
        let deadline = tokio::time::Instant::now() + limits.time;
        for side in 0..2 {
            if let Err(err) = sys::set_window_clamp(self.socks[side].as_fd(), WINDOW_CLAMP) {
                return Phase::Ended(self.reset(side, &err));
            }
        }
        let mut draining = false;
        let mut bulk = false;
        loop {
            let mut waits = [Wait::Done; 2];
            for (d, wait) in waits.iter_mut().enumerate() {
                let reads = if draining {
                    Reads::Drain
                } else {
                    let read: u64 = self.consumed().iter().sum();
                    Reads::Upto(limits.bytes.saturating_sub(read))
                };
                match self.pump(d, reads) {
                    Ok(w) => *wait = w,
                    Err((side, err)) => return Phase::Ended(self.reset(side, &err)),
                }
            }
            if waits == [Wait::Done; 2] {
                return Phase::Ended(FlowEnd::Closed);
            }
            if !draining {
                let read: u64 = self.consumed().iter().sum();
                let reads: u64 = self.dirs.iter().map(|d| d.reads).sum();
                let spent = read >= limits.bytes;
                bulk = spent && read >= BULK_MEAN_READ.saturating_mul(reads);
                draining = spent || tokio::time::Instant::now() >= deadline;
            }
            if draining
                && waits.iter().all(|w| *w != Wait::Writable)
                && self.dirs.iter().all(|d| d.drained || d.shut)
            {
                return Phase::HandOff {
                    shut: [self.dirs[0].shut, self.dirs[1].shut],
                    bulk,
                };
            }
            let ready = |d: usize| {
                let wait = waits[d];
                let sock = match wait {
                    Wait::Readable => self.socks[d],
                    _ => self.socks[1 - d],
                };
                async move {
                    match wait {
                        Wait::Readable => sock.readable().await,
                        Wait::Writable => sock.writable().await,
                        Wait::Done => std::future::pending().await,
                    }
                }
            };
            let result = if draining {
                // Only a full destination keeps the drain waiting (a direction that found its
                // source empty is drained).
                tokio::select! {
                    r = ready(0), if waits[0] == Wait::Writable => r,
                    r = ready(1), if waits[1] == Wait::Writable => r,
                    else => Ok(()),
                }
            } else {
                tokio::select! {
                    r = ready(0) => r,
                    r = ready(1) => r,
                    () = tokio::time::sleep_until(deadline) => Ok(()),
                }
            };
            if let Err(err) = result {
                // Readiness itself failed (the reactor is gone): nothing sane remains.
                return Phase::Ended(self.reset(0, &err));
            }
        }
    }

    /// Moves direction `d` until its source is empty, its destination full, it ended, or
    /// `reads` allows no more reading.
    fn pump(&mut self, d: usize, reads: Reads) -> Result<Wait, (usize, io::Error)> {
        let (src, dst) = (self.socks[d], self.socks[1 - d]);
        let dir = &mut self.dirs[d];
        if dir.shut {
            return Ok(Wait::Done);
        }
        let mut read_now = 0;
        loop {
            if dir.start < dir.buf.len() {
                match dst.try_write(&dir.buf[dir.start..]) {
                    Ok(n) => dir.start += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Wait::Writable),
                    Err(e) => return Err((1 - d, e)),
                }
                if dir.start < dir.buf.len() {
                    continue;
                }
                // Written out: a flow holds no buffer while nothing waits.
                dir.buf = Vec::new();
                dir.start = 0;
            }
            if dir.eof {
                sys::shutdown_write(dst.as_fd()).map_err(|e| (1 - d, e))?;
                dir.shut = true;
                return Ok(Wait::Done);
            }
            let want = match reads {
                Reads::Upto(budget) if read_now < budget => CHUNK,
                Reads::Drain if !dir.drained => DRAIN_CHUNK,
                _ => return Ok(Wait::Readable),
            };
            // Read into the thread's scratch buffer and written on at once; only what the
            // destination does not take now is copied to the flow's own buffer.
            let read = SCRATCH.with_borrow_mut(|scratch| {
                if scratch.len() < want {
                    scratch.resize(want, 0);
                }
                let n = match src.try_read(&mut scratch[..want]) {
                    Ok(n) => n,
                    Err(e) => return Err((d, e)),
                };
                let mut written = 0;
                while written < n {
                    match dst.try_write(&scratch[written..n]) {
                        Ok(k) => written += k,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err((1 - d, e)),
                    }
                }
                if written < n {
                    dir.buf = scratch[written..n].to_vec();
                    dir.start = 0;
                }
                Ok(n)
            });
            match read {
                Ok(0) => dir.eof = true,
                Ok(n) => {
                    dir.read += n as u64;
                    dir.reads += 1;
                    read_now += n as u64;
                    // A read that did not fill the buffer emptied the receive queue: every
                    // skb it touched was consumed whole.
                    dir.drained = n < want;
                }
                Err((side, e)) if side == d && e.kind() == io::ErrorKind::WouldBlock => {
                    dir.drained = true;
                    return Ok(Wait::Readable);
                }
                Err(failure) => return Err(failure),
            }
        }
    }

    /// Ends the flow after an error on socket `side`: the other side is reset.
    fn reset(&mut self, side: usize, err: &io::Error) -> FlowEnd {
        tracing::debug!(
            side = if side == 0 { "client" } else { "backend" },
            error = %err,
            "socket error before the hand-off; resetting the other side"
        );
        let _ = sys::set_reset_on_close(self.socks[1 - side].as_fd());
        FlowEnd::for_error(side, err)
    }
}
