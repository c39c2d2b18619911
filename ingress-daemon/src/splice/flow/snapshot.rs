//! A flow's state out of and back into a [`Flow`], for a takeover (see `splice::handoff`).

use std::{
    os::fd::OwnedFd,
    time::{Duration, Instant},
};

use super::{BufferPool, Dir, Flow, Handback, KernelFlow, RelayBuf};

/// The third field of a saved hold for a zero-window hold (a one-segment hold saves the reverse
/// direction's byte count there).
const ZERO_WINDOW: u64 = u64::MAX;

impl Flow {
    /// The flow's state for a hand-off to another daemon, with copies of the bytes its relay
    /// holds (read from a source, not yet written to the destination).
    pub(in crate::splice) fn export(&self) -> (crate::splice::handoff::FlowState, [Vec<u8>; 2]) {
        let dir = |d: &Dir| crate::splice::handoff::DirState {
            consumed_pre: d.consumed_pre,
            read: d.read,
            relayed: d.relayed,
            fin_seen: d.fin_seen,
            eof: d.eof,
            shut: d.shut,
            hold: match d.handback {
                Handback::Idle => None,
                Handback::Holding {
                    clamp,
                    held,
                    reverse_seen,
                } => Some((clamp, held, reverse_seen.unwrap_or(ZERO_WINDOW))),
            },
        };
        let pending = |d: &Dir| {
            d.buf
                .as_ref()
                .and_then(|b| b.data.get(b.start..b.end))
                .map(<[u8]>::to_vec)
                .unwrap_or_default()
        };
        let state = crate::splice::handoff::FlowState {
            id: self.id,
            tag: self.tag,
            kernel: self.kernel.map(|k| crate::splice::handoff::KernelState {
                cookies: k.cookies,
                dirs: k.dirs,
            }),
            dirs: [dir(&self.dirs[0]), dir(&self.dirs[1])],
            age_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            idle_timeout_ms: self
                .idle
                .as_ref()
                .map(|i| u64::try_from(i.timeout.as_millis()).unwrap_or(u64::MAX)),
            meta: self.on_end.as_ref().and_then(|h| h.describe()),
        };
        (state, [pending(&self.dirs[0]), pending(&self.dirs[1])])
    }

    /// A flow handed over by another daemon, in the state [`Self::export`] gave.
    pub(in crate::splice) fn restore(
        state: &crate::splice::handoff::FlowState,
        socks: [OwnedFd; 2],
        pending: [Vec<u8>; 2],
        on_end: Option<crate::splice::OnEnd>,
        pool: &mut BufferPool,
    ) -> Self {
        let mut flow = Self::new(
            state.id,
            state.tag,
            socks,
            state.kernel.map(|k| KernelFlow {
                cookies: k.cookies,
                dirs: k.dirs,
            }),
            crate::splice::Preamble {
                client_consumed: state.dirs[0].consumed_pre,
                backend_consumed: state.dirs[1].consumed_pre,
                // Restored from the saved state below.
                shut: [false; 2],
            },
            on_end,
            state.idle_timeout_ms.map(Duration::from_millis),
        );
        flow.started = Instant::now()
            .checked_sub(Duration::from_millis(state.age_ms))
            .unwrap_or_else(Instant::now);
        for ((dir, saved), bytes) in flow.dirs.iter_mut().zip(&state.dirs).zip(pending) {
            dir.read = saved.read;
            dir.relayed = saved.relayed;
            dir.fin_seen = saved.fin_seen;
            dir.eof = saved.eof;
            dir.shut = saved.shut;
            if let Some((clamp, held, seen)) = saved.hold {
                dir.handback = Handback::Holding {
                    clamp,
                    held,
                    reverse_seen: (seen != ZERO_WINDOW).then_some(seen),
                };
            }
            if !bytes.is_empty() {
                let mut data = pool.get_for(bytes.len());
                if let Some(head) = data.get_mut(..bytes.len()) {
                    head.copy_from_slice(&bytes);
                }
                dir.buf = Some(RelayBuf {
                    data,
                    start: 0,
                    end: bytes.len(),
                });
            }
        }
        flow
    }
}
