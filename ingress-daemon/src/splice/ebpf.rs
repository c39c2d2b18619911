//! Loads the verdict program once per daemon and manages its maps.
//!
//! `KernelPath` owns the loaded object (dropping it detaches the program: aya 0.14 attaches
//! sk_skb with `BPF_PROG_ATTACH` and detaches on drop), duplicates of the map descriptors for
//! lock-free element updates from any thread, and the memory-mapped direction array.
//!
//! A daemon that takes over another's maps loads its own program on them
//! ([`PreparedProgram::load`]) and attaches it to the sockhash ([`KernelPath::adopt`]): flows inserted from then on run it,
//! flows already in the map keep the program they were inserted with (a socket's psock copies
//! the map's programs at insertion; kernel 4.20+). When that fails, the previous daemon's
//! program stays attached and serves new flows too.
//!
//! Per flow, [`KernelPath::insert`] does, in this order (DESIGN.md §3):
//! 1. read both cookies and each socket's write-sequence baseline (`bytes_acked + SIOCOUTQ`,
//!    taken while nothing else writes to it);
//! 2. fill two direction slots, point each socket's cookie at its slot;
//! 3. insert the backend, then the client, into the sockhash (a redirect to a missing key would
//!    drop acknowledged data);
//! 4. nudge both with `SO_RCVLOWAT` so bytes queued before insertion go through the verdict.

use std::{
    collections::VecDeque,
    mem::offset_of,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::Path,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData},
    programs::SkSkb,
};
use ingress_common::{
    BYTES_ACKED_OFFSET_GLOBAL, COPIED_SEQ_OFFSET_GLOBAL, DIRS_MAP, DirState, EVENTS_MAP, MAX_DIRS,
    PROGRAM_VERSION_GLOBAL, SEQ_BROKEN, SKB_CB_OFFSET_GLOBAL, SOCK_DIR_MAP, SOCKS_MAP, SockDir,
    VERDICT_PROGRAM,
};
use tracing::{info, warn};

use super::{SpliceError, btf, pins};
use crate::sys;

/// The verdict program object, built by `build.rs`.
static PROGRAM_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ingress-ebpf"));

/// Environment variable of a test-only hook: the program version to load instead of
/// [`ingress_common::PROGRAM_VERSION`] (so a test can tell two builds' programs apart).
pub const TEST_PROGRAM_VERSION_ENV: &str = "INGRESSD_TEST_PROGRAM_VERSION";

/// Environment variable of a test-only hook: how many flows the kernel path takes at most
/// (fewer than the maps hold), so a test can fill the kernel's flow table.
pub const TEST_KERNEL_FLOWS_ENV: &str = "INGRESSD_TEST_KERNEL_FLOWS";

/// Direction slots handed out: two per kernel flow, all of them unless
/// [`TEST_KERNEL_FLOWS_ENV`] names fewer flows.
fn dir_slots() -> u32 {
    dir_slots_or_all(std::env::var(TEST_KERNEL_FLOWS_ENV).ok().as_deref())
}

fn dir_slots_or_all(hook: Option<&str>) -> u32 {
    hook.and_then(|v| v.trim().parse::<u32>().ok())
        .map_or(MAX_DIRS, |flows| flows.saturating_mul(2).min(MAX_DIRS))
}

/// The version this daemon loads its program with: [`ingress_common::PROGRAM_VERSION`] unless
/// [`TEST_PROGRAM_VERSION_ENV`] names another.
pub(crate) fn loaded_program_version() -> u32 {
    version_or_default(std::env::var(TEST_PROGRAM_VERSION_ENV).ok().as_deref())
}

fn version_or_default(hook: Option<&str>) -> u32 {
    hook.and_then(|v| v.trim().parse::<u32>().ok())
        .filter(|&v| v != 0)
        .unwrap_or(ingress_common::PROGRAM_VERSION)
}

