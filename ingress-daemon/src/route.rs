//! The per-listener routing table, compiled once per change and read without locks.
//!
//! Design: exact hostnames live in a hash map; patterns are grouped by label count, then by
//! *shape* (which label positions are literal), most literal labels first. Within a shape a
//! hash of the literal labels finds the candidates, which are then checked label by label, so a
//! lookup costs one hash probe per shape instead of a scan over every rule. The hostname is
//! lower-cased into a stack buffer, so exact matches and misses never allocate (a pattern match
//! allocates only the rendered instance name). The hostname is split into labels once per
//! lookup, into a small stack array for the usual few labels. Hashes are foldhash with a fixed
//! seed: only operators insert keys, and a client's probe cannot make two inserted keys
//! collide. Tables are immutable; a change builds a new one and swaps it into the listener's
//! [`SharedRoutes`] (`ArcSwap`), which readers `load()` lock-free.
use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{BuildHasher as _, Hasher as _};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::error::ApiError;
use crate::model::{Mode, Protocol, ProxyProtocol, TcpIngress};
use crate::pattern::{
    Label, MAX_HOST_BYTES, MAX_LABELS, SniPattern, Template, lower_ascii, split_labels,
};

/// The tables' hasher: fast, seeded with a constant (see the module's design note).
type FixedHash = foldhash::fast::FixedState;

/// A listener's current routing table, swapped atomically on every change.
pub type SharedRoutes = Arc<ArcSwap<RouteTable>>;

/// Labels a hostname usually has at most: such names are split into a smaller stack array.
const FEW_LABELS: usize = 8;

/// How a route was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteSource {
    /// The SNI equals a rule's hostname.
    Exact,
    /// The SNI matched a rule's pattern.
    Pattern,
    /// No SNI, or no rule matched: the ingress's default target.
    Default,
}

/// The routing decision for one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route<'a> {
    /// How the route was chosen.
    pub source: RouteSource,
    /// Index of the rule in the ingress's `rules`, `None` for the default target.
    pub rule_index: Option<usize>,
    /// The instance name, captures substituted.
    pub instance: Cow<'a, str>,
    /// Backend port.
    pub port: u16,
    /// TLS handling; the default target is always passthrough.
    pub mode: Mode,
    /// Protocol in front of TLS.
    pub protocol: Protocol,
    /// PROXY protocol header to send, if any.
    pub proxy_protocol: Option<ProxyProtocol>,
    /// ALPN names offered when terminating, in preference order (empty: none).
    pub alpn: &'a Alpn,
    /// The rule's SNI pattern (for logs), `None` for the default target.
    pub sni_pattern: Option<&'a str>,
    /// The rule's SNI pattern, or `default` for the default target, shared with the table so
    /// an access log record takes it without a copy.
    pub rule_name: &'a Arc<str>,
    /// The instance name shared with the table, when it has no capture.
    pub shared_instance: Option<&'a Arc<str>>,
}

#[derive(Debug)]
struct Entry {
    rule_index: usize,
    pattern: SniPattern,
    template: Template,
    /// The pattern, shared with access log records.
    pattern_name: Arc<str>,
    /// The instance name when the template has no capture, shared with access log records.
    instance_name: Option<Arc<str>>,
    port: u16,
    mode: Mode,
    protocol: Protocol,
    proxy_protocol: Option<ProxyProtocol>,
    alpn: Alpn,
}

/// ALPN names a terminate rule offers, in preference order, shared with the flows that use it.
pub type Alpn = Arc<[Vec<u8>]>;

#[derive(Debug)]
struct DefaultEntry {
    instance: Arc<str>,
    /// `default`, shared with access log records.
    rule_name: Arc<str>,
    port: u16,
    protocol: Protocol,
    proxy_protocol: Option<ProxyProtocol>,
    /// Never offered (the default target is passthrough); here so a route can borrow it.
    alpn: Alpn,
}

/// Patterns of one label count sharing the same literal positions.
#[derive(Debug)]
struct Shape {
    literal_positions: Box<[u8]>,
    by_literals: HashMap<u64, Candidates, FixedHash>,
}

/// The entries whose literal labels hash alike: almost always one, held inline so a lookup
/// reads no further allocation to find it.
#[derive(Debug)]
struct Candidates {
    first: u32,
    rest: Vec<u32>,
}

impl Candidates {
    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        std::iter::once(self.first).chain(self.rest.iter().copied())
    }
}

/// An immutable routing table for one listener.
#[derive(Debug, Default)]
pub struct RouteTable {
    entries: Vec<Entry>,
    exact: HashMap<Box<str>, u32, FixedHash>,
    /// Indexed by label count; shapes ordered by literal labels, most first.
    shapes_by_len: Vec<Vec<Shape>>,
    default: Option<DefaultEntry>,
    idle_timeout: Option<std::time::Duration>,
}

