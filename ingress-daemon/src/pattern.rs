//! SNI patterns: `pg-7.example.com` (exact) or `{id}.pg.example.com` (captures).
//!
//! Design: a pattern is a list of labels, each either a literal DNS label or a `{name}` capture
//! that occupies the whole label and matches exactly one DNS label
//! (`[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?`, never a dot). No regex engine: matching is a label-wise
//! comparison, so literal text can never act as a metacharacter. Patterns are lower-cased when
//! parsed; callers lower-case the hostname (see [`lower_ascii`]). Two patterns *overlap* when
//! some hostname matches both; with whole-label captures that is decidable label by label.
//! A [`Template`] (`target.instance`, e.g. `pg-{id}`) may only use the pattern's captures.

/// Longest DNS name we accept, in bytes (RFC 1035 presentation form without the root dot).
pub const MAX_HOST_BYTES: usize = 253;

/// Most labels a hostname of [`MAX_HOST_BYTES`] can have.
pub const MAX_LABELS: usize = MAX_HOST_BYTES.div_ceil(2);

/// Why a pattern or template was refused; the text is shown to API clients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// The pattern is empty or longer than a DNS name.
    #[error("must be 1 to 253 characters")]
    Length,
    /// A hostname needs at least two labels.
    #[error("needs at least two labels")]
    TooFewLabels,
    /// An empty label (`a..b`, leading or trailing dot).
    #[error("has an empty label")]
    EmptyLabel,
    /// A literal label is not a DNS label.
    #[error("label {0:?} is not a DNS label (a-z, 0-9, inner '-', at most 63)")]
    BadLabel(String),
    /// A capture shares its label with literal text.
    #[error("capture in {0:?} must occupy a whole label")]
    PartialCapture(String),
    /// A capture name is not `[a-z][a-z0-9_]*`.
    #[error("capture name {0:?} must match [a-z][a-z0-9_]* (at most 32)")]
    BadCaptureName(String),
    /// The same capture name appears twice.
    #[error("capture {{{0}}} appears twice")]
    DuplicateCapture(String),
    /// A template uses a capture the SNI pattern does not define.
    #[error("uses {{{0}}}, which the SNI pattern does not capture")]
    UnknownCapture(String),
    /// A template has a stray brace or a character an instance name cannot hold.
    #[error("{0}")]
    BadTemplate(String),
}

/// Whether `s` is one lower-case DNS label: `[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?`.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    let ok = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    match b {
        [] => false,
        [c] => ok(c),
        [first, mid @ .., last] => {
            b.len() <= 63 && ok(first) && ok(last) && mid.iter().all(|c| ok(c) || *c == b'-')
        }
    }
}

/// Lower-cases an ASCII hostname into `buf` without allocating; `None` if it cannot be a name.
pub fn lower_ascii<'b>(host: &str, buf: &'b mut [u8; MAX_HOST_BYTES]) -> Option<&'b str> {
    let src = host.as_bytes();
    if src.is_empty() || src.len() > MAX_HOST_BYTES || !src.is_ascii() {
        return None;
    }
    let dst = buf.get_mut(..src.len())?;
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_ascii_lowercase();
    }
    std::str::from_utf8(dst).ok()
}

/// Splits a hostname into `slots` by its dots; `None` if it has more labels than slots.
pub fn split_labels<'h, 's>(host: &'h str, slots: &'s mut [&'h str]) -> Option<&'s [&'h str]> {
    let mut n = 0;
    for label in host.split('.') {
        *slots.get_mut(n)? = label;
        n += 1;
    }
    slots.get(..n)
}

fn is_capture_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some('a'..='z'))
        && s.len() <= 32
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// One label of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Label {
    /// Compared literally (both sides lower-case).
    Literal(Box<str>),
    /// Matches any single DNS label and binds it to this name.
    Capture(Box<str>),
}

/// A compiled SNI pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniPattern {
    source: Box<str>,
    labels: Box<[Label]>,
    literal_labels: usize,
}