/// FNV-1a of the embedded program object, in hex, with the version it is loaded with.
pub(crate) fn program_identity() -> String {
    let hash = PROGRAM_OBJECT
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    format!("{hash:016x}-v{}", loaded_program_version())
}

/// Why the kernel path could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The kernel's BTF lacks what the program needs.
    #[error(transparent)]
    Btf(#[from] btf::BtfError),
    /// Loading the object or a map failed (permissions, verifier, kernel too old).
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// Loading or attaching the program failed.
    #[error("loading or attaching the verdict program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    /// The object lacks a map or program the daemon expects.
    #[error("the eBPF object has no {what} named {name}")]
    Missing {
        /// "map" or "program".
        what: &'static str,
        /// Its name.
        name: &'static str,
    },
    /// A system call failed.
    #[error("{call}: {source}")]
    Sys {
        /// The call.
        call: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// No bpffs to pin the handed-over maps in.
    #[error("{path} is not a bpffs mount")]
    NoBpffs {
        /// The directory looked at.
        path: String,
    },
    /// Pinning a handed-over map failed.
    #[error("pinning map {name} in {path}: {source}")]
    Pin {
        /// The map.
        name: &'static str,
        /// The pin path.
        path: String,
        /// The error.
        source: aya::pin::PinError,
    },
    /// The takeover did not prepare a program for the handed-over maps.
    #[error("no program was prepared for the handed-over maps")]
    NotPrepared,
    /// A map of the loaded object is not the handed-over map (the pin did not lead to it).
    #[error("map {name} loaded as map id {loaded}, but the handed-over map has id {received}")]
    MapMismatch {
        /// The map.
        name: &'static str,
        /// Kernel id of the handed-over map.
        received: u32,
        /// Kernel id of the map the object uses.
        loaded: u32,
    },
}

/// A direction's slot in the shared array.
pub(crate) type DirIndex = u32;

/// Fields of a direction slot, as atomics in the shared mapping.
pub(crate) struct DirView<'a> {
    base: usize,
    mapping: &'a sys::SharedMapping,
}

