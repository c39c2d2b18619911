//! The API's resource types and their structural validation.
//!
//! Design: request bodies deserialise with `deny_unknown_fields` into `*Spec` types; responses
//! are the spec plus server-assigned fields. [`IngressSpec::validate`] checks everything that
//! needs no outside state (names, ports, SNI patterns, templates, overlapping SNI) and
//! normalises (lower-cases) the spec; checks against instances, certificates and the backend
//! policy live in [`crate::control`]. Every error message starts with the field path.
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorCode};
use crate::pattern::{SniPattern, Template};

/// What the ingress does with the TLS session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The daemon terminates TLS with a stored certificate and sends plaintext to the backend.
    #[default]
    Terminate,
    /// The TLS session runs end to end between client and backend.
    Passthrough,
}

/// The application protocol in front of TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Plain TLS: the ClientHello comes first.
    #[default]
    Tls,
    /// PostgreSQL: an optional SSLRequest precedes the ClientHello.
    Postgres,
}

/// PROXY protocol header sent to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    /// Text header.
    V1,
    /// Binary header.
    V2,
}

/// The SNI a rule matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SniMatch {
    /// Exact hostname or pattern with whole-label `{captures}`, e.g. `{id}.pg.example.com`.
    #[schema(example = "{id}.pg.example.com")]
    pub sni: String,
}

/// Where matching connections go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// Instance name, or a template using the SNI's captures (`pg-{id}`).
    #[schema(example = "pg-{id}")]
    pub instance: String,
    /// Backend TCP port.
    #[schema(minimum = 1, maximum = 65535)]
    pub port: u16,
}

/// One routing rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// The SNI to match.
    #[serde(rename = "match")]
    pub match_: SniMatch,
    /// The backend.
    pub target: Target,
    /// TLS handling (default `terminate`).
    #[serde(default)]
    pub mode: Mode,
    /// Protocol in front of TLS (default `tls`).
    #[serde(default)]
    pub protocol: Protocol,
    /// PROXY protocol header to the backend, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocol>,
    /// ALPN protocol names the daemon offers when it terminates TLS, in server preference order
    /// (terminate mode only). Absent: none for `tls`, `["postgresql"]` for `postgres`, which a
    /// configured list must contain. A client that offers ALPN and none of these names fails
    /// the handshake (`no_application_protocol`); a client that offers none is served without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = alpn_schema)]
    pub alpn: Option<Vec<String>>,
}

/// The schema of [`Rule::alpn`]: 1–8 names, each 1–255 bytes of printable ASCII.
fn alpn_schema() -> utoipa::openapi::Array {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
    let name = ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(255))
        .pattern(Some("^[\\x20-\\x7e]+$"));
    ArrayBuilder::new()
        .items(name)
        .min_items(Some(1))
        .max_items(Some(MAX_ALPN_NAMES))
        .unique_items(true)
        .description(Some(
            "ALPN protocol names offered when the daemon terminates TLS, in server preference \
             order (terminate mode only). Absent: none for `tls`, `[\"postgresql\"]` for \
             `postgres`, which a configured list must contain.",
        ))
        .examples([serde_json::json!(["h2", "http/1.1"])])
        .build()
}

/// Most ALPN names a rule may offer.
pub const MAX_ALPN_NAMES: usize = 8;

/// The ALPN name a Postgres rule offers by default and must offer when it lists its own.
pub const POSTGRES_ALPN: &str = "postgresql";

impl Rule {
    /// The ALPN names offered when this rule terminates TLS, in preference order.
    pub fn effective_alpn(&self) -> Vec<Vec<u8>> {
        match (&self.alpn, self.protocol) {
            (Some(names), _) => names.iter().map(|n| n.as_bytes().to_vec()).collect(),
            (None, Protocol::Postgres) => vec![POSTGRES_ALPN.as_bytes().to_vec()],
            (None, Protocol::Tls) => Vec::new(),
        }
    }

