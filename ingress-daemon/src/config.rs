//! Daemon configuration: one [`Config`], layered TOML file < environment < command line.
//!
//! Design: every layer is turned into one `toml::Table` keyed by the stable setting names
//! (`data_dir`, `api_listen`, …), later layers overwriting earlier ones, and the merged table is
//! deserialised once into [`Config`] (`deny_unknown_fields`, defaults for everything). Environment
//! variables are `INGRESSD_<KEY>` (upper-case) except `RESERVED_PORTS`; each key has a declared
//! [`Kind`] so `INGRESSD_API_TOKEN=1234` stays a string. [`Config::validate`] runs before anything
//! binds; any [`ConfigError`] makes the binary exit 64 with its one-line message.
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

/// The exit code for a bad configuration (`EX_USAGE`).
pub const EXIT_CONFIG: i32 = 64;

/// A configuration that cannot be used; the message is one line naming the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The named configuration file could not be read.
    #[error("config file {path}: {source}")]
    ReadFile {
        /// The file named by `INGRESSD_CONFIG` or `--config`.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML.
    #[error("config file {path}: {message}")]
    ParseFile {
        /// The file named by `INGRESSD_CONFIG` or `--config`.
        path: PathBuf,
        /// The parser's one-line message.
        message: String,
    },
    /// A setting from the environment or the command line has the wrong shape.
    #[error("{source_name}: {message}")]
    BadValue {
        /// Environment variable or flag name.
        source_name: String,
        /// What was wrong.
        message: String,
    },
    /// A setting is invalid on its own or in combination.
    #[error("{key}: {message}")]
    Invalid {
        /// Setting name.
        key: &'static str,
        /// What was wrong.
        message: String,
    },
}

/// Whether passthrough flows are spliced in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Offload {
    /// Use the eBPF splice when it loads, else the userspace relay.
    #[default]
    Auto,
    /// Never load eBPF; always relay in userspace.
    Off,
    /// Refuse to start if eBPF cannot be loaded.
    Required,
}

/// Which path carries a passthrough flow that spent its first phase's byte budget before the
/// phase's time was up, in reads of 2 KiB or more on average (a bulk transfer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BulkFlows {
    /// The kernel path, like every other flow.
    #[default]
    Kernel,
    /// The userspace relay. Where the kernel's per-socket send work competes with clients
    /// and backends for few cores, it moves bulk data several times faster for about the
    /// same CPU per byte; interactive flows keep the kernel path and its latency.
    Userspace,
}

/// Where per-connection access log lines go.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AccessLog {
    /// Standard error, one JSON line per record beside the daemon's own log lines.
    #[default]
    Stderr,
    /// No access log.
    Off,
    /// Appended to this file.
    File(PathBuf),
}

impl<'de> Deserialize<'de> for AccessLog {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.as_str() {
            "stderr" => Self::Stderr,
            "off" => Self::Off,
            "" => return Err(serde::de::Error::custom("empty access_log")),
            _ => Self::File(PathBuf::from(s)),
        })
    }
}

/// An IP network in CIDR notation (`10.0.0.0/8`, `fd00::/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The network address (host bits cleared).
    pub addr: IpAddr,
    /// The prefix length.
    pub prefix_len: u8,
}

impl Cidr {
    /// Whether `ip` lies in this network (IPv4-mapped IPv6 addresses are compared as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical_ip(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Maps IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) to IPv4.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

impl FromStr for Cidr {
    type Err = String;
    /// Parses `addr/len`, or a bare address as a single-host network. An IPv4-mapped IPv6
    /// network (`::ffff:10.0.0.0/104`) is stored as IPv4 (`10.0.0.0/8`).
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bad_len = || format!("{s:?} has a bad prefix length");
        let prefix_len = match len {
            // Digits only: `u8::from_str` would also take `+8`.
            Some(l) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(bad_len)?,
            Some(_) => return Err(bad_len()),
            None => max,
        };
        let (addr, prefix_len) = match addr {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => (
                    IpAddr::V4(v4),
                    prefix_len.checked_sub(96).ok_or_else(|| {
                        format!("{s:?} is shorter than the IPv4-mapped range (/96)")
                    })?,
                ),
                None => (addr, prefix_len),
            },
            IpAddr::V4(_) => (addr, prefix_len),
        };
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(prefix_len))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(prefix_len))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        Ok(Self { addr, prefix_len })
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// The API bearer token; its `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct ApiToken(String);