impl DirView<'_> {
    fn field(&self, offset: usize) -> Option<&AtomicU64> {
        self.mapping.atomic_u64(self.base + offset)
    }

    fn load(&self, offset: usize) -> u64 {
        self.field(offset).map_or(0, |f| f.load(Ordering::Acquire))
    }

    fn store(&self, offset: usize, value: u64) {
        if let Some(f) = self.field(offset) {
            f.store(value, Ordering::Release);
        }
    }

    /// Bytes the program redirected.
    pub(crate) fn redirected(&self) -> u64 {
        self.load(offset_of!(DirState, redirected))
    }

    /// Bytes the program passed to the daemon.
    pub(crate) fn passed(&self) -> u64 {
        self.load(offset_of!(DirState, passed))
    }

    /// Times the gate closed.
    pub(crate) fn gate_closures(&self) -> u64 {
        self.load(offset_of!(DirState, gate_closures))
    }

    /// Whether the gate is closed now.
    pub(crate) fn gated(&self) -> bool {
        self.load(offset_of!(DirState, gated)) != 0
    }

    /// Congestion events the program sent.
    pub(crate) fn congestion_events(&self) -> u64 {
        self.load(offset_of!(DirState, congestion_events))
    }

    /// Whether the program could not cut a retransmitted segment's repeated head and now
    /// drops everything from the source: the flow must be reset.
    pub(crate) fn broken(&self) -> bool {
        // `next_seq` and `seq_state` share one 64-bit word, `seq_state` in its upper half.
        let word = self.load(offset_of!(DirState, next_seq));
        u32::try_from(word >> 32).is_ok_and(|state| state == SEQ_BROKEN)
    }

    /// Version of the program that judged this direction last (0: none yet).
    pub(crate) fn program_version(&self) -> u32 {
        // `program_version` is the lower half of its 64-bit word.
        (self.load(offset_of!(DirState, program_version)) & u64::from(u32::MAX)) as u32
    }

    /// Bytes of retransmitted segments the program cut because they repeated judged bytes.
    pub(crate) fn overlap_trimmed(&self) -> u64 {
        self.load(offset_of!(DirState, overlap_trimmed))
    }

    /// Congestion events handled so far.
    pub(crate) fn congestion_handled(&self) -> u64 {
        self.load(offset_of!(DirState, congestion_handled))
    }

    /// Marks congestion events up to `events` handled (the program may send the next one).
    pub(crate) fn set_congestion_handled(&self, events: u64) {
        self.store(offset_of!(DirState, congestion_handled), events);
    }

    /// The low-water mark.
    pub(crate) fn low_water(&self) -> u64 {
        self.load(offset_of!(DirState, low_water))
    }

    /// The window cap that goes with this direction's soft and high marks (see
    /// [`super::window_cap`]).
    pub(crate) fn window_cap(&self) -> u32 {
        super::window_cap(
            self.load(offset_of!(DirState, soft_water)),
            self.load(offset_of!(DirState, high_water)),
        )
    }

    /// The destination baseline.
    pub(crate) fn acked_base(&self) -> u64 {
        self.load(offset_of!(DirState, acked_base))
    }

    /// Publishes the bytes the daemon relayed (written to the destination).
    pub(crate) fn set_relayed(&self, bytes: u64) {
        self.store(offset_of!(DirState, relayed), bytes);
    }

    /// Changes the water marks of a live direction.
    pub(crate) fn set_marks(&self, high_water: u64, low_water: u64) {
        self.store(offset_of!(DirState, low_water), low_water);
        self.store(offset_of!(DirState, high_water), high_water);
    }

    fn init(&self, state: &DirState) {
        // Program-written fields first: no socket points at this slot yet.
        self.store(offset_of!(DirState, redirected), state.redirected);
        self.store(offset_of!(DirState, passed), state.passed);
        self.store(offset_of!(DirState, gate_closures), state.gate_closures);
        self.store(offset_of!(DirState, delivered_seen), state.delivered_seen);
        self.store(offset_of!(DirState, gated), state.gated);
        self.store(
            offset_of!(DirState, next_seq),
            u64::from(state.next_seq) | (u64::from(state.seq_state) << 32),
        );
        self.store(offset_of!(DirState, overlap_trimmed), state.overlap_trimmed);
        self.store(
            offset_of!(DirState, program_version),
            u64::from(state.program_version),
        );
        for (i, &word) in state._program_reserved.iter().enumerate() {
            self.store(offset_of!(DirState, _program_reserved) + 8 * i, word);
        }
        self.store(offset_of!(DirState, relayed), state.relayed);
        self.store(
            offset_of!(DirState, congestion_events),
            state.congestion_events,
        );
        self.store(
            offset_of!(DirState, congestion_handled),
            state.congestion_handled,
        );
        self.store(offset_of!(DirState, soft_water), state.soft_water);
        self.store(offset_of!(DirState, peer_cookie), state.peer_cookie);
        self.store(offset_of!(DirState, acked_base), state.acked_base);
        self.set_marks(state.high_water, state.low_water);
    }
}

/// Which program serves the flows inserted from now on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServingProgram {
    /// Its version (0: unknown, a previous daemon's program that did not say).
    pub version: u32,
    /// Whether this daemon loaded it (`false`: the previous daemon's program stayed attached).
    pub own: bool,
    /// Why this daemon's own program is not attached, when it is not.
    pub fallback_reason: Option<String>,
}

