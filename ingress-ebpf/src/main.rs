//! The sk_skb stream verdict that splices two sockets inside the kernel.
//!
//! Every socket of a spliced flow sits in `SOCKS` (keyed by socket cookie) and has an entry in
//! `SOCK_DIR` naming the state of the direction it is the source of. For each skb arriving on a
//! source socket the verdict either redirects it to the egress of the peer socket (the kernel
//! path) or passes it to the source's own receive queue, where the daemon reads and relays it.
//!
//! It passes when
//! - the daemon still holds bytes it has not relayed (`passed != relayed`): a redirected skb
//!   would overtake them;
//! - or the bytes in flight toward the peer (`redirected + relayed − acked by the peer's
//!   receiver`) exceed the direction's high-water mark (once gated: until they fall to the
//!   low-water mark). Redirects are not backpressured by the
//!   kernel (the peer's psock queue grows without bound), so this gate is what keeps a fast
//!   sender behind a slow receiver from filling kernel memory: passed bytes are charged to the
//!   source's receive buffer, its window closes and the sender slows down.
//!
//! Before the gate, a softer mark: when the bytes in flight pass `soft_water` the program sends
//! one ring-buffer event, and the daemon closes the source's receive window (the sender stops
//! once the window it was offered is used up) while every byte stays on the kernel path. The
//! gate is the bound for when that is not enough.
//!
//! Zero-length skbs (a FIN) are dropped; the daemon propagates FIN and RST itself.
//!
//! **Retransmitted overlap.** TCP queues a segment that starts before `rcv_nxt` (a
//! retransmission that repeats bytes already received, then carries new ones) whole, and
//! leaves it to the reader to skip the repeated head. The kernel's skb reader for this program
//! does not skip it: the verdict would redirect or pass the repeated bytes a second time, and
//! the stream would carry them twice. So the program follows each source's sequence numbers
//! (`TCP_SKB_CB(skb)->seq`, read from the skb's control block) and cuts the repeated head off
//! with `bpf_skb_adjust_room` before judging the rest. A segment that repeats only old bytes is
//! dropped. If a cut fails (no memory) the direction is marked broken: every later segment is
//! dropped and the daemon, told through the ring buffer, resets the flow: a reset connection,
//! never a corrupted stream.
#![no_std]
#![no_main]

use core::ptr::{addr_of, addr_of_mut, read_volatile};

use aya_ebpf::{
    Global,
    bindings::{BPF_F_MMAPABLE, sk_action},
    cty::c_void,
    helpers::{
        bpf_get_socket_cookie, bpf_map_lookup_elem, bpf_probe_read_kernel, bpf_sk_release,
        bpf_skc_to_tcp_sock,
    },
    macros::{map, stream_verdict},
    maps::{Array, HashMap, RingBuf, SockHash},
    programs::SkBuffContext,
};
use ingress_common::{
    CongestionEvent, DirState, MAX_DIRS, MAX_SOCKS, SEQ_BROKEN, SEQ_TRACKED, SockDir,
};

/// Every spliced socket, keyed by its cookie; the verdict is attached here.
#[map]
static SOCKS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKS, 0);

/// Socket cookie → index of the direction state it is the source of.
#[map]
static SOCK_DIR: HashMap<u64, SockDir> = HashMap::with_max_entries(MAX_SOCKS, 0);

/// Per-direction state, shared with the daemon through `mmap`.
#[map]
static DIRS: Array<DirState> = Array::with_max_entries(MAX_DIRS, BPF_F_MMAPABLE);

/// Congestion events for the daemon.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

/// Offset of `bytes_acked` in the running kernel's `struct tcp_sock`, read from its BTF by the
/// daemon at load time (it differs between kernels).
#[unsafe(no_mangle)]
static BYTES_ACKED_OFFSET: Global<u32> = Global::new(0);

/// Offset of `copied_seq` in the running kernel's `struct tcp_sock` (from its BTF).
#[unsafe(no_mangle)]
static COPIED_SEQ_OFFSET: Global<u32> = Global::new(0);

/// Offset of `cb` in the running kernel's `struct sk_buff` (from its BTF); `struct
/// tcp_skb_cb` starts there with the segment's `seq`.
#[unsafe(no_mangle)]
static SKB_CB_OFFSET: Global<u32> = Global::new(0);

/// Most bytes one `bpf_skb_adjust_room` call may cut.
const TRIM_STEP: u32 = 0xfff;
/// Calls allowed for one cut: 64 × 4095 bytes covers the largest aggregated segment.
const MAX_TRIM_STEPS: u32 = 64;