impl From<&str> for ApiToken {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

impl ApiToken {
    /// The token text (for clients that must send it).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The token's bytes, for a constant-time comparison.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(<redacted>)")
    }
}

/// Every daemon setting; file keys, environment names and flags mirror these field names.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Directory holding the record files (`INGRESSD_DATA_DIR`).
    pub data_dir: PathBuf,
    /// Address the REST API listens on (`INGRESSD_API_LISTEN`).
    pub api_listen: SocketAddr,
    /// Bearer token required by the API (`INGRESSD_API_TOKEN`).
    pub api_token: Option<ApiToken>,
    /// File holding the bearer token, mode 0600 (`INGRESSD_API_TOKEN_FILE`).
    pub api_token_file: Option<PathBuf>,
    /// Ports no ingress or claim may take (`RESERVED_PORTS`); the API's own port is added.
    pub reserved_ports: Vec<u16>,
    /// Kernel splice mode (`INGRESSD_OFFLOAD`).
    pub offload: Offload,
    /// Address ingress listeners bind (`INGRESSD_LISTEN_ADDR`); `::` is dual-stack.
    pub listen_addr: IpAddr,
    /// Time allowed for a client to send its whole ClientHello.
    pub handshake_timeout_ms: u64,
    /// Largest ClientHello accepted, in bytes.
    pub max_hello_bytes: usize,
    /// Concurrent handshakes (connections not yet routed).
    pub max_handshakes: usize,
    /// Concurrent established flows (each holds two file descriptors).
    pub max_flows: usize,
    /// Time allowed to connect to a backend.
    pub connect_timeout_ms: u64,
    /// In-flight bytes per flow direction above which the kernel path holds the sender's
    /// receive window closed (the bytes stay on the kernel path).
    pub soft_water_bytes: u64,
    /// In-flight bytes per flow direction above which the kernel path passes bytes to the
    /// daemon's bounded relay (the hard bound).
    pub high_water_bytes: u64,
    /// In-flight bytes per flow direction below which a paused flow resumes.
    pub low_water_bytes: u64,
    /// A passthrough flow is relayed in userspace until this many bytes have passed (both
    /// ways together) or `relay_first_ms` has elapsed, then handed to the kernel path; 0
    /// hands it over at once.
    pub relay_first_bytes: u64,
    /// The time limit of that first phase; 0 hands a flow to the kernel path at once.
    pub relay_first_ms: u64,
    /// The path of a flow that passed `relay_first_bytes` within `relay_first_ms` in large
    /// reads (a bulk transfer).
    pub bulk_flows: BulkFlows,
    /// Networks backends may be in; link-local is refused whatever this says.
    pub backend_allow: Vec<Cidr>,
    /// DNS server used to resolve instances not in the static registry.
    pub dns_server: Option<SocketAddr>,
    /// Suffix appended to an instance name for DNS resolution (`{instance}.<suffix>`).
    pub dns_suffix: Option<String>,
    /// Time one DNS lookup of an instance may take.
    pub resolve_timeout_ms: u64,
    /// Time a DNS answer that an instance does not exist is remembered.
    pub dns_negative_ttl_ms: u64,
    /// Access log destination: `stderr`, `off` or a file path.
    pub access_log: AccessLog,
    /// Largest API request body, in bytes.
    pub api_max_body_bytes: usize,
    /// After handing over to a new daemon, how long terminated flows (which stay with this
    /// daemon) may run on before it exits.
    pub takeover_drain_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            api_listen: SocketAddr::from(([127, 0, 0, 1], 9180)),
            api_token: None,
            api_token_file: None,
            reserved_ports: vec![2019, 2222],
            offload: Offload::Auto,
            listen_addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            handshake_timeout_ms: 5_000,
            max_hello_bytes: 32 * 1024,
            max_handshakes: 1_024,
            max_flows: 9_000,
            connect_timeout_ms: 3_000,
            soft_water_bytes: 16 << 20,
            high_water_bytes: 48 << 20,
            low_water_bytes: 4 << 20,
            relay_first_bytes: 64 << 10,
            relay_first_ms: 50,
            bulk_flows: BulkFlows::Kernel,
            backend_allow: default_backend_allow(),
            dns_server: None,
            dns_suffix: None,
            resolve_timeout_ms: 2_000,
            dns_negative_ttl_ms: 5_000,
            access_log: AccessLog::Stderr,
            api_max_body_bytes: 1 << 20,
            takeover_drain_ms: 300_000,
        }
    }
}

