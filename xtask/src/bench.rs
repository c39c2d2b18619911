//! `cargo xtask bench`: the peer comparison and `cargo xtask bench splice` (the splice
//! engine alone). Installs the peers if missing, builds the daemon and the benchmark binaries in
//! release mode, then runs `ingress-bench`, which measures and writes the report.
//!
//! Never part of `cargo xtask test`: a full run takes minutes and needs the machine to itself.
use std::path::PathBuf;

use anyhow::Result;

use crate::{
    apt::{self, Package},
    context::{Ctx, run},
    setup::{self, Scope},
};

/// Which benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    /// ingressd vs a direct connection, HAProxy and nginx, TLS end to end.
    Peers,
    /// The splice engine alone: direct vs userspace relay vs kernel splice.
    Splice,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Self::Peers => "peers",
            Self::Splice => "splice",
        }
    }
}

/// What `cargo xtask bench` was asked for.
pub struct BenchArgs {
    /// Which benchmark.
    pub which: Which,
    /// The one-minute smoke run.
    pub quick: bool,
    /// Only these targets.
    pub only: Vec<String>,
    /// Where the results go.
    pub out: Option<PathBuf>,
}

const PEER_PACKAGES: &[Package] = &[
    Package {
        name: "haproxy",
        why: "a peer of the benchmark (mode tcp, req.ssl_sni)",
        service: Some("haproxy"),
    },
    Package {
        name: "nginx",
        why: "a peer of the benchmark (stream, ssl_preread)",
        service: Some("nginx"),
    },
    Package {
        name: "libnginx-mod-stream",
        why: "nginx's stream and ssl_preread modules",
        service: None,
    },
];

/// The release binaries the benchmark runs, built in one cargo invocation.
const BUILD: &[&str] = &[
    "build",
    "--release",
    "-p",
    "ingress-daemon",
    "-p",
    "ingress-benches",
    "--bins",
];

/// Sets up, builds and runs the benchmark.
pub fn bench(ctx: &mut Ctx, args: &BenchArgs) -> Result<()> {
    setup::setup(ctx, Scope::Run, false)?;
    if args.which == Which::Peers {
        let wanted: Vec<&Package> = PEER_PACKAGES.iter().collect();
        let absent = apt::missing(&wanted)?;
        if absent.is_empty() {
            println!("  ok  benchmark peers (haproxy, nginx)");
        } else {
            apt::install(ctx, &absent)?;
        }
    }
    run(ctx.cargo().args(BUILD))?;
    let release = ctx.target_dir().join("release");
    // Full results are committed; quick ones are smoke runs and stay in the target directory.
    let default_out = if args.quick {
        ctx.target_dir().join("bench-results-quick")
    } else {
        ctx.root.join("bench-results")
    };
    let update_readme = !args.quick && args.only.is_empty() && args.out.is_none();
    let out = args.out.clone().unwrap_or(default_out);
    let mut cmd = ctx.command(release.join("ingress-bench"));
    cmd.arg(args.which.name())
        .arg("--out")
        .arg(&out)
        .arg("--relay")
        .arg(release.join("splice-relay"))
        .arg("--ingressd")
        .arg(release.join("ingressd"))
        .arg("--command")
        .arg(command_line(args));
    if args.quick {
        cmd.arg("--quick");
    }
    if !args.only.is_empty() {
        cmd.arg("--only").arg(args.only.join(","));
    }
    if update_readme {
        cmd.arg("--readme").arg(ctx.root.join("README.md"));
    }
    run(&mut cmd)
}

/// The command as a user types it, for the report.
fn command_line(args: &BenchArgs) -> String {
    let mut parts = vec!["cargo xtask bench".to_owned()];
    if args.which == Which::Splice {
        parts.push("splice".to_owned());
    }
    if args.quick {
        parts.push("--quick".to_owned());
    }
    if !args.only.is_empty() {
        parts.push(format!("--only {}", args.only.join(",")));
    }
    if let Some(out) = &args.out {
        parts.push(format!("--out {}", out.display()));
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_names_the_command_as_typed() {
        let args = BenchArgs {
            which: Which::Peers,
            quick: true,
            only: vec!["direct".into(), "nginx".into()],
            out: None,
        };
        assert_eq!(
            command_line(&args),
            "cargo xtask bench --quick --only direct,nginx"
        );
        let args = BenchArgs {
            which: Which::Splice,
            quick: false,
            only: vec![],
            out: None,
        };
        assert_eq!(command_line(&args), "cargo xtask bench splice");
    }
}
