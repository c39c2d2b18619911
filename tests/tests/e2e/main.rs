//! End-to-end tests of ingressd: one test binary, one module per area.
//!
//! Tests that need the machine to themselves (GiB transfers, timing) are named `serial_*`;
//! `cargo xtask test` runs them alone after the rest. See the `ingress_tests` crate for the
//! harness and its rules.
#![forbid(unsafe_code)]
// The whole binary is test code (helpers included): a panic is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

mod alpn;
mod clients;
mod common;
mod daemon;
mod default_target;
mod dns;
mod guest;
mod handshakes;
mod harness;
mod live_change;
mod postgres_direct;
mod proxy_protocol;
mod refusals;
mod routing;
mod service;
mod takeover;