/// The loaded verdict program and its maps.
pub(crate) struct KernelPath {
    /// Keeps this daemon's program loaded and attached (dropping it detaches); `None` when the
    /// maps were handed over and the previous daemon's program stayed attached (the sockhash
    /// holds a reference to it).
    object: Mutex<Option<Ebpf>>,
    /// The program serving new flows.
    serving: ServingProgram,
    socks: OwnedFd,
    sock_dir: OwnedFd,
    dirs_fd: OwnedFd,
    events_fd: OwnedFd,
    dirs: sys::SharedMapping,
    /// Congestion events from the program; taken once by the engine's event task.
    events: Mutex<Option<aya::maps::RingBuf<MapData>>>,
    /// Free direction slots, oldest-freed first, so a slot is reused as late as possible.
    free: Mutex<VecDeque<DirIndex>>,
    /// Direction slots handed out at most ([`dir_slots`]).
    slots: u32,
    /// Offset of `bytes_acked` in `struct tcp_sock`, as read from BTF.
    pub(crate) bytes_acked_offset: u64,
}

/// The descriptors of the kernel path's maps, as handed from one daemon to the next.
#[derive(Debug)]
pub struct MapFds {
    /// The sockhash ([`SOCKS_MAP`]).
    pub socks: OwnedFd,
    /// Cookie → direction slot ([`SOCK_DIR_MAP`]).
    pub sock_dir: OwnedFd,
    /// The direction array ([`DIRS_MAP`]).
    pub dirs: OwnedFd,
    /// The congestion ring buffer.
    pub events: OwnedFd,
}

/// The in-flight marks of a direction (see the verdict program).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Marks {
    /// Close the window (one event to the daemon) above this.
    pub(crate) soft_water: u64,
    /// Pass bytes to the daemon above this.
    pub(crate) high_water: u64,
    /// Once passing, resume redirecting at or below this.
    pub(crate) low_water: u64,
}

/// The kernel side of one spliced flow.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KernelFlow {
    /// Cookies of the client and backend sockets.
    pub(crate) cookies: [u64; 2],
    /// Direction slots: `[client → backend, backend → client]`.
    pub(crate) dirs: [DirIndex; 2],
}

/// A BTF member offset the program takes as a `u32` (non-zero: zero means unknown to it).
fn offset32(offset: u64, reason: &'static str) -> Result<u32, LoadError> {
    u32::try_from(offset)
        .ok()
        .filter(|&o| o != 0)
        .ok_or(LoadError::Btf(btf::BtfError::Malformed { reason }))
}

fn map_data<'a>(object: &'a Ebpf, name: &'static str) -> Result<&'a MapData, LoadError> {
    match object.map(name) {
        Some(Map::SockHash(data) | Map::HashMap(data) | Map::Array(data) | Map::RingBuf(data)) => {
            Ok(data)
        }
        _ => Err(LoadError::Missing { what: "map", name }),
    }
}

fn map_fd(object: &Ebpf, name: &'static str) -> Result<OwnedFd, LoadError> {
    map_data(object, name)?
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| LoadError::Sys {
            call: "dup map fd",
            source,
        })
}

