//! Splice engine tests on real loopback sockets: every test runs on the kernel path (offload
//! `required`: a broken eBPF load fails instead of falling back) and on the userspace relay.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Each test owns its runtime; the guard only serialises the heavy tests across threads.
#![allow(clippy::await_holding_lock)]

mod backpressure;
mod bulk;
mod edges;
mod liveness;
mod many;
mod support;