fn literal_hash<'s>(labels: impl Iterator<Item = &'s str>) -> u64 {
    let mut h = FixedHash::default().build_hasher();
    for l in labels {
        h.write(l.as_bytes());
        h.write_u8(0xff);
    }
    h.finish()
}

impl RouteTable {
    /// A table that routes nothing.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Compiles the table of a stored ingress (validating it again).
    pub fn build(ingress: &TcpIngress) -> Result<Self, ApiError> {
        let mut spec = ingress.spec();
        let checked = spec.validate()?;
        let mut table = Self::default();
        for (i, (rule, c)) in spec.rules.iter().zip(checked).enumerate() {
            let idx = u32::try_from(table.entries.len())
                .map_err(|_| ApiError::bad_request("rules: too many rules"))?;
            if c.pattern.is_exact() {
                table.exact.insert(c.pattern.as_str().into(), idx);
            } else {
                table.insert_pattern(&c.pattern, idx);
            }
            table.entries.push(Entry {
                rule_index: i,
                pattern_name: c.pattern.as_str().into(),
                instance_name: c.template.literal().map(Arc::from),
                pattern: c.pattern,
                template: c.template,
                port: rule.target.port,
                mode: rule.mode,
                protocol: rule.protocol,
                proxy_protocol: rule.proxy_protocol,
                alpn: rule.effective_alpn().into(),
            });
        }
        for shapes in &mut table.shapes_by_len {
            shapes.sort_by_key(|s| std::cmp::Reverse(s.literal_positions.len()));
        }
        table.default = spec.default_target.map(|d| DefaultEntry {
            instance: d.instance.into(),
            rule_name: Arc::from("default"),
            port: d.port,
            protocol: d.protocol,
            proxy_protocol: d.proxy_protocol,
            alpn: Arc::new([]),
        });
        table.idle_timeout = spec
            .idle_timeout_secs
            .map(|s| std::time::Duration::from_secs(u64::from(s)));
        Ok(table)
    }

