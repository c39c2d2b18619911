//! The router: lookups in tables of 1, 100 and 10,000 rules, exact names and patterns, hitting
//! the last rule; then the p99 of single lookups at 10,000 rules (issue 6: under 1 µs).
#![forbid(unsafe_code)]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion};
use ingress_benches::routing::{self, RuleKind};

fn lookups(c: &mut Criterion) {
    let mut group = c.benchmark_group("route/lookup");
    for kind in [RuleKind::Exact, RuleKind::Pattern] {
        for rules in [1, 100, 10_000] {
            let Ok(table) = routing::table(rules, kind) else {
                eprintln!("could not build a table of {rules} {} rules", kind.as_str());
                continue;
            };
            let host = routing::name(rules - 1, kind);
            group.bench_with_input(BenchmarkId::new(kind.as_str(), rules), &host, |b, host| {
                b.iter(|| table.lookup(black_box(Some(host.as_str()))).is_some())
            });
        }
        let miss = "nothing.example.org";
        if let Ok(table) = routing::table(10_000, kind) {
            group.bench_function(
                BenchmarkId::new(format!("{}-miss", kind.as_str()), 10_000),
                |b| b.iter(|| table.lookup(black_box(Some(miss))).is_some()),
            );
        }
    }
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    lookups(&mut c);
    c.final_summary();
    // Criterion reports means; the goal is a tail, so time single lookups too.
    for kind in [RuleKind::Exact, RuleKind::Pattern] {
        match routing::lookup_latency(10_000, kind, 200_000) {
            Ok(l) => println!(
                "route lookup, 10,000 {} rules, single lookups: p50 {:.0} ns, p99 {:.0} ns, \
                 p99.9 {:.0} ns (clock reads cost {:.0} ns of each)",
                kind.as_str(),
                l.p50_ns,
                l.p99_ns,
                l.p999_ns,
                l.timer_ns
            ),
            Err(e) => eprintln!("route lookup latency: {e:#}"),
        }
    }
}
