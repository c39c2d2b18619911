//! `ingress-bench`: runs the peer comparison or the splice bench (`cargo xtask bench` builds
//! the binaries and calls it).
#![forbid(unsafe_code)]

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, ValueEnum};
use ingress_benches::bench::{self, Bench, Options};

/// Benchmarks of ingressd against a direct connection and its peers.
#[derive(Parser)]
struct Args {
    /// `peers` (TLS, every proxy) or `splice` (the splice engine alone, plaintext).
    #[arg(value_enum, default_value = "peers")]
    bench: Which,
    /// Small sizes, one run per metric, a subset of targets (about a minute).
    #[arg(long)]
    quick: bool,
    /// Only these targets, comma-separated (`direct` is always measured).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Directory for `<bench>.md` and `<bench>.jsonl`.
    #[arg(long)]
    out: PathBuf,
    /// README whose `bench-<bench>` section gets the table.
    #[arg(long)]
    readme: Option<PathBuf>,
    /// The ingressd binary.
    #[arg(long)]
    ingressd: Option<PathBuf>,
    /// The splice-relay binary.
    #[arg(long)]
    relay: PathBuf,
    /// The command to name in the report.
    #[arg(long, default_value = "ingress-bench")]
    command: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum Which {
    Peers,
    Splice,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let opts = Options {
        bench: match args.bench {
            Which::Peers => Bench::Peers,
            Which::Splice => Bench::Splice,
        },
        quick: args.quick,
        only: args.only,
        out: args.out,
        readme: args.readme,
        ingressd: args.ingressd,
        relay: args.relay,
        command: args.command,
    };
    match bench::run(&opts) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
