//! ingressd: an SNI-routing TCP ingress whose flows are spliced inside the kernel.
//!
//! # Layout
//! - [`sys`]: every raw syscall (setsockopt, ioctl, `TCP_INFO`, `mmap`), each `unsafe` block
//!   in one place.
//! - [`hello`]: the ClientHello reader — a pure parser and a `MSG_PEEK` reader that leaves
//!   the hello in the socket.
//! - [`splice`]: the splice engine — the eBPF loader, the kernel path and the userspace relay
//!   that carry a flow's bytes between two established sockets.
pub mod hello;
pub mod splice;
pub mod sys;
