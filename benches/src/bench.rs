//! A whole benchmark invocation: start the backends, measure each target in turn, report.
use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use rustls_pki_types::ServerName;

use crate::{
    backend::Backend,
    client::Dialer,
    measure::{Machine, load_1m},
    peers::CertPaths,
    report::{Report, update_readme},
    routing::{self, RuleKind},
    run::{self, Plan, TargetResult},
    targets::{self, Env, Running, TargetSpec},
    tls::{BenchPki, SNI},
};

/// Which benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bench {
    /// ingressd against a direct connection and the peers, TLS end to end.
    Peers,
    /// The splice engine alone: direct vs userspace relay vs kernel splice, plaintext.
    Splice,
}

/// Options of one invocation.
#[derive(Clone, Debug)]
pub struct Options {
    /// Which benchmark.
    pub bench: Bench,
    /// Small sizes, one run per metric, a subset of targets.
    pub quick: bool,
    /// Only these targets (`direct` is always measured: it is the baseline).
    pub only: Vec<String>,
    /// Where the results go.
    pub out: PathBuf,
    /// README whose benchmark section to update, if any.
    pub readme: Option<PathBuf>,
    /// The `ingressd` binary (peer comparison).
    pub ingressd: Option<PathBuf>,
    /// The `splice-relay` binary.
    pub relay: PathBuf,
    /// The command line to print in the report.
    pub command: String,
}

/// Runs the benchmark `opts` describe and writes its report.
pub fn run(opts: &Options) -> Result<Report> {
    let date = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| time::OffsetDateTime::now_utc())
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let machine = Machine::describe();
    let workers = machine.cpus;
    let plan = if opts.quick {
        Plan::quick()
    } else {
        Plan::full()
    };
    let specs = select(opts)?;
    let tls = opts.bench == Bench::Peers;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        // Named so that profiles tell the backends from a proxy's tokio workers.
        .thread_name("bench-backend")
        .enable_all()
        .build()
        .context("starting the backends' runtime")?;
    let pki = BenchPki::new()?;
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let tls_backend = Backend::start(&runtime, loopback, Some(pki.server_config()?))?;
    let plain_backend = Backend::start(&runtime, loopback, None)?;
    let dir = tempfile::Builder::new()
        .prefix("ingress-bench-")
        .tempdir()
        .context("creating a temporary directory")?;
    let (cert, key, combined) = pki.write(dir.path())?;
    let client_tls = if tls {
        Some((pki.client_config()?, ServerName::try_from(SNI.to_owned())?))
    } else {
        None
    };
    let env = Env {
        tls_backend: tls_backend.addr(),
        plain_backend: plain_backend.addr(),
        client_tls: tls,
        pki,
        certs: CertPaths {
            cert,
            key,
            combined,
        },
        ingressd: opts.ingressd.as_deref().map(absolute).transpose()?,
        relay: absolute(&opts.relay)?,
        workers,
        dir: dir.path().to_path_buf(),
    };
    let ours = [std::process::id()];

    // Every target runs at once (idle ones cost nothing), and the runs interleave: run 1 of
    // each target, then run 2 of each, starting one target further each time, so a change in
    // the machine's load during the benchmark falls on all targets alike.
    let mut live: Vec<Live> = Vec::new();
    let mut results: Vec<Option<TargetResult>> = vec![None; specs.len()];
    for (i, spec) in specs.iter().enumerate() {
        run::progress(spec.name, "starting");
        match start_one(&env, spec, client_tls.clone()).and_then(|(running, dialer)| {
            run::warm_up(spec, &dialer, &plan).map_err(|e| with_log(e, &running))?;
            Ok((running, dialer))
        }) {
            Ok((running, dialer)) => live.push(Live {
                index: i,
                running,
                dialer,
                samples: Vec::new(),
            }),
            Err(e) => results[i] = Some(failed(spec, &e)),
        }
    }
    for round in 0..plan.runs {
        let n = live.len();
        for k in 0..n {
            let Some(t) = live.get_mut((k + round) % n.max(1)) else {
                continue;
            };
            let Some(spec) = specs.get(t.index) else {
                continue;
            };
            if results[t.index].is_some() {
                continue;
            }
            match run::sample(spec, &t.running, &t.dialer, &plan, &ours) {
                Ok(s) => t.samples.push(s),
                Err(e) => results[t.index] = Some(failed(spec, &with_log(e, &t.running))),
            }
        }
    }
    for t in &live {
        let Some(spec) = specs.get(t.index) else {
            continue;
        };
        if results[t.index].is_some() {
            continue;
        }
        let mut r = run::summarize(spec, &t.samples, &plan);
        if matches!(spec.kind, targets::Kind::Relay(_)) {
            r.paths = run::PathShare::from_relay_log(&t.running.log());
        }
        match run::routing(spec, &t.running, &t.dialer, &plan) {
            Ok(routing) => r.routing = routing,
            Err(e) => eprintln!("{}: routing not measured: {e:#}", spec.name),
        }
        results[t.index] = Some(r);
    }
    drop(live);
    let results: Vec<TargetResult> = results.into_iter().flatten().collect();

    let mut lookups = Vec::new();
    if opts.bench == Bench::Peers {
        run::progress("routing", "in-process lookups");
        for rules in [1, 10_000] {
            for kind in [RuleKind::Exact, RuleKind::Pattern] {
                lookups.push(routing::lookup_latency(rules, kind, plan.route_lookups)?);
            }
        }
    }

    let report = Report {
        bench: match opts.bench {
            Bench::Peers => "peers",
            Bench::Splice => "splice",
        },
        date,
        machine,
        command: opts.command.clone(),
        tls,
        plan,
        targets: results,
        lookups,
        load_1m_at_end: load_1m(),
    };
    let stem = match opts.bench {
        Bench::Peers => "peers",
        Bench::Splice => "splice",
    };
    report.write(&opts.out, stem)?;
    if let Some(readme) = &opts.readme {
        update_readme(readme, &format!("bench-{stem}"), &report.markdown())?;
    }
    println!("{}", report.markdown());
    Ok(report)
}

