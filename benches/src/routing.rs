//! Routing tables of a given size, and the latency of single lookups in them (in-process, no
//! sockets), for the criterion bench and the report's "p99 route lookup" line.
use std::{hint::black_box, time::Instant};

use anyhow::{Context as _, Result};
use ingress_daemon::{model::TcpIngress, route::RouteTable};
use serde_json::{Value, json};

/// Which rules a table holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    /// `db<i>.example.com` → `bench`.
    Exact,
    /// `{id}.r<i>.example.com` → `{id}`.
    Pattern,
}

impl RuleKind {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::Pattern => "pattern",
        }
    }
}

/// A table of `rules` rules of `kind`.
pub fn table(rules: usize, kind: RuleKind) -> Result<RouteTable> {
    let rules: Vec<Value> = (0..rules)
        .map(|i| {
            let (sni, instance) = match kind {
                RuleKind::Exact => (format!("db{i}.example.com"), "bench".to_owned()),
                RuleKind::Pattern => (format!("{{id}}.r{i}.example.com"), "{id}".to_owned()),
            };
            json!({"match": {"sni": sni}, "target": {"instance": instance, "port": 443},
                   "mode": "passthrough"})
        })
        .collect();
    let ingress: TcpIngress = serde_json::from_value(json!({
        "id": "bench", "name": "bench", "listen_port": 443, "rules": rules,
        "created_at": "2026-01-01T00:00:00Z"
    }))
    .context("building the benchmark ingress")?;
    RouteTable::build(&ingress).map_err(|e| anyhow::anyhow!("building the route table: {e:?}"))
}

/// The name rule `i` of a [`table`] matches.
pub fn name(i: usize, kind: RuleKind) -> String {
    match kind {
        RuleKind::Exact => format!("db{i}.example.com"),
        RuleKind::Pattern => format!("bench.r{i}.example.com"),
    }
}

/// Latency of single lookups, in nanoseconds.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct LookupLatency {
    /// Rules in the table.
    pub rules: usize,
    /// Their kind.
    pub kind: RuleKind,
    /// Median.
    pub p50_ns: f64,
    /// 99th percentile.
    pub p99_ns: f64,
    /// 99.9th percentile.
    pub p999_ns: f64,
    /// Median cost of the clock reads around each lookup (included in the figures above).
    pub timer_ns: f64,
}

/// Times `samples` single lookups, cycling through names of every rule (so the table does not
/// sit in the cache as one hot entry would), each with its own pair of clock reads.
pub fn lookup_latency(rules: usize, kind: RuleKind, samples: usize) -> Result<LookupLatency> {
    let t = table(rules, kind)?;
    // A fixed stride through the rules visits them all in a cache-unfriendly order.
    let names: Vec<String> = (0..rules.min(4096))
        .map(|j| name((j * 7919) % rules, kind))
        .collect();
    let mut took = Vec::with_capacity(samples);
    let mut timer = Vec::with_capacity(samples);
    for i in 0..samples {
        let host = names.get(i % names.len()).map_or("", String::as_str);
        let started = Instant::now();
        let route = t.lookup(black_box(Some(host)));
        let elapsed = started.elapsed();
        black_box(route.is_some());
        took.push(elapsed.as_nanos() as f64);
        let started = Instant::now();
        timer.push(black_box(started).elapsed().as_nanos() as f64);
    }
    let q = |v: &mut Vec<f64>, q: f64| {
        v.sort_by(f64::total_cmp);
        let idx = ((q * v.len() as f64 - 1e-9).ceil() as usize).clamp(1, v.len().max(1)) - 1;
        v.get(idx).copied().unwrap_or(0.0)
    };
    Ok(LookupLatency {
        rules,
        kind,
        p50_ns: q(&mut took, 0.5),
        p99_ns: q(&mut took, 0.99),
        p999_ns: q(&mut took, 0.999),
        timer_ns: q(&mut timer, 0.5),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_route_their_last_rule() {
        for kind in [RuleKind::Exact, RuleKind::Pattern] {
            let t = table(100, kind).unwrap();
            let route = t.lookup(Some(&name(99, kind))).unwrap();
            assert_eq!(route.instance, "bench");
            assert_eq!(route.rule_index, Some(99));
        }
    }
}
