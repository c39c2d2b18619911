//! Integration tests for the control plane: the API over real HTTP, routing-table swaps, the
//! real `ingressd` binary's configuration sources, `ctl`, and restarts.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests may unwrap")]

mod api_http;
mod common;
mod config_sources;
mod ctl;
mod dns;
mod ingressd;
mod live_change;
mod observability;
mod restart;