/// Version of this program, set by the loader (`ingress_common::PROGRAM_VERSION` unless a test
/// says otherwise) and written into every direction the program judges, so the daemon can tell
/// which program serves a flow.
#[unsafe(no_mangle)]
static PROGRAM_VERSION: Global<u32> = Global::new(0);

const SK_PASS: u32 = sk_action::SK_PASS;
const SK_DROP: u32 = sk_action::SK_DROP;

#[stream_verdict]
pub fn splice_verdict(ctx: SkBuffContext) -> u32 {
    try_splice_verdict(&ctx)
}

#[inline(always)]
fn try_splice_verdict(ctx: &SkBuffContext) -> u32 {
    let len = u64::from(ctx.len());
    if len == 0 {
        return SK_DROP;
    }
    // SAFETY: the helper only reads the socket of the skb the kernel handed us.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast::<c_void>()) };
    // SAFETY: the value is plain data and copied out at once.
    let Some(index) = (unsafe { SOCK_DIR.get(&cookie) }).map(|dir| dir.index) else {
        // Not a socket of ours (or not set up yet): leave the bytes to the daemon.
        return SK_PASS;
    };
    let Some(state) = DIRS.get_ptr_mut(index) else {
        return SK_PASS;
    };
    // SAFETY: as below; a program-written field, one store per run.
    unsafe { (*state).program_version = PROGRAM_VERSION.load() };
    // SAFETY: `state` points into the array map for as long as the program runs; the verdict of
    // one socket does not run concurrently with itself. Daemon-written fields are read volatile.
    unsafe {
        let len = match judge_sequence(ctx, state, index, cookie, len) {
            Some(len) => len,
            None => return SK_DROP,
        };
        let relayed = read_volatile(addr_of!((*state).relayed));
        let passed = (*state).passed;
        if passed != relayed {
            return pass(state, passed, len);
        }
        let redirected = (*state).redirected;
        let gated = (*state).gated != 0;
        let mark = if gated {
            read_volatile(addr_of!((*state).low_water))
        } else {
            read_volatile(addr_of!((*state).high_water))
        };
        let soft = read_volatile(addr_of!((*state).soft_water));
        // `delivered_seen` only grows, so this estimate never undercounts the lag; the peer's
        // counter is read only when the estimate crosses a mark.
        let estimate = (redirected + relayed).saturating_sub((*state).delivered_seen);
        if estimate + len > soft.min(mark) {
            let peer = read_volatile(addr_of!((*state).peer_cookie));
            let acked_base = read_volatile(addr_of!((*state).acked_base));
            let Some(acked) = peer_bytes_acked(peer) else {
                return pass(state, passed, len);
            };
            let delivered = acked.saturating_sub(acked_base);
            (*state).delivered_seen = delivered;
            let in_flight = (redirected + relayed).saturating_sub(delivered) + len;
            if in_flight > soft {
                let events = (*state).congestion_events;
                if events == read_volatile(addr_of!((*state).congestion_handled)) {
                    let event = CongestionEvent { index, _pad: 0 };
                    if EVENTS.output::<CongestionEvent>(&event, 0).is_ok() {
                        (*state).congestion_events = events + 1;
                    }
                }
            }
            if in_flight > mark {
                if !gated {
                    (*state).gated = 1;
                    (*state).gate_closures += 1;
                }
                return pass(state, passed, len);
            }
        }
        if gated {
            (*state).gated = 0;
        }
        let mut peer = read_volatile(addr_of!((*state).peer_cookie));
        if SOCKS.redirect_skb(ctx, &mut peer, 0) as u32 != SK_PASS {
            // The peer left the sockhash: keep the bytes for the daemon rather than drop them.
            return pass(state, passed, len);
        }
        (*state).redirected = redirected + len;
        SK_PASS
    }
}