impl KernelPath {
    /// Loads and attaches the verdict program. Fails without privilege (CAP_BPF, CAP_NET_ADMIN,
    /// CAP_PERFMON) or on kernels without the needed helpers (`bpf_skc_to_tcp_sock`: 5.9+).
    pub(crate) fn load() -> Result<Self, LoadError> {
        let (mut object, offset) = load_object(None)?;
        let socks = map_fd(&object, SOCKS_MAP)?;
        let sock_dir = map_fd(&object, SOCK_DIR_MAP)?;
        let dirs_fd = map_fd(&object, DIRS_MAP)?;
        let dirs = map_dirs(dirs_fd.as_fd())?;
        let events = match object.take_map(EVENTS_MAP) {
            Some(map) => aya::maps::RingBuf::try_from(map).map_err(aya::EbpfError::MapError)?,
            None => {
                return Err(LoadError::Missing {
                    what: "map",
                    name: EVENTS_MAP,
                });
            }
        };
        attach_verdict(&mut object)?;
        let events_fd = events
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| LoadError::Sys {
                call: "dup ring buffer fd",
                source,
            })?;
        let slots = dir_slots();
        Ok(Self {
            object: Mutex::new(Some(object)),
            serving: ServingProgram {
                version: loaded_program_version(),
                own: true,
                fallback_reason: None,
            },
            socks,
            sock_dir,
            dirs_fd,
            events_fd,
            dirs,
            events: Mutex::new(Some(events)),
            free: Mutex::new((0..slots).collect()),
            slots,
            bytes_acked_offset: offset,
        })
    }

    /// Takes over the maps of another daemon's kernel path and attaches this daemon's program,
    /// `prepared` on them beforehand (flows already in the sockhash keep the program they were
    /// inserted with). When that fails, the program the other daemon attached (version
    /// `inherited_version`, 0 if unknown) stays attached and serves new flows too. `used` lists
    /// the direction slots of the flows handed over with the maps.
    pub(crate) fn adopt(
        maps: MapFds,
        used: &[DirIndex],
        inherited_version: u32,
        prepared: Result<PreparedProgram, LoadError>,
    ) -> Result<Self, LoadError> {
        // Everything that can fail comes before the attach: once attached, dropping the object
        // on an error would leave the sockhash without a program.
        let dirs = map_dirs(maps.dirs.as_fd())?;
        let ring_fd = maps.events.try_clone().map_err(|source| LoadError::Sys {
            call: "dup ring buffer fd",
            source,
        })?;
        let ring_data = MapData::from_fd(ring_fd).map_err(aya::EbpfError::MapError)?;
        let events = aya::maps::RingBuf::try_from(Map::RingBuf(ring_data))
            .map_err(aya::EbpfError::MapError)?;
        let attached = prepared.and_then(|mut p| {
            attach_verdict(&mut p.object)?;
            Ok((p.object, p.bytes_acked_offset))
        });
        let (object, serving, bytes_acked_offset) = match attached {
            Ok((object, offset)) => {
                let version = loaded_program_version();
                info!(
                    version,
                    previous = inherited_version,
                    "own verdict program attached to the handed-over maps; live flows keep theirs"
                );
                let serving = ServingProgram {
                    version,
                    own: true,
                    fallback_reason: None,
                };
                (Some(object), serving, offset)
            }
            Err(err) => {
                warn!(
                    error = %err,
                    version = inherited_version,
                    "cannot attach this daemon's verdict program; new flows keep the previous \
                     daemon's"
                );
                let serving = ServingProgram {
                    version: inherited_version,
                    own: false,
                    fallback_reason: Some(err.to_string()),
                };
                (None, serving, 0)
            }
        };
        let MapFds {
            socks,
            sock_dir,
            dirs: dirs_fd,
            events: events_fd,
        } = maps;
        let in_use: std::collections::HashSet<DirIndex> = used.iter().copied().collect();
        let slots = dir_slots();
        Ok(Self {
            object: Mutex::new(object),
            serving,
            socks,
            sock_dir,
            dirs_fd,
            events_fd,
            dirs,
            events: Mutex::new(Some(events)),
            free: Mutex::new((0..slots).filter(|d| !in_use.contains(d)).collect()),
            // Adopted flows may hold slots beyond a test hook's limit.
            slots: slots + in_use.iter().filter(|&&d| d >= slots).count() as u32,
            bytes_acked_offset,
        })
    }

    /// The program serving new flows.
    pub(crate) fn serving(&self) -> &ServingProgram {
        &self.serving
    }

    /// Attaches this daemon's program to the sockhash again, after a hand-off that failed once
    /// the next daemon may have attached its own. Without a program of its own (the previous
    /// daemon's stayed attached) there is nothing to restore.
    pub(crate) fn reattach(&self) {
        let Ok(mut object) = self.object.lock() else {
            return;
        };
        if let Some(object) = object.as_mut()
            && let Err(err) = attach_verdict(object)
        {
            warn!(error = %err, "re-attaching the verdict program");
        }
    }

    /// Duplicates of the map descriptors, for a hand-off to another daemon.
    pub(crate) fn export_maps(&self) -> std::io::Result<MapFds> {
        Ok(MapFds {
            socks: self.socks.try_clone()?,
            sock_dir: self.sock_dir.try_clone()?,
            dirs: self.dirs_fd.try_clone()?,
            events: self.events_fd.try_clone()?,
        })
    }

    /// The congestion event ring (once).
    pub(crate) fn take_events(&self) -> Option<aya::maps::RingBuf<MapData>> {
        self.events.lock().ok()?.take()
    }

    /// View of direction slot `index`.
    pub(crate) fn dir(&self, index: DirIndex) -> DirView<'_> {
        DirView {
            base: index as usize * size_of::<DirState>(),
            mapping: &self.dirs,
        }
    }

    fn alloc(&self) -> Option<[DirIndex; 2]> {
        let mut free = self.free.lock().ok()?;
        if free.len() < 2 {
            return None;
        }
        Some([free.pop_front()?, free.pop_front()?])
    }

    fn release(&self, dirs: [DirIndex; 2]) {
        if let Ok(mut free) = self.free.lock() {
            free.extend(dirs);
        }
    }

    /// Number of direction slots in use (two per kernel flow).
    pub(crate) fn dirs_in_use(&self) -> u64 {
        self.free.lock().map_or(0, |free| {
            u64::from(self.slots).saturating_sub(free.len() as u64)
        })
    }

    /// Hands the two sockets to the kernel. On error nothing stays in the maps.
    pub(crate) fn insert(
        &self,
        client: BorrowedFd<'_>,
        backend: BorrowedFd<'_>,
        marks: Marks,
    ) -> Result<KernelFlow, SpliceError> {
        let sys_err = |call: &'static str| move |source| SpliceError::Sys { call, source };
        let cookies = [
            sys::socket_cookie(client).map_err(sys_err("SO_COOKIE"))?,
            sys::socket_cookie(backend).map_err(sys_err("SO_COOKIE"))?,
        ];
        let bases = [
            write_seq_baseline(client).map_err(sys_err("TCP_INFO"))?,
            write_seq_baseline(backend).map_err(sys_err("TCP_INFO"))?,
        ];
        let dirs = self.alloc().ok_or(SpliceError::MapFull)?;
        // Direction i reads socket i and writes socket 1 - i.
        for (i, &index) in dirs.iter().enumerate() {
            self.dir(index).init(&DirState {
                peer_cookie: cookies[1 - i],
                acked_base: bases[1 - i],
                high_water: marks.high_water,
                low_water: marks.low_water,
                soft_water: marks.soft_water,
                ..DirState::default()
            });
        }
        let result = self.insert_maps(cookies, dirs, client, backend);
        if let Err(err) = result {
            for cookie in cookies {
                let _ = sys::bpf_map_delete(self.sock_dir.as_fd(), &cookie.to_ne_bytes());
                let _ = sys::bpf_map_delete(self.socks.as_fd(), &cookie.to_ne_bytes());
            }
            self.release(dirs);
            return Err(err);
        }
        // Bytes queued before insertion wait for the next segment unless nudged.
        for fd in [backend, client] {
            sys::set_rcvlowat(fd, 1).map_err(sys_err("SO_RCVLOWAT"))?;
        }
        Ok(KernelFlow { cookies, dirs })
    }

    fn insert_maps(
        &self,
        cookies: [u64; 2],
        dirs: [DirIndex; 2],
        client: BorrowedFd<'_>,
        backend: BorrowedFd<'_>,
    ) -> Result<(), SpliceError> {
        for (cookie, index) in cookies.iter().zip(dirs) {
            let value = SockDir { index, _pad: 0 };
            let bytes = [index.to_ne_bytes(), value._pad.to_ne_bytes()].concat();
            sys::bpf_map_update(self.sock_dir.as_fd(), &cookie.to_ne_bytes(), &bytes, 0).map_err(
                |source| SpliceError::Sys {
                    call: "update SOCK_DIR",
                    source,
                },
            )?;
        }
        // Backend first: the client's queued bytes are redirected as soon as it is inserted.
        for (cookie, fd) in [(cookies[1], backend), (cookies[0], client)] {
            let raw = u32::try_from(std::os::fd::AsRawFd::as_raw_fd(&fd)).unwrap_or(u32::MAX);
            sys::bpf_map_update(
                self.socks.as_fd(),
                &cookie.to_ne_bytes(),
                &raw.to_ne_bytes(),
                0,
            )
            .map_err(|source| SpliceError::Sys {
                call: "insert into SOCKS",
                source,
            })?;
        }
        Ok(())
    }

    /// Forgets a flow whose sockets are about to be closed (closing removes them from the
    /// sockhash; the cookie entries are removed here).
    pub(crate) fn remove(&self, flow: &KernelFlow) {
        for cookie in flow.cookies {
            let _ = sys::bpf_map_delete(self.sock_dir.as_fd(), &cookie.to_ne_bytes());
        }
        self.release(flow.dirs);
    }

    /// Number of entries in the cookie map and the sockhash, by iterating their keys (for
    /// tests and diagnostics; O(entries)).
    pub(crate) fn map_occupancy(&self) -> (usize, usize) {
        (
            count_keys(self.sock_dir.as_fd()),
            count_keys(self.socks.as_fd()),
        )
    }
}

