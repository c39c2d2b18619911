//! Measuring one target: every metric, each the median of the plan's runs after a warm-up.
use std::{
    fs, thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use rustls_pki_types::ServerName;

use crate::{
    client::{Dialer, Session},
    measure::{CpuMark, CpuUsed, tree_rss_bytes},
    stats::{Percentiles, median},
    targets::{Kind, Running, TargetSpec},
    tls,
};

/// Sizes and counts of a benchmark run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Plan {
    /// Runs per metric (the median is reported).
    pub runs: usize,
    /// Bytes per bulk transfer, each way.
    pub bulk_bytes: u64,
    /// Bytes of the warm-up transfer, each way.
    pub warmup_bytes: u64,
    /// Bytes per ping-pong message.
    pub ping_bytes: usize,
    /// Recorded round trips per run.
    pub pings: usize,
    /// Unrecorded round trips before them.
    pub ping_warmup: usize,
    /// Concurrent client loops of the connection-rate test.
    pub conn_loops: usize,
    /// Length of one connection-rate run.
    pub conn_duration: Duration,
    /// Connections held open for the idle-memory metric.
    pub idle_conns: usize,
    /// Sequential connections per routing-latency sample set.
    pub route_conns: usize,
    /// Single lookups timed in-process per routing table.
    pub route_lookups: usize,
}

impl Plan {
    /// The full run: 3 runs, 1 GiB, 2,000 idle connections.
    pub fn full() -> Self {
        Self {
            runs: 3,
            bulk_bytes: 1 << 30,
            warmup_bytes: 64 << 20,
            ping_bytes: 64,
            pings: 20_000,
            ping_warmup: 1_000,
            conn_loops: 16,
            conn_duration: Duration::from_secs(5),
            idle_conns: 2_000,
            route_conns: 1_000,
            route_lookups: 200_000,
        }
    }

    /// The smoke run of `--quick`: one run per metric, small sizes.
    pub fn quick() -> Self {
        Self {
            runs: 1,
            bulk_bytes: 128 << 20,
            warmup_bytes: 16 << 20,
            ping_bytes: 64,
            pings: 2_000,
            ping_warmup: 200,
            conn_loops: 16,
            conn_duration: Duration::from_secs(1),
            idle_conns: 500,
            route_conns: 200,
            route_lookups: 20_000,
        }
    }
}

/// Connection setup latency through ingressd with one rule and with 10,000.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Routing {
    /// Time to first byte, one rule in the table.
    pub one_rule: Percentiles,
    /// With 10,000 rules, hitting an exact rule near the end.
    pub many_rules_exact: Percentiles,
    /// With 10,000 rules, hitting a pattern rule near the end.
    pub many_rules_pattern: Percentiles,
    /// Seconds the `PUT` that installs the 10,000 rules took (validation, store, swap).
    pub put_many_rules_s: f64,
}

/// Everything measured for one target.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct TargetResult {
    /// Target name.
    pub target: String,
    /// What it is.
    pub about: String,
    /// Why it was not measured, if it was not.
    pub error: Option<String>,
    /// Client → backend throughput, Gbit/s.
    pub up_gbit_s: f64,
    /// Backend → client throughput, Gbit/s.
    pub down_gbit_s: f64,
    /// System-wide CPU seconds per GB moved (other processes' share removed).
    pub system_cpu_s_per_gb: f64,
    /// System-wide CPU seconds per GB as `/proc/stat` reports it.
    pub system_cpu_raw_s_per_gb: f64,
    /// The proxy's own CPU seconds per GB.
    pub proxy_cpu_s_per_gb: f64,
    /// Bulk transfers that failed, one message each (the figures above come from the others).
    pub bulk_errors: Vec<String>,
    /// CPU seconds other processes used during the bulk transfers (noise indicator).
    pub foreign_cpu_s: f64,
    /// Ping-pong round trips.
    pub rtt: Percentiles,
    /// New connections per second (full handshake, then one byte each way).
    pub conn_per_s: f64,
    /// Failed connections during the rate runs.
    pub conn_errors: u64,
    /// Time to first byte during the rate runs.
    pub ttfb: Percentiles,
    /// Connections held for the memory metric.
    pub idle_conns: usize,
    /// Proxy RSS before opening them, bytes.
    pub rss_baseline_bytes: u64,
    /// Proxy RSS growth per idle connection, bytes: the largest of the runs (see
    /// [`summarize`]).
    pub rss_per_idle_conn_bytes: Option<f64>,
    /// The growth measured in each run, in run order.
    pub rss_per_idle_conn_runs_bytes: Vec<f64>,
    /// Kernel slab growth per idle connection, bytes (all sockets, client and backend
    /// included; noisy on a shared machine).
    pub slab_per_idle_conn_bytes: Option<f64>,
    /// ingressd only: routing with 1 vs 10,000 rules.
    pub routing: Option<Routing>,
    /// Splice relay only: which path carried the bulk flows' bytes.
    pub paths: Option<PathShare>,
}

