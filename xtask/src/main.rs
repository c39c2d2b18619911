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
//! - [`vmtest`]: `cargo xtask vmtest` — the splice engine's tests on Debian kernels under qemu.
#![forbid(unsafe_code)]

mod apt;
mod bench;
mod context;
mod launch;
mod schema;
mod setup;
mod step;
mod suite;
mod vmtest;

use std::{ffi::OsString, process::ExitCode, time::Duration};

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
    /// Boot Debian kernels under qemu and run the splice engine's tests in each.
    Vmtest {
        /// The kernel series to boot.
        #[arg(long, value_enum, default_value = "all")]
        kernel: vmtest::Which,
        /// `INGRESSD_TEST_SCALE_MIB` in the guest: what the 1 GiB bulk tests move there.
        #[arg(long, default_value_t = vmtest::DEFAULT_SCALE_MIB,
              value_parser = clap::value_parser!(u32).range(1..=1024))]
        scale_mib: u32,
        /// Seconds after which a guest is killed.
        #[arg(long, default_value_t = vmtest::DEFAULT_TIMEOUT.as_secs())]
        timeout_secs: u64,
        /// Only check that a failing guest fails the run (boots a guest whose suite is `false`).
        #[arg(long)]
        self_check: bool,
        /// Skip the setup step (the machine is known to be ready).
        #[arg(long)]
        no_setup: bool,
        /// Arguments for the test binary in the guest, after `--` (e.g. a test name filter).
        #[arg(last = true)]
        test_args: Vec<String>,
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
        Command::Vmtest {
            kernel,
            scale_mib,
            timeout_secs,
            self_check,
            no_setup,
            test_args,
        } => {
            if !no_setup {
                setup::setup(&mut ctx, Scope::Vm, false)?;
            }
            if self_check {
                return vmtest::self_check(&ctx);
            }
            vmtest::vmtest(
                &ctx,
                &vmtest::Options {
                    which: kernel,
                    scale_mib,
                    timeout: Duration::from_secs(timeout_secs),
                    test_args,
                },
            )
        }
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