    fn validate_alpn(&self, i: usize) -> Result<(), ApiError> {
        let Some(names) = &self.alpn else {
            return Ok(());
        };
        let field = format!("rules[{i}].alpn");
        let refuse = |m: String| Err(ApiError::bad_request(format!("{field}{m}")));
        if self.mode == Mode::Passthrough {
            return refuse(
                ": only a terminate rule negotiates ALPN; remove it from a passthrough rule".into(),
            );
        }
        if names.is_empty() || names.len() > MAX_ALPN_NAMES {
            return refuse(format!(": must list 1-{MAX_ALPN_NAMES} protocol names"));
        }
        for (j, name) in names.iter().enumerate() {
            if name.is_empty()
                || name.len() > 255
                || !name.bytes().all(|b| (0x20..=0x7e).contains(&b))
            {
                return refuse(format!("[{j}]: must be 1-255 bytes of printable ASCII"));
            }
            if names.get(..j).is_some_and(|seen| seen.contains(name)) {
                return refuse(format!("[{j}]: {name:?} is listed twice"));
            }
        }
        if self.protocol == Protocol::Postgres && !names.iter().any(|n| n == POSTGRES_ALPN) {
            return refuse(format!(": a postgres rule must offer {POSTGRES_ALPN:?}"));
        }
        Ok(())
    }
}

/// Where connections without SNI or with an unmatched SNI go; always passthrough.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DefaultTarget {
    /// Instance name (no captures: there is no SNI to take them from).
    #[schema(
        pattern = "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$",
        min_length = 1,
        max_length = 63
    )]
    pub instance: String,
    /// Backend TCP port.
    #[schema(minimum = 1, maximum = 65535)]
    pub port: u16,
    /// Protocol in front of TLS (default `tls`).
    #[serde(default)]
    pub protocol: Protocol,
    /// PROXY protocol header to the backend, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocol>,
}

/// The body of `POST /tcp-ingresses` and `PUT /tcp-ingresses/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IngressSpec {
    /// Unique name, `^[a-z0-9]([a-z0-9-]*[a-z0-9])?$`, 1–63 characters.
    #[schema(
        pattern = "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$",
        min_length = 1,
        max_length = 63,
        example = "postgres"
    )]
    pub name: String,
    /// Port the listener binds.
    #[schema(minimum = 1, maximum = 65535)]
    pub listen_port: u16,
    /// Routing rules.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Target for connections no rule matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_target: Option<DefaultTarget>,
    /// Seconds a flow may move no byte in either direction before both sides are closed
    /// (1 to 604800); absent: no idle timeout (spliced flows rely on TCP keepalive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 604800)]
    pub idle_timeout_secs: Option<u32>,
}

/// A stored TCP ingress as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TcpIngress {
    /// Server-assigned ID (lower-case hex).
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Port the listener binds.
    pub listen_port: u16,
    /// Routing rules.
    pub rules: Vec<Rule>,
    /// Target for connections no rule matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_target: Option<DefaultTarget>,
    /// Seconds a flow may stay idle before it is closed; absent: no idle timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_secs: Option<u32>,
    /// Creation time, RFC 3339.
    #[schema(format = DateTime)]
    pub created_at: String,
}

impl TcpIngress {
    /// The ingress's spec (everything but the server-assigned fields).
    pub fn spec(&self) -> IngressSpec {
        IngressSpec {
            name: self.name.clone(),
            listen_port: self.listen_port,
            rules: self.rules.clone(),
            default_target: self.default_target.clone(),
            idle_timeout_secs: self.idle_timeout_secs,
        }
    }
}

/// The body of `PUT /instances/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    /// The instance's IP address.
    #[schema(value_type = String, example = "127.0.0.2")]
    pub address: std::net::IpAddr,
}

/// A static instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    /// Instance name.
    pub name: String,
    /// The instance's IP address.
    #[schema(value_type = String)]
    pub address: std::net::IpAddr,
}

/// The body of `PUT /port-claims/{port}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortClaimSpec {
    /// Who owns the port (a name, e.g. `http-ingress`).
    #[schema(
        pattern = "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$",
        min_length = 1,
        max_length = 63
    )]
    pub owner: String,
}

/// A port held by an external owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortClaim {
    /// The port.
    pub port: u16,
    /// Who owns it.
    pub owner: String,
}

/// What kind of owner holds a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PortOwnerKind {
    /// A TCP ingress listens there.
    TcpIngress,
    /// An external claim.
    Claim,
    /// Reserved by configuration (or the API's own port).
    Reserved,
}

