//! ingressd: an SNI-routing TCP ingress whose flows are spliced inside the kernel.
//!
//! # Layout
//! - [`sys`]: every raw syscall (setsockopt, ioctl, `TCP_INFO`, `mmap`), each `unsafe` block
//!   in one place.
//! - [`connect`]: backend connect with a timeout; keepalive and `TCP_USER_TIMEOUT` on both
//!   sockets of a flow.
//! - [`hello`]: the ClientHello reader — a pure parser and a `MSG_PEEK` reader that leaves
//!   the hello in the socket.
//! - [`postgres`]: the Postgres `SSLRequest` preamble before a ClientHello, client and backend
//!   side, read to the exact byte.
//! - [`policy`]: the backend address policy — CIDR allow-list, never link-local, never the API.
//! - [`proxy_protocol`]: PROXY protocol v1/v2 headers for the backend.
//! - [`resolve`]: instance name → address, from the static registry or DNS with a TTL cache.
//! - [`splice`]: the splice engine — the eBPF loader, the kernel path and the userspace relay
//!   that carry a flow's bytes between two established sockets.
//! - `testing` (tests only): prerequisites, free loopback ports, temporary directories.
pub mod connect;
pub mod hello;
pub mod policy;
pub mod postgres;
pub mod proxy_protocol;
pub mod resolve;
pub mod splice;
pub mod sys;

#[cfg(test)]
#[allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a failing test panics"
)]
mod testing;
