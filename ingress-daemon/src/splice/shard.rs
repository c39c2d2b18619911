//! A shard: one epoll instance and the flows registered in it, driven by one tokio task.
//!
//! Flows are plain structs in a slab, not tasks: an idle spliced flow costs its slab entry and
//! nothing else. Each socket is registered edge-triggered for `EPOLLIN | EPOLLRDHUP` (plus
//! `EPOLLOUT` while a relay write is blocked); the epoll fd itself is registered in tokio's
//! reactor. Tokens are `generation << 32 | slot << 1 | side`, so an event for a slot that was
//! freed and reused in the same batch is ignored. Polled conditions (FIN coverage, redirected
//! bytes reaching the destination) use a timer heap with exponential backoff.

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    os::fd::AsFd,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, oneshot},
};
use tracing::{debug, warn};

use super::{
    EngineStats, ExportedFlow, FlowEnd, FlowInfo, NewFlow, TagBytes, Usage,
    ebpf::KernelPath,
    flow::{BufferPool, Cx, Flow, Step, recheck_delay},
};
use crate::sys::{Epoll, EpollEvent};

/// Requests to a shard.
pub(super) enum Command {
    /// Take over a flow (its sockets are already in the maps when it has a kernel part).
    Add(Box<NewFlow>),
    /// Change the water marks of a live flow (both directions).
    SetMarks {
        id: u64,
        high_water: u64,
        low_water: u64,
    },
    /// List at most `limit` live flows with an ID above `after`, in ID order.
    Snapshot {
        after: u64,
        limit: usize,
        reply: oneshot::Sender<Vec<FlowInfo>>,
    },
    /// The verdict reported congestion on a direction slot of a flow of this shard.
    Congested { dir: u32 },
    /// Sum bytes by tag, finished and live flows together.
    Usage(oneshot::Sender<Usage>),
    /// Stop taking flows, wait up to `drain` for the live ones to end, reset the rest.
    Shutdown {
        drain: Duration,
        done: oneshot::Sender<()>,
    },
    /// Stop handling events and timers, and export every flow (a hand-off).
    Freeze(oneshot::Sender<std::io::Result<Vec<ExportedFlow>>>),
    /// Handle events and timers again, including what arrived while frozen.
    Resume,
    /// Forget every flow without touching its sockets or map entries, and stop.
    Release,
    /// Take over a flow handed over by another daemon.
    Adopt(Box<(ExportedFlow, Option<super::OnEnd>)>),
}

struct Slot {
    generation: u32,
    flow: Option<Flow>,
}

pub(super) struct Shard {
    epoll: Arc<AsyncFd<Epoll>>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    timers: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    kernel: Option<Arc<KernelPath>>,
    pool: BufferPool,
    /// [`super::EngineConfig::receive_buffer_bytes`], applied at a flow's first hold.
    receive_buffer_bytes: u64,
    stats: Arc<EngineStats>,
    live: usize,
    /// Finished flows' bytes by tag, and their gate closures.
    finished: Usage,
    /// Kernel direction slot → (flow slot, generation), for congestion events.
    by_dir: std::collections::HashMap<u32, (u32, u32)>,
}

fn token(generation: u32, slot: u32, side: usize) -> u64 {
    (u64::from(generation) << 32) | (u64::from(slot) << 1) | side as u64
}

impl Shard {
    pub(super) fn new(
        kernel: Option<Arc<KernelPath>>,
        relay_buffer_bytes: usize,
        receive_buffer_bytes: u64,
        stats: Arc<EngineStats>,
    ) -> std::io::Result<Self> {
        let epoll = Arc::new(Epoll::new_async()?);
        Ok(Self {
            epoll,
            slots: Vec::new(),
            free: Vec::new(),
            timers: BinaryHeap::new(),
            kernel,
            pool: BufferPool::new(relay_buffer_bytes),
            receive_buffer_bytes,
            stats,
            live: 0,
            finished: Usage::default(),
            by_dir: std::collections::HashMap::new(),
        })
    }