/// One row of `GET /ports`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PortEntry {
    /// The port.
    pub port: u16,
    /// Owner kind.
    pub kind: PortOwnerKind,
    /// Ingress name, claim owner, or `reserved` / `api`.
    pub owner: String,
    /// The ingress ID when `kind` is `tcp_ingress`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_id: Option<String>,
    /// Whether the ingress's listener is bound (ingresses only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound: Option<bool>,
}

/// The body of `POST /certificates`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CertificateSpec {
    /// Unique name.
    #[schema(
        pattern = "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$",
        min_length = 1,
        max_length = 63
    )]
    pub name: String,
    /// PEM certificate chain, end-entity first.
    pub cert_pem: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1); never returned.
    pub key_pem: String,
}

/// A stored certificate as the API shows it (never the key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    /// Unique name.
    pub name: String,
    /// DNS subject alternative names of the end-entity certificate.
    pub sans: Vec<String>,
    /// Start of validity, RFC 3339.
    #[schema(format = DateTime)]
    pub not_before: String,
    /// End of validity, RFC 3339.
    #[schema(format = DateTime)]
    pub not_after: String,
    /// Number of certificates in the chain.
    pub chain_len: usize,
    /// Upload time, RFC 3339.
    #[schema(format = DateTime)]
    pub created_at: String,
}

/// Checks a resource name: `^[a-z0-9]([a-z0-9-]*[a-z0-9])?$`, 1–63 characters.
pub fn validate_name(field: &str, name: &str) -> Result<(), ApiError> {
    if crate::pattern::is_dns_label(name) {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::InvalidName,
            format!(
                "{field}: {name:?} must match ^[a-z0-9]([a-z0-9-]*[a-z0-9])?$ (1-63 characters)"
            ),
        ))
    }
}

fn validate_port(field: &str, port: u16) -> Result<(), ApiError> {
    if port == 0 {
        Err(ApiError::bad_request(format!("{field}: must be 1-65535")))
    } else {
        Ok(())
    }
}

/// The longest idle timeout an ingress may set (a week).
pub const MAX_IDLE_TIMEOUT_SECS: u32 = 604_800;

/// A rule after structural validation: pattern and template compiled.
#[derive(Debug, Clone)]
pub struct CheckedRule {
    /// The compiled SNI pattern.
    pub pattern: SniPattern,
    /// The compiled instance template.
    pub template: Template,
}

