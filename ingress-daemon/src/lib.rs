//! ingressd: an SNI-routing TCP ingress whose flows are spliced inside the kernel.
//!
//! # Layout
//! - [`config`]: the one [`config::Config`], layered file < environment < flags, validated
//!   before anything binds.
//! - [`error`]: the API's stable error codes and [`error::ApiError`].
//! - [`model`]: the API resource types and their structural validation.
//! - [`pattern`]: SNI patterns with whole-label captures, overlap checks, instance templates.
//! - [`route`]: the per-listener routing table, swapped atomically, read without locks.
//! - [`certs`]: stored certificates and their selection by SNI for terminate mode.
//! - [`sys`]: every raw syscall (setsockopt, ioctl, `TCP_INFO`, `mmap`), each `unsafe` block
//!   in one place.
//! - [`splice`]: the splice engine — the eBPF loader, the kernel path and the userspace relay
//!   that carry a flow's bytes between two established sockets.
pub mod certs;
pub mod config;
pub mod error;
pub mod model;
pub mod pattern;
pub mod route;
pub mod splice;
pub mod sys;
