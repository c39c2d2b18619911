//! The end-to-end test harness of ingressd: the real daemon binary, real clients and real
//! servers, on loopback addresses and ports nobody else uses.
//!
//! # Layout
//! - [`daemon`]: [`Daemon`] — spawn `ingressd`, find its API (the `api.addr` contract), stop,
//!   kill -9, restart.
//! - [`binary`]: which `ingressd` runs (`INGRESSD_BIN`, or built on demand).
//! - [`api`]: [`ApiClient`] — a blocking client for the REST API.
//! - [`echo`], [`bulk`]: in-process backends — an echo server; a bulk sink/source with
//!   checksummed streams, slow readers, and a ping-pong latency sampler.
//! - [`pattern`]: seeded byte streams and their verification, rate limiting.
//! - [`pki`], [`tls`]: throw-away CAs and certificates; ClientHello bytes; a rustls echo
//!   server; `openssl s_server`; a rustls client.
//! - [`tls_bulk`]: the bulk exchange through a rustls client, optionally with a `KeyUpdate`.
//! - [`servers`]: postgres, redis, sshd and dnsmasq as real servers.
//! - [`netns`]: network namespaces joined by a veth pair, for a second host.
//! - [`tcp`]: abortive close (RST).
//! - [`ports`]: port leases (for servers that cannot bind port 0) and loopback addresses.
//! - [`process`]: child process guards (stop by PID on drop) and polling with a deadline.
//! - [`skip`], [`tools`]: skipping when a prerequisite is missing (failing under `CI=true`);
//!   finding programs.
//! - [`error`], [`workdir`]: the error type; temporary directories kept when a test fails.
//!
//! # Rules the harness keeps (and tests should too)
//! Never a fixed port; never a sleep to wait for start-up (poll with a deadline); traffic only
//! to 127.0.0.0/8, `[::1]` or namespaces the test creates; only processes the test started are
//! stopped, by PID. Tests that need the machine to themselves are named `serial_*`
//! (`cargo xtask test` runs them alone, after the others).
#![forbid(unsafe_code)]

mod acceptor;
pub mod api;
pub mod binary;
pub mod bulk;
pub mod daemon;
pub mod echo;
pub mod error;
pub mod netns;
pub mod pattern;
pub mod pki;
pub mod ports;
pub mod process;
pub mod servers;
pub mod skip;
pub mod tcp;
pub mod tls;
pub mod tls_bulk;
pub mod tools;
pub mod workdir;

pub use api::{ApiClient, ApiResponse};
pub use daemon::{Daemon, DaemonBuilder, Offload};
pub use error::{Error, Result};
pub use skip::{Skip, in_ci};
pub use tools::is_root;