impl IngressSpec {
    /// Lower-cases the spec and checks it on its own; returns the compiled rules in order.
    pub fn validate(&mut self) -> Result<Vec<CheckedRule>, ApiError> {
        validate_name("name", &self.name)?;
        validate_port("listen_port", self.listen_port)?;
        if self.rules.is_empty() && self.default_target.is_none() {
            return Err(ApiError::bad_request(
                "rules: at least one rule or a default_target is required",
            ));
        }
        let invalid = |field: String, e: crate::pattern::PatternError| {
            ApiError::new(ErrorCode::InvalidPattern, format!("{field}: {e}"))
        };
        let mut checked: Vec<CheckedRule> = Vec::with_capacity(self.rules.len());
        for (i, rule) in self.rules.iter_mut().enumerate() {
            let pattern = SniPattern::parse(&rule.match_.sni)
                .map_err(|e| invalid(format!("rules[{i}].match.sni"), e))?;
            let template = Template::parse(&rule.target.instance, &pattern)
                .map_err(|e| invalid(format!("rules[{i}].target.instance"), e))?;
            if let Some(name) = template.literal() {
                validate_name(&format!("rules[{i}].target.instance"), name)?;
            }
            validate_port(&format!("rules[{i}].target.port"), rule.target.port)?;
            rule.validate_alpn(i)?;
            if let Some((j, other)) = checked.iter().enumerate().find(|(_, c)| {
                c.pattern.is_exact() == pattern.is_exact() && c.pattern.overlaps(&pattern)
            }) {
                return Err(ApiError::new(
                    ErrorCode::SniConflict,
                    format!(
                        "rules[{i}].match.sni: {:?} can match the same hostname as rules[{j}] ({:?})",
                        pattern.as_str(),
                        other.pattern.as_str()
                    ),
                ));
            }
            rule.match_.sni = pattern.as_str().to_owned();
            rule.target.instance = template.as_str().to_owned();
            checked.push(CheckedRule { pattern, template });
        }
        if let Some(def) = &mut self.default_target {
            def.instance = def.instance.to_ascii_lowercase();
            validate_name("default_target.instance", &def.instance)?;
            validate_port("default_target.port", def.port)?;
        }
        if let Some(secs) = self.idle_timeout_secs
            && !(1..=MAX_IDLE_TIMEOUT_SECS).contains(&secs)
        {
            return Err(ApiError::bad_request(format!(
                "idle_timeout_secs: must be 1-{MAX_IDLE_TIMEOUT_SECS}"
            )));
        }
        Ok(checked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Result<IngressSpec, serde_json::Error> {
        serde_json::from_value(json)
    }

    fn rule(sni: &str, instance: &str) -> serde_json::Value {
        serde_json::json!({"match": {"sni": sni}, "target": {"instance": instance, "port": 5432}})
    }

    fn check(rules: Vec<serde_json::Value>) -> Result<IngressSpec, ApiError> {
        let mut s =
            spec(serde_json::json!({"name": "pg", "listen_port": 5432, "rules": rules})).unwrap();
        s.validate().map(|_| s)
    }

    #[test]
    fn defaults_fill_mode_and_protocol() {
        let s = check(vec![rule("Db.Example.com", "DB")]).unwrap();
        assert_eq!(s.rules[0].mode, Mode::Terminate);
        assert_eq!(s.rules[0].protocol, Protocol::Tls);
        assert_eq!(s.rules[0].match_.sni, "db.example.com");
        assert_eq!(s.rules[0].target.instance, "db");
    }

    #[test]
    fn idle_timeout_is_bounded() {
        let with = |secs: serde_json::Value| {
            let mut s = spec(serde_json::json!({
                "name": "pg", "listen_port": 5432, "rules": [rule("a.b", "c")],
                "idle_timeout_secs": secs,
            }))
            .unwrap();
            s.validate().map(|_| s.idle_timeout_secs)
        };
        assert_eq!(with(1.into()).ok(), Some(Some(1)));
        assert_eq!(with(604_800.into()).ok(), Some(Some(604_800)));
        for bad in [0, 604_801] {
            let e = with(bad.into()).unwrap_err();
            assert!(e.message.starts_with("idle_timeout_secs:"), "{}", e.message);
        }
        assert!(
            spec(serde_json::json!({"name": "a", "listen_port": 1, "idle_timeout_secs": -1}))
                .is_err()
        );
        let none = check(vec![rule("a.b", "c")]).unwrap();
        assert_eq!(none.idle_timeout_secs, None);
    }

    #[test]
    fn unknown_fields_and_bad_enums_are_refused() {
        assert!(spec(serde_json::json!({"name": "a", "listen_port": 1, "x": 1})).is_err());
        let mut r = rule("a.b", "c");
        r["mode"] = "tunnel".into();
        assert!(spec(serde_json::json!({"name": "a", "listen_port": 1, "rules": [r]})).is_err());
        assert!(spec(serde_json::json!({"name": "a", "listen_port": 70000})).is_err());
    }

    #[test]
    fn validation_table() {
        let cases: Vec<(Vec<serde_json::Value>, ErrorCode, &str)> = vec![
            (
                vec![rule("pg-{id}.x.com", "a")],
                ErrorCode::InvalidPattern,
                "rules[0].match.sni: capture in \"pg-{id}\" must occupy a whole label",
            ),
            (
                vec![rule("{id}.x.com", "pg-{other}")],
                ErrorCode::InvalidPattern,
                "rules[0].target.instance: uses {other}, which the SNI pattern does not capture",
            ),
            (
                vec![rule("a.x.com", "Bad_Name")],
                ErrorCode::InvalidPattern,
                "rules[0].target.instance: character '_' cannot appear in an instance name",
            ),
            (
                vec![rule("{a}.x.com", "i-{a}"), rule("{b}.x.com", "j-{b}")],
                ErrorCode::SniConflict,
                "rules[1].match.sni: \"{b}.x.com\" can match the same hostname as rules[0] (\"{a}.x.com\")",
            ),
            (
                vec![rule("a.x.com", "i"), rule("A.X.com", "j")],
                ErrorCode::SniConflict,
                "rules[1].match.sni: \"a.x.com\" can match the same hostname as rules[0] (\"a.x.com\")",
            ),
            (
                vec![],
                ErrorCode::BadRequest,
                "rules: at least one rule or a default_target is required",
            ),
        ];
        for (rules, code, message) in cases {
            let err = check(rules).unwrap_err();
            assert_eq!((err.code, err.message.as_str()), (code, message));
        }
        // An exact hostname may sit beside a pattern that also matches it: exact wins.
        check(vec![rule("a.x.com", "i"), rule("{b}.x.com", "j-{b}")]).unwrap();
    }

    #[test]
    fn alpn_defaults_by_protocol_and_is_checked() {
        let with = |mode: &str, protocol: &str, alpn: serde_json::Value| {
            let mut r = rule("a.b", "c");
            r["mode"] = mode.into();
            r["protocol"] = protocol.into();
            if !alpn.is_null() {
                r["alpn"] = alpn;
            }
            check(vec![r])
        };
        let ok =
            |mode, protocol, alpn| with(mode, protocol, alpn).unwrap().rules[0].effective_alpn();
        let names = |n: &[&str]| n.iter().map(|s| s.as_bytes().to_vec()).collect::<Vec<_>>();
        assert_eq!(ok("terminate", "tls", serde_json::Value::Null), names(&[]));
        assert_eq!(
            ok("terminate", "postgres", serde_json::Value::Null),
            names(&["postgresql"])
        );
        assert_eq!(
            ok("terminate", "tls", serde_json::json!(["h2", "http/1.1"])),
            names(&["h2", "http/1.1"])
        );
        assert_eq!(
            ok(
                "terminate",
                "postgres",
                serde_json::json!(["x", "postgresql"])
            ),
            names(&["x", "postgresql"])
        );
        assert_eq!(
            ok("passthrough", "tls", serde_json::Value::Null),
            names(&[])
        );
        let eight: Vec<String> = (0..8).map(|i| format!("p{i}")).collect();
        ok("terminate", "tls", serde_json::json!(eight));
        ok(
            "terminate",
            "tls",
            serde_json::json!(["x".repeat(255), " ~"]),
        );
        let cases = [
            (
                "passthrough",
                "tls",
                serde_json::json!(["h2"]),
                "rules[0].alpn: only a terminate rule negotiates ALPN; remove it from a passthrough rule",
            ),
            (
                "terminate",
                "tls",
                serde_json::json!([]),
                "rules[0].alpn: must list 1-8 protocol names",
            ),
            (
                "terminate",
                "tls",
                serde_json::json!(["1", "2", "3", "4", "5", "6", "7", "8", "9"]),
                "rules[0].alpn: must list 1-8 protocol names",
            ),
            (
                "terminate",
                "tls",
                serde_json::json!([""]),
                "rules[0].alpn[0]: must be 1-255 bytes of printable ASCII",
            ),
            (
                "terminate",
                "tls",
                serde_json::json!(["h2", "x".repeat(256)]),
                "rules[0].alpn[1]: must be 1-255 bytes of printable ASCII",
            ),
            (
                "terminate",
                "tls",
                serde_json::json!(["a\tb"]),
                "rules[0].alpn[0]: must be 1-255 bytes of printable ASCII",
            ),
            (
                "terminate",
                "tls",
                serde_json::json!(["h2", "h2"]),
                "rules[0].alpn[1]: \"h2\" is listed twice",
            ),
            (
                "terminate",
                "postgres",
                serde_json::json!(["h2"]),
                "rules[0].alpn: a postgres rule must offer \"postgresql\"",
            ),
        ];
        for (mode, protocol, alpn, message) in cases {
            let err = with(mode, protocol, alpn).unwrap_err();
            assert_eq!(
                (err.code, err.message.as_str()),
                (ErrorCode::BadRequest, message)
            );
        }
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", "-a", "a-", "A", "a_b", &"a".repeat(64)] {
            let mut s = spec(
                serde_json::json!({"name": bad, "listen_port": 1, "rules": [rule("a.b", "c")]}),
            )
            .unwrap();
            assert_eq!(
                s.validate().unwrap_err().code,
                ErrorCode::InvalidName,
                "{bad}"
            );
        }
        let mut s =
            spec(serde_json::json!({"name": "a", "listen_port": 0, "rules": [rule("a.b", "c")]}))
                .unwrap();
        assert_eq!(
            s.validate().unwrap_err(),
            ApiError::bad_request("listen_port: must be 1-65535")
        );
    }
}