impl SniPattern {
    /// Parses and lower-cases a pattern such as `{id}.pg.example.com`.
    pub fn parse(raw: &str) -> Result<Self, PatternError> {
        let source = raw.to_ascii_lowercase();
        if source.is_empty() || source.len() > MAX_HOST_BYTES {
            return Err(PatternError::Length);
        }
        let mut labels = Vec::new();
        for part in source.split('.') {
            if part.is_empty() {
                return Err(PatternError::EmptyLabel);
            }
            if let Some(name) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                if name.contains(['{', '}']) {
                    return Err(PatternError::PartialCapture(part.to_owned()));
                }
                if !is_capture_name(name) {
                    return Err(PatternError::BadCaptureName(name.to_owned()));
                }
                if labels
                    .iter()
                    .any(|l| matches!(l, Label::Capture(n) if &**n == name))
                {
                    return Err(PatternError::DuplicateCapture(name.to_owned()));
                }
                labels.push(Label::Capture(name.into()));
            } else if part.contains(['{', '}']) {
                return Err(PatternError::PartialCapture(part.to_owned()));
            } else if is_dns_label(part) {
                labels.push(Label::Literal(part.into()));
            } else {
                return Err(PatternError::BadLabel(part.to_owned()));
            }
        }
        if labels.len() < 2 {
            return Err(PatternError::TooFewLabels);
        }
        let literal_labels = labels
            .iter()
            .filter(|l| matches!(l, Label::Literal(_)))
            .count();
        Ok(Self {
            source: source.into(),
            labels: labels.into(),
            literal_labels,
        })
    }

    /// The lower-cased pattern text.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The labels, left to right.
    pub fn labels(&self) -> &[Label] {
        &self.labels
    }

    /// Whether the pattern has no capture (an exact hostname).
    pub fn is_exact(&self) -> bool {
        self.literal_labels == self.labels.len()
    }

    /// How many labels are literal: the specificity used to order patterns.
    pub fn literal_labels(&self) -> usize {
        self.literal_labels
    }

    /// The position of the label bound to capture `name`.
    pub fn capture_position(&self, name: &str) -> Option<usize> {
        self.labels
            .iter()
            .position(|l| matches!(l, Label::Capture(n) if &**n == name))
    }

    /// Whether the lower-cased `host` matches.
    pub fn matches(&self, host: &str) -> bool {
        let mut labels = [""; MAX_LABELS];
        split_labels(host, &mut labels).is_some_and(|l| self.matches_labels(l))
    }

    /// Whether a lower-cased hostname, already split into its labels, matches.
    ///
    /// Reads the pattern's text rather than its label list: one allocation to fetch instead of
    /// one per literal label, which is what a lookup in a large table waits for.
    pub fn matches_labels(&self, host_labels: &[&str]) -> bool {
        let mut parts = self.source.split('.');
        host_labels.iter().all(|host| match parts.next() {
            Some(part) if part.starts_with('{') => is_dns_label(host),
            Some(part) => part == *host,
            None => false,
        }) && parts.next().is_none()
    }

    /// Whether some hostname matches both patterns.
    pub fn overlaps(&self, other: &Self) -> bool {
        self.labels.len() == other.labels.len()
            && self
                .labels
                .iter()
                .zip(other.labels.iter())
                .all(|pair| match pair {
                    (Label::Literal(a), Label::Literal(b)) => a == b,
                    // Literal labels are valid DNS labels, so a capture always accepts them.
                    _ => true,
                })
    }

    /// Whether a certificate name (`host` or `*.domain`) covers every hostname this matches.
    pub fn covered_by(&self, cert_name: &str) -> bool {
        if self.is_exact() {
            return crate::certs::name_covers(cert_name, &self.source);
        }
        // Only a leftmost capture can be covered, by a wildcard for the literal rest.
        let Some(rest) = cert_name.strip_prefix("*.") else {
            return false;
        };
        match self.labels.split_first() {
            Some((Label::Capture(_), tail)) => {
                tail.iter().all(|l| matches!(l, Label::Literal(_)))
                    && self.source.split_once('.').map(|(_, r)| r) == Some(rest)
            }
            _ => false,
        }
    }
}

/// One piece of a [`Template`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(Box<str>),
    /// Index of the SNI label to copy.
    Label(usize),
}

/// A `target.instance` template such as `pg-{id}`, bound to one [`SniPattern`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: Box<str>,
    parts: Box<[Part]>,
}