fn default_backend_allow() -> Vec<Cidr> {
    [
        "127.0.0.0/8",
        "::1/128",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "fc00::/7",
    ]
    .iter()
    .filter_map(|s| s.parse().ok())
    .collect()
}

/// How a raw string from the environment or a flag becomes a TOML value.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Str,
    Int,
    List,
    IntList,
}

/// Every setting key and how to read it from a string; order matches [`Config`].
const KEYS: &[(&str, Kind)] = &[
    ("data_dir", Kind::Str),
    ("api_listen", Kind::Str),
    ("api_token", Kind::Str),
    ("api_token_file", Kind::Str),
    ("reserved_ports", Kind::IntList),
    ("offload", Kind::Str),
    ("listen_addr", Kind::Str),
    ("handshake_timeout_ms", Kind::Int),
    ("max_hello_bytes", Kind::Int),
    ("max_handshakes", Kind::Int),
    ("max_flows", Kind::Int),
    ("connect_timeout_ms", Kind::Int),
    ("soft_water_bytes", Kind::Int),
    ("high_water_bytes", Kind::Int),
    ("low_water_bytes", Kind::Int),
    ("relay_first_bytes", Kind::Int),
    ("relay_first_ms", Kind::Int),
    ("bulk_flows", Kind::Str),
    ("backend_allow", Kind::List),
    ("dns_server", Kind::Str),
    ("dns_suffix", Kind::Str),
    ("resolve_timeout_ms", Kind::Int),
    ("dns_negative_ttl_ms", Kind::Int),
    ("access_log", Kind::Str),
    ("api_max_body_bytes", Kind::Int),
    ("takeover_drain_ms", Kind::Int),
];

/// The environment variable for a key: `RESERVED_PORTS` keeps its historical bare name.
pub fn env_name(key: &str) -> String {
    if key == "reserved_ports" {
        "RESERVED_PORTS".to_owned()
    } else {
        format!("INGRESSD_{}", key.to_ascii_uppercase())
    }
}

fn to_value(source_name: &str, kind: Kind, raw: &str) -> Result<toml::Value, ConfigError> {
    let bad = |message: String| ConfigError::BadValue {
        source_name: source_name.to_owned(),
        message,
    };
    let int = |s: &str| {
        s.trim()
            .parse::<i64>()
            .map_err(|_| bad(format!("{s:?} is not an integer")))
    };
    let items = || raw.split(',').map(str::trim).filter(|s| !s.is_empty());
    Ok(match kind {
        Kind::Str => toml::Value::String(raw.to_owned()),
        Kind::Int => toml::Value::Integer(int(raw)?),
        Kind::List => toml::Value::Array(items().map(|s| toml::Value::String(s.into())).collect()),
        Kind::IntList => toml::Value::Array(
            items()
                .map(|s| int(s).map(toml::Value::Integer))
                .collect::<Result<_, _>>()?,
        ),
    })
}

/// The command-line and environment inputs to [`Config::load`].
#[derive(Debug, Default, Clone)]
pub struct Sources {
    /// The config file path from `--config` (wins over `INGRESSD_CONFIG`).
    pub config_file: Option<PathBuf>,
    /// Environment variables (usually `std::env::vars()`).
    pub env: BTreeMap<String, String>,
    /// Overrides from command-line flags, by setting key, as raw strings.
    pub flags: Vec<(&'static str, String)>,
}

impl Config {
    /// Builds the configuration from file < environment < flags; does not validate.
    pub fn load(sources: &Sources) -> Result<Self, ConfigError> {
        let mut table = toml::Table::new();
        let file = sources
            .config_file
            .clone()
            .or_else(|| sources.env.get("INGRESSD_CONFIG").map(PathBuf::from));
        if let Some(path) = file {
            let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::ReadFile {
                path: path.clone(),
                source,
            })?;
            table = text
                .parse::<toml::Table>()
                .map_err(|e| ConfigError::ParseFile {
                    path: path.clone(),
                    message: one_line(&e.to_string()),
                })?;
            // Catch unknown keys and wrong types with the file's name before merging.
            Self::deserialize(table.clone()).map_err(|e| ConfigError::ParseFile {
                path,
                message: one_line(&e.to_string()),
            })?;
        }
        for (key, kind) in KEYS {
            let name = env_name(key);
            if let Some(raw) = sources.env.get(&name) {
                table.insert((*key).to_owned(), to_value(&name, *kind, raw)?);
            }
        }
        for (key, raw) in &sources.flags {
            let Some((_, kind)) = KEYS.iter().find(|(k, _)| k == key) else {
                continue;
            };
            let flag = format!("--{}", key.replace('_', "-"));
            table.insert((*key).to_owned(), to_value(&flag, *kind, raw)?);
        }
        Self::deserialize(table).map_err(|e| ConfigError::BadValue {
            source_name: "configuration".to_owned(),
            message: one_line(&e.to_string()),
        })
    }

