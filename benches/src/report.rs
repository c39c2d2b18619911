//! Results as markdown tables (absolute figures with ratios to `direct` side by side), JSON
//! lines, the performance goals checked against the figures, and the README section.
use std::{fmt::Write as _, fs, path::Path};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use crate::{measure::Machine, routing::LookupLatency, run::Plan, run::TargetResult};

/// Everything one invocation measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// `peers` or `splice`.
    pub bench: &'static str,
    /// UTC time the run started, RFC 3339.
    pub date: String,
    /// The machine.
    pub machine: Machine,
    /// The command that produced it.
    pub command: String,
    /// Whether clients spoke TLS end to end.
    pub tls: bool,
    /// Sizes and counts.
    pub plan: Plan,
    /// Per target, in order.
    pub targets: Vec<TargetResult>,
    /// In-process route lookups.
    pub lookups: Vec<LookupLatency>,
    /// One-minute load average when the run ended.
    pub load_1m_at_end: f64,
}

fn by_name<'a>(r: &'a Report, name: &str) -> Option<&'a TargetResult> {
    r.targets
        .iter()
        .find(|t| t.target == name && t.error.is_none())
}

/// `value (ratio×)`, the ratio to the baseline; just the value without a baseline.
fn cell(value: f64, base: Option<f64>, decimals: usize) -> String {
    match base {
        Some(b) if b > 0.0 && value > 0.0 => {
            format!("{value:.decimals$} ({:.2}×)", value / b)
        }
        _ if value == 0.0 => "–".to_owned(),
        _ => format!("{value:.decimals$}"),
    }
}

