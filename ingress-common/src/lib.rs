//! Types shared by the ingressd eBPF programs and the daemon.
//!
//! # Layout
//! Everything lives in this file: the map names, their sizes, and the `#[repr(C)]` value types
//! that both sides read and write. Layouts are append-only across versions (a running program
//! may outlive the daemon that loaded it), and every type carries a size assertion.
#![no_std]

/// Version of the map layouts below; bump it whenever a layout changes.
pub const MAP_LAYOUT_VERSION: u32 = 4;

/// Version of the verdict program; bump it on every change to the program. The loader sets
/// it in the program's [`PROGRAM_VERSION_GLOBAL`], and the program writes it into every
/// direction it judges ([`DirState::program_version`]), so a daemon can tell which program
/// serves a flow.
pub const PROGRAM_VERSION: u32 = 1;

/// Name of the sockhash holding every spliced socket, keyed by socket cookie.
pub const SOCKS_MAP: &str = "SOCKS";
/// Name of the hash map from socket cookie to the index of its direction state.
pub const SOCK_DIR_MAP: &str = "SOCK_DIR";
/// Name of the (mmapable) array of per-direction states.
pub const DIRS_MAP: &str = "DIRS";
/// Name of the ring buffer of congestion events ([`CongestionEvent`]).
pub const EVENTS_MAP: &str = "EVENTS";
/// Name of the global holding the offset of `bytes_acked` in the kernel's `struct tcp_sock`.
pub const BYTES_ACKED_OFFSET_GLOBAL: &str = "BYTES_ACKED_OFFSET";
/// Name of the global holding the offset of `copied_seq` in the kernel's `struct tcp_sock`.
pub const COPIED_SEQ_OFFSET_GLOBAL: &str = "COPIED_SEQ_OFFSET";
/// Name of the global holding the offset of `cb` in the kernel's `struct sk_buff` (TCP keeps a
/// segment's sequence number at its start).
pub const SKB_CB_OFFSET_GLOBAL: &str = "SKB_CB_OFFSET";
/// Name of the global holding the program's version ([`PROGRAM_VERSION`] unless the loader
/// says otherwise).
pub const PROGRAM_VERSION_GLOBAL: &str = "PROGRAM_VERSION";
/// Name of the stream verdict program.
pub const VERDICT_PROGRAM: &str = "splice_verdict";

/// Largest number of sockets the sockhash holds (two per flow).
pub const MAX_SOCKS: u32 = 32_768;
/// Number of per-direction state slots (two per flow).
pub const MAX_DIRS: u32 = MAX_SOCKS;

/// State of one direction of a spliced flow: bytes arriving on the source socket and sent out
/// of its peer, the destination.
///
/// The first 64 bytes are written only by the daemon, the rest only by the verdict program,
/// so neither side ever overwrites the other's fields. Both sides reach the same memory: the
/// daemon maps the array with `mmap`, the program gets a pointer from `bpf_map_lookup_elem`.
/// Reserved fields keep room for later versions without changing the layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirState {
    /// Cookie of the destination socket (the redirect target). Daemon-written.
    pub peer_cookie: u64,
    /// Destination's `bytes_acked` value that counts as zero for this direction. Daemon-written.
    pub acked_base: u64,
    /// Bytes in flight toward the destination (redirected + relayed − delivered) above which
    /// the program stops redirecting and passes bytes to the daemon instead. Daemon-written.
    pub high_water: u64,
    /// Once the gate is closed, the in-flight bytes must fall to this mark before the program
    /// redirects again. Daemon-written.
    pub low_water: u64,
    /// Bytes the daemon has relayed from the source's receive queue to the destination.
    /// Daemon-written.
    pub relayed: u64,
    /// In-flight bytes above which the program asks the daemon (one ring-buffer event) to
    /// close the source's receive window: backpressure without leaving the kernel path.
    /// Daemon-written.
    pub soft_water: u64,
    /// `congestion_events` value the daemon has handled; the program sends a new event only
    /// once the previous one is handled. Daemon-written.
    pub congestion_handled: u64,
    /// Reserved for the daemon, zero.
    pub _daemon_reserved: [u64; 1],
    /// Bytes the program redirected to the destination. Program-written.
    pub redirected: u64,
    /// Bytes the program passed to the source's receive queue for the daemon. Program-written.
    pub passed: u64,
    /// Number of times the program closed the gate (kernel path to relay). Program-written.
    pub gate_closures: u64,
    /// Bytes the destination's receiver had acknowledged when the program last looked (a lower
    /// bound that lets it skip the lookup while far below the mark). Program-written.
    pub delivered_seen: u64,
    /// Non-zero while the gate is closed. Program-written.
    pub gated: u64,
    /// Congestion events sent (in-flight bytes above `soft_water`). Program-written.
    pub congestion_events: u64,
    /// TCP sequence number of the next byte the source has not yet judged. Program-written;
    /// meaningful once `seq_state` is [`SEQ_TRACKED`].
    pub next_seq: u32,
    /// [`SEQ_UNKNOWN`], [`SEQ_TRACKED`] or [`SEQ_BROKEN`]. Program-written.
    pub seq_state: u32,
    /// Bytes at the head of retransmitted segments that repeated bytes already judged, cut off
    /// before the verdict (see the program's documentation). Program-written.
    pub overlap_trimmed: u64,
    /// Version of the program that judged this direction last (0: none yet). Program-written,
    /// on every run.
    pub program_version: u32,
    /// Reserved for the program, zero.
    pub _program_reserved32: u32,
    /// Reserved for the program, zero.
    pub _program_reserved: [u64; 2],
}

/// `DirState::seq_state`: the program has not seen a segment of this direction yet.
pub const SEQ_UNKNOWN: u32 = 0;
/// `DirState::seq_state`: `next_seq` follows the stream.
pub const SEQ_TRACKED: u32 = 1;
/// `DirState::seq_state`: a segment repeating judged bytes could not be cut; the program drops
/// everything from this source and has told the daemon, which resets the flow.
pub const SEQ_BROKEN: u32 = 2;

const _: () = assert!(core::mem::size_of::<DirState>() == 152);

/// A ring-buffer event: direction `index` has more than its soft mark in flight.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CongestionEvent {
    /// Index of the direction state.
    pub index: u32,
    /// Explicit padding, always zero.
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<CongestionEvent>() == 8);

/// Value of the socket-cookie map: which direction state a socket is the source of.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockDir {
    /// Index into the direction array.
    pub index: u32,
    /// Explicit padding, always zero.
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<SockDir>() == 8);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `DirState` is `repr(C)`, made of `u64`s and pairs of `u32`s, with no padding; any
    // bit pattern is a valid value.
    unsafe impl aya::Pod for super::DirState {}
    // SAFETY: `SockDir` is `repr(C)`, two `u32`s with no implicit padding; any bit pattern is
    // valid.
    unsafe impl aya::Pod for super::SockDir {}
    // SAFETY: `CongestionEvent` is `repr(C)`, two `u32`s with no implicit padding.
    unsafe impl aya::Pod for super::CongestionEvent {}
}