    /// Runs until shut down (or until the engine is dropped and the last flow ends).
    pub(super) async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut shutdown: Option<(Instant, oneshot::Sender<()>)> = None;
        let mut accepting = true;
        let mut frozen = false;
        let epoll = self.epoll.clone();
        loop {
            if !accepting && self.live == 0 {
                break;
            }
            if let Some((deadline, _)) = &shutdown
                && Instant::now() >= *deadline
            {
                self.abort_all();
                break;
            }
            let next_timer = self.timers.peek().map(|Reverse((at, _, _))| *at);
            let wake_at = match (&shutdown, next_timer) {
                (Some((deadline, _)), Some(at)) => Some(at.min(*deadline)),
                (Some((deadline, _)), None) => Some(*deadline),
                (None, at) => at,
            };
            let wake_at = if frozen { None } else { wake_at };
            tokio::select! {
                ready = epoll.readable(), if !frozen => match ready {
                    Ok(mut guard) => {
                        self.drain_events();
                        guard.clear_ready();
                    }
                    Err(err) => {
                        warn!(error = %err, "splice shard epoll failed");
                        self.abort_all();
                        break;
                    }
                },
                command = commands.recv(), if accepting => match command {
                    Some(Command::Add(new)) => self.add(*new),
                    Some(Command::Congested { dir }) => {
                        if frozen {
                            // Recovered from the counters by whoever runs the flow next.
                        } else if let Some(&(slot, generation)) = self.by_dir.get(&dir) {
                            self.dispatch(slot, generation, |flow, cx| flow.on_congestion(dir, cx));
                        }
                    }
                    Some(Command::SetMarks { id, high_water, low_water }) => {
                        self.set_marks(id, high_water, low_water);
                    }
                    Some(Command::Snapshot { after, limit, reply }) => {
                        let _ = reply.send(self.snapshot(after, limit));
                    }
                    Some(Command::Usage(reply)) => {
                        let _ = reply.send(self.usage());
                    }
                    Some(Command::Shutdown { drain, done }) => {
                        accepting = false;
                        shutdown = Some((Instant::now() + drain, done));
                    }
                    Some(Command::Freeze(reply)) => {
                        frozen = true;
                        let _ = reply.send(self.export());
                    }
                    Some(Command::Resume) => {
                        frozen = false;
                        self.drain_events();
                        self.recheck_all();
                    }
                    Some(Command::Release) => {
                        self.forget_all();
                        break;
                    }
                    Some(Command::Adopt(adopted)) => {
                        let (flow, on_end) = *adopted;
                        self.adopt(flow, on_end);
                    }
                    None => accepting = false,
                },
                () = sleep_until(wake_at) => self.run_timers(),
            }
        }
        // Flows handed over after the shutdown started are refused with a reset.
        commands.close();
        while let Ok(command) = commands.try_recv() {
            if let Command::Add(new) = command {
                self.refuse(*new);
            }
        }
        if let Some((_, done)) = shutdown {
            let _ = done.send(());
        }
    }

    fn add(&mut self, new: NewFlow) {
        let NewFlow {
            id,
            tag,
            client,
            backend,
            kernel,
            preamble,
            idle_timeout,
            on_end,
        } = new;
        let flow = Flow::new(
            id,
            tag,
            [client, backend],
            kernel,
            preamble,
            on_end,
            idle_timeout,
        );
        let (slot, generation) = self.insert(flow);
        // Nothing may have happened yet, but a FIN could be waiting for a coverage check.
        self.dispatch_timer(slot, generation);
    }

    /// Puts a flow in a free slot and registers its sockets; returns the slot and generation.
    fn insert(&mut self, flow: Flow) -> (u32, u32) {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    flow: None,
                });
                u32::try_from(self.slots.len() - 1).unwrap_or(u32::MAX)
            }
        };
        let Some(entry) = self.slots.get_mut(slot as usize) else {
            return (slot, 0);
        };
        entry.generation = entry.generation.wrapping_add(1);
        let generation = entry.generation;
        for side in 0..2 {
            let fd = flow.socks[side].as_fd();
            // Registration reports readiness that already holds: a FIN that arrived before this
            // point is not lost.
            if let Err(err) =
                self.epoll
                    .get_ref()
                    .add(fd, flow.interest[side], token(generation, slot, side))
            {
                warn!(flow = flow.id, error = %err, "cannot watch spliced socket");
            }
        }
        self.stats.flow_started(flow.path());
        if let Some(kflow) = flow.kernel {
            for dir in kflow.dirs {
                self.by_dir.insert(dir, (slot, generation));
            }
        }
        entry.flow = Some(flow);
        self.live += 1;
        (slot, generation)
    }

    /// Every flow's state with duplicates of its sockets (the flows stay here).
    fn export(&self) -> std::io::Result<Vec<ExportedFlow>> {
        self.flows()
            .map(|flow| {
                let (state, pending) = flow.export();
                Ok(ExportedFlow {
                    state,
                    socks: [flow.socks[0].try_clone()?, flow.socks[1].try_clone()?],
                    pending,
                })
            })
            .collect()
    }

    /// Re-evaluates every flow (after a freeze): FINs, relay bytes, and congestion events the
    /// program sent that nobody handled.
    fn recheck_all(&mut self) {
        let live: Vec<(u32, u32)> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.flow.is_some())
            .filter_map(|(i, s)| Some((u32::try_from(i).ok()?, s.generation)))
            .collect();
        for (slot, generation) in live {
            self.dispatch_timer(slot, generation);
            self.recover_congestion(slot, generation);
        }
    }

    /// Handles congestion events of a flow's directions that were sent but not handled.
    fn recover_congestion(&mut self, slot: u32, generation: u32) {
        let Some(path) = self.kernel.clone() else {
            return;
        };
        let dirs = self
            .slots
            .get(slot as usize)
            .and_then(|s| s.flow.as_ref())
            .and_then(|f| f.kernel)
            .map(|k| k.dirs);
        for dir in dirs.into_iter().flatten() {
            let view = path.dir(dir);
            if view.congestion_events() > view.congestion_handled() {
                self.dispatch(slot, generation, |flow, cx| flow.on_congestion(dir, cx));
            }
        }
    }

    /// Drops every flow without a socket option, a map update or an outcome: another daemon
    /// runs them now (closing these duplicates leaves the sockets and their sockhash entries
    /// alone while the other daemon holds them).
    fn forget_all(&mut self) {
        for slot in &mut self.slots {
            if let Some(mut flow) = slot.flow.take() {
                // Dropped unrun: the outcome is the next daemon's to report.
                drop(flow.on_end.take());
            }
        }
        self.live = 0;
        self.by_dir.clear();
        self.timers.clear();
    }

    fn adopt(&mut self, exported: ExportedFlow, on_end: Option<super::OnEnd>) {
        let ExportedFlow {
            state,
            socks,
            pending,
        } = exported;
        let flow = super::flow::Flow::restore(&state, socks, pending, on_end, &mut self.pool);
        let (slot, generation) = self.insert(flow);
        self.dispatch_timer(slot, generation);
        self.recover_congestion(slot, generation);
    }

    fn refuse(&mut self, new: NewFlow) {
        let NewFlow {
            id,
            tag,
            client,
            backend,
            kernel,
            on_end,
            ..
        } = new;
        let mut flow = Flow::new(
            id,
            tag,
            [client, backend],
            kernel,
            super::Preamble::default(),
            on_end,
            None,
        );
        flow.abort();
        self.stats.flow_started(flow.path());
        self.finish(flow, FlowEnd::Shutdown);
    }

    fn drain_events(&mut self) {
        let mut events = [EpollEvent::default(); 256];
        loop {
            let n = match self.epoll.get_ref().wait_now(&mut events) {
                Ok(n) => n,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    warn!(error = %err, "epoll_wait failed");
                    return;
                }
            };
            for event in events.iter().take(n) {
                let generation = (event.token >> 32) as u32;
                let slot = ((event.token & 0xffff_ffff) >> 1) as u32;
                let side = (event.token & 1) as usize;
                self.dispatch(slot, generation, |flow, cx| {
                    flow.on_event(side, event.events, cx)
                });
            }
            if n < events.len() {
                return;
            }
        }
    }

    fn dispatch_timer(&mut self, slot: u32, generation: u32) {
        self.dispatch(slot, generation, |flow, cx| flow.on_timer(cx));
    }

    fn dispatch(
        &mut self,
        slot: u32,
        generation: u32,
        f: impl FnOnce(&mut Flow, &mut Cx<'_>) -> Step,
    ) {
        let Some(entry) = self.slots.get_mut(slot as usize) else {
            return;
        };
        if entry.generation != generation {
            return;
        }
        let Some(flow) = entry.flow.as_mut() else {
            return;
        };
        let mut cx = Cx {
            kernel: self.kernel.as_deref(),
            pool: &mut self.pool,
            receive_buffer: self.receive_buffer_bytes,
        };
        match f(flow, &mut cx) {
            Step::Continue { recheck } => {
                let wanted = flow.wanted_interest();
                for (side, want) in wanted.into_iter().enumerate() {
                    if want != flow.interest[side] {
                        let fd = flow.socks[side].as_fd();
                        if self
                            .epoll
                            .get_ref()
                            .modify(fd, want, token(generation, slot, side))
                            .is_ok()
                        {
                            flow.interest[side] = want;
                        }
                    }
                }
                if recheck {
                    let delay = recheck_delay(flow.backoff);
                    flow.backoff = flow.backoff.saturating_add(1);
                    self.timers
                        .push(Reverse((Instant::now() + delay, slot, generation)));
                }
                if let Some(at) = flow.idle_timer() {
                    self.timers.push(Reverse((at, slot, generation)));
                }
            }
            Step::Done(end) => {
                if let Some(flow) = entry.flow.take() {
                    self.free.push(slot);
                    self.live -= 1;
                    self.finish(flow, end);
                }
            }
        }
    }

    fn run_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, slot, generation))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            self.dispatch_timer(slot, generation);
        }
    }

    fn finish(&mut self, mut flow: Flow, end: FlowEnd) {
        if let Some(kflow) = flow.kernel {
            for dir in kflow.dirs {
                self.by_dir.remove(&dir);
            }
        }
        let kernel = self.kernel.as_deref();
        let outcome = flow.outcome(end, kernel);
        if let (Some(path), Some(kflow)) = (kernel, flow.kernel.as_ref()) {
            path.remove(kflow);
        }
        debug!(
            flow = outcome.id,
            path = outcome.path.as_str(),
            end = outcome.end.as_str(),
            client_to_backend = outcome.client_to_backend.total(),
            backend_to_client = outcome.backend_to_client.total(),
            "flow ended"
        );
        self.stats.flow_ended(&outcome);
        self.finished.add_flow(
            outcome.tag,
            TagBytes {
                client_to_backend: outcome.client_to_backend,
                backend_to_client: outcome.backend_to_client,
            },
        );
        self.finished.gate_closures += outcome.gate_closures;
        self.finished.overlap_trimmed += outcome.overlap_trimmed;
        let on_end = flow.on_end.take();
        flow.release_buffers(&mut self.pool);
        // Closing the descriptors removes the sockets from the sockhash (and from epoll).
        drop(flow);
        if let Some(on_end) = on_end {
            on_end.end(outcome);
        }
    }

    fn abort_all(&mut self) {
        for slot in 0..self.slots.len() {
            if let Some(mut flow) = self.slots.get_mut(slot).and_then(|s| s.flow.take()) {
                flow.abort();
                self.live -= 1;
                if let Ok(slot) = u32::try_from(slot) {
                    self.free.push(slot);
                }
                self.finish(flow, FlowEnd::Shutdown);
            }
        }
    }

    fn flows(&self) -> impl Iterator<Item = &Flow> {
        self.slots.iter().filter_map(|s| s.flow.as_ref())
    }

    fn set_marks(&mut self, id: u64, high_water: u64, low_water: u64) {
        let Some(path) = self.kernel.as_deref() else {
            return;
        };
        for flow in self.flows().filter(|f| f.id == id) {
            if let Some(kflow) = flow.kernel.as_ref() {
                for &dir in &kflow.dirs {
                    path.dir(dir).set_marks(high_water, low_water);
                }
            }
        }
    }

    fn snapshot(&self, after: u64, limit: usize) -> Vec<FlowInfo> {
        let kernel = self.kernel.as_deref();
        let mut page: Vec<&Flow> = self.flows().filter(|f| f.id > after).collect();
        page.sort_unstable_by_key(|f| f.id);
        page.truncate(limit);
        page.into_iter()
            .map(|flow| {
                let [client_to_backend, backend_to_client] = flow.bytes(kernel);
                let [client, backend] = flow.peers();
                FlowInfo {
                    id: flow.id,
                    tag: flow.tag,
                    client,
                    backend,
                    path: flow.path(),
                    age: flow.started.elapsed(),
                    client_to_backend,
                    backend_to_client,
                    gated: flow.gated(kernel),
                    gate_closures: flow.gate_closures(kernel),
                    program_version: flow.program_version(kernel),
                }
            })
            .collect()
    }

    fn usage(&self) -> Usage {
        let kernel = self.kernel.as_deref();
        let mut usage = self.finished.clone();
        for flow in self.flows() {
            let [client_to_backend, backend_to_client] = flow.bytes(kernel);
            usage.add_flow(
                flow.tag,
                TagBytes {
                    client_to_backend,
                    backend_to_client,
                },
            );
            usage.gated_flows += u64::from(flow.gated(kernel));
            usage.gate_closures += flow.gate_closures(kernel);
            usage.overlap_trimmed += flow.overlap_trimmed(kernel);
        }
        usage
    }
}

impl Usage {
    fn add_flow(&mut self, tag: u32, bytes: TagBytes) {
        let index = tag as usize;
        if self.bytes_by_tag.len() <= index {
            self.bytes_by_tag.resize(index + 1, TagBytes::default());
        }
        if let Some(entry) = self.bytes_by_tag.get_mut(index) {
            entry.add(&bytes);
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

impl EngineStats {
    fn flow_started(&self, path: super::Path) {
        self.active[path as usize].fetch_add(1, Ordering::Relaxed);
        self.started[path as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn flow_ended(&self, outcome: &super::FlowOutcome) {
        let path = outcome.path as usize;
        self.active[path].fetch_sub(1, Ordering::Relaxed);
        self.kernel_bytes.fetch_add(
            outcome.client_to_backend.kernel + outcome.backend_to_client.kernel,
            Ordering::Relaxed,
        );
        self.relayed_bytes.fetch_add(
            outcome.client_to_backend.relayed + outcome.backend_to_client.relayed,
            Ordering::Relaxed,
        );
    }
}
