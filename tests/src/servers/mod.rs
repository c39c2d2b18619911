//! Real servers as backends, each on a loopback address and a leased port, with a TLS
//! certificate from a per-server CA; each guard stops its server by PID when dropped, and each
//! start waits (polling, with a deadline) until the server answers.
pub mod dnsmasq;
pub mod postgres;
pub mod redis;
pub mod sshd;

use std::{net::Ipv4Addr, time::Duration};

use crate::ports::next_loopback;

/// How long a server gets to start answering.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a server listens and which names its certificate covers.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// The loopback address to listen on.
    pub ip: Ipv4Addr,
    /// DNS names the server's certificate covers (the SNI clients will send), besides `ip`.
    pub names: Vec<String>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            ip: next_loopback(),
            names: vec!["localhost".to_owned()],
        }
    }
}

impl ServerOptions {
    /// A server on `ip` whose certificate covers `names`.
    pub fn new(ip: Ipv4Addr, names: &[&str]) -> Self {
        Self {
            ip,
            names: names.iter().map(|n| (*n).to_owned()).collect(),
        }
    }

    /// The certificate names: `names` plus the address.
    pub(crate) fn cert_names(&self) -> Vec<String> {
        let mut names = self.names.clone();
        names.push(self.ip.to_string());
        names
    }
}
