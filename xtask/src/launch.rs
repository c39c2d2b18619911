//! `cargo xtask run`: build the daemon in release mode and replace this process with it.
use std::{ffi::OsString, os::unix::process::CommandExt as _};

use anyhow::{Context as _, Result};

use crate::{
    context::{Ctx, display, run},
    setup::{self, Scope},
};

/// Sets up the toolchain, builds `ingressd` (release) and execs it with `args`.
pub fn run_daemon(ctx: &mut Ctx, args: &[OsString]) -> Result<()> {
    setup::setup(ctx, Scope::Run, false)?;
    run(ctx.cargo().args([
        "build",
        "--release",
        "-p",
        "ingress-daemon",
        "--bin",
        "ingressd",
    ]))?;
    let binary = ctx.target_dir().join("release").join("ingressd");
    let mut cmd = ctx.command(&binary);
    cmd.args(args);
    println!("  + {}", display(&cmd));
    // exec only returns on failure.
    let err = cmd.exec();
    Err(err).with_context(|| format!("executing {}", binary.display()))
}