/// How the bulk flows through the splice relay were carried, from its log.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct PathShare {
    /// Bulk flows reported.
    pub flows: u64,
    /// Bytes the eBPF verdict redirected.
    pub kernel_bytes: u64,
    /// Bytes the userspace relay moved (all of them with offload off; with the kernel path,
    /// those passed while the gate was closed).
    pub relayed_bytes: u64,
    /// Times a flow's gate closed.
    pub gate_closures: u64,
}

impl PathShare {
    /// Sums the `flow …` lines `splice-relay` logs for bulk flows.
    pub fn from_relay_log(log: &str) -> Option<Self> {
        let mut share = Self::default();
        for line in log.lines().filter(|l| l.starts_with("flow ")) {
            let num_after = |key: &str| -> u64 {
                line.split(key)
                    .skip(1)
                    .filter_map(|rest| rest.split([' ', ',']).find(|w| !w.is_empty()))
                    .filter_map(|w| w.parse::<u64>().ok())
                    .sum()
            };
            share.flows += 1;
            share.kernel_bytes += num_after("kernel ");
            share.relayed_bytes += num_after("relayed ");
            share.gate_closures += num_after("gate closures ");
        }
        (share.flows > 0).then_some(share)
    }

    /// The kernel's share of the bytes, in percent.
    pub fn kernel_percent(&self) -> f64 {
        let total = (self.kernel_bytes + self.relayed_bytes).max(1);
        self.kernel_bytes as f64 * 100.0 / total as f64
    }
}

/// One run of every metric on one target.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    up_gbit_s: f64,
    down_gbit_s: f64,
    cpu: CpuUsed,
    gb: f64,
    bulk_error: Option<String>,
    rtt: Percentiles,
    conn_per_s: f64,
    conn_errors: u64,
    ttfb: Percentiles,
    rss_baseline_bytes: u64,
    rss_per_conn: Option<f64>,
    slab_per_conn: Option<f64>,
}

/// Warms `running` up: a transfer each way, round trips, a short burst of connections.
pub fn warm_up(spec: &TargetSpec, dialer: &Dialer, plan: &Plan) -> Result<()> {
    progress(spec.name, "warm-up");
    dialer.upload(plan.warmup_bytes).context("warm-up upload")?;
    dialer
        .download(plan.warmup_bytes)
        .context("warm-up download")?;
    dialer.ping_pong(plan.ping_bytes, plan.ping_warmup, 0)?;
    dialer.connection_rate(plan.conn_loops, plan.conn_duration / 4)?;
    Ok(())
}

