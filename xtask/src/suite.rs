//! `cargo xtask test`: setup, then the whole suite as a list of steps.
//!
//! # Serial tests
//! A test that needs the machine to itself (bulk transfers of GiBs, CPU or memory measurements,
//! timing-sensitive checks) has a name starting with `serial_`, e.g.
//! `serial_splice_moves_1gib_each_way`. The suite runs every other test first, in parallel, then
//! the `serial_` tests one at a time (`--test-threads=1`). libtest filters match substrings, so no
//! other test name may contain `serial_`.
//!
//! # Adding a step
//! Append a [`Step`] in [`steps`]: `Step::required` when later steps need it to pass,
//! `Step::independent` otherwise. After the tests come a short `cargo fuzz` run per target
//! ([`FUZZ_TARGETS`], [`FUZZ_SECONDS`] each; a crash fails the step and leaves its input under
//! `fuzz/artifacts/`) and schemathesis against a daemon's `/openapi.json` (see
//! [`crate::schema`]).
//!
//! # Kernel matrix
//! After the host's tests, the splice engine's tests run again on Debian's 6.1, 6.12 and 6.17
//! kernels under qemu ([`crate::vmtest`]), preceded by a check that a failing guest fails the
//! step.
use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{Context as _, Result};

use crate::{
    context::{Ctx, run},
    schema,
    setup::{self, Scope},
    step::{self, Step},
    vmtest,
};

/// Tests whose names contain this run alone, after the others.
pub const SERIAL_PREFIX: &str = "serial_";

/// Runs setup (unless `no_setup`) and the suite.
pub fn test(ctx: &mut Ctx, no_setup: bool) -> Result<()> {
    let skip_log = ctx.target_dir().join("xtask").join("skipped-tests.txt");
    if let Some(dir) = skip_log.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(&skip_log, "").with_context(|| format!("truncating {}", skip_log.display()))?;

    let result = step::run_all(ctx, steps(no_setup, skip_log.clone()));

    let skipped = fs::read_to_string(&skip_log).unwrap_or_default();
    if !skipped.trim().is_empty() {
        println!("\ntests that skipped (a prerequisite was missing):");
        for line in skipped.lines() {
            println!("  {line}");
        }
    }
    result
}

/// The fuzz targets under `fuzz/`, with their seed corpus (relative to the workspace root).
const FUZZ_TARGETS: [(&str, &str); 1] = [("client_hello", "ingress-daemon/tests/data/hellos")];

/// How long each fuzz target runs in the suite.
const FUZZ_SECONDS: u32 = 30;

/// The packages built and tested: the workspace without the eBPF crate, which only builds for
/// the BPF target (the daemon's build script builds it).
pub const PACKAGES: [&str; 3] = ["--workspace", "--exclude", "ingress-ebpf"];

/// The steps of `cargo xtask test`, in order.
fn steps(no_setup: bool, skip_log: PathBuf) -> Vec<Step> {
    let mut steps = Vec::new();
    if !no_setup {
        steps.push(Step::required("setup", |ctx| {
            setup::setup(ctx, Scope::Test, false)
        }));
    }
    steps.push(Step::required("build", |ctx| {
        // Libraries, binaries (ingressd) and test targets at once, so ingressd gets the feature
        // resolution the tests get (dev-dependencies included). A lone `cargo build -p
        // ingress-daemon` resolves features differently, which reruns the daemon's build script
        // and rebuilds the eBPF object from scratch.
        run(ctx
            .cargo()
            .arg("build")
            .args(PACKAGES)
            .args(["--lib", "--bins", "--tests"]))
    }));
    let log = skip_log.clone();
    steps.push(Step::independent("tests", move |ctx| {
        let mut cmd = cargo_test(ctx, &log);
        cmd.args(["--", "--skip", SERIAL_PREFIX]);
        run(&mut cmd)
    }));
    steps.push(Step::independent("serial tests", move |ctx| {
        let mut cmd = cargo_test(ctx, &skip_log);
        // Doc tests were run by the previous step; `--tests` leaves them out.
        cmd.args(["--tests", "--", SERIAL_PREFIX, "--test-threads=1"]);
        run(&mut cmd)
    }));
    steps.push(Step::independent("fuzz", fuzz));
    steps.push(Step::independent("api conformance", |ctx| {
        schema::conformance(ctx)
    }));
    steps.push(Step::independent("kernel matrix self-check", |ctx| {
        vmtest::self_check(ctx)
    }));
    steps.push(Step::independent("kernel matrix", |ctx| {
        vmtest::vmtest(
            ctx,
            &vmtest::Options {
                which: vmtest::Which::All,
                scale_mib: vmtest::DEFAULT_SCALE_MIB,
                timeout: vmtest::DEFAULT_TIMEOUT,
                test_args: Vec::new(),
            },
        )
    }));
    steps
}

/// Runs every fuzz target for [`FUZZ_SECONDS`]. New inputs go to a corpus under the target
/// directory (kept between runs); the seed corpus in the repository is only read.
fn fuzz(ctx: &mut Ctx) -> Result<()> {
    for (target, seeds) in FUZZ_TARGETS {
        let corpus = ctx
            .target_dir()
            .join("xtask")
            .join("fuzz-corpus")
            .join(target);
        fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
        run(ctx
            .cargo()
            .args(["+nightly", "fuzz", "run", target])
            .arg(&corpus)
            .arg(ctx.root.join(seeds))
            .arg("--")
            .arg(format!("-max_total_time={FUZZ_SECONDS}")))
        .with_context(|| {
            format!("fuzz target {target} failed: a crash input is under fuzz/artifacts/{target}/")
        })?;
    }
    Ok(())
}

/// `cargo test` over [`PACKAGES`], with the environment the end-to-end harness reads.
fn cargo_test(ctx: &Ctx, skip_log: &PathBuf) -> Command {
    let mut cmd = ctx.cargo();
    cmd.arg("test")
        .args(PACKAGES)
        .arg("--no-fail-fast")
        // The binary the build step made: the harness then runs no cargo itself.
        .env(
            "INGRESSD_BIN",
            ctx.target_dir().join("debug").join("ingressd"),
        )
        .env("INGRESS_TEST_SKIP_LOG", skip_log);
    if env::var_os("RUST_BACKTRACE").is_none() {
        cmd.env("RUST_BACKTRACE", "1");
    }
    cmd
}
