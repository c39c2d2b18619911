//! The `ingressd` command line: the daemon's flags (the top layer of the configuration) and
//! the `ctl` subcommand.
use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::Sources;
use crate::ctl::CtlArgs;

/// ingressd: an SNI-routing TCP ingress.
#[derive(Debug, Parser)]
#[command(name = "ingressd", version, about)]
pub struct Cli {
    /// TOML configuration file (overrides `INGRESSD_CONFIG`; a named file must exist).
    #[arg(long, global = false)]
    pub config: Option<PathBuf>,
    /// Directory for record files.
    #[arg(long)]
    pub data_dir: Option<String>,
    /// API listen address, e.g. 127.0.0.1:9180.
    #[arg(long)]
    pub api_listen: Option<String>,
    /// File holding the API bearer token (mode 0600).
    #[arg(long)]
    pub api_token_file: Option<String>,
    /// Comma-separated reserved ports.
    #[arg(long)]
    pub reserved_ports: Option<String>,
    /// Kernel splice: auto, off or required.
    #[arg(long)]
    pub offload: Option<String>,
    /// Address ingress listeners bind (default `::`, dual-stack).
    #[arg(long)]
    pub listen_addr: Option<String>,
    /// Subcommand; without one, run the daemon.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (the default).
    Run,
    /// Talk to a running daemon's API.
    Ctl(CtlArgs),
}

impl Cli {
    /// The configuration layers: this command line plus the process environment.
    pub fn sources(&self) -> Sources {
        let env: BTreeMap<String, String> = std::env::vars().collect();
        let flags = [
            ("data_dir", &self.data_dir),
            ("api_listen", &self.api_listen),
            ("api_token_file", &self.api_token_file),
            ("reserved_ports", &self.reserved_ports),
            ("offload", &self.offload),
            ("listen_addr", &self.listen_addr),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.clone().map(|v| (k, v)))
        .collect();
        Sources {
            config_file: self.config.clone(),
            env,
            flags,
        }
    }
}
