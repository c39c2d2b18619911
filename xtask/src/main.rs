//! Developer and CI entry points of ingressd, run as `cargo xtask <command>`.
//!
//! # Layout
//! - [`context`]: the workspace root, the `PATH` children get, running commands.
//! - [`apt`]: Debian packages — which are missing, installing them without starting services.
//! - [`setup`]: `cargo xtask setup` — the toolchain (LLVM 22, nightly rust-src, bpf-linker),
//!   bpffs and, for tests, the servers and clients the end-to-end tests drive.
//! - [`step`]: named, timed steps with a summary.
//! - [`suite`]: `cargo xtask test` — setup, then the test suite; the serial-test convention.
//! - [`schema`]: API conformance — schemathesis against a running daemon's `/openapi.json`.
//! - [`launch`]: `cargo xtask run` — build and exec the daemon.
//! - [`bench`]: `cargo xtask bench [splice]` — install the peers, build, run `ingress-bench`.
#![forbid(unsafe_code)]

mod apt;
mod bench;
mod context;
mod launch;
mod schema;
mod setup;
mod step;
mod suite;

use std::{ffi::OsString, process::ExitCode};

use clap::{Parser, Subcommand};

use crate::{context::Ctx, setup::Scope};

/// Developer and CI entry points of ingressd.
#[derive(Parser)]
#[command(name = "cargo xtask", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what this machine lacks to build ingressd (and, with `--for test`, to test it).
    Setup {
        /// What to prepare: `run` (the build toolchain) or `test` (also the test servers/clients).
        #[arg(long = "for", value_enum, default_value = "run")]
        scope: Scope,
        /// Only report what is missing; install nothing.
        #[arg(long)]
        check: bool,
    },
    /// Build ingressd in release mode and run it; arguments go to ingressd.
    Run {
        /// Arguments passed to ingressd unchanged.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run setup, then the whole test suite (tests named `serial_*` run alone, after the rest).
    Test {
        /// Skip the setup step (the machine is known to be ready).
        #[arg(long)]
        no_setup: bool,
    },
    /// Check formatting and clippy lints.
    Lint,
    /// Benchmark ingressd against a direct connection, HAProxy and nginx (`splice`: the splice
    /// engine alone); results go to `bench-results/` and the README.
    Bench {
        /// `peers` (the default) or `splice`.
        #[arg(value_enum, default_value = "peers")]
        which: bench::Which,
        /// A smoke run of about a minute: one run per metric, small sizes, fewer targets.
        #[arg(long)]
        quick: bool,
        /// Only these targets, comma-separated (`direct`, the baseline, is always measured).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Where to write the results (default `bench-results/`, or the target directory for
        /// `--quick`); the README is updated only by a full run into the default directory.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    let mut ctx = Ctx::new()?;
    match command {
        Command::Setup { scope, check } => setup::setup(&mut ctx, scope, check),
        Command::Run { args } => launch::run_daemon(&mut ctx, &args),
        Command::Test { no_setup } => suite::test(&mut ctx, no_setup),
        Command::Lint => lint(&mut ctx),
        Command::Bench {
            which,
            quick,
            only,
            out,
        } => bench::bench(
            &mut ctx,
            &bench::BenchArgs {
                which,
                quick,
                only,
                out,
            },
        ),
    }
}

/// `cargo fmt --check` and clippy with warnings denied (the eBPF crate only builds for BPF).
fn lint(ctx: &mut Ctx) -> anyhow::Result<()> {
    setup::setup(ctx, Scope::Run, false)?;
    step::run_all(
        ctx,
        vec![
            step::Step::independent("fmt", |ctx| {
                context::run(ctx.cargo().args(["fmt", "--all", "--", "--check"]))
            }),
            step::Step::independent("clippy", |ctx| {
                context::run(ctx.cargo().args([
                    "clippy",
                    "--workspace",
                    "--exclude",
                    "ingress-ebpf",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ]))
            }),
        ],
    )
}