    /// Checks the settings together and resolves the API token; call before binding anything.
    pub fn validate(&self) -> Result<Option<ApiToken>, ConfigError> {
        let invalid = |key, message: &str| ConfigError::Invalid {
            key,
            message: message.to_owned(),
        };
        if self.reserved_ports.contains(&0) {
            return Err(invalid("reserved_ports", "port 0 is not a port"));
        }
        if self.handshake_timeout_ms == 0 || self.connect_timeout_ms == 0 {
            return Err(invalid(
                "handshake_timeout_ms",
                "timeouts must be at least 1 ms",
            ));
        }
        if !(16_384..=1 << 20).contains(&self.max_hello_bytes) {
            return Err(invalid(
                "max_hello_bytes",
                "must be between 16384 and 1048576",
            ));
        }
        if self.max_handshakes == 0 || self.max_flows == 0 {
            return Err(invalid("max_flows", "limits must be at least 1"));
        }
        if self.low_water_bytes >= self.soft_water_bytes {
            return Err(invalid("low_water_bytes", "must be below soft_water_bytes"));
        }
        if self.soft_water_bytes > self.high_water_bytes {
            return Err(invalid(
                "soft_water_bytes",
                "must not be above high_water_bytes",
            ));
        }
        if self.api_max_body_bytes < 1024 {
            return Err(invalid("api_max_body_bytes", "must be at least 1024"));
        }
        if self.bulk_flows == BulkFlows::Userspace
            && (self.relay_first_bytes == 0 || self.relay_first_ms == 0)
        {
            return Err(invalid(
                "bulk_flows",
                "tells bulk flows apart in the first phase: needs relay_first_bytes and \
                 relay_first_ms above 0",
            ));
        }
        if let Some(suffix) = &self.dns_suffix {
            let ok = !suffix.is_empty()
                && suffix.len() <= 200
                && suffix.split('.').all(crate::pattern::is_dns_label);
            if !ok {
                return Err(invalid("dns_suffix", "must be a lower-case DNS name"));
            }
        }
        if !(1..=60_000).contains(&self.resolve_timeout_ms) {
            return Err(invalid("resolve_timeout_ms", "must be between 1 and 60000"));
        }
        if self.dns_negative_ttl_ms > 3_600_000 {
            return Err(invalid("dns_negative_ttl_ms", "must be at most 3600000"));
        }
        if self.dns_server.is_some() && self.dns_suffix.is_none() {
            return Err(invalid("dns_server", "needs dns_suffix"));
        }
        let token = self.resolve_token()?;
        if token.is_none() && !self.api_listen.ip().is_loopback() {
            return Err(invalid(
                "api_listen",
                "listening beyond loopback requires api_token or api_token_file",
            ));
        }
        Ok(token)
    }

    fn resolve_token(&self) -> Result<Option<ApiToken>, ConfigError> {
        let token = match (&self.api_token, &self.api_token_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid {
                    key: "api_token",
                    message: "set api_token or api_token_file, not both".to_owned(),
                });
            }
            (Some(t), None) => t.0.clone(),
            (None, Some(path)) => read_token_file(path)?,
            (None, None) => return Ok(None),
        };
        let token = token.trim().to_owned();
        if token.is_empty() || token.chars().any(|c| c.is_control() || c == ' ') {
            return Err(ConfigError::Invalid {
                key: "api_token",
                message: "must be non-empty printable text without spaces".to_owned(),
            });
        }
        Ok(Some(ApiToken(token)))
    }

    /// The set of reserved ports: `reserved_ports` plus the API's own port.
    pub fn all_reserved_ports(&self) -> Vec<u16> {
        let mut ports = self.reserved_ports.clone();
        ports.push(self.api_listen.port());
        ports.sort_unstable();
        ports.dedup();
        ports
    }
}