/// Loads the object with the globals the program needs; with `pins`, its four maps are the
/// pinned ones (opened, not created). Returns it with `tcp_sock.bytes_acked`'s offset.
fn load_object(pins: Option<&pins::PinnedMaps>) -> Result<(Ebpf, u64), LoadError> {
    let offset = btf::kernel_member_offset("tcp_sock", "bytes_acked")?;
    let acked32 = offset32(offset, "tcp_sock.bytes_acked offset out of range")?;
    let copied_seq = offset32(
        btf::kernel_member_offset("tcp_sock", "copied_seq")?,
        "tcp_sock.copied_seq offset out of range",
    )?;
    let skb_cb = offset32(
        btf::kernel_member_offset("sk_buff", "cb")?,
        "sk_buff.cb offset out of range",
    )?;
    let version = loaded_program_version();
    let mut loader = EbpfLoader::new();
    loader
        .override_global(BYTES_ACKED_OFFSET_GLOBAL, &acked32, true)
        .override_global(COPIED_SEQ_OFFSET_GLOBAL, &copied_seq, true)
        .override_global(SKB_CB_OFFSET_GLOBAL, &skb_cb, true)
        .override_global(PROGRAM_VERSION_GLOBAL, &version, true);
    if let Some(pins) = pins {
        for (name, path) in pins.paths() {
            loader.map_pin_path(name, Path::new(path));
        }
    }
    Ok((loader.load(PROGRAM_OBJECT)?, offset))
}