    fn insert_pattern(&mut self, pattern: &SniPattern, idx: u32) {
        let labels = pattern.labels();
        let positions: Box<[u8]> = labels
            .iter()
            .enumerate()
            .filter(|(_, l)| matches!(l, Label::Literal(_)))
            .filter_map(|(i, _)| u8::try_from(i).ok())
            .collect();
        let key = literal_hash(labels.iter().filter_map(|l| match l {
            Label::Literal(s) => Some(&**s),
            Label::Capture(_) => None,
        }));
        if self.shapes_by_len.len() <= labels.len() {
            self.shapes_by_len.resize_with(labels.len() + 1, Vec::new);
        }
        let Some(shapes) = self.shapes_by_len.get_mut(labels.len()) else {
            return;
        };
        let shape = match shapes.iter().position(|s| s.literal_positions == positions) {
            Some(i) => &mut shapes[i],
            None => {
                shapes.push(Shape {
                    literal_positions: positions,
                    by_literals: HashMap::default(),
                });
                let last = shapes.len() - 1;
                &mut shapes[last]
            }
        };
        match shape.by_literals.entry(key) {
            std::collections::hash_map::Entry::Occupied(mut c) => c.get_mut().rest.push(idx),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(Candidates {
                    first: idx,
                    rest: Vec::new(),
                });
            }
        }
    }

    /// How long a flow of this ingress may stay idle; `None`: no limit.
    pub fn idle_timeout(&self) -> Option<std::time::Duration> {
        self.idle_timeout
    }

    /// Whether any rule (or the default target) speaks Postgres, so a connection may open with
    /// an SSLRequest instead of a ClientHello.
    pub fn has_postgres(&self) -> bool {
        self.entries
            .iter()
            .any(|e| e.protocol == Protocol::Postgres)
            || self
                .default
                .as_ref()
                .is_some_and(|d| d.protocol == Protocol::Postgres)
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table has no rules and no default target.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.default.is_none()
    }

    /// Routes a connection by its SNI: exact match, then patterns (most literal labels first),
    /// then the default target. `None` means the connection must be closed.
    pub fn lookup(&self, sni: Option<&str>) -> Option<Route<'_>> {
        let mut buf = [0u8; MAX_HOST_BYTES];
        if let Some(host) = sni.and_then(|s| lower_ascii(s, &mut buf)) {
            if let Some(e) = self
                .exact
                .get(host)
                .and_then(|i| self.entries.get(*i as usize))
            {
                return Some(self.route(e, RouteSource::Exact, &[]));
            }
            let label_count = host.bytes().filter(|b| *b == b'.').count() + 1;
            let route = if label_count <= FEW_LABELS {
                self.match_pattern::<FEW_LABELS>(host, label_count)
            } else {
                self.match_pattern::<MAX_LABELS>(host, label_count)
            };
            if route.is_some() {
                return route;
            }
        }
        self.default.as_ref().map(|d| Route {
            source: RouteSource::Default,
            rule_index: None,
            instance: Cow::Borrowed(&d.instance),
            port: d.port,
            mode: Mode::Passthrough,
            protocol: d.protocol,
            proxy_protocol: d.proxy_protocol,
            alpn: &d.alpn,
            sni_pattern: None,
            rule_name: &d.rule_name,
            shared_instance: Some(&d.instance),
        })
    }

    /// The route of the first pattern `host` (of `label_count` labels, at most `N`) matches.
    fn match_pattern<const N: usize>(&self, host: &str, label_count: usize) -> Option<Route<'_>> {
        let shapes = self.shapes_by_len.get(label_count)?;
        if shapes.is_empty() {
            return None;
        }
        let mut slots = [""; N];
        let labels = split_labels(host, &mut slots)?;
        for shape in shapes {
            let key = literal_hash(
                shape
                    .literal_positions
                    .iter()
                    .map(|p| labels.get(usize::from(*p)).copied().unwrap_or_default()),
            );
            let Some(candidates) = shape.by_literals.get(&key) else {
                continue;
            };
            for idx in candidates.iter() {
                if let Some(e) = self.entries.get(idx as usize)
                    && e.pattern.matches_labels(labels)
                {
                    return Some(self.route(e, RouteSource::Pattern, labels));
                }
            }
        }
        None
    }

    /// The route of entry `e`, its captures taken from the hostname's `labels` (exact entries
    /// have none).
    fn route<'a>(&'a self, e: &'a Entry, source: RouteSource, labels: &[&str]) -> Route<'a> {
        let instance = match &e.instance_name {
            Some(name) => Cow::Borrowed(&**name),
            None => Cow::Owned(e.template.render_labels(labels)),
        };
        Route {
            source,
            rule_index: Some(e.rule_index),
            instance,
            port: e.port,
            mode: e.mode,
            protocol: e.protocol,
            proxy_protocol: e.proxy_protocol,
            alpn: &e.alpn,
            sni_pattern: Some(e.pattern.as_str()),
            rule_name: &e.pattern_name,
            shared_instance: e.instance_name.as_ref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ingress(rules: serde_json::Value, default: Option<serde_json::Value>) -> TcpIngress {
        let mut v = serde_json::json!({
            "id": "abc", "name": "pg", "listen_port": 5432, "rules": rules,
            "created_at": "2026-01-01T00:00:00Z"
        });
        if let Some(d) = default {
            v["default_target"] = d;
        }
        serde_json::from_value(v).unwrap()
    }

    fn rule(sni: &str, instance: &str, port: u16) -> serde_json::Value {
        serde_json::json!({"match": {"sni": sni}, "target": {"instance": instance, "port": port},
            "mode": "passthrough"})
    }

    fn table() -> RouteTable {
        RouteTable::build(&ingress(
            serde_json::json!([
                rule("{id}.pg.example.com", "pg-{id}", 1),
                rule("db.pg.example.com", "primary", 2),
                rule("{a}.{b}.example.net", "x-{b}-{a}", 3),
                rule("{id}.example.org", "org-{id}", 4),
            ]),
            Some(serde_json::json!({"instance": "fallback", "port": 9})),
        ))
        .unwrap()
    }

    #[test]
    fn exact_beats_pattern_beats_default() {
        let t = table();
        let r = t.lookup(Some("DB.pg.Example.com")).unwrap();
        assert_eq!(
            (r.source, r.instance.as_ref(), r.port),
            (RouteSource::Exact, "primary", 2)
        );
        assert!(matches!(r.instance, Cow::Borrowed(_)));
        let r = t.lookup(Some("db7.pg.example.com")).unwrap();
        assert_eq!(
            (r.source, r.instance.as_ref(), r.port),
            (RouteSource::Pattern, "pg-db7", 1)
        );
        assert_eq!(r.sni_pattern, Some("{id}.pg.example.com"));
        assert_eq!(r.rule_index, Some(0));
        let r = t.lookup(Some("nope.example.com")).unwrap();
        assert_eq!(
            (r.source, r.instance.as_ref(), r.port),
            (RouteSource::Default, "fallback", 9)
        );
        assert_eq!(r.mode, Mode::Passthrough);
        let r = t.lookup(None).unwrap();
        assert_eq!(r.source, RouteSource::Default);
    }

    #[test]
    fn log_names_are_shared_with_the_table() {
        let t = table();
        let exact = t.lookup(Some("db.pg.example.com")).unwrap();
        assert_eq!(&**exact.rule_name, "db.pg.example.com");
        assert_eq!(exact.shared_instance.map(|n| &**n), Some("primary"));
        let again = t.lookup(Some("DB.PG.EXAMPLE.COM")).unwrap();
        assert!(Arc::ptr_eq(exact.rule_name, again.rule_name));
        let pattern = t.lookup(Some("db7.pg.example.com")).unwrap();
        assert_eq!(&**pattern.rule_name, "{id}.pg.example.com");
        assert_eq!(pattern.shared_instance, None);
        let default = t.lookup(None).unwrap();
        assert_eq!(&**default.rule_name, "default");
        assert_eq!(default.shared_instance.map(|n| &**n), Some("fallback"));
    }

    #[test]
    fn several_captures_render_in_template_order() {
        let t = table();
        let r = t.lookup(Some("x.qq.example.net")).unwrap();
        assert_eq!((r.instance.as_ref(), r.port), ("x-qq-x", 3));
    }

    #[test]
    fn overlapping_patterns_never_reach_a_table() {
        let err = RouteTable::build(&ingress(
            serde_json::json!([
                rule("{id}.pg.example.com", "a", 1),
                rule("{a}.{b}.example.com", "b", 2)
            ]),
            None,
        ))
        .unwrap_err();
        assert_eq!(err.code, crate::error::ErrorCode::SniConflict);
    }

    #[test]
    fn captures_never_match_more_than_one_label() {
        let t = table();
        assert_eq!(
            t.lookup(Some("a.b.example.org")).unwrap().source,
            RouteSource::Default
        );
        assert_eq!(
            t.lookup(Some("a_b.example.org")).unwrap().source,
            RouteSource::Default
        );
        assert_eq!(t.lookup(Some("")).unwrap().source, RouteSource::Default);
        assert_eq!(
            t.lookup(Some("ü.example.org")).unwrap().source,
            RouteSource::Default
        );
        assert_eq!(
            t.lookup(Some(&"a.".repeat(200))).unwrap().source,
            RouteSource::Default
        );
    }

    #[test]
    fn long_names_split_past_the_small_label_array() {
        let labels: Vec<String> = (0..FEW_LABELS + 3).map(|i| format!("l{i}")).collect();
        let pattern = format!("{{id}}.{}.{{tail}}", labels.join("."));
        let host = |first: &str, last: &str| format!("{first}.{}.{last}", labels.join("."));
        let t = RouteTable::build(&ingress(
            serde_json::json!([rule(&pattern, "{id}-{tail}", 7)]),
            None,
        ))
        .unwrap();
        let r = t.lookup(Some(&host("Db1", "z9"))).unwrap();
        assert_eq!(
            (r.source, r.instance.as_ref(), r.port),
            (RouteSource::Pattern, "db1-z9", 7)
        );
        // One literal label off, one label short, one label too many: no route.
        assert!(
            t.lookup(Some(&host("db1", "z9").replace("l3.", "l4.")))
                .is_none()
        );
        assert!(
            t.lookup(Some(&host("db1", "z9").replace("l3.", "")))
                .is_none()
        );
        assert!(t.lookup(Some(&host("db1", "z9.x"))).is_none());
    }

    #[test]
    fn no_default_means_no_route() {
        let t = RouteTable::build(&ingress(serde_json::json!([rule("a.x.com", "a", 1)]), None))
            .unwrap();
        assert!(t.lookup(Some("b.x.com")).is_none());
        assert!(t.lookup(None).is_none());
        assert_eq!(t.lookup(Some("A.X.COM")).unwrap().instance, "a");
        assert!(RouteTable::empty().lookup(Some("a.x.com")).is_none());
    }

    #[test]
    fn ten_thousand_rules_route_correctly() {
        let mut rules = Vec::new();
        for i in 0..5_000 {
            rules.push(rule(&format!("db{i}.example.com"), &format!("exact{i}"), 1));
            rules.push(rule(
                &format!("{{id}}.r{i}.example.com"),
                &format!("r{i}-{{id}}"),
                2,
            ));
        }
        let t = RouteTable::build(&ingress(serde_json::Value::Array(rules), None)).unwrap();
        assert_eq!(t.len(), 10_000);
        for i in (0..5_000).step_by(97) {
            assert_eq!(
                t.lookup(Some(&format!("db{i}.example.com")))
                    .unwrap()
                    .instance,
                format!("exact{i}")
            );
            assert_eq!(
                t.lookup(Some(&format!("q.r{i}.example.com")))
                    .unwrap()
                    .instance,
                format!("r{i}-q")
            );
        }
        assert!(t.lookup(Some("q.r5000.example.com")).is_none());
    }
}