impl Report {
    /// The markdown report.
    pub fn markdown(&self) -> String {
        let mut m = String::new();
        let direct = by_name(self, "direct");
        let base = |f: fn(&TargetResult) -> f64| direct.map(f);
        let measured: Vec<&TargetResult> =
            self.targets.iter().filter(|t| t.error.is_none()).collect();
        let title = match self.bench {
            "splice" => "Splice engine: direct vs userspace relay vs kernel splice",
            _ => "ingressd vs HAProxy and nginx",
        };
        let _ = writeln!(m, "### {title}\n");
        let _ = writeln!(
            m,
            "{} · {} × {} · kernel {} · load average {:.2} at start, {:.2} at end · `{}`\n",
            self.date,
            self.machine.cpus,
            self.machine.model,
            self.machine.kernel,
            self.machine.load_1m_at_start,
            self.load_1m_at_end,
            self.command
        );
        let session = if self.tls {
            "TLS 1.3 end to end (AES-128-GCM, X25519, ECDSA P-256, no resumption); terminate \
             variants decrypt at the proxy and send plaintext to the backend"
        } else {
            "plaintext TCP end to end, so the engine is all that differs"
        };
        let _ = writeln!(
            m,
            "Median of {} run(s) per figure after a warm-up; `(×)` is the ratio to `direct` of \
             the same run. Client, proxy and backend share the machine's {} CPUs over loopback. \
             Sessions: {session}. System CPU counts every CPU's busy time (`/proc/stat`, so \
             kworkers and softirqs count) minus what unrelated processes used meanwhile.\n",
            self.plan.runs, self.machine.cpus
        );

        let _ = writeln!(
            m,
            "| target | up Gbit/s | down Gbit/s | system CPU s/GB | proxy CPU s/GB |"
        );
        let _ = writeln!(m, "|---|---|---|---|---|");
        for t in &measured {
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {} |",
                t.target,
                cell(t.up_gbit_s, base(|d| d.up_gbit_s), 2),
                cell(t.down_gbit_s, base(|d| d.down_gbit_s), 2),
                cell(t.system_cpu_s_per_gb, base(|d| d.system_cpu_s_per_gb), 3),
                if t.target == "direct" {
                    "–".to_owned()
                } else {
                    format!("{:.3}", t.proxy_cpu_s_per_gb)
                },
            );
        }
        let _ = writeln!(
            m,
            "\n| target | RTT p50 µs | p90 | p99 | p99.9 | conn/s | TTFB p50 ms | TTFB p99 ms | RSS per idle conn KiB |"
        );
        let _ = writeln!(m, "|---|---|---|---|---|---|---|---|---|");
        for t in &measured {
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                t.target,
                cell(t.rtt.p50_us, base(|d| d.rtt.p50_us), 1),
                cell(t.rtt.p90_us, base(|d| d.rtt.p90_us), 1),
                cell(t.rtt.p99_us, base(|d| d.rtt.p99_us), 1),
                cell(t.rtt.p999_us, base(|d| d.rtt.p999_us), 1),
                cell(t.conn_per_s, base(|d| d.conn_per_s), 0),
                cell(t.ttfb.p50_us / 1e3, base(|d| d.ttfb.p50_us / 1e3), 2),
                cell(t.ttfb.p99_us / 1e3, base(|d| d.ttfb.p99_us / 1e3), 2),
                t.rss_per_idle_conn_bytes
                    .map_or_else(|| "–".to_owned(), |b| format!("{:.2}", b / 1024.0)),
            );
        }
        let _ = writeln!(
            m,
            "\nRTT: {}-byte ping-pong, {} round trips per run. conn/s: {} loops, each a new \
             connection{}, one byte each way, close; {:.0} s per run; TTFB from connect to the \
             first byte. Memory: proxy RSS growth (all its processes) over {} connections held \
             open, each answered once end to end; the largest of the runs, since later runs \
             reuse memory the proxy's allocator kept from the first.",
            self.plan.ping_bytes,
            self.plan.pings,
            self.plan.conn_loops,
            if self.tls {
                " with a full TLS handshake"
            } else {
                ""
            },
            self.plan.conn_duration.as_secs_f64(),
            self.plan.idle_conns
        );
        for t in &measured {
            if let Some(p) = &t.paths {
                let _ = writeln!(
                    m,
                    "`{}` bulk flows: the kernel path carried {:.1} % of {} MiB over {} flows, \
                     the relay the rest; gate closures: {}.",
                    t.target,
                    p.kernel_percent(),
                    (p.kernel_bytes + p.relayed_bytes) >> 20,
                    p.flows,
                    p.gate_closures
                );
            }
        }
        for t in &measured {
            if !t.bulk_errors.is_empty() {
                let _ = writeln!(
                    m,
                    "**`{}`: {} of {} bulk runs failed** (the TLS session broke: {}); its \
                     throughput and CPU figures come from the runs that completed{}.",
                    t.target,
                    t.bulk_errors.len(),
                    self.plan.runs,
                    t.bulk_errors
                        .first()
                        .map_or("", |e| e.lines().next().unwrap_or_default()),
                    if t.bulk_errors.len() >= self.plan.runs {
                        " — none did"
                    } else {
                        ""
                    }
                );
            }
        }
        let errors: u64 = measured.iter().map(|t| t.conn_errors).sum();
        if errors > 0 {
            let list: Vec<String> = measured
                .iter()
                .filter(|t| t.conn_errors > 0)
                .map(|t| format!("{} {}", t.target, t.conn_errors))
                .collect();
            let _ = writeln!(
                m,
                "Failed connections during the rate runs: {}.",
                list.join(", ")
            );
        }

        let routed: Vec<&&TargetResult> = measured.iter().filter(|t| t.routing.is_some()).collect();
        if !routed.is_empty() {
            let _ = writeln!(
                m,
                "\nRouting, connection setup (connect + handshake + first byte, sequential), p50 / p99 ms:\n"
            );
            let _ = writeln!(
                m,
                "| target | 1 rule | 10,000 rules, exact hit near the end | 10,000 rules, pattern \
                 hit near the end | PUT of the 10,000 rules, s |"
            );
            let _ = writeln!(m, "|---|---|---|---|---|");
            for t in routed {
                if let Some(r) = &t.routing {
                    let f = |p: &crate::stats::Percentiles| {
                        format!("{:.3} / {:.3}", p.p50_us / 1e3, p.p99_us / 1e3)
                    };
                    let _ = writeln!(
                        m,
                        "| {} | {} | {} | {} | {:.2} |",
                        t.target,
                        f(&r.one_rule),
                        f(&r.many_rules_exact),
                        f(&r.many_rules_pattern),
                        r.put_many_rules_s
                    );
                }
            }
        }
        if !self.lookups.is_empty() {
            let _ = writeln!(
                m,
                "\nRoute lookup in-process (`RouteTable::lookup`, one clock pair per lookup, \
                 timer cost included), ns:\n"
            );
            let _ = writeln!(m, "| rules | kind | p50 | p99 | p99.9 | timer |");
            let _ = writeln!(m, "|---|---|---|---|---|---|");
            for l in &self.lookups {
                let _ = writeln!(
                    m,
                    "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
                    l.rules,
                    l.kind.as_str(),
                    l.p50_ns,
                    l.p99_ns,
                    l.p999_ns,
                    l.timer_ns
                );
            }
        }
        let goals = self.goals();
        if !goals.is_empty() {
            let _ = writeln!(m, "\nPerformance goals against this run:\n");
            let _ = writeln!(m, "| goal | measured | needed | status |");
            let _ = writeln!(m, "|---|---|---|---|");
            for g in &goals {
                let _ = writeln!(
                    m,
                    "| {} | {} | {} | {} |",
                    g.goal, g.measured, g.needed, g.status
                );
            }
        }
        let skipped: Vec<&TargetResult> =
            self.targets.iter().filter(|t| t.error.is_some()).collect();
        if !skipped.is_empty() {
            let _ = writeln!(m, "\nNot measured:\n");
            for t in skipped {
                let _ = writeln!(
                    m,
                    "- `{}`: {}",
                    t.target,
                    t.error
                        .as_deref()
                        .unwrap_or_default()
                        .lines()
                        .next()
                        .unwrap_or_default()
                );
            }
        }
        m
    }

    /// The bulk goals of a passthrough target `t` (named `who` in the goal), when its bulk
    /// transfers were measured: throughput against haproxy-splice, system CPU per GB against
    /// HAProxy.
    fn bulk_goals(&self, goals: &mut Vec<Goal>, who: &str, stand_in: &str, t: &TargetResult) {
        if t.up_gbit_s <= 0.0 {
            return;
        }
        if let Some(h) = by_name(self, "haproxy-splice") {
            goals.push(Goal::at_least(
                format!("{who} up throughput ≥ 1.25× haproxy-splice{stand_in}"),
                t.up_gbit_s / h.up_gbit_s,
                1.25,
                "×",
            ));
            goals.push(Goal::at_least(
                format!("{who} down throughput ≥ 1.25× haproxy-splice{stand_in}"),
                t.down_gbit_s / h.down_gbit_s,
                1.25,
                "×",
            ));
        }
        if let Some(h) = by_name(self, "haproxy") {
            goals.push(Goal::at_most(
                format!("{who} system CPU/GB ≤ 0.75× haproxy{stand_in}"),
                t.system_cpu_s_per_gb / h.system_cpu_s_per_gb,
                0.75,
                "×",
            ));
        }
    }

    /// The performance goals that this run has the figures for.
    pub fn goals(&self) -> Vec<Goal> {
        let mut goals = Vec::new();
        if self.bench != "peers" {
            return goals;
        }
        let (kernel, stand_in) = match by_name(self, "ingressd-kernel") {
            Some(k) => (Some(k), ""),
            None => (
                by_name(self, "splice-kernel"),
                " (splice-kernel standing in)",
            ),
        };
        if let Some(k) = kernel {
            if !k.bulk_errors.is_empty() {
                goals.push(Goal {
                    goal: format!("kernel bulk transfers arrive intact{stand_in}"),
                    measured: format!("{} of {} failed", k.bulk_errors.len(), self.plan.runs),
                    needed: "all intact".to_owned(),
                    status: "failed".to_owned(),
                    met: false,
                });
            }
            self.bulk_goals(&mut goals, "kernel", stand_in, k);
            if let Some(h) = by_name(self, "haproxy") {
                goals.push(Goal::at_most(
                    format!("kernel RTT p99 ≤ haproxy's{stand_in}"),
                    k.rtt.p99_us,
                    h.rtt.p99_us,
                    " µs",
                ));
                goals.push(Goal::at_most(
                    format!("kernel RTT p99.9 ≤ haproxy's{stand_in}"),
                    k.rtt.p999_us,
                    h.rtt.p999_us,
                    " µs",
                ));
                goals.push(Goal::at_least(
                    format!("kernel conn/s ≥ haproxy's{stand_in}"),
                    k.conn_per_s,
                    h.conn_per_s,
                    "/s",
                ));
            }
            if let Some(b) = k.rss_per_idle_conn_bytes {
                goals.push(Goal::at_most(
                    format!("kernel memory per idle flow ≤ 1 KiB{stand_in}"),
                    b / 1024.0,
                    1.0,
                    " KiB",
                ));
            }
        }
        if let Some(a) = by_name(self, "ingressd-adaptive") {
            self.bulk_goals(&mut goals, "adaptive", "", a);
        }
        if let (Some(t), Some(h)) = (
            by_name(self, "ingressd-terminate"),
            by_name(self, "haproxy-terminate"),
        ) {
            goals.push(Goal::at_least(
                "terminate conn/s ≥ haproxy-terminate".to_owned(),
                t.conn_per_s,
                h.conn_per_s,
                "/s",
            ));
            goals.push(Goal::at_least(
                "terminate up throughput ≥ haproxy-terminate".to_owned(),
                t.up_gbit_s,
                h.up_gbit_s,
                " Gbit/s",
            ));
            goals.push(Goal::at_least(
                "terminate down throughput ≥ haproxy-terminate".to_owned(),
                t.down_gbit_s,
                h.down_gbit_s,
                " Gbit/s",
            ));
            if let (Some(a), Some(b)) = (t.rss_per_idle_conn_bytes, h.rss_per_idle_conn_bytes) {
                goals.push(Goal::at_most(
                    "terminate memory per idle conn ≤ haproxy-terminate".to_owned(),
                    a / 1024.0,
                    b / 1024.0,
                    " KiB",
                ));
            }
        }
        if let Some(l) = self
            .lookups
            .iter()
            .filter(|l| l.rules >= 10_000)
            .max_by(|a, b| a.p99_ns.total_cmp(&b.p99_ns))
        {
            goals.push(Goal::at_most(
                format!(
                    "route lookup p99 < 1 µs at {} rules ({})",
                    l.rules,
                    l.kind.as_str()
                ),
                l.p99_ns,
                1000.0,
                " ns",
            ));
        }
        goals
    }

    /// One JSON object per line: the run, then each target, lookup table and goal.
    pub fn json_lines(&self) -> Result<String> {
        let mut out = String::new();
        let meta = serde_json::json!({
            "kind": "run", "bench": self.bench, "date": self.date, "machine": self.machine,
            "command": self.command, "tls": self.tls, "plan": self.plan,
            "load_1m_at_end": self.load_1m_at_end,
        });
        out.push_str(&serde_json::to_string(&meta)?);
        out.push('\n');
        for t in &self.targets {
            let mut v = serde_json::to_value(t)?;
            v["kind"] = "target".into();
            v["bench"] = self.bench.into();
            v["date"] = self.date.clone().into();
            out.push_str(&serde_json::to_string(&v)?);
            out.push('\n');
        }
        for l in &self.lookups {
            let mut v = serde_json::to_value(l)?;
            v["kind"] = "route_lookup".into();
            v["date"] = self.date.clone().into();
            out.push_str(&serde_json::to_string(&v)?);
            out.push('\n');
        }
        for g in self.goals() {
            let mut v = serde_json::to_value(&g)?;
            v["kind"] = "goal".into();
            v["date"] = self.date.clone().into();
            out.push_str(&serde_json::to_string(&v)?);
            out.push('\n');
        }
        Ok(out)
    }

    /// Writes `<dir>/<stem>.md` and `<dir>/<stem>.jsonl`.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let md = dir.join(format!("{stem}.md"));
        fs::write(&md, self.markdown()).with_context(|| format!("writing {}", md.display()))?;
        let jsonl = dir.join(format!("{stem}.jsonl"));
        fs::write(&jsonl, self.json_lines()?)
            .with_context(|| format!("writing {}", jsonl.display()))?;
        eprintln!("wrote {} and {}", md.display(), jsonl.display());
        Ok(())
    }
}