/// A started, warmed-up target and its samples so far.
struct Live {
    index: usize,
    running: Running,
    dialer: Dialer,
    samples: Vec<run::Sample>,
}

fn failed(spec: &TargetSpec, e: &anyhow::Error) -> TargetResult {
    eprintln!("{}: not measured: {e:#}", spec.name);
    TargetResult {
        target: spec.name.to_owned(),
        about: spec.about.to_owned(),
        error: Some(format!("{e:#}")),
        ..TargetResult::default()
    }
}

fn with_log(e: anyhow::Error, running: &Running) -> anyhow::Error {
    let tail = running.log_tail();
    if tail.trim().is_empty() {
        e
    } else {
        // The cause first: the report's list of unmeasured targets shows one line.
        anyhow::anyhow!("{e:#}\n--- the target's log, last lines ---\n{tail}")
    }
}

/// Starts `spec` and checks that a session goes through it end to end.
fn start_one(
    env: &Env,
    spec: &TargetSpec,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
) -> Result<(Running, Dialer)> {
    let running = env.start(spec)?;
    let dialer = Dialer {
        addr: running.front,
        tls,
        timeout: Duration::from_secs(10),
    };
    let probe = Dialer {
        timeout: Duration::from_secs(3),
        ..dialer.clone()
    };
    if let Err(e) = probe.first_byte() {
        bail!(
            "the target does not carry a session end to end ({e:#}){}",
            match running.ingressd {
                Some(_) => "; is the daemon's data plane serving?",
                None => "",
            }
        );
    }
    Ok((running, dialer))
}

/// `path` made absolute: the targets run with their own working directories.
fn absolute(path: &std::path::Path) -> Result<PathBuf> {
    std::fs::canonicalize(path).with_context(|| format!("locating {}", path.display()))
}

fn select(opts: &Options) -> Result<Vec<TargetSpec>> {
    let all: &[TargetSpec] = match opts.bench {
        Bench::Peers => targets::PEER_TARGETS,
        Bench::Splice => targets::SPLICE_TARGETS,
    };
    let mut wanted: Vec<String> = if !opts.only.is_empty() {
        opts.only.clone()
    } else if opts.quick && opts.bench == Bench::Peers {
        targets::QUICK_PEER_TARGETS
            .iter()
            .map(|s| (*s).to_owned())
            .collect()
    } else {
        all.iter().map(|t| t.name.to_owned()).collect()
    };
    if !wanted.iter().any(|w| w == "direct") {
        wanted.insert(0, "direct".to_owned());
    }
    for w in &wanted {
        if !all.iter().any(|t| t.name == w) {
            let names: Vec<&str> = all.iter().map(|t| t.name).collect();
            bail!("unknown target {w:?}; targets: {}", names.join(", "));
        }
    }
    Ok(all
        .iter()
        .filter(|t| wanted.iter().any(|w| w == t.name))
        .copied()
        .collect())
}
