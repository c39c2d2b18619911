//! Benchmarks of ingressd: the comparison against a direct connection, HAProxy and nginx
//! (`cargo xtask bench`), the splice engine on its own (`cargo xtask bench splice`), and the
//! criterion micro-benches under `benches/` (`cargo bench -p ingress-benches`).
//!
//! # Layout
//! - [`bench`]: one invocation — backends up, each target measured in turn, the report written.
//! - [`targets`]: the targets and how each starts (direct, the splice relay, HAProxy, nginx,
//!   ingressd); [`peers`] writes the peers' configs; [`ingressd`] configures the daemon through
//!   its API.
//! - [`backend`]: the TLS and plaintext backends and their one-request protocol.
//! - [`client`]: the load generator — bulk transfers, ping-pong, connection rate, idle sessions.
//! - [`run`]: every metric of one target, the median of several runs.
//! - [`measure`]: CPU and memory from `/proc`.
//! - [`stats`]: percentiles and medians.
//! - [`routing`]: routing tables of a given size and in-process lookup latency.
//! - [`tls`]: the certificates and the TLS settings every target negotiates.
//! - [`report`]: markdown, JSON lines, the performance goals, the README section.
//!
//! The `splice-relay` binary is the standalone splice proxy; `ingress-bench` runs a benchmark.
//! Everything listens and connects on loopback only; every process started is stopped by PID.
#![forbid(unsafe_code)]

pub mod backend;
pub mod bench;
pub mod client;
pub mod ingressd;
pub mod measure;
pub mod peers;
pub mod report;
pub mod routing;
pub mod run;
pub mod stats;
pub mod targets;
pub mod tls;