/// One performance goal checked against a run.
#[derive(Clone, Debug, Serialize)]
pub struct Goal {
    /// What the goal says.
    pub goal: String,
    /// The measured figure.
    pub measured: String,
    /// The bound.
    pub needed: String,
    /// `met`, or by how much it falls short.
    pub status: String,
    /// Whether it holds.
    pub met: bool,
}

impl Goal {
    fn at_least(goal: String, value: f64, bound: f64, unit: &str) -> Self {
        let met = value >= bound;
        Self {
            goal,
            measured: format!("{value:.2}{unit}"),
            needed: format!("≥ {bound:.2}{unit}"),
            status: if met {
                "met".to_owned()
            } else {
                format!("short by {:.0} %", (1.0 - value / bound) * 100.0)
            },
            met,
        }
    }

    fn at_most(goal: String, value: f64, bound: f64, unit: &str) -> Self {
        let met = value <= bound;
        Self {
            goal,
            measured: format!("{value:.2}{unit}"),
            needed: format!("≤ {bound:.2}{unit}"),
            status: if met {
                "met".to_owned()
            } else {
                format!("over by {:.0} %", (value / bound - 1.0) * 100.0)
            },
            met,
        }
    }
}

/// Replaces the text between `<!-- {marker}:begin -->` and `<!-- {marker}:end -->` in `path`.
pub fn update_readme(path: &Path, marker: &str, body: &str) -> Result<()> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let begin = format!("<!-- {marker}:begin -->");
    let end = format!("<!-- {marker}:end -->");
    let (Some(b), Some(e)) = (text.find(&begin), text.find(&end)) else {
        bail!("{} has no {begin} … {end} section", path.display());
    };
    if e < b {
        bail!("{}: {end} comes before {begin}", path.display());
    }
    let updated = format!("{}{begin}\n{body}\n{}", &text[..b], &text[e..]);
    fs::write(path, updated).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("updated {} ({marker})", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_put_the_ratio_beside_the_value() {
        assert_eq!(cell(5.0, Some(10.0), 1), "5.0 (0.50×)");
        assert_eq!(cell(5.0, None, 2), "5.00");
        assert_eq!(cell(0.0, Some(1.0), 2), "–");
    }

    #[test]
    fn goals_say_by_how_much_they_fall_short() {
        let g = Goal::at_least("x".into(), 1.0, 1.25, "×");
        assert!(!g.met);
        assert_eq!(g.status, "short by 20 %");
        let g = Goal::at_most("y".into(), 1.5, 1.0, " KiB");
        assert_eq!(g.status, "over by 50 %");
        assert!(Goal::at_most("z".into(), 0.5, 1.0, "").met);
    }

    #[test]
    fn kernel_and_adaptive_targets_get_the_same_bulk_goals() {
        let target = |name: &str, up: f64, down: f64, cpu: f64| TargetResult {
            target: name.to_owned(),
            up_gbit_s: up,
            down_gbit_s: down,
            system_cpu_s_per_gb: cpu,
            ..TargetResult::default()
        };
        let report = Report {
            bench: "peers",
            date: String::new(),
            machine: Machine {
                cpus: 2,
                model: String::new(),
                kernel: String::new(),
                load_1m_at_start: 0.0,
            },
            command: String::new(),
            tls: true,
            plan: Plan::full(),
            targets: vec![
                target("ingressd-kernel", 2.0, 4.0, 1.8),
                target("ingressd-adaptive", 10.0, 12.0, 1.5),
                // Not measured in bulk: no bulk goals for it.
                target("haproxy", 0.0, 0.0, 2.0),
                target("haproxy-splice", 8.0, 8.0, 1.9),
            ],
            lookups: Vec::new(),
            load_1m_at_end: 0.0,
        };
        let bulk: Vec<(String, String)> = report
            .goals()
            .into_iter()
            .filter(|g| g.goal.contains("throughput") || g.goal.contains("CPU/GB"))
            .map(|g| (g.goal, g.measured))
            .collect();
        let want = [
            ("kernel up throughput ≥ 1.25× haproxy-splice", "0.25×"),
            ("kernel down throughput ≥ 1.25× haproxy-splice", "0.50×"),
            ("kernel system CPU/GB ≤ 0.75× haproxy", "0.90×"),
            ("adaptive up throughput ≥ 1.25× haproxy-splice", "1.25×"),
            ("adaptive down throughput ≥ 1.25× haproxy-splice", "1.50×"),
            ("adaptive system CPU/GB ≤ 0.75× haproxy", "0.75×"),
        ]
        .map(|(g, m)| (g.to_owned(), m.to_owned()));
        assert_eq!(bulk, want);
    }

    #[test]
    fn readme_section_is_replaced_between_markers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("README.md");
        fs::write(&p, "a\n<!-- x:begin -->\nold\n<!-- x:end -->\nb\n").unwrap();
        update_readme(&p, "x", "new").unwrap();
        assert_eq!(
            fs::read_to_string(&p).unwrap(),
            "a\n<!-- x:begin -->\nnew\n<!-- x:end -->\nb\n"
        );
    }
}