fn read_token_file(path: &Path) -> Result<String, ConfigError> {
    use std::os::unix::fs::PermissionsExt as _;
    let invalid = |message: String| ConfigError::Invalid {
        key: "api_token_file",
        message,
    };
    let meta = std::fs::metadata(path).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(invalid(format!(
            "{} must not be readable by group or others (chmod 600)",
            path.display()
        )));
    }
    std::fs::read_to_string(path).map_err(|e| invalid(format!("{}: {e}", path.display())))
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(env: &[(&str, &str)]) -> Sources {
        Sources {
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Sources::default()
        }
    }

    #[test]
    fn defaults_validate_and_listen_on_loopback() {
        let c = Config::load(&Sources::default()).unwrap();
        assert_eq!(c.api_listen.to_string(), "127.0.0.1:9180");
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert_eq!(c.all_reserved_ports(), vec![2019, 2222, 9180]);
        assert!(c.validate().unwrap().is_none());
    }

    #[test]
    fn file_then_env_then_flags_take_precedence() {
        let dir = std::env::temp_dir().join(format!("ingressd-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "data_dir = \"/from/file\"\nmax_flows = 7\nreserved_ports = [1]\noffload = \"off\"\n",
        )
        .unwrap();
        let mut s = sources(&[
            ("INGRESSD_CONFIG", file.to_str().unwrap()),
            ("INGRESSD_DATA_DIR", "/from/env"),
            ("RESERVED_PORTS", "5, 6"),
            ("INGRESSD_API_TOKEN", "1234"),
        ]);
        s.flags.push(("data_dir", "/from/flag".to_owned()));
        let c = Config::load(&s).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/from/flag"));
        assert_eq!(c.max_flows, 7);
        assert_eq!(c.reserved_ports, vec![5, 6]);
        assert_eq!(c.offload, Offload::Off);
        assert_eq!(c.api_token.as_ref().map(ApiToken::expose), Some("1234"));
        assert!(!format!("{c:?}").contains("1234"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_key_is_settable_from_the_environment() {
        for (key, kind) in KEYS {
            let raw = match (key, kind) {
                (_, Kind::Int) => "20000",
                (_, Kind::IntList) => "1,2",
                (_, Kind::List) => "10.0.0.0/8",
                (&"api_listen", _) => "127.0.0.1:1",
                (&"dns_server", _) => "127.0.0.1:53",
                (&"offload", _) => "required",
                (&"bulk_flows", _) => "userspace",
                (&"listen_addr", _) => "127.0.0.1",
                _ => "x",
            };
            let s = sources(&[(env_name(key).as_str(), raw)]);
            Config::load(&s).unwrap_or_else(|e| panic!("{key}: {e}"));
        }
    }

    #[test]
    fn unknown_file_keys_and_missing_named_files_are_errors() {
        let dir = std::env::temp_dir().join(format!("ingressd-cfg2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "data_dri = \"x\"\n").unwrap();
        let err = Config::load(&sources(&[("INGRESSD_CONFIG", file.to_str().unwrap())]));
        assert!(err.unwrap_err().to_string().contains("data_dri"));
        let err = Config::load(&sources(&[("INGRESSD_CONFIG", "/nonexistent/x.toml")]));
        assert!(matches!(err, Err(ConfigError::ReadFile { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_values_name_their_source() {
        let err = Config::load(&sources(&[("INGRESSD_MAX_FLOWS", "lots")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "INGRESSD_MAX_FLOWS: \"lots\" is not an integer"
        );
        let err = Config::load(&sources(&[("INGRESSD_OFFLOAD", "maybe")])).unwrap_err();
        assert!(err.to_string().contains("maybe"), "{err}");
    }

    #[test]
    fn api_beyond_loopback_needs_a_token() {
        let c = Config::load(&sources(&[("INGRESSD_API_LISTEN", "0.0.0.0:9180")])).unwrap();
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "api_listen: listening beyond loopback requires api_token or api_token_file"
        );
        let c = Config::load(&sources(&[
            ("INGRESSD_API_LISTEN", "0.0.0.0:9180"),
            ("INGRESSD_API_TOKEN", "s3cret"),
        ]))
        .unwrap();
        assert_eq!(c.validate().unwrap().unwrap().as_bytes(), b"s3cret");
    }

    #[test]
    fn token_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("ingressd-cfg3-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "abc\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let c = Config::load(&sources(&[(
            "INGRESSD_API_TOKEN_FILE",
            file.to_str().unwrap(),
        )]))
        .unwrap();
        assert!(c.validate().is_err());
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(c.validate().unwrap().unwrap().as_bytes(), b"abc");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cidrs_parse_contain_and_print() {
        let cidr = |s: &str| s.parse::<Cidr>().unwrap();
        let net = cidr("10.1.2.3/8");
        assert_eq!(net.to_string(), "10.0.0.0/8");
        assert!(net.contains("10.255.0.1".parse().unwrap()));
        assert!(
            net.contains("::ffff:10.0.0.1".parse().unwrap()),
            "mapped addresses are unwrapped"
        );
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        assert_eq!(cidr("::1").to_string(), "::1/128");
        assert_eq!(cidr("192.0.2.7").to_string(), "192.0.2.7/32");
        assert_eq!(cidr("::ffff:10.0.0.0/104").to_string(), "10.0.0.0/8");
        assert!(cidr("::ffff:10.0.0.0/104").contains("10.9.9.9".parse().unwrap()));
        assert!(cidr("0.0.0.0/0").contains("203.0.113.9".parse().unwrap()));
        assert!(!cidr("0.0.0.0/0").contains("2001:db8::1".parse().unwrap()));
        assert!(cidr("::/0").contains("2001:db8::1".parse().unwrap()));
        assert!(cidr("::/0").contains("fe80::1".parse().unwrap()));
        assert!(cidr("fc00::/7").contains("fd12:3456::1".parse().unwrap()));
        assert!(!cidr("fc00::/7").contains("fe00::1".parse().unwrap()));
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/",
            "10.0.0/8",
            "10.0.0.0/+8",
            "10.0.0.0/ 8",
            "x",
            "::ffff:1.2.3.4/95",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn resolver_settings_are_bounded() {
        for (env, value, key) in [
            ("INGRESSD_RESOLVE_TIMEOUT_MS", "0", "resolve_timeout_ms"),
            ("INGRESSD_RESOLVE_TIMEOUT_MS", "60001", "resolve_timeout_ms"),
            (
                "INGRESSD_DNS_NEGATIVE_TTL_MS",
                "3600001",
                "dns_negative_ttl_ms",
            ),
        ] {
            let c = Config::load(&sources(&[(env, value)])).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.starts_with(key), "{env}={value}: {err}");
        }
        let c = Config::load(&sources(&[
            ("INGRESSD_RESOLVE_TIMEOUT_MS", "250"),
            ("INGRESSD_DNS_NEGATIVE_TTL_MS", "0"),
        ]))
        .unwrap();
        assert_eq!((c.resolve_timeout_ms, c.dns_negative_ttl_ms), (250, 0));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn bulk_flows_in_userspace_need_the_first_phase() {
        let c = Config::load(&sources(&[("INGRESSD_BULK_FLOWS", "userspace")])).unwrap();
        assert_eq!(c.bulk_flows, BulkFlows::Userspace);
        assert!(c.validate().is_ok());
        for off in ["INGRESSD_RELAY_FIRST_MS", "INGRESSD_RELAY_FIRST_BYTES"] {
            let c = Config::load(&sources(&[
                ("INGRESSD_BULK_FLOWS", "userspace"),
                (off, "0"),
            ]))
            .unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.starts_with("bulk_flows"), "{off}: {err}");
        }
        assert!(Config::load(&sources(&[("INGRESSD_BULK_FLOWS", "fast")])).is_err());
    }

    #[test]
    fn water_marks_must_be_ordered() {
        let c = Config::load(&sources(&[("INGRESSD_LOW_WATER_BYTES", "999999999")])).unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("low_water_bytes")
        );
        let c = Config::load(&sources(&[("INGRESSD_SOFT_WATER_BYTES", "999999999")])).unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("soft_water_bytes")
        );
        let c = Config::load(&sources(&[
            ("INGRESSD_SOFT_WATER_BYTES", "1048576"),
            ("INGRESSD_LOW_WATER_BYTES", "65536"),
        ]))
        .unwrap();
        assert!(c.validate().is_ok());
        assert_eq!(c.soft_water_bytes, 1 << 20);
    }
}