/// Loads and attaches the verdict to the object's sockhash (replacing the program attached
/// there for sockets inserted from now on).
fn attach_verdict(object: &mut Ebpf) -> Result<(), LoadError> {
    let socks_map_fd = match object.map(SOCKS_MAP) {
        Some(map @ Map::SockHash(_)) => aya::maps::SockHash::<_, u64>::try_from(map)
            .map_err(aya::EbpfError::MapError)?
            .fd()
            .try_clone()
            .map_err(|source| LoadError::Sys {
                call: "dup sockhash fd",
                source,
            })?,
        _ => {
            return Err(LoadError::Missing {
                what: "map",
                name: SOCKS_MAP,
            });
        }
    };
    let program = verdict_program(object)?;
    if program.fd().is_err() {
        program.load()?;
    }
    program.attach(&socks_map_fd)?;
    Ok(())
}

/// The object's stream verdict program.
fn verdict_program(object: &mut Ebpf) -> Result<&mut SkSkb, LoadError> {
    Ok(object
        .program_mut(VERDICT_PROGRAM)
        .ok_or(LoadError::Missing {
            what: "program",
            name: VERDICT_PROGRAM,
        })?
        .try_into()?)
}

/// This daemon's program, loaded (and verified) on another daemon's maps, not attached yet.
pub struct PreparedProgram {
    object: Ebpf,
    bytes_acked_offset: u64,
}

