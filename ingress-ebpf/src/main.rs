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
use ingress_common::{CongestionEvent, DirState, MAX_DIRS, MAX_SOCKS, SockDir};

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

/// Version of this program, exposed so a daemon can tell which program a flow runs under.
#[unsafe(no_mangle)]
static PROGRAM_VERSION: Global<u32> = Global::new(ingress_common::MAP_LAYOUT_VERSION);

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
    // SAFETY: `state` points into the array map for as long as the program runs; the verdict of
    // one socket does not run concurrently with itself. Daemon-written fields are read volatile.
    unsafe {
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

#[inline(always)]
unsafe fn pass(state: *mut DirState, passed: u64, len: u64) -> u32 {
    // SAFETY: the caller holds a valid pointer into the array map.
    unsafe { *addr_of_mut!((*state).passed) = passed + len };
    SK_PASS
}

/// Reads `bytes_acked` of the socket with cookie `peer`, or `None` when it is not in the map.
#[inline(always)]
fn peer_bytes_acked(mut peer: u64) -> Option<u64> {
    let socks = addr_of!(SOCKS).cast_mut().cast::<c_void>();
    // SAFETY: `SOCKS` is a `repr(transparent)` wrapper of its map definition, which is what the
    // lookup helper takes; a hit returns a referenced socket that is released below.
    let sk = unsafe { bpf_map_lookup_elem(socks, addr_of_mut!(peer).cast::<c_void>()) };
    if sk.is_null() {
        return None;
    }
    // SAFETY: `sk` is a valid socket pointer from the lookup above.
    let tcp = unsafe { bpf_skc_to_tcp_sock(sk) };
    let acked = if tcp.is_null() {
        None
    } else {
        let offset = BYTES_ACKED_OFFSET.load() as usize;
        // SAFETY: a fault-safe kernel read of eight bytes inside the peer's `tcp_sock`.
        unsafe { bpf_probe_read_kernel(tcp.cast::<u8>().add(offset).cast::<u64>()) }.ok()
    };
    // SAFETY: releases the reference taken by the lookup, on every path.
    unsafe { bpf_sk_release(sk) };
    acked
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
