//! ingressd: an SNI-routing TCP ingress whose flows are spliced inside the kernel.
//!
//! # Layout
//! - [`api`]: the axum REST API, its auth, readiness, `/metrics`, `/flows` and generated
//!   OpenAPI document.
//! - [`metrics`]: per-ingress Prometheus counters and histograms, read at scrape time.
//! - [`access_log`]: one JSON line per finished flow and refused connection, written off the
//!   data path.
//! - [`config`]: the one [`config::Config`], layered file < environment < flags, validated
//!   before anything binds.
//! - [`error`]: the API's stable error codes and [`error::ApiError`].
//! - [`model`]: the API resource types and their structural validation.
//! - [`pattern`]: SNI patterns with whole-label captures, overlap checks, instance templates.
//! - [`route`]: the per-listener routing table, swapped atomically, read without locks.
//! - [`certs`]: stored certificates and their selection by SNI for terminate mode.
//! - [`backend`]: the static instance registry and the backend address policy — CIDR
//!   allow-list, never link-local, never the API.
//! - [`resolver`]: instance name → address, static registry first, then DNS with a TTL cache.
//! - [`store`]: durable one-file-per-record storage; corrupt files are reported and kept.
//! - [`listeners`]: binding ingress ports and the [`listeners::ConnectionHandler`] hand-off.
//! - [`control`]: every control-plane operation, applied to store, listeners and tables.
//! - [`daemon`]: the lifecycle: bind the API, load the store, serve, shut down.
//! - [`cli`] and [`ctl`]: the command line, and the operator client speaking to the API.
//! - [`upgrade`]: `ingressd upgrade`, starting the daemon that takes the running one over.
//! - [`sys`]: every raw syscall (setsockopt, ioctl, `TCP_INFO`, `mmap`), each `unsafe` block
//!   in one place.
//! - [`connect`]: backend connect with a timeout; keepalive and `TCP_USER_TIMEOUT` on both
//!   sockets of a flow.
//! - [`hello`]: the ClientHello reader — a pure parser and a `MSG_PEEK` reader that leaves
//!   the hello in the socket.
//! - [`notify`]: readiness and stopping notifications to a service manager (`sd_notify`).
//! - [`postgres`]: the Postgres `SSLRequest` preamble before a ClientHello, client and backend
//!   side, read to the exact byte.
//! - [`proxy`]: the data path — accept, ClientHello, route, connect, then splice or terminate.
//! - [`proxy_protocol`]: PROXY protocol v1/v2 headers for the backend.
//! - `testing` (tests only): prerequisites, free loopback ports, temporary directories.
//! - [`takeover`]: zero-loss upgrades — a new daemon takes listeners, maps and spliced flows
//!   over from the running one through a control socket in the data dir.
//! - [`splice`]: the splice engine — the eBPF loader, the kernel path and the userspace relay
//!   that carry a flow's bytes between two established sockets.
pub mod access_log;
pub mod api;
pub mod backend;
pub mod certs;
pub mod cli;
pub mod config;
pub mod connect;
pub mod control;
pub mod ctl;
pub mod daemon;
pub mod error;
pub mod hello;
pub mod listeners;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod pattern;
pub mod postgres;
pub mod proxy;
pub mod proxy_protocol;
pub mod resolver;
pub mod route;
pub mod splice;
pub mod store;
pub mod sys;
pub mod takeover;
pub mod upgrade;

#[cfg(test)]
#[allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a failing test panics"
)]
mod testing;