/// One run of every metric.
pub fn sample(
    spec: &TargetSpec,
    running: &Running,
    dialer: &Dialer,
    plan: &Plan,
    ours: &[u32],
) -> Result<Sample> {
    let pid = running.pid;
    let mut r = Sample::default();

    progress(spec.name, "bulk");
    // A failed transfer (TLS is an integrity check: a lost, duplicated or reordered byte
    // fails the session) is recorded; the other metrics are still measured.
    let mut bulk = || -> Result<()> {
        let m0 = CpuMark::now(pid, ours)?;
        let t_up = dialer.upload(plan.bulk_bytes).context("upload")?;
        let m1 = CpuMark::now(pid, ours)?;
        let t_down = dialer.download(plan.bulk_bytes).context("download")?;
        let m2 = CpuMark::now(pid, ours)?;
        r.cpu = m0.until(&m1) + m1.until(&m2);
        r.gb = 2.0 * plan.bulk_bytes as f64 / 1e9;
        r.up_gbit_s = gbit_s(plan.bulk_bytes, t_up);
        r.down_gbit_s = gbit_s(plan.bulk_bytes, t_down);
        Ok(())
    };
    if let Err(e) = bulk() {
        progress(spec.name, &format!("bulk transfer failed: {e:#}"));
        r.bulk_error = Some(format!("{e:#}"));
    }

    progress(spec.name, "ping-pong");
    let mut rtt = dialer.ping_pong(plan.ping_bytes, plan.ping_warmup, plan.pings)?;
    r.rtt = Percentiles::of(&mut rtt);

    progress(spec.name, "connections");
    let mut rate = dialer.connection_rate(plan.conn_loops, plan.conn_duration)?;
    r.conn_per_s = rate.per_second;
    r.conn_errors = rate.errors;
    r.ttfb = Percentiles::of(&mut rate.ttfb);

    if let Some(pid) = pid {
        progress(spec.name, "idle connections");
        // Connections of the rate test may still be closing.
        thread::sleep(Duration::from_millis(500));
        let rss0 = tree_rss_bytes(pid);
        let slab0 = slab_bytes();
        let held: Vec<Session> = dialer.hold_idle(plan.idle_conns)?;
        thread::sleep(Duration::from_millis(500));
        let rss1 = tree_rss_bytes(pid);
        let slab1 = slab_bytes();
        r.rss_baseline_bytes = rss0;
        r.rss_per_conn = Some((rss1 as f64 - rss0 as f64) / plan.idle_conns as f64);
        r.slab_per_conn = Some((slab1 as f64 - slab0 as f64) / plan.idle_conns as f64);
        for s in held {
            s.close();
        }
    }
    Ok(r)
}

/// The medians of a target's samples.
pub fn summarize(spec: &TargetSpec, samples: &[Sample], plan: &Plan) -> TargetResult {
    let bulk: Vec<&Sample> = samples.iter().filter(|s| s.bulk_error.is_none()).collect();
    let per_gb = |f: fn(&CpuUsed) -> f64| median(bulk.iter().map(|s| f(&s.cpu) / s.gb));
    let rtts: Vec<Percentiles> = samples.iter().map(|s| s.rtt).collect();
    let ttfbs: Vec<Percentiles> = samples.iter().map(|s| s.ttfb).collect();
    // Memory: the largest growth of the runs, not the median. After the first run a proxy's
    // allocator (glibc arenas, HAProxy's pools) keeps what the connections used, and the next
    // runs reuse it without growing: their figures would read as free connections.
    let largest =
        |f: fn(&Sample) -> Option<f64>| samples.iter().filter_map(f).max_by(|a, b| a.total_cmp(b));
    TargetResult {
        target: spec.name.to_owned(),
        about: spec.about.to_owned(),
        error: None,
        up_gbit_s: median(bulk.iter().map(|s| s.up_gbit_s)),
        down_gbit_s: median(bulk.iter().map(|s| s.down_gbit_s)),
        bulk_errors: samples
            .iter()
            .filter_map(|s| s.bulk_error.clone())
            .collect(),
        system_cpu_s_per_gb: per_gb(|c| c.system_s),
        system_cpu_raw_s_per_gb: per_gb(|c| c.system_raw_s),
        proxy_cpu_s_per_gb: per_gb(|c| c.proxy_s),
        foreign_cpu_s: bulk.iter().map(|s| s.cpu.foreign_s).sum(),
        rtt: Percentiles::median(&rtts),
        conn_per_s: median(samples.iter().map(|s| s.conn_per_s)),
        conn_errors: samples.iter().map(|s| s.conn_errors).sum(),
        ttfb: Percentiles::median(&ttfbs),
        idle_conns: plan.idle_conns,
        rss_baseline_bytes: samples.first().map_or(0, |s| s.rss_baseline_bytes),
        rss_per_idle_conn_bytes: largest(|s| s.rss_per_conn),
        rss_per_idle_conn_runs_bytes: samples.iter().filter_map(|s| s.rss_per_conn).collect(),
        slab_per_idle_conn_bytes: largest(|s| s.slab_per_conn),
        routing: None,
        paths: None,
    }
}