impl std::fmt::Debug for PreparedProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedProgram").finish_non_exhaustive()
    }
}

impl PreparedProgram {
    /// Loads this daemon's program on handed-over maps (pinned for the load, unpinned on
    /// every path), after checking that every map of the object is the handed-over one. The
    /// verifier runs here, so attaching later is instant.
    pub fn load(maps: &MapFds) -> Result<Self, LoadError> {
        let (object, bytes_acked_offset) = load_on_maps(maps)?;
        Ok(Self {
            object,
            bytes_acked_offset,
        })
    }
}

fn load_on_maps(maps: &MapFds) -> Result<(Ebpf, u64), LoadError> {
    let pinned = pins::PinnedMaps::pin(maps)?;
    let (mut object, offset) = load_object(Some(&pinned))?;
    for (name, received) in pinned.ids() {
        let loaded = map_data(&object, name)?
            .info()
            .map_err(aya::EbpfError::MapError)?
            .id();
        if loaded != received {
            return Err(LoadError::MapMismatch {
                name,
                received,
                loaded,
            });
        }
    }
    drop(pinned);
    let program = verdict_program(&mut object)?;
    program.load()?;
    Ok((object, offset))
}

/// Maps the direction array (`DIRS`, mmapable) into this process.
fn map_dirs(dirs: BorrowedFd<'_>) -> Result<sys::SharedMapping, LoadError> {
    sys::SharedMapping::new(dirs, MAX_DIRS as usize * size_of::<DirState>()).map_err(|source| {
        LoadError::Sys {
            call: "mmap direction array",
            source,
        }
    })
}

fn count_keys(map: BorrowedFd<'_>) -> usize {
    let mut count = 0;
    let mut key: Option<u64> = None;
    while let Ok(Some(next)) = sys::bpf_map_next_key(map, key) {
        count += 1;
        key = Some(next);
        if count > (2 * MAX_DIRS) as usize {
            break;
        }
    }
    count
}

/// The socket's write sequence relative to its start (`bytes_acked + SIOCOUTQ`), read while
/// nothing else writes to it: retried until `bytes_acked` is stable around the `SIOCOUTQ`
/// read, so an ACK in between cannot make it overcount.
fn write_seq_baseline(fd: BorrowedFd<'_>) -> std::io::Result<u64> {
    let mut acked = sys::tcp_counters(fd)?.bytes_acked;
    for _ in 0..16 {
        let queued = sys::outq(fd)?;
        let again = sys::tcp_counters(fd)?.bytes_acked;
        if again == acked {
            return Ok(acked + queued);
        }
        acked = again;
    }
    Err(std::io::Error::other("send queue never settled"))
}

#[cfg(test)]
mod tests {
    use super::{dir_slots_or_all, version_or_default};

    #[test]
    fn the_test_hook_overrides_the_program_version_only_with_a_positive_number() {
        let built = ingress_common::PROGRAM_VERSION;
        assert_eq!(version_or_default(None), built);
        assert_eq!(version_or_default(Some("7")), 7);
        assert_eq!(version_or_default(Some(" 8 ")), 8);
        assert_eq!(version_or_default(Some("0")), built);
        assert_eq!(version_or_default(Some("x")), built);
    }

    #[test]
    fn the_test_hook_limits_kernel_flows_to_what_the_maps_hold() {
        let all = ingress_common::MAX_DIRS;
        assert_eq!(dir_slots_or_all(None), all);
        assert_eq!(dir_slots_or_all(Some("1")), 2);
        assert_eq!(dir_slots_or_all(Some(" 3 ")), 6);
        assert_eq!(dir_slots_or_all(Some("4000000000")), all);
        assert_eq!(dir_slots_or_all(Some("x")), all);
    }
}