impl Template {
    /// Parses and lower-cases a template; every capture must exist in `pattern`.
    pub fn parse(raw: &str, pattern: &SniPattern) -> Result<Self, PatternError> {
        let source = raw.to_ascii_lowercase();
        let mut parts = Vec::new();
        let mut rest = source.as_str();
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('{') {
                let (name, tail) = after.split_once('}').ok_or_else(|| {
                    PatternError::BadTemplate(format!("unclosed '{{' in {source:?}"))
                })?;
                let pos = pattern
                    .capture_position(name)
                    .ok_or_else(|| PatternError::UnknownCapture(name.to_owned()))?;
                parts.push(Part::Label(pos));
                rest = tail;
            } else {
                let end = rest.find('{').unwrap_or(rest.len());
                let (lit, tail) = rest.split_at(end);
                if let Some(bad) = lit
                    .chars()
                    .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
                {
                    return Err(PatternError::BadTemplate(format!(
                        "character {bad:?} cannot appear in an instance name"
                    )));
                }
                parts.push(Part::Literal(lit.into()));
                rest = tail;
            }
        }
        if parts.is_empty() {
            return Err(PatternError::BadTemplate("is empty".to_owned()));
        }
        Ok(Self {
            source: source.into(),
            parts: parts.into(),
        })
    }

    /// The lower-cased template text.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The instance name if the template has no capture.
    pub fn literal(&self) -> Option<&str> {
        match &*self.parts {
            [Part::Literal(l)] => Some(l),
            _ => None,
        }
    }

    /// Fills the captures from a hostname that matched the pattern.
    pub fn render(&self, host: &str) -> String {
        let mut labels = [""; MAX_LABELS];
        self.render_labels(split_labels(host, &mut labels).unwrap_or_default())
    }

    /// Fills the captures from the labels of a hostname that matched the pattern.
    pub fn render_labels(&self, host_labels: &[&str]) -> String {
        let label = |i: usize| host_labels.get(i).copied().unwrap_or_default();
        let len = self
            .parts
            .iter()
            .map(|part| match part {
                Part::Literal(l) => l.len(),
                Part::Label(i) => label(*i).len(),
            })
            .sum();
        let mut out = String::with_capacity(len);
        for part in &*self.parts {
            match part {
                Part::Literal(l) => out.push_str(l),
                Part::Label(i) => out.push_str(label(*i)),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng as _, SeedableRng as _};

    fn p(s: &str) -> SniPattern {
        SniPattern::parse(s).unwrap()
    }

    #[test]
    fn parse_refuses_bad_patterns_with_reasons() {
        let cases: &[(&str, PatternError)] = &[
            ("", PatternError::Length),
            ("localhost", PatternError::TooFewLabels),
            ("{id}", PatternError::TooFewLabels),
            ("a..com", PatternError::EmptyLabel),
            ("a.com.", PatternError::EmptyLabel),
            (
                "pg-{id}.x.com",
                PatternError::PartialCapture("pg-{id}".into()),
            ),
            (
                "{a}{b}.x.com",
                PatternError::PartialCapture("{a}{b}".into()),
            ),
            ("{1d}.x.com", PatternError::BadCaptureName("1d".into())),
            ("{a}.{a}.com", PatternError::DuplicateCapture("a".into())),
            ("*.x.com", PatternError::BadLabel("*".into())),
            ("a_b.x.com", PatternError::BadLabel("a_b".into())),
            ("-a.x.com", PatternError::BadLabel("-a".into())),
            ("a.(x|y).com", PatternError::BadLabel("(x|y)".into())),
        ];
        for (raw, want) in cases {
            assert_eq!(SniPattern::parse(raw).as_ref(), Err(want), "{raw}");
        }
        let long = format!("{}.com", "a".repeat(64));
        assert!(matches!(
            SniPattern::parse(&long),
            Err(PatternError::BadLabel(_))
        ));
        assert_eq!(
            SniPattern::parse(&"a.".repeat(127)).unwrap_err(),
            PatternError::Length
        );
    }

    #[test]
    fn patterns_are_lower_cased_and_literal() {
        let pat = p("{ID}.PG.Example.COM");
        assert_eq!(pat.as_str(), "{id}.pg.example.com");
        assert!(pat.matches("7.pg.example.com"));
        // A dot in a literal is a label separator, never "any character".
        assert!(!p("pg.example.com").matches("pgxexample.com"));
        assert!(!p("a-b.example.com").matches("a.b.example.com"));
    }

    #[test]
    fn captures_match_exactly_one_label() {
        let pat = p("{id}.pg.example.com");
        assert!(pat.matches("db-1.pg.example.com"));
        assert!(!pat.matches("a.b.pg.example.com"));
        assert!(!pat.matches(".pg.example.com"));
        assert!(!pat.matches("pg.example.com"));
        assert!(!pat.matches("-a.pg.example.com"));
        assert!(!pat.matches("a_b.pg.example.com"));
        assert!(!pat.matches(&format!("{}.pg.example.com", "a".repeat(64))));
        assert!(pat.matches(&format!("{}.pg.example.com", "a".repeat(63))));
    }

    #[test]
    fn property_captures_never_span_labels() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let alphabet = b"ab0-.";
        let pat = p("{x}.y.z");
        for _ in 0..20_000 {
            let len = rng.random_range(1..12);
            let head: String = (0..len)
                .map(|_| char::from(alphabet[rng.random_range(0..alphabet.len())]))
                .collect();
            let host = format!("{head}.y.z");
            assert_eq!(pat.matches(&host), is_dns_label(&head), "{host}");
            if pat.matches(&host) {
                assert!(!head.contains('.'));
                let t = Template::parse("i-{x}", &pat).unwrap();
                assert_eq!(t.render(&host), format!("i-{head}"));
            }
        }
    }

    #[test]
    fn lower_ascii_is_case_insensitive_and_bounded() {
        let mut buf = [0u8; MAX_HOST_BYTES];
        assert_eq!(
            lower_ascii("PG-7.Example.COM", &mut buf),
            Some("pg-7.example.com")
        );
        assert_eq!(lower_ascii("", &mut buf), None);
        assert_eq!(lower_ascii("é.com", &mut buf), None);
        assert_eq!(lower_ascii(&"a".repeat(254), &mut buf), None);
    }

    #[test]
    fn overlap_is_decided_label_by_label() {
        let cases = [
            ("{a}.x.com", "{b}.x.com", true),
            ("{a}.x.com", "{a}.y.com", false),
            ("{a}.x.com", "db.{b}.com", true),
            ("{a}.x.com", "{a}.{b}.x.com", false),
            ("a.x.com", "a.x.com", true),
            ("a.x.com", "{a}.x.com", true),
            ("{a}.{b}.com", "{c}.{d}.org", false),
        ];
        for (a, b, want) in cases {
            assert_eq!(p(a).overlaps(&p(b)), want, "{a} vs {b}");
            assert_eq!(p(b).overlaps(&p(a)), want, "{b} vs {a}");
        }
    }

    #[test]
    fn property_overlap_agrees_with_a_witness_search() {
        // Every overlap claim is checked against hostnames built from the labels involved.
        let pats = [
            "{a}.x.com",
            "x.{a}.com",
            "{a}.{b}.com",
            "x.x.com",
            "y.x.com",
            "{a}.y.org",
            "{a}.{b}.{c}",
            "x.x.x",
        ];
        let words = ["x", "y", "com", "org", "q"];
        for a in pats {
            for b in pats {
                let (pa, pb) = (p(a), p(b));
                let n = pa.labels().len();
                let mut witness = false;
                let mut idx = vec![0usize; n];
                'outer: loop {
                    let host = idx.iter().map(|i| words[*i]).collect::<Vec<_>>().join(".");
                    if pa.matches(&host) && pb.matches(&host) {
                        witness = true;
                        break;
                    }
                    for d in idx.iter_mut() {
                        *d += 1;
                        if *d < words.len() {
                            continue 'outer;
                        }
                        *d = 0;
                    }
                    break;
                }
                assert_eq!(pa.overlaps(&pb), witness, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn templates_use_only_sni_captures() {
        let pat = p("{id}.{region}.db.example.com");
        let t = Template::parse("PG-{id}-{region}", &pat).unwrap();
        assert_eq!(t.as_str(), "pg-{id}-{region}");
        assert_eq!(t.render("7.eu.db.example.com"), "pg-7-eu");
        assert_eq!(
            Template::parse("pg-{nope}", &pat),
            Err(PatternError::UnknownCapture("nope".into()))
        );
        assert!(matches!(
            Template::parse("pg-{id", &pat),
            Err(PatternError::BadTemplate(_))
        ));
        assert!(matches!(
            Template::parse("pg.{id}", &pat),
            Err(PatternError::BadTemplate(_))
        ));
        assert!(matches!(
            Template::parse("", &pat),
            Err(PatternError::BadTemplate(_))
        ));
        assert_eq!(Template::parse("db", &pat).unwrap().literal(), Some("db"));
        assert_eq!(t.literal(), None);
    }

    #[test]
    fn wildcard_certificates_cover_leftmost_captures_only() {
        assert!(p("{id}.pg.example.com").covered_by("*.pg.example.com"));
        assert!(!p("{id}.pg.example.com").covered_by("*.example.com"));
        assert!(!p("db.{id}.example.com").covered_by("*.example.com"));
        assert!(!p("{a}.{b}.example.com").covered_by("*.example.com"));
        assert!(p("a.example.com").covered_by("*.example.com"));
        assert!(p("a.example.com").covered_by("a.example.com"));
        assert!(!p("a.b.example.com").covered_by("*.example.com"));
    }
}