/// ingressd passthrough only: connection setup with 1 rule, then with 10,000 (created through
/// the API), hitting an exact and a pattern rule near the end; the rule set is restored.
pub fn routing(
    spec: &TargetSpec,
    running: &Running,
    dialer: &Dialer,
    plan: &Plan,
) -> Result<Option<Routing>> {
    let (Some(daemon), Kind::Ingressd(mode)) = (&running.ingressd, spec.kind) else {
        return Ok(None);
    };
    if mode == crate::ingressd::IngressdMode::Terminate {
        return Ok(None);
    }
    progress(spec.name, "routing, 1 vs 10,000 rules");
    let one_rule = setup_latency(dialer, tls::SNI, plan)?;
    let started = Instant::now();
    daemon.set_rules(true)?;
    let put_many_rules_s = started.elapsed().as_secs_f64();
    let exact = setup_latency(dialer, tls::SNI_LAST_EXACT, plan)?;
    let pattern = setup_latency(dialer, tls::SNI_LAST_PATTERN, plan)?;
    daemon.set_rules(false)?;
    Ok(Some(Routing {
        one_rule,
        many_rules_exact: exact,
        many_rules_pattern: pattern,
        put_many_rules_s,
    }))
}

/// Sequential time to first byte for `sni`, `plan.route_conns` connections per run.
fn setup_latency(dialer: &Dialer, sni: &str, plan: &Plan) -> Result<Percentiles> {
    let mut d = dialer.clone();
    if let Some((config, _)) = &dialer.tls {
        d.tls = Some((config.clone(), ServerName::try_from(sni.to_owned())?));
    }
    for _ in 0..plan.route_conns / 10 {
        d.first_byte()
            .with_context(|| format!("connecting with SNI {sni}"))?;
    }
    let mut runs = Vec::new();
    for _ in 0..plan.runs {
        let mut samples = (0..plan.route_conns)
            .map(|_| d.first_byte())
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("connecting with SNI {sni}"))?;
        runs.push(Percentiles::of(&mut samples));
    }
    Ok(Percentiles::median(&runs))
}

fn gbit_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 * 8.0 / took.as_secs_f64().max(1e-9) / 1e9
}

/// `Slab` of `/proc/meminfo`, bytes.
fn slab_bytes() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("Slab:"))?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// Prints what is being measured.
pub fn progress(target: &str, what: &str) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("[{t:6.1}s] {target}: {what}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_log_lines_add_up() {
        let log = "splice-relay listening on x\n\
            flow 1: sockmap 5s, up kernel 900 relayed 100, down kernel 0 relayed 0, gate closures 3, closed\n\
            flow 2: sockmap 1s, up kernel 0 relayed 0, down kernel 1000 relayed 0, gate closures 0, closed\n";
        let s = PathShare::from_relay_log(log).unwrap();
        assert_eq!(
            (s.flows, s.kernel_bytes, s.relayed_bytes, s.gate_closures),
            (2, 1900, 100, 3)
        );
        assert_eq!(s.kernel_percent(), 95.0);
        assert!(PathShare::from_relay_log("nothing").is_none());
    }
}