/// Follows the source's sequence numbers and cuts the bytes a retransmission repeats (see the
/// module documentation). Returns the length left to judge, or `None` when the segment must be
/// dropped (nothing new in it, or the direction is broken).
#[inline(always)]
unsafe fn judge_sequence(
    ctx: &SkBuffContext,
    state: *mut DirState,
    index: u32,
    cookie: u64,
    len: u64,
) -> Option<u64> {
    // SAFETY (whole body): the caller holds a valid pointer into the array map.
    unsafe {
        let seq_state = (*state).seq_state;
        if seq_state == SEQ_BROKEN {
            return None;
        }
        let Some(seq) = skb_seq(ctx) else {
            return broken(state, index);
        };
        let expected = if seq_state == SEQ_TRACKED {
            (*state).next_seq
        } else {
            // First segment since the socket was spliced: nothing was judged yet, so the next
            // byte is the first one nobody has read.
            sock_field::<u32>(cookie, COPIED_SEQ_OFFSET.load()).unwrap_or(seq)
        };
        let overlap = expected.wrapping_sub(seq) as i32;
        let len = if overlap > 0 {
            let overlap = overlap as u32;
            if u64::from(overlap) >= len {
                (*state).overlap_trimmed += len;
                return None;
            }
            if !trim_head(ctx, overlap) || u64::from(ctx.len()) + u64::from(overlap) != len {
                return broken(state, index);
            }
            (*state).overlap_trimmed += u64::from(overlap);
            u64::from(ctx.len())
        } else {
            len
        };
        let start = if overlap > 0 { expected } else { seq };
        (*state).next_seq = start.wrapping_add(len as u32);
        (*state).seq_state = SEQ_TRACKED;
        Some(len)
    }
}

/// The segment's first sequence number, from `TCP_SKB_CB(skb)->seq`.
#[inline(always)]
fn skb_seq(ctx: &SkBuffContext) -> Option<u32> {
    let offset = SKB_CB_OFFSET.load() as usize;
    if offset == 0 {
        return None;
    }
    // SAFETY: the context pointer is the kernel's `struct sk_buff`; a fault-safe read of the
    // first four bytes of its control block, where TCP keeps `seq`.
    unsafe { bpf_probe_read_kernel(ctx.skb.skb.cast::<u8>().add(offset).cast::<u32>()) }.ok()
}

/// Cuts `n` bytes off the head of the skb, at most [`TRIM_STEP`] per call.
#[inline(always)]
fn trim_head(ctx: &SkBuffContext, mut n: u32) -> bool {
    for _ in 0..MAX_TRIM_STEPS {
        if n == 0 {
            return true;
        }
        let step = if n > TRIM_STEP { TRIM_STEP } else { n };
        if ctx.adjust_room(-(step as i32), 0, 0).is_err() {
            return false;
        }
        n -= step;
    }
    n == 0
}

/// Marks the direction broken and tells the daemon (always: a pending congestion event may
/// already have been handled).
#[inline(always)]
unsafe fn broken(state: *mut DirState, index: u32) -> Option<u64> {
    // SAFETY: the caller holds a valid pointer into the array map.
    unsafe { (*state).seq_state = SEQ_BROKEN };
    let event = CongestionEvent { index, _pad: 0 };
    let _ = EVENTS.output::<CongestionEvent>(&event, 0);
    None
}

#[inline(always)]
unsafe fn pass(state: *mut DirState, passed: u64, len: u64) -> u32 {
    // SAFETY: the caller holds a valid pointer into the array map.
    unsafe { *addr_of_mut!((*state).passed) = passed + len };
    SK_PASS
}

/// Reads `bytes_acked` of the socket with cookie `peer`, or `None` when it is not in the map.
#[inline(always)]
fn peer_bytes_acked(peer: u64) -> Option<u64> {
    sock_field::<u64>(peer, BYTES_ACKED_OFFSET.load())
}

/// Reads the field at `offset` of the `tcp_sock` of the socket with cookie `cookie`, or `None`
/// when it is not in the map.
#[inline(always)]
fn sock_field<T>(mut cookie: u64, offset: u32) -> Option<T> {
    let socks = addr_of!(SOCKS).cast_mut().cast::<c_void>();
    // SAFETY: `SOCKS` is a `repr(transparent)` wrapper of its map definition, which is what the
    // lookup helper takes; a hit returns a referenced socket that is released below.
    let sk = unsafe { bpf_map_lookup_elem(socks, addr_of_mut!(cookie).cast::<c_void>()) };
    if sk.is_null() {
        return None;
    }
    // SAFETY: `sk` is a valid socket pointer from the lookup above.
    let tcp = unsafe { bpf_skc_to_tcp_sock(sk) };
    let value = if tcp.is_null() || offset == 0 {
        None
    } else {
        // SAFETY: a fault-safe kernel read of one field inside the socket's `tcp_sock`.
        unsafe { bpf_probe_read_kernel(tcp.cast::<u8>().add(offset as usize).cast::<T>()) }.ok()
    };
    // SAFETY: releases the reference taken by the lookup, on every path.
    unsafe { bpf_sk_release(sk) };
    value
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
